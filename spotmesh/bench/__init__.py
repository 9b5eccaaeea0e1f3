"""spotmesh benchmarks: each prints a table, writes JSON, and measures its baseline in the
same run."""

from __future__ import annotations

import statistics


def latency_ms(seconds: list[float]) -> dict[str, float | None]:
    """p50 (the median) and p99 (nearest rank) of latencies in seconds, in milliseconds."""
    if not seconds:
        return {"p50": None, "p99": None}
    v = sorted(seconds)
    p99 = v[min(len(v) - 1, round(0.99 * (len(v) - 1)))]
    return {"p50": round(1000 * statistics.median(v), 2), "p99": round(1000 * p99, 2)}
