"""The semantic cache's Prometheus metrics.

The ``tenant`` label's values are tenant ids, which the gateway takes from the operator's API
keys file and the cache validates (1-64 characters of ``[A-Za-z0-9_.-]``), so their number is
the number of tenants the operator configured. A caller holding the service token could still
invent ids; :class:`TenantLabels` therefore gives only the first ``limit`` distinct tenants a
series of their own and counts the rest under ``~other`` (a value no valid tenant id can take).
Tokens and dollars saved by hits are booked by the gateway, which knows what a hit replaced.
"""

from __future__ import annotations

import threading

from prometheus_client import Counter, Gauge, Histogram

OTHER_TENANTS = "~other"
DEFAULT_MAX_TENANT_LABELS = 1000
# A lookup is a filtered top-1 search: ~1 ms on a small milvus-lite collection, tens of ms at
# 100k rows, up to seconds when Milvus is struggling.
LOOKUP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)

LOOKUPS = Counter("spotmesh_semantic_cache_lookups_total",
                  "Lookups answered (hit or miss), by tenant.", ["tenant"])
HITS = Counter("spotmesh_semantic_cache_hits_total",
               "Lookups that returned an entry at or above the threshold.", ["tenant"])
LOOKUP_LATENCY = Histogram("spotmesh_semantic_cache_lookup_latency_seconds",
                           "Lookup time inside the cache service, Milvus search included.",
                           buckets=LOOKUP_BUCKETS)
STORES = Counter("spotmesh_semantic_cache_stores_total", "Entries written, by tenant.",
                 ["tenant"])
ENTRIES = Gauge("spotmesh_semantic_cache_entries",
                "Unexpired entries, all tenants (refreshed by the sweeper).")
MEMORY_INDEX_ENTRIES = Gauge(
    "spotmesh_cache_memory_index_entries",
    "Vectors in the cache's memory index (services.cache.mirror); -1 once it gave up at its "
    "bound and lookups went to Milvus.")
EXPIRED_SWEPT = Counter("spotmesh_semantic_cache_expired_swept_total",
                        "Expired entries deleted by the sweeper.")


class TenantLabels:
    """Maps tenant ids to label values with a bound on how many distinct values exist."""

    def __init__(self, limit: int = DEFAULT_MAX_TENANT_LABELS) -> None:
        self.limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, tenant: str) -> str:
        if tenant in self._seen:
            return tenant
        with self._lock:
            if len(self._seen) < self.limit:
                self._seen.add(tenant)
                return tenant
        return OTHER_TENANTS
