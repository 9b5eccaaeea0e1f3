"""``spotmesh bench prefix``: prefix-aware routing against round-robin, live, on real engines.

Each policy gets a fresh mesh from ``spotmesh up``'s own code (N CPU replicas of the tiny model,
the prefix index, no semantic cache so every request reaches an engine) and the same request
sequence: chat requests whose system prompt is one of the real system prompts in
``../shared/data/prefix_cache/awesome_chatgpt_system_prompts.jsonl`` (popularity Zipf-like,
seeded) and whose user turn varies. The replicas' KV caches are capped (``--kv-capacity-blocks``)
so that the hot system prompts fit in all replicas together but not in each one: the regime
where routing decides the hit rate.

Measured by the engines' own counters (``vllm:prefix_cache_hits`` / ``vllm:prefix_cache_queries``
in prompt tokens, summed over replicas, read from each replica's /metrics before and after) and
by client-side time to first token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

from cli import write_json
from cli.bench.serve import closed_loop
from cli.bench.workload import QUESTIONS, popularity
from cli.datasets import SYSTEM_PROMPTS, default_file, read_system_prompts
from cli.stats import latency_ms
from spotmesh.metrics import metric_sum, read_metrics

POLICIES = {
    # name: (routing, prefix mode)
    "prefix_approximate": ("prefix", "approximate"),
    "prefix_precise": ("prefix", "precise"),
    "round_robin": ("round-robin", "approximate"),
}


def load_system_prompts(path: str, count: int, tokenizer, min_tokens: int,
                        max_tokens: int) -> list[str]:
    """The first ``count`` system prompts of ``min_tokens``..``max_tokens`` tokens (long
    enough to span KV blocks, short enough to leave room in the tiny model's context)."""
    path = path or default_file(SYSTEM_PROMPTS, "prompts", "--prompts")
    chosen = []
    for text in read_system_prompts(path):
        if min_tokens <= len(tokenizer.encode(text)) <= max_tokens:
            chosen.append(text)
            if len(chosen) == count:
                return chosen
    if not chosen:
        raise SystemExit(f"no prompt in {path} has {min_tokens}-{max_tokens} tokens")
    return chosen


def workload(n_prompts: int, n_requests: int, seed: int) -> list[tuple[int, int]]:
    """(system prompt index, question index) per request: Zipf-like popularity (s=0.8)."""
    rng = random.Random(seed)
    order, weights = popularity(n_prompts, rng)
    picks = rng.choices(order, weights=weights, k=n_requests)
    return [(p, rng.randrange(len(QUESTIONS))) for p in picks]


def shared_prefix_tokens(tokenizer, system: str) -> int:
    """Tokens two requests with this system prompt and different user turns share (as the
    gateway renders them with the chat template)."""
    def render(question: str) -> list[int]:
        text = tokenizer.apply_chat_template(
            [{"role": "system", "content": system}, {"role": "user", "content": question}],
            tokenize=False, add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)

    a, b = render(QUESTIONS[0]), render(QUESTIONS[1])
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def ideal_hit_tokens(plan: list[tuple[int, int]], shared: list[int], block_size: int) -> int:
    """Prompt tokens one cache of unbounded size would serve: every repeat of a system prompt
    hits its shared prefix's full blocks (what no routing over bounded caches can beat)."""
    seen: set[int] = set()
    hits = 0
    for s, _ in plan:
        if s in seen:
            hits += shared[s] // block_size * block_size
        seen.add(s)
    return hits


def engine_counters(metrics_address: str) -> tuple[float, float]:
    """(prefix-cache hit tokens, queried tokens) from a replica's vLLM metrics."""
    samples = read_metrics(metrics_address)
    return (metric_sum(samples, "vllm:prefix_cache_hits_total"),
            metric_sum(samples, "vllm:prefix_cache_queries_total"))


async def drive(address: str, key: str, systems: list[str], plan: list[tuple[int, int]],
                concurrency: int, max_tokens: int) -> dict:
    import grpc

    from spotmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

    md = (("authorization", f"Bearer {key}"),)
    sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens)
    served: dict[str, int] = {}
    cached = [0]
    done = [0]
    step = max(1, len(plan) // 10)
    # Built up front: a mistake here fails the benchmark at once, not as 400 request errors.
    requests = [gateway_pb2.GenerateRequest(
        messages=[gateway_pb2.ChatMessage(role="system", content=systems[s]),
                  gateway_pb2.ChatMessage(role="user", content=QUESTIONS[q])],
        sampling=sampling) for s, q in plan]
    async with grpc.aio.insecure_channel(address) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)

        async def one(i: int):
            req = requests[i]
            started = time.perf_counter()
            ttft, tokens = None, 0
            async for msg in stub.Generate(req, metadata=md, timeout=600):
                if msg.token_ids and ttft is None:
                    ttft = time.perf_counter() - started
                if msg.served_by.replica and msg.finish_reason:
                    served[msg.served_by.replica] = served.get(msg.served_by.replica, 0) + 1
                    cached[0] += msg.usage.cached_prompt_tokens
                tokens += len(msg.token_ids)
            done[0] += 1
            if done[0] % step == 0:
                print(f"    {done[0]}/{len(plan)} requests", file=sys.stderr, flush=True)
            return ttft, tokens

        # Warm-up below one KV block: start-up costs, no cached prefixes.
        warm = gateway_pb2.GenerateRequest(prompt="warm up", sampling=sampling)
        for _ in range(4):
            await stub.Complete(warm, metadata=md, timeout=600)
        result = await closed_loop(len(plan), concurrency, one)
    ttft = latency_ms(result.ttft)
    return {"requests": len(result.ttft), "errors": result.errors,
            "wall_s": round(result.wall, 2), "ttft_ms_p50": ttft["p50"],
            "ttft_ms_p99": ttft["p99"], "requests_per_replica": dict(sorted(served.items())),
            "cached_prompt_tokens_reported": cached[0]}


