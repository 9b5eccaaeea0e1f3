"""The autoscaler's cluster-mode signal source, `PrometheusSource`.

Parsing, staleness and every failure mode run against a tiny fake of Prometheus' HTTP API (a
real HTTP server answering canned JSON); the last test runs a real Prometheus scraping a real
mesh started by `spotmesh up`, and reads the replica's signals back through it.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest

from services.autoscaler.prometheus import PrometheusSource, SignalsUnavailable

NOW = 1_800_000_000.0  # Unix seconds, as Prometheus' timestamps are
SPOT, OD = "10.0.0.1:8000", "10.0.0.2:8000"


class FakePrometheus:
    """Answers ``/api/v1/query`` from a table: PromQL text -> (HTTP status, body)."""

    def __init__(self) -> None:
        self.answers: dict[str, tuple[int, bytes]] = {}
        self.seen: list[dict[str, str]] = []
        self.gate: threading.Event | None = None  # set: the handler waits for it
        self.arrived = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                params = dict(urllib.parse.parse_qsl(url.query))
                fake.seen.append(params)
                fake.arrived.set()
                if fake.gate is not None and not fake.gate.wait(10):
                    status, body = 503, b"gate never opened"
                elif url.path != "/api/v1/query":
                    status, body = 404, b"404 page not found"
                else:
                    status, body = fake.answers.get(params.get("query", ""),
                                                    (200, vector([])))
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    def close(self) -> None:
        if self.gate is not None:
            self.gate.set()
        self.server.shutdown()
        self.server.server_close()


def vector(series: list[tuple[dict[str, str], str]], at: float = NOW) -> bytes:
    """A successful instant-vector answer; `at` is what Prometheus puts beside each value."""
    return json.dumps({"status": "success", "data": {"resultType": "vector", "result": [
        {"metric": labels, "value": [at, value]} for labels, value in series]}}).encode()


@pytest.fixture
def fake():
    f = FakePrometheus()
    yield f
    f.close()


def answer(fake: FakePrometheus, source: PrometheusSource, name: str,
           series: list[tuple[dict[str, str], str]], status: int = 200) -> None:
    fake.answers[source.queries[name]] = (status, vector(series))


def healthy_fleet(fake: FakePrometheus, source: PrometheusSource) -> None:
    """A spot replica with a GPU and an on-demand one without, both scraped just now."""
    both = [SPOT, OD]
    answer(fake, source, "up", [({"instance": SPOT, "spotmesh_pool": "spot"}, "1"),
                                ({"instance": OD, "spotmesh_pool": "on-demand"}, "1")])
    answer(fake, source, "scraped_at", [({"instance": i}, str(NOW - 2)) for i in both])
    answer(fake, source, "waiting", [({"instance": SPOT}, "3"), ({"instance": OD}, "0")])
    answer(fake, source, "running", [({"instance": SPOT}, "5"), ({"instance": OD}, "1")])
    answer(fake, source, "kv_cache_usage", [({"instance": SPOT}, "0.62"),
                                            ({"instance": OD}, "0.05")])
    answer(fake, source, "observed_at", [({"instance": SPOT}, str(NOW - 2.5)),
                                         ({"instance": OD}, str(NOW - 4))])
    answer(fake, source, "draining", [({"instance": i}, "0") for i in both])
    answer(fake, source, "gpu_utilization_pct", [({"instance": SPOT}, "75")])
    answer(fake, source, "arrival_rate", [({}, "4.5")])


def read(source: PrometheusSource, now: float = NOW):
    return asyncio.run(source.read(None, now))


def test_each_replica_reports_its_pool_load_and_own_sample_time(fake):
    source = PrometheusSource(fake.url)
    healthy_fleet(fake, source)
    signals = read(source)
    by_name = {r.replica: r for r in signals.replicas}
    spot, od = by_name[SPOT], by_name[OD]
    assert (spot.pool, spot.state, spot.waiting, spot.running) == ("spot", "ready", 3, 5)
    assert spot.kv_cache_usage == 0.62
    assert spot.gpu_utilization == 0.75  # DCGM's percent as a fraction
    assert od.gpu_utilization == -1.0  # no DCGM series: unknown, not idle
    assert (od.pool, od.state, od.load) == ("on-demand", "ready", 1)
    # observed_at is the sample's own time, not the evaluation time beside every value.
    assert (spot.observed_at, od.observed_at) == (NOW - 2.5, NOW - 4)
    assert signals.arrival_rate_rps == 4.5 and signals.now == NOW
    # Every query is evaluated at the reconcile's clock.
    assert {p["time"] for p in fake.seen} == {f"{NOW:.3f}"}
    assert {p["query"] for p in fake.seen} == set(source.queries.values())


def test_a_failed_scrape_makes_the_replica_unreachable_not_idle(fake):
    source = PrometheusSource(fake.url)
    healthy_fleet(fake, source)
    answer(fake, source, "up", [({"instance": SPOT, "spotmesh_pool": "spot"}, "0"),
                                ({"instance": OD, "spotmesh_pool": "on-demand"}, "1")])
    # Prometheus marks a down target's series stale: only the other replica reports load.
    for name in ("waiting", "running", "kv_cache_usage", "observed_at"):
        body = json.loads(fake.answers[source.queries[name]][1])
        body["data"]["result"] = [s for s in body["data"]["result"]
                                  if s["metric"]["instance"] == OD]
        fake.answers[source.queries[name]] = (200, json.dumps(body).encode())
    by_name = {r.replica: r for r in read(source).replicas}
    assert by_name[SPOT].state == "unreachable"
    assert by_name[SPOT].observed_at == NOW - 2  # when the failed scrape was
    assert by_name[OD].state == "ready"


def test_a_sample_older_than_the_staleness_bound_is_unreachable(fake):
    source = PrometheusSource(fake.url, staleness_seconds=30)
    healthy_fleet(fake, source)
    answer(fake, source, "observed_at", [({"instance": SPOT}, str(NOW - 31)),
                                         ({"instance": OD}, str(NOW - 29))])
    by_name = {r.replica: r for r in read(source).replicas}
    assert by_name[SPOT].state == "unreachable" and by_name[SPOT].observed_at == NOW - 31
    assert by_name[OD].state == "ready"


def test_a_target_scraped_long_ago_is_unreachable(fake):
    # After a Prometheus restart its last samples still answer for five minutes.
    source = PrometheusSource(fake.url, staleness_seconds=30)
    healthy_fleet(fake, source)
    answer(fake, source, "scraped_at", [({"instance": SPOT}, str(NOW - 120)),
                                        ({"instance": OD}, str(NOW - 2))])
    by_name = {r.replica: r for r in read(source).replicas}
    assert by_name[SPOT].state == "unreachable"
    assert by_name[OD].state == "ready"


def test_a_target_up_without_load_metrics_is_unreachable(fake):
    source = PrometheusSource(fake.url)
    healthy_fleet(fake, source)
    answer(fake, source, "waiting", [({"instance": SPOT}, "3")])
    by_name = {r.replica: r for r in read(source).replicas}
    assert by_name[OD].state == "unreachable"
    assert by_name[SPOT].state == "ready"


def test_a_draining_replica_is_reported_draining(fake):
    source = PrometheusSource(fake.url)
    healthy_fleet(fake, source)
    answer(fake, source, "draining", [({"instance": SPOT}, "1"), ({"instance": OD}, "0")])
    by_name = {r.replica: r for r in read(source).replicas}
    assert by_name[SPOT].state == "draining" and by_name[SPOT].load == 8
    assert by_name[OD].state == "ready"


def test_no_gateway_series_yet_means_no_arrivals(fake):
    source = PrometheusSource(fake.url)
    healthy_fleet(fake, source)
    answer(fake, source, "arrival_rate", [])
    assert read(source).arrival_rate_rps == 0.0


def test_labels_are_configurable_and_dcgm_joins_on_its_own_label(fake):
    source = PrometheusSource(fake.url, pool_label="pool", replica_label="pod",
                              gpu_replica_label="exported_pod")
    assert all("spotmesh_pool" not in q and "instance" not in q
               for q in source.queries.values())
    answer(fake, source, "up", [({"pod": "inference-spot-7f9c", "pool": "spot"}, "1")])
    answer(fake, source, "scraped_at", [({"pod": "inference-spot-7f9c"}, str(NOW))])
    for name, value in (("waiting", "0"), ("running", "0"), ("kv_cache_usage", "0"),
                        ("observed_at", str(NOW))):
        answer(fake, source, name, [({"pod": "inference-spot-7f9c"}, value)])
    answer(fake, source, "gpu_utilization_pct",
           [({"exported_pod": "inference-spot-7f9c"}, "12.5")])
    [replica] = read(source).replicas
    assert (replica.replica, replica.pool, replica.state) == ("inference-spot-7f9c", "spot",
                                                              "ready")
    assert replica.gpu_utilization == 0.125


@pytest.mark.parametrize("name, value", [("waiting", "NaN"), ("kv_cache_usage", "+Inf"),
                                         ("arrival_rate", "NaN")])
def test_a_nan_value_stops_the_reading_naming_the_query(fake, name, value):
    source = PrometheusSource(fake.url)
    healthy_fleet(fake, source)
    labels = {} if name == "arrival_rate" else {"instance": SPOT}
    answer(fake, source, name, [(labels, value)])
    with pytest.raises(SignalsUnavailable) as caught:
        read(source)
    assert caught.value.query == source.queries[name]
    assert source.queries[name] in str(caught.value) and value in str(caught.value)


@pytest.mark.parametrize("status, body, expected", [
    (422, {"status": "error", "errorType": "execution", "error": "query timed out"},
     "HTTP 422"),
    (200, {"status": "error", "errorType": "bad_data", "error": "parse error"}, "bad_data"),
    (503, "Service Unavailable", "HTTP 503"),
    (200, "<html>a proxy's login page</html>", "not JSON"),
    (200, {"status": "success", "data": {"resultType": "matrix", "result": []}}, "matrix"),
])
def test_an_error_answer_stops_the_reading_naming_the_query(fake, status, body, expected):
    source = PrometheusSource(fake.url)
    healthy_fleet(fake, source)
    raw = json.dumps(body).encode() if isinstance(body, dict) else body.encode()
    fake.answers[source.queries["running"]] = (status, raw)
    with pytest.raises(SignalsUnavailable) as caught:
        read(source)
    assert caught.value.query == source.queries["running"]
    assert expected in str(caught.value)
    if isinstance(body, dict) and body["status"] == "error":
        assert body["error"] in str(caught.value)  # Prometheus' own explanation


def test_bad_values_and_labels_stop_the_reading(fake):
    source = PrometheusSource(fake.url)
    healthy_fleet(fake, source)
    answer(fake, source, "up", [({"instance": SPOT, "spotmesh_pool": "preemptible"}, "1")])
    with pytest.raises(SignalsUnavailable, match="preemptible"):
        read(source)
    healthy_fleet(fake, source)
    answer(fake, source, "kv_cache_usage", [({"instance": SPOT}, "62"),
                                            ({"instance": OD}, "0")])
    with pytest.raises(SignalsUnavailable, match="0-1 fraction"):
        read(source)
    healthy_fleet(fake, source)
    answer(fake, source, "gpu_utilization_pct", [({"instance": SPOT}, "140")])
    with pytest.raises(SignalsUnavailable, match="140"):
        read(source)
    healthy_fleet(fake, source)
    answer(fake, source, "waiting", [({"job": "inference"}, "1")])
    with pytest.raises(SignalsUnavailable, match="without the 'instance' label"):
        read(source)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_prometheus_stops_the_reading():
    source = PrometheusSource(f"http://127.0.0.1:{free_port()}", timeout_seconds=2)
    with pytest.raises(SignalsUnavailable, match="unreachable") as caught:
        read(source)
    assert caught.value.query in source.queries.values()


def test_a_prometheus_slower_than_the_timeout_stops_the_reading(fake):
    source = PrometheusSource(fake.url, timeout_seconds=0.2)
    fake.gate = threading.Event()  # never opened while the source waits
    with pytest.raises(SignalsUnavailable, match="unreachable"):
        read(source)


def test_reading_leaves_the_event_loop_free(fake):
    # The fake answers only once a coroutine on the same loop opens its gate: a source that
    # blocked the loop would never let it, and would see the gate's 503 instead.
    source = PrometheusSource(fake.url, timeout_seconds=30)
    healthy_fleet(fake, source)
    fake.gate = threading.Event()

    async def scenario():
        reading = asyncio.create_task(source.read(None, NOW))
        assert await asyncio.to_thread(fake.arrived.wait, 10)
        fake.gate.set()
        return await reading

    assert len(asyncio.run(scenario()).replicas) == 2


@pytest.mark.parametrize("kwargs, field", [
    ({"base_url": "localhost:9090"}, "base_url"),
    ({"base_url": "http://p:9090", "pool_label": 'x"} or vector(1) #'}, "pool_label"),
    ({"base_url": "http://p:9090", "replica_label": "pod-name"}, "replica_label"),
    ({"base_url": "http://p:9090", "staleness_seconds": 0}, "staleness_seconds"),
    ({"base_url": "http://p:9090", "timeout_seconds": -1}, "timeout_seconds"),
])
def test_configuration_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        PrometheusSource(**kwargs)


# --- a real Prometheus scraping a real mesh ---------------------------------------------------


def wait_until(predicate, timeout: float, what: str):
    """Polls until `predicate` returns something true; fails saying `what` never happened."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"{what}: not reached within {timeout:.0f}s")


