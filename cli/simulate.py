"""``spotmesh simulate``: replay real request arrivals and real spot availability against
autoscaling policies, and price what each one costs and how often it keeps its latency promise.

A discrete-event simulation. Requests arrive from a trace (the Azure LLM inference trace with
per-request prompt and output tokens, or a per-minute counts trace scaled by ``--rate-scale``).
The gateway holds a FIFO queue and hands each request to the ready replica with the least
prefill backlog that has a free batch slot. A replica follows a measured profile: prefill runs
alone at ``prefill_tokens_per_s`` (decoding stalls meanwhile, as in vLLM's default scheduler),
then the request decodes alongside the others at ``T(n) / n`` tokens/s each, ``T`` the profile's
aggregate decode throughput at ``n`` concurrent requests. Time to first token (TTFT) is queue
wait + prefill wait + own prefill.

Replicas start in ``startup_seconds``. Spot replicas can only be obtained up to the capacity in
the availability trace; when capacity drops below what is held the cloud reclaims replicas with
a notice (``--preemption-notice-seconds``). As spotmesh's replicas do on a reclaim notice
(``Drain`` with ``admit_seconds``), they keep taking requests for ``--drain-admit-seconds`` of the
notice, then stop; what they still hold when the notice ends resumes on another replica
(re-prefilling prompt + tokens already sent). Every policy is simulated on this same serving
behaviour; ``--drain-admit-seconds 0`` stops admission at the notice.
Billing is per second from the moment an instance exists (a spot request waiting for capacity
costs nothing) until it is terminated.

Alignment of the traces: the arrivals trace (one hour for Azure) and the availability trace
(45.5 days) differ in length. The run is ``--windows`` windows of ``--window-hours`` each,
spread evenly over the availability trace (window i starts at i/windows of its length), each
preceded by ``--warmup-minutes`` that are simulated but neither billed nor measured (so no
policy is judged on its cold start). Inside a window the arrivals trace is replayed in a loop
from the same fractional offset, and availability advances ``--time-scale`` trace seconds per
simulated second (1 = real time; larger values compress more of the availability history,
and so more preemptions, into each window). The Azure hour ends with a sparse partial minute,
so every replay loop has a short lull followed by a ramp: a burst test every policy meets.

Policies, all deciding every ``--interval-seconds`` on the same observations:

- ``static_on_demand``: on-demand only, a fixed count sized for the peak of the replay.
- ``keda_threshold``: on-demand only; KEDA's Prometheus trigger with an AverageValue target on
  waiting + running per replica, scaled by the HPA algorithm (10% tolerance, scale-up at most
  max(100%, 4 pods) per period, 300 s scale-down stabilisation).
- ``skyserve_fallback``: SkyServe's FallbackRequestRateAutoscaler with its defaults (60 s QPS
  window, 300 s upscale and 1200 s downscale delay, base on-demand fallback replicas, dynamic
  on-demand fallback for spot that is not ready).
- ``spotmesh``: ``services.autoscaler.policy.plan``, the policy the autoscaler runs.
- ``oracle``: perfect foresight of arrivals and spot capacity: launches exactly what the next
  minutes need a cold start ahead, spot wherever capacity will be there, no reactive headroom.

Every policy sizes with the same per-replica load (``--target-load-per-replica``): KEDA and
spotmesh target it directly, SkyServe's QPS target and the oracle's and static fleet's sizes
are derived from the profile at that concurrency (the static fleet is the oracle's peak).
What the reactive policies observe is what a real deployment has: per-replica queue, KV and
GPU numbers, the gateway's queue and arrival rate, reclaim notices, and whether spot requests
are being filled (a cloud's spot request status); never the capacity or the future.
"""

from __future__ import annotations

import argparse
import bisect
import csv
import dataclasses
import heapq
import itertools
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import NamedTuple, Protocol

from cli.stats import percentile
from services.autoscaler.actuator import reclaim_admit_seconds
from services.autoscaler.policy import PolicyConfig, PolicyState, plan
from services.autoscaler.signals import (
    Pool,
    Pools,
    PoolState,
    Prices,
    ReplicaSignal,
    Signals,
    SpotMarket,
)

POLICY_NAMES = ("static_on_demand", "keda_threshold", "skyserve_fallback", "spotmesh", "oracle")
WINDOW_SUBSETS = ("all", "even", "odd")
DEFAULT_PROFILE = Path(__file__).with_name("profile_v100_7b.json")
# Means of the Azure 2023 conversation trace (ContextTokens, GeneratedTokens): the request
# size given to per-minute counts traces, which carry no sizes.
AZURE_CONV_MEAN_PROMPT_TOKENS = 1155
AZURE_CONV_MEAN_OUTPUT_TOKENS = 211
# Upper bound on generated requests, so a counts trace with a forgotten --rate-scale fails
# fast instead of filling memory.
MAX_REQUESTS_PER_WINDOW = 5_000_000


def _fail(path: str | Path, line: int | None, field_name: str | None, msg: str) -> SystemExit:
    where = f"{path}" + (f":{line}" if line is not None else "")
    what = f" field {field_name!r}:" if field_name else ""
    return SystemExit(f"{where}:{what} {msg}")


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def _parse_timestamp(value: str) -> float:
    """Seconds since the epoch of an Azure trace timestamp (7 fractional digits allowed)."""
    main, _, frac = value.strip().partition(".")
    seconds = datetime.fromisoformat(main).timestamp()
    if frac:
        if not frac.isdigit():
            raise ValueError(value)
        seconds += float("0." + frac)
    return seconds


def _int_field(path: str, line: int, name: str, value: str | None, minimum: int) -> int:
    try:
        n = int(str(value).strip())
    except ValueError:
        raise _fail(path, line, name, f"not an integer: {value!r}") from None
    if n < minimum:
        raise _fail(path, line, name, f"must be >= {minimum}, got {n}")
    return n


def _float_field(path: str, line: int, name: str, value: str | None, positive: bool) -> float:
    try:
        x = float(str(value).strip())
    except ValueError:
        raise _fail(path, line, name, f"not a number: {value!r}") from None
    if not math.isfinite(x) or x < 0 or (positive and x == 0):
        raise _fail(path, line, name, f"must be a finite number {'>' if positive else '>='} 0, "
                                      f"got {value!r}")
    return x


class Arrival(NamedTuple):
    t: float
    prompt: int
    output: int


