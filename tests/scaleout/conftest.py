"""Fixtures for the scale-out tests: the machine's PostgreSQL 15 and Redis 7.

Each test that uses ``pg`` gets its own database (random name, dropped afterwards) and its own
role prefix (roles are cluster-wide: two tests must not share them), so tests run in parallel.
Each test that uses ``redis_url`` gets its own key prefix in ``redis_prefix``.

Where the service is not reachable the test skips and says why -- except under CI
(``CI`` set in the environment), where a missing service is a failure: the machines this
project runs on provide both (see README "Running several nodes").
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


@contextlib.contextmanager
def pg_database() -> Iterator[PgDatabase]:
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


@contextlib.contextmanager
def migrated_database() -> Iterator[PgDatabase]:
    """A fresh database with this build's schema, its roles dropped afterwards (the module-scoped
    databases of the store tests: one per module costs less than one per test)."""
    from qpher_proxy.storage.migrations import migrate

    with pg_database() as db:
        migrate(db.dsn, db.role_prefix)
        yield db


@contextlib.contextmanager
def store_opener(
    db: PgDatabase, kek: Any, backend: Any, clock: Callable[[], Any]
) -> Iterator[Callable[..., Any]]:
    """Open ``PgKeyStore``s ("KMS nodes") on ``db``: ``opener(**kw)`` with the store's keyword
    arguments (``kek=`` and ``backend=`` override the defaults, a fresh ``clock()`` unless given,
    no background sweep); every store opened is closed when the block ends."""
    from qpher_proxy.kms.worker.pg_keystore import PgKeyStore

    opened: list[PgKeyStore] = []

    def opener(**kw: Any) -> PgKeyStore:
        kw.setdefault("clock", clock())
        kw.setdefault("sweep_interval", 0.0)
        s = PgKeyStore.open(db.dsn, kw.pop("kek", kek), kw.pop("backend", backend),
                            role_prefix=db.role_prefix, pool_size=2, **kw)
        opened.append(s)
        return s

    try:
        yield opener
    finally:
        for s in opened:
            s.close()


@pytest.fixture
def pg() -> Iterator[PgDatabase]:
    with pg_database() as db:
        yield db


@pytest.fixture(scope="module")
def pg_module() -> Iterator[PgDatabase]:
    """One database for a whole test module (tests that share live nodes)."""
    with pg_database() as db:
        yield db


@pytest.fixture
def redis_url() -> str:
    require_service("Redis", REDIS_HOST, REDIS_PORT)
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/0"


@pytest.fixture
def redis_prefix() -> str:
    return f"qt{secrets.token_hex(5)}"


# ---- a PostgreSQL server of the test's own, to stop and start (outage tests) ----

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OwnPostgres:
    """``initdb`` + ``pg_ctl`` as the ``postgres`` user (PostgreSQL refuses to run as root), in a
    temporary directory, on a free loopback port, trust auth. ``stop()`` / ``start()`` at will."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.data = base / "data"
        self.port = _free_port()
        base.mkdir(parents=True, exist_ok=True)
        shutil.chown(base, "postgres", "postgres")
        self._as_postgres(str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                          "--no-sync", "-E", "UTF8")
        self.start()
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *cmd: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *cmd], check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-o", opts, "-w", "-t", "30",
                          "-l", str(self.base / "log"), "start")

    def stop(self) -> None:
        self._as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")


@pytest.fixture
def own_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnPostgres]:
    if not (PG_BIN / "initdb").exists() or shutil.which("runuser") is None:
        reason = f"PostgreSQL server binaries are not in {PG_BIN}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    base = Path(tempfile.mkdtemp(prefix="qpher-pg-", dir="/tmp"))
    os.chmod(base, 0o755)
    server = OwnPostgres(base)
    try:
        yield server
    finally:
        try:
            server.stop()
        except subprocess.CalledProcessError:
            pass  # already stopped
        shutil.rmtree(base, ignore_errors=True)
