"""The router: filters, then weighted scorers, then a picker; and the one the config asks for."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from services.gateway.routing.candidate import Candidate, RouteRequest
from services.gateway.routing.filters import DEFAULT_FILTERS, Filter
from services.gateway.routing.pickers import HighestScore, Picker, RoundRobin
from services.gateway.routing.scorers import KvCacheFree, PrefixAffinity, QueueDepth, Scorer

# "prefix": the scorer pipeline (prefix affinity balanced against load); "round-robin": the
# baseline the prefix benchmark compares against.
ROUTING_POLICIES = ("prefix", "round-robin")


@dataclass(frozen=True)
class Weights:
    prefix: float = 1.0
    queue: float = 1.0
    kv: float = 0.2
    # Queued requests, beyond the emptiest replica's, that cancel a full prefix match: past it a
    # hot prefix spills to another replica rather than growing one queue.
    queue_tolerance: float = 4.0


class Router:
    def __init__(self, filters: Sequence[Filter], scorers: Sequence[tuple[Scorer, float]],
                 picker: Picker) -> None:
        self.filters = list(filters)
        self.scorers = list(scorers)
        self.picker = picker

    def admit(self, candidates: Sequence[Candidate], req: RouteRequest) -> list[Candidate]:
        """The candidates every filter keeps, in their order."""
        return [c for c in candidates if all(f.keep(c, req) for f in self.filters)]

    def route(self, candidates: Sequence[Candidate], req: RouteRequest) -> Candidate | None:
        """The chosen candidate (its ``scores`` and ``decided_by`` filled in), or None."""
        kept = self.admit(candidates, req)
        if not kept:
            return None
        for c in kept:
            c.scores = {s.name: weight * s.score(c, kept, req) for s, weight in self.scorers}
        return self.picker.pick(kept)


def weighted_router(weights: Weights | None = None, filters: Sequence[Filter] = DEFAULT_FILTERS,
                    tiebreak: Callable[[Candidate], float] | None = None) -> Router:
    """Prefix affinity, queue depth and free KV cache, weighted; the best score wins."""
    weights = weights or Weights()
    return Router(filters, [(PrefixAffinity(), weights.prefix),
                            (QueueDepth(weights.queue_tolerance), weights.queue),
                            (KvCacheFree(), weights.kv)], HighestScore(tiebreak))


def router_for(routing: str, weights: Weights | None = None) -> Router:
    """The router a gateway configured with ``--routing`` and ``--weight-*`` runs."""
    if routing not in ROUTING_POLICIES:
        raise ValueError(f"routing must be one of {ROUTING_POLICIES}, got {routing!r}")
    if routing == "round-robin":
        return Router(DEFAULT_FILTERS, [], RoundRobin())
    return weighted_router(weights)
