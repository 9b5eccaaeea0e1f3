"""The autoscaler's gRPC surface: ``Status``, what it decided and why."""

from __future__ import annotations

from services.autoscaler.reconciler import Reconciler
from spotmesh.v1 import autoscaler_pb2, autoscaler_pb2_grpc, common_pb2

POOLS = {"spot": common_pb2.POOL_SPOT, "on-demand": common_pb2.POOL_ON_DEMAND}


class AutoscalerServicer(autoscaler_pb2_grpc.AutoscalerServicer):
    def __init__(self, reconciler: Reconciler) -> None:
        self.reconciler = reconciler

    async def Status(self, request, context) -> autoscaler_pb2.StatusResponse:
        st = self.reconciler.status
        prices = self.reconciler.prices
        usd = {"spot": prices.spot_usd_per_hour, "on-demand": prices.on_demand_usd_per_hour}
        resp = autoscaler_pb2.StatusResponse(
            pools=[autoscaler_pb2.PoolState(pool=POOLS[name], desired=d, ready=r, pending=p,
                                            usd_per_hour=usd[name] * (r + p))
                   for name, (d, r, p) in sorted(st.pools.items())],
            reason="; ".join(st.reasons),
            reconciled_at=st.reconciled_at,
            preemptions=st.preemptions,
            decisions=[autoscaler_pb2.Decision(at=d.at, spot=d.spot, on_demand=d.on_demand,
                                               removed=d.removed, reasons=d.reasons)
                       for d in st.decisions],
            failed_reconciles=st.failed_reconciles,
        )
        if st.spot_available is not None:
            resp.spot_available = st.spot_available
        return resp
