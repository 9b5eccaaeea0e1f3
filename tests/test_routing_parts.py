"""Each part of the routing pipeline on its own: the filters, the scorers, the pickers, and a
router assembled from config."""

from __future__ import annotations

import pytest

from services.gateway.routing.candidate import Candidate, RouteRequest
from services.gateway.routing.filters import (
    Admitting,
    BreakerClosed,
    NotTried,
    Reachable,
    ServesModel,
)
from services.gateway.routing.pickers import HighestScore, RoundRobin, winning_scorer
from services.gateway.routing.pipeline import Router, Weights, router_for
from services.gateway.routing.scorers import KvCacheFree, PrefixAffinity, QueueDepth

REQ = RouteRequest(model="m", prompt_blocks=4, exclude=frozenset({"tried"}))


def c(name: str = "r", **kw) -> Candidate:
    return Candidate(name, queue=kw.pop("queue", 0), model=kw.pop("model", "m"), **kw)


@pytest.mark.parametrize(("part", "kept", "dropped"), [
    (Reachable(), c(), c(reachable=False)),
    (Admitting(), c(), c(draining=True)),
    (ServesModel(), c(), c(model="other")),
    (BreakerClosed(), c(), c(failing=True)),
    (NotTried(), c("fresh"), c("tried")),
])
def test_each_filter_drops_exactly_what_it_names(part, kept, dropped):
    assert part.keep(kept, REQ) and not part.keep(dropped, REQ)


def test_prefix_affinity_is_the_share_of_blocks_held():
    s = PrefixAffinity()
    assert s.score(c(prefix_blocks=3), [], REQ) == 0.75
    assert s.score(c(prefix_blocks=3), [], RouteRequest(prompt_blocks=0)) == 0.0


def test_queue_depth_falls_from_the_emptiest_queue_to_zero_at_the_tolerance():
    s = QueueDepth(tolerance=4)
    pool = [c("a", queue=2), c("b", queue=4), c("c", queue=9)]
    assert [s.score(x, pool, REQ) for x in pool] == [1.0, 0.5, 0.0]
    with pytest.raises(ValueError):
        QueueDepth(tolerance=0)


def test_kv_cache_free_is_clamped_to_the_unit_interval():
    s = KvCacheFree()
    assert [s.score(c(kv_usage=u), [], REQ) for u in (0.25, 1.5, -1)] == [0.75, 0.0, 1.0]


def test_highest_score_breaks_ties_by_spot_then_queue_then_tiebreak():
    a, b = c("a", queue=1), c("b", queue=1, spot=True)
    for x in (a, b):
        x.scores = {"queue": 1.0}
    assert HighestScore().pick([a, b]).name == "b"
    b.spot = False
    picker = HighestScore(tiebreak=lambda x: 1.0 if x.name == "a" else 0.0)
    assert picker.pick([b, a]).name == "a" and a.decided_by == "queue"


def test_round_robin_cycles_by_name_ignoring_scores():
    picker = RoundRobin()
    pool = [c("b"), c("a"), c("c")]
    assert [picker.pick(pool).name for _ in range(4)] == ["b", "c", "a", "b"]
    assert pool[0].decided_by == "round_robin"


def test_the_router_filters_weighs_and_picks():
    router = Router([ServesModel()], [(PrefixAffinity(), 2.0), (QueueDepth(4), 1.0)],
                    HighestScore())
    warm, cold, wrong = c("warm", prefix_blocks=4, queue=3), c("cold"), c("x", model="o")
    best = router.route([wrong, cold, warm], REQ)
    assert best is warm and best.scores == {"prefix": 2.0, "queue": 0.25}
    assert winning_scorer(best) == "prefix"
    assert router.route([wrong], REQ) is None


def test_the_config_chooses_the_pipeline():
    assert isinstance(router_for("round-robin").picker, RoundRobin)
    weighted = router_for("prefix", Weights(prefix=3.0, queue=0.5, kv=0.0, queue_tolerance=2))
    assert [(s.name, w) for s, w in weighted.scorers] == [("prefix", 3.0), ("queue", 0.5),
                                                          ("kv", 0.0)]
    with pytest.raises(ValueError):
        router_for("random")
