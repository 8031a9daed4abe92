"""Rate limits shared by every node: GCRA in one Lua script, on Redis's clock.

Theory of operation
-------------------
**Algorithm.** The generic cell rate algorithm (GCRA) is a token bucket kept as one number per
bucket: its *theoretical arrival time* (TAT), the instant at which the bucket will be full again.
With rate ``r`` per second the emission interval is ``T = 1/r``; a bucket's tokens at ``now`` are
``burst - max(0, TAT - now) / T``. So the semantics are exactly those of ``buckets.py``:

* a request costing ``cost`` needs ``min(cost, burst)`` tokens: it is admitted when
  ``TAT - now <= (burst - min(cost, burst)) * T``; ``burst`` requests pass at once, then ``r``/s;
* an admitted request sets ``TAT = max(TAT, now) + cost * T``: a cost above the burst is
  admitted when the bucket is full and drives it into debt (a batch of N still costs N);
* a refused request changes nothing, and waits ``(TAT - now) - (burst - need) * T`` (its
  ``Retry-After``, rounded up to whole seconds, at least 1);
* ``None`` rate: that scope is not limited and its key is not touched.

**Atomicity.** One Lua script (:data:`GCRA_SCRIPT`) reads both TATs -- the API key's
``<prefix>:rl:k:<key_id>`` and the tenant's ``<prefix>:rl:t:<tenant>`` --, decides, and writes
both only if both admit. Redis runs a script to completion before any other command, so two
nodes racing for the last token cannot both get it, and a request refused by the tenant costs
the key nothing. The script is sent by SHA-1 (``EVALSHA``), and whole (``EVAL``, which caches it
again) after ``NOSCRIPT`` from a restarted server. Both keys are touched by one script, so this
needs one Redis (or one primary), not Redis Cluster.

**Clock.** The script takes ``now`` from ``redis.call('TIME')`` in microseconds, never from a
node: nodes whose clocks disagree still share one timeline. TATs are stored as whole
microseconds; comparisons allow 1 us of rounding, so an exact boundary fits. Each TAT is written
with a ``PX`` expiry at the moment its bucket is full again -- when a missing key and the stored
one mean the same -- so idle keys vanish and Redis holds only the buckets in use. Scripts that
read ``TIME`` and then write are replicated by their effects, the default since Redis 5.

**Failure.** Every Redis call (waiting for a pooled connection, connecting, AUTH and SELECT, the
script) is bounded by ``ratelimit.timeout`` with a trio cancel scope; the client has no threads
and no blocking call, so nothing can hang. A failed call counts in
:attr:`RedisRateLimiter.backend_failures` (exported as ``qpher_ratelimit_backend_failures_total``)
and marks the limiter :attr:`~RedisRateLimiter.degraded`, logging one WARNING. While degraded,
Redis is tried again by one request at most every ``ratelimit.retry_interval`` seconds (the
others do not pay a timeout); the first success logs one INFO and ends the degraded state.
Meanwhile ``on_backend_failure`` decides: ``local`` applies the limits per node from in-memory
token buckets, each rate and burst divided by ``expected_nodes`` (burst at least 1); ``deny``
refuses with 503 ``ratelimit_unavailable`` and a ``Retry-After``.

**Accuracy.** With Redis up the limit is exact across nodes (one round trip per request), up to
the microsecond rounding above. During an outage in ``local`` mode each node admits its share:
the cluster's total is right when the load is spread evenly over ``expected_nodes`` live nodes,
below the limit when a client's load lands on fewer nodes (one node alone gives it
``1/expected_nodes`` of its rate), above it when more nodes run than configured; bursts that
do not divide evenly are rounded down (at least 1 per node). The local buckets start full when
the fallback begins, and Redis's TATs may have expired when it ends, so each switch can admit up
to one extra burst.

**Headers.** A refusal raises ``RateLimited`` carrying ``scope`` (``"api_key"`` or
``"tenant"``: the scope that must wait longer) and the headers ``Retry-After``,
``RateLimit-Limit`` (that scope's burst), ``RateLimit-Remaining: 0`` and ``RateLimit-Reset``
(whole seconds until that scope's bucket is full again, at least ``Retry-After``), as
``shared.py`` does. :class:`LocalRateLimiter` puts the per-node ``TokenBucketLimiter`` behind the
same ``acquire`` with the same headers.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import trio

from ..config.model import RateLimitConfig
from ..errors import ConfigError, QpherError, RateLimited
from ._resp import DEFAULT_POOL_SIZE, RedisClient, RedisError, parse_redis_url, script_sha1
from .buckets import RateLimits, TokenBucketLimiter

__all__ = [
    "BucketLimiter",
    "GCRA_SCRIPT",
    "GCRADecision",
    "LocalRateLimiter",
    "RateLimitUnavailable",
    "RedisRateLimiter",
    "redis_key",
]

log = logging.getLogger("qpher.ratelimit")

_MAX_DERIVED_LIMITS = 1024  # per-node fallback limits, cached per plan; plans are few


class RateLimitUnavailable(QpherError):
    """The shared rate limit store (Redis) cannot be reached and ``on_backend_failure`` is
    ``deny``: refuse rather than not limit. ``retry_after`` is in seconds, >= 1."""

    code = "ratelimit_unavailable"
    status = 503

    def __init__(self, message: str = "", *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = max(1, int(retry_after))
        self.headers: tuple[tuple[bytes, bytes], ...] = (
            (b"retry-after", str(self.retry_after).encode("ascii")),
        )


# KEYS[1], KEYS[2]: the API key's and the tenant's TAT (whole microseconds, Redis's clock).
# ARGV: key_rate, key_burst, tenant_rate, tenant_burst, cost; a rate of "" is "not limited".
# Returns {allowed, retry_after_ms, remaining, reset_ms, scope}. Refused: scope (1 key,
# 2 tenant) is the one that must wait longer. Admitted: scope is the one with fewer tokens left,
# remaining its whole tokens. reset_ms: the time until that scope's bucket is full again.
GCRA_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local cost = tonumber(ARGV[5])
local tat, interval, burst = {}, {}, {}
local wait, scope = 1, 0
for i = 1, 2 do
  local rate = tonumber(ARGV[2 * i - 1])
  if rate then
    burst[i] = tonumber(ARGV[2 * i])
    interval[i] = 1000000 / rate
    local stored = tonumber(redis.call('GET', KEYS[i]) or '')
    if stored == nil or stored < now then stored = now end
    tat[i] = stored
    local w = (stored - now) - (burst[i] - math.min(cost, burst[i])) * interval[i]
    if w > wait then wait, scope = w, i end
  end
end
if scope > 0 then
  return {0, math.ceil(wait / 1000), 0, math.ceil((tat[scope] - now) / 1000), scope}
end
local remaining, reset = -1, 0
for i = 1, 2 do
  if tat[i] then
    local new = tat[i] + cost * interval[i]
    redis.call('SET', KEYS[i], string.format('%.0f', new),
               'PX', string.format('%.0f', math.ceil((new - now) / 1000)))
    local left = math.floor(burst[i] - (new - now) / interval[i] + 1e-6)
    if left < 0 then left = 0 end
    if remaining < 0 or left < remaining then
      remaining, reset, scope = left, math.ceil((new - now) / 1000), i
    end
  end
end
if remaining < 0 then remaining = 0 end
return {1, 0, remaining, reset, scope}
"""
_GCRA_SHA = script_sha1(GCRA_SCRIPT)

_SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_SCOPES: tuple[str | None, ...] = (None, "api_key", "tenant")


def redis_key(prefix: str, scope: str, name: str) -> str:
    """``<prefix>:rl:<scope>:<name>``; a name outside ``[A-Za-z0-9_.-]{1,128}`` becomes
    ``h:<sha256 hex>`` (which holds a ``:``, so it cannot collide with a plain name)."""
    if _SAFE_NAME.fullmatch(name) is None:
        name = "h:" + hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{prefix}:rl:{scope}:{name}"


@dataclass(frozen=True, slots=True)
class GCRADecision:
    """What the script decided (see :data:`GCRA_SCRIPT`). ``scope`` is ``"api_key"``,
    ``"tenant"`` or ``None`` (nothing limited); ``limit`` is that scope's burst."""

    allowed: bool
    retry_after_ms: int
    remaining: int
    reset_ms: int
    scope: str | None
    limit: int


def _refusal(scope: str, limit: int, retry_after: int, reset: int) -> RateLimited:
    """``RateLimited`` with ``scope`` and the RateLimit-* headers beside ``Retry-After``
    (``reset``: whole seconds until the scope's bucket is full, at least ``retry_after``)."""
    exc = RateLimited(
        f"rate limit exceeded for this {'API key' if scope == 'api_key' else 'tenant'}",
        retry_after=retry_after,
    )
    exc.scope = scope  # type: ignore[attr-defined]  # the gateway's rate_limited metric label
    exc.headers = exc.headers + (
        (b"ratelimit-limit", str(limit).encode("ascii")),
        (b"ratelimit-remaining", b"0"),
        (b"ratelimit-reset", str(max(exc.retry_after, reset)).encode("ascii")),
    )
    return exc


