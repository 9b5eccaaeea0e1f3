"""Running a scenario: every policy simulated on every window, then the report."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

from cli.simulate.adapter import SpotmeshPolicy
from cli.simulate.baselines import (
    KedaThreshold,
    Oracle,
    SkyServeFallback,
    StaticOnDemand,
    need_timeline,
    request_cost_seconds,
)
from cli.simulate.engine import SimPolicy, Simulation, WindowResult
from cli.simulate.report import build_report
from cli.simulate.scenario import POLICY_NAMES, Scenario
from cli.simulate.traces import Arrival
from services.autoscaler.policy import PolicyConfig


def run_scenario(sc: Scenario, policies: Sequence[str],
                 log: Callable[[str], None] = lambda s: None) -> dict:
    """Simulate every policy on every window; return the report (the JSON document)."""
    duration = sc.window_hours * 3600.0
    warmup = sc.warmup_minutes * 60.0
    lookahead = sc.profile.startup_seconds + 2 * 60.0 + sc.interval * 4
    window_arrivals = []
    needs = []
    for a_off, _ in sc.offsets():
        arr = [Arrival(a.t - a_off, a.prompt, a.output)
               for a in sc.arrivals.between(a_off - warmup, a_off + duration + lookahead)]
        window_arrivals.append(arr)
        needs.append(need_timeline(arr, sc.profile, sc.target_load, -warmup,
                                   duration + lookahead, sc.interval))
    static = sc.static_replicas or max(max(n) for n in needs)
    mean_prompt, mean_output = sc.arrivals.mean_sizes()
    probe = Arrival(0.0, round(mean_prompt), round(mean_output))
    # The QPS one replica sustains at the target load (Little's law over its service time).
    target_qps = 1.0 / request_cost_seconds(probe, sc.profile, sc.target_load)
    config = PolicyConfig(target_load_per_replica=sc.target_load,
                          on_demand_floor=sc.on_demand_floor,
                          pending_grace_seconds=sc.profile.startup_seconds + 120.0)
    results: dict[str, list[WindowResult]] = {p: [] for p in policies}
    timelines: dict[str, list] = {p: [] for p in policies}
    started = time.monotonic()
    for p_name in policies:
        for w, (_, v_off) in enumerate(sc.offsets()):
            def capacity_at(t: float, v_off: float = v_off) -> int:
                return sc.availability.at(v_off + t * sc.time_scale)

            policy: SimPolicy
            if p_name == "static_on_demand":
                policy = StaticOnDemand(static)
            elif p_name == "keda_threshold":
                policy = KedaThreshold(sc.target_load)
            elif p_name == "skyserve_fallback":
                policy = SkyServeFallback(target_qps, sc.interval,
                                          base_on_demand=sc.on_demand_floor,
                                          min_replicas=max(1, sc.on_demand_floor),
                                          upscale_delay=sc.skyserve_delays[0],
                                          downscale_delay=sc.skyserve_delays[1])
            elif p_name == "spotmesh":
                policy = SpotmeshPolicy(config, sc.prices)
            elif p_name == "oracle":
                steps = len(needs[w])
                capacity = []
                for k in range(steps):
                    t0 = -warmup + k * sc.interval
                    capacity.append(min(capacity_at(t0), capacity_at(t0 + sc.interval - 1e-6)))
                policy = Oracle(needs[w], capacity, -warmup, sc.interval,
                                sc.profile.startup_seconds)
            else:
                raise SystemExit(f"unknown policy {p_name!r} (choose from {POLICY_NAMES})")

            def progress(pct: str, w: int = w, p_name: str = p_name) -> None:
                log(f"[{p_name}] window {sc.indices()[w] + 1}/{sc.windows}: {pct} "
                    f"({time.monotonic() - started:.0f}s elapsed)")

            sim = Simulation(policy, [a for a in window_arrivals[w] if a.t < duration],
                             capacity_at,
                             sc.availability.tick_seconds / sc.time_scale, sc.profile, sc.prices,
                             duration, warmup, sc.interval, sc.notice, sc.slo_ttft,
                             progress=progress, drain_admit=sc.drain_admit)
            results[p_name].append(sim.run())
            timelines[p_name].append(sim.result.timeline)
    report = build_report(sc, results, static, target_qps)
    report["parameters"]["spotmesh_policy_config"] = dataclasses.asdict(config)
    report["_timelines"] = timelines
    report["_ttft"] = {p: [r.ttft_by_arrival for r in results[p]] for p in policies}
    return report


