"""The simulated fleet: a discrete-event simulation of a gateway queue, replicas that prefill and
decode as a profile says, spot capacity that comes and goes, and the bill."""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from cli.simulate.profile import ReplicaProfile
from cli.simulate.traces import Arrival
from services.autoscaler.policy import PoolPlan
from services.autoscaler.signals import Pool, Prices

WAITING, BOOTING, READY, DRAINING, RECLAIMED, GONE = range(6)
_PREFILL_DONE, _DECODE_DONE, _READY, _NOTICE_END, _TICK, _CONTROL = range(6)


class Request:
    __slots__ = (
        "arrival",
        "ctx",
        "finish_v",
        "first_token",
        "measured",
        "output",
        "prompt",
        "remaining",
        "resumed",
        "vstart",
    )

    def __init__(self, a: Arrival, measured: bool) -> None:
        self.arrival, self.prompt, self.output = a.t, a.prompt, a.output
        self.ctx = a.prompt  # tokens to prefill before decoding (re)starts
        self.remaining = a.output - 1  # tokens to decode after the first
        self.first_token: float | None = None
        self.finish_v = 0.0
        self.vstart = 0.0
        self.measured = measured
        self.resumed = 0


class Replica:
    """One simulated inference replica and its engine state."""

    __slots__ = (
        "acquired_at",
        "admit_until",
        "busy_acc",
        "busy_since",
        "dec_version",
        "decoding",
        "ended_at",
        "kv_ctx",
        "last",
        "launched_at",
        "name",
        "pool",
        "prefill_end",
        "prefill_q",
        "prefill_q_tokens",
        "prefilling",
        "state",
        "v",
        "vstart_sum",
    )

    def __init__(self, name: str, pool: Pool, now: float) -> None:
        self.name, self.pool = name, pool
        self.state = WAITING
        self.launched_at = now
        self.acquired_at: float | None = None
        self.admit_until = -math.inf  # a reclaimed replica still takes requests before this
        self.ended_at: float | None = None
        self.prefill_q: deque[Request] = deque()
        self.prefill_q_tokens = 0
        self.prefilling: Request | None = None
        self.prefill_end = 0.0
        self.decoding: list[tuple[float, int, Request]] = []
        self.v = 0.0
        self.last = now
        self.dec_version = 0
        self.kv_ctx = 0
        self.vstart_sum = 0.0
        self.busy_acc = 0.0
        self.busy_since: float | None = None

    @property
    def held(self) -> int:
        return len(self.prefill_q) + (self.prefilling is not None) + len(self.decoding)

    @property
    def pending(self) -> bool:
        return self.state in (WAITING, BOOTING)


@dataclass
class FleetView:
    """What a policy sees at a decision: the same for every policy."""

    now: float
    replicas: list[Replica]
    queue: int
    arrivals_last_minute: int
    arrival_rate_rps: float  # over the last minute, or since the start if shorter
    last_preemption_at: float | None
    preemption_rate: float
    desired: dict[Pool, int]
    busy_fraction: dict[str, float]
    kv_usage: dict[str, float]


class SimPolicy(Protocol):
    name: str

    def decide(self, view: FleetView) -> PoolPlan: ...


@dataclass
class WindowResult:
    cost_usd: float = 0.0
    replica_seconds: dict[str, float] = field(default_factory=lambda: {"spot": 0.0,
                                                                       "on-demand": 0.0})
    arrived: int = 0
    requests: int = 0
    slo_met: int = 0
    unfinished: int = 0
    ttft: list[float] = field(default_factory=list)
    queue_wait: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    preemptions: int = 0
    resumed: int = 0
    launches: dict[str, int] = field(default_factory=lambda: {"spot": 0, "on-demand": 0})
    timeline: list[tuple[float, int, int, int, int, int, int]] = field(default_factory=list)
    ttft_by_arrival: list[tuple[float, float]] = field(default_factory=list)
    events: int = 0


