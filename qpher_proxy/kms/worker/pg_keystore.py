"""The key store on PostgreSQL (``storage.backend: postgresql``).  KMS process only.

:class:`PgKeyStore` offers what the worker (``service``) uses of :class:`~.keystore.KeyStore`,
and :class:`PgTenantKeys` the methods and errors of :class:`~.tenant_keys.TenantKeys`; the rules
both follow are ``key_rules``. What differs is where things live and how nodes coordinate.

Theory of operation
===================

Where keys live
---------------
Tables ``kms_keys`` (metadata) and ``kms_key_versions`` (one row per version: the public key and
``sealed``, the exact bytes a key file would hold -- ``keyfile.seal(kek, binding, seed)`` with the
same AEAD associated data binding tenant, key id, version and algorithm). Nothing key-related is
written to the KMS directory on this backend. Import jobs (``key_import``) live in
``kms_import_jobs``: the job's public key and its sealed private key, set to NULL by the sweep
(``<prefix>_kms_import_jobs_expire``) once the job has expired. Creating, rotating or importing a
key is one transaction (metadata and sealed version together), so the file/metadata ordering of the
SQLite store has no counterpart here: a crash leaves either both or neither.

Tenant scoping
--------------
Every statement of :class:`PgTenantKeys` runs in ``Database.transaction(tenant=...)``: the
connection acts as ``<prefix>_kms`` (``SET ROLE``) and row-level security shows it that tenant's
rows only; each statement also binds ``tenant_id`` itself. The two cross-tenant reads, the
destruction sweep and the KEK check, go through the schema's ``SECURITY DEFINER`` functions
``<prefix>_kms_due(now, limit)`` and ``<prefix>_kms_sample_version()``.

State freshness across nodes
----------------------------
The state of a key is read from the database when a request needs it, and the resolved state of
an *enabled* key is reused for at most ``state_ttl`` seconds (0.5 by default, 0 = read for every
request), measured from *before* the read. A disable or destruction committed on any node is
therefore refused by every worker of every node within ``state_ttl`` plus one read -- well inside
a second. Writes of this worker drop the reuse at once. Why not read per request: measured on
a local PostgreSQL, resolving a key's state is a transaction of four round trips (BEGIN, the
tenant setting, the SELECT, COMMIT), about 2 ms on a loaded 2-core machine against 8 us from the
cache -- as much again as an ML-DSA-65 signature there (3.8 ms). ``state_ttl = 0`` (HELLO
``storage.state_ttl``) restores the read per request. Private key objects stay in a per-worker
LRU cache, but are only handed out after such a state check; sealed versions never change (a
destruction sets ``sealed`` to NULL and the state to ``destroyed``, never the other way: a
trigger refuses it), so a cached object is always the one the row describes.

Destruction
-----------
``UPDATE ... SET state = 'destroyed' ... WHERE state = 'pending_destruction' AND destroy_at <=
now`` and, in the same transaction, ``sealed = NULL`` on its versions; never a ``DELETE``. Under
READ COMMITTED the second of two racing transactions re-checks the condition after the first
commits and changes nothing, so each destruction happens (and is logged) exactly once, whoever
does it: the periodic sweep, or any request touching the key once it is due (lazy destruction,
committed even when that request is then refused with ``key_destroyed``).

Only one worker in the cluster sweeps: the holder of the lease ``kms-sweep`` (``lease``),
renewed every ``lease_ttl / 3``; each destruction by the sweep is fenced by the lease token in its
own transaction, so a sweeper that lost its lease while paused cannot write.

Concurrency
-----------
Every lifecycle change reads the key row ``FOR UPDATE``: concurrent rotations on any nodes
serialise on it and never pick the same version number (the primary key would refuse it anyway).

Idempotency keys (``key_rules``): the record goes into ``kms_idempotency`` in the transaction
that writes the key or the version, and its primary key ``(tenant_id, key_hash)`` decides races.
A creation inserts its record *first* (``INSERT ... ON CONFLICT DO UPDATE ... WHERE expired``):
of two nodes racing with one idempotency key, the second blocks on the first's uncommitted row,
and once that commits finds the record (its own insert did nothing), reads it and answers with
the first one's key -- its own generated key is never written. The wait is bounded by
``idempotency_wait`` (``lock_timeout`` inside a savepoint); past it the answer is 409
``idempotency_key_in_progress`` with ``Retry-After``, and the retry gets the winner's answer. A
rotation looks the record up after locking the key row (``FOR UPDATE``), so a rotation with the
same idempotency key that committed first is always seen there.

The KEK
-------
``kms_meta('kek_canary')`` holds the canary (``kek.seal_canary``). At start-up: verify it if
present; if absent but a sealed version exists, unseal that one (a wrong KEK: ``KEKMismatch``);
else write it (``ON CONFLICT DO NOTHING``, then re-read and verify: of two nodes racing with
different KEKs the second stops).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import psycopg
from psycopg import sql

from ...crypto.algorithms import ALGORITHMS, Algorithm, get_algorithm
from ...crypto.interface import Backend, PrivateKey, PublicKey
from ...errors import (
    BackendUnavailable,
    IdempotencyKeyInProgress,
    InvalidInput,
    InvalidKeyMaterial,
    KeyDestroyed,
    KeyNotFound,
    QpherError,
)
from ...storage.migrations import check_schema, current_version
from ...storage.postgres import Database, role_name
from ..wire.model import (
    DEFAULT_DESTROY_DELAY,
    DEFAULT_LIST_LIMIT,
    MAX_DESTROY_DELAY,
    ImportJobInfo,
    ImportJobPage,
    KeyInfo,
    KeyPage,
    KeyState,
    import_job_not_found,
    key_not_found,
    new_import_job_id,
    new_key_id,
)
from . import keyfile
from .kek import KEKError, KEKProvider, seal_canary, verify_canary
from .key_import import ImportRequest, new_job_key, require_open, unwrap
from .key_objects import KeyCaches, KeyObjects, open_sealed
from .key_rules import (
    IDEMPOTENCY_TTL,
    JOB_COLUMNS,
    KEY_COLUMNS,
    IdempotencyClaim,
    build_info,
    check_delay,
    check_import_job_id,
    check_import_ttl,
    check_job_cursor,
    check_key_id,
    check_label,
    check_list_args,
    check_schedulable,
    check_version,
    choose_algorithm,
    idempotency_claim,
    job_info,
    replay_target,
    require_usable,
    transition,
)
from .keydb import check_kek_opens
from .keyfile import KeyBinding
from .lease import Lease, LeaseLost

log = logging.getLogger("qpher.kms.keystore")

DEFAULT_CACHE_SIZE = 1024  # loaded private keys per worker
DEFAULT_STATE_TTL = 0.5  # seconds an enabled key's resolved state is reused (see the docstring)
MAX_STATE_TTL = 0.5
HOT_CACHE_SIZE = 4096
SWEEP_BATCH = 100  # due keys read per sweep round
CANARY = "kek_canary"
IDEMPOTENCY_WAIT = 2.0  # seconds a request waits for another node's uncommitted use of its idempotency key

_T = TypeVar("_T")
Conn = psycopg.Connection[Any]

_ROW = f"SELECT {KEY_COLUMNS}, resume_state FROM kms_keys WHERE tenant_id = %s AND key_id = %s"
_RESOLVE = (
    "SELECT k.state, k.destroy_at, v.version, v.algorithm, v.state "
    "FROM kms_keys k LEFT JOIN kms_key_versions v ON v.tenant_id = k.tenant_id AND v.key_id = k.key_id "
    "AND v.version = COALESCE(%s::integer, k.latest_version) WHERE k.tenant_id = %s AND k.key_id = %s"
)
_VERSIONS = (
    "SELECT version, state, created_at, CASE WHEN version = %s THEN public_key END, origin, import_job_id "
    "FROM kms_key_versions WHERE tenant_id = %s AND key_id = %s ORDER BY version"
)
_JOB = f"SELECT {JOB_COLUMNS}, sealed FROM kms_import_jobs WHERE tenant_id = %s AND job_id = %s"
_DESTROY_KEY = (
    "UPDATE kms_keys SET state = 'destroyed', resume_state = NULL, destroy_at = NULL, destroyed_at = %s, "
    "updated_at = %s WHERE tenant_id = %s AND key_id = %s AND state = 'pending_destruction' "
    "AND destroy_at <= %s RETURNING key_id"
)
_RECORD = (
    "SELECT operation, fingerprint, key_id, version, created_at FROM kms_idempotency "
    "WHERE tenant_id = %s AND key_hash = %s"
)
# inserts the record, or takes over an expired one; RETURNING nothing: a live record holds the key
_CLAIM = (
    "INSERT INTO kms_idempotency (tenant_id, key_hash, operation, fingerprint, key_id, version, created_at) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (tenant_id, key_hash) DO UPDATE SET "
    "operation = EXCLUDED.operation, fingerprint = EXCLUDED.fingerprint, key_id = EXCLUDED.key_id, "
    "version = EXCLUDED.version, created_at = EXCLUDED.created_at "
    "WHERE kms_idempotency.created_at <= %s RETURNING 1"
)
_DESTROY_VERSIONS = (
    "UPDATE kms_key_versions SET state = 'destroyed', sealed = NULL, kek_id = NULL "
    "WHERE tenant_id = %s AND key_id = %s AND state = 'active'"
)


@dataclass(frozen=True, slots=True)
class PgResolved:
    """An enabled key's version, resolved for one request."""

    key_id: str
    algorithm: Algorithm
    version: int


