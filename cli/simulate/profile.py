"""How fast one simulated replica serves: a throughput profile (measured, or an estimate)."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

from cli.datasets import fail

DEFAULT_PROFILE = Path(__file__).with_name("profile_v100_7b.json")


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
        raise fail(path, exc.lineno, None, f"not JSON: {exc.msg}") from None
    if not isinstance(doc, dict):
        raise fail(path, None, None, "expected a JSON object")
    if "runs" in doc:
        points = []
        for i, run in enumerate(doc["runs"]):
            try:
                c = int(run["concurrency"])
                tps = float(run["mesh"]["tokens_per_s"])
            except (KeyError, TypeError, ValueError):
                raise fail(path, None, f"runs[{i}].mesh.tokens_per_s",
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
            raise fail(path, None, key, "expected a non-empty list of [concurrency, tokens/s]")
        points = []
        for i, p in enumerate(raw):
            try:
                points.append((int(p[0]), float(p[1])))
            except (TypeError, ValueError, IndexError):
                raise fail(path, None, f"{key}[{i}]", "expected [concurrency, tokens/s]") \
                    from None
        name = str(doc.get("name", Path(path).stem))
        source = str(doc.get("source", ""))
        prefill = doc.get("prefill_tokens_per_s")
        kv = doc.get("kv_capacity_tokens")
        startup = doc.get("startup_seconds", 180.0)
        max_c = doc.get("max_concurrency", max((c for c, _ in points), default=0))
        for k, v in (("prefill_tokens_per_s", prefill), ("kv_capacity_tokens", kv)):
            if v is not None and not (isinstance(v, int | float) and v > 0):
                raise fail(path, None, k, f"must be a number > 0, got {v!r}")
        if not isinstance(startup, int | float) or startup < 0:
            raise fail(path, None, "startup_seconds", f"must be >= 0, got {startup!r}")
        if not isinstance(max_c, int) or max_c < 1:
            raise fail(path, None, "max_concurrency", f"must be an integer >= 1, got {max_c!r}")
    points.sort()
    if not points:
        raise fail(path, None, "runs", "no measurements")
    for c, tps in points:
        if c < 1 or not tps > 0:
            raise fail(path, None, "decode_tokens_per_s",
                        f"concurrency must be >= 1 and tokens/s > 0, got ({c}, {tps})")
    if len({c for c, _ in points}) != len(points):
        raise fail(path, None, "decode_tokens_per_s", "a concurrency appears twice")
    return ReplicaProfile(
        name=name, decode=tuple(points), max_concurrency=int(max_c),
        prefill_tokens_per_s=float(prefill) if prefill else None,
        kv_capacity_tokens=int(kv) if kv else None,
        startup_seconds=float(startup if startup_seconds is None else startup_seconds),
        source=source)


