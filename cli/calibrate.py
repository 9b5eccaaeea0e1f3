"""Choosing a tenant's similarity threshold from labelled data (``spotmesh cache calibrate``).

A fixed threshold picked by feel gives false hits (a question and its opposite embed close
together). Here thresholds are swept on real labelled data with the embedder the mesh runs,
and the lowest threshold whose precision meets the target (so the highest hit rate) is chosen.

Two data formats:

- ``intents`` (Banking77: ``split,intent,text``): replays the cache as it runs. Queries arrive
  in order; each is looked up among the entries stored so far and, on a miss, stored itself.
  A hit is correct when the stored entry's query has the same intent. Intents held out of the
  stream's seeds and never asked before stand in for out-of-scope questions: their first
  query must miss.
- ``stsb`` (STS-B: ``score_0_5, sentence1, sentence2``): pairs scored by people; a pair scored
  ``>= 4`` ("mostly equivalent") should hit, anything lower should miss.
"""

from __future__ import annotations

import random
import sys
from dataclasses import asdict, dataclass

import numpy as np

from cli import write_json
from cli.datasets import read_intents, read_stsb

THRESHOLDS = [round(0.50 + 0.01 * i, 2) for i in range(51)]
STSB_PARAPHRASE_SCORE = 4.0


@dataclass
class Row:
    threshold: float
    precision: float
    recall: float
    hit_rate: float
    false_hit_rate: float
    hits: int
    queries: int


def load_intents(path: str, split: str = "test", limit: int = 0, seed: int = 0
                 ) -> tuple[list[str], list[str]]:
    """(texts, intents) of one split, in a seeded arrival order (mixed intents, reproducible),
    at most ``limit`` of them (0: all)."""
    queries = [q for q in read_intents(path) if q.split == split]
    order = list(range(len(queries)))
    random.Random(seed).shuffle(order)
    if limit:
        order = order[:limit]
    return [queries[i].text for i in order], [queries[i].intent for i in order]


def replay_cache(sim: np.ndarray, intents: list[str], threshold: float) -> Row:
    """Online cache over queries in arrival order: hit if the best stored entry is at or above
    ``threshold``, else store. ``sim`` is the (n, n) cosine matrix of the queries."""
    n = len(intents)
    labels = np.array(intents)
    best = np.full(n, -np.inf, dtype=np.float32)  # best stored similarity seen by each query
    best_idx = np.full(n, -1)
    hits = correct = 0
    for i in range(n):
        if best[i] >= threshold:
            hits += 1
            correct += labels[best_idx[i]] == labels[i]
            continue
        # A miss is stored: every later query now also sees entry i.
        row = sim[i]
        better = row > best
        best = np.where(better, row, best)
        best_idx = np.where(better, i, best_idx)
    # A query can only be answered correctly if an earlier query shares its intent.
    seen, answerable = set(), 0
    for intent in intents:
        answerable += intent in seen
        seen.add(intent)
    return Row(threshold, correct / hits if hits else 1.0,
               correct / answerable if answerable else 0.0, hits / n,
               (hits - correct) / n, hits, n)


def pairs_rows(sim: np.ndarray, positive: np.ndarray) -> list[Row]:
    rows = []
    for t in THRESHOLDS:
        hit = sim >= t
        tp = int(np.sum(hit & positive))
        n_hit = int(np.sum(hit))
        rows.append(Row(t, tp / n_hit if n_hit else 1.0, tp / max(1, int(positive.sum())),
                        n_hit / len(sim), (n_hit - tp) / len(sim), n_hit, len(sim)))
    return rows


def choose(rows: list[Row], target_precision: float) -> Row | None:
    """The highest hit rate among thresholds that meet the precision target."""
    ok = [r for r in rows if r.precision >= target_precision and r.hits > 0]
    return max(ok, key=lambda r: (r.hit_rate, -r.threshold)) if ok else None


def main(argv: list[str] | None = None) -> int:
    import argparse

    from services.embedder.model import load_encoder

    p = argparse.ArgumentParser(prog="spotmesh cache calibrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", required=True, help="the labelled data file")
    p.add_argument("--format", choices=["intents", "stsb"], required=True)
    p.add_argument("--target-precision", type=float, default=0.97)
    p.add_argument("--split", default="test", help="which split of the data to use")
    p.add_argument("--limit", type=int, default=0, help="use at most this many rows")
    p.add_argument("--backend", default="", help="embedder backend (default: the embedder's)")
    p.add_argument("--model", default="", help="sentence-transformers model directory")
    p.add_argument("--json", default="")
    a = p.parse_args(argv)
    if not 0 < a.target_precision <= 1:
        p.error("--target-precision must be in (0, 1]")

    from services.embedder.config import DEFAULT_BACKEND

    encoder = load_encoder(a.backend or DEFAULT_BACKEND, a.model or None)
    print(f"embedding with {encoder.name} ({encoder.backend})...", file=sys.stderr, flush=True)
    if a.format == "intents":
        texts, intents = load_intents(a.pairs, a.split, a.limit)
        vectors = _encode(encoder, texts)
        sim = vectors @ vectors.T
        rows = []
        for t in THRESHOLDS:
            rows.append(replay_cache(sim, intents, t))
        data = {"queries": len(texts), "intents": len(set(intents))}
    else:
        pairs = read_stsb(a.pairs, a.split)
        s1, s2, scores = pairs.s1, pairs.s2, pairs.scores
        if a.limit:
            s1, s2, scores = s1[:a.limit], s2[:a.limit], scores[:a.limit]
        v1, v2 = _encode(encoder, s1), _encode(encoder, s2)
        rows = pairs_rows(np.sum(v1 * v2, axis=1), np.array(scores) >= STSB_PARAPHRASE_SCORE)
        data = {"pairs": len(s1), "positives": int(sum(x >= STSB_PARAPHRASE_SCORE
                                                          for x in scores))}
    chosen = choose(rows, a.target_precision)
    print(f"{'threshold':>9} {'precision':>9} {'recall':>7} {'hit rate':>8} {'false hits':>10}")
    for r in rows:
        mark = "  <- chosen" if chosen is not None and r.threshold == chosen.threshold else ""
        print(f"{r.threshold:>9.2f} {r.precision:>9.4f} {r.recall:>7.4f} {r.hit_rate:>8.4f} "
              f"{r.false_hit_rate:>10.4f}{mark}")
    if chosen is None:
        print(f"no threshold reaches precision {a.target_precision}", file=sys.stderr)
    else:
        print(f"\nchosen threshold {chosen.threshold:.2f}: precision {chosen.precision:.4f}, "
              f"hit rate {chosen.hit_rate:.4f} (set cache_threshold in the keys file)")
    if a.json:
        write_json(a.json, {
            "format": a.format, "data": data, "embedder": {"model": encoder.name,
                                                           "backend": encoder.backend},
            "target_precision": a.target_precision,
            "chosen": asdict(chosen) if chosen else None,
            "thresholds": [asdict(r) for r in rows],
        })
    return 0 if chosen is not None else 1


def _encode(encoder, texts: list[str], batch: int = 256) -> np.ndarray:
    out = []
    for i in range(0, len(texts), batch):
        out.append(encoder.encode(texts[i:i + batch]))
        print(f"  embedded {min(len(texts), i + batch)}/{len(texts)}", file=sys.stderr,
              end="\r", flush=True)
    print(file=sys.stderr)
    return np.concatenate(out).astype(np.float32)
