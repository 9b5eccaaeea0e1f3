"""spotmesh's scaling policy: signals in, a `PoolPlan(spot, on_demand)` out, nothing else.

Pure and deterministic: the same signals, pools, prices, time and state always give the same
plan, so one policy object runs under Kubernetes, local processes and the trace simulator, and a
test can pin any decision down. What the policy must remember between reconciles (cooldown
timestamps, the recent recommendations the scale-in hysteresis looks back over, when it first saw
a replica pending or the fleet idle) lives in `PolicyState`, passed in and returned inside the
plan; a restarted autoscaler passes `PolicyState()` and the policy holds scale-in for one
stabilisation window instead of acting on a memory it does not have.

How a plan is made:

1. Classify replicas. A ready replica whose report is older than `signal_staleness_seconds`,
   one marked unreachable, or one the actuator counts as ready with no report at all, is
   *unknown*: never capacity, never idle, never removed. When unknowns are the majority the
   policy holds (no pool shrinks) rather than act on the few it can see.
2. Size the fleet from queue depth: `load` (waiting + running over fresh replicas, plus what
   draining replicas still hold, plus what the gateway holds unassigned) divided by
   `target_load_per_replica`. KV-cache usage is a guard: when the loaded replicas' KV cache is
   nearly full the fleet grows even if queues look short (long prompts fill KV before they fill
   slots). GPU utilisation only confirms idleness (a replica with no requests but a busy GPU is
   not idle): batched decoding keeps a GPU near 100% at any load, so it cannot size the fleet.
3. Hysteresis: scale out as soon as the load per replica exceeds the target (after an up
   cooldown); scale in only to a count where the load per replica stays below
   `target * (1 - hysteresis)`, to the highest such count recommended over the stabilisation
   window, at most `max_scale_in_fraction` of the fleet per step, and not within
   `down_cooldown_seconds` of the last change.
4. Split the fleet between pools. An on-demand floor guards against losing the spot replicas
   already running: it is kept from start and for `floor_release_seconds` after the last
   reclaim; after that long without one, the floor, too, goes to spot. Spot that merely cannot
   be had (requests unfilled, launches stuck) does not hold the floor: the on-demand replicas
   covering it already are the margin, and holding the floor on top of them paid the on-demand
   premium for an insurance nothing claimed. The rest goes to spot while spot is cheaper,
   over-provisioned by the observed preemption rate. Spot that cannot deliver (pending past
   `pending_grace_seconds`, the market saying it is gone, or a reclaim within
   `reclaim_backoff_seconds`) stops counting and on-demand covers exactly the gap; no reserve
   on top (a reclaimed replica serves on through its notice, so a single reclaim costs a
   fraction of a cold start, not a replica); the spot requests stay open, so when spot
   capacity returns and those replicas become ready the on-demand replicas are handed back.
   Pending replicas never cause ready ones to be removed. The replacements a reclaim triggers
   are treated like a scale-out's starting replicas: the backlog the lost replicas leave is
   not new demand, only a higher arrival rate adds more.
   Likewise while spot is maxed out (spot requests unfilled): a scale-out would land on
   on-demand, so within a cold start of the last scale-out it follows the arrival rate, not
   the backlog.
5. Scale-in picks what costs least to lose: pending launches first, then idle replicas, then the
   least loaded, then those holding the fewest cached prefix blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from services.autoscaler.signals import (
    POOLS,
    Pool,
    Pools,
    Prices,
    ReplicaSignal,
    Signals,
    SpotMarket,
)


@dataclass(frozen=True)
class PolicyConfig:
    """The policy's knobs; `validate` names the field that is wrong."""

    # Requests (waiting + running) one replica should hold; about half its batch slots, so
    # bursts queue in the batch rather than in front of it.
    target_load_per_replica: float = 16.0
    # Scale in only to a count that keeps load per replica under target * (1 - hysteresis).
    hysteresis: float = 0.2
    # Mean KV-cache usage of the replicas serving requests that forces a scale-out, and the
    # usage the scale-out sizes for. Scale-in is blocked while usage is above kv_target.
    kv_high: float = 0.85
    kv_target: float = 0.7
    # A replica with no requests but a GPU busier than this is not idle (the queue signal lags
    # or it is prefilling); -1 (unknown) does not block idleness.
    gpu_idle: float = 0.1
    # Between scale-outs: a cold start takes minutes, so a second scale-out within a minute
    # mostly sees the backlog the first is about to clear.
    up_cooldown_seconds: float = 60.0
    down_cooldown_seconds: float = 120.0
    down_stabilization_seconds: float = 180.0
    # At most this share of the fleet (and at least one replica) goes per scale-in. Queue depth
    # falls faster than load when replicas are lightly loaded (requests finish sooner), so one
    # big step down undershoots and the next burst finds the fleet short; small steps let the
    # queue settle at each size.
    max_scale_in_fraction: float = 0.25
    # On-demand replicas kept whenever anything runs while spot is unproven: spot can vanish
    # all at once. The floor is released (drops to 0, everything on spot plus its reclaim
    # over-provisioning) once no spot replica has been reclaimed for floor_release_seconds,
    # counted from start (a policy that has not watched spot yet has no evidence it is
    # reliable); the next reclaim brings it back. Unfilled spot requests do not: on-demand
    # covers those replica for replica. None keeps the floor always.
    on_demand_floor: int = 1
    floor_release_seconds: float | None = 2700.0
    scale_to_zero: bool = False
    idle_before_zero_seconds: float = 300.0
    signal_staleness_seconds: float = 30.0
    # Below this share of fresh reports among ready replicas, the policy holds.
    min_fresh_fraction: float = 0.5
    # A pending replica counts as capacity this long (a cold start plus margin), then the
    # policy stops waiting for it.
    pending_grace_seconds: float = 300.0
    # After a spot reclaim, pending spot does not count as capacity for this long (unless the
    # market reports spot requests being filled).
    reclaim_backoff_seconds: float = 600.0
    # Extra spot replicas: the expected reclaims over this many hours, at most max_extra_spot.
    spot_cover_hours: float = 0.5
    max_extra_spot: int = 2

    def validate(self, pools: Pools | None = None) -> None:
        """Raise ValueError naming the first contradictory field."""
        if not self.target_load_per_replica > 0:
            raise ValueError(f"config.target_load_per_replica must be > 0, got "
                             f"{self.target_load_per_replica}")
        if not 0.0 <= self.hysteresis < 1.0:
            raise ValueError(f"config.hysteresis must be in [0, 1), got {self.hysteresis}")
        if not 0.0 < self.kv_target <= 1.0:
            raise ValueError(f"config.kv_target must be in (0, 1], got {self.kv_target}")
        if not self.kv_target <= self.kv_high <= 1.0:
            raise ValueError(f"config.kv_high ({self.kv_high}) must be in "
                             f"[config.kv_target ({self.kv_target}), 1]")
        if not 0.0 <= self.gpu_idle <= 1.0:
            raise ValueError(f"config.gpu_idle must be in [0, 1], got {self.gpu_idle}")
        for key in ("up_cooldown_seconds", "down_cooldown_seconds",
                    "down_stabilization_seconds", "idle_before_zero_seconds",
                    "pending_grace_seconds", "reclaim_backoff_seconds", "spot_cover_hours"):
            if getattr(self, key) < 0:
                raise ValueError(f"config.{key} must be >= 0, got {getattr(self, key)}")
        if not self.signal_staleness_seconds > 0:
            raise ValueError(f"config.signal_staleness_seconds must be > 0, got "
                             f"{self.signal_staleness_seconds}")
        if not 0.0 < self.max_scale_in_fraction <= 1.0:
            raise ValueError(f"config.max_scale_in_fraction must be in (0, 1], got "
                             f"{self.max_scale_in_fraction}")
        if not 0.0 <= self.min_fresh_fraction <= 1.0:
            raise ValueError(f"config.min_fresh_fraction must be in [0, 1], got "
                             f"{self.min_fresh_fraction}")
        if self.floor_release_seconds is not None and not self.floor_release_seconds >= 0:
            raise ValueError(f"config.floor_release_seconds must be >= 0 or None, got "
                             f"{self.floor_release_seconds}")
        if self.on_demand_floor < 0:
            raise ValueError(f"config.on_demand_floor must be >= 0, got {self.on_demand_floor}")
        if self.max_extra_spot < 0:
            raise ValueError(f"config.max_extra_spot must be >= 0, got {self.max_extra_spot}")
        if pools is None:
            return
        pools.validate()
        if pools.spot.max_replicas + pools.on_demand.max_replicas == 0:
            raise ValueError("pools.spot.max_replicas and pools.on_demand.max_replicas are both 0:"
                             " nothing could ever serve")
        if self.on_demand_floor > pools.on_demand.max_replicas:
            raise ValueError(f"config.on_demand_floor ({self.on_demand_floor}) must be <= "
                             f"pools.on_demand.max_replicas ({pools.on_demand.max_replicas})")


