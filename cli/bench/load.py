"""``spotmesh bench load``: the mesh under many streams at once, and under a real arrival trace.

``--concurrency N``: N streaming clients at once (asyncio tasks over a few grpc.aio channels,
not threads) through one gateway, each sending ``--requests-per-client`` greedy requests of
``--max-tokens`` tokens one after the other; then, on the same mesh, the same number of requests
from ``--baseline-concurrency`` clients, so the table compares. Reports errors by status code,
goodput, client-side time to first token and inter-token latency, and the gateway's CPU time
per streamed token and peak RSS (from /proc). ``--stream-interval 1,4`` repeats the whole run on
a fresh mesh whose replicas send a message per token and per 4 tokens (vLLM's stream_interval):
where the gateway's per-message framing, not the engine, is the cost.

``--trace [FILE]``: open-loop replay of an Azure LLM trace (``TIMESTAMP,ContextTokens,
GeneratedTokens``; default ``../shared/data/traces/azure_llm_2023_conv.csv``): each request is
sent at its arrival time in the trace (stretched by ``--time-scale``) whether or not earlier
ones have finished. Prompt and output lengths are scaled by ``--token-scale`` and capped to fit
the tiny model's context; prompts are real system prompts (Zipf-like popularity, seeded, so
prefixes repeat as they do in production) cut to the scaled length in tokens, followed by a
short user turn. Reports goodput with errors counted, TTFT and ITL percentiles, cost per 1M
tokens (from the responses' ``cost_usd`` and usage, and from the gateway's cost counters) and
savings by cache tier, and plots arrivals, in-flight requests, TTFT and ITL over time.

Both modes start their own mesh with ``spotmesh up``'s code (``--replicas`` CPU replicas of the
tiny model; no semantic cache unless ``--semantic-cache``) or target a running gateway with
``--address HOST:PORT --api-key KEY`` (``--gateway-pid`` and ``--gateway-metrics`` add what
needs the gateway's process and its /metrics). Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import math
import os
import platform
import random
import resource
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from cli.bench.serve import data_dir, load_prompts, process_cpu_seconds
from cli.stats import latency_ms
from spotmesh.metrics import Sample, metric_sum, read_metrics

DEFAULT_TRACE = "traces/azure_llm_2023_conv.csv"
# Many HTTP/2 servers and proxies cap concurrent streams per connection at 100-250 and queue
# the rest without a word; 100 clients per channel (each its own TCP connection) stays below.
CLIENTS_PER_CHANNEL = 100
TRACE_CHANNELS = 4
# Room left in the context for the chat template's turn markers beyond the estimate.
CONTEXT_MARGIN_TOKENS = 16
QUESTIONS = [
    "Give me a short example.", "What should I do first?", "Summarise that in one line.",
    "What are the risks?", "How would you explain it to a beginner?", "What does it cost?",
    "List three alternatives.", "Why does that matter?", "Can you go into more detail?",
    "What is the most common mistake?", "How long will it take?", "Where do I start?",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--concurrency", type=int, default=0, metavar="N",
                      help="N concurrent streaming clients, closed loop (e.g. 1000)")
    mode.add_argument("--trace", nargs="?", const="", default=None, metavar="FILE",
                      help="replay an Azure LLM trace CSV open-loop (default file: ../shared/"
                           f"data/{DEFAULT_TRACE})")
    target = p.add_argument_group("target (default: start a mesh here)")
    target.add_argument("--address", default="", metavar="HOST:PORT",
                        help="a running gateway instead of a mesh started for the run")
    target.add_argument("--api-key", default="", help="the tenant's key, with --address")
    target.add_argument("--gateway-pid", type=int, default=0,
                        help="with --address: the gateway's pid, for CPU per token and RSS")
    target.add_argument("--gateway-metrics", default="", metavar="HOST:PORT",
                        help="with --address: the gateway's /metrics, for cost and savings")
    target.add_argument("--replicas", type=int, default=2, help="CPU replicas to start")
    target.add_argument("--semantic-cache", action="store_true",
                        help="start the embedder and semantic cache too (default: off, so "
                             "every request reaches an engine)")
    target.add_argument("--stream-interval", default="1", metavar="N[,N...]",
                        help="replicas' tokens per streamed message (vLLM stream_interval); "
                             "a list repeats a --concurrency run on a fresh mesh for each")
    target.add_argument("--max-num-seqs", type=int, default=256,
                        help="sequences each replica's engine batches")
    target.add_argument("--kv-cache-gib", type=int, default=1)
    target.add_argument("--model", default="", help="model directory (default: the tiny model)")
    conc = p.add_argument_group("--concurrency")
    conc.add_argument("--requests-per-client", type=int, default=2)
    conc.add_argument("--max-tokens", type=int, default=16,
                      help="tokens per request (bounded so the CPU engines keep up)")
    conc.add_argument("--baseline-concurrency", type=int, default=32,
                      help="also run this many clients sending the same number of requests "
                           "in total (0: skip)")
    conc.add_argument("--channels", type=int, default=0,
                      help=f"gRPC channels, each one connection (default: one per "
                           f"{CLIENTS_PER_CHANNEL} clients; {TRACE_CHANNELS} for --trace)")
    trace = p.add_argument_group("--trace")
    trace.add_argument("--time-scale", type=float, default=1.0,
                       help="stretch the trace's arrival times by this factor (2: half the "
                            "arrival rate)")
    trace.add_argument("--start", type=float, default=0.0,
                       help="seconds into the trace to start from")
    trace.add_argument("--duration", type=float, default=60.0,
                       help="seconds of the trace to replay (before --time-scale)")
    trace.add_argument("--max-requests", type=int, default=300)
    trace.add_argument("--token-scale", type=float, default=0.25,
                       help="multiply the trace's ContextTokens and GeneratedTokens by this")
    trace.add_argument("--max-prompt-tokens", type=int, default=1536,
                       help="cap on a scaled prompt (the tiny model's context is 2048)")
    trace.add_argument("--max-generated-tokens", type=int, default=128,
                       help="cap on a scaled output (max_tokens)")
    trace.add_argument("--system-prompts", type=int, default=64,
                       help="distinct system prompts the requests start with")
    trace.add_argument("--seed", type=int, default=0)
    trace.add_argument("--plot", default="", metavar="OUT.png",
                       help="plot arrivals, in-flight, TTFT and ITL over time")
    p.add_argument("--prompts", default="",
                   help="JSONL with a 'prompt' field (default: ../shared/data/prefix_cache/"
                        "awesome_chatgpt_system_prompts.jsonl)")
    p.add_argument("--timeout", type=float, default=600.0, help="deadline per request, s")
    p.add_argument("--json", default="", metavar="OUT", help="write the results here")


# ---- one streamed request -------------------------------------------------------------------

@dataclass
class Outcome:
    """What the client saw of one streamed request (times from time.perf_counter())."""

    sent: float
    ttft: float | None = None
    end: float = 0.0
    code: str = "OK"
    tokens: int = 0
    # (arrival time, gap since the previous message with tokens, tokens in it), after the first.
    messages: list[tuple[float, float, int]] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    cache_hit: bool = False

    def tpot(self) -> float | None:
        """Time per output token after the first (vLLM's TPOT): steadier than ITL when
        tokens arrive in bursts."""
        if self.ttft is None or not self.messages or self.tokens < 2:
            return None
        return (self.messages[-1][0] - self.sent - self.ttft) / (self.tokens - 1)

    def itl(self) -> list[float]:
        """Inter-token latency per token: a message of k tokens that came ``gap`` after the
        last one counts k tokens of ``gap / k`` each, so coalesced streams compare fairly."""
        return [gap / n for _, gap, n in self.messages for _ in range(n)]


async def stream_one(stub, request, metadata, deadline_s: float) -> Outcome:
    import grpc

    out = Outcome(sent=time.perf_counter())
    last = out.sent
    finished = False
    try:
        async for msg in stub.Generate(request, metadata=metadata, timeout=deadline_s):
            now = time.perf_counter()
            n = len(msg.token_ids)
            if n:
                if out.ttft is None:
                    out.ttft = now - out.sent
                else:
                    out.messages.append((now, now - last, n))
                last = now
                out.tokens += n
            if msg.finish_reason:
                finished = True
                out.prompt_tokens = msg.usage.prompt_tokens
                out.cached_prompt_tokens = msg.usage.cached_prompt_tokens
                out.completion_tokens = msg.usage.completion_tokens
                out.cost_usd = msg.cost_usd
                out.cache_hit = msg.cache_hit
        if not finished:
            out.code = "NO_FINISH_REASON"
    except grpc.aio.AioRpcError as exc:
        out.code = exc.code().name
    except Exception as exc:  # counted and reported, never hidden
        out.code = type(exc).__name__
        print(f"    request failed: {exc!r}", file=sys.stderr, flush=True)
    out.end = time.perf_counter()
    return out


def summarize(outcomes: list[Outcome], wall: float) -> dict:
    ok = [o for o in outcomes if o.code == "OK"]
    errors = Counter(o.code for o in outcomes if o.code != "OK")
    tokens = sum(o.tokens for o in ok)
    messages = sum(len(o.messages) + 1 for o in ok if o.tokens)
    ttft = latency_ms([o.ttft for o in ok if o.ttft is not None])
    itl = latency_ms([x for o in ok for x in o.itl()])
    gaps = latency_ms([gap for o in ok for _, gap, _ in o.messages])
    tpot = latency_ms([x for x in (o.tpot() for o in ok) if x is not None])
    return {
        "requests": len(outcomes),
        "ok": len(ok),
        "errors": sum(errors.values()),
        "errors_by_code": dict(sorted(errors.items())),
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "goodput_tokens_per_s": round(tokens / wall, 1) if wall else 0.0,
        "goodput_requests_per_s": round(len(ok) / wall, 2) if wall else 0.0,
        "ttft_ms_p50": ttft["p50"],
        "ttft_ms_p99": ttft["p99"],
        "itl_ms_p50": itl["p50"],
        "itl_ms_p99": itl["p99"],
        "tpot_ms_p50": tpot["p50"],
        "tpot_ms_p99": tpot["p99"],
        "message_gap_ms_p50": gaps["p50"],
        "message_gap_ms_p99": gaps["p99"],
        "tokens_per_message": round(tokens / messages, 2) if messages else None,
    }


# ---- the target: a mesh started here or a running gateway ----------------------------------

@dataclass
class Target:
    address: str
    api_key: str
    gateway_pid: int | None
    metrics: str  # the gateway's /metrics host:port; "" when unknown
    replica_pids: list[int] = field(default_factory=list)
    stream_interval: int | None = None


@contextlib.contextmanager
def target(a, model_dir: str, served_name: str, stream_interval: int | None) -> Iterator[Target]:
    if a.address:
        yield Target(a.address, a.api_key, a.gateway_pid or None, a.gateway_metrics)
        return
    from cli.supervisor import LocalMesh

    with tempfile.TemporaryDirectory(prefix="spotmesh-bench-load-") as state:
        mesh = LocalMesh(
            Path(state), replicas=a.replicas, spot_replicas=a.replicas - 1, port=0,
            api_keys=None, model=model_dir, served_model_name=served_name,
            inference_args=["--enforce-eager", "--max-num-seqs", str(a.max_num_seqs),
                            "--stream-interval", str(stream_interval)],
            kv_cache_gib=a.kv_cache_gib, semantic_cache=a.semantic_cache,
            log=lambda m: print(m, file=sys.stderr, flush=True))
        try:
            st = mesh.start()
            gw = st.gateway()
            yield Target(gw.address, mesh.dev_key or "", gw.pid, gw.metrics,
                         [p.pid for p in st.processes if p.role == "inference"],
                         stream_interval)
        finally:
            mesh.stop()


def raise_open_file_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (inherited by the mesh's processes too): every
    connection and stream-carrying socket is a file descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def open_channels(address: str, n: int) -> list:
    import grpc

    options = [
        # Without it, channels to the same address share one connection (gRPC's global
        # subchannel pool), and so one connection's stream limit.
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.max_receive_message_length", 4 << 20),
    ]
    return [grpc.aio.insecure_channel(address, options=options) for _ in range(n)]


def peak_rss_mib(pid: int | None) -> float | None:
    """A process's peak resident memory since it started (VmHWM), in MiB."""
    if not pid:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except FileNotFoundError:
        pass
    return None


def scrape(metrics: str) -> list[Sample]:
    """Every sample of a Prometheus /metrics page; [] when there is none to read."""
    if not metrics:
        return []
    try:
        return read_metrics(metrics)
    except OSError as exc:
        print(f"  cannot read http://{metrics}/metrics: {exc}", file=sys.stderr, flush=True)
        return []


def codes_between(before, after) -> dict[str, int]:
    """The gateway's own count of finished calls by status code, between two scrapes."""
    out: Counter[str] = Counter()
    for samples, sign in ((after, 1), (before, -1)):
        for n, lab, v in samples:
            if n == "spotmesh_gateway_requests_total" and lab.get("method") == "Generate":
                out[lab["code"]] += int(sign * v)
    return {k: v for k, v in sorted(out.items()) if v}


# ---- --concurrency ---------------------------------------------------------------------------

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
                  f"{_pair(r['ttft_ms_p50'], r['ttft_ms_p99']):>17} "
                  f"{_pair(r['itl_ms_p50'], r['itl_ms_p99']):>15} "
                  f"{_pair(r['tpot_ms_p50'], r['tpot_ms_p99']):>13} "
                  f"{r['tokens_per_message'] or 0:>7} "
                  f"{_num(r.get('gateway_cpu_us_per_token')):>9} "
                  f"{_num(r.get('gateway_peak_rss_mib')):>10}")
        for r in run["levels"]:
            if r["errors_by_code"]:
                print(f"  errors at {r['concurrency']} clients: {r['errors_by_code']}")


