"""What a run says: the per-policy report (the JSON document), the table and the plot."""

from __future__ import annotations

import os
import platform
import statistics

from cli.simulate.engine import WindowResult
from cli.simulate.scenario import Scenario
from cli.stats import percentile


def build_report(sc: Scenario, results: dict[str, list[WindowResult]], static: int,
                 target_qps: float) -> dict:
    """The per-policy report of a run: the JSON document ``spotmesh simulate --json`` writes."""
    policies: dict[str, dict] = {}
    for name, windows in results.items():
        cost = sum(r.cost_usd for r in windows)
        arrived = sum(r.arrived for r in windows)
        met = sum(r.slo_met for r in windows)
        tokens_prompt = sum(r.prompt_tokens for r in windows)
        tokens_output = sum(r.output_tokens for r in windows)
        ttft = [x for r in windows for x in r.ttft]
        waits = [x for r in windows for x in r.queue_wait]
        total_tokens = tokens_prompt + tokens_output
        hours = len(windows) * sc.window_hours
        spot_h = sum(r.replica_seconds["spot"] for r in windows) / 3600.0
        od_h = sum(r.replica_seconds["on-demand"] for r in windows) / 3600.0
        policies[name] = {
            "cost_usd": round(cost, 4),
            "cost_per_mtok_usd": round(cost / total_tokens * 1e6, 4) if total_tokens else None,
            "cost_per_mtok_output_usd": (round(cost / tokens_output * 1e6, 4)
                                         if tokens_output else None),
            "slo_attainment": round(met / max(1, arrived), 5),
            "preemptions": sum(r.preemptions for r in windows),
            "replica_hours": {"spot": round(spot_h, 3), "on_demand": round(od_h, 3)},
            "mean_replicas": round((spot_h + od_h) / hours, 3) if hours else 0.0,
            "requests": arrived,
            "requests_unfinished": sum(r.unfinished for r in windows),
            "resumed_requests": sum(r.resumed for r in windows),
            "tokens": {"prompt": tokens_prompt, "output": tokens_output},
            "ttft_s": {"p50": _round(percentile(ttft, 0.5)),
                       "p99": _round(percentile(ttft, 0.99)),
                       "max": _round(max(ttft) if ttft else None)},
            "queue_wait_s_p99": _round(percentile(waits, 0.99)),
            "launches": {"spot": sum(r.launches["spot"] for r in windows),
                         "on_demand": sum(r.launches["on-demand"] for r in windows)},
            "per_window_cost_usd": [round(r.cost_usd, 3) for r in windows],
            "per_window_slo_attainment": [
                round(r.slo_met / max(1, r.arrived), 5) for r in windows],
        }
    for p in policies.values():
        if "static_on_demand" in policies and policies["static_on_demand"]["cost_usd"]:
            p["cost_vs_static"] = round(p["cost_usd"] / policies["static_on_demand"]["cost_usd"],
                                        4)
        if "oracle" in policies and policies["oracle"]["cost_usd"]:
            p["cost_vs_oracle"] = round(p["cost_usd"] / policies["oracle"]["cost_usd"], 4)
    goal = None
    if {"spotmesh", "static_on_demand", "oracle"} <= set(policies):
        s = policies["spotmesh"]
        goal = {
            "target": "spotmesh cost <= 0.55x static_on_demand at slo_attainment >= 0.99, "
                      "and <= 1.2x oracle",
            "cost_vs_static": s.get("cost_vs_static"), "cost_vs_oracle": s.get("cost_vs_oracle"),
            "slo_attainment": s["slo_attainment"],
            "met": bool(s.get("cost_vs_static", 9) <= 0.55 and s["slo_attainment"] >= 0.99
                        and s.get("cost_vs_oracle", 9) <= 1.2),
        }
    offsets = sc.offsets()
    doc = {
        "benchmark": "simulate",
        "inputs": {
            "arrivals": {"path": sc.arrivals.path, "kind": sc.arrivals.kind,
                         "requests": sc.arrivals.requests,
                         "loop_period_s": round(sc.arrivals.span, 3),
                         "mean_prompt_tokens": round(sc.arrivals.mean_sizes()[0], 1),
                         "mean_output_tokens": round(sc.arrivals.mean_sizes()[1], 1)},
            "spot_availability": {"path": sc.availability.path,
                                  "tick_s": sc.availability.tick_seconds,
                                  "ticks": len(sc.availability.capacity),
                                  "zones": list(sc.availability.zones),
                                  "mean_capacity": round(statistics.fmean(
                                      sc.availability.capacity), 3)},
            "instance_type": sc.instance_type,
            "spot_usd_per_hour": sc.prices.spot_usd_per_hour,
            "spot_price": {"stat": sc.spot_price.stat, "zone_ids": list(sc.spot_price.zones),
                           "note": sc.spot_price.note},
            "on_demand_usd_per_hour": sc.prices.on_demand_usd_per_hour,
            "profile": sc.profile.as_dict(),
        },
        "parameters": {
            "windows": sc.windows, "window_subset": sc.window_subset,
            "window_indices": sc.indices(), "window_hours": sc.window_hours,
            "warmup_minutes": sc.warmup_minutes, "time_scale": sc.time_scale,
            "interval_s": sc.interval, "preemption_notice_s": sc.notice,
            "drain_admit_s": sc.drain_admit,
            "slo_ttft_s": sc.slo_ttft, "target_load_per_replica": sc.target_load,
            "on_demand_floor": sc.on_demand_floor, "static_replicas": static,
            "skyserve_target_qps_per_replica": round(target_qps, 4),
            "skyserve_delays_s": {"upscale": sc.skyserve_delays[0],
                                  "downscale": sc.skyserve_delays[1]},
            "window_offsets": [{"arrivals_s": round(a, 1), "availability_s": round(v, 1),
                                "availability_day": round(v / 86400, 2)} for a, v in offsets],
        },
        "alignment": (f"{len(offsets)} of {sc.windows} windows of {sc.window_hours:g} h "
                      f"(+{sc.warmup_minutes:g} min unmeasured warm-up), spread evenly over "
                      f"the availability trace; the "
                      f"arrivals trace is looped from the same fractional offset; availability "
                      f"advances {sc.time_scale:g} trace s per simulated s"),
        "policies": policies,
        "goal": goal,
        "by_window_parity": _by_parity(sc, results),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
    }
    return doc


