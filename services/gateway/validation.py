"""Every field of a GenerateRequest checked and bounded before any work is done.

A bad request gets INVALID_ARGUMENT with a message that names the field, so a caller can fix it
without reading the server's logs.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from services.gateway.config import Limits
from spotmesh.sampling import Sampling, sampling_from_proto
from spotmesh.v1 import gateway_pb2
from spotmesh.validation import InvalidField

MAX_MODEL_NAME = 256
MAX_REQUEST_ID = 128
ROLES = ("system", "user", "assistant")




@dataclass(frozen=True)
class ValidRequest:
    model: str  # "" until the catalog resolves the default
    prompt: str | None
    messages: tuple[tuple[str, str], ...]  # (role, content)
    sampling: Sampling
    cache_mode: int
    request_id: str


def _printable_ascii(s: str) -> bool:
    return all(" " < c <= "~" for c in s)


def validate(req: gateway_pb2.GenerateRequest, limits: Limits) -> ValidRequest:
    if len(req.model) > MAX_MODEL_NAME:
        raise InvalidField("model", f"is longer than {MAX_MODEL_NAME} characters")
    if req.request_id and (
        len(req.request_id) > MAX_REQUEST_ID or not _printable_ascii(req.request_id)
    ):
        raise InvalidField(
            "request_id", f"must be 1-{MAX_REQUEST_ID} printable ASCII characters without spaces"
        )
    has_prompt = bool(req.prompt)
    has_messages = len(req.messages) > 0
    if has_prompt == has_messages:
        raise InvalidField(
            "prompt", "or messages must be set, not both" if has_prompt else
            "is empty: set prompt (text) or messages (chat)"
        )
    size = 0
    messages: list[tuple[str, str]] = []
    if has_prompt:
        size = len(req.prompt.encode())
        if not req.prompt.strip():
            raise InvalidField("prompt", "is only whitespace")
    else:
        if len(req.messages) > limits.max_messages:
            raise InvalidField("messages", f"has more than {limits.max_messages} entries")
        for i, m in enumerate(req.messages):
            if m.role not in ROLES:
                raise InvalidField(f"messages[{i}].role", f"must be one of {', '.join(ROLES)}")
            if not m.content:
                raise InvalidField(f"messages[{i}].content", "is empty")
            size += len(m.content.encode())
            messages.append((m.role, m.content))
    if size > limits.max_prompt_bytes:
        raise InvalidField(
            "prompt" if has_prompt else "messages",
            f"is {size} bytes; the limit is {limits.max_prompt_bytes}",
        )
    sampling = sampling_from_proto(
        req.sampling,
        default_max_tokens=limits.default_max_tokens,
        max_tokens_limit=limits.max_tokens_limit,
    )
    if req.cache.mode not in gateway_pb2.CacheMode.values():
        raise InvalidField("cache.mode", f"unknown value {req.cache.mode}")
    return ValidRequest(
        model=req.model,
        prompt=req.prompt if has_prompt else None,
        messages=tuple(messages),
        sampling=sampling,
        cache_mode=req.cache.mode,
        request_id=req.request_id or uuid.uuid4().hex,
    )
