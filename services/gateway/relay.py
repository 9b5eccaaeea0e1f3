"""One request's stream across replicas: the gateway's stream state machine, with no server
in it (a test drives it with fake replicas).

Before the first token, a replica that fails is retried elsewhere with jittered backoff inside
the client's deadline, charged to a retry budget. After it, the stream is resumed on another
replica from the prompt plus the tokens the client already has: one stream, no token twice,
none lost, usage counted once. Each replica's stream is relayed as gateway messages: the first
says who served it, the last carries usage and the cost the ledger booked.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator
from typing import Protocol

import grpc
from prometheus_client import Counter, Histogram

from services.gateway.errors import Rejected
from services.gateway.ledger import CostLedger
from services.gateway.prefix import PrefixRoute, PrefixRouter
from services.gateway.ratelimit import RetryBudget
from services.gateway.replicas import Replica, ReplicaSet
from services.gateway.validation import ValidRequest
from spotmesh.metrics import ITL_BUCKETS, TTFT_BUCKETS
from spotmesh.runtime import fields
from spotmesh.v1 import common_pb2, gateway_pb2, inference_pb2

log = logging.getLogger("spotmesh.gateway")

POOLS = {"spot": common_pb2.POOL_SPOT, "on-demand": common_pb2.POOL_ON_DEMAND}
# Replica errors that mean "this replica cannot take it now, another may": retried on another
# replica as long as no token has reached the client yet.
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
             grpc.StatusCode.ABORTED, grpc.StatusCode.NOT_FOUND}
# Replica errors passed to the client as they are: the request itself is at fault.
CLIENT_FAULTS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DEADLINE_EXCEEDED,
                 grpc.StatusCode.OUT_OF_RANGE}

TTFT = Histogram("spotmesh_gateway_time_to_first_token_seconds",
                 "From the request's arrival to its first token leaving the gateway.",
                 buckets=TTFT_BUCKETS)
ITL = Histogram("spotmesh_gateway_inter_token_latency_seconds",
                "Between consecutive messages of one stream.", buckets=ITL_BUCKETS)
RETRIES = Counter("spotmesh_gateway_start_retries_total",
                  "Streams restarted on another replica before their first token.")
RESUMES = Counter("spotmesh_gateway_stream_resumes_total",
                  "Streams continued on another replica after theirs failed mid-stream.",
                  ["outcome"])


# ``stream``'s default route: plan it there (a caller that planned it meanwhile passes it in).
UNPLANNED = object()


class ClientCall(Protocol):
    """What the relay needs of the client's call (a grpc.aio servicer context has both)."""

    def time_remaining(self) -> float | None: ...

    def cancelled(self) -> bool: ...


class ReplicaRelay:
    def __init__(self, replicas: ReplicaSet, prefix: PrefixRouter, ledger: CostLedger, *,
                 start_attempts: int = 3, resume_attempts: int = 2,
                 retry_budget: RetryBudget | None = None) -> None:
        self.replicas = replicas
        self.prefix = prefix
        self.ledger = ledger
        self.start_attempts = start_attempts
        self.resume_attempts = resume_attempts
        self.retry_budget = retry_budget or RetryBudget()

    async def route(self, model: str, prompt_ids: list[int]) -> PrefixRoute | None:
        """Which replicas hold the prompt's prefix (None when routing ignores prefixes); the
        shared index's answer within its deadline, else the local one's."""
        if self.replicas.routing != "prefix":
            return None
        return await self.prefix.plan(model, prompt_ids, self.replicas.block_size(model))

    async def stream(self, tenant: str, valid: ValidRequest, model: str, prompt_ids: list[int],
                     call: ClientCall, arrived: float, outcome: dict[str, float],
                     route=UNPLANNED) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        """The request's stream, from whichever replicas serve it: one stream to the client
        whatever happens to them. ``outcome`` receives ``replica_seconds`` (for the cache).
        Raises :class:`Rejected` when no replica can serve it (UNAVAILABLE: retryable) or the
        request itself is at fault."""
        inference_request = inference_pb2.InferenceRequest(
            request_id=valid.request_id,
            model=model,
            prompt_token_ids=prompt_ids,
            sampling=valid.sampling.to_proto(),
        )
        if route is UNPLANNED:
            route = await self.route(model, prompt_ids)
        self.retry_budget.on_request()
        tried: set[str] = set()
        last_error = "no replica serves it"
        delivered: list[int] = []  # token ids the client has received
        starts_left, resumes_left = self.start_attempts, self.resume_attempts
        request = inference_request
        while True:
            # A replica the index named may have vanished since: the filter drops it and the
            # request goes to another.
            replica = self.replicas.pick(model, exclude=tried, route=route)
            if replica is None:
                break
            tried.add(replica.address)
            resumed = bool(delivered)
            try:
                async for msg in self._relay(replica, request, call, tenant, arrived, outcome,
                                             route, resumed=resumed):
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
                if status == grpc.StatusCode.CANCELLED and not call.cancelled():
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
                pause = random.uniform(0.5, 1.5) * 0.01 * 2 ** (self.start_attempts
                                                                - starts_left - 1)
                left = call.time_remaining()
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
                       f"no replica available for model {model!r} ({last_error}); retry "
                       "with backoff")

    async def _relay(self, replica: Replica, request: inference_pb2.InferenceRequest,
                     call: ClientCall, tenant: str, arrived: float, outcome: dict[str, float],
                     route: PrefixRoute | None = None, resumed: bool = False):
        """One replica's stream as gateway messages. ``resumed``: the continuation of a stream
        another replica started (no second first token, no second request id)."""
        stream = replica.stub.Generate(request, timeout=call.time_remaining())
        replica.in_flight += 1
        served_by = common_pb2.ServedBy(replica=replica.name,
                                        pool=POOLS.get(replica.pool, common_pb2.POOL_UNSPECIFIED))
        first = True
        last = arrived
        try:
            async for chunk in stream:
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
            stream.cancel()
