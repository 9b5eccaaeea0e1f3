"""Every cached entry's vector in memory, for lookups that cost a matrix-vector product instead
of a Milvus search. Milvus stays the durable store and the source of truth: the mirror is built
from it at start, changed only after Milvus acknowledged the write or delete, and holds no
answers (a hit reads its row from Milvus by id and checks it again).

Why: milvus-lite answers a filtered search by scanning in Python, one search at a time. With
10,000 entries a lookup took ~47 ms and concurrent lookups queued behind each other, so at 32
concurrent requests every cache miss waited most of a second for its first token. Here a lookup
is an exact cosine search over one scope's rows (NumPy, ~1 ms for 10,000 rows of 384
dimensions), and scopes never mix: the rows of (tenant, model, fingerprint) live in their own
matrix, so no search can even see another tenant's vectors.

Exact, where Milvus' HNSW is approximate: the mirror finds the true nearest entry, so it hits at
least whenever Milvus would. Bounded: past ``max_entries`` vectors the mirror gives up (the cache
falls back to Milvus search; ``spotmesh_cache_memory_index_entries`` shows it) rather than grow
without limit. One process owns it, so it is right only where this process is the collection's
only writer: always for milvus-lite (it locks its data directory), by configuration on a server.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence

import numpy as np

Scope = tuple[str, str, str]  # (tenant, model, fingerprint)

_INITIAL_ROWS = 16


class MirrorFull(RuntimeError):
    """More vectors than the mirror may hold."""


class _ScopeRows:
    """One scope's unit vectors, expiry times and ids; removal swaps the last row in."""

    __slots__ = ("expires", "ids", "n", "vectors")

    def __init__(self, dim: int) -> None:
        self.ids: list[str] = []
        self.vectors = np.empty((_INITIAL_ROWS, dim), dtype=np.float32)
        self.expires = np.empty(_INITIAL_ROWS, dtype=np.float64)
        self.n = 0

    def append(self, entry_id: str, vector: np.ndarray, expires_at: float) -> int:
        if self.n == len(self.vectors):
            grow = 2 * len(self.vectors)
            self.vectors = np.resize(self.vectors, (grow, self.vectors.shape[1]))
            self.expires = np.resize(self.expires, grow)
        self.vectors[self.n] = vector
        self.expires[self.n] = expires_at
        self.ids.append(entry_id)
        self.n += 1
        return self.n - 1

    def remove(self, row: int) -> str | None:
        """Delete ``row``; the id of the row moved into its place, if any."""
        last = self.n - 1
        moved = None
        if row != last:
            self.vectors[row] = self.vectors[last]
            self.expires[row] = self.expires[last]
            self.ids[row] = self.ids[last]
            moved = self.ids[row]
        self.ids.pop()
        self.n = last
        return moved


class VectorMirror:
    """Thread-safe; every method is O(1) except :meth:`search` (one product over a scope)."""

    def __init__(self, dim: int, max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.dim = dim
        self.max_entries = max_entries
        self._scopes: dict[Scope, _ScopeRows] = {}
        self._where: dict[str, tuple[Scope, int]] = {}  # id -> (scope, row)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._where)

    @staticmethod
    def unit(vector: Sequence[float]) -> np.ndarray:
        v = np.asarray(vector, dtype=np.float32)
        return v / np.float32(np.linalg.norm(v))

    def add(self, entry_id: str, scope: Scope, vector: Sequence[float],
            expires_at: float) -> None:
        """Mirror one acknowledged row. Raises :class:`MirrorFull` past ``max_entries``."""
        v = self.unit(vector)
        with self._lock:
            if entry_id in self._where:
                return
            if len(self._where) >= self.max_entries:
                raise MirrorFull(f"the memory index holds its maximum of {self.max_entries} "
                                 "entries")
            rows = self._scopes.get(scope)
            if rows is None:
                rows = self._scopes[scope] = _ScopeRows(self.dim)
            self._where[entry_id] = (scope, rows.append(entry_id, v, expires_at))

    def remove(self, ids: Iterable[str]) -> None:
        with self._lock:
            for entry_id in ids:
                found = self._where.pop(entry_id, None)
                if found is None:
                    continue
                scope, row = found
                rows = self._scopes[scope]
                moved = rows.remove(row)
                if moved is not None:
                    self._where[moved] = (scope, row)
                if rows.n == 0:
                    del self._scopes[scope]

    def search(self, scope: Scope, vector: Sequence[float], now: float
               ) -> tuple[str, float] | None:
        """The unexpired entry of ``scope`` most similar to ``vector`` (cosine) and its
        similarity, or None when the scope holds none."""
        q = self.unit(vector)
        with self._lock:
            rows = self._scopes.get(scope)
            if rows is None:
                return None
            sims = rows.vectors[:rows.n] @ q
            sims[rows.expires[:rows.n] <= now] = -np.inf
            best = int(np.argmax(sims))
            similarity = float(sims[best])
            if similarity == -np.inf:
                return None
            return rows.ids[best], similarity
