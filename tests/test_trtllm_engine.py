"""TensorRTLLMEngine without TensorRT-LLM.

These tests check spotmesh's side of the TensorRT-LLM engine: the translation of sampling
parameters and engine configuration into the keyword arguments TensorRT-LLM's ``LLM`` API
documents, the quantization table, the turning of cumulative streamed outputs into delta
chunks, the reading of iteration stats into load reports, the import guard's message, and the
engine's request lifecycle (streaming, finish reasons, abort on early close) against a small
fake ``tensorrt_llm`` module put into ``sys.modules``.

What they do not prove: that the real library accepts these arguments or behaves as its source
reads (the field names were taken from the NVIDIA/TensorRT-LLM sources cited in
``trtllm_engine.py``, not run); anything about GPUs -- engine builds, quantization and its
calibration, KV-cache sizing, CUDA graphs, tensor parallelism, throughput; that real streamed
outputs, iteration-stats dicts or abort timings look like the fakes here; or how the engine
behaves under concurrent load. Those need an NVIDIA GPU with TensorRT-LLM installed.
"""

from __future__ import annotations

import asyncio
import enum
import importlib
import sys
import types
from types import SimpleNamespace

import pytest

from services.inference import trtllm_engine
from services.inference.config import EngineConfig
from services.inference.engine import (
    FINISH_ABORT,
    FINISH_LENGTH,
    FINISH_STOP,
    EngineError,
    Sampling,
)
from services.inference.trtllm_engine import (
    INSTALL_HINT,
    QUANT_ALGOS,
    TensorRTLLMEngine,
    chunk_from_output,
    engine_info,
    llm_backend,
    llm_kwargs,
    load_from_stats,
    quant_algo,
    sampling_params_kwargs,
)

# --- shapes of TensorRT-LLM's streamed outputs (tensorrt_llm/executor/result.py) -------------


def request_output(token_ids, text, *, finished=False, reason=None, prompt=(1, 2, 3), cached=0):
    """A RequestOutput as the library yields it while streaming: cumulative outputs[0]."""
    completion = SimpleNamespace(
        index=0, token_ids=list(token_ids), text=text, finish_reason=reason
    )
    return SimpleNamespace(
        outputs=[completion], finished=finished, prompt_token_ids=list(prompt), cached_tokens=cached
    )


# --- sampling ---------------------------------------------------------------------------------


def test_greedy_sampling_maps_to_top_k_one():
    kw = sampling_params_kwargs(Sampling(temperature=0.0, top_p=0.9, top_k=40, seed=7))
    assert kw["top_k"] == 1
    # temperature=0 is outside the C++ sampler's range; seed and top_p change nothing greedy.
    assert "temperature" not in kw and "top_p" not in kw and "seed" not in kw


def test_sampled_request_passes_temperature_and_top_p_explicitly():
    kw = sampling_params_kwargs(Sampling(temperature=0.7, top_p=1.0, top_k=0, max_tokens=12))
    assert kw["temperature"] == 0.7
    assert kw["top_p"] == 1.0  # unset would mean greedy/top_p=0 to the library
    assert "top_k" not in kw  # unset is TensorRT-LLM's "all logits", spotmesh's 0
    assert kw["max_tokens"] == 12
    assert kw["detokenize"] is True


def test_positive_top_k_is_passed_through():
    assert sampling_params_kwargs(Sampling(temperature=1.0, top_k=50))["top_k"] == 50


def test_stop_strings_become_a_list():
    assert sampling_params_kwargs(Sampling(stop=("\n\n", "END")))["stop"] == ["\n\n", "END"]
    assert "stop" not in sampling_params_kwargs(Sampling())


def test_request_seed_wins_over_the_engine_default_seed():
    assert sampling_params_kwargs(Sampling(seed=5), default_seed=99)["seed"] == 5
    assert sampling_params_kwargs(Sampling(), default_seed=99)["seed"] == 99
    assert "seed" not in sampling_params_kwargs(Sampling())


# --- quantization -----------------------------------------------------------------------------


def test_quantization_names_map_to_trtllm_quant_algos():
    assert QUANT_ALGOS == {
        "": None,
        "fp8": "FP8",
        "int8_wo": "W8A16",
        "int4_awq": "W4A16_AWQ",
        "nvfp4": "NVFP4",
    }
    assert quant_algo("int4_awq") == "W4A16_AWQ"
    assert quant_algo("") is None


