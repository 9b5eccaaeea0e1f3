"""The Kubernetes actuator against kmock's KubernetesEmulator: the real `kubernetes` client, over
real HTTP, to an in-memory API server seeded with two Deployments and their pods.

What this does NOT prove, because kmock is an object store that speaks the API's HTTP and no
more:

- No controllers run. Lowering a Deployment's replicas deletes no pod, so nothing here shows
  that a ReplicaSet deletes the pods annotated with the lowest pod-deletion-cost first (it
  ranks unscheduled, pending and not-ready pods before the cost anyway). Pods come and go
  only because the test writes them, standing in for the ReplicaSet, kubelet and evictions.
- No scheduler, kubelet or nodes: phases, readiness, pod IPs, DisruptionTarget conditions and
  deletionTimestamps are seeded. No container gets SIGTERM, so draining is not exercised. A
  pod with a deletionTimestamp stays only because the test gives it a finalizer (kmock drops a
  pod at once otherwise; a real one stays for its grace period).
- kmock has no Scale subresource. This module emulates it (`ScaleEmulation`): GET/PATCH
  `deployments/NAME/scale` read and write the Deployment's spec.replicas, a resourceVersion
  precondition that does not match gives 409. A real API server's Scale (its status, the
  selector string) is not checked.
- No authorization: RBAC coverage compares the recorded requests with RBAC_RULES, which only
  shows the rules cover what was sent here, not that a real authorizer would agree. 403s and
  5xx are injected.
- kmock ignores label selectors (every pod of the namespace comes back, so the actuator's own
  label check is what keeps the unlabelled pod out), has no resourceVersion semantics on list
  and watch (no 410 Gone, no bookmarks, no server-side watch timeout) and merges every patch as
  plain JSON whatever its content type. Events are stored without validation.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import kmock
import pytest
from kubernetes import client
from kubernetes.config import kube_config

from services.autoscaler.kubernetes import api as kube_api
from services.autoscaler.kubernetes.actuator import KubernetesActuator
from services.autoscaler.kubernetes.api import (
    DELETION_COST,
    POOL_LABEL,
    RBAC_RULES,
    REMOVE_FIRST_COST,
    KubernetesActuatorError,
)
from services.autoscaler.kubernetes.pods import PodFacts, instance_of
from services.autoscaler.kubernetes.preemptions import PreemptionLedger
from services.autoscaler.kubernetes.watcher import PodWatcher

NS = "spotmesh-test"
DEPLOYMENTS = kmock.resource("apps", "v1", "deployments")
PODS = kmock.resource("", "v1", "pods")
EVENTS = kmock.resource("", "v1", "events")
DISRUPTED_AT = "2026-01-01T00:05:00Z"
DISRUPTED_AT_UNIX = 1767225900.0
NOW = 1767300000.0  # the actuator's clock in these tests


def deployment(name: str, pool: str, replicas: int) -> dict[str, Any]:
    labels = {POOL_LABEL: pool}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": NS, "uid": f"uid-{name}",
                     "resourceVersion": "1"},
        "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels},
                              "spec": {"containers": [{"name": "inference",
                                                       "image": "spotmesh/inference"}]}}},
        "status": {"replicas": replicas},
    }


def pod(name: str, pool: str | None, *, phase: str = "Running", ready: bool = True,
        ip: str | None = "10.0.0.1", grpc_port: int | None = None, disrupted: bool = False,
        deleting: bool = False, template_hash: str = "v1",
        created: str = "2026-01-01T00:00:00Z") -> dict[str, Any]:
    """A pod as a ReplicaSet and kubelet would have left it."""
    ports = [{"name": "metrics", "containerPort": 9400}]
    if grpc_port is not None:
        ports.append({"name": "grpc", "containerPort": grpc_port})
    conditions = [{"type": "Ready", "status": "True" if ready else "False"}]
    if disrupted:
        conditions.append({"type": "DisruptionTarget", "status": "True",
                           "reason": "EvictionByEvictionAPI",
                           "message": "Eviction API: evicting", "lastTransitionTime": DISRUPTED_AT})
    labels = {"pod-template-hash": template_hash}
    if pool is not None:
        labels[POOL_LABEL] = pool
    metadata: dict[str, Any] = {"name": name, "namespace": NS, "uid": f"uid-{name}",
                                "labels": labels, "creationTimestamp": created}
    if deleting:
        metadata["deletionTimestamp"] = "2026-01-01T00:10:00Z"
        metadata["finalizers"] = ["test.spotmesh.dev/keep"]  # see the module docstring
    status: dict[str, Any] = {"phase": phase, "conditions": conditions}
    if ip:
        status["podIP"] = ip
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata,
            "spec": {"containers": [{"name": "inference", "image": "spotmesh/inference",
                                     "ports": ports}]},
            "status": status}


@dataclass
class ScaleEmulation:
    """The Scale subresource kmock lacks, over the stored Deployment. ``writer`` (name,
    replicas) plays a concurrent `kubectl scale` landing right after the next read of that
    Deployment's Scale; ``during_patch`` runs while the next successful patch is in flight
    (a ReplicaSet acting before the API server has answered)."""

    emulator: kmock.KubernetesEmulator
    writer: list[tuple[str, int]] = field(default_factory=list)
    during_patch: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    async def __call__(self, request: kmock.Request) -> dict[str, Any]:
        key = (DEPLOYMENTS, request.namespace, request.name)
        if key not in self.emulator.objects or self.emulator.objects[key].deleted:
            raise kmock.KubernetesObjectNotFoundError()
        stored = self.emulator.objects[key]
        if request.method == "PATCH":
            # kmock has merged the patch into the Deployment already; judge it against the
            # version before, and undo it on a failed precondition.
            before = stored.history[-2]
            expected = ((request.data or {}).get("metadata") or {}).get("resourceVersion")
            if expected is not None and expected != before["metadata"]["resourceVersion"]:
                del stored.history[-1]
                raise kmock.KubernetesError(
                    status=409, reason="Conflict",
                    message="the object has been modified; please apply your changes to the "
                            "latest version and try again")
            self._bump(stored, int(before["metadata"]["resourceVersion"]) + 1)
            scale = self.as_scale(stored.raw)
            while self.during_patch:
                await self.during_patch.pop(0)()
            return scale
        scale = self.as_scale(stored.raw)
        if self.writer and self.writer[0][0] == request.name:
            _, replicas = self.writer.pop(0)
            stored.patch({"spec": {"replicas": replicas}})
            self._bump(stored, int(stored.history[-2]["metadata"]["resourceVersion"]) + 1)
        return scale

    @staticmethod
    def _bump(stored: Any, version: int) -> None:
        stored["metadata"] = dict(stored.raw["metadata"], resourceVersion=str(version))

    @staticmethod
    def as_scale(dep: dict[str, Any]) -> dict[str, Any]:
        meta = dep["metadata"]
        return {"apiVersion": "autoscaling/v1", "kind": "Scale",
                "metadata": {"name": meta["name"], "namespace": meta["namespace"],
                             "uid": meta["uid"], "resourceVersion": meta["resourceVersion"]},
                "spec": {"replicas": dep["spec"]["replicas"]},
                "status": {"replicas": dep.get("status", {}).get("replicas", 0),
                           "selector": f"{POOL_LABEL}="
                                       f"{dep['spec']['selector']['matchLabels'][POOL_LABEL]}"}}


@dataclass
class Cluster:
    emulator: kmock.KubernetesEmulator
    api: client.ApiClient
    scales: ScaleEmulation

    def actuator(self, **kwargs: Any) -> KubernetesActuator:
        kwargs.setdefault("clock", lambda: NOW)
        return KubernetesActuator(NS, api_client=self.api, **kwargs)

    def replicas(self, name: str) -> int:
        return self.emulator.objects[DEPLOYMENTS, NS, name]["spec"]["replicas"]

    def annotations(self, name: str) -> dict[str, str]:
        return dict(self.emulator.objects[PODS, NS, name].raw["metadata"].get("annotations")
                    or {})

    def actuator_requests(self) -> list[kmock.Request]:
        """Requests the actuator sent (the test's own go through kmock's client)."""
        return [r for r in self.emulator
                if not r.headers.get("User-Agent", "").startswith("kmock/")]

    def scale_patches(self) -> list[kmock.Request]:
        return [r for r in self.actuator_requests()
                if r.method == "PATCH" and r.subresource == "scale"]


def rbac_request(r: kmock.Request) -> tuple[str, str, str]:
    """(apiGroup, resource[/subresource], verb) as the API server's authorizer sees it."""
    resource = r.resource.plural + (f"/{r.subresource}" if r.subresource else "")
    if r.method == "GET":
        verb = "watch" if r.params.get("watch") == "true" else ("get" if r.name else "list")
    else:
        verb = {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}[
            r.method.value]
    return r.resource.group, resource, verb


