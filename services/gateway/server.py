"""The gateway's gRPC surface: authenticate, validate, limit, then the request flow answers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import grpc
from prometheus_client import Counter, Gauge

from services.gateway.auth import ApiKeys, AuthError
from services.gateway.config import GatewayConfig
from services.gateway.errors import Rejected
from services.gateway.flow import RequestFlow
from services.gateway.models import ModelCatalog, UnknownModel
from services.gateway.ratelimit import Limited, TenantLimiter
from services.gateway.validation import validate
from spotmesh.runtime import fields
from spotmesh.v1 import gateway_pb2, gateway_pb2_grpc
from spotmesh.validation import InvalidField

log = logging.getLogger("spotmesh.gateway")

REQUESTS = Counter("spotmesh_gateway_requests_total", "Calls by method and final status code.",
                   ["method", "code"])
IN_FLIGHT = Gauge("spotmesh_gateway_in_flight_requests", "Requests being served.")
RATE_LIMITED = Counter("spotmesh_gateway_rate_limited_total",
                       "Requests refused by a tenant's rate limit, by the limit hit.", ["limit"])


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    """Authenticates, validates, applies the tenant's rate limits, and hands the request to the
    flow (:mod:`services.gateway.flow`)."""

    def __init__(self, cfg: GatewayConfig, keys: ApiKeys, catalog: ModelCatalog,
                 flow: RequestFlow, limiter: TenantLimiter | None = None) -> None:
        self.cfg = cfg
        self.keys = keys
        self.catalog = catalog
        self.flow = flow
        self.limiter = limiter or TenantLimiter()

    @contextlib.asynccontextmanager
    async def _outcome(self, method: str, context):
        """Turns whatever ends a call into its status code: in metrics and on the wire."""
        code = grpc.StatusCode.OK
        IN_FLIGHT.inc()
        try:
            yield
        except Rejected as exc:
            code = exc.code
            await context.abort(exc.code, exc.message)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            # A bug, not the caller's fault: say so plainly and keep the details in the log.
            code = grpc.StatusCode.INTERNAL
            log.exception("request failed", extra=fields(method=method))
            await context.abort(code, "internal error in the gateway; see its log")
        finally:
            IN_FLIGHT.dec()
            REQUESTS.labels(method, code.name).inc()

    async def Generate(self, request, context):
        async with self._outcome("Generate", context):
            async for msg in self._generate(request, context):
                yield msg

    async def Complete(self, request, context):
        out = gateway_pb2.GenerateResponse()
        text: list[str] = []
        async with self._outcome("Complete", context):
            async for msg in self._generate(request, context):
                text.append(msg.text)
                out.token_ids.extend(msg.token_ids)
                if msg.request_id:
                    out.request_id = msg.request_id
                if msg.HasField("served_by"):
                    out.served_by.CopyFrom(msg.served_by)
                if msg.finish_reason:
                    out.finish_reason = msg.finish_reason
                    out.usage.CopyFrom(msg.usage)
                    out.cost_usd = msg.cost_usd
                    out.cache_hit = msg.cache_hit
            out.text = "".join(text)
        return out

    def _admit(self, request, context):
        try:
            tenant = self.keys.authenticate(context.invocation_metadata())
        except AuthError as exc:
            raise Rejected(grpc.StatusCode.UNAUTHENTICATED, str(exc)) from None
        try:
            valid = validate(request, self.cfg.limits)
            model = self.catalog.resolve(valid.model)
        except InvalidField as exc:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        except UnknownModel:
            raise Rejected(grpc.StatusCode.NOT_FOUND,
                           f"model {valid.model!r} is not served; served models: "
                           f"{', '.join(self.catalog.names())}") from None
        if not tenant.may_use(model.name):
            raise Rejected(grpc.StatusCode.PERMISSION_DENIED,
                           f"tenant {tenant.name!r} may not use model {model.name!r}")
        try:
            prompt_ids = model.encode(valid)
        except InvalidField as exc:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        field = "prompt" if valid.prompt is not None else "messages"
        if len(prompt_ids) >= model.max_model_len:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT,
                           f"{field} is {len(prompt_ids)} tokens; model {model.name!r} takes at "
                           f"most {model.max_model_len - 1} prompt tokens")
        if len(prompt_ids) + valid.sampling.max_tokens > model.max_model_len:
            room = model.max_model_len - len(prompt_ids)
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT,
                           f"sampling.max_tokens {valid.sampling.max_tokens} does not fit: the "
                           f"{len(prompt_ids)}-token {field} leaves room for {room} tokens in "
                           f"model {model.name!r}'s {model.max_model_len}-token context")
        return tenant, valid, model, prompt_ids

    async def _generate(self, request, context):
        arrived = time.monotonic()
        tenant, valid, model, prompt_ids = self._admit(request, context)
        reserved = len(prompt_ids) + valid.sampling.max_tokens
        try:
            self.limiter.admit(tenant.name, tenant.limits, reserved)
        except Limited as exc:
            RATE_LIMITED.labels(exc.limit).inc()
            raise Rejected(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from None
        used = {"tokens": len(prompt_ids)}
        try:
            async for msg in self.flow.answer(tenant, valid, model, prompt_ids, context, arrived,
                                              used):
                yield msg
        finally:
            # Give back what the request did not use (it stopped early, failed, or was a
            # cache hit that used no engine).
            self.limiter.refund(tenant.name, reserved - used["tokens"])