def _pair(x: float | None, y: float | None) -> str:
    return f"{_num(x)}/{_num(y)}"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


# ---- --trace ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class TraceRow:
    at: float  # seconds since the first row
    context_tokens: int
    generated_tokens: int


def _timestamp(text: str) -> float:
    """Seconds: a number, or an ISO time (the Azure traces give 7 fractional digits, one
    more than datetime reads)."""
    try:
        return float(text)
    except ValueError:
        pass
    whole, _, frac = text.strip().partition(".")
    return datetime.fromisoformat(whole).timestamp() + (float(f"0.{frac}") if frac else 0.0)


def load_trace(path: str, start: float, duration: float, limit: int) -> list[TraceRow]:
    rows = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} - set(reader.fieldnames or [])
        if missing:
            raise SystemExit(f"{path}: not an Azure LLM trace (no column {sorted(missing)})")
        first = None
        for rec in reader:
            t = _timestamp(rec["TIMESTAMP"])
            first = t if first is None else first
            at = t - first - start
            if at < 0:
                continue
            if at >= duration or len(rows) >= limit:
                break
            rows.append(TraceRow(at, int(rec["ContextTokens"]), int(rec["GeneratedTokens"])))
    if not rows:
        raise SystemExit(f"{path}: no requests between {start} s and {start + duration} s")
    return rows


