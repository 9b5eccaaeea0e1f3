"""Measure the semantic cache where it matters for a request: a filtered top-1 lookup, and a
store, at 1k / 10k / 100k entries, on embedded milvus-lite and on a real Milvus 2.3.5 server.

    python -m cli.measure.cache --sizes 1000,10000 --json out.json

Entries are random unit vectors (384-d, like all-MiniLM-L6-v2) spread over a handful of
tenants; every lookup filters on tenant, model, fingerprint and expiry, as the service does.
Half of the lookups are near-duplicates of a stored vector (hits, which also fetch the whole
answer), half random (misses). Stores go through :meth:`SemanticCache.store` one at a time,
with the service's flush policy, so their tail includes flushes. The cache is pre-filled with
one batched insert per 1000 entries, flushed, and left to settle before timing: on the server
until the index covers every row, on milvus-lite until its background compaction is done (while
it runs, lookups at 100k stall for up to seconds; these numbers are the steady state).

The server runs in its own network namespace (``cli.netns_milvus``); its
measurement runs inside that namespace (``nsenter``) against ``http://127.0.0.1:19530``, so
the numbers hold no forwarding hop. Progress goes to stderr; a table and JSON to stdout.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cli import write_json
from cli.stats import percentile
from services.cache.answers import Answer
from services.cache.options import CacheOptions
from services.cache.semantic import SemanticCache

DIM = 384
MODEL = "spotmesh-tiny"
FINGERPRINT = "0123456789abcdef0123456789abcdef"
PREFILL_BATCH = 1000
INDEX_WAIT_SECONDS = 600.0
SETTLE_SECONDS = 5.0  # milvus-lite: no data file rewritten for this long


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _percentiles(samples: list[float]) -> dict:
    return {"p50_ms": round(1000 * percentile(samples, 0.5), 3),
            "p99_ms": round(1000 * percentile(samples, 0.99), 3),
            "max_ms": round(1000 * max(samples), 3), "n": len(samples)}


def _answer(i: int) -> Answer:
    return Answer(prompt=f"prompt {i}: " + "lorem ipsum " * 20,
                  text=f"answer {i}: " + "dolor sit amet " * 40,
                  token_ids=tuple(range(i % 50, i % 50 + 120)), finish_reason=1,
                  prompt_tokens=60, completion_tokens=120, cost_usd=1e-4, replica_seconds=0.5)


def _wait_settled(cache: SemanticCache, total: int) -> float:
    """Seconds until the store is in its steady state: on a server, until the index covers
    every row; on milvus-lite, until background compaction stopped rewriting data files
    (while it runs it holds a lock that stalls searches for seconds at 100k rows)."""
    started = time.perf_counter()
    uri = cache.options.uri
    if uri.endswith(".db"):
        previous, stable_since = None, time.perf_counter()
        while time.perf_counter() - started < INDEX_WAIT_SECONDS:
            files = sorted(str(p) for p in Path(uri).rglob("*.parquet"))
            if files != previous:
                previous, stable_since = files, time.perf_counter()
            elif time.perf_counter() - stable_since >= SETTLE_SECONDS:
                break
            time.sleep(0.5)
        return time.perf_counter() - started - SETTLE_SECONDS
    while time.perf_counter() - started < INDEX_WAIT_SECONDS:
        info = cache.index_progress()
        if info is None or info[0] >= total:
            break
        time.sleep(1.0)
    return time.perf_counter() - started


def measure_one(uri: str, size: int, *, tenants: int, lookups: int, stores: int,
                seed: int, label: str) -> dict:
    rng = np.random.default_rng(seed)
    collection = f"measure_{size}_{int(time.time())}"
    cache = SemanticCache(CacheOptions(uri=uri, collection=collection, dim=DIM,
                                       timeout_seconds=120.0))
    try:
        names = [f"tenant-{t}" for t in range(tenants)]
        vectors = _unit(rng, size)
        started = time.perf_counter()
        for lo in range(0, size, PREFILL_BATCH):
            hi = min(size, lo + PREFILL_BATCH)
            cache.store_batch([(names[i % tenants], MODEL, FINGERPRINT, vectors[i].tolist(),
                                _answer(i), 86400.0) for i in range(lo, hi)])
            if hi % 10000 == 0 or hi == size:
                _progress(f"  {label} {size}: prefilled {hi}")
        prefill_s = time.perf_counter() - started
        started = time.perf_counter()
        cache.flush()
        flush_s = time.perf_counter() - started
        settle_s = _wait_settled(cache, size)
        _progress(f"  {label} {size}: prefill {prefill_s:.1f}s, flush {flush_s:.1f}s, "
                  f"settled (index/compaction) after {settle_s:.1f}s; timing lookups")
        for i in range(min(20, lookups)):  # warm caches and connections
            cache.lookup(names[0], MODEL, FINGERPRINT, vectors[i].tolist(), 0.9)
        lookup_times, hits = [], 0
        for i in range(lookups):
            if i % 2 == 0:
                j = int(rng.integers(size))
                q = vectors[j] + 0.01 * _unit(rng, 1)[0]
                tenant = names[j % tenants]
            else:
                q = _unit(rng, 1)[0]
                tenant = names[i % tenants]
            q = (q / np.linalg.norm(q)).tolist()
            t0 = time.perf_counter()
            hit = cache.lookup(tenant, MODEL, FINGERPRINT, q, 0.9)
            lookup_times.append(time.perf_counter() - t0)
            hits += hit is not None
        _progress(f"  {label} {size}: timing stores")
        store_times = []
        extra = _unit(rng, stores)
        for i in range(stores):
            t0 = time.perf_counter()
            cache.store(names[i % tenants], MODEL, FINGERPRINT, extra[i].tolist(),
                        _answer(size + i), 86400.0)
            store_times.append(time.perf_counter() - t0)
        return {"backend": label, "entries": size, "tenants": tenants,
                "lookup": _percentiles(lookup_times), "lookup_hits": hits,
                "store": _percentiles(store_times),
                "prefill_seconds": round(prefill_s, 2), "flush_seconds": round(flush_s, 2),
                "settle_seconds": round(settle_s, 2)}
    finally:
        try:
            cache.drop_collection()
        finally:
            cache.close()


def _run_lite(sizes: list[int], a: argparse.Namespace) -> list[dict]:
    out = []
    for size in sizes:
        with tempfile.TemporaryDirectory(prefix="spotmesh-measure-") as d:
            _progress(f"milvus-lite, {size} entries")
            out.append(measure_one(str(Path(d) / "cache.db"), size, tenants=a.tenants,
                                   lookups=a.lookups, stores=a.stores, seed=a.seed,
                                   label="milvus-lite 3.2.2"))
    return out


def _run_server(sizes: list[int], a: argparse.Namespace) -> list[dict]:
    from cli.netns_milvus import NetnsMilvus

    out = []
    with tempfile.TemporaryDirectory(prefix="spotmesh-measure-milvus-") as d:
        _progress("starting Milvus 2.3.5 in its own network namespace")
        with NetnsMilvus(Path(d)) as server:
            for size in sizes:
                _progress(f"Milvus 2.3.5 server, {size} entries")
                cmd = [*server.nsenter_prefix(), sys.executable, "-m", "cli.measure.cache",
                       "--inside", f"http://127.0.0.1:{server.port}", "--sizes", str(size),
                       "--tenants", str(a.tenants), "--lookups", str(a.lookups),
                       "--stores", str(a.stores), "--seed", str(a.seed)]
                done = subprocess.run(cmd, stdout=subprocess.PIPE, check=True,
                                      cwd=Path(__file__).resolve().parents[2])
                out.extend(json.loads(done.stdout))
    return out


def table(results: list[dict]) -> str:
    head = (f"{'backend':<20} {'entries':>8} {'lookup p50':>11} {'lookup p99':>11} "
            f"{'store p50':>10} {'store p99':>10} {'store max':>10}")
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r['backend']:<20} {r['entries']:>8} {r['lookup']['p50_ms']:>8.2f} ms "
                     f"{r['lookup']['p99_ms']:>8.2f} ms {r['store']['p50_ms']:>7.2f} ms "
                     f"{r['store']['p99_ms']:>7.2f} ms {r['store']['max_ms']:>7.1f} ms")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cli.measure.cache", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1000,10000,100000")
    p.add_argument("--backends", default="lite,server", help="comma list of lite, server")
    p.add_argument("--tenants", type=int, default=5)
    p.add_argument("--lookups", type=int, default=400)
    p.add_argument("--stores", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="also write the results here")
    p.add_argument("--inside", default="", help=argparse.SUPPRESS)  # a server URI, from nsenter
    a = p.parse_args(argv)
    sizes = [int(s) for s in a.sizes.split(",") if s]
    if a.inside:
        # The server half, inside the namespace: JSON only, for the parent to merge.
        print(json.dumps([measure_one(a.inside, size, tenants=a.tenants, lookups=a.lookups,
                                      stores=a.stores, seed=a.seed, label="Milvus 2.3.5 server")
                          for size in sizes]))
        return 0
    backends = [b for b in a.backends.split(",") if b]
    results: list[dict] = []
    if "lite" in backends:
        results += _run_lite(sizes, a)
    if "server" in backends:
        results += _run_server(sizes, a)
    doc = {"benchmark": "semantic-cache-latency", "dim": DIM, "filter":
           "tenant == .. and model == .. and fingerprint == .. and expires_at > now",
           "index": "HNSW M=16 efConstruction=200, ef=64, COSINE",
           "machine": {"cpus": _cpus(), "python": platform.python_version(),
                       "platform": platform.platform()},
           "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "results": results}
    print(table(results))
    print(json.dumps(doc, indent=2))
    if a.json:
        write_json(a.json, doc)
    return 0


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    sys.exit(main())