def test_unknown_quantization_is_rejected_naming_the_allowed_values():
    with pytest.raises(ValueError) as err:
        quant_algo("awq")
    for allowed in ("'fp8'", "'int8_wo'", "'int4_awq'", "'nvfp4'", "''"):
        assert allowed in str(err.value)


def test_quantization_selects_the_tensorrt_engine_backend():
    assert llm_backend(EngineConfig(quantization="")) == "pytorch"
    assert llm_backend(EngineConfig(quantization="fp8")) == "tensorrt"
    assert llm_backend(EngineConfig(extra={"backend": "tensorrt"})) == "tensorrt"


def test_quantizing_on_the_pytorch_backend_is_refused():
    with pytest.raises(ValueError, match="TensorRT-engine backend"):
        llm_backend(EngineConfig(quantization="fp8", extra={"backend": "pytorch"}))


# --- LLM arguments ----------------------------------------------------------------------------


def test_engine_config_maps_to_llm_arguments():
    cfg = EngineConfig(
        engine="tensorrt-llm",
        tokenizer="/tok",
        dtype="bfloat16",
        max_model_len=8192,
        max_num_seqs=64,
        enable_prefix_caching=False,
        block_size=64,
        gpu_memory_utilization=0.8,
        tensor_parallel_size=2,
    )
    kw = llm_kwargs(cfg, "/models/llama")
    assert kw["model"] == "/models/llama"
    assert kw["tokenizer"] == "/tok"
    assert kw["dtype"] == "bfloat16"
    assert kw["tensor_parallel_size"] == 2
    assert kw["max_seq_len"] == 8192
    assert kw["max_batch_size"] == 64
    assert kw["kv_cache_config"] == {
        "enable_block_reuse": False,
        "free_gpu_memory_fraction": 0.8,
        "tokens_per_block": 64,
    }
    assert kw["enable_iter_perf_stats"] is True
    assert "quant_config" not in kw


def test_unset_limits_are_left_to_the_library():
    kw = llm_kwargs(EngineConfig(), "/m")
    assert "max_seq_len" not in kw and "tokenizer" not in kw
    assert "tokens_per_block" not in kw["kv_cache_config"]


def test_enforce_eager_disables_cuda_graphs():
    assert llm_kwargs(EngineConfig(enforce_eager=True), "/m")["cuda_graph_config"] is None
    assert "cuda_graph_config" not in llm_kwargs(EngineConfig(), "/m")


def test_quantized_config_builds_a_quant_config_for_the_engine_backend():
    kw = llm_kwargs(EngineConfig(quantization="nvfp4", block_size=16, max_model_len=4096), "/m")
    assert kw["quant_config"] == {"quant_algo": "NVFP4"}
    # The engine backend fixes the block size at build time, in the plugin config.
    assert kw["build_config"] == {
        "max_batch_size": 256,
        "max_seq_len": 4096,
        "plugin_config": {"tokens_per_block": 16},
    }
    assert "tokens_per_block" not in kw["kv_cache_config"]
    assert "enable_iter_perf_stats" not in kw  # not a TrtLlmArgs field


def test_extra_engine_args_are_merged_last():
    cfg = EngineConfig(
        max_num_seqs=8,
        extra={
            "max_batch_size": 4,
            "trust_remote_code": True,
            "kv_cache_config": {"host_cache_size": 1 << 30, "enable_block_reuse": False},
            "backend": "tensorrt",
        },
    )
    kw = llm_kwargs(cfg, "/m")
    assert kw["max_batch_size"] == 4
    assert kw["trust_remote_code"] is True
    assert kw["kv_cache_config"] == {
        "enable_block_reuse": False,
        "free_gpu_memory_fraction": 0.9,
        "host_cache_size": 1 << 30,
    }
    assert "backend" not in kw  # spotmesh's switch, consumed here


# --- streamed outputs -------------------------------------------------------------------------


def test_cumulative_output_becomes_a_delta_chunk():
    chunk = chunk_from_output(request_output([5, 6, 7], "Hello world"), 1, 5)
    assert chunk.token_ids == [6, 7]
    assert chunk.text == " world"
    assert chunk.finish_reason is None