class BucketLimiter(Protocol):
    """In-memory buckets: ``TokenBucketLimiter`` (one process) or ``SharedRateLimiter`` (one host).

    ``check`` raises ``RateLimited`` whose message ends with ``API key`` or ``tenant``."""

    def check(self, key_id: str, tenant: str, plan_limits: RateLimits, cost: int = 1, /) -> None: ...


class LocalRateLimiter:
    """Per-node buckets behind the same ``acquire`` as ``RedisRateLimiter``, raising
    ``RateLimited`` with the same ``scope`` and RateLimit-* headers."""

    def __init__(self, buckets: BucketLimiter | None = None) -> None:
        self.buckets: BucketLimiter = buckets if buckets is not None else TokenBucketLimiter()

    def check(self, key_id: str, tenant: str, limits: RateLimits, cost: int = 1) -> None:
        """The synchronous form of :meth:`acquire`."""
        try:
            self.buckets.check(key_id, tenant, limits, cost)
        except RateLimited as exc:
            # TokenBucketLimiter names the scope that must wait longer at the end of its message
            # (tests/scaleout/test_redis_ratelimit.py holds it to that).
            scope = "tenant" if exc.message.endswith("tenant") else "api_key"
            rate, burst = ((limits.tenant_rate, limits.tenant_burst) if scope == "tenant"
                           else (limits.key_rate, limits.key_burst))
            assert rate is not None  # a scope without a rate never refuses
            # full again = the wait for this request + the time to refill what it leaves; the
            # wait is known rounded up only, so this may be up to a second late
            reset = math.ceil(exc.retry_after + (burst - min(cost, burst)) / rate - 1e-9)
            raise _refusal(scope, burst, exc.retry_after, reset) from None

    async def acquire(self, key_id: str, tenant: str, limits: RateLimits, cost: int = 1) -> None:
        """Take ``cost`` from the key's and the tenant's buckets, or raise ``RateLimited``."""
        self.check(key_id, tenant, limits, cost)

    async def aclose(self) -> None:
        return None


