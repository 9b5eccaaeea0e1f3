"""Scorers: each rates a candidate in [0, 1] on one concern; the router weighs them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from services.gateway.routing.candidate import Candidate, RouteRequest


class Scorer(Protocol):
    name: str

    def score(self, c: Candidate, candidates: Sequence[Candidate], req: RouteRequest) -> float:
        ...


class PrefixAffinity:
    """The share of the prompt's KV blocks the candidate already holds."""

    name = "prefix"

    def score(self, c: Candidate, candidates: Sequence[Candidate], req: RouteRequest) -> float:
        return c.prefix_blocks / req.prompt_blocks if req.prompt_blocks else 0.0


class QueueDepth:
    """1 for the emptiest queue, falling linearly to 0 at ``tolerance`` requests more."""

    name = "queue"

    def __init__(self, tolerance: float) -> None:
        if not tolerance > 0:
            raise ValueError(f"queue tolerance must be > 0, got {tolerance}")
        self.tolerance = tolerance

    def score(self, c: Candidate, candidates: Sequence[Candidate], req: RouteRequest) -> float:
        least = min(x.queue for x in candidates)
        return max(0.0, 1.0 - (c.queue - least) / self.tolerance)


class KvCacheFree:
    """The share of the candidate's KV cache still free."""

    name = "kv"

    def score(self, c: Candidate, candidates: Sequence[Candidate], req: RouteRequest) -> float:
        return 1.0 - min(1.0, max(0.0, c.kv_usage))