@dataclass(slots=True)
class _Tx:
    """One tenant transaction and what to do once it has committed."""

    conn: Conn
    wrote: bool = False  # a write of the call itself (not a due destruction on the way)
    destroyed: list[tuple[str, int]] = field(default_factory=list)  # (key id, versions)


class PgKeyStore(KeyCaches):
    """The whole PostgreSQL key store of one worker; hand out :class:`PgTenantKeys` per request."""

    exclusive_start = False  # no directory lock: every worker of every node starts alike
    dir = None  # nothing key-related lives in the KMS directory on this backend

    def __init__(
        self,
        db: Database,
        kek: KEKProvider,
        backend: Backend,
        *,
        role_prefix: str,
        clock: Callable[[], float] = time.time,
        destroy_delay: float = DEFAULT_DESTROY_DELAY,
        cache_size: int = DEFAULT_CACHE_SIZE,
        state_ttl: float = DEFAULT_STATE_TTL,
        lease_ttl: float = 15.0,
        sweep_interval: float = 5.0,
        monotonic: Callable[[], float] = time.monotonic,
        owns_db: bool = True,
        lease_holder: str | None = None,
        idempotency_wait: float = IDEMPOTENCY_WAIT,
    ) -> None:
        if not 0 <= destroy_delay <= MAX_DESTROY_DELAY:
            raise InvalidInput(f"destroy delay must be between 0 and {MAX_DESTROY_DELAY:.0f} s")
        if not 0 <= state_ttl <= MAX_STATE_TTL:
            raise InvalidInput(f"the key state cache lasts 0..{MAX_STATE_TTL} s")
        role_name(role_prefix, "kms")  # checks the prefix: it is spliced into function names
        self.db = db
        self.kek = kek
        self.backend = backend
        self.clock = clock
        self.destroy_delay = float(destroy_delay)
        self.cache_size = cache_size
        self.state_ttl = float(state_ttl)
        self.sweep_interval = float(sweep_interval)
        self.monotonic = monotonic
        self._owns_db = owns_db
        self._due_fn = sql.Identifier(f"{role_prefix}_kms_due")
        self._sample_fn = sql.Identifier(f"{role_prefix}_kms_sample_version")
        self._expire_fn = sql.Identifier(f"{role_prefix}_kms_idempotency_expire")
        self._jobs_expire_fn = sql.Identifier(f"{role_prefix}_kms_import_jobs_expire")
        self.idempotency_wait = float(idempotency_wait)
        self._hot: dict[tuple[str, str, int | None], tuple[PgResolved, float]] = {}
        self._private: OrderedDict[tuple[str, str, int], PrivateKey] = OrderedDict()
        self._public: OrderedDict[tuple[str, str, int], PublicKey] = OrderedDict()
        self.lease = Lease(db, lease_ttl, holder=lease_holder, monotonic=monotonic)
        self._next_sweep = 0.0
        self._closed = False
        try:
            self._check_schema_and_kek()
        except BaseException:
            self.close()
            raise

    @classmethod
    def open(
        cls,
        dsn: str,
        kek: KEKProvider,
        backend: Backend,
        *,
        role_prefix: str = "qpher",
        pool_size: int = 8,
        connect_timeout: float = 3.0,
        statement_timeout: float = 5.0,
        pool_timeout: float = 2.0,
        **kw: Any,
    ) -> PgKeyStore:
        """Connect as ``<role_prefix>_kms`` and open the store (``kw``: see ``__init__``)."""
        db = Database(
            dsn, role=role_name(role_prefix, "kms"), pool_size=pool_size, connect_timeout=connect_timeout,
            statement_timeout=statement_timeout, pool_timeout=pool_timeout, name="qpher-kms",
        )
        try:
            db.wait_ready(connect_timeout + pool_timeout)
            return cls(db, kek, backend, role_prefix=role_prefix, owns_db=True, **kw)
        except BaseException:
            db.close()
            raise

    def __repr__(self) -> str:
        return f"<PgKeyStore {self.db!r} kek_id={self.kek.kek_id!r}>"

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.lease.release()
        self._private.clear()
        self._public.clear()
        self._hot.clear()
        if self._owns_db:
            self.db.close()

    def tenant(self, tenant_id: str) -> PgTenantKeys:
        """The repository for one tenant; there is no other way to reach keys."""
        return PgTenantKeys(self, tenant_id)

    # ---- start-up: schema version and KEK ----

    def _check_schema_and_kek(self) -> None:
        with self.db.transaction(what="checking the schema and the KEK") as conn:
            check_schema(current_version(conn))
            row = conn.execute("SELECT value FROM kms_meta WHERE name = %s", (CANARY,)).fetchone()
            sample = None
            if row is None:
                sample = conn.execute(
                    sql.SQL("SELECT tenant_id, key_id, version, algorithm, sealed FROM {}()").format(
                        self._sample_fn
                    )
                ).fetchone()
        if row is not None:
            verify_canary(self.kek, bytes(row[0]))
            return
        if sample is not None:
            tenant_id, key_id, version, algorithm, sealed = sample
            try:
                check_kek_opens(self.kek, KeyBinding(tenant_id, key_id, version, algorithm), bytes(sealed))
            except QpherError as exc:
                if isinstance(exc, KEKError):
                    raise
                raise KEKError(
                    "the KEK check is missing from the database and a sealed key version could not be "
                    f"read to check the KEK: {exc.message}"
                ) from exc
        with self.db.transaction(what="writing the KEK check") as conn:
            conn.execute(
                "INSERT INTO kms_meta (name, value) VALUES (%s, %s) ON CONFLICT (name) DO NOTHING",
                (CANARY, seal_canary(self.kek)),
            )
            row = conn.execute("SELECT value FROM kms_meta WHERE name = %s", (CANARY,)).fetchone()
        assert row is not None
        verify_canary(self.kek, bytes(row[0]))  # another node may have written its canary first

    # ---- caches (KeyCaches: _cache_get, _cache_put) ----

    def _evict(self, tenant_id: str, key_id: str) -> None:
        self._hot.clear()
        for cache in (self._private, self._public):
            for k in [k for k in cache if k[0] == tenant_id and k[1] == key_id]:
                del cache[k]

    def begin_batch(self) -> None:
        """Nothing to do per batch: state reuse is bounded by time (``state_ttl``), not by batch."""

    def end_batch(self) -> None:
        pass

    # ---- the destruction sweep (across tenants; never answers a request) ----

    @property
    def tick_interval(self) -> float:
        """How often the worker should call :meth:`sweep_due` (lease renewal and sweep cadence)."""
        return max(0.05, min(self.sweep_interval, self.lease.ttl / 3))

    def sweep_due(self) -> int:
        """Keep (or try to take) the sweep lease; as its holder, destroy every due key once per
        ``sweep_interval``. Returns how many keys were destroyed."""
        if not self.lease.tick():
            return 0
        mono = self.monotonic()
        if mono < self._next_sweep:
            return 0
        self._next_sweep = mono + self.sweep_interval
        now = self.clock()
        with self.db.transaction(what="finding due destructions") as conn:
            due = conn.execute(
                sql.SQL("SELECT tenant_id, key_id FROM {}(%s, %s)").format(self._due_fn), (now, SWEEP_BATCH)
            ).fetchall()
        n = 0
        for tenant_id, key_id in due:
            try:
                if self.tenant(tenant_id)._destroy_if_due(key_id, now, fenced=True):
                    n += 1
            except LeaseLost:
                log.warning("sweep lease lost; stopping this sweep", extra={"fields": {"destroyed": n}})
                break
        self.sweep_idempotency(now)
        self.sweep_import_jobs(now)
        return n

    def sweep_import_jobs(self, now: float) -> int:
        """Destroy the private keys of expired import jobs (the rows stay, answering "expired")."""
        with self.db.transaction(what="destroying expired import jobs") as conn:
            row = conn.execute(sql.SQL("SELECT {}(%s)").format(self._jobs_expire_fn), (now,)).fetchone()
        n = int(row[0]) if row else 0
        if n:
            log.info("expired import jobs destroyed", extra={"fields": {"count": n}})
        return n

    def sweep_idempotency(self, now: float) -> int:
        """Delete the idempotency records past their lifetime (they already count as absent)."""
        with self.db.transaction(what="expiring idempotency records") as conn:
            row = conn.execute(
                sql.SQL("SELECT {}(%s)").format(self._expire_fn), (now - IDEMPOTENCY_TTL,)
            ).fetchone()
        return int(row[0]) if row else 0


