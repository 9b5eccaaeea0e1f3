"""`spotmesh bench load` end to end, small: many streams at once and a trace replay through one
real mesh (a gateway and one vLLM CPU replica of the tiny model, started by the benchmark's own
code), checking what the JSON reports rather than how fast anything was."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from cli.bench import load, streams

pytestmark = pytest.mark.mesh


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    load.add_arguments(p)
    return p.parse_args(list(argv))


@pytest.fixture(scope="module")
def gateway(tiny_model):
    """One mesh for both tests, started the way the benchmark starts its own."""
    from spotmesh.home import DEFAULT_MODEL_NAME

    streams.raise_open_file_limit()
    args = parse("--concurrency", "1", "--replicas", "1")
    with streams.target(args, str(tiny_model), DEFAULT_MODEL_NAME, 1) as t:
        yield t


PROMPTS = [
    "You are a patient tutor who explains cloud computing to beginners, one idea at a time.",
    "Act as a travel guide for a city you know well, with practical tips for a first visit.",
    "You are a careful code reviewer: point out bugs, risky patterns and missing tests.",
]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> str:
    """The benchmark's prompt file format (JSONL with "prompt"), so the test does not need
    ../shared/data."""
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return str(path)


def target_flags(t: streams.Target, prompts: str) -> list[str]:
    return ["--address", t.address, "--api-key", t.api_key, "--gateway-pid", str(t.gateway_pid),
            "--gateway-metrics", t.metrics, "--prompts", prompts]


def test_concurrent_streams_all_succeed_and_report_gateway_cost_per_token(gateway, prompts,
                                                                           tmp_path):
    out = tmp_path / "load.json"
    rc = load.main(parse("--concurrency", "20", "--requests-per-client", "2", "--max-tokens", "4",
                         "--baseline-concurrency", "5", "--channels", "2", "--json", str(out),
                         *target_flags(gateway, prompts)))
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "load" and doc["mode"] == "concurrency"
    assert doc["machine"]["open_file_limit"] >= 1024
    [run] = doc["runs"]
    baseline, main = run["levels"]
    assert (baseline["concurrency"], baseline["requests_per_client"]) == (5, 8)
    assert (main["concurrency"], main["requests_per_client"]) == (20, 2)
    for level in (baseline, main):
        assert level["requests"] == level["ok"] == 40
        assert level["errors"] == 0 and level["errors_by_code"] == {}
        # Greedy decoding with the tiny model always runs to max_tokens.
        assert level["tokens"] == 40 * 4
        assert level["gateway_generate_calls_by_code"] == {"OK": 40}
        assert level["goodput_tokens_per_s"] > 0
        for key in ("ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p99"):
            assert level[key] is not None and level[key] >= 0
        assert level["ttft_ms_p50"] <= level["ttft_ms_p99"]
        assert level["gateway_cpu_us_per_token"] is not None
        assert level["gateway_peak_rss_mib"] > 0


def write_trace(path: Path, n: int) -> None:
    """An Azure-format trace: n requests 50 ms apart, varied lengths (some past the caps)."""
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    for i in range(n):
        lines.append(f"2023-11-16 18:15:{46 + i // 20:02d}.{(i % 20) * 500000:07d},"
                     f"{200 + 997 * i % 9000},{10 + 37 * i % 300}")
    path.write_text("\n".join(lines) + "\n")


def test_trace_replay_reports_goodput_cost_savings_and_plots(gateway, prompts, tmp_path):
    trace = tmp_path / "trace.csv"
    write_trace(trace, 20)
    out, png = tmp_path / "trace.json", tmp_path / "trace.png"
    rc = load.main(parse("--trace", str(trace), "--max-generated-tokens", "8",
                         "--json", str(out), "--plot", str(png),
                         *target_flags(gateway, prompts)))
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["mode"] == "trace"
    assert doc["trace"]["requests"] == 20
    assert doc["trace"]["replay_span_s"] == pytest.approx(0.95)
    r = doc["result"]
    assert r["requests"] == r["ok"] == 20 and r["errors"] == 0
    assert r["gateway_generate_calls_by_code"] == {"OK": 20}
    assert r["ttft_ms_p50"] is not None and r["itl_ms_p99"] is not None
    responses, metrics = doc["cost"]["from_responses"], doc["cost"]["from_gateway_metrics"]
    assert responses["completion_tokens"] == metrics["completion_tokens"] == r["tokens"]
    assert responses["prompt_tokens"] == metrics["prompt_tokens"] > 0
    assert responses["usd"] == pytest.approx(metrics["usd"], rel=1e-6)
    assert responses["usd_per_1m_tokens"] > 0
    assert doc["savings"]["semantic_cache"]["enabled"] is False
    prefix = doc["savings"]["prefix_cache"]
    assert 0 <= prefix["cached_share"] <= 1
    assert prefix["prompt_tokens"] == responses["prompt_tokens"]
    assert sum(b["arrivals"] for b in doc["timeline"]) == 20
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
