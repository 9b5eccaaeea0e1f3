"""Malformed requests: a string field holding bytes that are not UTF-8 is answered
INVALID_ARGUMENT naming the field (not grpcio's INTERNAL "Exception deserializing request!"),
and well-formed requests are served as usual."""

from __future__ import annotations

import grpc
import pytest

from spotmesh.decoding import Undecodable, find_invalid_utf8, tolerant_deserializer
from spotmesh.runtime import add_servicer
from spotmesh.v1 import gateway_pb2, gateway_pb2_grpc, inference_pb2

# Serialized with a unique ASCII marker, then the marker is swapped for bytes of the same length
# that are not UTF-8, so every length prefix stays right and only the UTF-8 check fails.
MARK = "\x01MARK\x01"
BAD = b"\xff\xfeBA\xc3\x28"
assert len(BAD) == len(MARK.encode())


def corrupt(message) -> bytes:
    data = message.SerializeToString()
    assert data.count(MARK.encode()) == 1
    return data.replace(MARK.encode(), BAD)


def chat(*contents: str) -> list[gateway_pb2.ChatMessage]:
    return [gateway_pb2.ChatMessage(role="user", content=c) for c in contents]


CORRUPT_FIELDS = {
    "prompt": gateway_pb2.GenerateRequest(model="m", prompt=f"say {MARK}"),
    "model": gateway_pb2.GenerateRequest(model=MARK, prompt="hi"),
    "request_id": gateway_pb2.GenerateRequest(prompt="hi", request_id=MARK),
    "messages[0].content": gateway_pb2.GenerateRequest(messages=chat(MARK)),
    "messages[2].content": gateway_pb2.GenerateRequest(messages=chat("a", "b", MARK, "d")),
    "messages[1].role": gateway_pb2.GenerateRequest(
        messages=[*chat("a"), gateway_pb2.ChatMessage(role=MARK, content="b")]),
    "sampling.stop[0]": gateway_pb2.GenerateRequest(
        prompt="hi", sampling={"stop": [MARK, "x"]}),
    "sampling.stop[1]": gateway_pb2.GenerateRequest(
        prompt="hi", sampling={"temperature": 0.5, "stop": ["\n", MARK], "seed": 3}),
}


@pytest.mark.parametrize(("path", "message"), list(CORRUPT_FIELDS.items()),
                         ids=list(CORRUPT_FIELDS))
def test_invalid_utf8_is_blamed_on_its_field(path, message) -> None:
    data = corrupt(message)
    assert find_invalid_utf8(gateway_pb2.GenerateRequest.DESCRIPTOR, data) == path
    decoded = tolerant_deserializer(gateway_pb2.GenerateRequest)(data)
    assert isinstance(decoded, Undecodable)
    assert decoded.problem == f"{path} is not valid UTF-8"


def test_invalid_utf8_in_an_inference_request_names_the_field() -> None:
    data = corrupt(inference_pb2.InferenceRequest(request_id=MARK, prompt_token_ids=[1, 2]))
    decoded = tolerant_deserializer(inference_pb2.InferenceRequest)(data)
    assert isinstance(decoded, Undecodable)
    assert decoded.problem == "request_id is not valid UTF-8"


@pytest.mark.parametrize("data", [
    pytest.param(b"\xff\xff\xff", id="garbage"),
    pytest.param(b"\x12\x10short", id="length past the end"),
    # A valid prompt cut inside a two-byte character: truncated, not badly encoded.
    pytest.param(gateway_pb2.GenerateRequest(prompt="café").SerializeToString()[:-1],
                 id="truncated inside a character"),
])
def test_bytes_that_are_no_message_are_named_as_such(data: bytes) -> None:
    assert find_invalid_utf8(gateway_pb2.GenerateRequest.DESCRIPTOR, data) is None
    decoded = tolerant_deserializer(gateway_pb2.GenerateRequest)(data)
    assert isinstance(decoded, Undecodable)
    assert decoded.problem.startswith("request is not a valid spotmesh.v1.GenerateRequest")
    assert "UTF-8" not in decoded.problem


def _unknown_field(number: int, payload: bytes) -> bytes:
    key = (number << 3) | 2
    varint = bytearray()
    while key > 0x7F:
        varint.append((key & 0x7F) | 0x80)
        key >>= 7
    varint.append(key)
    return bytes(varint) + bytes([len(payload)]) + payload


