"""The gateway-side SQLite helpers under API keys and quotas."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qpher_proxy.errors import StorageUnavailable
from qpher_proxy.storage import connect, data_version, ensure_schema, transaction


def test_database_is_created_private_in_wal_mode(tmp_path: Path) -> None:
    conn = connect(tmp_path / "g.db")
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert os.stat(tmp_path / "g.db").st_mode & 0o777 == 0o600
    finally:
        conn.close()


def test_data_version_sees_other_connections_commits(tmp_path: Path) -> None:
    a, b = connect(tmp_path / "g.db"), connect(tmp_path / "g.db")
    try:
        ensure_schema(a, "t", 1, ["CREATE TABLE IF NOT EXISTS t (x INTEGER)"])
        before = data_version(b)
        with transaction(a):
            a.execute("INSERT INTO t VALUES (1)")
        assert data_version(b) != before
        own = data_version(a)
        with transaction(a):
            a.execute("INSERT INTO t VALUES (2)")
        assert data_version(a) == own  # a connection's own commits do not count
    finally:
        a.close()
        b.close()


def test_transaction_rolls_back_on_error(tmp_path: Path) -> None:
    conn = connect(tmp_path / "g.db")
    try:
        ensure_schema(conn, "t", 1, ["CREATE TABLE IF NOT EXISTS t (x INTEGER)"])
        with pytest.raises(ZeroDivisionError):
            with transaction(conn):
                conn.execute("INSERT INTO t VALUES (1)")
                raise ZeroDivisionError
        assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 0
        with pytest.raises(StorageUnavailable) as info:
            with transaction(conn):
                conn.execute("INSERT INTO missing_table VALUES (1)")
        assert info.value.status == 503 and "missing_table" not in info.value.message
    finally:
        conn.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    conn = connect(tmp_path / "g.db")
    try:
        ensure_schema(conn, "t", 3, [])
        with pytest.raises(StorageUnavailable):
            ensure_schema(conn, "t", 2, [])
        ensure_schema(conn, "t", 3, [])
    finally:
        conn.close()


def test_unopenable_path(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageUnavailable):
        connect(tmp_path / "file" / "g.db")
