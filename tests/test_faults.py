"""Faults through real processes: a replica killed under load, the embedder killed, the gateway
killed (the supervisor restarts it on its port). Serving continues in each case, degraded and
counted in metrics, and no client sees an error it could not retry.

(Elsewhere: the cache service and the prefix service down in tests/test_mesh_cache.py and
tests/test_mesh_prefix.py, Milvus unreachable in tests/test_cache_server.py, the autoscaler down
in tests/test_autoscaler_live.py, a replica dying mid-stream in tests/test_resume.py.)
Tests run in file order, each taking a process away.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.request

import grpc
import pytest
from conftest import Mesh

from spotmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

pytestmark = pytest.mark.mesh


@pytest.fixture(scope="module")
def fmesh(tmp_path_factory, tiny_model):
    m = Mesh(tmp_path_factory.mktemp("fmesh"), "--replicas", "2")
    yield m
    m.stop()


def process(mesh, role: str):
    return next(p for p in mesh.state.processes if p.role == role)


def metric(address: str, name: str) -> float:
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def ask(mesh, text: str, mode=gateway_pb2.CACHE_MODE_DEFAULT, max_tokens: int = 24):
    with grpc.insecure_channel(mesh.gateway) as ch:
        return gateway_pb2_grpc.GatewayStub(ch).Complete(gateway_pb2.GenerateRequest(
            prompt=text, cache=gateway_pb2.CacheControl(mode=mode),
            sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens)),
            metadata=mesh.metadata, timeout=120)


def test_a_replica_killed_under_load_costs_no_request(fmesh):
    errors: list[str] = []
    done = [0]
    stop = threading.Event()

    def client(i: int) -> None:
        while not stop.is_set():
            try:
                ask(fmesh, f"load {i}", gateway_pb2.CACHE_MODE_BYPASS, max_tokens=64)
                done[0] += 1
            except grpc.RpcError as exc:
                errors.append(f"{exc.code().name}: {exc.details()}")

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(6)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while done[0] < 12 and time.monotonic() < deadline:
        time.sleep(0.1)
    victim = fmesh.replicas[0]
    os.killpg(victim.pid, signal.SIGKILL)  # the machine is gone, engine core included
    before = done[0]
    while done[0] < before + 24 and time.monotonic() < deadline:
        time.sleep(0.1)
    stop.set()
    for t in threads:
        t.join(120)
    assert done[0] >= before + 24
    assert errors == []
    gw = process(fmesh, "gateway")
    # In-flight streams moved (resumed) or restarted on the survivor.
    assert metric(gw.metrics, "spotmesh_gateway_stream_resumes_total") + \
        metric(gw.metrics, "spotmesh_gateway_start_retries_total") >= 1


def test_with_the_embedder_down_requests_are_served_without_the_cache(fmesh):
    gw = process(fmesh, "gateway")
    before = metric(gw.metrics, "spotmesh_gateway_cache_errors_total")
    os.killpg(process(fmesh, "embedder").pid, signal.SIGKILL)
    for i in range(3):
        resp = ask(fmesh, f"no embedder {i}")
        assert resp.finish_reason == common_pb2.FINISH_REASON_LENGTH and not resp.cache_hit
    assert metric(gw.metrics, "spotmesh_gateway_cache_errors_total") >= before + 3


def test_a_killed_gateway_is_restarted_on_its_port_and_clients_succeed_on_retry(fmesh):
    os.killpg(process(fmesh, "gateway").pid, signal.SIGKILL)
    with pytest.raises(grpc.RpcError) as err:
        ask(fmesh, "while the gateway is down", gateway_pb2.CACHE_MODE_BYPASS)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    deadline = time.monotonic() + 120
    while True:  # what a client with retries does
        try:
            resp = ask(fmesh, "after the restart", gateway_pb2.CACHE_MODE_BYPASS)
            break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() < deadline, "the gateway was not restarted"
            time.sleep(0.5)
    assert resp.finish_reason == common_pb2.FINISH_REASON_LENGTH
