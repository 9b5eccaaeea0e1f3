"""The public data the benchmarks and the simulator read (``../shared/data``, see its README):
where it is, and one reader per format shared by every tool that reads it.

Readers name the file, the line and the field of anything they cannot use
(``trace.csv:12: field 'ContextTokens': not an integer: 'x'``) and raise ``SystemExit`` with
that one line: these are command-line inputs, and a traceback would say less.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

DATA_ENV = "SPOTMESH_DATA"
# Files inside the data directory.
AZURE_CONV_TRACE = "traces/azure_llm_2023_conv.csv"
SYSTEM_PROMPTS = "prefix_cache/awesome_chatgpt_system_prompts.jsonl"
MOONCAKE_TRACE = "prefix_cache/mooncake_fast25_synthetic_trace.jsonl"
BANKING77 = "semantic_cache/banking77_intents.csv"
STSB = "semantic_cache/stsb_train_dev_test.tsv"


def data_dir() -> Path | None:
    """``$SPOTMESH_DATA``, else ``../shared/data`` from the working directory or from the
    repository; None when there is none."""
    repo = Path(__file__).resolve().parents[1]
    candidates = [Path.cwd() / ".." / "shared" / "data", repo / ".." / "shared" / "data"]
    if os.environ.get(DATA_ENV):
        candidates.insert(0, Path(os.environ[DATA_ENV]))
    return next((d.resolve() for d in candidates if d.is_dir()), None)


def default_file(relative: str, what: str, flag: str) -> str:
    """The path of ``relative`` in the data directory, or one line saying which flag to pass."""
    d = data_dir()
    if d is None or not (d / relative).exists():
        raise SystemExit(f"no {what}: pass {flag} FILE (../shared/data not found)")
    return str(d / relative)


def open_data(path: str, what: str):
    """``path`` opened for reading as text (newlines as they are, for csv), or one line saying
    why it cannot be."""
    try:
        return open(path, newline="")
    except OSError as exc:
        raise SystemExit(f"{path}: cannot read {what}: {exc.strerror}") from None


# --- field errors -----------------------------------------------------------------------------


def fail(path: str | Path, line: int | None, field_name: str | None, msg: str) -> SystemExit:
    """The one-line error for a bad input file (raise it)."""
    where = f"{path}" + (f":{line}" if line is not None else "")
    what = f" field {field_name!r}:" if field_name else ""
    return SystemExit(f"{where}:{what} {msg}")


def int_field(path: str, line: int, name: str, value: str | None, minimum: int) -> int:
    try:
        n = int(str(value).strip())
    except ValueError:
        raise fail(path, line, name, f"not an integer: {value!r}") from None
    if n < minimum:
        raise fail(path, line, name, f"must be >= {minimum}, got {n}")
    return n


def float_field(path: str, line: int, name: str, value: str | None, positive: bool) -> float:
    try:
        x = float(str(value).strip())
    except ValueError:
        raise fail(path, line, name, f"not a number: {value!r}") from None
    if not math.isfinite(x) or x < 0 or (positive and x == 0):
        raise fail(path, line, name, f"must be a finite number {'>' if positive else '>='} 0, "
                                     f"got {value!r}")
    return x


def parse_timestamp(value: str) -> float:
    """Unix seconds of a trace timestamp: a number, or an ISO time (the Azure traces give 7
    fractional digits, one more than ``datetime`` reads). ValueError if it is neither."""
    try:
        return float(value)
    except ValueError:
        pass
    main, _, frac = value.strip().partition(".")
    seconds = datetime.fromisoformat(main).timestamp()
    if frac:
        if not frac.isdigit():
            raise ValueError(value)
        seconds += float("0." + frac)
    return seconds


def csv_header(path: str, what: str) -> list[str]:
    """The stripped column names of a CSV file's first line."""
    with open_data(path, what) as f:
        header = next(csv.reader(f), None)
    if header is None:
        raise fail(path, None, None, "empty file: no header, no requests")
    return [h.strip() for h in header]


# --- request traces ---------------------------------------------------------------------------

AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


@dataclass(frozen=True)
class TraceRequest:
    """One request of an Azure LLM inference trace."""

    at: float  # seconds after the trace's first request
    context_tokens: int
    generated_tokens: int


