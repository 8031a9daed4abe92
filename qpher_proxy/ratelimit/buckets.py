"""Token buckets per API key and per tenant (pure: the clock is injected, no I/O).

Each bucket holds up to ``burst`` tokens and refills at ``rate`` tokens per second. A request
takes one token (``cost``) from its key's bucket *and* from its tenant's bucket; it is admitted
only if both can pay, and then both pay — a request refused by one bucket costs nothing in the
other. A refusal raises ``RateLimited`` whose ``retry_after`` is the whole number of seconds
(≥ 1, rounded up) after which the emptier bucket will hold the tokens the request needs.

A request costing more than ``burst`` (a large batch) is admitted when the bucket is full and
drives it into debt, repaid by the refill: a batch of N still costs N.

Memory is bounded: a bucket that has refilled completely is indistinguishable from a new one,
so such buckets are swept (every ``sweep_interval`` seconds of clock time, and whenever the
table reaches ``max_buckets``). If the table is still full of active buckets, the oldest one is
dropped — which forgives that client's debt; with ``max_buckets`` above the number of live keys
plus tenants this never happens. Limits are read at each call, so a policy reload that changes
a plan applies at once (tokens above a lowered burst are clamped).

State is per process and in memory: a restart refills every bucket (quotas, which must survive
restarts, live in ``quotas.py``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ConfigError, RateLimited

__all__ = ["RateLimits", "TokenBucketLimiter"]


@dataclass(frozen=True, slots=True)
class RateLimits:
    """A plan's rate limits. ``None`` rate: that scope is not limited."""

    key_rate: float | None  # tokens per second for each API key
    key_burst: int
    tenant_rate: float | None  # tokens per second for the whole tenant
    tenant_burst: int

    def __post_init__(self) -> None:
        for name in ("key_rate", "tenant_rate"):
            rate = getattr(self, name)
            if rate is not None and (isinstance(rate, bool) or not math.isfinite(rate) or rate <= 0):
                raise ConfigError(f"{name} must be a positive number of requests per second, not {rate!r}")
        for name in ("key_burst", "tenant_burst"):
            burst = getattr(self, name)
            if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
                raise ConfigError(f"{name} must be an integer >= 1, not {burst!r}")


class _Bucket:
    __slots__ = ("tokens", "stamp", "full_at")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp
        self.full_at = stamp


class TokenBucketLimiter:
    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        *,
        max_buckets: int = 100_000,
        sweep_interval: float = 60.0,
    ) -> None:
        if max_buckets < 2:
            raise ConfigError("max_buckets must be at least 2")
        self._clock = clock
        self._max = max_buckets
        self._sweep_interval = sweep_interval
        self._keys: dict[str, _Bucket] = {}
        self._tenants: dict[str, _Bucket] = {}
        self._last_sweep = clock()

    def __len__(self) -> int:
        return len(self._keys) + len(self._tenants)

    def _bucket(self, table: dict[str, _Bucket], name: str, rate: float, burst: int, now: float) -> _Bucket:
        b = table.get(name)
        if b is None:
            if len(self._keys) + len(self._tenants) >= self._max:
                self._sweep(now)
                if len(self._keys) + len(self._tenants) >= self._max:
                    victim = self._keys if len(self._keys) >= len(self._tenants) else self._tenants
                    del victim[next(iter(victim))]
            b = table[name] = _Bucket(float(burst), now)
            return b
        elapsed = now - b.stamp
        if elapsed > 0:
            b.tokens = min(float(burst), b.tokens + elapsed * rate)
            b.stamp = now
        elif b.tokens > burst:
            b.tokens = float(burst)
        return b

    def _sweep(self, now: float) -> None:
        for table in (self._keys, self._tenants):
            for name in [n for n, b in table.items() if b.full_at <= now]:
                del table[name]
        self._last_sweep = now

    def check(self, key_id: str, tenant: str, plan_limits: RateLimits, cost: int = 1) -> None:
        """Take ``cost`` tokens from the key's and the tenant's buckets, or raise ``RateLimited``."""
        now = self._clock()
        if now - self._last_sweep >= self._sweep_interval:
            self._sweep(now)
        lim = plan_limits
        kb = tb = None
        wait = 0.0
        scope = ""
        if lim.key_rate is not None:
            kb = self._bucket(self._keys, key_id, lim.key_rate, lim.key_burst, now)
            need = min(float(cost), float(lim.key_burst))
            if kb.tokens < need:
                wait, scope = (need - kb.tokens) / lim.key_rate, "API key"
        if lim.tenant_rate is not None:
            tb = self._bucket(self._tenants, tenant, lim.tenant_rate, lim.tenant_burst, now)
            need = min(float(cost), float(lim.tenant_burst))
            if tb.tokens < need:
                tenant_wait = (need - tb.tokens) / lim.tenant_rate
                if tenant_wait > wait:
                    wait, scope = tenant_wait, "tenant"
        if scope:
            # 1e-9: float noise must not turn an exact 2.0 s into 3 s
            raise RateLimited(f"rate limit exceeded for this {scope}", retry_after=math.ceil(wait - 1e-9))
        if kb is not None:
            kb.tokens -= cost
            kb.full_at = now + (lim.key_burst - kb.tokens) / lim.key_rate  # type: ignore[operator]
        if tb is not None:
            tb.tokens -= cost
            tb.full_at = now + (lim.tenant_burst - tb.tokens) / lim.tenant_rate  # type: ignore[operator]