@dataclass(frozen=True)
class PolicyState:
    """The policy's memory between reconciles: plain data, safe to log or persist.

    `needed` is the healthy replica count the last plan aimed for; `rate_at_scale_out` the
    arrival rate when it last scaled out (what further scale-outs compare against while those
    replicas start) and `last_load` the load it saw last; `recommendations` the
    (time, scale-in recommendation) pairs inside the stabilisation window; `pending_seen` when
    each pending replica was first seen (used only where the actuator gives no `state_since`);
    `last_reclaim_at` the last reclaim seen (what holds the on-demand floor).
    """

    started_at: float | None = None
    needed: int | None = None
    last_scale_up_at: float | None = None
    last_scale_down_at: float | None = None
    rate_at_scale_out: float | None = None
    last_load: int | None = None
    recommendations: tuple[tuple[float, int], ...] = ()
    idle_since: float | None = None
    pending_seen: tuple[tuple[str, float], ...] = ()
    last_reclaim_at: float | None = None
    reclaim_seen_at: float | None = None
    refill_at: float | None = None


@dataclass(frozen=True)
class PoolPlan:
    """What the pools should be: target counts, which replicas to drain, and why.

    `remove` names the replicas to drain and then remove, cheapest loss first; the actuator
    removes exactly these before choosing any itself. `state` is the memory to pass to the next
    `plan` call.
    """

    spot: int
    on_demand: int
    remove: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    state: PolicyState = field(default_factory=PolicyState)

    def get(self, pool: Pool) -> int:
        return self.spot if pool == "spot" else self.on_demand


