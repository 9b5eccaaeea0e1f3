"""``spotmesh bench cache``: the semantic cache measured through a real mesh on labelled data.

Banking77 queries (people's banking questions labelled with one of 77 intents) go through the
gateway as users send them. First one query per intent (a miss: generated, then stored); then
the other queries in random order, including every query of intents held out of that first
round (out-of-scope: nothing cached can answer them until one of them is stored). A hit is
correct when the cached answer came from a query of the same intent. The cache is pre-filled
with ``--prefill`` unrelated entries (random unit vectors) so lookups search a realistic index.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shlex
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from cli import write_json
from cli.datasets import BANKING77, default_file
from cli.stats import latency_ms
from spotmesh.home import DEFAULT_MODEL_NAME


def _metric(metrics_address: str, name: str) -> float:
    text = urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


async def prefill(cache_address: str, token: str, n: int, model: str, fp: str, dim: int,
                  tenant: str = "bench"):
    """``n`` entries of random unit vectors in one scope: they cost a lookup what real entries
    cost (every one is scanned) and, at cosine ~0 to any real prompt, never hit."""
    import grpc

    from spotmesh.v1 import cache_pb2, cache_pb2_grpc, common_pb2

    rng = np.random.default_rng(0)
    md = (("authorization", f"Bearer {token}"),)
    done = 0
    async with grpc.aio.insecure_channel(cache_address) as ch:
        stub = cache_pb2_grpc.SemanticCacheStub(ch)
        queue = iter(range(n))

        async def worker():
            nonlocal done
            for i in queue:
                v = rng.standard_normal(dim).astype(np.float32)
                v /= np.linalg.norm(v)
                await stub.Store(cache_pb2.StoreRequest(
                    tenant=tenant, model=model, sampling_fingerprint=fp, vector=v.tolist(),
                    prompt=f"prefill entry {i}", text=f"prefill answer {i}", token_ids=[1, 2],
                    ttl_seconds=3600, finish_reason=common_pb2.FINISH_REASON_STOP),
                    metadata=md, timeout=30)
                done += 1
                if done % 1000 == 0:
                    print(f"  prefilled {done}/{n}", file=sys.stderr, flush=True)

        await asyncio.gather(*(worker() for _ in range(8)))


async def _entries(cache_address: str, token: str) -> int:
    import grpc

    from spotmesh.v1 import cache_pb2, cache_pb2_grpc

    async with grpc.aio.insecure_channel(cache_address) as ch:
        resp = await cache_pb2_grpc.SemanticCacheStub(ch).Stats(
            cache_pb2.StatsRequest(tenant="bench"),
            metadata=(("authorization", f"Bearer {token}"),), timeout=10)
    return resp.entries


async def _ask(stub, key: str, text: str, max_tokens: int):
    from spotmesh.v1 import common_pb2, gateway_pb2

    req = gateway_pb2.GenerateRequest(prompt=text, sampling=common_pb2.SamplingParams(
        temperature=0.0, max_tokens=max_tokens))
    started = time.perf_counter()
    parts, hit = [], False
    async for msg in stub.Generate(req, metadata=(("authorization", f"Bearer {key}"),),
                                   timeout=120):
        parts.append(msg.text)
        hit = hit or msg.cache_hit
    return time.perf_counter() - started, hit, "".join(parts)


async def _run(a, mesh_state, key: str, cache_token: str, seeds, rest, dim: int) -> dict:
    import grpc

    from spotmesh.sampling import Sampling, fingerprint
    from spotmesh.v1 import gateway_pb2_grpc

    cache = next(p for p in mesh_state.processes if p.role == "cache")
    gateway = mesh_state.gateway()
    fp = fingerprint(Sampling(temperature=0.0, max_tokens=a.max_tokens))
    if a.prefill:
        print(f"prefilling the cache with {a.prefill} entries...", file=sys.stderr, flush=True)
        await prefill(cache.address, cache_token, a.prefill, DEFAULT_MODEL_NAME, fp, dim)
    answers: dict[str, set[str]] = {}  # answer text -> intents of the queries that made it
    saved_before = _metric(gateway.metrics, "spotmesh_semantic_cache_saved_usd_total")
    seconds_before = _metric(gateway.metrics,
                             "spotmesh_semantic_cache_saved_replica_seconds_total")
    async with grpc.aio.insecure_channel(gateway.address) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        print(f"seeding {len(seeds)} intents (one query each)...", file=sys.stderr, flush=True)
        seed_hits = 0
        for text, intent in seeds:
            _, hit, answer = await _ask(stub, key, text, a.max_tokens)
            seed_hits += hit
            answers.setdefault(answer, set()).add(intent)
        want = a.prefill + len(seeds) - seed_hits
        for _ in range(300):
            if await _entries(cache.address, cache_token) >= want:
                break
            await asyncio.sleep(0.1)
        print(f"asking {len(rest)} more queries...", file=sys.stderr, flush=True)
        hit_lat, miss_lat = [], []
        hits = correct = ambiguous = 0
        for i, (text, intent) in enumerate(rest):
            latency, hit, answer = await _ask(stub, key, text, a.max_tokens)
            if hit:
                hits += 1
                hit_lat.append(latency)
                owners = answers.get(answer, set())
                correct += intent in owners
                ambiguous += len(owners) > 1
            else:
                miss_lat.append(latency)
                answers.setdefault(answer, set()).add(intent)
            if (i + 1) % 100 == 0:
                print(f"  {i + 1}/{len(rest)}: hit rate {hits / (i + 1):.3f}, precision "
                      f"{correct / max(1, hits):.3f}", file=sys.stderr, flush=True)
    saved = _metric(gateway.metrics, "spotmesh_semantic_cache_saved_usd_total") - saved_before
    saved_s = _metric(gateway.metrics,
                      "spotmesh_semantic_cache_saved_replica_seconds_total") - seconds_before
    n = len(rest)
    return {
        "queries": n,
        "hits": hits,
        "hit_rate": round(hits / n, 4),
        "precision": round(correct / hits, 4) if hits else None,
        "false_hit_rate": round((hits - correct) / n, 4),
        "ambiguous_hits": ambiguous,
        "hit_latency_ms": latency_ms(hit_lat),
        "miss_latency_ms": latency_ms(miss_lat),
        "saved_usd": round(saved, 8),
        "saved_replica_seconds": round(saved_s, 4),
    }


def main(a) -> int:
    from cli.supervisor import LocalMesh
    from cli.tinymodel import ensure_default_model
    from services.gateway.auth import DEFAULT_CACHE_THRESHOLD

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = a.intents or default_file(BANKING77, "data", "--intents")
    from cli.calibrate import load_intents

    texts, intents = load_intents(path, a.split, seed=a.seed)
    names = sorted(set(intents))
    rng = random.Random(a.seed)
    held_out = set(rng.sample(names, min(a.oos_intents, len(names) - 1)))
    seeds, rest, seeded = [], [], set()
    for text, intent in zip(texts, intents, strict=True):
        if intent not in held_out and intent not in seeded:
            seeds.append((text, intent))
            seeded.add(intent)
        else:
            rest.append((text, intent))
    rest = rest[:a.queries] if a.queries else rest
    threshold = a.threshold if a.threshold else DEFAULT_CACHE_THRESHOLD

    with tempfile.TemporaryDirectory(prefix="spotmesh-bench-cache-") as state:
        server = None
        if a.milvus_server:
            from cli.netns_milvus import NetnsMilvus

            print("starting a Milvus 2.3.5 server in its own network namespace...",
                  file=sys.stderr, flush=True)
            server = NetnsMilvus(Path(state) / "milvus").start()
        keys = Path(state) / "bench-keys.toml"
        key = "sk-bench-" + os.urandom(8).hex()
        keys.write_text(f'[[keys]]\ntenant = "bench"\nkey = "{key}"\n\n[tenants.bench]\n'
                        f"cache_threshold = {threshold}\ncache_truncated = true\n")
        mesh = LocalMesh(Path(state) / "mesh", replicas=1, spot_replicas=0, port=0,
                         api_keys=str(keys), model=str(ensure_default_model()),
                         served_model_name=DEFAULT_MODEL_NAME, inference_args=["--enforce-eager"],
                         kv_cache_gib=1, cache_milvus_uri=server.uri if server else "",
                         cache_args=(["--lookup-consistency", a.lookup_consistency]
                                     if a.lookup_consistency else [])
                         + shlex.split(a.cache_args),
                         log=lambda m: print(m, file=sys.stderr, flush=True))
        try:
            mesh_state = mesh.start()
            token = mesh.state_dir.cache_tokens()[0]
            result = asyncio.run(_run(a, mesh_state, key, token, seeds, rest, a.dim))
        finally:
            mesh.stop()
            if server is not None:
                server.stop()
    backend = "Milvus 2.3.5 server" if a.milvus_server else "milvus-lite 3.2.2"
    consistency = a.lookup_consistency or ("Bounded" if a.milvus_server else "Session")
    doc = {"benchmark": "cache", "backend": backend, "lookup_consistency": consistency,
           "cache_args": a.cache_args,
           "data": path, "threshold": threshold,
           "prefill": a.prefill,
           "seeds": len(seeds), "held_out_intents": sorted(held_out), **result}
    print(f"\n{backend}: threshold {threshold}, {a.prefill} prefilled entries, {len(seeds)} seeds, "
          f"{result['queries']} queries")
    print(f"hit rate {result['hit_rate']:.4f}  precision {result['precision']}  "
          f"false-hit rate {result['false_hit_rate']:.4f}")
    print(f"hit latency ms  p50 {result['hit_latency_ms']['p50']}  "
          f"p99 {result['hit_latency_ms']['p99']}")
    print(f"miss latency ms p50 {result['miss_latency_ms']['p50']}  "
          f"p99 {result['miss_latency_ms']['p99']}")
    print(f"saved ${result['saved_usd']:.8f} ({result['saved_replica_seconds']} replica-seconds)")
    if a.json:
        write_json(a.json, doc)
        print(f"wrote {a.json}")
    return 0


def add_parser(bench: argparse._SubParsersAction) -> None:
    bc = bench.add_parser("cache", help="semantic-cache hit rate, precision and latency on "
                                        "labelled queries, through a mesh")
    bc.add_argument("--intents", default="",
                    help="Banking77-style CSV split,intent,text (default: ../shared/data/"
                         "semantic_cache/banking77_intents.csv)")
    bc.add_argument("--split", default="test")
    bc.add_argument("--queries", type=int, default=1000, help="queries after the seeds")
    bc.add_argument("--prefill", type=int, default=10000, help="unrelated entries cached first")
    bc.add_argument("--threshold", type=float, default=0.0,
                    help="the tenant's similarity threshold (default: spotmesh's)")
    bc.add_argument("--oos-intents", type=int, default=10,
                    help="intents held out of the seeds (out-of-scope questions)")
    bc.add_argument("--max-tokens", type=int, default=24)
    bc.add_argument("--dim", type=int, default=384, help="embedding dimension")
    bc.add_argument("--seed", type=int, default=0)
    bc.add_argument("--milvus-server", action="store_true",
                    help="back the cache with a real Milvus 2.3.5 server (the `milvus` "
                         "package, in its own network namespace) instead of milvus-lite")
    bc.add_argument("--lookup-consistency", default="",
                    choices=["", "Session", "Bounded", "Eventually", "Strong"],
                    help="the cache's lookup consistency on a Milvus server (default: what "
                         "spotmesh up uses, Bounded)")
    bc.add_argument("--cache-args", default="",
                    help="more flags for the cache process, e.g. '--flush-every 32'")
    bc.add_argument("--json", default="")
    bc.set_defaults(fn=main)
