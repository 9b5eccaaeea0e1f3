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
import os
import platform
import sys
from pathlib import Path

from cli import write_json
from cli.bench.load_concurrency import print_concurrency_table, run_concurrency
from cli.bench.load_trace import TRACE_CHANNELS, print_trace_table, run_trace
from cli.bench.streams import CLIENTS_PER_CHANNEL, raise_open_file_limit
from cli.datasets import AZURE_CONV_TRACE


def add_arguments(p: argparse.ArgumentParser) -> None:
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--concurrency", type=int, default=0, metavar="N",
                      help="N concurrent streaming clients, closed loop (e.g. 1000)")
    mode.add_argument("--trace", nargs="?", const="", default=None, metavar="FILE",
                      help="replay an Azure LLM trace CSV open-loop (default file: ../shared/"
                           f"data/{AZURE_CONV_TRACE})")
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
        write_json(a.json, doc)
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
