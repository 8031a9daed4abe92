"""The KMS key store on the machine's PostgreSQL: the SQLite store's lifecycle tests, two nodes on
one database, row-level security, the sweep lease with fencing, exactly-once destruction, the
sealed bytes, the KEK check, an outage, and a real worker process."""

from __future__ import annotations

import logging
import os
import secrets
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from qpher_proxy.context import TenantContext
from qpher_proxy.crypto.algorithms import ALGORITHMS
from qpher_proxy.crypto.interface import Backend
from qpher_proxy.errors import (
    InvalidKeyState,
    KeyDestroyed,
    KeyDisabled,
    StorageUnavailable,
)
from qpher_proxy.kms.launcher import open_kms
from qpher_proxy.kms.wire.model import KEKSettings, KeyState, KMSStorageSettings
from qpher_proxy.kms.worker import keyfile
from qpher_proxy.kms.worker.backends import select_backend
from qpher_proxy.kms.worker.kek import FileKEKProvider, KEKMismatch, LocalKEKProvider, generate_kek_file
from qpher_proxy.kms.worker.keyfile import KeyBinding
from qpher_proxy.kms.worker.lease import Lease, LeaseLost
from qpher_proxy.kms.worker.pg_keystore import PgKeyStore
from qpher_proxy.storage.postgres import Database