class Arrivals:
    """A request trace replayed in a loop: `between(t0, t1)` gives arrivals at trace times
    [t0, t1), any reals, looping with period `span`."""

    def __init__(self, path: str, kind: str, span: float, requests: int,
                 times: list[float] | None = None, prompts: list[int] | None = None,
                 outputs: list[int] | None = None, counts: list[int] | None = None,
                 prompt_tokens: int = 0, output_tokens: int = 0, seed: int = 0) -> None:
        self.path, self.kind, self.span, self.requests = path, kind, span, requests
        self._times, self._prompts, self._outputs = times or [], prompts or [], outputs or []
        self._counts = counts or []
        self._prompt_tokens, self._output_tokens, self._seed = prompt_tokens, output_tokens, seed

    def between(self, t0: float, t1: float) -> list[Arrival]:
        if t1 <= t0:
            return []
        out: list[Arrival] = []
        if self.kind == "azure":
            loop = math.floor(t0 / self.span)
            while loop * self.span < t1:
                base = loop * self.span
                lo = bisect.bisect_left(self._times, t0 - base)
                hi = bisect.bisect_left(self._times, t1 - base)
                out.extend(Arrival(base + self._times[i], self._prompts[i], self._outputs[i])
                           for i in range(lo, hi))
                loop += 1
        else:
            minutes = len(self._counts)
            for m in range(math.floor(t0 / 60), math.ceil(t1 / 60)):
                n = self._counts[m % minutes]
                # Seeded by the minute, so any window sees the same arrivals for that minute.
                rng = random.Random(self._seed * 1_000_003 + m)
                for t in sorted(rng.random() for _ in range(n)):
                    at = 60.0 * (m + t)
                    if t0 <= at < t1:
                        out.append(Arrival(at, self._prompt_tokens, self._output_tokens))
            if len(out) > MAX_REQUESTS_PER_WINDOW:
                raise SystemExit(f"{self.path}: {len(out)} requests in one window; pass a "
                                 f"smaller --rate-scale")
        return out

    def mean_sizes(self) -> tuple[float, float]:
        if self.kind == "azure":
            return statistics.fmean(self._prompts), statistics.fmean(self._outputs)
        return float(self._prompt_tokens), float(self._output_tokens)


def load_arrivals(path: str, rate_scale: float = 1.0, prompt_tokens: int =
                  AZURE_CONV_MEAN_PROMPT_TOKENS, output_tokens: int =
                  AZURE_CONV_MEAN_OUTPUT_TOKENS, seed: int = 0) -> Arrivals:
    """Read an Azure LLM trace (TIMESTAMP,ContextTokens,GeneratedTokens) or a per-minute counts
    CSV (minute,count). For the Azure trace `rate_scale` replays it that many times faster;
    for counts it multiplies each minute's count (fractions carried to the next minute)."""
    if not rate_scale > 0:
        raise SystemExit(f"--rate-scale must be > 0, got {rate_scale}")
    try:
        f = open(path, newline="")
    except OSError as exc:
        raise SystemExit(f"{path}: cannot read arrivals: {exc.strerror}") from None
    with f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise _fail(path, None, None, "empty file: no header, no requests")
        cols = [h.strip() for h in header]
        if {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} <= set(cols):
            its, ic, ig = (cols.index(k) for k in ("TIMESTAMP", "ContextTokens",
                                                   "GeneratedTokens"))
            stamps: list[float] = []
            prompts: list[int] = []
            outputs: list[int] = []
            for line, row in enumerate(reader, start=2):
                if not row or not "".join(row).strip():
                    continue
                if len(row) < len(cols):
                    raise _fail(path, line, None, f"expected {len(cols)} columns, got {len(row)}")
                try:
                    stamps.append(_parse_timestamp(row[its]))
                except ValueError:
                    raise _fail(path, line, "TIMESTAMP",
                                f"not a timestamp: {row[its]!r}") from None
                prompts.append(_int_field(path, line, "ContextTokens", row[ic], 0))
                # A request that generated nothing still produced its first token's latency.
                outputs.append(max(1, _int_field(path, line, "GeneratedTokens", row[ig], 0)))
            if not stamps:
                raise _fail(path, None, None, "no requests after the header")
            order = sorted(range(len(stamps)), key=lambda i: stamps[i])
            t0 = stamps[order[0]]
            times = [(stamps[i] - t0) / rate_scale for i in order]
            gap = (times[-1] / (len(times) - 1)) if len(times) > 1 else 1.0
            # The loop period leaves one mean inter-arrival gap between the last request and
            # the first request of the next replay.
            return Arrivals(path, "azure", times[-1] + gap, len(times), times=times,
                            prompts=[prompts[i] for i in order],
                            outputs=[outputs[i] for i in order])
        if len(cols) == 2:
            counts: list[int] = []
            carry = 0.0
            for line, row in enumerate(reader, start=2):
                if not row or not "".join(row).strip():
                    continue
                if len(row) != 2:
                    raise _fail(path, line, None, f"expected 2 columns, got {len(row)}")
                _float_field(path, line, cols[0], row[0], positive=False)
                raw = _float_field(path, line, cols[1], row[1], positive=False) * rate_scale
                carry += raw
                n = math.floor(carry)
                carry -= n
                counts.append(n)
            if not counts:
                raise _fail(path, None, None, "no rows after the header")
            if sum(counts) == 0:
                raise _fail(path, None, None, f"no requests at --rate-scale {rate_scale}")
            return Arrivals(path, "per-minute", 60.0 * len(counts), sum(counts), counts=counts,
                            prompt_tokens=prompt_tokens, output_tokens=output_tokens,
                            seed=seed)
        raise _fail(path, 1, None, f"unknown arrivals format {cols}: expected "
                                   f"TIMESTAMP,ContextTokens,GeneratedTokens or minute,count")


