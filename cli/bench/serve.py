"""``spotmesh bench serve``: what the mesh costs on top of the engine, measured so that nothing
can flatter it.

One invocation measures, for each concurrency level, three sides, one after the other so they
never share the CPU:

- **direct**: a vLLM engine in this process (token ids in, deltas out, no network): the
  baseline.
- **mesh** (relay only): gateway + one replica process over loopback gRPC, the cache tier off,
  as a user's stub calls it. ``tokens_per_s_ratio`` is mesh / direct.
- **cached_miss**: the default mesh (embedder + semantic cache on, ``--prefill`` entries already
  cached in the requests' scope) on misses only: every prompt is sent once in the mesh's life,
  so nothing it stores can be hit again; hits that still happen (near-duplicate prompts in the
  data) are counted, reported, and make the run fail. Compared with the relay-only mesh.

Hits are measured on their own (``hits``: a replay of prompts the miss side stored) and never
enter a throughput ratio. Each level runs for ``--seconds`` after a warm-up of its own, and
records each process's CPU seconds per token and per request (gateway, replica, embedder,
cache; this process for the direct side).

Prompts are real system prompts from ``../shared/data`` (or any JSONL with a "prompt" field).
Greedy decoding with the tiny model always runs to ``max_tokens``, so every side produces the
same number of tokens per request.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from cli import write_json
from cli.bench.procstat import process_cpu_seconds
from cli.datasets import SYSTEM_PROMPTS, default_file, read_system_prompts
from cli.stats import latency_ms

ROLES = ("gateway", "inference", "embedder", "cache")


def load_prompts(path: str, limit: int | None = None) -> list[str]:
    """The first ``limit`` real system prompts (default: the shared data's), cut to 1,500
    characters: the tiny model's context is 2,048 tokens; this keeps prompts well inside it."""
    path = path or default_file(SYSTEM_PROMPTS, "prompts", "--prompts")
    return [p[:1500] for p in read_system_prompts(path)[:limit]]


def distinct(prompts: list[str]) -> list[str]:
    """Each text once, in order (the data holds a few exact duplicates)."""
    return list(dict.fromkeys(prompts))


class Unique:
    """Hands out each prompt once; ``exhausted`` once there are none left."""

    def __init__(self, prompts: list[str]) -> None:
        self._it = iter(prompts)
        self.used = 0
        self.exhausted = False

    def next(self) -> str | None:
        try:
            p = next(self._it)
        except StopIteration:
            self.exhausted = True
            return None
        self.used += 1
        return p


@dataclass
class Result:
    ttft: list[float] = field(default_factory=list)
    tokens: int = 0
    wall: float = 0.0
    errors: int = 0
    hits: int = 0
    ran_out: bool = False  # the level stopped early: no unique prompt was left

    def summary(self) -> dict:
        ttft = latency_ms(self.ttft)
        out = {
            "requests": len(self.ttft),
            "errors": self.errors,
            "tokens": self.tokens,
            "wall_s": round(self.wall, 3),
            "tokens_per_s": round(self.tokens / self.wall, 2) if self.wall else 0.0,
            "ttft_ms_p50": ttft["p50"],
            "ttft_ms_p99": ttft["p99"],
            "cache_hits": self.hits,
        }
        if self.ran_out:
            out["ran_out_of_unique_prompts"] = True
        return out


async def closed_loop(concurrency: int, one, *, seconds: float = 0.0, requests: int = 0
                      ) -> Result:
    """``concurrency`` workers each send their next request as soon as the last one ends, for
    ``seconds`` (requests started before the end finish) or ``requests`` in all. ``one``
    returns (ttft, tokens, hit), or None when it has no prompt left."""
    result = Result()
    started = time.perf_counter()
    deadline = started + seconds
    counter = iter(range(requests or 10**9))

    async def worker():
        for i in counter:
            if seconds and time.perf_counter() >= deadline:
                return
            try:
                out = await one(i)
            except Exception as exc:  # counted and reported, never hidden
                result.errors += 1
                print(f"    request {i} failed: {exc!r}", file=sys.stderr)
                continue
            if out is None:
                result.ran_out = True
                return
            ttft, tokens, hit = out
            result.ttft.append(ttft)
            result.tokens += tokens
            result.hits += hit

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.wall = time.perf_counter() - started
    return result


def cpu_of(pids: dict[str, list[int]]) -> dict[str, float]:
    return {role: sum(process_cpu_seconds(p) for p in ps) for role, ps in pids.items()}


def cpu_costs(before: dict[str, float], after: dict[str, float], r: Result) -> dict:
    """Per role: CPU microseconds per token and milliseconds per request."""
    out = {}
    for role in before:
        cpu = after[role] - before[role]
        out[role] = {
            "cpu_s": round(cpu, 3),
            "cpu_us_per_token": round(1e6 * cpu / r.tokens, 1) if r.tokens else None,
            "cpu_ms_per_request": round(1e3 * cpu / len(r.ttft), 2) if r.ttft else None,
        }
    return out


async def measured(label: str, c: int, one, seconds: float, pids: dict[str, list[int]],
                   warmup: bool = True, metrics: str = "") -> dict:
    if warmup:
        await closed_loop(c, one, requests=2 * c)  # first-request costs are not serving costs
    before_cpu = cpu_of(pids)
    before_cache = cache_results(metrics)
    r = await closed_loop(c, one, seconds=seconds)
    out = r.summary()
    out["cpu"] = cpu_costs(before_cpu, cpu_of(pids), r)
    if metrics:
        after = cache_results(metrics)
        out["gateway_cache_results"] = {k: after[k] - before_cache.get(k, 0)
                                        for k in after if after[k] - before_cache.get(k, 0)}
    gw = out["cpu"].get("gateway", {}).get("cpu_us_per_token")
    print(f"  {label:<12} c={c:<4} {out['tokens_per_s']:>9.1f} tok/s  ttft p50 "
          f"{out['ttft_ms_p50']} ms  {out['requests']} requests"
          + (f"  gateway {gw} us/token" if gw is not None else "")
          + (f"  HITS {r.hits}" if r.hits else ""), file=sys.stderr, flush=True)
    return out


def cache_results(metrics: str) -> Counter:
    """The gateway's count of requests by what the semantic cache did for them."""
    if not metrics:
        return Counter()
    from spotmesh.metrics import read_metrics

    out: Counter = Counter()
    for name, labels, value in read_metrics(metrics):
        if name == "spotmesh_gateway_cache_requests_total":
            out[labels["result"]] += int(value)
    return out


async def run_direct(model_dir: str, prompts: list[str], levels, seconds, max_tokens,
                     engine_cfg) -> dict[int, dict]:
    from transformers import AutoTokenizer

    from services.inference.vllm_engine import VLLMEngine
    from spotmesh.sampling import Sampling

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = [tok.encode(p) for p in prompts]
    engine = VLLMEngine(engine_cfg, model_dir)
    await engine.start()
    sampling = Sampling(temperature=0.0, max_tokens=max_tokens)
    seq = iter(range(10**9))

    async def one(i: int):
        n = next(seq)
        started = time.perf_counter()
        ttft, tokens = None, 0
        async for chunk in engine.generate(f"direct-{n}", ids[n % len(ids)], sampling):
            if chunk.token_ids and ttft is None:
                ttft = time.perf_counter() - started
            tokens += len(chunk.token_ids)
        return ttft, tokens, False

    out = {}
    try:
        for c in levels:
            out[c] = await measured("direct", c, one, seconds, {"bench": [os.getpid()]})
    finally:
        await engine.shutdown()
    return out


def mesh_pids(mesh_state) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for p in mesh_state.processes:
        if p.role in ROLES:
            out.setdefault(p.role, []).append(p.pid)
    return out


async def run_mesh(label: str, mesh_state, key: str, next_prompt, levels, seconds,
                   max_tokens) -> dict[int, dict]:
    """One side through a mesh; ``next_prompt(i)`` gives request i's prompt (None: none
    left)."""
    import grpc

    from spotmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

    md = (("authorization", f"Bearer {key}"),)
    sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens)
    gateway = mesh_state.gateway()
    pids = mesh_pids(mesh_state)
    out = {}
    async with grpc.aio.insecure_channel(gateway.address) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)

        async def one(i: int):
            prompt = next_prompt(i)
            if prompt is None:
                return None
            started = time.perf_counter()
            ttft, tokens, hit = None, 0, False
            req = gateway_pb2.GenerateRequest(prompt=prompt, sampling=sampling)
            async for msg in stub.Generate(req, metadata=md, timeout=600):
                if msg.token_ids and ttft is None:
                    ttft = time.perf_counter() - started
                tokens += len(msg.token_ids)
                hit = hit or msg.cache_hit
            return ttft, tokens, hit

        for c in levels:
            out[c] = await measured(label, c, one, seconds, pids, metrics=gateway.metrics)
    return out