@dataclass
class _Fleet:
    """Replicas sorted by what they can tell the policy, per pool."""

    fresh: dict[Pool, list[ReplicaSignal]]
    unknown: dict[Pool, int]
    pending: dict[Pool, list[tuple[ReplicaSignal, float]]]
    draining_load: int


def _classify(signals: Signals, pools: Pools, config: PolicyConfig, now: float,
              seen: dict[str, float]) -> _Fleet:
    fleet = _Fleet(fresh={p: [] for p in POOLS}, unknown={p: 0 for p in POOLS},
                   pending={p: [] for p in POOLS}, draining_load=0)
    for r in sorted(signals.replicas, key=lambda s: s.replica):
        fresh = now - r.observed_at <= config.signal_staleness_seconds
        if r.state == "pending":
            since = r.state_since if r.state_since is not None else seen.get(r.replica, now)
            fleet.pending[r.pool].append((r, max(0.0, now - since)))
        elif r.state == "draining":
            # What a draining replica still holds must be served somewhere: a reclaimed spot
            # replica's requests resume elsewhere.
            if fresh:
                fleet.draining_load += r.load
        elif r.state == "unreachable" or not fresh:
            fleet.unknown[r.pool] += 1
        else:
            fleet.fresh[r.pool].append(r)
    for pool in POOLS:
        # The actuator counts a replica ready that sent no report at all: unknown, not idle.
        reported = pools.get(pool).ready
        seen_ready = len(fleet.fresh[pool]) + fleet.unknown[pool]
        fleet.unknown[pool] += max(0, reported - seen_ready)
    return fleet


