"""API key records in PostgreSQL (``storage.backend: postgresql``): ``PgAPIKeyStore``.

The same keys, MACs, validation and audit semantics as ``apikeys.APIKeyStore`` (the two share
the code in ``apikeys``), on the ``api_keys`` table of ``storage.migrations``. What differs is
who may do what, enforced by the database itself:

* **kind="gateway"** (the serving process, role ``<prefix>_gateway``): reads only. ``lookup``
  goes through the ``SECURITY DEFINER`` function ``<prefix>_api_key_lookup(key_id)``, because
  authentication must find a key before it knows the key's tenant, and the role's row-level
  security shows it no row without a tenant. ``list(tenant)`` sees that tenant's rows only;
  ``create`` / ``revoke`` / ``list()`` of every tenant raise ``ReadOnlyStore`` (a
  ``PermissionError``) before any query (the role could not write anyway: it has only SELECT
  on ``api_keys``).
* **kind="admin"** (the ``apikey`` CLI, role ``<prefix>_admin``): reads and writes every row.

``change_token()`` is ``(change_counters.version of 'api_keys', writes through this object)``:
a trigger bumps the version on every statement that changes ``api_keys``, on any node, so
``Authenticator`` sees a revocation made anywhere at its next poll. Every method may block on
the network: ``blocking`` is True, and ``Authenticator.authenticate_async`` calls ``lookup`` and
``change_token`` in worker threads (at most ``pool_size`` at once). Every database failure is
``StorageUnavailable`` (503 ``storage_unavailable``), bounded by the pool's timeouts.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from typing import Any, Literal

from ..config.model import StorageConfig
from ..errors import ConfigError, QpherError
from ..storage.postgres import Database, role_name
from .apikeys import (
    COLUMNS,
    APIKeyRecord,
    AuditFn,
    Clock,
    check_pepper,
    create_key,
    key_mac,
    key_not_found,
    row_to_record,
)

__all__ = ["PgAPIKeyStore", "ReadOnlyStore", "StoreKind", "store_dsn"]

StoreKind = Literal["gateway", "admin"]

# api_keys calls the tenant column tenant_id; COLUMNS names it "tenant" (the SQLite table)
_PG_COLUMNS = COLUMNS.replace("tenant,", "tenant_id,")
_PLACEHOLDERS = ", ".join(["%s"] * 9)


def store_dsn(storage: StorageConfig, kind: StoreKind) -> str:
    """The DSN a process of ``kind`` connects with (``ConfigError`` if there is none)."""
    dsn = (storage.gateway_dsn if kind == "gateway" else None) or storage.dsn
    if not dsn:
        names = "storage.gateway_dsn or storage.dsn" if kind == "gateway" else "storage.dsn"
        raise ConfigError(f"storage.backend is postgresql but {names} is not set")
    return dsn


class ReadOnlyStore(QpherError, PermissionError):
    """A write (or a read of every tenant) asked of a gateway-role store: a wiring bug."""

    code = "read_only_store"
    status = 500


class PgAPIKeyStore:
    """API key records in PostgreSQL (see the module docstring).

    ``database`` must act as ``role_name(role_prefix, kind)`` (``PgAPIKeyStore.open`` makes
    one); ``pool_size`` and ``statement_timeout`` are the values it was made with (the
    ``Authenticator`` sizes its threads and its staleness window from them). ``audit``, if given,
    is called as ``audit(event, severity, **fields)`` for ``apikey.created`` / ``apikey.revoked``
    inside the write transaction: if it raises, the change is rolled back and the error
    propagates. ``close()`` closes the database only if ``owns_database``."""

    blocking = True

    def __init__(
        self,
        database: Database,
        pepper: bytes,
        *,
        role_prefix: str,
        kind: StoreKind,
        clock: Clock = time.time,
        audit: AuditFn | None = None,
        pool_size: int = 8,
        statement_timeout: float = 5.0,
        owns_database: bool = False,
    ) -> None:
        if kind not in ("gateway", "admin"):
            raise ConfigError(f"an API key store is opened as 'gateway' or 'admin', not {kind!r}")
        self._pepper = check_pepper(pepper)
        self._db = database
        self.kind: StoreKind = kind
        self.role = role_name(role_prefix, kind)
        self._lookup_fn = f"{role_prefix}_api_key_lookup"  # role_name validated the prefix
        self._clock = clock
        self._audit = audit
        self.pool_size = pool_size
        self.statement_timeout = statement_timeout
        self._owns = owns_database
        self._local_writes = 0

    @classmethod
    def open(
        cls,
        dsn: str,
        pepper: bytes,
        *,
        role_prefix: str,
        kind: StoreKind,
        pool_size: int = 8,
        connect_timeout: float = 3.0,
        statement_timeout: float = 5.0,
        pool_timeout: float = 2.0,
        clock: Clock = time.time,
        audit: AuditFn | None = None,
    ) -> PgAPIKeyStore:
        """A store with its own connection pool acting as ``<role_prefix>_<kind>``; ``close()``
        closes the pool. Does not wait for the database: the first query reports an outage."""
        check_pepper(pepper)
        database = Database(
            dsn, role=role_name(role_prefix, kind), pool_size=pool_size, connect_timeout=connect_timeout,
            statement_timeout=statement_timeout, pool_timeout=pool_timeout, name=f"qpher-apikeys-{kind}",
        )
        return cls(database, pepper, role_prefix=role_prefix, kind=kind, clock=clock, audit=audit,
                   pool_size=pool_size, statement_timeout=statement_timeout, owns_database=True)

    @classmethod
    def from_config(
        cls,
        storage: StorageConfig,
        pepper: bytes,
        *,
        kind: StoreKind,
        pool_size: int | None = None,
        clock: Clock = time.time,
        audit: AuditFn | None = None,
    ) -> PgAPIKeyStore:
        """``open`` with ``storage.*``: the gateway uses ``storage.gateway_dsn`` (else
        ``storage.dsn``), the CLI ``storage.dsn``; ``pool_size`` defaults to ``storage.pool_size``."""
        return cls.open(
            store_dsn(storage, kind), pepper, role_prefix=storage.role_prefix, kind=kind,
            pool_size=storage.pool_size if pool_size is None else pool_size,
            connect_timeout=storage.connect_timeout, statement_timeout=storage.statement_timeout,
            pool_timeout=storage.pool_timeout, clock=clock, audit=audit,
        )

    def __repr__(self) -> str:  # never the pepper nor the DSN
        return f"{type(self).__name__}(kind={self.kind!r})"

    def close(self) -> None:
        if self._owns:
            self._db.close()

    def __enter__(self) -> PgAPIKeyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def mac(self, key_id: str, secret: str) -> bytes:
        return key_mac(self._pepper, key_id, secret)

    def _require_admin(self, what: str) -> None:
        if self.kind != "admin":
            raise ReadOnlyStore(
                f"{what} needs the admin role; this store acts as {self.role}, which may only read"
            )

    # ---- writes (admin) ----

    def create(
        self,
        tenant: str,
        plan: str,
        scopes: Iterable[str] = (),
        expires_at: float | None = None,
        label: str | None = None,
    ) -> tuple[APIKeyRecord, str]:
        """Create a key; returns its record and the full key, which exists nowhere else: print
        it once and forget it."""
        self._require_admin("creating an API key")

        def insert(row: tuple[Any, ...], then: Callable[[], None]) -> bool:
            with self._db.transaction(tenant=row[1], what="creating an API key") as conn:
                inserted = conn.execute(
                    f"INSERT INTO api_keys ({_PG_COLUMNS}) VALUES ({_PLACEHOLDERS}) "
                    "ON CONFLICT (key_id) DO NOTHING", row,
                ).rowcount == 1
                if inserted:
                    then()
            return inserted

        created = create_key(
            self._clock(), self.mac, self._audit, insert, tenant, plan, scopes, expires_at, label
        )
        self._local_writes += 1
        return created

    def revoke(self, key_id: str) -> APIKeyRecord:
        """Revoke ``key_id`` (idempotent: revoking twice keeps the first time). ``NotFound`` if
        there is no such key."""
        self._require_admin("revoking an API key")
        now = self._clock()
        with self._db.transaction(what="revoking an API key") as conn:
            row = conn.execute(
                f"SELECT {_PG_COLUMNS} FROM api_keys WHERE key_id = %s FOR UPDATE",
                (key_id,),
            ).fetchone()
            if row is None:
                raise key_not_found(key_id)
            record, _ = row_to_record(tuple(row))
            if record.revoked_at is not None:
                return record
            conn.execute("UPDATE api_keys SET revoked_at = %s WHERE key_id = %s", (now, key_id))
            if self._audit is not None:
                self._audit("apikey.revoked", "WARNING", key_id=key_id, tenant=record.tenant)
        self._local_writes += 1
        return dataclasses.replace(record, revoked_at=now)

    # ---- reads ----

    def get(self, key_id: str) -> APIKeyRecord | None:
        found = self.lookup(key_id)
        return None if found is None else found[0]

    def lookup(self, key_id: str) -> tuple[APIKeyRecord, bytes] | None:
        """The record and its stored MAC, whatever its tenant (gateway: through the lookup
        function, the one cross-tenant read the role has)."""
        if self.kind == "gateway":
            query = f"SELECT * FROM {self._lookup_fn}(%s)"
        else:
            query = f"SELECT {_PG_COLUMNS} FROM api_keys WHERE key_id = %s"
        with self._db.transaction(what="reading an API key") as conn:
            row = conn.execute(query, (key_id,)).fetchone()
        return None if row is None else row_to_record(tuple(row))

    def list(self, tenant: str | None = None) -> list[APIKeyRecord]:
        """Every key (of ``tenant``), oldest first. Records only: never a secret or a MAC. The
        gateway role may list one tenant's keys only."""
        if tenant is None:
            self._require_admin("listing every tenant's API keys")
            query = f"SELECT {_PG_COLUMNS} FROM api_keys ORDER BY created_at, key_id"
            params: tuple[str, ...] = ()
        else:
            query = f"SELECT {_PG_COLUMNS} FROM api_keys WHERE tenant_id = %s ORDER BY created_at, key_id"
            params = (tenant,)
        with self._db.transaction(tenant=tenant, what="listing API keys") as conn:
            rows = conn.execute(query, params).fetchall()
        return [row_to_record(tuple(r))[0] for r in rows]

    def change_token(self) -> tuple[int, int]:
        """Changes whenever the key table may have changed, on any node: (the ``api_keys``
        change counter, writes through this object)."""
        with self._db.transaction(what="reading the API key change counter") as conn:
            row: Any = conn.execute("SELECT version FROM change_counters WHERE name = 'api_keys'").fetchone()
        return (int(row[0]) if row is not None else 0), self._local_writes