async def run_hits(mesh_state, key: str, seen: list[str], concurrency: int, seconds: float,
                   max_tokens: int) -> dict:
    """Prompts the miss side stored, asked again: what a hit costs and how fast it comes."""
    stream = iter(range(10**9))
    return (await run_mesh("hits", mesh_state, key,
                           lambda i: seen[next(stream) % len(seen)], [concurrency], seconds,
                           max_tokens))[concurrency]


def _mesh(state: Path, model_dir: str, name: str, a, semantic_cache: bool, log):
    from cli.supervisor import LocalMesh

    return LocalMesh(state, replicas=1, spot_replicas=0, port=0, api_keys=None,
                     model=model_dir, served_model_name=name,
                     inference_args=["--enforce-eager", "--max-num-seqs", "256",
                                     "--stream-interval", str(a.stream_interval)],
                     kv_cache_gib=int(os.environ["VLLM_CPU_KVCACHE_SPACE"]),
                     semantic_cache=semantic_cache, log=log)


def prefill_scope(mesh, mesh_state, n: int, name: str, max_tokens: int) -> None:
    """``n`` cached entries in the dev tenant's scope for these requests (random unit vectors:
    every one is searched, none can hit)."""
    from cli.bench.cache import prefill
    from spotmesh.sampling import Sampling, fingerprint

    cache = next(p for p in mesh_state.processes if p.role == "cache")
    token, _ = mesh.state_dir.cache_tokens()
    fp = fingerprint(Sampling(temperature=0.0, max_tokens=max_tokens))
    print(f"  caching {n} entries in the requests' scope...", file=sys.stderr, flush=True)
    asyncio.run(prefill(cache.address, token, n, name, fp, 384, tenant="dev"))


