"""Which replica holds which KV-cache prefix: an index of chained block hashes.

A prompt is cut into blocks of the engine's KV block size; block i's hash is H(hash of block
i-1, token ids of block i), so equal hashes mean equal prefixes up to and including that block
(nano-vllm's and vLLM's definition of "same prefix"). Each replica holds a bounded number of
blocks and forgets the least recently used first, as its engine's cache does.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Iterable, Sequence

ROOT_HASH = 0


def block_hashes(token_ids: Sequence[int], block_size: int, parent: int = ROOT_HASH) -> list[int]:
    """Chained 64-bit hashes of the full blocks of ``token_ids`` (a partial last block is not
    cached by the engine, so it has no hash)."""
    if block_size < 1:
        raise ValueError("block_size must be >= 1")
    out = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        block = token_ids[start:start + block_size]
        digest = hashlib.blake2b(
            struct.pack(f"<Q{len(block)}q", parent, *block), digest_size=8
        ).digest()
        parent = int.from_bytes(digest, "little")
        out.append(parent)
    return out


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

    def record(self, replica: str, hashes: Iterable[int]) -> None:
        """The replica now holds these blocks (most recently used)."""
        held = self._blocks.setdefault(replica, OrderedDict())
        for h in hashes:
            if h in held:
                held.move_to_end(h)
            else:
                held[h] = None
                self._holders.setdefault(h, set()).add(replica)
        self._evict(replica)

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

    def _evict(self, replica: str) -> None:
        held = self._blocks.get(replica)
        if held is None:
            return
        cap = self._capacity.get(replica, self.default_capacity)
        while len(held) > cap:
            h, _ = held.popitem(last=False)
            self._drop_holder(h, replica)

    def _drop_holder(self, h: int, replica: str) -> None:
        holders = self._holders.get(h)
        if holders is not None:
            holders.discard(replica)
            if not holders:
                del self._holders[h]
