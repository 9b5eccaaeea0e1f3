"""The traces a simulation replays: request arrivals (looped), spot availability (looped) and
prices, read from the public data with :mod:`cli.datasets`'s readers."""

from __future__ import annotations

import bisect
import csv
import math
import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

from cli.datasets import (
    csv_header,
    fail,
    float_field,
    int_field,
    is_azure_trace,
    open_data,
    read_azure_trace,
    read_minute_counts,
)

# Means of the Azure 2023 conversation trace (ContextTokens, GeneratedTokens): the request
# size given to per-minute counts traces, which carry no sizes.
AZURE_CONV_MEAN_PROMPT_TOKENS = 1155
AZURE_CONV_MEAN_OUTPUT_TOKENS = 211
# Upper bound on generated requests, so a counts trace with a forgotten --rate-scale fails
# fast instead of filling memory.
MAX_REQUESTS_PER_WINDOW = 5_000_000


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
    cols = csv_header(path, "arrivals")
    if is_azure_trace(cols):
        trace = read_azure_trace(path)
        times = [r.at / rate_scale for r in trace]
        gap = (times[-1] / (len(times) - 1)) if len(times) > 1 else 1.0
        # The loop period leaves one mean inter-arrival gap between the last request and the
        # first request of the next replay. A request that generated nothing still produced its
        # first token's latency.
        return Arrivals(path, "azure", times[-1] + gap, len(times), times=times,
                        prompts=[r.context_tokens for r in trace],
                        outputs=[max(1, r.generated_tokens) for r in trace])
    if len(cols) == 2:
        counts: list[int] = []
        carry = 0.0
        for raw in read_minute_counts(path):
            carry += raw * rate_scale
            n = math.floor(carry)
            carry -= n
            counts.append(n)
        if sum(counts) == 0:
            raise fail(path, None, None, f"no requests at --rate-scale {rate_scale}")
        return Arrivals(path, "per-minute", 60.0 * len(counts), sum(counts), counts=counts,
                        prompt_tokens=prompt_tokens, output_tokens=output_tokens, seed=seed)
    raise fail(path, 1, None, f"unknown arrivals format {cols}: expected "
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
    with open_data(path, "spot availability") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        if header[:2] != ["tick", "t_seconds"] or len(header) < 3:
            raise fail(path, 1, None, f"expected columns tick,t_seconds,<zones...>, got "
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
                raise fail(path, line, None, f"expected {len(header)} columns, got {len(row)}")
            seconds.append(float_field(path, line, "t_seconds", row[1], positive=False))
            capacity.append(sum(int_field(path, line, header[i], row[i], 0) for i in idx))
    if len(seconds) < 2:
        raise fail(path, None, None, "need at least two ticks")
    tick = seconds[1] - seconds[0]
    if tick <= 0:
        raise fail(path, 3, "t_seconds", "ticks must increase")
    for i, s in enumerate(seconds):
        if abs(s - seconds[0] - i * tick) > 1e-6 * max(1.0, s):
            raise fail(path, i + 2, "t_seconds", f"ticks must be evenly spaced ({tick:g}s), "
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
        raise fail(path, None, None, "empty file")
    delimiter = "\t" if "\t" in lines[0] else ","
    reader = csv.reader(lines, delimiter=delimiter)
    header = [h.strip() for h in next(reader)]
    need = ("availability_zone_id", "instance_type", "spot_price_usd_per_hour", "timestamp_utc")
    missing = [k for k in need if k not in header]
    if missing:
        raise fail(path, 1, None, f"missing columns {missing} (have {header})")
    iz, it, ip, its = (header.index(k) for k in need)
    latest: dict[str, tuple[str, float]] = {}
    types: set[str] = set()
    for line, row in enumerate(reader, start=2):
        if not row or not "".join(row).strip():
            continue
        if len(row) != len(header):
            raise fail(path, line, None, f"expected {len(header)} columns, got {len(row)}")
        types.add(row[it].strip())
        if row[it].strip() != instance_type:
            continue
        price = float_field(path, line, "spot_price_usd_per_hour", row[ip], positive=True)
        stamp = row[its].strip()
        try:
            datetime.fromisoformat(stamp)
        except ValueError:
            raise fail(path, line, "timestamp_utc", f"not a timestamp: {stamp!r}") from None
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
    with open_data(path, "on-demand prices") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        for k in ("instance_type", "on_demand_usd_per_hour"):
            if k not in cols:
                raise fail(path, 1, None, f"missing column {k!r} (have {cols})")
        types = []
        for line, row in enumerate(reader, start=2):
            types.append(row["instance_type"])
            if (row["instance_type"] or "").strip() == instance_type:
                return float_field(path, line, "on_demand_usd_per_hour",
                                    row["on_demand_usd_per_hour"], positive=True)
    raise SystemExit(f"{path}: no on-demand price for instance type {instance_type!r} "
                     f"(types in the file: {', '.join(types) or 'none'})")