def main(a) -> int:
    from cli.tinymodel import ensure_default_model
    from services.inference.config import EngineConfig
    from spotmesh.home import DEFAULT_MODEL_NAME

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # The same vLLM process layout on both sides (see cli.supervisor.LocalMesh._env).
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        levels = [int(x) for x in a.concurrency.split(",") if x.strip()]
    except ValueError:
        print("--concurrency takes a comma-separated list of integers", file=sys.stderr)
        return 2
    if not levels or min(levels) < 1:
        print("--concurrency levels must be >= 1", file=sys.stderr)
        return 2
    if a.seconds <= 0:
        print("--seconds must be > 0", file=sys.stderr)
        return 2
    sides = set(a.sides.split(","))
    if not sides or sides - {"direct", "mesh", "cached_miss"}:
        print("--sides takes a comma-separated subset of direct,mesh,cached_miss",
              file=sys.stderr)
        return 2

    prompts = distinct(load_prompts(a.prompts))
    model_dir = a.model or str(ensure_default_model())
    name = DEFAULT_MODEL_NAME if not a.model else Path(a.model).name
    # The same engine configuration on every side.
    engine_cfg = EngineConfig(served_model_name=name, enforce_eager=True, max_num_seqs=256,
                              stream_interval=a.stream_interval)
    print(f"bench serve: {len(prompts)} distinct prompts, levels {levels}, {a.seconds:g} s "
          f"each, max_tokens {a.max_tokens}, sides {sorted(sides)}", file=sys.stderr,
          flush=True)

    def log(m):
        print(m, file=sys.stderr, flush=True)

    direct = mesh = cached = hits = None
    if "direct" in sides:
        log("engine-direct (in process):")
        direct = asyncio.run(run_direct(model_dir, prompts, levels, a.seconds, a.max_tokens,
                                        engine_cfg))
    if "mesh" in sides:
        log("relay only (gateway + 1 replica process, loopback gRPC, cache tier off):")
        with tempfile.TemporaryDirectory(prefix="spotmesh-bench-") as state:
            m = _mesh(Path(state), model_dir, name, a, False, log)
            try:
                st = m.start()
                mesh = asyncio.run(run_mesh("mesh", st, m.dev_key,
                                            lambda i: prompts[i % len(prompts)], levels,
                                            a.seconds, a.max_tokens))
            finally:
                m.stop()
    unique = Unique(prompts)
    if "cached_miss" in sides:
        log(f"default mesh on misses only (cache tier on, {a.prefill} entries cached, every "
            "prompt sent once):")
        with tempfile.TemporaryDirectory(prefix="spotmesh-bench-") as state:
            m = _mesh(Path(state), model_dir, name, a, True, log)
            try:
                st = m.start()
                if a.prefill:
                    prefill_scope(m, st, a.prefill, name, a.max_tokens)
                cached = asyncio.run(run_mesh("cached_miss", st, m.dev_key,
                                              lambda i: unique.next(), levels, a.seconds,
                                              a.max_tokens))
                seen = prompts[:unique.used]
                if a.hit_seconds > 0 and seen:
                    log("hits (prompts the miss side stored, asked again):")
                    time.sleep(1.0)  # stores land off the hot path
                    hits = asyncio.run(run_hits(st, m.dev_key, seen, max(levels), a.hit_seconds,
                                                a.max_tokens))
            finally:
                m.stop()

    runs = []
    for c in levels:
        run: dict = {"concurrency": c}
        d = direct[c] if direct else None
        r = mesh[c] if mesh else None
        x = cached[c] if cached else None
        if r is not None:
            run["mesh"] = r
        if d is not None:
            run["direct"] = d
        if r and d:
            run["tokens_per_s_ratio"] = ratio(r["tokens_per_s"], d["tokens_per_s"])
            run["ttft_ms_p50_added"] = round(r["ttft_ms_p50"] - d["ttft_ms_p50"], 2)
        if x is not None:
            run["cached_miss"] = x
            if r:
                run["cached_miss_vs_mesh_ratio"] = ratio(x["tokens_per_s"], r["tokens_per_s"])
                run["cached_miss_ttft_ms_p50_added"] = round(x["ttft_ms_p50"]
                                                             - r["ttft_ms_p50"], 2)
            if d:
                run["cached_miss_vs_direct_ratio"] = ratio(x["tokens_per_s"], d["tokens_per_s"])
        runs.append(run)
    doc = {
        "benchmark": "serve",
        "command": "spotmesh bench serve " + " ".join(sys.argv[3:] if sys.argv[1:3] ==
                                                      ["bench", "serve"] else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "model": name,
        "max_tokens": a.max_tokens,
        "stream_interval": a.stream_interval,
        "seconds_per_level": a.seconds,
        "prefilled_entries": a.prefill if cached else None,
        "distinct_prompts": len(prompts),
        "unique_prompts_used": unique.used if cached else None,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "runs": runs,
        "hits": hits,
    }
    print_table(runs, hits)
    if a.json:
        write_json(a.json, doc)
        print(f"\nwrote {a.json}")
    errors = sum(side["errors"] for r in runs for k, side in r.items()
                 if isinstance(side, dict) and "errors" in side)
    flattered = sum(r["cached_miss"]["cache_hits"] for r in runs if "cached_miss" in r)
    if flattered:
        print(f"\n{flattered} requests on the miss side were cache hits (near-duplicate "
              "prompts in the data): its figures are not misses only", file=sys.stderr)
    return 1 if errors or flattered else 0


def ratio(x: float, y: float) -> float | None:
    return round(x / y, 3) if y else None


def _cell(side: dict | None, key: str, fmt: str = "{:.1f}") -> str:
    if not side or side.get(key) is None:
        return "-"
    return fmt.format(side[key])


def _cpu(side: dict | None, role: str) -> str:
    if not side:
        return "-"
    v = side["cpu"].get(role, {}).get("cpu_us_per_token")
    return "-" if v is None else f"{v:.0f}"


def _tier_ms(side: dict | None) -> str:
    if not side:
        return "-"
    ms = [side["cpu"].get(r, {}).get("cpu_ms_per_request") for r in ("embedder", "cache")]
    return "-" if None in ms else f"{ms[0]:.2f}+{ms[1]:.2f}"


def print_table(runs: list[dict], hits: dict | None) -> None:
    print()
    print(f"{'conc':>5} | {'tok/s direct':>12} {'mesh':>7} {'miss':>7} | "
          f"{'mesh/dir':>8} {'miss/mesh':>9} | {'ttft p50 ms dir/mesh/miss':>26} | "
          f"{'gw us/tok mesh/miss':>19} | {'emb+cache ms/miss':>17}")
    for r in runs:
        d, m, x = r.get("direct"), r.get("mesh"), r.get("cached_miss")
        ttft = "/".join(_cell(s, "ttft_ms_p50") for s in (d, m, x))
        print(f"{r['concurrency']:>5} | {_cell(d, 'tokens_per_s'):>12} "
              f"{_cell(m, 'tokens_per_s'):>7} {_cell(x, 'tokens_per_s'):>7} | "
              f"{_cell(r, 'tokens_per_s_ratio', '{:.3f}'):>8} "
              f"{_cell(r, 'cached_miss_vs_mesh_ratio', '{:.3f}'):>9} | {ttft:>26} | "
              f"{_cpu(m, 'gateway') + '/' + _cpu(x, 'gateway'):>19} | {_tier_ms(x):>17}")
    if hits:
        print(f"\nhits (replayed, c={max(r['concurrency'] for r in runs)}): "
              f"{hits['cache_hits']}/{hits['requests']} hit, {hits['tokens_per_s']:.1f} tok/s, "
              f"ttft p50 {hits['ttft_ms_p50']} ms p99 {hits['ttft_ms_p99']} ms")


def add_parser(bench: argparse._SubParsersAction) -> None:
    bs = bench.add_parser("serve", help="engine-direct vs relay-only mesh vs default mesh on "
                                        "misses; hits apart")
    bs.add_argument("--concurrency", default="1,8,32")
    bs.add_argument("--seconds", type=float, default=20.0,
                    help="measured seconds per level and side, after its own warm-up")
    bs.add_argument("--sides", default="direct,mesh,cached_miss",
                    help="which sides to run (comma-separated)")
    bs.add_argument("--prefill", type=int, default=10_000,
                    help="entries cached in the requests' scope before the miss side runs")
    bs.add_argument("--hit-seconds", type=float, default=10.0,
                    help="seconds of replayed (hit) traffic after the miss side; 0: none")
    bs.add_argument("--max-tokens", type=int, default=64)
    bs.add_argument("--stream-interval", type=int, default=1,
                    help="vLLM stream_interval on every side (tokens per streamed chunk)")
    bs.add_argument("--prompts", default="",
                    help="JSONL of prompts (default: ../shared/data/prefix_cache/"
                         "awesome_chatgpt_system_prompts.jsonl when present)")
    bs.add_argument("--json", default="", help="write the results here")
    bs.add_argument("--model", default="")
    bs.set_defaults(fn=main)