class PgTenantKeys(KeyObjects):
    """Every key operation of one tenant, each in a transaction scoped to that tenant."""

    __slots__ = ()
    _store: PgKeyStore  # set by KeyObjects.__init__, with the tenant id checked

    # ---- transactions ----

    @contextmanager
    def _tx(self, what: str) -> Iterator[_Tx]:
        store = self._store
        with store.db.transaction(tenant=self._tenant, what=what) as conn:
            tx = _Tx(conn)
            yield tx
        # committed
        if tx.wrote or tx.destroyed:
            store._hot.clear()
        for key_id, versions in tx.destroyed:
            store._evict(self._tenant, key_id)
            log.info("key destroyed", extra={"fields": {"key_id": key_id, "versions": versions}})

    def _run(self, what: str, fn: Callable[[_Tx], _T]) -> _T:
        """``fn`` in one transaction. A refusal it raises (a ``QpherError``) before writing anything
        of its own is raised after the commit, so that a due destruction done on the way is kept;
        any other exception, a lost lease included, rolls everything back."""
        refusal: QpherError | None = None
        result: _T | None = None
        with self._tx(what) as tx:
            try:
                result = fn(tx)
            except LeaseLost:
                raise
            except QpherError as exc:
                if tx.wrote:
                    raise
                refusal = exc
        if refusal is not None:
            raise refusal
        return result  # type: ignore[return-value]  # set when fn returned

    def _row(self, tx: _Tx, key_id: str, *, lock: bool = False) -> tuple[Any, ...]:
        row = tx.conn.execute(_ROW + (" FOR UPDATE" if lock else ""), (self._tenant, key_id)).fetchone()
        if row is None:
            raise key_not_found(key_id)
        return tuple(row)

    def _update(self, tx: _Tx, key_id: str, assignments: str, params: tuple[Any, ...]) -> tuple[Any, ...]:
        """``UPDATE kms_keys SET <assignments>`` on a key row this transaction has locked; the new row."""
        row = tx.conn.execute(
            f"UPDATE kms_keys SET {assignments} WHERE tenant_id = %s AND key_id = %s "  # our own SQL text
            f"RETURNING {KEY_COLUMNS}, resume_state",
            (*params, self._tenant, key_id),
        ).fetchone()
        if row is None:  # pragma: no cover - the row is locked by this transaction
            raise key_not_found(key_id)
        tx.wrote = True
        return tuple(row)

    def _lazy(self, tx: _Tx, key_id: str, row: tuple[Any, ...], *, lock: bool = False) -> tuple[Any, ...]:
        """A key past its destruction time is destroyed now, whatever the sweep's schedule."""
        if row[4] == KeyState.PENDING_DESTRUCTION.value and row[8] is not None:
            now = self._store.clock()
            if row[8] <= now:
                self._destroy(tx, key_id, now)
                return self._row(tx, key_id, lock=lock)
        return row

    def _destroy(self, tx: _Tx, key_id: str, now: float) -> bool:
        """Destroy ``key_id`` if it is due; True only for the transaction that did it."""
        conn = tx.conn
        if conn.execute(_DESTROY_KEY, (now, now, self._tenant, key_id, now)).fetchone() is None:
            return False
        cur = conn.execute(_DESTROY_VERSIONS, (self._tenant, key_id))
        tx.destroyed.append((key_id, cur.rowcount))
        return True

    def _destroy_if_due(self, key_id: str, now: float, *, fenced: bool = False) -> bool:
        """The sweep's destruction of one key (``fenced``: under the sweep lease, or LeaseLost)."""
        lease = self._store.lease

        def fn(tx: _Tx) -> bool:
            if fenced:
                lease.fence(tx.conn)
            return self._destroy(tx, key_id, now)

        return self._run("destroying a key", fn)

    def _info(self, tx: _Tx, row: tuple[Any, ...], version: int | None = None) -> KeyInfo:
        want = row[5] if version is None else version
        rows = tx.conn.execute(_VERSIONS, (want, self._tenant, row[0])).fetchall()
        pub = next((r for r in rows if r[0] == want), None)
        versions = [(r[0], r[1], r[2]) for r in rows]
        if pub is None:
            return build_info(row, versions, want, None, False)
        return build_info(row, versions, want, pub[3], True, pub[4], pub[5])

    # ---- lifecycle ----

    def create(
        self, *, algorithm: str | None = None, kind: str | None = None, mode: str | None = None,
        label: str | None = None, idempotency_key: str | None = None,
    ) -> KeyInfo:
        alg = choose_algorithm(algorithm, kind, mode)
        label = check_label(label)
        claim = idempotency_claim(idempotency_key, "create_key", algorithm=alg.name, label=label)
        return self._create(alg, label, claim)

    def _create(
        self, alg: Algorithm, label: str | None, claim: IdempotencyClaim | None,
        imported: PrivateKey | None = None, import_job_id: str | None = None,
    ) -> KeyInfo:
        """A new key of ``alg`` whose version 1 is ``imported`` (a new key pair when None)."""
        store = self._store
        key_id = new_key_id()
        priv, public, sealed = self._new_version(key_id, 1, alg, imported)
        now = store.clock()
        origin = "generated" if import_job_id is None else "imported"

        def fn(tx: _Tx) -> KeyInfo:
            if claim is not None:
                # first: of two requests racing with this idempotency key, the second waits here
                # for the first to commit, and has written nothing when it answers with its key
                earlier = self._claim(tx, claim, key_id, 1, now)
                if earlier is not None:
                    return self._replay(tx, *earlier)
            tx.conn.execute(
                "INSERT INTO kms_keys (tenant_id, key_id, kind, algorithm, label, state, latest_version, "
                "created_at, updated_at) VALUES (%s, %s, %s, %s, %s, 'enabled', 1, %s, %s)",
                (self._tenant, key_id, alg.kind.value, alg.name, label, now, now),
            )
            self._insert_version(tx, key_id, 1, alg, public, sealed, now, import_job_id)
            tx.wrote = True
            row = (key_id, alg.kind.value, alg.name, label, KeyState.ENABLED.value, 1, now, now, None, None)
            return build_info(row, [(1, "active", now)], 1, public, True, origin, import_job_id)

        info = self._run("creating a key", fn)
        if not info.replayed:
            store._cache_put(store._private, (self._tenant, key_id, 1), priv)
        return info

    # ---- idempotency records (see key_rules and the docstring) ----

    def _recorded(self, tx: _Tx, claim: IdempotencyClaim, now: float) -> tuple[str, int] | None:
        """The (key id, version) a live record of ``claim``'s idempotency key answers with, None
        without one; 409 idempotency_key_reused when it recorded another request."""
        row = tx.conn.execute(_RECORD, (self._tenant, claim.key_hash)).fetchone()
        return replay_target(claim, row, now)

    def _claim(
        self, tx: _Tx, claim: IdempotencyClaim, key_id: str, version: int, now: float
    ) -> tuple[str, int] | None:
        """Record ``claim`` for ``key_id`` / ``version`` in this transaction (None), or the
        (key id, version) of the request that holds the idempotency key already (409
        idempotency_key_reused if that was another request; 409 idempotency_key_in_progress if
        it has not committed within ``idempotency_wait``)."""
        conn = tx.conn
        wait = f"{max(1, int(self._store.idempotency_wait * 1000))}ms"
        got = conn.execute(
            "SELECT current_setting('lock_timeout'), set_config('lock_timeout', %s, true)", (wait,)
        ).fetchone()
        before = got[0] if got else "0"
        try:
            with conn.transaction():  # a savepoint: a lock timeout must not abort the whole transaction
                row = conn.execute(
                    _CLAIM,
                    (self._tenant, claim.key_hash, claim.operation, claim.fingerprint, key_id, version, now,
                     now - IDEMPOTENCY_TTL),
                ).fetchone()
        except (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled) as exc:
            raise IdempotencyKeyInProgress(
                "a request with this idempotency key is still in progress; retry it shortly"
            ) from exc
        finally:
            conn.execute("SELECT set_config('lock_timeout', %s, true)", (before,))
        if row is not None:
            tx.wrote = True
            return None
        earlier = self._recorded(tx, claim, now)
        if earlier is None:  # pragma: no cover - expired or swept between the two statements
            raise IdempotencyKeyInProgress("a request with this idempotency key is still in progress")
        return earlier

    def _replay(self, tx: _Tx, key_id: str, version: int) -> KeyInfo:
        """The answer to a repeated request: the recorded key, at the recorded version, as it is now."""
        row = self._lazy(tx, key_id, self._row(tx, key_id))
        return dataclasses.replace(self._info(tx, row, version), replayed=True)

    def _new_version(
        self, key_id: str, version: int, alg: Algorithm, priv: PrivateKey | None = None
    ) -> tuple[PrivateKey, bytes, bytes]:
        """``priv`` (a new key of ``alg`` when None), its public key and its sealed bytes."""
        store = self._store
        if priv is None:
            if not store.backend.supports(alg):
                raise BackendUnavailable(f"the {store.backend.name} backend does not offer {alg.name}")
            priv = store.backend.generate(alg)
        public = priv.public_key().public_bytes()
        binding = KeyBinding(self._tenant, key_id, version, alg.name)
        sealed = keyfile.seal(store.kek, binding, priv.private_bytes())
        return priv, public, sealed

    def _insert_version(
        self, tx: _Tx, key_id: str, version: int, alg: Algorithm, public: bytes, sealed: bytes, now: float,
        import_job_id: str | None = None,
    ) -> None:
        tx.conn.execute(
            "INSERT INTO kms_key_versions (tenant_id, key_id, version, algorithm, state, public_key, sealed, "
            "kek_id, created_at, origin, import_job_id) "
            "VALUES (%s, %s, %s, %s, 'active', %s, %s, %s, %s, %s, %s)",
            (self._tenant, key_id, version, alg.name, public, sealed, self._store.kek.kek_id, now,
             "generated" if import_job_id is None else "imported", import_job_id),
        )

    def get(self, key_id: str, version: int | None = None) -> KeyInfo:
        key_id = check_key_id(key_id)
        if version is not None:
            check_version(version)

        def fn(tx: _Tx) -> KeyInfo:
            return self._info(tx, self._lazy(tx, key_id, self._row(tx, key_id)), version)

        return self._run("reading a key", fn)

    def list(self, limit: int = DEFAULT_LIST_LIMIT, cursor: str | None = None) -> KeyPage:
        limit, cursor = check_list_args(limit, cursor)

        def fn(tx: _Tx) -> KeyPage:
            rows = [
                tuple(r)
                for r in tx.conn.execute(
                    f"SELECT {KEY_COLUMNS}, resume_state FROM kms_keys WHERE tenant_id = %s AND key_id > %s "
                    "ORDER BY key_id LIMIT %s",
                    (self._tenant, cursor or "", limit + 1),
                )
            ]
            more = len(rows) > limit
            rows = [self._lazy(tx, r[0], r) for r in rows[:limit]]
            by_key: dict[str, list[tuple[Any, ...]]] = {r[0]: [] for r in rows}
            if rows:
                for v in tx.conn.execute(
                    "SELECT v.key_id, v.version, v.state, v.created_at, "
                    "CASE WHEN v.version = k.latest_version THEN v.public_key END, v.origin, v.import_job_id "
                    "FROM kms_key_versions v JOIN kms_keys k "
                    "ON k.tenant_id = v.tenant_id AND k.key_id = v.key_id "
                    "WHERE v.tenant_id = %s AND v.key_id = ANY(%s) ORDER BY v.key_id, v.version",
                    (self._tenant, list(by_key)),
                ):
                    by_key[v[0]].append(tuple(v[1:]))
            infos = []
            for r in rows:
                vs = by_key[r[0]]
                pub = next((v for v in vs if v[0] == r[5]), None)
                if pub is None:
                    infos.append(build_info(r, [v[:3] for v in vs], r[5], None, False))
                else:
                    infos.append(build_info(r, [v[:3] for v in vs], r[5], pub[3], True, pub[4], pub[5]))
            return KeyPage(tuple(infos), rows[-1][0] if more and rows else None)

        return self._run("listing keys", fn)

    def rotate(self, key_id: str, idempotency_key: str | None = None) -> KeyInfo:
        key_id = check_key_id(key_id)
        claim = idempotency_claim(idempotency_key, "rotate_key", key_id=key_id)
        return self._rotate(key_id, claim)

    def _rotate(
        self, key_id: str, claim: IdempotencyClaim | None, imported: PrivateKey | None = None,
        import_job_id: str | None = None,
    ) -> KeyInfo:
        """A new version of ``key_id``: ``imported`` (which must be of the key's algorithm), or a
        new key pair when None."""
        made: list[tuple[int, PrivateKey]] = []

        def fn(tx: _Tx) -> KeyInfo:
            # FOR UPDATE: concurrent rotations anywhere serialise here and never reuse a version
            row = self._row(tx, key_id, lock=True)
            now = self._store.clock()
            if claim is not None:
                # under the key's lock: a rotation with this idempotency key committed before is seen
                earlier = self._recorded(tx, claim, now)
                if earlier is not None:
                    return self._replay(tx, *earlier)
            row = self._lazy(tx, key_id, row, lock=True)
            require_usable(key_id, row[4])
            alg = get_algorithm(row[2])
            if imported is not None and imported.algorithm.name != alg.name:
                raise InvalidKeyMaterial(
                    f"key {key_id!r} is a {alg.name} key; "
                    f"a {imported.algorithm.name} key cannot be its version"
                )
            version = row[5] + 1
            priv, public, sealed = self._new_version(key_id, version, alg, imported)
            self._insert_version(tx, key_id, version, alg, public, sealed, now, import_job_id)
            updated = self._update(tx, key_id, "latest_version = %s, updated_at = %s", (version, now))
            if claim is not None and self._claim(tx, claim, key_id, version, now) is not None:
                # this very rotation recorded since the look-up above, which the key's lock rules
                # out; roll this version back rather than answer twice (a different request
                # holding the idempotency key raised idempotency_key_reused in _claim)
                raise IdempotencyKeyInProgress("a request with this idempotency key is still in progress")
            made.append((version, priv))
            return self._info(tx, updated)

        info = self._run("rotating a key", fn)
        store = self._store
        for version, priv in made:
            store._cache_put(store._private, (self._tenant, key_id, version), priv)
        return info

    # ---- import jobs and key import (see key_import) ----

    def _job_row(self, tx: _Tx, job_id: str) -> tuple[Any, ...]:
        row = tx.conn.execute(_JOB, (self._tenant, job_id)).fetchone()
        if row is None:
            raise import_job_not_found(job_id)
        return tuple(row)

    def create_import_job(self, method: object = None, ttl_seconds: object = None) -> ImportJobInfo:
        ttl = check_import_ttl(ttl_seconds)
        store = self._store
        job_id = new_import_job_id()
        name, _kem, public, sealed = new_job_key(store.backend, store.kek, self._tenant, job_id, method)
        now = store.clock()

        def fn(tx: _Tx) -> None:
            tx.conn.execute(
                "INSERT INTO kms_import_jobs (tenant_id, job_id, method, public_key, sealed, kek_id, "
                "created_at, expires_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                (self._tenant, job_id, name, public, sealed, store.kek.kek_id, now, now + ttl),
            )
            tx.wrote = True

        self._run("creating an import job", fn)
        log.info("import job created", extra={"fields": {"import_job_id": job_id, "method": name}})
        return ImportJobInfo(job_id, name, public, now, now + ttl, "active")

    def get_import_job(self, job_id: object) -> ImportJobInfo:
        job_id = check_import_job_id(job_id)
        return self._run("reading an import job",
                         lambda tx: job_info(self._job_row(tx, job_id), self._store.clock()))

    def list_import_jobs(self, limit: int = DEFAULT_LIST_LIMIT, cursor: object = None) -> ImportJobPage:
        limit, _ = check_list_args(limit, None)
        after = check_job_cursor(cursor)

        def fn(tx: _Tx) -> ImportJobPage:
            rows = tx.conn.execute(
                f"SELECT {JOB_COLUMNS} FROM kms_import_jobs WHERE tenant_id = %s AND job_id > %s "
                "ORDER BY job_id LIMIT %s",
                (self._tenant, after or "", limit + 1),
            ).fetchall()
            now = self._store.clock()
            jobs = tuple(job_info(tuple(r), now) for r in rows[:limit])
            return ImportJobPage(jobs, jobs[-1].import_job_id if len(rows) > limit and jobs else None)

        return self._run("listing import jobs", fn)

    def import_key(
        self, job_id: object, algorithm: object, wrapped_key: object, *, format: object = None,
        label: object = None, key_id: object = None, idempotency_key: object = None,
    ) -> KeyInfo:
        """A new key (or, with ``key_id``, a new version of that key) holding the private key
        wrapped for import job ``job_id``; see ``key_import`` for every check on the way."""
        req = ImportRequest(job_id, algorithm, wrapped_key, format, label, key_id)
        store = self._store
        claim = idempotency_claim(
            idempotency_key, "create_key" if req.key_id is None else "rotate_key", request="import_key",
            **req.fingerprint_args(),
        )

        def read(tx: _Tx) -> tuple[KeyInfo | None, tuple[Any, ...] | None]:
            if claim is not None:
                # a repeat answers the first import, even once the job has expired
                earlier = self._recorded(tx, claim, store.clock())
                if earlier is not None:
                    return self._replay(tx, *earlier), None
            return None, self._job_row(tx, req.job_id)

        replayed, row = self._run("reading an import job", read)
        if replayed is not None:
            return replayed
        assert row is not None
        job = job_info(row, store.clock())
        sealed = require_open(job, None if row[6] is None else bytes(row[6]))
        priv = unwrap(store.backend, store.kek, self._tenant, job, sealed, req)
        if req.key_id is None:
            info = self._create(req.algorithm, req.label, claim, priv, req.job_id)
        else:
            info = self._rotate(req.key_id, claim, priv, req.job_id)
        if not info.replayed:
            log.info("key imported", extra={"fields": {
                "key_id": info.key_id, "version": info.version, "algorithm": info.algorithm,
                "import_job_id": req.job_id}})
        return info

    def _transition(self, key_id: str, op: str) -> KeyInfo:
        key_id = check_key_id(key_id)

        def fn(tx: _Tx) -> KeyInfo:
            row = self._lazy(tx, key_id, self._row(tx, key_id, lock=True), lock=True)
            new = transition(key_id, op, row[4], row[10])
            if new != row[4]:
                row = self._update(
                    tx, key_id, "state = %s, resume_state = NULL, destroy_at = NULL, updated_at = %s",
                    (new, self._store.clock()),
                )
            return self._info(tx, row)

        info = self._run(f"{op} a key", fn)
        self._store._evict(self._tenant, key_id)
        return info

    def disable(self, key_id: str) -> KeyInfo:
        return self._transition(key_id, "disable")

    def enable(self, key_id: str) -> KeyInfo:
        return self._transition(key_id, "enable")

    def cancel_destroy(self, key_id: str) -> KeyInfo:
        return self._transition(key_id, "cancel_destroy")

    def schedule_destroy(self, key_id: str, delay: float | None = None) -> KeyInfo:
        key_id = check_key_id(key_id)
        delay = check_delay(delay, self._store.destroy_delay)

        def fn(tx: _Tx) -> KeyInfo:
            row = self._lazy(tx, key_id, self._row(tx, key_id, lock=True), lock=True)
            if check_schedulable(key_id, row[4]):  # already scheduled: keep the first date
                now = self._store.clock()
                row = self._update(
                    tx, key_id,
                    "state = 'pending_destruction', resume_state = %s, destroy_at = %s, updated_at = %s",
                    (row[4], now + delay, now),
                )
            row = self._lazy(tx, key_id, row, lock=True)  # delay 0: destroyed at once
            return self._info(tx, row)

        info = self._run("scheduling a destruction", fn)
        self._store._evict(self._tenant, key_id)
        return info

    # ---- key objects for the crypto operations ----

    def _resolve(self, key_id: object, version: object) -> PgResolved:
        store = self._store
        if store.state_ttl > 0 and type(key_id) is str and (version is None or type(version) is int):
            hit = store._hot.get((self._tenant, key_id, version))
            if hit is not None and hit[1] > store.monotonic():
                return hit[0]
        key_id = check_key_id(key_id)
        want = None if version is None else check_version(version)
        read_at = store.monotonic()

        def fn(tx: _Tx) -> PgResolved:
            row = tx.conn.execute(_RESOLVE, (want, self._tenant, key_id)).fetchone()
            if row is None:
                raise key_not_found(key_id)
            state, destroy_at, v, alg, v_state = row
            if state == KeyState.PENDING_DESTRUCTION.value and destroy_at <= store.clock():
                self._destroy(tx, key_id, store.clock())
                state = KeyState.DESTROYED.value
            require_usable(key_id, state)
            if v is None:
                raise KeyNotFound(f"key {key_id!r} has no version {version}")
            if v_state != "active":  # pragma: no cover - the CHECK constraint ties state and sealed
                raise KeyDestroyed(f"key {key_id!r} version {v} was destroyed")
            return PgResolved(key_id, ALGORITHMS[alg], v)

        resolved = self._run("reading a key", fn)
        if store.state_ttl > 0:
            if len(store._hot) >= HOT_CACHE_SIZE:
                store._hot.clear()
            store._hot[(self._tenant, key_id, want)] = (resolved, read_at + store.state_ttl)
        return resolved

    def _stored_public(self, r: PgResolved) -> bytes:
        return self._version_blobs(r)[0]

    def _version_blobs(self, r: PgResolved) -> tuple[bytes, bytes]:
        """(public key, sealed) of a resolved version."""
        with self._tx("reading a key") as tx:
            row = tx.conn.execute(
                "SELECT public_key, sealed FROM kms_key_versions WHERE tenant_id = %s AND key_id = %s "
                "AND version = %s",
                (self._tenant, r.key_id, r.version),
            ).fetchone()
        if row is None or row[1] is None:  # destroyed since it was resolved
            raise KeyDestroyed(f"key {r.key_id!r} version {r.version} was destroyed")
        return bytes(row[0]), bytes(row[1])

    def _load_private(self, r: PgResolved) -> PrivateKey:
        public, sealed = self._version_blobs(r)
        binding = KeyBinding(self._tenant, r.key_id, r.version, r.algorithm.name)
        return open_sealed(self._store, binding, r.algorithm, sealed, public, "sealed version")

