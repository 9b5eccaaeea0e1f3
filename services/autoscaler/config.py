"""Configuration of the autoscaler: one typed object, flags and environment in one place."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from services.autoscaler.policy import PolicyConfig
from services.autoscaler.signals import Pools, PoolState, Prices
from spotmesh.config import ServerConfig, add_server_flags, server_config_from_args

DEFAULT_PORT = 50081


@dataclass
class AutoscalerConfig:
    server: ServerConfig
    policy: PolicyConfig
    pools: Pools
    prices: Prices
    platform: str = "local"  # "local" | "kubernetes"
    interval_seconds: float = 5.0
    state_dir: str = ""  # local: the mesh's state directory
    inference_args: list[str] = field(default_factory=list)  # local: replica flags
    gateway_metrics: str = ""  # host:port of the gateway's /metrics (arrival rate)
    signal_timeout_seconds: float = 2.0
    # Warming new replicas with the hottest prefixes (local mode): the prefix index, its token,
    # the model name the replicas serve, how many prefixes (0: off).
    prefix_cache: str = ""
    prefix_token: str = ""
    model_name: str = ""
    warm_prefixes: int = 16
    # kubernetes
    namespace: str = "spotmesh"
    prometheus_url: str = ""
    # The target label that names a replica as the actuator does (the pod name on Kubernetes,
    # relabelled from __meta_kubernetes_pod_name), and the pool label.
    prometheus_replica_label: str = "pod"
    prometheus_pool_label: str = "spotmesh_pool"


def parse(argv: list[str] | None = None) -> AutoscalerConfig:
    p = argparse.ArgumentParser(prog="python -m services.autoscaler", description=__doc__)
    add_server_flags(p, default_port=DEFAULT_PORT)
    p.add_argument("--platform", choices=["local", "kubernetes"], default="local")
    p.add_argument("--interval-seconds", type=float, default=5.0,
                   help="seconds between reconciles")
    p.add_argument("--state-dir", default="", help="local: the mesh's state directory")
    p.add_argument("--inference-arg", action="append", default=[],
                   help="local: one flag (or value) for each replica process; repeat")
    p.add_argument("--gateway-metrics", default="", metavar="HOST:PORT",
                   help="the gateway's metrics endpoint, for the arrival rate")
    p.add_argument("--signal-timeout-seconds", type=float, default=2.0)
    p.add_argument("--prefix-cache", default="", metavar="HOST:PORT",
                   help="warm new replicas with the hottest prefixes from this index")
    p.add_argument("--prefix-token", default=os.environ.get("SPOTMESH_CACHE_TOKEN", ""),
                   help="the prefix index's token; env SPOTMESH_CACHE_TOKEN")
    p.add_argument("--model-name", default="", help="the model name the replicas serve")
    p.add_argument("--warm-prefixes", type=int, default=16,
                   help="hot prefixes replayed into each new replica (0: none)")
    p.add_argument("--namespace", default="spotmesh", help="kubernetes: the namespace")
    p.add_argument("--prometheus-url", default="", help="kubernetes: signals from Prometheus")
    p.add_argument("--prometheus-replica-label", default="pod",
                   help="the scrape label naming a replica as Kubernetes does (its pod)")
    p.add_argument("--prometheus-pool-label", default="spotmesh_pool",
                   help="the scrape label carrying the pod's spotmesh.dev/pool")
    d = PolicyConfig()
    for name in ("spot", "on-demand"):
        p.add_argument(f"--{name}-min", type=int, default=0)
        p.add_argument(f"--{name}-max", type=int, default=8 if name == "spot" else 4)
    p.add_argument("--spot-usd-per-hour", type=float, default=0.402)
    p.add_argument("--on-demand-usd-per-hour", type=float, default=1.006)
    p.add_argument("--target-load", type=float, default=d.target_load_per_replica,
                   help="requests (waiting + running) per replica the policy aims for")
    p.add_argument("--on-demand-floor", type=int, default=d.on_demand_floor)
    p.add_argument("--scale-to-zero", action="store_true")
    p.add_argument("--up-cooldown-seconds", type=float, default=d.up_cooldown_seconds)
    p.add_argument("--down-cooldown-seconds", type=float, default=d.down_cooldown_seconds)
    p.add_argument("--down-stabilization-seconds", type=float,
                   default=d.down_stabilization_seconds)
    p.add_argument("--idle-before-zero-seconds", type=float, default=d.idle_before_zero_seconds)
    p.add_argument("--pending-grace-seconds", type=float, default=d.pending_grace_seconds)
    p.add_argument("--reclaim-backoff-seconds", type=float, default=d.reclaim_backoff_seconds)
    p.add_argument("--signal-staleness-seconds", type=float, default=d.signal_staleness_seconds)
    a = p.parse_args(argv)
    if a.interval_seconds <= 0:
        p.error("--interval-seconds must be > 0")
    if a.platform == "local" and not a.state_dir:
        p.error("--platform local needs --state-dir")
    if a.prefix_cache and not (a.prefix_token and a.model_name):
        p.error("--prefix-cache needs --prefix-token (or SPOTMESH_CACHE_TOKEN) and --model-name")
    if not 0 <= a.warm_prefixes <= 256:
        p.error("--warm-prefixes must be in [0, 256]")
    policy = PolicyConfig(
        target_load_per_replica=a.target_load,
        on_demand_floor=a.on_demand_floor,
        scale_to_zero=a.scale_to_zero,
        up_cooldown_seconds=a.up_cooldown_seconds,
        down_cooldown_seconds=a.down_cooldown_seconds,
        down_stabilization_seconds=a.down_stabilization_seconds,
        idle_before_zero_seconds=a.idle_before_zero_seconds,
        pending_grace_seconds=a.pending_grace_seconds,
        reclaim_backoff_seconds=a.reclaim_backoff_seconds,
        signal_staleness_seconds=a.signal_staleness_seconds,
    )
    pools = Pools(spot=PoolState(min_replicas=a.spot_min, max_replicas=a.spot_max),
                  on_demand=PoolState(min_replicas=a.on_demand_min,
                                      max_replicas=a.on_demand_max))
    try:
        policy.validate(pools)
        prices = Prices(a.spot_usd_per_hour, a.on_demand_usd_per_hour)
    except ValueError as exc:
        p.error(str(exc))
    return AutoscalerConfig(
        server=server_config_from_args(a), policy=policy, pools=pools, prices=prices,
        platform=a.platform, interval_seconds=a.interval_seconds, state_dir=a.state_dir,
        inference_args=a.inference_arg, gateway_metrics=a.gateway_metrics,
        signal_timeout_seconds=a.signal_timeout_seconds, namespace=a.namespace,
        prometheus_url=a.prometheus_url,
        prometheus_replica_label=a.prometheus_replica_label,
        prometheus_pool_label=a.prometheus_pool_label, prefix_cache=a.prefix_cache,
        prefix_token=a.prefix_token, model_name=a.model_name, warm_prefixes=a.warm_prefixes)
