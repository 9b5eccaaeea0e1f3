"""A replica's drain lifecycle: which streams it holds, and how it lets them go.

A drain (SIGTERM, a ``Drain`` call, a spot reclaim notice) may first keep admitting for
``admit_seconds`` (a reclaim notice: capacity is short until the replacement is up), then stops
admitting, lets in-flight streams finish within the grace period (counted from the drain's
start), and evicts what is left: the engine aborts those requests and their callers get
UNAVAILABLE, so the gateway resumes them on another replica. The first drain's terms hold; a
second one joins it. No gRPC here: the servicer maps what this says to status codes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from prometheus_client import Gauge

from spotmesh.runtime import fields

log = logging.getLogger("spotmesh.inference")

DRAINING = Gauge("spotmesh_inference_draining", "1 once the replica stopped admitting work.")
ADMITTING_UNTIL = Gauge("spotmesh_inference_drain_admit_until_seconds",
                        "Unix time until which an announced drain still admits work (a reclaim "
                        "notice); 0 when none is under way.")


class DrainLifecycle:
    def __init__(self, abort: Callable[[str], Awaitable[None]], *, grace_seconds: float,
                 replica: str = "", on_draining: Callable[[], Awaitable[None]] | None = None
                 ) -> None:
        self._abort = abort  # the engine's abort of one request id
        self.grace_seconds = grace_seconds
        self.replica = replica  # for logs
        self._on_draining = on_draining  # e.g. health turns NOT_SERVING
        self.draining = False  # no longer admitting
        self.in_flight: set[str] = set()
        self._evicted: set[str] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self.task: asyncio.Task | None = None  # the drain under way

    def enter(self, request_id: str) -> None:
        """A stream was admitted."""
        self.in_flight.add(request_id)
        self._idle.clear()

    def leave(self, request_id: str) -> None:
        """A stream ended, however it ended."""
        self.in_flight.discard(request_id)
        self._evicted.discard(request_id)
        if not self.in_flight:
            self._idle.set()

    def evicted(self, request_id: str) -> bool:
        """Whether the stream was aborted because the grace period ran out."""
        return request_id in self._evicted

    def start(self, grace_seconds: float | None = None, admit_seconds: float = 0.0
              ) -> asyncio.Task:
        """Begin draining (idempotent: the first call's terms hold). ``admit_seconds`` is
        clamped into [0, grace] for callers that did not check it (the SIGTERM path)."""
        if self.task is None:
            grace = self.grace_seconds if grace_seconds is None else grace_seconds
            admit = min(max(0.0, admit_seconds), grace)
            self.task = asyncio.create_task(self._drain(grace, admit))
        return self.task

    async def _drain(self, grace: float, admit: float) -> None:
        if admit > 0:
            # A reclaim notice: capacity is short until the replacement is up, so this replica
            # serves on; streams it cannot finish in time resume elsewhere.
            ADMITTING_UNTIL.set(time.time() + admit)
            log.info("drain announced; admitting meanwhile",
                     extra=fields(replica=self.replica, admit_seconds=admit,
                                  grace_seconds=grace))
            await asyncio.sleep(admit)
            ADMITTING_UNTIL.set(0)
            grace -= admit
        self.draining = True
        DRAINING.set(1)
        if self._on_draining is not None:
            await self._on_draining()
        log.info("draining", extra=fields(replica=self.replica, in_flight=len(self.in_flight),
                                          grace_seconds=grace))
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=grace)
        except TimeoutError:
            left = list(self.in_flight)
            log.warning("grace period over; evicting streams",
                        extra=fields(replica=self.replica, evicted=len(left)))
            self._evicted.update(left)
            for rid in left:
                await self._abort(rid)
            await self._idle.wait()