def allowed(group: str, resource: str, verb: str) -> bool:
    return any(group in rule["apiGroups"] and resource in rule["resources"]
               and verb in rule["verbs"] for rule in RBAC_RULES)


@contextlib.asynccontextmanager
async def cluster(*, on_demand: bool = True) -> AsyncIterator[Cluster]:
    """Both Deployments and a pod of every kind, served over HTTP; on the way out, every
    request the actuator sent must be one RBAC_RULES allows."""
    async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator) as server:
        objects = emulator.objects
        objects[DEPLOYMENTS, NS, "inference-spot"] = deployment("inference-spot", "spot", 3)
        if on_demand:
            objects[DEPLOYMENTS, NS, "inference-on-demand"] = deployment(
                "inference-on-demand", "on-demand", 2)
        seeded = [
            pod("spot-a", "spot", ip="10.0.0.11", grpc_port=7000),
            pod("spot-pending", "spot", phase="Pending", ready=False, ip=None),
            pod("spot-reclaimed", "spot", ip="10.0.0.13", disrupted=True),
            pod("od-a", "on-demand", ip="fd00::21", grpc_port=50061),
            pod("od-leaving", "on-demand", ip="10.0.0.22", deleting=True),
            pod("unrelated", None, ip="10.0.0.99"),
        ]
        for p in seeded:
            objects[PODS, NS, p["metadata"]["name"]] = p
        scales = ScaleEmulation(emulator)
        emulator[DEPLOYMENTS, kmock.subresource("scale")] << scales
        cfg = client.Configuration()
        cfg.host = str(server.url).rstrip("/")
        api = client.ApiClient(cfg)
        try:
            yield Cluster(emulator, api, scales)
        finally:
            api.close()
        sent = [rbac_request(r) for r in Cluster(emulator, api, scales).actuator_requests()]
        assert sent, "the actuator sent nothing"
        assert [s for s in sent if not allowed(*s)] == []


