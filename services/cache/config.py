"""Configuration of the semantic-cache service: one typed object, flags and environment in one
place.

Tokens come from flags or the environment (``SPOTMESH_CACHE_TOKEN``,
``SPOTMESH_CACHE_ADMIN_TOKEN``); the environment keeps them out of ``ps``. Without a service
token the service refuses to start: an open cache would let anyone read every tenant's answers.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, field

from services.cache.metrics import DEFAULT_MAX_TENANT_LABELS
from services.cache.options import INDEXES, LOOKUP_CONSISTENCY, CacheOptions, default_uri
from services.cache.prefix_server import DEFAULT_MAX_HASHES
from spotmesh.config import ServerConfig, add_server_flags, server_config_from_args

DEFAULT_PORT = 50071
TOKEN_ENV = "SPOTMESH_CACHE_TOKEN"
ADMIN_TOKEN_ENV = "SPOTMESH_CACHE_ADMIN_TOKEN"
COLLECTION_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")  # Milvus' rule for names


@dataclass
class CacheConfig:
    server: ServerConfig
    milvus: CacheOptions
    token: str  # the service credential: Lookup, Store, Stats
    admin_token: str = ""  # also Invalidate; empty: nobody may invalidate
    workers: int = 4  # threads making Milvus calls
    max_tenant_labels: int = DEFAULT_MAX_TENANT_LABELS
    semantic: bool = True  # serve SemanticCache (needs Milvus); PrefixCache is always served
    prefix: PrefixLimits = field(default_factory=lambda: PrefixLimits())


@dataclass
class PrefixLimits:
    """Bounds of the prefix index (it lives in memory: every dimension a caller grows is capped)."""

    default_capacity_blocks: int = 4096  # per replica, until a Record says its KV capacity
    max_replicas: int = 1024
    max_models: int = 64
    max_hashes: int = DEFAULT_MAX_HASHES  # per call


def parse(argv: list[str] | None = None) -> CacheConfig:
    p = argparse.ArgumentParser(prog="python -m services.cache", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_flags(p, default_port=DEFAULT_PORT)
    d = CacheOptions(uri="")
    p.add_argument("--milvus-uri", default=os.environ.get("SPOTMESH_CACHE_MILVUS_URI", ""),
                   help="a milvus-lite data path ending in .db (embedded, one process), or "
                        "http://host:port of a Milvus server (default: "
                        "<spotmesh state dir>/semantic-cache/cache.db)")
    p.add_argument("--milvus-token", default=os.environ.get("SPOTMESH_CACHE_MILVUS_TOKEN", ""),
                   help="Milvus credential (user:password or API key); env "
                        "SPOTMESH_CACHE_MILVUS_TOKEN")
    p.add_argument("--collection", default=d.collection)
    p.add_argument("--dim", type=int, default=d.dim,
                   help="embedding dimension (all-MiniLM-L6-v2: 384)")
    p.add_argument("--flush-every", type=int, default=d.flush_every,
                   help="flush after this many writes (0: only on the timer)")
    p.add_argument("--flush-seconds", type=float, default=d.flush_seconds,
                   help="flush pending writes at least this often (0: never on a timer)")
    p.add_argument("--sweep-seconds", type=float, default=d.sweep_seconds,
                   help="delete expired entries this often (0: never)")
    p.add_argument("--lookup-consistency", choices=LOOKUP_CONSISTENCY,
                   default=d.lookup_consistency,
                   help="Milvus consistency of lookups on a server (see CacheOptions)")
    p.add_argument("--index", choices=INDEXES, default=d.index,
                   help="where lookups search: memory (every vector mirrored in this process, "
                        "exact; needs this process to be the collection's only writer), milvus, "
                        "or auto (memory for milvus-lite, milvus for a server)")
    p.add_argument("--memory-index-max-entries", type=int, default=d.memory_index_max_entries,
                   help="vectors the memory index holds at most; past it lookups go to Milvus")
    p.add_argument("--milvus-timeout", type=float, default=d.timeout_seconds,
                   help="seconds per Milvus call, retries included")
    p.add_argument("--workers", type=int, default=4, help="threads making Milvus calls")
    p.add_argument("--max-tenant-labels", type=int, default=DEFAULT_MAX_TENANT_LABELS,
                   help="distinct tenant label values in metrics; more tenants count as ~other")
    p.add_argument("--token", default=os.environ.get(TOKEN_ENV, ""),
                   help=f"service token (Lookup, Store, Stats); env {TOKEN_ENV}")
    p.add_argument("--admin-token", default=os.environ.get(ADMIN_TOKEN_ENV, ""),
                   help=f"admin token (also Invalidate); env {ADMIN_TOKEN_ENV}")
    p.add_argument("--no-semantic", action="store_true",
                   help="serve only the prefix cache (no Milvus, no embedder needed)")
    lim = PrefixLimits()
    p.add_argument("--prefix-capacity-blocks", type=int, default=lim.default_capacity_blocks,
                   help="blocks indexed per replica until its Record says its KV capacity")
    p.add_argument("--prefix-max-replicas", type=int, default=lim.max_replicas)
    p.add_argument("--prefix-max-models", type=int, default=lim.max_models)
    p.add_argument("--prefix-max-hashes", type=int, default=lim.max_hashes,
                   help="block hashes per Match/Record/Evict call")
    a = p.parse_args(argv)
    if not a.token.strip():
        raise SystemExit(f"cache: no service token configured: set --token or {TOKEN_ENV}")
    if a.admin_token and a.admin_token.strip() == a.token.strip():
        raise SystemExit("cache: --admin-token must differ from --token")
    for name in ("dim", "workers", "max_tenant_labels", "memory_index_max_entries",
                 "prefix_capacity_blocks", "prefix_max_replicas", "prefix_max_models",
                 "prefix_max_hashes"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("flush_every", "flush_seconds", "sweep_seconds"):
        if getattr(a, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0")
    if not COLLECTION_RE.fullmatch(a.collection):
        p.error("--collection must start with a letter or _ and hold only letters, digits and _ "
                "(at most 255)")
    if a.milvus_timeout <= 0:
        p.error("--milvus-timeout must be > 0")
    milvus = CacheOptions(
        uri=a.milvus_uri or default_uri(),
        token=a.milvus_token,
        collection=a.collection,
        dim=a.dim,
        flush_every=a.flush_every,
        flush_seconds=a.flush_seconds,
        sweep_seconds=a.sweep_seconds,
        lookup_consistency=a.lookup_consistency,
        timeout_seconds=a.milvus_timeout,
        index=a.index,
        memory_index_max_entries=a.memory_index_max_entries,
    )
    return CacheConfig(
        server=server_config_from_args(a),
        milvus=milvus,
        token=a.token.strip(),
        admin_token=a.admin_token.strip(),
        workers=a.workers,
        max_tenant_labels=a.max_tenant_labels,
        semantic=not a.no_semantic,
        prefix=PrefixLimits(
            default_capacity_blocks=a.prefix_capacity_blocks,
            max_replicas=a.prefix_max_replicas,
            max_models=a.prefix_max_models,
            max_hashes=a.prefix_max_hashes,
        ),
    )
