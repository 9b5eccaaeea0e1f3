"""The autoscaler's pure policy: each test pins one decision `plan` must (or must never) make."""

from __future__ import annotations

import pytest

from services.autoscaler.policy import PolicyConfig, PolicyState, PoolPlan, plan
from services.autoscaler.signals import (
    Pools,
    PoolState,
    Prices,
    ReplicaSignal,
    Signals,
    SpotMarket,
)

PRICES = Prices(spot_usd_per_hour=1.0, on_demand_usd_per_hour=3.0)
NOW = 10_000.0
# A state as if the policy had been running a while with nothing recent: no start-up hold,
# no cooldown pending.
SETTLED = PolicyState(started_at=0.0)
# The tests below pin decisions with the on-demand floor always kept; the availability-aware
# release of the floor has its own tests.
FIXED_FLOOR = PolicyConfig(floor_release_seconds=None)


def ready(name: str, pool: str = "spot", load: int = 0, kv: float = 0.1, gpu: float = -1.0,
          prefix_blocks: int = 0, observed_at: float = NOW) -> ReplicaSignal:
    running = min(load, 8)
    return ReplicaSignal(replica=name, pool=pool, waiting=load - running, running=running,
                         kv_cache_usage=kv, gpu_utilization=gpu, observed_at=observed_at,
                         state="ready", prefix_blocks=prefix_blocks)


def at(replicas: list[ReplicaSignal], now: float) -> list[ReplicaSignal]:
    """The same replicas reporting again at `now`."""
    return [ReplicaSignal(**{**r.__dict__, "observed_at": now}) for r in replicas]


def pending(name: str, pool: str = "spot", since: float = NOW) -> ReplicaSignal:
    return ReplicaSignal(replica=name, pool=pool, observed_at=NOW, state="pending",
                         state_since=since)


def pools_for(replicas: list[ReplicaSignal], spot_max: int = 20, od_max: int = 20,
              spot_min: int = 0, od_min: int = 0) -> Pools:
    def one(pool: str, lo: int, hi: int) -> PoolState:
        mine = [r for r in replicas if r.pool == pool and r.state != "draining"]
        return PoolState(desired=len(mine), ready=sum(r.state == "ready" for r in mine),
                         pending=sum(r.state == "pending" for r in mine),
                         min_replicas=lo, max_replicas=hi)

    return Pools(spot=one("spot", spot_min, spot_max),
                 on_demand=one("on-demand", od_min, od_max))


def run(replicas: list[ReplicaSignal], *, rate: float = 1.0, now: float = NOW,
        state: PolicyState = SETTLED, config: PolicyConfig | None = None,
        market: SpotMarket | None = None, pools: Pools | None = None,
        unassigned: int = 0) -> PoolPlan:
    signals = Signals(replicas=replicas, arrival_rate_rps=rate, now=now,
                      unassigned_waiting=unassigned)
    return plan(signals, pools or pools_for(replicas), PRICES, now, state,
                config or FIXED_FLOOR, market)


def test_queue_growth_scales_out_to_the_target_per_replica() -> None:
    replicas = [ready("s1", load=40), ready("od1", "on-demand", load=40)]
    p = run(replicas, state=PolicyState(started_at=0.0, needed=2))
    # 80 requests at 16 per replica need 5 replicas: 1 on-demand floor + 4 spot.
    assert p.spot + p.on_demand == 5
    assert p.on_demand == 1 and p.spot == 4
    assert p.state.needed == 5
    assert any("scale out" in r for r in p.reasons)


def test_gateway_queue_counts_as_load_when_replicas_are_full() -> None:
    replicas = [ready("od1", "on-demand", load=16)]
    p = run(replicas, unassigned=48, state=PolicyState(started_at=0.0, needed=1))
    assert p.spot + p.on_demand == 4


def test_kv_guard_scales_out_while_queues_are_short() -> None:
    replicas = [ready("s1", load=4, kv=0.95), ready("s2", load=4, kv=0.95),
                ready("od1", "on-demand", load=4, kv=0.95)]
    p = run(replicas, state=PolicyState(started_at=0.0, needed=3))
    assert p.spot + p.on_demand == 5  # ceil(3 * 0.95 / 0.7)
    assert any("KV guard" in r for r in p.reasons)