def per_node_limits(limits: RateLimits, nodes: int) -> RateLimits:
    """Each rate and burst divided by ``nodes`` (burst rounded down, at least 1)."""
    return RateLimits(
        key_rate=None if limits.key_rate is None else limits.key_rate / nodes,
        key_burst=max(1, limits.key_burst // nodes),
        tenant_rate=None if limits.tenant_rate is None else limits.tenant_rate / nodes,
        tenant_burst=max(1, limits.tenant_burst // nodes),
    )


class RedisRateLimiter:
    """Per-key and per-tenant limits shared by all nodes through one Redis (module docstring).

    ``backend_failures`` counts failed Redis calls; ``degraded`` is true from a failure until the
    next success. ``clock`` (seconds, monotonic) paces the retries and drives the default
    fallback buckets; tests inject one. ``fallback``: the buckets used while Redis is away
    (default: a ``TokenBucketLimiter`` of this process; with several gateway processes per host,
    pass the host's ``SharedRateLimiter`` so that ``expected_nodes`` counts hosts). Construct it
    anywhere; use it inside one ``trio.run``."""

    def __init__(
        self,
        config: RateLimitConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        pool_size: int = DEFAULT_POOL_SIZE,
        fallback: BucketLimiter | None = None,
    ) -> None:
        if config.redis_url is None:
            raise ConfigError("ratelimit.redis_url is required when ratelimit.backend is redis")
        if not config.key_prefix or any(c.isspace() for c in config.key_prefix):
            raise ConfigError(
                f"ratelimit.key_prefix must be non-empty without spaces, not {config.key_prefix!r}"
            )
        self.url = parse_redis_url(config.redis_url)
        self._client = RedisClient(self.url, pool_size=pool_size)
        self._prefix = config.key_prefix
        self._timeout = config.timeout
        self._retry_interval = config.retry_interval
        self._on_failure = config.on_backend_failure
        self._nodes = config.expected_nodes
        self._clock = clock
        self._local = LocalRateLimiter(fallback if fallback is not None else TokenBucketLimiter(clock))
        self._derived: dict[RateLimits, RateLimits] = {}
        self._next_try = 0.0  # while degraded: the clock time after which Redis is tried again
        self.backend_failures = 0
        self.degraded = False

    def __repr__(self) -> str:
        return f"RedisRateLimiter({self.url.redacted()!r}, degraded={self.degraded})"

    async def evaluate(self, key_id: str, tenant: str, limits: RateLimits, cost: int = 1) -> GCRADecision:
        """Run the script once, bounded by ``timeout``: charge both scopes or neither.

        Raises ``RedisError`` or ``trio.TooSlowError`` when Redis fails (no fallback here)."""
        if isinstance(cost, bool) or not isinstance(cost, int) or cost < 1:
            raise ValueError(f"cost must be an integer >= 1, not {cost!r}")
        keys = (redis_key(self._prefix, "k", key_id), redis_key(self._prefix, "t", tenant))
        args = (
            "" if limits.key_rate is None else limits.key_rate, limits.key_burst,
            "" if limits.tenant_rate is None else limits.tenant_rate, limits.tenant_burst,
            cost,
        )
        with trio.fail_after(self._timeout):
            reply = await self._client.evalsha(GCRA_SCRIPT, keys, args, sha=_GCRA_SHA)
        values = [v for v in reply if isinstance(v, int)] if isinstance(reply, list) else []
        if len(values) != 5 or not isinstance(reply, list) or len(reply) != 5:
            raise RedisError("unexpected reply from the rate limit script")
        allowed, retry_ms, remaining, reset_ms, scope_no = values
        scope = _SCOPES[scope_no] if 0 <= scope_no < len(_SCOPES) else None
        limit = limits.tenant_burst if scope == "tenant" else limits.key_burst
        return GCRADecision(
            allowed=allowed == 1, retry_after_ms=retry_ms, remaining=remaining,
            reset_ms=reset_ms, scope=scope, limit=limit,
        )

    async def acquire(self, key_id: str, tenant: str, limits: RateLimits, cost: int = 1) -> None:
        """Take ``cost`` from the key's and the tenant's limits, or raise ``RateLimited`` (429);
        ``RateLimitUnavailable`` (503) when Redis fails and ``on_backend_failure`` is ``deny``."""
        if limits.key_rate is None and limits.tenant_rate is None:
            return
        if self.degraded:
            if self._clock() < self._next_try:
                self._fallback(key_id, tenant, limits, cost)
                return
            self._next_try = self._clock() + self._retry_interval  # this request is the probe
        try:
            decision = await self.evaluate(key_id, tenant, limits, cost)
        except (RedisError, trio.TooSlowError) as exc:
            self._failed(exc)
            self._fallback(key_id, tenant, limits, cost)
            return
        if self.degraded:
            self.degraded = False
            log.info("rate limit store %s is reachable again: limits are shared again",
                     self.url.redacted())
        if not decision.allowed:
            raise _refusal(decision.scope or "api_key", decision.limit,
                           math.ceil(decision.retry_after_ms / 1000), math.ceil(decision.reset_ms / 1000))

    def _failed(self, exc: Exception) -> None:
        self.backend_failures += 1
        self._next_try = self._clock() + self._retry_interval
        if self.degraded:
            return
        self.degraded = True
        what = f"no answer within {self._timeout} s" if isinstance(exc, trio.TooSlowError) else str(exc)
        then = (f"limiting per node, rates divided by {self._nodes}" if self._on_failure == "local"
                else "refusing rate-limited requests with 503")
        log.warning("rate limit store %s failed (%s): %s until it is back",
                    self.url.redacted(), what, then)

    def _fallback(self, key_id: str, tenant: str, limits: RateLimits, cost: int) -> None:
        if self._on_failure == "deny":
            raise RateLimitUnavailable(
                "rate limit store unavailable", retry_after=math.ceil(self._retry_interval)
            )
        derived = self._derived.get(limits)
        if derived is None:
            if len(self._derived) >= _MAX_DERIVED_LIMITS:
                self._derived.clear()
            derived = self._derived[limits] = per_node_limits(limits, self._nodes)
        self._local.check(key_id, tenant, derived, cost)

    async def aclose(self) -> None:
        """Close the connections to Redis (those in use when their call ends)."""
        await self._client.aclose()