def run_policy(name: str, a, model_dir: str, served_name: str, systems, plan) -> dict:
    from cli.supervisor import LocalMesh

    routing, mode = POLICIES[name]
    print(f"{name}: starting {a.replicas} replicas ({routing} routing, {mode})",
          file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="spotmesh-bench-prefix-") as state:
        mesh = LocalMesh(
            Path(state), replicas=a.replicas, spot_replicas=a.replicas // 2, port=0,
            api_keys=None, model=model_dir, served_model_name=served_name,
            inference_args=["--enforce-eager", "--engine-args",
                            json.dumps({"num_gpu_blocks_override": a.kv_capacity_blocks})],
            kv_cache_gib=1, semantic_cache=False, routing=routing, prefix_mode=mode,
            log=lambda m: print(m, file=sys.stderr, flush=True))
        try:
            st = mesh.start()
            replicas = [p for p in st.processes if p.role == "inference"]
            before = [engine_counters(r.metrics) for r in replicas]
            out = asyncio.run(drive(st.gateway().address, mesh.dev_key, systems, plan,
                                    a.concurrency, a.max_tokens))
            after = [engine_counters(r.metrics) for r in replicas]
        finally:
            mesh.stop()
    hits = sum(x[0] - b[0] for x, b in zip(after, before, strict=True))
    queries = sum(x[1] - b[1] for x, b in zip(after, before, strict=True))
    out.update({"prefix_cache_hits": int(hits), "prefix_cache_queries": int(queries),
                "prefix_cache_hit_ratio": round(hits / queries, 4) if queries else 0.0})
    print(f"  {name}: hit ratio {out['prefix_cache_hit_ratio']:.3f}, ttft p50 "
          f"{out['ttft_ms_p50']} ms p99 {out['ttft_ms_p99']} ms, errors {out['errors']}",
          file=sys.stderr, flush=True)
    return out


