"""What the autoscaler's policy sees: per-replica load, pool sizes, prices and the spot market.

Plain data only, so the same policy runs under Kubernetes (signals from Prometheus), local
processes (signals from the inference `Load` RPC) and the trace simulator (signals computed from
simulated replicas), and a test can write a situation down in a few lines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

Pool = Literal["spot", "on-demand"]
ReplicaState = Literal["ready", "pending", "draining", "unreachable"]

POOLS: tuple[Pool, ...] = ("spot", "on-demand")
REPLICA_STATES: tuple[ReplicaState, ...] = ("ready", "pending", "draining", "unreachable")


@dataclass(frozen=True)
class ReplicaSignal:
    """One replica's last report.

    `waiting` and `running` mirror vLLM's `num_requests_waiting` / `num_requests_running`;
    `kv_cache_usage` is vLLM's `kv_cache_usage_perc` as a 0-1 fraction; `gpu_utilization` is
    DCGM's `DCGM_FI_DEV_GPU_UTIL` as a 0-1 fraction, -1 where nobody measures it (CPU replicas).
    `observed_at` is when the numbers were taken (seconds on the policy's clock): a report older
    than the policy's staleness bound says nothing about the replica now. `state_since` is when
    the replica entered `state` where the actuator knows it (a pod's creation time); without it
    the policy remembers when it first saw the replica pending. `prefix_blocks` is how many
    cached prefix blocks it holds: what is lost, in prefill work, when it goes away.
    """

    replica: str
    pool: Pool
    waiting: int = 0
    running: int = 0
    kv_cache_usage: float = 0.0
    gpu_utilization: float = -1.0
    observed_at: float = 0.0
    state: ReplicaState = "ready"
    prefix_blocks: int = 0
    state_since: float | None = None

    def __post_init__(self) -> None:
        where = f"replica {self.replica!r}"
        if self.pool not in POOLS:
            raise ValueError(f"{where}: pool must be one of {POOLS}, got {self.pool!r}")
        if self.state not in REPLICA_STATES:
            raise ValueError(f"{where}: state must be one of {REPLICA_STATES}, got {self.state!r}")
        if self.waiting < 0 or self.running < 0:
            raise ValueError(f"{where}: waiting and running must be >= 0, got "
                             f"{self.waiting} and {self.running}")
        if not 0.0 <= self.kv_cache_usage <= 1.0:
            raise ValueError(f"{where}: kv_cache_usage must be in [0, 1], got "
                             f"{self.kv_cache_usage}")
        if self.gpu_utilization != -1.0 and not 0.0 <= self.gpu_utilization <= 1.0:
            raise ValueError(f"{where}: gpu_utilization must be in [0, 1] or -1 (unknown), got "
                             f"{self.gpu_utilization}")
        if self.prefix_blocks < 0:
            raise ValueError(f"{where}: prefix_blocks must be >= 0, got {self.prefix_blocks}")

    @property
    def load(self) -> int:
        """Requests the replica holds: the queue-depth signal the policy targets."""
        return self.waiting + self.running


@dataclass(frozen=True)
class Signals:
    """Everything measured at one reconcile.

    `unassigned_waiting` counts requests the gateway holds that no replica has taken (all full,
    or none ready): the only load signal there is when a pool stands at zero.
    """

    replicas: list[ReplicaSignal] = field(default_factory=list)
    arrival_rate_rps: float = 0.0
    now: float = 0.0
    unassigned_waiting: int = 0

    def __post_init__(self) -> None:
        if self.arrival_rate_rps < 0 or not math.isfinite(self.arrival_rate_rps):
            raise ValueError(f"signals.arrival_rate_rps must be a finite number >= 0, got "
                             f"{self.arrival_rate_rps}")
        if self.unassigned_waiting < 0:
            raise ValueError(f"signals.unassigned_waiting must be >= 0, got "
                             f"{self.unassigned_waiting}")
        names = [r.replica for r in self.replicas]
        if len(names) != len(set(names)):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"signals.replicas: duplicate replica names {dup}")


@dataclass(frozen=True)
class PoolState:
    """One pool as the actuator sees it: the count it was last asked for, what is up, bounds."""

    desired: int = 0
    ready: int = 0
    pending: int = 0
    min_replicas: int = 0
    max_replicas: int = 1_000

    def validate(self, name: str) -> None:
        """Contradictory bounds are a configuration error, reported naming the field."""
        for key in ("desired", "ready", "pending", "min_replicas", "max_replicas"):
            if getattr(self, key) < 0:
                raise ValueError(f"pools.{name}.{key} must be >= 0, got {getattr(self, key)}")
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"pools.{name}.min_replicas ({self.min_replicas}) must be <= "
                             f"pools.{name}.max_replicas ({self.max_replicas})")


@dataclass(frozen=True)
class Pools:
    """The two pools spotmesh sizes."""

    spot: PoolState = field(default_factory=PoolState)
    on_demand: PoolState = field(default_factory=PoolState)

    def get(self, pool: Pool) -> PoolState:
        return self.spot if pool == "spot" else self.on_demand

    def validate(self) -> None:
        self.spot.validate("spot")
        self.on_demand.validate("on_demand")


@dataclass(frozen=True)
class Prices:
    """Hourly price of one replica in each pool (USD)."""

    spot_usd_per_hour: float
    on_demand_usd_per_hour: float

    def __post_init__(self) -> None:
        for key in ("spot_usd_per_hour", "on_demand_usd_per_hour"):
            value = getattr(self, key)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"prices.{key} must be a finite number >= 0, got {value}")


@dataclass(frozen=True)
class SpotMarket:
    """What the actuator knows about spot capacity right now.

    `available` / `capacity` are None where the cloud does not say (the usual case: one learns
    that spot is gone from launches that stay pending). `preemption_rate_per_replica_hour` is
    observed (reclaims per spot replica-hour held); `last_preemption_at` is the time of the last
    reclaim notice, so a policy can back off from spot without remembering anything itself.
    """

    available: bool | None = None
    capacity: int | None = None
    preemption_rate_per_replica_hour: float = 0.0
    last_preemption_at: float | None = None

    def __post_init__(self) -> None:
        if self.capacity is not None and self.capacity < 0:
            raise ValueError(f"market.capacity must be >= 0, got {self.capacity}")
        rate = self.preemption_rate_per_replica_hour
        if not math.isfinite(rate) or rate < 0:
            raise ValueError(f"market.preemption_rate_per_replica_hour must be a finite number "
                             f">= 0, got {rate}")