def _is_idle(r: ReplicaSignal, config: PolicyConfig) -> bool:
    return r.load == 0 and (r.gpu_utilization < 0 or r.gpu_utilization <= config.gpu_idle)


def _removal_order(fleet: _Fleet, pool: Pool, config: PolicyConfig) -> list[str]:
    """Cheapest loss first: pending launches (stuck ones first), then idle, least loaded, and
    fewest cached prefix blocks; unknown replicas are never candidates (their loss is unknown)."""
    pending = sorted(fleet.pending[pool],
                     key=lambda p: (p[1] <= config.pending_grace_seconds, p[1], p[0].replica))
    ready = sorted(fleet.fresh[pool],
                   key=lambda r: (not _is_idle(r, config), r.load, r.prefix_blocks,
                                  r.kv_cache_usage, r.replica))
    return [p[0].replica for p in pending] + [r.replica for r in ready]


def _extra_spot(base_spot: int, rate: float, prices: Prices, config: PolicyConfig) -> int:
    """Spot replicas beyond the need, to absorb the reclaims expected while replacements start.

    Only while the over-provisioned spot pool still costs less than the same need on demand.
    """
    if base_spot <= 0 or rate <= 0:
        return 0
    extra = min(config.max_extra_spot, math.ceil(base_spot * rate * config.spot_cover_hours))
    while extra > 0 and (base_spot + extra) * prices.spot_usd_per_hour >= (
            base_spot * prices.on_demand_usd_per_hour):
        extra -= 1
    return extra


@dataclass
class _SpotHealth:
    """Whether spot can be counted on at this reconcile, and the on-demand floor that follows."""

    trouble: list[str]  # why spot cannot deliver now; empty when it can
    stuck: dict[Pool, list[ReplicaSignal]]  # pending longer than the grace, per pool
    credited_pending: dict[Pool, int]  # pending replicas still counted as coming capacity
    last_reclaim_at: float | None
    od_floor: int


@dataclass
class _Need:
    """How many healthy replicas the load needs, before hysteresis."""

    load: int
    up: int  # to scale out to
    down: int  # the most a scale-in may go down to
    loaded: list[ReplicaSignal]
    kv_mean: float
    idle_since: float | None
    zero_ok: bool
    min_total: int


@dataclass
class _Step:
    """What hysteresis and cooldowns make of the need: the healthy count to aim for, and the
    memory that goes with it."""

    prev: int
    needed: int
    last_up: float | None
    last_down: float | None
    rate_at_up: float | None
    refill_at: float | None
    reclaim: float | None
    recommendations: tuple[tuple[float, int], ...]


def _assess_spot(fleet: _Fleet, state: PolicyState, market: SpotMarket, config: PolicyConfig,
                 now: float, started_at: float, reasons: list[str]) -> _SpotHealth:
    """Which pending replicas still count as capacity, and whether the floor holds."""
    spot_trouble: list[str] = []
    if market.available is False:
        spot_trouble.append("the market reports no spot capacity")
    stuck = {p: [r for r, age in fleet.pending[p] if age > config.pending_grace_seconds]
             for p in POOLS}
    if stuck["spot"]:
        spot_trouble.append(f"{len(stuck['spot'])} spot replica(s) pending longer than "
                            f"{config.pending_grace_seconds:.0f}s")
    if (market.available is not True and market.last_preemption_at is not None
            and now - market.last_preemption_at < config.reclaim_backoff_seconds):
        # Without word from the market, a reclaim says spot capacity is short: replacements
        # are not waited for. Where the market says spot requests are being filled, they are.
        spot_trouble.append(f"spot reclaimed {now - market.last_preemption_at:.0f}s ago")
    last_reclaim_at = state.last_reclaim_at
    if market.last_preemption_at is not None:
        last_reclaim_at = max(last_reclaim_at or market.last_preemption_at,
                              market.last_preemption_at)
    od_floor = config.on_demand_floor
    if config.floor_release_seconds is not None and od_floor:
        reliable_since = max(started_at, last_reclaim_at or started_at)
        if now - reliable_since >= config.floor_release_seconds:
            od_floor = 0
            reasons.append(f"no spot replica reclaimed for {now - reliable_since:.0f}s: "
                           f"on-demand floor of {config.on_demand_floor} released")
    credited_pending = {
        "spot": 0 if spot_trouble else len(fleet.pending["spot"]) - len(stuck["spot"]),
        "on-demand": len(fleet.pending["on-demand"]) - len(stuck["on-demand"]),
    }
    if stuck["on-demand"]:
        reasons.append(f"{len(stuck['on-demand'])} on-demand replica(s) pending longer than "
                       f"{config.pending_grace_seconds:.0f}s: not counted, asking spot instead")
    return _SpotHealth(spot_trouble, stuck, credited_pending, last_reclaim_at, od_floor)


