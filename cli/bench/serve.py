"""``spotmesh bench serve``: what the mesh costs on top of the engine.

The same requests run twice in one invocation, one side after the other so they never share
the CPU: directly against a vLLM engine in this process (the baseline: token ids in, deltas
out, no network), then through a real mesh (gateway + one replica process, the same engine
configuration) over loopback gRPC, as a user's stub would call it. Prompts are real system
prompts from ``../shared/data`` (or any JSONL with a "prompt" field); greedy decoding with the
tiny model always runs to ``max_tokens``, so both sides produce the same number of tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from cli import write_json
from cli.bench.procstat import process_cpu_seconds
from cli.datasets import SYSTEM_PROMPTS, default_file, read_system_prompts
from cli.stats import latency_ms


def load_prompts(path: str, limit: int) -> list[str]:
    """The first ``limit`` real system prompts (default: the shared data's), cut to 1,500
    characters: the tiny model's context is 2,048 tokens; this keeps prompts well inside it."""
    path = path or default_file(SYSTEM_PROMPTS, "prompts", "--prompts")
    return [p[:1500] for p in read_system_prompts(path)[:limit]]


@dataclass
class Result:
    ttft: list[float] = field(default_factory=list)
    tokens: int = 0
    wall: float = 0.0
    errors: int = 0

    def summary(self) -> dict:
        ttft = latency_ms(self.ttft)
        return {
            "requests": len(self.ttft),
            "errors": self.errors,
            "tokens": self.tokens,
            "wall_s": round(self.wall, 3),
            "tokens_per_s": round(self.tokens / self.wall, 2) if self.wall else 0.0,
            "ttft_ms_p50": ttft["p50"],
            "ttft_ms_p99": ttft["p99"],
        }


async def closed_loop(n_requests: int, concurrency: int, one) -> Result:
    """``concurrency`` workers each send their next request as soon as the last one ends."""
    result = Result()
    counter = iter(range(n_requests))

    async def worker():
        for i in counter:
            try:
                ttft, tokens = await one(i)
                result.ttft.append(ttft)
                result.tokens += tokens
            except Exception as exc:  # counted and reported, never hidden
                result.errors += 1
                print(f"    request {i} failed: {exc!r}", file=sys.stderr)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.wall = time.perf_counter() - started
    return result


async def run_direct(model_dir: str, name: str, prompts: list[str], levels, n_for, max_tokens,
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
        started = time.perf_counter()
        ttft, tokens = None, 0
        async for chunk in engine.generate(f"direct-{next(seq)}", ids[i % len(ids)], sampling):
            if chunk.token_ids and ttft is None:
                ttft = time.perf_counter() - started
            tokens += len(chunk.token_ids)
        return ttft, tokens

    out = {}
    try:
        await closed_loop(4, 4, one)  # warm-up: first-request costs are not serving costs
        for c in levels:
            r = await closed_loop(n_for(c), c, one)
            out[c] = r.summary()
            print(f"  direct  c={c:<4} {out[c]['tokens_per_s']:>9.1f} tok/s  "
                  f"ttft p50 {out[c]['ttft_ms_p50']} ms", file=sys.stderr, flush=True)
    finally:
        await engine.shutdown()
    return out


async def run_mesh(address: str, key: str, prompts, levels, n_for, max_tokens,
                   gateway_pid: int | None = None) -> dict[int, dict]:
    import grpc

    from spotmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

    md = (("authorization", f"Bearer {key}"),)
    sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens)
    out = {}
    async with grpc.aio.insecure_channel(address) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)

        async def one(i: int):
            started = time.perf_counter()
            ttft, tokens = None, 0
            req = gateway_pb2.GenerateRequest(prompt=prompts[i % len(prompts)],
                                              sampling=sampling)
            async for msg in stub.Generate(req, metadata=md, timeout=600):
                if msg.token_ids and ttft is None:
                    ttft = time.perf_counter() - started
                tokens += len(msg.token_ids)
            return ttft, tokens

        await closed_loop(4, 4, one)
        for c in levels:
            cpu_before = process_cpu_seconds(gateway_pid) if gateway_pid else 0.0
            r = await closed_loop(n_for(c), c, one)
            out[c] = r.summary()
            if gateway_pid and r.tokens:
                cpu = process_cpu_seconds(gateway_pid) - cpu_before
                out[c]["gateway_cpu_us_per_token"] = round(1e6 * cpu / r.tokens, 1)
            print(f"  mesh    c={c:<4} {out[c]['tokens_per_s']:>9.1f} tok/s  "
                  f"ttft p50 {out[c]['ttft_ms_p50']} ms", file=sys.stderr, flush=True)
    return out


