"""What the semantic cache stores and what it answers with."""

from __future__ import annotations

from dataclasses import dataclass


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