class Simulation:
    """One policy over one window: [-warmup, duration) simulated, [0, duration) measured."""

    def __init__(self, policy: SimPolicy, arrivals: list[Arrival], capacity_at: Callable[
                 [float], int], tick_seconds: float, profile: ReplicaProfile, prices: Prices,
                 duration: float, warmup: float, interval: float, notice: float, slo: float,
                 progress: Callable[[str], None] | None = None,
                 drain_admit: float = 0.0) -> None:
        self.policy, self.arrivals, self.capacity_at = policy, arrivals, capacity_at
        self.tick_seconds, self.profile, self.prices = tick_seconds, profile, prices
        self.duration, self.warmup, self.interval = duration, warmup, interval
        self.notice, self.slo, self.progress = notice, slo, progress
        self.drain_admit = min(drain_admit, notice)
        self.rate = [0.0] + [profile.throughput(n) / n
                             for n in range(1, profile.max_concurrency + 1)]
        self.heap: list[tuple[float, int, int, Replica | None, int]] = []
        self.seq = itertools.count()
        self.replicas: list[Replica] = []
        self.all_replicas: list[Replica] = []
        self.queue: deque[Request] = deque()
        self.recent: deque[float] = deque()
        self.desired: dict[Pool, int] = {"spot": 0, "on-demand": 0}
        self.names = itertools.count()
        self.last_preemption_at: float | None = None
        self.preempted_total = 0
        self.spot_seconds_held = 0.0
        self.busy_mark: dict[str, float] = {}
        self.open = 0  # measured requests not yet complete
        self.result = WindowResult()

    # -- events ------------------------------------------------------------------------------

    def _push(self, t: float, kind: int, rep: Replica | None = None, version: int = 0) -> None:
        heapq.heappush(self.heap, (t, next(self.seq), kind, rep, version))

    def run(self) -> WindowResult:
        start = -self.warmup
        self._push(start, _TICK)
        self._push(start, _CONTROL)
        arrivals, n_arr, i = self.arrivals, len(self.arrivals), 0
        stop_at = self.duration + 1800.0
        next_report = 0.25
        heap = self.heap
        while heap:
            t_arr = arrivals[i].t if i < n_arr else math.inf
            if t_arr < heap[0][0]:
                now = t_arr
                self._arrive(Request(arrivals[i], 0.0 <= t_arr < self.duration), now)
                i += 1
            else:
                now, _, kind, rep, version = heapq.heappop(heap)
                if now >= self.duration and i >= n_arr and (self.open == 0 or now > stop_at):
                    break
                self._event(now, kind, rep, version)
            self.result.events += 1
            if self.progress and now >= next_report * self.duration:
                self.progress(f"{next_report:.0%}")
                next_report += 0.25
        self._finish(now)
        return self.result

    def _event(self, now: float, kind: int, rep: Replica | None, version: int) -> None:
        if kind == _DECODE_DONE:
            assert rep is not None
            if version == rep.dec_version and rep.state != GONE:
                self._decode_done(rep, now)
        elif kind == _PREFILL_DONE:
            assert rep is not None
            if rep.state != GONE and rep.prefilling is not None and version == rep.dec_version:
                self._prefill_done(rep, now)
        elif kind == _READY:
            assert rep is not None
            if rep.state == BOOTING:
                rep.state = READY
                self._dispatch(now)
        elif kind == _NOTICE_END:
            assert rep is not None
            if rep.state == RECLAIMED:
                self._terminate(rep, now, resume=True)
        elif kind == _TICK:
            self._tick(now)
            if now < self.duration:
                self._push(now + self.tick_seconds, _TICK)
        elif kind == _CONTROL:
            self._control(now)
            self._push(now + self.interval, _CONTROL)

    # -- requests ----------------------------------------------------------------------------

    def _arrive(self, req: Request, now: float) -> None:
        self.recent.append(now)
        if req.measured:
            self.open += 1
            self.result.arrived += 1
        self.queue.append(req)
        self._dispatch(now)

    def _best(self, now: float) -> Replica | None:
        best, best_key = None, None
        cap = self.profile.max_concurrency
        prefill = self.profile.prefill_tokens_per_s
        for rep in self.replicas:
            if rep.held >= cap or (rep.state != READY and not (
                    rep.state == RECLAIMED and now < rep.admit_until)):
                continue
            backlog = 0.0
            if prefill:
                backlog = rep.prefill_q_tokens / prefill + (
                    rep.prefill_end - now if rep.prefilling is not None else 0.0)
            key = (backlog, rep.held, rep.name)
            if best_key is None or key < best_key:
                best, best_key = rep, key
        return best

    def _dispatch(self, now: float) -> None:
        while self.queue:
            rep = self._best(now)
            if rep is None:
                return
            req = self.queue.popleft()
            if req.measured and req.resumed == 0:
                self.result.queue_wait.append(now - req.arrival)
            self._admit(rep, req, now)

    def _advance(self, rep: Replica, now: float) -> None:
        if rep.prefilling is None and rep.decoding:
            rep.v += self.rate[len(rep.decoding)] * (now - rep.last)
        rep.last = now

    def _set_busy(self, rep: Replica, now: float) -> None:
        busy = rep.prefilling is not None or bool(rep.decoding)
        if busy and rep.busy_since is None:
            rep.busy_since = now
        elif not busy and rep.busy_since is not None:
            rep.busy_acc += now - rep.busy_since
            rep.busy_since = None

    def _schedule(self, rep: Replica, now: float) -> None:
        """Queue the replica's next engine event: the end of the next prefill if one is
        waiting, else the next decode completion."""
        rep.dec_version += 1
        if rep.prefilling is None and rep.prefill_q:
            req = rep.prefill_q.popleft()
            rep.prefill_q_tokens -= req.ctx
            rep.prefilling = req
            rep.prefill_end = now + req.ctx / (self.profile.prefill_tokens_per_s or math.inf)
            self._push(rep.prefill_end, _PREFILL_DONE, rep, rep.dec_version)
        elif rep.prefilling is not None:
            self._push(rep.prefill_end, _PREFILL_DONE, rep, rep.dec_version)
        elif rep.decoding:
            dt = (rep.decoding[0][0] - rep.v) / self.rate[len(rep.decoding)]
            self._push(now + max(0.0, dt), _DECODE_DONE, rep, rep.dec_version)
        self._set_busy(rep, now)

    def _admit(self, rep: Replica, req: Request, now: float) -> None:
        self._advance(rep, now)
        if self.profile.prefill_tokens_per_s is None:
            self._start_decoding(rep, req, now)
        else:
            rep.prefill_q.append(req)
            rep.prefill_q_tokens += req.ctx
        self._schedule(rep, now)

    def _start_decoding(self, rep: Replica, req: Request, now: float) -> None:
        if req.first_token is None:
            req.first_token = now
            if req.measured:
                ttft = now - req.arrival
                self.result.ttft.append(ttft)
                self.result.ttft_by_arrival.append((req.arrival, ttft))
                if ttft <= self.slo:
                    self.result.slo_met += 1
        if req.remaining <= 0:
            self._complete(req)
            return
        req.vstart = rep.v
        req.finish_v = rep.v + req.remaining
        rep.kv_ctx += req.ctx
        rep.vstart_sum += rep.v
        heapq.heappush(rep.decoding, (req.finish_v, next(self.seq), req))

    def _prefill_done(self, rep: Replica, now: float) -> None:
        req = rep.prefilling
        assert req is not None
        rep.prefilling = None
        rep.last = now  # decoding was stalled during the prefill
        self._start_decoding(rep, req, now)
        self._schedule(rep, now)
        self._after_free(rep, now)

    def _decode_done(self, rep: Replica, now: float) -> None:
        self._advance(rep, now)
        while rep.decoding and rep.decoding[0][0] <= rep.v + 1e-6:
            _, _, req = heapq.heappop(rep.decoding)
            rep.kv_ctx -= req.ctx
            rep.vstart_sum -= req.vstart
            self._complete(req)
        self._schedule(rep, now)
        self._after_free(rep, now)

    def _after_free(self, rep: Replica, now: float) -> None:
        if rep.state in (DRAINING, RECLAIMED) and rep.held == 0 and not now < rep.admit_until:
            self._terminate(rep, now, resume=False)
        else:
            self._dispatch(now)

    def _complete(self, req: Request) -> None:
        if req.measured:
            self.result.requests += 1
            self.result.prompt_tokens += req.prompt
            self.result.output_tokens += req.output
            self.open -= 1

    # -- the fleet ---------------------------------------------------------------------------

    def _launch(self, pool: Pool, now: float) -> None:
        rep = Replica(f"{'s' if pool == 'spot' else 'od'}{next(self.names)}", pool, now)
        self.replicas.append(rep)
        self.all_replicas.append(rep)
        if now >= 0:
            self.result.launches[pool] += 1
        if pool == "on-demand":
            self._boot(rep, now)
        else:
            self._acquire_spot(now)

    def _boot(self, rep: Replica, now: float) -> None:
        rep.state = BOOTING
        rep.acquired_at = now
        self._push(now + self.profile.startup_seconds, _READY, rep)

    def _spot_alive(self) -> list[Replica]:
        return [r for r in self.replicas
                if r.pool == "spot" and r.state in (BOOTING, READY, DRAINING)]

    def _acquire_spot(self, now: float) -> None:
        room = self.capacity_at(now) - len(self._spot_alive())
        for rep in self.replicas:
            if room <= 0:
                break
            if rep.pool == "spot" and rep.state == WAITING:
                self._boot(rep, now)
                room -= 1

    def _terminate(self, rep: Replica, now: float, resume: bool) -> None:
        if rep.state == GONE:
            return
        self._advance(rep, now)
        if resume:
            moved: list[Request] = []
            if rep.prefilling is not None:
                moved.append(rep.prefilling)
            moved.extend(rep.prefill_q)
            for finish_v, _, req in sorted(rep.decoding, key=lambda d: d[2].arrival):
                # Resume elsewhere: re-prefill the prompt and what was already sent.
                done = max(0.0, rep.v - req.vstart)
                req.remaining = max(0, round(finish_v - rep.v))
                req.ctx = req.prompt + 1 + int(done)
                moved.append(req)
            for req in moved:
                req.resumed += 1
                if req.arrival >= 0:
                    self.result.resumed += 1
            self.queue.extendleft(reversed(sorted(moved, key=lambda r: r.arrival)))
        rep.prefilling = None
        rep.prefill_q.clear()
        rep.prefill_q_tokens = 0
        rep.decoding.clear()
        rep.kv_ctx, rep.vstart_sum = 0, 0.0
        rep.dec_version += 1
        self._set_busy(rep, now)
        rep.state = GONE
        rep.ended_at = now
        self.replicas.remove(rep)
        if rep.pool == "spot":
            self._acquire_spot(now)
        self._dispatch(now)

    def _remove(self, rep: Replica, now: float) -> None:
        if rep.state == WAITING:
            rep.state = GONE
            rep.ended_at = now
            self.replicas.remove(rep)
        elif rep.state == BOOTING:
            self._terminate(rep, now, resume=False)
        elif rep.state == READY:
            rep.state = DRAINING
            if rep.held == 0:
                self._terminate(rep, now, resume=False)

    def _tick(self, now: float) -> None:
        cap = self.capacity_at(now)
        alive = self._spot_alive()
        if len(alive) > cap:
            victims = sorted(alive, key=lambda r: (r.state != DRAINING, r.state != BOOTING,
                                                   -(r.acquired_at or 0.0), r.name))
            for rep in victims[:len(alive) - cap]:
                if rep.state == READY and self.drain_admit > 0:
                    # Serves on through the notice; a replica being drained or still booting
                    # has nothing to offer.
                    rep.admit_until = now + self.drain_admit
                rep.state = RECLAIMED
                self.last_preemption_at = now
                self.preempted_total += 1
                if 0 <= now < self.duration:
                    self.result.preemptions += 1
                if rep.held == 0 and not now < rep.admit_until:
                    self._terminate(rep, now, resume=False)
                else:
                    self._push(now + self.notice, _NOTICE_END, rep)
        self._acquire_spot(now)

    def _control(self, now: float) -> None:
        while self.recent and self.recent[0] < now - 60.0:
            self.recent.popleft()
        busy: dict[str, float] = {}
        kv: dict[str, float] = {}
        cap_tokens = self.profile.kv_capacity_tokens
        for rep in self.replicas:
            acc = rep.busy_acc + (now - rep.busy_since if rep.busy_since is not None else 0.0)
            busy[rep.name] = min(1.0, max(0.0, (acc - self.busy_mark.get(rep.name, 0.0))
                                          / self.interval))
            self.busy_mark[rep.name] = acc
            if cap_tokens:
                self._advance(rep, now)
                used = (rep.kv_ctx + len(rep.decoding) * rep.v - rep.vstart_sum
                        + (rep.prefilling.ctx if rep.prefilling is not None else 0))
                kv[rep.name] = min(1.0, max(0.0, used / cap_tokens))
            else:
                kv[rep.name] = min(1.0, rep.held / self.profile.max_concurrency)
        spot_hours = self.spot_seconds_held / 3600.0
        view = FleetView(
            now=now, replicas=list(self.replicas), queue=len(self.queue),
            arrivals_last_minute=len(self.recent),
            arrival_rate_rps=len(self.recent) / max(self.interval,
                                                    min(60.0, now + self.warmup)),
            last_preemption_at=self.last_preemption_at,
            preemption_rate=self.preempted_total / max(1.0, spot_hours),
            desired=dict(self.desired), busy_fraction=busy, kv_usage=kv)
        self.spot_seconds_held += self.interval * len(self._spot_alive())
        decision = self.policy.decide(view)
        self._apply(decision, now)
        if now >= 0 and now < self.duration:
            ready = {p: sum(1 for r in self.replicas if r.pool == p and r.state == READY)
                     for p in ("spot", "on-demand")}
            pend = {p: sum(1 for r in self.replicas if r.pool == p and r.pending)
                    for p in ("spot", "on-demand")}
            self.result.timeline.append((now, len(self.recent), ready["spot"],
                                         ready["on-demand"], pend["spot"], pend["on-demand"],
                                         self.capacity_at(now)))

    def _apply(self, d: PoolPlan, now: float) -> None:
        named = set(d.remove)
        for pool, target in (("spot", d.spot), ("on-demand", d.on_demand)):
            target = max(0, int(target))
            self.desired[pool] = target
            members = [r for r in self.replicas
                       if r.pool == pool and r.state in (WAITING, BOOTING, READY)]
            if target > len(members):
                for _ in range(target - len(members)):
                    self._launch(pool, now)
            elif target < len(members):
                k = len(members) - target
                chosen = [r for r in members if r.name in named][:k]
                rest = sorted((r for r in members if r not in chosen),
                              key=lambda r: (r.state, -r.launched_at if r.pending else 0.0,
                                             r.held, r.name))
                for rep in chosen + rest[:k - len(chosen)]:
                    self._remove(rep, now)

    def _finish(self, end: float) -> None:
        res = self.result
        res.unfinished = self.open
        price = {"spot": self.prices.spot_usd_per_hour,
                 "on-demand": self.prices.on_demand_usd_per_hour}
        for rep in self.all_replicas:
            if rep.acquired_at is None:
                continue
            stop = rep.ended_at if rep.ended_at is not None else end
            billed = max(0.0, min(stop, self.duration) - max(rep.acquired_at, 0.0))
            res.replica_seconds[rep.pool] += billed
            res.cost_usd += billed * price[rep.pool] / 3600.0


