"""What a pod says about a replica: its pool, its state, its address, a reclaim notice."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from services.autoscaler.actuator import Instance, InstanceState
from services.autoscaler.kubernetes.api import DEFAULT_GRPC_PORT, POOL_LABEL
from services.autoscaler.signals import POOLS, Pool


def _pool_of(pod: Any) -> Pool | None:
    """The pool a pod serves, from its label; None for a pod of neither pool. The API server
    already filters by the label selector; checking again costs nothing and keeps a stray pod
    (or a server that ignores selectors) out of the pools."""
    labels = (pod.metadata.labels if pod.metadata else None) or {}
    value = labels.get(POOL_LABEL)
    return value if value in POOLS else None


def _conditions(pod: Any) -> dict[str, Any]:
    return {c.type: c for c in ((pod.status.conditions if pod.status else None) or [])}


def _disrupted_at(pod: Any, now: float) -> float | None:
    """When the platform announced the pod's eviction (its DisruptionTarget condition), or None
    if it has not."""
    condition = _conditions(pod).get("DisruptionTarget")
    if condition is None or condition.status != "True":
        return None
    when = condition.last_transition_time
    return when.timestamp() if when is not None else now


def _phase(pod: Any) -> str:
    return (pod.status.phase if pod.status else None) or "Pending"


def _gone(pod: Any) -> bool:
    """Whether the ReplicaSet no longer counts the pod: being deleted, or its containers ended
    (kubelet evictions and node shutdowns leave the pod Failed without deleting it)."""
    return bool(pod.metadata.deletion_timestamp) or _phase(pod) in ("Failed", "Succeeded")


def _grpc_port(pod: Any, default: int) -> int:
    for container in (pod.spec.containers if pod.spec else None) or []:
        for port in container.ports or []:
            if port.name == "grpc":
                return int(port.container_port)
    return default


def instance_of(pod: Any, pool: Pool, default_grpc_port: int = DEFAULT_GRPC_PORT) -> Instance:
    """One pod as the autoscaler sees a replica.

    ``draining``: deleted (or announced for eviction) while its containers still run, so it is
    finishing its streams and takes no new ones; ``terminating``: deleted or ended with nothing
    left running to drain; ``ready``: its Ready condition is True; else ``pending`` (not
    scheduled, starting, or failing its readiness probe).
    """
    meta = pod.metadata
    phase = _phase(pod)
    ready = getattr(_conditions(pod).get("Ready"), "status", None) == "True"
    notice = _disrupted_at(pod, 0.0) is not None
    state: InstanceState
    if phase in ("Failed", "Succeeded"):
        state = "terminating"
    elif meta.deletion_timestamp:
        state = "draining" if phase == "Running" else "terminating"
    elif notice:
        state = "draining"  # as the local actuator treats a reclaim notice: not capacity
    elif phase == "Running" and ready:
        state = "ready"
    else:
        state = "pending"
    ip = pod.status.pod_ip if pod.status else None
    address = ""
    if ip:
        port = _grpc_port(pod, default_grpc_port)
        address = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
    created = meta.creation_timestamp
    return Instance(name=meta.name, pool=pool, state=state, address=address,
                    created_at=created.timestamp() if created is not None else 0.0,
                    reclaim_notice=notice)


@dataclass(frozen=True)
class PodFacts:
    """What preemption accounting needs to know about one spot pod."""

    uid: str
    name: str
    gone: bool
    disrupted_at: float | None
    template_hash: str | None
    created_at: float

    @classmethod
    def of(cls, pod: Any, now: float) -> PodFacts:
        meta = pod.metadata
        created = meta.creation_timestamp
        return cls(uid=meta.uid or meta.name, name=meta.name, gone=_gone(pod),
                   disrupted_at=_disrupted_at(pod, now),
                   template_hash=(meta.labels or {}).get("pod-template-hash"),
                   created_at=created.timestamp() if created is not None else 0.0)


