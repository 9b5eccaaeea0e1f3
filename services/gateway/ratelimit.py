"""Per-tenant rate limits: requests per second and tokens per minute, as token buckets.

A request is admitted when its tenant's request bucket holds one request and its token bucket
holds the tokens it may use (prompt + max_tokens); otherwise it is refused at once with
RESOURCE_EXHAUSTED and the time after which it would fit, never queued (a queue in the
gateway would hide overload from the autoscaler and the client's own backoff). Tokens the
request did not use (it stopped before max_tokens, or failed) are given back when it ends.
Buckets start full, so a tenant may burst up to one second of requests and one minute of
tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class RateLimits:
    requests_per_second: float = 0.0  # 0: unlimited
    tokens_per_minute: float = 0.0  # prompt + completion tokens; 0: unlimited


class Limited(Exception):
    def __init__(self, message: str, retry_after_seconds: float, limit: str) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds
        self.limit = limit  # "requests" | "tokens"


class TokenBucket:
    def __init__(self, capacity: float, per_second: float, clock=time.monotonic) -> None:
        self.capacity = capacity
        self.per_second = per_second
        self.clock = clock
        self.level = capacity
        self._at = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self._at) * self.per_second)
        self._at = now

    def wait_for(self, amount: float) -> float:
        """Seconds until ``amount`` fits (0: it fits now); inf if it never can."""
        self._refill()
        if amount <= self.level:
            return 0.0
        if amount > self.capacity:
            return float("inf")
        return (amount - self.level) / self.per_second

    def take(self, amount: float) -> None:
        self._refill()
        self.level -= amount

    def give_back(self, amount: float) -> None:
        self._refill()
        self.level = min(self.capacity, self.level + amount)


class TenantLimiter:
    def __init__(self, clock=time.monotonic) -> None:
        self.clock = clock
        self._requests: dict[str, TokenBucket] = {}
        self._tokens: dict[str, TokenBucket] = {}

    def admit(self, tenant: str, limits: RateLimits, tokens: int) -> None:
        """Take one request and ``tokens`` from the tenant's buckets, or raise Limited."""
        req = tok = None
        if limits.requests_per_second > 0:
            req = self._requests.get(tenant)
            if req is None or req.per_second != limits.requests_per_second:
                rate = limits.requests_per_second
                req = self._requests[tenant] = TokenBucket(max(1.0, rate), rate, self.clock)
            wait = req.wait_for(1)
            if wait > 0:
                raise Limited(f"tenant {tenant!r} is over its limit of "
                              f"{limits.requests_per_second:g} requests per second; retry in "
                              f"{wait:.2f}s", wait, "requests")
        if limits.tokens_per_minute > 0:
            tok = self._tokens.get(tenant)
            if tok is None or tok.capacity != limits.tokens_per_minute:
                tok = self._tokens[tenant] = TokenBucket(
                    limits.tokens_per_minute, limits.tokens_per_minute / 60.0, self.clock)
            wait = tok.wait_for(tokens)
            if wait == float("inf"):
                raise Limited(f"the request may use {tokens} tokens (prompt + max_tokens), more "
                              f"than tenant {tenant!r}'s {limits.tokens_per_minute:g} tokens "
                              "per minute; lower sampling.max_tokens", wait, "tokens")
            if wait > 0:
                raise Limited(f"tenant {tenant!r} is over its limit of "
                              f"{limits.tokens_per_minute:g} tokens per minute; retry in "
                              f"{wait:.1f}s", wait, "tokens")
        if req is not None:
            req.take(1)
        if tok is not None:
            tok.take(tokens)

    def refund(self, tenant: str, tokens: int) -> None:
        """Give back tokens an admitted request did not use."""
        bucket = self._tokens.get(tenant)
        if bucket is not None and tokens > 0:
            bucket.give_back(tokens)


class RetryBudget:
    """Retries may add at most ``ratio`` of the gateway's traffic (plus a small floor), so a
    failing fleet sees a trickle of retries rather than a storm that keeps it down (the gRPC
    retry-throttling idea). Mid-stream resumes are not charged: they continue work the client
    already has, they do not repeat it."""

    def __init__(self, ratio: float = 0.2, floor_per_second: float = 5.0,
                 capacity: float = 100.0, clock=time.monotonic) -> None:
        self.ratio = ratio
        self.bucket = TokenBucket(capacity, floor_per_second, clock)

    def on_request(self) -> None:
        self.bucket.give_back(self.ratio)

    def try_retry(self) -> bool:
        if self.bucket.wait_for(1) > 0:
            return False
        self.bucket.take(1)
        return True