def is_azure_trace(header: list[str]) -> bool:
    return set(AZURE_COLUMNS) <= {h.strip() for h in header}


def read_azure_trace(path: str) -> list[TraceRequest]:
    """Every request of an Azure LLM trace CSV (``TIMESTAMP,ContextTokens,GeneratedTokens``),
    in arrival order."""
    with open_data(path, "the trace") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise fail(path, None, None, "empty file: no header, no requests")
        cols = [h.strip() for h in header]
        if not is_azure_trace(cols):
            missing = sorted(set(AZURE_COLUMNS) - set(cols))
            raise fail(path, 1, None, f"not an Azure LLM trace (no column {missing})")
        its, ic, ig = (cols.index(k) for k in AZURE_COLUMNS)
        rows: list[tuple[float, int, int]] = []
        for line, row in enumerate(reader, start=2):
            if not row or not "".join(row).strip():
                continue
            if len(row) < len(cols):
                raise fail(path, line, None, f"expected {len(cols)} columns, got {len(row)}")
            try:
                stamp = parse_timestamp(row[its])
            except ValueError:
                raise fail(path, line, "TIMESTAMP", f"not a timestamp: {row[its]!r}") from None
            rows.append((stamp, int_field(path, line, "ContextTokens", row[ic], 0),
                         int_field(path, line, "GeneratedTokens", row[ig], 0)))
    if not rows:
        raise fail(path, None, None, "no requests after the header")
    rows.sort(key=lambda r: r[0])  # stable: requests of the same instant keep file order
    t0 = rows[0][0]
    return [TraceRequest(stamp - t0, c, g) for stamp, c, g in rows]


def read_minute_counts(path: str) -> list[float]:
    """The counts column of a per-minute invocation trace (``minute,count``, e.g. the Azure
    Functions trace SpotHedge replays), one value per minute in file order."""
    counts: list[float] = []
    with open_data(path, "per-minute counts") as f:
        reader = csv.reader(f)
        cols = [h.strip() for h in next(reader, [])]
        for line, row in enumerate(reader, start=2):
            if not row or not "".join(row).strip():
                continue
            if len(row) != 2:
                raise fail(path, line, None, f"expected 2 columns, got {len(row)}")
            float_field(path, line, cols[0], row[0], positive=False)
            counts.append(float_field(path, line, cols[1], row[1], positive=False))
    if not counts:
        raise fail(path, None, None, "no rows after the header")
    return counts


# --- prompts and labelled text ----------------------------------------------------------------


def read_system_prompts(path: str) -> list[str]:
    """Every non-empty ``prompt`` of a JSONL file, in file order (the awesome-chatgpt-prompts
    system prompts, or any file of that shape)."""
    prompts = []
    with open_data(path, "prompts") as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                doc = json.loads(text)
            except ValueError:
                raise fail(path, line, None, "not a JSON object") from None
            if isinstance(doc, dict) and doc.get("prompt"):
                prompts.append(str(doc["prompt"]))
    if not prompts:
        raise SystemExit(f"no prompts in {path}")
    return prompts


@dataclass(frozen=True)
class LabelledQuery:
    """One query of an intent-labelled dataset (Banking77)."""

    split: str
    intent: str
    text: str


def read_intents(path: str) -> list[LabelledQuery]:
    """Every non-empty query of a ``split,intent,text`` CSV, in file order."""
    with open_data(path, "labelled queries") as f:
        return [LabelledQuery(row["split"], row["intent"], row["text"].strip())
                for row in csv.DictReader(f) if row["text"].strip()]


@dataclass(frozen=True)
class ScoredPairs:
    """Sentence pairs scored 0-5 by people (STS-B)."""

    s1: list[str]
    s2: list[str]
    scores: list[float]


def read_stsb(path: str, split: str = "test") -> ScoredPairs:
    """The pairs of one split of a ``split, score_0_5, sentence1, sentence2`` TSV."""
    s1, s2, scores = [], [], []
    with open_data(path, "sentence pairs") as f:
        # Sentences contain bare quotes; the file is plain TSV without quoting.
        for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            if row["split"] == split:
                s1.append(row["sentence1"])
                s2.append(row["sentence2"])
                scores.append(float(row["score_0_5"]))
    return ScoredPairs(s1, s2, scores)
