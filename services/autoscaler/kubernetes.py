"""The Kubernetes actuator: the two pools as two Deployments, sized through their ``scale``
subresource, followed through their pods, explained with Events.

Everything it acts on is re-read from the API server, so it is level-triggered and safe to
restart: ``apply`` reads each Deployment's Scale and patches it only when the size differs,
and ``observe`` lists the pods of both pools (label ``spotmesh.dev/pool: spot|on-demand``).

Choosing which replicas go. A Deployment cannot be told "delete this pod"; its ReplicaSet
picks. Since Kubernetes 1.22 the ReplicaSet honours the ``controller.kubernetes.io/
pod-deletion-cost`` annotation, so before a shrink the actuator annotates the pods the policy
named with a cost of -1000 (unannotated pods count as 0) and only then lowers the replicas. The
cost is the ReplicaSet's fourth criterion: pods not yet scheduled, then pending, then not ready
ones still go before any annotated pod, which is what the policy wants too (a replica still
starting has nothing to drain). The pods it leaves get SIGTERM and drain their streams within
their ``terminationGracePeriodSeconds`` (deploy/ sets it). Marks it no longer wants it takes back
at the next shrink of that pool; ``spotmesh.dev/remove-first`` says which costs are its own.
Karpenter's alpha ``PodDeletionCostManagement`` writes the same annotation: do not enable both.

Reclaim notices and preemptions. A pod whose ``DisruptionTarget`` condition is True is about to
be evicted by the platform: Kubernetes sets it for evictions through the Eviction API (node
drains by Karpenter, the AWS node termination handler, the cluster autoscaler), taint-based
eviction of unreachable nodes, graceful node shutdown (GKE spot preemption) and PodGC of pods on
deleted nodes. Such a pod is ``reclaim_notice`` and ``draining``, and on the spot pool it counts
as one preemption. Node taints (``karpenter.sh/disrupted``, GKE's termination taints) would say
it a little earlier, but reading Nodes needs a ClusterRole; least privilege won, and every
eviction path above sets the condition anyway. A spot pod that goes away *without* the condition
(deleted, evicted by an old cluster) counts when the pool is then short of the Deployment's
replicas: a ReplicaSet only deletes pods above its count, so a loss below it was not a
scale-in. A pod replaced by a newer pod of another ``pod-template-hash`` is a rollout, not a
loss. The counting follows a pod watch (``kubernetes.watch.Watch`` on a background thread, list
then watch from the list's resourceVersion, relist on 410 Gone), so a pod that is preempted and
replaced between two reconciles is still seen, in the order the API server saw it. With the
watch off (``watch_pods=False``) the same rules run on successive observations.

The ``kubernetes`` client is synchronous: every call runs in a worker thread, so the
autoscaler's event loop never waits on the API server.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter

from services.autoscaler.actuator import Actuator, Instance, InstanceState, Observation
from services.autoscaler.signals import POOLS, Pool
from spotmesh.runtime import fields

try:
    from kubernetes import client as k8s
    from kubernetes import config as k8s_config
    from kubernetes.client.exceptions import ApiException
    from kubernetes.watch import Watch
    from urllib3.exceptions import HTTPError as TransportError
except ImportError as exc:  # RBAC_RULES must stay importable for deploy/ without the client
    _MISSING: ImportError | None = exc
else:
    _MISSING = None

log = logging.getLogger("spotmesh.autoscaler")

POOL_LABEL = "spotmesh.dev/pool"
POOL_SELECTOR = f"{POOL_LABEL} in (spot,on-demand)"
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
# Below the default 0 of every other pod, above Karpenter's int32 minimum for pods on nodes it
# is already disrupting (those go first anyway).
REMOVE_FIRST_COST = "-1000"
REMOVE_FIRST_MARK = "spotmesh.dev/remove-first"
DEFAULT_GRPC_PORT = 50061
COMPONENT = "spotmesh-autoscaler"
MERGE_PATCH = "application/merge-patch+json"
# The events.k8s.io API caps a note at 1 kB; core/v1 takes more, but the same cap keeps a long
# list of policy reasons readable in `kubectl describe`.
MAX_EVENT_MESSAGE = 1024
# A real API server ends a watch after timeoutSeconds; the client's read timeout is a little
# longer, so a silently dead connection is noticed too.
WATCH_SECONDS = 300
WATCH_READ_TIMEOUT_SECONDS = WATCH_SECONDS + 30
WATCH_MAX_BACKOFF_SECONDS = 30.0

# Every call this module makes, as Kubernetes PolicyRules: deploy/ renders them into the
# autoscaler's Role, and the kmock test checks each recorded request against them.
RBAC_RULES: list[dict[str, list[str]]] = [
    {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get"]},
    {"apiGroups": ["apps"], "resources": ["deployments/scale"], "verbs": ["get", "patch"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "patch"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
]

EVENT_FAILURES = Counter(
    "spotmesh_autoscaler_kubernetes_event_failures_total",
    "Kubernetes Events the autoscaler could not create (the decisions were still applied).")


class KubernetesActuatorError(RuntimeError):
    """A Kubernetes API call failed; the message names the verb, the object and the namespace,
    and ``status`` carries the HTTP status (None when the API server was not reached)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def _status_detail(exc: ApiException) -> str:
    """The API server's own explanation (a Status object's message), else its HTTP reason."""
    try:
        message = json.loads(exc.body or "").get("message")
    except (ValueError, AttributeError):
        message = None
    return str(message or exc.reason or "no detail")


