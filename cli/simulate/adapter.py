"""spotmesh's own policy in the simulator: the simulated replicas turned into the signals the
autoscaler reads in production, and ``services.autoscaler.policy.plan`` deciding on them."""

from __future__ import annotations

from cli.simulate.engine import READY, WAITING, FleetView
from services.autoscaler.policy import PolicyConfig, PolicyState, PoolPlan, plan
from services.autoscaler.signals import Pools, PoolState, Prices, ReplicaSignal, Signals, SpotMarket


class SpotmeshPolicy:
    """services.autoscaler.policy.plan, fed the simulated replicas as signals."""

    name = "spotmesh"

    def __init__(self, config: PolicyConfig, prices: Prices, max_replicas: int = 1000) -> None:
        self.config, self.prices, self.max = config, prices, max_replicas
        self.state = PolicyState()
        self.reasons: list[tuple[float, str]] = []

    def signals(self, view: FleetView) -> tuple[Signals, Pools, SpotMarket]:
        sigs = []
        for r in view.replicas:
            state = ("pending" if r.pending else "ready" if r.state == READY else "draining")
            waiting = len(r.prefill_q)
            sigs.append(ReplicaSignal(
                replica=r.name, pool=r.pool, waiting=waiting, running=r.held - waiting,
                kv_cache_usage=view.kv_usage.get(r.name, 0.0),
                gpu_utilization=view.busy_fraction.get(r.name, 0.0), observed_at=view.now,
                state=state, state_since=r.launched_at if r.pending else None))
        pools = {}
        for pool in ("spot", "on-demand"):
            mine = [r for r in view.replicas if r.pool == pool]
            pools[pool] = PoolState(
                desired=view.desired[pool], ready=sum(1 for r in mine if r.state == READY),
                pending=sum(1 for r in mine if r.pending), min_replicas=0,
                max_replicas=self.max)
        # What a cloud's spot request status says (AWS: capacity-not-available): whether the
        # spot requests made so far got instances. Not the capacity itself, nor the future.
        waiting = any(r.pool == "spot" and r.state == WAITING for r in view.replicas)
        market = SpotMarket(available=not waiting,
                            preemption_rate_per_replica_hour=view.preemption_rate,
                            last_preemption_at=view.last_preemption_at)
        signals = Signals(replicas=sigs, arrival_rate_rps=view.arrival_rate_rps,
                          now=view.now, unassigned_waiting=view.queue)
        return signals, Pools(spot=pools["spot"], on_demand=pools["on-demand"]), market

    def decide(self, view: FleetView) -> PoolPlan:
        signals, pools, market = self.signals(view)
        p = plan(signals, pools, self.prices, view.now, self.state, self.config, market)
        self.state = p.state
        return p
