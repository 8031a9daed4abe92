"""Monthly usage quotas per tenant and operation class, counted in SQLite.

Theory of operation
-------------------
Usage is counted per (tenant, calendar month in UTC, operation class) — e.g. ``("acme",
"2025-06", "sign")`` — in the ``quota_usage`` table of the gateway database, so a restart does
not reset it. ``check_and_count(tenant, op_class, limit)`` refuses with ``QuotaExceeded`` (429,
``retry_after`` = seconds until the next month starts) when counting would go past ``limit``;
otherwise it counts and returns the new usage.

The hot path touches no disk: counts live in memory (loaded for the current month at start),
and increments accumulate in a *pending* table that ``flush()`` adds to SQLite in one
transaction (``count = count + pending``, WAL, ``synchronous=FULL``). A flush happens

* inside ``check_and_count`` when ``flush_interval`` seconds (default 1 s) have passed since
  the last flush, or when ``flush_every`` increments (default 256, all tenants together) are
  pending;
* whenever the server calls ``maybe_flush()`` (it should, every ``flush_interval`` seconds, so
  that increments do not wait for the next request);
* at ``close()`` (shutdown) and at a month boundary.

**What a crash can lose** (the README copies this paragraph): a crash of the gateway process
(SIGKILL, OOM, power loss) loses the increments not yet flushed — at most ``flush_every − 1``
admitted operations across all tenants (255 by default), and, while the server's periodic
``maybe_flush()`` runs, only those admitted in the last ``flush_interval`` seconds (1 s by
default). A lost increment is an operation that was served but not counted: a crash can only
under-count, never refuse a request that was within quota. A clean shutdown (``close()``)
loses nothing. If a flush fails (disk full, database locked for longer than the busy timeout),
the request that triggered it is not counted and is refused with 503 ``quota_unavailable``;
the pending increments are kept and retried at the next flush, and until one succeeds the loss
bound above does not hold.

After each flush the in-memory counts of the flushed rows are re-read from the database, so
two gateway processes sharing one database converge (each sees the other's increments at its
own next flush of the same row); with a single gateway process — the supported deployment —
the memory is always exact.
"""

from __future__ import annotations

import calendar
import math
import os
import time
from collections.abc import Callable

from ..errors import InvalidInput, QuotaExceeded, QuotaUnavailable, StorageUnavailable
from ..storage import sqlite as db

__all__ = ["QuotaCounter", "month_of", "seconds_to_next_month"]