def test_finish_reasons_map_to_spotmesh_names_on_the_last_output_only():
    def reason(r, finished=True):
        return chunk_from_output(request_output([1], "a", finished=finished, reason=r), 0, 0)

    assert reason("stop").finish_reason == FINISH_STOP
    assert reason("length").finish_reason == FINISH_LENGTH
    assert reason("cancelled").finish_reason == FINISH_ABORT
    assert reason("timeout").finish_reason == FINISH_ABORT
    assert reason(None).finish_reason == FINISH_ABORT
    assert reason("cancelled", finished=False).finish_reason is None


def test_trimmed_tail_after_a_stop_word_yields_an_empty_delta():
    # The library drops the stop word's tokens and text on the final response, so the
    # cumulative output can end shorter than what was already streamed.
    chunk = chunk_from_output(request_output([5], "Hi", finished=True, reason="stop"), 3, 6)
    assert chunk.token_ids == [] and chunk.text == ""
    assert chunk.finish_reason == FINISH_STOP


def test_prompt_and_cached_prompt_tokens_are_reported():
    chunk = chunk_from_output(request_output([1], "a", prompt=range(10), cached=8), 0, 0)
    assert chunk.prompt_tokens == 10
    assert chunk.cached_prompt_tokens == 8


def test_output_without_cache_accounting_reports_zero_cached_tokens():
    out = request_output([1], "a")
    del out.cached_tokens
    assert chunk_from_output(out, 0, 0).cached_prompt_tokens == 0


# --- load and engine info ---------------------------------------------------------------------

STATS = {
    "iter": 41,
    "numActiveRequests": 2,
    "numQueuedRequests": 4,
    "inflightBatchingStats": {"numPausedRequests": 1, "numContextRequests": 1},
    "kvCacheStats": {
        "maxNumBlocks": 1000,
        "freeNumBlocks": 400,
        "usedNumBlocks": 600,
        "tokensPerBlock": 32,
        "cacheHitRate": 0.25,
        "reusedBlocks": 12,
    },
}


def test_iteration_stats_become_a_load_report():
    load = load_from_stats(STATS, in_flight=10, gpu=0.5)
    assert load.running == 2
    assert load.waiting == 5  # queued plus paused
    assert load.kv_cache_usage == pytest.approx(0.6)
    assert load.gpu_utilization == 0.5
    assert load.extra == {"kv_cache_hit_rate": 0.25, "kv_reused_blocks": 12.0}


def test_stale_stats_are_clamped_to_the_requests_in_flight():
    load = load_from_stats(STATS, in_flight=3)
    assert (load.running, load.waiting) == (2, 1)
    idle = load_from_stats(STATS, in_flight=0, gpu=0.1)
    assert (idle.running, idle.waiting, idle.kv_cache_usage) == (0, 0, 0.0)
    assert idle.gpu_utilization == 0.1


def test_kv_usage_falls_back_to_free_blocks():
    stats = {"numActiveRequests": 1, "kvCacheStats": {"maxNumBlocks": 10, "freeNumBlocks": 7}}
    assert load_from_stats(stats, in_flight=1).kv_cache_usage == pytest.approx(0.3)


def test_engine_info_prefers_the_executors_kv_pool_facts():
    args = SimpleNamespace(
        max_seq_len=4096, kv_cache_config=SimpleNamespace(tokens_per_block=64), build_config=None
    )
    info = engine_info(EngineConfig(served_model_name="llama"), "/m", args, STATS)
    assert info.engine == "tensorrt-llm"
    assert info.model == "llama"
    assert info.max_model_len == 4096
    assert info.kv_block_size == 32
    assert info.kv_capacity_blocks == 1000


def test_engine_info_falls_back_to_the_built_engine_and_checkpoint():
    build = SimpleNamespace(max_seq_len=2048, plugin_config=SimpleNamespace(tokens_per_block=128))
    info = engine_info(
        EngineConfig(), "/m", SimpleNamespace(max_seq_len=None, build_config=build), None
    )
    assert (info.model, info.max_model_len, info.kv_block_size, info.kv_capacity_blocks) == (
        "/m",
        2048,
        128,
        0,
    )
    assert (
        engine_info(EngineConfig(), "/m", None, None, checkpoint_max_len=32768).max_model_len
        == 32768
    )


