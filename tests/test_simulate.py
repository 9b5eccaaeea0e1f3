"""The trace simulator: small synthetic traces (deterministic, seconds to run), bad inputs, the
report's shape, and one run on the real shared data when it is present."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from cli.datasets import data_dir
from cli.simulate import command as simulate
from cli.simulate.engine import FleetView, Simulation
from cli.simulate.profile import ReplicaProfile, load_profile
from cli.simulate.scenario import POLICY_NAMES
from cli.simulate.traces import (
    Arrival,
    load_arrivals,
    load_availability,
    load_on_demand_price,
    load_spot_price,
    zone_id_prefix,
)
from services.autoscaler.policy import PoolPlan
from services.autoscaler.signals import Prices

REPO = Path(__file__).resolve().parents[1]
FIELDS = ("cost_usd", "cost_per_mtok_usd", "slo_attainment", "preemptions", "replica_hours")


def write_arrivals(path: Path, seconds: int = 900, per_second: int = 2) -> Path:
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    for i in range(seconds * per_second):
        t = i / per_second
        lines.append(f"2023-11-16 18:{15 + int(t // 60):02d}:{t % 60:010.7f},"
                     f"{200 + (i * 37) % 600},{20 + (i * 13) % 120}")
    path.write_text("\n".join(lines) + "\n")
    return path


def write_availability(path: Path, capacity: list[tuple[int, int]], tick: int = 60) -> Path:
    lines = ["tick,t_seconds,us-east-1a_v100_1,us-east-1b_v100_1"]
    lines += [f"{i},{i * tick},{a},{b}" for i, (a, b) in enumerate(capacity)]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_prices(path: Path) -> Path:
    path.write_text(
        "availability_zone_id\tinstance_type\tproduct_description\tspot_price_usd_per_hour\t"
        "timestamp_utc\n"
        "use1-az1\tp3.2xlarge\tLinux/UNIX\t0.950000\t2022-05-31T10:00:00+00:00\n"
        "use1-az1\tp3.2xlarge\tLinux/UNIX\t0.900000\t2022-05-31T12:00:00+00:00\n"
        "use1-az2\tp3.2xlarge\tLinux/UNIX\t1.100000\t2022-05-31T12:00:00+00:00\n"
        "usw2-az1\tp3.2xlarge\tLinux/UNIX\t5.000000\t2022-05-31T12:00:00+00:00\n"
        "use1-az1\tg5.xlarge\tLinux/UNIX\t0.400000\t2022-05-31T12:00:00+00:00\n")
    return path


def write_on_demand(path: Path) -> Path:
    path.write_text("instance_type,gpus,on_demand_usd_per_hour\np3.2xlarge,1,3.0\n"
                    "g5.xlarge,1,1.006\n")
    return path


def write_profile(path: Path) -> Path:
    path.write_text(json.dumps({
        "name": "test-replica", "source": "made up for tests", "startup_seconds": 60,
        "max_concurrency": 8, "prefill_tokens_per_s": 5000, "kv_capacity_tokens": 20000,
        "decode_tokens_per_s": [[1, 100], [4, 300], [8, 400]]}))
    return path


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    # Two zones, one spot instance each; both are reclaimed for five minutes mid-window.
    capacity = [(1, 1)] * 12 + [(0, 0)] * 5 + [(1, 1)] * 23
    return {"arrivals": write_arrivals(tmp_path / "trace.csv"),
            "availability": write_availability(tmp_path / "avail.csv", capacity),
            "prices": write_prices(tmp_path / "spot.tsv"),
            "on_demand": write_on_demand(tmp_path / "od.csv"),
            "profile": write_profile(tmp_path / "profile.json")}


def argv(inputs: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["--arrivals", str(inputs["arrivals"]),
            "--spot-availability", str(inputs["availability"]),
            "--prices", str(inputs["prices"]), "--on-demand-prices", str(inputs["on_demand"]),
            "--profile", str(inputs["profile"]), "--windows", "1", "--window-hours", "0.4",
            "--warmup-minutes", "5", "--interval-seconds", "10",
            "--preemption-notice-seconds", "30", "--target-load-per-replica", "4",
            "--json", str(out), *extra]


def run_json(inputs: dict[str, Path], out: Path, *extra: str) -> dict:
    assert simulate.main(argv(inputs, out, *extra)) == 0
    return json.loads(out.read_text())


def test_report_compares_every_policy_with_the_required_fields(inputs, tmp_path, capsys) -> None:
    doc = run_json(inputs, tmp_path / "out.json")
    assert list(doc["policies"]) == list(POLICY_NAMES)
    for name, p in doc["policies"].items():
        for key in FIELDS:
            assert key in p, (name, key)
        assert set(p["replica_hours"]) == {"spot", "on_demand"}
        assert 0.0 <= p["slo_attainment"] <= 1.0
        assert p["requests"] > 0 and p["cost_usd"] > 0
        assert p["cost_per_mtok_usd"] == pytest.approx(
            p["cost_usd"] / (p["tokens"]["prompt"] + p["tokens"]["output"]) * 1e6, rel=1e-3)
    assert doc["inputs"]["instance_type"] == "p3.2xlarge"
    assert doc["inputs"]["on_demand_usd_per_hour"] == 3.0
    # The latest price of each zone in the trace's region, averaged: (0.90 + 1.10) / 2.
    assert doc["inputs"]["spot_usd_per_hour"] == pytest.approx(1.0)
    assert doc["parameters"]["slo_ttft_s"] == 2.0
    assert doc["goal"]["target"].startswith("spotmesh cost <= 0.55x")
    table = capsys.readouterr().out
    for name in POLICY_NAMES:
        assert name in table


def test_progress_is_reported_on_stderr(inputs, tmp_path, capsys) -> None:
    run_json(inputs, tmp_path / "out.json", "--policy", "spotmesh")
    err = capsys.readouterr().err
    assert "[spotmesh] window 1/1: 50%" in err
    assert "[spotmesh] window 1/1: 100%" in err


def test_runs_are_deterministic(inputs, tmp_path) -> None:
    a = run_json(inputs, tmp_path / "a.json")
    b = run_json(inputs, tmp_path / "b.json")
    assert a["policies"] == b["policies"]


def test_static_fleet_pays_exactly_its_on_demand_hours(inputs, tmp_path) -> None:
    doc = run_json(inputs, tmp_path / "out.json", "--policy", "static_on_demand",
                   "--static-replicas", "3")
    p = doc["policies"]["static_on_demand"]
    hours = 0.4
    assert p["replica_hours"] == {"spot": 0.0, "on_demand": pytest.approx(3 * hours)}
    assert p["cost_usd"] == pytest.approx(3 * hours * 3.0, rel=1e-6)
    assert p["preemptions"] == 0
    assert p["requests_unfinished"] == 0


def test_reclaimed_spot_is_preempted_and_its_requests_resume(inputs, tmp_path) -> None:
    doc = run_json(inputs, tmp_path / "out.json", "--policy", "spotmesh", "--policy",
                   "skyserve_fallback", "--on-demand-floor", "0")
    for name in ("spotmesh", "skyserve_fallback"):
        p = doc["policies"][name]
        assert p["preemptions"] >= 1, name
        assert p["replica_hours"]["on_demand"] > 0, name  # the fallback
        assert p["requests_unfinished"] == 0, name
        # Never more spot than the two zones hold, for the whole window.
        assert p["replica_hours"]["spot"] <= 2 * 0.4 + 1e-9


class FixedAsk:
    """Asks for a fixed fleet whatever happens (for driving the simulated cloud directly)."""

    name = "fixed"

    def __init__(self, spot: int, on_demand: int) -> None:
        self.spot, self.on_demand = spot, on_demand

    def decide(self, view: FleetView) -> PoolPlan:
        return PoolPlan(self.spot, self.on_demand)


def test_spot_is_only_obtained_up_to_the_available_capacity() -> None:
    profile = ReplicaProfile("p", ((1, 100.0), (4, 300.0)), 4, 5000.0, 10_000, 30.0, "test")

    def capacity(t: float) -> int:
        return 1 if 600 <= t < 900 else 3

    arrivals = [Arrival(float(t), 300, 50) for t in range(0, 1800, 2)]
    sim = Simulation(FixedAsk(5, 1), arrivals, capacity, 60.0, profile, Prices(1.0, 3.0),
                     duration=1800.0, warmup=120.0, interval=10.0, notice=20.0, slo=2.0)
    res = sim.run()
    for now, _, spot_ready, _, _, _, cap in res.timeline:
        assert spot_ready <= cap, now
    assert max(row[2] for row in res.timeline) == 3
    assert res.preemptions == 2  # 3 held when capacity fell to 1
    assert res.resumed >= 0 and res.unfinished == 0
    # Billing: spot at most the capacity integral, on-demand exactly one replica.
    assert res.replica_seconds["spot"] <= 3 * 1800 - 2 * 300 + 2 * 20 + 1e-6
    assert res.replica_seconds["on-demand"] == pytest.approx(1800.0)


def test_requests_in_flight_on_a_reclaimed_replica_resume_elsewhere() -> None:
    profile = ReplicaProfile("p", ((1, 10.0), (4, 20.0)), 4, None, None, 0.0, "slow decode")

    def capacity(t: float) -> int:
        return 0 if t >= 100 else 1

    # Long outputs at 10 tokens/s: still decoding when the notice (5 s) runs out.
    arrivals = [Arrival(50.0, 100, 2000), Arrival(51.0, 100, 2000)]
    sim = Simulation(FixedAsk(1, 1), arrivals, capacity, 50.0, profile, Prices(1.0, 3.0),
                     duration=600.0, warmup=60.0, interval=10.0, notice=5.0, slo=10.0)
    res = sim.run()
    assert res.preemptions == 1
    assert res.resumed >= 1
    assert res.requests == 2 and res.unfinished == 0
    assert res.output_tokens == 4000


def test_a_reclaimed_replica_serves_on_for_the_admit_part_of_its_notice() -> None:
    # The only replica is reclaimed at t=100 (notice 90 s) and spot returns at t=300. As
    # spotmesh's replicas do on Drain(admit_seconds), it keeps taking requests for the first
    # 60 s of the notice: a request at t=110 is served at once; one at t=170 (admission over)
    # waits for the new replica. Stopping admission at the notice makes both wait.
    profile = ReplicaProfile("p", ((1, 10.0), (4, 20.0)), 4, None, None, 0.0, "test")

    def capacity(t: float) -> int:
        return 0 if 100 <= t < 300 else 1

    def ttfts(admit: float) -> dict[float, float]:
        arrivals = [Arrival(110.0, 50, 3), Arrival(170.0, 50, 3)]
        sim = Simulation(FixedAsk(1, 0), arrivals, capacity, 10.0, profile, Prices(1.0, 3.0),
                         duration=400.0, warmup=0.0, interval=10.0, notice=90.0, slo=2.0,
                         drain_admit=admit)
        res = sim.run()
        assert res.preemptions == 1 and res.unfinished == 0
        return dict(res.ttft_by_arrival)

    served_on = ttfts(60.0)
    assert served_on[110.0] == pytest.approx(0.0)
    assert served_on[170.0] == pytest.approx(130.0)
    stopped = ttfts(0.0)
    assert stopped[110.0] == pytest.approx(190.0)
    assert stopped[170.0] == pytest.approx(130.0)


def test_oracle_with_ample_spot_buys_no_on_demand(inputs, tmp_path) -> None:
    inputs["availability"] = write_availability(tmp_path / "ample.csv", [(9, 9)] * 40)
    doc = run_json(inputs, tmp_path / "out.json", "--policy", "oracle")
    p = doc["policies"]["oracle"]
    assert p["replica_hours"]["on_demand"] == 0.0
    assert p["preemptions"] == 0
    assert p["slo_attainment"] >= 0.99


def test_plot_is_written(inputs, tmp_path) -> None:
    png = tmp_path / "out.png"
    run_json(inputs, tmp_path / "out.json", "--policy", "spotmesh", "--policy", "oracle",
             "--plot", str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_add_parser_wires_the_simulate_subcommand(inputs, tmp_path) -> None:
    parser = argparse.ArgumentParser(prog="spotmesh")
    sub = parser.add_subparsers(dest="command", required=True)
    simulate.add_parser(sub)
    args = parser.parse_args(["simulate", *argv(inputs, tmp_path / "o.json")])
    assert args.fn is simulate.run
    assert args.instance_type == "p3.2xlarge"
    assert args.policy is None  # all policies


# -- inputs ----------------------------------------------------------------------------------


def test_azure_trace_loops_and_keeps_request_sizes(tmp_path) -> None:
    path = write_arrivals(tmp_path / "t.csv", seconds=60, per_second=1)
    arr = load_arrivals(str(path))
    assert arr.requests == 60
    assert arr.span == pytest.approx(60.0)
    first = arr.between(0, 60)
    again = arr.between(60, 120)
    assert len(first) == len(again) == 60
    assert [a.prompt for a in first] == [a.prompt for a in again]
    assert again[0].t == pytest.approx(60.0)
    assert len(arr.between(-30, 30)) == 60


def test_azure_rate_scale_replays_faster(tmp_path) -> None:
    path = write_arrivals(tmp_path / "t.csv", seconds=60, per_second=1)
    assert len(load_arrivals(str(path), rate_scale=2.0).between(0, 60)) == 120


def test_per_minute_counts_are_scaled_with_carry_and_seeded(tmp_path) -> None:
    path = tmp_path / "counts.csv"
    path.write_text("Time (min),Requests\n0,10\n1,21\n2,0\n3,5\n")
    arr = load_arrivals(str(path), rate_scale=0.5, prompt_tokens=100, output_tokens=10)
    got = arr.between(0, 240)
    assert len(got) == 5 + 10 + 0 + 3  # 5, 10.5 -> 10 (carry .5), 0 -> 0 (carry .5), 3
    assert all(a.prompt == 100 and a.output == 10 for a in got)
    assert [a.t for a in got] == [a.t for a in arr.between(0, 240)]
    assert sum(1 for a in got if 60 <= a.t < 120) == 10


def test_availability_sums_chosen_zones(tmp_path) -> None:
    path = write_availability(tmp_path / "a.csv", [(1, 0), (1, 1), (0, 1)])
    assert load_availability(str(path)).capacity == (1, 2, 1)
    only_b = load_availability(str(path), ["us-east-1b_v100_1"])
    assert only_b.capacity == (0, 1, 1)
    assert only_b.at(60.0) == 1 and only_b.at(180.0) == 0  # loops


@pytest.mark.parametrize(("zone", "prefix"), [
    ("us-east-1a_v100_1", "use1"), ("us-west-2c", "usw2"), ("eu-central-1a", "euc1"),
    ("ap-northeast-1d", "apne1"), ("nonsense", None)])
def test_zone_names_map_to_their_regions_zone_id_prefix(zone: str, prefix: str | None) -> None:
    assert zone_id_prefix(zone) == prefix


def test_spot_price_uses_the_latest_row_per_zone_and_the_chosen_statistic(tmp_path) -> None:
    path = write_prices(tmp_path / "p.tsv")
    zones = ["us-east-1a_v100_1"]
    assert load_spot_price(str(path), "p3.2xlarge", zones).usd_per_hour == pytest.approx(1.0)
    assert load_spot_price(str(path), "p3.2xlarge", zones, "min").usd_per_hour == 0.9
    # No zone of the trace's regions: every zone of the type, said so.
    other = load_spot_price(str(path), "p3.2xlarge", ["eu-west-1a"])
    assert other.usd_per_hour == pytest.approx((0.9 + 1.1 + 5.0) / 3)
    assert "all zones" in other.note


def test_bench_serve_output_becomes_a_profile() -> None:
    profile = load_profile(REPO / "benchmarks" / "results" / "serve-cpu-2core.json")
    doc = json.loads((REPO / "benchmarks" / "results" / "serve-cpu-2core.json").read_text())
    assert profile.decode == tuple((r["concurrency"], r["mesh"]["tokens_per_s"])
                                   for r in doc["runs"])
    assert profile.max_concurrency == max(r["concurrency"] for r in doc["runs"])
    assert profile.prefill_tokens_per_s is None  # measured end to end: prefill is inside
    lo, hi = profile.decode[0], profile.decode[1]
    mid = (lo[0] + hi[0]) // 2
    assert lo[1] < profile.throughput(mid) < hi[1]
    assert profile.throughput(10_000) == profile.decode[-1][1]


def test_default_profile_is_a_documented_curve() -> None:
    profile = load_profile()
    assert profile.startup_seconds == 180
    assert "estimate" in profile.source and "V100" in profile.source
    rates = [t for _, t in profile.decode]
    assert rates == sorted(rates)
    per_request = [t / c for c, t in profile.decode]
    assert per_request == sorted(per_request, reverse=True)  # batching slows each request


# -- bad input -------------------------------------------------------------------------------


def test_price_file_without_the_instance_type_is_an_error(tmp_path) -> None:
    path = write_prices(tmp_path / "p.tsv")
    with pytest.raises(SystemExit, match=r"no spot price for instance type 'p4d\.24xlarge'"):
        load_spot_price(str(path), "p4d.24xlarge")
    od = write_on_demand(tmp_path / "od.csv")
    with pytest.raises(SystemExit, match=r"no on-demand price for instance type 'x1'"):
        load_on_demand_price(str(od), "x1")


def test_empty_trace_is_an_error(tmp_path) -> None:
    header_only = tmp_path / "h.csv"
    header_only.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n")
    with pytest.raises(SystemExit, match="no requests"):
        load_arrivals(str(header_only))
    empty = tmp_path / "e.csv"
    empty.write_text("")
    with pytest.raises(SystemExit, match="empty file"):
        load_arrivals(str(empty))
    counts = tmp_path / "c.csv"
    counts.write_text("minute,count\n0,1\n1,1\n")
    with pytest.raises(SystemExit, match="no requests at --rate-scale"):
        load_arrivals(str(counts), rate_scale=0.1)


@pytest.mark.parametrize(("row", "field"), [
    ("2023-11-16 18:15:47.1,abc,10", "ContextTokens"),
    ("2023-11-16 18:15:47.1,10,-3", "GeneratedTokens"),
    ("yesterday,10,10", "TIMESTAMP"),
])
def test_malformed_trace_row_names_file_line_and_field(tmp_path, row: str, field: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(f"TIMESTAMP,ContextTokens,GeneratedTokens\n"
                    f"2023-11-16 18:15:46.6805900,374,44\n{row}\n")
    with pytest.raises(SystemExit, match=rf"bad\.csv:3: field '{field}'"):
        load_arrivals(str(path))


def test_malformed_availability_and_prices_name_file_line_and_field(tmp_path) -> None:
    avail = tmp_path / "a.csv"
    avail.write_text("tick,t_seconds,us-east-1a_v100_1\n0,0,1\n1,60,lots\n")
    with pytest.raises(SystemExit, match=r"a\.csv:3: field 'us-east-1a_v100_1'"):
        load_availability(str(avail))
    uneven = tmp_path / "u.csv"
    uneven.write_text("tick,t_seconds,z\n0,0,1\n1,60,1\n2,200,1\n")
    with pytest.raises(SystemExit, match="evenly spaced"):
        load_availability(str(uneven))
    with pytest.raises(SystemExit, match="not in the file"):
        load_availability(str(write_availability(tmp_path / "ok.csv", [(1, 1)] * 3)),
                          ["us-east-1z"])
    prices = tmp_path / "p.tsv"
    prices.write_text("availability_zone_id\tinstance_type\tproduct_description\t"
                      "spot_price_usd_per_hour\ttimestamp_utc\n"
                      "use1-az1\tp3.2xlarge\tLinux/UNIX\tfree\t2022-05-31T12:00:00+00:00\n")
    with pytest.raises(SystemExit, match=r"p\.tsv:2: field 'spot_price_usd_per_hour'"):
        load_spot_price(str(prices), "p3.2xlarge")
    od = tmp_path / "od.csv"
    od.write_text("instance_type,on_demand_usd_per_hour\np3.2xlarge,0\n")
    with pytest.raises(SystemExit, match=r"od\.csv:2: field 'on_demand_usd_per_hour'"):
        load_on_demand_price(str(od), "p3.2xlarge")


def test_malformed_profile_names_the_field(tmp_path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"decode_tokens_per_s": [[1, 10], [4, "fast"]]}))
    with pytest.raises(SystemExit, match=r"decode_tokens_per_s\[1\]"):
        load_profile(path)
    path.write_text(json.dumps({"decode_tokens_per_s": [[1, 10]], "prefill_tokens_per_s": -1}))
    with pytest.raises(SystemExit, match="prefill_tokens_per_s"):
        load_profile(path)
    path.write_text("{not json")
    with pytest.raises(SystemExit, match="not JSON"):
        load_profile(path)


def test_bad_flags_are_errors(inputs, tmp_path) -> None:
    with pytest.raises(SystemExit, match="--windows must be >= 1"):
        simulate.main(argv(inputs, tmp_path / "o.json", "--windows", "0"))
    with pytest.raises(SystemExit):
        simulate.main(argv(inputs, tmp_path / "o.json", "--policy", "magic"))
    with pytest.raises(SystemExit, match="--drain-admit-seconds must be in"):
        simulate.main(argv(inputs, tmp_path / "o.json", "--drain-admit-seconds", "31"))
    assert not (tmp_path / "o.json").exists()


# -- the real data ---------------------------------------------------------------------------

DATA = data_dir()
REAL = {"arrivals": "traces/azure_llm_2023_conv.csv",
        "availability": "spot/spot_availability_1-node_aws-02-15-2023.csv",
        "prices": "spot/aws_spot_prices_2022-05-31_accelerator_linux.tsv",
        "on_demand": "prices/on_demand_usd_per_hour.csv"}


@pytest.mark.skipif(DATA is None or not all((DATA / p).exists() for p in REAL.values()),
                    reason="../shared/data not present")
def test_real_shared_data_produces_the_report_shape(tmp_path) -> None:
    assert DATA is not None
    out = tmp_path / "real.json"
    assert simulate.main([
        "--arrivals", str(DATA / REAL["arrivals"]),
        "--spot-availability", str(DATA / REAL["availability"]),
        "--prices", str(DATA / REAL["prices"]),
        "--on-demand-prices", str(DATA / REAL["on_demand"]),
        "--instance-type", "p3.2xlarge", "--windows", "1", "--window-hours", "0.25",
        "--warmup-minutes", "10", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert set(doc["policies"]) == set(POLICY_NAMES)
    for p in doc["policies"].values():
        for key in FIELDS:
            assert isinstance(p[key], dict if key == "replica_hours" else (int, float))
        assert not math.isnan(p["cost_usd"])
    assert doc["inputs"]["arrivals"]["requests"] == 19366
    assert doc["inputs"]["on_demand_usd_per_hour"] == 3.06
    assert doc["policies"]["static_on_demand"]["replica_hours"]["spot"] == 0.0


def test_window_subset_runs_even_or_odd_windows_and_reports_both_halves(inputs, tmp_path) -> None:
    base = ("--windows", "2", "--window-hours", "0.2", "--policy", "spotmesh",
            "--policy", "static_on_demand", "--policy", "oracle")
    every = run_json(inputs, tmp_path / "all.json", *base)
    even = run_json(inputs, tmp_path / "even.json", *base, "--window-subset", "even")
    odd = run_json(inputs, tmp_path / "odd.json", *base, "--window-subset", "odd")
    assert even["parameters"]["window_indices"] == [0]
    assert odd["parameters"]["window_indices"] == [1]
    assert every["parameters"]["window_indices"] == [0, 1]
    for name in ("spotmesh", "static_on_demand", "oracle"):
        costs = every["policies"][name]["per_window_cost_usd"]
        assert even["policies"][name]["per_window_cost_usd"] == costs[:1]
        assert odd["policies"][name]["per_window_cost_usd"] == costs[1:]
    parity = every["by_window_parity"]
    assert parity["even"]["role"] == "tuning" and parity["odd"]["role"] == "hold-out"
    assert parity["odd"]["windows"] == [1]
    assert parity["odd"]["policies"]["spotmesh"]["cost_usd"] == pytest.approx(
        odd["policies"]["spotmesh"]["cost_usd"], abs=1e-3)
    assert "cost_vs_oracle" in parity["even"]["policies"]["spotmesh"]
    with pytest.raises(SystemExit):
        simulate.main(argv(inputs, tmp_path / "x.json", "--window-subset", "third"))
