"""Who pays for a replica's time when many requests share it.

Under continuous batching a replica serves all its running requests at once, so charging each
request its wall time would bill the same GPU-second many times. Instead every second is split
evenly among the requests in flight during it (processor sharing): the virtual clock advances by
``dt / n`` while ``n`` requests are in flight, and a request's share is the clock's advance
between its start and its end. The shares add up exactly to the replica's busy time.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class TimeShare:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._virtual = 0.0
        self._active = 0
        self._last = clock()
        self.busy_seconds = 0.0  # wall time with at least one request in flight

    def _advance(self) -> None:
        now = self._clock()
        if self._active:
            self._virtual += (now - self._last) / self._active
            self.busy_seconds += now - self._last
        self._last = now

    def enter(self) -> float:
        """A request starts; returns the token to pass to :meth:`leave`."""
        self._advance()
        self._active += 1
        return self._virtual

    def leave(self, token: float) -> float:
        """The request ended; returns its share of the replica's time in seconds."""
        self._advance()
        self._active -= 1
        return self._virtual - token