@dataclass(frozen=True)
class Planned:
    at: float  # seconds after the replay starts
    system: int  # which system prompt the prompt starts with
    question: int
    prompt_tokens: int  # the scaled target, as rendered with the chat template
    max_tokens: int


def plan_trace(rows: list[TraceRow], a, context: int) -> list[Planned]:
    rng = random.Random(a.seed)
    n = a.system_prompts
    # Zipf-like popularity (s=0.8) of system prompts, as in `spotmesh bench prefix`.
    order = list(range(n))
    rng.shuffle(order)
    weights = [1.0 / (rank + 1) ** 0.8 for rank in range(n)]
    out = []
    for r in rows:
        max_tokens = min(a.max_generated_tokens, max(1, round(r.generated_tokens * a.token_scale)))
        room = context - max_tokens - CONTEXT_MARGIN_TOKENS
        prompt = min(a.max_prompt_tokens, room, max(1, round(r.context_tokens * a.token_scale)))
        out.append(Planned(r.at * a.time_scale, rng.choices(order, weights)[0],
                           rng.randrange(len(QUESTIONS)), prompt, max_tokens))
    return out


class PromptText:
    """Chat requests of a given length in tokens: a system turn cut from real system prompts
    (the chosen one, then the ones after it, until long enough) and a short user question."""

    def __init__(self, tokenizer, prompts: list[str], longest: int) -> None:
        self.tok = tokenizer
        self.prompts = prompts
        self.longest = longest
        self.chains: dict[int, list[int]] = {}
        self.overhead = [self._overhead(q) for q in QUESTIONS]

    def _render(self, system: str, question: str) -> int:
        text = self.tok.apply_chat_template(
            [{"role": "system", "content": system}, {"role": "user", "content": question}],
            tokenize=False, add_generation_prompt=True)
        return len(self.tok.encode(text, add_special_tokens=False))

    def _overhead(self, question: str) -> int:
        return self._render("x", question) - len(self.tok.encode("x", add_special_tokens=False))

    def _chain(self, system: int) -> list[int]:
        if system not in self.chains:
            ids: list[int] = []
            j = system
            while len(ids) < self.longest:
                ids += self.tok.encode(self.prompts[j % len(self.prompts)] + "\n\n",
                                       add_special_tokens=False)
                j += 1
            self.chains[system] = ids
        return self.chains[system]

    def messages(self, p: Planned) -> list[tuple[str, str]]:
        n = max(1, p.prompt_tokens - self.overhead[p.question])
        system = self.tok.decode(self._chain(p.system)[:n], skip_special_tokens=True)
        if not system.strip():
            system = self.prompts[p.system % len(self.prompts)]
        return [("system", system), ("user", QUESTIONS[p.question])]


