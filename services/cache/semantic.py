"""The semantic cache's domain: whole answers stored in Milvus and found again by the meaning of
their prompt, per tenant, model and sampling fingerprint. No gRPC here; the servicer validates
nothing this module does not validate again.

Why it is built the way it is:

* **Sync client, called from a thread.** pymilvus' async client cannot create collections or
  indexes on milvus-lite, and milvus-lite runs in-process as Python threads anyway, so an
  async client would buy nothing. :class:`SemanticCache` is a plain thread-safe object; the
  gRPC server calls it through a small thread pool (``services.cache.server``).
* **Isolation is the filter.** Every search, count and delete carries
  ``tenant == "<id>"`` (a partition key would only group rows; it does not isolate them).
  Milvus has no filter templates on either backend, so filter strings are built here, and only
  from values that cannot break out of a string literal: tenant ids, model names and
  fingerprints are checked against strict alphabets with no quote or backslash, and free text
  never enters a filter at all: Invalidate-by-prompt and ``replace`` filter on
  ``prompt_sha256``, a hex digest stored beside the prompt. :func:`literal` escapes anyway.
* **TTL is ours, not Milvus'.** Neither milvus-lite 3.2.2 nor Milvus 2.3.5 enforces a
  collection TTL at query time, so every read filters on ``expires_at > now`` and a sweeper
  deletes expired rows. ``expires_at`` is written once; hits never touch the row, so a TTL is
  absolute.
* **Durable on acknowledgement.** On milvus-lite an insert returns after its Arrow IPC record
  is appended to the write-ahead log and flushed to the OS, so an acknowledged entry survives
  SIGKILL of the process (not loss of the OS's page cache, for which there is no fsync per
  write); on a Milvus server the insert is acknowledged after it is in the server's log. Both
  are tested by killing the process with SIGKILL and reopening the data. Flushing is
  therefore not about durability. milvus-lite scans unflushed rows linearly on every query
  (~30 µs per row), so there the cache flushes every ``flush_every`` writes or
  ``flush_seconds``. A Milvus server seals and indexes segments by itself; a flush there seals
  tiny segments and blocks for seconds (1-6 s measured on 2.3.5), so the cache never flushes a
  server on its own.
* **An entry is one row**, written by one insert, so a reader sees all of it or none of it.
  Milvus 2.3.5 caps VARCHAR at 65535 bytes (one short of the contract's 64 KiB) and ARRAY at
  4096 elements (the contract allows 16384 token ids; JSON is capped at 65536 bytes, too small
  for them as text), so the last bytes of a maximal prompt or answer go to a small
  ``*_tail`` field and token ids to four ARRAY<INT32> fields. Both backends accept the result.
* **Writes are serialized** (one lock): milvus-lite wants a single writer, ``replace`` is a
  delete followed by an insert, and counts of deleted rows must be exact, which Milvus' delete
  result is not on every version: rows are first queried by filter, then deleted by id.
  Milvus 2.3.5 answers a delete with timestamp 0, so Session reads do not wait for it; after
  deleting, one Strong read waits until the server applied the delete, so an acknowledged
  Invalidate or replace is never followed by a lookup that returns the deleted entry.
"""

from __future__ import annotations

import fcntl
import hashlib
import math
import os
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import grpc
from pymilvus import DataType, MilvusClient
from pymilvus.exceptions import MilvusException

from spotmesh.statedir import StateDir, state_dir
from spotmesh.validation import TENANT_ID, InvalidField

# --- the contract's bounds (protos/spotmesh/v1/cache.proto) ----------------------------------

# Served model names and hub ids ("org/name", "name:tag", "name@rev"); no quote, no backslash,
# no space, so a validated name is inert inside a double-quoted filter literal.
MODEL_RE = re.compile(r"[A-Za-z0-9_.:/@+-]{1,256}")
# spotmesh.sampling.fingerprint is 32 hex digits; other callers may use any short token.
FINGERPRINT_RE = re.compile(r"[A-Za-z0-9_.:=+/-]{1,128}")
MAX_TEXT_BYTES = 64 * 1024
MAX_TOKEN_IDS = 16384
MAX_TTL_SECONDS = 30 * 24 * 3600.0
INT32_MAX = 2**31 - 1

