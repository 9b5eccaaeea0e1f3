"""The contract's bounds on every semantic-cache field (``protos/spotmesh/v1/cache.proto``), and
the checks that turn a value outside them into :class:`InvalidField` naming it.

Filter strings are built from checked values only: tenant ids, model names and fingerprints
have alphabets with no quote or backslash, free text never enters a filter (prompts are
matched by their SHA-256), and :func:`literal` escapes anyway.
"""

from __future__ import annotations

import hashlib
import math
import re

from services.cache.answers import Answer
from spotmesh.validation import TENANT_ID, InvalidField

# Served model names and hub ids ("org/name", "name:tag", "name@rev"); no quote, no backslash,
# no space, so a validated name is inert inside a double-quoted filter literal.
MODEL_RE = re.compile(r"[A-Za-z0-9_.:/@+-]{1,256}")
# spotmesh.sampling.fingerprint is 32 hex digits; other callers may use any short token.
FINGERPRINT_RE = re.compile(r"[A-Za-z0-9_.:=+/-]{1,128}")
MAX_TEXT_BYTES = 64 * 1024
MAX_TOKEN_IDS = 16384
MAX_TTL_SECONDS = 30 * 24 * 3600.0
INT32_MAX = 2**31 - 1


def literal(value: str) -> str:
    """``value`` as a double-quoted Milvus filter string literal."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def prompt_sha256(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def check_tenant(tenant: str, name: str = "tenant") -> str:
    if not TENANT_ID.fullmatch(tenant):
        raise InvalidField(name, "must be 1-64 characters of A-Z a-z 0-9 _ . -")
    return tenant


def check_model(model: str, name: str = "model") -> str:
    if not MODEL_RE.fullmatch(model):
        raise InvalidField(name, "must be 1-256 characters of A-Z a-z 0-9 _ . : / @ + -")
    return model


def check_fingerprint(fp: str) -> str:
    if not FINGERPRINT_RE.fullmatch(fp):
        raise InvalidField("sampling_fingerprint",
                           "must be 1-128 characters of A-Z a-z 0-9 _ . : = + / -")
    return fp


def check_text(value: str, name: str) -> str:
    if not value:
        raise InvalidField(name, "is empty")
    size = len(value.encode("utf-8"))
    if size > MAX_TEXT_BYTES:
        raise InvalidField(name, f"is {size} bytes of UTF-8; the limit is {MAX_TEXT_BYTES}")
    return value


def check_threshold(threshold: float) -> float:
    if not 0.0 <= threshold <= 1.0:  # also false for NaN
        raise InvalidField("threshold", f"must be in [0, 1], not {threshold}")
    return float(threshold)


def check_ttl(ttl_seconds: float) -> float:
    if not 0.0 < ttl_seconds <= MAX_TTL_SECONDS:
        raise InvalidField("ttl_seconds",
                           f"must be > 0 and at most {MAX_TTL_SECONDS:.0f} (30 days), "
                           f"not {ttl_seconds}")
    return float(ttl_seconds)


def check_answer(a: Answer) -> Answer:
    check_text(a.prompt, "prompt")
    check_text(a.text, "text")
    if len(a.token_ids) > MAX_TOKEN_IDS:
        raise InvalidField("token_ids", f"has {len(a.token_ids)} ids; the limit is "
                           f"{MAX_TOKEN_IDS}")
    for i, t in enumerate(a.token_ids):
        if not 0 <= t <= INT32_MAX:
            raise InvalidField(f"token_ids[{i}]", f"must be a token id >= 0, not {t}")
    for name in ("prompt_tokens", "cached_prompt_tokens", "completion_tokens"):
        if not 0 <= getattr(a, name) <= INT32_MAX:
            raise InvalidField(f"usage.{name}", "must be >= 0")
    for name in ("cost_usd", "replica_seconds"):
        v = getattr(a, name)
        if not (math.isfinite(v) and v >= 0):
            raise InvalidField(name, f"must be a finite number >= 0, not {v}")
    return a
