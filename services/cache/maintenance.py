"""The cache's background work: flushing pending writes on a timer and sweeping expired entries.

Milvus does not enforce TTL at query time on either backend, so expired rows would pile up
forever; lookups already ignore them (``expires_at > now``), so sweeping is about space and the
entry count, never correctness, and a sweep that fails is simply retried on the next tick. The
entries gauge is refreshed after each sweep.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from services.cache.metrics import ENTRIES, EXPIRED_SWEPT
from services.cache.milvus import CacheUnavailable
from services.cache.semantic import SemanticCache
from spotmesh.runtime import cancel_and_wait, fields

log = logging.getLogger("spotmesh.cache")

# How often to ask the cache whether a flush or sweep is due (it keeps the schedule itself).
TICK_SECONDS = 1.0


class Maintenance:
    """Runs :meth:`SemanticCache.maintain` every tick on the caller's Milvus thread pool."""

    def __init__(self, cache: SemanticCache,
                 run_blocking: Callable[..., Awaitable[Any]], tick_seconds: float = TICK_SECONDS
                 ) -> None:
        self.cache = cache
        self._run = run_blocking
        self.tick_seconds = tick_seconds
        self._task: asyncio.Task | None = None
        self._failing_since: float | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="cache-maintenance")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None

    async def refresh_entries(self) -> None:
        ENTRIES.set(await self._run(self.cache.count))

    async def _loop(self) -> None:
        try:
            await self.refresh_entries()
        except CacheUnavailable as exc:
            self._failed(exc)
        while True:
            await asyncio.sleep(self.tick_seconds)
            await self.tick()

    async def tick(self) -> None:
        """One round: flush and/or sweep if due, refresh the entries gauge after a sweep."""
        try:
            flushed, swept = await self._run(self.cache.maintain)
            if swept is not None:
                EXPIRED_SWEPT.inc(swept)
                await self.refresh_entries()
                if swept:
                    log.info("swept expired entries", extra=fields(swept=swept))
            if self._failing_since is not None and (flushed or swept is not None):
                log.info("Milvus is back", extra=fields(
                    after_seconds=round(time.monotonic() - self._failing_since, 1)))
                self._failing_since = None
        except CacheUnavailable as exc:
            self._failed(exc)

    def _failed(self, exc: CacheUnavailable) -> None:
        # One line per outage, not one per tick.
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            log.warning("cache maintenance failed; retrying every tick",
                        extra=fields(error=str(exc)))