def test_kv_usage_above_target_blocks_scale_in() -> None:
    replicas = [ready(f"s{i}", load=1, kv=0.8) for i in range(4)] + [
        ready("od1", "on-demand", load=1, kv=0.8)]
    p = run(replicas, state=PolicyState(started_at=0.0, needed=5))
    assert (p.spot, p.on_demand) == (4, 1)
    assert p.remove == []
    assert any("blocked by KV-cache usage" in r for r in p.reasons)


def test_hysteresis_keeps_the_fleet_while_load_is_just_under_target() -> None:
    # 4 replicas at 14 each: under the target (16), but 3 would carry 18.7, over it, and
    # even 4 is above target * (1 - hysteresis) = 12.8, so nothing moves.
    replicas = [ready(f"s{i}", load=14) for i in range(3)] + [
        ready("od1", "on-demand", load=14)]
    p = run(replicas, state=PolicyState(started_at=0.0, needed=4))
    assert (p.spot, p.on_demand) == (3, 1)
    assert p.remove == []


def test_scale_in_waits_for_cooldown_then_steps_down() -> None:
    replicas = [ready(f"s{i}", load=2) for i in range(7)] + [
        ready("od1", "on-demand", load=2)]
    recent_up = PolicyState(started_at=0.0, needed=8, last_scale_up_at=NOW - 30)
    held = run(replicas, state=recent_up)
    assert held.spot + held.on_demand == 8
    assert any("down cooldown" in r for r in held.reasons)

    later = PolicyState(started_at=0.0, needed=8, last_scale_up_at=NOW - 600)
    p = run(replicas, state=later)
    # 16 requests fit on 2 replicas, but one step removes at most a quarter of the fleet.
    assert p.spot + p.on_demand == 6
    assert len(p.remove) == 2
    assert p.state.last_scale_down_at == NOW


def test_scale_in_uses_the_highest_need_of_the_stabilisation_window() -> None:
    replicas = [ready(f"s{i}", load=1) for i in range(5)] + [
        ready("od1", "on-demand", load=1)]
    busy_a_minute_ago = PolicyState(started_at=0.0, needed=6, recommendations=((NOW - 60, 6),))
    p = run(replicas, state=busy_a_minute_ago)
    assert p.spot + p.on_demand == 6
    stale_memory = PolicyState(started_at=0.0, needed=6, recommendations=((NOW - 900, 6),))
    assert sum((run(replicas, state=stale_memory).spot,
                run(replicas, state=stale_memory).on_demand)) < 6


def test_restarted_policy_holds_scale_in_for_one_window() -> None:
    replicas = [ready(f"s{i}") for i in range(5)] + [ready("od1", "on-demand")]
    p = run(replicas, rate=0.0, state=PolicyState())
    assert p.spot + p.on_demand == 6
    assert any("after start" in r for r in p.reasons)


def simulate_quiet_period(config: PolicyConfig, minutes: int, fleet: int = 6) -> list[PoolPlan]:
    """Drive the policy for `minutes` of zero traffic, removing what it drains."""
    replicas = [ready(f"s{i}") for i in range(fleet - 1)] + [ready("od0", "on-demand")]
    state = PolicyState()
    plans = []
    for step in range(minutes * 3):
        now = NOW + 20.0 * step
        replicas = at(replicas, now)
        p = run(replicas, rate=0.0, now=now, state=state, config=config,
                pools=pools_for(replicas, spot_min=0, od_min=0))
        state = p.state
        replicas = [r for r in replicas if r.replica not in p.remove]
        plans.append(p)
    return plans


def test_zero_traffic_scales_down_to_the_floor_instead_of_sticking() -> None:
    plans = simulate_quiet_period(PolicyConfig(), minutes=30)
    assert (plans[-1].spot, plans[-1].on_demand) == (0, 1)


def test_zero_traffic_scales_to_zero_when_allowed() -> None:
    config = PolicyConfig(scale_to_zero=True, on_demand_floor=0, idle_before_zero_seconds=300)
    plans = simulate_quiet_period(config, minutes=30)
    assert (plans[-1].spot, plans[-1].on_demand) == (0, 0)
    assert any("scale to zero" in r for p in plans for r in p.reasons)
    # Not before the idle period has passed.
    assert all(p.spot + p.on_demand >= 1 for p in plans[:15])


