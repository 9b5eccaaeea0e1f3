"""The gateway's one job for an admitted request (DESIGN.md, "Request flow", steps 2-5): a
semantic-cache hit is replayed as a stream; a miss is streamed from the replicas and, once
cleanly finished, stored in the cache off the hot path. The cache can cost latency, never an
answer: an embedder or cache that fails is a miss, and one slower than the lookup budget costs
the request that budget at most (it goes to a replica; the lookup's vector still stores the
answer)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from services.gateway.auth import Tenant
from services.gateway.models import ServedModel
from services.gateway.relay import TTFT, UNPLANNED, ClientCall, ReplicaRelay
from services.gateway.semantic import SemanticCacheClient, plan_for, replay, storable
from services.gateway.validation import ValidRequest
from spotmesh.v1 import cache_pb2, gateway_pb2


class RequestFlow:
    def __init__(self, relay: ReplicaRelay, semantic: SemanticCacheClient | None = None) -> None:
        self.relay = relay
        self.semantic = semantic

    async def answer(self, tenant: Tenant, valid: ValidRequest, model: ServedModel,
                     prompt_ids: list[int], call: ClientCall, arrived: float,
                     used: dict[str, int]) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        """The request's stream. ``used["tokens"]`` ends as the tokens the request really used
        (what the rate limiter keeps; a cache hit uses none)."""
        plan = plan_for(tenant, valid) if self.semantic else None
        lookup: asyncio.Task | None = None
        vector = None
        route = UNPLANNED
        if plan is not None:
            # The lookup and the routing decision run at once; the request waits for the
            # lookup only up to its budget (a miss must cost next to nothing).
            lookup = self.semantic.begin(tenant, model.name, plan)
            routing = asyncio.ensure_future(self.relay.route(model.name, prompt_ids))
            try:
                ready, vector, answer = await self.semantic.within_budget(lookup)
            except BaseException:
                lookup.cancel()
                routing.cancel()
                raise
            if answer is not None and len(answer.token_ids) <= valid.sampling.max_tokens:
                routing.cancel()
                self.semantic.book_hit(tenant, answer)
                used["tokens"] = 0
                first = True
                for msg in replay(answer, model.tokenizer, valid.request_id, len(prompt_ids)):
                    if first:
                        TTFT.observe(time.monotonic() - arrived)
                        first = False
                    yield msg
                return
            self.semantic.book(tenant, "miss" if vector is not None
                               else "late" if not ready else "error")
            if ready and vector is None:
                lookup = None  # the embedder failed: nothing to store
            route = await routing
        elif self.semantic:
            self.semantic.book(tenant, "bypass")
        texts: list[str] = []
        token_ids: list[int] = []
        outcome: dict[str, float] = {}
        stored = False
        try:
            async for msg in self.relay.stream(tenant.name, valid, model.name, prompt_ids, call,
                                               arrived, outcome, route=route):
                used["tokens"] += len(msg.token_ids)
                if lookup is not None:
                    texts.append(msg.text)
                    token_ids.extend(msg.token_ids)
                    if msg.finish_reason and storable(msg.finish_reason, plan):
                        stored = True
                        self.semantic.store_later(cache_pb2.StoreRequest(
                            tenant=tenant.name, model=model.name,
                            sampling_fingerprint=plan.fingerprint, vector=vector or (),
                            prompt=plan.key_text, text="".join(texts), token_ids=token_ids,
                            ttl_seconds=plan.ttl_seconds, finish_reason=msg.finish_reason,
                            usage=msg.usage, cost_usd=msg.cost_usd,
                            replica_seconds=outcome.get("replica_seconds", 0.0),
                            replace=not plan.lookup), None if vector is not None else lookup)
                yield msg
        finally:
            if lookup is not None and not stored and not lookup.done():
                lookup.cancel()  # nothing will be stored: its vector is not wanted
