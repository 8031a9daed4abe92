"""Fixtures for the scale-out tests: the machine's PostgreSQL 15 and Redis 7.

Each test that uses ``pg`` gets its own database (random name, dropped afterwards) and its own
role prefix (roles are cluster-wide: two tests must not share them), so tests run in parallel.
Each test that uses ``redis_url`` gets its own key prefix in ``redis_prefix``.

Where the service is not reachable the test skips and says why -- except under CI
(``CI`` set in the environment), where a missing service is a failure: the machines this
project runs on provide both (see README "Running several nodes").
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

PG_HOST, PG_PORT = "127.0.0.1", 5432
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
ADMIN_DSN = f"postgresql://root@{PG_HOST}:{PG_PORT}/test"


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def require_service(name: str, host: str, port: int) -> None:
    if _reachable(host, port):
        return
    reason = f"{name} is not reachable on {host}:{port}"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI machines provide it, so this is a failure, not a skip")
    pytest.skip(f"{reason} (this machine does not run it; CI does)")


@dataclass(frozen=True)
class PgDatabase:
    """A fresh database: ``dsn`` connects as the superuser ``root``; ``role_prefix`` is unique."""

    name: str
    dsn: str
    role_prefix: str


def _admin_exec(*statements: str) -> None:
    import psycopg

    with psycopg.connect(ADMIN_DSN, autocommit=True, connect_timeout=5) as conn:
        for s in statements:
            conn.execute(s)  # type: ignore[arg-type]


def drop_roles(prefix: str) -> None:
    import psycopg

    with psycopg.connect(ADMIN_DSN, autocommit=True, connect_timeout=5) as conn:
        rows = conn.execute(
            "SELECT rolname FROM pg_roles WHERE rolname LIKE %s", (prefix + "\\_%",)
        ).fetchall()
        for (role,) in rows:
            conn.execute(f'DROP ROLE IF EXISTS "{role}"')  # type: ignore[arg-type]


@pytest.fixture
def pg() -> Iterator[PgDatabase]:
    require_service("PostgreSQL", PG_HOST, PG_PORT)
    tag = secrets.token_hex(5)
    name = f"qpher_t_{tag}"
    prefix = f"qt{tag}"
    _admin_exec(f'CREATE DATABASE "{name}"')
    try:
        yield PgDatabase(name, f"postgresql://root@{PG_HOST}:{PG_PORT}/{name}", prefix)
    finally:
        _admin_exec(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        drop_roles(prefix)


@pytest.fixture
def redis_url() -> str:
    require_service("Redis", REDIS_HOST, REDIS_PORT)
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/0"


@pytest.fixture
def redis_prefix() -> str:
    return f"qt{secrets.token_hex(5)}"