def test_traffic_at_zero_replicas_scales_up_at_once() -> None:
    config = PolicyConfig(scale_to_zero=True, on_demand_floor=0)
    at_zero = PolicyState(started_at=0.0, needed=0, last_scale_up_at=NOW - 1)
    p = run([], rate=0.5, unassigned=3, state=at_zero, config=config)
    assert p.spot + p.on_demand >= 1


def test_on_demand_floor_is_kept_and_the_rest_goes_to_spot() -> None:
    replicas = [ready("s1", load=24), ready("s2", load=24)]
    p = run(replicas, state=PolicyState(started_at=0.0, needed=2),
            config=PolicyConfig(on_demand_floor=1, floor_release_seconds=None))
    assert p.on_demand == 1
    assert p.spot == 2


def test_forever_pending_spot_falls_back_to_on_demand() -> None:
    young = [ready("od1", "on-demand", load=30), pending("s1"), pending("s2")]
    p = run(young, state=PolicyState(started_at=0.0, needed=3))
    # Spot that was asked for a moment ago counts: no on-demand bought for the same gap.
    assert (p.spot, p.on_demand) == (2, 1)

    stuck = [ready("od1", "on-demand", load=30), pending("s1", since=NOW - 1200),
             pending("s2", since=NOW - 1200)]
    p = run(stuck, state=PolicyState(started_at=0.0, needed=3))
    assert p.on_demand == 3
    assert p.spot == 2  # the spot requests stay open for when capacity returns
    assert any("pending longer than" in r for r in p.reasons)


def test_policy_remembers_when_it_first_saw_a_replica_pending() -> None:
    replicas = [ready("od1", "on-demand", load=30),
                ReplicaSignal("s1", "spot", state="pending", observed_at=NOW)]
    state = PolicyState(started_at=0.0, needed=2)
    first = run(replicas, state=state)
    assert first.on_demand == 1
    later = run(at(replicas, NOW + 1200), now=NOW + 1200, state=first.state)
    assert later.on_demand == 2


def test_stale_signals_hold_the_fleet_and_never_scale_to_zero() -> None:
    config = PolicyConfig(scale_to_zero=True, on_demand_floor=0, idle_before_zero_seconds=0)
    replicas = [ready(f"s{i}", observed_at=NOW - 600) for i in range(3)] + [
        ready("od1", "on-demand", observed_at=NOW - 600)]
    state = PolicyState(started_at=0.0, needed=4, idle_since=0.0)
    p = run(replicas, rate=0.0, state=state, config=config)
    assert (p.spot, p.on_demand) == (3, 1)
    assert p.remove == []
    assert any("holding" in r for r in p.reasons)


def test_unreachable_replica_is_neither_capacity_nor_idle() -> None:
    silent = ReplicaSignal("s9", "spot", state="unreachable", observed_at=0.0)
    replicas = [ready("s1", load=16), ready("s2", load=16), ready("od1", "on-demand", load=16),
                silent]
    p = run(replicas, state=PolicyState(started_at=0.0, needed=3))
    # Three fresh replicas carry the load at target; the silent one is kept and not counted,
    # so it is not the one drained, and the fleet does not shrink around it.
    assert "s9" not in p.remove
    assert p.spot + p.on_demand == 4


def test_replicas_counted_ready_without_a_signal_are_not_idle_capacity() -> None:
    replicas = [ready("od1", "on-demand")]
    pools = Pools(spot=PoolState(desired=3, ready=3, max_replicas=10),
                  on_demand=PoolState(desired=1, ready=1, max_replicas=10))
    config = PolicyConfig(scale_to_zero=True, on_demand_floor=0, idle_before_zero_seconds=0)
    p = run(replicas, rate=0.0, pools=pools, config=config,
            state=PolicyState(started_at=0.0, needed=4, idle_since=0.0))
    assert p.spot >= 3 and p.on_demand >= 1
    assert any("missing signals" in r for r in p.reasons)


