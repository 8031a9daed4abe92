"""The key store below its repository: the SQLite database, the directory lock, the KEK check.  KMS only.

What lives here is shared by the serving store (``keystore``) and the offline KEK rotation
(``kek_rotation``), and knows nothing of tenants or key lifecycles:

* the schema, with its ``CHECK`` constraints (see ``keystore`` for what they guard), and the
  connection settings every writer relies on: WAL, ``synchronous=FULL``, foreign keys, a busy
  timeout so that workers serialise instead of failing;
* :func:`write_transaction`, one ``BEGIN IMMEDIATE`` transaction taking the write lock up front;
* :func:`mapped_errors`, the one place where ``sqlite3.Error`` becomes :class:`StoreUnavailable`
  (503 ``kms_store_unavailable``) on the paths that answer requests;
* :class:`StoreLock`, the ``flock`` that lets a worker know it is alone (exclusive) and keeps
  ``rotate-kek`` away from a running KMS;
* :func:`verify_store_kek`, which refuses a KEK that is not this store's before anything is written.

Schema versions: ``meta('schema_version')``. Opening a store of an older version upgrades it in
the opening transaction (every table is ``CREATE ... IF NOT EXISTS``, so a new table simply
appears; :data:`UPGRADES` holds anything more a version needs); a store of a newer version is
refused before anything is written. Version 2 added ``idempotency_keys`` (see ``key_rules``);
version 3 added ``import_jobs`` and the ``origin`` / ``import_job_id`` of each key version (see
``key_import``). An import job's row holds its *sealed* private key (the bytes a key file would
hold, under the KEK), so that a job is one transaction and its destruction one ``UPDATE``.
Version 4 added ``audit_logs``: per audit-log origin, the sealed checkpoint keys and the last
signed tree head (see ``audit_keys``).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ...crypto.algorithms import ALGORITHMS
from ...crypto.key_import import IMPORT_METHODS
from ...errors import QpherError
from ..wire.model import MAX_LABEL_CHARS, KeyState
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
)
from .keyfile import KeyBinding

DB_FILE = "keys.db"
LOCK_FILE = "lock"
SCHEMA_VERSION = 4
# version -> statements that bring a store of the version before up to it, beyond the tables
# and indexes _schema() creates if they do not exist
UPGRADES: dict[int, tuple[str, ...]] = {2: (), 3: (), 4: ()}
# version -> (table, column, definition) the version added to an existing table; added on upgrade
# when missing (the tables _schema() creates have them already)
ADDED_COLUMNS: dict[int, tuple[tuple[str, str, str], ...]] = {
    3: (
        ("key_versions", "origin",
         "TEXT NOT NULL DEFAULT 'generated' CHECK (origin IN ('generated', 'imported'))"),
        ("key_versions", "import_job_id", "TEXT"),
    ),
}
BUSY_TIMEOUT_S = 10.0
LOCK_WAIT_S = 10.0


class StoreUnavailable(QpherError):
    code = "kms_store_unavailable"
    status = 503


def _schema() -> str:
    algs = ", ".join(f"'{a}'" for a in sorted(ALGORITHMS))
    states = ", ".join(f"'{s.value}'" for s in KeyState)
    methods = ", ".join(f"'{m}'" for m in sorted(IMPORT_METHODS))
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
    origin     TEXT NOT NULL DEFAULT 'generated' CHECK (origin IN ('generated', 'imported')),
    import_job_id TEXT,
    CHECK ((state = 'active') = (file IS NOT NULL)),
    FOREIGN KEY (tenant_id, key_id) REFERENCES keys (tenant_id, key_id)
);
CREATE UNIQUE INDEX IF NOT EXISTS key_versions_unique ON key_versions (tenant_id, key_id, version);
CREATE TABLE IF NOT EXISTS idempotency_keys (
    tenant_id   TEXT NOT NULL CHECK (length(tenant_id) BETWEEN 1 AND 255),
    key_hash    BLOB NOT NULL CHECK (length(key_hash) = 32),
    operation   TEXT NOT NULL CHECK (operation IN ('create_key', 'rotate_key')),
    fingerprint BLOB NOT NULL CHECK (length(fingerprint) = 32),
    key_id      TEXT NOT NULL,
    version     INTEGER NOT NULL CHECK (version >= 1),
    created_at  REAL NOT NULL,
    PRIMARY KEY (tenant_id, key_hash)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS idempotency_keys_age ON idempotency_keys (created_at);
CREATE TABLE IF NOT EXISTS import_jobs (
    tenant_id    TEXT NOT NULL CHECK (length(tenant_id) BETWEEN 1 AND 255),
    job_id       TEXT NOT NULL CHECK (length(job_id) = 29 AND job_id GLOB 'ij_*'),
    method       TEXT NOT NULL CHECK (method IN ({methods})),
    public_key   BLOB NOT NULL,
    sealed       BLOB,
    kek_id       TEXT,
    created_at   REAL NOT NULL,
    expires_at   REAL NOT NULL,
    destroyed_at REAL,
    PRIMARY KEY (tenant_id, job_id),
    CHECK ((sealed IS NULL) = (destroyed_at IS NOT NULL)),
    CHECK ((sealed IS NULL) = (kek_id IS NULL))
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS import_jobs_due ON import_jobs (expires_at) WHERE sealed IS NOT NULL;
CREATE TABLE IF NOT EXISTS audit_logs (
    origin         TEXT PRIMARY KEY CHECK (length(origin) BETWEEN 1 AND 255),
    mldsa_public   BLOB NOT NULL CHECK (length(mldsa_public) = 1952),
    mldsa_sealed   BLOB NOT NULL,
    ed25519_public BLOB NOT NULL CHECK (length(ed25519_public) = 32),
    ed25519_sealed BLOB NOT NULL,
    kek_id         TEXT NOT NULL,
    size           INTEGER NOT NULL CHECK (size >= 0),
    root           BLOB CHECK (root IS NULL OR length(root) = 32),
    created_at     REAL NOT NULL,
    updated_at     REAL NOT NULL,
    CHECK ((size = 0) = (root IS NULL))
) WITHOUT ROWID;
"""


