"""Signals on one machine (``--platform local``): each ready replica's ``Load`` RPC, and the
arrival rate from the gateway's request counter. On a cluster the same signals come from
Prometheus (``prometheus.py``)."""

from __future__ import annotations

import asyncio

import grpc

from services.autoscaler.actuator import Observation
from services.autoscaler.signals import ReplicaSignal, Signals
from spotmesh.metrics import metric_sum, read_metrics
from spotmesh.v1 import inference_pb2, inference_pb2_grpc


class LoadSignals:
    """Local mode: each ready replica's ``Load`` RPC, and the gateway's request counter."""

    def __init__(self, gateway_metrics: str = "", timeout_seconds: float = 2.0) -> None:
        self.gateway_metrics = gateway_metrics
        self.timeout = timeout_seconds
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._last_requests: tuple[float, float] | None = None

    async def read(self, obs: Observation, now: float) -> Signals:
        replicas = await asyncio.gather(*(self._one(i, now) for i in obs.instances))
        return Signals(replicas=list(replicas), arrival_rate_rps=await self._arrival_rate(now),
                       now=now)

    async def _one(self, inst, now: float) -> ReplicaSignal:
        if inst.state == "pending" or not inst.address:
            return ReplicaSignal(inst.name, inst.pool, state="pending",
                                 state_since=inst.created_at, observed_at=now)
        channel = self._channels.get(inst.address)
        if channel is None:
            channel = self._channels[inst.address] = grpc.aio.insecure_channel(inst.address)
        try:
            r = await inference_pb2_grpc.InferenceStub(channel).Load(
                inference_pb2.LoadRequest(), timeout=self.timeout)
        except grpc.aio.AioRpcError:
            # Not idle capacity: unknown. The policy never counts it as either.
            return ReplicaSignal(inst.name, inst.pool, state="unreachable", observed_at=0.0)
        state = "draining" if (r.draining or inst.state == "draining") else "ready"
        return ReplicaSignal(
            inst.name, inst.pool, waiting=r.waiting, running=r.running,
            kv_cache_usage=min(1.0, max(0.0, r.kv_cache_usage)),
            gpu_utilization=r.gpu_utilization if 0 <= r.gpu_utilization <= 1 else -1.0,
            observed_at=now, state=state)

    async def _arrival_rate(self, now: float) -> float:
        if not self.gateway_metrics:
            return 0.0
        try:
            samples = await asyncio.to_thread(read_metrics, self.gateway_metrics, self.timeout)
        except OSError:
            return 0.0
        total = metric_sum(samples, "spotmesh_gateway_requests_total")
        last, self._last_requests = self._last_requests, (now, total)
        if last is None or now <= last[0] or total < last[1]:
            return 0.0
        return (total - last[1]) / (now - last[0])

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