def _size(fleet: _Fleet, signals: Signals, state: PolicyState, config: PolicyConfig,
          now: float, load: int, n_unknown: int, od_floor: int, reasons: list[str]) -> _Need:
    """How many healthy replicas the load needs: queue depth over the target, the KV guard,
    and the floor (or zero, after a long enough idle)."""
    target = config.target_load_per_replica
    need_up = math.ceil(load / target)
    need_down = math.ceil(load / (target * (1.0 - config.hysteresis)))
    loaded = [r for p in POOLS for r in fleet.fresh[p] if r.running > 0]
    kv_mean = sum(r.kv_cache_usage for r in loaded) / len(loaded) if loaded else 0.0
    if loaded and kv_mean >= config.kv_high:
        serving = sum(len(fleet.fresh[p]) for p in POOLS)
        kv_need = math.ceil(serving * kv_mean / config.kv_target)
        if kv_need > need_up:
            reasons.append(f"KV guard: mean KV-cache usage {kv_mean:.2f} >= {config.kv_high} "
                           f"on {len(loaded)} loaded replica(s): need {kv_need}")
            need_up = need_down = kv_need

    idle = (signals.arrival_rate_rps == 0 and load == 0 and n_unknown == 0
            and all(_is_idle(r, config) for p in POOLS for r in fleet.fresh[p]))
    idle_since = (state.idle_since if state.idle_since is not None else now) if idle else None
    zero_ok = (config.scale_to_zero and idle and idle_since is not None
               and now - idle_since >= config.idle_before_zero_seconds)
    min_total = 0 if zero_ok else max(1, od_floor)
    if config.scale_to_zero and not zero_ok:
        if idle and idle_since is not None:
            reasons.append(f"idle for {now - idle_since:.0f}s of "
                           f"{config.idle_before_zero_seconds:.0f}s before scaling to zero")
        elif n_unknown and load == 0:
            reasons.append("no scale to zero while some replicas' signals are stale")
    return _Need(load, need_up, need_down, loaded, kv_mean, idle_since, zero_ok, min_total)


