"""The policies spotmesh is compared against, deciding on the same observations: a static
on-demand fleet, KEDA's threshold scaling, SkyServe's fallback autoscaler and a perfect-foresight
oracle."""

from __future__ import annotations

import bisect
import itertools
import math
from collections import deque

from cli.simulate.engine import DRAINING, READY, RECLAIMED, FleetView
from cli.simulate.profile import ReplicaProfile
from cli.simulate.traces import Arrival
from services.autoscaler.policy import PoolPlan


def fleet_load(view: FleetView) -> int:
    """Requests the fleet holds, the queue-depth metric (vLLM's waiting + running, plus what
    the gateway queues for want of a free slot)."""
    return view.queue + sum(r.held for r in view.replicas if r.state in (READY, DRAINING,
                                                                         RECLAIMED))


class StaticOnDemand:
    """A fixed on-demand fleet sized for the peak."""

    name = "static_on_demand"

    def __init__(self, replicas: int) -> None:
        self.replicas = replicas

    def decide(self, view: FleetView) -> PoolPlan:
        return PoolPlan(0, self.replicas)


class KedaThreshold:
    """KEDA Prometheus trigger (AverageValue) driving the HPA algorithm, on-demand only."""

    name = "keda_threshold"

    def __init__(self, target: float, min_replicas: int = 1, max_replicas: int = 1000,
                 tolerance: float = 0.1, down_window: float = 300.0) -> None:
        self.target, self.min, self.max = target, min_replicas, max_replicas
        self.tolerance, self.down_window = tolerance, down_window
        self.current = min_replicas
        self.history: deque[tuple[float, int]] = deque()

    def decide(self, view: FleetView) -> PoolPlan:
        load = fleet_load(view)
        cur = max(self.current, 1)
        ratio = load / (self.target * cur)
        rec = cur if abs(ratio - 1.0) <= self.tolerance else math.ceil(load / self.target)
        rec = min(max(rec, self.min), self.max)
        self.history.append((view.now, rec))
        while self.history and self.history[0][0] < view.now - self.down_window:
            self.history.popleft()
        if rec > self.current:
            # HPA default scale-up policy: +100% or +4 pods per period, whichever is more.
            self.current = min(rec, max(2 * self.current, self.current + 4))
        else:
            self.current = min(self.current, max(n for _, n in self.history))
        return PoolPlan(0, self.current)


class SkyServeFallback:
    """SkyServe's FallbackRequestRateAutoscaler: QPS target, consecutive-period hysteresis,
    base on-demand replicas plus on-demand for every spot replica that is not ready."""

    name = "skyserve_fallback"

    def __init__(self, target_qps: float, interval: float, base_on_demand: int = 1,
                 min_replicas: int = 1, max_replicas: int = 1000, upscale_delay: float = 300.0,
                 downscale_delay: float = 1200.0) -> None:
        self.target_qps, self.base = target_qps, base_on_demand
        self.min, self.max = max(min_replicas, base_on_demand), max_replicas
        self.up_periods = int(upscale_delay / interval)
        self.down_periods = int(downscale_delay / interval)
        self.target_num = self.min
        self.up = self.down = 0

    def decide(self, view: FleetView) -> PoolPlan:
        qps = view.arrivals_last_minute / 60.0
        want = min(max(math.ceil(qps / self.target_qps), self.min), self.max)
        if self.target_num == 0:
            self.target_num = want
        elif want > self.target_num:
            self.up, self.down = self.up + 1, 0
            if self.up >= self.up_periods:
                self.up, self.target_num = 0, want
        elif want < self.target_num:
            self.down, self.up = self.down + 1, 0
            if self.down >= self.down_periods:
                self.down, self.target_num = 0, want
        else:
            self.up = self.down = 0
        spot = self.target_num - self.base
        ready_spot = sum(1 for r in view.replicas if r.pool == "spot" and r.state == READY)
        on_demand = self.base + max(0, spot - ready_spot)
        return PoolPlan(spot, on_demand)


class Oracle:
    """Perfect foresight: knows every arrival and every future spot capacity.

    `need[k]` is the replica count the requests arriving in the minute from slot k need at the
    shared per-replica load; a replica is launched a cold start ahead of the slot that needs
    it, on spot wherever capacity stays available from launch to use, else on demand.
    """

    name = "oracle"

    def __init__(self, need: list[int], capacity: list[int], start: float, interval: float,
                 startup: float) -> None:
        self.start, self.interval = start, interval
        lead = math.ceil(startup / interval) + 1
        spot_ready = []
        for k, n in enumerate(need):
            lo = max(0, k - lead)
            spot_ready.append(min(n, min(capacity[lo:k + 1])))
        self.spot = [max(spot_ready[k:k + lead + 1]) for k in range(len(need))]
        self.spot = [min(s, capacity[k]) for k, s in enumerate(self.spot)]
        od = [n - s for n, s in zip(need, spot_ready, strict=True)]
        self.on_demand = [max(od[k:k + lead + 1]) for k in range(len(need))]

    def decide(self, view: FleetView) -> PoolPlan:
        k = min(len(self.spot) - 1, max(0, round((view.now - self.start) / self.interval)))
        return PoolPlan(self.spot[k], self.on_demand[k])


def request_cost_seconds(a: Arrival, profile: ReplicaProfile, concurrency: float) -> float:
    """Replica-seconds one request takes when the replica carries `concurrency` requests:
    its prefill alone, then its decoded tokens at the aggregate rate T(concurrency)."""
    prefill = a.prompt / profile.prefill_tokens_per_s if profile.prefill_tokens_per_s else 0.0
    c = max(1, min(profile.max_concurrency, round(concurrency)))
    return prefill + max(0, a.output - 1) / profile.throughput(c)


def need_timeline(arrivals: list[Arrival], profile: ReplicaProfile, concurrency: float,
                  start: float, end: float, step: float, window: float = 60.0) -> list[int]:
    """Replicas the arrivals of each [t, t + window) need, for t = start, start + step, ..."""
    times = [a.t for a in arrivals]
    cost = list(itertools.accumulate((request_cost_seconds(a, profile, concurrency)
                                      for a in arrivals), initial=0.0))
    out = []
    t = start
    while t < end:
        lo = bisect.bisect_left(times, t)
        hi = bisect.bisect_left(times, t + window)
        out.append(math.ceil((cost[hi] - cost[lo]) / window - 1e-9))
        t += step
    return out


