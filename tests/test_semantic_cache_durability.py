"""An acknowledged Store survives SIGKILL: of the cache service on milvus-lite (the real
``python -m services.cache`` process, killed while stores are in flight, then restarted on the
same data directory), and of a real Milvus 2.3.5 server (its whole pid namespace killed, then
restarted on the same data). Entries that were in flight when the process died are either
absent or whole, never partial. Also: SIGTERM flushes, closes and releases the data directory,
and a Milvus outage is UNAVAILABLE, not INTERNAL, through the gRPC surface.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from cli.netns_milvus import NetnsMilvus, netns_problem
from services.cache.milvus import CacheUnavailable
from services.cache.options import CacheOptions
from services.cache.semantic import SemanticCache
from services.cache.server import SemanticCacheServicer
from spotmesh.runtime import add_servicer
from spotmesh.v1 import cache_pb2, cache_pb2_grpc, common_pb2

REPO = Path(__file__).resolve().parent.parent
DIM = 384
TOKEN = "durability-service-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
MODEL = "spotmesh-tiny"
FP = "fp1"
START_TIMEOUT = 180.0  # a bound against hanging, not a performance expectation


def unit(seed: int) -> list[float]:
    v = np.random.default_rng(seed).standard_normal(DIM)
    return (v / np.linalg.norm(v)).tolist()


def text_of(i: int) -> str:
    return f"answer {i}: " + "ünïcode and long enough to span pages " * 100


def tokens_of(i: int) -> list[int]:
    return list(range(i, i + 600))


def store_req(i: int) -> cache_pb2.StoreRequest:
    return cache_pb2.StoreRequest(
        tenant="durable", model=MODEL, sampling_fingerprint=FP, vector=unit(i),
        prompt=f"prompt {i}", text=text_of(i), token_ids=tokens_of(i), ttl_seconds=86400,
        finish_reason=common_pb2.FINISH_REASON_STOP,
        usage=common_pb2.Usage(prompt_tokens=3, completion_tokens=600), cost_usd=0.01 * i)


def lookup_req(i: int) -> cache_pb2.LookupRequest:
    return cache_pb2.LookupRequest(tenant="durable", model=MODEL, sampling_fingerprint=FP,
                                   vector=unit(i), threshold=0.999)


def assert_whole(answer: cache_pb2.CachedAnswer, i: int) -> None:
    assert answer.prompt == f"prompt {i}"
    assert answer.text == text_of(i)
    assert list(answer.token_ids) == tokens_of(i)
    assert answer.usage.completion_tokens == 600
    assert answer.cost_usd == pytest.approx(0.01 * i)


class Service:
    """The real cache service as a subprocess on a milvus-lite data directory."""

    def __init__(self, data: Path, *extra: str) -> None:
        self.ready = data / f"ready-{time.monotonic_ns()}.json"
        self.log = data / "service.log"
        env = {**os.environ, "SPOTMESH_CACHE_TOKEN": TOKEN}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "services.cache", "--port", "0", "--metrics-port", "-1",
                 "--milvus-uri", str(data / "cache.db"), "--ready-file", str(self.ready),
                 "--log-format", "text", *extra],
                stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        deadline = time.monotonic() + START_TIMEOUT
        while not self.ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"cache service did not start:\n{self.log.read_text()}")
            time.sleep(0.05)
        self.address = json.loads(self.ready.read_text())["address"]
        self.channel = grpc.insecure_channel(self.address)
        self.stub = cache_pb2_grpc.SemanticCacheStub(self.channel)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        code = self.proc.wait(60)
        self.channel.close()
        return code


def test_acknowledged_stores_survive_sigkill_of_the_lite_service(tmp_path):
    # No flushing at all: what survives, survives through milvus-lite's write-ahead log.
    service = Service(tmp_path, "--flush-every", "0", "--flush-seconds", "0")
    acked: set[int] = set()
    attempted: set[int] = set()
    counter = itertools.count()
    killed = threading.Event()
    lock = threading.Lock()

    def worker() -> None:
        while not killed.is_set():
            i = next(counter)
            with lock:
                attempted.add(i)
            try:
                service.stub.Store(store_req(i), metadata=AUTH, timeout=30)
            except grpc.RpcError:
                return  # the service is gone
            with lock:
                acked.add(i)
                # SIGKILL while the other workers' stores are in flight.
                if len(acked) >= 120 and not killed.is_set():
                    os.kill(service.proc.pid, signal.SIGKILL)
                    killed.set()

    with ThreadPoolExecutor(6) as pool:
        for _ in range(6):
            pool.submit(worker)
    assert service.proc.wait(30) == -signal.SIGKILL
    service.channel.close()
    assert len(acked) >= 120

    restarted = Service(tmp_path)
    try:
        present = 0
        for i in sorted(attempted):
            resp = restarted.stub.Lookup(lookup_req(i), metadata=AUTH, timeout=30)
            if i in acked:
                assert resp.hit, f"acknowledged entry {i} was lost"
            if resp.hit:
                assert_whole(resp.answer, i)
                present += 1
        stats = restarted.stub.Stats(cache_pb2.StatsRequest(tenant="durable"), metadata=AUTH)
        assert stats.entries == present >= len(acked)
    finally:
        assert restarted.stop() == 0


def test_sigterm_flushes_closes_and_releases_the_data_directory(tmp_path):
    service = Service(tmp_path, "--flush-every", "1000", "--flush-seconds", "0")
    for i in range(10):
        service.stub.Store(store_req(i), metadata=AUTH, timeout=30)
    assert service.stop(signal.SIGTERM) == 0
    log = service.log.read_text()
    assert "flushed and closed" in log
    # The WAL is empty after the final flush: everything is in sealed segments.
    wal = [p for p in tmp_path.rglob("wal_data_*.arrow") if p.stat().st_size > 0]
    assert wal == []
    # The directory lock went with the process: a new service opens it and finds everything.
    again = Service(tmp_path)
    try:
        stats = again.stub.Stats(cache_pb2.StatsRequest(), metadata=AUTH, timeout=30)
        assert stats.entries == 10
        assert_whole(again.stub.Lookup(lookup_req(3), metadata=AUTH).answer, 3)
    finally:
        assert again.stop() == 0


def test_a_data_directory_in_use_is_refused_with_the_reason(tmp_path):
    service = Service(tmp_path)
    try:
        with pytest.raises(CacheUnavailable, match="another process holds"):
            SemanticCache(CacheOptions(uri=str(tmp_path / "cache.db"), dim=DIM))
        env = {**os.environ, "SPOTMESH_CACHE_TOKEN": TOKEN}
        done = subprocess.run(
            [sys.executable, "-m", "services.cache", "--milvus-uri", str(tmp_path / "cache.db"),
             "--metrics-port", "-1"], capture_output=True, text=True, cwd=REPO, env=env,
            timeout=120)
        assert done.returncode != 0
        assert done.stderr.strip().splitlines()[-1].startswith(
            "cache: cannot open milvus-lite data at")
        assert "another process holds" in done.stderr
    finally:
        assert service.stop() == 0


@pytest.fixture(scope="module")
def own_milvus(tmp_path_factory):
    """A Milvus server of this module's own: the test kills it."""
    problem = netns_problem()
    if problem:
        pytest.skip(f"Milvus server tests need a private network namespace: {problem}")
    server = NetnsMilvus(tmp_path_factory.mktemp("milvus-killed")).start()
    yield server
    server.stop()