def run(scenario: Callable[..., Any], **kwargs: Any) -> None:
    async def main() -> None:
        async with cluster(**kwargs) as c:
            await scenario(c)

    asyncio.run(main())


def test_observe_maps_pods_to_instances_and_reads_desired_from_scale() -> None:
    async def scenario(c: Cluster) -> None:
        actuator = c.actuator(watch_pods=False)
        try:
            obs = await actuator.observe()
        finally:
            await actuator.close()
        by_name = {i.name: i for i in obs.instances}
        assert set(by_name) == {"spot-a", "spot-pending", "spot-reclaimed", "od-a",
                                "od-leaving"}  # "unrelated" has no pool label
        a = by_name["spot-a"]
        assert (a.pool, a.state, a.address, a.reclaim_notice) == ("spot", "ready",
                                                                  "10.0.0.11:7000", False)
        assert a.created_at == 1767225600.0
        pending = by_name["spot-pending"]
        assert (pending.state, pending.address) == ("pending", "")
        reclaimed = by_name["spot-reclaimed"]
        # A reclaim notice is not capacity; no named grpc port means the default one.
        assert (reclaimed.state, reclaimed.reclaim_notice, reclaimed.address) == (
            "draining", True, "10.0.0.13:50061")
        assert (by_name["od-a"].pool, by_name["od-a"].address) == ("on-demand",
                                                                   "[fd00::21]:50061")
        assert by_name["od-leaving"].state == "draining"
        assert obs.desired == {"spot": 3, "on-demand": 2}
        assert obs.preemptions == 1  # the DisruptionTarget on a spot pod
        assert obs.last_preemption_at == DISRUPTED_AT_UNIX
        assert obs.spot_available is None

    run(scenario)


def test_pod_states_cover_ended_and_unready_pods() -> None:
    cases = {
        "failed": (pod("x", "spot", phase="Failed", ready=False), "terminating"),
        "deleted before it ran": (pod("x", "spot", phase="Pending", ready=False,
                                      deleting=True), "terminating"),
        "running, not ready": (pod("x", "spot", ready=False), "pending"),
    }
    with client.ApiClient() as api:
        for what, (raw, state) in cases.items():
            model = api.deserialize(json.dumps(raw), "V1Pod", "application/json")
            assert instance_of(model, "spot").state == state, what


