"""Precise prefix tracking: the engine's own KV-cache events, relayed to the shared prefix index.

vLLM publishes every block it stores or evicts (``kv_events_config``: a ZMQ PUB socket, msgpack
``KVEventBatch`` messages of ``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared``). Its
block hashes are its own (a seeded hash of its internal key), so the gateway cannot compute
them; but ``BlockStored`` carries the blocks' token ids, so this relay recomputes spotmesh's
chained hashes (:func:`spotmesh.prefix_hash.block_hashes`) from them, remembers which vLLM hash
became which spotmesh hash, and sends ``Record`` / ``Evict`` / ``Forget`` to the index under
this replica's name. The index then says what the engine really holds, not what the gateways
guessed.

Lost events are detected by the batches' sequence numbers; after a gap (or when this relay
starts, or the engine clears its cache) the replica's entries are forgotten and rebuilt from
new events, so the index under-reports for a while rather than claiming blocks that are gone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict

import grpc
from prometheus_client import Counter

from spotmesh.prefix_hash import ROOT_HASH, block_hashes
from spotmesh.runtime import cancel_and_wait, fields
from spotmesh.v1 import cache_pb2, cache_pb2_grpc

log = logging.getLogger("spotmesh.inference")

EVENTS = Counter("spotmesh_inference_kv_events_total",
                 "KV-cache events relayed to the prefix index, by kind.", ["kind"])
UNTRANSLATABLE = Counter(
    "spotmesh_inference_kv_events_untranslatable_blocks_total",
    "Stored blocks whose parent block was never seen (after a gap), so not indexed.")
GAPS = Counter("spotmesh_inference_kv_event_gaps_total",
               "Sequence gaps in the engine's KV-event stream (each forgets the index entry).")
RELAY_ERRORS = Counter("spotmesh_inference_kv_relay_errors_total",
                       "Calls to the prefix index that failed.", ["method"])


class HashTranslator:
    """vLLM block hash -> spotmesh chained hash, for the blocks the engine holds (bounded)."""

    def __init__(self, max_blocks: int) -> None:
        self.max_blocks = max_blocks
        self._ours: OrderedDict[object, int] = OrderedDict()

    def stored(self, vllm_hashes: list, parent, token_ids: list[int],
               block_size: int) -> list[int]:
        """spotmesh hashes of newly stored blocks ([] when the parent is unknown)."""
        if parent is None:
            our_parent = ROOT_HASH
        elif parent in self._ours:
            our_parent = self._ours[parent]
        else:
            UNTRANSLATABLE.inc(len(vllm_hashes))
            return []
        ours = block_hashes(token_ids, block_size, parent=our_parent)
        if len(ours) != len(vllm_hashes):
            # Token ids that do not fill the announced blocks: not a layout this relay knows.
            UNTRANSLATABLE.inc(len(vllm_hashes))
            return []
        for v, o in zip(vllm_hashes, ours, strict=True):
            self._ours[v] = o
            self._ours.move_to_end(v)
        while len(self._ours) > self.max_blocks:
            self._ours.popitem(last=False)
        return ours

    def removed(self, vllm_hashes: list) -> list[int]:
        return [o for v in vllm_hashes if (o := self._ours.pop(v, None)) is not None]

    def clear(self) -> None:
        self._ours.clear()


class KvEventRelay:
    """Subscribes to the engine's ZMQ publisher and keeps the prefix index in step."""

    def __init__(self, endpoint: str, index_address: str, token: str, model: str,
                 capacity_blocks: int, timeout_seconds: float = 2.0) -> None:
        import zmq
        import zmq.asyncio

        self.endpoint = endpoint
        self.model = model
        self.capacity_blocks = capacity_blocks
        self.replica = ""
        self.timeout = timeout_seconds
        self.translator = HashTranslator(max(1, capacity_blocks) * 2)  # resized by start()
        self._ctx = zmq.asyncio.Context()
        # Connect before the engine binds: ZMQ reconnects, and no event is missed at start.
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._sub.connect(endpoint)
        self._channel = grpc.aio.insecure_channel(index_address)
        self._stub = cache_pb2_grpc.PrefixCacheStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._next_seq: int | None = None
        self._task: asyncio.Task | None = None
        self._last_error_log = 0.0

    def start(self, replica: str, model: str, capacity_blocks: int) -> None:
        self.replica, self.model, self.capacity_blocks = replica, model, capacity_blocks
        # Every block the engine can hold, twice over: a bound against lost removals only.
        self.translator = HashTranslator(max(1, capacity_blocks) * 2)
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
        # The engine is going away with its cache: nothing it held can be reused.
        if self.replica:
            await self._call("Forget", self._stub.Forget,
                             cache_pb2.ForgetRequest(replica=self.replica))
        self._sub.close(linger=0)
        self._ctx.term()
        await self._channel.close()

    async def _run(self) -> None:
        import msgspec
        from vllm.distributed.kv_events import KVEventBatch

        decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
        # A restarted replica keeps its name; its old entries describe a cache that is gone.
        await self._forget()
        while True:
            _topic, seq_bytes, payload = await self._sub.recv_multipart()
            seq = int.from_bytes(seq_bytes, "big", signed=True)
            if self._next_seq is not None and seq != self._next_seq:
                GAPS.inc()
                log.warning("KV events lost; forgetting this replica's index entries",
                            extra=fields(expected=self._next_seq, got=seq))
                await self._forget()
            self._next_seq = seq + 1
            try:
                batch = decoder.decode(payload)
            except msgspec.DecodeError as exc:
                log.warning("undecodable KV event batch", extra=fields(error=str(exc)))
                continue
            await self.apply(batch.events)

    async def apply(self, events: list) -> None:
        """Relay one batch of events (stores batched into one Record, evictions into one
        Evict, in event order)."""
        stored: list[int] = []
        removed: list[int] = []
        for ev in events:
            kind = type(ev).__name__
            EVENTS.labels(kind).inc()
            if kind == "BlockStored":
                if getattr(ev, "lora_name", None) or getattr(ev, "lora_id", None) \
                        or any(getattr(ev, "extra_keys", None) or ()):
                    continue  # LoRA / multimodal / salted blocks: the gateway never asks
                stored += self.translator.stored(list(ev.block_hashes), ev.parent_block_hash,
                                                 list(ev.token_ids), ev.block_size)
            elif kind == "BlockRemoved":
                removed += self.translator.removed(list(ev.block_hashes))
            elif kind == "AllBlocksCleared":
                stored, removed = [], []
                await self._forget()
        if removed:
            await self._call("Evict", self._stub.Evict, cache_pb2.EvictRequest(
                replica=self.replica, model=self.model, block_hashes=removed))
        if stored:
            # The engine's own BlockRemoved events drive eviction here; the index's LRU bound
            # (twice the engine's capacity) is only a backstop against lost events.
            await self._call("Record", self._stub.Record, cache_pb2.RecordRequest(
                replica=self.replica, model=self.model, block_hashes=stored,
                capacity_blocks=2 * self.capacity_blocks))

    async def _forget(self) -> None:
        self.translator.clear()
        await self._call("Forget", self._stub.Forget,
                         cache_pb2.ForgetRequest(replica=self.replica))

    async def _call(self, method: str, rpc, request) -> None:
        try:
            await rpc(request, metadata=self._metadata, timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            RELAY_ERRORS.labels(method).inc()
            now = time.monotonic()
            if now - self._last_error_log >= 10.0:
                self._last_error_log = now
                log.warning("prefix index call failed",
                            extra=fields(method=method, code=exc.code().name,
                                         detail=exc.details()))