def prometheus_config(mesh) -> dict:
    """Every process's /metrics; replicas carry their pool (and name) as target labels, the way
    deploy/'s relabelling attaches the pod label spotmesh.dev/pool."""
    others = [p.metrics for p in mesh.state.processes if p.role != "inference"]
    replicas = [{"targets": [p.metrics],
                 "labels": {"spotmesh_pool": p.pool, "spotmesh_replica": p.replica}}
                for p in mesh.replicas]
    return {"global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
            "scrape_configs": [{"job_name": "spotmesh",
                                "static_configs": [{"targets": others}, *replicas]}]}


def targets_up(url: str, expected: int, prom: subprocess.Popen, log: Path) -> bool:
    if prom.poll() is not None:
        raise AssertionError(f"prometheus exited with {prom.returncode}:\n"
                             f"{log.read_text(errors='replace')[-3000:]}")
    try:
        with urllib.request.urlopen(f"{url}/api/v1/targets", timeout=2) as resp:
            targets = json.load(resp)["data"]["activeTargets"]
    except OSError:
        return False  # still starting
    return len(targets) == expected and all(t["health"] == "up" for t in targets)


@pytest.mark.mesh
@pytest.mark.skipif(shutil.which("prometheus") is None,
                    reason="needs the prometheus binary on PATH (Debian: apt-get install "
                           "prometheus; .ci/run installs it)")
