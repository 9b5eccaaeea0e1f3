"""Run the gateway: ``python -m services.gateway --api-keys keys.toml --model NAME=DIR ...``."""

from __future__ import annotations

import logging
import os
import sys

from services.gateway.auth import ApiKeys, KeysFileError
from services.gateway.config import GatewayConfig, parse
from services.gateway.flow import RequestFlow
from services.gateway.ledger import CostLedger
from services.gateway.models import ModelCatalog
from services.gateway.prefix import PrefixRouter
from services.gateway.relay import ReplicaRelay
from services.gateway.replicas import ReplicaSet
from services.gateway.semantic import SemanticCacheClient
from services.gateway.server import GatewayServicer
from spotmesh.home import DEFAULT_MODEL_NAME, DefaultModelMissing, built_default_model
from spotmesh.runtime import ServerProcess, add_servicer, run, setup_logging
from spotmesh.v1 import gateway_pb2

log = logging.getLogger("spotmesh.gateway")


async def main(cfg: GatewayConfig) -> None:
    try:
        keys = ApiKeys.load(cfg.api_keys_file)
    except KeysFileError as exc:
        log.error(str(exc))
        sys.exit(2)
    if not cfg.models:
        try:
            cfg.models = {DEFAULT_MODEL_NAME: str(built_default_model())}
        except DefaultModelMissing as exc:
            log.error(str(exc))
            sys.exit(2)
    catalog = ModelCatalog(cfg.models)
    prefix = PrefixRouter(cfg.prefix_cache, cfg.cache_token, cfg.prefix_mode,
                          timeout_seconds=cfg.prefix_timeout_seconds,
                          max_message_bytes=cfg.server.max_message_bytes)
    replicas = ReplicaSet(
        cfg.replicas,
        cfg.replicas_file,
        poll_seconds=cfg.load_poll_seconds,
        max_message_bytes=cfg.server.max_message_bytes,
        on_report=lambda r: catalog.observe_context_length(r.model, r.max_model_len),
        weights=cfg.weights,
        routing=cfg.routing,
        on_removed=prefix.forget,
    )
    await replicas.start()
    semantic = None
    if cfg.cache:
        semantic = SemanticCacheClient(cfg.embedder, cfg.cache, cfg.cache_token,
                                       timeout_seconds=cfg.cache_timeout_seconds,
                                       budget_seconds=cfg.cache_lookup_budget_seconds)
    service = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"]
    relay = ReplicaRelay(replicas, prefix, CostLedger(cfg.prices_usd_per_hour),
                         start_attempts=cfg.start_attempts, resume_attempts=cfg.resume_attempts)
    servicer = GatewayServicer(cfg, keys, catalog, RequestFlow(relay, semantic))
    proc = ServerProcess("gateway", cfg.server, [service.full_name])
    await proc.start(lambda server: add_servicer(server, servicer, service))
    try:
        # In-flight streams get the grace period to finish once SIGTERM arrives.
        await proc.serve_until_signal(grace_seconds=30.0)
    finally:
        await replicas.close()
        await prefix.close()
        if semantic is not None:
            await semantic.close()


if __name__ == "__main__":
    config = parse()
    setup_logging(config.server.log_level, config.server.log_format, "gateway")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run(lambda: main(config))
