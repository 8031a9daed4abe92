"""PostgreSQL: one way to connect, one way to run a transaction, one error.

Used by the gateway (API keys, usage counters), the KMS workers (key metadata and the sealed key
versions) and the ``db`` / ``apikey`` commands when ``storage.backend`` is ``postgresql``.

Theory of operation
-------------------
**Roles.** ``qpher-proxy db migrate`` (see ``migrations``) creates three roles from
``storage.role_prefix`` (default ``qpher``): ``qpher_gateway``, ``qpher_kms`` and ``qpher_admin``
(the ``apikey`` CLI). None owns a table, none is ``SUPERUSER`` or ``BYPASSRLS``, and none can log
in. Every connection this module opens runs ``SET ROLE <role>`` right after connecting, so even
a superuser's DSN (a quick test) ends up with exactly that role's GRANTs and row-level
security; a deployment may instead give each process kind its own login (``storage.gateway_dsn``,
``storage.kms_dsn``) that is a member of its role. Only the migration commands (``db migrate``,
``db import-sqlite``) use the DSN's own user, which must own the schema.

**Tenant per transaction.** :meth:`Database.transaction` with ``tenant=`` runs
``set_config('qpher.tenant', tenant, true)`` first: transaction-local, so a pooled connection
never carries one request's tenant into the next. The row-level security policies compare each
row's ``tenant_id`` with that setting; a query that forgot its tenant sees nothing.

**Bounded everything.** A pool of at most ``pool_size`` connections per process (psycopg_pool);
waiting for one is bounded by ``pool_timeout``, connecting by ``connect_timeout``, each statement
by the server-side ``statement_timeout`` and, against a peer that vanished without closing,
``tcp_user_timeout`` plus keepalives. Every failure of the database, the network or the pool
becomes :class:`~qpher_proxy.errors.StorageUnavailable` (503 ``storage_unavailable`` with
``Retry-After``) at this one boundary; the message never holds the DSN (which may hold a password).
A transaction that fails is rolled back; nothing is ever half-written.

psycopg is imported here only, and this module only when the PostgreSQL backend is configured.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import psycopg
import psycopg_pool
from psycopg import sql

from ..errors import StorageUnavailable

__all__ = [
    "Database",
    "RoleKind",
    "TENANT_SETTING",
    "connect_owner",
    "mapped",
    "redact_dsn",
    "role_name",
]

log = logging.getLogger("qpher.storage.postgres")

RoleKind = Literal["gateway", "kms", "admin"]
TENANT_SETTING = "qpher.tenant"
_PREFIX_RE = re.compile(r"[a-z][a-z0-9_]{0,39}")


def role_name(prefix: str, kind: RoleKind) -> str:
    if _PREFIX_RE.fullmatch(prefix) is None:
        raise ValueError("role prefix must be 1..40 characters a-z, 0-9, _ starting with a letter")
    return f"{prefix}_{kind}"


def redact_dsn(dsn: str) -> str:
    """``postgresql://user:secret@host/db`` -> ``postgresql://user:***@host/db`` (for messages)."""
    return re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", dsn)


def _connect_kwargs(connect_timeout: float, statement_timeout: float) -> dict[str, Any]:
    user_timeout_ms = int((statement_timeout + connect_timeout) * 1000)
    return {
        "connect_timeout": max(1, round(connect_timeout)),
        "application_name": "qpher-proxy",
        "keepalives": 1,
        "keepalives_idle": 5,
        "keepalives_interval": 2,
        "keepalives_count": 3,
        "tcp_user_timeout": user_timeout_ms,
    }


@contextmanager
def mapped(what: str) -> Iterator[None]:
    """Map driver, network and pool errors to ``StorageUnavailable`` naming ``what`` only.

    Integrity errors (a CHECK or unique violation) are bugs or races the caller handles, so they
    pass through unchanged."""
    try:
        yield
    except psycopg.errors.IntegrityError:
        raise
    except (psycopg.Error, psycopg_pool.PoolTimeout, psycopg_pool.PoolClosed, OSError) as exc:
        raise StorageUnavailable(f"database error while {what}") from exc


class Database:
    """A bounded connection pool whose connections all act as one role (see the module docstring)."""

    def __init__(
        self,
        dsn: str,
        *,
        role: str | None,
        pool_size: int = 8,
        connect_timeout: float = 3.0,
        statement_timeout: float = 5.0,
        pool_timeout: float = 2.0,
        name: str = "qpher",
        min_size: int = 1,
    ) -> None:
        self.role = role
        self._statement_timeout_ms = max(1, int(statement_timeout * 1000))
        self._pool_timeout = pool_timeout
        self._pool = psycopg_pool.ConnectionPool(
            dsn,
            min_size=min(min_size, pool_size),
            max_size=pool_size,
            kwargs=_connect_kwargs(connect_timeout, statement_timeout),
            configure=self._configure,
            # one round trip when a connection is handed out: a connection the server dropped
            # (a restart) is replaced then, instead of failing the request that got it
            check=psycopg_pool.ConnectionPool.check_connection,
            timeout=pool_timeout,
            reconnect_timeout=max(60.0, 10 * connect_timeout),
            max_waiting=max(64, pool_size * 64),
            name=name,
            open=False,
        )
        # wait=False: a database that is down at this moment is not a start-up error of the
        # pool; the first transaction reports it (503), and the pool keeps trying.
        self._pool.open(wait=False)

    def __repr__(self) -> str:  # never the DSN
        return f"Database(role={self.role!r})"

    def _configure(self, conn: psycopg.Connection[Any]) -> None:
        conn.autocommit = True
        if self.role is not None:
            conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(self.role)))
        conn.execute(
            sql.SQL("SET statement_timeout = {}").format(sql.Literal(self._statement_timeout_ms))
        )
        conn.execute(
            sql.SQL("SET idle_in_transaction_session_timeout = {}").format(
                sql.Literal(self._statement_timeout_ms * 4)
            )
        )
        conn.autocommit = False

    def wait_ready(self, timeout: float) -> None:
        """Block until the pool holds a working connection (start-up checks); StorageUnavailable."""
        with mapped("connecting"):
            self._pool.wait(timeout=timeout)

    @contextmanager
    def transaction(
        self, tenant: str | None = None, what: str = "querying"
    ) -> Iterator[psycopg.Connection[Any]]:
        """One transaction on a pooled connection: committed when the block ends, rolled back
        (and the error mapped, see ``mapped``) when it raises. ``tenant`` sets the row-level
        security context for this transaction only."""
        with mapped(what):
            with self._pool.connection(timeout=self._pool_timeout) as conn:
                # pool.connection() commits on a clean exit and rolls back on an exception
                if tenant is not None:
                    conn.execute("SELECT set_config(%s, %s, true)", (TENANT_SETTING, tenant))
                yield conn

    def set_tenant(self, conn: psycopg.Connection[Any], tenant: str) -> None:
        """Switch the tenant inside a transaction (a flush that writes several tenants' rows)."""
        conn.execute("SELECT set_config(%s, %s, true)", (TENANT_SETTING, tenant))

    def stats(self) -> dict[str, int]:
        s = self._pool.get_stats()
        return {k: int(v) for k, v in s.items() if isinstance(v, int)}

    def close(self) -> None:
        self._pool.close(timeout=1.0)


def connect_owner(dsn: str, connect_timeout: float = 3.0) -> psycopg.Connection[Any]:
    """A plain connection as the DSN's own user (migrations and imports only), autocommit off."""
    with mapped("connecting"):
        return psycopg.connect(dsn, **_connect_kwargs(connect_timeout, 60.0))
