"""What each request cost, in dollars, and where the money went.

A replica reports each request's share of its time (``replica_seconds``: every second split
evenly among the requests running in it); the gateway prices it at the replica's pool rate.

Two views of the same money: per tenant (``spotmesh_gateway_*``, for chargeback) and per pool
(``spotmesh_cost_usd_total{pool}``, ``spotmesh_tokens_total{pool,kind}``, so cost per 1M tokens
by pool is one PromQL division). ``spotmesh_saved_usd_total{tier}`` is what each cache tier
saved: ``semantic`` books a hit's original cost (the gateway's semantic-cache client);
``prefix`` values each prompt token the engine found cached at the request's own cost per
token it did compute (an estimate: prefill is cheaper per token than decode, so this
over-values long cached prompts a little).
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
POOL_COST = Counter("spotmesh_cost_usd_total", "Dollars of replica time spent, by pool.",
                    ["pool"])
POOL_TOKENS = Counter("spotmesh_tokens_total", "Tokens served, by pool and kind.",
                      ["pool", "kind"])
SAVED = Counter("spotmesh_saved_usd_total", "Dollars not spent thanks to each cache tier.",
                ["tier"])


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
        POOL_COST.labels(pool).inc(cost)
        POOL_TOKENS.labels(pool, "prompt").inc(prompt_tokens)
        POOL_TOKENS.labels(pool, "cached_prompt").inc(cached_prompt_tokens)
        POOL_TOKENS.labels(pool, "completion").inc(completion_tokens)
        computed = prompt_tokens - cached_prompt_tokens + completion_tokens
        if cached_prompt_tokens > 0 and computed > 0:
            SAVED.labels("prefix").inc(cost * cached_prompt_tokens / computed)
        return cost


def book_semantic_saving(cost_usd: float) -> None:
    SAVED.labels("semantic").inc(cost_usd)
