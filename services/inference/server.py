"""The inference replica's gRPC surface: validate, translate to the engine, stream back."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from prometheus_client import Counter, Gauge, Histogram

from services.inference.accounting import TimeShare
from services.inference.drain import DrainLifecycle
from services.inference.engine import (
    FINISH_ABORT,
    FINISH_LENGTH,
    FINISH_STOP,
    Engine,
    EngineError,
    EngineInfo,
    RequestRejected,
)
from spotmesh.metrics import ITL_BUCKETS, TTFT_BUCKETS
from spotmesh.runtime import fields
from spotmesh.sampling import sampling_from_proto
from spotmesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from spotmesh.validation import InvalidField

log = logging.getLogger("spotmesh.inference")

FINISH_REASONS = {
    FINISH_STOP: common_pb2.FINISH_REASON_STOP,
    FINISH_LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FINISH_ABORT: common_pb2.FINISH_REASON_ABORT,
}
POOLS = {"spot": common_pb2.POOL_SPOT, "on-demand": common_pb2.POOL_ON_DEMAND}
MAX_REQUEST_ID = 128

REQUESTS = Counter(
    "spotmesh_inference_requests_total", "Generate calls by final gRPC status code.", ["code"]
)
TTFT = Histogram(
    "spotmesh_inference_time_to_first_token_seconds",
    "From admission to the first generated token.",
    buckets=TTFT_BUCKETS,
)
ITL = Histogram(
    "spotmesh_inference_inter_token_latency_seconds",
    "Between consecutive chunks of one stream.",
    buckets=ITL_BUCKETS,
)
TOKENS = Counter("spotmesh_inference_tokens_total", "Tokens processed.", ["kind"])
REPLICA_SECONDS = Counter(
    "spotmesh_inference_busy_seconds_total", "Wall time with at least one request in flight."
)
IN_FLIGHT = Gauge("spotmesh_inference_in_flight_requests", "Streams open on this replica.")
QUEUE_DEPTH = Gauge("spotmesh_inference_queue_depth", "Requests waiting in the engine's queue.")
RUNNING = Gauge("spotmesh_inference_running_requests", "Requests the engine is decoding.")
KV_USAGE = Gauge("spotmesh_inference_kv_cache_usage_ratio", "Fraction of KV cache in use.")


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(
        self,
        engine: Engine,
        info: EngineInfo,
        *,
        replica: str,
        pool: str,
        drain_grace_seconds: float,
        on_draining=None,
    ) -> None:
        self.engine = engine
        self.info = info
        self.pool = pool
        # on_draining: async, flips health to NOT_SERVING.
        self.drain = DrainLifecycle(engine.abort, grace_seconds=drain_grace_seconds,
                                    replica=replica, on_draining=on_draining)
        self._share = TimeShare()
        self._busy_booked = 0.0
        QUEUE_DEPTH.set_function(lambda: self.engine.load().waiting)
        RUNNING.set_function(lambda: self.engine.load().running)
        KV_USAGE.set_function(lambda: self.engine.load().kv_cache_usage)
        IN_FLIGHT.set_function(lambda: len(self.drain.in_flight))

    @property
    def replica(self) -> str:
        """The replica's name (in served_by, the prefix index, logs); known once it listens.
        The drain lifecycle keeps it, for its logs."""
        return self.drain.replica

    @replica.setter
    def replica(self, name: str) -> None:
        self.drain.replica = name

    async def Generate(self, request: inference_pb2.InferenceRequest, context):
        code = grpc.StatusCode.OK
        try:
            async for chunk in self._generate(request, context):
                yield chunk
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except _Abort as exc:
            code = exc.code
            await context.abort(exc.code, exc.message)
        finally:
            REQUESTS.labels(code.name).inc()

    async def _generate(self, request, context):
        if self.drain.draining:
            raise _Abort(grpc.StatusCode.UNAVAILABLE, f"replica {self.replica} is draining")
        rid = request.request_id
        if not rid or len(rid) > MAX_REQUEST_ID:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         f"request_id must be 1-{MAX_REQUEST_ID} characters")
        if request.model and request.model != self.info.model:
            raise _Abort(grpc.StatusCode.NOT_FOUND,
                         f"model {request.model!r} is not served here (this replica serves "
                         f"{self.info.model!r})")
        prompt = list(request.prompt_token_ids)
        if not prompt:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt_token_ids must not be empty")
        vocab = self.info.vocab_size
        if vocab > 0:
            # Checked here, not left to the engine: an engine that does not check would use an
            # out-of-range id as an embedding index.
            for i, t in enumerate(prompt):
                if not 0 <= t < vocab:
                    raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                                 f"prompt_token_ids[{i}] is {t}; token ids are in [0, {vocab})")
        max_new = self.info.max_model_len - len(prompt)
        if max_new < 1:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         f"prompt_token_ids has {len(prompt)} tokens; the model's context is "
                         f"{self.info.max_model_len}")
        try:
            sampling = sampling_from_proto(
                request.sampling, default_max_tokens=min(256, max_new), max_tokens_limit=max_new
            )
        except InvalidField as exc:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        if rid in self.drain.in_flight:
            raise _Abort(grpc.StatusCode.ALREADY_EXISTS, f"request_id {rid!r} is already running")

        self.drain.enter(rid)
        share_token = self._share.enter()
        started = time.monotonic()
        last = None
        completion = 0
        try:
            async for chunk in self.engine.generate(rid, prompt, sampling):
                now = time.monotonic()
                if chunk.token_ids:
                    if last is None:
                        TTFT.observe(now - started)
                    else:
                        ITL.observe(now - last)
                    last = now
                completion += len(chunk.token_ids)
                msg = inference_pb2.InferenceChunk(text=chunk.text, token_ids=chunk.token_ids)
                if chunk.finish_reason is not None:
                    if chunk.finish_reason == FINISH_ABORT and self.drain.evicted(rid):
                        raise _Abort(grpc.StatusCode.UNAVAILABLE,
                                     f"replica {self.replica} drained before the stream "
                                     "finished; retry on another replica")
                    msg.finish_reason = FINISH_REASONS.get(
                        chunk.finish_reason, common_pb2.FINISH_REASON_STOP)
                    msg.usage.prompt_tokens = chunk.prompt_tokens
                    msg.usage.cached_prompt_tokens = chunk.cached_prompt_tokens
                    msg.usage.completion_tokens = completion
                    msg.replica_seconds = self._share.leave(share_token)
                    share_token = None
                    TOKENS.labels("prompt").inc(chunk.prompt_tokens)
                    TOKENS.labels("cached_prompt").inc(chunk.cached_prompt_tokens)
                yield msg
        except RequestRejected as exc:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        except EngineError as exc:
            log.error("engine failed", extra=fields(request_id=rid, error=str(exc)))
            raise _Abort(grpc.StatusCode.UNAVAILABLE, f"engine error: {exc}") from None
        finally:
            if share_token is not None:
                self._share.leave(share_token)
            # Busy time is the replica's, not the request's: book only what accrued since the
            # last booking, so overlapping requests never count the same second twice.
            REPLICA_SECONDS.inc(self._share.busy_seconds - self._busy_booked)
            self._busy_booked = self._share.busy_seconds
            TOKENS.labels("completion").inc(completion)
            self.drain.leave(rid)

    async def Load(self, request, context) -> inference_pb2.LoadReport:
        load = self.engine.load()
        report = inference_pb2.LoadReport(
            replica=self.replica,
            pool=POOLS.get(self.pool, common_pb2.POOL_UNSPECIFIED),
            model=self.info.model,
            engine=self.info.engine,
            waiting=load.waiting,
            running=load.running,
            kv_cache_usage=load.kv_cache_usage,
            draining=self.drain.draining,
            max_model_len=self.info.max_model_len,
            kv_block_size=self.info.kv_block_size,
            kv_capacity_blocks=self.info.kv_capacity_blocks,
            in_flight=len(self.drain.in_flight),
            quantization=self.info.quantization,
        )
        if load.gpu_utilization is not None:
            report.gpu_utilization = load.gpu_utilization
        return report

    async def Drain(self, request, context) -> inference_pb2.DrainResponse:
        grace = request.grace_seconds if request.HasField("grace_seconds") else None
        if grace is not None and not 0 <= grace <= 3600:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"grace_seconds must be in [0, 3600], got {grace:g}")
        admit = request.admit_seconds
        limit = self.drain.grace_seconds if grace is None else grace
        if not 0 <= admit <= limit:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"admit_seconds must be in [0, grace_seconds ({limit:g})], got "
                                f"{admit:g}")
        in_flight = len(self.drain.in_flight)
        self.drain.start(grace, admit)
        return inference_pb2.DrainResponse(in_flight=in_flight)


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