def test_spot_reclaim_falls_back_to_on_demand_then_hands_it_back() -> None:
    config = PolicyConfig(on_demand_floor=1, floor_release_seconds=None)
    before = [ready(f"s{i}", load=16) for i in range(3)] + [ready("od1", "on-demand", load=16)]
    steady = run(before, state=PolicyState(started_at=0.0, needed=4), config=config)
    assert (steady.spot, steady.on_demand) == (3, 1)

    reclaimed = ReplicaSignal("s2", "spot", running=16, observed_at=NOW, state="draining")
    during = [*before[:2], reclaimed, before[3]]
    market = SpotMarket(last_preemption_at=NOW - 5, preemption_rate_per_replica_hour=0.0)
    p = run(during, state=steady.state, config=config, market=market)
    assert p.on_demand == 2  # covers the reclaimed replica at once
    assert p.spot == 3  # and asks spot for a replacement
    assert any("reclaimed" in r for r in p.reasons)

    # The replacement spot replica is up; the fallback on-demand replica goes back.
    after = at([*before[:2], ready("s3", load=16), before[3],
                ready("od2", "on-demand", load=0)], NOW + 400)
    back = run(after, now=NOW + 400, state=p.state, config=config,
               market=SpotMarket(last_preemption_at=NOW - 5))
    assert (back.spot, back.on_demand) == (3, 1)
    assert back.remove == ["od2"]
    assert any("handing back" in r for r in back.reasons)


def test_on_demand_is_not_handed_back_against_pending_spot() -> None:
    replicas = [ready("od1", "on-demand", load=16), ready("od2", "on-demand", load=16),
                pending("s1"), pending("s2")]
    p = run(replicas, state=PolicyState(started_at=0.0, needed=2),
            config=PolicyConfig(on_demand_floor=0))
    assert p.on_demand == 2
    assert p.remove == []


def test_spot_is_over_provisioned_by_the_preemption_rate() -> None:
    replicas = [ready(f"s{i}", load=16) for i in range(4)] + [ready("od1", "on-demand", load=16)]
    calm = run(replicas, state=PolicyState(started_at=0.0, needed=5))
    assert calm.spot == 4
    stormy = run(replicas, state=PolicyState(started_at=0.0, needed=5),
                 market=SpotMarket(preemption_rate_per_replica_hour=0.5))
    assert stormy.spot == 5
    assert stormy.on_demand == 1
    assert any("over-provisioned" in r for r in stormy.reasons)


def test_spot_no_cheaper_than_on_demand_is_not_used() -> None:
    replicas = [ready("od1", "on-demand", load=48)]
    signals = Signals(replicas=replicas, arrival_rate_rps=1.0, now=NOW)
    p = plan(signals, pools_for(replicas), Prices(3.0, 3.0), NOW,
             PolicyState(started_at=0.0, needed=1))
    assert (p.spot, p.on_demand) == (0, 3)


def test_scale_in_picks_idle_replicas_then_fewest_cached_prefixes() -> None:
    replicas = [ready("s-busy", load=6, prefix_blocks=10),
                ready("s-idle-rich", load=0, prefix_blocks=900),
                ready("s-idle-poor", load=0, prefix_blocks=5),
                ready("s-light", load=1, prefix_blocks=1),
                ready("s-light-rich", load=1, prefix_blocks=700),
                ready("od1", "on-demand", load=0)]
    p = run(replicas, state=PolicyState(started_at=0.0, needed=6),
            config=PolicyConfig(max_scale_in_fraction=1.0, on_demand_floor=1,
                                floor_release_seconds=None))
    # 8 requests fit on one replica, the on-demand floor: every spot replica goes, cheapest
    # loss first (idle before busy, fewer cached prefixes before more).
    assert (p.spot, p.on_demand) == (0, 1)
    assert p.remove == ["s-idle-poor", "s-idle-rich", "s-light", "s-light-rich", "s-busy"]


def test_pending_launches_are_cancelled_before_ready_replicas() -> None:
    replicas = [ready("s1"), ready("s2"), pending("s3"), ready("od1", "on-demand")]
    p = run(replicas, rate=0.0, state=PolicyState(started_at=0.0, needed=4),
            config=PolicyConfig(max_scale_in_fraction=1.0))
    assert p.remove[0] == "s3"


