"""The semantic cache's gRPC surface in process, over a real loopback socket, around a real
milvus-lite store: auth roles, every status code a caller can provoke, the round trip of a whole
answer, metrics, and UNAVAILABLE when Milvus cannot be reached. Also the service's
configuration (flags, environment, the refusal to start without a token)."""

from __future__ import annotations

import subprocess
import sys

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY

from services.cache import config as cache_config
from services.cache.metrics import OTHER_TENANTS, TenantLabels
from services.cache.options import CacheOptions
from services.cache.semantic import SemanticCache
from services.cache.server import SemanticCacheServicer
from spotmesh.runtime import add_servicer
from spotmesh.v1 import cache_pb2, cache_pb2_grpc, common_pb2

DIM = 384
SERVICE = "service-token-123"
ADMIN = "admin-token-456"
AUTH = (("authorization", f"Bearer {SERVICE}"),)
AUTH_ADMIN = (("authorization", f"Bearer {ADMIN}"),)
REPO = cache_config.__file__.rsplit("/services/", 1)[0]


def unit(seed: int) -> list[float]:
    v = np.random.default_rng(seed).standard_normal(DIM)
    return (v / np.linalg.norm(v)).tolist()


class Served:
    """A SemanticCacheServicer on a loopback port, driven from the test thread."""

    def __init__(self, loop_thread, cache: SemanticCache, admin_token: str = ADMIN) -> None:
        self.lt = loop_thread
        self.cache = cache

        async def start():
            server = grpc.aio.server()
            servicer = SemanticCacheServicer(cache, token=SERVICE, admin_token=admin_token,
                                             workers=2)
            add_servicer(server, servicer,
                         cache_pb2.DESCRIPTOR.services_by_name["SemanticCache"])
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            return server, servicer, port

        self.server, self.servicer, port = loop_thread.run(start())
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = cache_pb2_grpc.SemanticCacheStub(self.channel)

    def call(self, method: str, request, metadata=AUTH):
        return getattr(self.stub, method)(request, metadata=metadata, timeout=60)

    def error(self, method: str, request, metadata=AUTH) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as err:
            self.call(method, request, metadata)
        return err.value

    def close(self) -> None:
        self.channel.close()

        async def stop():
            await self.server.stop(None)
            await self.servicer.close()

        self.lt.run(stop())


@pytest.fixture(scope="module")
def served(loop_thread, tmp_path_factory):
    cache = SemanticCache(CacheOptions(uri=str(tmp_path_factory.mktemp("lite") / "cache.db"),
                                       dim=DIM))
    s = Served(loop_thread, cache)
    yield s
    s.close()


def store_req(tenant="t1", seed=1, **kw) -> cache_pb2.StoreRequest:
    req = dict(tenant=tenant, model="spotmesh-tiny", sampling_fingerprint="fp1",
               vector=unit(seed), prompt="What is 2+2?", text="4", token_ids=[19],
               ttl_seconds=600, finish_reason=common_pb2.FINISH_REASON_STOP,
               usage=common_pb2.Usage(prompt_tokens=7, cached_prompt_tokens=3,
                                      completion_tokens=1),
               cost_usd=0.0015, replica_seconds=0.4)
    req.update(kw)
    return cache_pb2.StoreRequest(**req)


def lookup_req(tenant="t1", seed=1, **kw) -> cache_pb2.LookupRequest:
    req = dict(tenant=tenant, model="spotmesh-tiny", sampling_fingerprint="fp1",
               vector=unit(seed), threshold=0.9)
    req.update(kw)
    return cache_pb2.LookupRequest(**req)


