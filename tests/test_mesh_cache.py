"""The semantic cache through the whole mesh: `spotmesh up` with the embedder (the real
all-MiniLM-L6-v2) and the cache (real milvus-lite), two tenants, hits replayed as streams."""

from __future__ import annotations

import os
import signal
import time
import urllib.request

import grpc
import pytest

from spotmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

pytestmark = pytest.mark.mesh

KEYS = """
[[keys]]
tenant = "alpha"
key = "sk-alpha"

[[keys]]
tenant = "beta"
key = "sk-beta"

[tenants.alpha]
cache_threshold = 0.9
cache_truncated = true

[tenants.beta]
cache_threshold = 0.9
cache_truncated = true

[[keys]]
tenant = "gamma"
key = "sk-gamma"

[tenants.gamma]
tokens_per_minute = 600
"""
GAMMA = [("authorization", "Bearer sk-gamma")]
ALPHA = [("authorization", "Bearer sk-alpha")]
BETA = [("authorization", "Bearer sk-beta")]


@pytest.fixture(scope="module")
def cache_mesh(tmp_path_factory, tiny_model):
    from conftest import Mesh

    d = tmp_path_factory.mktemp("cache-mesh")
    (d / "keys.toml").write_text(KEYS)
    m = Mesh(d / "state", "--replicas", "1", "--api-keys", str(d / "keys.toml"))
    yield m
    m.stop()


@pytest.fixture(scope="module")
def stub(cache_mesh):
    with grpc.insecure_channel(cache_mesh.gateway) as ch:
        yield gateway_pb2_grpc.GatewayStub(ch)


def ask(stub, text, metadata, mode=gateway_pb2.CACHE_MODE_DEFAULT, temperature=0.0,
        max_tokens=12):
    msgs = list(stub.Generate(gateway_pb2.GenerateRequest(
        prompt=text, cache=gateway_pb2.CacheControl(mode=mode),
        sampling=common_pb2.SamplingParams(temperature=temperature, max_tokens=max_tokens)),
        metadata=metadata, timeout=60))
    return msgs, "".join(m.text for m in msgs), any(m.cache_hit for m in msgs)


def eventually_hit(stub, text, metadata, **kw):
    """Stores land off the hot path; the next identical question hits once they have."""
    for _ in range(50):
        msgs, answer, hit = ask(stub, text, metadata, **kw)
        if hit:
            return msgs, answer
        time.sleep(0.1)
    raise AssertionError(f"{text!r} never hit the cache")


def test_status_lists_the_cache_tier(cache_mesh):
    roles = sorted(p.role for p in cache_mesh.state.processes)
    assert roles == ["cache", "embedder", "gateway", "inference"]


def test_a_repeated_question_is_replayed_from_the_cache(stub):
    first, answer, hit = ask(stub, "How do I activate my new card?", ALPHA)
    assert not hit and first[-1].cost_usd > 0
    msgs, replayed = eventually_hit(stub, "How do I activate my new card?", ALPHA)
    assert replayed == answer
    assert [t for m in msgs for t in m.token_ids] == [t for m in first for t in m.token_ids]
    assert msgs[0].served_by.replica == "cache"
    assert msgs[-1].cost_usd == 0.0
    assert msgs[-1].finish_reason == first[-1].finish_reason
    assert msgs[-1].usage.completion_tokens == first[-1].usage.completion_tokens


def test_a_paraphrase_hits_and_an_unrelated_question_misses(stub):
    _, answer, _ = ask(stub, "Why was my transfer declined?", ALPHA)
    eventually_hit(stub, "Why was my transfer declined?", ALPHA)
    _, paraphrased, hit = ask(stub, "Why was my transfer declined ?", ALPHA)
    assert hit and paraphrased == answer
    _, _, hit = ask(stub, "What is the exchange rate for euros?", ALPHA)
    assert not hit


def test_tenants_never_see_each_others_answers(stub):
    question = "Can I get a refund for a card payment?"
    _, alpha_answer, _ = ask(stub, question, ALPHA)
    eventually_hit(stub, question, ALPHA)
    # beta asks the very same question: a miss, then beta's own answer.
    _, beta_answer, hit = ask(stub, question, BETA)
    assert not hit
    _, beta_again = eventually_hit(stub, question, BETA)
    assert beta_again == beta_answer
    _, alpha_again = eventually_hit(stub, question, ALPHA)
    assert alpha_again == alpha_answer


