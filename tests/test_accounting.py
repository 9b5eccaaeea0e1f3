"""Processor-sharing accounting: each second of a busy replica is billed once, split evenly among
the requests running in it, and idle time is billed to nobody."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.inference.accounting import TimeShare


class FakeClock:
    """Time starts at an arbitrary monotonic reading; tests speak in seconds since then."""

    def __init__(self, start: float = 1000.0) -> None:
        self.start = self.now = start

    def __call__(self) -> float:
        return self.now

    def at(self, t: float) -> None:
        assert self.start + t >= self.now, "the fake clock only moves forward"
        self.now = self.start + t


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def share(clock: FakeClock) -> TimeShare:
    return TimeShare(clock)


def test_lone_request_gets_its_whole_wall_time(clock, share) -> None:
    clock.at(2.0)
    token = share.enter()
    clock.at(7.5)
    assert share.leave(token) == pytest.approx(5.5)
    assert share.busy_seconds == pytest.approx(5.5)


def test_fully_overlapping_requests_get_half_each(clock, share) -> None:
    a, b = share.enter(), share.enter()
    clock.at(10.0)
    assert share.leave(a) == pytest.approx(5.0)
    assert share.leave(b) == pytest.approx(5.0)
    assert share.busy_seconds == pytest.approx(10.0)


def test_staggered_requests_split_only_the_overlap(clock, share) -> None:
    a = share.enter()          # alone 0-4, shared 4-10
    clock.at(4.0)
    b = share.enter()          # shared 4-10, alone 10-14
    clock.at(10.0)
    share_a = share.leave(a)
    clock.at(14.0)
    share_b = share.leave(b)
    assert share_a == pytest.approx(4.0 + 6.0 / 2)
    assert share_b == pytest.approx(6.0 / 2 + 4.0)
    assert share_a + share_b == pytest.approx(share.busy_seconds)
    assert share.busy_seconds == pytest.approx(14.0)


def test_time_shares_add_up_to_busy_time(clock, share) -> None:
    a = share.enter()
    clock.at(1.0)
    b = share.enter()
    clock.at(2.0)
    c = share.enter()
    clock.at(5.0)
    shares = [share.leave(b)]
    clock.at(6.0)
    shares.append(share.leave(a))
    clock.at(9.0)
    shares.append(share.leave(c))
    # a: 1 + 1/2 + 3/3 + 1/2 = 3; b: 1/2 + 3/3 = 1.5; c: 3/3 + 1/2 + 3 = 4.5
    assert shares == pytest.approx([1.5, 3.0, 4.5])
    assert sum(shares) == pytest.approx(share.busy_seconds)
    assert share.busy_seconds == pytest.approx(9.0)


def test_idle_gaps_are_not_billed(clock, share) -> None:
    clock.at(1.0)
    a = share.enter()
    clock.at(3.0)
    first = share.leave(a)
    clock.at(100.0)  # idle for 97 s
    b = share.enter()
    clock.at(103.0)
    second = share.leave(b)
    assert (first, second) == (pytest.approx(2.0), pytest.approx(3.0))
    assert share.busy_seconds == pytest.approx(5.0)


def test_time_before_the_first_request_is_not_billed(clock) -> None:
    share = TimeShare(clock)  # created at t=0, first request at t=50
    clock.at(50.0)
    token = share.enter()
    clock.at(51.0)
    assert share.leave(token) == pytest.approx(1.0)
    assert share.busy_seconds == pytest.approx(1.0)


def test_instant_request_costs_nothing(clock, share) -> None:
    clock.at(3.0)
    assert share.leave(share.enter()) == 0.0
    assert share.busy_seconds == 0.0


# A schedule: per request, (start, duration) on a grid of whole seconds, so the expected busy
# time (the length of the union of the intervals) is exact.
schedules = st.lists(st.tuples(st.integers(0, 50), st.integers(0, 20)), min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(schedules)
def test_any_schedule_bills_busy_time_exactly_once(schedule) -> None:
    clock = FakeClock()
    share = TimeShare(clock)
    # At equal times enters go first: a zero-length request then runs for zero seconds, and a
    # request starting as another ends shares zero seconds with it.
    events = sorted(
        [(start, 0, i) for i, (start, _) in enumerate(schedule)]
        + [(start + duration, 1, i) for i, (start, duration) in enumerate(schedule)]
    )
    tokens: dict[int, float] = {}
    shares: dict[int, float] = {}
    for t, kind, i in events:
        clock.at(t)
        if kind == 0:
            tokens[i] = share.enter()
        else:
            shares[i] = share.leave(tokens.pop(i))
    assert not tokens

    busy = set()
    for start, duration in schedule:
        busy.update(range(start, start + duration))  # unit seconds covered
    assert share.busy_seconds == pytest.approx(len(busy))
    assert sum(shares.values()) == pytest.approx(share.busy_seconds)
    for i, (_, duration) in enumerate(schedule):
        # Never more than its own wall time, never negative.
        assert -1e-9 <= shares[i] <= duration + 1e-9
