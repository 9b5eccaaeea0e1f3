"""The pod watch that feeds the preemption ledger, on a thread of its own (the client blocks)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from services.autoscaler.kubernetes.api import (
    POOL_SELECTOR,
    WATCH_MAX_BACKOFF_SECONDS,
    WATCH_READ_TIMEOUT_SECONDS,
    WATCH_SECONDS,
    ApiException,
    Watch,
    _status_detail,
)
from services.autoscaler.kubernetes.pods import PodFacts, _pool_of
from services.autoscaler.kubernetes.preemptions import PreemptionLedger
from spotmesh.runtime import fields

log = logging.getLogger("spotmesh.autoscaler")


class PodWatcher:
    """Follows the pools' pods on a daemon thread (the client's watch blocks) and feeds the
    spot pods to the ledger: list, watch from the list's resourceVersion, resume from the last
    one seen when the server ends the watch, relist after 410 Gone or an error."""

    def __init__(self, core: Any, namespace: str, ledger: PreemptionLedger,
                 clock: Callable[[], float], connect_timeout: float) -> None:
        self.core = core
        self.namespace = namespace
        self.ledger = ledger
        self.clock = clock
        self.connect_timeout = connect_timeout
        self.events = 0  # watch events handled, of any pod (tests wait on it)
        self._stop = threading.Event()
        self._watch: Any = None
        self._thread: threading.Thread | None = None

    def start(self, resource_version: str | None) -> None:
        self._thread = threading.Thread(target=self._run, args=(resource_version,),
                                        name="spotmesh-pod-watch", daemon=True)
        self._thread.start()

    async def stop(self, grace_seconds: float = 5.0) -> None:
        """Ends the watch: shutting its socket down unblocks the read at once. Repeated,
        because a stop that lands between two watch requests would otherwise be lost."""
        self._stop.set()
        thread = self._thread
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_seconds
        while thread is not None and thread.is_alive() and loop.time() < deadline:
            if self._watch is not None:
                self._watch.stop()
            await asyncio.sleep(0.02)
        if thread is not None and thread.is_alive():
            log.warning("pod watch did not stop in time; left to exit with the process")

    def _run(self, resource_version: str | None) -> None:
        delay = 0.0
        while not self._stop.is_set():
            if delay and self._stop.wait(delay):
                break
            try:
                if resource_version is None:
                    resource_version = self._relist()
                seen = self.events
                resource_version = self._follow(resource_version)
                # A watch that ends with nothing in it is resumed after a pause, so a proxy that
                # cuts watches short cannot make this loop spin.
                delay = 0.0 if self.events > seen else min(WATCH_MAX_BACKOFF_SECONDS,
                                                           max(1.0, 2 * delay))
            except ApiException as exc:
                if self._stop.is_set():
                    break
                resource_version = None
                if exc.status != 410:  # 410 Gone: our resourceVersion expired; relist now
                    log.warning("pod watch failed; relisting", extra=fields(
                        namespace=self.namespace, status=exc.status, error=_status_detail(exc)))
                    delay = min(WATCH_MAX_BACKOFF_SECONDS, max(1.0, 2 * delay))
            except Exception as exc:  # transport errors, an object the client cannot parse
                if self._stop.is_set():
                    break
                log.warning("pod watch failed; relisting", extra=fields(
                    namespace=self.namespace, error=repr(exc)))
                resource_version = None
                delay = min(WATCH_MAX_BACKOFF_SECONDS, max(1.0, 2 * delay))

    def _relist(self) -> str | None:
        pods = self.core.list_namespaced_pod(
            self.namespace, label_selector=POOL_SELECTOR,
            _request_timeout=(self.connect_timeout, WATCH_READ_TIMEOUT_SECONDS))
        now = self.clock()
        self.ledger.replace(PodFacts.of(p, now) for p in pods.items if _pool_of(p) == "spot")
        return pods.metadata.resource_version if pods.metadata else None

    def _follow(self, resource_version: str | None) -> str | None:
        watch = Watch()
        self._watch = watch
        if self._stop.is_set():
            return resource_version
        for event in watch.stream(
                self.core.list_namespaced_pod, self.namespace, label_selector=POOL_SELECTOR,
                resource_version=resource_version, allow_watch_bookmarks=True,
                timeout_seconds=WATCH_SECONDS,
                _request_timeout=(self.connect_timeout, WATCH_READ_TIMEOUT_SECONDS)):
            if self._stop.is_set():
                break
            self._handle(event)
        return watch.resource_version or resource_version

    def _handle(self, event: Mapping[str, Any]) -> None:
        self.events += 1
        kind, pod = event.get("type"), event.get("object")
        if kind not in ("ADDED", "MODIFIED", "DELETED") or _pool_of(pod) != "spot":
            return
        facts = PodFacts.of(pod, self.clock())
        if kind == "DELETED":
            self.ledger.remove(facts)
        else:
            self.ledger.update(facts)


