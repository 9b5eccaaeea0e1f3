"""The gateway's one job for an admitted request (DESIGN.md, "Request flow", steps 2-5): a
semantic-cache hit is replayed as a stream; a miss is streamed from the replicas and, once
cleanly finished, stored in the cache off the hot path. The cache can cost latency, never an
answer: an embedder or cache that fails is a miss."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from services.gateway.auth import Tenant
from services.gateway.models import ServedModel
from services.gateway.relay import TTFT, ClientCall, ReplicaRelay
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
        async for msg in self.relay.stream(tenant.name, valid, model.name, prompt_ids, call,
                                           arrived, outcome):
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
