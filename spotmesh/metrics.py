"""Conventions for spotmesh's Prometheus metrics: the ``spotmesh_`` prefix, base units (seconds,
tokens, dollars), and bounded label values (never a prompt or a request id)."""

from __future__ import annotations

# Time to first token spans cache hits (~1 ms) to long prefills on a busy replica (~tens of s).
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Inter-token latency: a decode step is ~5-100 ms on a GPU, slower on CPU.
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
