"""Run the autoscaler: ``python -m services.autoscaler --platform local --state-dir DIR ...``.

On SIGTERM it stops reconciling and exits; the replicas it started keep running (a restarted
autoscaler adopts them), so restarting the autoscaler never costs a stream.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from services.autoscaler.config import AutoscalerConfig, parse
from services.autoscaler.load_signals import LoadSignals
from services.autoscaler.reconciler import Reconciler
from services.autoscaler.server import AutoscalerServicer
from spotmesh.runtime import ServerProcess, add_servicer, fields, run, setup_logging
from spotmesh.v1 import autoscaler_pb2

log = logging.getLogger("spotmesh.autoscaler")


def build(cfg: AutoscalerConfig):
    """(actuator, signal source) for the configured platform."""
    if cfg.platform == "local":
        from services.autoscaler.local import LocalActuator
        from services.autoscaler.warm import PrefixWarmer

        warmer = None
        if cfg.prefix_cache and cfg.warm_prefixes:
            warmer = PrefixWarmer(cfg.prefix_cache, cfg.prefix_token, cfg.model_name,
                                  cfg.warm_prefixes)
        return (LocalActuator(Path(cfg.state_dir), cfg.inference_args, warmer=warmer),
                LoadSignals(cfg.gateway_metrics, cfg.signal_timeout_seconds))
    from services.autoscaler.kubernetes.actuator import KubernetesActuator
    from services.autoscaler.prometheus import PrometheusSource

    if not cfg.prometheus_url:
        raise SystemExit("autoscaler: --platform kubernetes needs --prometheus-url")
    # Replicas are named by pod, as the actuator names them, so the policy's scale-in choice
    # reaches the right pods.
    return (KubernetesActuator(namespace=cfg.namespace),
            PrometheusSource(cfg.prometheus_url, replica_label=cfg.prometheus_replica_label,
                             pool_label=cfg.prometheus_pool_label,
                             gpu_replica_label=cfg.prometheus_replica_label,
                             staleness_seconds=cfg.policy.signal_staleness_seconds))


async def main(cfg: AutoscalerConfig) -> None:
    try:
        actuator, source = build(cfg)
    except (ImportError, ValueError, RuntimeError) as exc:
        # A missing client library, no kubeconfig, bad labels: one line, not a traceback.
        raise SystemExit(f"autoscaler: {exc}") from None
    reconciler = Reconciler(actuator, source, cfg.policy, cfg.pools, cfg.prices)
    service = autoscaler_pb2.DESCRIPTOR.services_by_name["Autoscaler"]
    proc = ServerProcess("autoscaler", cfg.server, [service.full_name])
    await proc.start(lambda server: add_servicer(server, AutoscalerServicer(reconciler),
                                                 service))
    log.info("autoscaler ready", extra=fields(platform=cfg.platform,
                                              interval=cfg.interval_seconds))
    stop = asyncio.Event()
    loop_task = asyncio.create_task(reconciler.run(cfg.interval_seconds, stop))

    async def on_stop() -> None:
        stop.set()
        await loop_task

    try:
        await proc.serve_until_signal(on_stop, grace_seconds=1.0)
    finally:
        await actuator.close()
        close = getattr(source, "close", None)
        if close is not None:
            await close()


if __name__ == "__main__":
    config = parse()
    setup_logging(config.server.log_level, config.server.log_format, "autoscaler")
    run(lambda: main(config))
