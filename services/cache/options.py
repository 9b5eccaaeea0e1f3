"""The semantic cache's options: where Milvus is, how the cache flushes and sweeps, and how
consistent its lookups are."""

from __future__ import annotations

import os
from dataclasses import dataclass

from spotmesh.statedir import StateDir, state_dir


@dataclass
class CacheOptions:
    uri: str
    token: str = ""
    collection: str = "spotmesh_semantic_cache"
    dim: int = 384  # all-MiniLM-L6-v2
    flush_every: int = 256  # writes between flushes; 0: only on the timer and at close
    flush_seconds: float = 5.0  # flush pending writes at least this often; 0: never on a timer
    sweep_seconds: float = 60.0  # how often the sweeper deletes expired rows
    timeout_seconds: float = 10.0  # per Milvus call, retries included
    # After a failed connection attempt, calls fail at once for this long instead of each
    # waiting out its own attempt (a Milvus outage must not make every lookup slow).
    reconnect_seconds: float = 1.0
    # Consistency of lookups on a Milvus server (milvus-lite reads its own writes regardless).
    # Session makes every lookup wait until this process's latest store is visible: with a
    # steady stream of stores that is ~150 ms a lookup on Milvus 2.3.5. Bounded reads a
    # slightly stale view (an answer stored a moment ago may miss once) at search latency.
    lookup_consistency: str = "Session"
    # Tenants whose lookup/hit/store counters are kept apart. A service-token holder can name
    # any tenant, so beyond this the least recently counted tenant's counters are folded into
    # the all-tenant totals (which stay exact) and its own figures start again from zero.
    max_tenant_stats: int = 10_000
    # Where lookups search (services.cache.mirror): "memory" keeps every vector in this
    # process and searches it exactly; "milvus" asks Milvus each time. "auto" is memory for
    # milvus-lite (this process is its only writer) and Milvus for a server, which other cache
    # replicas may write to.
    index: str = "auto"
    # Vectors the memory index may hold (1.5 KiB each at 384 dimensions); past it lookups go to
    # Milvus.
    memory_index_max_entries: int = 200_000

    @property
    def memory_index(self) -> bool:
        if self.index == "auto":
            return is_local(self.uri)
        return self.index == "memory"


def is_local(uri: str) -> bool:
    """A milvus-lite data path (pymilvus runs milvus-lite in-process for ``*.db``)."""
    return uri.endswith(".db")


LOOKUP_CONSISTENCY = ("Session", "Bounded", "Eventually", "Strong")
INDEXES = ("auto", "memory", "milvus")


def default_uri(state: str | os.PathLike | None = None) -> str:
    """milvus-lite under the spotmesh state directory: a restarted cache keeps its answers."""
    return StateDir(state_dir(str(state) if state else None)).standalone_semantic_cache_uri
