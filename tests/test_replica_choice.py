"""Which replica the gateway sends a request to: only healthy replicas serving the model, the
least loaded of them, spot before on-demand among equals, never an excluded one."""

from __future__ import annotations

import time

import pytest

from services.gateway.prefix import PrefixRouter
from services.gateway.replicas import FAILURES_BEFORE_SKIP, Replica, ReplicaSet
from spotmesh.prefix_hash import block_hashes
from spotmesh.v1 import common_pb2, inference_pb2

MODEL = "tiny"
SPOT, ON_DEMAND = common_pb2.POOL_SPOT, common_pb2.POOL_ON_DEMAND


def replica(
    address: str,
    *,
    model: str = MODEL,
    pool: int = ON_DEMAND,
    waiting: int = 0,
    kv: float = 0.0,
    in_flight: int = 0,
    draining: bool = False,
    reachable: bool = True,
    failures: int = 0,
    reported: bool = True,
) -> Replica:
    report = inference_pb2.LoadReport(
        replica=f"r-{address}", pool=pool, model=model, waiting=waiting, kv_cache_usage=kv,
        draining=draining,
    ) if reported else None
    # No network: picking must never touch the channel or the stub.
    return Replica(address, channel=None, stub=None, report=report, reachable=reachable,
                   consecutive_failures=failures, in_flight=in_flight,
                   skip_until=time.monotonic() + 60 if failures >= FAILURES_BEFORE_SKIP else 0.0)


def replica_set(*replicas: Replica) -> ReplicaSet:
    rs = ReplicaSet(static=[])
    rs.replicas = {r.address: r for r in replicas}
    return rs


def picked(*replicas: Replica, model: str = MODEL, exclude=frozenset()) -> str | None:
    choice = replica_set(*replicas).pick(model, exclude=set(exclude))
    return choice.address if choice else None


@pytest.mark.parametrize("unfit", [
    pytest.param({"draining": True}, id="draining"),
    pytest.param({"reachable": False}, id="unreachable"),
    pytest.param({"model": "other"}, id="wrong model"),
    pytest.param({"failures": FAILURES_BEFORE_SKIP}, id="repeatedly failing"),
    pytest.param({"failures": FAILURES_BEFORE_SKIP + 5}, id="failing a lot"),
    pytest.param({"reported": False}, id="never reported"),
])
def test_unfit_replica_is_never_picked_even_when_idle(unfit: dict) -> None:
    # The unfit replica is idle, spot and listed first; the fit one is busy and on-demand.
    bad = replica("bad", pool=SPOT, **unfit)
    busy = replica("busy", waiting=50, kv=0.99, in_flight=10)
    assert picked(bad, busy) == "busy"
    assert picked(bad) is None


def test_one_failure_is_not_yet_a_reason_to_skip() -> None:
    assert FAILURES_BEFORE_SKIP > 1
    flaky = replica("flaky", failures=FAILURES_BEFORE_SKIP - 1)
    assert picked(flaky, replica("busy", waiting=3)) == "flaky"


def test_marking_failures_and_success_moves_a_replica_out_and_back() -> None:
    a, b = replica("a"), replica("b", waiting=1)
    rs = replica_set(a, b)
    for _ in range(FAILURES_BEFORE_SKIP):
        assert rs.pick(MODEL).address == "a"
        rs.mark_failed(a)
    assert rs.pick(MODEL).address == "b"
    rs.mark_ok(a)
    assert rs.pick(MODEL).address == "a"


def test_the_breaker_reopens_for_longer_and_half_opens_after_its_cool_down() -> None:
    a, b = replica("a"), replica("b", waiting=1)
    rs = replica_set(a, b)
    for _ in range(FAILURES_BEFORE_SKIP):
        rs.mark_failed(a)
    first = a.skip_until - time.monotonic()
    rs.mark_failed(a)  # the trial call failed too
    assert a.skip_until - time.monotonic() > first  # a longer cool-down
    a.skip_until = time.monotonic() - 0.001  # its cool-down is over: one trial call
    assert rs.pick(MODEL).address == "a"


def test_least_loaded_replica_is_picked() -> None:
    assert picked(replica("a", waiting=3), replica("b", waiting=1), replica("c", waiting=2)) == "b"


def test_gateway_streams_count_as_load() -> None:
    # b's engine queue is shorter but this gateway already has more streams open on it.
    assert picked(replica("a", waiting=2, in_flight=0), replica("b", waiting=0, in_flight=3)) == "a"


def test_kv_cache_use_breaks_a_queue_tie() -> None:
    assert picked(replica("a", waiting=1, kv=0.8), replica("b", waiting=1, kv=0.2)) == "b"


