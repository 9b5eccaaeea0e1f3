"""The embedder's gRPC surface: validate against the contract, hand texts to the micro-batcher,
translate its outcomes to status codes."""

from __future__ import annotations

import asyncio
import logging

import grpc
from prometheus_client import Counter

from services.embedder.batcher import BatcherClosed, EncoderFailed, MicroBatcher, QueueFull
from services.embedder.config import MAX_TEXT_BYTES, MAX_TEXTS
from spotmesh.runtime import fields
from spotmesh.v1 import embedder_pb2, embedder_pb2_grpc

log = logging.getLogger("spotmesh.embedder")

REQUESTS = Counter(
    "spotmesh_embedder_requests_total", "Embed calls by final gRPC status code.", ["code"]
)


class InvalidRequest(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def validate(texts: list[str]) -> None:
    """Raise :class:`InvalidRequest` naming the first field that breaks the contract."""
    if not texts:
        raise InvalidRequest(f"texts must hold 1-{MAX_TEXTS} texts, got none")
    if len(texts) > MAX_TEXTS:
        raise InvalidRequest(f"texts must hold 1-{MAX_TEXTS} texts, got {len(texts)}")
    for i, text in enumerate(texts):
        if not text:
            raise InvalidRequest(f"texts[{i}] is empty")
        # Cheap upper bound first: a UTF-8 encoding is at most 4 bytes per code point.
        if len(text) * 4 > MAX_TEXT_BYTES:
            size = len(text.encode("utf-8"))
            if size > MAX_TEXT_BYTES:
                raise InvalidRequest(
                    f"texts[{i}] is {size} bytes of UTF-8; at most {MAX_TEXT_BYTES}"
                )


class EmbedderServicer(embedder_pb2_grpc.EmbedderServicer):
    def __init__(self, batcher: MicroBatcher) -> None:
        self.batcher = batcher
        self.encoder = batcher.encoder

    async def Embed(
        self, request: embedder_pb2.EmbedRequest, context
    ) -> embedder_pb2.EmbedResponse:
        code = grpc.StatusCode.OK
        try:
            return await self._embed(request)
        except InvalidRequest as exc:
            code = grpc.StatusCode.INVALID_ARGUMENT
            await context.abort(code, exc.message)
        except QueueFull as exc:
            code = grpc.StatusCode.RESOURCE_EXHAUSTED
            await context.abort(code, str(exc))
        except BatcherClosed as exc:
            code = grpc.StatusCode.UNAVAILABLE
            await context.abort(code, str(exc))
        except EncoderFailed as exc:
            code = grpc.StatusCode.INTERNAL
            log.error("encoder failed", extra=fields(error=str(exc), texts=len(request.texts)))
            await context.abort(code, f"encoder failed: {exc}")
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            code = grpc.StatusCode.UNKNOWN  # what grpc answers for an unhandled exception
            log.exception("embed failed")
            raise
        finally:
            REQUESTS.labels(code.name).inc()

    async def _embed(self, request: embedder_pb2.EmbedRequest) -> embedder_pb2.EmbedResponse:
        texts = list(request.texts)
        validate(texts)
        vectors = await self.batcher.embed(texts)
        enc = self.encoder
        return embedder_pb2.EmbedResponse(
            embeddings=[embedder_pb2.Embedding(values=row) for row in vectors.tolist()],
            model=enc.name,
            dim=enc.dim,
            backend=enc.backend,
        )
