"""Prefix-aware routing through real processes: `spotmesh up` in precise mode (the replicas
relay their vLLM engines' KV-cache events to the cache process's prefix index), two replicas
with small KV caches (64 blocks of 128 tokens), the tiny model.

Tests run in file order; the last ones kill a replica and the prefix service.
"""

from __future__ import annotations

import os
import signal
import time
import urllib.request

import grpc
import pytest
from conftest import Mesh

from spotmesh.prefix_hash import block_hashes
from spotmesh.v1 import cache_pb2, cache_pb2_grpc, common_pb2, gateway_pb2, gateway_pb2_grpc

pytestmark = pytest.mark.mesh

BLOCK = 128  # vLLM's CPU block size


@pytest.fixture(scope="module")
def pmesh(tmp_path_factory, tiny_model):
    m = Mesh(tmp_path_factory.mktemp("pmesh"), "--replicas", "2", "--no-cache",
             "--prefix-mode", "precise", "--kv-capacity-blocks", "64")
    yield m
    m.stop()


@pytest.fixture(scope="module")
def stub(pmesh):
    with grpc.insecure_channel(pmesh.gateway) as ch:
        yield gateway_pb2_grpc.GatewayStub(ch)


@pytest.fixture(scope="module")
def index(pmesh):
    cache = next(p for p in pmesh.state.processes if p.role == "cache")
    token = __import__("json").loads((pmesh.state_dir / "cache-tokens.json").read_text())
    with grpc.insecure_channel(cache.address) as ch:
        yield cache_pb2_grpc.PrefixCacheStub(ch), (("authorization",
                                                    f"Bearer {token['service']}"),)


def system_prompt(topic: str) -> str:
    # ~370 tokens of the tiny model's tokenizer: two full 128-token blocks and a partial one.
    return f"You are an assistant who explains {topic} in great detail. " * 12


def complete(stub, pmesh, prompt: str, max_tokens: int = 4) -> gateway_pb2.GenerateResponse:
    req = gateway_pb2.GenerateRequest(
        prompt=prompt, sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens))
    return stub.Complete(req, metadata=pmesh.metadata, timeout=120)


def metric(address: str, name: str) -> float:
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_until(predicate, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.1)
    raise AssertionError("condition not reached in time")


def prompt_hashes(tiny_model, prompt: str) -> list[int]:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(tiny_model)).encode(prompt)
    return block_hashes(ids, BLOCK)


def test_engine_events_fill_the_index_and_a_shared_prefix_returns_to_its_replica(
        stub, pmesh, index, tiny_model):
    first = complete(stub, pmesh, system_prompt("spot instances") + "Question one?")
    assert first.usage.cached_prompt_tokens == 0
    holder = first.served_by.replica
    prefix_stub, auth = index
    hashes = prompt_hashes(tiny_model, system_prompt("spot instances") + "Question one?")
    assert len(hashes) == 2
    # The index learnt it from the engine's BlockStored event, not from the gateway.
    match = wait_until(lambda: prefix_stub.Match(
        cache_pb2.MatchRequest(model="spotmesh-tiny", block_hashes=hashes),
        metadata=auth, timeout=5).matches)
    assert [(m.replica, m.matched_blocks) for m in match] == [(holder, 2)]
    for i in range(3):
        again = complete(stub, pmesh, system_prompt("spot instances") + f"Question {i + 2}?")
        assert again.served_by.replica == holder
        assert again.usage.cached_prompt_tokens == 2 * BLOCK


def test_engine_evictions_leave_the_index(stub, pmesh, index, tiny_model):
    prefix_stub, auth = index
    early = system_prompt("topic zero") + "Why?"
    complete(stub, pmesh, early)
    hashes = prompt_hashes(tiny_model, early)
    wait_until(lambda: prefix_stub.Match(
        cache_pb2.MatchRequest(model="spotmesh-tiny", block_hashes=hashes),
        metadata=auth, timeout=5).matches)
    # 2 x 64 blocks in all; each new prompt stores 2 blocks (and its decode a third).
    for i in range(1, 70):
        complete(stub, pmesh, system_prompt(f"topic {i}") + "Why?", max_tokens=1)
    replicas = [r.metrics for r in pmesh.replicas]
    assert sum(metric(m, 'spotmesh_inference_kv_events_total{kind="BlockRemoved"}')
               for m in replicas) > 0

    def matches():
        return prefix_stub.Match(cache_pb2.MatchRequest(model="spotmesh-tiny",
                                                        block_hashes=hashes),
                                 metadata=auth, timeout=5).matches

    # The relay forwards the engine's events asynchronously: the last BlockRemoved may still be
    # on its way when the last request returns.
    wait_until(lambda: not matches())
    assert matches() == []  # the engine evicted the oldest prompt's blocks, and said so
    cache = next(p for p in pmesh.state.processes if p.role == "cache")
    assert metric(cache.metrics, 'spotmesh_prefix_cache_evicted_blocks_total{cause="engine"}') > 0
    for r in pmesh.replicas:
        assert metric(r.metrics, "spotmesh_inference_kv_event_gaps_total") == 0


def test_routing_metrics_name_the_winning_scorer(pmesh):
    gw = pmesh.state.gateway()
    assert metric(gw.metrics, 'spotmesh_gateway_routing_decisions_total{scorer="prefix"}') >= 3
    assert metric(gw.metrics, "spotmesh_gateway_prefix_matched_tokens_total") >= 3 * 2 * BLOCK
    # What the engines' cached prefixes saved, in dollars, and cost by pool.
    assert metric(gw.metrics, 'spotmesh_saved_usd_total{tier="prefix"}') > 0
    assert metric(gw.metrics, 'spotmesh_tokens_total{kind="cached_prompt"') >= 3 * 2 * BLOCK
    assert metric(gw.metrics, "spotmesh_cost_usd_total") > 0


def test_a_replica_that_vanishes_after_match_loses_no_request(stub, pmesh, tiny_model):
    prompt = system_prompt("preemption") + "First?"
    holder = complete(stub, pmesh, prompt).served_by.replica
    victim = next(r for r in pmesh.replicas if r.replica == holder)
    # The whole process group, as a lost machine takes it: the engine core goes too.
    os.killpg(victim.pid, signal.SIGKILL)
    # The index (and the gateway, until its next poll) still name the dead replica as the
    # prefix holder; the request must still succeed on the other one.
    resp = complete(stub, pmesh, system_prompt("preemption") + "Second?")
    assert resp.served_by.replica != holder
    assert resp.finish_reason == common_pb2.FINISH_REASON_LENGTH


def test_serving_continues_when_the_prefix_service_is_down(stub, pmesh):
    cache = next(p for p in pmesh.state.processes if p.role == "cache")
    os.killpg(cache.pid, signal.SIGKILL)
    gw = pmesh.state.gateway()
    for i in range(3):
        resp = complete(stub, pmesh, system_prompt("outages") + f"Q{i}?")
        assert resp.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert metric(gw.metrics, "spotmesh_gateway_prefix_service_errors_total") >= 3
