"""Monthly usage quotas counted in PostgreSQL (``storage.backend: postgresql``), for N nodes.

Theory of operation
-------------------
``PgQuotaCounter`` answers like ``quotas.QuotaCounter`` (``check_and_count``, ``usage``,
``QuotaExceeded`` with ``retry_after`` = seconds to the next UTC month) but never touches the
database on the request path: ``check_and_count`` and ``usage`` read and write memory only.

**Loading, per tenant, lazily.** Row-level security shows the gateway role one tenant's
``quota_usage`` rows at a time, so there is no "load every tenant" at start-up. A tenant's rows
of the current month are read the first time the node serves it — ``await ensure_loaded(tenant)``,
which runs the query in a worker thread (at most ``pool_size`` at once, one query per tenant
however many requests wait for it) — and again whenever its counts have not been synchronised
for longer than the staleness limit ``5 × flush_interval``. The gateway awaits ``ensure_loaded``
before ``usage`` / ``check_and_count``; for a tenant whose counts are fresh it returns at once
(no checkpoint, no thread). While the last flush failed (database down) it does not try: it
raises ``QuotaUnavailable`` at once, and the flush that succeeds next synchronises the tenant.
``check_and_count`` / ``usage`` of a tenant that is not loaded, or whose counts are older than
the staleness limit, raise ``QuotaUnavailable`` (503): fail closed.

**Flushing.** Admitted operations accumulate in a *pending* table. ``run_flusher(interval)``
(a background task) calls ``flush_async`` every interval: the pending table is swapped out and
written in a worker thread in ONE transaction, tenant by tenant (``set_tenant``; rows in a fixed
order, so two nodes flushing the same rows cannot deadlock) with an atomic increment per row::

    INSERT INTO quota_usage ... ON CONFLICT (tenant_id, month, op_class)
        DO UPDATE SET count = quota_usage.count + excluded.count RETURNING count

followed by one read of the tenant's other rows of the month. The tenants written, and those
``ensure_loaded`` saw since the last flush, then take the database's totals (plus what was
admitted locally while the flush ran): every flush is also how a node learns the increments of
the other nodes. A failed flush puts its increments back into pending (nothing is lost; the
next flush retries) and synchronises nobody. Fail closed: once no flush has succeeded for
longer than ``5 × flush_interval`` (or the flusher is not running), or a tenant has not been
synchronised for that long, ``check_and_count`` / ``usage`` raise ``QuotaUnavailable`` (503
``quota_unavailable``) instead of counting on a stale view or piling up increments that only
this node knows.
``close()`` flushes synchronously (shutdown). ``maybe_flush()`` does nothing: ``run_flusher``
is the periodic flush, and a blocking write must not run on the trio loop.

**Worst-case overshoot across N nodes** (per tenant, month and operation class, with a limit
``L``; ``S = 5 × flush_interval``, the staleness limit). A node admits ``n`` operations only
while its in-memory count ``c`` satisfies ``c + n ≤ L``, only while its last synchronisation of
the tenant *started* at most ``S`` ago, and only while its last successful flush started at
most ``S`` ago (and committed already). After a synchronisation starting at ``s``, ``c`` is at
least the database total at ``s`` plus the node's own operations the database did not hold.
Let ``k`` be the node that admitted last, at ``t*``, and ``s_k`` its synchronisation before
that. Whatever ``k`` admitted in all stays within ``L − (others' operations in the database at
s_k)``, so the final total ``F`` satisfies::

    F ≤ L + Σ_{j ≠ k} (operations admitted by node j that were not in the database at s_k)

For each ``j`` that term is at most ``L − U`` (``U``: the usage every node had loaded before it
started admitting; no node admits past ``L`` on its own view). It is also at most what ``j``
admits in two windows of length ``S``: operations ``j`` had not yet written at ``s_k`` were
admitted after the start ``f`` of its last flush committed before ``s_k``, and at most ``S``
after ``f`` (``j`` refuses once its last successful flush is older); operations after ``s_k``
are admitted before ``t* ≤ s_k + S``. Hence, exactly for this implementation::

    overshoot = F − L ≤ (N − 1) × min(L − U, R)

where ``R`` is the most operations of that row one node admits within two windows of ``S``.
In normal operation (every node flushes every interval; the tenant is in use everywhere, so
each flush synchronises it) both windows shrink to about one flush interval each.
``overshoot_bound()`` computes the bound; the scale-out tests check it with two counters on one
database, each admitting up to the limit between flushes (``F = L + (L − U)``: reached, not
exceeded) and that both refuse after a flush. With one node the bound is 0: the limit is
exact. A failed flush loses no increment (one whose commit succeeded but whose answer was
lost with the connection is written again: an over-count, never an under-count); a crashed
node loses (under-counts) what it admitted since its last successful flush, at most ``S``
worth, as ``QuotaCounter`` loses its last interval.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable

import trio

from ..config.model import StorageConfig
from ..errors import ConfigError, InvalidInput, QuotaExceeded, QuotaUnavailable, StorageUnavailable
from ..storage.postgres import Database, role_name
from .quotas import DEFAULT_FLUSH_INTERVAL_S, _month_bounds, month_of, seconds_to_next_month

__all__ = ["PgQuotaCounter", "STALE_INTERVALS", "overshoot_bound"]

log = logging.getLogger("qpher.quotas")

STALE_INTERVALS = 5  # a tenant's counts older than 5 flush intervals are not used: fail closed

_UPSERT = (
    "INSERT INTO quota_usage (tenant_id, month, op_class, count) VALUES (%s, %s, %s, %s) "
    "ON CONFLICT (tenant_id, month, op_class) DO UPDATE SET count = quota_usage.count + excluded.count "
    "RETURNING count"
)
_READ_TENANT = "SELECT op_class, count FROM quota_usage WHERE tenant_id = %s AND month = %s"

Key = tuple[str, str, str]  # (month, tenant, op_class)


def overshoot_bound(nodes: int, limit: int, known_usage: int = 0, per_node_admits: int | None = None) -> int:
    """The most a row's final count can exceed ``limit`` with ``nodes`` nodes (module docstring):
    ``(nodes − 1) × min(limit − known_usage, per_node_admits)``."""
    room = max(0, limit - known_usage)
    if per_node_admits is not None:
        room = min(room, per_node_admits)
    return max(0, nodes - 1) * room


def _check_tenant(tenant: object) -> None:
    # what the table's CHECKs accept: a value they refused would poison every later flush
    if not isinstance(tenant, str) or not 1 <= len(tenant) <= 255 or "\x00" in tenant:
        raise InvalidInput("a tenant must be 1..255 characters")


def _check_names(tenant: object, op_class: object) -> None:
    _check_tenant(tenant)
    if not isinstance(op_class, str) or not 1 <= len(op_class) <= 64 or "\x00" in op_class:
        raise InvalidInput("an operation class must be 1..64 characters")


class PgQuotaCounter:
    """Monthly quota counts in PostgreSQL, counted in memory (see the module docstring).

    ``database`` acts as ``<prefix>_gateway`` (``PgQuotaCounter.open`` makes one); ``clock`` is
    wall time (months), ``monotonic`` measures staleness."""

    blocking = True

    def __init__(
        self,
        database: Database,
        clock: Callable[[], float] = time.time,
        *,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL_S,
        pool_size: int = 8,
        owns_database: bool = False,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if not flush_interval > 0 or not math.isfinite(flush_interval):
            raise InvalidInput("flush_interval must be > 0")
        self._db = database
        self._clock = clock
        self._mono = monotonic
        self._flush_interval = flush_interval
        self._threads = max(1, pool_size)
        self._limiter: trio.CapacityLimiter | None = None
        self._owns = owns_database
        self._month = month_of(clock())
        self._month_bounds = _month_bounds(self._month)
        self._counts: dict[str, dict[str, int]] = {}  # current month: tenant -> op_class -> count
        self._synced_at: dict[str, float] = {}  # tenant -> monotonic start of its last sync
        self._pending: dict[Key, int] = {}
        self._inflight: dict[Key, int] = {}  # the batch a flush is writing
        self._touched: set[str] = set()  # tenants to synchronise at the next flush
        self._loading: dict[str, trio.Event] = {}
        self._flushing = False
        self._flush_done: trio.Event | None = None  # set while flush_async runs
        self._flush_failing = False  # the last flush failed (no success since)
        self._closed = False
        self.last_flush_ok = monotonic()

    @classmethod
    def open(
        cls,
        dsn: str,
        *,
        role_prefix: str,
        pool_size: int = 8,
        connect_timeout: float = 3.0,
        statement_timeout: float = 5.0,
        pool_timeout: float = 2.0,
        clock: Callable[[], float] = time.time,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL_S,
    ) -> PgQuotaCounter:
        """A counter with its own pool acting as ``<role_prefix>_gateway``; ``close()`` closes it."""
        database = Database(
            dsn, role=role_name(role_prefix, "gateway"), pool_size=pool_size, connect_timeout=connect_timeout,
            statement_timeout=statement_timeout, pool_timeout=pool_timeout, name="qpher-quotas",
        )
        return cls(database, clock, flush_interval=flush_interval, pool_size=pool_size, owns_database=True)

    @classmethod
    def from_config(
        cls, storage: StorageConfig, *, flush_interval: float = DEFAULT_FLUSH_INTERVAL_S,
        clock: Callable[[], float] = time.time,
    ) -> PgQuotaCounter:
        """``open`` with ``storage.*`` (``storage.gateway_dsn``, else ``storage.dsn``)."""
        dsn = storage.gateway_dsn or storage.dsn
        if not dsn:
            raise ConfigError("storage.backend is postgresql but neither storage.gateway_dsn nor dsn is set")
        return cls.open(
            dsn, role_prefix=storage.role_prefix, pool_size=storage.pool_size,
            connect_timeout=storage.connect_timeout, statement_timeout=storage.statement_timeout,
            pool_timeout=storage.pool_timeout, clock=clock, flush_interval=flush_interval,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(month={self._month!r}, tenants={len(self._counts)})"

    @property
    def flush_interval(self) -> float:
        return self._flush_interval

    @property
    def max_staleness(self) -> float:
        return STALE_INTERVALS * self._flush_interval

    # ---- months and freshness ----

    def _current_month(self, now: float) -> str:
        start, end = self._month_bounds
        if start <= now < end:
            return self._month
        month = month_of(now)
        if month != self._month:
            # memory holds one month; the old month's pending increments keep their month and
            # are flushed to its rows. Every tenant loads the new month on first use.
            self._month = month
            self._month_bounds = _month_bounds(month)
            self._counts = {}
            self._synced_at = {}
            self._touched = set()
        return month

    def _fresh(self, tenant: str) -> bool:
        synced = self._synced_at.get(tenant)
        return synced is not None and self._mono() - synced <= self.max_staleness

    def _require_fresh(self, tenant: str) -> dict[str, int]:
        if self._closed:
            raise QuotaUnavailable("quota counter is closed")
        if not self._fresh(tenant):
            if tenant not in self._synced_at:
                raise QuotaUnavailable("quota usage of this tenant is not loaded")
            raise QuotaUnavailable("quota usage cannot be synchronised with the database")
        if self._mono() - self.last_flush_ok > self.max_staleness:
            raise QuotaUnavailable("quota usage cannot be recorded")
        return self._counts.setdefault(tenant, {})

    def _thread_limiter(self) -> trio.CapacityLimiter:
        if self._limiter is None:
            self._limiter = trio.CapacityLimiter(self._threads)
        return self._limiter

    # ---- loading ----

    async def ensure_loaded(self, tenant: str) -> None:
        """Make ``tenant``'s counts of this month usable (see the module docstring): at once if
        they are fresh, else after one query in a thread. ``QuotaUnavailable`` if it fails."""
        if self._closed:
            raise QuotaUnavailable("quota counter is closed")
        _check_tenant(tenant)
        month = self._current_month(self._clock())
        self._touched.add(tenant)
        if self._fresh(tenant):
            return
        if self._flush_failing:
            # the database did not answer the last flush: fail fast rather than make this
            # request wait a pool timeout; the next flush that succeeds synchronises the tenant
            # (it is in ``_touched``), so requests resume within one interval of its return
            raise QuotaUnavailable("quota usage cannot be read")
        running = self._loading.get(tenant)
        if running is not None:
            await running.wait()
            if not self._fresh(tenant):
                raise QuotaUnavailable("quota usage cannot be read")
            return
        done = self._loading[tenant] = trio.Event()
        started = self._mono()
        try:
            rows = await trio.to_thread.run_sync(self._read_tenant, tenant, month,
                                                 limiter=self._thread_limiter())
        except Exception as exc:  # StorageUnavailable, or a bug: either way this request cannot count
            if not isinstance(exc, StorageUnavailable):
                log.exception("loading quota usage failed")
            raise QuotaUnavailable("quota usage cannot be read") from exc
        finally:
            del self._loading[tenant]
            done.set()
        if month == self._month:
            # what a flush in flight is writing may already be in ``rows``: counted twice at
            # worst (refusing early, never late) until the next flush replaces it
            self._merge(tenant, rows, started, extra=self._inflight)

    def _read_tenant(self, tenant: str, month: str) -> dict[str, int]:
        with self._db.transaction(tenant=tenant, what="loading quota usage") as conn:
            rows = conn.execute(_READ_TENANT, (tenant, month)).fetchall()
        return {str(op): int(count) for op, count in rows}

    def _merge(self, tenant: str, db_counts: dict[str, int], started: float, extra: dict[Key, int]) -> None:
        """Counts from the database (read after ``started``) plus the local increments it did
        not hold yet (pending, and ``extra``); never lowers a count (counts only grow)."""
        ops = self._counts.setdefault(tenant, {})
        fresh = dict(db_counts)
        for table in (self._pending, extra):
            for (month, t, op), n in table.items():
                if t == tenant and month == self._month:
                    fresh[op] = fresh.get(op, 0) + n
        for op, count in fresh.items():
            if count > ops.get(op, -1):
                ops[op] = count
        self._synced_at[tenant] = max(self._synced_at.get(tenant, -math.inf), started)

    # ---- the request path: memory only ----

    def check_and_count(self, tenant: str, op_class: str, limit: int | None, n: int = 1) -> int:
        """Count ``n`` operations of ``op_class`` for ``tenant`` this month and return the new
        usage, or raise ``QuotaExceeded`` (nothing counted) if that would exceed ``limit``
        (``None`` = unlimited, still counted). Never touches the database; ``QuotaUnavailable``
        if the tenant is not loaded or its counts are stale (fail closed)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidInput(f"an operation count must be a positive integer, not {n!r}")
        _check_names(tenant, op_class)
        now = self._clock()
        month = self._current_month(now)
        ops = self._require_fresh(tenant)
        self._touched.add(tenant)
        used = ops.get(op_class, 0)
        if limit is not None and used + n > limit:
            raise QuotaExceeded(
                f"monthly quota for {op_class!r} operations exhausted ({used} of {limit})"[:200],
                retry_after=seconds_to_next_month(now),
            )
        ops[op_class] = used + n
        key = (month, tenant, op_class)
        self._pending[key] = self._pending.get(key, 0) + n
        return used + n

    def usage(self, tenant: str) -> dict[str, int]:
        """This month's usage of ``tenant`` per operation class (a copy; for policy facts)."""
        self._current_month(self._clock())
        ops = self._require_fresh(tenant)
        self._touched.add(tenant)
        return dict(ops)

    # ---- flushing ----

    def maybe_flush(self) -> None:
        """Nothing: ``run_flusher`` flushes (``QuotaCounter``'s interface, for the server)."""

    def _take_batch(self) -> tuple[dict[Key, int], set[str], str, float]:
        if self._flushing:
            raise QuotaUnavailable("a quota flush is already running")
        batch, self._pending = self._pending, {}
        sync, self._touched = self._touched, set()
        self._inflight = batch
        self._flushing = True
        return batch, sync, self._month, self._mono()

    def _settle(
        self, batch: dict[Key, int], sync: set[str], month: str, started: float,
        views: dict[str, dict[str, int]] | None,
    ) -> None:
        self._inflight = {}
        self._flushing = False
        self._flush_failing = views is None
        if views is None:  # failed: put everything back for the next flush
            for key, n in batch.items():
                self._pending[key] = self._pending.get(key, 0) + n
            self._touched |= sync
            return
        self.last_flush_ok = started
        if month == self._month:
            for tenant, db_counts in views.items():
                self._merge(tenant, db_counts, started, extra={})

    def _write(self, batch: dict[Key, int], sync: Iterable[str], month: str) -> dict[str, dict[str, int]]:
        """One transaction: the atomic increments, then each tenant's totals of ``month``."""
        by_tenant: dict[str, list[tuple[Key, int]]] = {t: [] for t in sync}
        for key, n in batch.items():
            by_tenant.setdefault(key[1], []).append((key, n))
        views: dict[str, dict[str, int]] = {}
        with self._db.transaction(what="counting quota usage") as conn:
            for tenant in sorted(by_tenant):
                self._db.set_tenant(conn, tenant)
                view = views[tenant] = {}
                for (row_month, _, op), n in sorted(by_tenant[tenant]):
                    row = conn.execute(_UPSERT, (tenant, row_month, op, n)).fetchone()
                    if row_month == month and row is not None:
                        view[op] = int(row[0])
                for op, count in conn.execute(_READ_TENANT, (tenant, month)).fetchall():
                    view[str(op)] = max(view.get(str(op), 0), int(count))
        return views

    async def flush_async(self) -> None:
        """Write the pending increments and synchronise the tenants in use, in a thread (see the
        module docstring). ``QuotaUnavailable`` if that fails (the increments stay pending)."""
        while self._flush_done is not None:  # one flush at a time: wait, then flush what is left
            await self._flush_done.wait()
        if not self._pending and not self._touched:
            self.last_flush_ok = self._mono()
            return
        batch, sync, month, started = self._take_batch()
        done = self._flush_done = trio.Event()
        views: dict[str, dict[str, int]] | None = None
        try:
            views = await trio.to_thread.run_sync(
                self._write, batch, sync, month, limiter=self._thread_limiter()
            )
        except Exception as exc:  # StorageUnavailable, or a bug: the flusher must go on (and retry)
            if not isinstance(exc, StorageUnavailable):
                log.exception("recording quota usage failed")
            raise QuotaUnavailable("quota usage cannot be recorded") from exc
        finally:
            self._settle(batch, sync, month, started, views)
            self._flush_done = None
            done.set()

    def flush(self) -> None:
        """``flush_async`` in the calling thread (it blocks: shutdown and tests only)."""
        if not self._pending and not self._touched:
            return
        batch, sync, month, started = self._take_batch()
        views: dict[str, dict[str, int]] | None = None
        try:
            views = self._write(batch, sync, month)
        except StorageUnavailable as exc:
            raise QuotaUnavailable("quota usage cannot be recorded") from exc
        finally:
            self._settle(batch, sync, month, started, views)

    async def run_flusher(
        self, interval: float | None = None, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Flush every ``interval`` seconds (default: ``flush_interval``, which it replaces: the
        staleness limit is ``5 × interval``), forever. Failures are logged once per outage and
        retried at the next tick."""
        if interval is not None:
            if not interval > 0 or not math.isfinite(interval):
                raise InvalidInput("the flush interval must be > 0")
            self._flush_interval = interval
        task_status.started()
        failing = False
        deadline = trio.current_time()
        while True:
            deadline = max(deadline + self._flush_interval, trio.current_time())
            await trio.sleep_until(deadline)
            try:
                await self.flush_async()
            except QuotaUnavailable:
                if not failing:
                    log.warning("cannot record quota usage; requests are refused (503) after %.1f s",
                                self.max_staleness)
                failing = True
            else:
                if failing:
                    log.warning("quota usage recorded again")
                failing = False

    def close(self) -> None:
        """Flush (blocking; a second attempt if the first fails) and close (call at shutdown,
        after ``run_flusher`` ended). Idempotent; ``QuotaUnavailable`` if the increments could
        not be written (they are lost: an under-count)."""
        if self._closed:
            return
        self._touched.clear()  # write what is pending; synchronising is pointless now
        try:
            try:
                self.flush()
            except QuotaUnavailable:
                # once more: after an outage the pool may hand out a connection the server
                # closed, which the failed attempt discarded
                self.flush()
        finally:
            self._closed = True
            if self._owns:
                self._db.close()

    def __enter__(self) -> PgQuotaCounter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