def test_apply_marks_the_named_pods_before_scaling_down_and_is_idempotent() -> None:
    async def scenario(c: Cluster) -> None:
        actuator = c.actuator(watch_pods=False)
        try:
            await actuator.apply({"spot": 1, "on-demand": 2},
                                 ["spot-a", "od-a", "no-such-pod"])
        finally:
            await actuator.close()
        assert c.replicas("inference-spot") == 1
        assert c.replicas("inference-on-demand") == 2
        assert c.annotations("spot-a")[DELETION_COST] == REMOVE_FIRST_COST
        # od-a was named, but its pool is not shrinking: the ReplicaSet won't delete anything.
        assert DELETION_COST not in c.annotations("od-a")
        sent = c.actuator_requests()
        pod_patches = [i for i, r in enumerate(sent) if r.method == "PATCH" and not r.subresource]
        scale_patch = [i for i, r in enumerate(sent) if r.method == "PATCH" and r.subresource]
        assert len(pod_patches) == 1 and len(scale_patch) == 1
        assert pod_patches[0] < scale_patch[0], "the mark must be in place before the scale"
        assert sent[scale_patch[0]].headers["Content-Type"] == "application/merge-patch+json"
        assert sent[scale_patch[0]].data["metadata"]["resourceVersion"] == "1"
        read_back = await asyncio.to_thread(client.AppsV1Api(c.api)
                                            .read_namespaced_deployment_scale,
                                            "inference-spot", NS)
        assert read_back.spec.replicas == 1

        # Again, and from a restarted actuator: it reads, finds nothing to change, writes none.
        for again in (c.actuator(watch_pods=False), c.actuator(watch_pods=False)):
            before = len(c.actuator_requests())
            await again.apply({"spot": 1, "on-demand": 2}, ["spot-a"])
            await again.close()
            assert [r.method for r in c.actuator_requests()[before:]] == ["GET", "GET"]

        # A later shrink names another pod: the old mark is taken back, the new one written.
        c.emulator.objects[DEPLOYMENTS, NS, "inference-spot"]["spec"] = {
            **c.emulator.objects[DEPLOYMENTS, NS, "inference-spot"].raw["spec"], "replicas": 3}
        actuator = c.actuator(watch_pods=False)
        await actuator.apply({"spot": 2}, ["spot-pending"])
        await actuator.close()
        assert DELETION_COST not in c.annotations("spot-a")
        assert c.annotations("spot-pending")[DELETION_COST] == REMOVE_FIRST_COST
        assert c.replicas("inference-spot") == 2

        # Growing marks nothing.
        before = len(c.actuator_requests())
        actuator = c.actuator(watch_pods=False)
        await actuator.apply({"on-demand": 4}, ["od-a"])
        await actuator.close()
        assert c.replicas("inference-on-demand") == 4
        assert [(r.method, r.subresource) for r in c.actuator_requests()[before:]] == [
            ("GET", "scale"), ("PATCH", "scale")]

    run(scenario)


def test_apply_rejects_unknown_pools_and_negative_sizes() -> None:
    async def scenario(c: Cluster) -> None:
        actuator = c.actuator(watch_pods=False)
        with pytest.raises(ValueError, match="unknown pool 'gpu'"):
            await actuator.apply({"gpu": 1}, [])
        with pytest.raises(ValueError, match=r"desired\['spot'\] must be an int >= 0"):
            await actuator.apply({"spot": -1}, [])
        await actuator.observe()  # the cluster context wants at least one request
        await actuator.close()

    run(scenario)


def test_a_conflicting_scale_write_is_retried_once_after_a_reread() -> None:
    async def scenario(c: Cluster) -> None:
        actuator = c.actuator(watch_pods=False)
        c.scales.writer.append(("inference-on-demand", 4))
        await actuator.apply({"on-demand": 5}, [])
        assert c.replicas("inference-on-demand") == 5
        sent = [(r.method, r.subresource) for r in c.actuator_requests()]
        assert sent == [("GET", "scale"), ("PATCH", "scale"), ("GET", "scale"),
                        ("PATCH", "scale")]

        # Someone writes between every read and patch: the second conflict is raised, named.
        c.scales.writer.extend([("inference-on-demand", 3), ("inference-on-demand", 2)])
        with pytest.raises(KubernetesActuatorError,
                           match=f"patch deployments/scale {NS}/inference-on-demand: conflict"
                           ) as err:
            await actuator.apply({"on-demand": 6}, [])
        assert err.value.status == 409
        assert c.replicas("inference-on-demand") == 2  # the other writer's, untouched by us
        await actuator.close()

    run(scenario)