def test_queue_outweighs_kv_cache_use() -> None:
    assert picked(replica("a", waiting=2, kv=0.0), replica("b", waiting=1, kv=0.9)) == "b"


@pytest.mark.parametrize("order", [("od", "spot"), ("spot", "od")])
def test_spot_replica_wins_a_tie(order) -> None:
    reps = {"od": replica("od", pool=ON_DEMAND, waiting=1, kv=0.5),
            "spot": replica("spot", pool=SPOT, waiting=1, kv=0.5)}
    assert picked(*(reps[name] for name in order)) == "spot"


def test_less_loaded_on_demand_beats_busier_spot() -> None:
    assert picked(replica("spot", pool=SPOT, waiting=2), replica("od", pool=ON_DEMAND)) == "od"


def test_unknown_pool_ranks_with_on_demand() -> None:
    unknown = replica("unknown", pool=common_pb2.POOL_UNSPECIFIED)
    assert picked(unknown, replica("spot", pool=SPOT)) == "spot"
    assert unknown.pool == "on-demand"


def test_excluded_replicas_are_skipped() -> None:
    reps = [replica("a"), replica("b", waiting=1), replica("c", waiting=2)]
    assert picked(*reps, exclude={"a"}) == "b"
    assert picked(*reps, exclude={"a", "b"}) == "c"
    assert picked(*reps, exclude={"a", "b", "c"}) is None


def test_no_replica_for_the_model_picks_none() -> None:
    assert picked(replica("a", model="other")) is None
    assert picked() is None


def test_name_is_the_reported_id_falling_back_to_the_address() -> None:
    assert replica("10.0.0.1:7000").name == "r-10.0.0.1:7000"
    assert replica("10.0.0.1:7000", reported=False).name == "10.0.0.1:7000"


def _with_blocks(r: Replica, block_size: int = 16) -> Replica:
    r.report.kv_block_size = block_size
    return r


def _routed(rs: ReplicaSet, router: PrefixRouter, prompt: list[int]) -> Replica:
    """Pick as the gateway does: plan, pick, and record once the replica answered."""
    route = router.plan_local(MODEL, prompt, 16)
    chosen = rs.pick(MODEL, route=route)
    router.record(chosen.name, route)
    return chosen


def test_a_prompt_goes_back_to_the_replica_holding_its_prefix() -> None:
    rs = replica_set(*(_with_blocks(replica(n)) for n in ("a", "b", "c")))
    router = PrefixRouter()
    prompt = list(range(64))  # 4 blocks of 16
    first = _routed(rs, router, prompt)
    # A longer prompt with the same start, and equal load: affinity decides.
    again = _routed(rs, router, [*prompt, 7, 8, 9])
    assert again is first
    assert router.local.match(MODEL, block_hashes(prompt, 16)) == {first.name: 4}


def test_a_busy_prefix_holder_sheds_new_work() -> None:
    rs = replica_set(*(_with_blocks(replica(n)) for n in ("a", "b")))
    router = PrefixRouter()
    prompt = list(range(64))
    holder = _routed(rs, router, prompt)
    holder.in_flight = 10  # far past the queue tolerance
    assert _routed(rs, router, prompt) is not holder


def test_a_replica_of_another_block_size_matches_nothing() -> None:
    a, b = _with_blocks(replica("a"), 16), _with_blocks(replica("b"), 32)
    rs = replica_set(a, b)
    router = PrefixRouter()
    prompt = list(range(64))
    router.record(b.name, router.plan_local(MODEL, prompt, 16))  # b's name, but 16-token hashes
    b.in_flight = 1  # without the (wrong) match, a wins on load
    assert rs.pick(MODEL, route=router.plan_local(MODEL, prompt, 16)) is a


def test_round_robin_ignores_prefixes_and_cycles() -> None:
    rs = replica_set(*(_with_blocks(replica(n)) for n in ("a", "b", "c")))
    rs.routing = "round-robin"
    router = PrefixRouter()
    seen = [_routed(rs, router, list(range(64))).address for _ in range(6)]
    assert sorted(seen[:3]) == ["a", "b", "c"] and seen[3:] == seen[:3]


def test_forgetting_a_replica_empties_its_prefix_blocks() -> None:
    rs = replica_set(_with_blocks(replica("a")))
    router = PrefixRouter()
    chosen = _routed(rs, router, list(range(32)))
    assert router.local.blocks(chosen.name) == 2
    router.forget(chosen.name)
    assert router.local.blocks(chosen.name) == 0