def main(a) -> int:
    from transformers import AutoTokenizer

    from cli.tinymodel import ensure_default_model
    from spotmesh.home import DEFAULT_MODEL_NAME

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    policies = a.policies.split(",") if a.policies else list(POLICIES)
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        print(f"--policies: unknown {unknown}; choose from {list(POLICIES)}", file=sys.stderr)
        return 2
    if a.replicas < 2:
        print("--replicas must be >= 2 (routing needs a choice)", file=sys.stderr)
        return 2
    model_dir = a.model or str(ensure_default_model())
    served_name = DEFAULT_MODEL_NAME if not a.model else Path(a.model).name
    tok = AutoTokenizer.from_pretrained(model_dir)
    if not 0 < a.min_prompt_tokens <= a.max_prompt_tokens:
        print("need 0 < --min-prompt-tokens <= --max-prompt-tokens", file=sys.stderr)
        return 2
    systems = load_system_prompts(a.prompts, a.system_prompts, tok, a.min_prompt_tokens,
                                  a.max_prompt_tokens)
    plan = workload(len(systems), a.requests, a.seed)
    print(f"bench prefix: {len(systems)} system prompts, {a.requests} requests, concurrency "
          f"{a.concurrency}, {a.replicas} replicas x {a.kv_capacity_blocks} KV blocks",
          file=sys.stderr, flush=True)
    results = {p: run_policy(p, a, model_dir, served_name, systems, plan) for p in policies}
    doc = {
        "benchmark": "prefix",
        "model": served_name,
        "replicas": a.replicas,
        "kv_capacity_blocks_per_replica": a.kv_capacity_blocks,
        "system_prompts": len(systems),
        "system_prompt_tokens": sum(len(tok.encode(s)) for s in systems),
        "ideal_hit_ratio": None,
        "requests": a.requests,
        "concurrency": a.concurrency,
        "max_tokens": a.max_tokens,
        "seed": a.seed,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "policies": results,
    }
    queries = next((r["prefix_cache_queries"] for r in results.values()), 0)
    if queries:
        shared = [shared_prefix_tokens(tok, s) for s in systems]
        doc["ideal_hit_ratio"] = round(ideal_hit_tokens(plan, shared, a.block_size) / queries, 4)
        for r in results.values():
            r["share_of_ideal"] = round(r["prefix_cache_hit_ratio"] / doc["ideal_hit_ratio"], 3)
    base = results.get("round_robin")
    if base:
        for name, r in results.items():
            if name != "round_robin" and base["prefix_cache_hit_ratio"] \
                    and base["ttft_ms_p50"]:
                r["hit_ratio_vs_round_robin"] = round(
                    r["prefix_cache_hit_ratio"] / base["prefix_cache_hit_ratio"], 3)
                r["ttft_p50_vs_round_robin"] = round(r["ttft_ms_p50"] / base["ttft_ms_p50"], 3)
    print()
    print(f"one unbounded cache would hit {doc['ideal_hit_ratio']} of prompt tokens")
    print(f"{'policy':<20} {'hit ratio':>9} {'hits/queries (tokens)':>22} {'ttft p50':>9} "
          f"{'ttft p99':>9} {'errors':>6}  per replica")
    for name, r in results.items():
        print(f"{name:<20} {r['prefix_cache_hit_ratio']:>9.3f} "
              f"{r['prefix_cache_hits']:>10}/{r['prefix_cache_queries']:<11} "
              f"{r['ttft_ms_p50'] or 0:>9.1f} {r['ttft_ms_p99'] or 0:>9.1f} {r['errors']:>6}  "
              f"{r['requests_per_replica']}")
    if a.json:
        write_json(a.json, doc)
        print(f"wrote {a.json}")
    return 0 if all(r["errors"] == 0 for r in results.values()) else 1


def add_parser(bench: argparse._SubParsersAction) -> None:
    bl = bench.add_parser("prefix", help="prefix-aware vs round-robin routing through live "
                                         "meshes (vLLM's own prefix-cache counters, TTFT)")
    bl.add_argument("--replicas", type=int, default=2)
    bl.add_argument("--kv-capacity-blocks", type=int, default=96,
                    help="KV blocks per replica (128 tokens each on CPU)")
    bl.add_argument("--system-prompts", type=int, default=48,
                    help="distinct system prompts (of 256-1200 tokens) in the workload")
    bl.add_argument("--min-prompt-tokens", type=int, default=256)
    bl.add_argument("--max-prompt-tokens", type=int, default=1200)
    bl.add_argument("--block-size", type=int, default=128,
                    help="the engines' KV block size (vLLM CPU: 128), for the ideal hit ratio")
    bl.add_argument("--requests", type=int, default=400)
    bl.add_argument("--concurrency", type=int, default=4)
    bl.add_argument("--max-tokens", type=int, default=8)
    bl.add_argument("--seed", type=int, default=0)
    bl.add_argument("--policies", default="",
                    help="comma-separated subset of prefix_approximate, prefix_precise, "
                         "round_robin (default: all)")
    bl.add_argument("--prompts", default="",
                    help="JSONL with a 'prompt' field (default: ../shared/data/prefix_cache/"
                         "awesome_chatgpt_system_prompts.jsonl)")
    bl.add_argument("--model", default="")
    bl.add_argument("--json", default="")
    bl.set_defaults(fn=main)
