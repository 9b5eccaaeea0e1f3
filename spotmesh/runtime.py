"""What every spotmesh server process shares: a grpc.aio server with health and reflection, a
Prometheus /metrics endpoint, structured logs, and graceful SIGTERM.

Each service's ``__main__`` builds its servicer and hands it to :func:`run_server`; nothing
service-specific lives here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import disable_created_metrics, start_http_server

from spotmesh.config import ServerConfig
from spotmesh.decoding import rejecting_undecodable, tolerant_deserializer
from spotmesh.statedir import Ready

log = logging.getLogger("spotmesh")
# `_created` series double every counter's cardinality and no spotmesh dashboard reads them.
disable_created_metrics()


class JsonFormatter(logging.Formatter):
    """One JSON object per line, so logs from many processes can be merged and queried."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if extra:
            entry.update(extra)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class _CancelRaceFilter(logging.Filter):
    """Drops grpc.aio's error log of a write that raced the client's cancel (grpc/grpc#32551):
    the call ends CANCELLED as it should; the traceback is noise that hides real errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("ExecuteBatchError raised in core")


def setup_logging(level: str = "INFO", fmt: str = "json", service: str = "") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s")
        )
    handler.addFilter(_CancelRaceFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def fields(**kv: object) -> dict:
    """Structured fields for a log call: ``log.info("admitted", extra=fields(replica=r))``."""
    return {"fields": kv}


@dataclass
class Served:
    """Where a running server listens."""

    address: str
    metrics_address: str


def grpc_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # Notice dead peers (a preempted replica, a vanished client) within seconds, not hours.
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


class ServerProcess:
    """One gRPC server with the standard side services, started and stopped as a unit."""

    def __init__(self, name: str, config: ServerConfig, service_names: Sequence[str]) -> None:
        self.name = name
        self.config = config
        self.service_names = list(service_names)
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self._metrics_httpd = None
        self._stopping = asyncio.Event()

    async def start(self, add_servicers: Callable[[grpc.aio.Server], None]) -> Served:
        cfg = self.config
        self.server = grpc.aio.server(options=grpc_options(cfg.max_message_bytes))
        add_servicers(self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )
        port = self.server.add_insecure_port(f"{cfg.host}:{cfg.port}")
        if port == 0:
            raise SystemExit(f"{self.name}: cannot listen on {cfg.host}:{cfg.port}")
        await self.server.start()
        address = f"{cfg.host}:{port}"
        metrics_address = ""
        if cfg.metrics_port >= 0:
            httpd, _ = start_http_server(cfg.metrics_port, addr=cfg.host)
            self._metrics_httpd = httpd
            metrics_address = f"{cfg.host}:{httpd.server_port}"
        for svc in ["", *self.service_names]:
            await self.health.set(svc, health_pb2.HealthCheckResponse.SERVING)
        if cfg.ready_file:
            Ready(address, metrics_address, os.getpid(), time.time()).write(Path(cfg.ready_file))
        log.info("serving", extra=fields(service=self.name, address=address,
                                          metrics=metrics_address))
        return Served(address, metrics_address)

    async def set_not_serving(self) -> None:
        for svc in ["", *self.service_names]:
            await self.health.set(svc, health_pb2.HealthCheckResponse.NOT_SERVING)

    def request_stop(self) -> None:
        self._stopping.set()

    async def serve_until_signal(
        self, on_stop: Callable[[], Awaitable[None]] | None = None, grace_seconds: float = 5.0
    ) -> None:
        """Serve until SIGTERM/SIGINT (or :meth:`request_stop`), then shut down gracefully:
        health NOT_SERVING first (so balancers stop sending), then ``on_stop`` (the service
        finishes or hands over in-flight work), then the server stops with ``grace_seconds``."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        await self._stopping.wait()
        log.info("stopping", extra=fields(service=self.name))
        await self.set_not_serving()
        if on_stop is not None:
            await on_stop()
        assert self.server is not None
        await self.server.stop(grace_seconds)
        if self._metrics_httpd is not None:
            self._metrics_httpd.shutdown()
        if self.config.ready_file:
            Path(self.config.ready_file).unlink(missing_ok=True)
        log.info("stopped", extra=fields(service=self.name))


async def cancel_and_wait(task: asyncio.Task) -> None:
    """Cancel a background task and wait until it has stopped (its CancelledError is the
    expected outcome, not an error)."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def add_servicer(server: grpc.aio.Server, servicer: object, service: ServiceDescriptor) -> None:
    """Register ``servicer`` for ``service`` like the generated ``add_*_to_server`` does, but
    with tolerant request decoding: an unparsable request is answered INVALID_ARGUMENT naming
    the field before the servicer sees it. Unary-request methods only (spotmesh has no
    client-streaming RPCs)."""
    handlers = {}
    for method in service.methods:
        req_cls = message_factory.GetMessageClass(method.input_type)
        resp_cls = message_factory.GetMessageClass(method.output_type)
        if method.client_streaming:
            raise ValueError(f"{method.full_name}: client-streaming methods are not supported")
        behaviour = rejecting_undecodable(getattr(servicer, method.name), method.server_streaming)
        kind = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = kind(
            behaviour,
            request_deserializer=tolerant_deserializer(req_cls),
            response_serializer=resp_cls.SerializeToString,
        )
    generic = grpc.method_handlers_generic_handler(service.full_name, handlers)
    server.add_generic_rpc_handlers((generic,))
    server.add_registered_method_handlers(service.full_name, handlers)


def run(main: Callable[[], Awaitable[None]]) -> None:
    """Run a server's async main until it returns (after SIGTERM/SIGINT)."""
    asyncio.run(main())
