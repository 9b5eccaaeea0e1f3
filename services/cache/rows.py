"""An entry as a Milvus row, both ways, in a shape milvus-lite 3.2.2 and Milvus 2.3.5 both
accept.

Milvus 2.3.5 caps VARCHAR at 65535 bytes (one short of the contract's 64 KiB) and ARRAY at 4096
elements (the contract allows 16384 token ids; JSON is capped at 65536 bytes, too small for
them as text), so the last bytes of a maximal prompt or answer go to a small ``*_tail`` field
and token ids to four ARRAY<INT32> fields. An entry is one row, written by one insert, so a
reader sees all of it or none of it.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from pymilvus import DataType, MilvusClient

from services.cache.answers import Answer, Hit
from services.cache.bounds import MAX_TEXT_BYTES, MAX_TOKEN_IDS, prompt_sha256

VARCHAR_MAX_BYTES = 65535  # Milvus 2.3.5's VARCHAR ceiling (bytes on the server)
# The head holds at most VARCHAR_MAX_BYTES on a character boundary, so the tail holds the rest:
# at most MAX_TEXT_BYTES - (VARCHAR_MAX_BYTES - 3) bytes.
TAIL_MAX_BYTES = MAX_TEXT_BYTES - VARCHAR_MAX_BYTES + 3
ARRAY_MAX_CAPACITY = 4096  # Milvus 2.3.5's ARRAY ceiling
TOKEN_ID_FIELDS = tuple(
    "token_ids" if i == 0 else f"token_ids_{i}" for i in range(MAX_TOKEN_IDS // ARRAY_MAX_CAPACITY)
)
ANSWER_FIELDS = [
    "id", "tenant", "model", "fingerprint", "prompt", "prompt_tail", "text", "text_tail",
    *TOKEN_ID_FIELDS, "created_at", "expires_at", "finish_reason", "prompt_tokens",
    "cached_prompt_tokens", "completion_tokens", "cost_usd", "replica_seconds",
]



def split_utf8(value: str) -> tuple[str, str]:
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


def encode(tenant: str, model: str, fingerprint: str, vector: Sequence[float], answer: Answer,
           ttl_seconds: float, now: float) -> dict:
    """The row of one entry, expiring ``ttl_seconds`` after ``now`` (its fields checked by
    the caller)."""
    prompt, prompt_tail = split_utf8(answer.prompt)
    text, text_tail = split_utf8(answer.text)
    ids = list(answer.token_ids)
    return {
        "id": str(uuid.uuid4()),
        "vector": list(vector),
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


def decode(e: dict, similarity: float) -> Hit:
    """A row Milvus returned (with ``ANSWER_FIELDS``) as the hit it is."""
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


def number(x: float) -> str:
    # Fixed-point: no exponent for the filter parser to misread, microsecond resolution.
    return f"{x:.6f}"