def _hysteresis(need: _Need, signals: Signals, state: PolicyState, market: SpotMarket,
                config: PolicyConfig, now: float, started_at: float, n_fresh: int,
                credited_pending: dict[Pool, int], hold: bool, reasons: list[str]) -> _Step:
    """Scale out at once (after a cooldown, and for the arrival rate rather than a backlog
    while replicas start); scale in slowly, to the highest count recommended over the
    stabilisation window; never below the floor; hold when most signals are missing."""
    load, need_up, need_down = need.load, need.up, need.down
    target = config.target_load_per_replica
    prev = state.needed if state.needed is not None else (
        n_fresh + credited_pending["spot"] + credited_pending["on-demand"])
    recent = [(t, n) for t, n in state.recommendations
              if now - t < config.down_stabilization_seconds]
    recommendations = (*recent, (now, need_down))
    last_up, last_down = state.last_scale_up_at, state.last_scale_down_at
    needed = prev
    per = load / prev if prev else float(load)
    rate_at_up = state.rate_at_scale_out
    refill_at = state.refill_at
    reclaim = market.last_preemption_at
    if reclaim is not None and reclaim != state.reclaim_seen_at and prev:
        # A reclaim: its replacements start like a scale-out's replicas, and the backlog the
        # lost replicas leave (their requests resume elsewhere) is not new demand either.
        refill_at, rate_at_up = now, signals.arrival_rate_rps
    starting_since = max((t for t in (last_up, refill_at) if t is not None), default=None)
    coming = credited_pending["spot"] + credited_pending["on-demand"]
    draining_backlog = state.last_load is not None and load < state.last_load
    # Spot requests left unfilled: every spot replica obtainable is held, so what the queue
    # adds beyond the arrival rate lands on on-demand at 2-3x the price.
    spot_maxed = market.available is False
    if (need_up > prev and (coming or draining_backlog or spot_maxed) and rate_at_up
            and starting_since is not None
            and now - starting_since < config.pending_grace_seconds):
        # Replicas from the last scale-out are still starting (or have just started and the
        # queue is shrinking): the backlog that built up meanwhile is not new demand. Only a
        # higher arrival rate justifies more.
        by_rate = max(prev, math.ceil(prev * signals.arrival_rate_rps / rate_at_up - 1e-9))
        if by_rate < need_up:
            why = (f"{coming} replica(s) still starting" if coming else
                   f"backlog draining ({state.last_load} -> {load})" if draining_backlog else
                   "spot maxed out (requests unfilled), on-demand would cover")
            reasons.append(f"{why}: scaling for the arrival rate "
                           f"({signals.arrival_rate_rps:.2f}/s vs {rate_at_up:.2f}/s at the last "
                           f"scale-out), not the backlog (load {load} would need {need_up})")
            need_up = by_rate
    if need_up > prev:
        from_zero = prev == 0
        if from_zero or last_up is None or now - last_up >= config.up_cooldown_seconds:
            needed, last_up = need_up, now
            rate_at_up = signals.arrival_rate_rps
            reasons.append(f"scale out: load {load} over {prev} replica(s) ({per:.1f} each) "
                           f"above target {target:g}: need {need_up}")
        else:
            reasons.append(f"scale-out to {need_up} waits for the up cooldown "
                           f"({now - last_up:.0f}s of {config.up_cooldown_seconds:.0f}s)")
    elif need_down < prev:
        stabilized = max(n for _, n in recommendations)
        last_change = max((t for t in (last_up, last_down) if t is not None), default=None)
        if need.loaded and need.kv_mean >= config.kv_target:
            reasons.append(f"scale-in blocked by KV-cache usage {need.kv_mean:.2f} >= "
                           f"{config.kv_target}")
        elif now - started_at < config.down_stabilization_seconds:
            reasons.append(f"scale-in waits one stabilisation window after start "
                           f"({now - started_at:.0f}s of {config.down_stabilization_seconds:.0f}s)")
        elif last_change is not None and now - last_change < config.down_cooldown_seconds:
            reasons.append(f"scale-in waits for the down cooldown ({now - last_change:.0f}s of "
                           f"{config.down_cooldown_seconds:.0f}s)")
        elif stabilized < prev:
            step = max(1, math.floor(prev * config.max_scale_in_fraction))
            needed, last_down = max(stabilized, prev - step), now
            reasons.append(f"scale in to {needed}: load {load} over {prev} replica(s) "
                           f"({per:.1f} each), {stabilized} would keep it under "
                           f"{target * (1 - config.hysteresis):g} over the last "
                           f"{config.down_stabilization_seconds:.0f}s")
    if needed < need.min_total:
        needed = need.min_total
    if need.zero_ok and needed == 0:
        reasons.append(f"scale to zero: no traffic for {now - (need.idle_since or now):.0f}s")
    if hold:
        needed = max(needed, prev)
    return _Step(prev, needed, last_up, last_down, rate_at_up, refill_at, reclaim,
                 recommendations)


