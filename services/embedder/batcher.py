"""Micro-batching: many concurrent Embed calls become one encoder call.

On CPU a transformer costs little more for a batch of a few texts than for one (the weights are
read once either way), and the gateway embeds one prompt per request, so merging concurrent
callers multiplies throughput while a lone caller waits at most ``max_wait_ms`` extra. The
encoder runs in a worker thread so the event loop keeps accepting (and queueing) callers while a
batch is computed; whoever arrives meanwhile forms the next batch.

The queue is bounded in texts, not requests, because texts are what cost encoder time; a full
queue answers at once (:class:`QueueFull`, RESOURCE_EXHAUSTED on the wire) instead of letting
callers pile up past their deadlines.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from prometheus_client import Counter, Gauge, Histogram

from services.embedder.encoders import Encoder
from spotmesh.runtime import cancel_and_wait

BATCH_SIZE = Histogram(
    "spotmesh_embedder_batch_size",
    "Texts per encoder call.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
TEXTS = Counter("spotmesh_embedder_texts_total", "Texts handed to the encoder.")
ENCODE_SECONDS = Histogram(
    "spotmesh_embedder_encode_seconds",
    "Wall time of one encoder call (one micro-batch).",
    # One short text takes ~1 ms on a CPU core; 256 long ones take seconds.
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
QUEUE_DEPTH = Gauge("spotmesh_embedder_queue_depth", "Texts waiting for the encoder.")


class QueueFull(Exception):
    """Accepting these texts would exceed the queue bound; nothing was queued."""

    def __init__(self, waiting: int, incoming: int, limit: int) -> None:
        super().__init__(
            f"embedder queue is full: {waiting} texts waiting, {incoming} more would exceed "
            f"the limit of {limit}; retry later"
        )
        self.waiting = waiting
        self.incoming = incoming
        self.limit = limit


class BatcherClosed(Exception):
    """The batcher was closed before these texts were encoded."""


class EncoderFailed(Exception):
    """The encoder raised (or returned the wrong shape) for the batch holding these texts."""


@dataclass
class _Pending:
    texts: Sequence[str]
    future: asyncio.Future
    enqueued: float  # loop time


class MicroBatcher:
    """Merge concurrent :meth:`embed` calls into encoder calls of at most ``max_batch_size``
    texts. A call larger than that is split across consecutive batches (its parts stay in
    order); a call is never split to top up a batch, so one caller's texts are encoded with
    as few neighbours' as possible."""

    def __init__(
        self,
        encoder: Encoder,
        *,
        max_batch_size: int = 64,
        max_wait_ms: float = 2.0,
        max_queue: int = 4096,
        executor: Executor | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.encoder = encoder
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        # One worker thread: the encoder parallelises inside a call (its own threads), and two
        # concurrent calls would only split the same cores.
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix="embedder-encode")
        self._pending: deque[_Pending] = deque()
        self._queued = 0  # texts in _pending, cancelled callers' included until skipped
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._closed = False

    @property
    def queued(self) -> int:
        """Texts waiting for a batch (not counting the one being encoded)."""
        return self._queued

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Vectors for ``texts`` in order, ``(len(texts), dim)`` float32. Raises
        :class:`QueueFull` at once when the queue cannot take them, :class:`EncoderFailed`
        when the encoder failed on a batch holding them."""
        if self._closed:
            raise BatcherClosed("the embedder is shutting down")
        if not texts:
            return np.zeros((0, self.encoder.dim), dtype=np.float32)
        if self._queued + len(texts) > self.max_queue:
            raise QueueFull(self._queued, len(texts), self.max_queue)
        loop = asyncio.get_running_loop()
        self._start(loop)
        now = loop.time()
        parts = [
            _Pending(texts[i : i + self.max_batch_size], loop.create_future(), now)
            for i in range(0, len(texts), self.max_batch_size)
        ]
        self._pending.extend(parts)
        self._set_queued(self._queued + len(texts))
        assert self._arrived is not None
        self._arrived.set()
        try:
            results = await asyncio.gather(*(p.future for p in parts))
        except BaseException:
            for p in parts:
                if p.future.done() and not p.future.cancelled():
                    p.future.exception()  # retrieved: no "never retrieved" noise at GC
                # Parts still waiting are skipped by the worker instead of costing encoder time.
                p.future.cancel()
            raise
        return results[0] if len(results) == 1 else np.concatenate(results)

    async def close(self) -> None:
        """Stop the worker and fail whoever still waits. Call after the server stopped taking
        requests; a batch being encoded finishes in its thread but nobody receives it."""
        self._closed = True
        if self._worker is not None:
            await cancel_and_wait(self._worker)
            self._worker = None
        while self._pending:
            p = self._pending.popleft()
            if not p.future.done():
                p.future.set_exception(BatcherClosed("the embedder is shutting down"))
        self._set_queued(0)
        if self._own_executor:
            self._executor.shutdown(wait=False)

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._worker is None or self._worker.done():
            self._arrived = asyncio.Event()
            self._worker = loop.create_task(self._run(), name="embedder-batcher")

    def _set_queued(self, n: int) -> None:
        self._queued = n
        QUEUE_DEPTH.set(n)

    async def _run(self) -> None:
        assert self._arrived is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            batch = await self._collect(loop)
            if batch:
                await self._encode(loop, batch)

    async def _collect(self, loop: asyncio.AbstractEventLoop) -> list[_Pending]:
        """Take waiting parts up to max_batch_size texts, waiting until max_wait after the
        first part was queued for more to arrive."""
        assert self._arrived is not None
        batch: list[_Pending] = []
        size = 0
        deadline = None
        while True:
            while self._pending:
                p = self._pending[0]
                if p.future.done():  # its caller went away
                    self._pending.popleft()
                    self._set_queued(self._queued - len(p.texts))
                    continue
                if size + len(p.texts) > self.max_batch_size:
                    return batch
                self._pending.popleft()
                self._set_queued(self._queued - len(p.texts))
                batch.append(p)
                size += len(p.texts)
                if deadline is None:
                    deadline = p.enqueued + self.max_wait
            if not batch or size >= self.max_batch_size:
                return batch
            assert deadline is not None
            remaining = deadline - loop.time()
            if remaining <= 0:
                return batch
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)

    async def _encode(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending]) -> None:
        texts = [t for p in batch for t in p.texts]
        BATCH_SIZE.observe(len(texts))
        TEXTS.inc(len(texts))
        started = time.perf_counter()
        try:
            vectors = await loop.run_in_executor(self._executor, self.encoder.encode, texts)
            if getattr(vectors, "shape", None) != (len(texts), self.encoder.dim):
                raise EncoderFailed(
                    f"encoder returned shape {getattr(vectors, 'shape', None)} for "
                    f"{len(texts)} texts of dim {self.encoder.dim}"
                )
        except asyncio.CancelledError:
            # close() stopped the worker mid-batch: these callers would otherwise wait forever.
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(BatcherClosed("the embedder is shutting down"))
            raise
        except Exception as exc:
            failure = exc if isinstance(exc, EncoderFailed) else EncoderFailed(f"{exc!r}")
            failure.__cause__ = None if failure is exc else exc
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(failure)
            return
        finally:
            ENCODE_SECONDS.observe(time.perf_counter() - started)
        offset = 0
        for p in batch:
            if not p.future.done():
                p.future.set_result(vectors[offset : offset + len(p.texts)])
            offset += len(p.texts)
