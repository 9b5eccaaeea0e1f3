"""One percentile for every table spotmesh prints: the measured sample nearest rank q(n-1)."""

from __future__ import annotations

import numpy as np
import pytest

from cli.stats import latency_ms, percentile


def test_percentile_is_numpys_nearest_method():
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 10, 101, 1000):
        values = rng.random(n).tolist()
        for q in (0.0, 0.25, 0.5, 0.9, 0.95, 0.99, 1.0):
            assert percentile(values, q) == np.percentile(values, 100 * q, method="nearest")


def test_percentile_is_always_a_measured_value():
    assert percentile([1.0, 2.0], 0.5) in (1.0, 2.0)
    assert percentile([3.0, 1.0, 2.0], 0.0) == 1.0 and percentile([3.0, 1.0, 2.0], 1.0) == 3.0
    assert percentile([], 0.5) is None
    with pytest.raises(ValueError):
        percentile([1.0], 1.5)


def test_latency_ms_reports_p50_and_p99_in_milliseconds():
    assert latency_ms([0.001 * i for i in range(101)]) == {"p50": 50.0, "p99": 99.0}
    assert latency_ms([]) == {"p50": None, "p99": None}
