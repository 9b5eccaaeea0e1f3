"""``spotmesh bench prefix-sim``: prefix-aware routing replayed on a real trace, no engines.

A Mooncake-format trace (``timestamp`` ms, ``input_length``, ``output_length``, ``hash_ids``:
the prompt's chained 512-token block hashes) is replayed through spotmesh's real router
(``services.gateway.routing``) and prefix index (``spotmesh.prefix_index``, in approximate mode:
the router records where it sent each prompt). Each replica's KV cache is simulated as an LRU
set of ``--capacity-blocks`` blocks. Compared in the same run: round-robin, random, and one
shared cache of N x C blocks (what no routing can beat).

Load is simulated so the router's queue scorer has something to see: a request occupies its
replica from arrival until its uncached prompt tokens are prefilled and its output decoded.
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import sys
from dataclasses import dataclass, field

from cli import write_json
from cli.datasets import MOONCAKE_TRACE, default_file
from services.gateway.routing.candidate import Candidate, RouteRequest
from services.gateway.routing.pipeline import Weights, weighted_router
from spotmesh.prefix_index import PrefixIndex

TRACE_BLOCK_TOKENS = 512  # Mooncake's hash_ids cover 512-token blocks
# Service-time model for the load signal: prefill and decode rates of one replica.
PREFILL_TOKENS_PER_S = 8000.0
DECODE_TOKENS_PER_S = 40.0
DEFAULT_WEIGHTS = Weights()


@dataclass
class Request:
    t: float  # seconds
    input_length: int
    output_length: int
    hashes: list[int]


@dataclass
class Tally:
    blocks: int = 0
    hit_blocks: int = 0
    tokens: int = 0
    hit_tokens: int = 0
    assigned: dict[str, int] = field(default_factory=dict)
    wins: dict[str, int] = field(default_factory=dict)

    def result(self, replicas: list[str]) -> dict:
        loads = [self.assigned.get(r, 0) for r in replicas]
        mean = sum(loads) / len(loads)
        out = {
            "block_hit_ratio": round(self.hit_blocks / self.blocks, 4) if self.blocks else 0.0,
            "token_hit_ratio": round(self.hit_tokens / self.tokens, 4) if self.tokens else 0.0,
            "imbalance": round(max(loads) / mean, 4) if mean else 0.0,
        }
        if self.wins:
            out["decisions_by_scorer"] = dict(sorted(self.wins.items()))
        return out


def load_trace(path: str) -> list[Request]:
    reqs = []
    with open(path) as f:
        for line in f:
            d = json.loads(line)
            reqs.append(Request(d["timestamp"] / 1000.0, int(d["input_length"]),
                                int(d["output_length"]), [int(h) for h in d["hash_ids"]]))
    reqs.sort(key=lambda r: r.t)
    return reqs


def _service_seconds(req: Request, hit_tokens: int) -> float:
    return (max(0, req.input_length - hit_tokens) / PREFILL_TOKENS_PER_S
            + req.output_length / DECODE_TOKENS_PER_S)


def simulate(reqs: list[Request], policy: str, n: int, capacity: int,
             weights: Weights = DEFAULT_WEIGHTS, seed: int = 0) -> dict:
    shared = policy == "shared_upper_bound"
    replicas = ["shared"] if shared else [f"r{i}" for i in range(n)]
    index = PrefixIndex(capacity * n if shared else capacity)
    in_flight: dict[str, list[float]] = {r: [] for r in replicas}
    rng = random.Random(seed)
    tally = Tally()
    # The gateway's own router; among equal scores, the replica given fewest prompt tokens.
    router = weighted_router(weights, tiebreak=lambda c: -tally.assigned.get(c.name, 0))
    for i, req in enumerate(reqs):
        for r in replicas:
            heap = in_flight[r]
            while heap and heap[0] <= req.t:
                heapq.heappop(heap)
        matched = index.match(req.hashes)
        if shared:
            chosen = "shared"
        elif policy == "round_robin":
            chosen = replicas[i % n]
        elif policy == "random":
            chosen = rng.choice(replicas)
        else:
            cands = [Candidate(r, queue=len(in_flight[r]),
                               kv_usage=index.size(r) / capacity,
                               prefix_blocks=matched.get(r, 0)) for r in replicas]
            best = router.route(cands, RouteRequest(prompt_blocks=len(req.hashes)))
            chosen = best.name
            scorer = best.decided_by
            tally.wins[scorer] = tally.wins.get(scorer, 0) + 1
        hit_blocks = matched.get(chosen, 0)
        hit_tokens = min(req.input_length, hit_blocks * TRACE_BLOCK_TOKENS)
        tally.blocks += len(req.hashes)
        tally.hit_blocks += hit_blocks
        tally.tokens += req.input_length
        tally.hit_tokens += hit_tokens
        tally.assigned[chosen] = tally.assigned.get(chosen, 0) + req.input_length
        heapq.heappush(in_flight[chosen], req.t + _service_seconds(req, hit_tokens))
        index.record(chosen, req.hashes)
    return tally.result(replicas)


def main(a) -> int:
    path = a.trace or default_file(MOONCAKE_TRACE, "trace", "--trace")
    if a.replicas < 1 or a.capacity_blocks < 1:
        raise SystemExit("--replicas and --capacity-blocks must be >= 1")
    reqs = load_trace(path)
    weights = Weights(prefix=a.prefix_weight, queue=a.queue_weight, kv=a.kv_weight,
                      queue_tolerance=a.queue_tolerance)
    print(f"prefix-sim: {len(reqs)} requests, {a.replicas} replicas x {a.capacity_blocks} "
          f"blocks", file=sys.stderr, flush=True)
    policies = {}
    for policy in ("spotmesh", "round_robin", "random", "shared_upper_bound"):
        print(f"  {policy}...", file=sys.stderr, flush=True)
        policies[policy] = simulate(reqs, policy, a.replicas, a.capacity_blocks, weights)
    bound = policies["shared_upper_bound"]["block_hit_ratio"]
    doc = {"benchmark": "prefix-sim", "trace": path, "replicas": a.replicas,
           "capacity_blocks": a.capacity_blocks,
           "weights": {"prefix": weights.prefix, "queue": weights.queue, "kv": weights.kv,
                       "queue_tolerance": weights.queue_tolerance},
           "policies": policies,
           "spotmesh_fraction_of_upper_bound": round(
               policies["spotmesh"]["block_hit_ratio"] / bound, 4) if bound else None}
    print(f"{'policy':<20} {'block hit':>9} {'token hit':>9} {'imbalance':>9}")
    for name, r in policies.items():
        print(f"{name:<20} {r['block_hit_ratio']:>9.4f} {r['token_hit_ratio']:>9.4f} "
              f"{r['imbalance']:>9.4f}")
    print(f"spotmesh reaches {doc['spotmesh_fraction_of_upper_bound']} of the upper bound's "
          "block hit ratio")
    if a.json:
        write_json(a.json, doc)
        print(f"wrote {a.json}")
    return 0


def add_parser(bench: argparse._SubParsersAction) -> None:
    bp = bench.add_parser("prefix-sim", help="prefix-aware routing replayed on a trace of "
                                             "block hashes (simulated KV caches)")
    bp.add_argument("--trace", default="",
                    help="Mooncake-format JSONL (default: ../shared/data/prefix_cache/"
                         "mooncake_fast25_synthetic_trace.jsonl)")
    bp.add_argument("--replicas", type=int, default=4)
    bp.add_argument("--capacity-blocks", type=int, default=4096)
    bp.add_argument("--prefix-weight", type=float, default=1.0)
    bp.add_argument("--queue-weight", type=float, default=1.0)
    bp.add_argument("--kv-weight", type=float, default=0.2)
    bp.add_argument("--queue-tolerance", type=float, default=4.0,
                    help="queued requests that cancel a full prefix match")
    bp.add_argument("--json", default="")
    bp.set_defaults(fn=main)
