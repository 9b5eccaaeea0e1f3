"""The whole spine over real loopback sockets: `spotmesh up` starts a gateway and two vLLM
replica processes with the tiny model; clients call the gateway as users do.

Tests run in file order; the last ones take replicas away (SIGTERM, Drain) and stop the mesh.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from spotmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, inference_pb2, inference_pb2_grpc

pytestmark = pytest.mark.mesh


def greedy(max_tokens: int = 16) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens)


@pytest.fixture(scope="module")
def stub(mesh):
    with grpc.insecure_channel(mesh.gateway) as ch:
        yield gateway_pb2_grpc.GatewayStub(ch)


def replica_load(address: str) -> inference_pb2.LoadReport:
    with grpc.insecure_channel(address) as ch:
        return inference_pb2_grpc.InferenceStub(ch).Load(inference_pb2.LoadRequest(), timeout=5)


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not reached in time")


def test_up_prints_address_key_and_client_command(mesh):
    banner = "".join(mesh.banner)
    assert f"gateway {mesh.gateway}" in banner
    assert mesh.api_key in banner
    assert "spotmesh generate" in banner and "grpcurl" in banner


def test_status_lists_every_process_with_health(mesh):
    out = subprocess.run([sys.executable, "-m", "cli", "status"], env=mesh.env,
                         capture_output=True, text=True, check=True)
    doc = json.loads(out.stdout)
    roles = sorted(p["role"] for p in doc["processes"])
    # Without the semantic cache the cache process still serves the prefix index.
    assert roles == ["cache", "gateway", "inference", "inference"]
    assert all(p["health"] == "SERVING" for p in doc["processes"])
    replicas = {p["replica"]: p["pool"] for p in doc["processes"] if p["role"] == "inference"}
    assert replicas == {"od-0": "on-demand", "spot-1": "spot"}


def test_generate_streams_tokens_from_the_engine(stub, mesh, tiny_model):
    from transformers import AutoTokenizer

    prompt_ids = AutoTokenizer.from_pretrained(str(tiny_model)).encode("Hello spot")
    msgs = list(stub.Generate(gateway_pb2.GenerateRequest(prompt="Hello spot", sampling=greedy()),
                              metadata=mesh.metadata, timeout=60))
    # Streamed: several messages (one per token, or a few tokens each when the reader lags and
    # vLLM merges deltas), adding up to exactly the completion.
    assert len(msgs) > 1
    assert msgs[0].served_by.replica in {"od-0", "spot-1"}
    assert msgs[0].request_id
    last = msgs[-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert last.usage.completion_tokens == 16
    assert last.usage.prompt_tokens == len(prompt_ids)  # tokenized once, by the gateway
    assert sum(len(m.token_ids) for m in msgs) == 16
    assert last.cost_usd > 0
    assert not last.cache_hit


def test_spotmesh_generate_streams_to_the_terminal(mesh):
    out = subprocess.run(
        [sys.executable, "-m", "cli", "generate", "Tell me about spot instances",
         "--max-tokens", "8"], env=mesh.env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
    assert "FINISH_REASON_LENGTH" in out.stderr and "completion 8 tokens" in out.stderr


def test_complete_returns_the_same_text_as_the_stream(stub, mesh):
    req = gateway_pb2.GenerateRequest(prompt="The same question", sampling=greedy(20))
    streamed = list(stub.Generate(req, metadata=mesh.metadata, timeout=60))
    whole = stub.Complete(req, metadata=mesh.metadata, timeout=60)
    assert whole.text == "".join(m.text for m in streamed)
    assert list(whole.token_ids) == [t for m in streamed for t in m.token_ids]
    assert whole.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert whole.usage.completion_tokens == 20


def test_chat_messages_are_rendered_with_the_chat_template(stub, mesh, tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    messages = [("system", "You are terse."), ("user", "What is a spot instance?")]
    expected = tok.apply_chat_template([{"role": r, "content": c} for r, c in messages],
                                       tokenize=True, add_generation_prompt=True)
    if isinstance(expected, dict) or hasattr(expected, "input_ids"):
        expected = expected["input_ids"]
    req = gateway_pb2.GenerateRequest(
        messages=[gateway_pb2.ChatMessage(role=r, content=c) for r, c in messages],
        sampling=greedy(4))
    resp = stub.Complete(req, metadata=mesh.metadata, timeout=60)
    assert resp.usage.prompt_tokens == len(expected)


def test_reflection_client_calls_generate_without_proto_files(mesh):
    """What grpcurl and ghz do: learn the schema from the server, build JSON requests."""
    from google.protobuf import descriptor_pool, json_format, message_factory
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(mesh.gateway) as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        services = db.get_services()
        pool = descriptor_pool.DescriptorPool(db)
        method = pool.FindServiceByName("spotmesh.v1.Gateway").FindMethodByName("Generate")
        req_cls = message_factory.GetMessageClass(method.input_type)
        resp_cls = message_factory.GetMessageClass(method.output_type)
        req = json_format.Parse(
            '{"prompt": "Hello from JSON", "sampling": {"temperature": 0, "maxTokens": 5}}',
            req_cls())
        call = ch.unary_stream("/spotmesh.v1.Gateway/Generate",
                               request_serializer=req_cls.SerializeToString,
                               response_deserializer=resp_cls.FromString)
        msgs = [json_format.MessageToDict(m) for m in call(req, metadata=mesh.metadata,
                                                            timeout=60)]
    assert sum(len(m.get("tokenIds", [])) for m in msgs) == 5
    assert msgs[-1]["finishReason"] == "FINISH_REASON_LENGTH"
    assert msgs[-1]["usage"]["completionTokens"] == 5
    for name in ("spotmesh.v1.Gateway", "grpc.health.v1.Health"):
        assert name in services


BAD_REQUESTS = [
    ("empty prompt", gateway_pb2.GenerateRequest(prompt=""),
     grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    ("whitespace prompt", gateway_pb2.GenerateRequest(prompt="   "),
     grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    ("prompt and messages", gateway_pb2.GenerateRequest(
        prompt="a", messages=[gateway_pb2.ChatMessage(role="user", content="b")]),
     grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    ("prompt over the context", gateway_pb2.GenerateRequest(prompt="word " * 4000),
     grpc.StatusCode.INVALID_ARGUMENT, "prompt is"),
    ("prompt over the byte limit", gateway_pb2.GenerateRequest(prompt="x" * 300_000),
     grpc.StatusCode.INVALID_ARGUMENT, "bytes"),
    ("max_tokens zero", gateway_pb2.GenerateRequest(
        prompt="a", sampling=common_pb2.SamplingParams(max_tokens=0)),
     grpc.StatusCode.INVALID_ARGUMENT, "sampling.max_tokens"),
    ("max_tokens negative", gateway_pb2.GenerateRequest(
        prompt="a", sampling=common_pb2.SamplingParams(max_tokens=-3)),
     grpc.StatusCode.INVALID_ARGUMENT, "sampling.max_tokens"),
    ("max_tokens over the limit", gateway_pb2.GenerateRequest(
        prompt="a", sampling=common_pb2.SamplingParams(max_tokens=100_000)),
     grpc.StatusCode.INVALID_ARGUMENT, "sampling.max_tokens"),
    ("max_tokens past the context", gateway_pb2.GenerateRequest(
        prompt="word " * 1000, sampling=common_pb2.SamplingParams(max_tokens=4000)),
     grpc.StatusCode.INVALID_ARGUMENT, "sampling.max_tokens"),
    ("negative temperature", gateway_pb2.GenerateRequest(
        prompt="a", sampling=common_pb2.SamplingParams(temperature=-0.5)),
     grpc.StatusCode.INVALID_ARGUMENT, "sampling.temperature"),
    ("NaN temperature", gateway_pb2.GenerateRequest(
        prompt="a", sampling=common_pb2.SamplingParams(temperature=float("nan"))),
     grpc.StatusCode.INVALID_ARGUMENT, "sampling.temperature"),
    ("top_p zero", gateway_pb2.GenerateRequest(
        prompt="a", sampling=common_pb2.SamplingParams(top_p=0.0)),
     grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p"),
    ("too many stops", gateway_pb2.GenerateRequest(
        prompt="a", sampling=common_pb2.SamplingParams(stop=["x"] * 9)),
     grpc.StatusCode.INVALID_ARGUMENT, "sampling.stop"),
    ("unknown role", gateway_pb2.GenerateRequest(
        messages=[gateway_pb2.ChatMessage(role="wizard", content="b")]),
     grpc.StatusCode.INVALID_ARGUMENT, "messages[0].role"),
    ("empty message", gateway_pb2.GenerateRequest(
        messages=[gateway_pb2.ChatMessage(role="user", content="")]),
     grpc.StatusCode.INVALID_ARGUMENT, "messages[0].content"),
    ("unknown model", gateway_pb2.GenerateRequest(prompt="a", model="gpt-17"),
     grpc.StatusCode.NOT_FOUND, "gpt-17"),
    ("bad request id", gateway_pb2.GenerateRequest(prompt="a", request_id="has space"),
     grpc.StatusCode.INVALID_ARGUMENT, "request_id"),
    ("unknown cache mode", gateway_pb2.GenerateRequest(
        prompt="a", cache=gateway_pb2.CacheControl(mode=7)),
     grpc.StatusCode.INVALID_ARGUMENT, "cache.mode"),
]


@pytest.mark.parametrize("method", ["Generate", "Complete"])
@pytest.mark.parametrize(("case", "request_", "code", "names"), BAD_REQUESTS,
                         ids=[c[0] for c in BAD_REQUESTS])
def test_bad_input_gets_a_precise_status_naming_the_field(stub, mesh, method, case, request_,
                                                          code, names):
    with pytest.raises(grpc.RpcError) as err:
        result = getattr(stub, method)(request_, metadata=mesh.metadata, timeout=30)
        if method == "Generate":
            list(result)
    assert err.value.code() == code, err.value.details()
    assert names in err.value.details()


@pytest.mark.parametrize(("metadata", "why"), [
    ([], "missing authorization"),
    ([("authorization", "Bearer sk-not-a-key")], "unknown API key"),
    ([("authorization", "Basic abc")], "Bearer"),
])
def test_missing_or_unknown_api_key_is_unauthenticated(stub, metadata, why):
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(gateway_pb2.GenerateRequest(prompt="hi"), metadata=metadata,
                           timeout=30))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert why in err.value.details()


def test_invalid_utf8_is_rejected_naming_the_field(mesh):
    raw = gateway_pb2.GenerateRequest(
        messages=[gateway_pb2.ChatMessage(role="user", content="ok"),
                  gateway_pb2.ChatMessage(role="user", content="XY")]).SerializeToString()
    raw = raw.replace(b"XY", b"\xff\xfe")
    with grpc.insecure_channel(mesh.gateway) as ch:
        call = ch.unary_stream("/spotmesh.v1.Gateway/Generate",
                               request_serializer=lambda b: b,
                               response_deserializer=gateway_pb2.GenerateResponse.FromString)
        with pytest.raises(grpc.RpcError) as err:
            list(call(raw, metadata=mesh.metadata, timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "messages[1].content is not valid UTF-8" in err.value.details()


def test_oversized_message_is_resource_exhausted(stub, mesh):
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(gateway_pb2.GenerateRequest(prompt="x" * (2 << 20)),
                           metadata=mesh.metadata, timeout=30))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def _all_replicas_idle(mesh) -> bool:
    loads = [replica_load(r.address) for r in mesh.replicas]
    return all(r.in_flight == 0 and r.running == 0 and r.waiting == 0 for r in loads)


def test_client_disconnect_mid_stream_aborts_the_engine_request(stub, mesh):
    stream = stub.Generate(gateway_pb2.GenerateRequest(prompt="long story", sampling=greedy(1500)),
                           metadata=mesh.metadata, timeout=120)
    first = [next(stream) for _ in range(3)]
    assert first[0].served_by.replica
    stream.cancel()
    wait_until(lambda: _all_replicas_idle(mesh))
    # Everyone else is still served.
    resp = stub.Complete(gateway_pb2.GenerateRequest(prompt="still there?", sampling=greedy(4)),
                         metadata=mesh.metadata, timeout=60)
    assert resp.usage.completion_tokens == 4


def test_client_deadline_reaches_the_replica(stub, mesh):
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(gateway_pb2.GenerateRequest(prompt="slow", sampling=greedy(1500)),
                           metadata=mesh.metadata, timeout=0.5))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: _all_replicas_idle(mesh))


def test_concurrent_requests_spread_over_replicas(stub, mesh):
    req = gateway_pb2.GenerateRequest(prompt="spread me", sampling=greedy(24))
    futures = [stub.Complete.future(req, metadata=mesh.metadata, timeout=120) for _ in range(8)]
    served = [f.result().served_by.replica for f in futures]
    assert set(served) == {"od-0", "spot-1"}


def test_every_server_exposes_metrics_health_and_reflection(mesh):
    gw = mesh.state.gateway()
    text = urllib.request.urlopen(f"http://{gw.metrics}/metrics", timeout=5).read().decode()
    for name in ("spotmesh_gateway_requests_total", "spotmesh_gateway_time_to_first_token_seconds",
                 "spotmesh_gateway_inter_token_latency_seconds", "spotmesh_gateway_tokens_total",
                 "spotmesh_gateway_queue_depth", "spotmesh_gateway_cost_usd_total"):
        assert name in text
    assert 'code="INVALID_ARGUMENT"' in text
    replica = mesh.replicas[0]
    text = urllib.request.urlopen(f"http://{replica.metrics}/metrics", timeout=5).read().decode()
    for name in ("spotmesh_inference_requests_total", "spotmesh_inference_queue_depth",
                 "spotmesh_inference_time_to_first_token_seconds", "vllm:num_requests_waiting"):
        assert name in text
    for p in mesh.state.processes:
        with grpc.insecure_channel(p.address) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                        timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_sigterm_lets_an_in_flight_stream_finish(stub, mesh):
    stream = stub.Generate(gateway_pb2.GenerateRequest(prompt="finish me", sampling=greedy(200)),
                           metadata=mesh.metadata, timeout=120)
    first = next(stream)
    victim = next(r for r in mesh.replicas if r.replica == first.served_by.replica)
    os.kill(victim.pid, signal.SIGTERM)
    rest = list(stream)
    assert rest[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert rest[-1].usage.completion_tokens == 200
    wait_until(lambda: subprocess.run(["kill", "-0", str(victim.pid)],
                                      capture_output=True).returncode != 0, timeout=60)
    # New work goes to the replica that is left.
    other = next(r for r in mesh.replicas if r.pid != victim.pid)
    resp = stub.Complete(gateway_pb2.GenerateRequest(prompt="who serves?", sampling=greedy(2)),
                         metadata=mesh.metadata, timeout=60)
    assert resp.served_by.replica == other.replica


def test_drained_replica_refuses_work_and_gateway_answers_unavailable(stub, mesh):
    survivor = next(r for r in mesh.replicas if _alive(r.pid))
    with grpc.insecure_channel(survivor.address) as ch:
        inference = inference_pb2_grpc.InferenceStub(ch)
        inference.Drain(inference_pb2.DrainRequest(grace_seconds=5), timeout=5)
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as err:
            list(inference.Generate(inference_pb2.InferenceRequest(
                request_id="direct", prompt_token_ids=[1, 2], sampling=greedy(2)), timeout=10))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert replica_load(survivor.address).draining
    time.sleep(1.5)  # the gateway's next Load poll sees the drain

    with pytest.raises(grpc.RpcError) as err:
        stub.Complete(gateway_pb2.GenerateRequest(prompt="anyone?"), metadata=mesh.metadata,
                      timeout=30)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "retry" in err.value.details()


def test_ctrl_c_stops_every_process(mesh):
    pids = [p.pid for p in mesh.state.processes]
    assert mesh.stop() == 0
    assert not any(_alive(pid) for pid in pids)
    assert not (mesh.state_dir / "mesh.json").exists()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


