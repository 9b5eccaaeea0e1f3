"""Pickers: the choice among the candidates the filters kept, once they are scored."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from services.gateway.routing.candidate import Candidate


class Picker(Protocol):
    def pick(self, candidates: Sequence[Candidate]) -> Candidate: ...


def winning_scorer(c: Candidate) -> str:
    """The scorer that contributed most to a candidate's score (for metrics)."""
    return max(c.scores, key=c.scores.get) if c.scores else "none"


class HighestScore:
    """The highest weighted score; among equals spot, then the shorter queue, then
    ``tiebreak``."""

    def __init__(self, tiebreak: Callable[[Candidate], float] | None = None) -> None:
        self.tiebreak = tiebreak

    def pick(self, candidates: Sequence[Candidate]) -> Candidate:
        tiebreak = self.tiebreak
        best = max(candidates, key=lambda c: (round(sum(c.scores.values()), 9), c.spot,
                                              -c.queue, tiebreak(c) if tiebreak else 0.0))
        best.decided_by = winning_scorer(best)
        return best


class RoundRobin:
    """Each candidate in turn, by name, whatever the scores: the baseline routing compares to."""

    def __init__(self) -> None:
        self.turn = 0

    def pick(self, candidates: Sequence[Candidate]) -> Candidate:
        ordered = sorted(candidates, key=lambda c: c.name)
        self.turn += 1
        best = ordered[self.turn % len(ordered)]
        best.decided_by = "round_robin"
        return best
