"""The gateway's stream state machine driven with fake replicas and no gRPC server: retries
before the first token, resume after it, usage merged into one stream, errors passed on or
turned into UNAVAILABLE, and the replica's stream cancelled whenever the gateway stops reading."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import grpc
import pytest

from services.gateway.errors import Rejected
from services.gateway.ledger import CostLedger
from services.gateway.prefix import PrefixRouter
from services.gateway.ratelimit import RetryBudget
from services.gateway.relay import ReplicaRelay
from services.gateway.validation import ValidRequest
from spotmesh.sampling import Sampling
from spotmesh.v1 import common_pb2, inference_pb2

PROMPT = [1, 2, 3]


def failure(code: grpc.StatusCode, details: str = "boom") -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


class FakeCall:
    """One replica stream: ``tokens`` chunks, then the final one, or ``fail`` after
    ``fail_after`` chunks."""

    def __init__(self, request, tokens, fail, fail_after, final=True):
        self.request, self.tokens = request, tokens
        self.fail, self.fail_after, self.final = fail, fail_after, final
        self.cancelled = False

    def cancel(self):
        self.cancelled = True

    def __aiter__(self):
        return self._chunks()

    async def _chunks(self):
        for i, t in enumerate(self.tokens):
            if self.fail is not None and i == self.fail_after:
                raise self.fail
            chunk = inference_pb2.InferenceChunk(text=f"<{t}>", token_ids=[t])
            if self.final and i == len(self.tokens) - 1:
                chunk.finish_reason = common_pb2.FINISH_REASON_LENGTH
                chunk.usage.prompt_tokens = len(self.request.prompt_token_ids)
                chunk.usage.completion_tokens = len(self.tokens)
                chunk.replica_seconds = 0.5
            yield chunk
            await asyncio.sleep(0)
        if self.fail is not None and self.fail_after >= len(self.tokens):
            raise self.fail


@dataclass
class FakeReplica:
    name: str
    pool: str = "spot"
    fail: grpc.aio.AioRpcError | None = None
    fail_after: int = 0
    continuation: list[int] = field(default_factory=list)  # tokens it generates
    final: bool = True
    calls: list[FakeCall] = field(default_factory=list)
    in_flight: int = 0
    report: inference_pb2.LoadReport = field(default_factory=inference_pb2.LoadReport)

    @property
    def address(self) -> str:
        return self.name

    @property
    def stub(self):
        return self

    def Generate(self, request, timeout=None):
        n = request.sampling.max_tokens
        call = FakeCall(request, self.continuation[:n], self.fail, self.fail_after, self.final)
        self.calls.append(call)
        return call


class FakeReplicas:
    """The ReplicaSet surface the relay uses: pick in order, skipping those tried."""

    routing = "round-robin"

    def __init__(self, *replicas: FakeReplica) -> None:
        self.order = list(replicas)
        self.failed: list[str] = []
        self.ok: list[str] = []

    def block_size(self, model: str) -> int:
        return 0

    def pick(self, model, exclude=frozenset(), route=None):
        return next((r for r in self.order if r.address not in exclude), None)

    def mark_failed(self, replica):
        self.failed.append(replica.name)

    def mark_ok(self, replica):
        self.ok.append(replica.name)


class Client:
    def __init__(self, left: float | None = 30.0, cancelled: bool = False) -> None:
        self.left, self._cancelled = left, cancelled

    def time_remaining(self):
        return self.left

    def cancelled(self):
        return self._cancelled


def valid(max_tokens: int = 6) -> ValidRequest:
    return ValidRequest(model="m", prompt="x", messages=(),
                        sampling=Sampling(temperature=0.0, max_tokens=max_tokens),
                        cache_mode=0, request_id="req-1")


def relay(replicas: FakeReplicas, **kw) -> ReplicaRelay:
    return ReplicaRelay(replicas, PrefixRouter(), CostLedger({"spot": 3600.0, "on-demand": 7200}),
                        retry_budget=RetryBudget(), **kw)


async def collect(r: ReplicaRelay, client: Client | None = None, max_tokens: int = 6):
    return [m async for m in r.stream("tenant-a", valid(max_tokens), "m", PROMPT,
                                      client or Client(), 0.0, {})]


def run(coro):
    return asyncio.run(coro)


def test_a_replica_that_fails_before_the_first_token_is_retried_on_another():
    a = FakeReplica("a", fail=failure(grpc.StatusCode.UNAVAILABLE), continuation=[9])
    b = FakeReplica("b", continuation=[10, 11, 12, 13, 14, 15])
    replicas = FakeReplicas(a, b)
    msgs = run(collect(relay(replicas)))
    assert [t for m in msgs for t in m.token_ids] == [10, 11, 12, 13, 14, 15]
    assert msgs[0].served_by.replica == "b" and msgs[0].request_id == "req-1"
    assert replicas.failed == ["a"] and replicas.ok == ["b"]
    assert msgs[-1].cost_usd == pytest.approx(0.5)  # 0.5 replica-seconds at $3600/h


def test_a_stream_that_fails_mid_way_resumes_elsewhere_from_what_the_client_has():
    a = FakeReplica("a", continuation=[10, 11, 12, 13, 14, 15],
                    fail=failure(grpc.StatusCode.UNAVAILABLE), fail_after=2)
    b = FakeReplica("b", pool="on-demand", continuation=[12, 13, 14, 15])
    msgs = run(collect(relay(FakeReplicas(a, b))))
    assert [t for m in msgs for t in m.token_ids] == [10, 11, 12, 13, 14, 15]
    resumed = b.calls[0].request
    assert list(resumed.prompt_token_ids) == [*PROMPT, 10, 11]
    assert resumed.sampling.max_tokens == 4 and resumed.request_id == "req-1-resume-2"
    # One stream: one first message with a request id, one usage for everything.
    assert [m.request_id for m in msgs if m.request_id] == ["req-1"]
    assert msgs[-1].usage.prompt_tokens == 3 and msgs[-1].usage.completion_tokens == 6
    assert msgs[-1].served_by.replica == "b"
    assert a.calls[0].cancelled  # the failed call is let go of


def test_only_the_final_message_lost_is_finished_without_another_replica():
    a = FakeReplica("a", continuation=[10, 11, 12], final=False,
                    fail=failure(grpc.StatusCode.UNAVAILABLE), fail_after=3)
    b = FakeReplica("b", continuation=[99])
    msgs = run(collect(relay(FakeReplicas(a, b)), max_tokens=3))
    assert msgs[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert msgs[-1].usage.completion_tokens == 3 and not b.calls


def test_a_request_at_fault_is_passed_on_as_it_is():
    a = FakeReplica("a", fail=failure(grpc.StatusCode.INVALID_ARGUMENT, "bad ids"))
    b = FakeReplica("b", continuation=[1])
    with pytest.raises(Rejected) as err:
        run(collect(relay(FakeReplicas(a, b))))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "bad ids" in err.value.message
    assert not b.calls


def test_when_no_replica_can_start_it_the_client_gets_unavailable():
    down = failure(grpc.StatusCode.UNAVAILABLE)
    replicas = FakeReplicas(*(FakeReplica(n, fail=down) for n in "abcd"))
    with pytest.raises(Rejected) as err:
        run(collect(relay(replicas, start_attempts=3)))
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert "no replica available" in err.value.message
    assert replicas.failed == ["a", "b", "c"]  # three attempts, then it stops


def test_a_stream_past_its_resume_budget_ends_unavailable_saying_how_far_it_got():
    cut = failure(grpc.StatusCode.UNAVAILABLE)
    a = FakeReplica("a", continuation=[10, 11, 12, 13], fail=cut, fail_after=1)
    b = FakeReplica("b", continuation=[11, 12, 13], fail=cut, fail_after=1)
    with pytest.raises(Rejected) as err:
        run(collect(relay(FakeReplicas(a, b), resume_attempts=1), max_tokens=4))
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert "interrupted after 2 tokens" in err.value.message


def test_cancelled_by_the_replica_while_the_client_waits_is_retried():
    a = FakeReplica("a", fail=failure(grpc.StatusCode.CANCELLED))
    b = FakeReplica("b", continuation=[5])
    msgs = run(collect(relay(FakeReplicas(a, b)), max_tokens=1))
    assert [t for m in msgs for t in m.token_ids] == [5]


def test_a_client_that_stops_reading_cancels_the_replica_stream():
    a = FakeReplica("a", continuation=list(range(100, 110)))

    async def read_two():
        stream = relay(FakeReplicas(a)).stream("t", valid(10), "m", PROMPT, Client(), 0.0, {})
        got = [await anext(stream), await anext(stream)]
        await stream.aclose()
        return got

    assert len(run(read_two())) == 2
    assert a.calls[0].cancelled and a.in_flight == 0


def test_a_deadline_too_close_for_a_backoff_stops_the_retries():
    a = FakeReplica("a", fail=failure(grpc.StatusCode.UNAVAILABLE))
    b = FakeReplica("b", continuation=[5])
    with pytest.raises(Rejected):
        run(collect(relay(FakeReplicas(a, b)), client=Client(left=0.001), max_tokens=1))
    assert not b.calls