def _split_pools(needed: int, fleet: _Fleet, spot: _SpotHealth, pools: Pools, prices: Prices,
                 market: SpotMarket, config: PolicyConfig, reasons: list[str]) -> dict[Pool, int]:
    """The healthy count split between the pools: the floor on demand, the rest on spot
    (over-provisioned by the reclaim rate) while spot is cheaper and can deliver, on-demand
    covering exactly the spot it cannot have and handed back once spot is ready."""
    spot_ready = len(fleet.fresh["spot"])
    spot_cheaper = prices.spot_usd_per_hour < prices.on_demand_usd_per_hour
    spot_room = max(0, pools.spot.max_replicas - fleet.unknown["spot"])
    od_room = max(0, pools.on_demand.max_replicas - fleet.unknown["on-demand"])
    floor = min(spot.od_floor, needed, od_room)
    extra = 0
    if spot_cheaper and spot_room > 0:
        base_spot = needed - floor
        extra = _extra_spot(base_spot, market.preemption_rate_per_replica_hour, prices, config)
        if extra:
            reasons.append(f"spot over-provisioned by {extra} for "
                           f"{market.preemption_rate_per_replica_hour:.2f} reclaims per "
                           f"replica-hour")
        spot_healthy = base_spot + extra + len(spot.stuck["on-demand"])
        spot_healthy = min(max(spot_healthy, pools.spot.min_replicas), spot_room)
    else:
        spot_healthy = min(pools.spot.min_replicas, spot_room)
        if not spot_cheaper and needed:
            reasons.append("spot is not cheaper than on-demand: on-demand only")
    if spot.trouble and needed > floor and spot_cheaper:
        reasons.append("spot cannot deliver (" + "; ".join(spot.trouble)
                       + "): on-demand covers, spot requests stay open")
    # Spot this plan asks for counts like young pending spot (unless spot is in trouble):
    # on-demand is not launched as well for a gap that spot is about to fill.
    spot_asks = 0 if spot.trouble else max(
        0, spot_healthy - spot_ready - len(fleet.pending["spot"]))
    credit_all = min(spot_ready + spot.credited_pending["spot"] + spot_asks, spot_healthy)
    credit_ready = min(spot_ready, spot_healthy)
    # The reclaim over-provisioning rides on spot only: while spot cannot deliver, on-demand
    # covers the gap replica for replica and no more. A reserve held on demand (2-3x the price,
    # for as long as spot stays scarce) bought little: a reclaimed replica serves on through
    # its notice, so a reclaim costs the fleet a fraction of a cold start.
    od_launch = max(floor, needed - credit_all) if needed else 0
    # On-demand is handed back only against spot that is ready, never against pending spot.
    od_keep = max(floor, needed - credit_ready) if needed else 0
    od_have = len(fleet.fresh["on-demand"]) + len(fleet.pending["on-demand"])
    od_healthy = max(od_launch, min(od_have, od_keep))
    if od_healthy > od_room and spot_cheaper:
        spot_healthy = min(spot_room, spot_healthy + od_healthy - od_room)
    od_healthy = min(max(od_healthy, pools.on_demand.min_replicas), od_room)
    od_ready = len(fleet.fresh["on-demand"])
    if od_healthy < od_ready and spot_ready and needed:
        reasons.append(f"spot ready again: handing back {od_ready - od_healthy} on-demand "
                       f"replica(s)")
    return {"spot": spot_healthy, "on-demand": od_healthy}


