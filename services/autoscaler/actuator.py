"""Where the autoscaler's plans take effect: one interface, three back ends (Kubernetes, local
processes, the trace simulator).

Actuators are level-triggered: ``apply`` states the desired size of each pool (and which
replicas should go first when a pool shrinks), never a delta, so an autoscaler restarted at any
moment re-reads the world with ``observe`` and converges again without repeating or losing a
step. Removal is always by drain: the actuator asks the replica to stop admitting and lets its
streams finish (or hand over) before it goes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Literal

from services.autoscaler.signals import Pool

InstanceState = Literal["pending", "ready", "draining", "terminating"]

# A reclaimed replica serves on through its notice (`Drain(admit_seconds)`) and stops admitting
# this long before the notice ends: what it took earlier mostly finishes in time, the rest
# resumes elsewhere.
RECLAIM_STOP_ADMITTING_SECONDS = 30.0


def reclaim_admit_seconds(notice_seconds: float) -> float:
    """How much of a reclaim notice a replica keeps admitting new streams."""
    return max(0.0, notice_seconds - RECLAIM_STOP_ADMITTING_SECONDS)


@dataclass(frozen=True)
class Instance:
    """One inference replica as the platform knows it (a pod, a local process)."""

    name: str
    pool: Pool
    state: InstanceState
    address: str = ""  # host:port of its Inference service, once known
    created_at: float = 0.0  # unix seconds
    # The platform announced its reclaim (spot interruption notice, pod DisruptionTarget).
    reclaim_notice: bool = False


@dataclass(frozen=True)
class Observation:
    """The platform's view at one reconcile."""

    instances: list[Instance] = field(default_factory=list)
    desired: dict[str, int] = field(default_factory=dict)  # pool -> the size last asked for
    # Spot replicas reclaimed by the platform (not removed by the autoscaler) since the
    # actuator started, and when the last one was.
    preemptions: int = 0
    last_preemption_at: float | None = None
    # None where the platform does not say whether spot capacity can be had right now.
    spot_available: bool | None = None


class Actuator(ABC):
    @abstractmethod
    async def observe(self) -> Observation:
        """The instances of both pools and the sizes last asked for."""

    @abstractmethod
    async def apply(self, desired: dict[str, int], remove_first: list[str]) -> None:
        """Make each pool converge to ``desired[pool]`` instances; when a pool shrinks, drain
        and remove the named instances before any other."""

    @abstractmethod
    async def record(self, reason: str, message: str) -> None:
        """Leave a trace of a decision where operators look (Kubernetes Events, a log)."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections; never stops the instances (a restarted autoscaler adopts
        them)."""