def test_real_prometheus_reports_the_mesh_replicas(tmp_path, tiny_model):
    from conftest import Mesh

    from spotmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

    mesh = Mesh(tmp_path / "mesh", "--replicas", "1", "--no-cache")
    prom: subprocess.Popen | None = None
    stop_traffic = threading.Event()
    traffic: threading.Thread | None = None
    try:
        config = tmp_path / "prometheus.yml"
        config.write_text(json.dumps(prometheus_config(mesh)))  # JSON is YAML
        url = f"http://127.0.0.1:{free_port()}"
        log = tmp_path / "prometheus.log"
        with open(log, "wb") as out:
            prom = subprocess.Popen(
                ["prometheus", f"--config.file={config}",
                 f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address={url.removeprefix('http://')}"],
                stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
        expected = len(mesh.state.processes)
        wait_until(lambda: targets_up(url, expected, prom, log), 60,
                   f"prometheus scraping all {expected} mesh processes")

        def send_traffic() -> None:
            # Long enough answers that a 1 s scrape finds the replica busy.
            sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=256)
            with grpc.insecure_channel(mesh.gateway) as ch:
                stub = gateway_pb2_grpc.GatewayStub(ch)
                while not stop_traffic.is_set():
                    for _ in stub.Generate(gateway_pb2.GenerateRequest(
                            prompt="Tell me about spot instances", sampling=sampling),
                            metadata=mesh.metadata, timeout=120):
                        pass

        traffic = threading.Thread(target=send_traffic, daemon=True)
        traffic.start()
        by_address = PrometheusSource(url)
        by_name = PrometheusSource(url, replica_label="spotmesh_replica")
        seen = {"load": 0, "rate": 0.0}

        def busy_and_counted():
            s = asyncio.run(by_address.read(None, time.time()))
            # A scrape can miss its 1 s timeout on two busy cores: such a reading says
            # "unreachable", rightly, and the next one is asked.
            ready = [r for r in s.replicas if r.state == "ready"]
            if ready:
                seen["load"] = max(seen["load"], ready[0].load)
                seen["rate"] = max(seen["rate"], s.arrival_rate_rps)
            return s if ready and seen["load"] > 0 and seen["rate"] > 0 else None

        signals = wait_until(busy_and_counted, 180,
                             "a busy replica and a positive arrival rate through Prometheus")
        [replica] = mesh.replicas
        [got] = signals.replicas
        assert (got.replica, got.pool, got.state) == (replica.metrics, replica.pool, "ready")
        assert got.waiting >= 0 and got.running >= 0
        assert math.isfinite(got.kv_cache_usage) and 0.0 <= got.kv_cache_usage <= 1.0
        assert got.gpu_utilization == -1.0  # no DCGM exporter here: unknown
        assert math.isfinite(got.observed_at) and got.observed_at <= signals.now
        assert math.isfinite(signals.arrival_rate_rps) and signals.arrival_rate_rps >= 0
        named = asyncio.run(by_name.read(None, time.time()))
        assert [(r.replica, r.pool) for r in named.replicas] == [(replica.replica,
                                                                  replica.pool)]

        stop_traffic.set()
        traffic.join(150)
        # A replica that dies (a spot reclaim without notice) stops being capacity.
        os.killpg(replica.pid, signal.SIGKILL)  # engine core included: no orphan

        def reported_unreachable():
            s = asyncio.run(by_address.read(None, time.time()))
            return s if [r.state for r in s.replicas] == ["unreachable"] else None

        gone = wait_until(reported_unreachable, 60, "the killed replica reported unreachable")
        assert gone.replicas[0].replica == replica.metrics

        # And without Prometheus there are no signals at all, said loudly.
        prom.terminate()
        prom.wait(30)
        with pytest.raises(SignalsUnavailable, match="unreachable"):
            asyncio.run(by_address.read(None, time.time()))
    finally:
        stop_traffic.set()
        if prom is not None and prom.poll() is None:
            prom.terminate()
            prom.wait(30)
        mesh.stop()
        if traffic is not None:
            traffic.join(150)
