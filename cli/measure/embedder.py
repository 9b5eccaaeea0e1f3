"""Measure the encoder backends on real data, to choose the embedder's default by precision as
well as speed: ``python -m cli.measure.embedder [--json FILE]``.

A faster backend is only worth having if the semantic cache built on it stays as precise. Per
backend this measures:

- speed on this machine: one-text latency (what the gateway pays per prompt) and batch-of-32
  throughput (what a busy embedder sustains);
- agreement with the sentence-transformers (torch) reference: cosine of the two vectors of the
  same sentence;
- STS-B: Spearman correlation of cosine similarity with the human 0-5 scores (test split);
- Banking77 as a semantic cache: one stored query per intent (from the train split), test
  queries looked up against them; a hit is correct when the nearest stored query has the same
  intent. Some intents are never stored and stand in for out-of-scope questions (the file has
  no ``oos`` rows; any it has are treated the same way). Reported at the threshold giving the
  highest hit rate with precision >= 0.97, over several draws of stored queries so the noise of
  the draw is visible next to the differences between backends.

Progress goes to stderr, the table to stdout, everything to ``--json``.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from cli import write_json
from cli.datasets import BANKING77, STSB, data_dir, read_intents, read_stsb
from cli.stats import percentile
from services.embedder.encoders import Encoder
from services.embedder.model import BACKENDS, load_encoder

TARGET_PRECISION = 0.97
SPEED_BATCH = 32


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Data


@dataclass
class StsPairs:
    s1: list[str]
    s2: list[str]
    scores: np.ndarray


def load_stsb(path: Path, split: str = "test") -> StsPairs:
    pairs = read_stsb(str(path), split)
    return StsPairs(pairs.s1, pairs.s2, np.array(pairs.scores))


@dataclass
class Intents:
    train: list[tuple[str, str]]  # (intent, text)
    test: list[tuple[str, str]]


def load_banking(path: Path) -> Intents:
    queries = read_intents(str(path))
    return Intents([(q.intent, q.text) for q in queries if q.split == "train"],
                   [(q.intent, q.text) for q in queries if q.split != "train"])


# --------------------------------------------------------------------------
# Metrics


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho with average ranks for ties (as scipy.stats.spearmanr)."""
    return float(np.corrcoef(_ranks(x), _ranks(y))[0, 1])


def _ranks(a: np.ndarray) -> np.ndarray:
    _, inverse, counts = np.unique(a, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + ends - 1) / 2)[inverse]


def spearman_diff_se(
    a: np.ndarray, b: np.ndarray, scores: np.ndarray, *, rounds: int = 200, seed: int = 0
) -> float:
    """Standard error of rho(a) - rho(b) over a paired bootstrap of the pairs."""
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(rounds):
        idx = rng.integers(0, len(scores), len(scores))
        diffs.append(spearman(a[idx], scores[idx]) - spearman(b[idx], scores[idx]))
    return float(np.std(diffs, ddof=1))


@dataclass
class CachePoint:
    threshold: float
    hit_rate: float  # hits / queries
    precision: float  # correct hits / hits
    recall: float  # correct hits / queries whose intent is stored
    false_hit_rate: float  # wrong hits / queries
    hits: int
    queries: int


def best_threshold(
    sims: np.ndarray, correct: np.ndarray, answerable: np.ndarray, target: float
) -> CachePoint:
    """The lowest threshold (so the most hits) whose hits are at least ``target`` precise.
    ``sims[i]``: query i's similarity to its nearest stored query; ``correct[i]``: that stored
    query has i's intent; ``answerable[i]``: some stored query has i's intent."""
    order = np.argsort(-sims, kind="mergesort")
    s, c = sims[order], correct[order]
    hits = np.arange(1, len(s) + 1)
    precision = np.cumsum(c) / hits
    # A threshold admits every query at or above it, so only the last of equal values counts.
    cut = np.append(s[1:] < s[:-1], True)
    ok = np.flatnonzero(cut & (precision >= target))
    n = len(s)
    if len(ok) == 0:
        return CachePoint(float(s[0]) + 1e-6, 0.0, 1.0, 0.0, 0.0, 0, n)
    k = int(ok[-1])
    good = int(np.sum(c[: k + 1]))
    return CachePoint(
        threshold=float(s[k]),
        hit_rate=(k + 1) / n,
        precision=good / (k + 1),
        recall=good / max(1, int(answerable.sum())),
        false_hit_rate=(k + 1 - good) / n,
        hits=k + 1,
        queries=n,
    )


