"""Configuration of the gateway: one typed object, flags and environment in one place."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from services.gateway.prefix import MODES as PREFIX_MODES
from services.gateway.routing.pipeline import ROUTING_POLICIES, Weights
from spotmesh.config import ServerConfig, add_server_flags, server_config_from_args

# On-demand prices are AWS us-east-1 g5.xlarge (1x A10G) list prices; spot is the mean of the
# same type's 10 zone prices in ../shared/data/spot (2022-05-31 snapshot). Replace with yours.
DEFAULT_PRICES_USD_PER_HOUR = {"on-demand": 1.006, "spot": 0.402}


@dataclass
class Limits:
    max_prompt_bytes: int = 256 * 1024
    max_messages: int = 256
    max_tokens_limit: int = 4096  # the most a client may ask for
    default_max_tokens: int = 256


@dataclass
class GatewayConfig:
    server: ServerConfig
    api_keys_file: str = ""
    # model name -> tokenizer/model directory; the first is the default model.
    models: dict[str, str] = field(default_factory=dict)
    replicas: list[str] = field(default_factory=list)  # static replica addresses
    # A JSON file listing replica addresses that a supervisor (spotmesh up, the autoscaler)
    # rewrites as replicas come and go; re-read when it changes.
    replicas_file: str = ""
    prices_usd_per_hour: dict[str, float] = field(
        default_factory=lambda: dict(DEFAULT_PRICES_USD_PER_HOUR))
    limits: Limits = field(default_factory=Limits)
    load_poll_seconds: float = 0.5
    # Attempts to start a stream on another replica when one fails before its first token.
    start_attempts: int = 3
    # Times one stream may be continued on another replica after its replica failed mid-stream.
    resume_attempts: int = 2
    # The semantic cache: both addresses set turns it on.
    embedder: str = ""
    cache: str = ""
    cache_token: str = ""  # the gateway's service credential for the cache
    cache_timeout_seconds: float = 1.0
    # How long a request waits for its embedding and lookup before it goes to a replica as a
    # miss (the lookup goes on; its vector still stores the answer). A hit is worth waiting a
    # little for; a miss must cost next to nothing.
    cache_lookup_budget_seconds: float = 0.05
    # Routing: "prefix" (affinity balanced against load) or "round-robin" (a baseline).
    routing: str = "prefix"
    weights: Weights = field(default_factory=Weights)
    # The shared prefix index (the cache tier's PrefixCache, same token as the cache); empty:
    # each gateway routes on its own records.
    prefix_cache: str = ""
    prefix_mode: str = "approximate"  # "precise": the replicas report KV events to the index
    prefix_timeout_seconds: float = 0.1


def _key_value(text: str, flag: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"{flag} takes NAME=VALUE, got {text!r}")
    return name, value


def parse(argv: list[str] | None = None) -> GatewayConfig:
    p = argparse.ArgumentParser(prog="python -m services.gateway", description=__doc__)
    add_server_flags(p, default_port=50051)
    p.add_argument("--api-keys", default=os.environ.get("SPOTMESH_API_KEYS", ""),
                   help="TOML file of API keys (see README)")
    p.add_argument("--model", action="append", default=[], metavar="NAME=DIR",
                   help="a served model and its tokenizer directory; first is the default")
    p.add_argument("--replica", action="append", default=[], metavar="HOST:PORT")
    p.add_argument("--replicas-file", default="")
    p.add_argument("--price", action="append", default=[], metavar="POOL=USD_PER_HOUR")
    p.add_argument("--max-prompt-bytes", type=int, default=Limits.max_prompt_bytes)
    p.add_argument("--max-tokens-limit", type=int, default=Limits.max_tokens_limit)
    p.add_argument("--default-max-tokens", type=int, default=Limits.default_max_tokens)
    p.add_argument("--load-poll-seconds", type=float, default=0.5)
    p.add_argument("--resume-attempts", type=int, default=2,
                   help="times a stream may move to another replica mid-stream (0: never)")
    p.add_argument("--embedder", default="", metavar="HOST:PORT")
    p.add_argument("--cache", default="", metavar="HOST:PORT")
    p.add_argument("--cache-token", default=os.environ.get("SPOTMESH_CACHE_TOKEN", ""))
    p.add_argument("--cache-timeout-seconds", type=float, default=1.0,
                   help="deadline of each embedder and cache call (stores included)")
    p.add_argument("--cache-lookup-budget-ms", type=float,
                   default=float(os.environ.get("SPOTMESH_CACHE_LOOKUP_BUDGET_MS", "50")),
                   help="longest a request waits for a cache lookup before it goes to a "
                        "replica as a miss; env SPOTMESH_CACHE_LOOKUP_BUDGET_MS")
    p.add_argument("--routing", choices=ROUTING_POLICIES, default="prefix")
    w = Weights()
    p.add_argument("--weight-prefix", type=float, default=w.prefix,
                   help="weight of the prefix-affinity scorer")
    p.add_argument("--weight-queue", type=float, default=w.queue,
                   help="weight of the queue-depth scorer")
    p.add_argument("--weight-kv", type=float, default=w.kv,
                   help="weight of the KV-cache-usage scorer")
    p.add_argument("--queue-tolerance", type=float, default=w.queue_tolerance,
                   help="queued requests, beyond the emptiest replica's, that cancel a full "
                        "prefix match")
    p.add_argument("--prefix-cache", default="", metavar="HOST:PORT",
                   help="the shared prefix index (PrefixCache); uses --cache-token")
    p.add_argument("--prefix-mode", choices=PREFIX_MODES, default="approximate")
    p.add_argument("--prefix-timeout-seconds", type=float, default=0.1)
    a = p.parse_args(argv)
    if min(a.weight_prefix, a.weight_queue, a.weight_kv) < 0:
        p.error("--weight-* must be >= 0")
    if a.resume_attempts < 0:
        p.error("--resume-attempts must be >= 0")
    if a.queue_tolerance <= 0:
        p.error("--queue-tolerance must be > 0")
    if a.prefix_cache and not a.cache_token:
        p.error("--prefix-cache needs --cache-token (or SPOTMESH_CACHE_TOKEN)")
    if a.cache_lookup_budget_ms <= 0:
        p.error("--cache-lookup-budget-ms must be > 0")
    if a.prefix_timeout_seconds <= 0:
        p.error("--prefix-timeout-seconds must be > 0")
    if bool(a.embedder) != bool(a.cache):
        p.error("--embedder and --cache go together (both turn the semantic cache on)")
    if a.cache and not a.cache_token:
        p.error("--cache needs --cache-token (or SPOTMESH_CACHE_TOKEN)")
    models = dict(_key_value(m, "--model") for m in a.model)
    prices = dict(DEFAULT_PRICES_USD_PER_HOUR)
    for item in a.price:
        pool, value = _key_value(item, "--price")
        if pool not in prices:
            p.error(f"--price pool must be one of {sorted(prices)}, got {pool!r}")
        prices[pool] = float(value)
    if not a.api_keys:
        p.error("--api-keys FILE is required (spotmesh up writes a development one)")
    return GatewayConfig(
        server=server_config_from_args(a),
        api_keys_file=a.api_keys,
        models=models,
        replicas=a.replica,
        replicas_file=a.replicas_file,
        prices_usd_per_hour=prices,
        limits=Limits(
            max_prompt_bytes=a.max_prompt_bytes,
            max_tokens_limit=a.max_tokens_limit,
            default_max_tokens=a.default_max_tokens,
        ),
        load_poll_seconds=a.load_poll_seconds,
        resume_attempts=a.resume_attempts,
        embedder=a.embedder,
        cache=a.cache,
        cache_token=a.cache_token,
        cache_timeout_seconds=a.cache_timeout_seconds,
        cache_lookup_budget_seconds=a.cache_lookup_budget_ms / 1000.0,
        routing=a.routing,
        weights=Weights(prefix=a.weight_prefix, queue=a.weight_queue, kv=a.weight_kv,
                        queue_tolerance=a.queue_tolerance),
        prefix_cache=a.prefix_cache,
        prefix_mode=a.prefix_mode,
        prefix_timeout_seconds=a.prefix_timeout_seconds,
    )
