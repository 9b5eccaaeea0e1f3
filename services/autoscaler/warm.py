"""Warming a new replica: the hottest prompt prefixes from the prefix index, replayed into its
engine with ``max_tokens=1`` before it takes traffic. The engine computes and caches their KV
blocks, so the first real requests that share them hit, as they would on an old replica."""

from __future__ import annotations

import asyncio
import logging

import grpc
from prometheus_client import Counter

from spotmesh.v1 import cache_pb2, cache_pb2_grpc, common_pb2, inference_pb2, inference_pb2_grpc

log = logging.getLogger("spotmesh.autoscaler")

WARMED = Counter("spotmesh_autoscaler_warmed_prefixes_total",
                 "Hot prefixes replayed into new replicas before they took traffic.")


class PrefixWarmer:
    def __init__(self, prefix_cache: str, token: str, model: str, limit: int = 16,
                 timeout_seconds: float = 60.0) -> None:
        self.prefix_cache = prefix_cache
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.model = model
        self.limit = limit
        self.timeout = timeout_seconds

    async def __call__(self, name: str, address: str) -> int:
        async with grpc.aio.insecure_channel(self.prefix_cache) as ch:
            hot = await cache_pb2_grpc.PrefixCacheStub(ch).Hot(
                cache_pb2.HotRequest(model=self.model, limit=self.limit),
                metadata=self.metadata, timeout=5)
        if not hot.prefixes:
            return 0
        sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=1)
        async with grpc.aio.insecure_channel(address) as ch:
            stub = inference_pb2_grpc.InferenceStub(ch)

            async def replay(i: int, tokens) -> None:
                call = stub.Generate(inference_pb2.InferenceRequest(
                    request_id=f"warm-{name}-{i}", model=self.model,
                    prompt_token_ids=list(tokens), sampling=sampling), timeout=self.timeout)
                async for _ in call:
                    pass

            # Hottest first, a few at a time: the engine batches them.
            results = await asyncio.gather(
                *(replay(i, p.token_ids) for i, p in enumerate(hot.prefixes)),
                return_exceptions=True)
        done = sum(1 for r in results if not isinstance(r, BaseException))
        WARMED.inc(done)
        return done