def average_precision(sims: np.ndarray, correct: np.ndarray) -> float:
    """Threshold-free: the mean, over correct hits, of the precision of admitting everything at
    least as similar. 1.0 when every correct answer outranks every wrong one."""
    order = np.argsort(-sims, kind="mergesort")
    c = correct[order]
    if not c.any():
        return 0.0
    precision = np.cumsum(c) / np.arange(1, len(c) + 1)
    return float(precision[c].mean())


@dataclass
class CacheDraw:
    """One draw of stored queries, held-out intents and query sample."""

    stored_texts: list[str]
    stored_intents: list[str]
    query_texts: list[str]
    query_intents: list[str]


def cache_draws(
    data: Intents, *, draws: int, queries: int, per_intent: int, oos_intents: int, seed: int
) -> list[CacheDraw]:
    intents = sorted({i for i, _ in data.train})
    by_intent: dict[str, list[str]] = {}
    for intent, text in data.train:
        by_intent.setdefault(intent, []).append(text)
    out = []
    for d in range(draws):
        rng = random.Random(seed + d)
        held_out = {"oos"} | set(rng.sample(intents, oos_intents))
        stored = [
            (i, t)
            for i in intents
            if i not in held_out
            for t in rng.sample(by_intent[i], min(per_intent, len(by_intent[i])))
        ]
        sample = rng.sample(data.test, min(queries, len(data.test)))
        out.append(
            CacheDraw(
                stored_texts=[t for _, t in stored],
                stored_intents=[i for i, _ in stored],
                query_texts=[t for _, t in sample],
                query_intents=[i for i, _ in sample],
            )
        )
    return out


def cache_point(
    vectors: dict[str, np.ndarray], draw: CacheDraw, target: float
) -> tuple[CachePoint, float, float]:
    """The best threshold's operating point, the average precision, and the top-1 accuracy of
    the nearest stored query among queries whose intent is stored."""
    stored = np.stack([vectors[t] for t in draw.stored_texts])
    asked = np.stack([vectors[t] for t in draw.query_texts])
    sim = asked @ stored.T
    nearest = sim.argmax(axis=1)
    stored_intents = np.array(draw.stored_intents)
    query_intents = np.array(draw.query_intents)
    correct = stored_intents[nearest] == query_intents
    answerable = np.isin(query_intents, stored_intents)
    best = sim.max(axis=1)
    point = best_threshold(best, correct, answerable, target)
    return point, average_precision(best, correct), float(correct[answerable].mean())


def summarize(results: list[tuple[CachePoint, float, float]]) -> dict:
    points = [p for p, _, _ in results]
    ap = [a for _, a, _ in results]
    top1 = [t for _, _, t in results]
    return {
        "hit_rate": round(statistics.fmean(x.hit_rate for x in points), 4),
        "hit_rate_sd": round(statistics.pstdev(x.hit_rate for x in points), 4),
        "precision": round(statistics.fmean(x.precision for x in points), 4),
        "recall": round(statistics.fmean(x.recall for x in points), 4),
        "threshold": round(statistics.fmean(x.threshold for x in points), 4),
        "average_precision": round(statistics.fmean(ap), 4),
        "top1_accuracy": round(statistics.fmean(top1), 4),
        "hit_rate_per_draw": [round(x.hit_rate, 4) for x in points],
        "average_precision_per_draw": [round(x, 4) for x in ap],
        "threshold_per_draw": [round(x.threshold, 4) for x in points],
        "draws": [asdict(x) for x in points],
    }