def open_from_settings(
    storage: dict[str, Any], kek: KEKProvider, backend: Backend, *, destroy_delay: float, cache_size: int,
) -> PgKeyStore:
    """The store HELLO's ``storage`` settings describe (see ``kms/launcher/supervisor.py``)."""

    def get(name: str, kind: type, default: Any = None) -> Any:
        v = storage.get(name, default)
        if kind is float and type(v) is int:
            v = float(v)
        if type(v) is not kind:
            raise InvalidInput(f"bootstrap setting 'storage.{name}' must be {kind.__name__}")
        return v

    dsn = get("dsn", str)
    if not dsn:
        raise InvalidInput("bootstrap setting 'storage.dsn' is required for storage backend postgresql")
    return PgKeyStore.open(
        dsn, kek, backend,
        role_prefix=get("role_prefix", str, "qpher"),
        pool_size=get("pool_size", int, 8),
        connect_timeout=get("connect_timeout", float, 3.0),
        statement_timeout=get("statement_timeout", float, 5.0),
        pool_timeout=get("pool_timeout", float, 2.0),
        lease_ttl=get("lease_ttl", float, 15.0),
        sweep_interval=get("sweep_interval", float, 5.0),
        state_ttl=get("state_ttl", float, DEFAULT_STATE_TTL),
        destroy_delay=destroy_delay,
        cache_size=cache_size,
    )


__all__ = ["DEFAULT_STATE_TTL", "PgKeyStore", "PgResolved", "PgTenantKeys", "open_from_settings"]
