"""Which replica holds which KV-cache prefix: an index of chained block hashes
(:mod:`spotmesh.prefix_hash`).

The prefix cache service keeps the shared one; every gateway keeps a local one of its own
records, to route on when the service does not answer in time. Each replica holds a bounded
number of blocks and forgets the least recently used first, as its engine's cache does.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence


class PrefixIndex:
    """Per-replica LRU sets of block hashes, with a reverse map for fast matching."""

    def __init__(self, default_capacity_blocks: int) -> None:
        if default_capacity_blocks < 1:
            raise ValueError("capacity must be >= 1 block")
        self.default_capacity = default_capacity_blocks
        self._capacity: dict[str, int] = {}
        self._blocks: dict[str, OrderedDict[int, None]] = {}
        self._holders: dict[int, set[str]] = {}

    def set_capacity(self, replica: str, blocks: int) -> None:
        """The replica's KV cache holds this many blocks (from its Load report)."""
        if blocks < 1:
            raise ValueError("capacity must be >= 1 block")
        self._capacity[replica] = blocks
        self._evict(replica)

    def record(self, replica: str, hashes: Iterable[int]) -> int:
        """The replica now holds these blocks (most recently used); returns how many blocks
        that pushed out of its capacity."""
        held = self._blocks.setdefault(replica, OrderedDict())
        for h in hashes:
            if h in held:
                held.move_to_end(h)
            else:
                held[h] = None
                self._holders.setdefault(h, set()).add(replica)
        return self._evict(replica)

    def match(self, hashes: Sequence[int]) -> dict[str, int]:
        """For every replica holding the first block, how many leading blocks it holds."""
        matched: dict[str, int] = {}
        alive: set[str] | None = None
        for i, h in enumerate(hashes):
            holders = self._holders.get(h)
            if not holders:
                break
            alive = set(holders) if alive is None else alive & holders
            if not alive:
                break
            for r in alive:
                matched[r] = i + 1
        return matched

    def remove(self, replica: str, hashes: Iterable[int]) -> int:
        """The replica's engine evicted these blocks; returns how many the index held."""
        held = self._blocks.get(replica)
        if held is None:
            return 0
        removed = 0
        for h in hashes:
            if held.pop(h, False) is None:
                self._drop_holder(h, replica)
                removed += 1
        return removed

    def forget(self, replica: str) -> int:
        held = self._blocks.pop(replica, OrderedDict())
        for h in held:
            self._drop_holder(h, replica)
        self._capacity.pop(replica, None)
        return len(held)

    def size(self, replica: str) -> int:
        return len(self._blocks.get(replica, ()))

    def replicas(self) -> list[str]:
        return list(self._blocks)

    def capacity(self, replica: str) -> int:
        return self._capacity.get(replica, self.default_capacity)

    def _evict(self, replica: str) -> int:
        held = self._blocks.get(replica)
        if held is None:
            return 0
        cap = self._capacity.get(replica, self.default_capacity)
        evicted = 0
        while len(held) > cap:
            h, _ = held.popitem(last=False)
            self._drop_holder(h, replica)
            evicted += 1
        return evicted

    def _drop_holder(self, h: int, replica: str) -> None:
        holders = self._holders.get(h)
        if holders is not None:
            holders.discard(replica)
            if not holders:
                del self._holders[h]


class IndexFull(Exception):
    """The store tracks as many replicas or models as it may (a bound, not an error of input)."""