class Progress:
    """A progress bar on stderr (a line every 10% when stderr is not a terminal)."""

    def __init__(self, total: int, span_s: float) -> None:
        self.total = total
        self.span = span_s
        self.sent = self.done = self.errors = 0
        self.started = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self._next_decile = 1

    def show(self, final: bool = False) -> None:
        elapsed = time.perf_counter() - self.started
        width = 30
        filled = width * self.done // max(1, self.total)
        line = (f"  [{'#' * filled}{'-' * (width - filled)}] {self.done}/{self.total} done, "
                f"{self.sent - self.done} in flight, {self.errors} errors, "
                f"{elapsed:.0f}/{self.span:.0f} s")
        if self.tty:
            print("\r" + line, end="\n" if final else "", file=sys.stderr, flush=True)
        elif final or self.done * 10 >= self._next_decile * self.total:
            self._next_decile = self.done * 10 // max(1, self.total) + 1
            print(line, file=sys.stderr, flush=True)


async def replay(t: Target, plan: list[Planned], texts: list[list[tuple[str, str]]],
                 a) -> tuple[list[Outcome], float, list]:
    """Each request at its (scaled) arrival time, whatever the ones before it are doing."""
    from spotmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

    requests = [gateway_pb2.GenerateRequest(
        messages=[gateway_pb2.ChatMessage(role=r, content=c) for r, c in msgs],
        sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=p.max_tokens))
        for p, msgs in zip(plan, texts, strict=True)]
    metadata = (("authorization", f"Bearer {t.api_key}"),)
    channels = open_channels(t.address, a.channels or TRACE_CHANNELS)
    stubs = [gateway_pb2_grpc.GatewayStub(ch) for ch in channels]
    outcomes: list[Outcome | None] = [None] * len(plan)
    progress = Progress(len(plan), plan[-1].at)
    try:
        warm = gateway_pb2.GenerateRequest(
            prompt="warm up", sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=2),
            cache=gateway_pb2.CacheControl(mode=gateway_pb2.CACHE_MODE_BYPASS))
        for stub in stubs:
            await stub.Complete(warm, metadata=metadata, timeout=a.timeout)
        before = scrape(t.metrics)

        async def one(i: int) -> None:
            o = await stream_one(stubs[i % len(stubs)], requests[i], metadata, a.timeout)
            outcomes[i] = o
            progress.done += 1
            progress.errors += o.code != "OK"

        async def ticker() -> None:
            while True:
                progress.show()
                await asyncio.sleep(0.5)

        tick = asyncio.create_task(ticker())
        started = progress.started = time.perf_counter()
        tasks = []
        for i, p in enumerate(plan):
            delay = started + p.at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
            progress.sent += 1
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - started
        tick.cancel()
        progress.show(final=True)
        after = scrape(t.metrics)
    finally:
        for ch in channels:
            await ch.close()
    done = [o for o in outcomes if o is not None]
    for o in done:  # times relative to the replay's start from here on
        o.sent -= started
        o.end -= started
        o.messages = [(at - started, gap, n) for at, gap, n in o.messages]
    return done, wall, [before, after]


