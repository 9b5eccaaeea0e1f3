"""The one interface every inference engine sits behind.

The gRPC server (``server.py``) speaks only to :class:`Engine`; vLLM (``vllm_engine.py``) and
TensorRT-LLM (``trtllm_engine.py``) each translate it to their own library API. Prompts
arrive as token ids (the gateway tokenizes once); engines detokenize their own output because
stop strings and incremental detokenization need the engine's view of the sequence.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from spotmesh.sampling import Sampling

__all__ = [
    "Chunk", "Engine", "EngineError", "EngineInfo", "EngineLoad", "RequestRejected", "Sampling",
]


# Finish reasons as the engines name them; the server maps them to the proto enum.
FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_ABORT = "abort"


@dataclass
class Chunk:
    """What the engine produced since the previous chunk of one request."""

    token_ids: list[int]
    text: str
    finish_reason: str | None = None  # set on the last chunk only
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens whose KV cache the engine reused


@dataclass
class EngineLoad:
    """A snapshot of the engine's scheduler, for routing and autoscaling."""

    waiting: int = 0
    running: int = 0
    kv_cache_usage: float = 0.0  # 0-1
    gpu_utilization: float | None = None  # 0-1, None without a GPU
    extra: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class EngineInfo:
    """Static facts about the loaded model, known once the engine has started."""

    engine: str  # "vllm" | "tensorrt-llm"
    model: str
    max_model_len: int
    kv_block_size: int
    kv_capacity_blocks: int
    quantization: str = ""  # as the engine names it; "" for unquantized weights
    vocab_size: int = 0  # token ids are in [0, vocab_size); 0: the engine checks them itself


class EngineError(RuntimeError):
    """The engine rejected a request (bad prompt for this model, engine dead)."""


class RequestRejected(EngineError):
    """The request is invalid for this engine (e.g. the prompt exceeds the context length)."""


class Engine(abc.ABC):
    """An LLM engine serving one model with continuous batching."""

    @abc.abstractmethod
    async def start(self) -> EngineInfo:
        """Load the model and start the engine loop. Called once before anything else."""

    @abc.abstractmethod
    def generate(
        self, request_id: str, prompt_token_ids: list[int], sampling: Sampling
    ) -> AsyncIterator[Chunk]:
        """Stream the generation. Closing the iterator early must abort the engine request."""

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None:
        """Stop a running request and free its KV cache; unknown ids are ignored."""

    @abc.abstractmethod
    def load(self) -> EngineLoad:
        """The latest scheduler snapshot; cheap, never blocks."""

    @abc.abstractmethod
    async def shutdown(self) -> None:
        """Stop the engine and release its memory."""