from .conftest import (
    PgDatabase,
    migrated_database,
    store_opener,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kms"))
import test_kms_keystore as sqlite_tests  # noqa: E402  (the SQLite store's tests, run here on PostgreSQL)
from kms_helpers import FakeClock  # noqa: E402

# The SQLite tests that touch no key file: each runs unchanged against a PgKeyStore.
SHARED = (
    "test_create_picks_defaults_by_kind_and_mode",
    "test_key_ids_are_random_130_bit_base32",
    "test_the_repository_needs_a_tenant",
    "test_another_tenants_key_answers_exactly_like_a_missing_one",
    "test_list_paginates_with_a_cursor",
    "test_rotation_signs_with_the_latest_and_accepts_older_versions",
    "test_disable_and_enable",
)


@pytest.fixture(scope="module")
def backend() -> Backend:
    return select_backend("openssl")


@pytest.fixture
def kek() -> LocalKEKProvider:
    return LocalKEKProvider(secrets.token_bytes(32), "test KEK")


@pytest.fixture(scope="module")
def module_db() -> Iterator[PgDatabase]:
    """One migrated database for this module (``conftest.pg`` makes one per test, which costs
    more than most of these tests); ``db`` empties its KMS tables before each test."""
    with migrated_database() as pg:
        yield pg


@pytest.fixture
def db(module_db: PgDatabase) -> PgDatabase:
    with psycopg.connect(module_db.dsn, autocommit=True) as c:
        c.execute("TRUNCATE kms_key_versions, kms_keys, kms_meta, leases")
    return module_db


Opener = Callable[..., PgKeyStore]


@pytest.fixture
def open_store(db: PgDatabase, kek: LocalKEKProvider, backend: Backend) -> Iterator[Opener]:
    """Open PgKeyStores ("nodes") on the test database; all closed at the end."""
    with store_opener(db, kek, backend, FakeClock) as opener:
        yield opener


def _owner(pg: PgDatabase) -> psycopg.Connection[Any]:
    return psycopg.connect(pg.dsn, autocommit=True)


def _as(pg: PgDatabase, kind: str, tenant: str | None = None) -> psycopg.Connection[Any]:
    conn = psycopg.connect(pg.dsn)
    conn.execute(f"SET ROLE {pg.role_prefix}_{kind}")  # type: ignore[arg-type]
    if tenant is not None:
        conn.execute("SELECT set_config('qpher.tenant', %s, true)", (tenant,))
    return conn


# ---- the SQLite store's lifecycle tests, unchanged, on PostgreSQL ------------------------------


def test_the_sqlite_lifecycle_tests_pass_on_postgresql(db: PgDatabase, open_store: Opener) -> None:
    store = open_store()
    for name in SHARED:
        getattr(sqlite_tests, name)(store)
        with _owner(db) as c:  # each test starts from an empty store
            c.execute("TRUNCATE kms_key_versions, kms_keys")
        store._hot.clear()


def test_destruction_is_scheduled_cancelled_and_done_when_due(db: PgDatabase, open_store: Opener) -> None:
    clock = FakeClock()
    store = open_store(clock=clock)
    t = store.tenant("tenant-a")
    k = t.create(kind="kem")
    t.rotate(k.key_id)
    info = t.schedule_destroy(k.key_id)
    assert info.state is KeyState.PENDING_DESTRUCTION and info.destroy_at == clock.now + 86_400
    with pytest.raises(KeyDisabled, match="scheduled for destruction"):
        t.private_key(k.key_id)
    with pytest.raises(InvalidKeyState):
        t.enable(k.key_id)
    clock.advance(3600)
    assert t.schedule_destroy(k.key_id, 10).destroy_at == info.destroy_at  # keeps the first date
    assert t.cancel_destroy(k.key_id).state is KeyState.ENABLED
    t.disable(k.key_id)
    t.schedule_destroy(k.key_id, 60)
    assert t.cancel_destroy(k.key_id).state is KeyState.DISABLED  # back to the state before
    t.schedule_destroy(k.key_id, 60)
    clock.advance(59)
    assert store.sweep_due() == 0
    clock.advance(1)
    assert store.sweep_due() == 1
    tomb = t.get(k.key_id)
    assert tomb.state is KeyState.DESTROYED and tomb.public_key is None and tomb.destroyed_at == clock.now
    assert [v.state for v in tomb.versions] == ["destroyed", "destroyed"]
    with _owner(db) as c:  # the sealed bytes are gone, the tombstone stays: never a DELETE
        assert c.execute("SELECT count(*), count(sealed) FROM kms_key_versions").fetchone() == (2, 0)
    with pytest.raises(KeyDestroyed):
        t.private_key(k.key_id, 1)
    for op in (t.enable, t.rotate, t.schedule_destroy):
        with pytest.raises(KeyDestroyed):
            op(k.key_id)
    # lazily, on access: a due key is destroyed by the request that touches it, which is refused
    k2 = t.create(kind="signature").key_id
    t.private_key(k2)
    t.schedule_destroy(k2, 5)
    clock.advance(5)
    with pytest.raises(KeyDestroyed):
        t.private_key(k2)
    assert t.get(k2).state is KeyState.DESTROYED  # the destruction committed despite the refusal
    assert t.schedule_destroy(t.create(kind="kem").key_id, 0).state is KeyState.DESTROYED


def test_the_sealed_column_holds_a_key_file_blob(
    db: PgDatabase, open_store: Opener, kek: LocalKEKProvider, backend: Backend
) -> None:
    t = open_store().tenant("t1")
    k = t.create(algorithm="ml-dsa-65")
    with _owner(db) as c:
        sealed, public, kek_id = c.execute(
            "SELECT sealed, public_key, kek_id FROM kms_key_versions WHERE key_id = %s", (k.key_id,)
        ).fetchone()  # type: ignore[misc]
    binding = KeyBinding("t1", k.key_id, 1, "ml-dsa-65")
    assert keyfile.parse_header(sealed, "x").kek_id == kek.kek_id == kek_id
    seed = keyfile.unseal(kek, binding, bytes(sealed))
    assert backend.load_private(ALGORITHMS["ml-dsa-65"], seed).public_key().public_bytes() == public
    with pytest.raises(Exception, match="failed authentication"):  # bound to its tenant, like a file
        keyfile.unseal(kek, KeyBinding("t2", k.key_id, 1, "ml-dsa-65"), bytes(sealed))


# ---- two nodes on one database -----------------------------------------------------------------


def test_two_nodes_share_keys_and_a_disable_holds_everywhere_within_a_second(
    db: PgDatabase, open_store: Opener
) -> None:
    a, b = open_store(clock=time.time), open_store(clock=time.time)  # default state_ttl (0.5 s)
    k = a.tenant("t1").create(kind="signature").key_id
    priv_b, version = b.tenant("t1").private_key(k)
    sig = priv_b.sign(b"signed on B")
    assert a.tenant("t1").public_key(k)[0].verify(sig, b"signed on B") and version == 1
    assert b.tenant("t1").private_key(k)[0] is priv_b  # B has it cached and its state too
    a.tenant("t1").disable(k)
    start = time.monotonic()
    while True:
        try:
            b.tenant("t1").private_key(k)
        except KeyDisabled:
            break
        assert time.monotonic() - start < 1.0, "B still signs with a key disabled on A"
        time.sleep(0.02)
    with pytest.raises(KeyDisabled):
        a.tenant("t1").private_key(k)  # the writer itself at once
    # a rotation on B is seen by A's next resolve of the latest version (after the reuse window)
    a.tenant("t1").enable(k)
    b.tenant("t1").rotate(k)
    assert a.tenant("t1").private_key(k)[1] == 2


def test_concurrent_rotations_on_two_nodes_never_reuse_a_version(db: PgDatabase, open_store: Opener) -> None:
    a, b = open_store(), open_store()
    k = a.tenant("t1").create(kind="kem").key_id
    errors: list[BaseException] = []

    def rotate(s: PgKeyStore) -> None:
        try:
            for _ in range(4):
                s.tenant("t1").rotate(k)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=rotate, args=(s,)) for s in (a, b)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    info = a.tenant("t1").get(k)
    assert info.latest_version == 9 and [v.version for v in info.versions] == list(range(1, 10))


