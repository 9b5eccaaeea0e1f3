"""Choosing a replica as a pipeline: filters, then weighted scorers, then a picker.

Filters drop replicas that cannot take the request (unhealthy, draining, another model).
Each scorer rates the rest in [0, 1] on one concern (prefix cache affinity, queue depth, KV
cache use); the weighted sum decides, so affinity wins while load is even and load wins when
one replica's queue grows, instead of one hot prefix piling every request onto one replica.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass
class Candidate:
    name: str
    queue: float  # requests waiting or running on it (as this router knows them)
    kv_usage: float = 0.0  # 0-1
    prefix_blocks: int = 0  # leading prompt blocks it already holds
    spot: bool = False
    scores: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Weights:
    prefix: float = 1.0
    queue: float = 1.0
    kv: float = 0.2
    # Queued requests, beyond the emptiest replica's, that cancel a full prefix match: past it a
    # hot prefix spills to another replica rather than growing one queue.
    queue_tolerance: float = 4.0


def prefix_score(c: Candidate, prompt_blocks: int) -> float:
    return c.prefix_blocks / prompt_blocks if prompt_blocks else 0.0


def queue_score(c: Candidate, candidates: Sequence[Candidate], tolerance: float) -> float:
    """1 for the emptiest queue, falling linearly to 0 at ``tolerance`` requests more."""
    least = min(x.queue for x in candidates)
    return max(0.0, 1.0 - (c.queue - least) / tolerance)


def kv_score(c: Candidate) -> float:
    return 1.0 - min(1.0, max(0.0, c.kv_usage))


DEFAULT_WEIGHTS = Weights()


def pick(candidates: Sequence[Candidate], prompt_blocks: int, weights: Weights = DEFAULT_WEIGHTS,
         tiebreak: Callable[[Candidate], float] | None = None) -> Candidate | None:
    """The best candidate (after filtering), or None. Among equal scores: spot, then the
    shorter queue, then ``tiebreak``."""
    if not candidates:
        return None
    for c in candidates:
        c.scores = {
            "prefix": weights.prefix * prefix_score(c, prompt_blocks),
            "queue": weights.queue * queue_score(c, candidates, weights.queue_tolerance),
            "kv": weights.kv * kv_score(c),
        }
    return max(candidates, key=lambda c: (round(sum(c.scores.values()), 9), c.spot, -c.queue,
                                          tiebreak(c) if tiebreak else 0.0))


def winning_scorer(c: Candidate) -> str:
    """The scorer that contributed most to the choice (for metrics)."""
    return max(c.scores, key=c.scores.get) if c.scores else "none"