def _by_parity(sc: Scenario, results: dict[str, list[WindowResult]]) -> dict:
    """Cost and SLO attainment over the even-indexed windows (where spotmesh's policy was
    tuned) and the odd-indexed ones (held out), from the same per-window results."""
    idx = sc.indices()
    out: dict[str, dict] = {}
    for parity, rem in (("even", 0), ("odd", 1)):
        rows = [k for k, i in enumerate(idx) if i % 2 == rem]
        if not rows:
            continue
        part: dict[str, dict] = {}
        for name, windows in results.items():
            cost = sum(windows[k].cost_usd for k in rows)
            arrived = sum(windows[k].arrived for k in rows)
            part[name] = {"cost_usd": round(cost, 4), "slo_attainment": round(
                sum(windows[k].slo_met for k in rows) / max(1, arrived), 5)}
        for p in part.values():
            for base, key in (("static_on_demand", "cost_vs_static"),
                              ("oracle", "cost_vs_oracle")):
                if base in part and part[base]["cost_usd"]:
                    p[key] = round(p["cost_usd"] / part[base]["cost_usd"], 4)
        out[parity] = {"role": "tuning" if parity == "even" else "hold-out",
                       "windows": [idx[k] for k in rows], "policies": part}
    return out


def _round(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(x, nd)


def _ratio(p: dict, key: str, width: int = 0) -> str:
    """A cost ratio, or "-" where its baseline policy was not run."""
    return f"{p[key]:>{width}.3f}" if key in p else f"{'-':>{width}}"


def format_table(report: dict) -> str:
    """The per-policy table printed after a run."""
    head = (f"{'policy':<18} {'cost $':>9} {'$/1M tok':>9} {'SLO':>8} {'preempt':>7} "
            f"{'spot h':>8} {'od h':>8} {'vs static':>9} {'vs oracle':>9} {'TTFT p99':>8}")
    lines = [head, "-" * len(head)]
    for name, p in report["policies"].items():
        lines.append(
            f"{name:<18} {p['cost_usd']:>9.2f} {p['cost_per_mtok_usd'] or 0:>9.4f} "
            f"{p['slo_attainment'] * 100:>7.2f}% {p['preemptions']:>7d} "
            f"{p['replica_hours']['spot']:>8.2f} {p['replica_hours']['on_demand']:>8.2f} "
            f"{_ratio(p, 'cost_vs_static', 9)} "
            f"{_ratio(p, 'cost_vs_oracle', 9)} {p['ttft_s']['p99'] or 0:>7.2f}s")
    for parity, part in report.get("by_window_parity", {}).items():
        s = part["policies"].get("spotmesh")
        if s and len(report.get("by_window_parity", {})) > 1:
            ratios = [f"{s[key]:.3f}x {base}" for key, base in (("cost_vs_static", "static"),
                                                                 ("cost_vs_oracle", "oracle"))
                      if key in s]
            lines.append(f"spotmesh on {parity} windows ({part['role']}): "
                         + ", ".join([*ratios, f"SLO {s['slo_attainment'] * 100:.2f}%"]))
    goal = report.get("goal")
    if goal:
        lines.append(f"goal ({goal['target']}): {'MET' if goal['met'] else 'NOT MET'} "
                     f"(spotmesh {goal['cost_vs_static']}x static, {goal['cost_vs_oracle']}x "
                     f"oracle, SLO {goal['slo_attainment'] * 100:.2f}%)")
    return "\n".join(lines)


def write_plot(report: dict, path: str) -> None:
    """Load, replicas per pool and TTFT over time for each policy, windows side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timelines: dict[str, list] = report["_timelines"]
    ttfts: dict[str, list] = report["_ttft"]
    names = list(timelines)
    hours = report["parameters"]["window_hours"]
    fig, axes = plt.subplots(len(names) + 1, 1, figsize=(14, 2.6 * (len(names) + 1)),
                             sharex=True)
    first = timelines[names[0]]
    ax = axes[0]
    for w, tl in enumerate(first):
        x = [w * hours + t / 3600.0 for t, *_ in tl]
        ax.plot(x, [row[1] / 60.0 for row in tl], color="tab:blue", lw=0.7,
                label="arrivals (req/s, 60 s window)" if w == 0 else None)
    ax.set_ylabel("req/s")
    ax2 = ax.twinx()
    for w, tl in enumerate(first):
        x = [w * hours + t / 3600.0 for t, *_ in tl]
        ax2.step(x, [row[6] for row in tl], color="tab:orange", lw=0.8, where="post",
                 label="spot capacity" if w == 0 else None)
    ax2.set_ylabel("spot capacity")
    ax.set_title("load and spot capacity")
    ax.legend(loc="upper left", fontsize=8)
    ax2.legend(loc="upper right", fontsize=8)
    for i, name in enumerate(names, start=1):
        ax = axes[i]
        for w, tl in enumerate(timelines[name]):
            x = [w * hours + t / 3600.0 for t, *_ in tl]
            spot = [row[2] for row in tl]
            od = [row[3] for row in tl]
            ax.stackplot(x, od, spot, colors=["tab:red", "tab:green"], alpha=0.6,
                         labels=["on-demand ready", "spot ready"] if w == 0 else ())
        ax.set_ylabel("replicas")
        p = report["policies"][name]
        ax.set_title(f"{name}: ${p['cost_usd']:.2f}, SLO {p['slo_attainment'] * 100:.2f}%, "
                     f"{p['preemptions']} preemptions", fontsize=10)
        ax.legend(loc="upper left", fontsize=8)
        axt = ax.twinx()
        for w, pairs in enumerate(ttfts[name]):
            per_min: dict[int, list[float]] = {}
            for arrival, ttft in pairs:
                per_min.setdefault(int(arrival // 60), []).append(ttft)
            mins = sorted(per_min)
            axt.plot([w * hours + (m + 0.5) / 60.0 for m in mins],
                     [percentile(per_min[m], 0.99) for m in mins], color="black", lw=0.6,
                     label="TTFT p99 per minute (s)" if w == 0 else None)
        axt.axhline(report["parameters"]["slo_ttft_s"], color="grey", ls="--", lw=0.6)
        axt.set_yscale("log")
        axt.set_ylim(0.1, 1000.0)
        axt.set_ylabel("TTFT p99 (s)")
        axt.legend(loc="upper right", fontsize=8)
    for ax in axes:
        for w in range(1, len(first)):
            ax.axvline(w * hours, color="grey", lw=0.5)
    axes[-1].set_xlabel(f"hours (windows of {hours:g} h placed side by side)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