def test_a_busy_gpu_is_not_idle_even_with_an_empty_queue() -> None:
    replicas = [ready("s-prefilling", gpu=0.9), ready("s-quiet", gpu=0.0),
                ready("od1", "on-demand", load=2)]
    p = run(replicas, state=PolicyState(started_at=0.0, needed=3),
            config=PolicyConfig(max_scale_in_fraction=1.0))
    assert p.remove[0] == "s-quiet"


def test_backlog_while_replicas_start_does_not_multiply_the_scale_out() -> None:
    starting = [ready("s1", load=32), ready("od1", "on-demand", load=32), pending("s2"),
                pending("s3")]
    state = PolicyState(started_at=0.0, needed=4, last_scale_up_at=NOW - 60,
                        rate_at_scale_out=5.0)
    same_rate = run(starting, rate=5.0, unassigned=60, state=state)
    assert same_rate.spot + same_rate.on_demand == 4
    assert any("not the backlog" in r for r in same_rate.reasons)
    busier = run(starting, rate=7.5, unassigned=60, state=state)
    assert busier.spot + busier.on_demand == 6


def test_plan_is_deterministic() -> None:
    replicas = [ready("s1", load=30, prefix_blocks=3), ready("s2", load=1),
                pending("s3", since=NOW - 50), ready("od1", "on-demand", load=5)]
    market = SpotMarket(preemption_rate_per_replica_hour=0.2, last_preemption_at=NOW - 900)
    a = run(replicas, market=market)
    b = run(list(reversed(replicas)), market=market)
    assert a == b


@pytest.mark.parametrize(("pools", "field"), [
    (Pools(spot=PoolState(min_replicas=3, max_replicas=2)), "pools.spot.min_replicas"),
    (Pools(on_demand=PoolState(min_replicas=5, max_replicas=1)),
     "pools.on_demand.min_replicas"),
    (Pools(spot=PoolState(max_replicas=0), on_demand=PoolState(max_replicas=0)),
     "pools.spot.max_replicas"),
])
def test_contradictory_pool_bounds_raise_naming_the_field(pools: Pools, field: str) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        plan(Signals(now=NOW), pools, PRICES, NOW)


@pytest.mark.parametrize(("config", "field"), [
    (PolicyConfig(target_load_per_replica=0), "config.target_load_per_replica"),
    (PolicyConfig(hysteresis=1.0), "config.hysteresis"),
    (PolicyConfig(kv_target=0.9, kv_high=0.8), "config.kv_high"),
    (PolicyConfig(on_demand_floor=-1), "config.on_demand_floor"),
    (PolicyConfig(down_cooldown_seconds=-5), "config.down_cooldown_seconds"),
    (PolicyConfig(max_scale_in_fraction=0), "config.max_scale_in_fraction"),
])
def test_contradictory_config_raises_naming_the_field(config: PolicyConfig, field: str) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        plan(Signals(now=NOW), Pools(), PRICES, NOW, config=config)


def test_floor_above_on_demand_max_raises() -> None:
    pools = Pools(on_demand=PoolState(max_replicas=1))
    with pytest.raises(ValueError, match=r"config\.on_demand_floor"):
        plan(Signals(now=NOW), pools, PRICES, NOW, config=PolicyConfig(on_demand_floor=2))


@pytest.mark.parametrize("bad", [
    {"kv_cache_usage": 1.5}, {"gpu_utilization": 2.0}, {"waiting": -1}, {"pool": "cheap"},
    {"state": "sleeping"},
])
def test_malformed_signals_are_rejected(bad: dict) -> None:
    with pytest.raises(ValueError, match="replica 'r1'"):
        ReplicaSignal(**{"replica": "r1", "pool": "spot", **bad})


def test_duplicate_replica_names_are_rejected() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        Signals(replicas=[ready("s1"), ready("s1")], now=NOW)


# -- availability-aware on-demand floor, scarce spot, reclaim refill sizing ---------------


