"""The gateway's view of the inference replicas: who exists, who is healthy, how loaded.

Replicas come from static addresses and from a replicas file that a supervisor (``spotmesh up``,
the autoscaler) rewrites; a background loop polls each replica's ``Load`` so picking a replica
never waits on the network.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from prometheus_client import Counter, Gauge

from services.gateway.prefix import PrefixRoute
from services.gateway.routing.candidate import Candidate, RouteRequest
from services.gateway.routing.pipeline import Weights, router_for
from spotmesh.runtime import fields, grpc_options
from spotmesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc

log = logging.getLogger("spotmesh.gateway")

POOL_NAMES = {common_pb2.POOL_SPOT: "spot", common_pb2.POOL_ON_DEMAND: "on-demand"}
# Circuit breaker: a replica that failed this many calls in a row is skipped for a cool-down
# (1 s, doubling with each further failure, at most 30 s), then given one trial call (half
# open); a success closes it. A Load poll that succeeds after the replica was unreachable ends
# the cool-down early (it is back), but a replica that answers Load while failing calls stays
# skipped.
FAILURES_BEFORE_SKIP = 2
BREAKER_BASE_SECONDS = 1.0
BREAKER_MAX_SECONDS = 30.0

REPLICAS = Gauge("spotmesh_gateway_replicas", "Known inference replicas by state.", ["state"])
ROUTING_DECISIONS = Counter(
    "spotmesh_gateway_routing_decisions_total", "Replica choices by the scorer that won.",
    ["scorer"])
PREFIX_MATCHED_TOKENS = Counter(
    "spotmesh_gateway_prefix_matched_tokens_total",
    "Prompt tokens whose KV cache the chosen replica was expected to hold.")
BREAKER_OPENS = Counter("spotmesh_gateway_replica_breaker_opens_total",
                        "Times a failing replica was taken out of routing for a cool-down.")
QUEUE_DEPTH = Gauge(
    "spotmesh_gateway_queue_depth", "Requests waiting in the engines' queues, over all replicas."
)


@dataclass
class Replica:
    address: str
    channel: grpc.aio.Channel
    stub: inference_pb2_grpc.InferenceStub
    report: inference_pb2.LoadReport | None = None
    reachable: bool = False
    consecutive_failures: int = 0
    skip_until: float = 0.0  # monotonic; the breaker is open before it
    in_flight: int = 0  # streams this gateway has open on it: fresher than any report
    reported_at: float = field(default=0.0)

    @property
    def name(self) -> str:
        return self.report.replica if self.report and self.report.replica else self.address

    @property
    def pool(self) -> str:
        return POOL_NAMES.get(self.report.pool, "on-demand") if self.report else "on-demand"

    def breaker_open(self) -> bool:
        """Failed repeatedly and still in its cool-down: skipped by routing."""
        return (self.consecutive_failures >= FAILURES_BEFORE_SKIP
                and time.monotonic() < self.skip_until)

    def candidate(self, route: PrefixRoute | None = None) -> Candidate:
        """What routing knows of it, for this prompt's blocks."""
        report = self.report
        if report is None:  # never reported: nothing routes to it
            return Candidate(self.address, queue=self.in_flight, reachable=False)
        # Blocks of another size hash differently: such a replica holds none of them.
        same_blocks = route is not None and report.kv_block_size == route.block_size
        return Candidate(
            name=self.address,
            queue=self.in_flight + report.waiting,
            kv_usage=report.kv_cache_usage,
            prefix_blocks=route.matched.get(self.name, 0) if same_blocks else 0,
            spot=report.pool == common_pb2.POOL_SPOT,
            model=report.model,
            reachable=self.reachable,
            draining=report.draining,
            failing=self.breaker_open(),
        )