@dataclass(frozen=True)
class Availability:
    """Spot instances obtainable at each tick, summed over the chosen zones; looped."""

    path: str
    tick_seconds: float
    capacity: tuple[int, ...]
    zones: tuple[str, ...]

    @property
    def span(self) -> float:
        return self.tick_seconds * len(self.capacity)

    def at(self, trace_t: float) -> int:
        return self.capacity[int(trace_t // self.tick_seconds) % len(self.capacity)]


def load_availability(path: str, zones: Sequence[str] = ()) -> Availability:
    """Read `tick,t_seconds,<zone columns>`; each zone value is instances obtainable then."""
    try:
        f = open(path, newline="")
    except OSError as exc:
        raise SystemExit(f"{path}: cannot read spot availability: {exc.strerror}") from None
    with f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        if header[:2] != ["tick", "t_seconds"] or len(header) < 3:
            raise _fail(path, 1, None, f"expected columns tick,t_seconds,<zones...>, got "
                                       f"{header}")
        all_zones = header[2:]
        chosen = list(zones) or all_zones
        unknown = [z for z in chosen if z not in all_zones]
        if unknown:
            raise SystemExit(f"{path}: --zones {unknown} not in the file (zones: {all_zones})")
        idx = [header.index(z) for z in chosen]
        seconds: list[float] = []
        capacity: list[int] = []
        for line, row in enumerate(reader, start=2):
            if not row or not "".join(row).strip():
                continue
            if len(row) != len(header):
                raise _fail(path, line, None, f"expected {len(header)} columns, got {len(row)}")
            seconds.append(_float_field(path, line, "t_seconds", row[1], positive=False))
            capacity.append(sum(_int_field(path, line, header[i], row[i], 0) for i in idx))
    if len(seconds) < 2:
        raise _fail(path, None, None, "need at least two ticks")
    tick = seconds[1] - seconds[0]
    if tick <= 0:
        raise _fail(path, 3, "t_seconds", "ticks must increase")
    for i, s in enumerate(seconds):
        if abs(s - seconds[0] - i * tick) > 1e-6 * max(1.0, s):
            raise _fail(path, i + 2, "t_seconds", f"ticks must be evenly spaced ({tick:g}s), "
                                                  f"got {s:g} at row {i + 1}")
    return Availability(path, tick, tuple(capacity), tuple(chosen))


_DIRECTIONS = {"north": "n", "south": "s", "east": "e", "west": "w", "central": "c",
               "northeast": "ne", "northwest": "nw", "southeast": "se", "southwest": "sw"}


def zone_id_prefix(zone: str) -> str | None:
    """AWS zone name (us-east-1a, or us-east-1a_v100_1) -> zone-ID prefix of its region (use1).

    Zone *names* map to zone *IDs* differently in every AWS account, so a zone's own price
    cannot be joined to the availability trace; its region's prices can.
    """
    name = zone.split("_")[0]
    parts = name.split("-")
    if len(parts) != 3 or not parts[2] or not parts[2][0].isdigit():
        return None
    number = parts[2].rstrip("abcdefghijklmnopqrstuvwxyz")
    direction = _DIRECTIONS.get(parts[1])
    return None if direction is None else f"{parts[0]}{direction}{number}"


@dataclass(frozen=True)
class SpotPrice:
    usd_per_hour: float
    stat: str
    zones: tuple[str, ...]
    note: str


def load_spot_price(path: str, instance_type: str, zones: Sequence[str] = (),
                    stat: str = "mean") -> SpotPrice:
    """The spot price of `instance_type`: per zone the latest row, then `stat` over the zones in
    the regions of `zones` (all the type's zones when none of them match)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise SystemExit(f"{path}: cannot read spot prices: {exc.strerror}") from None
    lines = text.splitlines()
    if not lines:
        raise _fail(path, None, None, "empty file")
    delimiter = "\t" if "\t" in lines[0] else ","
    reader = csv.reader(lines, delimiter=delimiter)
    header = [h.strip() for h in next(reader)]
    need = ("availability_zone_id", "instance_type", "spot_price_usd_per_hour", "timestamp_utc")
    missing = [k for k in need if k not in header]
    if missing:
        raise _fail(path, 1, None, f"missing columns {missing} (have {header})")
    iz, it, ip, its = (header.index(k) for k in need)
    latest: dict[str, tuple[str, float]] = {}
    types: set[str] = set()
    for line, row in enumerate(reader, start=2):
        if not row or not "".join(row).strip():
            continue
        if len(row) != len(header):
            raise _fail(path, line, None, f"expected {len(header)} columns, got {len(row)}")
        types.add(row[it].strip())
        if row[it].strip() != instance_type:
            continue
        price = _float_field(path, line, "spot_price_usd_per_hour", row[ip], positive=True)
        stamp = row[its].strip()
        try:
            datetime.fromisoformat(stamp)
        except ValueError:
            raise _fail(path, line, "timestamp_utc", f"not a timestamp: {stamp!r}") from None
        zone = row[iz].strip()
        if zone not in latest or stamp >= latest[zone][0]:
            latest[zone] = (stamp, price)
    if not latest:
        raise SystemExit(f"{path}: no spot price for instance type {instance_type!r} "
                         f"(types in the file: {', '.join(sorted(types)) or 'none'})")
    prefixes = {p for p in (zone_id_prefix(z) for z in zones) if p}
    chosen = sorted(z for z in latest if z.split("-")[0] in prefixes)
    note = f"zones of regions {sorted(prefixes)}"
    if not chosen:
        chosen = sorted(latest)
        note = "no price in the availability zones' regions: all zones of the type"
    values = [latest[z][1] for z in chosen]
    fn: dict[str, Callable[[list[float]], float]] = {
        "mean": statistics.fmean, "median": statistics.median, "min": min, "max": max}
    if stat not in fn:
        raise SystemExit(f"--spot-price-stat must be one of {sorted(fn)}, got {stat!r}")
    return SpotPrice(round(fn[stat](values), 6), stat, tuple(chosen), note)


def load_on_demand_price(path: str, instance_type: str) -> float:
    """`instance_type`'s on-demand hourly price from a CSV with instance_type and
    on_demand_usd_per_hour columns."""
    try:
        f = open(path, newline="")
    except OSError as exc:
        raise SystemExit(f"{path}: cannot read on-demand prices: {exc.strerror}") from None
    with f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        for k in ("instance_type", "on_demand_usd_per_hour"):
            if k not in cols:
                raise _fail(path, 1, None, f"missing column {k!r} (have {cols})")
        types = []
        for line, row in enumerate(reader, start=2):
            types.append(row["instance_type"])
            if (row["instance_type"] or "").strip() == instance_type:
                return _float_field(path, line, "on_demand_usd_per_hour",
                                    row["on_demand_usd_per_hour"], positive=True)
    raise SystemExit(f"{path}: no on-demand price for instance type {instance_type!r} "
                     f"(types in the file: {', '.join(types) or 'none'})")


@dataclass(frozen=True)
class ReplicaProfile:
    """How fast one replica serves: aggregate decode tokens/s by concurrency, prefill rate,
    KV capacity and cold start. `prefill_tokens_per_s` None means the curve was measured with
    prefill included (a `spotmesh bench serve` output) and prefill costs no separate time."""

    name: str
    decode: tuple[tuple[int, float], ...]
    max_concurrency: int
    prefill_tokens_per_s: float | None
    kv_capacity_tokens: int | None
    startup_seconds: float
    source: str

    def throughput(self, n: int) -> float:
        """Aggregate decode tokens/s with `n` requests decoding: linear between measured
        points, through (0, 0), flat past the last one."""
        if n <= 0:
            return 0.0
        pts = [(0, 0.0), *self.decode]
        for (c0, t0), (c1, t1) in itertools.pairwise(pts):
            if n <= c1:
                return t0 + (t1 - t0) * (n - c0) / (c1 - c0)
        return pts[-1][1]

    def as_dict(self) -> dict:
        return {"name": self.name, "decode_tokens_per_s": [list(p) for p in self.decode],
                "max_concurrency": self.max_concurrency,
                "prefill_tokens_per_s": self.prefill_tokens_per_s,
                "kv_capacity_tokens": self.kv_capacity_tokens,
                "startup_seconds": self.startup_seconds, "source": self.source}


def load_profile(path: str | Path = DEFAULT_PROFILE, startup_seconds: float | None = None,
                 ) -> ReplicaProfile:
    """A profile file (see profile_v100_7b.json) or a `spotmesh bench serve --json` output
    (runs[].concurrency, runs[].mesh.tokens_per_s)."""
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as exc:
        raise SystemExit(f"{path}: cannot read profile: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise _fail(path, exc.lineno, None, f"not JSON: {exc.msg}") from None
    if not isinstance(doc, dict):
        raise _fail(path, None, None, "expected a JSON object")
    if "runs" in doc:
        points = []
        for i, run in enumerate(doc["runs"]):
            try:
                c = int(run["concurrency"])
                tps = float(run["mesh"]["tokens_per_s"])
            except (KeyError, TypeError, ValueError):
                raise _fail(path, None, f"runs[{i}].mesh.tokens_per_s",
                            "missing or not a number") from None
            points.append((c, tps))
        name = f"bench-serve:{doc.get('model', 'unknown')}"
        source = (f"spotmesh bench serve output {Path(path).name} ({doc.get('model')}, "
                  f"max_tokens {doc.get('max_tokens')}, machine {doc.get('machine')}); "
                  f"tokens/s measured end to end through the mesh, so prefill is inside the "
                  f"curve; cold start not measured there")
        prefill, kv, startup = None, None, 180.0
        max_c = max((c for c, _ in points), default=0)
    else:
        key = "decode_tokens_per_s"
        raw = doc.get(key)
        if not isinstance(raw, list) or not raw:
            raise _fail(path, None, key, "expected a non-empty list of [concurrency, tokens/s]")
        points = []
        for i, p in enumerate(raw):
            try:
                points.append((int(p[0]), float(p[1])))
            except (TypeError, ValueError, IndexError):
                raise _fail(path, None, f"{key}[{i}]", "expected [concurrency, tokens/s]") \
                    from None
        name = str(doc.get("name", Path(path).stem))
        source = str(doc.get("source", ""))
        prefill = doc.get("prefill_tokens_per_s")
        kv = doc.get("kv_capacity_tokens")
        startup = doc.get("startup_seconds", 180.0)
        max_c = doc.get("max_concurrency", max((c for c, _ in points), default=0))
        for k, v in (("prefill_tokens_per_s", prefill), ("kv_capacity_tokens", kv)):
            if v is not None and not (isinstance(v, int | float) and v > 0):
                raise _fail(path, None, k, f"must be a number > 0, got {v!r}")
        if not isinstance(startup, int | float) or startup < 0:
            raise _fail(path, None, "startup_seconds", f"must be >= 0, got {startup!r}")
        if not isinstance(max_c, int) or max_c < 1:
            raise _fail(path, None, "max_concurrency", f"must be an integer >= 1, got {max_c!r}")
    points.sort()
    if not points:
        raise _fail(path, None, "runs", "no measurements")
    for c, tps in points:
        if c < 1 or not tps > 0:
            raise _fail(path, None, "decode_tokens_per_s",
                        f"concurrency must be >= 1 and tokens/s > 0, got ({c}, {tps})")
    if len({c for c, _ in points}) != len(points):
        raise _fail(path, None, "decode_tokens_per_s", "a concurrency appears twice")
    return ReplicaProfile(
        name=name, decode=tuple(points), max_concurrency=int(max_c),
        prefill_tokens_per_s=float(prefill) if prefill else None,
        kv_capacity_tokens=int(kv) if kv else None,
        startup_seconds=float(startup if startup_seconds is None else startup_seconds),
        source=source)


# ---------------------------------------------------------------------------------------------
# The simulated fleet
# ---------------------------------------------------------------------------------------------

WAITING, BOOTING, READY, DRAINING, RECLAIMED, GONE = range(6)
_PREFILL_DONE, _DECODE_DONE, _READY, _NOTICE_END, _TICK, _CONTROL = range(6)


class Request:
    __slots__ = (
        "arrival",
        "ctx",
        "finish_v",
        "first_token",
        "measured",
        "output",
        "prompt",
        "remaining",
        "resumed",
        "vstart",
    )

    def __init__(self, a: Arrival, measured: bool) -> None:
        self.arrival, self.prompt, self.output = a.t, a.prompt, a.output
        self.ctx = a.prompt  # tokens to prefill before decoding (re)starts
        self.remaining = a.output - 1  # tokens to decode after the first
        self.first_token: float | None = None
        self.finish_v = 0.0
        self.vstart = 0.0
        self.measured = measured
        self.resumed = 0


class Replica:
    """One simulated inference replica and its engine state."""

    __slots__ = (
        "acquired_at",
        "admit_until",
        "busy_acc",
        "busy_since",
        "dec_version",
        "decoding",
        "ended_at",
        "kv_ctx",
        "last",
        "launched_at",
        "name",
        "pool",
        "prefill_end",
        "prefill_q",
        "prefill_q_tokens",
        "prefilling",
        "state",
        "v",
        "vstart_sum",
    )

    def __init__(self, name: str, pool: Pool, now: float) -> None:
        self.name, self.pool = name, pool
        self.state = WAITING
        self.launched_at = now
        self.acquired_at: float | None = None
        self.admit_until = -math.inf  # a reclaimed replica still takes requests before this
        self.ended_at: float | None = None
        self.prefill_q: deque[Request] = deque()
        self.prefill_q_tokens = 0
        self.prefilling: Request | None = None
        self.prefill_end = 0.0
        self.decoding: list[tuple[float, int, Request]] = []
        self.v = 0.0
        self.last = now
        self.dec_version = 0
        self.kv_ctx = 0
        self.vstart_sum = 0.0
        self.busy_acc = 0.0
        self.busy_since: float | None = None

    @property
    def held(self) -> int:
        return len(self.prefill_q) + (self.prefilling is not None) + len(self.decoding)

    @property
    def pending(self) -> bool:
        return self.state in (WAITING, BOOTING)


@dataclass
class FleetView:
    """What a policy sees at a decision: the same for every policy."""

    now: float
    replicas: list[Replica]
    queue: int
    arrivals_last_minute: int
    arrival_rate_rps: float  # over the last minute, or since the start if shorter
    last_preemption_at: float | None
    preemption_rate: float
    desired: dict[Pool, int]
    busy_fraction: dict[str, float]
    kv_usage: dict[str, float]


class Decision(NamedTuple):
    spot: int
    on_demand: int
    remove: tuple[str, ...] = ()


class SimPolicy(Protocol):
    name: str

    def decide(self, view: FleetView) -> Decision: ...


@dataclass
class WindowResult:
    cost_usd: float = 0.0
    replica_seconds: dict[str, float] = field(default_factory=lambda: {"spot": 0.0,
                                                                       "on-demand": 0.0})
    arrived: int = 0
    requests: int = 0
    slo_met: int = 0
    unfinished: int = 0
    ttft: list[float] = field(default_factory=list)
    queue_wait: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    preemptions: int = 0
    resumed: int = 0
    launches: dict[str, int] = field(default_factory=lambda: {"spot": 0, "on-demand": 0})
    timeline: list[tuple[float, int, int, int, int, int, int]] = field(default_factory=list)
    ttft_by_arrival: list[tuple[float, float]] = field(default_factory=list)
    events: int = 0


class Simulation:
    """One policy over one window: [-warmup, duration) simulated, [0, duration) measured."""

    def __init__(self, policy: SimPolicy, arrivals: list[Arrival], capacity_at: Callable[
                 [float], int], tick_seconds: float, profile: ReplicaProfile, prices: Prices,
                 duration: float, warmup: float, interval: float, notice: float, slo: float,
                 progress: Callable[[str], None] | None = None,
                 drain_admit: float = 0.0) -> None:
        self.policy, self.arrivals, self.capacity_at = policy, arrivals, capacity_at
        self.tick_seconds, self.profile, self.prices = tick_seconds, profile, prices
        self.duration, self.warmup, self.interval = duration, warmup, interval
        self.notice, self.slo, self.progress = notice, slo, progress
        self.drain_admit = min(drain_admit, notice)
        self.rate = [0.0] + [profile.throughput(n) / n
                             for n in range(1, profile.max_concurrency + 1)]
        self.heap: list[tuple[float, int, int, Replica | None, int]] = []
        self.seq = itertools.count()
        self.replicas: list[Replica] = []
        self.all_replicas: list[Replica] = []
        self.queue: deque[Request] = deque()
        self.recent: deque[float] = deque()
        self.desired: dict[Pool, int] = {"spot": 0, "on-demand": 0}
        self.names = itertools.count()
        self.last_preemption_at: float | None = None
        self.preempted_total = 0
        self.spot_seconds_held = 0.0
        self.busy_mark: dict[str, float] = {}
        self.open = 0  # measured requests not yet complete
        self.result = WindowResult()

    # -- events ------------------------------------------------------------------------------

    def _push(self, t: float, kind: int, rep: Replica | None = None, version: int = 0) -> None:
        heapq.heappush(self.heap, (t, next(self.seq), kind, rep, version))

    def run(self) -> WindowResult:
        start = -self.warmup
        self._push(start, _TICK)
        self._push(start, _CONTROL)
        arrivals, n_arr, i = self.arrivals, len(self.arrivals), 0
        stop_at = self.duration + 1800.0
        next_report = 0.25
        heap = self.heap
        while heap:
            t_arr = arrivals[i].t if i < n_arr else math.inf
            if t_arr < heap[0][0]:
                now = t_arr
                self._arrive(Request(arrivals[i], 0.0 <= t_arr < self.duration), now)
                i += 1
            else:
                now, _, kind, rep, version = heapq.heappop(heap)
                if now >= self.duration and i >= n_arr and (self.open == 0 or now > stop_at):
                    break
                self._event(now, kind, rep, version)
            self.result.events += 1
            if self.progress and now >= next_report * self.duration:
                self.progress(f"{next_report:.0%}")
                next_report += 0.25
        self._finish(now)
        return self.result

    def _event(self, now: float, kind: int, rep: Replica | None, version: int) -> None:
        if kind == _DECODE_DONE:
            assert rep is not None
            if version == rep.dec_version and rep.state != GONE:
                self._decode_done(rep, now)
        elif kind == _PREFILL_DONE:
            assert rep is not None
            if rep.state != GONE and rep.prefilling is not None and version == rep.dec_version:
                self._prefill_done(rep, now)
        elif kind == _READY:
            assert rep is not None
            if rep.state == BOOTING:
                rep.state = READY
                self._dispatch(now)
        elif kind == _NOTICE_END:
            assert rep is not None
            if rep.state == RECLAIMED:
                self._terminate(rep, now, resume=True)
        elif kind == _TICK:
            self._tick(now)
            if now < self.duration:
                self._push(now + self.tick_seconds, _TICK)
        elif kind == _CONTROL:
            self._control(now)
            self._push(now + self.interval, _CONTROL)

    # -- requests ----------------------------------------------------------------------------

    def _arrive(self, req: Request, now: float) -> None:
        self.recent.append(now)
        if req.measured:
            self.open += 1
            self.result.arrived += 1
        self.queue.append(req)
        self._dispatch(now)

    def _best(self, now: float) -> Replica | None:
        best, best_key = None, None
        cap = self.profile.max_concurrency
        prefill = self.profile.prefill_tokens_per_s
        for rep in self.replicas:
            if rep.held >= cap or (rep.state != READY and not (
                    rep.state == RECLAIMED and now < rep.admit_until)):
                continue
            backlog = 0.0
            if prefill:
                backlog = rep.prefill_q_tokens / prefill + (
                    rep.prefill_end - now if rep.prefilling is not None else 0.0)
            key = (backlog, rep.held, rep.name)
            if best_key is None or key < best_key:
                best, best_key = rep, key
        return best

    def _dispatch(self, now: float) -> None:
        while self.queue:
            rep = self._best(now)
            if rep is None:
                return
            req = self.queue.popleft()
            if req.measured and req.resumed == 0:
                self.result.queue_wait.append(now - req.arrival)
            self._admit(rep, req, now)

    def _advance(self, rep: Replica, now: float) -> None:
        if rep.prefilling is None and rep.decoding:
            rep.v += self.rate[len(rep.decoding)] * (now - rep.last)
        rep.last = now

    def _set_busy(self, rep: Replica, now: float) -> None:
        busy = rep.prefilling is not None or bool(rep.decoding)
        if busy and rep.busy_since is None:
            rep.busy_since = now
        elif not busy and rep.busy_since is not None:
            rep.busy_acc += now - rep.busy_since
            rep.busy_since = None

    def _schedule(self, rep: Replica, now: float) -> None:
        """Queue the replica's next engine event: the end of the next prefill if one is
        waiting, else the next decode completion."""
        rep.dec_version += 1
        if rep.prefilling is None and rep.prefill_q:
            req = rep.prefill_q.popleft()
            rep.prefill_q_tokens -= req.ctx
            rep.prefilling = req
            rep.prefill_end = now + req.ctx / (self.profile.prefill_tokens_per_s or math.inf)
            self._push(rep.prefill_end, _PREFILL_DONE, rep, rep.dec_version)
        elif rep.prefilling is not None:
            self._push(rep.prefill_end, _PREFILL_DONE, rep, rep.dec_version)
        elif rep.decoding:
            dt = (rep.decoding[0][0] - rep.v) / self.rate[len(rep.decoding)]
            self._push(now + max(0.0, dt), _DECODE_DONE, rep, rep.dec_version)
        self._set_busy(rep, now)

    def _admit(self, rep: Replica, req: Request, now: float) -> None:
        self._advance(rep, now)
        if self.profile.prefill_tokens_per_s is None:
            self._start_decoding(rep, req, now)
        else:
            rep.prefill_q.append(req)
            rep.prefill_q_tokens += req.ctx
        self._schedule(rep, now)

    def _start_decoding(self, rep: Replica, req: Request, now: float) -> None:
        if req.first_token is None:
            req.first_token = now
            if req.measured:
                ttft = now - req.arrival
                self.result.ttft.append(ttft)
                self.result.ttft_by_arrival.append((req.arrival, ttft))
                if ttft <= self.slo:
                    self.result.slo_met += 1
        if req.remaining <= 0:
            self._complete(req)
            return
        req.vstart = rep.v
        req.finish_v = rep.v + req.remaining
        rep.kv_ctx += req.ctx
        rep.vstart_sum += rep.v
        heapq.heappush(rep.decoding, (req.finish_v, next(self.seq), req))

    def _prefill_done(self, rep: Replica, now: float) -> None:
        req = rep.prefilling
        assert req is not None
        rep.prefilling = None
        rep.last = now  # decoding was stalled during the prefill
        self._start_decoding(rep, req, now)
        self._schedule(rep, now)
        self._after_free(rep, now)

    def _decode_done(self, rep: Replica, now: float) -> None:
        self._advance(rep, now)
        while rep.decoding and rep.decoding[0][0] <= rep.v + 1e-6:
            _, _, req = heapq.heappop(rep.decoding)
            rep.kv_ctx -= req.ctx
            rep.vstart_sum -= req.vstart
            self._complete(req)
        self._schedule(rep, now)
        self._after_free(rep, now)

    def _after_free(self, rep: Replica, now: float) -> None:
        if rep.state in (DRAINING, RECLAIMED) and rep.held == 0 and not now < rep.admit_until:
            self._terminate(rep, now, resume=False)
        else:
            self._dispatch(now)

    def _complete(self, req: Request) -> None:
        if req.measured:
            self.result.requests += 1
            self.result.prompt_tokens += req.prompt
            self.result.output_tokens += req.output
            self.open -= 1

    # -- the fleet ---------------------------------------------------------------------------

    def _launch(self, pool: Pool, now: float) -> None:
        rep = Replica(f"{'s' if pool == 'spot' else 'od'}{next(self.names)}", pool, now)
        self.replicas.append(rep)
        self.all_replicas.append(rep)
        if now >= 0:
            self.result.launches[pool] += 1
        if pool == "on-demand":
            self._boot(rep, now)
        else:
            self._acquire_spot(now)

    def _boot(self, rep: Replica, now: float) -> None:
        rep.state = BOOTING
        rep.acquired_at = now
        self._push(now + self.profile.startup_seconds, _READY, rep)

    def _spot_alive(self) -> list[Replica]:
        return [r for r in self.replicas
                if r.pool == "spot" and r.state in (BOOTING, READY, DRAINING)]

    def _acquire_spot(self, now: float) -> None:
        room = self.capacity_at(now) - len(self._spot_alive())
        for rep in self.replicas:
            if room <= 0:
                break
            if rep.pool == "spot" and rep.state == WAITING:
                self._boot(rep, now)
                room -= 1

    def _terminate(self, rep: Replica, now: float, resume: bool) -> None:
        if rep.state == GONE:
            return
        self._advance(rep, now)
        if resume:
            moved: list[Request] = []
            if rep.prefilling is not None:
                moved.append(rep.prefilling)
            moved.extend(rep.prefill_q)
            for finish_v, _, req in sorted(rep.decoding, key=lambda d: d[2].arrival):
                # Resume elsewhere: re-prefill the prompt and what was already sent.
                done = max(0.0, rep.v - req.vstart)
                req.remaining = max(0, round(finish_v - rep.v))
                req.ctx = req.prompt + 1 + int(done)
                moved.append(req)
            for req in moved:
                req.resumed += 1
                if req.arrival >= 0:
                    self.result.resumed += 1
            self.queue.extendleft(reversed(sorted(moved, key=lambda r: r.arrival)))
        rep.prefilling = None
        rep.prefill_q.clear()
        rep.prefill_q_tokens = 0
        rep.decoding.clear()
        rep.kv_ctx, rep.vstart_sum = 0, 0.0
        rep.dec_version += 1
        self._set_busy(rep, now)
        rep.state = GONE
        rep.ended_at = now
        self.replicas.remove(rep)
        if rep.pool == "spot":
            self._acquire_spot(now)
        self._dispatch(now)

    def _remove(self, rep: Replica, now: float) -> None:
        if rep.state == WAITING:
            rep.state = GONE
            rep.ended_at = now
            self.replicas.remove(rep)
        elif rep.state == BOOTING:
            self._terminate(rep, now, resume=False)
        elif rep.state == READY:
            rep.state = DRAINING
            if rep.held == 0:
                self._terminate(rep, now, resume=False)

    def _tick(self, now: float) -> None:
        cap = self.capacity_at(now)
        alive = self._spot_alive()
        if len(alive) > cap:
            victims = sorted(alive, key=lambda r: (r.state != DRAINING, r.state != BOOTING,
                                                   -(r.acquired_at or 0.0), r.name))
            for rep in victims[:len(alive) - cap]:
                if rep.state == READY and self.drain_admit > 0:
                    # Serves on through the notice; a replica being drained or still booting
                    # has nothing to offer.
                    rep.admit_until = now + self.drain_admit
                rep.state = RECLAIMED
                self.last_preemption_at = now
                self.preempted_total += 1
                if 0 <= now < self.duration:
                    self.result.preemptions += 1
                if rep.held == 0 and not now < rep.admit_until:
                    self._terminate(rep, now, resume=False)
                else:
                    self._push(now + self.notice, _NOTICE_END, rep)
        self._acquire_spot(now)

    def _control(self, now: float) -> None:
        while self.recent and self.recent[0] < now - 60.0:
            self.recent.popleft()
        busy: dict[str, float] = {}
        kv: dict[str, float] = {}
        cap_tokens = self.profile.kv_capacity_tokens
        for rep in self.replicas:
            acc = rep.busy_acc + (now - rep.busy_since if rep.busy_since is not None else 0.0)
            busy[rep.name] = min(1.0, max(0.0, (acc - self.busy_mark.get(rep.name, 0.0))
                                          / self.interval))
            self.busy_mark[rep.name] = acc
            if cap_tokens:
                self._advance(rep, now)
                used = (rep.kv_ctx + len(rep.decoding) * rep.v - rep.vstart_sum
                        + (rep.prefilling.ctx if rep.prefilling is not None else 0))
                kv[rep.name] = min(1.0, max(0.0, used / cap_tokens))
            else:
                kv[rep.name] = min(1.0, rep.held / self.profile.max_concurrency)
        spot_hours = self.spot_seconds_held / 3600.0
        view = FleetView(
            now=now, replicas=list(self.replicas), queue=len(self.queue),
            arrivals_last_minute=len(self.recent),
            arrival_rate_rps=len(self.recent) / max(self.interval,
                                                    min(60.0, now + self.warmup)),
            last_preemption_at=self.last_preemption_at,
            preemption_rate=self.preempted_total / max(1.0, spot_hours),
            desired=dict(self.desired), busy_fraction=busy, kv_usage=kv)
        self.spot_seconds_held += self.interval * len(self._spot_alive())
        decision = self.policy.decide(view)
        self._apply(decision, now)
        if now >= 0 and now < self.duration:
            ready = {p: sum(1 for r in self.replicas if r.pool == p and r.state == READY)
                     for p in ("spot", "on-demand")}
            pend = {p: sum(1 for r in self.replicas if r.pool == p and r.pending)
                    for p in ("spot", "on-demand")}
            self.result.timeline.append((now, len(self.recent), ready["spot"],
                                         ready["on-demand"], pend["spot"], pend["on-demand"],
                                         self.capacity_at(now)))

    def _apply(self, d: Decision, now: float) -> None:
        named = set(d.remove)
        for pool, target in (("spot", d.spot), ("on-demand", d.on_demand)):
            target = max(0, int(target))
            self.desired[pool] = target
            members = [r for r in self.replicas
                       if r.pool == pool and r.state in (WAITING, BOOTING, READY)]
            if target > len(members):
                for _ in range(target - len(members)):
                    self._launch(pool, now)
            elif target < len(members):
                k = len(members) - target
                chosen = [r for r in members if r.name in named][:k]
                rest = sorted((r for r in members if r not in chosen),
                              key=lambda r: (r.state, -r.launched_at if r.pending else 0.0,
                                             r.held, r.name))
                for rep in chosen + rest[:k - len(chosen)]:
                    self._remove(rep, now)

    def _finish(self, end: float) -> None:
        res = self.result
        res.unfinished = self.open
        price = {"spot": self.prices.spot_usd_per_hour,
                 "on-demand": self.prices.on_demand_usd_per_hour}
        for rep in self.all_replicas:
            if rep.acquired_at is None:
                continue
            stop = rep.ended_at if rep.ended_at is not None else end
            billed = max(0.0, min(stop, self.duration) - max(rep.acquired_at, 0.0))
            res.replica_seconds[rep.pool] += billed
            res.cost_usd += billed * price[rep.pool] / 3600.0


# ---------------------------------------------------------------------------------------------
# Policies
# ---------------------------------------------------------------------------------------------


def _load(view: FleetView) -> int:
    """Requests the fleet holds, the queue-depth metric (vLLM's waiting + running, plus what
    the gateway queues for want of a free slot)."""
    return view.queue + sum(r.held for r in view.replicas if r.state in (READY, DRAINING,
                                                                         RECLAIMED))


class StaticOnDemand:
    """A fixed on-demand fleet sized for the peak."""

    name = "static_on_demand"

    def __init__(self, replicas: int) -> None:
        self.replicas = replicas

    def decide(self, view: FleetView) -> Decision:
        return Decision(0, self.replicas)


class KedaThreshold:
    """KEDA Prometheus trigger (AverageValue) driving the HPA algorithm, on-demand only."""

    name = "keda_threshold"

    def __init__(self, target: float, min_replicas: int = 1, max_replicas: int = 1000,
                 tolerance: float = 0.1, down_window: float = 300.0) -> None:
        self.target, self.min, self.max = target, min_replicas, max_replicas
        self.tolerance, self.down_window = tolerance, down_window
        self.current = min_replicas
        self.history: deque[tuple[float, int]] = deque()

    def decide(self, view: FleetView) -> Decision:
        load = _load(view)
        cur = max(self.current, 1)
        ratio = load / (self.target * cur)
        rec = cur if abs(ratio - 1.0) <= self.tolerance else math.ceil(load / self.target)
        rec = min(max(rec, self.min), self.max)
        self.history.append((view.now, rec))
        while self.history and self.history[0][0] < view.now - self.down_window:
            self.history.popleft()
        if rec > self.current:
            # HPA default scale-up policy: +100% or +4 pods per period, whichever is more.
            self.current = min(rec, max(2 * self.current, self.current + 4))
        else:
            self.current = min(self.current, max(n for _, n in self.history))
        return Decision(0, self.current)


class SkyServeFallback:
    """SkyServe's FallbackRequestRateAutoscaler: QPS target, consecutive-period hysteresis,
    base on-demand replicas plus on-demand for every spot replica that is not ready."""

    name = "skyserve_fallback"

    def __init__(self, target_qps: float, interval: float, base_on_demand: int = 1,
                 min_replicas: int = 1, max_replicas: int = 1000, upscale_delay: float = 300.0,
                 downscale_delay: float = 1200.0) -> None:
        self.target_qps, self.base = target_qps, base_on_demand
        self.min, self.max = max(min_replicas, base_on_demand), max_replicas
        self.up_periods = int(upscale_delay / interval)
        self.down_periods = int(downscale_delay / interval)
        self.target_num = self.min
        self.up = self.down = 0

    def decide(self, view: FleetView) -> Decision:
        qps = view.arrivals_last_minute / 60.0
        want = min(max(math.ceil(qps / self.target_qps), self.min), self.max)
        if self.target_num == 0:
            self.target_num = want
        elif want > self.target_num:
            self.up, self.down = self.up + 1, 0
            if self.up >= self.up_periods:
                self.up, self.target_num = 0, want
        elif want < self.target_num:
            self.down, self.up = self.down + 1, 0
            if self.down >= self.down_periods:
                self.down, self.target_num = 0, want
        else:
            self.up = self.down = 0
        spot = self.target_num - self.base
        ready_spot = sum(1 for r in view.replicas if r.pool == "spot" and r.state == READY)
        on_demand = self.base + max(0, spot - ready_spot)
        return Decision(spot, on_demand)


class SpotmeshPolicy:
    """services.autoscaler.policy.plan, fed the simulated replicas as signals."""

    name = "spotmesh"

    def __init__(self, config: PolicyConfig, prices: Prices, max_replicas: int = 1000) -> None:
        self.config, self.prices, self.max = config, prices, max_replicas
        self.state = PolicyState()
        self.reasons: list[tuple[float, str]] = []

    def signals(self, view: FleetView) -> tuple[Signals, Pools, SpotMarket]:
        sigs = []
        for r in view.replicas:
            state = ("pending" if r.pending else "ready" if r.state == READY else "draining")
            waiting = len(r.prefill_q)
            sigs.append(ReplicaSignal(
                replica=r.name, pool=r.pool, waiting=waiting, running=r.held - waiting,
                kv_cache_usage=view.kv_usage.get(r.name, 0.0),
                gpu_utilization=view.busy_fraction.get(r.name, 0.0), observed_at=view.now,
                state=state, state_since=r.launched_at if r.pending else None))
        pools = {}
        for pool in ("spot", "on-demand"):
            mine = [r for r in view.replicas if r.pool == pool]
            pools[pool] = PoolState(
                desired=view.desired[pool], ready=sum(1 for r in mine if r.state == READY),
                pending=sum(1 for r in mine if r.pending), min_replicas=0,
                max_replicas=self.max)
        # What a cloud's spot request status says (AWS: capacity-not-available): whether the
        # spot requests made so far got instances. Not the capacity itself, nor the future.
        waiting = any(r.pool == "spot" and r.state == WAITING for r in view.replicas)
        market = SpotMarket(available=not waiting,
                            preemption_rate_per_replica_hour=view.preemption_rate,
                            last_preemption_at=view.last_preemption_at)
        signals = Signals(replicas=sigs, arrival_rate_rps=view.arrival_rate_rps,
                          now=view.now, unassigned_waiting=view.queue)
        return signals, Pools(spot=pools["spot"], on_demand=pools["on-demand"]), market

    def decide(self, view: FleetView) -> Decision:
        signals, pools, market = self.signals(view)
        p = plan(signals, pools, self.prices, view.now, self.state, self.config, market)
        self.state = p.state
        return Decision(p.spot, p.on_demand, tuple(p.remove))


class Oracle:
    """Perfect foresight: knows every arrival and every future spot capacity.

    `need[k]` is the replica count the requests arriving in the minute from slot k need at the
    shared per-replica load; a replica is launched a cold start ahead of the slot that needs
    it, on spot wherever capacity stays available from launch to use, else on demand.
    """

    name = "oracle"

    def __init__(self, need: list[int], capacity: list[int], start: float, interval: float,
                 startup: float) -> None:
        self.start, self.interval = start, interval
        lead = math.ceil(startup / interval) + 1
        spot_ready = []
        for k, n in enumerate(need):
            lo = max(0, k - lead)
            spot_ready.append(min(n, min(capacity[lo:k + 1])))
        self.spot = [max(spot_ready[k:k + lead + 1]) for k in range(len(need))]
        self.spot = [min(s, capacity[k]) for k, s in enumerate(self.spot)]
        od = [n - s for n, s in zip(need, spot_ready, strict=True)]
        self.on_demand = [max(od[k:k + lead + 1]) for k in range(len(need))]

    def decide(self, view: FleetView) -> Decision:
        k = min(len(self.spot) - 1, max(0, round((view.now - self.start) / self.interval)))
        return Decision(self.spot[k], self.on_demand[k])


def request_cost_seconds(a: Arrival, profile: ReplicaProfile, concurrency: float) -> float:
    """Replica-seconds one request takes when the replica carries `concurrency` requests:
    its prefill alone, then its decoded tokens at the aggregate rate T(concurrency)."""
    prefill = a.prompt / profile.prefill_tokens_per_s if profile.prefill_tokens_per_s else 0.0
    c = max(1, min(profile.max_concurrency, round(concurrency)))
    return prefill + max(0, a.output - 1) / profile.throughput(c)


def need_timeline(arrivals: list[Arrival], profile: ReplicaProfile, concurrency: float,
                  start: float, end: float, step: float, window: float = 60.0) -> list[int]:
    """Replicas the arrivals of each [t, t + window) need, for t = start, start + step, ..."""
    times = [a.t for a in arrivals]
    cost = list(itertools.accumulate((request_cost_seconds(a, profile, concurrency)
                                      for a in arrivals), initial=0.0))
    out = []
    t = start
    while t < end:
        lo = bisect.bisect_left(times, t)
        hi = bisect.bisect_left(times, t + window)
        out.append(math.ceil((cost[hi] - cost[lo]) / window - 1e-9))
        t += step
    return out


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """Everything one `simulate` run compares the policies on."""

    arrivals: Arrivals
    availability: Availability
    profile: ReplicaProfile
    prices: Prices
    spot_price: SpotPrice
    instance_type: str
    windows: int
    window_hours: float
    warmup_minutes: float
    time_scale: float
    interval: float
    notice: float
    slo_ttft: float
    target_load: float
    on_demand_floor: int
    static_replicas: int
    skyserve_delays: tuple[float, float] = (300.0, 1200.0)
    # Which of the `windows` windows run: "all", or "even" / "odd" indices (0-based), so a
    # policy can be tuned on one half of the windows and judged on the other.
    window_subset: str = "all"
    # Seconds of a reclaim notice a replica keeps taking requests (0: it stops at the notice).
    drain_admit: float = 0.0

    def indices(self) -> list[int]:
        """The indices (of `windows`) of the windows this run simulates."""
        if self.window_subset not in WINDOW_SUBSETS:
            raise SystemExit(f"--window-subset must be one of {WINDOW_SUBSETS}, got "
                             f"{self.window_subset!r}")
        return [i for i in range(self.windows) if self.window_subset == "all"
                or i % 2 == (0 if self.window_subset == "even" else 1)]

    def offsets(self) -> list[tuple[float, float]]:
        """(arrivals offset, availability offset) in trace seconds for each window run."""
        return [(i * self.arrivals.span / self.windows, i * self.availability.span / self.windows)
                for i in self.indices()]


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
    report = _report(sc, results, static, target_qps)
    report["parameters"]["spotmesh_policy_config"] = dataclasses.asdict(config)
    report["_timelines"] = timelines
    report["_ttft"] = {p: [r.ttft_by_arrival for r in results[p]] for p in policies}
    return report


def _report(sc: Scenario, results: dict[str, list[WindowResult]], static: int,
            target_qps: float) -> dict:
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


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


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
                              description=__doc__.split("\n\n")[0])
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
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    log(f"wrote {args.json}")
    if args.plot:
        write_plot(report, args.plot)
        log(f"wrote {args.plot}")
    print(format_table(doc))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="spotmesh simulate", description=__doc__.split("\n\n")[0])
    _add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