def test_engine_info_without_a_context_length_asks_for_one():
    with pytest.raises(EngineError, match="--max-model-len"):
        engine_info(EngineConfig(), "/m", SimpleNamespace(max_seq_len=None), None)


# --- import guard -----------------------------------------------------------------------------


def test_missing_tensorrt_llm_fails_start_with_the_install_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)  # import raises ModuleNotFoundError
    module = importlib.reload(trtllm_engine)  # importing the module itself needs nothing
    engine = module.TensorRTLLMEngine(EngineConfig(engine="tensorrt-llm"), "/m")
    with pytest.raises(EngineError) as err:
        asyncio.run(engine.start())
    assert str(err.value) == INSTALL_HINT
    assert "\n" not in str(err.value)
    assert "pip install tensorrt-llm --extra-index-url https://pypi.nvidia.com" in INSTALL_HINT


# --- the engine against a fake tensorrt_llm ---------------------------------------------------


class FakeRequestOutput:
    """Like tensorrt_llm's RequestOutput: async-iterating it yields itself, its outputs[0]
    grown by one step each time; abort() ends it with finish_reason 'cancelled'."""

    def __init__(self, prompt, steps, final_reason):
        self.prompt_token_ids = list(prompt)
        self.cached_tokens = 1
        self.outputs = [SimpleNamespace(index=0, token_ids=[], text="", finish_reason=None)]
        self.finished = False
        self.aborted = False
        self._steps = list(steps)
        self._final_reason = final_reason

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.finished:
            raise StopAsyncIteration
        await asyncio.sleep(0)
        out = self.outputs[0]
        if self.aborted:
            out.finish_reason, self.finished = "cancelled", True
            return self
        tokens, text = self._steps.pop(0)
        out.token_ids = out.token_ids + tokens
        out.text += text
        if not self._steps:
            out.finish_reason, self.finished = self._final_reason, True
        return self

    def abort(self):
        self.aborted = True


class FakeLLM:
    steps = [([11], "Hel"), ([12, 13], "lo "), ([14], "world")]
    final_reason = "length"

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.args = SimpleNamespace(
            max_seq_len=kwargs.get("max_seq_len", 2048),
            kv_cache_config=kwargs["kv_cache_config"],
            build_config=None,
        )
        self.requests: list[tuple[list[int], object, FakeRequestOutput]] = []
        self.stats_calls = 0
        self.closed = False
        type(self).instances.append(self)

    def generate_async(self, inputs, sampling_params=None, streaming=False):
        assert streaming, "the engine must stream"
        if len(inputs) > self.args.max_seq_len:
            raise ValueError("prompt is longer than max_seq_len")
        out = FakeRequestOutput(inputs, self.steps, self.final_reason)
        self.requests.append((inputs, sampling_params, out))
        return out

    def get_stats(self, timeout):
        self.stats_calls += 1
        return [{"numActiveRequests": 0}, STATS]

    def shutdown(self):
        self.closed = True


class FakeTrtEngineLLM(FakeLLM):
    pass


class Recorded:
    """A config class that keeps its keyword arguments, like the library's pydantic configs."""

    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


class FakeBuildConfig(Recorded):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.plugin_config = SimpleNamespace()


@pytest.fixture
def fake_trtllm(monkeypatch):
    FakeLLM.instances = []
    root = types.ModuleType("tensorrt_llm")
    root.LLM = FakeLLM
    root.SamplingParams = type("SamplingParams", (Recorded,), {})
    llmapi = types.ModuleType("tensorrt_llm.llmapi")
    llmapi.KvCacheConfig = type("KvCacheConfig", (Recorded,), {})
    llmapi.QuantConfig = type("QuantConfig", (Recorded,), {})
    llmapi.QuantAlgo = enum.Enum("QuantAlgo", ["FP8", "W8A16", "W4A16_AWQ", "NVFP4"])
    llmapi.BuildConfig = FakeBuildConfig
    engine_backend = types.ModuleType("tensorrt_llm._tensorrt_engine")
    engine_backend.LLM = FakeTrtEngineLLM
    root.llmapi = llmapi
    monkeypatch.setitem(sys.modules, "tensorrt_llm", root)
    monkeypatch.setitem(sys.modules, "tensorrt_llm.llmapi", llmapi)
    monkeypatch.setitem(sys.modules, "tensorrt_llm._tensorrt_engine", engine_backend)
    monkeypatch.setattr(trtllm_engine, "gpu_utilization", lambda: None)
    return SimpleNamespace(root=root, llmapi=llmapi)