class ReplicaSet:
    def __init__(
        self,
        static: list[str],
        replicas_file: str = "",
        poll_seconds: float = 0.5,
        max_message_bytes: int = 1 << 20,
        on_report=None,
        weights: Weights | None = None,
        routing: str = "prefix",
        on_removed=None,
    ) -> None:
        self._static = list(static)
        self._file = Path(replicas_file) if replicas_file else None
        self._file_mtime = -1.0
        self._file_addresses: list[str] = []
        self._poll_seconds = poll_seconds
        self._options = grpc_options(max_message_bytes)
        self._on_report = on_report  # called with each LoadReport (context length, model)
        self.replicas: dict[str, Replica] = {}
        self.weights = weights or Weights()
        self.routing = routing
        self._on_removed = on_removed  # called with a removed replica's name (prefix index)
        self._task: asyncio.Task | None = None
        self._closing: set[asyncio.Task] = set()

    @property
    def routing(self) -> str:
        """The routing policy (``--routing``); setting it rebuilds the pipeline."""
        return self._routing

    @routing.setter
    def routing(self, policy: str) -> None:
        self.router = router_for(policy, self.weights)
        self._routing = policy

    async def start(self) -> None:
        await self._refresh_membership()
        await self._poll_all()
        self._task = asyncio.create_task(self._loop())

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
        for r in self.replicas.values():
            await r.channel.close()

    def available(self, model: str, exclude: set[str] = frozenset()) -> list[Replica]:
        """The filter stage: reachable, not draining, serves the model, not failing, not
        excluded (by address)."""
        req = RouteRequest(model=model, exclude=frozenset(exclude))
        kept = self.router.admit([r.candidate() for r in self.replicas.values()], req)
        return [self.replicas[c.name] for c in kept]

    def block_size(self, model: str) -> int:
        """The KV block size of the model's replicas (0 while none has reported one)."""
        for r in self.available(model):
            if r.report.kv_block_size > 0:
                return int(r.report.kv_block_size)
        return 0

    def pick(self, model: str, exclude: set[str] = frozenset(),
             route: PrefixRoute | None = None) -> Replica | None:
        """The routing pipeline (:mod:`services.gateway.routing`): filter, score (prefix held,
        queue, KV use), pick."""
        req = RouteRequest(model=model, prompt_blocks=len(route.hashes) if route else 0,
                           exclude=frozenset(exclude))
        best = self.router.route([r.candidate(route) for r in self.replicas.values()], req)
        if best is None:
            return None
        ROUTING_DECISIONS.labels(best.decided_by).inc()
        if route is not None and "prefix" in best.scores:  # a router that weighs prefixes
            PREFIX_MATCHED_TOKENS.inc(best.prefix_blocks * route.block_size)
        return self.replicas[best.name]

    def mark_failed(self, replica: Replica) -> None:
        replica.consecutive_failures += 1
        excess = replica.consecutive_failures - FAILURES_BEFORE_SKIP
        if excess >= 0:
            cool = min(BREAKER_MAX_SECONDS, BREAKER_BASE_SECONDS * 2 ** min(excess, 16))
            replica.skip_until = time.monotonic() + cool
            BREAKER_OPENS.inc()

    def mark_ok(self, replica: Replica) -> None:
        replica.consecutive_failures = 0
        replica.skip_until = 0.0

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._poll_seconds)
            try:
                await self._refresh_membership()
                await self._poll_all()
            except Exception:  # the loop must outlive any one bad poll
                log.exception("replica poll failed")

    async def _refresh_membership(self) -> None:
        if self._file is not None:
            try:
                mtime = self._file.stat().st_mtime
                if mtime != self._file_mtime:
                    self._file_addresses = list(json.loads(self._file.read_text()))
                    self._file_mtime = mtime
            except FileNotFoundError:
                self._file_addresses = []
            except (OSError, ValueError) as exc:
                log.warning("cannot read replicas file", extra=fields(error=str(exc)))
        wanted = dict.fromkeys([*self._static, *self._file_addresses])
        for address in wanted:
            if address not in self.replicas:
                channel = grpc.aio.insecure_channel(address, options=self._options)
                self.replicas[address] = Replica(
                    address, channel, inference_pb2_grpc.InferenceStub(channel)
                )
                log.info("replica added", extra=fields(address=address))
        for address in [a for a in self.replicas if a not in wanted]:
            replica = self.replicas.pop(address)
            if self._on_removed is not None:
                self._on_removed(replica.name)
            # In-flight streams keep their own call objects; close lets them finish first.
            task = asyncio.create_task(replica.channel.close(grace=None))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
            log.info("replica removed", extra=fields(address=address))

    async def _poll_all(self) -> None:
        await asyncio.gather(*(self._poll(r) for r in list(self.replicas.values())))
        states = {"available": 0, "draining": 0, "unreachable": 0}
        waiting = 0
        for r in self.replicas.values():
            if not r.reachable:
                states["unreachable"] += 1
            elif r.report and r.report.draining:
                states["draining"] += 1
            else:
                states["available"] += 1
            waiting += r.report.waiting if r.report and r.reachable else 0
        for state, n in states.items():
            REPLICAS.labels(state).set(n)
        QUEUE_DEPTH.set(waiting)

    async def _poll(self, replica: Replica) -> None:
        try:
            report = await replica.stub.Load(
                inference_pb2.LoadRequest(), timeout=max(1.0, 2 * self._poll_seconds)
            )
        except grpc.aio.AioRpcError as exc:
            if replica.reachable:
                log.warning("replica unreachable",
                            extra=fields(address=replica.address, code=exc.code().name))
            replica.reachable = False
            return
        if not replica.reachable:
            log.info("replica reachable", extra=fields(address=replica.address,
                                                       replica=report.replica))
        was_unreachable = not replica.reachable
        replica.report = report
        replica.reachable = True
        if was_unreachable:
            # It is back: allow a trial call now rather than at the end of its cool-down.
            replica.skip_until = min(replica.skip_until, time.monotonic())
        replica.reported_at = time.monotonic()
        if self._on_report is not None:
            self._on_report(report)
