"""A replica's drain lifecycle without an engine or a server: admission during a reclaim
notice, streams that finish in the grace period, eviction of the rest, and idempotence."""

from __future__ import annotations

import asyncio

from services.inference.drain import DrainLifecycle


class Engine:
    def __init__(self) -> None:
        self.aborted: list[str] = []
        self.lifecycle: DrainLifecycle | None = None

    async def abort(self, request_id: str) -> None:
        # As the engine does: the aborted stream ends, and the servicer lets it go.
        self.aborted.append(request_id)
        assert self.lifecycle is not None
        self.lifecycle.leave(request_id)


def lifecycle(grace: float = 1.0) -> tuple[DrainLifecycle, Engine, list[str]]:
    engine, events = Engine(), []

    async def on_draining() -> None:
        events.append("not serving")

    d = DrainLifecycle(engine.abort, grace_seconds=grace, replica="r", on_draining=on_draining)
    engine.lifecycle = d
    return d, engine, events


def test_streams_that_finish_within_the_grace_are_not_evicted():
    async def run():
        d, engine, events = lifecycle(grace=5.0)
        d.enter("a")
        task = d.start()
        await asyncio.sleep(0.01)
        assert d.draining and events == ["not serving"]
        d.leave("a")
        await asyncio.wait_for(task, 1.0)
        return engine.aborted, d.in_flight

    assert asyncio.run(run()) == ([], set())


def test_what_is_still_running_when_the_grace_ends_is_evicted():
    async def run():
        d, engine, _ = lifecycle(grace=0.05)
        d.enter("slow")
        d.enter("slower")
        await asyncio.wait_for(d.start(), 1.0)
        return engine.aborted, d.in_flight

    aborted, left = asyncio.run(run())
    assert sorted(aborted) == ["slow", "slower"] and left == set()


def test_an_evicted_stream_is_known_as_evicted_until_it_leaves():
    async def run():
        engine = Engine()
        d = DrainLifecycle(lambda rid: asyncio.sleep(0), grace_seconds=0.01)
        engine.lifecycle = d
        d.enter("x")
        task = d.start()
        await asyncio.sleep(0.05)
        seen = d.evicted("x")
        d.leave("x")
        await asyncio.wait_for(task, 1.0)
        return seen, d.evicted("x")

    assert asyncio.run(run()) == (True, False)


def test_a_reclaim_notice_admits_for_admit_seconds_then_drains():
    async def run():
        d, _, events = lifecycle(grace=1.0)
        task = d.start(grace_seconds=1.0, admit_seconds=0.1)
        await asyncio.sleep(0.02)
        admitting = not d.draining and events == []
        await asyncio.sleep(0.15)
        drained = d.draining and events == ["not serving"]
        await asyncio.wait_for(task, 2.0)
        return admitting, drained

    assert asyncio.run(run()) == (True, True)


def test_the_first_drain_terms_hold_and_admit_is_clamped_to_the_grace():
    async def run():
        d, _, _ = lifecycle(grace=1.0)
        first = d.start(grace_seconds=0.05, admit_seconds=10.0)  # admit clamped to 0.05
        assert d.start(grace_seconds=30.0) is first
        await asyncio.wait_for(first, 1.0)
        return d.draining

    assert asyncio.run(run()) is True
