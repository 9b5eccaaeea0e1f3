"""The semantic cache's operations: whole answers stored in Milvus and found again by the meaning of
their prompt, per tenant, model and sampling fingerprint. No gRPC here; the servicer validates
nothing this module does not validate again.

Why it is built the way it is:

* **Sync client, called from a thread** (``services.cache.milvus``). :class:`SemanticCache` is
  a plain thread-safe object; the gRPC server calls it through a small thread pool.
* **Isolation is the filter.** Every search, count and delete carries
  ``tenant == "<id>"`` (a partition key would only group rows; it does not isolate them).
  Milvus has no filter templates on either backend, so filter strings are built here, and only
  from values that cannot break out of a string literal (``services.cache.bounds``):
  Invalidate-by-prompt and ``replace`` filter on ``prompt_sha256``, never on free text.
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
* **An entry is one row** (``services.cache.rows``).
* **Lookups search a memory index** (``services.cache.mirror``) where this process is the
  collection's only writer (milvus-lite by default): exact cosine over the scope's vectors,
  ~1 ms at 10,000 entries where a milvus-lite search took ~47 ms and ran one at a time. Milvus
  stays the store: the mirror is loaded from it at start, changed after Milvus acknowledged,
  and a hit's answer is read from Milvus by id and checked again.
* **Writes are serialized** (one lock): milvus-lite wants a single writer, ``replace`` is a
  delete followed by an insert, and counts of deleted rows must be exact, which Milvus' delete
  result is not on every version: rows are first queried by filter, then deleted by id.
  Milvus 2.3.5 answers a delete with timestamp 0, so Session reads do not wait for it; after
  deleting, one Strong read waits until the server applied the delete, so an acknowledged
  Invalidate or replace is never followed by a lookup that returns the deleted entry.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from pymilvus import MilvusException

from services.cache.answers import Answer, Hit, Stats, Stored
from services.cache.bounds import (
    check_answer,
    check_fingerprint,
    check_model,
    check_tenant,
    check_text,
    check_threshold,
    check_ttl,
    literal,
    prompt_sha256,
)
from services.cache.metrics import MEMORY_INDEX_ENTRIES
from services.cache.milvus import CacheUnavailable, MilvusCollection, reason
from services.cache.mirror import MirrorFull, VectorMirror
from services.cache.options import CacheOptions
from services.cache.rows import ANSWER_FIELDS, decode, encode, number
from spotmesh.validation import InvalidField

SEARCH_EF = 64
# Rows fetched per round when counting or deleting by filter (a Milvus query returns at most
# 16384 rows at a time).
QUERY_BATCH = 4096
MIRROR_FIELDS = ["id", "vector", "tenant", "model", "fingerprint", "expires_at"]

log = logging.getLogger("spotmesh.cache")


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
        self._milvus = MilvusCollection(options)
        self._write_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        # Only milvus-lite needs flushing from us (see module docstring).
        self._auto_flush = self._milvus.local
        self._unflushed = 0
        self._last_flush = time.monotonic()
        self._last_sweep = time.monotonic()
        self._counters: OrderedDict[str, _Counters] = OrderedDict()
        self._folded = _Counters()  # counts of tenants dropped from _counters
        # The memory index, once loaded from Milvus (lazily on a server: it may be down now).
        self._mirror: VectorMirror | None = None
        self._mirror_wanted = options.memory_index
        if self._milvus.local:
            # No server to wait for: a data directory that cannot be opened (locked by another
            # process, unwritable) is a configuration error, reported at start.
            Path(options.uri).parent.mkdir(parents=True, exist_ok=True)
            try:
                self._milvus.client()
                self._ensure_mirror()
            except BaseException:
                self.close()
                raise

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
        now = float(number(time.time() if now is None else now))
        mirror = self._ensure_mirror()
        if mirror is not None:
            hit = self._lookup_mirrored(mirror, (tenant, model, fingerprint), values,
                                        threshold, now)
        else:
            hit = self._lookup_milvus(scope, (tenant, model, fingerprint), values, threshold,
                                      now)
        self._count(tenant, lookups=1, hits=1 if hit else 0)
        return hit

    def _lookup_milvus(self, scope: str, key: tuple[str, str, str], values: list[float],
                       threshold: float, now: float) -> Hit | None:
        rows = self._milvus.call(
            "search", [values], filter=f"{scope} and expires_at > {number(now)}", limit=1,
            output_fields=ANSWER_FIELDS,
            search_params={"metric_type": "COSINE", "params": {"ef": SEARCH_EF}},
            consistency_level=self.options.lookup_consistency,
        )
        if not (rows and rows[0]):
            return None
        best = rows[0][0]
        similarity = float(best["distance"])
        self._check_row(best["entity"], key, now)
        return decode(best["entity"], similarity) if similarity >= threshold else None

    def _lookup_mirrored(self, mirror: VectorMirror, key: tuple[str, str, str],
                         values: list[float], threshold: float, now: float) -> Hit | None:
        found = mirror.search(key, values, now)
        if found is None or found[1] < threshold:
            return None
        entry_id, similarity = found
        rows = self._milvus.call("get", ids=[entry_id], output_fields=ANSWER_FIELDS)
        if not rows:
            # Deleted between the search and the read (an Invalidate or sweep in flight): the
            # delete wins.
            return None
        self._check_row(rows[0], key, now)
        return decode(rows[0], similarity)

    def _check_row(self, e: dict, key: tuple[str, str, str], now: float) -> None:
        """The search's scope and expiry guarantee this; checking again costs nothing and
        means no backend or index bug can hand one tenant another's answer or an expired one."""
        if (e["tenant"], e["model"], e["fingerprint"]) != key or not e["expires_at"] > now:
            raise CacheUnavailable(f"Milvus at {self._milvus.where()} returned an entry "
                                   "outside the lookup's filter; refusing to use it")

    def _ensure_mirror(self) -> VectorMirror | None:
        """The memory index, loading it from Milvus on first use; None where lookups go to
        Milvus (configured so, or the index outgrew its bound)."""
        if self._mirror is not None or not self._mirror_wanted:
            return self._mirror
        with self._write_lock:  # no write lands between the load and the first lookup
            if self._mirror is None and self._mirror_wanted:
                mirror = VectorMirror(self.dim, self.options.memory_index_max_entries)
                try:
                    # Expired rows too: the search skips them by the caller's clock, and the
                    # sweeper removes them from both.
                    for row in self._iterate('id != ""', MIRROR_FIELDS):
                        mirror.add(row["id"], (row["tenant"], row["model"], row["fingerprint"]),
                                   row["vector"], float(row["expires_at"]))
                except MirrorFull as exc:
                    self._give_up_mirror(str(exc))
                    return None
                self._mirror = mirror
                MEMORY_INDEX_ENTRIES.set(len(mirror))
        return self._mirror

    def _iterate(self, where: str, fields: list[str]):
        """Every row matching ``where``, in batches (a query alone returns at most 16384)."""
        client = self._milvus.client()
        try:
            it = client.query_iterator(self.collection, batch_size=QUERY_BATCH, filter=where,
                                       output_fields=fields,
                                       timeout=self.options.timeout_seconds)
            try:
                while batch := it.next():
                    yield from batch
            finally:
                it.close()
        except (MilvusException, grpc.RpcError, OSError) as exc:
            raise CacheUnavailable(f"Milvus at {self._milvus.where()} failed "
                                   f"(query_iterator): {reason(exc)}") from None

    def _give_up_mirror(self, why: str) -> None:
        """Caller holds the write lock."""
        log.warning("memory index disabled; lookups search Milvus from now on",
                    extra={"reason": why})
        self._mirror = None
        self._mirror_wanted = False
        MEMORY_INDEX_ENTRIES.set(-1)

    def _mirror_rows(self, rows: Sequence[dict]) -> None:
        """Caller holds the write lock; the rows are acknowledged by Milvus."""
        if self._mirror is None:
            return
        try:
            for row in rows:
                self._mirror.add(row["id"], (row["tenant"], row["model"], row["fingerprint"]),
                                 row["vector"], row["expires_at"])
        except MirrorFull as exc:
            self._give_up_mirror(str(exc))
            return
        MEMORY_INDEX_ENTRIES.set(len(self._mirror))

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
            self._milvus.call("insert", [row])
            self._mirror_rows([row])
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
            self._milvus.call("insert", rows)
            self._mirror_rows(rows)
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
        return encode(tenant, model, fingerprint, values, answer, ttl_seconds,
                      time.time() if now is None else now)

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
            total = self._delete_where(f"expires_at <= {number(now)}", per_tenant=swept)
            self._wrote(total)
            self._last_sweep = time.monotonic()
        for tenant, n in swept.items():
            self._count(tenant, expired_swept=n)
        return total

    def count(self, tenant: str = "", now: float | None = None) -> int:
        """Unexpired entries, of one tenant or all."""
        now = time.time() if now is None else now
        where = f"expires_at > {number(now)}"
        if tenant:
            where = f"tenant == {literal(check_tenant(tenant))} and {where}"
        rows = self._milvus.call("query", filter=where, output_fields=["count(*)"])
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
                self._milvus.call("flush")
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
        if self._milvus.local:
            return None
        info = self._milvus.call("describe_index", index_name="vector")
        return int(info.get("indexed_rows", 0)), int(info.get("total_rows", 0))

    def drop_collection(self) -> None:
        """Delete the collection and everything in it (benchmarks and tests)."""
        with self._write_lock:
            self._milvus.drop()
            self._unflushed = 0
            if self._mirror is not None:
                self._mirror = VectorMirror(self.dim, self.options.memory_index_max_entries)
                MEMORY_INDEX_ENTRIES.set(0)

    @property
    def closed(self) -> bool:
        return self._milvus.closed

    def close(self) -> None:
        """Flush and disconnect; for milvus-lite also release the data directory."""
        if self._milvus.closed:
            return
        try:
            if self._milvus.connected and self._unflushed:
                self.flush()
        finally:
            self._milvus.close()

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
            rows = self._milvus.call("query", filter=where, output_fields=out, limit=QUERY_BATCH)
            if not rows:
                return deleted
            ids = [r["id"] for r in rows]
            self._milvus.call("delete", ids=ids)
            if self._mirror is not None:
                self._mirror.remove(ids)
                MEMORY_INDEX_ENTRIES.set(len(self._mirror))
            deleted += len(rows)
            if per_tenant is not None:
                for r in rows:
                    per_tenant[r["tenant"]] = per_tenant.get(r["tenant"], 0) + 1
            self._await_deletes()
            if len(rows) < QUERY_BATCH:
                return deleted

    def _await_deletes(self) -> None:
        if not self._milvus.local:
            self._milvus.call("query", filter="", ids=["-"], output_fields=["id"],
                       consistency_level="Strong")

    def _wrote(self, n: int) -> None:
        if n <= 0 or not self._auto_flush:
            return
        self._unflushed += n
        every = self.options.flush_every
        if every > 0 and self._unflushed >= every:
            self._milvus.call("flush")
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
