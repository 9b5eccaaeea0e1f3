"""Configuration of one inference replica: one typed object, flags and environment in one place."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field

from spotmesh.config import ServerConfig, add_server_flags, server_config_from_args


@dataclass
class EngineConfig:
    """Engine knobs, passed through to the engine library unchanged where it has them."""

    engine: str = "vllm"  # "vllm" | "tensorrt-llm"
    model: str = ""  # a model directory or hub id; empty: spotmesh's tiny model
    served_model_name: str = ""  # the name clients use; empty: derived from `model`
    tokenizer: str = ""  # empty: the model's own
    dtype: str = "auto"
    # Quantization method as the engine names it: vLLM "awq", "compressed-tensors", "fp8", ...;
    # TensorRT-LLM "fp8", "int8_wo", "int4_awq", "nvfp4" (see trtllm_engine.QUANT_ALGOS).
    # Empty: whatever the checkpoint's config says.
    quantization: str = ""
    max_model_len: int = 0  # 0: the model's own limit
    max_num_seqs: int = 256  # continuous-batching width
    enable_prefix_caching: bool = True
    block_size: int = 0  # KV block size in tokens; 0: the engine's default
    # KV-cache size. On CPU vLLM takes whole GiB (VLLM_CPU_KVCACHE_SPACE); on GPU a fraction of
    # memory (gpu_memory_utilization).
    kv_cache_gib: int = 1
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    enforce_eager: bool = False
    # Tokens per streamed chunk (vLLM's `stream_interval`; the first token is always sent at
    # once). Above 1 it trades token-by-token smoothness for fewer messages per token, which
    # matters where per-message framing costs as much as a decode step (small models, CPU).
    stream_interval: int = 1
    seed: int = 0
    # Anything else, as the engine's own keyword arguments (JSON object on the command line).
    extra: dict = field(default_factory=dict)


@dataclass
class InferenceConfig:
    server: ServerConfig
    engine: EngineConfig
    replica: str = ""  # id shown in served_by.replica; empty: "<host>:<port>"
    pool: str = "on-demand"  # "spot" | "on-demand"
    drain_grace_seconds: float = 30.0
    # Precise prefix tracking: relay the engine's KV-cache events to this PrefixCache service.
    prefix_cache: str = ""
    prefix_token: str = ""
    kv_events_endpoint: str = ""  # the engine's ZMQ publisher; empty: an ipc socket in /tmp


def parse(argv: list[str] | None = None) -> InferenceConfig:
    p = argparse.ArgumentParser(prog="python -m services.inference", description=__doc__)
    add_server_flags(p, default_port=50061)
    p.add_argument("--replica", default=os.environ.get("SPOTMESH_REPLICA", ""))
    p.add_argument("--pool", choices=["spot", "on-demand"], default="on-demand")
    p.add_argument("--drain-grace-seconds", type=float, default=30.0)
    e = EngineConfig()
    p.add_argument("--engine", choices=["vllm", "tensorrt-llm"], default=e.engine)
    p.add_argument("--model", default=e.model)
    p.add_argument("--served-model-name", default=e.served_model_name)
    p.add_argument("--tokenizer", default=e.tokenizer)
    p.add_argument("--dtype", default=e.dtype)
    p.add_argument("--quantization", default=e.quantization)
    p.add_argument("--max-model-len", type=int, default=e.max_model_len)
    p.add_argument("--max-num-seqs", type=int, default=e.max_num_seqs)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--block-size", type=int, default=e.block_size)
    p.add_argument("--kv-cache-gib", type=int, default=e.kv_cache_gib)
    p.add_argument("--gpu-memory-utilization", type=float, default=e.gpu_memory_utilization)
    p.add_argument("--tensor-parallel-size", type=int, default=e.tensor_parallel_size)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--stream-interval", type=int, default=e.stream_interval)
    p.add_argument("--seed", type=int, default=e.seed)
    p.add_argument("--engine-args", default="{}", help="extra engine keyword arguments, JSON")
    p.add_argument("--prefix-cache", default="", metavar="HOST:PORT",
                   help="relay the engine's KV-cache events to this PrefixCache service "
                        "(precise prefix routing; vLLM only)")
    p.add_argument("--prefix-token", default=os.environ.get("SPOTMESH_CACHE_TOKEN", ""),
                   help="the prefix service's token; env SPOTMESH_CACHE_TOKEN")
    p.add_argument("--kv-events-endpoint", default="",
                   help="ZMQ endpoint the engine publishes KV events on (default: an ipc "
                        "socket under the temp directory)")
    a = p.parse_args(argv)
    if a.prefix_cache and not a.prefix_token:
        p.error("--prefix-cache needs --prefix-token (or SPOTMESH_CACHE_TOKEN)")
    if a.prefix_cache and a.engine != "vllm":
        p.error("--prefix-cache (KV-event relay) needs --engine vllm")
    try:
        extra = json.loads(a.engine_args)
    except json.JSONDecodeError as exc:
        p.error(f"--engine-args is not JSON: {exc}")
    if not isinstance(extra, dict):
        p.error("--engine-args must be a JSON object")
    if a.stream_interval < 1:
        p.error("--stream-interval must be >= 1")
    if a.kv_cache_gib < 1:
        p.error("--kv-cache-gib must be >= 1")
    engine = EngineConfig(
        engine=a.engine,
        model=a.model,
        served_model_name=a.served_model_name,
        tokenizer=a.tokenizer,
        dtype=a.dtype,
        quantization=a.quantization,
        max_model_len=a.max_model_len,
        max_num_seqs=a.max_num_seqs,
        enable_prefix_caching=not a.no_prefix_caching,
        block_size=a.block_size,
        kv_cache_gib=a.kv_cache_gib,
        gpu_memory_utilization=a.gpu_memory_utilization,
        tensor_parallel_size=a.tensor_parallel_size,
        enforce_eager=a.enforce_eager,
        stream_interval=a.stream_interval,
        seed=a.seed,
        extra=extra,
    )
    return InferenceConfig(
        server=server_config_from_args(a),
        engine=engine,
        replica=a.replica,
        pool=a.pool,
        drain_grace_seconds=a.drain_grace_seconds,
        prefix_cache=a.prefix_cache,
        prefix_token=a.prefix_token,
        kv_events_endpoint=a.kv_events_endpoint,
    )
