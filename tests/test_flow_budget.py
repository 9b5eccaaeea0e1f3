"""The gateway's request flow with a cache tier slower than its lookup budget: the request goes
to a replica without waiting for the lookup, and the answer is still stored with the vector the
lookup ends with. Ordering, not wall-clock time, shows it: the embedder is held on an event the
test releases only after the replica's stream has begun."""

from __future__ import annotations

import asyncio

from services.gateway.auth import Tenant
from services.gateway.flow import RequestFlow
from services.gateway.semantic import SemanticCacheClient
from services.gateway.validation import ValidRequest
from spotmesh.sampling import Sampling
from spotmesh.v1 import cache_pb2, common_pb2, gateway_pb2


class FakeRelay:
    def __init__(self, started: asyncio.Event) -> None:
        self.started = started
        self.routes = []

    async def route(self, model, prompt_ids):
        return None

    async def stream(self, tenant, valid, model, prompt_ids, call, arrived, outcome, route=None):
        self.routes.append(route)
        self.started.set()
        yield gateway_pb2.GenerateResponse(text="hello", token_ids=[7])
        yield gateway_pb2.GenerateResponse(
            text=" world", token_ids=[8], finish_reason=common_pb2.FINISH_REASON_STOP,
            usage=common_pb2.Usage(prompt_tokens=3, completion_tokens=2))


class FakeCache:
    def __init__(self) -> None:
        self.lookups: list[cache_pb2.LookupRequest] = []
        self.stores: list[cache_pb2.StoreRequest] = []

    async def Lookup(self, request, **call):
        self.lookups.append(request)
        return cache_pb2.LookupResponse(hit=False)

    async def Store(self, request, **call):
        self.stores.append(request)
        return cache_pb2.StoreResponse()


class Model:
    name = "m"
    tokenizer = None


def valid() -> ValidRequest:
    return ValidRequest(model="m", prompt="What is a spot instance?", messages=(),
                        sampling=Sampling(temperature=0.0, max_tokens=8), cache_mode=0,
                        request_id="req-1")


async def scenario(embed_fails: bool = False, cancel: bool = False):
    started, release = asyncio.Event(), asyncio.Event()
    client = SemanticCacheClient("127.0.0.1:1", "127.0.0.1:1", "token",
                                 budget_seconds=0.001)
    cache = client.cache = FakeCache()
    embeds = []

    async def slow_embed(text):
        embeds.append(text)
        await release.wait()
        return None if embed_fails else [0.5] * 4

    client.embed = slow_embed
    relay = FakeRelay(started)
    flow = RequestFlow(relay, client)
    used = {"tokens": 3}
    tenant = Tenant("alpha", frozenset({"*"}))
    stream = flow.answer(tenant, valid(), Model(), [1, 2, 3], None, 0.0, used)
    first = await anext(stream)
    # The replica's stream began while the embedder still held the lookup.
    assert started.is_set() and not release.is_set() and embeds
    if cancel:
        await stream.aclose()
    else:
        rest = [m async for m in stream]
        assert [first.text, *(m.text for m in rest)] == ["hello", " world"]
    release.set()
    await client.drain()
    await client.close()
    return cache, used


def test_a_lookup_over_budget_does_not_hold_the_request_and_its_vector_stores_the_answer():
    cache, used = asyncio.run(scenario())
    assert used["tokens"] == 5
    assert len(cache.stores) == 1
    stored = cache.stores[0]
    assert list(stored.vector) == [0.5] * 4 and stored.text == "hello world"
    # The request had moved on by the time the vector came: no lookup was wasted on it.
    assert cache.lookups == []


def test_a_late_embedding_that_fails_stores_nothing():
    cache, _ = asyncio.run(scenario(embed_fails=True))
    assert cache.stores == [] and cache.lookups == []


def test_a_client_that_goes_away_leaves_no_lookup_behind():
    cache, _ = asyncio.run(scenario(cancel=True))
    assert cache.stores == [] and cache.lookups == []
