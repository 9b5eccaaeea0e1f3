"""Flags every spotmesh server shares (where it listens, metrics, logging, message bounds)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

# gRPC's own default receive limit is 4 MiB; prompts are bounded far below that by the gateway,
# so a smaller cap turns an oversized message into RESOURCE_EXHAUSTED before it is parsed.
DEFAULT_MAX_MESSAGE_BYTES = 1 << 20


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 0  # 0: pick a free port (written to --ready-file)
    metrics_port: int = 0  # Prometheus /metrics; 0: pick a free port, -1: off
    log_level: str = "INFO"
    log_format: str = "json"  # "json" | "text"
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    # A file the server writes {"address": .., "metrics": ..., "pid": ..} to once it serves, so a
    # supervisor (spotmesh up, tests) learns the ports it picked without racing for them.
    ready_file: str = ""


def add_server_flags(p: argparse.ArgumentParser, *, default_port: int) -> None:
    p.add_argument("--host", default=os.environ.get("SPOTMESH_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=default_port)
    p.add_argument("--metrics-port", type=int, default=0)
    p.add_argument("--log-level", default=os.environ.get("SPOTMESH_LOG_LEVEL", "INFO"))
    p.add_argument("--log-format", choices=["json", "text"], default="json")
    p.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES)
    p.add_argument("--ready-file", default="")


def server_config_from_args(a: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        host=a.host,
        port=a.port,
        metrics_port=a.metrics_port,
        log_level=a.log_level.upper(),
        log_format=a.log_format,
        max_message_bytes=a.max_message_bytes,
        ready_file=a.ready_file,
    )
