"""Conventions for spotmesh's Prometheus metrics: the ``spotmesh_`` prefix, base units (seconds,
tokens, dollars), and bounded label values (never a prompt or a request id)."""

from __future__ import annotations

# Time to first token spans cache hits (~1 ms) to long prefills on a busy replica (~tens of s).
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Inter-token latency: a decode step is ~5-100 ms on a GPU, slower on CPU.
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)

# One sample of a /metrics page: (name, labels, value).
Sample = tuple[str, dict[str, str], float]


def read_metrics(address: str, timeout: float = 10.0) -> list[Sample]:
    """Every sample of a spotmesh server's (or vLLM's) /metrics page at ``host:port``; raises
    OSError when the page cannot be read. What the tools, benchmarks and the autoscaler read."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{address}/metrics", timeout=timeout) as resp:
        text = resp.read().decode()
    return [(s.name, dict(s.labels), s.value)
            for family in text_string_to_metric_families(text) for s in family.samples]


def metric_sum(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(v for n, lab, v in samples
               if n == name and all(lab.get(k) == x for k, x in labels.items()))
