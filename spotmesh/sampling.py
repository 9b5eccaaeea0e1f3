"""Sampling parameters: the one definition of what is valid, shared by the gateway (which
applies defaults for clients) and the replicas (which are also called directly by tools and the
autoscaler's warm-up, so they check again)."""

from __future__ import annotations

from dataclasses import dataclass

from spotmesh.v1 import common_pb2
from spotmesh.validation import InvalidField

MAX_STOP = 8
MAX_STOP_BYTES = 256


@dataclass(frozen=True)
class Sampling:
    """Fully resolved sampling parameters (every default applied)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def to_proto(self) -> common_pb2.SamplingParams:
        msg = common_pb2.SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_tokens=self.max_tokens,
            stop=self.stop,
        )
        if self.seed is not None:
            msg.seed = self.seed
        return msg


def sampling_from_proto(
    s: common_pb2.SamplingParams,
    *,
    default_max_tokens: int,
    max_tokens_limit: int,
    field: str = "sampling",
) -> Sampling:
    """Apply defaults to unset fields and check every bound; raises :class:`InvalidField`."""
    temperature = s.temperature if s.HasField("temperature") else 1.0
    if not 0.0 <= temperature <= 2.0:  # also rejects NaN
        raise InvalidField(f"{field}.temperature", f"must be in [0, 2], got {temperature:g}")
    top_p = s.top_p if s.HasField("top_p") else 1.0
    if not 0.0 < top_p <= 1.0:
        raise InvalidField(f"{field}.top_p", f"must be in (0, 1], got {top_p:g}")
    top_k = s.top_k if s.HasField("top_k") else 0
    if top_k < 0:
        raise InvalidField(f"{field}.top_k", f"must be >= 0 (0 disables it), got {top_k}")
    max_tokens = s.max_tokens if s.HasField("max_tokens") else default_max_tokens
    if max_tokens < 1:
        raise InvalidField(f"{field}.max_tokens", f"must be >= 1, got {max_tokens}")
    if max_tokens > max_tokens_limit:
        raise InvalidField(
            f"{field}.max_tokens", f"must be <= {max_tokens_limit}, got {max_tokens}"
        )
    if len(s.stop) > MAX_STOP:
        raise InvalidField(f"{field}.stop", f"has {len(s.stop)} entries; at most {MAX_STOP}")
    for i, stop in enumerate(s.stop):
        if not 0 < len(stop.encode()) <= MAX_STOP_BYTES:
            raise InvalidField(f"{field}.stop[{i}]", f"must be 1-{MAX_STOP_BYTES} bytes")
    return Sampling(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        max_tokens=max_tokens,
        stop=tuple(s.stop),
        seed=s.seed if s.HasField("seed") else None,
    )


def fingerprint(s: Sampling, context: str = "") -> str:
    """What, besides the prompt's meaning, must match for a cached answer to be reusable: every
    sampling parameter that changes the answer, and ``context`` (the conversation before the
    last user turn, verbatim). ``max_tokens`` is left out: an answer that finished within a
    smaller budget is valid for a larger one, and the gateway checks the length on a hit."""
    import hashlib
    import json

    doc = {
        "temperature": round(s.temperature, 6),
        "top_p": round(s.top_p, 6),
        "top_k": s.top_k,
        "stop": sorted(s.stop),
        # A seed only matters when sampling.
        "seed": s.seed if s.temperature > 0 else None,
        "context": hashlib.sha256(context.encode()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]
