"""Prefix hashing, the prefix index, the routing pipeline, and the trace simulation that
replays them (no engines, no network)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cli.bench.prefix_sim import Request, simulate
from services.gateway.routing.candidate import Candidate, RouteRequest
from services.gateway.routing.pickers import winning_scorer
from services.gateway.routing.pipeline import Weights, weighted_router
from spotmesh.prefix_hash import block_hashes
from spotmesh.prefix_index import PrefixIndex

TRACE = Path(__file__).resolve().parents[2] / "shared" / "data" / "prefix_cache" / \
    "mooncake_fast25_synthetic_trace.jsonl"



def pick(candidates, prompt_blocks: int, weights: Weights | None = None):
    """The gateway's weighted router on bare candidates."""
    return weighted_router(weights).route(candidates, RouteRequest(prompt_blocks=prompt_blocks))


def test_equal_prefixes_hash_equal_and_a_change_breaks_every_later_block():
    a = block_hashes(list(range(64)), 16)
    b = block_hashes([*range(32), 999, *range(33, 64)], 16)
    assert len(a) == 4
    assert a[:2] == b[:2] and a[2] != b[2] and a[3] != b[3]


def test_a_partial_last_block_has_no_hash():
    assert len(block_hashes(list(range(40)), 16)) == 2
    assert block_hashes([1, 2, 3], 16) == []


def test_the_same_block_after_a_different_prefix_hashes_differently():
    x = block_hashes([1] * 16 + [7] * 16, 16)
    y = block_hashes([2] * 16 + [7] * 16, 16)
    assert x[1] != y[1]


def test_match_counts_the_leading_blocks_each_replica_holds():
    idx = PrefixIndex(100)
    idx.record("a", [1, 2, 3])
    idx.record("b", [1, 2])
    idx.record("c", [2, 3])  # holds later blocks but not the first: no prefix
    assert idx.match([1, 2, 3, 4]) == {"a": 3, "b": 2}
    assert idx.match([9, 1]) == {}


def test_each_replica_forgets_its_least_recently_used_blocks_first():
    idx = PrefixIndex(3)
    idx.record("a", [1, 2, 3])
    idx.record("a", [1])  # touch 1: 2 is now the oldest
    idx.record("a", [4])
    assert idx.size("a") == 3
    assert idx.match([2]) == {}
    assert idx.match([1]) == {"a": 1}
    idx.set_capacity("a", 1)
    assert idx.size("a") == 1


def test_forgetting_a_replica_drops_everything_it_held():
    idx = PrefixIndex(10)
    idx.record("a", [1, 2])
    idx.record("b", [1])
    assert idx.forget("a") == 2
    assert idx.match([1, 2]) == {"b": 1}


def test_affinity_wins_while_queues_are_even():
    cands = [Candidate("cold", queue=0), Candidate("warm", queue=0, prefix_blocks=8)]
    best = pick(cands, prompt_blocks=8)
    assert best.name == "warm" and winning_scorer(best) == "prefix"


def test_a_hot_prefix_spills_to_another_replica_as_its_queue_grows():
    chosen = []
    queue = 0
    for _ in range(6):
        cands = [Candidate("holder", queue=queue, prefix_blocks=10), Candidate("other", queue=0)]
        best = pick(cands, prompt_blocks=10,
                    weights=Weights(prefix=1.0, queue=1.0, kv=0.0, queue_tolerance=4))
        chosen.append(best.name)
        queue += 1 if best.name == "holder" else 0
    # Affinity while the holder's queue is short; once it is `queue_tolerance` longer than the
    # other's, the prefix's value is spent and the next request goes elsewhere.
    assert chosen[:4] == ["holder"] * 4 and chosen[4] == "other"


def test_spot_wins_an_exact_tie():
    best = pick([Candidate("od", queue=1), Candidate("sp", queue=1, spot=True)], 4)
    assert best.name == "sp"


def test_no_candidates_means_no_choice():
    assert pick([], 4) is None


def _synthetic_trace() -> list[Request]:
    # 8 system prompts of 20 blocks in random order, each followed by a unique user turn of 2
    # blocks; each replica's cache holds about two prompts.
    import random

    rng = random.Random(0)
    reqs = []
    for i in range(400):
        group = rng.randrange(8)
        prefix = [1000 * group + b for b in range(20)]
        reqs.append(Request(t=i * 0.5, input_length=22 * 512, output_length=50,
                            hashes=[*prefix, 10**6 + 2 * i, 10**6 + 2 * i + 1]))
    return reqs


def test_prefix_aware_routing_beats_round_robin_and_stays_balanced():
    reqs = _synthetic_trace()
    ours = simulate(reqs, "spotmesh", n=4, capacity=60)
    rr = simulate(reqs, "round_robin", n=4, capacity=60)
    assert ours["block_hit_ratio"] > rr["block_hit_ratio"]
    assert ours["imbalance"] <= 1.3


@pytest.mark.skipif(not TRACE.exists(), reason="../shared/data not present")
def test_prefix_sim_on_the_mooncake_trace_meets_its_goal(tmp_path):
    out = tmp_path / "sim.json"
    subprocess.run([sys.executable, "-m", "cli", "bench", "prefix-sim", "--trace",
                    str(TRACE), "--replicas", "4", "--capacity-blocks", "4096", "--json",
                    str(out)], check=True, capture_output=True)
    doc = json.loads(out.read_text())
    assert set(doc["policies"]) == {"spotmesh", "round_robin", "random", "shared_upper_bound"}
    for r in doc["policies"].values():
        assert {"block_hit_ratio", "token_hit_ratio", "imbalance"} <= set(r)
    ours, bound = doc["policies"]["spotmesh"], doc["policies"]["shared_upper_bound"]
    assert ours["block_hit_ratio"] >= 0.9 * bound["block_hit_ratio"]
    assert ours["imbalance"] <= 1.3


def test_kv_events_translate_to_the_gateways_hash_chain():
    from services.inference.kv_events import HashTranslator

    t = HashTranslator(max_blocks=100)
    tokens = list(range(64))
    # vLLM's own hashes are opaque (ints or bytes); the chain is rebuilt from token ids.
    first = t.stored([b"v1", b"v2"], None, tokens[:32], 16)
    assert first == block_hashes(tokens[:32], 16)
    later = t.stored([b"v3", b"v4"], b"v2", tokens[32:], 16)
    assert first + later == block_hashes(tokens, 16)
    assert t.removed([b"v3", b"unknown"]) == [later[0]]
    # A block whose parent was never seen (events lost) cannot be placed in the chain.
    assert t.stored([b"v9"], b"never-seen", tokens[:16], 16) == []
    # Token ids that do not fill the announced blocks are refused, not guessed.
    assert t.stored([b"v5", b"v6"], None, tokens[:20], 16) == []


def test_the_translator_is_bounded():
    from services.inference.kv_events import HashTranslator

    t = HashTranslator(max_blocks=2)
    for i in range(5):
        t.stored([i], None, [i] * 16, 16)
    assert t.removed([0, 1, 2]) == []
    assert len(t.removed([3, 4])) == 2


def test_the_live_benchmarks_workload_is_seeded_and_skewed():
    from cli.bench.prefix import workload

    plan = workload(20, 2000, seed=3)
    assert plan == workload(20, 2000, seed=3)
    counts = sorted((sum(1 for p, _ in plan if p == i) for i in range(20)), reverse=True)
    assert counts[0] > 3 * counts[-1]  # Zipf-like: a few hot system prompts
    assert len({q for _, q in plan}) > 1  # user turns vary
