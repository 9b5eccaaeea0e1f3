"""The one definition of "the same prefix": chained hashes of a prompt's KV blocks.

A prompt is cut into blocks of the engine's KV block size; block i's hash is
H(hash of block i-1, token ids of block i), so equal hashes mean equal prefixes up to and
including that block (nano-vllm's and vLLM's definition). The gateway computes it to route, the
replicas' KV-event relay recomputes it from the engine's events, and the prefix index compares
what both send: all three must agree byte for byte, so the format is pinned here and in
``protos/spotmesh/v1/cache.proto`` (``MatchRequest.block_hashes``) and tested against fixed
vectors (``tests/test_prefix_hash.py``):

- H is BLAKE2b with an 8-byte digest (``hashlib.blake2b(data, digest_size=8)``), no key;
- ``data`` is the parent hash as an unsigned 64-bit integer, then each of the block's token ids
  as a signed 64-bit integer, all little-endian (``struct.pack("<Q{n}q", parent, *ids)``);
- the digest, read as a little-endian unsigned 64-bit integer, is the block's hash;
- the first block's parent is 0 (``ROOT_HASH``); a partial last block has no hash (engines do
  not cache it).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

ROOT_HASH = 0
DIGEST_BYTES = 8


def block_hash(parent: int, block: Sequence[int]) -> int:
    """The hash of one block of token ids whose predecessor's hash is ``parent``."""
    digest = hashlib.blake2b(struct.pack(f"<Q{len(block)}q", parent, *block),
                             digest_size=DIGEST_BYTES).digest()
    return int.from_bytes(digest, "little")


def block_hashes(token_ids: Sequence[int], block_size: int, parent: int = ROOT_HASH) -> list[int]:
    """Chained hashes of the full blocks of ``token_ids`` (a partial last block is not cached
    by the engine, so it has no hash)."""
    if block_size < 1:
        raise ValueError("block_size must be >= 1")
    out = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = block_hash(parent, token_ids[start:start + block_size])
        out.append(parent)
    return out