def _choose_drains(targets: dict[Pool, int], fleet: _Fleet, pools: Pools, config: PolicyConfig,
                   hold: bool, reasons: list[str]) -> tuple[dict[Pool, int], list[str]]:
    """Each pool's target counting its unknown replicas (which are never removed), bounded,
    and which replicas to drain where a pool shrinks: the cheapest losses first."""
    targets = dict(targets)
    remove: list[str] = []
    for pool in POOLS:
        bounds = pools.get(pool)
        members = len(fleet.fresh[pool]) + len(fleet.pending[pool]) + fleet.unknown[pool]
        if hold:
            # Most reports are missing: keep every pool as it is, neither removing replicas
            # that may be serving nor replacing ones that may be fine.
            t = max(bounds.desired, members)
            targets[pool] = min(max(t, bounds.min_replicas), bounds.max_replicas)
            continue
        t = targets[pool] + fleet.unknown[pool]
        t = min(max(t, bounds.min_replicas), bounds.max_replicas)
        if t < members:
            order = _removal_order(fleet, pool, config)
            chosen = order[:members - t]
            if len(chosen) < members - t:
                reasons.append(f"{pool}: {members - t - len(chosen)} replica(s) kept because "
                               f"only stale ones are left to remove")
                t = members - len(chosen)
            by_name = {r.replica: r for r in fleet.fresh[pool]}
            for name in chosen:
                r = by_name.get(name)
                what = ("pending launch" if r is None else
                        f"{'idle' if _is_idle(r, config) else f'load {r.load}'}, "
                        f"{r.prefix_blocks} prefix blocks")
                reasons.append(f"drain {pool} replica {name} ({what})")
            remove.extend(chosen)
        targets[pool] = t
    return targets, remove


def plan(signals: Signals, pools: Pools, prices: Prices, now: float,
         state: PolicyState | None = None, config: PolicyConfig | None = None,
         market: SpotMarket | None = None) -> PoolPlan:
    """Decide both pools' target counts and which replicas to drain, with a reason for each:
    classify the replicas, assess spot, size the fleet, apply hysteresis, split the pools,
    choose what to drain (the module docstring's steps, one function each)."""
    config = config or PolicyConfig()
    config.validate(pools)
    state = state or PolicyState()
    market = market or SpotMarket()
    reasons: list[str] = []
    started_at = state.started_at if state.started_at is not None else now
    seen = dict(state.pending_seen)
    fleet = _classify(signals, pools, config, now, seen)
    pending_seen = tuple((r.replica, seen.get(r.replica, now))
                         for pool in POOLS for r, _ in fleet.pending[pool])

    n_fresh = sum(len(fleet.fresh[p]) for p in POOLS)
    n_unknown = sum(fleet.unknown.values())
    load = (sum(r.load for p in POOLS for r in fleet.fresh[p]) + fleet.draining_load
            + signals.unassigned_waiting)
    hold = n_unknown > 0 and n_fresh < config.min_fresh_fraction * (n_fresh + n_unknown)
    if n_unknown:
        reasons.append(f"{n_unknown} ready replica(s) with stale or missing signals: not "
                       f"counted as capacity or idle")
    if hold:
        reasons.append(f"signals fresh for only {n_fresh} of {n_fresh + n_unknown} ready "
                       f"replicas: holding, no pool shrinks")

    spot = _assess_spot(fleet, state, market, config, now, started_at, reasons)
    need = _size(fleet, signals, state, config, now, load, n_unknown, spot.od_floor, reasons)
    step = _hysteresis(need, signals, state, market, config, now, started_at, n_fresh,
                       spot.credited_pending, hold, reasons)
    targets = _split_pools(step.needed, fleet, spot, pools, prices, market, config, reasons)
    targets, remove = _choose_drains(targets, fleet, pools, config, hold, reasons)
    if not reasons:
        reasons.append(f"steady: load {load} over {step.prev} replica(s), target "
                       f"{config.target_load_per_replica:g} each")
    next_state = replace(
        state, started_at=started_at, needed=step.needed, last_scale_up_at=step.last_up,
        rate_at_scale_out=step.rate_at_up, last_load=load,
        last_scale_down_at=step.last_down, recommendations=step.recommendations,
        idle_since=need.idle_since, pending_seen=pending_seen,
        last_reclaim_at=spot.last_reclaim_at, reclaim_seen_at=step.reclaim,
        refill_at=step.refill_at)
    return PoolPlan(spot=targets["spot"], on_demand=targets["on-demand"], remove=remove,
                    reasons=reasons, state=next_state)
