"""The prefix cache's gRPC surface: one index of which replica holds which KV-cache prefix,
shared by every gateway (and fed by the replicas' own KV-cache events in precise mode).

The index is soft state: losing it costs cache hits, never answers, so the service keeps it in
memory and every caller treats it as a hint (a gateway that cannot reach it routes on its own
local index). Every input is bounded: replica and model names, hashes per call, replicas and
models tracked. A bad one is INVALID_ARGUMENT naming the field; a full index is
RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import grpc
from prometheus_client import Counter, Gauge

from services.cache.auth import ROLE_SERVICE, Denied, TokenAuth
from spotmesh.prefix_index import IndexFull, PrefixStore
from spotmesh.runtime import fields
from spotmesh.v1 import cache_pb2, cache_pb2_grpc
from spotmesh.validation import InvalidField

log = logging.getLogger("spotmesh.cache.prefix")

# Replica ids are names or host:port addresses ("inference-0", "10.0.0.7:50061", "[::1]:5").
REPLICA_RE = re.compile(r"[A-Za-z0-9_.:\-\[\]@/]{1,253}")
MAX_MODEL_CHARS = 512
# 32k blocks is a 512k-token prompt at 16 tokens per block: longer than any model's context.
DEFAULT_MAX_HASHES = 32768
MAX_BLOCK_TOKENS = 1024  # the largest KV block size an engine uses
MAX_HOT = 256

MATCHES = Counter("spotmesh_prefix_cache_matches_total", "Match calls answered.")
MATCHED_BLOCKS = Counter("spotmesh_prefix_cache_matched_blocks_total",
                         "Leading blocks held by the best-matching replica, summed over Matches.")
RECORDED_BLOCKS = Counter("spotmesh_prefix_cache_recorded_blocks_total",
                          "Blocks reported held (Record calls).")
EVICTED_BLOCKS = Counter("spotmesh_prefix_cache_evicted_blocks_total",
                         "Blocks dropped from the index, by cause.", ["cause"])
INDEX_BLOCKS = Gauge("spotmesh_prefix_cache_index_blocks", "Blocks indexed per replica.",
                     ["replica"])
INDEX_REPLICAS = Gauge("spotmesh_prefix_cache_replicas", "Replicas the index tracks.")


class PrefixCacheServicer(cache_pb2_grpc.PrefixCacheServicer):
    def __init__(self, store: PrefixStore, *, token: str, admin_token: str = "",
                 max_hashes: int = DEFAULT_MAX_HASHES) -> None:
        self.store = store
        self._auth = TokenAuth(token, admin_token)
        self.max_hashes = max_hashes

    async def Match(self, request: cache_pb2.MatchRequest, context) -> cache_pb2.MatchResponse:
        try:
            self._auth.authorize(context, ROLE_SERVICE)
            _check_model(request.model)
            self._check_hashes(request.block_hashes)
        except (Denied, InvalidField) as exc:
            await _abort(context, exc)
        matched = self.store.match(request.model, request.block_hashes)
        MATCHES.inc()
        MATCHED_BLOCKS.inc(max(matched.values(), default=0))
        return cache_pb2.MatchResponse(matches=[
            cache_pb2.ReplicaMatch(replica=r, matched_blocks=n)
            for r, n in sorted(matched.items(), key=lambda kv: -kv[1])
        ])

    async def Record(self, request: cache_pb2.RecordRequest,
                     context) -> cache_pb2.RecordResponse:
        try:
            self._auth.authorize(context, ROLE_SERVICE)
            _check_replica(request.replica)
            _check_model(request.model)
            self._check_hashes(request.block_hashes)
            if request.capacity_blocks < 0:
                raise InvalidField("capacity_blocks", "must be >= 0")
            if request.token_ids and len(request.token_ids) > self.max_hashes * MAX_BLOCK_TOKENS:
                raise InvalidField("token_ids", "longer than the block hashes can cover")
            indexed, evicted = self.store.record(request.replica, request.model,
                                                 request.block_hashes, request.capacity_blocks)
        except (Denied, InvalidField, IndexFull) as exc:
            await _abort(context, exc)
        if request.token_ids:
            self.store.record_tokens(request.model, request.block_hashes, request.token_ids)
        RECORDED_BLOCKS.inc(len(request.block_hashes))
        EVICTED_BLOCKS.labels("capacity").inc(evicted)
        INDEX_BLOCKS.labels(request.replica).set(self.store.blocks(request.replica))
        INDEX_REPLICAS.set(len(self.store.replicas()))
        return cache_pb2.RecordResponse(indexed_blocks=indexed)

    async def Evict(self, request: cache_pb2.EvictRequest, context) -> cache_pb2.EvictResponse:
        try:
            self._auth.authorize(context, ROLE_SERVICE)
            _check_replica(request.replica)
            _check_model(request.model)
            self._check_hashes(request.block_hashes)
        except (Denied, InvalidField) as exc:
            await _abort(context, exc)
        evicted = self.store.evict(request.replica, request.model, request.block_hashes)
        EVICTED_BLOCKS.labels("engine").inc(evicted)
        # Evicting from a replica the index does not track is not an error, but it must not
        # create a series: any name a caller invents would stay in /metrics for good.
        if self.store.tracks(request.replica):
            INDEX_BLOCKS.labels(request.replica).set(self.store.blocks(request.replica))
        return cache_pb2.EvictResponse(evicted_blocks=evicted)

    async def Hot(self, request: cache_pb2.HotRequest, context) -> cache_pb2.HotResponse:
        try:
            self._auth.authorize(context, ROLE_SERVICE)
            _check_model(request.model)
            if not 1 <= request.limit <= MAX_HOT:
                raise InvalidField("limit", f"must be in [1, {MAX_HOT}]")
        except (Denied, InvalidField) as exc:
            await _abort(context, exc)
        return cache_pb2.HotResponse(prefixes=[
            cache_pb2.HotPrefix(token_ids=tokens, hits=hits)
            for tokens, hits in self.store.hot(request.model, request.limit)])

    async def Forget(self, request: cache_pb2.ForgetRequest,
                     context) -> cache_pb2.ForgetResponse:
        try:
            self._auth.authorize(context, ROLE_SERVICE)
            _check_replica(request.replica)
        except (Denied, InvalidField) as exc:
            await _abort(context, exc)
        # Every gateway that sees a replica go away calls Forget: unknown is not an error.
        forgotten = self.store.forget(request.replica)
        EVICTED_BLOCKS.labels("forget").inc(forgotten)
        try:
            INDEX_BLOCKS.remove(request.replica)
        except KeyError:
            pass
        INDEX_REPLICAS.set(len(self.store.replicas()))
        if forgotten:
            log.info("replica forgotten",
                     extra=fields(replica=request.replica, blocks=forgotten))
        return cache_pb2.ForgetResponse(forgotten_blocks=forgotten)

    def _check_hashes(self, hashes: Sequence[int]) -> None:
        if not hashes:
            raise InvalidField("block_hashes", "must not be empty (a prompt shorter than one "
                                               "KV block has nothing to match or record)")
        if len(hashes) > self.max_hashes:
            raise InvalidField("block_hashes", f"{len(hashes)} hashes; at most "
                                               f"{self.max_hashes} per call")


def _check_replica(replica: str) -> None:
    if not replica:
        raise InvalidField("replica", "is required")
    if not REPLICA_RE.fullmatch(replica):
        raise InvalidField("replica", "must be 1-253 characters of letters, digits and "
                                      "_ . : - [ ] @ /")


def _check_model(model: str) -> None:
    if not model:
        raise InvalidField("model", "is required")
    if len(model) > MAX_MODEL_CHARS:
        raise InvalidField("model", f"longer than {MAX_MODEL_CHARS} characters")


async def _abort(context, exc: Exception) -> None:
    if isinstance(exc, Denied):
        code = exc.code
    elif isinstance(exc, IndexFull):
        code = grpc.StatusCode.RESOURCE_EXHAUSTED
    else:
        code = grpc.StatusCode.INVALID_ARGUMENT
    await context.abort(code, str(exc))