def test_on_demand_floor_is_released_after_spot_has_been_reliable() -> None:
    config = PolicyConfig(on_demand_floor=1, floor_release_seconds=3600.0)
    replicas = [ready(f"s{i}", load=16) for i in range(4)] + [
        ready("od1", "on-demand", load=16)]
    # Running 30 minutes, no reclaim: no evidence yet that spot is reliable, the floor stays.
    young = run(replicas, state=PolicyState(started_at=NOW - 1800, needed=5), config=config)
    assert (young.spot, young.on_demand) == (4, 1)
    assert not any("floor" in r and "released" in r for r in young.reasons)

    # Two hours without trouble: the floor goes to spot; spot is asked for first, and the
    # on-demand replica is only handed back once that spot replica is ready.
    old = PolicyState(started_at=NOW - 7200, needed=5)
    p = run(replicas, state=old, config=config)
    assert (p.spot, p.on_demand) == (5, 1)
    assert p.remove == []
    assert any("on-demand floor of 1 released" in r for r in p.reasons)
    up = at([*replicas[:4], ready("s4", load=13), ready("od1", "on-demand", load=3)], NOW + 200)
    back = run(up, now=NOW + 200, state=p.state, config=config)
    assert (back.spot, back.on_demand) == (5, 0)
    assert back.remove == ["od1"]


def test_a_recent_reclaim_keeps_the_on_demand_floor() -> None:
    config = PolicyConfig(on_demand_floor=1, floor_release_seconds=3600.0)
    replicas = [ready(f"s{i}", load=16) for i in range(4)] + [
        ready("od1", "on-demand", load=16)]
    old = PolicyState(started_at=NOW - 7200, needed=5)
    # A reclaim 20 minutes ago (spot requests since filled): the floor is kept.
    recent = SpotMarket(available=True, last_preemption_at=NOW - 1200)
    p = run(replicas, state=old, config=config, market=recent)
    assert (p.spot, p.on_demand) == (4, 1)
    assert p.state.last_reclaim_at == NOW - 1200
    # The reclaim is remembered even when the market's report no longer carries it.
    p = run(replicas, state=p.state, config=config, market=SpotMarket(available=True))
    assert (p.spot, p.on_demand) == (4, 1)
    # A reclaim two hours ago: released again.
    p = run(replicas, state=old, config=config,
            market=SpotMarket(available=True, last_preemption_at=NOW - 7200))
    assert p.on_demand == 1 and p.spot == 5


def test_unfilled_spot_is_covered_replica_for_replica_without_holding_the_floor() -> None:
    # Two hours without a reclaim, but spot requests go unfilled: spot is scarce, not
    # unreliable. On-demand covers the one spot replica that cannot be had, and that is all:
    # the floor is not held on top (the covering replica already is the margin).
    config = PolicyConfig(on_demand_floor=1, floor_release_seconds=3600.0)
    replicas = [ready(f"s{i}", load=16) for i in range(4)] + [
        ready("od1", "on-demand", load=16)]
    old = PolicyState(started_at=NOW - 7200, needed=5)
    scarce = SpotMarket(available=False)
    p = run(replicas, state=old, config=config, market=scarce)
    assert (p.spot, p.on_demand) == (5, 1)
    assert any("floor of 1 released" in r for r in p.reasons)
    assert any("on-demand covers" in r for r in p.reasons)
    # The spot request stays open and nothing flaps while it waits: the same plan 20 s on,
    # and no replica is drained.
    waiting = [*at(replicas, NOW + 20), pending("s4", since=NOW)]
    q = run(waiting, now=NOW + 20, state=p.state, config=config, market=scarce)
    assert (q.spot, q.on_demand, q.remove) == (5, 1, [])
    # Spot fills the request: od1 is kept while s4 boots, handed back once it is ready.
    booting = run(waiting, now=NOW + 40, state=q.state, config=config,
                  market=SpotMarket(available=True))
    assert (booting.spot, booting.on_demand, booting.remove) == (5, 1, [])
    up = at([*replicas[:4], ready("s4", load=8), ready("od1", "on-demand", load=8)], NOW + 240)
    back = run(up, now=NOW + 240, state=booting.state, config=config,
               market=SpotMarket(available=True))
    assert (back.spot, back.on_demand, back.remove) == (5, 0, ["od1"])


