"""Per-tenant rate limits: token buckets for requests per second and tokens per minute, the
keys-file settings, and refunds of unused tokens (a fake clock; no sleeping)."""

from __future__ import annotations

import pytest

from services.gateway.auth import ApiKeys, KeysFileError
from services.gateway.ratelimit import Limited, RateLimits, TenantLimiter


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_requests_per_second_allow_a_burst_then_refuse_with_the_wait():
    clock = Clock()
    lim = TenantLimiter(clock)
    limits = RateLimits(requests_per_second=2)
    lim.admit("t", limits, 0)
    lim.admit("t", limits, 0)
    with pytest.raises(Limited) as err:
        lim.admit("t", limits, 0)
    assert err.value.limit == "requests" and err.value.retry_after_seconds == pytest.approx(0.5)
    assert "2 requests per second" in str(err.value)
    clock.t += 0.5
    lim.admit("t", limits, 0)
    # Another tenant has its own bucket.
    lim.admit("other", limits, 0)


def test_tokens_per_minute_count_prompt_plus_max_tokens_and_refund_the_unused():
    clock = Clock()
    lim = TenantLimiter(clock)
    limits = RateLimits(tokens_per_minute=600)  # 10 tokens a second
    lim.admit("t", limits, 500)
    with pytest.raises(Limited) as err:
        lim.admit("t", limits, 200)
    assert err.value.limit == "tokens" and err.value.retry_after_seconds == pytest.approx(10.0)
    lim.refund("t", 300)  # the first request used 200 of its 500
    lim.admit("t", limits, 200)


def test_a_request_larger_than_the_whole_minute_is_refused_for_good():
    lim = TenantLimiter(Clock())
    with pytest.raises(Limited) as err:
        lim.admit("t", RateLimits(tokens_per_minute=100), 101)
    assert "lower sampling.max_tokens" in str(err.value)


def test_a_refused_request_takes_nothing():
    clock = Clock()
    lim = TenantLimiter(clock)
    limits = RateLimits(requests_per_second=1, tokens_per_minute=60)
    with pytest.raises(Limited):
        lim.admit("t", limits, 61)
    lim.admit("t", limits, 60)  # the request bucket was not charged by the refusal


def test_limits_come_from_the_keys_file(tmp_path):
    path = tmp_path / "keys.toml"
    path.write_text('[[keys]]\ntenant = "a"\nkey = "k1"\n\n[tenants.a]\n'
                    'requests_per_second = 5\ntokens_per_minute = 1000\n')
    tenant = ApiKeys.load(path).authenticate((("authorization", "Bearer k1"),))
    assert tenant.limits == RateLimits(5.0, 1000.0)
    path.write_text('[[keys]]\ntenant = "a"\nkey = "k1"\n\n[tenants.a]\n'
                    'requests_per_second = -1\n')
    with pytest.raises(KeysFileError, match="requests_per_second"):
        ApiKeys.load(path)


def test_the_retry_budget_allows_a_share_of_traffic_plus_a_floor():
    from services.gateway.ratelimit import RetryBudget

    clock = Clock()
    budget = RetryBudget(ratio=0.2, floor_per_second=1.0, capacity=3.0, clock=clock)
    assert [budget.try_retry() for _ in range(4)] == [True, True, True, False]
    for _ in range(5):
        budget.on_request()  # 5 requests earn one retry
    assert budget.try_retry() and not budget.try_retry()
    clock.t += 1.0  # the floor refills one a second
    assert budget.try_retry()
