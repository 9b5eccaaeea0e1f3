"""The replica's gRPC surface in process, over a real loopback socket, around the shared real
engine: drain, eviction after the grace period, request validation, Load."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from services.inference.server import InferenceServicer
from spotmesh.runtime import add_servicer
from spotmesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc

pytestmark = pytest.mark.engine


async def _serve(engine, info, grace: float):
    server = grpc.aio.server()
    servicer = InferenceServicer(engine, info, replica="test-replica", pool="spot",
                                 drain_grace_seconds=grace)
    add_servicer(server, servicer,
                 inference_pb2.DESCRIPTOR.services_by_name["Inference"])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, servicer, f"127.0.0.1:{port}"


def greedy(n: int) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(temperature=0.0, max_tokens=n)


def test_drain_evicts_streams_still_running_after_the_grace_period(vllm_engine, loop_thread):
    engine, info = vllm_engine

    async def run():
        server, _, address = await _serve(engine, info, grace=0.3)
        try:
            async with grpc.aio.insecure_channel(address) as ch:
                stub = inference_pb2_grpc.InferenceStub(ch)
                call = stub.Generate(inference_pb2.InferenceRequest(
                    request_id="evict-me", prompt_token_ids=[1, 9, 9], sampling=greedy(1900)))
                await call.read()
                drained = await stub.Drain(inference_pb2.DrainRequest())
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    while True:
                        msg = await call.read()
                        if msg is grpc.aio.EOF:
                            break
                refused = stub.Generate(inference_pb2.InferenceRequest(
                    request_id="late", prompt_token_ids=[1, 2], sampling=greedy(2)))
                with pytest.raises(grpc.aio.AioRpcError) as late:
                    await refused.read()
                load = await stub.Load(inference_pb2.LoadRequest())
                return drained, err.value, late.value, load
        finally:
            await server.stop(None)

    drained, err, late, load = loop_thread.run(run())
    assert drained.in_flight == 1
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "retry on another replica" in err.details()
    assert late.code() == grpc.StatusCode.UNAVAILABLE
    assert load.draining and load.in_flight == 0
    assert load.pool == common_pb2.POOL_SPOT and load.replica == "test-replica"


def test_a_reclaim_notice_drain_admits_until_admit_seconds_then_evicts(vllm_engine, loop_thread):
    """Drain with admit_seconds (a spot reclaim notice): the replica keeps taking new streams
    while its replacement starts, stops at admit_seconds, and evicts what is unfinished when
    the grace (counted from the Drain) ends."""
    engine, info = vllm_engine

    async def run():
        server, servicer, address = await _serve(engine, info, grace=30)
        try:
            async with grpc.aio.insecure_channel(address) as ch:
                stub = inference_pb2_grpc.InferenceStub(ch)
                bad = []
                for req in (inference_pb2.DrainRequest(grace_seconds=1, admit_seconds=2),
                            inference_pb2.DrainRequest(admit_seconds=-1),
                            inference_pb2.DrainRequest(admit_seconds=31)):
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await stub.Drain(req)
                    bad.append(err.value)
                assert servicer.drain.task is None  # a refused Drain starts nothing
                long = stub.Generate(inference_pb2.InferenceRequest(
                    request_id="long", prompt_token_ids=[1, 9, 9], sampling=greedy(1900)))
                await long.read()
                loop = asyncio.get_running_loop()
                await stub.Drain(inference_pb2.DrainRequest(grace_seconds=2.0, admit_seconds=1.0))
                announced = loop.time()
                # Inside the admit window: still serving, new work is taken and finishes.
                load_during = await stub.Load(inference_pb2.LoadRequest())
                during = [m async for m in stub.Generate(inference_pb2.InferenceRequest(
                    request_id="during", prompt_token_ids=[1, 2], sampling=greedy(2)))]
                await asyncio.sleep(max(0.0, announced + 1.2 - loop.time()))
                late = stub.Generate(inference_pb2.InferenceRequest(
                    request_id="late", prompt_token_ids=[1, 2], sampling=greedy(2)))
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await late.read()
                with pytest.raises(grpc.aio.AioRpcError) as evicted:
                    while await long.read() is not grpc.aio.EOF:
                        pass
                await servicer.drain.task
                load_after = await stub.Load(inference_pb2.LoadRequest())
                return bad, during, load_during, refused.value, evicted.value, load_after
        finally:
            await server.stop(None)

    bad, during, load_during, refused, evicted, load_after = loop_thread.run(run())
    assert [e.code() for e in bad] == [grpc.StatusCode.INVALID_ARGUMENT] * 3
    assert all("admit_seconds" in e.details() for e in bad)
    assert during and during[-1].finish_reason
    assert not load_during.draining
    assert refused.code() == grpc.StatusCode.UNAVAILABLE and "draining" in refused.details()
    assert evicted.code() == grpc.StatusCode.UNAVAILABLE
    assert load_after.draining and load_after.in_flight == 0


@pytest.mark.parametrize(("request_", "code", "names"), [
    (inference_pb2.InferenceRequest(request_id="", prompt_token_ids=[1]),
     grpc.StatusCode.INVALID_ARGUMENT, "request_id"),
    (inference_pb2.InferenceRequest(request_id="e", prompt_token_ids=[]),
     grpc.StatusCode.INVALID_ARGUMENT, "prompt_token_ids"),
    (inference_pb2.InferenceRequest(request_id="l", prompt_token_ids=[5] * 2048),
     grpc.StatusCode.INVALID_ARGUMENT, "prompt_token_ids"),
    (inference_pb2.InferenceRequest(request_id="m", prompt_token_ids=[1], sampling=greedy(2048)),
     grpc.StatusCode.INVALID_ARGUMENT, "sampling.max_tokens"),
    (inference_pb2.InferenceRequest(request_id="t", prompt_token_ids=[1],
                                    sampling=common_pb2.SamplingParams(temperature=3)),
     grpc.StatusCode.INVALID_ARGUMENT, "sampling.temperature"),
    (inference_pb2.InferenceRequest(request_id="v", prompt_token_ids=[1, 10**6]),
     grpc.StatusCode.INVALID_ARGUMENT, ""),
    (inference_pb2.InferenceRequest(request_id="w", model="other", prompt_token_ids=[1]),
     grpc.StatusCode.NOT_FOUND, "other"),
])
def test_replica_rejects_bad_requests_precisely(vllm_engine, loop_thread, request_, code, names):
    engine, info = vllm_engine

    async def run():
        server, _, address = await _serve(engine, info, grace=1)
        try:
            async with grpc.aio.insecure_channel(address) as ch:
                call = inference_pb2_grpc.InferenceStub(ch).Generate(request_)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    async for _ in call:
                        pass
                return err.value
        finally:
            await server.stop(None)

    err = loop_thread.run(run())
    assert err.code() == code, err.details()
    assert names in err.details()


def test_duplicate_request_id_in_flight_is_already_exists(vllm_engine, loop_thread):
    engine, info = vllm_engine

    async def run():
        server, _, address = await _serve(engine, info, grace=1)
        try:
            async with grpc.aio.insecure_channel(address) as ch:
                stub = inference_pb2_grpc.InferenceStub(ch)
                first = stub.Generate(inference_pb2.InferenceRequest(
                    request_id="dup", prompt_token_ids=[1, 3], sampling=greedy(500)))
                await first.read()
                second = stub.Generate(inference_pb2.InferenceRequest(
                    request_id="dup", prompt_token_ids=[1, 3], sampling=greedy(5)))
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await second.read()
                first.cancel()
                await asyncio.sleep(0.2)
                return err.value
        finally:
            await server.stop(None)

    err = loop_thread.run(run())
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
