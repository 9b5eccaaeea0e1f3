"""The semantic cache's gRPC surface: authenticate, validate, translate, call the domain.

Callers are the gateway (service token) and operators (admin token), each sending
``authorization: Bearer <token>``. Every bad input is INVALID_ARGUMENT naming the field (the
domain checks again what it relies on); Milvus trouble is UNAVAILABLE, so the gateway serves
from inference as on a miss and retries later.

Milvus calls are blocking (see ``services.cache.semantic``), so they run on a small thread
pool of this servicer's own: a slow Milvus ties up those threads, never the event loop, and
never the default executor other code may share.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc

from services.cache.answers import Answer, Hit
from services.cache.auth import ROLE_ADMIN, ROLE_SERVICE, Denied, TokenAuth
from services.cache.bounds import check_tenant
from services.cache.metrics import HITS, LOOKUP_LATENCY, LOOKUPS, STORES, TenantLabels
from services.cache.milvus import CacheSchemaError, CacheUnavailable
from services.cache.semantic import SemanticCache
from spotmesh.runtime import fields
from spotmesh.v1 import cache_pb2, cache_pb2_grpc, common_pb2
from spotmesh.validation import InvalidField

log = logging.getLogger("spotmesh.cache")

T = TypeVar("T")
# Log a Milvus failure at most this often per method: an outage must not flood the logs.
ERROR_LOG_INTERVAL_SECONDS = 10.0


class SemanticCacheServicer(cache_pb2_grpc.SemanticCacheServicer):
    def __init__(self, cache: SemanticCache, *, token: str, admin_token: str = "",
                 workers: int = 4, tenant_labels: TenantLabels | None = None) -> None:
        self.cache = cache
        self._auth = TokenAuth(token, admin_token)
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="milvus")
        self._labels = tenant_labels or TenantLabels()
        self._last_error_log: dict[str, float] = {}

    async def run_blocking(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn`` on the Milvus thread pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    async def close(self) -> None:
        """Flush pending writes and release Milvus (after the server stopped taking calls)."""
        try:
            await self.run_blocking(self.cache.close)
        finally:
            self._executor.shutdown(wait=True)

    # --- RPCs ---------------------------------------------------------------------------------

    async def Lookup(self, request: cache_pb2.LookupRequest, context) -> cache_pb2.LookupResponse:
        async def call() -> cache_pb2.LookupResponse:
            self._authorize(context, ROLE_SERVICE)
            started = time.perf_counter()
            hit = await self.run_blocking(
                self.cache.lookup, request.tenant, request.model, request.sampling_fingerprint,
                list(request.vector), request.threshold)
            LOOKUP_LATENCY.observe(time.perf_counter() - started)
            label = self._labels(request.tenant)
            LOOKUPS.labels(label).inc()
            if hit is None:
                return cache_pb2.LookupResponse(hit=False)
            HITS.labels(label).inc()
            return cache_pb2.LookupResponse(hit=True, answer=_answer_to_proto(hit))

        return await self._serve("Lookup", context, call)

    async def Store(self, request: cache_pb2.StoreRequest, context) -> cache_pb2.StoreResponse:
        async def call() -> cache_pb2.StoreResponse:
            self._authorize(context, ROLE_SERVICE)
            if request.finish_reason not in common_pb2.FinishReason.values():
                raise InvalidField("finish_reason", f"unknown value {request.finish_reason}")
            answer = Answer(
                prompt=request.prompt,
                text=request.text,
                token_ids=tuple(request.token_ids),
                finish_reason=request.finish_reason,
                prompt_tokens=request.usage.prompt_tokens,
                cached_prompt_tokens=request.usage.cached_prompt_tokens,
                completion_tokens=request.usage.completion_tokens,
                cost_usd=request.cost_usd,
                replica_seconds=request.replica_seconds,
            )
            stored = await self.run_blocking(
                self.cache.store, request.tenant, request.model, request.sampling_fingerprint,
                list(request.vector), answer, request.ttl_seconds, replace=request.replace)
            STORES.labels(self._labels(request.tenant)).inc()
            return cache_pb2.StoreResponse(entry_id=stored.entry_id, replaced=stored.replaced)

        return await self._serve("Store", context, call)

    async def Invalidate(self, request: cache_pb2.InvalidateRequest,
                         context) -> cache_pb2.InvalidateResponse:
        async def call() -> cache_pb2.InvalidateResponse:
            self._authorize(context, ROLE_ADMIN)
            deleted = await self.run_blocking(self.cache.invalidate, tenant=request.tenant,
                                              model=request.model, prompt=request.prompt)
            log.info("invalidated", extra=fields(tenant=request.tenant, model=request.model,
                                                 by_prompt=bool(request.prompt), deleted=deleted))
            return cache_pb2.InvalidateResponse(deleted=deleted)

        return await self._serve("Invalidate", context, call)

    async def Stats(self, request: cache_pb2.StatsRequest, context) -> cache_pb2.StatsResponse:
        async def call() -> cache_pb2.StatsResponse:
            self._authorize(context, ROLE_SERVICE)
            if request.tenant:
                check_tenant(request.tenant)
            s = await self.run_blocking(self.cache.stats, request.tenant)
            return cache_pb2.StatsResponse(entries=s.entries, lookups=s.lookups, hits=s.hits,
                                           stores=s.stores, expired_swept=s.expired_swept)

        return await self._serve("Stats", context, call)

    # --- plumbing -----------------------------------------------------------------------------

    async def _serve(self, method: str, context, call: Callable[[], Awaitable[T]]) -> T:
        """Run ``call``; turn every expected failure into its status code."""
        try:
            return await call()
        except Denied as exc:
            code, message = exc.code, str(exc)
        except InvalidField as exc:
            code, message = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        except CacheUnavailable as exc:
            code, message = grpc.StatusCode.UNAVAILABLE, str(exc)
            self._log_backend_error(method, message)
        except CacheSchemaError as exc:
            code, message = grpc.StatusCode.FAILED_PRECONDITION, str(exc)
            self._log_backend_error(method, message)
        await context.abort(code, message)
        raise AssertionError("unreachable: context.abort raises")

    def _log_backend_error(self, method: str, message: str) -> None:
        now = time.monotonic()
        if now - self._last_error_log.get(method, -ERROR_LOG_INTERVAL_SECONDS) \
                >= ERROR_LOG_INTERVAL_SECONDS:
            self._last_error_log[method] = now
            log.warning("Milvus call failed", extra=fields(method=method, error=message))

    def _authorize(self, context, needed: str) -> None:
        self._auth.authorize(context, needed, "Invalidate")


def _answer_to_proto(hit: Hit) -> cache_pb2.CachedAnswer:
    a = hit.answer
    return cache_pb2.CachedAnswer(
        entry_id=hit.entry_id,
        prompt=a.prompt,
        text=a.text,
        token_ids=a.token_ids,
        similarity=hit.similarity,
        created_at=hit.created_at,
        expires_at=hit.expires_at,
        finish_reason=a.finish_reason,
        usage=common_pb2.Usage(prompt_tokens=a.prompt_tokens,
                               cached_prompt_tokens=a.cached_prompt_tokens,
                               completion_tokens=a.completion_tokens),
        cost_usd=a.cost_usd,
        replica_seconds=a.replica_seconds,
    )
