"""Streams that survive their replica: the serving replica is killed (SIGKILL, its whole process
group, as a lost machine) in the middle of a greedy stream, and the gateway continues it on the
other replica from the prompt plus the tokens already sent. The client sees one stream whose
text equals an uninterrupted run's, byte for byte, with usage counted once."""

from __future__ import annotations

import os
import signal

import grpc
import pytest
from conftest import Mesh

from spotmesh.v1 import (
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
)

pytestmark = pytest.mark.mesh

PROMPT = "Tell me a long story about spot instances and the clouds that reclaim them."
MAX_TOKENS = 400


@pytest.fixture(scope="module")
def rmesh(tmp_path_factory, tiny_model):
    # Three replicas: one is drained, one killed, and each stream needs somewhere to go.
    m = Mesh(tmp_path_factory.mktemp("rmesh"), "--replicas", "3", "--no-cache")
    yield m
    m.stop()


def request() -> gateway_pb2.GenerateRequest:
    return gateway_pb2.GenerateRequest(
        prompt=PROMPT, sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))


def test_a_reclaim_notice_hands_unfinished_streams_over_before_the_deadline(rmesh):
    """The autoscaler's reclaim (Drain with a grace period) on the serving replica: it stops
    admitting, evicts what will not finish in time, and the gateway resumes it elsewhere."""
    with grpc.insecure_channel(rmesh.gateway) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        reference = stub.Complete(request(), metadata=rmesh.metadata, timeout=120)
        texts, served, final = [], [], None
        drained = None
        for msg in stub.Generate(request(), metadata=rmesh.metadata, timeout=120):
            texts.append(msg.text)
            if msg.served_by.replica:
                served.append(msg.served_by.replica)
            if drained is None:
                drained = next(r for r in rmesh.replicas if r.replica == served[0])
                with grpc.insecure_channel(drained.address) as rc:
                    inference_pb2_grpc.InferenceStub(rc).Drain(
                        inference_pb2.DrainRequest(grace_seconds=0.2), timeout=10)
            if msg.finish_reason:
                final = msg
        # New work never goes to the draining replica.
        again = stub.Complete(request(), metadata=rmesh.metadata, timeout=120)
    assert len(set(served)) == 2, served
    assert "".join(texts) == reference.text
    assert final.usage.completion_tokens == MAX_TOKENS
    assert again.served_by.replica != drained.replica


def test_a_stream_continues_on_another_replica_when_its_replica_dies(rmesh):
    with grpc.insecure_channel(rmesh.gateway) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        reference = stub.Complete(request(), metadata=rmesh.metadata, timeout=120)
        assert len(reference.token_ids) == MAX_TOKENS

        texts: list[str] = []
        tokens: list[int] = []
        served: list[str] = []
        final = None
        killed = None
        for msg in stub.Generate(request(), metadata=rmesh.metadata, timeout=120):
            texts.append(msg.text)
            tokens.extend(msg.token_ids)
            if msg.served_by.replica:
                served.append(msg.served_by.replica)
            if killed is None and len(tokens) >= 20:
                victim = next(r for r in rmesh.replicas if r.replica == served[0])
                os.killpg(victim.pid, signal.SIGKILL)
                killed = victim.replica
            if msg.finish_reason:
                final = msg
    assert killed is not None and len(set(served)) == 2, served
    assert "".join(texts) == reference.text
    assert tokens == list(reference.token_ids)
    assert final.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert final.usage.prompt_tokens == reference.usage.prompt_tokens
    assert final.usage.completion_tokens == MAX_TOKENS
