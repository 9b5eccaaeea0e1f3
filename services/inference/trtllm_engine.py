"""TensorRT-LLM's ``LLM`` API behind the :class:`Engine` interface.

Written against the TensorRT-LLM sources (github.com/NVIDIA/TensorRT-LLM); each library call
below names the file it comes from. TensorRT-LLM has two ``LLM`` classes with one API:

* ``tensorrt_llm.LLM`` -- the PyTorch backend, the default since TensorRT-LLM 1.0
  (``tensorrt_llm/llmapi/llm.py``: ``class LLM(_TorchLLM)``). It serves Hugging Face
  checkpoints directly and reads quantization only from the checkpoint (a ModelOpt
  ``hf_quant_config.json``); it rejects ``quant_config`` (``_validate_args_for_torch_backend``).
* ``tensorrt_llm._tensorrt_engine.LLM`` -- the TensorRT-engine backend
  (``tensorrt_llm/_tensorrt_engine/__init__.py``), which builds an engine at start-up and is
  the one that quantizes an unquantized checkpoint from a ``QuantConfig``
  (``examples/llm-api/_tensorrt_engine/llm_quantization.py``).

So ``EngineConfig.quantization`` picks the backend: empty serves the checkpoint as it is on the
PyTorch backend; a :data:`QUANT_ALGOS` name builds a quantized engine. ``--engine-args
'{"backend": "tensorrt"}'`` forces the engine backend (e.g. to serve a prebuilt engine dir).

Importing this module never imports ``tensorrt_llm``; :meth:`TensorRTLLMEngine.start` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import random
from collections.abc import AsyncIterator, Mapping
from types import SimpleNamespace
from typing import Any

from services.inference.config import EngineConfig
from services.inference.engine import (
    FINISH_ABORT,
    FINISH_LENGTH,
    FINISH_STOP,
    Chunk,
    Engine,
    EngineError,
    EngineInfo,
    EngineLoad,
    RequestRejected,
    Sampling,
)
from services.inference.gpu import gpu_utilization
from spotmesh.runtime import cancel_and_wait, fields

log = logging.getLogger("spotmesh.inference")

INSTALL_HINT = (
    "TensorRT-LLM is not installed: pip install tensorrt-llm --extra-index-url "
    "https://pypi.nvidia.com on a machine with an NVIDIA GPU"
)

# spotmesh's --quantization values -> TensorRT-LLM ``QuantAlgo`` member names
# (``tensorrt_llm/quantization/mode.py``: ``class QuantAlgo(StrEnum)``; the members are named
# after the weight/activation widths, ``W<weight bits>A<activation bits>[_METHOD]``).
#   ""         -> None: no QuantConfig; serve the checkpoint as it is (a ModelOpt-quantized
#                 checkpoint carries its own format in hf_quant_config.json)
#   "fp8"      -> FP8: FP8 weights and activations, per-tensor scales (Ada/Hopper and newer)
#   "int8_wo"  -> W8A16: INT8 weight-only, 16-bit activations (no calibration needed)
#   "int4_awq" -> W4A16_AWQ: INT4 weight-only, AWQ-calibrated, group-wise scales
#   "nvfp4"    -> NVFP4: NVIDIA 4-bit float weights and activations (Blackwell)
QUANT_ALGOS: dict[str, str | None] = {
    "": None,
    "fp8": "FP8",
    "int8_wo": "W8A16",
    "int4_awq": "W4A16_AWQ",
    "nvfp4": "NVFP4",
}

BACKEND_PYTORCH = "pytorch"
BACKEND_TENSORRT = "tensorrt"
_LLM_CLASSES = {
    BACKEND_PYTORCH: ("tensorrt_llm", "LLM"),
    BACKEND_TENSORRT: ("tensorrt_llm._tensorrt_engine", "LLM"),
}

# CompletionOutput.finish_reason values (``tensorrt_llm/executor/result.py``:
# Literal['stop', 'length', 'timeout', 'cancelled']) -> spotmesh's. A stop string found by the
# detokenizer is reported as 'stop' too; 'cancelled' follows RequestOutput.abort().
_FINISH_REASONS = {
    "stop": FINISH_STOP,
    "length": FINISH_LENGTH,
    "cancelled": FINISH_ABORT,
    "timeout": FINISH_ABORT,
}

# LLM keyword arguments whose value is a config object; --engine-args may give them as JSON
# objects, merged key by key into the ones built here rather than replacing them.
_CONFIG_KWARGS = ("kv_cache_config", "quant_config", "build_config")
_QUANT_ALGO_FIELDS = ("quant_algo", "kv_cache_quant_algo")

STATS_INTERVAL_S = 1.0
STATS_TIMEOUT_S = 0.5
WARMUP_STATS_TIMEOUT_S = 2.0


def quant_algo(quantization: str) -> str | None:
    """The ``QuantAlgo`` member name for a spotmesh quantization value (None: the checkpoint's)."""
    try:
        return QUANT_ALGOS[quantization]
    except KeyError:
        allowed = ", ".join(repr(k) for k in QUANT_ALGOS)
        raise ValueError(
            f"unknown TensorRT-LLM quantization {quantization!r}; allowed: {allowed}"
        ) from None


def llm_backend(cfg: EngineConfig) -> str:
    """Which ``LLM`` class serves ``cfg``: ``"pytorch"`` or ``"tensorrt"`` (see module doc)."""
    algo = quant_algo(cfg.quantization)
    forced = cfg.extra.get("backend")
    if forced == BACKEND_TENSORRT:
        return BACKEND_TENSORRT
    if forced == BACKEND_PYTORCH and algo is not None:
        raise ValueError(
            f"quantization {cfg.quantization!r} needs the TensorRT-engine backend: the PyTorch "
            "backend only serves checkpoints that are already quantized"
        )
    return BACKEND_TENSORRT if algo is not None else BACKEND_PYTORCH


def llm_kwargs(cfg: EngineConfig, model_path: str = "") -> dict[str, Any]:
    """``LLM(**kwargs)`` arguments for ``cfg`` as plain data; ``cfg.extra`` is merged last.

    Config objects (``kv_cache_config``, ``quant_config``, ``build_config``) are dicts here so
    the mapping is testable without the library; ``start()`` turns them into
    ``tensorrt_llm.llmapi`` objects. Field names follow ``tensorrt_llm/llmapi/llm_args.py``.
    """
    backend = llm_backend(cfg)
    algo = quant_algo(cfg.quantization)
    kv: dict[str, Any] = {
        "enable_block_reuse": cfg.enable_prefix_caching,
        # Unlike vLLM's gpu_memory_utilization (share of the whole GPU), this is the share of
        # the memory left free after the weights are loaded that the KV cache may take.
        "free_gpu_memory_fraction": cfg.gpu_memory_utilization,
    }
    kw: dict[str, Any] = {
        "model": model_path or cfg.model,
        "dtype": cfg.dtype,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "max_batch_size": cfg.max_num_seqs,
        "kv_cache_config": kv,
    }
    if cfg.tokenizer:
        kw["tokenizer"] = cfg.tokenizer
    if cfg.max_model_len:
        kw["max_seq_len"] = cfg.max_model_len
    if backend == BACKEND_PYTORCH:
        # Iteration stats feed load(); the PyTorch backend collects none unless asked
        # (TorchLlmArgs.enable_iter_perf_stats, default False).
        kw["enable_iter_perf_stats"] = True
        if cfg.block_size:
            kv["tokens_per_block"] = cfg.block_size
        if cfg.enforce_eager:
            # TorchLlmArgs.cuda_graph_config: None disables CUDA graphs
            # (docs/source/features/sampling.md, beam search section).
            kw["cuda_graph_config"] = None
    else:
        if algo is not None:
            kw["quant_config"] = {"quant_algo": algo}
        if cfg.block_size:
            # An engine's KV block size is fixed when it is built: it is the plugin option
            # tokens_per_block. The runtime limits are repeated so the build config and the
            # LLM arguments agree (llm_args.py validate_build_config_with_runtime_params).
            build: dict[str, Any] = {"max_batch_size": cfg.max_num_seqs}
            if cfg.max_model_len:
                build["max_seq_len"] = cfg.max_model_len
            build["plugin_config"] = {"tokens_per_block": cfg.block_size}
            kw["build_config"] = build
    for key, value in cfg.extra.items():
        if key == "backend" and value in _LLM_CLASSES:
            continue  # spotmesh's backend switch, not an LLM argument
        if key in _CONFIG_KWARGS and isinstance(value, Mapping) and isinstance(kw.get(key), dict):
            kw[key] = {**kw[key], **value}
        else:
            kw[key] = value
    return kw


def sampling_params_kwargs(s: Sampling, default_seed: int | None = None) -> dict[str, Any]:
    """``tensorrt_llm.SamplingParams(**kwargs)`` for spotmesh sampling
    (field names from ``tensorrt_llm/sampling_params.py``).

    ``default_seed`` seeds a sampled request that names no seed: TensorRT-LLM's C++ runtime
    otherwise uses seed 0 for every request, so identical prompts would sample identically.
    """
    kw: dict[str, Any] = {
        "max_tokens": s.max_tokens,
        # Detokenized text is what the stream carries; the library detokenizes incrementally
        # when streaming (DetokenizedGenerationResultBase._handle_response).
        "detokenize": True,
    }
    if s.stop:
        kw["stop"] = list(s.stop)
    if s.greedy:
        # top_k=1 is greedy on both backends whatever the other values are
        # (docs/source/features/sampling.md; SamplingParams._greedy_decoding). temperature=0
        # is left out: the C++ sampler only accepts temperatures > 0.
        kw["top_k"] = 1
        return kw
    kw["temperature"] = s.temperature
    # Always explicit: an unset top_p means the runtime default 0 on the engine backend, and
    # all-unset sampling fields mean greedy on the PyTorch backend.
    kw["top_p"] = s.top_p
    if s.top_k > 0:
        kw["top_k"] = s.top_k  # unset means all logits, as spotmesh's 0 does
    seed = s.seed if s.seed is not None else default_seed
    if seed is not None:
        kw["seed"] = seed
    return kw


def chunk_from_output(output: Any, sent_tokens: int, sent_text_len: int) -> Chunk:
    """The delta :class:`Chunk` in one streamed ``RequestOutput``.

    ``output.outputs[0]`` is a ``CompletionOutput`` whose ``token_ids`` and ``text`` are
    cumulative (``tensorrt_llm/executor/result.py``). Its ``token_ids_diff``/``text_diff`` are
    relative to the library's previous response; slicing by what this stream has already sent
    gives the same delta whenever every response is observed, and stays right if the library
    trims the tail at the end (it drops stop-word tokens and text after a stop string), where
    the result is an empty delta rather than a repeat.
    """
    completion = output.outputs[0]
    token_ids = list(completion.token_ids or ())
    text = completion.text or ""
    finish_reason = None
    if output.finished:
        finish_reason = _FINISH_REASONS.get(completion.finish_reason, FINISH_ABORT)
    return Chunk(
        token_ids=token_ids[sent_tokens:],
        text=text[sent_text_len:],
        finish_reason=finish_reason,
        prompt_tokens=len(getattr(output, "prompt_token_ids", None) or ()),
        # GenerationResultBase.cached_tokens: prompt tokens served from reused KV blocks.
        cached_prompt_tokens=int(getattr(output, "cached_tokens", 0) or 0),
    )


def load_from_stats(
    stats: Mapping[str, Any] | None, in_flight: int, gpu: float | None = None
) -> EngineLoad:
    """An :class:`EngineLoad` from one TensorRT-LLM iteration-stats dict.

    Keys are the executor's JSON names (``numActiveRequests``, ``numQueuedRequests``,
    ``inflightBatchingStats.numPausedRequests``, ``kvCacheStats.usedNumBlocks`` /
    ``maxNumBlocks``). Stats exist only for iterations that ran, so the last one outlives an
    idle engine: the counts are clamped to the requests this engine has open, and an engine
    with none open holds no KV blocks for requests.
    """
    if not stats or in_flight <= 0:
        return EngineLoad(gpu_utilization=gpu)
    kv = stats.get("kvCacheStats") or {}
    batching = stats.get("inflightBatchingStats") or {}
    running = min(int(stats.get("numActiveRequests", 0)), in_flight)
    queued = int(stats.get("numQueuedRequests", 0)) + int(batching.get("numPausedRequests", 0))
    waiting = min(queued, in_flight - running)
    max_blocks = int(kv.get("maxNumBlocks", 0))
    used = int(kv.get("usedNumBlocks", max_blocks - int(kv.get("freeNumBlocks", max_blocks))))
    usage = min(1.0, used / max_blocks) if max_blocks > 0 else 0.0
    extra = {}
    if "cacheHitRate" in kv:
        extra["kv_cache_hit_rate"] = float(kv["cacheHitRate"])
    if "reusedBlocks" in kv:
        extra["kv_reused_blocks"] = float(kv["reusedBlocks"])
    return EngineLoad(
        waiting=waiting, running=running, kv_cache_usage=usage, gpu_utilization=gpu, extra=extra
    )


def engine_info(
    cfg: EngineConfig,
    model_path: str,
    llm_args: Any,
    stats: Mapping[str, Any] | None,
    checkpoint_max_len: int = 0,
) -> EngineInfo:
    """Static facts from the started LLM: ``llm.args`` (its ``LlmArgs``), the stats of an
    iteration that ran (the KV pool's size is known only to the executor) and, last, the
    checkpoint's own context length."""
    kv = (stats or {}).get("kvCacheStats") or {}
    build = getattr(llm_args, "build_config", None)
    max_len = _first_positive(
        cfg.max_model_len,
        getattr(llm_args, "max_seq_len", None),
        getattr(build, "max_seq_len", None),
        checkpoint_max_len,
    )
    if not max_len:
        raise EngineError(
            "TensorRT-LLM did not report the model's context length; pass --max-model-len"
        )
    block = _first_positive(
        kv.get("tokensPerBlock"),
        cfg.block_size,
        getattr(getattr(llm_args, "kv_cache_config", None), "tokens_per_block", None),
        getattr(getattr(build, "plugin_config", None), "tokens_per_block", None),
    )
    return EngineInfo(
        engine="tensorrt-llm",
        model=cfg.served_model_name or model_path or cfg.model,
        max_model_len=max_len,
        kv_block_size=block,
        kv_capacity_blocks=_first_positive(kv.get("maxNumBlocks")),
        quantization=cfg.quantization,
    )


def _first_positive(*values: Any) -> int:
    for v in values:
        if isinstance(v, int | float) and v > 0:
            return int(v)
    return 0


def _import_trtllm(backend: str) -> SimpleNamespace:
    """The library's classes, or EngineError saying what to install."""
    module_name, class_name = _LLM_CLASSES[backend]
    try:
        from tensorrt_llm import SamplingParams
        from tensorrt_llm.llmapi import BuildConfig, KvCacheConfig, QuantAlgo, QuantConfig

        llm_cls = getattr(importlib.import_module(module_name), class_name)
    except ModuleNotFoundError as exc:
        if exc.name == "tensorrt_llm":
            raise EngineError(INSTALL_HINT) from exc
        raise EngineError(f"TensorRT-LLM failed to import: {exc}") from exc
    except Exception as exc:  # a broken install: missing CUDA, MPI or TensorRT libraries
        raise EngineError(f"TensorRT-LLM failed to import: {exc}") from exc
    return SimpleNamespace(
        LLM=llm_cls,
        SamplingParams=SamplingParams,
        KvCacheConfig=KvCacheConfig,
        QuantConfig=QuantConfig,
        QuantAlgo=QuantAlgo,
        BuildConfig=BuildConfig,
    )


def _library_kwargs(kw: dict[str, Any], api: SimpleNamespace) -> dict[str, Any]:
    """Turn the dict-valued config kwargs of :func:`llm_kwargs` into library objects."""
    out = dict(kw)
    if isinstance(out.get("kv_cache_config"), Mapping):
        out["kv_cache_config"] = api.KvCacheConfig(**out["kv_cache_config"])
    if isinstance(out.get("quant_config"), Mapping):
        fields = {
            k: api.QuantAlgo[v] if k in _QUANT_ALGO_FIELDS and isinstance(v, str) else v
            for k, v in out["quant_config"].items()
        }
        out["quant_config"] = api.QuantConfig(**fields)
    if isinstance(out.get("build_config"), Mapping):
        spec = dict(out["build_config"])
        plugin = spec.pop("plugin_config", None) or {}
        build = api.BuildConfig(**spec)
        for name, value in plugin.items():
            setattr(build.plugin_config, name, value)
        out["build_config"] = build
    return out


class TensorRTLLMEngine(Engine):
    def __init__(self, cfg: EngineConfig, model_path: str) -> None:
        self.cfg = cfg
        self.model_path = model_path
        self.llm: Any = None
        self._api: SimpleNamespace | None = None
        self._streams: dict[str, Any] = {}  # request_id -> RequestOutput still streaming
        self._stats: Mapping[str, Any] | None = None
        self._gpu: float | None = None
        self._refresher: asyncio.Task | None = None
        # Seeds for requests that name none; see sampling_params_kwargs.
        self._seeds = random.Random(cfg.seed)

    async def start(self) -> EngineInfo:
        try:
            backend = llm_backend(self.cfg)
            kwargs = llm_kwargs(self.cfg, self.model_path)
        except ValueError as exc:
            raise EngineError(str(exc)) from exc
        api = _import_trtllm(backend)
        self._api = api
        log.info("starting TensorRT-LLM", extra=fields(backend=backend, model=kwargs["model"]))
        # Built on the event loop's thread, as trtllm-serve does: the constructor starts MPI
        # workers and registers exit handlers, and nothing is being served yet.
        try:
            self.llm = api.LLM(**_library_kwargs(kwargs, api))
        except (ValueError, TypeError) as exc:
            raise EngineError(f"TensorRT-LLM rejected the configuration: {exc}") from exc
        try:
            await self._warm_up()
            stats = await self._poll_stats(WARMUP_STATS_TIMEOUT_S)
            if stats:
                self._stats = stats
            args = getattr(self.llm, "args", None)
            try:
                info = engine_info(self.cfg, self.model_path, args, stats)
            except EngineError:
                # Read only now: it may load transformers and the checkpoint's config.
                info = engine_info(
                    self.cfg, self.model_path, args, stats, self._checkpoint_max_len()
                )
        except BaseException:
            await self.shutdown()  # a half-started engine would keep its GPU memory
            raise
        self._refresher = asyncio.create_task(self._refresh_stats())
        return info

    def _checkpoint_max_len(self) -> int:
        """``max_position_embeddings`` from the checkpoint's config, the context length the
        PyTorch backend defaults to when not told one; 0 if unreadable (an engine dir)."""
        try:
            from transformers import AutoConfig

            hf = AutoConfig.from_pretrained(
                self.model_path or self.cfg.model,
                trust_remote_code=bool(self.cfg.extra.get("trust_remote_code", False)),
            )
        except Exception:
            return 0
        return _first_positive(getattr(hf, "max_position_embeddings", None))

    async def _warm_up(self) -> None:
        """One single-token request: the executor reports iteration stats (the KV pool's size)
        only once an iteration ran, and the first request pays one-time set-up costs."""
        one_token = Sampling(temperature=0.0, max_tokens=1)
        params = self._api.SamplingParams(**sampling_params_kwargs(one_token))
        try:
            async for _ in self.llm.generate_async([0], params, streaming=True):
                pass
        except Exception as exc:  # the replica still serves; only the KV capacity is unknown
            log.warning("TensorRT-LLM warm-up request failed", extra=fields(error=str(exc)))

    async def _poll_stats(self, wait_s: float) -> Mapping[str, Any] | None:
        """The newest iteration stats, read on a worker thread.

        ``LLM.get_stats`` (``tensorrt_llm/llmapi/llm.py``) waits up to ``wait_s`` for more
        iterations; ``get_stats_async`` is not used because on the RPC executor it makes that
        wait on the calling thread before handing back its iterator.
        """
        try:
            entries = await asyncio.to_thread(self.llm.get_stats, wait_s)
        except Exception as exc:
            log.debug("TensorRT-LLM stats unavailable", extra=fields(error=str(exc)))
            return None
        latest = entries[-1] if entries else None
        if isinstance(latest, str | bytes):  # older executors hand back the JSON text
            latest = json.loads(latest)
        return latest if isinstance(latest, Mapping) else None

    async def _refresh_stats(self) -> None:
        while self.llm is not None:
            stats = await self._poll_stats(STATS_TIMEOUT_S)
            if stats:
                self._stats = stats
            self._gpu = await asyncio.to_thread(gpu_utilization)
            await asyncio.sleep(STATS_INTERVAL_S)

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], sampling: Sampling
    ) -> AsyncIterator[Chunk]:
        if self.llm is None or self._api is None:
            raise EngineError("the TensorRT-LLM engine is not running")
        if request_id in self._streams:
            raise RequestRejected(f"request_id {request_id!r} is already running")
        seed = None if sampling.greedy else self._seeds.getrandbits(63)
        try:
            params = self._api.SamplingParams(**sampling_params_kwargs(sampling, seed))
            # BaseLLM._check_arguments raises ValueError for a prompt the model cannot take.
            stream = self.llm.generate_async(list(prompt_token_ids), params, streaming=True)
        except (ValueError, TypeError) as exc:
            raise RequestRejected(str(exc)) from exc
        except Exception as exc:  # "LLM is shutting down" and executor failures
            raise EngineError(str(exc)) from exc
        self._streams[request_id] = stream
        sent_tokens = sent_text = 0
        finished = False
        try:
            async for output in stream:
                chunk = chunk_from_output(output, sent_tokens, sent_text)
                sent_tokens += len(chunk.token_ids)
                sent_text += len(chunk.text)
                finished = chunk.finish_reason is not None
                # Streaming with stream_interval > 1 or a held-back partial character can
                # produce responses with nothing new; only the last one must be relayed.
                if chunk.token_ids or chunk.text or finished:
                    yield chunk
                if finished:
                    return
            finished = True
            yield Chunk([], "", FINISH_ABORT, prompt_tokens=len(prompt_token_ids))
        except Exception as exc:
            # tensorrt_llm.executor.RequestError and executor failures. Prompts were checked
            # when submitted; what fails now is the engine's, so another replica may serve it.
            raise EngineError(str(exc)) from exc
        finally:
            self._streams.pop(request_id, None)
            if not finished and not getattr(stream, "finished", False):
                # Closed early (client gone, server draining) or failed: free the KV blocks.
                with contextlib.suppress(Exception):
                    stream.abort()

    async def abort(self, request_id: str) -> None:
        stream = self._streams.get(request_id)
        if stream is not None and not getattr(stream, "finished", False):
            # GenerationResult.abort() (tensorrt_llm/executor/result.py); the stream then ends
            # with finish_reason 'cancelled'.
            stream.abort()

    def load(self) -> EngineLoad:
        return load_from_stats(self._stats, len(self._streams), self._gpu)

    async def shutdown(self) -> None:
        if self._refresher is not None:
            await cancel_and_wait(self._refresher)
            self._refresher = None
        llm, self.llm = self.llm, None
        if llm is not None:
            for stream in list(self._streams.values()):
                with contextlib.suppress(Exception):
                    stream.abort()
            llm.shutdown()