def trace_costs(outcomes: list[Outcome], before, after, semantic: bool) -> dict:
    ok = [o for o in outcomes if o.code == "OK"]
    served = [o for o in ok if not o.cache_hit]
    usd = sum(o.cost_usd for o in ok)
    prompt = sum(o.prompt_tokens for o in ok)
    completion = sum(o.completion_tokens for o in ok)
    cost: dict = {"from_responses": {
        "usd": round(usd, 8), "prompt_tokens": prompt, "completion_tokens": completion,
        "usd_per_1m_tokens": round(1e6 * usd / (prompt + completion), 6)
        if prompt + completion else None,
        "usd_per_1m_completion_tokens": round(1e6 * usd / completion, 6) if completion else None,
    }, "note": "responses count semantic-cache hits' tokens at $0 (what the tenants got); the "
               "gateway's counters count only tokens replicas served"}
    semantic_doc: dict = {"enabled": semantic, "hits": sum(o.cache_hit for o in ok)}
    if before and after:
        def delta(name: str, **labels: str) -> float:
            return metric_sum(after, name, **labels) - metric_sum(before, name, **labels)

        m_usd = delta("spotmesh_gateway_cost_usd_total")
        m_prompt = delta("spotmesh_gateway_tokens_total", kind="prompt")
        m_completion = delta("spotmesh_gateway_tokens_total", kind="completion")
        cost["from_gateway_metrics"] = {
            "usd": round(m_usd, 8), "prompt_tokens": int(m_prompt),
            "completion_tokens": int(m_completion),
            "usd_per_1m_tokens": round(1e6 * m_usd / (m_prompt + m_completion), 6)
            if m_prompt + m_completion else None,
            "usd_per_1m_completion_tokens": round(1e6 * m_usd / m_completion, 6)
            if m_completion else None,
            "replica_seconds": round(delta("spotmesh_gateway_replica_seconds_total"), 3),
        }
        saved = delta("spotmesh_semantic_cache_saved_usd_total")
        semantic_doc.update({
            "saved_usd": round(saved, 8),
            "saved_tokens": int(delta("spotmesh_semantic_cache_saved_tokens_total")),
            "saved_replica_seconds": round(
                delta("spotmesh_semantic_cache_saved_replica_seconds_total"), 3),
            # Of what the requests would have cost without the cache.
            "saved_share": round(saved / (saved + m_usd), 4) if saved + m_usd else 0.0,
        })
    cached = sum(o.cached_prompt_tokens for o in served)
    served_prompt = sum(o.prompt_tokens for o in served)
    return {"cost": cost, "savings": {
        "semantic_cache": semantic_doc,
        "prefix_cache": {
            "cached_prompt_tokens": cached, "prompt_tokens": served_prompt,
            "cached_share": round(cached / served_prompt, 4) if served_prompt else 0.0,
        },
    }}