def metric(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_stored_answer_comes_back_whole(served):
    stored = served.call("Store", store_req(tenant="round-trip", seed=10))
    resp = served.call("Lookup", lookup_req(tenant="round-trip", seed=10))
    assert resp.hit
    a = resp.answer
    assert a.entry_id == stored.entry_id
    assert (a.prompt, a.text, list(a.token_ids)) == ("What is 2+2?", "4", [19])
    assert a.finish_reason == common_pb2.FINISH_REASON_STOP
    assert (a.usage.prompt_tokens, a.usage.cached_prompt_tokens, a.usage.completion_tokens) \
        == (7, 3, 1)
    assert a.cost_usd == pytest.approx(0.0015) and a.replica_seconds == pytest.approx(0.4)
    assert a.similarity == pytest.approx(1.0, abs=1e-5)
    assert a.expires_at - a.created_at == pytest.approx(600)
    miss = served.call("Lookup", lookup_req(tenant="round-trip", seed=11))
    assert not miss.hit and not miss.HasField("answer")


def test_tenants_are_isolated_through_the_service(served):
    served.call("Store", store_req(tenant="iso-a", seed=20, text="for a"))
    served.call("Store", store_req(tenant="iso-b", seed=20, text="for b"))
    assert served.call("Lookup", lookup_req(tenant="iso-a", seed=20)).answer.text == "for a"
    assert served.call("Lookup", lookup_req(tenant="iso-b", seed=20)).answer.text == "for b"
    assert not served.call("Lookup", lookup_req(tenant="iso-c", seed=20, threshold=0)).hit


def test_replace_and_stats_through_the_service(served):
    served.call("Store", store_req(tenant="refresh", seed=30, text="old"))
    resp = served.call("Store", store_req(tenant="refresh", seed=30, text="new", replace=True))
    assert resp.replaced == 1
    assert served.call("Lookup", lookup_req(tenant="refresh", seed=30)).answer.text == "new"
    stats = served.call("Stats", cache_pb2.StatsRequest(tenant="refresh"))
    assert (stats.entries, stats.stores, stats.lookups, stats.hits) == (1, 2, 1, 1)
    everything = served.call("Stats", cache_pb2.StatsRequest())
    assert everything.entries >= 1 and everything.stores >= stats.stores


RPCS = [
    ("Lookup", lookup_req()),
    ("Store", store_req()),
    ("Stats", cache_pb2.StatsRequest()),
    ("Invalidate", cache_pb2.InvalidateRequest(tenant="t1")),
]


@pytest.mark.parametrize("method,request_", RPCS)
@pytest.mark.parametrize("metadata,problem", [
    ((), "missing authorization"),
    ((("authorization", "Basic abc"),), "Bearer"),
    ((("authorization", "Bearer"),), "Bearer"),
    ((("authorization", "Bearer wrong-token"),), "unknown token"),
    ((("authorization", f"Bearer {SERVICE}x"),), "unknown token"),
])
def test_calls_without_a_valid_token_are_unauthenticated(served, method, request_, metadata,
                                                        problem):
    err = served.error(method, request_, metadata)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert problem in err.details()


def test_the_service_token_may_not_invalidate_but_the_admin_token_may(served):
    served.call("Store", store_req(tenant="inv", seed=40))
    err = served.error("Invalidate", cache_pb2.InvalidateRequest(tenant="inv"), AUTH)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "admin" in err.details()
    assert served.call("Lookup", lookup_req(tenant="inv", seed=40)).hit
    deleted = served.call("Invalidate", cache_pb2.InvalidateRequest(tenant="inv"), AUTH_ADMIN)
    assert deleted.deleted == 1
    assert not served.call("Lookup", lookup_req(tenant="inv", seed=40), AUTH_ADMIN).hit
    assert served.call("Stats", cache_pb2.StatsRequest(tenant="inv"), AUTH_ADMIN).entries == 0


def test_without_an_admin_token_nobody_may_invalidate(loop_thread, tmp_path):
    cache = SemanticCache(CacheOptions(uri=str(tmp_path / "cache.db"), dim=DIM))
    s = Served(loop_thread, cache, admin_token="")
    try:
        err = s.error("Invalidate", cache_pb2.InvalidateRequest(tenant="t1"))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "none configured" in err.details()
        err = s.error("Invalidate", cache_pb2.InvalidateRequest(tenant="t1"),
                      (("authorization", "Bearer "),))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        s.close()


BAD = [
    ("Lookup", lookup_req(tenant='t1" or tenant != "x'), "tenant"),
    ("Lookup", lookup_req(tenant=""), "tenant"),
    ("Lookup", lookup_req(model=""), "model"),
    ("Lookup", lookup_req(sampling_fingerprint='f" or "1'), "sampling_fingerprint"),
    ("Lookup", lookup_req(vector=[0.5, 0.5, 0.5]), "vector has 3 dimensions"),
    ("Lookup", lookup_req(vector=[0.0] * DIM), "vector"),
    ("Lookup", lookup_req(vector=[float("inf")] + [0.0] * (DIM - 1)), "vector"),
    ("Lookup", lookup_req(threshold=1.5), "threshold"),
    ("Lookup", lookup_req(threshold=-0.1), "threshold"),
    ("Lookup", lookup_req(threshold=float("nan")), "threshold"),
    ("Store", store_req(tenant="a\\"), "tenant"),
    ("Store", store_req(vector=unit(1)[:100]), "vector has 100 dimensions"),
    ("Store", store_req(prompt=""), "prompt is empty"),
    ("Store", store_req(text=""), "text is empty"),
    ("Store", store_req(prompt="ü" * 32769), "prompt is 65538 bytes"),
    ("Store", store_req(text="x" * 65537), "text is 65537 bytes"),
    ("Store", store_req(token_ids=[1] * 16385), "token_ids"),
    ("Store", store_req(token_ids=[1, -5]), "token_ids[1]"),
    ("Store", store_req(ttl_seconds=0), "ttl_seconds"),
    ("Store", store_req(ttl_seconds=-1), "ttl_seconds"),
    ("Store", store_req(ttl_seconds=30 * 86400 + 1), "ttl_seconds"),
    ("Store", store_req(finish_reason=99), "finish_reason"),
    ("Store", store_req(cost_usd=-1), "cost_usd"),
    ("Store", store_req(usage=common_pb2.Usage(prompt_tokens=-1)), "usage.prompt_tokens"),
    ("Stats", cache_pb2.StatsRequest(tenant="a b"), "tenant"),
    ("Invalidate", cache_pb2.InvalidateRequest(), "tenant (or model, or prompt) must be set"),
    ("Invalidate", cache_pb2.InvalidateRequest(tenant='x" or 1 == 1 or "'), "tenant"),
    ("Invalidate", cache_pb2.InvalidateRequest(model="m\n"), "model"),
]


@pytest.mark.parametrize("method,request_,names", BAD,
                         ids=[f"{m}-{n.split()[0]}-{i}" for i, (m, _, n) in enumerate(BAD)])
def test_bad_input_is_invalid_argument_naming_the_field(served, method, request_, names):
    err = served.error(method, request_, AUTH_ADMIN)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith(names.split()[0])
    assert names in err.details()


def test_wrong_dimension_names_both_dimensions(served):
    err = served.error("Lookup", lookup_req(vector=[1.0] * 12))
    assert "vector" in err.details() and "12" in err.details() and "384" in err.details()


def test_invalid_utf8_is_invalid_argument_not_internal(served):
    raw = store_req().SerializeToString()
    # Field 5 (prompt), length 2, bytes that are not UTF-8.
    bad = raw + b"\x2a\x02\xff\xfe"
    call = served.channel.unary_unary(
        "/spotmesh.v1.SemanticCache/Store", request_serializer=lambda b: b,
        response_deserializer=cache_pb2.StoreResponse.FromString)
    with pytest.raises(grpc.RpcError) as err:
        call(bad, metadata=AUTH, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt" in err.value.details()


def test_metrics_count_lookups_hits_and_stores_per_tenant(served):
    before = {name: metric(f"spotmesh_semantic_cache_{name}_total", tenant="metered")
              for name in ("lookups", "hits", "stores")}
    latency_before = metric("spotmesh_semantic_cache_lookup_latency_seconds_count")
    served.call("Store", store_req(tenant="metered", seed=50))
    served.call("Lookup", lookup_req(tenant="metered", seed=50))
    served.call("Lookup", lookup_req(tenant="metered", seed=51))
    after = {name: metric(f"spotmesh_semantic_cache_{name}_total", tenant="metered")
             for name in ("lookups", "hits", "stores")}
    assert {k: after[k] - before[k] for k in after} == {"lookups": 2, "hits": 1, "stores": 1}
    assert metric("spotmesh_semantic_cache_lookup_latency_seconds_count") - latency_before == 2


def test_tenant_labels_are_bounded():
    labels = TenantLabels(limit=2)
    assert [labels(t) for t in ("a", "b", "c", "a", "d")] == ["a", "b", OTHER_TENANTS, "a",
                                                              OTHER_TENANTS]


def test_unreachable_milvus_is_unavailable_with_a_clear_message(loop_thread):
    cache = SemanticCache(CacheOptions(uri="http://127.0.0.1:1", dim=DIM, timeout_seconds=2.0))
    s = Served(loop_thread, cache)
    try:
        for method, request_ in RPCS:
            err = s.error(method, request_, AUTH_ADMIN)
            assert err.code() == grpc.StatusCode.UNAVAILABLE, method
            assert "Milvus at http://127.0.0.1:1" in err.details()
        # Authentication and validation still come first.
        assert s.error("Lookup", lookup_req(), ()).code() == grpc.StatusCode.UNAUTHENTICATED
        err = s.error("Lookup", lookup_req(vector=[1.0]))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        s.close()


# --- configuration ----------------------------------------------------------------------------


def test_config_takes_tokens_from_flags_or_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SPOTMESH_STATE_DIR", str(tmp_path))
    monkeypatch.setenv(cache_config.TOKEN_ENV, "from-env")
    monkeypatch.setenv(cache_config.ADMIN_TOKEN_ENV, "admin-env")
    cfg = cache_config.parse([])
    assert (cfg.token, cfg.admin_token) == ("from-env", "admin-env")
    assert cfg.milvus.uri == str(tmp_path / "semantic-cache" / "cache.db")
    assert (cfg.milvus.dim, cfg.server.port) == (384, cache_config.DEFAULT_PORT)
    cfg = cache_config.parse(["--token", "flag", "--admin-token", "", "--milvus-uri",
                              "http://milvus:19530", "--flush-every", "50",
                              "--sweep-seconds", "30", "--collection", "c_1"])
    assert (cfg.token, cfg.admin_token, cfg.milvus.uri) == ("flag", "", "http://milvus:19530")
    assert (cfg.milvus.flush_every, cfg.milvus.sweep_seconds) == (50, 30)


def test_config_refuses_to_start_without_a_service_token(monkeypatch):
    monkeypatch.delenv(cache_config.TOKEN_ENV, raising=False)
    with pytest.raises(SystemExit) as err:
        cache_config.parse([])
    assert "no service token" in str(err.value) and cache_config.TOKEN_ENV in str(err.value)
    with pytest.raises(SystemExit, match="must differ"):
        cache_config.parse(["--token", "same", "--admin-token", "same"])


def test_the_service_without_a_token_exits_with_one_line(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "SPOTMESH_STATE_DIR": str(tmp_path), "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "services.cache"], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=120)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no service token" in lines[0]


def test_maintenance_sweeps_expired_entries_and_refreshes_the_gauge(loop_thread, tmp_path):
    import time

    from services.cache.answers import Answer
    from services.cache.maintenance import Maintenance

    cache = SemanticCache(CacheOptions(uri=str(tmp_path / "cache.db"), dim=DIM,
                                       sweep_seconds=1e-9, flush_seconds=1e-9))
    s = Served(loop_thread, cache)
    try:
        past = time.time() - 100
        for i in range(3):
            cache.store("sweep", "m", "fp", unit(60 + i), Answer(prompt=f"p{i}", text="x"), 1.0,
                        now=past)
        cache.store("sweep", "m", "fp", unit(70), Answer(prompt="live", text="x"), 600)
        swept_before = metric("spotmesh_semantic_cache_expired_swept_total")

        async def one_tick():
            await Maintenance(cache, s.servicer.run_blocking).tick()

        loop_thread.run(one_tick(), timeout=120)
        assert metric("spotmesh_semantic_cache_expired_swept_total") - swept_before == 3
        assert metric("spotmesh_semantic_cache_entries") == 1
        assert s.call("Stats", cache_pb2.StatsRequest(tenant="sweep")).expired_swept == 3
    finally:
        s.close()