def _api_error(exc: BaseException, verb: str, resource: str, namespace: str,
               name: str | None) -> KubernetesActuatorError:
    what = f"{verb} {resource} {namespace}/{name}" if name else (
        f"{verb} {resource} in namespace {namespace}")
    if not isinstance(exc, ApiException):
        return KubernetesActuatorError(f"{what}: cannot reach the Kubernetes API ({exc})")
    status, detail = exc.status, _status_detail(exc)
    if status == 404 and resource.startswith("deployments"):
        message = (f"Deployment {namespace}/{name} not found ({what}): the actuator scales "
                   f"existing Deployments and never creates them (deploy/ does); check the "
                   f"namespace and the Deployment names")
    elif status in (401, 403):
        message = (f"{what}: {'forbidden' if status == 403 else 'unauthorized'} ({detail}); "
                   f"the autoscaler's ServiceAccount needs a Role with "
                   f"services.autoscaler.kubernetes.RBAC_RULES")
    elif status == 409:
        message = (f"{what}: conflict ({detail}); something else keeps changing it (kubectl "
                   f"scale? an HPA on the same Deployment?)")
    elif status is not None and status >= 500:
        message = f"{what}: Kubernetes API server error {status} ({detail})"
    else:
        message = f"{what}: HTTP {status} ({detail})"
    return KubernetesActuatorError(message, status)


def _client_from_environment() -> Any:
    """In a pod, the ServiceAccount's in-cluster config; elsewhere, the kubeconfig
    ($KUBECONFIG or ~/.kube/config, its current context)."""
    cfg = k8s.Configuration()
    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            k8s_config.load_incluster_config(client_configuration=cfg)
        else:
            k8s_config.load_kube_config(client_configuration=cfg)
    except (k8s_config.ConfigException, OSError) as exc:
        raise KubernetesActuatorError(
            f"no Kubernetes configuration: not in a pod (KUBERNETES_SERVICE_HOST unset) and no "
            f"usable kubeconfig ($KUBECONFIG or ~/.kube/config): {exc}") from exc
    api = k8s.ApiClient(cfg)
    api.user_agent = f"{COMPONENT} kubernetes-python"  # names us in the API server's audit log
    return api


# --- pods --------------------------------------------------------------------------------------

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


def _replicas(scale: Any) -> int:
    return int((scale.spec.replicas if scale.spec else None) or 0)


