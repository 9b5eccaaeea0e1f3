"""``spotmesh simulate``: the command line of the trace simulator."""

from __future__ import annotations

import argparse
import sys

import cli.simulate
from cli import write_json
from cli.simulate.profile import DEFAULT_PROFILE, load_profile
from cli.simulate.report import format_table, write_plot
from cli.simulate.run import run_scenario
from cli.simulate.scenario import POLICY_NAMES, WINDOW_SUBSETS, Scenario
from cli.simulate.traces import (
    AZURE_CONV_MEAN_OUTPUT_TOKENS,
    AZURE_CONV_MEAN_PROMPT_TOKENS,
    load_arrivals,
    load_availability,
    load_on_demand_price,
    load_spot_price,
)
from services.autoscaler.actuator import reclaim_admit_seconds
from services.autoscaler.signals import Prices


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arrivals", required=True,
                   help="Azure LLM trace CSV (TIMESTAMP,ContextTokens,GeneratedTokens) or a "
                        "per-minute counts CSV (minute,count)")
    p.add_argument("--spot-availability", required=True,
                   help="CSV tick,t_seconds,<zone columns>: spot instances obtainable per zone")
    p.add_argument("--prices", required=True,
                   help="spot price table (TSV or CSV): availability_zone_id, instance_type, "
                        "product_description, spot_price_usd_per_hour, timestamp_utc")
    p.add_argument("--on-demand-prices", required=True,
                   help="CSV with instance_type and on_demand_usd_per_hour")
    p.add_argument("--instance-type", default="p3.2xlarge")
    p.add_argument("--zones", default="",
                   help="comma-separated zone columns of the availability trace (default all)")
    p.add_argument("--policy", action="append", choices=POLICY_NAMES, default=None,
                   help="a policy to run (repeatable; default all)")
    p.add_argument("--rate-scale", type=float, default=1.0,
                   help="per-minute counts: multiply each count; Azure trace: replay this many "
                        "times faster")
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="availability-trace seconds per simulated second (1 = real time)")
    p.add_argument("--windows", type=int, default=16,
                   help="windows spread evenly over the availability trace")
    p.add_argument("--window-hours", type=float, default=3.0)
    p.add_argument("--window-subset", default="all", choices=WINDOW_SUBSETS,
                   help="run all windows, or only the even- or odd-indexed ones (tune a policy "
                        "on one half, judge it on the other)")
    p.add_argument("--warmup-minutes", type=float, default=30.0,
                   help="simulated before each window, neither billed nor measured")
    p.add_argument("--profile", default=str(DEFAULT_PROFILE),
                   help="replica profile JSON, or a `spotmesh bench serve --json` output")
    p.add_argument("--startup-seconds", type=float, default=None,
                   help="replica cold start (default: the profile's)")
    p.add_argument("--slo-ttft-seconds", type=float, default=2.0)
    p.add_argument("--interval-seconds", type=float, default=20.0,
                   help="how often every policy decides (SkyServe's default decision interval)")
    p.add_argument("--preemption-notice-seconds", type=float, default=120.0,
                   help="warning before a reclaimed spot replica is terminated (AWS: 120)")
    p.add_argument("--drain-admit-seconds", type=float, default=None,
                   help="seconds of a reclaim notice a replica keeps taking requests, as "
                        "spotmesh's replicas do (Drain admit_seconds; default: all but the "
                        "notice's last 30 s; 0 stops admission at the notice)")
    p.add_argument("--target-load-per-replica", type=float, default=16.0,
                   help="waiting + running per replica that every policy sizes for")
    p.add_argument("--on-demand-floor", type=int, default=1,
                   help="on-demand replicas always kept by spotmesh and SkyServe (SkyServe's "
                        "base_ondemand_fallback_replicas); both also fall back to on-demand "
                        "dynamically")
    p.add_argument("--skyserve-upscale-delay-seconds", type=float, default=300.0,
                   help="SkyServe's upscale_delay_seconds (its default)")
    p.add_argument("--skyserve-downscale-delay-seconds", type=float, default=1200.0,
                   help="SkyServe's downscale_delay_seconds (its default)")
    p.add_argument("--static-replicas", type=int, default=0,
                   help="size of the static fleet (default: the peak need of the replay)")
    p.add_argument("--spot-price-stat", default="mean", choices=["mean", "median", "min", "max"],
                   help="how zone spot prices of the trace's regions combine into one price")
    p.add_argument("--prompt-tokens", type=int, default=AZURE_CONV_MEAN_PROMPT_TOKENS,
                   help="prompt size of each request of a per-minute counts trace")
    p.add_argument("--output-tokens", type=int, default=AZURE_CONV_MEAN_OUTPUT_TOKENS,
                   help="output size of each request of a per-minute counts trace")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds arrival times inside each minute of a counts trace")
    p.add_argument("--json", required=True, help="write the report here")
    p.add_argument("--plot", default="", help="write a PNG of load, replicas and latency here")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `simulate` subcommand to the `spotmesh` CLI."""
    p = subparsers.add_parser("simulate", help="replay request and spot-availability traces "
                                               "against autoscaling policies",
                              description=cli.simulate.__doc__.split("\n\n")[0])
    _add_arguments(p)
    p.set_defaults(fn=run)
    return p


def _check(args: argparse.Namespace) -> None:
    for key, low in (("windows", 1), ("window_hours", 1e-9), ("time_scale", 1e-9),
                     ("interval_seconds", 1e-9), ("slo_ttft_seconds", 1e-9),
                     ("target_load_per_replica", 1e-9), ("prompt_tokens", 0),
                     ("output_tokens", 1)):
        if getattr(args, key) < low:
            raise SystemExit(f"--{key.replace('_', '-')} must be >= {low:g}, got "
                             f"{getattr(args, key)}")
    for key in ("warmup_minutes", "preemption_notice_seconds", "on_demand_floor",
                "static_replicas", "skyserve_upscale_delay_seconds",
                "skyserve_downscale_delay_seconds"):
        if getattr(args, key) < 0:
            raise SystemExit(f"--{key.replace('_', '-')} must be >= 0, got {getattr(args, key)}")
    admit = args.drain_admit_seconds
    if admit is not None and not 0 <= admit <= args.preemption_notice_seconds:
        raise SystemExit(f"--drain-admit-seconds must be in [0, --preemption-notice-seconds "
                         f"({args.preemption_notice_seconds:g})], got {admit:g}")


def build_scenario(args: argparse.Namespace) -> Scenario:
    _check(args)
    zones = [z.strip() for z in args.zones.split(",") if z.strip()]
    arrivals = load_arrivals(args.arrivals, args.rate_scale, args.prompt_tokens,
                             args.output_tokens, args.seed)
    availability = load_availability(args.spot_availability, zones)
    spot = load_spot_price(args.prices, args.instance_type, availability.zones,
                           args.spot_price_stat)
    on_demand = load_on_demand_price(args.on_demand_prices, args.instance_type)
    profile = load_profile(args.profile, args.startup_seconds)
    return Scenario(
        arrivals=arrivals, availability=availability, profile=profile,
        prices=Prices(spot_usd_per_hour=spot.usd_per_hour, on_demand_usd_per_hour=on_demand),
        spot_price=spot, instance_type=args.instance_type, windows=args.windows,
        window_hours=args.window_hours, warmup_minutes=args.warmup_minutes,
        time_scale=args.time_scale, interval=args.interval_seconds,
        notice=args.preemption_notice_seconds, slo_ttft=args.slo_ttft_seconds,
        drain_admit=(reclaim_admit_seconds(args.preemption_notice_seconds)
                     if args.drain_admit_seconds is None else args.drain_admit_seconds),
        target_load=args.target_load_per_replica, on_demand_floor=args.on_demand_floor,
        static_replicas=args.static_replicas, window_subset=args.window_subset,
        skyserve_delays=(args.skyserve_upscale_delay_seconds,
                         args.skyserve_downscale_delay_seconds))


def run(args: argparse.Namespace) -> int:
    """`spotmesh simulate`: run, print the table, write the JSON (and the PNG)."""
    sc = build_scenario(args)
    policies = list(dict.fromkeys(args.policy or POLICY_NAMES))

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    log(f"simulating {', '.join(policies)} over {sc.windows} x {sc.window_hours:g} h "
        f"({sc.arrivals.kind} arrivals, {sc.profile.name}, spot ${sc.prices.spot_usd_per_hour}"
        f"/h, on-demand ${sc.prices.on_demand_usd_per_hour}/h)")
    report = run_scenario(sc, policies, log)
    doc = {k: v for k, v in report.items() if not k.startswith("_")}
    write_json(args.json, doc)
    log(f"wrote {args.json}")
    if args.plot:
        write_plot(report, args.plot)
        log(f"wrote {args.plot}")
    print(format_table(doc))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="spotmesh simulate",
                                description=cli.simulate.__doc__.split("\n\n")[0])
    _add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
