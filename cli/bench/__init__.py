"""spotmesh benchmarks (``spotmesh bench ...``): each prints a table, writes JSON, and measures
its baseline in the same run."""

from __future__ import annotations

import argparse
import statistics


def latency_ms(seconds: list[float]) -> dict[str, float | None]:
    """p50 (the median) and p99 (nearest rank) of latencies in seconds, in milliseconds."""
    if not seconds:
        return {"p50": None, "p99": None}
    v = sorted(seconds)
    p99 = v[min(len(v) - 1, round(0.99 * (len(v) - 1)))]
    return {"p50": round(1000 * statistics.median(v), 2), "p99": round(1000 * p99, 2)}


def add_parsers(sub: argparse._SubParsersAction) -> None:
    from cli.bench import cache, load, prefix, prefix_sim, serve

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="sub", required=True)
    for module in (serve, cache, prefix_sim, load, prefix):
        module.add_parser(bench)
