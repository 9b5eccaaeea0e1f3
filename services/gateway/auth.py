"""API keys -> tenants.

The keys file is TOML, one ``[[keys]]`` table per key::

    [[keys]]
    tenant = "search-team"
    key_sha256 = "9f86d0..."     # sha256 hex of the key; or `key = "sk-..."` in development
    models = ["*"]               # models this key may use; "*" for all
    admin = false                # may call admin RPCs (cache invalidation)

    [tenants.search-team]        # optional per-tenant semantic-cache policy
    cache_threshold = 0.9        # cosine similarity a hit needs (spotmesh cache calibrate)
    cache_ttl_seconds = 3600     # absolute; hits never extend it
    cache_sampled = false        # also cache answers sampled with temperature > 0
    cache_truncated = false      # also cache answers cut by max_tokens
    requests_per_second = 20     # rate limits (0 or absent: unlimited); over them a request
    tokens_per_minute = 200000   # gets RESOURCE_EXHAUSTED (prompt + max_tokens are counted)

Keys are looked up by their SHA-256, so the file need not hold a usable secret and the lookup
time does not depend on how much of a guessed key matches.
"""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from services.gateway.ratelimit import RateLimits
from spotmesh.validation import TENANT_ID

# The lowest threshold with precision >= 0.97 for all-MiniLM-L6-v2 (ONNX) replaying Banking77's
# 3,080 test queries through a cache (`spotmesh cache calibrate --format intents`, hit rate
# 0.18; benchmarks/results/calibrate-banking77.json). On STS-B pairs, which are built to be
# close but different, 0.97 precision needs 0.96. `spotmesh cache calibrate` measures yours.
DEFAULT_CACHE_THRESHOLD = 0.92
DEFAULT_CACHE_TTL_SECONDS = 3600.0


@dataclass(frozen=True)
class CachePolicy:
    threshold: float = DEFAULT_CACHE_THRESHOLD
    ttl_seconds: float = DEFAULT_CACHE_TTL_SECONDS
    cache_sampled: bool = False
    cache_truncated: bool = False


@dataclass(frozen=True)
class Tenant:
    name: str
    models: frozenset[str]
    admin: bool = False
    cache: CachePolicy = field(default_factory=CachePolicy)
    limits: RateLimits = field(default_factory=RateLimits)

    def may_use(self, model: str) -> bool:
        return "*" in self.models or model in self.models


class AuthError(Exception):
    """Missing or unknown credentials (UNAUTHENTICATED)."""


class KeysFileError(ValueError):
    pass


def sha256_hex(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeys:
    def __init__(self, tenants_by_hash: dict[str, Tenant]) -> None:
        self._by_hash = tenants_by_hash

    @classmethod
    def load(cls, path: str | Path) -> ApiKeys:
        try:
            doc = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise KeysFileError(f"cannot read API keys file {path}: {exc}") from exc
        policies, limits = _tenant_settings(doc.get("tenants", {}), path)
        by_hash: dict[str, Tenant] = {}
        entries = doc.get("keys", [])
        if not isinstance(entries, list):
            raise KeysFileError(f"{path}: keys must be an array of tables ([[keys]])")
        for i, entry in enumerate(entries):
            where = f"{path}: keys[{i}]"
            if not isinstance(entry, dict):
                raise KeysFileError(f"{where}: must be a table ([[keys]])")
            tenant = entry.get("tenant")
            if not isinstance(tenant, str) or not TENANT_ID.fullmatch(tenant):
                raise KeysFileError(f"{where}: tenant must be 1-64 characters of "
                                    "[A-Za-z0-9_.-]")
            if "key_sha256" in entry:
                digest = str(entry["key_sha256"]).lower()
            elif "key" in entry:
                if not isinstance(entry["key"], str) or not entry["key"].strip():
                    raise KeysFileError(f"{where}: key must be a non-empty string")
                digest = sha256_hex(entry["key"].strip())
            else:
                raise KeysFileError(f"{where}: needs key_sha256 (or key)")
            if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
                raise KeysFileError(f"{where}: key_sha256 must be 64 hex characters")
            models = entry.get("models", ["*"])
            if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
                raise KeysFileError(f"{where}: models must be a list of strings")
            admin = entry.get("admin", False)
            if not isinstance(admin, bool):
                raise KeysFileError(f"{where}: admin must be true or false")
            if digest in by_hash:
                raise KeysFileError(f"{where}: duplicate key")
            by_hash[digest] = Tenant(tenant, frozenset(models), admin,
                                     policies.get(tenant, CachePolicy()),
                                     limits.get(tenant, RateLimits()))
        if not by_hash:
            raise KeysFileError(f"{path}: no [[keys]] entries")
        return cls(by_hash)

    def tenants(self) -> set[str]:
        return {t.name for t in self._by_hash.values()}

    def authenticate(self, metadata) -> Tenant:
        """The tenant for a call's ``authorization: Bearer <key>`` metadata."""
        header = None
        for k, v in metadata or ():
            if k == "authorization":
                header = v
                break
        if header is None:
            raise AuthError("missing authorization metadata: send 'authorization: Bearer <key>'")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise AuthError("authorization metadata must be 'Bearer <api key>'")
        tenant = self._by_hash.get(sha256_hex(key.strip()))
        if tenant is None:
            raise AuthError("unknown API key")
        return tenant


def _tenant_settings(table: object, path: str | Path
                     ) -> tuple[dict[str, CachePolicy], dict[str, RateLimits]]:
    if not isinstance(table, dict):
        raise KeysFileError(f"{path}: tenants must be a table ([tenants.NAME])")
    policies = {}
    limits = {}
    for name, entry in table.items():
        where = f"{path}: tenants.{name}"
        if not TENANT_ID.fullmatch(name) or not isinstance(entry, dict):
            raise KeysFileError(f"{where}: must be a table named by a tenant id")
        unknown = set(entry) - {"cache_threshold", "cache_ttl_seconds", "cache_sampled",
                                "cache_truncated", "requests_per_second", "tokens_per_minute"}
        if unknown:
            raise KeysFileError(f"{where}: unknown settings {sorted(unknown)}")
        threshold = entry.get("cache_threshold", DEFAULT_CACHE_THRESHOLD)
        if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not (
            0.0 <= threshold <= 1.0
        ):
            raise KeysFileError(f"{where}: cache_threshold must be a number in [0, 1]")
        ttl = entry.get("cache_ttl_seconds", DEFAULT_CACHE_TTL_SECONDS)
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl <= 30 * 86400:
            raise KeysFileError(f"{where}: cache_ttl_seconds must be in (0, 2592000]")
        flags = {}
        for key in ("cache_sampled", "cache_truncated"):
            flags[key] = entry.get(key, False)
            if not isinstance(flags[key], bool):
                raise KeysFileError(f"{where}: {key} must be true or false")
        policies[name] = CachePolicy(float(threshold), float(ttl), **flags)
        rates = {}
        for key in ("requests_per_second", "tokens_per_minute"):
            value = entry.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int | float) or not (
                0 <= value <= 1e12
            ):
                raise KeysFileError(f"{where}: {key} must be a number >= 0 (0: unlimited)")
            rates[key] = float(value)
        limits[name] = RateLimits(**rates)
    return policies, limits
