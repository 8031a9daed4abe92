"""Token buckets per API key and per tenant, with a fake clock."""

from __future__ import annotations

import pytest

from qpher_proxy.errors import ConfigError, RateLimited
from qpher_proxy.ratelimit import RateLimits, TokenBucketLimiter


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


KEY_ONLY = RateLimits(key_rate=2.0, key_burst=4, tenant_rate=None, tenant_burst=1)


def test_burst_then_rate_limited_with_retry_after() -> None:
    clock = FakeClock()
    rl = TokenBucketLimiter(clock)
    for _ in range(4):
        rl.check("k1", "acme", KEY_ONLY)
    with pytest.raises(RateLimited) as info:
        rl.check("k1", "acme", KEY_ONLY)
    e = info.value
    assert (e.code, e.status, e.retry_after) == ("rate_limited", 429, 1)  # 0.5 s → rounded up to 1
    assert e.headers == ((b"retry-after", b"1"),)
    assert "API key" in e.message
    clock.advance(0.5)  # one token back
    rl.check("k1", "acme", KEY_ONLY)
    with pytest.raises(RateLimited):
        rl.check("k1", "acme", KEY_ONLY)


def test_retry_after_is_whole_seconds_rounded_up() -> None:
    clock = FakeClock()
    slow = RateLimits(key_rate=0.1, key_burst=1, tenant_rate=None, tenant_burst=1)
    rl = TokenBucketLimiter(clock)
    rl.check("k", "t", slow)
    with pytest.raises(RateLimited) as info:
        rl.check("k", "t", slow)
    assert info.value.retry_after == 10
    clock.advance(7.5)
    with pytest.raises(RateLimited) as info:
        rl.check("k", "t", slow)
    assert info.value.retry_after == 3  # 2.5 s left
    clock.advance(2.5)
    rl.check("k", "t", slow)


def test_refill_is_capped_at_burst() -> None:
    clock = FakeClock()
    rl = TokenBucketLimiter(clock)
    for _ in range(4):
        rl.check("k1", "acme", KEY_ONLY)
    clock.advance(3600)
    for _ in range(4):
        rl.check("k1", "acme", KEY_ONLY)
    with pytest.raises(RateLimited):
        rl.check("k1", "acme", KEY_ONLY)


def test_keys_are_independent_but_share_the_tenant_bucket() -> None:
    clock = FakeClock()
    limits = RateLimits(key_rate=10.0, key_burst=3, tenant_rate=1.0, tenant_burst=5)
    rl = TokenBucketLimiter(clock)
    for _ in range(3):
        rl.check("k1", "acme", limits)
    with pytest.raises(RateLimited) as info:
        rl.check("k1", "acme", limits)  # k1's own bucket is empty
    assert "API key" in info.value.message
    rl.check("k2", "acme", limits)
    rl.check("k2", "acme", limits)  # tenant bucket now empty (5 taken)
    with pytest.raises(RateLimited) as info:
        rl.check("k3", "acme", limits)
    assert "tenant" in info.value.message and info.value.retry_after == 1
    rl.check("k9", "globex", limits)  # another tenant is unaffected


def test_a_refused_request_costs_nothing_in_the_other_bucket() -> None:
    clock = FakeClock()
    limits = RateLimits(key_rate=1.0, key_burst=1, tenant_rate=1.0, tenant_burst=2)
    rl = TokenBucketLimiter(clock)
    rl.check("k1", "acme", limits)
    for _ in range(5):
        with pytest.raises(RateLimited):
            rl.check("k1", "acme", limits)  # refused by the key bucket
    rl.check("k2", "acme", limits)  # the tenant still has its second token


def test_unlimited_scopes() -> None:
    rl = TokenBucketLimiter(FakeClock())
    limits = RateLimits(key_rate=None, key_burst=1, tenant_rate=None, tenant_burst=1)
    for _ in range(1000):
        rl.check("k", "t", limits)
    assert len(rl) == 0


def test_batch_larger_than_burst_goes_into_debt() -> None:
    clock = FakeClock()
    rl = TokenBucketLimiter(clock)
    rl.check("k", "t", KEY_ONLY, cost=10)  # a full bucket admits it
    with pytest.raises(RateLimited) as info:
        rl.check("k", "t", KEY_ONLY)
    assert info.value.retry_after == 4  # from -6 tokens back to 1 at 2/s: 3.5 s
    clock.advance(3.5)
    rl.check("k", "t", KEY_ONLY)


def test_plan_change_applies_at_once() -> None:
    clock = FakeClock()
    rl = TokenBucketLimiter(clock)
    big = RateLimits(key_rate=1.0, key_burst=100, tenant_rate=None, tenant_burst=1)
    small = RateLimits(key_rate=1.0, key_burst=2, tenant_rate=None, tenant_burst=1)
    rl.check("k", "t", big)
    rl.check("k", "t", small)  # 99 tokens clamped to 2, one taken
    rl.check("k", "t", small)
    with pytest.raises(RateLimited):
        rl.check("k", "t", small)


def test_memory_is_bounded_and_idle_buckets_are_swept() -> None:
    clock = FakeClock()
    rl = TokenBucketLimiter(clock, max_buckets=100, sweep_interval=60.0)
    limits = RateLimits(key_rate=1.0, key_burst=2, tenant_rate=1.0, tenant_burst=2)
    for i in range(1000):
        rl.check(f"k{i}", f"t{i}", limits)
        assert len(rl) <= 100
    clock.advance(61)  # every bucket has refilled: all are swept at the next call
    rl.check("new", "tenant", limits)
    assert len(rl) == 2


def test_limits_are_validated() -> None:
    for bad in [
        dict(key_rate=0.0, key_burst=1, tenant_rate=None, tenant_burst=1),
        dict(key_rate=-1.0, key_burst=1, tenant_rate=None, tenant_burst=1),
        dict(key_rate=float("nan"), key_burst=1, tenant_rate=None, tenant_burst=1),
        dict(key_rate=1.0, key_burst=0, tenant_rate=None, tenant_burst=1),
        dict(key_rate=1.0, key_burst=1, tenant_rate=1.0, tenant_burst=1.5),
    ]:
        with pytest.raises(ConfigError):
            RateLimits(**bad)  # type: ignore[arg-type]
