"""The gateway's side of the semantic cache: when to use it, looking answers up, replaying a
hit as a stream, and storing finished answers off the hot path.

The embedder and the cache are separate services; if either is down or slow the request is
served from inference as if the cache missed, and the failure is counted. A cache can cost
latency but never an answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import grpc
from prometheus_client import Counter, Gauge, Histogram

from services.gateway.auth import Tenant
from services.gateway.ledger import book_semantic_saving
from services.gateway.validation import ValidRequest
from spotmesh.metrics import TTFT_BUCKETS
from spotmesh.runtime import fields, grpc_options
from spotmesh.sampling import fingerprint
from spotmesh.v1 import (
    cache_pb2,
    cache_pb2_grpc,
    common_pb2,
    embedder_pb2,
    embedder_pb2_grpc,
    gateway_pb2,
)

log = logging.getLogger("spotmesh.gateway")

CACHE_REQUESTS = Counter(
    "spotmesh_gateway_cache_requests_total",
    "Requests by what the semantic cache did for them.", ["tenant", "result"])
CACHE_ERRORS = Counter(
    "spotmesh_gateway_cache_errors_total",
    "Embedder or cache calls that failed; the request was served without the cache.", ["stage"])
SAVED_USD = Counter(
    "spotmesh_semantic_cache_saved_usd_total", "Dollars not spent thanks to cache hits.",
    ["tenant"])
SAVED_TOKENS = Counter(
    "spotmesh_semantic_cache_saved_tokens_total", "Tokens not generated thanks to cache hits.",
    ["tenant"])
SAVED_SECONDS = Counter(
    "spotmesh_semantic_cache_saved_replica_seconds_total",
    "Replica time not spent thanks to cache hits.", ["tenant"])
LOOKUP_LATENCY = Histogram(
    "spotmesh_gateway_cache_lookup_seconds", "Embedding plus lookup, as the request waits.",
    buckets=TTFT_BUCKETS)
PENDING_STORES = Gauge(
    "spotmesh_gateway_cache_pending_stores", "Finished answers waiting to be stored.")
DROPPED_STORES = Counter(
    "spotmesh_gateway_cache_dropped_stores_total",
    "Answers not stored because too many stores were pending.")

REPLAY_TOKENS_PER_MESSAGE = 16
CACHE_REPLICA = "cache"


@dataclass(frozen=True)
class CachePlan:
    key_text: str  # what is embedded: the prompt, or the last chat turn
    fingerprint: str  # sampling + the conversation before the last turn, verbatim
    lookup: bool
    store: bool
    threshold: float
    ttl_seconds: float
    cache_truncated: bool


def plan_for(tenant: Tenant, req: ValidRequest) -> CachePlan | None:
    """None when the cache must not see this request at all."""
    policy = tenant.cache
    if req.cache_mode == gateway_pb2.CACHE_MODE_BYPASS:
        return None
    if not (req.sampling.greedy or policy.cache_sampled):
        return None
    if req.prompt is not None:
        key_text, context = req.prompt, ""
    else:
        # The last turn may be paraphrased; everything before it must match exactly (two
        # conversations with different system prompts are different questions).
        *history, (_, key_text) = req.messages
        context = "".join(f"<{role}>{content}</{role}>" for role, content in history)
    return CachePlan(
        key_text=key_text,
        fingerprint=fingerprint(req.sampling, context),
        lookup=req.cache_mode != gateway_pb2.CACHE_MODE_REFRESH,
        store=True,
        threshold=policy.threshold,
        ttl_seconds=policy.ttl_seconds,
        cache_truncated=policy.cache_truncated,
    )


def storable(finish_reason: int, plan: CachePlan) -> bool:
    """Only clean, whole answers are cached: never an aborted or failed stream, and a
    truncated one only where the tenant allows it."""
    if finish_reason == common_pb2.FINISH_REASON_STOP:
        return True
    return finish_reason == common_pb2.FINISH_REASON_LENGTH and plan.cache_truncated


def replay(answer: cache_pb2.CachedAnswer, tokenizer, request_id: str, prompt_tokens: int):
    """A cached answer as a stream of deltas, like a generation: the same text, the same
    token ids, a few tokens per message."""
    ids = list(answer.token_ids)
    text = answer.text
    chunks: list[tuple[str, list[int]]] = []
    sent = ""
    start = 0
    while start < len(ids):
        end = min(len(ids), start + REPLAY_TOKENS_PER_MESSAGE)
        prefix = tokenizer.decode(ids[:end], skip_special_tokens=True)
        # Hold back a split multi-byte character until its last byte's token arrives.
        while prefix.endswith("\ufffd") and end < len(ids):
            end += 1
            prefix = tokenizer.decode(ids[:end], skip_special_tokens=True)
        if not text.startswith(prefix) or end == len(ids):
            # The cached text is the engine's own detokenization; where ours disagrees, the
            # rest goes out in one message so the client still gets exactly the cached text.
            chunks.append((text[len(sent):], ids[start:]))
            break
        chunks.append((prefix[len(sent):], ids[start:end]))
        sent = prefix
        start = end
    if not chunks:
        chunks.append((text, ids))
    served_by = common_pb2.ServedBy(replica=CACHE_REPLICA)
    for i, (delta, chunk_ids) in enumerate(chunks):
        msg = gateway_pb2.GenerateResponse(text=delta, token_ids=chunk_ids, cache_hit=True)
        if i == 0:
            msg.served_by.CopyFrom(served_by)
            msg.request_id = request_id
        if i == len(chunks) - 1:
            msg.finish_reason = answer.finish_reason
            msg.usage.prompt_tokens = prompt_tokens
            msg.usage.cached_prompt_tokens = prompt_tokens
            msg.usage.completion_tokens = len(ids)
            msg.served_by.CopyFrom(served_by)
            msg.cost_usd = 0.0
        yield msg


class SemanticCacheClient:
    def __init__(self, embedder: str, cache: str, token: str, *, timeout_seconds: float = 1.0,
                 budget_seconds: float = 0.05, max_pending_stores: int = 1024) -> None:
        opts = grpc_options(4 << 20)
        self._embedder_channel = grpc.aio.insecure_channel(embedder, options=opts)
        self._cache_channel = grpc.aio.insecure_channel(cache, options=opts)
        self.embedder = embedder_pb2_grpc.EmbedderStub(self._embedder_channel)
        self.cache = cache_pb2_grpc.SemanticCacheStub(self._cache_channel)
        self._metadata = (("authorization", f"Bearer {token}"),)
        self.timeout = timeout_seconds
        self.budget = budget_seconds
        self.max_pending = max_pending_stores
        self._pending: set[asyncio.Task] = set()

    async def embed(self, text: str) -> list[float] | None:
        try:
            resp = await self.embedder.Embed(embedder_pb2.EmbedRequest(texts=[text]),
                                             timeout=self.timeout)
            return list(resp.embeddings[0].values)
        except grpc.aio.AioRpcError as exc:
            CACHE_ERRORS.labels("embed").inc()
            log.warning("embedder call failed; serving without the cache",
                        extra=fields(code=exc.code().name, detail=exc.details()))
            return None

    async def lookup(self, tenant: Tenant, model: str, plan: CachePlan
                     ) -> tuple[list[float] | None, cache_pb2.CachedAnswer | None]:
        """The prompt's vector (for storing later) and the hit, if any."""
        started = time.perf_counter()
        vector = await self.embed(plan.key_text)
        if vector is None or not plan.lookup:
            return vector, None
        if time.perf_counter() - started > self.budget:
            # The request stopped waiting and went to a replica: only the vector is still
            # wanted (to store its answer).
            LOOKUP_LATENCY.observe(time.perf_counter() - started)
            return vector, None
        try:
            resp = await self.cache.Lookup(
                cache_pb2.LookupRequest(tenant=tenant.name, model=model,
                                        sampling_fingerprint=plan.fingerprint, vector=vector,
                                        threshold=plan.threshold),
                metadata=self._metadata, timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            CACHE_ERRORS.labels("lookup").inc()
            log.warning("cache lookup failed; serving without the cache",
                        extra=fields(code=exc.code().name, detail=exc.details()))
            return vector, None
        finally:
            LOOKUP_LATENCY.observe(time.perf_counter() - started)
        return vector, (resp.answer if resp.hit else None)

    def begin(self, tenant: Tenant, model: str, plan: CachePlan) -> asyncio.Task:
        """Start the lookup; the request waits for it with :meth:`within_budget`."""
        return asyncio.create_task(self.lookup(tenant, model, plan))

    async def within_budget(self, lookup: asyncio.Task
                            ) -> tuple[bool, list[float] | None, cache_pb2.CachedAnswer | None]:
        """(finished in time, vector, hit). A lookup past its budget goes on (its vector still
        stores the answer); the request goes to a replica."""
        done, _ = await asyncio.wait({lookup}, timeout=self.budget)
        if not done:
            return False, None, None
        vector, answer = lookup.result()
        return True, vector, answer

    def book_hit(self, tenant: Tenant, answer: cache_pb2.CachedAnswer) -> None:
        CACHE_REQUESTS.labels(tenant.name, "hit").inc()
        SAVED_USD.labels(tenant.name).inc(answer.cost_usd)
        book_semantic_saving(answer.cost_usd)
        SAVED_TOKENS.labels(tenant.name).inc(len(answer.token_ids))
        SAVED_SECONDS.labels(tenant.name).inc(answer.replica_seconds)

    def book(self, tenant: Tenant, result: str) -> None:
        CACHE_REQUESTS.labels(tenant.name, result).inc()

    def store_later(self, request: cache_pb2.StoreRequest,
                    lookup: asyncio.Task | None = None) -> None:
        """Store without making the client wait; bounded, so a slow cache cannot grow the
        gateway's memory without limit. With ``lookup``, a lookup still under way: the
        request's vector is what it ends with (none: nothing is stored)."""
        if len(self._pending) >= self.max_pending:
            DROPPED_STORES.inc()
            if lookup is not None:
                lookup.cancel()
            return
        task = asyncio.create_task(self._store(request, lookup))
        self._pending.add(task)
        PENDING_STORES.set(len(self._pending))
        task.add_done_callback(self._stored)

    def _stored(self, task: asyncio.Task) -> None:
        self._pending.discard(task)
        PENDING_STORES.set(len(self._pending))

    async def _store(self, request: cache_pb2.StoreRequest,
                     lookup: asyncio.Task | None = None) -> None:
        if lookup is not None:
            vector, _ = await lookup
            if vector is None:
                return
            request.vector.extend(vector)
        try:
            await self.cache.Store(request, metadata=self._metadata, timeout=10 * self.timeout)
        except grpc.aio.AioRpcError as exc:
            CACHE_ERRORS.labels("store").inc()
            log.warning("cache store failed", extra=fields(code=exc.code().name,
                                                           detail=exc.details()))

    async def drain(self, grace_seconds: float = 5.0) -> None:
        """Let pending stores land (graceful shutdown: finished answers are not lost)."""
        if self._pending:
            await asyncio.wait(list(self._pending), timeout=grace_seconds)

    async def close(self) -> None:
        await self.drain()
        await self._embedder_channel.close()
        await self._cache_channel.close()