# --- what both backends accept ---------------------------------------------------------------

VARCHAR_MAX_BYTES = 65535  # Milvus 2.3.5's VARCHAR ceiling (bytes on the server)
# The head holds at most VARCHAR_MAX_BYTES on a character boundary, so the tail holds the rest:
# at most MAX_TEXT_BYTES - (VARCHAR_MAX_BYTES - 3) bytes.
TAIL_MAX_BYTES = MAX_TEXT_BYTES - VARCHAR_MAX_BYTES + 3
ARRAY_MAX_CAPACITY = 4096  # Milvus 2.3.5's ARRAY ceiling
TOKEN_ID_FIELDS = tuple(
    "token_ids" if i == 0 else f"token_ids_{i}" for i in range(MAX_TOKEN_IDS // ARRAY_MAX_CAPACITY)
)
HNSW_PARAMS = {"M": 16, "efConstruction": 200}
SEARCH_EF = 64
# Rows fetched per round when counting or deleting by filter (a Milvus query returns at most
# 16384 rows at a time).
QUERY_BATCH = 4096
LOAD_TIMEOUT_SECONDS = 120.0

ANSWER_FIELDS = [
    "id", "tenant", "model", "fingerprint", "prompt", "prompt_tail", "text", "text_tail",
    *TOKEN_ID_FIELDS, "created_at", "expires_at", "finish_reason", "prompt_tokens",
    "cached_prompt_tokens", "completion_tokens", "cost_usd", "replica_seconds",
]


class CacheUnavailable(RuntimeError):
    """Milvus could not be reached or failed; the request may be retried later."""


class CacheSchemaError(RuntimeError):
    """The collection exists with a shape this cache cannot use (e.g. another dimension)."""


@dataclass(frozen=True)
class Answer:
    """A whole generated answer and what producing it cost."""

    prompt: str
    text: str
    token_ids: tuple[int, ...] = ()
    finish_reason: int = 0  # spotmesh.v1.FinishReason
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    replica_seconds: float = 0.0


@dataclass(frozen=True)
class Hit:
    entry_id: str
    answer: Answer
    similarity: float  # cosine similarity between the lookup vector and the entry's
    created_at: float  # unix seconds
    expires_at: float


@dataclass(frozen=True)
class Stored:
    entry_id: str
    replaced: int  # rows deleted first (``replace``)


@dataclass(frozen=True)
class Stats:
    entries: int  # unexpired rows
    lookups: int  # since this process started
    hits: int
    stores: int
    expired_swept: int


@dataclass
class _Counters:
    lookups: int = 0
    hits: int = 0
    stores: int = 0
    expired_swept: int = 0

    def add(self, other: _Counters) -> None:
        self.lookups += other.lookups
        self.hits += other.hits
        self.stores += other.stores
        self.expired_swept += other.expired_swept


def literal(value: str) -> str:
    """``value`` as a double-quoted Milvus filter string literal."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def prompt_sha256(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def check_tenant(tenant: str, name: str = "tenant") -> str:
    if not TENANT_ID.fullmatch(tenant):
        raise InvalidField(name, "must be 1-64 characters of A-Z a-z 0-9 _ . -")
    return tenant


def check_model(model: str, name: str = "model") -> str:
    if not MODEL_RE.fullmatch(model):
        raise InvalidField(name, "must be 1-256 characters of A-Z a-z 0-9 _ . : / @ + -")
    return model


def check_fingerprint(fp: str) -> str:
    if not FINGERPRINT_RE.fullmatch(fp):
        raise InvalidField("sampling_fingerprint",
                           "must be 1-128 characters of A-Z a-z 0-9 _ . : = + / -")
    return fp


def check_text(value: str, name: str) -> str:
    if not value:
        raise InvalidField(name, "is empty")
    size = len(value.encode("utf-8"))
    if size > MAX_TEXT_BYTES:
        raise InvalidField(name, f"is {size} bytes of UTF-8; the limit is {MAX_TEXT_BYTES}")
    return value


def check_threshold(threshold: float) -> float:
    if not 0.0 <= threshold <= 1.0:  # also false for NaN
        raise InvalidField("threshold", f"must be in [0, 1], not {threshold}")
    return float(threshold)


def check_ttl(ttl_seconds: float) -> float:
    if not 0.0 < ttl_seconds <= MAX_TTL_SECONDS:
        raise InvalidField("ttl_seconds",
                           f"must be > 0 and at most {MAX_TTL_SECONDS:.0f} (30 days), "
                           f"not {ttl_seconds}")
    return float(ttl_seconds)


def check_answer(a: Answer) -> Answer:
    check_text(a.prompt, "prompt")
    check_text(a.text, "text")
    if len(a.token_ids) > MAX_TOKEN_IDS:
        raise InvalidField("token_ids", f"has {len(a.token_ids)} ids; the limit is "
                           f"{MAX_TOKEN_IDS}")
    for i, t in enumerate(a.token_ids):
        if not 0 <= t <= INT32_MAX:
            raise InvalidField(f"token_ids[{i}]", f"must be a token id >= 0, not {t}")
    for name in ("prompt_tokens", "cached_prompt_tokens", "completion_tokens"):
        if not 0 <= getattr(a, name) <= INT32_MAX:
            raise InvalidField(f"usage.{name}", "must be >= 0")
    for name in ("cost_usd", "replica_seconds"):
        v = getattr(a, name)
        if not (math.isfinite(v) and v >= 0):
            raise InvalidField(name, f"must be a finite number >= 0, not {v}")
    return a


def _split_utf8(value: str) -> tuple[str, str]:
    """(head, tail) with head at most VARCHAR_MAX_BYTES of UTF-8, cut between characters."""
    data = value.encode("utf-8")
    if len(data) <= VARCHAR_MAX_BYTES:
        return value, ""
    cut = VARCHAR_MAX_BYTES
    while data[cut] & 0xC0 == 0x80:  # a continuation byte: back up to the character's start
        cut -= 1
    return data[:cut].decode("utf-8"), data[cut:].decode("utf-8")


def build_schema(dim: int):
    """The collection's schema; every type and bound is accepted by milvus-lite 3.2.2 and by
    Milvus 2.3.5 (see the module docstring)."""
    s = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    s.add_field("id", DataType.VARCHAR, is_primary=True, max_length=36)
    s.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    s.add_field("tenant", DataType.VARCHAR, max_length=64)
    s.add_field("model", DataType.VARCHAR, max_length=256)
    s.add_field("fingerprint", DataType.VARCHAR, max_length=128)
    s.add_field("prompt_sha256", DataType.VARCHAR, max_length=64)
    s.add_field("prompt", DataType.VARCHAR, max_length=VARCHAR_MAX_BYTES)
    s.add_field("prompt_tail", DataType.VARCHAR, max_length=TAIL_MAX_BYTES)
    s.add_field("text", DataType.VARCHAR, max_length=VARCHAR_MAX_BYTES)
    s.add_field("text_tail", DataType.VARCHAR, max_length=TAIL_MAX_BYTES)
    for name in TOKEN_ID_FIELDS:
        s.add_field(name, DataType.ARRAY, element_type=DataType.INT32,
                    max_capacity=ARRAY_MAX_CAPACITY)
    s.add_field("created_at", DataType.DOUBLE)
    s.add_field("expires_at", DataType.DOUBLE)
    s.add_field("finish_reason", DataType.INT32)
    s.add_field("prompt_tokens", DataType.INT64)
    s.add_field("cached_prompt_tokens", DataType.INT64)
    s.add_field("completion_tokens", DataType.INT64)
    s.add_field("cost_usd", DataType.DOUBLE)
    s.add_field("replica_seconds", DataType.DOUBLE)
    return s


def is_local(uri: str) -> bool:
    """A milvus-lite data path (pymilvus runs milvus-lite in-process for ``*.db``)."""
    return uri.endswith(".db")


@dataclass
class CacheOptions:
    uri: str
    token: str = ""
    collection: str = "spotmesh_semantic_cache"
    dim: int = 384  # all-MiniLM-L6-v2
    flush_every: int = 256  # writes between flushes; 0: only on the timer and at close
    flush_seconds: float = 5.0  # flush pending writes at least this often; 0: never on a timer
    sweep_seconds: float = 60.0  # how often the sweeper deletes expired rows
    timeout_seconds: float = 10.0  # per Milvus call, retries included
    # After a failed connection attempt, calls fail at once for this long instead of each
    # waiting out its own attempt (a Milvus outage must not make every lookup slow).
    reconnect_seconds: float = 1.0
    # Consistency of lookups on a Milvus server (milvus-lite reads its own writes regardless).
    # Session makes every lookup wait until this process's latest store is visible: with a
    # steady stream of stores that is ~150 ms a lookup on Milvus 2.3.5. Bounded reads a
    # slightly stale view (an answer stored a moment ago may miss once) at search latency.
    lookup_consistency: str = "Session"
    # Tenants whose lookup/hit/store counters are kept apart. A service-token holder can name
    # any tenant, so beyond this the least recently counted tenant's counters are folded into
    # the all-tenant totals (which stay exact) and its own figures start again from zero.
    max_tenant_stats: int = 10_000


LOOKUP_CONSISTENCY = ("Session", "Bounded", "Eventually", "Strong")


class SemanticCache:
    """Whole answers keyed by prompt embeddings, isolated per tenant (see module docstring).

    Thread-safe: reads run concurrently, writes are serialized. Connects lazily: a Milvus
    server that is down makes calls raise :class:`CacheUnavailable` until it is back. One
    instance per milvus-lite data directory (milvus-lite locks it to one process).
    """

    def __init__(self, options: CacheOptions) -> None:
        if options.dim < 1:
            raise ValueError("dim must be >= 1")
        self.options = options
        self.dim = options.dim
        self.collection = options.collection
        self._client: MilvusClient | None = None
        self._connect_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._last_failed_connect = -math.inf
        self._last_error = ""
        # Only milvus-lite needs flushing from us (see module docstring).
        self._auto_flush = is_local(options.uri)
        self._unflushed = 0
        self._last_flush = time.monotonic()
        self._last_sweep = time.monotonic()
        self._counters: OrderedDict[str, _Counters] = OrderedDict()
        self._folded = _Counters()  # counts of tenants dropped from _counters
        self._closed = False
        if is_local(options.uri):
            # No server to wait for: a data directory that cannot be opened (locked by another
            # process, unwritable) is a configuration error, reported at start.
            Path(options.uri).parent.mkdir(parents=True, exist_ok=True)
            try:
                self._connected()
            except BaseException:
                self.close()
                raise

    # --- connection ---------------------------------------------------------------------------

    def _connected(self) -> MilvusClient:
        client = self._client
        if client is not None:
            return client
        if self._closed:
            raise CacheUnavailable("the semantic cache is closed")
        with self._connect_lock:
            if self._client is not None:
                return self._client
            if time.monotonic() - self._last_failed_connect < self.options.reconnect_seconds:
                raise CacheUnavailable(self._last_error)
            try:
                # Dedicated: pymilvus otherwise shares one connection per URI across clients
                # and keeps a broken one after the server restarts.
                client = MilvusClient(uri=self.options.uri, token=self.options.token,
                                      timeout=self.options.timeout_seconds, dedicated=True)
            except (MilvusException, grpc.RpcError, OSError) as exc:
                raise self._unreachable(exc, _lite_problem(self.options.uri)) from None
            try:
                self._ensure_collection(client)
            except CacheSchemaError:
                client.close()
                raise
            except (MilvusException, grpc.RpcError, OSError) as exc:
                client.close()
                raise self._unreachable(exc) from None
            self._client = client
            return client

    def _unreachable(self, exc: BaseException, why: str | None = None) -> CacheUnavailable:
        self._last_failed_connect = time.monotonic()
        what = ("cannot open milvus-lite data at" if is_local(self.options.uri)
                else "cannot reach Milvus at")
        self._last_error = f"{what} {self._where()}: {why or _reason(exc)}"
        return CacheUnavailable(self._last_error)

    def _where(self) -> str:
        """The URI without credentials (``https://user:password@host`` is a valid URI, and
        these messages reach callers)."""
        parts = urlsplit(self.options.uri)
        if parts.username is None and parts.password is None:
            return self.options.uri
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urlunsplit(parts._replace(netloc=netloc))

    def _ensure_collection(self, client: MilvusClient) -> None:
        name = self.collection
        t = self.options.timeout_seconds
        # Loading after a server restart waits for segments and indexes (measured ~10-40 s on
        # Milvus 2.3.5 standalone); that is start-up, not a request, so it gets its own bound.
        load_t = max(t, LOAD_TIMEOUT_SECONDS)
        if not client.has_collection(name, timeout=t):
            try:
                # Session: a process reads its own writes at once; Bounded would hide fresh
                # entries for a while, Strong costs ~200 ms a read on a server.
                client.create_collection(name, schema=build_schema(self.dim),
                                         consistency_level="Session", timeout=t)
            except MilvusException:
                # Another process sharing the server may have created it first.
                if not client.has_collection(name, timeout=t):
                    raise
        if not client.list_indexes(name, timeout=t):
            index = client.prepare_index_params()
            index.add_index("vector", index_type="HNSW", metric_type="COSINE",
                            params=HNSW_PARAMS)
            # Not waiting: the server builds per segment in the background, and milvus-lite
            # lacks the timestamp call pymilvus waits with.
            client.create_index(name, index, timeout=t, sync=False)
        desc = client.describe_collection(name, timeout=t)
        fields = {f["name"]: f for f in desc["fields"]}
        missing = [f for f in ("vector", "tenant", "prompt_sha256", "expires_at",
                               *TOKEN_ID_FIELDS) if f not in fields]
        if missing:
            raise CacheSchemaError(f"collection {name!r} exists without the field(s) "
                                   f"{', '.join(missing)}; use another --collection")
        dim = int(fields["vector"]["params"]["dim"])
        if dim != self.dim:
            raise CacheSchemaError(f"collection {name!r} holds {dim}-dimensional vectors; this "
                                   f"cache is configured for {self.dim}")
        client.load_collection(name, timeout=load_t)

    def _call(self, fn, *args, **kwargs):
        """One Milvus call, with backend failures turned into :class:`CacheUnavailable`."""
        client = self._connected()
        try:
            return getattr(client, fn)(self.collection, *args,
                                       timeout=self.options.timeout_seconds, **kwargs)
        except (MilvusException, grpc.RpcError, OSError) as exc:
            raise CacheUnavailable(f"Milvus at {self._where()} failed ({fn}): "
                                   f"{_reason(exc)}") from None

    # --- validation ---------------------------------------------------------------------------

    def check_vector(self, vector: Sequence[float]) -> list[float]:
        if len(vector) != self.dim:
            raise InvalidField("vector", f"has {len(vector)} dimensions; this cache's "
                               f"embeddings have {self.dim}")
        values = [float(v) for v in vector]
        norm2 = 0.0
        for v in values:
            if not math.isfinite(v):
                raise InvalidField("vector", "has a value that is not a finite number")
            norm2 += v * v
        if norm2 == 0.0:
            raise InvalidField("vector", "is all zeros (cosine similarity is undefined)")
        return values

    def _scope(self, tenant: str, model: str, fingerprint: str) -> str:
        return (f"tenant == {literal(check_tenant(tenant))} and "
                f"model == {literal(check_model(model))} and "
                f"fingerprint == {literal(check_fingerprint(fingerprint))}")

    # --- operations ---------------------------------------------------------------------------

    def lookup(self, tenant: str, model: str, fingerprint: str, vector: Sequence[float],
               threshold: float, now: float | None = None) -> Hit | None:
        """The most similar unexpired entry of (tenant, model, fingerprint) whose cosine
        similarity to ``vector`` is at least ``threshold``, or None."""
        scope = self._scope(tenant, model, fingerprint)
        values = self.check_vector(vector)
        check_threshold(threshold)
        # The filter holds ``now`` to the microsecond; the check below must see the same value.
        now = float(_number(time.time() if now is None else now))
        rows = self._call(
            "search", [values], filter=f"{scope} and expires_at > {_number(now)}", limit=1,
            output_fields=ANSWER_FIELDS,
            search_params={"metric_type": "COSINE", "params": {"ef": SEARCH_EF}},
            consistency_level=self.options.lookup_consistency,
        )
        hit = None
        if rows and rows[0]:
            best = rows[0][0]
            e = best["entity"]
            similarity = float(best["distance"])
            # The filter already guarantees this; checking again costs nothing and means no
            # backend bug can hand one tenant another's answer or an expired one.
            if (e["tenant"], e["model"], e["fingerprint"]) != (tenant, model, fingerprint) \
                    or not e["expires_at"] > now:
                raise CacheUnavailable(f"Milvus at {self._where()} returned an entry outside "
                                       "the lookup's filter; refusing to use it")
            if similarity >= threshold:
                hit = _hit(e, similarity)
        self._count(tenant, lookups=1, hits=1 if hit else 0)
        return hit

    def store(self, tenant: str, model: str, fingerprint: str, vector: Sequence[float],
              answer: Answer, ttl_seconds: float, *, replace: bool = False,
              now: float | None = None) -> Stored:
        """Write one entry, expiring ``ttl_seconds`` after ``now``; with ``replace``, delete
        the entries of the same (tenant, model, fingerprint, prompt) first. Durable once this
        returns (see module docstring)."""
        scope = self._scope(tenant, model, fingerprint)
        row = self._row(tenant, model, fingerprint, vector, answer, ttl_seconds, now)
        with self._write_lock:
            replaced = 0
            if replace:
                # Delete first: if the insert then fails the old answer is gone too, which is
                # what a REFRESH asked for, and no reader ever sees two answers for one prompt.
                replaced = self._delete_where(
                    f"{scope} and prompt_sha256 == {literal(row['prompt_sha256'])}")
            self._call("insert", [row])
            self._wrote(1 + replaced)
        self._count(tenant, stores=1)
        return Stored(row["id"], replaced)

    def store_batch(self, entries: Sequence[tuple[str, str, str, Sequence[float], Answer, float]],
                    now: float | None = None) -> list[str]:
        """Write many entries, each ``(tenant, model, fingerprint, vector, answer,
        ttl_seconds)``, in one insert (seeding a cache, benchmarks); their ids. All or none
        are written."""
        rows = []
        for tenant, model, fingerprint, vector, answer, ttl in entries:
            self._scope(tenant, model, fingerprint)
            rows.append(self._row(tenant, model, fingerprint, vector, answer, ttl, now))
        if not rows:
            return []
        with self._write_lock:
            self._call("insert", rows)
            self._wrote(len(rows))
        for row in rows:
            self._count(row["tenant"], stores=1)
        return [row["id"] for row in rows]

    def _row(self, tenant: str, model: str, fingerprint: str, vector: Sequence[float],
             answer: Answer, ttl_seconds: float, now: float | None) -> dict:
        """One entry as a Milvus row, every field checked (the scope by the caller)."""
        values = self.check_vector(vector)
        check_answer(answer)
        check_ttl(ttl_seconds)
        now = time.time() if now is None else now
        prompt, prompt_tail = _split_utf8(answer.prompt)
        text, text_tail = _split_utf8(answer.text)
        ids = list(answer.token_ids)
        return {
            "id": str(uuid.uuid4()),
            "vector": values,
            "tenant": tenant,
            "model": model,
            "fingerprint": fingerprint,
            "prompt_sha256": prompt_sha256(answer.prompt),
            "prompt": prompt,
            "prompt_tail": prompt_tail,
            "text": text,
            "text_tail": text_tail,
            **{name: ids[i * ARRAY_MAX_CAPACITY:(i + 1) * ARRAY_MAX_CAPACITY]
               for i, name in enumerate(TOKEN_ID_FIELDS)},
            "created_at": float(now),
            "expires_at": float(now) + ttl_seconds,
            "finish_reason": int(answer.finish_reason),
            "prompt_tokens": int(answer.prompt_tokens),
            "cached_prompt_tokens": int(answer.cached_prompt_tokens),
            "completion_tokens": int(answer.completion_tokens),
            "cost_usd": float(answer.cost_usd),
            "replica_seconds": float(answer.replica_seconds),
        }

    def invalidate(self, *, tenant: str = "", model: str = "", prompt: str = "") -> int:
        """Delete every entry matching all the filters given (at least one); the count."""
        clauses = []
        if tenant:
            clauses.append(f"tenant == {literal(check_tenant(tenant))}")
        if model:
            clauses.append(f"model == {literal(check_model(model))}")
        if prompt:
            check_text(prompt, "prompt")
            clauses.append(f"prompt_sha256 == {literal(prompt_sha256(prompt))}")
        if not clauses:
            raise InvalidField("tenant", "(or model, or prompt) must be set: Invalidate needs at "
                               "least one filter")
        with self._write_lock:
            deleted = self._delete_where(" and ".join(clauses))
            self._wrote(deleted)
        return deleted

    def sweep_expired(self, now: float | None = None) -> int:
        """Delete entries whose TTL has passed; the count. Lookups never return them anyway;
        this only reclaims their space."""
        now = time.time() if now is None else now
        swept: dict[str, int] = {}
        with self._write_lock:
            total = self._delete_where(f"expires_at <= {_number(now)}", per_tenant=swept)
            self._wrote(total)
            self._last_sweep = time.monotonic()
        for tenant, n in swept.items():
            self._count(tenant, expired_swept=n)
        return total

    def count(self, tenant: str = "", now: float | None = None) -> int:
        """Unexpired entries, of one tenant or all."""
        now = time.time() if now is None else now
        where = f"expires_at > {_number(now)}"
        if tenant:
            where = f"tenant == {literal(check_tenant(tenant))} and {where}"
        rows = self._call("query", filter=where, output_fields=["count(*)"])
        return int(rows[0]["count(*)"]) if rows else 0

    def stats(self, tenant: str = "", now: float | None = None) -> Stats:
        entries = self.count(tenant, now)
        with self._stats_lock:
            if tenant:
                c = self._counters.get(tenant, _Counters())
                return Stats(entries, c.lookups, c.hits, c.stores, c.expired_swept)
            total = _Counters()
            for c in (*self._counters.values(), self._folded):
                total.add(c)
        return Stats(entries, total.lookups, total.hits, total.stores, total.expired_swept)

    def flush(self) -> None:
        """Turn pending writes into sealed segments (a search speed-up, not durability). On
        a server this seals whatever is growing, however small, and waits for it (seconds)."""
        with self._write_lock:
            if self._unflushed or not self._auto_flush:
                self._call("flush")
            self._unflushed = 0
            self._last_flush = time.monotonic()

    def maintain(self) -> tuple[bool, int | None]:
        """What the periodic maintenance does, due or not: flush pending writes if
        ``flush_seconds`` passed, sweep if ``sweep_seconds`` passed. (flushed, swept or None)."""
        opts = self.options
        now = time.monotonic()
        flushed = False
        swept = None
        if (opts.flush_seconds > 0 and self._unflushed
                and now - self._last_flush >= opts.flush_seconds):
            self.flush()
            flushed = True
        if opts.sweep_seconds > 0 and now - self._last_sweep >= opts.sweep_seconds:
            swept = self.sweep_expired()
        return flushed, swept

    def index_progress(self) -> tuple[int, int] | None:
        """(indexed rows, total rows) of the vector index where the backend builds it in the
        background (a server); None where it is built at flush (milvus-lite)."""
        if is_local(self.options.uri):
            return None
        info = self._call("describe_index", index_name="vector")
        return int(info.get("indexed_rows", 0)), int(info.get("total_rows", 0))

    def drop_collection(self) -> None:
        """Delete the collection and everything in it (benchmarks and tests)."""
        with self._write_lock:
            client = self._connected()
            try:
                client.drop_collection(self.collection, timeout=self.options.timeout_seconds)
            except (MilvusException, grpc.RpcError, OSError) as exc:
                raise CacheUnavailable(f"Milvus at {self._where()} failed (drop_collection): "
                                       f"{_reason(exc)}") from None
            self._unflushed = 0

    def close(self) -> None:
        """Flush and disconnect; for milvus-lite also release the data directory."""
        if self._closed:
            return
        try:
            if self._client is not None and self._unflushed:
                self.flush()
        finally:
            self._closed = True
            client, self._client = self._client, None
            if client is not None:
                client.close()
            if is_local(self.options.uri):
                from milvus_lite.server_manager import server_manager_instance

                server_manager_instance.release_server(self.options.uri)

    # --- internals ----------------------------------------------------------------------------

    def _delete_where(self, where: str, per_tenant: dict[str, int] | None = None) -> int:
        """Delete rows matching ``where`` by id, in batches; the exact count. Caller holds the
        write lock.

        Milvus 2.3.5 answers a delete with timestamp 0, so pymilvus' Session consistency does
        not cover deletes: a read right after one can still see the deleted rows. After
        deleting, one Strong read waits until the server has applied the delete; every later
        read sees it. (milvus-lite is consistent in-process and needs no such wait.)"""
        deleted = 0
        out = ["id", "tenant"] if per_tenant is not None else ["id"]
        while True:
            rows = self._call("query", filter=where, output_fields=out, limit=QUERY_BATCH)
            if not rows:
                return deleted
            self._call("delete", ids=[r["id"] for r in rows])
            deleted += len(rows)
            if per_tenant is not None:
                for r in rows:
                    per_tenant[r["tenant"]] = per_tenant.get(r["tenant"], 0) + 1
            self._await_deletes()
            if len(rows) < QUERY_BATCH:
                return deleted

    def _await_deletes(self) -> None:
        if not is_local(self.options.uri):
            self._call("query", filter="", ids=["-"], output_fields=["id"],
                       consistency_level="Strong")

    def _wrote(self, n: int) -> None:
        if n <= 0 or not self._auto_flush:
            return
        self._unflushed += n
        every = self.options.flush_every
        if every > 0 and self._unflushed >= every:
            self._call("flush")
            self._unflushed = 0
            self._last_flush = time.monotonic()

    def _count(self, tenant: str, **inc: int) -> None:
        with self._stats_lock:
            c = self._counters.get(tenant)
            if c is None:
                c = self._counters[tenant] = _Counters()
                while len(self._counters) > max(1, self.options.max_tenant_stats):
                    self._folded.add(self._counters.popitem(last=False)[1])
            else:
                self._counters.move_to_end(tenant)
            for k, v in inc.items():
                setattr(c, k, getattr(c, k) + v)


def _number(x: float) -> str:
    # Fixed-point: no exponent for the filter parser to misread, microsecond resolution.
    return f"{x:.6f}"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, MilvusException):
        return exc.message or repr(exc)
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "details"):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc) or type(exc).__name__


def _lite_problem(uri: str) -> str | None:
    """Why milvus-lite could not open ``uri``, where pymilvus only says it failed: most often
    another process holds the data directory (milvus-lite allows one)."""
    if not is_local(uri):
        return None
    lock = Path(uri) / "LOCK"
    try:
        fd = os.open(lock, os.O_RDWR)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except OSError:
        return (f"another process holds {uri} (milvus-lite allows one process per data "
                "directory; to share it, run `milvus-lite server` and connect by URI)")
    finally:
        os.close(fd)
    return None


def _hit(e: dict, similarity: float) -> Hit:
    token_ids: list[int] = []
    for name in TOKEN_ID_FIELDS:
        token_ids.extend(e.get(name) or ())
    return Hit(
        entry_id=e["id"],
        answer=Answer(
            prompt=e["prompt"] + (e.get("prompt_tail") or ""),
            text=e["text"] + (e.get("text_tail") or ""),
            token_ids=tuple(int(t) for t in token_ids),
            finish_reason=int(e["finish_reason"]),
            prompt_tokens=int(e["prompt_tokens"]),
            cached_prompt_tokens=int(e["cached_prompt_tokens"]),
            completion_tokens=int(e["completion_tokens"]),
            cost_usd=float(e["cost_usd"]),
            replica_seconds=float(e["replica_seconds"]),
        ),
        similarity=similarity,
        created_at=float(e["created_at"]),
        expires_at=float(e["expires_at"]),
    )


def default_uri(state: str | os.PathLike | None = None) -> str:
    """milvus-lite under the spotmesh state directory: a restarted cache keeps its answers."""
    return StateDir(state_dir(str(state) if state else None)).standalone_semantic_cache_uri
