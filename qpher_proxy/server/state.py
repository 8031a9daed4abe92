"""Where the gateway's shared state lives, chosen once from the config.

=========================  ===============================  ====================================
state                      embedded default (one host)      scale-out
=========================  ===============================  ====================================
API keys, revocations      SQLite ``auth.db``               PostgreSQL (``storage.backend``)
monthly quota counts       SQLite ``auth.db``               PostgreSQL, atomic increments
plan rate limits           this process's memory, or the    Redis, GCRA in one Lua script
                           host's shared memory when        (``ratelimit.backend: redis``)
                           ``server.workers`` > 1
=========================  ===============================  ====================================

``open_stores`` and ``open_limiter`` build the objects the request pipeline (``gateway.Gateway``)
uses; ``run_background`` starts what each needs in the background (the PostgreSQL change poller
and quota flusher; the SQLite quota flush). ``prepare_database`` runs in the supervisor before
any child starts: it migrates the schema when ``storage.dsn`` is given, else checks it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from ..auth.apikeys import APIKeyStore, Authenticator
from ..errors import QpherError
from ..ratelimit import QuotaCounter, TokenBucketLimiter
from ..ratelimit.redis_gcra import LocalRateLimiter, RedisRateLimiter

if TYPE_CHECKING:
    from ..auth.pg_apikeys import PgAPIKeyStore
    from ..config import Config
    from ..ratelimit.pg_quotas import PgQuotaCounter
    from .gateway import RateLimiter

log = logging.getLogger("qpher.server.state")


@dataclass
class GatewayStores:
    store: APIKeyStore | PgAPIKeyStore
    quotas: QuotaCounter | PgQuotaCounter
    postgresql: bool

    def close(self) -> None:
        try:
            self.quotas.close()
        finally:
            self.store.close()


def open_stores(cfg: Config, pepper: bytes) -> GatewayStores:
    if cfg.storage.backend != "postgresql":
        store = APIKeyStore(cfg.auth.db, pepper)
        try:
            quotas = QuotaCounter(cfg.auth.db, flush_interval=cfg.quotas.flush_interval)
        except BaseException:
            store.close()
            raise
        return GatewayStores(store, quotas, postgresql=False)
    from ..auth.pg_apikeys import PgAPIKeyStore, store_dsn
    from ..ratelimit.pg_quotas import PgQuotaCounter
    from ..storage.postgres import Database, role_name

    st = cfg.storage
    # one pool of storage.pool_size connections for the whole gateway process, closed by the
    # API key store (the quota counter closes after it, see GatewayStores.close)
    database = Database(
        store_dsn(st, "gateway"), role=role_name(st.role_prefix, "gateway"), pool_size=st.pool_size,
        connect_timeout=st.connect_timeout, statement_timeout=st.statement_timeout,
        pool_timeout=st.pool_timeout, name="qpher-gateway",
    )
    try:
        pg_store = PgAPIKeyStore(database, pepper, role_prefix=st.role_prefix, kind="gateway",
                                 pool_size=st.pool_size, statement_timeout=st.statement_timeout,
                                 owns_database=True)
        pg_quotas = PgQuotaCounter(database, flush_interval=cfg.quotas.flush_interval, pool_size=st.pool_size)
    except BaseException:
        database.close()
        raise
    return GatewayStores(pg_store, pg_quotas, postgresql=True)


def open_limiter(cfg: Config, shared_fd: int | None) -> RateLimiter:
    """Redis when configured (its fallback: the host's buckets, at limit / expected_nodes);
    otherwise the host's shared-memory table when the supervisor handed one over
    (``server.workers`` > 1), else this process's own buckets."""
    local: Any = TokenBucketLimiter()
    if shared_fd is not None:
        from ..ratelimit.shared import SharedLimiterTable, SharedRateLimiter

        local = SharedRateLimiter(SharedLimiterTable.attach(shared_fd))
    if cfg.ratelimit.backend == "redis":
        return RedisRateLimiter(cfg.ratelimit, fallback=local)
    return local if hasattr(local, "acquire") else LocalRateLimiter(local)


async def run_background(
    nursery: trio.Nursery, cfg: Config, stores: GatewayStores, authenticator: Authenticator
) -> None:
    if stores.postgresql:
        await nursery.start(authenticator.run_change_poller)
        quotas: Any = stores.quotas
        await nursery.start(quotas.run_flusher, cfg.quotas.flush_interval)
    else:
        nursery.start_soon(_flush_quotas, stores.quotas, cfg.quotas.flush_interval)


async def _flush_quotas(quotas: Any, interval: float) -> None:
    while True:
        await trio.sleep(interval)
        try:
            quotas.maybe_flush()
        except QpherError:
            log.error("quota flush failed; will retry", exc_info=True)


def prepare_database(cfg: Config) -> None:
    """Supervisor, before any child: migrate (``storage.dsn``: its user owns the schema) or, with
    per-process DSNs only, check that the schema is this build's (``SchemaTooOld``/``TooNew``)."""
    if cfg.storage.backend != "postgresql":
        return
    from ..storage.migrations import check_schema, current_version, migrate
    from ..storage.postgres import connect_owner, mapped

    st = cfg.storage
    if st.dsn is not None:
        before, after = migrate(st.dsn, st.role_prefix, connect_timeout=st.connect_timeout)
        if before != after:
            log.info("database schema migrated", extra={"fields": {"from": before, "to": after}})
        return
    assert st.gateway_dsn is not None  # the config loader requires dsn or both per-process DSNs
    conn = connect_owner(st.gateway_dsn, st.connect_timeout)
    try:
        with mapped("reading the schema version"), conn.transaction():
            version = current_version(conn)
    finally:
        conn.close()
    check_schema(version)
