"""The autoscaler end to end on local processes: `spotmesh up --autoscale` starts one on-demand
replica; a load ramp grows the pools (spot first, it is cheaper), each new replica warmed with
the hottest prefix before it takes traffic; `spotmesh preempt` reclaims
the spot replica under load with spot capacity gone, and on-demand replaces it with no
client-visible error; a quiet period shrinks the pools back to the on-demand floor.

One scenario in file order; it takes a few minutes on two cores (each vLLM replica needs tens
of seconds to start). Waits are bounded; nothing asserts on timing.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import grpc
import pytest
from conftest import Mesh

from spotmesh.v1 import (
    autoscaler_pb2,
    autoscaler_pb2_grpc,
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
)

pytestmark = pytest.mark.mesh

AUTOSCALE = ("--interval-seconds 0.5 --target-load 2 --spot-max 1 --on-demand-max 2 "
             "--on-demand-floor 1 --up-cooldown-seconds 1 --down-cooldown-seconds 3 "
             "--down-stabilization-seconds 3 --pending-grace-seconds 240")
POOL = {"spot": common_pb2.POOL_SPOT, "on-demand": common_pb2.POOL_ON_DEMAND}


@pytest.fixture(scope="module")
def amesh(tmp_path_factory, tiny_model):
    m = Mesh(tmp_path_factory.mktemp("amesh"), "--autoscale", "--no-cache",
             "--autoscale-args", AUTOSCALE)
    yield m
    m.stop()


class Load:
    """Closed-loop clients until stopped; every error is kept."""

    def __init__(self, mesh, clients: int) -> None:
        self.mesh = mesh
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.done = 0
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]
        for t in self.threads:
            t.start()

    def _run(self) -> None:
        # Two full KV blocks of shared prefix: the prefix index learns it, and new replicas are
        # warmed with it before they take traffic.
        req = gateway_pb2.GenerateRequest(
            prompt="You are an assistant who explains spot instances in great detail. " * 12
            + "Why are they cheap?",
            sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=96))
        with grpc.insecure_channel(self.mesh.gateway) as ch:
            stub = gateway_pb2_grpc.GatewayStub(ch)
            while not self.stop.is_set():
                try:
                    stub.Complete(req, metadata=self.mesh.metadata, timeout=120)
                    self.done += 1
                except grpc.RpcError as exc:
                    self.errors.append(f"{exc.code().name}: {exc.details()}")

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(180)


def status(mesh) -> autoscaler_pb2.StatusResponse:
    address = next(p.address for p in mesh.state.processes if p.role == "autoscaler")
    with grpc.insecure_channel(address) as ch:
        return autoscaler_pb2_grpc.AutoscalerStub(ch).Status(autoscaler_pb2.StatusRequest(),
                                                              timeout=5)


def pool(st, name: str):
    return next((p for p in st.pools if p.pool == POOL[name]), autoscaler_pb2.PoolState())


def wait_for(mesh, predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    st = None
    while time.monotonic() < deadline:
        st = status(mesh)
        if predicate(st):
            return st
        time.sleep(0.5)
    raise AssertionError(f"{what}: not reached in {timeout:.0f}s; last status {st}")


def test_starts_with_the_on_demand_floor(amesh):
    st = wait_for(amesh, lambda s: pool(s, "on-demand").ready == 1, 60, "one on-demand ready")
    assert pool(st, "spot").ready == 0


def test_load_ramp_scales_out_preemption_is_replaced_quiet_scales_in(amesh):
    load = Load(amesh, clients=8)
    try:
        st = wait_for(amesh, lambda s: pool(s, "spot").ready >= 1, 240, "spot scale-out")
        out = [d for d in st.decisions if d.spot >= 1]
        assert out and any("load" in r for r in out[0].reasons)
        spot = next(p["replica"] for p in _processes(amesh)
                    if p["pool"] == "spot" and p["health"] == "SERVING")
        # The cloud takes the spot replica back with a 5 s notice, and has no spot for now.
        # The replica serves on for 3 s of it (Drain admit_seconds), then stops admitting;
        # what is unfinished at 5 s resumes elsewhere: no client sees an error either way.
        out = subprocess.run([sys.executable, "-m", "cli", "preempt", spot,
                              "--notice", "5", "--admit-seconds", "3",
                              "--spot-unavailable-for", "900"], env=amesh.env, check=True,
                             capture_output=True, text=True, timeout=60)
        assert "admitting for 3s" in out.stderr and "Drain" not in out.stderr, out.stderr
        st = wait_for(amesh, lambda s: s.preemptions >= 1 and pool(s, "on-demand").ready >= 2,
                      240, "on-demand replacement")
        assert st.HasField("spot_available") and not st.spot_available
        served_before = load.done
        wait_for(amesh, lambda s: load.done > served_before + 8, 120, "serving continues")
    finally:
        load.finish()
    assert load.errors == [], sorted(set(load.errors))
    assert load.done > 0
    # Quiet: back to the on-demand floor, the extra replica drained and gone.
    st = wait_for(amesh, lambda s: pool(s, "on-demand").desired == 1
                  and pool(s, "on-demand").ready == 1, 120, "scale-in at zero traffic")
    assert any(d.removed for d in st.decisions)


def test_metrics_expose_every_decision(amesh):
    import urllib.request

    metrics = next(p.metrics for p in amesh.state.processes if p.role == "autoscaler")
    text = urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5).read().decode()
    for name in ('spotmesh_autoscaler_decisions_total{direction="up",pool="spot"}',
                 'spotmesh_autoscaler_decisions_total{direction="down",pool="on-demand"}',
                 "spotmesh_autoscaler_desired_replicas", "spotmesh_autoscaler_preemptions"):
        assert name in text
    warmed = [line for line in text.splitlines()
              if line.startswith("spotmesh_autoscaler_warmed_prefixes_total ")]
    assert warmed and float(warmed[0].split()[1]) >= 1  # new replicas got the hot prefix


def test_serving_continues_with_the_autoscaler_down(amesh):
    import os
    import signal

    replicas = [p for p in _processes(amesh) if p["health"] == "SERVING"]
    os.kill(next(p.pid for p in amesh.state.processes if p.role == "autoscaler"),
            signal.SIGKILL)
    with grpc.insecure_channel(amesh.gateway) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        for _ in range(3):
            resp = stub.Complete(gateway_pb2.GenerateRequest(
                prompt="autoscaler down", sampling=common_pb2.SamplingParams(max_tokens=8)),
                metadata=amesh.metadata, timeout=60)
            assert resp.finish_reason == common_pb2.FINISH_REASON_LENGTH
    # Its replicas outlive it (a restarted autoscaler adopts them).
    assert [p["replica"] for p in _processes(amesh) if p["health"] == "SERVING"] == \
        [p["replica"] for p in replicas]


def test_ctrl_c_stops_the_autoscalers_replicas_too(amesh):
    pids = [p["pid"] for p in _processes(amesh) if p["pid"]]
    assert amesh.stop() == 0
    from spotmesh.processes import pid_alive

    assert not [pid for pid in pids if pid_alive(pid)]


def _processes(mesh) -> list[dict]:
    import json

    out = subprocess.run([sys.executable, "-m", "cli", "status"], env=mesh.env,
                         capture_output=True, text=True, check=True)
    return [p for p in json.loads(out.stdout)["processes"] if p["role"] == "inference"]