def test_a_destroyed_key_never_comes_back(db: PgDatabase, open_store: Opener) -> None:
    t = open_store().tenant("t1")
    k = t.create(kind="kem").key_id
    t.schedule_destroy(k, 0)
    with _as(db, "kms", "t1") as c:
        with pytest.raises(psycopg.errors.CheckViolation, match="never comes back"):
            c.execute("UPDATE kms_keys SET state = 'enabled' WHERE key_id = %s", (k,))
    with _as(db, "kms", "t1") as c:
        with pytest.raises(psycopg.errors.CheckViolation):
            c.execute("UPDATE kms_key_versions SET sealed = 'x' WHERE key_id = %s", (k,))
    with _as(db, "kms", "t1") as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("DELETE FROM kms_keys WHERE key_id = %s", (k,))
    assert t.get(k).state is KeyState.DESTROYED


# ---- row-level security and GRANTs ---------------------------------------------------------


def test_the_kms_role_sees_one_tenant_and_the_gateway_role_no_key(db: PgDatabase, open_store: Opener) -> None:
    s = open_store()
    mine = {s.tenant("t1").create(kind="kem").key_id for _ in range(2)}
    theirs = s.tenant("t2").create(kind="kem").key_id
    with _as(db, "kms", "t1") as c:
        rows = c.execute("SELECT * FROM kms_keys").fetchall()
        assert {r[1] for r in rows} == mine and all(r[0] == "t1" for r in rows)
        assert c.execute("SELECT count(*) FROM kms_keys WHERE key_id = %s", (theirs,)).fetchone() == (0,)
        assert c.execute("SELECT count(*) FROM kms_key_versions WHERE tenant_id = 't2'").fetchone() == (0,)
        c.execute("UPDATE kms_keys SET label = 'x' WHERE key_id = %s", (theirs,))  # touches nothing
    with _as(db, "kms", None) as c:  # no tenant set: nothing at all
        assert c.execute("SELECT count(*) FROM kms_keys").fetchone() == (0,)
    for table in ("kms_keys", "kms_key_versions", "kms_meta"):
        with _as(db, "gateway", "t1") as c:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute(f"SELECT * FROM {table}")  # type: ignore[arg-type]
    with _owner(db) as c:
        assert c.execute("SELECT label FROM kms_keys WHERE key_id = %s", (theirs,)).fetchone() == (None,)


# ---- the sweep lease -----------------------------------------------------------------------


