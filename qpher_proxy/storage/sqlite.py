"""Gateway-side SQLite helpers: one way to open a database, one way to write, one error.

The gateway keeps two small kinds of state in SQLite (config ``auth.db``, default ``data/gateway.db``):
API key records (``auth.apikeys``) and monthly quota counts (``ratelimit.quotas``). Several
processes may open it at once — the running proxy and the ``qpher-proxy apikey`` CLI — so:

* the file is created ``0600`` before SQLite touches it (SQLite gives its ``-wal``/``-shm``
  files the same mode), since it holds HMACs of API key secrets;
* it runs in WAL mode (readers never block the writer) with a busy timeout, and every write is
  one ``BEGIN IMMEDIATE`` transaction (``transaction()``), so a writer waits for the write
  lock up front instead of failing half-way through an upgrade from a read lock;
* connections are in autocommit mode (``isolation_level=None``): a ``SELECT`` never leaves a
  transaction open, so ``PRAGMA data_version`` reflects other processes' commits at once;
* ``sqlite3.Error`` becomes ``StorageUnavailable`` here, at this one boundary (``mapped()``).

This is the KMS's concern nowhere: the KMS has its own database in its own process.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

from ..errors import StorageUnavailable

__all__ = ["connect", "transaction", "data_version", "ensure_schema", "mapped"]

DEFAULT_BUSY_TIMEOUT_S = 5.0  # long enough for a CLI write; short enough not to hang a request

Synchronous = Literal["OFF", "NORMAL", "FULL", "EXTRA"]


@contextmanager
def mapped(what: str) -> Iterator[None]:
    """Map SQLite and OS errors to ``StorageUnavailable`` (the message names ``what`` only)."""
    try:
        yield
    except sqlite3.Error as exc:
        raise StorageUnavailable(f"gateway database error while {what}") from exc
    except OSError as exc:
        raise StorageUnavailable(f"gateway database error while {what}") from exc


def connect(
    path: str | os.PathLike[str],
    *,
    synchronous: Synchronous = "FULL",
    busy_timeout: float = DEFAULT_BUSY_TIMEOUT_S,
) -> sqlite3.Connection:
    """Open (creating ``0600`` if needed) the gateway database at ``path``."""
    with mapped("opening the database"):
        # Create the file 0600 if it does not exist -- but never open (and close) an existing
        # database file ourselves: closing any descriptor of a file drops every POSIX lock this
        # process holds on it, including those of our other SQLite connections. A writer in
        # another process then believes it is alone, checkpoints and deletes the WAL, and our
        # connections keep reading a stale snapshot (a CLI revocation would never be seen).
        try:
            fd = os.open(os.fspath(path), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            pass
        else:
            os.close(fd)
        conn = sqlite3.connect(
            os.fspath(path), timeout=busy_timeout, isolation_level=None, check_same_thread=False
        )
        try:
            # Step every statement to its end (fetchall): see ``one()`` for why.
            conn.execute("PRAGMA journal_mode=WAL").fetchall()
            conn.execute(f"PRAGMA synchronous={synchronous}").fetchall()
            conn.execute("PRAGMA foreign_keys=ON").fetchall()
        except BaseException:
            conn.close()
            raise
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection, what: str = "writing") -> Iterator[sqlite3.Connection]:
    """One ``BEGIN IMMEDIATE`` … ``COMMIT``; ``ROLLBACK`` on any exception, which propagates
    (SQLite errors, in the body too, as ``StorageUnavailable``)."""
    with mapped(what):
        conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException as exc:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # the original exception is the one worth reporting
        if isinstance(exc, sqlite3.Error):
            raise StorageUnavailable(f"gateway database error while {what}") from exc
        raise
    with mapped(what):
        try:
            conn.execute("COMMIT")
        except sqlite3.Error:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise


def one(cursor: sqlite3.Cursor) -> Any:
    """The first row of a query, or None -- stepping the statement to its end.

    Never ``fetchone()`` here: a statement left un-stepped stays active, and an active statement
    keeps its read snapshot open even past COMMIT, so the connection would stop seeing other
    processes' commits (a revocation made by the CLI would go unseen)."""
    rows = cursor.fetchall()
    return rows[0] if rows else None


def data_version(conn: sqlite3.Connection) -> int:
    """SQLite's change counter: differs between two calls on the same connection iff another
    connection (another process, or another connection of ours) committed in between."""
    with mapped("reading the change counter"):
        rows = conn.execute("PRAGMA data_version").fetchall()
    return int(rows[0][0])


def ensure_schema(conn: sqlite3.Connection, name: str, version: int, statements: Sequence[str]) -> None:
    """Create the tables of component ``name`` (idempotent ``CREATE … IF NOT EXISTS`` statements)
    and record ``version``; a database written by a newer version is refused."""
    with transaction(conn, f"creating the {name} schema"):
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_versions (name TEXT PRIMARY KEY, version INTEGER NOT NULL)"
        )
        row = one(conn.execute("SELECT version FROM schema_versions WHERE name = ?", (name,)))
        if row is not None and int(row[0]) > version:
            raise StorageUnavailable(
                f"the {name} tables have schema version {int(row[0])}, this build knows {version}"
            )
        for statement in statements:
            conn.execute(statement)
        conn.execute(
            "INSERT INTO schema_versions (name, version) VALUES (?, ?) "
            "ON CONFLICT(name) DO UPDATE SET version = excluded.version",
            (name, version),
        )