def test_floor_release_none_keeps_the_floor_forever() -> None:
    config = PolicyConfig(on_demand_floor=1, floor_release_seconds=None)
    replicas = [ready(f"s{i}", load=16) for i in range(4)] + [
        ready("od1", "on-demand", load=16)]
    p = run(replicas, state=PolicyState(started_at=NOW - 10 * 86400, needed=5), config=config)
    assert (p.spot, p.on_demand) == (4, 1)


def test_floor_release_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match=r"config\.floor_release_seconds"):
        PolicyConfig(floor_release_seconds=-1.0).validate()


def test_no_reserve_is_held_on_demand_while_spot_is_scarce_and_reclaiming() -> None:
    # Spot keeps being reclaimed and requests go unfilled: the over-provisioning for reclaims
    # is asked of spot, and on-demand covers the floor only (every spot replica is ready), not
    # a reserve at 3x the price.
    replicas = [ready(f"s{i}", load=16) for i in range(4)] + [
        ready("od1", "on-demand", load=16)]
    market = SpotMarket(available=False, preemption_rate_per_replica_hour=2.0,
                        last_preemption_at=NOW - 60)
    p = run(replicas, state=PolicyState(started_at=0.0, needed=5), market=market)
    assert p.spot == 4 + 2  # spot still asked for, over-provisioned by the reclaim rate
    assert p.on_demand == 1
    assert not any("reserve" in r for r in p.reasons)


def test_reclaim_replacement_is_sized_by_arrival_rate_not_the_backlog_it_leaves() -> None:
    config = PolicyConfig(on_demand_floor=1, floor_release_seconds=None)
    before = [ready(f"s{i}", load=16) for i in range(3)] + [ready("od1", "on-demand", load=16)]
    steady = run(before, rate=5.0, state=PolicyState(started_at=0.0, needed=4), config=config)
    market = SpotMarket(last_preemption_at=NOW + 10, preemption_rate_per_replica_hour=0.0)
    # Reclaim seen: on-demand replaces the lost replica at once.
    lost = [*before[:2], before[3]]
    p = run(at(lost, NOW + 20), rate=5.0, now=NOW + 20, state=steady.state, config=config,
            market=market)
    assert (p.spot, p.on_demand) == (3, 2)
    # 40 s later the lost replica's requests and the new arrivals queue while the replacement
    # starts: at the same arrival rate that backlog is not new demand.
    queued = [*at(lost, NOW + 60), pending("od2", "on-demand", since=NOW + 20)]
    q = run(queued, rate=5.0, now=NOW + 60, state=p.state, config=config, market=market,
            unassigned=40)
    assert q.spot + q.on_demand == 5  # needed stays 4; 3 spot asked + od1 + od2 starting
    assert q.state.needed == 4
    assert any("not the backlog" in r for r in q.reasons)
    # A higher arrival rate still scales out.
    r = run(queued, rate=7.5, now=NOW + 60, state=p.state, config=config, market=market,
            unassigned=40)
    assert r.state.needed == 6


def test_scale_out_while_spot_is_maxed_out_is_sized_by_arrival_rate_not_backlog() -> None:
    # Every obtainable spot replica is held (the market says spot requests go unfilled): what
    # the scale-out adds goes to on-demand, so the queue that built up since the last
    # scale-out (at the same arrival rate) must not size it.
    replicas = [ready(f"s{i}", load=16) for i in range(3)] + [
        ready("od1", "on-demand", load=16)]
    state = PolicyState(started_at=0.0, needed=4, last_scale_up_at=NOW - 100,
                        rate_at_scale_out=5.0, last_load=60)
    maxed = SpotMarket(available=False)
    p = run(replicas, rate=5.0, state=state, market=maxed, unassigned=40)
    assert p.state.needed == 4  # load 104 alone would need 7
    assert p.on_demand == 1
    assert any("spot maxed out" in r and "not the backlog" in r for r in p.reasons)
    # A higher arrival rate still scales out, in proportion: 4 x 7.5 / 5 = 6.
    q = run(replicas, rate=7.5, state=state, market=maxed, unassigned=40)
    assert q.state.needed == 6
    assert q.on_demand == 1 + 2
    # Where spot can still be had, the backlog sizes the scale-out as before (spot is cheap
    # and a queue that grew needs draining).
    r = run(replicas, rate=5.0, state=state, market=SpotMarket(), unassigned=40)
    assert r.state.needed == 7
