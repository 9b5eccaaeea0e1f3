"""What each request cost, in dollars, and where the money went.

A replica reports each request's share of its time (``replica_seconds``: every second split
evenly among the requests running in it); the gateway prices it at the replica's pool rate.
"""

from __future__ import annotations

from prometheus_client import Counter

COST = Counter(
    "spotmesh_gateway_cost_usd_total", "Dollars of replica time spent on requests.",
    ["tenant", "pool"],
)
REPLICA_SECONDS = Counter(
    "spotmesh_gateway_replica_seconds_total", "Replica time spent on requests.", ["pool"]
)
TOKENS = Counter(
    "spotmesh_gateway_tokens_total", "Tokens served, by kind.", ["tenant", "kind"]
)


class CostLedger:
    def __init__(self, prices_usd_per_hour: dict[str, float]) -> None:
        self.prices = dict(prices_usd_per_hour)

    def book(
        self,
        *,
        tenant: str,
        pool: str,
        replica_seconds: float,
        prompt_tokens: int,
        cached_prompt_tokens: int,
        completion_tokens: int,
    ) -> float:
        """Record one finished request; returns its cost in dollars."""
        cost = replica_seconds * self.prices.get(pool, 0.0) / 3600.0
        COST.labels(tenant, pool).inc(cost)
        REPLICA_SECONDS.labels(pool).inc(replica_seconds)
        TOKENS.labels(tenant, "prompt").inc(prompt_tokens)
        TOKENS.labels(tenant, "cached_prompt").inc(cached_prompt_tokens)
        TOKENS.labels(tenant, "completion").inc(completion_tokens)
        return cost
