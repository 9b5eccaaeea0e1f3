"""The one definition of a percentile for every benchmark, the simulator and the measurement
tools, so "p99" means the same thing in every table and JSON file spotmesh writes.

``percentile(values, q)`` is the sample at rank ``round(q * (n - 1))`` of the sorted values
(numpy's ``method="nearest"``, Python's round half to even): always a value that was measured,
never an interpolation between two, and p0/p100 are the minimum and maximum.
"""

from __future__ import annotations

from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile (0 <= q <= 1) of ``values``, or None when there are none."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, round(q * (len(v) - 1)))]


def latency_ms(seconds: Sequence[float]) -> dict[str, float | None]:
    """p50 and p99 of latencies given in seconds, in milliseconds (2 decimals)."""
    out: dict[str, float | None] = {}
    for name, q in (("p50", 0.5), ("p99", 0.99)):
        x = percentile(seconds, q)
        out[name] = None if x is None else round(1000 * x, 2)
    return out
