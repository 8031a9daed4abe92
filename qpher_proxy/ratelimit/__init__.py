"""Rate limits (token buckets, in memory) and monthly quotas (counted in SQLite)."""

from .buckets import RateLimits, TokenBucketLimiter
from .quotas import QuotaCounter, month_of, seconds_to_next_month

__all__ = ["RateLimits", "TokenBucketLimiter", "QuotaCounter", "month_of", "seconds_to_next_month"]