def main(a) -> int:
    from cli.supervisor import LocalMesh
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

    def n_for(c: int) -> int:
        return a.requests or max(16, 4 * c)

    prompts = load_prompts(a.prompts, 256)
    model_dir = a.model or str(ensure_default_model())
    name = DEFAULT_MODEL_NAME if not a.model else Path(a.model).name
    # The same engine configuration on both sides.
    engine_cfg = EngineConfig(served_model_name=name, enforce_eager=True, max_num_seqs=256,
                              stream_interval=a.stream_interval)
    print(f"bench serve: {len(prompts)} prompts, levels {levels}, max_tokens {a.max_tokens}",
          file=sys.stderr, flush=True)
    print("engine-direct (in process):", file=sys.stderr, flush=True)
    direct = asyncio.run(run_direct(model_dir, name, prompts, levels, n_for, a.max_tokens,
                                    engine_cfg))

    print("through the mesh (gateway + 1 replica process, loopback gRPC):", file=sys.stderr,
          flush=True)
    with tempfile.TemporaryDirectory(prefix="spotmesh-bench-") as state:
        mesh = LocalMesh(Path(state), replicas=1, spot_replicas=0, port=0, api_keys=None,
                         model=model_dir, served_model_name=name,
                         inference_args=["--enforce-eager", "--max-num-seqs", "256",
                                         "--stream-interval", str(a.stream_interval)],
                         kv_cache_gib=int(os.environ["VLLM_CPU_KVCACHE_SPACE"]),
                         log=lambda m: print(m, file=sys.stderr, flush=True))
        try:
            mesh_state = mesh.start()
            through = asyncio.run(run_mesh(mesh_state.gateway().address, mesh.dev_key,
                                           prompts, levels, n_for, a.max_tokens,
                                           mesh_state.gateway().pid))
        finally:
            mesh.stop()

    runs = []
    for c in levels:
        d, m = direct[c], through[c]
        runs.append({
            "concurrency": c,
            "mesh": m,
            "direct": d,
            "tokens_per_s_ratio": round(m["tokens_per_s"] / d["tokens_per_s"], 3)
            if d["tokens_per_s"] else None,
            "ttft_ms_p50_added": round(m["ttft_ms_p50"] - d["ttft_ms_p50"], 2),
        })
    doc = {
        "benchmark": "serve",
        "model": name,
        "max_tokens": a.max_tokens,
        "stream_interval": a.stream_interval,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "runs": runs,
    }
    print()
    print(f"{'conc':>5} | {'mesh tok/s':>10} {'direct tok/s':>12} {'ratio':>6} | "
          f"{'mesh ttft p50/p99 ms':>21} {'direct ttft p50/p99 ms':>23} {'added p50':>9}")
    for r in runs:
        m, d = r["mesh"], r["direct"]
        print(f"{r['concurrency']:>5} | {m['tokens_per_s']:>10.1f} {d['tokens_per_s']:>12.1f} "
              f"{r['tokens_per_s_ratio']:>6.3f} | "
              f"{m['ttft_ms_p50']:>10.1f}/{m['ttft_ms_p99']:<10.1f} "
              f"{d['ttft_ms_p50']:>11.1f}/{d['ttft_ms_p99']:<11.1f} "
              f"{r['ttft_ms_p50_added']:>9.1f}")
    if a.json:
        write_json(a.json, doc)
        print(f"\nwrote {a.json}")
    errors = sum(r["mesh"]["errors"] + r["direct"]["errors"] for r in runs)
    return 1 if errors else 0


def add_parser(bench: argparse._SubParsersAction) -> None:
    bs = bench.add_parser("serve", help="through-mesh vs engine-direct tokens/s and TTFT")
    bs.add_argument("--concurrency", default="1,8,32")
    bs.add_argument("--requests", type=int, default=0,
                    help="requests per concurrency level (default 4x concurrency, >= 16)")
    bs.add_argument("--max-tokens", type=int, default=64)
    bs.add_argument("--stream-interval", type=int, default=1,
                    help="vLLM stream_interval on both sides (tokens per streamed chunk)")
    bs.add_argument("--prompts", default="",
                    help="JSONL of prompts (default: ../shared/data/prefix_cache/"
                         "awesome_chatgpt_system_prompts.jsonl when present)")
    bs.add_argument("--json", default="", help="write the results here")
    bs.add_argument("--model", default="")
    bs.set_defaults(fn=main)
