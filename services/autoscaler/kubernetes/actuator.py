"""The actuator itself: the two pools as two Deployments, sized through their ``scale``
subresource, the pods to remove first marked with a deletion cost, decisions explained with
Events (the package docstring says why each choice was made)."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import Counter

from services.autoscaler.actuator import Actuator, Observation
from services.autoscaler.kubernetes import api
from services.autoscaler.kubernetes.api import (
    COMPONENT,
    DEFAULT_GRPC_PORT,
    DELETION_COST,
    MAX_EVENT_MESSAGE,
    MERGE_PATCH,
    POOL_SELECTOR,
    REMOVE_FIRST_COST,
    REMOVE_FIRST_MARK,
    ApiException,
    KubernetesActuatorError,
    TransportError,
    _api_error,
    _client_from_environment,
    k8s,
)
from services.autoscaler.kubernetes.pods import PodFacts, _pool_of, instance_of
from services.autoscaler.kubernetes.preemptions import PreemptionLedger
from services.autoscaler.kubernetes.watcher import PodWatcher
from services.autoscaler.signals import POOLS, Pool
from spotmesh.runtime import fields

log = logging.getLogger("spotmesh.autoscaler")

EVENT_FAILURES = Counter(
    "spotmesh_autoscaler_kubernetes_event_failures_total",
    "Kubernetes Events the autoscaler could not create (the decisions were still applied).")



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
        if api.MISSING is not None:
            raise ImportError("the Kubernetes actuator needs the `kubernetes` package: "
                              "pip install kubernetes==37.0.2") from api.MISSING
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
