"""The prefix cache's gRPC surface in process over a real loopback socket: the shared index
through Match/Record/Evict/Forget, per-model separation, capacity from Record, and every bad
input a caller can send (unknown replicas, empty and enormous hash lists, bad names, no token,
a full index)."""

from __future__ import annotations

import grpc
import pytest
from prometheus_client import REGISTRY

from services.cache.prefix_server import PrefixCacheServicer
from spotmesh.prefix_index import PrefixStore
from spotmesh.runtime import add_servicer
from spotmesh.v1 import cache_pb2, cache_pb2_grpc

TOKEN = "prefix-token-1"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
MODEL = "spotmesh-tiny"


class Served:
    def __init__(self, loop_thread, store: PrefixStore, max_hashes: int = 1000) -> None:
        self.lt = loop_thread

        async def start():
            server = grpc.aio.server()
            servicer = PrefixCacheServicer(store, token=TOKEN, max_hashes=max_hashes)
            add_servicer(server, servicer, cache_pb2.DESCRIPTOR.services_by_name["PrefixCache"])
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            return server, port

        self.server, port = loop_thread.run(start())
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = cache_pb2_grpc.PrefixCacheStub(self.channel)

    def call(self, method: str, request, metadata=AUTH):
        return getattr(self.stub, method)(request, metadata=metadata, timeout=30)

    def error(self, method: str, request, metadata=AUTH) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as err:
            self.call(method, request, metadata)
        return err.value

    def match(self, hashes, model=MODEL) -> dict[str, int]:
        resp = self.call("Match", cache_pb2.MatchRequest(model=model, block_hashes=hashes))
        return {m.replica: m.matched_blocks for m in resp.matches}

    def record(self, replica, hashes, model=MODEL, capacity=0) -> int:
        return self.call("Record", cache_pb2.RecordRequest(
            replica=replica, model=model, block_hashes=hashes,
            capacity_blocks=capacity)).indexed_blocks

    def close(self) -> None:
        self.channel.close()
        self.lt.run(self.server.stop(None))


@pytest.fixture
def served(loop_thread):
    s = Served(loop_thread, PrefixStore(default_capacity_blocks=100, max_replicas=4,
                                        max_models=2))
    yield s
    s.close()


