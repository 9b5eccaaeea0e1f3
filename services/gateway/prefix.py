"""Which replica already holds a prompt's prefix: the gateway's side of prefix-aware routing.

The gateway cuts the prompt's token ids into the engine's KV blocks and chains their hashes
(:func:`spotmesh.prefix_hash.block_hashes`), asks the shared prefix index (the cache tier's
``PrefixCache`` service) which replica holds how many leading blocks, and, once a replica has
sent the first token (so its engine has prefilled the prompt), records that the replica holds
them. Two modes:

- ``approximate``: the gateways' own records are the index (every gateway records where it
  routed; the index evicts least recently used blocks at each replica's KV capacity).
- ``precise``: the replicas report their engines' KV-cache events (blocks stored and evicted)
  to the index; gateways only read it.

The shared index is a hint, never a dependency: every call has a short deadline, and a gateway
that cannot reach it routes on a local index of its own records (counted in
``spotmesh_gateway_prefix_service_errors_total``), so a prefix-service outage costs cache hits,
not requests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
from prometheus_client import Counter, Gauge

from spotmesh.prefix_hash import block_hashes
from spotmesh.prefix_index import IndexFull, PrefixStore
from spotmesh.runtime import fields
from spotmesh.v1 import cache_pb2, cache_pb2_grpc

log = logging.getLogger("spotmesh.gateway")

MODES = ("approximate", "precise")
# Until a replica reports its KV capacity, assume a small engine's.
DEFAULT_CAPACITY_BLOCKS = 4096
# Fire-and-forget Record/Forget calls in flight at once; past it new ones are dropped (and
# counted): a slow index must not grow the gateway's memory.
MAX_PENDING_WRITES = 256
ERROR_LOG_INTERVAL_SECONDS = 10.0

SERVICE_ERRORS = Counter(
    "spotmesh_gateway_prefix_service_errors_total",
    "Calls to the shared prefix index that failed (routing fell back to the local index).",
    ["method"])
DROPPED_WRITES = Counter(
    "spotmesh_gateway_prefix_dropped_writes_total",
    "Record/Forget calls not sent because too many were already in flight.")
LOCAL_INDEX_BLOCKS = Gauge(
    "spotmesh_gateway_prefix_index_blocks",
    "Prefix blocks the gateway's local index tracks per replica.", ["replica"])


@dataclass
class PrefixRoute:
    """A prompt's chained block hashes and, per replica name, its leading blocks held."""

    model: str
    block_size: int
    hashes: list[int] = field(default_factory=list)
    matched: dict[str, int] = field(default_factory=dict)
    token_ids: Sequence[int] = ()  # the prompt's (for warming new replicas with hot prefixes)


class PrefixRouter:
    def __init__(self, address: str = "", token: str = "", mode: str = "approximate",
                 timeout_seconds: float = 0.1, max_message_bytes: int = 4 << 20,
                 capacity_blocks: int = DEFAULT_CAPACITY_BLOCKS) -> None:
        if mode not in MODES:
            raise ValueError(f"prefix mode must be one of {MODES}, got {mode!r}")
        if address and not token:
            raise ValueError("the prefix service needs a token")
        self.mode = mode
        self.timeout = timeout_seconds
        self.local = PrefixStore(capacity_blocks, max_replicas=4096, max_models=256)
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._channel = None
        self._stub = None
        if address:
            self._channel = grpc.aio.insecure_channel(address, options=[
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.max_receive_message_length", max_message_bytes)])
            self._stub = cache_pb2_grpc.PrefixCacheStub(self._channel)
        self._pending: set[asyncio.Task] = set()
        self._last_error_log = -ERROR_LOG_INTERVAL_SECONDS

    @property
    def shared(self) -> bool:
        return self._stub is not None

    def plan_local(self, model: str, prompt_ids: Sequence[int], block_size: int) -> PrefixRoute:
        route = PrefixRoute(model, block_size, token_ids=prompt_ids)
        if block_size > 0:
            route.hashes = block_hashes(prompt_ids, block_size)
            if route.hashes:
                route.matched = self.local.match(model, route.hashes)
        return route

    async def plan(self, model: str, prompt_ids: Sequence[int], block_size: int) -> PrefixRoute:
        """The prompt's hashes and who holds them, from the shared index when it answers in
        time and from the local one otherwise."""
        route = self.plan_local(model, prompt_ids, block_size)
        if self._stub is None or not route.hashes:
            return route
        try:
            resp = await self._stub.Match(
                cache_pb2.MatchRequest(model=model, block_hashes=route.hashes),
                metadata=self._metadata, timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            self._failed("Match", exc)
            return route
        route.matched = {m.replica: m.matched_blocks for m in resp.matches}
        return route

    def record(self, replica: str, route: PrefixRoute, capacity_blocks: int = 0) -> None:
        """The replica has prefilled the prompt (it sent a token): it holds these blocks."""
        if not route.hashes:
            return
        try:
            self.local.record(replica, route.model, route.hashes, capacity_blocks)
        except IndexFull:
            pass  # bounded far above any real fleet; a hint lost, not an error
        LOCAL_INDEX_BLOCKS.labels(replica).set(self.local.blocks(replica))
        if self._stub is not None and self.mode == "approximate":
            self._write("Record", self._stub.Record, cache_pb2.RecordRequest(
                replica=replica, model=route.model, block_hashes=route.hashes,
                capacity_blocks=capacity_blocks,
                token_ids=route.token_ids[:len(route.hashes) * route.block_size]))

    def forget(self, replica: str) -> None:
        """The replica went away: nothing it held can be reused."""
        self.local.forget(replica)
        try:
            LOCAL_INDEX_BLOCKS.remove(replica)
        except KeyError:
            pass
        if self._stub is not None:
            self._write("Forget", self._stub.Forget, cache_pb2.ForgetRequest(replica=replica))

    async def close(self) -> None:
        if self._pending:
            await asyncio.wait(list(self._pending), timeout=1.0)
        if self._channel is not None:
            await self._channel.close()

    def _write(self, method: str, rpc, request) -> None:
        if len(self._pending) >= MAX_PENDING_WRITES:
            DROPPED_WRITES.inc()
            return

        async def call() -> None:
            try:
                await rpc(request, metadata=self._metadata, timeout=max(1.0, self.timeout))
            except grpc.aio.AioRpcError as exc:
                self._failed(method, exc)

        task = asyncio.create_task(call())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def _failed(self, method: str, exc: grpc.aio.AioRpcError) -> None:
        SERVICE_ERRORS.labels(method).inc()
        now = time.monotonic()
        if now - self._last_error_log >= ERROR_LOG_INTERVAL_SECONDS:
            self._last_error_log = now
            log.warning("prefix service call failed; routing on the local index",
                        extra=fields(method=method, code=exc.code().name,
                                     detail=exc.details()))
