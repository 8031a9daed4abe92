"""The key store: SQLite metadata + sealed key files, scoped per tenant.  KMS process only.

Theory of operation
===================

Layout of ``<kms dir>`` (0700)::

    keys.db (+ -wal, -shm)   metadata, 0600; never a key byte (public keys and file handles only)
    keys/<slot>/<key id>/v<n>.qkey   one sealed private key version per file (keyfile.py)
    kek-check                the KEK canary (kek.py)
    kek-rotation             present only while ``rotate-kek`` is running or was interrupted
    lock                     flock: shared by every running worker, exclusive for maintenance

Tenant scoping
--------------
Every metadata query that touches keys is a method of :class:`TenantKeys`, which can only be
obtained with :meth:`KeyStore.tenant` and a non-empty tenant id, and every one of its SQL
statements has ``tenant_id = ?`` bound to it. A key id of another tenant therefore misses
exactly like a random id, and both produce the same :func:`~qpher_proxy.kms.wire.model.key_not_found` error
(404 ``key_not_found``). The few queries across tenants are maintenance sweeps on
:class:`KeyStore` (orphan files, due destructions, ``rotate-kek``) and never answer a request.

Schema guards: ``CHECK`` constraints on algorithm, kind, state and key id shape, and a
unique index on ``(tenant_id, key_id, version)``. Adding an algorithm to the table needs a
schema migration (the CHECK list is written at creation).

Crash safety
------------
The order of every write is: key file first (atomic, fsynced), then the metadata commit
(``BEGIN IMMEDIATE`` ... ``COMMIT`` with ``synchronous=FULL``). So:

* a crash before the commit leaves an orphan file that no metadata names: it cannot be used
  (nothing resolves to it) and the next exclusive start removes it;
* metadata never names a file that was not completely written.

Destruction reverses the order: the commit marks the key ``destroyed`` and drops the file
handles, then the files are unlinked; a crash in between leaves orphans for the sweep.

Several workers (processes) share the store: SQLite serialises writers (WAL, busy timeout);
each worker holds a *shared* ``flock`` on ``lock`` for its lifetime. A worker that obtains the
lock *exclusively* at start is the only one running, and only then sweeps orphan files (a
file another worker has just written and not yet committed must not be swept).
``rotate-kek`` needs the exclusive lock, so it refuses to run next to a live KMS.

Lifecycle
---------
::

    enabled  <-> disabled                 (disable / enable; disabled: no crypto, 409 key_disabled)
    enabled | disabled -> pending_destruction   (schedule_destroy, destroy_at = now + delay)
    pending_destruction -> enabled | disabled   (cancel_destroy: back to the state before)
    pending_destruction -> destroyed      (when due: by the periodic sweep, or lazily on access)

``rotate`` adds version n+1 (same algorithm); sign / encapsulate / encrypt always use the
latest version; decapsulate / decrypt / verify take an explicit older version. A destroyed
key keeps its metadata (a tombstone, answering 410 ``key_destroyed``); its files are gone.

Private keys are loaded from their files on first use and kept in a per-worker LRU cache of
backend key objects. The key's *state* is read from the database for every request, except
that within one batch of requests (one ``recv`` in the worker) the state of enabled keys is
reused -- and that reuse is dropped whenever ``PRAGMA data_version`` shows another worker
committed since (see :meth:`KeyStore.begin_batch`). So a disable or destroy committed by any
worker takes effect for every request received after the commit, in every worker.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...crypto.algorithms import (
    ALGORITHMS,
    DEFAULT_KEM,
    DEFAULT_SIGNATURE,
    HYBRID_KEM,
    HYBRID_SIGNATURE,
    Algorithm,
    Kind,
    get_algorithm,
)
from ...crypto.interface import Backend, PrivateKey, PublicKey
from ...errors import (
    BackendUnavailable,
    InvalidInput,
    InvalidKeyState,
    KeyCorrupt,
    KeyDestroyed,
    KeyDisabled,
    KeyNotFound,
    QpherError,
)
from ..wire.model import (
    DEFAULT_DESTROY_DELAY,
    DEFAULT_LIST_LIMIT,
    KEY_ID_RE,
    MAX_DESTROY_DELAY,
    MAX_LABEL_CHARS,
    MAX_LIST_LIMIT,
    KeyInfo,
    KeyPage,
    KeyState,
    VersionInfo,
    key_not_found,
    new_key_id,
)
from . import keyfile
from .kek import (
    CANARY_FILE,
    ROTATION_FILE,
    KEKError,
    KEKMismatch,
    KEKProvider,
    UnwrapFailed,
    seal_canary,
    verify_canary,
    canary_kek_id,
)
from .keyfile import KeyBinding

log = logging.getLogger("qpher.kms.keystore")

DB_FILE = "keys.db"
LOCK_FILE = "lock"
SCHEMA_VERSION = 1
DEFAULT_CACHE_SIZE = 1024  # loaded private keys per worker
BUSY_TIMEOUT_S = 10.0
HOT_CACHE_SIZE = 4096  # resolved (tenant, key, version) entries kept between data_version changes
LOCK_WAIT_S = 10.0


class StoreUnavailable(QpherError):
    code = "kms_store_unavailable"
    status = 503


def _schema() -> str:
    algs = ", ".join(f"'{a}'" for a in sorted(ALGORITHMS))
    states = ", ".join(f"'{s.value}'" for s in KeyState)
    return f"""
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS keys (
    tenant_id      TEXT NOT NULL CHECK (length(tenant_id) BETWEEN 1 AND 255),
    key_id         TEXT NOT NULL CHECK (length(key_id) = 28 AND key_id GLOB 'k_*'),
    kind           TEXT NOT NULL CHECK (kind IN ('kem', 'signature')),
    algorithm      TEXT NOT NULL CHECK (algorithm IN ({algs})),
    label          TEXT CHECK (label IS NULL OR length(label) <= {MAX_LABEL_CHARS}),
    state          TEXT NOT NULL CHECK (state IN ({states})),
    resume_state   TEXT CHECK (resume_state IS NULL OR resume_state IN ('enabled', 'disabled')),
    latest_version INTEGER NOT NULL CHECK (latest_version >= 1),
    created_at     REAL NOT NULL,
    updated_at     REAL NOT NULL,
    destroy_at     REAL,
    destroyed_at   REAL,
    PRIMARY KEY (tenant_id, key_id),
    CHECK ((state = 'pending_destruction') = (destroy_at IS NOT NULL AND resume_state IS NOT NULL))
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS keys_due ON keys (state, destroy_at);
CREATE TABLE IF NOT EXISTS key_versions (
    tenant_id  TEXT NOT NULL,
    key_id     TEXT NOT NULL,
    version    INTEGER NOT NULL CHECK (version >= 1),
    algorithm  TEXT NOT NULL CHECK (algorithm IN ({algs})),
    state      TEXT NOT NULL CHECK (state IN ('active', 'destroyed')),
    public_key BLOB NOT NULL,
    file       TEXT CHECK (file IS NULL OR (file GLOB 'keys/*' AND file NOT GLOB '*..*')),
    kek_id     TEXT,
    created_at REAL NOT NULL,
    CHECK ((state = 'active') = (file IS NOT NULL)),
    FOREIGN KEY (tenant_id, key_id) REFERENCES keys (tenant_id, key_id)
);
CREATE UNIQUE INDEX IF NOT EXISTS key_versions_unique ON key_versions (tenant_id, key_id, version);
"""


def _connect(kms_dir: Path) -> sqlite3.Connection:
    path = kms_dir / DB_FILE
    if not path.exists():
        # Create it 0600 before SQLite does (its -wal/-shm files copy the mode). Only when it
        # is missing: closing any descriptor of an existing database would drop this process's
        # POSIX locks on it, under any connection it already has open.
        try:
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600))
        except FileExistsError:
            pass
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = FULL")
    db.execute("PRAGMA foreign_keys = ON")
    with _write(db):
        for statement in _schema().split(";"):
            if statement.strip():
                db.execute(statement)
        db.execute("INSERT OR IGNORE INTO meta (name, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
    (version,) = db.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
    if version != str(SCHEMA_VERSION):
        db.close()
        raise KEKError(f"the key store database has schema version {version}; this build reads {SCHEMA_VERSION}")
    return db


@contextmanager
def _write(db: sqlite3.Connection) -> Iterator[None]:
    """One write transaction, taking the write lock up front."""
    if db.in_transaction:
        yield
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    else:
        if db.in_transaction:
            db.execute("COMMIT")


@contextmanager
def _mapped(what: str) -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as exc:
        raise StoreUnavailable(f"key store database error while {what}") from exc


class _StoreLock:
    """The ``flock`` on ``<kms dir>/lock`` (see the module docstring)."""

    def __init__(self, kms_dir: Path) -> None:
        self._fd = os.open(kms_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def try_exclusive(self) -> bool:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            raise
        return True

    def shared(self, wait: float = LOCK_WAIT_S, clock: Callable[[], float] = time.monotonic) -> None:
        deadline = clock() + wait
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
            if clock() >= deadline:
                raise KEKError(
                    "the key store is locked by another process (is `qpher-proxy kms rotate-kek` running?)"
                )
            time.sleep(0.05)  # only while another process holds the exclusive lock

    def close(self) -> None:
        os.close(self._fd)


def _check_rotation_marker(kms_dir: Path) -> None:
    marker = kms_dir / ROTATION_FILE
    if marker.exists():
        try:
            info = json.loads(marker.read_text())
            detail = f" from {info['from']!r} to {info['to']!r}"
        except (OSError, ValueError, KeyError, TypeError):
            detail = ""
        raise KEKError(
            f"a KEK rotation{detail} was interrupted; re-run `qpher-proxy kms rotate-kek` with the same "
            "KEKs to finish it before starting the KMS"
        )


def verify_store_kek(kms_dir: Path, provider: KEKProvider, db: sqlite3.Connection) -> None:
    """Stop with :class:`KEKError` unless ``provider`` is this store's KEK (see kek.py).

    Reads only; writes the canary only after the KEK has been shown right (or the store is new)."""
    _check_rotation_marker(kms_dir)
    canary = kms_dir / CANARY_FILE
    try:
        data = canary.read_bytes()
    except FileNotFoundError:
        data = None
    if data is not None:
        verify_canary(provider, data)
        return
    row = db.execute(
        "SELECT tenant_id, key_id, version, algorithm, file FROM key_versions WHERE file IS NOT NULL LIMIT 1"
    ).fetchone()
    if row is not None:
        tenant_id, key_id, version, algorithm, rel = row
        binding = KeyBinding(tenant_id, key_id, version, algorithm)
        try:
            raw = keyfile.read_key_file(kms_dir / rel, binding.describe())
            header = keyfile.parse_header(raw, binding.describe())
            if header.kek_id != provider.kek_id:
                raise KEKMismatch(
                    f"the configured KEK (id {provider.kek_id!r}) is not the KEK of this key store "
                    f"(key files are wrapped by {header.kek_id!r}); nothing was written"
                )
            provider.unwrap(raw[header.body_offset :], binding.aad(header.kek_id))
        except UnwrapFailed as exc:
            raise KEKMismatch(
                f"the configured KEK (id {provider.kek_id!r}) does not open this key store's key files; "
                "nothing was written"
            ) from exc
        except QpherError as exc:
            if isinstance(exc, KEKError):
                raise
            raise KEKError(
                f"the KEK check file is missing and a key file could not be read to check the KEK: {exc.message}"
            ) from exc
    keyfile.write_atomic(canary, seal_canary(provider))


# ---- records ---------------------------------------------------------------------------------

_KEY_COLS = "key_id, kind, algorithm, label, state, latest_version, created_at, updated_at, destroy_at, destroyed_at"


@dataclass(frozen=True, slots=True)
class _Resolved:
    key_id: str
    algorithm: Algorithm
    version: int
    file: str


class KeyStore:
    """The whole store of one KMS directory; hand out :class:`TenantKeys` per request."""

    def __init__(
        self,
        kms_dir: str | os.PathLike[str],
        kek: KEKProvider,
        backend: Backend,
        *,
        clock: Callable[[], float] = time.time,
        destroy_delay: float = DEFAULT_DESTROY_DELAY,
        cache_size: int = DEFAULT_CACHE_SIZE,
        maintenance: bool = True,
    ) -> None:
        self.dir = Path(kms_dir)
        self.kek = kek
        self.backend = backend
        self.clock = clock
        if not 0 <= destroy_delay <= MAX_DESTROY_DELAY:
            raise InvalidInput(f"destroy delay must be between 0 and {MAX_DESTROY_DELAY:.0f} s")
        self.destroy_delay = float(destroy_delay)
        self.cache_size = cache_size
        self._hot: dict[tuple[str, str, int | None], _Resolved] = {}  # see begin_batch()
        self._batch_valid = False
        self._data_version: int | None = None
        self._private: OrderedDict[tuple[str, str, int], PrivateKey] = OrderedDict()
        self._public: OrderedDict[tuple[str, str, int], PublicKey] = OrderedDict()
        keyfile.ensure_dir(self.dir)
        os.chmod(self.dir, keyfile.DIR_MODE)
        self._lock = _StoreLock(self.dir)
        self.db: sqlite3.Connection | None = None
        try:
            exclusive = self._lock.try_exclusive()
            if not exclusive:
                self._lock.shared()
            with _mapped("opening the database"):
                self.db = _connect(self.dir)
            verify_store_kek(self.dir, kek, self.db)
            self.exclusive_start = exclusive
            if exclusive and maintenance:
                self.sweep_orphans()
                self.check_files()
                self.sweep_due()
            if exclusive:
                self._lock.shared()  # downgrade: other workers may start now
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None
        self._private.clear()
        self._public.clear()
        self._lock.close()

    def tenant(self, tenant_id: str) -> TenantKeys:
        """The repository for one tenant; there is no other way to reach keys."""
        return TenantKeys(self, tenant_id)

    @property
    def _db(self) -> sqlite3.Connection:
        if self.db is None:
            raise StoreUnavailable("the key store is closed")
        return self.db

    # ---- caches ----

    def _cache_get(self, cache: OrderedDict[tuple[str, str, int], Any], k: tuple[str, str, int]) -> Any:
        obj = cache.get(k)
        if obj is not None:
            cache.move_to_end(k)
        return obj

    def _cache_put(self, cache: OrderedDict[tuple[str, str, int], Any], k: tuple[str, str, int], obj: Any) -> None:
        cache[k] = obj
        cache.move_to_end(k)
        while len(cache) > self.cache_size:
            cache.popitem(last=False)

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """A write transaction of this worker; clears the per-batch cache (our own commits do
        not change ``PRAGMA data_version`` for us)."""
        try:
            with _write(self._db):
                yield
        finally:
            self._hot.clear()

    # ---- the per-batch metadata cache ----

    def begin_batch(self) -> None:
        """Start handling one batch of requests (the worker calls this after each ``recv``).

        Within a batch, the state of *enabled* keys is served from a small cache instead of one
        SQLite query per request. ``PRAGMA data_version`` changes whenever another connection
        (another worker) has committed, so checking it here -- after the requests were received
        -- means a disable committed anywhere before a request arrived is seen by that request.
        Our own writes clear the cache directly (data_version ignores them)."""
        try:
            (version,) = self._db.execute("PRAGMA data_version").fetchone()
        except sqlite3.Error:
            self._hot.clear()
            self._batch_valid = False
            return
        if version != self._data_version:
            self._hot.clear()
            self._data_version = version
        self._batch_valid = True

    def end_batch(self) -> None:
        self._batch_valid = False

    def _evict(self, tenant_id: str, key_id: str) -> None:
        self._hot.clear()
        for cache in (self._private, self._public):
            for k in [k for k in cache if k[0] == tenant_id and k[1] == key_id]:
                del cache[k]

    # ---- maintenance (across tenants; never answers a request) ----

    def sweep_orphans(self) -> int:
        """Remove key files (and temporaries) no metadata references. Exclusive start only."""
        keys_dir = self.dir / "keys"
        if not keys_dir.exists():
            return 0
        with _mapped("listing key files"):
            referenced = {r[0] for r in self._db.execute("SELECT file FROM key_versions WHERE file IS NOT NULL")}
        removed = 0
        for root, _dirs, files in os.walk(keys_dir):
            for name in files:
                path = Path(root) / name
                rel = path.relative_to(self.dir).as_posix()
                if keyfile.TMP_MARKER in name or rel not in referenced:
                    if keyfile.remove_file(path):
                        removed += 1
        if removed:
            log.warning("removed orphan key files", extra={"fields": {"count": removed}})
        return removed

    def check_files(self) -> int:
        """Log (never fix) metadata whose key file is missing; those keys answer key_unavailable."""
        with _mapped("listing key files"):
            rows = self._db.execute("SELECT key_id, version, file FROM key_versions WHERE file IS NOT NULL").fetchall()
        missing = [(k, v) for k, v, f in rows if not (self.dir / f).is_file()]
        for key_id, version in missing:
            log.error("key file missing", extra={"fields": {"key_id": key_id, "version": version}})
        return len(missing)

    def sweep_due(self) -> int:
        """Destroy every key whose destruction is due. Returns how many."""
        now = self.clock()
        with _mapped("finding due destructions"):
            due = self._db.execute(
                "SELECT tenant_id, key_id FROM keys WHERE state = 'pending_destruction' AND destroy_at <= ?",
                (now,),
            ).fetchall()
        n = 0
        for tenant_id, key_id in due:
            if self.tenant(tenant_id)._destroy_if_due(key_id, now):
                n += 1
        return n


class TenantKeys:
    """Every key operation of one tenant. Each SQL statement binds ``tenant_id``."""

    __slots__ = ("_store", "_tenant")

    def __init__(self, store: KeyStore, tenant_id: str) -> None:
        if type(tenant_id) is not str or not tenant_id or len(tenant_id.encode()) > 255:
            raise InvalidInput("a tenant id (1..255 bytes) is required for every key store call")
        self._store = store
        self._tenant = tenant_id

    @property
    def tenant_id(self) -> str:
        return self._tenant

    # ---- helpers ----

    def _check_id(self, key_id: object) -> str:
        if type(key_id) is not str or KEY_ID_RE.match(key_id) is None:
            raise key_not_found(key_id)
        return key_id

    def _row(self, key_id: str) -> tuple[Any, ...]:
        row = self._store._db.execute(
            f"SELECT {_KEY_COLS}, resume_state FROM keys WHERE tenant_id = ? AND key_id = ?",
            (self._tenant, key_id),
        ).fetchone()
        if row is None:
            raise key_not_found(key_id)
        return tuple(row)

    def _info(self, row: tuple[Any, ...], version: int | None = None) -> KeyInfo:
        (key_id, kind, algorithm, label, state, latest, created, updated, destroy_at, destroyed_at) = row[:10]
        db = self._store._db
        versions = tuple(
            VersionInfo(v, s, c)
            for v, s, c in db.execute(
                "SELECT version, state, created_at FROM key_versions WHERE tenant_id = ? AND key_id = ? "
                "ORDER BY version",
                (self._tenant, key_id),
            )
        )
        want = latest if version is None else version
        pub_row = db.execute(
            "SELECT public_key, state FROM key_versions WHERE tenant_id = ? AND key_id = ? AND version = ?",
            (self._tenant, key_id, want),
        ).fetchone()
        if pub_row is None:
            raise KeyNotFound(f"key {key_id!r} has no version {want}")
        public = bytes(pub_row[0]) if state != KeyState.DESTROYED.value else None
        return KeyInfo(
            key_id=key_id, kind=kind, algorithm=algorithm, label=label, state=KeyState(state),
            version=want, latest_version=latest, public_key=public, created_at=created,
            updated_at=updated, destroy_at=destroy_at, destroyed_at=destroyed_at, versions=versions,
        )

    def _lazy_destroy(self, key_id: str, row: tuple[Any, ...]) -> tuple[Any, ...]:
        """A key past its destruction time is destroyed now, whatever the sweep's schedule."""
        state, destroy_at = row[4], row[8]
        if state == KeyState.PENDING_DESTRUCTION.value and destroy_at is not None:
            now = self._store.clock()
            if destroy_at <= now:
                self._destroy_if_due(key_id, now)
                return self._row(key_id)
        return row

    def _write_version(self, key_id: str, version: int, alg: Algorithm) -> tuple[bytes, str, PrivateKey]:
        store = self._store
        if not store.backend.supports(alg):
            raise BackendUnavailable(f"the {store.backend.name} backend does not offer {alg.name}")
        priv = store.backend.generate(alg)
        public = priv.public_key().public_bytes()
        binding = KeyBinding(self._tenant, key_id, version, alg.name)
        rel = keyfile.relative_path(binding)
        keyfile.write_atomic(store.dir / rel, keyfile.seal(store.kek, binding, priv.private_bytes()))
        return public, rel, priv

    # ---- lifecycle ----

    def create(
        self, *, algorithm: str | None = None, kind: str | None = None, mode: str | None = None,
        label: str | None = None,
    ) -> KeyInfo:
        alg = _choose_algorithm(algorithm, kind, mode)
        if label is not None:
            if type(label) is not str or len(label) > MAX_LABEL_CHARS or not label.isprintable():
                raise InvalidInput(f"label must be a printable string of at most {MAX_LABEL_CHARS} characters")
        store = self._store
        key_id = new_key_id()
        public, rel, priv = self._write_version(key_id, 1, alg)
        now = store.clock()
        try:
            with _mapped("creating a key"), store._transaction():
                store._db.execute(
                    "INSERT INTO keys (tenant_id, key_id, kind, algorithm, label, state, latest_version, "
                    "created_at, updated_at) VALUES (?, ?, ?, ?, ?, 'enabled', 1, ?, ?)",
                    (self._tenant, key_id, alg.kind.value, alg.name, label, now, now),
                )
                self._insert_version(key_id, 1, alg, public, rel, now)
        except BaseException:
            keyfile.remove_file(store.dir / rel)
            raise
        store._cache_put(store._private, (self._tenant, key_id, 1), priv)
        return self._info(self._row(key_id))

    def _insert_version(self, key_id: str, version: int, alg: Algorithm, public: bytes, rel: str, now: float) -> None:
        self._store._db.execute(
            "INSERT INTO key_versions (tenant_id, key_id, version, algorithm, state, public_key, file, "
            "kek_id, created_at) VALUES (?, ?, ?, ?, 'active', ?, ?, ?, ?)",
            (self._tenant, key_id, version, alg.name, public, rel, self._store.kek.kek_id, now),
        )

    def get(self, key_id: str, version: int | None = None) -> KeyInfo:
        key_id = self._check_id(key_id)
        if version is not None:
            _check_version(version)
        with _mapped("reading a key"):
            return self._info(self._lazy_destroy(key_id, self._row(key_id)), version)

    def list(self, limit: int = DEFAULT_LIST_LIMIT, cursor: str | None = None) -> KeyPage:
        if type(limit) is not int or not 1 <= limit <= MAX_LIST_LIMIT:
            raise InvalidInput(f"limit must be an integer in 1..{MAX_LIST_LIMIT}")
        if cursor is not None and (type(cursor) is not str or KEY_ID_RE.match(cursor) is None):
            raise InvalidInput("cursor is not one this service returned")
        with _mapped("listing keys"):
            rows = self._store._db.execute(
                f"SELECT {_KEY_COLS} FROM keys WHERE tenant_id = ? AND key_id > ? ORDER BY key_id LIMIT ?",
                (self._tenant, cursor or "", limit + 1),
            ).fetchall()
            more = len(rows) > limit
            rows = rows[:limit]
            infos = tuple(self._info(self._lazy_destroy(r[0], tuple(r))) for r in rows)
        return KeyPage(infos, rows[-1][0] if more and rows else None)

    def rotate(self, key_id: str) -> KeyInfo:
        key_id = self._check_id(key_id)
        store = self._store
        with _mapped("rotating a key"):
            row = self._lazy_destroy(key_id, self._row(key_id))
            _require_usable(key_id, row[4])
            alg = get_algorithm(row[2])
            # the write lock is held from reading latest_version to the commit: concurrent
            # rotations (other workers) serialise and never pick the same version number
            with store._transaction():
                row = self._row(key_id)
                _require_usable(key_id, row[4])
                version = row[5] + 1
                public, rel, priv = self._write_version(key_id, version, alg)
                try:
                    now = store.clock()
                    self._insert_version(key_id, version, alg, public, rel, now)
                    store._db.execute(
                        "UPDATE keys SET latest_version = ?, updated_at = ? WHERE tenant_id = ? AND key_id = ?",
                        (version, now, self._tenant, key_id),
                    )
                except BaseException:
                    keyfile.remove_file(store.dir / rel)
                    raise
        store._cache_put(store._private, (self._tenant, key_id, version), priv)
        return self._info(self._row(key_id))

    def _transition(self, key_id: str, op: str) -> KeyInfo:
        key_id = self._check_id(key_id)
        store = self._store
        with _mapped(f"{op} a key"):
            self._lazy_destroy(key_id, self._row(key_id))  # outside the transaction: it commits
        with _mapped(f"{op} a key"), store._transaction():
            row = self._row(key_id)
            state = row[4]
            now = store.clock()
            if state == KeyState.DESTROYED.value:
                raise KeyDestroyed(f"key {key_id!r} was destroyed")
            if op == "disable":
                if state == KeyState.PENDING_DESTRUCTION.value:
                    raise InvalidKeyState(f"key {key_id!r} is scheduled for destruction; cancel that first")
                new = KeyState.DISABLED.value
            elif op == "enable":
                if state == KeyState.PENDING_DESTRUCTION.value:
                    raise InvalidKeyState(f"key {key_id!r} is scheduled for destruction; cancel that first")
                new = KeyState.ENABLED.value
            else:  # cancel_destroy
                if state != KeyState.PENDING_DESTRUCTION.value:
                    raise InvalidKeyState(f"key {key_id!r} is not scheduled for destruction")
                new = row[10]
            if new != state:
                store._db.execute(
                    "UPDATE keys SET state = ?, resume_state = NULL, destroy_at = NULL, updated_at = ? "
                    "WHERE tenant_id = ? AND key_id = ?",
                    (new, now, self._tenant, key_id),
                )
        return self._info(self._row(key_id))

    def disable(self, key_id: str) -> KeyInfo:
        return self._transition(key_id, "disable")

    def enable(self, key_id: str) -> KeyInfo:
        return self._transition(key_id, "enable")

    def cancel_destroy(self, key_id: str) -> KeyInfo:
        return self._transition(key_id, "cancel_destroy")

    def schedule_destroy(self, key_id: str, delay: float | None = None) -> KeyInfo:
        key_id = self._check_id(key_id)
        store = self._store
        if delay is None:
            delay = store.destroy_delay
        if type(delay) not in (int, float) or not 0 <= delay <= MAX_DESTROY_DELAY:
            raise InvalidInput(f"delay must be a number of seconds in 0..{MAX_DESTROY_DELAY:.0f}")
        with _mapped("scheduling a destruction"):
            self._lazy_destroy(key_id, self._row(key_id))  # outside the transaction: it commits
        with _mapped("scheduling a destruction"), store._transaction():
            row = self._row(key_id)
            state = row[4]
            if state == KeyState.DESTROYED.value:
                raise KeyDestroyed(f"key {key_id!r} was destroyed")
            if state != KeyState.PENDING_DESTRUCTION.value:  # already scheduled: keep the first date
                now = store.clock()
                store._db.execute(
                    "UPDATE keys SET state = 'pending_destruction', resume_state = ?, destroy_at = ?, "
                    "updated_at = ? WHERE tenant_id = ? AND key_id = ?",
                    (state, now + float(delay), now, self._tenant, key_id),
                )
        store._evict(self._tenant, key_id)
        row = self._lazy_destroy(key_id, self._row(key_id))  # delay 0: destroyed at once
        return self._info(row)

    def _destroy_if_due(self, key_id: str, now: float) -> bool:
        store = self._store
        # the files are unlinked after *our* commit; inside someone else's transaction that
        # commit could still roll back and leave metadata naming deleted files
        assert not store._db.in_transaction, "destroy must run in its own transaction"
        with _mapped("destroying a key"), store._transaction():
            row = store._db.execute(
                "SELECT state, destroy_at FROM keys WHERE tenant_id = ? AND key_id = ?", (self._tenant, key_id)
            ).fetchone()
            if row is None or row[0] != KeyState.PENDING_DESTRUCTION.value or row[1] > now:
                return False
            files = [
                r[0]
                for r in store._db.execute(
                    "SELECT file FROM key_versions WHERE tenant_id = ? AND key_id = ? AND file IS NOT NULL",
                    (self._tenant, key_id),
                )
            ]
            store._db.execute(
                "UPDATE keys SET state = 'destroyed', resume_state = NULL, destroy_at = NULL, destroyed_at = ?, "
                "updated_at = ? WHERE tenant_id = ? AND key_id = ?",
                (now, now, self._tenant, key_id),
            )
            store._db.execute(
                "UPDATE key_versions SET state = 'destroyed', file = NULL, kek_id = NULL "
                "WHERE tenant_id = ? AND key_id = ?",
                (self._tenant, key_id),
            )
        # committed: the files are now orphans; remove them (a crash here leaves them to the sweep)
        for rel in files:
            keyfile.remove_file(store.dir / rel)
        store._evict(self._tenant, key_id)
        log.info("key destroyed", extra={"fields": {"key_id": key_id, "versions": len(files)}})
        return True

    # ---- key objects for the crypto operations ----

    _RESOLVE = (
        "SELECT k.state, k.destroy_at, k.latest_version, v.version, v.algorithm, v.file "
        "FROM keys k LEFT JOIN key_versions v ON v.tenant_id = k.tenant_id AND v.key_id = k.key_id "
        "AND v.version = COALESCE(?, k.latest_version) WHERE k.tenant_id = ? AND k.key_id = ?"
    )

    def _resolve(self, key_id: object, version: object) -> _Resolved:
        store = self._store
        if store._batch_valid and type(key_id) is str and (version is None or type(version) is int):
            hot = store._hot.get((self._tenant, key_id, version))
            if hot is not None:
                return hot
        key_id = self._check_id(key_id)
        if version is not None:
            _check_version(version)
        db = store._db
        try:
            row = db.execute(self._RESOLVE, (version, self._tenant, key_id)).fetchone()
        except sqlite3.Error as exc:
            raise StoreUnavailable("key store database error while reading a key") from exc
        if row is None:
            raise key_not_found(key_id)
        state, destroy_at, _latest, v, alg, rel = row
        if state != "enabled":
            if state == "pending_destruction" and destroy_at <= self._store.clock():
                self._destroy_if_due(key_id, self._store.clock())
                state = "destroyed"
            if state == "destroyed":
                raise KeyDestroyed(f"key {key_id!r} was destroyed")
            if state == "disabled":
                raise KeyDisabled(f"key {key_id!r} is disabled")
            raise KeyDisabled(f"key {key_id!r} is scheduled for destruction")
        if v is None:
            raise KeyNotFound(f"key {key_id!r} has no version {version}")
        if rel is None:  # pragma: no cover - the CHECK constraint ties state and file
            raise KeyDestroyed(f"key {key_id!r} version {v} was destroyed")
        resolved = _Resolved(key_id, ALGORITHMS[alg], v, rel)
        if store._batch_valid:
            if len(store._hot) >= HOT_CACHE_SIZE:
                store._hot.clear()
            store._hot[(self._tenant, key_id, version)] = resolved  # type: ignore[index]  # checked above
        return resolved

    def private_key(self, key_id: object, version: object = None) -> tuple[PrivateKey, int]:
        """The loaded private key of an enabled key (latest version unless given)."""
        r = self._resolve(key_id, version)
        store = self._store
        ck = (self._tenant, r.key_id, r.version)
        priv = store._cache_get(store._private, ck)
        if priv is None:
            priv = self._load_private(r.key_id, r)
            store._cache_put(store._private, ck, priv)
        return priv, r.version

    def public_key(self, key_id: object, version: object = None) -> tuple[PublicKey, int]:
        """The public key of an enabled key (latest version unless given)."""
        r = self._resolve(key_id, version)
        store = self._store
        ck = (self._tenant, r.key_id, r.version)
        pub = store._cache_get(store._public, ck)
        if pub is None:
            priv = store._cache_get(store._private, ck)
            if priv is not None:
                pub = priv.public_key()
            else:
                row = store._db.execute(
                    "SELECT public_key FROM key_versions WHERE tenant_id = ? AND key_id = ? AND version = ?",
                    (self._tenant, r.key_id, r.version),
                ).fetchone()
                pub = store.backend.load_public(r.algorithm, bytes(row[0]))
            store._cache_put(store._public, ck, pub)
        return pub, r.version

    def _load_private(self, key_id: str, r: _Resolved) -> PrivateKey:
        store = self._store
        binding = KeyBinding(self._tenant, key_id, r.version, r.algorithm.name)
        what = binding.describe()
        data = keyfile.read_key_file(store.dir / r.file, what)
        seed = keyfile.unseal(store.kek, binding, data)
        try:
            priv = store.backend.load_private(r.algorithm, seed)
        except QpherError as exc:
            raise KeyCorrupt(f"{what}: the key file holds no valid {r.algorithm.name} key") from exc
        del seed
        row = store._db.execute(
            "SELECT public_key FROM key_versions WHERE tenant_id = ? AND key_id = ? AND version = ?",
            (self._tenant, key_id, r.version),
        ).fetchone()
        if row is None or priv.public_key().public_bytes() != bytes(row[0]):
            raise KeyCorrupt(f"{what}: the key file does not match the key's public key")
        return priv


def _check_version(version: object) -> int:
    if type(version) is not int or not 1 <= version <= 2**31:
        raise InvalidInput("key_version must be a positive integer")
    return version


def _require_usable(key_id: str, state: str) -> None:
    if state == KeyState.DESTROYED.value:
        raise KeyDestroyed(f"key {key_id!r} was destroyed")
    if state == KeyState.DISABLED.value:
        raise KeyDisabled(f"key {key_id!r} is disabled")
    if state == KeyState.PENDING_DESTRUCTION.value:
        raise KeyDisabled(f"key {key_id!r} is scheduled for destruction")


def _choose_algorithm(algorithm: object, kind: object, mode: object) -> Algorithm:
    if kind is not None and kind not in (Kind.KEM.value, Kind.SIGNATURE.value):
        raise InvalidInput(f"kind must be 'kem' or 'signature', not {str(kind)[:20]!r}")
    if mode is not None and mode not in ("pqc", "hybrid"):
        raise InvalidInput(f"mode must be 'pqc' or 'hybrid', not {str(mode)[:20]!r}")
    if algorithm is not None:
        alg = get_algorithm(algorithm)
        if kind is not None and alg.kind.value != kind:
            raise InvalidInput(f"algorithm {alg.name!r} is a {alg.kind.value} algorithm, not {kind}")
        if mode is not None and alg.mode.value != mode:
            raise InvalidInput(f"algorithm {alg.name!r} is {alg.mode.value}, not {mode}")
        return alg
    if kind is None:
        raise InvalidInput("give an algorithm, or a kind ('kem' or 'signature')")
    hybrid = mode == "hybrid"
    if kind == Kind.KEM.value:
        return ALGORITHMS[HYBRID_KEM if hybrid else DEFAULT_KEM]
    return ALGORITHMS[HYBRID_SIGNATURE if hybrid else DEFAULT_SIGNATURE]


# ---- KEK rotation (offline) ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RotationResult:
    rewrapped: int  # files re-wrapped by this run
    already: int  # files found already under the new KEK (an earlier, interrupted run)
    total: int


def rotate_kek(
    kms_dir: str | os.PathLike[str],
    old: KEKProvider,
    new: KEKProvider,
    *,
    on_progress: Callable[[int, int], None] | None = None,
) -> RotationResult:
    """Re-wrap every key file under ``new``; safe to interrupt and re-run with the same KEKs.

    1. Take the store's lock exclusively (so no KMS is running) and check that ``old`` is the
       store's KEK -- or, for a re-run, that the rotation marker names ``old`` -> ``new``.
    2. Write ``kek-rotation`` naming both KEK ids: from here on no KMS starts until we finish.
    3. For each key file: its header says which KEK wraps it. Under ``new``: skip (an earlier
       run did it). Under ``old``: unwrap, wrap under ``new``, write atomically, then record
       the new KEK id in the database. Anything else: stop, naming the key.
    4. Replace the canary with one sealed by ``new``; remove the marker.

    A crash at any point leaves every file whole and under one of the two KEKs, and the marker
    in place; the next run resumes at step 3. ``on_progress(done, total)`` is called after
    each file.
    """
    d = Path(kms_dir)
    if old.kek_id == new.kek_id:
        raise KEKError(f"the new KEK has the same id ({new.kek_id!r}) as the current one")
    if not (d / DB_FILE).exists():
        raise KEKError(f"no key store in {str(d)!r}")
    lock = _StoreLock(d)
    try:
        if not lock.try_exclusive():
            raise KEKError("the key store is in use by a running KMS; stop the proxy before rotating the KEK")
        db = _connect(d)
        try:
            return _rotate_locked(d, db, old, new, on_progress)
        finally:
            db.close()
    finally:
        lock.close()


def _rotate_locked(
    d: Path, db: sqlite3.Connection, old: KEKProvider, new: KEKProvider,
    on_progress: Callable[[int, int], None] | None,
) -> RotationResult:
    marker = d / ROTATION_FILE
    canary = d / CANARY_FILE
    if marker.exists():
        try:
            info = json.loads(marker.read_text())
            ok = info.get("from") == old.kek_id and info.get("to") == new.kek_id
        except (OSError, ValueError, AttributeError):
            ok = False
        if not ok:
            raise KEKError(
                "an interrupted KEK rotation between other KEKs is pending; re-run it with the KEKs it names "
                f"in {str(marker)!r}"
            )
        # the canary is under old (interrupted in step 3) or new (interrupted in step 4)
        if canary.exists():
            data = canary.read_bytes()
            verify_canary(new if canary_kek_id(data) == new.kek_id else old, data)
    else:
        if canary.exists():
            data = canary.read_bytes()
            if canary_kek_id(data) == new.kek_id:
                verify_canary(new, data)  # finished earlier: re-check every file below
            else:
                verify_canary(old, data)
        else:
            verify_store_kek(d, old, db)  # an old store without a canary: check a file, write one
        keyfile.write_atomic(marker, json.dumps({"from": old.kek_id, "to": new.kek_id}).encode())
    rows = db.execute(
        "SELECT tenant_id, key_id, version, algorithm, file FROM key_versions WHERE file IS NOT NULL "
        "ORDER BY tenant_id, key_id, version"
    ).fetchall()
    total = len(rows)
    rewrapped = already = 0
    for i, (tenant_id, key_id, version, algorithm, rel) in enumerate(rows, 1):
        binding = KeyBinding(tenant_id, key_id, version, algorithm)
        what = binding.describe()
        path = d / rel
        data = keyfile.read_key_file(path, what)
        header = keyfile.parse_header(data, what)
        if header.kek_id == new.kek_id:
            keyfile.unseal(new, binding, data)  # verify, do not trust the header alone
            already += 1
        elif header.kek_id == old.kek_id:
            seed = keyfile.unseal(old, binding, data)
            keyfile.write_atomic(path, keyfile.seal(new, binding, seed))
            del seed
            rewrapped += 1
        else:
            raise KEKError(f"{what}: the key file is wrapped by a third KEK {header.kek_id!r}; cannot re-wrap it")
        with _write(db):
            db.execute(
                "UPDATE key_versions SET kek_id = ? WHERE tenant_id = ? AND key_id = ? AND version = ?",
                (new.kek_id, tenant_id, key_id, version),
            )
        if on_progress is not None:
            on_progress(i, total)
    keyfile.write_atomic(canary, seal_canary(new))
    keyfile.remove_file(marker)
    return RotationResult(rewrapped, already, total)