def test_generate_streams_deltas_and_finishes_with_the_mapped_reason(fake_trtllm):
    async def scenario():
        engine = TensorRTLLMEngine(EngineConfig(engine="tensorrt-llm", seed=3), "/models/tiny")
        info = await engine.start()
        chunks = [c async for c in engine.generate("r1", [1, 2, 3], Sampling(temperature=0.7))]
        load_after = engine.load()
        await engine.shutdown()
        return info, chunks, load_after

    info, chunks, load_after = asyncio.run(scenario())
    llm = FakeLLM.instances[0]
    assert [c.token_ids for c in chunks] == [[11], [12, 13], [14]]
    assert [c.text for c in chunks] == ["Hel", "lo ", "world"]
    assert [c.finish_reason for c in chunks] == [None, None, FINISH_LENGTH]
    assert chunks[-1].prompt_tokens == 3 and chunks[-1].cached_prompt_tokens == 1
    # The LLM got real config objects and the request a seeded sampling config.
    assert llm.kwargs["kv_cache_config"].enable_block_reuse is True
    prompt, params, _ = llm.requests[-1]
    assert prompt == [1, 2, 3]
    assert params.temperature == 0.7 and isinstance(params.seed, int)
    # The warm-up request ran first, so the KV pool's size came from the executor's stats.
    assert llm.requests[0][0] == [0]
    assert (info.max_model_len, info.kv_block_size, info.kv_capacity_blocks) == (2048, 32, 1000)
    assert load_after.running == 0 and load_after.waiting == 0  # nothing left in flight
    assert llm.closed


def test_closing_the_stream_early_aborts_the_trtllm_request(fake_trtllm):
    async def scenario():
        engine = TensorRTLLMEngine(EngineConfig(engine="tensorrt-llm"), "/m")
        await engine.start()
        stream = engine.generate("r2", [1, 2], Sampling(max_tokens=10))
        first = await anext(stream)
        in_flight = engine.load()
        await stream.aclose()
        request = FakeLLM.instances[0].requests[-1][2]
        await engine.shutdown()
        return first, in_flight, request

    first, in_flight, request = asyncio.run(scenario())
    assert first.token_ids == [11] and first.finish_reason is None
    assert (in_flight.running, in_flight.waiting) == (1, 0)
    assert request.aborted


def test_abort_by_request_id_ends_the_stream_with_abort(fake_trtllm):
    async def scenario():
        engine = TensorRTLLMEngine(EngineConfig(engine="tensorrt-llm"), "/m")
        await engine.start()
        chunks = []
        async for chunk in engine.generate("r3", [1], Sampling()):
            chunks.append(chunk)
            if len(chunks) == 1:
                await engine.abort("r3")
        await engine.abort("unknown-id")  # ignored
        await engine.shutdown()
        return chunks

    chunks = asyncio.run(scenario())
    assert chunks[-1].finish_reason == FINISH_ABORT
    assert sum(len(c.token_ids) for c in chunks) == 1


def test_prompt_the_library_refuses_is_a_rejected_request(fake_trtllm):
    from services.inference.engine import RequestRejected

    async def scenario():
        engine = TensorRTLLMEngine(EngineConfig(engine="tensorrt-llm"), "/m")
        await engine.start()
        try:
            with pytest.raises(RequestRejected, match="max_seq_len"):
                async for _ in engine.generate("r4", list(range(5000)), Sampling()):
                    pass
        finally:
            await engine.shutdown()

    asyncio.run(scenario())


def test_quantized_config_starts_the_engine_backend_with_a_quant_config(fake_trtllm):
    async def scenario():
        engine = TensorRTLLMEngine(
            EngineConfig(engine="tensorrt-llm", quantization="fp8", block_size=16), "/m"
        )
        await engine.start()
        await engine.shutdown()

    asyncio.run(scenario())
    llm = FakeLLM.instances[0]
    assert isinstance(llm, FakeTrtEngineLLM)
    assert llm.kwargs["quant_config"].quant_algo is fake_trtllm.llmapi.QuantAlgo.FP8
    assert llm.kwargs["build_config"].plugin_config.tokens_per_block == 16
