"""The gateway's gRPC surface: authenticate, validate, pick a replica, relay the stream."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time

import grpc
from prometheus_client import Counter, Gauge, Histogram

from services.gateway.auth import ApiKeys, AuthError
from services.gateway.config import GatewayConfig
from services.gateway.ledger import CostLedger
from services.gateway.models import ModelCatalog, UnknownModel
from services.gateway.prefix import PrefixRoute, PrefixRouter
from services.gateway.ratelimit import Limited, RetryBudget, TenantLimiter
from services.gateway.replicas import Replica, ReplicaSet
from services.gateway.semantic import SemanticCacheClient, plan_for, replay, storable
from services.gateway.validation import validate
from spotmesh.metrics import ITL_BUCKETS, TTFT_BUCKETS
from spotmesh.runtime import fields
from spotmesh.v1 import cache_pb2, common_pb2, gateway_pb2, gateway_pb2_grpc, inference_pb2
from spotmesh.validation import InvalidField

log = logging.getLogger("spotmesh.gateway")

POOLS = {"spot": common_pb2.POOL_SPOT, "on-demand": common_pb2.POOL_ON_DEMAND}
# Replica errors that mean "this replica cannot take it now, another may": retried on another
# replica as long as no token has reached the client yet.
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
             grpc.StatusCode.ABORTED, grpc.StatusCode.NOT_FOUND}
# Replica errors passed to the client as they are: the request itself is at fault.
CLIENT_FAULTS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DEADLINE_EXCEEDED,
                 grpc.StatusCode.OUT_OF_RANGE}

REQUESTS = Counter("spotmesh_gateway_requests_total", "Calls by method and final status code.",
                   ["method", "code"])
TTFT = Histogram("spotmesh_gateway_time_to_first_token_seconds",
                 "From the request's arrival to its first token leaving the gateway.",
                 buckets=TTFT_BUCKETS)
ITL = Histogram("spotmesh_gateway_inter_token_latency_seconds",
                "Between consecutive messages of one stream.", buckets=ITL_BUCKETS)
IN_FLIGHT = Gauge("spotmesh_gateway_in_flight_requests", "Requests being served.")
RETRIES = Counter("spotmesh_gateway_start_retries_total",
                  "Streams restarted on another replica before their first token.")
RATE_LIMITED = Counter("spotmesh_gateway_rate_limited_total",
                       "Requests refused by a tenant's rate limit, by the limit hit.", ["limit"])
RESUMES = Counter("spotmesh_gateway_stream_resumes_total",
                  "Streams continued on another replica after theirs failed mid-stream.",
                  ["outcome"])


class Rejected(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, cfg: GatewayConfig, keys: ApiKeys, catalog: ModelCatalog,
                 replicas: ReplicaSet, ledger: CostLedger,
                 semantic: SemanticCacheClient | None = None,
                 prefix: PrefixRouter | None = None,
                 limiter: TenantLimiter | None = None) -> None:
        self.cfg = cfg
        self.limiter = limiter or TenantLimiter()
        self.retry_budget = RetryBudget()
        self.prefix = prefix or PrefixRouter()
        self.keys = keys
        self.catalog = catalog
        self.replicas = replicas
        self.ledger = ledger
        self.semantic = semantic

    @contextlib.asynccontextmanager
    async def _outcome(self, method: str, context):
        """Turns whatever ends a call into its status code: in metrics and on the wire."""
        code = grpc.StatusCode.OK
        IN_FLIGHT.inc()
        try:
            yield
        except Rejected as exc:
            code = exc.code
            await context.abort(exc.code, exc.message)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            # A bug, not the caller's fault: say so plainly and keep the details in the log.
            code = grpc.StatusCode.INTERNAL
            log.exception("request failed", extra=fields(method=method))
            await context.abort(code, "internal error in the gateway; see its log")
        finally:
            IN_FLIGHT.dec()
            REQUESTS.labels(method, code.name).inc()

    async def Generate(self, request, context):
        async with self._outcome("Generate", context):
            async for msg in self._generate(request, context):
                yield msg

    async def Complete(self, request, context):
        out = gateway_pb2.GenerateResponse()
        text: list[str] = []
        async with self._outcome("Complete", context):
            async for msg in self._generate(request, context):
                text.append(msg.text)
                out.token_ids.extend(msg.token_ids)
                if msg.request_id:
                    out.request_id = msg.request_id
                if msg.HasField("served_by"):
                    out.served_by.CopyFrom(msg.served_by)
                if msg.finish_reason:
                    out.finish_reason = msg.finish_reason
                    out.usage.CopyFrom(msg.usage)
                    out.cost_usd = msg.cost_usd
                    out.cache_hit = msg.cache_hit
            out.text = "".join(text)
        return out

    def _admit(self, request, context):
        try:
            tenant = self.keys.authenticate(context.invocation_metadata())
        except AuthError as exc:
            raise Rejected(grpc.StatusCode.UNAUTHENTICATED, str(exc)) from None
        try:
            valid = validate(request, self.cfg.limits)
            model = self.catalog.resolve(valid.model)
        except InvalidField as exc:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        except UnknownModel:
            raise Rejected(grpc.StatusCode.NOT_FOUND,
                           f"model {valid.model!r} is not served; served models: "
                           f"{', '.join(self.catalog.names())}") from None
        if not tenant.may_use(model.name):
            raise Rejected(grpc.StatusCode.PERMISSION_DENIED,
                           f"tenant {tenant.name!r} may not use model {model.name!r}")
        try:
            prompt_ids = model.encode(valid)
        except InvalidField as exc:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        field = "prompt" if valid.prompt is not None else "messages"
        if len(prompt_ids) >= model.max_model_len:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT,
                           f"{field} is {len(prompt_ids)} tokens; model {model.name!r} takes at "
                           f"most {model.max_model_len - 1} prompt tokens")
        if len(prompt_ids) + valid.sampling.max_tokens > model.max_model_len:
            room = model.max_model_len - len(prompt_ids)
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT,
                           f"sampling.max_tokens {valid.sampling.max_tokens} does not fit: the "
                           f"{len(prompt_ids)}-token {field} leaves room for {room} tokens in "
                           f"model {model.name!r}'s {model.max_model_len}-token context")
        return tenant, valid, model, prompt_ids

    async def _generate(self, request, context):
        arrived = time.monotonic()
        tenant, valid, model, prompt_ids = self._admit(request, context)
        reserved = len(prompt_ids) + valid.sampling.max_tokens
        try:
            self.limiter.admit(tenant.name, tenant.limits, reserved)
        except Limited as exc:
            RATE_LIMITED.labels(exc.limit).inc()
            raise Rejected(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from None
        used = {"tokens": len(prompt_ids)}
        try:
            async for msg in self._generate_admitted(tenant, valid, model, prompt_ids, context,
                                                     arrived, used):
                yield msg
        finally:
            # Give back what the request did not use (it stopped early, failed, or was a
            # cache hit that used no engine).
            self.limiter.refund(tenant.name, reserved - used["tokens"])

    async def _generate_admitted(self, tenant, valid, model, prompt_ids, context, arrived,
                                 used):
        plan = plan_for(tenant, valid) if self.semantic else None
        vector = None
        if plan is not None:
            vector, answer = await self.semantic.lookup(tenant, model.name, plan)
            if answer is not None and len(answer.token_ids) <= valid.sampling.max_tokens:
                self.semantic.book_hit(tenant, answer)
                used["tokens"] = 0
                first = True
                for msg in replay(answer, model.tokenizer, valid.request_id, len(prompt_ids)):
                    if first:
                        TTFT.observe(time.monotonic() - arrived)
                        first = False
                    yield msg
                return
            self.semantic.book(tenant, "miss" if vector is not None else "error")
        elif self.semantic:
            self.semantic.book(tenant, "bypass")
        collect = plan is not None and vector is not None
        texts: list[str] = []
        token_ids: list[int] = []
        outcome: dict[str, float] = {}
        async for msg in self._from_replicas(tenant, valid, model, prompt_ids, context, arrived,
                                             outcome):
            used["tokens"] += len(msg.token_ids)
            if collect:
                texts.append(msg.text)
                token_ids.extend(msg.token_ids)
                if msg.finish_reason and storable(msg.finish_reason, plan):
                    self.semantic.store_later(cache_pb2.StoreRequest(
                        tenant=tenant.name, model=model.name,
                        sampling_fingerprint=plan.fingerprint, vector=vector,
                        prompt=plan.key_text, text="".join(texts), token_ids=token_ids,
                        ttl_seconds=plan.ttl_seconds, finish_reason=msg.finish_reason,
                        usage=msg.usage, cost_usd=msg.cost_usd,
                        replica_seconds=outcome.get("replica_seconds", 0.0),
                        replace=not plan.lookup))
            yield msg

    async def _from_replicas(self, tenant, valid, model, prompt_ids, context, arrived, outcome):
        inference_request = inference_pb2.InferenceRequest(
            request_id=valid.request_id,
            model=model.name,
            prompt_token_ids=prompt_ids,
            sampling=valid.sampling.to_proto(),
        )
        route = None
        if self.replicas.routing == "prefix":
            route = await self.prefix.plan(model.name, prompt_ids,
                                           self.replicas.block_size(model.name))
        self.retry_budget.on_request()
        tried: set[str] = set()
        last_error = "no replica serves it"
        delivered: list[int] = []  # token ids the client has received
        starts_left, resumes_left = self.cfg.start_attempts, self.cfg.resume_attempts
        request = inference_request
        while True:
            # A replica the index named may have vanished since: the filter drops it and the
            # request goes to another.
            replica = self.replicas.pick(model.name, exclude=tried, route=route)
            if replica is None:
                break
            tried.add(replica.address)
            resumed = bool(delivered)
            try:
                async for msg in self._relay(replica, request, context, tenant.name, arrived,
                                             outcome, route, resumed=resumed):
                    if resumed and msg.finish_reason:
                        # One stream, one usage: the prompt the client sent and every token
                        # it received, however many replicas produced them.
                        msg.usage.prompt_tokens = len(prompt_ids)
                        msg.usage.completion_tokens = len(delivered) + len(msg.token_ids)
                        msg.usage.cached_prompt_tokens = min(msg.usage.cached_prompt_tokens,
                                                             len(prompt_ids))
                    delivered.extend(msg.token_ids)
                    yield msg
                return
            except grpc.aio.AioRpcError as exc:
                status = exc.code()
                if status == grpc.StatusCode.CANCELLED and not context.cancelled():
                    # Not our client: the replica cancelled it (shutting down). Retryable like
                    # UNAVAILABLE.
                    status = grpc.StatusCode.UNAVAILABLE
                if status in CLIENT_FAULTS:
                    raise Rejected(status, exc.details() or status.name) from None
                self.replicas.mark_failed(replica)
                log.warning("replica call failed",
                            extra=fields(replica=replica.name, code=status.name,
                                         request_id=valid.request_id,
                                         delivered=len(delivered), detail=exc.details()))
                last_error = f"replica {replica.name} failed: {status.name} {exc.details()}"
                if status not in RETRYABLE:
                    raise Rejected(grpc.StatusCode.UNAVAILABLE,
                                   f"{last_error}; retry the request") from None
            if not delivered:
                starts_left -= 1
                if starts_left <= 0:
                    break
                if not self.retry_budget.try_retry():
                    last_error += "; the gateway's retry budget is spent"
                    break
                # Back off a little (jittered, within the client's deadline) so retries from
                # many requests do not land on the next replica at the same instant.
                pause = random.uniform(0.5, 1.5) * 0.01 * 2 ** (self.cfg.start_attempts
                                                                - starts_left - 1)
                left = context.time_remaining()
                if left is not None and left < 4 * pause:
                    break
                await asyncio.sleep(pause)
                RETRIES.inc()
                continue
            # Mid-stream: continue on another replica from the prompt plus what the client
            # already has, so it sees one stream with no token twice and none lost.
            if resumes_left <= 0:
                raise Rejected(grpc.StatusCode.UNAVAILABLE,
                               f"{last_error}; the stream was interrupted after "
                               f"{len(delivered)} tokens and could not be resumed; retry the "
                               "request") from None
            resumes_left -= 1
            remaining = valid.sampling.max_tokens - len(delivered)
            if remaining <= 0:
                # Every token arrived; only the replica's final message was lost.
                RESUMES.labels("completed").inc()
                yield gateway_pb2.GenerateResponse(
                    finish_reason=common_pb2.FINISH_REASON_LENGTH,
                    usage=common_pb2.Usage(prompt_tokens=len(prompt_ids),
                                           completion_tokens=len(delivered)))
                return
            RESUMES.labels("resumed").inc()
            request = inference_pb2.InferenceRequest()
            request.CopyFrom(inference_request)
            # Within the replicas' 128-character request_id limit.
            request.request_id = f"{valid.request_id[:100]}-resume-{len(delivered)}"
            request.prompt_token_ids.extend(delivered)
            request.sampling.max_tokens = remaining
        raise Rejected(grpc.StatusCode.UNAVAILABLE,
                       f"no replica available for model {model.name!r} ({last_error}); retry "
                       "with backoff")

    async def _relay(self, replica: Replica, request, context, tenant: str, arrived: float,
                     outcome: dict[str, float], route: PrefixRoute | None = None,
                     resumed: bool = False):
        """One replica's stream as gateway messages. ``resumed``: the continuation of a stream
        another replica started (no second first token, no second request id)."""
        remaining = context.time_remaining()
        call = replica.stub.Generate(request, timeout=remaining)
        replica.in_flight += 1
        served_by = common_pb2.ServedBy(replica=replica.name,
                                        pool=POOLS.get(replica.pool, common_pb2.POOL_UNSPECIFIED))
        first = True
        last = arrived
        try:
            async for chunk in call:
                msg = gateway_pb2.GenerateResponse(text=chunk.text, token_ids=chunk.token_ids)
                now = time.monotonic()
                if first:
                    msg.served_by.CopyFrom(served_by)
                    if not resumed:
                        msg.request_id = request.request_id
                        TTFT.observe(now - arrived)
                    first = False
                    if route is not None:
                        # Its engine has prefilled the prompt: it now holds these blocks.
                        capacity = replica.report.kv_capacity_blocks if replica.report else 0
                        self.prefix.record(replica.name, route, capacity)
                else:
                    ITL.observe(now - last)
                last = now
                if chunk.finish_reason:
                    outcome["replica_seconds"] = chunk.replica_seconds
                    msg.finish_reason = chunk.finish_reason
                    msg.usage.CopyFrom(chunk.usage)
                    msg.served_by.CopyFrom(served_by)
                    msg.cost_usd = self.ledger.book(
                        tenant=tenant,
                        pool=replica.pool,
                        replica_seconds=chunk.replica_seconds,
                        prompt_tokens=chunk.usage.prompt_tokens,
                        cached_prompt_tokens=chunk.usage.cached_prompt_tokens,
                        completion_tokens=chunk.usage.completion_tokens,
                    )
                yield msg
            self.replicas.mark_ok(replica)
        finally:
            replica.in_flight -= 1
            # The client went away or we stopped early: cancelling the call aborts the engine
            # request on the replica, freeing its KV cache.
            call.cancel()