def test_record_creates_events_on_the_deployments_and_survives_failures() -> None:
    async def scenario(c: Cluster) -> None:
        actuator = c.actuator(watch_pods=False)
        await actuator.record("Scaled", "spot 3->1, on-demand 2->2: scale in")
        await actuator.record("SpotUnavailable", "spot pending too long", pool="spot",
                              warning=True)
        events = [c.emulator.objects[key].raw for key in c.emulator.objects
                  if key[0] == EVENTS]
        assert len(events) == 3
        scaled = sorted((e for e in events if e["reason"] == "Scaled"),
                        key=lambda e: e["involvedObject"]["name"])
        assert [e["involvedObject"]["name"] for e in scaled] == ["inference-on-demand",
                                                                 "inference-spot"]
        first = scaled[1]
        assert first["involvedObject"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                           "name": "inference-spot", "namespace": NS,
                                           "uid": "uid-inference-spot"}
        assert first["type"] == "Normal"
        assert first["reportingComponent"] == "spotmesh-autoscaler"
        assert first["source"] == {"component": "spotmesh-autoscaler"}
        assert first["metadata"]["name"].startswith("inference-spot.")
        warning = next(e for e in events if e["reason"] == "SpotUnavailable")
        assert (warning["type"], warning["involvedObject"]["name"]) == ("Warning",
                                                                        "inference-spot")
        assert actuator.event_failures == 0

        c.emulator["post", EVENTS].override << kmock.KubernetesError(
            status=403, reason="Forbidden", message='events is forbidden: User "x" cannot '
                                                    'create resource "events"')
        await actuator.record("Scaled", "spot 1->2", pool="spot")  # must not raise
        assert actuator.event_failures == 1
        await actuator.close()

    run(scenario)


