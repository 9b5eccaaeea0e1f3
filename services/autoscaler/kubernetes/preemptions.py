"""The spot pods the platform took, counted once each (see the package docstring for the rules)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

from services.autoscaler.kubernetes.pods import PodFacts
from spotmesh.runtime import fields

log = logging.getLogger("spotmesh.autoscaler")


class PreemptionLedger:
    """Counts the spot pods the platform took, once each, from pod updates (a watch) or whole
    listings (observations); thread-safe, since the watch runs on its own thread.

    ``target`` is the spot Deployment's replicas as last read or written: a pod leaving while
    the pool is at or above it was scaled in (or rolled out), one leaving the pool short of it
    was lost. A scale-in lowers the target *before* its patch, so none of its deletions can be
    mistaken for a loss.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._pods: dict[str, PodFacts] = {}
        self._counted: set[str] = set()
        self._target: int | None = None
        self._preemptions = 0
        self._last_at: float | None = None

    @property
    def preemptions(self) -> int:
        with self._lock:
            return self._preemptions

    @property
    def last_preemption_at(self) -> float | None:
        with self._lock:
            return self._last_at

    def set_target(self, replicas: int) -> None:
        with self._lock:
            self._target = replicas

    def replace(self, pods: Iterable[PodFacts]) -> None:
        """A whole listing of the spot pods. Pods that left since the last listing are judged
        against the pods that were already there and still live: a replacement the ReplicaSet
        made in between must not hide the loss it replaced."""
        with self._lock:
            new = {p.uid: p for p in pods}
            vanished = [old for uid, old in self._pods.items()
                        if not old.gone and (uid not in new or new[uid].gone)]
            live = [p for p in new.values() if not p.gone]
            known_live = sum(1 for p in live if p.uid in self._pods)
            for pod in new.values():
                self._notice(pod)
            self._pods = new
            self._settle(vanished, known_live, live)
            self._counted &= set(new)

    def update(self, pod: PodFacts) -> None:
        """One pod added or changed (a watch's ADDED / MODIFIED)."""
        with self._lock:
            before = self._pods.get(pod.uid)
            self._pods[pod.uid] = pod
            self._notice(pod)
            if pod.gone and before is not None and not before.gone:
                live = self._live()
                self._settle([pod], len(live), live)

    def remove(self, pod: PodFacts) -> None:
        """One pod deleted (a watch's DELETED)."""
        with self._lock:
            before = self._pods.pop(pod.uid, None)
            self._notice(pod)
            if before is not None and not before.gone:
                live = self._live()
                self._settle([pod], len(live), live)
            self._counted.discard(pod.uid)

    def _live(self) -> list[PodFacts]:
        return [p for p in self._pods.values() if not p.gone]

    def _notice(self, pod: PodFacts) -> None:
        if pod.disrupted_at is not None and pod.uid not in self._counted:
            self._count(pod, pod.disrupted_at, "DisruptionTarget")

    def _settle(self, left: list[PodFacts], live_count: int, live: list[PodFacts]) -> None:
        if self._target is None:
            return  # no Deployment size read yet: nothing to judge a departure against
        lost = [p for p in left if p.uid not in self._counted and not _rolled_out(p, live)]
        for pod in lost[:max(0, self._target - live_count)]:
            self._count(pod, self._clock(), "left the pool short of its replicas")

    def _count(self, pod: PodFacts, at: float, why: str) -> None:
        self._counted.add(pod.uid)
        self._preemptions += 1
        self._last_at = at if self._last_at is None else max(self._last_at, at)
        log.warning("spot replica preempted", extra=fields(replica=pod.name, why=why,
                                                           preemptions=self._preemptions))


def _rolled_out(pod: PodFacts, live: list[PodFacts]) -> bool:
    """A newer live pod from another pod template means a rollout replaced this one."""
    return pod.template_hash is not None and any(
        p.template_hash is not None and p.template_hash != pod.template_hash
        and p.created_at > pod.created_at for p in live)


