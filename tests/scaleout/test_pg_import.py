"""Key import (BYOK) on the PostgreSQL key store: import jobs and imports on both backends, import
as a new version, refusals that store nothing, expiry through the sweep's definer function,
row-level security and the KMS-only grants of ``kms_import_jobs``, KEK rotation with a live job,
and migrating a version-2 database."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import mldsa, mlkem

from qpher_proxy.crypto.algorithms import ALGORITHMS
from qpher_proxy.crypto.interface import Backend
from qpher_proxy.crypto.key_import import IMPORT_METHODS, seed_pkcs8, wrap_key
from qpher_proxy.errors import (
    ImportJobExpired,
    ImportJobNotFound,
    InvalidKeyMaterial,
    InvalidWrappedKey,
    QpherError,
)
from qpher_proxy.kms.worker import keyfile
from qpher_proxy.kms.worker.backends import liboqs_status, select_backend
from qpher_proxy.kms.worker.kek import LocalKEKProvider
from qpher_proxy.kms.worker.kek_rotation import rotate_kek_postgresql
from qpher_proxy.kms.worker.keyfile import KeyBinding
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

BACKENDS = ["openssl", pytest.param("liboqs", marks=pytest.mark.liboqs)]
METHODS = sorted(IMPORT_METHODS)


class Clock:
    def __init__(self) -> None:
        self.now = 1_767_225_600.0

    def __call__(self) -> float:
        return self.now


def _backend(name: str) -> Backend:
    if name == "liboqs":
        present, reason = liboqs_status()
        if not present:
            pytest.skip(f"{reason}: set OQS_INSTALL_PATH to a liboqs build")
    return select_backend(name)


@pytest.fixture(scope="module")
def kek() -> LocalKEKProvider:
    return LocalKEKProvider(secrets.token_bytes(32), "test KEK")


def _new_db() -> PgDatabase:
    require_service("PostgreSQL", PG_HOST, PG_PORT)
    tag = secrets.token_hex(5)
    pg = PgDatabase(f"qpher_t_{tag}", f"postgresql://root@{PG_HOST}:{PG_PORT}/qpher_t_{tag}", f"qt{tag}")
    _admin_exec(f'CREATE DATABASE "{pg.name}"')
    return pg


def _drop(pg: PgDatabase) -> None:
    _admin_exec(f'DROP DATABASE IF EXISTS "{pg.name}" WITH (FORCE)')
    drop_roles(pg.role_prefix)


@pytest.fixture(scope="module")
def module_db() -> Iterator[PgDatabase]:
    with migrated_database() as pg:
        yield pg


@pytest.fixture
def db(module_db: PgDatabase) -> PgDatabase:
    with psycopg.connect(module_db.dsn, autocommit=True) as c:
        c.execute("TRUNCATE kms_import_jobs, kms_idempotency, kms_key_versions, kms_keys, leases")
    return module_db


Opener = Callable[..., PgKeyStore]


@pytest.fixture
def open_store(db: PgDatabase, kek: LocalKEKProvider) -> Iterator[Opener]:
    with store_opener(db, kek, _backend("openssl"), Clock) as opener:
        yield lambda backend="openssl", **kw: opener(backend=_backend(backend), **kw)


def _count(db: PgDatabase, table: str, where: str = "true") -> int:
    with psycopg.connect(db.dsn, autocommit=True) as c:
        row = c.execute(f"SELECT count(*) FROM {table} WHERE {where}").fetchone()  # type: ignore[arg-type]
    assert row is not None
    return int(row[0])


def _as(db: PgDatabase, kind: str, tenant: str) -> psycopg.Connection[Any]:
    conn = psycopg.connect(db.dsn)
    conn.execute(f"SET ROLE {db.role_prefix}_{kind}")  # type: ignore[arg-type]
    conn.execute("SELECT set_config('qpher.tenant', %s, true)", (tenant,))
    return conn


def _mldsa65() -> mldsa.MLDSA65PrivateKey:
    return mldsa.MLDSA65PrivateKey.generate()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
def test_jobs_and_imports_round_trip(db: PgDatabase, open_store: Opener, backend: str, method: str) -> None:
    t = open_store(backend).tenant("t1")
    job = t.create_import_job(method, 3600)
    assert (job.state, job.expires_at - job.created_at) == ("active", 3600)
    assert t.get_import_job(job.import_job_id) == job
    key = _mldsa65()
    wrapped = wrap_key(method, job.public_key, job.import_job_id, "ml-dsa-65", key.private_bytes_raw())
    info = t.import_key(job.import_job_id, "ml-dsa-65", wrapped, label="byok")
    assert (info.origin, info.import_job_id, info.public_key) == ("imported", job.import_job_id,
                                                                  key.public_key().public_bytes_raw())
    priv, _v = t.private_key(info.key_id)
    key.public_key().verify(priv.sign(b"m"), b"m")
    kem = mlkem.MLKEM1024PrivateKey.generate()
    der = kem.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    k2 = t.import_key(job.import_job_id, "ml-kem-1024",
                      wrap_key(method, job.public_key, job.import_job_id, "ml-kem-1024", der), format="pkcs8")
    ss, ct = kem.public_key().encapsulate()
    assert t.private_key(k2.key_id)[0].decapsulate(ct) == ss
    assert {k.key_id: k.origin for k in t.list().keys} == {info.key_id: "imported", k2.key_id: "imported"}
    assert t.get(info.key_id).import_job_id == job.import_job_id
    # a fresh store (another worker) loads the sealed version like any other
    again = open_store(backend).tenant("t1")
    key.public_key().verify(again.private_key(info.key_id)[0].sign(b"n"), b"n")
    assert [j.import_job_id for j in again.list_import_jobs().jobs] == [job.import_job_id]


def test_import_version_and_every_refusal_stores_nothing(db: PgDatabase, open_store: Opener) -> None:
    clock = Clock()
    store = open_store(clock=clock)
    t = store.tenant("t1")
    k = t.create(algorithm="ml-dsa-65")
    job = t.create_import_job("hpke-x-wing", 600)
    key = _mldsa65()

    def wrapped(material: bytes, algorithm: str = "ml-dsa-65", job_id: str | None = None) -> bytes:
        return wrap_key("hpke-x-wing", job.public_key, job_id or job.import_job_id, algorithm, material)

    v2 = t.import_key(job.import_job_id, "ml-dsa-65", wrapped(key.private_bytes_raw()), key_id=k.key_id)
    assert (v2.key_id, v2.version, v2.origin) == (k.key_id, 2, "imported")
    assert t.get(k.key_id, 1).origin == "generated"
    theirs = open_store(clock=clock).tenant("t2").create_import_job("hpke-x-wing")
    good = wrapped(key.private_bytes_raw())
    composite = ALGORITHMS["ml-dsa-65-ecdsa-p256"]
    cases: list[tuple[dict[str, Any], type[QpherError]]] = [
        ({"wrapped_key": good[:-1] + bytes([good[-1] ^ 1])}, InvalidWrappedKey),
        ({"wrapped_key": wrapped(key.private_bytes_raw(), job_id=theirs.import_job_id)}, InvalidWrappedKey),
        ({"job_id": theirs.import_job_id}, ImportJobNotFound),
        ({"job_id": "ij_" + "z" * 26}, ImportJobNotFound),
        ({"wrapped_key": wrapped(key.private_bytes_raw()[:31])}, InvalidKeyMaterial),
        ({"wrapped_key": wrapped(seed_pkcs8(ALGORITHMS["ml-dsa-44"], bytes(32))), "format": "pkcs8"},
         InvalidKeyMaterial),
        ({"algorithm": "ml-dsa-65-ecdsa-p256", "wrapped_key": wrapped(bytes(83), "ml-dsa-65-ecdsa-p256")},
         InvalidKeyMaterial),
        ({"algorithm": "ml-dsa-87", "wrapped_key": wrapped(bytes(32), "ml-dsa-87"), "key_id": k.key_id},
         InvalidKeyMaterial),
    ]
    assert composite.private_key_size == 83
    counts = (_count(db, "kms_keys"), _count(db, "kms_key_versions"))
    for override, exc in cases:
        kw: dict[str, Any] = {"job_id": job.import_job_id, "algorithm": "ml-dsa-65", "wrapped_key": good}
        kw.update(override)
        with pytest.raises(exc):
            t.import_key(**kw)
    assert (_count(db, "kms_keys"), _count(db, "kms_key_versions")) == counts
    clock.now += 600
    with pytest.raises(ImportJobExpired):
        t.import_key(job.import_job_id, "ml-dsa-65", good)
    assert t.get_import_job(job.import_job_id).state == "expired"
    assert store.sweep_due() == 0  # no key was due; the jobs were
    assert _count(db, "kms_import_jobs", "sealed IS NULL") == 1
    assert _count(db, "kms_import_jobs", "sealed IS NOT NULL") == 1  # tenant t2's, a day long
    with pytest.raises(ImportJobExpired):
        t.import_key(job.import_job_id, "ml-dsa-65", good)
    assert (_count(db, "kms_keys"), _count(db, "kms_key_versions")) == counts


def test_jobs_are_tenant_scoped_and_reachable_by_the_kms_role_only(
    db: PgDatabase, open_store: Opener
) -> None:
    job = open_store().tenant("t1").create_import_job("hpke-ml-kem-768")
    with _as(db, "kms", "t2") as c:
        assert c.execute("SELECT count(*) FROM kms_import_jobs").fetchone() == (0,)
    with _as(db, "kms", "t1") as c:
        assert c.execute("SELECT count(*) FROM kms_import_jobs").fetchone() == (1,)
        for statement in ("UPDATE kms_import_jobs SET sealed = NULL", "DELETE FROM kms_import_jobs"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute(statement)  # type: ignore[arg-type]
            c.rollback()
            c.execute(f"SET ROLE {db.role_prefix}_kms")  # type: ignore[arg-type]
            c.execute("SELECT set_config('qpher.tenant', 't1', true)")
    for kind in ("gateway", "admin"):
        with _as(db, kind, "t1") as c:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute("SELECT 1 FROM kms_import_jobs")
            c.rollback()
            c.execute(f"SET ROLE {db.role_prefix}_{kind}")  # type: ignore[arg-type]
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute(f"SELECT {db.role_prefix}_kms_import_jobs_expire(0)")  # type: ignore[arg-type]
    with psycopg.connect(db.dsn) as c:  # even the owner cannot bring a destroyed job key back
        c.execute("UPDATE kms_import_jobs SET sealed = NULL, kek_id = NULL, destroyed_at = 1 "
                  "WHERE job_id = %s", (job.import_job_id,))
        c.commit()
        with pytest.raises(psycopg.errors.CheckViolation, match="never comes back"):
            c.execute("UPDATE kms_import_jobs SET sealed = 'x', kek_id = 'k', destroyed_at = NULL "
                      "WHERE job_id = %s", (job.import_job_id,))


def test_kek_rotation_rewraps_live_jobs(db: PgDatabase, open_store: Opener, kek: LocalKEKProvider) -> None:
    store = open_store()
    job = store.tenant("t1").create_import_job("hpke-x-wing")
    store.close()
    new = LocalKEKProvider(secrets.token_bytes(32), "new KEK")
    rotate_kek_postgresql(db.dsn, kek, new)
    assert _count(db, "kms_import_jobs", f"kek_id = '{new.kek_id}'") == 1
    s = PgKeyStore.open(db.dsn, new, select_backend("openssl"), role_prefix=db.role_prefix, pool_size=1,
                        clock=Clock())
    try:
        key = _mldsa65()
        info = s.tenant("t1").import_key(
            job.import_job_id, "ml-dsa-65",
            wrap_key("hpke-x-wing", job.public_key, job.import_job_id, "ml-dsa-65", key.private_bytes_raw()),
        )
        assert info.public_key == key.public_key().public_bytes_raw()
    finally:
        s.close()


def test_a_version_2_database_migrates_to_import_jobs(
    monkeypatch: pytest.MonkeyPatch, kek: LocalKEKProvider
) -> None:
    pg = _new_db()
    try:
        with monkeypatch.context() as m:  # a build of schema version 2
            m.setattr(migrations, "MIGRATIONS", migrations.MIGRATIONS[:2])
            m.setattr(migrations, "SCHEMA_VERSION", 2)
            assert migrate(pg.dsn, pg.role_prefix) == (0, 2)
        key_id = "k_" + "a" * 26
        old = mlkem.MLKEM768PrivateKey.generate()
        sealed = keyfile.seal(kek, KeyBinding("t1", key_id, 1, "ml-kem-768"), old.private_bytes_raw())
        with psycopg.connect(pg.dsn) as c:  # a key that version wrote
            c.execute("INSERT INTO kms_keys (tenant_id, key_id, kind, algorithm, state, latest_version, "
                      "created_at, updated_at) VALUES ('t1', %s, 'kem', 'ml-kem-768', 'enabled', 1, 1, 1)",
                      (key_id,))
            c.execute("INSERT INTO kms_key_versions VALUES "
                      "('t1', %s, 1, 'ml-kem-768', 'active', %s, %s, %s, 1)",
                      (key_id, old.public_key().public_bytes_raw(), sealed, kek.kek_id))
        assert migrate(pg.dsn, pg.role_prefix) == (2, migrations.SCHEMA_VERSION)
        with psycopg.connect(pg.dsn) as c:
            assert c.execute("SELECT origin, import_job_id FROM kms_key_versions").fetchall() == [
                ("generated", None)
            ]
        s = PgKeyStore.open(pg.dsn, kek, select_backend("openssl"), role_prefix=pg.role_prefix,
                            pool_size=1)
        try:
            t = s.tenant("t1")
            assert t.get(key_id).origin == "generated"
            ss, ct = old.public_key().encapsulate()
            assert t.private_key(key_id)[0].decapsulate(ct) == ss
            job = t.create_import_job("hpke-ml-kem-1024")
            key = _mldsa65()
            wrapped = wrap_key("hpke-ml-kem-1024", job.public_key, job.import_job_id, "ml-dsa-65",
                               key.private_bytes_raw())
            assert t.import_key(job.import_job_id, "ml-dsa-65", wrapped).origin == "imported"
        finally:
            s.close()
    finally:
        _drop(pg)


def test_db_import_sqlite_moves_imported_keys_and_live_jobs(db: PgDatabase, kek: LocalKEKProvider,
                                                            tmp_path: Path) -> None:
    from qpher_proxy.kms.worker.keystore import KeyStore
    from qpher_proxy.storage.import_sqlite import import_sqlite

    with psycopg.connect(db.dsn, autocommit=True) as c:
        c.execute("TRUNCATE kms_meta")
    clock = Clock()
    sqlite_store = KeyStore(tmp_path / "kms", kek, select_backend("openssl"), clock=clock)
    try:
        t = sqlite_store.tenant("t1")
        job = t.create_import_job("hpke-ml-kem-768")
        key = _mldsa65()
        wrapped = wrap_key("hpke-ml-kem-768", job.public_key, job.import_job_id, "ml-dsa-65",
                           key.private_bytes_raw())
        imported = t.import_key(job.import_job_id, "ml-dsa-65", wrapped)
        generated = t.create(algorithm="ml-kem-768")
    finally:
        sqlite_store.close()
    report = import_sqlite(dsn=db.dsn, role_prefix=db.role_prefix, auth_db=tmp_path / "none.db",
                           kms_dir=tmp_path / "kms")
    assert (report.keys, report.versions, report.import_jobs) == (2, 2, 1)
    s = PgKeyStore.open(db.dsn, kek, select_backend("openssl"), role_prefix=db.role_prefix, pool_size=1,
                        clock=clock)
    try:
        t2 = s.tenant("t1")
        got = t2.get(imported.key_id)
        assert (got.origin, got.import_job_id) == ("imported", job.import_job_id)
        assert t2.get(generated.key_id).origin == "generated"
        key.public_key().verify(t2.private_key(imported.key_id)[0].sign(b"m"), b"m")
        assert t2.get_import_job(job.import_job_id) == job  # and it still opens what is wrapped for it
        other = _mldsa65()
        again = t2.import_key(job.import_job_id, "ml-dsa-65", wrap_key(
            "hpke-ml-kem-768", job.public_key, job.import_job_id, "ml-dsa-65", other.private_bytes_raw()))
        assert again.public_key == other.public_key().public_bytes_raw()
    finally:
        s.close()