def test_preemptions_are_counted_from_the_pod_watch(monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario(c: Cluster) -> None:
        # The watch thread wakes the test after each event it handles: no polling.
        loop, handled = asyncio.get_running_loop(), asyncio.Event()
        handle = PodWatcher._handle

        def handle_and_wake(self: PodWatcher, event: Any) -> None:
            handle(self, event)
            loop.call_soon_threadsafe(handled.set)

        monkeypatch.setattr(PodWatcher, "_handle", handle_and_wake)
        actuator = c.actuator()
        events = 6  # kmock replays every pod of the namespace as ADDED when the watch opens

        async def after(more: int) -> None:
            nonlocal events
            events += more
            async with asyncio.timeout(10):  # only ends a broken test
                while actuator.pod_watch_events < events:
                    await handled.wait()
                    handled.clear()

        try:
            assert (await actuator.observe()).preemptions == 1  # spot-reclaimed's notice
            await after(0)

            # A ready spot pod disappears while the Deployment still wants 3: preempted.
            await c.emulator.delete(f"/api/v1/namespaces/{NS}/pods/spot-a")
            await after(1)
            obs = await actuator.observe()
            assert (obs.preemptions, obs.last_preemption_at) == (2, NOW)

            # The autoscaler scales spot in to 1. The ReplicaSet deletes the marked pod before
            # the patch has even returned, and the watch sees it then: still no loss.
            async def replicaset_scales_in() -> None:
                await c.emulator.delete(f"/api/v1/namespaces/{NS}/pods/spot-pending")
                await after(2)  # the annotation, then the deletion

            c.scales.during_patch.append(replicaset_scales_in)
            await actuator.apply({"spot": 1}, ["spot-pending"])
            assert not c.scales.during_patch
            marked = c.emulator.objects[PODS, NS, "spot-pending"].last
            assert marked["metadata"]["annotations"][DELETION_COST] == REMOVE_FIRST_COST
            assert (await actuator.observe()).preemptions == 2

            # A new spot pod gets a DisruptionTarget: counted at the notice, and only then.
            await c.emulator.post(f"/api/v1/namespaces/{NS}/pods",
                                  json=pod("spot-new", "spot", ip="10.0.0.14"))
            noticed = pod("spot-new", "spot", ip="10.0.0.14", disrupted=True)
            await c.emulator.patch(f"/api/v1/namespaces/{NS}/pods/spot-new",
                                   json={"status": noticed["status"]})
            await after(2)
            assert (await actuator.observe()).preemptions == 3
            await c.emulator.delete(f"/api/v1/namespaces/{NS}/pods/spot-new")
            await c.emulator.delete(f"/api/v1/namespaces/{NS}/pods/spot-reclaimed")
            await after(2)
            obs = await actuator.observe()
            assert (obs.preemptions, obs.last_preemption_at) == (3, NOW)
        finally:
            await actuator.close()
        assert any(r.params.get("watch") == "true" for r in c.actuator_requests())

    run(scenario)


def test_preemptions_are_counted_by_diffing_observations_without_a_watch() -> None:
    async def scenario(c: Cluster) -> None:
        objects = c.emulator.objects
        actuator = c.actuator(watch_pods=False)
        try:
            assert (await actuator.observe()).preemptions == 1
            # Between two reconciles spot-a is reclaimed and the ReplicaSet replaces it: the
            # replacement must not hide the loss.
            del objects[PODS, NS, "spot-a"]
            objects[PODS, NS, "spot-b"] = pod("spot-b", "spot", created="2026-01-01T01:00:00Z")
            assert (await actuator.observe()).preemptions == 2

            # A rollout replaces spot-b with a pod of a new template: not a loss.
            del objects[PODS, NS, "spot-b"]
            objects[PODS, NS, "spot-c"] = pod("spot-c", "spot", template_hash="v2",
                                              created="2026-01-01T02:00:00Z")
            assert (await actuator.observe()).preemptions == 2

            # A scale-in by the autoscaler: not a loss either.
            await actuator.apply({"spot": 2}, ["spot-c"])
            del objects[PODS, NS, "spot-c"]
            assert (await actuator.observe()).preemptions == 2
        finally:
            await actuator.close()

    run(scenario)


def test_api_errors_name_the_deployment_and_namespace() -> None:
    async def scenario(c: Cluster) -> None:
        actuator = c.actuator(watch_pods=False)
        missing = f"Deployment {NS}/inference-on-demand not found"
        with pytest.raises(KubernetesActuatorError, match=missing) as err:
            await actuator.observe()
        assert err.value.status == 404
        with pytest.raises(KubernetesActuatorError, match=missing):
            await actuator.apply({"on-demand": 1}, [])

        c.emulator["patch", DEPLOYMENTS, kmock.subresource("scale")].override << (
            kmock.KubernetesError(status=403, reason="Forbidden", message="scale forbidden"))
        with pytest.raises(KubernetesActuatorError,
                           match=f"patch deployments/scale {NS}/inference-spot: forbidden.*"
                                 "RBAC_RULES") as err:
            await actuator.apply({"spot": 4}, [])
        assert err.value.status == 403

        c.emulator["get", PODS].override << kmock.KubernetesError(
            status=503, reason="ServiceUnavailable", message="etcd is down")
        with pytest.raises(KubernetesActuatorError,
                           match=f"list pods in namespace {NS}: Kubernetes API server error "
                                 "503 \\(etcd is down\\)"):
            await actuator.apply({"spot": 1}, ["spot-a"])
        await actuator.close()

    run(scenario, on_demand=False)


def test_rbac_check_is_not_vacuous() -> None:
    assert allowed("apps", "deployments/scale", "patch")
    assert not allowed("", "pods", "delete")
    assert not allowed("apps", "deployments", "patch")
    assert not allowed("", "nodes", "get")


def test_configuration_and_client_problems_are_one_clear_line(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(tmp_path / "absent"))
    with pytest.raises(KubernetesActuatorError, match="no Kubernetes configuration"):
        KubernetesActuator("ns")
    monkeypatch.setattr(kube_api, "MISSING", ImportError("No module named 'kubernetes'"))
    with pytest.raises(ImportError, match=re.escape("pip install kubernetes==37.0.2")):
        KubernetesActuator("ns", api_client=object())


def test_ledger_counts_each_lost_pod_once_whatever_order_it_learns_in() -> None:
    def facts(name: str, *, gone: bool = False, disrupted: float | None = None,
              created: float = 0.0) -> PodFacts:
        return PodFacts(name, name, gone, disrupted, "v1", created)

    ticks = itertools.count(100)
    ledger = PreemptionLedger(clock=lambda: float(next(ticks)))
    ledger.set_target(2)
    ledger.replace([facts("a"), facts("b")])
    ledger.update(facts("a", gone=True))  # terminating, pool short: lost
    ledger.remove(facts("a", gone=True))  # and then deleted: the same loss
    assert ledger.preemptions == 1
    ledger.update(facts("b", disrupted=50.0))
    ledger.update(facts("b", gone=True, disrupted=50.0))
    assert (ledger.preemptions, ledger.last_preemption_at) == (2, 100.0)
    ledger.set_target(0)
    ledger.update(facts("c"))
    ledger.remove(facts("c"))  # scaled in
    assert ledger.preemptions == 2
