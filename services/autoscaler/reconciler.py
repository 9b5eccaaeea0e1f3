"""The autoscaler's loop: observe the platform, read the replicas' signals, plan, apply.

Every reconcile starts from what the platform says now (level-triggered), so the loop may stop
and restart at any moment. A reconcile that cannot read its signals or reach the platform
changes nothing (the pools hold) and is counted: the one thing an autoscaler must never do is
shrink because it could not see.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge

from services.autoscaler.actuator import Actuator, Observation
from services.autoscaler.policy import PolicyConfig, PolicyState, plan
from services.autoscaler.signals import Pools, PoolState, Prices, SpotMarket
from spotmesh.runtime import fields

log = logging.getLogger("spotmesh.autoscaler")

DESIRED = Gauge("spotmesh_autoscaler_desired_replicas", "Replicas each pool should have.",
                ["pool"])
READY = Gauge("spotmesh_autoscaler_ready_replicas", "Replicas ready per pool.", ["pool"])
PENDING = Gauge("spotmesh_autoscaler_pending_replicas", "Replicas starting (or waiting for "
                "capacity) per pool.", ["pool"])
DECISIONS = Counter("spotmesh_autoscaler_decisions_total",
                    "Changes of a pool's target size, by pool and direction.",
                    ["pool", "direction"])
PREEMPTIONS = Gauge("spotmesh_autoscaler_preemptions",
                    "Spot replicas reclaimed by the platform since the actuator started.")
RECONCILES = Counter("spotmesh_autoscaler_reconciles_total", "Reconciles by outcome.",
                     ["outcome"])
ARRIVAL_RATE = Gauge("spotmesh_autoscaler_arrival_rate_requests_per_second",
                     "Requests per second arriving at the gateway (last interval).")
MAX_DECISIONS = 50


@dataclass
class Decision:
    at: float
    spot: int
    on_demand: int
    removed: list[str]
    reasons: list[str]


@dataclass
class Status:
    pools: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # desired/ready/pend
    reasons: list[str] = field(default_factory=list)
    reconciled_at: float = 0.0
    preemptions: int = 0
    spot_available: bool | None = None
    decisions: deque = field(default_factory=lambda: deque(maxlen=MAX_DECISIONS))
    failed_reconciles: int = 0


class Reconciler:
    def __init__(self, actuator: Actuator, source, policy: PolicyConfig, pools: Pools,
                 prices: Prices, clock=time.time) -> None:
        self.actuator = actuator
        self.source = source
        self.policy = policy
        self.bounds = pools
        self.prices = prices
        self.clock = clock
        self.state = PolicyState()
        self.status = Status()
        self._started = clock()
        self._last_decision: tuple | None = None

    async def reconcile(self) -> None:
        now = self.clock()
        try:
            obs = await self.actuator.observe()
            signals = await self.source.read(obs, now)
        except Exception as exc:  # hold: no plan from signals we do not have
            RECONCILES.labels("failed").inc()
            self.status.failed_reconciles += 1
            log.warning("reconcile failed; pools held", extra=fields(error=repr(exc)))
            return
        pools = self._pools(obs)
        hours = max(1e-9, (now - self._started) / 3600)
        spot_held = max(1, pools.spot.ready + pools.spot.pending)
        market = SpotMarket(available=obs.spot_available,
                            preemption_rate_per_replica_hour=obs.preemptions / hours / spot_held,
                            last_preemption_at=obs.last_preemption_at)
        p = plan(signals, pools, self.prices, now, self.state, self.policy, market)
        self.state = p.state
        previous = dict(obs.desired)
        await self.actuator.apply({"spot": p.spot, "on-demand": p.on_demand}, p.remove)
        RECONCILES.labels("ok").inc()
        ARRIVAL_RATE.set(signals.arrival_rate_rps)
        PREEMPTIONS.set(obs.preemptions)
        for pool, want in (("spot", p.spot), ("on-demand", p.on_demand)):
            DESIRED.labels(pool).set(want)
            st = pools.spot if pool == "spot" else pools.on_demand
            READY.labels(pool).set(st.ready)
            PENDING.labels(pool).set(st.pending)
            self.status.pools[pool] = (want, st.ready, st.pending)
            before = previous.get(pool)
            if before is not None and want != before:
                DECISIONS.labels(pool, "up" if want > before else "down").inc()
        self.status.reasons = list(p.reasons)
        self.status.reconciled_at = now
        self.status.preemptions = obs.preemptions
        self.status.spot_available = obs.spot_available
        decision = (p.spot, p.on_demand, tuple(p.remove))
        if decision != self._last_decision:
            self._last_decision = decision
            self.status.decisions.append(Decision(now, p.spot, p.on_demand, list(p.remove),
                                                  list(p.reasons)))
            message = (f"spot {previous.get('spot', 0)}->{p.spot}, on-demand "
                       f"{previous.get('on-demand', 0)}->{p.on_demand}: " + "; ".join(p.reasons))
            log.info("scaling", extra=fields(spot=p.spot, on_demand=p.on_demand,
                                             remove=p.remove, reasons=p.reasons))
            await self.actuator.record("Scaled", message)

    def _pools(self, obs: Observation) -> Pools:
        def state(pool: str, bounds: PoolState) -> PoolState:
            mine = [i for i in obs.instances if i.pool == pool]
            return PoolState(
                desired=obs.desired.get(pool, 0),
                ready=sum(i.state == "ready" for i in mine),
                pending=sum(i.state == "pending" for i in mine),
                min_replicas=bounds.min_replicas, max_replicas=bounds.max_replicas)

        return Pools(spot=state("spot", self.bounds.spot),
                     on_demand=state("on-demand", self.bounds.on_demand))

    async def run(self, interval: float, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.reconcile()
            except Exception:  # the loop must outlive any one bad reconcile
                RECONCILES.labels("error").inc()
                self.status.failed_reconciles += 1
                log.exception("reconcile raised")
            try:
                await asyncio.wait_for(stop.wait(), timeout=interval)
            except TimeoutError:
                pass
