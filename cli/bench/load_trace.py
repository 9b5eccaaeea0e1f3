"""``spotmesh bench load --trace``: open-loop replay of an Azure LLM trace's arrivals through a
gateway, with real system prompts cut to the trace's (scaled) lengths, and what it cost."""

from __future__ import annotations

import asyncio
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cli.bench.serve import load_prompts
from cli.bench.streams import (
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
from cli.bench.workload import QUESTIONS, popularity
from cli.datasets import AZURE_CONV_TRACE, TraceRequest, default_file, read_azure_trace
from cli.stats import latency_ms
from spotmesh.metrics import metric_sum

TRACE_CHANNELS = 4
# Room left in the context for the chat template's turn markers beyond the estimate.
CONTEXT_MARGIN_TOKENS = 16


def trace_window(path: str, start: float, duration: float, limit: int) -> list[TraceRequest]:
    """The trace's requests from ``start`` seconds in, for ``duration`` seconds, at most
    ``limit`` of them, timed from ``start``."""
    rows = []
    for r in read_azure_trace(path):
        at = r.at - start
        if at < 0:
            continue
        if at >= duration or len(rows) >= limit:
            break
        rows.append(TraceRequest(at, r.context_tokens, r.generated_tokens))
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


def plan_trace(rows: list[TraceRequest], a, context: int) -> list[Planned]:
    rng = random.Random(a.seed)
    n = a.system_prompts
    # The system prompts' popularity, as in `spotmesh bench prefix`.
    order, weights = popularity(n, rng)
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

    path = a.trace or default_file(AZURE_CONV_TRACE, "trace", "--trace")
    context = context_tokens(model_dir)
    if a.max_generated_tokens < 1 or a.max_prompt_tokens < 1 \
            or a.max_generated_tokens + CONTEXT_MARGIN_TOKENS >= context:
        raise SystemExit(f"--max-prompt-tokens and --max-generated-tokens must be >= 1, and "
                         f"--max-generated-tokens leave room for a prompt in the model's "
                         f"{context}-token context")
    rows = trace_window(path, a.start, a.duration, a.max_requests)
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
        ("TTFT p50 / p99 ms", fmt_pair(r["ttft_ms_p50"], r["ttft_ms_p99"])),
        ("ITL p50 / p99 ms", fmt_pair(r["itl_ms_p50"], r["itl_ms_p99"])),
        ("TPOT p50 / p99 ms", fmt_pair(r["tpot_ms_p50"], r["tpot_ms_p99"])),
        ("in flight (max)", str(r["in_flight_max"])),
        ("send lag p99 ms", fmt_num(r["send_lag_ms"]["p99"])),
        ("$ per 1M tokens (responses)", str(c["from_responses"]["usd_per_1m_tokens"])),
        ("$ per 1M tokens (gateway metrics)", str(m.get("usd_per_1m_tokens", "-"))),
        ("$ per 1M completion tokens", str(c["from_responses"]["usd_per_1m_completion_tokens"])),
        ("semantic cache", f"{sem['hits']} hits, saved ${sem.get('saved_usd', '-')}"
         if sem["enabled"] else "off"),
        ("prefix cache (cached prompt share)", str(s["prefix_cache"]["cached_share"])),
    ]
    for k, v in rows:
        print(f"{k:<36} {v}")




def context_tokens(model_dir: str) -> int:
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        return int(cfg.get("max_position_embeddings", 2048))
    except (OSError, ValueError):
        return 2048


