"""The embedder: the three encoder backends computing the same vectors, the micro-batcher's
merging and failure isolation (with a fake encoder, so every assertion is about structure, not
timing), and the gRPC surface in process over a real loopback socket.

The real model is loaded once per session and exported to ONNX once, into a temporary cache.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from services.embedder import onnx_export
from services.embedder.batcher import BatcherClosed, EncoderFailed, MicroBatcher, QueueFull
from services.embedder.config import MAX_TEXT_BYTES, MAX_TEXTS, parse
from services.embedder.encoders import Encoder, EncoderUnavailable, default_model_dir, pool
from services.embedder.model import load_encoder
from services.embedder.server import EmbedderServicer
from spotmesh.config import ServerConfig
from spotmesh.runtime import ServerProcess, add_servicer
from spotmesh.v1 import embedder_pb2, embedder_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
SERVICE = embedder_pb2.DESCRIPTOR.services_by_name["Embedder"]

# Real sentences (STS-B and Banking77 style), short and long, with punctuation and accents.
SENTENCES = [
    "A plane is taking off.",
    "An air plane is taking off.",
    "A man is playing a large flute.",
    "Three men are playing chess.",
    "What can I do if my card still hasn't arrived after 2 weeks?",
    "I have been waiting over a week. Is the card still coming?",
    "How do I top up my account with a bank transfer?",
    "Why was I charged an extra fee when I withdrew cash abroad?",
    "The café on the corner serves crêpes until midnight.",
    "ok",
    "Obama signs the stimulus bill into law, promising millions of new jobs over two years "
    "while Republicans warn that the spending will add to the deficit for decades to come.",
]
# (sentence, paraphrase, unrelated)
TRIPLES = [
    ("A plane is taking off.", "An air plane is taking off.", "A woman is slicing an onion."),
    (
        "My card still hasn't arrived after two weeks.",
        "I have been waiting for my new card for 14 days and it is not here yet.",
        "What is the exchange rate for euros today?",
    ),
    (
        "How can I reset my password?",
        "I forgot my password, how do I change it?",
        "The weather in Paris is lovely in spring.",
    ),
]


# --------------------------------------------------------------------------
# Real encoders, once per session


@pytest.fixture(scope="session")
def export_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("embedder-cache")


@pytest.fixture(scope="session")
def encoders(export_cache) -> dict[str, Encoder]:
    return {
        backend: load_encoder(backend, None, str(export_cache))
        for backend in ("torch", "onnx", "onnx-int8")
    }


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1)


def test_onnx_backends_agree_with_torch_on_real_sentences(encoders):
    reference = encoders["torch"].encode(SENTENCES)
    fp32 = _cosines(encoders["onnx"].encode(SENTENCES), reference)
    int8 = _cosines(encoders["onnx-int8"].encode(SENTENCES), reference)
    assert fp32.min() >= 0.99, fp32
    assert int8.min() >= 0.95, int8


@pytest.mark.parametrize("backend", ["torch", "onnx", "onnx-int8"])
def test_vectors_are_unit_rows_in_order_and_independent_of_batch_neighbours(encoders, backend):
    enc = encoders[backend]
    vectors = enc.encode(SENTENCES)
    assert vectors.shape == (len(SENTENCES), enc.dim) == (len(SENTENCES), 384)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # Row i is sentence i, and the same vector it gets alone: a cache must see one text as one.
    alone = np.stack([enc.encode([s])[0] for s in SENTENCES])
    assert _cosines(vectors, alone).min() >= 0.999
    assert (enc.name, enc.backend, enc.max_seq_length) == ("all-MiniLM-L6-v2", backend, 256)


@pytest.mark.parametrize("backend", ["torch", "onnx", "onnx-int8"])
def test_paraphrases_are_closer_than_unrelated_sentences(encoders, backend):
    for sentence, paraphrase, unrelated in TRIPLES:
        a, p, u = encoders[backend].encode([sentence, paraphrase, unrelated])
        assert a @ p > a @ u + 0.2, (sentence, float(a @ p), float(a @ u))


def test_onnx_truncates_long_texts_like_sentence_transformers(encoders):
    long = " ".join(SENTENCES * 20)  # far past 256 tokens
    onnx = encoders["onnx"].encode([long, "short"])
    torch = encoders["torch"].encode([long, "short"])
    assert _cosines(onnx, torch).min() >= 0.999


def test_export_is_reused_and_marked_with_its_source(encoders, export_cache):
    onnx_dir = export_cache / "all-MiniLM-L6-v2" / "onnx"
    marker = json.loads((onnx_dir / onnx_export.MARKER_FILE).read_text())
    assert marker["source"] == str(default_model_dir().resolve())
    assert marker["variant"] == "fp32"
    assert {"torch", "transformers", "onnx", "onnxruntime"} <= set(marker["versions"])
    before = (onnx_dir / "model.onnx").stat()
    again = load_encoder("onnx", None, str(export_cache))
    after = (onnx_dir / "model.onnx").stat()
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
    assert again.encode(["ok"]).shape == (1, 384)
    int8 = json.loads(
        (export_cache / "all-MiniLM-L6-v2" / "onnx-int8" / "spotmesh-export.json").read_text()
    )
    assert int8["variant"] == "int8" and int8["quantization"] == onnx_export.INT8_OPTIONS
    # No temporary or swapped-out directories are left behind.
    assert sorted(p.name for p in (export_cache / "all-MiniLM-L6-v2").iterdir()) == [
        "onnx",
        "onnx-int8",
    ]


def test_a_changed_source_or_toolchain_is_not_taken_for_the_cached_export(export_cache):
    onnx_dir = export_cache / "all-MiniLM-L6-v2" / "onnx"
    src = onnx_export.read_source(default_model_dir())
    expected = onnx_export._expected_marker(src, quantized=False)
    assert onnx_export._is_current(onnx_dir, expected)
    for key, value in [
        ("source", "/elsewhere"),
        ("format", -1),
        ("versions", {"onnxruntime": "0.0"}),
    ]:
        assert not onnx_export._is_current(onnx_dir, {**expected, key: value})


def test_load_encoder_refusals_are_one_clear_line(tmp_path):
    with pytest.raises(EncoderUnavailable, match="unknown backend 'tensorrt'"):
        load_encoder("tensorrt", None)
    with pytest.raises(EncoderUnavailable, match="not a sentence-transformers model directory"):
        load_encoder("onnx", str(tmp_path))
    with pytest.raises(EncoderUnavailable, match="threads must be >= 1"):
        load_encoder("onnx", None, threads=0)


def test_pooling_matches_sentence_transformers_definitions():
    hidden = np.array([[[1.0, 2.0], [3.0, 6.0], [100.0, 100.0]]], dtype=np.float32)
    mask = np.array([[1, 1, 0]])  # the third token is padding and must not count
    np.testing.assert_allclose(pool(hidden, mask, ["mean"]), [[2.0, 4.0]])
    np.testing.assert_allclose(pool(hidden, mask, ["cls"]), [[1.0, 2.0]])
    np.testing.assert_allclose(pool(hidden, mask, ["max"]), [[3.0, 6.0]])
    np.testing.assert_allclose(pool(hidden, mask, ["lasttoken"]), [[3.0, 6.0]])
    np.testing.assert_allclose(
        pool(hidden, mask, ["mean_sqrt_len_tokens"]),
        [[4.0 / np.sqrt(2), 8.0 / np.sqrt(2)]],
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        pool(hidden, mask, ["weightedmean"]), [[(1 + 6) / 3, (2 + 12) / 3]], rtol=1e-6
    )
    np.testing.assert_allclose(pool(hidden, mask, ["cls", "mean"]), [[1.0, 2.0, 2.0, 4.0]])


# --------------------------------------------------------------------------
# The micro-batcher, with a fake encoder


class FakeEncoder(Encoder):
    """Text "t<k>" -> a unit vector carrying k, so order is checkable; records each call."""

    name = "fake"
    dim = 2
    backend = "fake"
    max_seq_length = 8

    def __init__(self, fail_on: str = "", gate: threading.Event | None = None) -> None:
        self.calls: list[list[str]] = []
        self.fail_on = fail_on
        self.gate = gate
        self.entered = threading.Event()

    def encode(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(30)
        if self.fail_on in texts:
            raise RuntimeError(f"cannot encode {self.fail_on}")
        k = np.array([float(t.lstrip("t") or 0) for t in texts], dtype=np.float32)
        return np.stack([np.cos(k / 1000), np.sin(k / 1000)], axis=1).astype(np.float32)


def _ids(vectors: np.ndarray) -> list[int]:
    return [round(float(x)) for x in np.arctan2(vectors[:, 1], vectors[:, 0]) * 1000]


def test_concurrent_callers_are_merged_into_one_encoder_call(loop_thread):
    enc = FakeEncoder()
    # A long wait makes merging certain; the batch is dispatched as soon as it is full.
    batcher = MicroBatcher(enc, max_batch_size=10, max_wait_ms=60_000)

    async def run():
        results = await asyncio.gather(*(batcher.embed([f"t{i}"]) for i in range(10)))
        await batcher.close()
        return results

    results = loop_thread.run(run())
    assert len(enc.calls) == 1 and len(enc.calls[0]) == 10
    assert [_ids(r) for r in results] == [[i] for i in range(10)]


def test_a_lone_caller_is_served_after_max_wait(loop_thread):
    enc = FakeEncoder()
    batcher = MicroBatcher(enc, max_batch_size=64, max_wait_ms=1)

    async def run():
        first = await batcher.embed(["t1", "t2"])
        second = await batcher.embed(["t3"])
        await batcher.close()
        return first, second

    first, second = loop_thread.run(run())
    assert (_ids(first), _ids(second)) == ([1, 2], [3])
    assert enc.calls == [["t1", "t2"], ["t3"]]


def test_batches_respect_max_batch_size_and_keep_order(loop_thread):
    enc = FakeEncoder()
    batcher = MicroBatcher(enc, max_batch_size=8, max_wait_ms=0)

    async def run():
        singles = [batcher.embed([f"t{i}"]) for i in range(25)]
        big = batcher.embed([f"t{100 + i}" for i in range(20)])  # larger than one batch
        results = await asyncio.gather(*singles, big)
        await batcher.close()
        return results

    results = loop_thread.run(run())
    assert all(len(call) <= 8 for call in enc.calls)
    assert sum(len(call) for call in enc.calls) == 45
    assert [_ids(r) for r in results[:-1]] == [[i] for i in range(25)]
    assert _ids(results[-1]) == [100 + i for i in range(20)]
    # The first 25 single callers fill batches exactly: merging really happened.
    assert [len(c) for c in enc.calls[:3]] == [8, 8, 8]


def test_an_encoder_error_fails_only_the_callers_in_that_batch(loop_thread):
    enc = FakeEncoder(fail_on="t666")
    batcher = MicroBatcher(enc, max_batch_size=2, max_wait_ms=60_000)

    async def run():
        outcomes = await asyncio.gather(
            batcher.embed(["t1"]),
            batcher.embed(["t666"]),
            batcher.embed(["t3"]),
            batcher.embed(["t4"]),
            return_exceptions=True,
        )
        after = await batcher.embed(["t5", "t6"])  # the worker survived
        await batcher.close()
        return outcomes, after

    outcomes, after = loop_thread.run(run())
    assert enc.calls[:2] == [["t1", "t666"], ["t3", "t4"]]
    assert isinstance(outcomes[0], EncoderFailed) and isinstance(outcomes[1], EncoderFailed)
    assert "cannot encode t666" in str(outcomes[1])
    assert [_ids(outcomes[2]), _ids(outcomes[3]), _ids(after)] == [[3], [4], [5, 6]]


def test_a_full_queue_refuses_at_once_while_the_encoder_keeps_running(loop_thread):
    gate = threading.Event()
    enc = FakeEncoder(gate=gate)
    batcher = MicroBatcher(enc, max_batch_size=4, max_wait_ms=0, max_queue=4)

    async def run():
        loop = asyncio.get_running_loop()
        with pytest.raises(QueueFull):  # more than the queue could ever hold
            await batcher.embed([f"t{i}" for i in range(5)])
        in_flight = asyncio.ensure_future(batcher.embed(["t1"]))
        assert await loop.run_in_executor(None, enc.entered.wait, 30)
        # The encoder is busy in its thread; the loop still accepts and queues callers.
        waiting = asyncio.ensure_future(batcher.embed(["t2", "t3", "t4", "t5"]))
        await asyncio.sleep(0)
        queued = batcher.queued
        with pytest.raises(QueueFull) as full:
            await batcher.embed(["t6"])
        gate.set()
        results = await in_flight, await waiting
        await batcher.close()
        return queued, full.value, results

    queued, full, (first, rest) = loop_thread.run(run())
    assert queued == 4
    assert (full.waiting, full.incoming, full.limit) == (4, 1, 4)
    assert (_ids(first), _ids(rest)) == ([1], [2, 3, 4, 5])
    assert enc.calls == [["t1"], ["t2", "t3", "t4", "t5"]]


def test_cancelled_callers_cost_no_encoder_time_and_close_fails_the_rest(loop_thread):
    gate = threading.Event()
    enc = FakeEncoder(gate=gate)
    batcher = MicroBatcher(enc, max_batch_size=1, max_wait_ms=0)

    async def run():
        loop = asyncio.get_running_loop()
        busy = asyncio.ensure_future(batcher.embed(["t1"]))
        assert await loop.run_in_executor(None, enc.entered.wait, 30)
        gone = asyncio.ensure_future(batcher.embed(["t2"]))
        kept = asyncio.ensure_future(batcher.embed(["t3"]))
        await asyncio.sleep(0)
        gone.cancel()
        gate.set()
        await busy
        await kept
        late = asyncio.ensure_future(batcher.embed(["t4"]))
        await asyncio.sleep(0)
        await batcher.close()
        with pytest.raises(BatcherClosed):
            await batcher.embed(["t5"])
        return await asyncio.gather(late, return_exceptions=True)

    (late,) = loop_thread.run(run())
    assert ["t2"] not in enc.calls and ["t3"] in enc.calls
    # t4 was either encoded before close or failed by it; never left hanging.
    assert isinstance(late, BatcherClosed | np.ndarray)


def test_batcher_metrics_count_batches_and_texts(loop_thread):
    def sample(name: str) -> float:
        return REGISTRY.get_sample_value(name) or 0.0

    before = (
        sample("spotmesh_embedder_texts_total"),
        sample("spotmesh_embedder_batch_size_count"),
        sample("spotmesh_embedder_encode_seconds_count"),
    )
    batcher = MicroBatcher(FakeEncoder(), max_batch_size=3, max_wait_ms=60_000)

    async def run():
        await asyncio.gather(*(batcher.embed([f"t{i}"]) for i in range(3)))
        await batcher.close()

    loop_thread.run(run())
    after = (
        sample("spotmesh_embedder_texts_total"),
        sample("spotmesh_embedder_batch_size_count"),
        sample("spotmesh_embedder_encode_seconds_count"),
    )
    assert [a - b for a, b in zip(after, before, strict=True)] == [3, 1, 1]
    assert sample("spotmesh_embedder_queue_depth") == 0


# --------------------------------------------------------------------------
# The gRPC surface, in process over loopback


class Server:
    def __init__(self, loop_thread, encoder: Encoder, **batcher_kw) -> None:
        self.loop_thread = loop_thread

        async def start():
            self.batcher = MicroBatcher(encoder, **batcher_kw)
            self.proc = ServerProcess(
                "embedder", ServerConfig(port=0, metrics_port=-1), [SERVICE.full_name]
            )
            servicer = EmbedderServicer(self.batcher)
            return await self.proc.start(lambda s: add_servicer(s, servicer, SERVICE))

        self.address = loop_thread.run(start()).address
        self.channel = grpc.insecure_channel(self.address)
        self.stub = embedder_pb2_grpc.EmbedderStub(self.channel)

    def stop(self) -> None:
        self.channel.close()

        async def stop():
            assert self.proc.server is not None
            await self.proc.server.stop(None)
            await self.batcher.close()

        self.loop_thread.run(stop())


@pytest.fixture(scope="module")
def server(loop_thread, encoders):
    s = Server(loop_thread, encoders["onnx"], max_batch_size=64, max_wait_ms=2)
    yield s
    s.stop()


def test_embed_returns_unit_vectors_in_order_with_model_dim_and_backend(server, encoders):
    texts = ["How do I top up my card?", "A plane is taking off.", "ok"]
    resp = server.stub.Embed(embedder_pb2.EmbedRequest(texts=texts), timeout=30)
    assert (resp.model, resp.dim, resp.backend) == ("all-MiniLM-L6-v2", 384, "onnx")
    got = np.array([list(e.values) for e in resp.embeddings], dtype=np.float32)
    assert got.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert _cosines(got, encoders["onnx"].encode(texts)).min() >= 0.9999


def test_concurrent_rpcs_each_get_their_own_vector(server, encoders):
    texts = SENTENCES[:8]
    futures = [
        server.stub.Embed.future(embedder_pb2.EmbedRequest(texts=[t]), timeout=30) for t in texts
    ]
    got = np.array([list(f.result().embeddings[0].values) for f in futures], dtype=np.float32)
    assert _cosines(got, encoders["onnx"].encode(texts)).min() >= 0.9999


@pytest.mark.parametrize(
    ("texts", "names"),
    [
        ([], "texts must hold 1-256 texts"),
        ([""], "texts[0] is empty"),
        (["fine", ""], "texts[1] is empty"),
        (["t"] * (MAX_TEXTS + 1), "got 257"),
        (["fine", "x" * (MAX_TEXT_BYTES + 1)], "texts[1] is 65537 bytes"),
        (["é" * (MAX_TEXT_BYTES // 2 + 1)], "texts[0] is 65538 bytes"),  # 2 bytes per character
    ],
)
def test_invalid_requests_name_the_field(server, texts, names):
    with pytest.raises(grpc.RpcError) as err:
        server.stub.Embed(embedder_pb2.EmbedRequest(texts=texts), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert names in err.value.details()


def test_a_text_of_exactly_the_limit_is_accepted(server):
    resp = server.stub.Embed(embedder_pb2.EmbedRequest(texts=["a" * MAX_TEXT_BYTES]), timeout=30)
    assert len(resp.embeddings) == 1


def test_invalid_utf8_is_invalid_argument_naming_the_text(server):
    call = server.channel.unary_unary(
        f"/{SERVICE.full_name}/Embed",
        request_serializer=lambda b: b,
        response_deserializer=embedder_pb2.EmbedResponse.FromString,
    )
    good = embedder_pb2.EmbedRequest(texts=["fine"]).SerializeToString()
    bad = good + b"\x0a\x02\xc3\x28"  # a second text whose bytes are not UTF-8
    with pytest.raises(grpc.RpcError) as err:
        call(bad, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "texts[1] is not valid UTF-8" in err.value.details()


def test_health_and_reflection_are_registered(server):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    health = health_pb2_grpc.HealthStub(server.channel)
    for name in ("", SERVICE.full_name):
        resp = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    services = ProtoReflectionDescriptorDatabase(server.channel).get_services()
    assert {SERVICE.full_name, "grpc.health.v1.Health"} <= set(services)


def test_overload_is_resource_exhausted_and_encoder_failure_internal(loop_thread):
    s = Server(loop_thread, FakeEncoder(fail_on="t666"), max_queue=2, max_wait_ms=0)
    try:
        with pytest.raises(grpc.RpcError) as full:
            s.stub.Embed(embedder_pb2.EmbedRequest(texts=["t1", "t2", "t3"]), timeout=30)
        with pytest.raises(grpc.RpcError) as failed:
            s.stub.Embed(embedder_pb2.EmbedRequest(texts=["t666"]), timeout=30)
        ok = s.stub.Embed(embedder_pb2.EmbedRequest(texts=["t7"]), timeout=30)
    finally:
        s.stop()
    assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue is full" in full.value.details()
    assert failed.value.code() == grpc.StatusCode.INTERNAL
    assert "cannot encode t666" in failed.value.details()
    assert (ok.backend, ok.dim, len(ok.embeddings)) == ("fake", 2, 1)


# --------------------------------------------------------------------------
# The process


def test_config_defaults_and_refusals():
    cfg = parse([])
    assert (cfg.backend, cfg.max_batch_size, cfg.max_wait_ms, cfg.max_queue, cfg.threads) == (
        "onnx",
        64,
        0.0,
        4096,
        1,
    )
    # A request at the contract's limits must reach the servicer, not die in the transport.
    assert cfg.server.max_message_bytes > MAX_TEXTS * MAX_TEXT_BYTES
    for bad in (
        ["--max-batch-size", "0"],
        ["--max-queue", "10"],
        ["--threads", "0"],
        ["--backend", "tensorrt"],
    ):
        with pytest.raises(SystemExit):
            parse(bad)


def test_main_serves_until_sigterm_then_exits_cleanly(encoders, export_cache, tmp_path):
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.embedder",
            "--port",
            "0",
            "--metrics-port",
            "-1",
            "--ready-file",
            str(ready),
            "--cache-dir",
            str(export_cache),
            "--backend",
            "onnx",
        ],
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "embedder did not become ready"
            time.sleep(0.1)
        address = json.loads(ready.read_text())["address"]
        with grpc.insecure_channel(address) as ch:
            resp = embedder_pb2_grpc.EmbedderStub(ch).Embed(
                embedder_pb2.EmbedRequest(texts=["hello"]), timeout=30
            )
        assert (resp.backend, resp.dim) == ("onnx", 384)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert not ready.exists()  # removed on the way out
    assert '"msg": "stopped"' in err