def test_the_lease_is_exclusive_expires_on_the_database_clock_and_fences_a_late_holder(
    db: PgDatabase, open_store: Opener
) -> None:
    clock = FakeClock()
    a = open_store(clock=clock, lease_ttl=0.6)
    b = open_store(clock=clock, lease_ttl=0.6)
    assert a.lease.acquire() and a.lease.token == 1
    assert not b.lease.acquire() and b.lease.token is None
    assert a.lease.renew()
    t = a.tenant("t1")
    k = t.create(kind="kem").key_id
    t.schedule_destroy(k, 10)
    time.sleep(0.7)  # A stops renewing: paused past its TTL
    assert b.lease.acquire() and b.lease.token == 2  # a higher token
    assert not a.lease.renew() and a.lease.token is None  # the late renewal fails, takes nothing
    a.lease.token = 1  # A still believes it holds token 1 (paused before it could notice)
    clock.advance(10)
    with pytest.raises(LeaseLost):
        t._destroy_if_due(k, clock.now, fenced=True)
    with _owner(db) as c:  # the fenced write was refused (read raw: a get() would destroy it lazily)
        assert c.execute("SELECT state FROM kms_keys").fetchone() == ("pending_destruction",)
    assert a.sweep_due() == 0  # not the holder: A does not sweep (and cannot take B's live lease)
    assert b.sweep_due() == 1 and b.tenant("t1").get(k).state is KeyState.DESTROYED
    with _owner(db) as c:
        assert c.execute("SELECT holder, token FROM leases").fetchall() == [(b.lease.holder, 2)]


def test_a_renewal_never_recreates_a_lease(db: PgDatabase) -> None:
    database = Database(db.dsn, role=f"{db.role_prefix}_kms", pool_size=1)
    try:
        lease = Lease(database, 5.0)
        assert lease.acquire()
        with _owner(db) as c:
            c.execute("DELETE FROM leases")
        assert not lease.renew()
        with _owner(db) as c:
            assert c.execute("SELECT count(*) FROM leases").fetchone() == (0,)
        assert lease.tick() and lease.token == 1  # acquiring again is an acquire, not a renewal
        lease.release()
        assert Lease(database, 5.0).acquire()  # released: taken over at once
    finally:
        database.close()