class KubernetesActuator(Actuator):
    """Scales ``inference-spot`` and ``inference-on-demand`` (by default) in one namespace.

    ``api_client``: a ready ``kubernetes.client.ApiClient`` (tests, or a caller with its own
    configuration); without one, the in-cluster config in a pod, else the kubeconfig.
    ``grpc_port``: the port of replicas whose pod names no container port ``grpc``.
    ``watch_pods``: follow the pods with a watch for preemption accounting (else it diffs
    observations). ``clock``: unix seconds, the policy's clock.
    """

    def __init__(
        self,
        namespace: str = "spotmesh",
        *,
        spot_deployment: str = "inference-spot",
        on_demand_deployment: str = "inference-on-demand",
        api_client: Any = None,
        grpc_port: int = DEFAULT_GRPC_PORT,
        request_timeout_seconds: float = 30.0,
        watch_pods: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if _MISSING is not None:
            raise ImportError("the Kubernetes actuator needs the `kubernetes` package: "
                              "pip install kubernetes==37.0.2") from _MISSING
        if not namespace:
            raise ValueError("kubernetes namespace must not be empty")
        if not spot_deployment or not on_demand_deployment:
            raise ValueError("kubernetes Deployment names must not be empty")
        if spot_deployment == on_demand_deployment:
            raise ValueError(f"the spot and on-demand pools need two Deployments, both are "
                             f"named {spot_deployment!r}")
        if not request_timeout_seconds > 0:
            raise ValueError(f"request_timeout_seconds must be > 0, got "
                             f"{request_timeout_seconds}")
        self.namespace = namespace
        self.deployments: dict[Pool, str] = {"spot": spot_deployment,
                                             "on-demand": on_demand_deployment}
        self._owns_client = api_client is None
        self.api = api_client if api_client is not None else _client_from_environment()
        self.apps = k8s.AppsV1Api(self.api)
        self.core = k8s.CoreV1Api(self.api)
        self.grpc_port = grpc_port
        self.timeout = (min(5.0, request_timeout_seconds), request_timeout_seconds)
        self.watch_pods = watch_pods
        self.clock = clock
        self.ledger = PreemptionLedger(clock)
        self.event_failures = 0
        self.reporting_instance = os.environ.get("POD_NAME") or socket.gethostname()
        self._watcher: PodWatcher | None = None
        self._baselined = False

    @property
    def pod_watch_events(self) -> int:
        """Pod watch events handled so far (0 without a watch)."""
        return self._watcher.events if self._watcher is not None else 0

    async def _call(self, verb: str, resource: str, name: str | None,
                    fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("_request_timeout", self.timeout)
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except (ApiException, TransportError) as exc:
            raise _api_error(exc, verb, resource, self.namespace, name) from exc

    async def _read_scale(self, pool: Pool) -> Any:
        name = self.deployments[pool]
        return await self._call("get", "deployments/scale", name,
                                self.apps.read_namespaced_deployment_scale, name, self.namespace)

    async def _list_pods(self) -> Any:
        return await self._call("list", "pods", None, self.core.list_namespaced_pod,
                                self.namespace, label_selector=POOL_SELECTOR)

    # --- Actuator ----------------------------------------------------------------------------

    async def observe(self) -> Observation:
        spot, on_demand, pods = await asyncio.gather(
            self._read_scale("spot"), self._read_scale("on-demand"), self._list_pods())
        desired = {"spot": _replicas(spot), "on-demand": _replicas(on_demand)}
        self.ledger.set_target(desired["spot"])
        mine = [(pod, pool) for pod in pods.items if (pool := _pool_of(pod)) is not None]
        if not self._baselined or not self.watch_pods:
            # Without a watch every listing is judged; with one, only the first (the watch
            # starts from its resourceVersion, so the two never disagree about order).
            now = self.clock()
            self.ledger.replace(PodFacts.of(p, now) for p, pool in mine if pool == "spot")
            self._baselined = True
            if self.watch_pods:
                self._watcher = PodWatcher(self.core, self.namespace, self.ledger, self.clock,
                                           self.timeout[0])
                self._watcher.start(pods.metadata.resource_version if pods.metadata else None)
        instances = sorted((instance_of(p, pool, self.grpc_port) for p, pool in mine),
                           key=lambda i: (i.pool, i.name))
        return Observation(instances=instances, desired=desired,
                           preemptions=self.ledger.preemptions,
                           last_preemption_at=self.ledger.last_preemption_at,
                           spot_available=None)  # the cloud does not say; pending pods do

    async def apply(self, desired: dict[str, int], remove_first: list[str]) -> None:
        for pool, want in desired.items():
            if pool not in POOLS:
                raise ValueError(f"desired: unknown pool {pool!r} (pools: {POOLS})")
            if isinstance(want, bool) or not isinstance(want, int) or want < 0:
                raise ValueError(f"desired[{pool!r}] must be an int >= 0, got {want!r}")
        for pool in POOLS:
            if pool in desired:
                await self._scale_pool(pool, desired[pool], remove_first)

    async def _scale_pool(self, pool: Pool, want: int, remove_first: list[str]) -> None:
        """Read the Scale, mark the pods to go first when it shrinks, patch it with the read's
        resourceVersion as a precondition; a 409 (someone scaled it in between) is re-read
        and decided again once."""
        name = self.deployments[pool]
        for attempt in (1, 2):
            scale = await self._read_scale(pool)
            current = _replicas(scale)
            if pool == "spot":
                self.ledger.set_target(current)
            if current == want:
                return
            if want < current:
                # Even with no names: marks left from an earlier choice must not steer this one.
                await self._mark_for_removal(pool, remove_first)
                if pool == "spot":
                    self.ledger.set_target(want)  # the deletions about to come are ours
            body: dict[str, Any] = {"spec": {"replicas": want}}
            version = scale.metadata.resource_version if scale.metadata else None
            if version:
                body["metadata"] = {"resourceVersion": version}
            try:
                await self._call("patch", "deployments/scale", name,
                                 self.apps.patch_namespaced_deployment_scale, name,
                                 self.namespace, body, _content_type=MERGE_PATCH)
            except KubernetesActuatorError as err:
                if pool == "spot":
                    self.ledger.set_target(current)
                if err.status == 409 and attempt == 1:
                    log.info("scale changed under us; re-reading", extra=fields(
                        deployment=name, namespace=self.namespace))
                    continue
                raise
            if pool == "spot":
                self.ledger.set_target(want)
            log.info("scaled", extra=fields(deployment=name, namespace=self.namespace,
                                            pool=pool, replicas_from=current, replicas_to=want))
            return

    async def _mark_for_removal(self, pool: Pool, names: list[str]) -> None:
        """Give the named pods of ``pool`` the lowest deletion cost and take it back from pods
        marked earlier but no longer named, so the ReplicaSet deletes what the policy chose.
        Raises if a mark cannot be written: scaling without it would remove busy replicas."""
        wanted = set(names)
        patches = []
        for pod in (await self._list_pods()).items:
            meta = pod.metadata
            if _pool_of(pod) != pool or meta.deletion_timestamp:
                continue
            annotations = meta.annotations or {}
            ours = annotations.get(REMOVE_FIRST_MARK) == "true"
            if meta.name in wanted:
                if not ours or annotations.get(DELETION_COST) != REMOVE_FIRST_COST:
                    patches.append((meta.name, {DELETION_COST: REMOVE_FIRST_COST,
                                                REMOVE_FIRST_MARK: "true"}))
            elif ours:
                patches.append((meta.name, {DELETION_COST: None, REMOVE_FIRST_MARK: None}))
        await asyncio.gather(*(self._annotate(pod, notes) for pod, notes in patches))

    async def _annotate(self, pod: str, annotations: dict[str, str | None]) -> None:
        try:
            await self._call("patch", "pods", pod, self.core.patch_namespaced_pod, pod,
                             self.namespace, {"metadata": {"annotations": annotations}},
                             _content_type=MERGE_PATCH)
        except KubernetesActuatorError as err:
            if err.status == 404:
                return  # gone already: what a removal mark asks for
            raise
        log.info("pod deletion cost set", extra=fields(
            pod=pod, namespace=self.namespace, cost=annotations[DELETION_COST]))

    async def record(self, reason: str, message: str, *, pool: Pool | None = None,
                     warning: bool = False) -> None:
        """An Event on the pool's Deployment (on both when ``pool`` is None: a decision sizes
        the two together), so ``kubectl describe deployment`` shows why it was scaled. An
        Event is a courtesy: a failure is logged and counted, never raised into a reconcile."""
        for target in [pool] if pool is not None else list(POOLS):
            try:
                await self._create_event(target, reason, message, warning)
            except Exception as exc:  # whatever it was: see the docstring
                self.event_failures += 1
                EVENT_FAILURES.inc()
                log.warning("could not record a Kubernetes Event", extra=fields(
                    deployment=self.deployments[target], namespace=self.namespace,
                    reason=reason, error=str(exc)))

    async def _create_event(self, pool: Pool, reason: str, message: str,
                            warning: bool) -> None:
        name = self.deployments[pool]
        # The uid makes `kubectl describe` find the Event (it selects on involvedObject.uid);
        # read every time, so a re-created Deployment is not left without its Events.
        deployment = await self._call("get", "deployments", name,
                                      self.apps.read_namespaced_deployment, name,
                                      self.namespace)
        now = dt.datetime.now(dt.UTC)
        event = k8s.CoreV1Event(
            # client-go's recorder names Events "<object>.<unix nanoseconds in hex>".
            metadata=k8s.V1ObjectMeta(name=f"{name}.{time.time_ns():x}",
                                      namespace=self.namespace),
            involved_object=k8s.V1ObjectReference(
                api_version="apps/v1", kind="Deployment", name=name, namespace=self.namespace,
                uid=deployment.metadata.uid if deployment.metadata else None),
            reason=reason, message=message[:MAX_EVENT_MESSAGE],
            type="Warning" if warning else "Normal",
            source=k8s.V1EventSource(component=COMPONENT),
            reporting_component=COMPONENT, reporting_instance=self.reporting_instance,
            first_timestamp=now, last_timestamp=now, count=1)
        await self._call("create", "events", None, self.core.create_namespaced_event,
                         self.namespace, event)

    async def close(self) -> None:
        if self._watcher is not None:
            await self._watcher.stop()
            self._watcher = None
        self._baselined = False
        if self._owns_client:
            self.api.close()