# --------------------------------------------------------------------------
# Speed


def speed(
    encoders: dict[str, Encoder], texts: list[str], *, singles: int, batches: int, rounds: int
) -> dict[str, dict[str, float]]:
    """Latency of one text and of a batch of 32, per backend. The backends take turns, a slice
    of each measurement per round, so a burst of load from other processes on the machine hits
    all of them alike instead of whichever was being timed."""
    for enc in encoders.values():
        for t in texts[:10]:  # first calls allocate; not what a running server pays
            enc.encode([t])
        enc.encode(texts[:SPEED_BATCH])
    single: dict[str, list[float]] = {b: [] for b in encoders}
    batch: dict[str, list[float]] = {b: [] for b in encoders}
    per_round_singles = max(1, singles // rounds)
    per_round_batches = max(1, batches // rounds)
    for r in range(rounds):
        for backend, enc in encoders.items():
            for i in range(per_round_singles):
                t = texts[(r * per_round_singles + i) % len(texts)]
                started = time.perf_counter()
                enc.encode([t])
                single[backend].append(time.perf_counter() - started)
            for b in range(per_round_batches):
                first = (r * per_round_batches + b) * SPEED_BATCH
                chunk = [texts[(first + i) % len(texts)] for i in range(SPEED_BATCH)]
                started = time.perf_counter()
                enc.encode(chunk)
                batch[backend].append(time.perf_counter() - started)
    out = {}
    for backend in encoders:
        s = single[backend]
        b = percentile(batch[backend], 0.5)
        out[backend] = {
            "single_ms_p50": round(1000 * percentile(s, 0.5), 3),
            "single_ms_p95": round(1000 * percentile(s, 0.95), 3),
            "batch32_ms_p50": round(1000 * b, 2),
            "batch32_texts_per_s": round(SPEED_BATCH / b, 1),
        }
    return out


def encode_all(encoder: Encoder, texts: list[str], batch: int = 256) -> dict[str, np.ndarray]:
    unique = list(dict.fromkeys(texts))
    out: dict[str, np.ndarray] = {}
    for i in range(0, len(unique), batch):
        chunk = unique[i : i + batch]
        out.update(zip(chunk, encoder.encode(chunk), strict=True))
        print(
            f"  {encoder.backend}: embedded {i + len(chunk)}/{len(unique)}",
            end="\r",
            file=sys.stderr,
            flush=True,
        )
    print(file=sys.stderr)
    return out


# --------------------------------------------------------------------------
# The decision


def choose_default(
    results: dict[str, dict],
    sts_cosines: dict[str, np.ndarray],
    sts_scores: np.ndarray,
    tolerance_floor: float = 0.0,
) -> tuple[str, str]:
    """int8 only if it is not measurably worse than fp32: for every cache setting, neither its
    hit rate at the precision target nor its average precision is lower by more than twice the
    standard error of the paired per-draw differences, and its STS-B correlation is not lower
    by more than twice the paired-bootstrap standard error. Else fp32 ONNX by the same test
    against torch; else torch. ``tolerance_floor`` widens every allowance to at least that
    much (0: pure statistics). Returns (backend, reason)."""

    def paired(a: list[float], b: list[float]) -> tuple[float, float]:
        diffs = [x - y for x, y in zip(a, b, strict=True)]
        se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else 0.0
        return statistics.fmean(diffs), max(2 * se, tolerance_floor)

    def within(candidate: str, reference: str) -> tuple[bool, str]:
        ok = True
        notes = []
        for setting, a in results[candidate]["banking77"].items():
            b = results[reference]["banking77"][setting]
            for metric in ("hit_rate", "average_precision"):
                diff, tol = paired(a[f"{metric}_per_draw"], b[f"{metric}_per_draw"])
                ok = ok and diff >= -tol
                notes.append(f"{setting} {metric} {diff:+.4f} (allowed -{tol:.4f})")
        rho = spearman(sts_cosines[candidate], sts_scores) - spearman(
            sts_cosines[reference], sts_scores
        )
        se = spearman_diff_se(sts_cosines[candidate], sts_cosines[reference], sts_scores)
        tol = max(2 * se, tolerance_floor)
        ok = ok and rho >= -tol
        notes.append(f"STS-B rho {rho:+.4f} (allowed -{tol:.4f})")
        verdict = "not measurably worse" if ok else "measurably worse"
        return ok, f"{candidate} vs {reference} {verdict}: " + ", ".join(notes)

    reasons = []
    for candidate, reference in (("onnx-int8", "onnx"), ("onnx", "torch")):
        if candidate in results and reference in results:
            ok, why = within(candidate, reference)
            reasons.append(why)
            if ok:
                return candidate, "; ".join(reasons)
    return "torch", "; ".join(reasons) or "only torch measured"


# --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m cli.measure.embedder",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--model", default="", help="sentence-transformers model directory")
    p.add_argument("--cache-dir", default="", help="where ONNX exports are kept")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--data",
        default="",
        help="directory holding semantic_cache/ (default: $SPOTMESH_DATA or ../shared/data)",
    )
    p.add_argument("--queries", type=int, default=2000, help="Banking77 queries per draw")
    p.add_argument(
        "--stored-per-intent",
        default="1,10",
        help="cache settings: stored queries per intent (1: a cold cache; 10: a warm one)",
    )
    p.add_argument("--draws", type=int, default=5, help="draws of stored queries per setting")
    p.add_argument(
        "--oos-intents", type=int, default=10, help="intents never stored (out-of-scope)"
    )
    p.add_argument("--singles", type=int, default=300, help="one-text calls timed")
    p.add_argument("--batches", type=int, default=40, help="batch-of-32 calls timed")
    p.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds")
    p.add_argument(
        "--tolerance-floor",
        type=float,
        default=0.0,
        help="losses (hit rate, average precision, rho) up to this are accepted even when "
        "they are statistically real (default 0: any measurable loss disqualifies)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="write the results here")
    a = p.parse_args(argv)
    backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    for b in backends:
        if b not in BACKENDS:
            p.error(f"unknown backend {b!r}; expected some of {BACKENDS}")
    try:
        settings = sorted({int(x) for x in a.stored_per_intent.split(",") if x.strip()})
    except ValueError:
        p.error("--stored-per-intent must be comma-separated integers")
    if not settings or settings[0] < 1:
        p.error("--stored-per-intent values must be >= 1")
    if min(a.rounds, a.singles, a.batches, a.draws, a.queries) < 1 or a.threads < 1:
        p.error("--rounds, --singles, --batches, --draws, --queries and --threads must be >= 1")
    root = Path(a.data) if a.data else data_dir()
    if root is None or not (root / STSB).is_file() or not (root / BANKING77).is_file():
        p.error(f"no data: --data must hold {STSB} and {BANKING77}")

    sts = load_stsb(root / STSB)
    banking = load_banking(root / BANKING77)
    draws = {
        f"{k}_per_intent": cache_draws(
            banking,
            draws=a.draws,
            queries=a.queries,
            per_intent=k,
            oos_intents=a.oos_intents,
            seed=a.seed,
        )
        for k in settings
    }
    sts_texts = list(dict.fromkeys(sts.s1 + sts.s2))
    bank_texts = list(
        dict.fromkeys(
            t for ds in draws.values() for d in ds for t in d.stored_texts + d.query_texts
        )
    )
    progress(
        f"data: STS-B test {len(sts.scores)} pairs; Banking77 {len(bank_texts)} texts in "
        f"{a.draws} draws x {len(settings)} settings"
    )

    results: dict[str, dict] = {}
    sts_cosines: dict[str, np.ndarray] = {}
    reference: dict[str, np.ndarray] | None = None
    encoders: dict[str, Encoder] = {}
    load_s: dict[str, float] = {}
    for backend in backends:
        progress(f"{backend}: loading")
        started = time.perf_counter()
        encoders[backend] = load_encoder(backend, a.model or None, a.cache_dir or None, a.threads)
        load_s[backend] = time.perf_counter() - started
    progress(f"timing {', '.join(backends)} in {a.rounds} interleaved rounds")
    timings = speed(encoders, sts_texts, singles=a.singles, batches=a.batches, rounds=a.rounds)
    for backend, encoder in encoders.items():
        vectors = encode_all(encoder, sts_texts + bank_texts)
        v1 = np.stack([vectors[t] for t in sts.s1])
        v2 = np.stack([vectors[t] for t in sts.s2])
        sts_cosines[backend] = np.sum(v1 * v2, axis=1)
        r: dict = {
            "model": encoder.name,
            "dim": encoder.dim,
            "load_s": round(load_s[backend], 2),
            **timings[backend],
            "stsb_spearman": round(spearman(sts_cosines[backend], sts.scores), 4),
            "banking77": {
                setting: summarize([cache_point(vectors, d, TARGET_PRECISION) for d in ds])
                for setting, ds in draws.items()
            },
        }
        if reference is None and backend == "torch":
            reference = vectors
        if reference is not None:
            keys = list(vectors)
            cos = np.sum(
                np.stack([vectors[k] for k in keys]) * np.stack([reference[k] for k in keys]),
                axis=1,
            )
            r["cosine_vs_torch_mean"] = round(float(cos.mean()), 5)
            r["cosine_vs_torch_min"] = round(float(cos.min()), 5)
        results[backend] = r

    default, reason = choose_default(results, sts_cosines, sts.scores, a.tolerance_floor)
    print_table(results)
    print(f"\ndefault: {default}\n  {reason}")
    if a.json:
        doc = {
            "benchmark": "embedder-backends",
            "command": "python -m cli.measure.embedder " + " ".join(argv or sys.argv[1:]),
            "machine": {
                "cpus": os.cpu_count(),
                "cpu": _cpu_model(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "threads": a.threads,
            },
            "versions": {
                k: _version(k)
                for k in (
                    "torch",
                    "sentence-transformers",
                    "transformers",
                    "onnxruntime",
                    "onnx",
                    "tokenizers",
                )
            },
            "data": {
                "stsb": f"{STSB}, split test, {len(sts.scores)} pairs",
                "banking77": (
                    f"{BANKING77}: per draw, N stored train queries for each intent but "
                    f"{a.oos_intents} held out as out-of-scope, {a.queries} test queries; "
                    f"{a.draws} draws (seeds {a.seed}..{a.seed + a.draws - 1}) per setting"
                ),
                "target_precision": TARGET_PRECISION,
            },
            "results": results,
            "default": default,
            "reason": reason,
        }
        write_json(a.json, doc)
        progress(f"wrote {a.json}")
    return 0


def print_table(results: dict[str, dict]) -> None:
    settings = list(next(iter(results.values()))["banking77"])
    head = f"{'backend':<10} {'1 text ms':>9} {'32/s':>6} {'cos mean':>8} {'cos min':>7} {'rho':>6}"
    for s in settings:
        tag = s.replace("_per_intent", "/intent")
        head += f" | {tag + ' hit@P.97':>16} {'thresh':>6} {'AP':>6} {'top1':>6}"
    print(head)
    for backend, r in results.items():
        line = (
            f"{backend:<10} {r['single_ms_p50']:>9.2f} {r['batch32_texts_per_s']:>6.0f} "
            f"{r.get('cosine_vs_torch_mean', float('nan')):>8.4f} "
            f"{r.get('cosine_vs_torch_min', float('nan')):>7.4f} {r['stsb_spearman']:>6.4f}"
        )
        for s in settings:
            b = r["banking77"][s]
            line += (
                f" | {b['hit_rate']:>9.4f}±{b['hit_rate_sd']:.4f} {b['threshold']:>6.3f} "
                f"{b['average_precision']:>6.4f} {b['top1_accuracy']:>6.4f}"
            )
        print(line)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
