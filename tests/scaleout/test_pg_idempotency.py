"""Idempotency keys on the PostgreSQL key store: replays, 409s, tenants, two nodes racing with one
key (the primary key decides; the loser answers with the winner's key), a first request not
committed yet (409 idempotency_key_in_progress), expiry and the sweep, row-level security and
the KMS-only grants of ``kms_idempotency``, and migrating a version-1 database."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from qpher_proxy.crypto.interface import Backend
from qpher_proxy.errors import IdempotencyKeyInProgress, IdempotencyKeyReused
from qpher_proxy.kms.worker.backends import select_backend
from qpher_proxy.kms.worker.kek import LocalKEKProvider
from qpher_proxy.kms.worker.key_rules import idempotency_claim
from qpher_proxy.kms.worker.pg_keystore import PgKeyStore
from qpher_proxy.storage import migrations
from qpher_proxy.storage.migrations import migrate

from .conftest import (
    PG_HOST,
    PG_PORT,
    PgDatabase,
    _admin_exec,
    drop_roles,
    migrated_database,
    require_service,
    store_opener,
)

KEY = "9f1c2e4a-retry-me"
DAY = 24 * 3600


class Clock:
    def __init__(self) -> None:
        self.now = 1_767_225_600.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def backend() -> Backend:
    return select_backend("openssl")


@pytest.fixture(scope="module")
def kek() -> LocalKEKProvider:
    return LocalKEKProvider(secrets.token_bytes(32), "test KEK")


@pytest.fixture(scope="module")
def module_db() -> Iterator[PgDatabase]:
    with migrated_database() as pg:
        yield pg


@pytest.fixture
def db(module_db: PgDatabase) -> PgDatabase:
    with psycopg.connect(module_db.dsn, autocommit=True) as c:
        c.execute("TRUNCATE kms_idempotency, kms_key_versions, kms_keys, leases")
    return module_db


Opener = Callable[..., PgKeyStore]


@pytest.fixture
def open_store(db: PgDatabase, kek: LocalKEKProvider, backend: Backend) -> Iterator[Opener]:
    with store_opener(db, kek, backend, Clock) as opener:
        yield opener


def _count(db: PgDatabase, table: str) -> int:
    with psycopg.connect(db.dsn, autocommit=True) as c:
        row = c.execute(f"SELECT count(*) FROM {table}").fetchone()  # type: ignore[arg-type]
    assert row is not None
    return int(row[0])


def _as_kms(db: PgDatabase, tenant: str) -> psycopg.Connection[Any]:
    conn = psycopg.connect(db.dsn)
    conn.execute(f"SET ROLE {db.role_prefix}_kms")  # type: ignore[arg-type]
    conn.execute("SELECT set_config('qpher.tenant', %s, true)", (tenant,))
    return conn


def test_a_repeated_creation_and_rotation_answer_the_first_result(db: PgDatabase, open_store: Opener) -> None:
    t = open_store().tenant("t1")
    first = t.create(kind="kem", label="orders", idempotency_key=KEY)
    again = t.create(algorithm="ml-kem-768", label="orders", idempotency_key=KEY)
    assert not first.replayed and again.replayed
    assert (again.key_id, again.version, again.public_key) == (first.key_id, 1, first.public_key)
    with pytest.raises(IdempotencyKeyReused):
        t.create(kind="kem", label="invoices", idempotency_key=KEY)
    with pytest.raises(IdempotencyKeyReused):
        t.rotate(first.key_id, idempotency_key=KEY)
    r1 = t.rotate(first.key_id, idempotency_key="rot")
    r2 = t.rotate(first.key_id, idempotency_key="rot")
    assert (r1.version, r2.version, r2.replayed, r2.latest_version) == (2, 2, True, 2)
    t.disable(first.key_id)
    assert t.rotate(first.key_id, idempotency_key="rot").version == 2  # a replay does nothing
    other = open_store().tenant("t2").create(kind="kem", label="orders", idempotency_key=KEY)
    assert other.key_id != first.key_id and not other.replayed
    assert _count(db, "kms_keys") == 2 and _count(db, "kms_key_versions") == 3
    assert _count(db, "kms_idempotency") == 3
    with psycopg.connect(db.dsn, autocommit=True) as c:  # a hash, never the key itself
        for (key_hash,) in c.execute("SELECT key_hash FROM kms_idempotency"):
            assert KEY.encode() not in bytes(key_hash)


def test_two_nodes_racing_with_one_key_create_exactly_one_key(db: PgDatabase, open_store: Opener) -> None:
    nodes = [open_store(), open_store()]
    rounds = 8
    got: list[list[str]] = [[] for _ in range(rounds)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(nodes))

    def run(store: PgKeyStore) -> None:
        try:
            for i in range(rounds):
                barrier.wait()
                info = store.tenant("t1").create(kind="signature", idempotency_key=f"race-{i}")
                got[i].append(info.key_id)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(s,)) for s in nodes]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert all(len(ids) == 2 and len(set(ids)) == 1 for ids in got), got
    assert _count(db, "kms_keys") == rounds and _count(db, "kms_key_versions") == rounds


def test_a_first_request_not_committed_yet_answers_in_progress(db: PgDatabase, open_store: Opener) -> None:
    store = open_store(idempotency_wait=0.2)
    t = store.tenant("t1")
    claim = idempotency_claim(KEY, "create_key", algorithm="ml-kem-768", label=None)
    assert claim is not None
    holder = _as_kms(db, "t1")  # another node, mid-transaction, holding the key
    try:
        holder.execute(
            "INSERT INTO kms_idempotency VALUES (%s, %s, %s, %s, %s, 1, %s)",
            ("t1", claim.key_hash, claim.operation, claim.fingerprint, "k_" + "a" * 26, store.clock()),
        )
        with pytest.raises(IdempotencyKeyInProgress) as info:
            t.create(kind="kem", idempotency_key=KEY)
        assert (info.value.status, info.value.code) == (409, "idempotency_key_in_progress")
        assert (b"retry-after", b"1") in info.value.headers
        assert _count(db, "kms_keys") == 0
        # the store's connection is fine afterwards, and other keys are not held up
        assert not t.create(kind="kem", idempotency_key="another").replayed
    finally:
        holder.rollback()  # the other node's transaction fails: the key is free again
        holder.close()
    assert not t.create(kind="kem", idempotency_key=KEY).replayed
    assert t.create(kind="kem", idempotency_key=KEY).replayed
    with store.db.transaction() as conn:  # the lock wait was for that statement only
        assert conn.execute("SELECT current_setting('lock_timeout')").fetchone() == ("0",)


def test_expired_records_are_taken_over_and_swept(db: PgDatabase, open_store: Opener) -> None:
    clock = Clock()
    store = open_store(clock=clock)
    t = store.tenant("t1")
    first = t.create(kind="kem", idempotency_key=KEY)
    clock.now += DAY - 1
    assert t.create(kind="kem", idempotency_key=KEY).key_id == first.key_id
    clock.now += 1
    second = t.create(kind="signature", idempotency_key=KEY)  # expired: unknown, taken over
    assert second.key_id != first.key_id and not second.replayed
    assert t.create(kind="signature", idempotency_key=KEY).key_id == second.key_id
    open_store(clock=clock).tenant("t2").create(kind="kem", idempotency_key=KEY)
    assert _count(db, "kms_idempotency") == 2
    clock.now += DAY
    assert store.sweep_idempotency(clock.now) == 2  # across tenants, through the definer function
    assert _count(db, "kms_idempotency") == 0


def test_records_are_tenant_scoped_and_reachable_by_the_kms_role_only(
    db: PgDatabase, open_store: Opener
) -> None:
    open_store().tenant("t1").create(kind="kem", idempotency_key=KEY)
    with _as_kms(db, "t2") as c:
        assert c.execute("SELECT count(*) FROM kms_idempotency").fetchone() == (0,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("INSERT INTO kms_idempotency VALUES ('t1', %s, 'create_key', %s, 'k', 1, 1)",
                      (b"h" * 32, b"f" * 32))
    with _as_kms(db, "t1") as c:
        assert c.execute("SELECT count(*) FROM kms_idempotency").fetchone() == (1,)
    for kind in ("gateway", "admin"):
        conn = psycopg.connect(db.dsn)
        try:
            conn.execute(f"SET ROLE {db.role_prefix}_{kind}")  # type: ignore[arg-type]
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("SELECT 1 FROM kms_idempotency")
            conn.rollback()
            conn.execute(f"SET ROLE {db.role_prefix}_{kind}")  # type: ignore[arg-type]
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(f"SELECT {db.role_prefix}_kms_idempotency_expire(0)")  # type: ignore[arg-type]
        finally:
            conn.close()


def test_a_version_1_database_migrates_to_the_records_table(
    monkeypatch: pytest.MonkeyPatch, kek: LocalKEKProvider, backend: Backend
) -> None:
    require_service("PostgreSQL", PG_HOST, PG_PORT)
    tag = secrets.token_hex(5)
    pg = PgDatabase(f"qpher_t_{tag}", f"postgresql://root@{PG_HOST}:{PG_PORT}/qpher_t_{tag}", f"qt{tag}")
    _admin_exec(f'CREATE DATABASE "{pg.name}"')
    try:
        with monkeypatch.context() as m:  # a build of schema version 1
            m.setattr(migrations, "MIGRATIONS", migrations.MIGRATIONS[:1])
            m.setattr(migrations, "SCHEMA_VERSION", 1)
            assert migrate(pg.dsn, pg.role_prefix) == (0, 1)
        assert migrate(pg.dsn, pg.role_prefix) == (1, migrations.SCHEMA_VERSION)
        s = PgKeyStore.open(pg.dsn, kek, backend, role_prefix=pg.role_prefix, pool_size=1)
        try:
            k = s.tenant("t1").create(kind="kem", idempotency_key=KEY)
            assert s.tenant("t1").create(kind="kem", idempotency_key=KEY).key_id == k.key_id
        finally:
            s.close()
    finally:
        _admin_exec(f'DROP DATABASE IF EXISTS "{pg.name}" WITH (FORCE)')
        drop_roles(pg.role_prefix)