def metric(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_match_reports_each_replicas_leading_blocks_best_first(served):
    served.record("r1", [1, 2, 3])
    served.record("r2", [1, 2, 3, 4])
    served.record("r3", [2, 3, 4])
    resp = served.call("Match", cache_pb2.MatchRequest(model=MODEL, block_hashes=[1, 2, 3, 4, 5]))
    assert [(m.replica, m.matched_blocks) for m in resp.matches] == [("r2", 4), ("r1", 3)]


def test_hashes_of_one_model_never_match_another(served):
    served.record("r1", [1, 2], model="model-a")
    assert served.match([1, 2], model="model-b") == {}
    assert served.match([1, 2], model="model-a") == {"r1": 2}


def test_record_takes_the_replicas_kv_capacity_and_evicts_lru(served):
    before = metric("spotmesh_prefix_cache_evicted_blocks_total", cause="capacity")
    assert served.record("r1", [1, 2, 3, 4], capacity=4) == 4
    served.record("r1", [1])  # touch: 2 is now the oldest
    assert served.record("r1", [5]) == 4
    assert served.match([1]) == {"r1": 1}
    assert served.match([2]) == {}
    assert served.record("r1", [6], capacity=2) == 2
    assert metric("spotmesh_prefix_cache_evicted_blocks_total", cause="capacity") - before == 4
    assert metric("spotmesh_prefix_cache_index_blocks", replica="r1") == 2


def test_evict_drops_blocks_the_engine_freed_and_breaks_the_chain_there(served):
    served.record("r1", [1, 2, 3])
    resp = served.call("Evict", cache_pb2.EvictRequest(replica="r1", model=MODEL,
                                                       block_hashes=[2, 99]))
    assert resp.evicted_blocks == 1
    assert served.match([1, 2, 3]) == {"r1": 1}


def test_forget_drops_a_replica_everywhere_and_unknown_replicas_are_not_errors(served):
    served.record("r1", [1, 2], model="model-a")
    served.record("r1", [7], model="model-b")
    served.record("r2", [1], model="model-a")
    resp = served.call("Forget", cache_pb2.ForgetRequest(replica="r1"))
    assert resp.forgotten_blocks == 3
    assert served.match([1, 2], model="model-a") == {"r2": 1}
    assert served.match([7], model="model-b") == {}
    # Several gateways forget the same replica; a replica nobody recorded forgets nothing.
    assert served.call("Forget", cache_pb2.ForgetRequest(replica="r1")).forgotten_blocks == 0
    assert served.call("Forget", cache_pb2.ForgetRequest(replica="never")).forgotten_blocks == 0
    resp = served.call("Evict", cache_pb2.EvictRequest(replica="never", model=MODEL,
                                                       block_hashes=[1]))
    assert resp.evicted_blocks == 0


@pytest.mark.parametrize("method, request_, field", [
    ("Match", cache_pb2.MatchRequest(model=MODEL), "block_hashes"),
    ("Match", cache_pb2.MatchRequest(block_hashes=[1]), "model"),
    ("Match", cache_pb2.MatchRequest(model="m" * 600, block_hashes=[1]), "model"),
    ("Record", cache_pb2.RecordRequest(model=MODEL, block_hashes=[1]), "replica"),
    ("Record", cache_pb2.RecordRequest(replica="r 1", model=MODEL, block_hashes=[1]), "replica"),
    ("Record", cache_pb2.RecordRequest(replica="r" * 300, model=MODEL, block_hashes=[1]),
     "replica"),
    ("Record", cache_pb2.RecordRequest(replica="r1", model=MODEL), "block_hashes"),
    ("Record", cache_pb2.RecordRequest(replica="r1", model=MODEL, block_hashes=[1],
                                       capacity_blocks=-1), "capacity_blocks"),
    ("Record", cache_pb2.RecordRequest(replica="r1", model=MODEL,
                                       block_hashes=list(range(1001))), "block_hashes"),
    ("Match", cache_pb2.MatchRequest(model=MODEL, block_hashes=list(range(1001))),
     "block_hashes"),
    ("Evict", cache_pb2.EvictRequest(replica="r1", model=MODEL), "block_hashes"),
    ("Forget", cache_pb2.ForgetRequest(), "replica"),
])
def test_bad_input_is_invalid_argument_naming_the_field(served, method, request_, field):
    err = served.error(method, request_)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.details()


def test_messages_over_the_size_limit_are_refused_by_grpc(loop_thread):
    s = Served(loop_thread, PrefixStore(), max_hashes=10**6)
    try:
        # 200k hashes of 9-10 bytes each: over gRPC's default 4 MiB receive limit.
        err = s.error("Match", cache_pb2.MatchRequest(model=MODEL,
                                                      block_hashes=[2**63 + i for i in
                                                                    range(500_000)]))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        s.close()


def test_calls_need_the_service_token(served):
    req = cache_pb2.MatchRequest(model=MODEL, block_hashes=[1])
    assert served.error("Match", req, metadata=()).code() == grpc.StatusCode.UNAUTHENTICATED
    bad = (("authorization", "Bearer nope"),)
    assert served.error("Record", cache_pb2.RecordRequest(replica="r", model=MODEL,
                                                          block_hashes=[1]),
                        metadata=bad).code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_full_index_is_resource_exhausted_until_replicas_are_forgotten(served):
    for i in range(4):
        served.record(f"r{i}", [i + 1])
    err = served.error("Record", cache_pb2.RecordRequest(replica="r9", model=MODEL,
                                                         block_hashes=[1]))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "Forget" in err.details()
    served.call("Forget", cache_pb2.ForgetRequest(replica="r0"))
    served.record("r9", [1])
    # Models are bounded too (this store allows two).
    served.record("r1", [1], model="model-x")
    err = served.error("Record", cache_pb2.RecordRequest(replica="r1", model="model-y",
                                                         block_hashes=[1]))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_store_tracks_blocks_per_replica_over_models():
    store = PrefixStore(default_capacity_blocks=10)
    store.record("r", "a", [1, 2])
    store.record("r", "b", [3])
    assert store.blocks("r") == 3
    assert store.forget("r") == 3
    assert store.replicas() == []


def test_hot_returns_the_most_recorded_prefixes_with_their_tokens(served):
    for _ in range(3):
        served.call("Record", cache_pb2.RecordRequest(replica="r1", model=MODEL,
                                                      block_hashes=[1, 2], token_ids=[5] * 32))
    served.call("Record", cache_pb2.RecordRequest(replica="r2", model=MODEL, block_hashes=[9],
                                                  token_ids=[7] * 16))
    served.record("r2", [10])  # no token ids: counted in the index, not replayable
    resp = served.call("Hot", cache_pb2.HotRequest(model=MODEL, limit=5))
    assert [(list(p.token_ids), p.hits) for p in resp.prefixes] == [([5] * 32, 3), ([7] * 16, 1)]
    err = served.error("Hot", cache_pb2.HotRequest(model=MODEL, limit=0))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "limit" in err.details()


def test_hot_prefixes_are_bounded_and_keep_the_hot_ones():
    from spotmesh.prefix_index import HotPrefixes

    hot = HotPrefixes(slots=64)
    for _ in range(10):
        hot.add(1, [1])
    for leaf in range(100, 300):  # a stream of one-off prompts, 3x the slots
        hot.add(leaf, [leaf])
    top = hot.top(2)
    assert top[0] == ((1,), 10)
    assert top[1][1] < 10  # one-offs inherit evicted counts but stay below the hot prefix
    assert len(hot.top(1000)) == 64