def connect(kms_dir: Path) -> sqlite3.Connection:
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
    try:
        with write_transaction(db):
            found = _stored_version(db)
            if found is not None and found > SCHEMA_VERSION:
                raise KEKError(
                    f"the key store database has schema version {found}; this build reads up to "
                    f"{SCHEMA_VERSION}: upgrade qpher-proxy"
                )
            for statement in _schema().split(";"):
                if statement.strip():
                    db.execute(statement)
            if found is None:
                db.execute(
                    "INSERT INTO meta (name, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
                )
            elif found < SCHEMA_VERSION:
                for version in range(found + 1, SCHEMA_VERSION + 1):
                    for statement in UPGRADES[version]:
                        db.execute(statement)
                    for table, column, definition in ADDED_COLUMNS.get(version, ()):
                        present = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}  # our own names
                        if column not in present:
                            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
                db.execute("UPDATE meta SET value = ? WHERE name = 'schema_version'", (str(SCHEMA_VERSION),))
    except BaseException:
        db.close()
        raise
    return db


def _stored_version(db: sqlite3.Connection) -> int | None:
    """The schema version of an existing store, None for a new one."""
    if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone() is None:
        return None
    row = db.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
    if row is None:
        return None
    try:
        return int(row[0])
    except (TypeError, ValueError):
        raise KEKError(
            f"the key store database has an unreadable schema version {str(row[0])[:20]!r}"
        ) from None


@contextmanager
def write_transaction(db: sqlite3.Connection) -> Iterator[None]:
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
def mapped_errors(what: str) -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as exc:
        raise StoreUnavailable(f"key store database error while {what}") from exc


class StoreLock:
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


def check_kek_opens(provider: KEKProvider, binding: KeyBinding, sealed: bytes) -> None:
    """:class:`KEKMismatch` unless ``provider`` opens the sealed key version ``sealed`` (the bytes
    of a key file); :class:`KeyCorrupt` if ``sealed`` is not a key blob at all."""
    header = keyfile.parse_header(sealed, binding.describe())
    if header.kek_id != provider.kek_id:
        raise KEKMismatch(
            f"the configured KEK (id {provider.kek_id!r}) is not the KEK of this key store "
            f"(key files are wrapped by {header.kek_id!r}); nothing was written"
        )
    try:
        provider.unwrap(sealed[header.body_offset :], binding.aad(header.kek_id))
    except UnwrapFailed as exc:
        raise KEKMismatch(
            f"the configured KEK (id {provider.kek_id!r}) does not open this key store's key files; "
            "nothing was written"
        ) from exc


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
            check_kek_opens(provider, binding, raw)
        except QpherError as exc:
            if isinstance(exc, KEKError):
                raise
            raise KEKError(
                "the KEK check file is missing and a key file could not be read to check the KEK: "
                f"{exc.message}"
            ) from exc
    keyfile.write_atomic(canary, seal_canary(provider))



__all__ = [
    "BUSY_TIMEOUT_S", "DB_FILE", "LOCK_FILE", "LOCK_WAIT_S", "SCHEMA_VERSION", "StoreLock",
    "StoreUnavailable", "check_kek_opens", "connect", "mapped_errors", "verify_store_kek",
    "write_transaction",
]