def test_bypass_never_reads_and_refresh_regenerates(stub):
    question = "Where can I find my card PIN?"
    ask(stub, question, ALPHA)
    eventually_hit(stub, question, ALPHA)
    _, _, hit = ask(stub, question, ALPHA, mode=gateway_pb2.CACHE_MODE_BYPASS)
    assert not hit
    msgs, _, hit = ask(stub, question, ALPHA, mode=gateway_pb2.CACHE_MODE_REFRESH)
    assert not hit and msgs[-1].cost_usd > 0


def test_sampled_answers_are_not_cached_by_default(stub):
    for _ in range(3):
        _, _, hit = ask(stub, "Tell me a story about a bank", ALPHA, temperature=0.9)
        assert not hit


def test_a_cached_answer_longer_than_max_tokens_is_not_replayed(stub):
    question = "How long does a transfer take?"
    ask(stub, question, ALPHA, max_tokens=12)
    eventually_hit(stub, question, ALPHA, max_tokens=12)
    msgs, _, hit = ask(stub, question, ALPHA, max_tokens=4)
    assert not hit and msgs[-1].usage.completion_tokens == 4


def test_savings_are_booked_in_dollars(cache_mesh):
    gw = cache_mesh.state.gateway()
    text = urllib.request.urlopen(f"http://{gw.metrics}/metrics", timeout=5).read().decode()
    saved = [line for line in text.splitlines()
             if line.startswith('spotmesh_semantic_cache_saved_usd_total{tenant="alpha"}')]
    assert saved and float(saved[0].rsplit(" ", 1)[1]) > 0
    assert 'spotmesh_gateway_cache_requests_total{result="hit",tenant="alpha"}' in text


def test_requests_are_still_served_when_the_cache_is_down(stub, cache_mesh):
    cache = next(p for p in cache_mesh.state.processes if p.role == "cache")
    os.kill(cache.pid, signal.SIGKILL)
    msgs, answer, hit = ask(stub, "Is the cache down?", ALPHA)
    assert not hit and answer and msgs[-1].finish_reason
    gw = cache_mesh.state.gateway()
    text = urllib.request.urlopen(f"http://{gw.metrics}/metrics", timeout=5).read().decode()
    assert 'spotmesh_gateway_cache_errors_total{stage="lookup"}' in text


def test_a_tenant_over_its_token_rate_gets_resource_exhausted(stub):
    # 600 tokens a minute: one request may reserve prompt + max_tokens of them.
    req = gateway_pb2.GenerateRequest(
        prompt="rate me", cache=gateway_pb2.CacheControl(mode=gateway_pb2.CACHE_MODE_BYPASS),
        sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=250))
    stub.Complete(req, metadata=GAMMA, timeout=60)
    stub.Complete(req, metadata=GAMMA, timeout=60)
    with pytest.raises(grpc.RpcError) as err:
        stub.Complete(req, metadata=GAMMA, timeout=60)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "tokens per minute" in err.value.details()
    # Other tenants are not limited by gamma's use.
    ask(stub, "still fine", ALPHA)


def test_spotmesh_cost_reports_tenants_pools_and_savings_by_tier(cache_mesh):
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "cli", "cost", "--json"],
                         env=cache_mesh.env, capture_output=True, text=True, check=True)
    report = json.loads(out.stdout)
    assert {"alpha", "beta"} <= set(report["tenants"])
    alpha = report["tenants"]["alpha"]
    assert alpha["total_usd"] > 0 and alpha["cost_per_mtok_usd"] > 0
    assert alpha["semantic_saved_usd"] > 0
    pool = report["pools"]["on-demand"]  # the one replica of this mesh
    assert pool["cost_usd"] > 0 and pool["tokens"]["completion"] > 0
    assert report["saved_usd"]["semantic"] > 0
    table = subprocess.run([sys.executable, "-m", "cli", "cost"], env=cache_mesh.env,
                           capture_output=True, text=True, check=True).stdout
    assert "alpha" in table and "saved by the semantic tier" in table