def test_racing_destructions_happen_and_are_logged_exactly_once(
    db: PgDatabase, open_store: Opener, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    a, b = open_store(clock=clock), open_store(clock=clock)
    keys = [a.tenant("t1").create(kind="kem").key_id for _ in range(12)]
    for k in keys:
        a.tenant("t1").schedule_destroy(k, 30)
    clock.advance(30)
    assert a.lease.acquire()
    done: list[bool] = []
    barrier = threading.Barrier(3)

    def sweeper() -> None:  # the lease holder's sweep
        barrier.wait()
        done.extend([True] * a.sweep_due())

    def lazy(s: PgKeyStore) -> None:  # requests touching the due keys on the other node
        barrier.wait()
        for k in keys:
            done.append(s.tenant("t1")._destroy_if_due(k, clock.now))
            with pytest.raises(KeyDestroyed):
                s.tenant("t1").private_key(k)

    c = open_store(clock=clock)  # a third node (one store per thread: a store is not thread-safe)
    caplog.set_level(logging.INFO, logger="qpher.kms.keystore")
    threads = [threading.Thread(target=sweeper), threading.Thread(target=lazy, args=(b,)),
               threading.Thread(target=lazy, args=(c,))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert done.count(True) == len(keys)
    logged = [r for r in caplog.records if r.getMessage() == "key destroyed"]
    assert sorted(r.fields["key_id"] for r in logged) == sorted(keys)  # type: ignore[attr-defined]
    with _owner(db) as c:
        assert c.execute("SELECT count(*) FROM kms_keys WHERE state = 'destroyed'").fetchone() == (12,)


# ---- the KEK check -------------------------------------------------------------------------


def test_a_wrong_kek_is_refused_by_the_canary_or_by_a_sealed_version(
    db: PgDatabase, open_store: Opener, kek: LocalKEKProvider
) -> None:
    open_store().tenant("t1").create(kind="kem")
    other = LocalKEKProvider(secrets.token_bytes(32), "other KEK")
    with pytest.raises(KEKMismatch, match="is not the KEK of this key store"):
        open_store(kek=other)
    with _owner(db) as c:
        c.execute("DELETE FROM kms_meta")
    with pytest.raises(KEKMismatch):
        open_store(kek=other)  # checked against the sealed version
    with _owner(db) as c:
        assert c.execute("SELECT count(*) FROM kms_meta").fetchone() == (0,)  # nothing written
    open_store()  # the right KEK re-creates the canary
    with _owner(db) as c:
        assert c.execute("SELECT count(*) FROM kms_meta").fetchone() == (1,)


def test_two_nodes_racing_on_a_new_database_with_different_keks(db: PgDatabase, open_store: Opener) -> None:
    keks = [LocalKEKProvider(secrets.token_bytes(32), f"kek {i}") for i in range(2)]
    outcome: list[str] = []

    def start(k: LocalKEKProvider) -> None:
        try:
            open_store(kek=k)
            outcome.append("ok")
        except KEKMismatch:
            outcome.append("mismatch")

    threads = [threading.Thread(target=start, args=(k,)) for k in keks]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(outcome) == ["mismatch", "ok"]


# ---- an outage -------------------------------------------------------------------------------


def test_an_unreachable_database_is_storage_unavailable_quickly(
    kek: LocalKEKProvider, backend: Backend
) -> None:
    with socket_closed_port() as port:
        dsn = f"postgresql://qpher:secret@127.0.0.1:{port}/nowhere"
        start = time.monotonic()
        with pytest.raises(StorageUnavailable) as info:
            PgKeyStore.open(dsn, kek, backend, role_prefix="qpher", connect_timeout=0.3, pool_timeout=0.3)
        assert time.monotonic() - start < 3.0
        assert "secret" not in info.value.message and dsn not in info.value.message
        database = Database(dsn, role="qpher_kms", pool_size=1, connect_timeout=0.5, pool_timeout=0.3)
        try:
            start = time.monotonic()
            with pytest.raises(StorageUnavailable):
                with database.transaction(tenant="t1") as conn:
                    conn.execute("SELECT 1")
            assert time.monotonic() - start < 2.0
        finally:
            database.close()


class socket_closed_port:
    """A local TCP port nothing listens on (bound, then closed)."""

    def __enter__(self) -> int:
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        s.close()
        return port

    def __exit__(self, *exc: object) -> None:
        return None


# ---- a real worker process -----------------------------------------------------------------


async def test_a_worker_process_serves_keys_from_postgresql(db: PgDatabase, tmp_path: Path) -> None:
    kek_path = tmp_path / "kek.b64"
    generate_kek_file(kek_path)
    kms_dir = tmp_path / "kms"
    storage = KMSStorageSettings(dsn=db.dsn, role_prefix=db.role_prefix, pool_size=2, lease_ttl=3.0,
                                 sweep_interval=1.0)
    assert db.dsn not in repr(storage)
    async with open_kms(kms_dir=kms_dir, kek=KEKSettings("file", str(kek_path)), workers=1,
                        backend="openssl", start_timeout=30.0, storage=storage) as sup:
        assert sup.info[0]["storage"] == "postgresql"
        pid = sup.pids[0]
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert db.dsn.encode() not in cmdline and b"postgresql" not in cmdline
        ctx = TenantContext("tenant-a", "req-1", "ak_test")
        k = await sup.client.create_key(ctx, kind="signature")
        sig, version = await sup.client.sign(ctx, k.key_id, b"hello")
        assert version == 1 and await sup.client.verify(ctx, k.key_id, b"hello", sig)
    # the keys are in the database, nothing key-related in the KMS directory
    with _owner(db) as c:
        assert c.execute("SELECT count(*), count(sealed) FROM kms_key_versions").fetchone() == (1, 1)
        assert c.execute("SELECT count(*) FROM kms_meta").fetchone() == (1,)
    assert not kms_dir.exists() or not any(kms_dir.rglob("*"))
    # the key opens with the KEK from the file
    s = PgKeyStore.open(
        db.dsn, FileKEKProvider(kek_path), select_backend("openssl"), role_prefix=db.role_prefix
    )
    try:
        assert s.tenant("tenant-a").private_key(k.key_id)[1] == 1
    finally:
        s.close()
    assert os.environ.get("PGPASSWORD") is None


def test_the_supervisor_settings_carry_the_kms_dsn_in_hello_only() -> None:
    from qpher_proxy.config.model import Config, StorageConfig
    from qpher_proxy.server.settings import kms_supervisor

    dsn, kms_dsn = "postgresql://gw:pw1@db/q", "postgresql://kms:pw2@db/q"
    cfg = Config(storage=StorageConfig(backend="postgresql", dsn=dsn, kms_dsn=kms_dsn, role_prefix="acme",
                                       lease_ttl=9.0, sweep_interval=2.0))
    sup = kms_supervisor(cfg)
    hello = sup._hello_config(0)
    assert hello["storage"] == {
        "backend": "postgresql", "dsn": kms_dsn, "role_prefix": "acme", "pool_size": 8,
        "connect_timeout": 3.0, "statement_timeout": 5.0, "pool_timeout": 2.0, "lease_ttl": 9.0,
        "sweep_interval": 2.0,
    }
    assert "pw2" not in repr(sup.storage) and "pw2" not in repr(sup)
    sqlite = kms_supervisor(Config())
    assert sqlite.storage is None and "storage" not in sqlite._hello_config(0)


def test_keys_imported_from_a_sqlite_store_serve_from_postgresql(
    db: PgDatabase, open_store: Opener, tmp_path: Path, backend: Backend
) -> None:
    from qpher_proxy.kms.worker.keystore import KeyStore
    from qpher_proxy.storage.import_sqlite import import_sqlite

    kek_path = tmp_path / "kek.b64"
    generate_kek_file(kek_path)
    old = KeyStore(tmp_path / "kms", FileKEKProvider(kek_path), backend)
    try:
        t = old.tenant("t1")
        k = t.create(kind="signature").key_id
        t.rotate(k)
        pub1 = t.public_key(k, 1)[0].public_bytes()
    finally:
        old.close()
    report = import_sqlite(dsn=db.dsn, role_prefix=db.role_prefix, auth_db=tmp_path / "none.db",
                           kms_dir=tmp_path / "kms")
    assert (report.keys, report.versions, report.canary) == (1, 2, True)
    with pytest.raises(KEKMismatch):  # the imported canary: another KEK is refused
        open_store()
    s = open_store(kek=FileKEKProvider(kek_path))
    priv, version = s.tenant("t1").private_key(k, 1)
    assert version == 1 and s.tenant("t1").public_key(k, 1)[0].verify(priv.sign(b"m"), b"m")
    assert priv.public_key().public_bytes() == pub1
    assert s.tenant("t1").private_key(k)[1] == 2


def test_with_state_ttl_zero_every_request_reads_the_state(db: PgDatabase, open_store: Opener) -> None:
    a, b = open_store(), open_store(state_ttl=0.0)
    k = a.tenant("t1").create(kind="kem").key_id
    b.tenant("t1").private_key(k)
    a.tenant("t1").disable(k)
    with pytest.raises(KeyDisabled):
        b.tenant("t1").private_key(k)  # at once: nothing reused


def test_a_sqlite_worker_preloads_no_psycopg_and_a_postgresql_one_all_it_needs() -> None:
    import subprocess

    code = (
        "import sys\n"
        "from qpher_proxy.sandbox import preload\n"
        "from qpher_proxy.kms.worker.service import PRELOAD, PRELOAD_SKIP, PRELOAD_PG\n"
        "preload(PRELOAD, skip=PRELOAD_SKIP)\n"
        "print('psycopg' in sys.modules)\n"
        "preload(PRELOAD_PG)\n"
        "print('qpher_proxy.kms.worker.pg_keystore' in sys.modules and 'psycopg_pool' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True"]
