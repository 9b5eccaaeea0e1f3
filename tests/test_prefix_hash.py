"""The block hash is a wire format: the gateway, the replicas' KV-event relay and the prefix
index (and any other implementation, a Go gateway say) must agree on it byte for byte. These
vectors pin it; the same definition is written out in protos/spotmesh/v1/cache.proto."""

from __future__ import annotations

import hashlib
import re
import struct
from pathlib import Path

import pytest

from spotmesh.prefix_hash import ROOT_HASH, block_hash, block_hashes

REPO = Path(__file__).resolve().parent.parent

VECTORS = [
    # (token ids, block size, parent, hashes)
    ([1, 2, 3, 4], 2, ROOT_HASH, [8901564848246840783, 5144891096145841010]),
    ([0, 1, 2, 3, 4, 5, 6, 7], 4, ROOT_HASH, [2141542520064864664, 15377408733496924908]),
    ([2047, 5, 2**31 - 1, 0], 2, ROOT_HASH, [4314815037047411817, 14155321427140099016]),
    ([7, 8, 9, 10], 2, 8901564848246840783, [9299403394212472031, 7937795474941888373]),
    ([1, 2, 3], 4, ROOT_HASH, []),  # a partial block has no hash
]


@pytest.mark.parametrize(("ids", "size", "parent", "expected"), VECTORS)
def test_block_hashes_match_the_pinned_vectors(ids, size, parent, expected):
    assert block_hashes(ids, size, parent=parent) == expected


def test_the_hash_is_blake2b_of_the_little_endian_parent_and_ids():
    """Written out with nothing but hashlib and struct, as another implementation would."""
    data = struct.pack("<Q", 0) + b"".join(struct.pack("<q", t) for t in (1, 2))
    digest = hashlib.blake2b(data, digest_size=8).digest()
    assert block_hash(0, [1, 2]) == int.from_bytes(digest, "little") == 8901564848246840783


def test_a_chain_continues_from_its_parent():
    whole = block_hashes([1, 2, 3, 4, 5, 6], 2)
    assert block_hashes([3, 4, 5, 6], 2, parent=whole[0]) == whole[1:]


def test_every_hash_fits_the_contract_uint64():
    for ids, size, parent, _ in VECTORS:
        assert all(0 <= h < 2**64 for h in block_hashes(ids, size, parent=parent))


def test_the_contract_states_the_same_example():
    proto = (REPO / "protos/spotmesh/v1/cache.proto").read_text()
    stated = [int(n) for n in re.findall(r"hashes to (\d+), and \[3, 4\] after it\n// to (\d+)",
                                         proto)[0]]
    assert stated == block_hashes([1, 2, 3, 4], 2)


def test_block_size_must_be_positive():
    with pytest.raises(ValueError):
        block_hashes([1, 2], 0)
