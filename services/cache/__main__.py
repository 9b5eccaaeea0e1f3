"""Run the cache tier: ``python -m services.cache --token T [--milvus-uri URI] [--no-semantic]``.

One process serves the semantic cache (over Milvus) and the prefix cache (an in-memory index of
which replica holds which KV-cache prefix); ``--no-semantic`` serves only the latter.

On SIGTERM the service turns NOT_SERVING, stops its sweeper, lets in-flight calls finish, then
flushes pending writes and releases Milvus (for milvus-lite: the data directory's lock).
"""

from __future__ import annotations

import logging

from services.cache.config import CacheConfig, parse
from services.cache.maintenance import Maintenance
from services.cache.metrics import TenantLabels
from services.cache.milvus import CacheSchemaError, CacheUnavailable
from services.cache.options import is_local
from services.cache.prefix_server import PrefixCacheServicer
from services.cache.semantic import SemanticCache
from services.cache.server import SemanticCacheServicer
from spotmesh.prefix_index import PrefixStore
from spotmesh.runtime import ServerProcess, add_servicer, fields, run, setup_logging
from spotmesh.v1 import cache_pb2

log = logging.getLogger("spotmesh.cache")


def open_cache(cfg: CacheConfig) -> SemanticCache:
    """The cache, connected if Milvus answers. An embedded (milvus-lite) store that cannot be
    opened, or a collection of the wrong shape, is fatal; a Milvus server that is down is not:
    the service starts, answers UNAVAILABLE, and connects once Milvus is back."""
    try:
        cache = SemanticCache(cfg.milvus)
        cache.count()
    except CacheSchemaError as exc:
        raise SystemExit(f"cache: {exc}") from None
    except CacheUnavailable as exc:
        if is_local(cfg.milvus.uri):
            raise SystemExit(f"cache: {exc}") from None
        log.warning("Milvus is not reachable yet; answering UNAVAILABLE until it is",
                    extra=fields(uri=cfg.milvus.uri, error=str(exc)))
    return cache


def prefix_servicer(cfg: CacheConfig) -> PrefixCacheServicer:
    lim = cfg.prefix
    store = PrefixStore(lim.default_capacity_blocks, lim.max_replicas, lim.max_models)
    return PrefixCacheServicer(store, token=cfg.token, admin_token=cfg.admin_token,
                               max_hashes=lim.max_hashes)


async def main(cfg: CacheConfig) -> None:
    prefix_service = cache_pb2.DESCRIPTOR.services_by_name["PrefixCache"]
    prefix = prefix_servicer(cfg)
    if not cfg.semantic:
        proc = ServerProcess("cache", cfg.server, [prefix_service.full_name])
        await proc.start(lambda server: add_servicer(server, prefix, prefix_service))
        log.info("prefix cache ready", extra=fields(semantic=False))
        await proc.serve_until_signal(grace_seconds=5.0)
        return
    cache = open_cache(cfg)
    service = cache_pb2.DESCRIPTOR.services_by_name["SemanticCache"]
    proc = ServerProcess("cache", cfg.server, [service.full_name, prefix_service.full_name])
    servicer = SemanticCacheServicer(cache, token=cfg.token, admin_token=cfg.admin_token,
                                     workers=cfg.workers,
                                     tenant_labels=TenantLabels(cfg.max_tenant_labels))
    maintenance = Maintenance(cache, servicer.run_blocking)

    def add_all(server) -> None:
        add_servicer(server, servicer, service)
        add_servicer(server, prefix, prefix_service)

    await proc.start(add_all)
    maintenance.start()
    log.info("cache ready", extra=fields(milvus=cfg.milvus.uri, collection=cfg.milvus.collection,
                                         dim=cfg.milvus.dim, admin=bool(cfg.admin_token)))
    try:
        await proc.serve_until_signal(maintenance.stop, grace_seconds=5.0)
    finally:
        await maintenance.stop()
        try:
            await servicer.close()
            log.info("flushed and closed", extra=fields(milvus=cfg.milvus.uri))
        except CacheUnavailable as exc:
            # Nothing acknowledged is lost (writes are durable before they are acknowledged);
            # only the flush, a search speed-up, did not happen.
            log.warning("final flush failed", extra=fields(error=str(exc)))


if __name__ == "__main__":
    config = parse()
    setup_logging(config.server.log_level, config.server.log_format, "cache")
    # pymilvus and milvus-lite's launcher log every failure with a traceback; the cache logs
    # one line per failure, with the cause. faiss announces at INFO which CPU build it loaded.
    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)
    logging.getLogger("milvus_lite.server_manager").setLevel(logging.CRITICAL)
    logging.getLogger("faiss").setLevel(logging.WARNING)
    run(lambda: main(config))
