"""The client side of a load run: one streamed request as the client saw it, the target mesh
(started here with ``spotmesh up``'s code, or a running gateway), channels, and the gateway's
own counters read before and after."""

from __future__ import annotations

import contextlib
import resource
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cli.stats import latency_ms
from spotmesh.metrics import Sample, read_metrics

# Many HTTP/2 servers and proxies cap concurrent streams per connection at 100-250 and queue
# the rest without a word; 100 clients per channel (each its own TCP connection) stays below.
CLIENTS_PER_CHANNEL = 100


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


def fmt_pair(x: float | None, y: float | None) -> str:
    return f"{fmt_num(x)}/{fmt_num(y)}"


def fmt_num(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