@pytest.mark.parametrize("message", [
    gateway_pb2.GenerateRequest(),
    gateway_pb2.GenerateRequest(prompt="héllo — 世界 🙂", request_id="r1"),
    gateway_pb2.GenerateRequest(
        model="m", messages=chat("a", "b"), sampling={"stop": ["é", "\n"], "top_k": 5},
        cache={"mode": gateway_pb2.CACHE_MODE_REFRESH}),
], ids=["empty", "unicode prompt", "chat with sampling"])
def test_valid_bytes_parse_to_the_message(message) -> None:
    data = message.SerializeToString()
    assert find_invalid_utf8(gateway_pb2.GenerateRequest.DESCRIPTOR, data) is None
    assert tolerant_deserializer(gateway_pb2.GenerateRequest)(data) == message


def test_unknown_fields_from_newer_clients_are_not_utf8_checked() -> None:
    message = gateway_pb2.GenerateRequest(prompt="hi")
    data = message.SerializeToString() + _unknown_field(99, b"\xff\xfe")
    decoded = tolerant_deserializer(gateway_pb2.GenerateRequest)(data)
    assert not isinstance(decoded, Undecodable)
    assert decoded.prompt == "hi"


# -- over a real loopback socket ----------------------------------------------------------------

class FakeGateway:
    """Records what reached it; add_servicer must keep undecodable requests away from it."""

    def __init__(self) -> None:
        self.seen: list[gateway_pb2.GenerateRequest] = []

    async def Generate(self, request, context):
        self.seen.append(request)
        yield gateway_pb2.GenerateResponse(text=f"echo:{request.prompt}", request_id="g1")

    async def Complete(self, request, context):
        self.seen.append(request)
        return gateway_pb2.GenerateResponse(text=f"done:{request.prompt}", cost_usd=0.5)


async def _exercise_server() -> dict:
    servicer = FakeGateway()
    server = grpc.aio.server()
    add_servicer(server, servicer, gateway_pb2.DESCRIPTOR.services_by_name["Gateway"])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    out: dict = {}
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            # Raw-bytes callables: a well-behaved stub cannot send invalid UTF-8.
            raw_generate = channel.unary_stream(
                "/spotmesh.v1.Gateway/Generate",
                response_deserializer=gateway_pb2.GenerateResponse.FromString)
            raw_complete = channel.unary_unary(
                "/spotmesh.v1.Gateway/Complete",
                response_deserializer=gateway_pb2.GenerateResponse.FromString)
            bad = corrupt(gateway_pb2.GenerateRequest(messages=chat("ok", MARK)))

            async def error_of(call_coro):
                try:
                    await call_coro
                except grpc.aio.AioRpcError as exc:
                    return exc.code(), exc.details()
                return None

            async def drain(call):
                return [m async for m in call]

            out["generate_bad"] = await error_of(drain(raw_generate(bad, timeout=30)))
            out["complete_bad"] = await error_of(raw_complete(bad, timeout=30))
            out["generate_garbage"] = await error_of(
                drain(raw_generate(b"\xff\xff\xff", timeout=30)))
            out["seen_after_bad"] = len(servicer.seen)

            good = gateway_pb2.GenerateRequest(prompt="héllo")
            out["generate_good"] = await drain(stub.Generate(good, timeout=30))
            out["complete_good"] = await stub.Complete(good, timeout=30)
            out["seen"] = list(servicer.seen)
    finally:
        await server.stop(None)
    return out


@pytest.fixture(scope="module")
def served(loop_thread) -> dict:
    return loop_thread.run(_exercise_server(), timeout=120)


def test_invalid_utf8_gets_invalid_argument_naming_the_field(served) -> None:
    expected = (grpc.StatusCode.INVALID_ARGUMENT, "messages[1].content is not valid UTF-8")
    assert served["generate_bad"] == expected
    assert served["complete_bad"] == expected


def test_garbage_request_gets_invalid_argument(served) -> None:
    code, details = served["generate_garbage"]
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("request is not a valid spotmesh.v1.GenerateRequest")


def test_undecodable_requests_never_reach_the_servicer(served) -> None:
    assert served["seen_after_bad"] == 0


def test_valid_request_is_served(served) -> None:
    assert served["generate_good"] == [
        gateway_pb2.GenerateResponse(text="echo:héllo", request_id="g1")]
    assert served["complete_good"] == gateway_pb2.GenerateResponse(
        text="done:héllo", cost_usd=0.5)
    assert [r.prompt for r in served["seen"]] == ["héllo", "héllo"]