def test_acknowledged_stores_survive_sigkill_of_the_milvus_server(own_milvus, loop_thread):
    """Also: while Milvus is down every call is UNAVAILABLE, and the same servicer and client
    serve again once it is back, without a restart of the cache."""
    cache = SemanticCache(CacheOptions(uri=own_milvus.uri, dim=DIM, timeout_seconds=5.0,
                                       reconnect_seconds=0.5))

    async def start():
        server = grpc.aio.server()
        servicer = SemanticCacheServicer(cache, token=TOKEN, workers=2)
        add_servicer(server, servicer, cache_pb2.DESCRIPTOR.services_by_name["SemanticCache"])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, servicer, port

    server, servicer, port = loop_thread.run(start())
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = cache_pb2_grpc.SemanticCacheStub(channel)
    try:
        for i in range(40):
            stub.Store(store_req(i), metadata=AUTH, timeout=30)
        own_milvus.kill()  # SIGKILL: the kernel takes every Milvus process with the helper

        with pytest.raises(grpc.RpcError) as err:
            stub.Lookup(lookup_req(0), metadata=AUTH, timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "Milvus at unix:" in err.value.details()

        own_milvus.start()
        # Milvus reloads the collection by itself after a restart; until then: UNAVAILABLE.
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                first = stub.Lookup(lookup_req(0), metadata=AUTH, timeout=30)
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc.details()
                assert time.monotonic() < deadline, exc.details()
                time.sleep(1.0)
        assert first.hit
        for i in range(40):
            resp = stub.Lookup(lookup_req(i), metadata=AUTH, timeout=30)
            assert resp.hit, f"acknowledged entry {i} was lost"
            assert_whole(resp.answer, i)
    finally:
        channel.close()

        async def stop():
            await server.stop(None)
            try:
                await servicer.close()
            except CacheUnavailable:
                pass

        loop_thread.run(stop())