class HotPrefixes:
    """The most often recorded prefixes of one model, with their token ids, in bounded memory.

    Space-saving top-k: at most ``slots`` prefixes are counted; a new one evicts the least
    counted and inherits its count (so counts over-estimate, never under-estimate, and a prefix
    that is really hot cannot be pushed out by a stream of one-off prompts)."""

    def __init__(self, slots: int = 1024) -> None:
        self.slots = slots
        self._counts: dict[int, int] = {}
        self._tokens: dict[int, tuple[int, ...]] = {}

    def add(self, leaf: int, token_ids: Sequence[int]) -> None:
        if leaf in self._counts:
            self._counts[leaf] += 1
            return
        floor = 0
        if len(self._counts) >= self.slots:
            victim = min(self._counts, key=self._counts.__getitem__)
            floor = self._counts.pop(victim)
            del self._tokens[victim]
        self._counts[leaf] = floor + 1
        self._tokens[leaf] = tuple(token_ids)

    def top(self, limit: int) -> list[tuple[tuple[int, ...], int]]:
        best = sorted(self._counts, key=self._counts.__getitem__, reverse=True)[:limit]
        return [(self._tokens[h], self._counts[h]) for h in best]


class PrefixStore:
    """One :class:`PrefixIndex` per model, with bounds on everything a caller can grow.

    Hashes of different models never match each other, even when their tokenizers agree: a
    KV block is only reusable by the model that computed it.
    """

    def __init__(self, default_capacity_blocks: int = 4096, max_replicas: int = 1024,
                 max_models: int = 64) -> None:
        if max_replicas < 1 or max_models < 1:
            raise ValueError("max_replicas and max_models must be >= 1")
        self.default_capacity = default_capacity_blocks
        self.max_replicas = max_replicas
        self.max_models = max_models
        self._indexes: dict[str, PrefixIndex] = {}
        self._hot: dict[str, HotPrefixes] = {}
        self._replica_models: dict[str, set[str]] = {}

    def match(self, model: str, hashes: Sequence[int]) -> dict[str, int]:
        index = self._indexes.get(model)
        return index.match(hashes) if index is not None else {}

    def record(self, replica: str, model: str, hashes: Sequence[int],
               capacity_blocks: int = 0) -> tuple[int, int]:
        """Returns the blocks now indexed for the replica and model, and how many older ones
        its capacity pushed out."""
        if replica not in self._replica_models and len(self._replica_models) >= self.max_replicas:
            raise IndexFull(f"the prefix index tracks {self.max_replicas} replicas already; "
                            "Forget replicas that went away")
        index = self._indexes.get(model)
        if index is None:
            if len(self._indexes) >= self.max_models:
                raise IndexFull(f"the prefix index tracks {self.max_models} models already")
            index = self._indexes[model] = PrefixIndex(self.default_capacity)
        self._replica_models.setdefault(replica, set()).add(model)
        evicted = 0
        if capacity_blocks > 0 and capacity_blocks != index.capacity(replica):
            before = index.size(replica)
            index.set_capacity(replica, capacity_blocks)
            evicted = before - index.size(replica)
        evicted += index.record(replica, hashes)
        return index.size(replica), evicted

    def record_tokens(self, model: str, hashes: Sequence[int], token_ids: Sequence[int]) -> None:
        """Count the prefix ending at ``hashes[-1]`` and keep its tokens, for warming."""
        if model in self._indexes and hashes:
            self._hot.setdefault(model, HotPrefixes()).add(hashes[-1], token_ids)

    def hot(self, model: str, limit: int) -> list[tuple[tuple[int, ...], int]]:
        hot = self._hot.get(model)
        return hot.top(limit) if hot is not None else []

    def evict(self, replica: str, model: str, hashes: Sequence[int]) -> int:
        index = self._indexes.get(model)
        return index.remove(replica, hashes) if index is not None else 0

    def forget(self, replica: str) -> int:
        forgotten = 0
        for model in self._replica_models.pop(replica, set()):
            index = self._indexes[model]
            forgotten += index.forget(replica)
            if not index.replicas():
                del self._indexes[model]
                self._hot.pop(model, None)
        return forgotten

    def blocks(self, replica: str) -> int:
        """Blocks indexed for the replica over all models."""
        return sum(self._indexes[m].size(replica) for m in self._replica_models.get(replica, ()))

    def replicas(self) -> list[str]:
        return list(self._replica_models)

    def tracks(self, replica: str) -> bool:
        return replica in self._replica_models