DEFAULT_FLUSH_INTERVAL_S = 1.0
DEFAULT_FLUSH_EVERY = 256

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS quota_usage (
        tenant    TEXT NOT NULL,
        month     TEXT NOT NULL,
        op_class  TEXT NOT NULL,
        count     INTEGER NOT NULL,
        PRIMARY KEY (tenant, month, op_class)
    ) WITHOUT ROWID""",
)


def month_of(now: float) -> str:
    t = time.gmtime(now)
    return f"{t.tm_year:04d}-{t.tm_mon:02d}"


def _month_bounds(month: str) -> tuple[float, float]:
    """[start, end) of the UTC calendar month ``"YYYY-MM"``, in epoch seconds."""
    year, mon = int(month[:4]), int(month[5:7])
    next_year, next_mon = (year + 1, 1) if mon == 12 else (year, mon + 1)
    return (float(calendar.timegm((year, mon, 1, 0, 0, 0, 0, 0, 0))),
            float(calendar.timegm((next_year, next_mon, 1, 0, 0, 0, 0, 0, 0))))


def seconds_to_next_month(now: float) -> int:
    t = time.gmtime(now)
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    start = calendar.timegm((year, month, 1, 0, 0, 0, 0, 0, 0))
    return max(1, math.ceil(start - now))


class QuotaCounter:
    blocking = False  # see pg_quotas.PgQuotaCounter, whose loads and flushes run in threads

    def __init__(
        self,
        db_path: str | os.PathLike[str],
        clock: Callable[[], float] = time.time,
        *,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL_S,
        flush_every: int = DEFAULT_FLUSH_EVERY,
    ) -> None:
        if flush_every < 1 or not flush_interval > 0:
            raise InvalidInput("flush_every must be >= 1 and flush_interval > 0")
        self._clock = clock
        self._flush_interval = flush_interval
        self._flush_every = flush_every
        self._conn = db.connect(db_path)
        try:
            db.ensure_schema(self._conn, "quota_usage", 1, _SCHEMA)
            now = clock()
            self._month = month_of(now)
            self._month_bounds = _month_bounds(self._month)
            self._counts = self._load(self._month)
        except BaseException:
            self._conn.close()
            raise
        # (month, tenant, op_class) -> increments not yet in the database
        self._pending: dict[tuple[str, str, str], int] = {}
        self._pending_total = 0
        self._last_flush = now
        self._closed = False

    def _load(self, month: str) -> dict[str, dict[str, int]]:
        counts: dict[str, dict[str, int]] = {}
        with db.mapped("loading quota usage"):
            rows = self._conn.execute(
                "SELECT tenant, op_class, count FROM quota_usage WHERE month = ?", (month,)
            ).fetchall()
        for tenant, op_class, count in rows:
            counts.setdefault(tenant, {})[op_class] = int(count)
        return counts

    def _roll(self, month: str) -> None:
        self.flush()  # the old month's increments go to the old month's rows
        self._month = month
        self._counts = self._load(month)
        self._month_bounds = _month_bounds(month)

    def _month_of(self, now: float) -> str:
        """``month_of(now)``, without a gmtime while ``now`` is inside the current month."""
        start, end = self._month_bounds
        return self._month if start <= now < end else month_of(now)

    async def ensure_loaded(self, tenant: str) -> None:
        """Nothing to do: every tenant of the month is in memory (``PgQuotaCounter`` loads each
        tenant on first use; the gateway awaits this before ``usage`` / ``check_and_count``)."""

    def check_and_count(self, tenant: str, op_class: str, limit: int | None, n: int = 1) -> int:
        """Count ``n`` operations of ``op_class`` for ``tenant`` this month and return the new
        usage, or raise ``QuotaExceeded`` (nothing counted) if that would exceed ``limit``
        (``None`` = unlimited, still counted)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidInput(f"an operation count must be a positive integer, not {n!r}")
        if self._closed:
            raise QuotaUnavailable("quota counter is closed")
        now = self._clock()
        month = self._month_of(now)
        if month != self._month:
            self._roll_or_unavailable(month)
        ops = self._counts.get(tenant)
        if ops is None:
            ops = self._counts[tenant] = {}
        used = ops.get(op_class, 0)
        if limit is not None and used + n > limit:
            raise QuotaExceeded(
                f"monthly quota for {op_class!r} operations exhausted ({used} of {limit})"[:200],
                retry_after=seconds_to_next_month(now),
            )
        ops[op_class] = used + n
        pkey = (month, tenant, op_class)
        self._pending[pkey] = self._pending.get(pkey, 0) + n
        self._pending_total += n
        if self._pending_total >= self._flush_every or now - self._last_flush >= self._flush_interval:
            try:
                self.flush()
            except QuotaUnavailable:
                # not served, so not counted; the rest stays pending for the next flush
                ops[op_class] = ops.get(op_class, n) - n
                self._pending[pkey] -= n
                if not self._pending[pkey]:
                    del self._pending[pkey]
                self._pending_total -= n
                raise
        return used + n

    def _roll_or_unavailable(self, month: str) -> None:
        try:
            self._roll(month)
        except StorageUnavailable as exc:
            raise QuotaUnavailable("quota usage cannot be read") from exc

    def usage(self, tenant: str) -> dict[str, int]:
        """This month's usage of ``tenant`` per operation class (a copy; for policy facts)."""
        month = self._month_of(self._clock())
        if month != self._month:
            self._roll_or_unavailable(month)
        return dict(self._counts.get(tenant, {}))

    def maybe_flush(self) -> None:
        """Flush if ``flush_interval`` has passed (for the server's periodic task)."""
        if self._pending and self._clock() - self._last_flush >= self._flush_interval:
            self.flush()

    def flush(self) -> None:
        """Write pending increments in one transaction; ``QuotaUnavailable`` if that fails
        (the increments stay pending)."""
        self._last_flush = self._clock()
        if not self._pending:
            return
        items = list(self._pending.items())
        fresh: list[tuple[str, str, str, int]] = []
        try:
            with db.transaction(self._conn, "counting quota usage"):
                for (month, tenant, op_class), n in items:
                    self._conn.execute(
                        "INSERT INTO quota_usage (tenant, month, op_class, count) VALUES (?, ?, ?, ?) "
                        "ON CONFLICT(tenant, month, op_class) DO UPDATE SET count = count + excluded.count",
                        (tenant, month, op_class, n),
                    )
                    row = db.one(self._conn.execute(
                        "SELECT count FROM quota_usage WHERE tenant = ? AND month = ? AND op_class = ?",
                        (tenant, month, op_class),
                    ))
                    fresh.append((month, tenant, op_class, int(row[0])))
        except StorageUnavailable as exc:
            raise QuotaUnavailable("quota usage cannot be recorded") from exc
        self._pending.clear()
        self._pending_total = 0
        for month, tenant, op_class, count in fresh:
            if month == self._month:
                self._counts.setdefault(tenant, {})[op_class] = count

    def close(self) -> None:
        """Flush and close (call at shutdown). Idempotent."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            self._conn.close()

    def __enter__(self) -> QuotaCounter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