def timeline(outcomes: list[Outcome], span: float) -> list[dict]:
    """Per second of the replay: arrivals, requests in flight (the most at once), finished
    requests, TTFT of those sent and ITL of tokens received in it."""
    bins = max(1, math.ceil(span))
    sent: list[list[Outcome]] = [[] for _ in range(bins)]
    itl: list[list[float]] = [[] for _ in range(bins)]
    ended = [0] * bins
    for o in outcomes:
        sent[min(bins - 1, int(o.sent))].append(o)
        ended[min(bins - 1, int(o.end))] += 1
        for at, gap, n in o.messages:
            itl[min(bins - 1, int(at))].extend([gap / n] * n)
    events = sorted([(o.sent, 1) for o in outcomes] + [(o.end, -1) for o in outcomes])
    peak = [0] * bins
    level = 0
    for at, step in events:
        level += step
        b = min(bins - 1, int(at))
        peak[b] = max(peak[b], level)
    out = []
    for b in range(bins):
        ttft = latency_ms([o.ttft for o in sent[b] if o.code == "OK" and o.ttft is not None])
        lat = latency_ms(itl[b])
        out.append({"t_s": b, "arrivals": len(sent[b]), "finished": ended[b],
                    "in_flight_max": peak[b], "errors": sum(o.code != "OK" for o in sent[b]),
                    "ttft_ms_p50": ttft["p50"], "ttft_ms_p99": ttft["p99"],
                    "itl_ms_p50": lat["p50"], "itl_ms_p99": lat["p99"]})
    return out


