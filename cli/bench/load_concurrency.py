"""``spotmesh bench load --concurrency N``: N streaming clients at once, closed loop, beside a
smaller baseline concurrency sending the same number of requests."""

from __future__ import annotations

import asyncio
import math
import sys
import time

from cli.bench.procstat import peak_rss_mib, process_cpu_seconds
from cli.bench.serve import load_prompts
from cli.bench.streams import (
    CLIENTS_PER_CHANNEL,
    Outcome,
    Target,
    codes_between,
    fmt_num,
    fmt_pair,
    open_channels,
    scrape,
    stream_one,
    summarize,
    target,
)


async def closed_loop(stubs, metadata, requests, clients: int, per_client: int, deadline_s: float,
                      label: str) -> tuple[list[Outcome], float]:
    """``clients`` clients, all at once, each sending ``per_client`` requests in turn."""
    outcomes: list[Outcome] = []
    total = clients * per_client
    step = max(1, total // 10)
    started = time.perf_counter()

    async def client(c: int) -> None:
        stub = stubs[c % len(stubs)]
        for k in range(per_client):
            outcomes.append(await stream_one(stub, requests[(c * per_client + k) % len(requests)],
                                             metadata, deadline_s))
            if len(outcomes) % step == 0:
                errors = sum(o.code != "OK" for o in outcomes)
                print(f"    {label}: {len(outcomes)}/{total} requests, {errors} errors, "
                      f"{time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)

    await asyncio.gather(*(client(c) for c in range(clients)))
    return outcomes, time.perf_counter() - started


async def run_levels(t: Target, a, levels: list[tuple[int, int]], prompts: list[str]
                     ) -> list[dict]:
    from spotmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

    sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=a.max_tokens)
    requests = [gateway_pb2.GenerateRequest(prompt=p, sampling=sampling) for p in prompts]
    metadata = (("authorization", f"Bearer {t.api_key}"),)
    out = []
    channels = open_channels(t.address, a.channels or max(
        1, math.ceil(max(c for c, _ in levels) / CLIENTS_PER_CHANNEL)))
    try:
        stubs = [gateway_pb2_grpc.GatewayStub(ch) for ch in channels]
        # Warm-up: first-request costs (tokenizer caches, connections) are not serving costs.
        await closed_loop(stubs, metadata, requests, min(8, len(stubs) * 8), 1, a.timeout,
                          "warm-up")
        for clients, per_client in levels:
            print(f"  {clients} clients x {per_client} requests, {a.max_tokens} tokens each",
                  file=sys.stderr, flush=True)
            metrics_before = scrape(t.metrics)
            gw_cpu = process_cpu_seconds(t.gateway_pid) if t.gateway_pid else 0.0
            replica_cpu = sum(process_cpu_seconds(p) for p in t.replica_pids)
            client_cpu = time.process_time()
            outcomes, wall = await closed_loop(stubs, metadata, requests, clients, per_client,
                                               a.timeout, f"c={clients}")
            client_cpu = time.process_time() - client_cpu
            replica_cpu = sum(process_cpu_seconds(p) for p in t.replica_pids) - replica_cpu
            r = {"concurrency": clients, "requests_per_client": per_client,
                 **summarize(outcomes, wall)}
            if t.gateway_pid:
                gw_cpu = process_cpu_seconds(t.gateway_pid) - gw_cpu
                r["gateway_cpu_s"] = round(gw_cpu, 2)
                r["gateway_cpu_us_per_token"] = (round(1e6 * gw_cpu / r["tokens"], 1)
                                                 if r["tokens"] else None)
                r["gateway_peak_rss_mib"] = peak_rss_mib(t.gateway_pid)
            if t.replica_pids:
                r["replicas_cpu_s"] = round(replica_cpu, 2)
            r["client_cpu_s"] = round(client_cpu, 2)
            if metrics_before:
                r["gateway_generate_calls_by_code"] = codes_between(metrics_before,
                                                                    scrape(t.metrics))
            print(f"    c={clients}: {r['goodput_tokens_per_s']} tok/s, errors "
                  f"{r['errors_by_code'] or 0}, ttft p50 {r['ttft_ms_p50']} ms, itl p99 "
                  f"{r['itl_ms_p99']} ms, gateway {r.get('gateway_cpu_us_per_token')} us/token",
                  file=sys.stderr, flush=True)
            out.append(r)
    finally:
        for ch in channels:
            await ch.close()
    return out


def run_concurrency(a, model_dir: str, served_name: str, intervals: list[int | None]) -> dict:
    prompts = load_prompts(a.prompts, 256)
    total = a.concurrency * a.requests_per_client
    levels = []
    if a.baseline_concurrency and a.baseline_concurrency < a.concurrency:
        # The same number of requests as the main level, from fewer clients.
        levels.append((a.baseline_concurrency, math.ceil(total / a.baseline_concurrency)))
    levels.append((a.concurrency, a.requests_per_client))
    runs = []
    for interval in intervals:
        print(f"bench load: {a.concurrency} streaming clients"
              + (f", stream interval {interval}" if interval else ""), file=sys.stderr,
              flush=True)
        with target(a, model_dir, served_name, interval) as t:
            results = asyncio.run(run_levels(t, a, levels, prompts))
        runs.append({"stream_interval": interval, "levels": results})
    return {
        "mode": "concurrency",
        "concurrency": a.concurrency,
        "baseline_concurrency": levels[0][0] if len(levels) > 1 else None,
        "requests_per_client": a.requests_per_client,
        "max_tokens": a.max_tokens,
        "prompts": len(prompts),
        "runs": runs,
    }


def print_concurrency_table(doc: dict) -> None:
    print(f"{'interval':>8} {'clients':>7} {'requests':>8} {'errors':>6} {'tok/s':>7} "
          f"{'TTFT p50/p99 ms':>17} {'ITL p50/p99 ms':>15} {'TPOT p50/p99':>13} {'tok/msg':>7} "
          f"{'gw us/tok':>9} {'gw RSS MiB':>10}")
    for run in doc["runs"]:
        for r in run["levels"]:
            print(f"{run['stream_interval'] or '-':>8} {r['concurrency']:>7} {r['requests']:>8} "
                  f"{r['errors']:>6} {r['goodput_tokens_per_s']:>7.0f} "
                  f"{fmt_pair(r['ttft_ms_p50'], r['ttft_ms_p99']):>17} "
                  f"{fmt_pair(r['itl_ms_p50'], r['itl_ms_p99']):>15} "
                  f"{fmt_pair(r['tpot_ms_p50'], r['tpot_ms_p99']):>13} "
                  f"{r['tokens_per_message'] or 0:>7} "
                  f"{fmt_num(r.get('gateway_cpu_us_per_token')):>9} "
                  f"{fmt_num(r.get('gateway_peak_rss_mib')):>10}")
        for r in run["levels"]:
            if r["errors_by_code"]:
                print(f"  errors at {r['concurrency']} clients: {r['errors_by_code']}")