def plot_trace(path: str, outcomes: list[Outcome], bins: list[dict], title: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [b["t_s"] for b in bins]
    fig, ax = plt.subplots(4, 1, figsize=(10, 10), sharex=True)
    ax[0].bar(t, [b["arrivals"] for b in bins], width=1.0, align="edge", color="tab:blue")
    ax[0].set_ylabel("arrivals / s")
    events = sorted([(o.sent, 1) for o in outcomes] + [(o.end, -1) for o in outcomes])
    xs, ys, level = [0.0], [0], 0
    for at, step in events:
        level += step
        xs.append(at)
        ys.append(level)
    ax[1].step(xs, ys, where="post", color="tab:orange")
    ax[1].set_ylabel("in flight")
    ok = [o for o in outcomes if o.code == "OK" and o.ttft is not None]
    ax[2].scatter([o.sent for o in ok], [1000 * o.ttft for o in ok], s=6, color="tab:green",
                  label="TTFT per request")
    failed = [o for o in outcomes if o.code != "OK"]
    if failed:
        ax[2].scatter([o.sent for o in failed], [1000 * (o.end - o.sent) for o in failed],
                      s=14, marker="x", color="tab:red", label="error")
    ax[2].set_yscale("log")
    ax[2].set_ylabel("TTFT ms (by send time)")
    ax[2].legend(loc="upper left", fontsize=8)
    mid = [b["t_s"] + 0.5 for b in bins]
    for key, style in (("itl_ms_p50", "-"), ("itl_ms_p99", "--")):
        ax[3].plot(mid, [b[key] if b[key] is not None else float("nan") for b in bins],
                   style, color="tab:purple", label=key.replace("itl_ms_", "ITL "))
    ax[3].set_ylabel("ITL ms (per token)")
    ax[3].set_xlabel("seconds since the replay started")
    ax[3].legend(loc="upper left", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_trace(a, model_dir: str, served_name: str, interval: int | None) -> dict:
    from transformers import AutoTokenizer

    path = a.trace
    if not path:
        d = data_dir()
        if d is None or not (d / DEFAULT_TRACE).exists():
            raise SystemExit("no trace: pass --trace FILE (../shared/data not found)")
        path = str(d / DEFAULT_TRACE)
    context = context_tokens(model_dir)
    if a.max_generated_tokens < 1 or a.max_prompt_tokens < 1 \
            or a.max_generated_tokens + CONTEXT_MARGIN_TOKENS >= context:
        raise SystemExit(f"--max-prompt-tokens and --max-generated-tokens must be >= 1, and "
                         f"--max-generated-tokens leave room for a prompt in the model's "
                         f"{context}-token context")
    rows = load_trace(path, a.start, a.duration, a.max_requests)
    plan = plan_trace(rows, a, context)
    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = PromptText(tok, load_prompts(a.prompts, a.system_prompts),
                       max(p.prompt_tokens for p in plan))
    messages = [texts.messages(p) for p in plan]
    span = plan[-1].at
    print(f"bench load: replaying {len(plan)} requests of {path} ({rows[-1].at:.0f} s of trace "
          f"x{a.time_scale:g} = {span:.0f} s, tokens x{a.token_scale:g})", file=sys.stderr,
          flush=True)
    with target(a, model_dir, served_name, interval) as t:
        outcomes, wall, (before, after) = asyncio.run(replay(t, plan, messages, a))
    result = summarize(outcomes, wall)
    lag = [o.sent - p.at for o, p in zip(outcomes, plan, strict=True)]
    result["send_lag_ms"] = latency_ms(lag)
    bins = timeline(outcomes, wall)
    result["in_flight_max"] = max(b["in_flight_max"] for b in bins)
    if before and after:
        result["gateway_generate_calls_by_code"] = codes_between(before, after)
    doc = {
        "mode": "trace",
        "trace": {
            "file": Path(path).name, "start_s": a.start, "duration_s": a.duration,
            "requests": len(plan), "trace_span_s": round(rows[-1].at, 3),
            "time_scale": a.time_scale, "replay_span_s": round(span, 3),
            "offered_requests_per_s": round(len(plan) / span, 3) if span else None,
            "token_scale": a.token_scale, "max_prompt_tokens": a.max_prompt_tokens,
            "max_generated_tokens": a.max_generated_tokens,
            "trace_context_tokens_mean": round(
                sum(r.context_tokens for r in rows) / len(rows), 1),
            "trace_generated_tokens_mean": round(
                sum(r.generated_tokens for r in rows) / len(rows), 1),
            "prompt_tokens_mean": round(sum(p.prompt_tokens for p in plan) / len(plan), 1),
            "max_tokens_mean": round(sum(p.max_tokens for p in plan) / len(plan), 1),
            "system_prompts": a.system_prompts, "seed": a.seed,
        },
        "stream_interval": interval,
        "semantic_cache": a.semantic_cache,
        "result": result,
        **trace_costs(outcomes, before, after, a.semantic_cache),
        "timeline": bins,
    }
    if a.plot:
        plot_trace(a.plot, outcomes, bins,
                   f"spotmesh bench load: {Path(path).name}, {len(plan)} requests, time x"
                   f"{a.time_scale:g}, tokens x{a.token_scale:g}; goodput "
                   f"{result['goodput_tokens_per_s']} tok/s, {result['errors']} errors")
    return doc


def print_trace_table(doc: dict) -> None:
    r, c, s = doc["result"], doc["cost"], doc["savings"]
    m = c.get("from_gateway_metrics", {})
    sem = s["semantic_cache"]
    rows = [
        ("requests (ok / errors)", f"{r['requests']} ({r['ok']} / {r['errors']})"
         + (f" {r['errors_by_code']}" if r["errors_by_code"] else "")),
        ("offered load", f"{doc['trace']['offered_requests_per_s']} req/s"),
        ("goodput", f"{r['goodput_tokens_per_s']} tok/s, {r['goodput_requests_per_s']} req/s"),
        ("TTFT p50 / p99 ms", _pair(r["ttft_ms_p50"], r["ttft_ms_p99"])),
        ("ITL p50 / p99 ms", _pair(r["itl_ms_p50"], r["itl_ms_p99"])),
        ("TPOT p50 / p99 ms", _pair(r["tpot_ms_p50"], r["tpot_ms_p99"])),
        ("in flight (max)", str(r["in_flight_max"])),
        ("send lag p99 ms", _num(r["send_lag_ms"]["p99"])),
        ("$ per 1M tokens (responses)", str(c["from_responses"]["usd_per_1m_tokens"])),
        ("$ per 1M tokens (gateway metrics)", str(m.get("usd_per_1m_tokens", "-"))),
        ("$ per 1M completion tokens", str(c["from_responses"]["usd_per_1m_completion_tokens"])),
        ("semantic cache", f"{sem['hits']} hits, saved ${sem.get('saved_usd', '-')}"
         if sem["enabled"] else "off"),
        ("prefix cache (cached prompt share)", str(s["prefix_cache"]["cached_share"])),
    ]
    for k, v in rows:
        print(f"{k:<36} {v}")


# ---- entry point -----------------------------------------------------------------------------

def context_tokens(model_dir: str) -> int:
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        return int(cfg.get("max_position_embeddings", 2048))
    except (OSError, ValueError):
        return 2048


def main(a) -> int:
    from cli.tinymodel import ensure_default_model
    from spotmesh.home import DEFAULT_MODEL_NAME

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if a.trace is None and a.concurrency <= 0:
        print("choose a mode: --concurrency N (N >= 1) or --trace [FILE]", file=sys.stderr)
        return 2
    if a.address and not a.api_key:
        print("--address needs --api-key", file=sys.stderr)
        return 2
    if not a.address and a.replicas < 1:
        print("--replicas must be >= 1", file=sys.stderr)
        return 2
    if a.requests_per_client < 1 or a.max_tokens < 1:
        print("--requests-per-client and --max-tokens must be >= 1", file=sys.stderr)
        return 2
    try:
        intervals: list[int | None] = [int(x) for x in a.stream_interval.split(",") if x.strip()]
    except ValueError:
        print("--stream-interval takes integers, e.g. 1 or 1,4", file=sys.stderr)
        return 2
    if not intervals or min(intervals) < 1:
        print("--stream-interval values must be >= 1", file=sys.stderr)
        return 2
    if a.address:
        if len(intervals) > 1:
            print("--stream-interval lists need a mesh started here (not --address)",
                  file=sys.stderr)
            return 2
        intervals = [None]  # the running replicas' own setting
    if a.trace is not None and len(intervals) > 1:
        print("--trace replays with one --stream-interval", file=sys.stderr)
        return 2
    if a.trace is not None and not (a.time_scale > 0 and a.token_scale > 0 and a.duration > 0
                                    and a.max_requests >= 1 and a.system_prompts >= 1):
        print("--time-scale, --token-scale and --duration must be > 0; --max-requests and "
              "--system-prompts >= 1", file=sys.stderr)
        return 2
    fd_limit = raise_open_file_limit()
    # Other work on the machine shares its cores with the mesh: recorded beside the numbers.
    load_before = [round(x, 2) for x in os.getloadavg()]
    model_dir = a.model or str(ensure_default_model())
    served_name = Path(a.model).name if a.model else DEFAULT_MODEL_NAME
    if a.trace is not None:
        doc = run_trace(a, model_dir, served_name, intervals[0])
    else:
        doc = run_concurrency(a, model_dir, served_name, intervals)
    doc = {
        "benchmark": "load",
        "model": served_name,
        "target": a.address or f"mesh started here: {a.replicas} CPU replica(s)"
        + (", semantic cache" if a.semantic_cache else ", no semantic cache"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "open_file_limit": fd_limit,
                    "load_average_1_5_15m": {"before": load_before,
                                             "after": [round(x, 2) for x in os.getloadavg()]}},
        **doc,
    }
    print()
    if doc["mode"] == "trace":
        print_trace_table(doc)
        errors = doc["result"]["errors"]
    else:
        print_concurrency_table(doc)
        errors = sum(r["errors"] for run in doc["runs"] for r in run["levels"])
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {a.json}")
    if a.plot and doc["mode"] == "trace":
        print(f"wrote {a.plot}")
    return 1 if errors else 0


def add_parser(bench: argparse._SubParsersAction) -> None:
    ld = bench.add_parser("load", help="many concurrent streams, or a real arrival trace, "
                                       "through one gateway")
    add_arguments(ld)
    ld.set_defaults(fn=main)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m cli.bench.load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
