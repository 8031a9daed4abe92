"""Key import (BYOK) on the SQLite key store: import jobs, keys wrapped with ``cryptography``'s own
HPKE (``hpke.Suite``: X-Wing, ML-KEM-768, ML-KEM-1024 with HKDF-SHA256 / AES-256-GCM), every
algorithm on both backends, in process and through real worker processes; every refusal stores
nothing; expiry and the sweep; a store of schema version 2; KEK rotation with live jobs."""

from __future__ import annotations

import hashlib
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, hpke, serialization
from cryptography.hazmat.primitives.asymmetric import ec, mldsa, mlkem, x25519
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kms_helpers import FakeClock, ctx, reopen, tree_snapshot
from kms_helpers import settings as kms_settings

from qpher_proxy.crypto.algorithms import ALGORITHMS
from qpher_proxy.crypto.interface import Backend
from qpher_proxy.crypto.key_import import IMPORT_METHODS, import_info, seed_pkcs8
from qpher_proxy.errors import (
    ImportJobExpired,
    ImportJobNotFound,
    InvalidInput,
    InvalidKeyMaterial,
    InvalidWrappedKey,
    KeyNotFound,
    QpherError,
)
from qpher_proxy.kms.launcher import open_kms
from qpher_proxy.kms.worker.backends import liboqs_status, select_backend
from qpher_proxy.kms.worker.backends._hybrid import COMPOSITE_LABEL, composite_message
from qpher_proxy.kms.worker.kek import FileKEKProvider, generate_kek_file
from qpher_proxy.kms.worker.kek_rotation import rotate_kek
from qpher_proxy.kms.worker.keydb import DB_FILE, SCHEMA_VERSION
from qpher_proxy.kms.worker.keystore import KeyStore
from qpher_proxy.kms.worker.tenant_keys import TenantKeys

BACKENDS = ["openssl", pytest.param("liboqs", marks=pytest.mark.liboqs)]
METHODS = sorted(IMPORT_METHODS)
ALL = sorted(ALGORITHMS)
MESSAGE = b"imported keys sign like generated ones"
SUITE_KEMS = {"x-wing": hpke.KEM.MLKEM768_X25519, "ml-kem-768": hpke.KEM.MLKEM768,
              "ml-kem-1024": hpke.KEM.MLKEM1024}
SEC1_PREFIX, SEC1_SUFFIX = bytes.fromhex("30310201010420"), bytes.fromhex("a00a06082a8648ce3d030107")


def _backend(name: str) -> Backend:
    if name == "liboqs":
        present, reason = liboqs_status()
        if not present:
            pytest.skip(f"{reason}: set OQS_INSTALL_PATH to a liboqs build")
    return select_backend(name)


@pytest.fixture(params=BACKENDS)
def any_backend(request: pytest.FixtureRequest) -> Backend:
    return _backend(request.param)


@pytest.fixture
def any_store(kms_dir: Path, kek_path: Path, any_backend: Backend, clock: FakeClock) -> Any:
    s = KeyStore(kms_dir, FileKEKProvider(kek_path), any_backend, clock=clock)
    yield s
    s.close()


# ---- a client's side, written with cryptography alone ----------------------------------------


@dataclass
class LocalKey:
    """A private key made outside the KMS: its seed form, its PKCS#8 and its public key, all
    computed with cryptography (and, for X-Wing, the draft's SHAKE256 expansion)."""

    algorithm: str
    seed: bytes
    pkcs8: bytes
    public: bytes
    obj: Any = None  # the cryptography key (ML-KEM, ML-DSA) or (ML-DSA, EC) for the composite


def local_key(algorithm: str) -> LocalKey:
    alg = ALGORITHMS[algorithm]
    if algorithm.startswith(("ml-kem", "ml-dsa")) and algorithm != "ml-dsa-65-ecdsa-p256":
        cls = {"ml-kem-768": mlkem.MLKEM768PrivateKey, "ml-kem-1024": mlkem.MLKEM1024PrivateKey,
               "ml-dsa-44": mldsa.MLDSA44PrivateKey, "ml-dsa-65": mldsa.MLDSA65PrivateKey,
               "ml-dsa-87": mldsa.MLDSA87PrivateKey}[algorithm]
        k = cls.generate()
        der = k.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())
        return LocalKey(algorithm, k.private_bytes_raw(), der, k.public_key().public_bytes_raw(), k)
    if algorithm == "x-wing":
        seed = os.urandom(32)
        expanded = hashlib.shake_256(seed).digest(96)
        m = mlkem.MLKEM768PrivateKey.from_seed_bytes(expanded[:64])
        x = x25519.X25519PrivateKey.from_private_bytes(expanded[64:])
        public = m.public_key().public_bytes_raw() + x.public_key().public_bytes_raw()
        return LocalKey(algorithm, seed, seed_pkcs8(alg, seed), public, (m, x))
    d = mldsa.MLDSA65PrivateKey.generate()
    e = ec.generate_private_key(ec.SECP256R1())
    scalar = e.private_numbers().private_value.to_bytes(32, "big")
    seed = d.private_bytes_raw() + SEC1_PREFIX + scalar + SEC1_SUFFIX
    point = e.public_key().public_bytes(serialization.Encoding.X962,
                                        serialization.PublicFormat.UncompressedPoint)
    return LocalKey(algorithm, seed, seed_pkcs8(alg, seed), d.public_key().public_bytes_raw() + point, (d, e))


def hpke_public(method: str, raw: bytes) -> Any:
    if method == "hpke-x-wing":
        return hpke.MLKEM768X25519PublicKey(
            mlkem.MLKEM768PublicKey.from_public_bytes(raw[:1184]),
            x25519.X25519PublicKey.from_public_bytes(raw[1184:]),
        )
    cls = mlkem.MLKEM768PublicKey if method == "hpke-ml-kem-768" else mlkem.MLKEM1024PublicKey
    return cls.from_public_bytes(raw)


def wrap(method: str, job_public: bytes, job_id: str, algorithm: str, plaintext: bytes) -> bytes:
    """What a client sends: cryptography's single-shot HPKE (no aad) with the import info."""
    suite = hpke.Suite(SUITE_KEMS[IMPORT_METHODS[method].name], hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
    return suite.encrypt(plaintext, hpke_public(method, job_public), info=import_info(job_id, algorithm))


def check_works(t: TenantKeys, key_id: str, local: LocalKey) -> None:
    """The imported key does the work of the local one, checked with cryptography."""
    priv, _version = t.private_key(key_id)
    a = local.algorithm
    if a.startswith("ml-dsa") and a != "ml-dsa-65-ecdsa-p256":
        local.obj.public_key().verify(priv.sign(MESSAGE, b"ctx"), MESSAGE, b"ctx")
    elif a == "ml-dsa-65-ecdsa-p256":
        sig = priv.sign(MESSAGE, b"ctx")
        m_prime = composite_message(MESSAGE, b"ctx")
        local.obj[0].public_key().verify(sig[:3309], m_prime, COMPOSITE_LABEL)
        local.obj[1].public_key().verify(sig[3309:], m_prime, ec.ECDSA(hashes.SHA256()))
    elif a == "x-wing":
        suite = hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
        sealed = suite.encrypt(b"to the imported key", hpke_public("hpke-x-wing", local.public), info=b"i")
        assert priv.hpke_open(sealed, info=b"i") == b"to the imported key"
    else:
        ss, ct = local.obj.public_key().encapsulate()
        assert priv.decapsulate(ct) == ss


# ---- round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("algorithm", ALL)
def test_every_algorithm_imports_through_every_method(
    any_store: KeyStore, method: str, algorithm: str
) -> None:
    t = any_store.tenant("tenant-a")
    job = t.create_import_job(method)
    assert (job.method, job.state, job.expires_at - job.created_at) == (method, "active", 86400)
    assert len(job.public_key) == IMPORT_METHODS[method].public_key_size
    local = local_key(algorithm)
    wrapped = wrap(method, job.public_key, job.import_job_id, algorithm, local.seed)
    info = t.import_key(job.import_job_id, algorithm, wrapped, label="byok")
    assert (info.algorithm, info.version, info.label) == (algorithm, 1, "byok")
    assert (info.origin, info.import_job_id) == ("imported", job.import_job_id)
    assert info.public_key == local.public
    wire = info.to_wire()
    assert wire["origin"] == "imported" and wire["import_job_id"] == job.import_job_id
    check_works(t, info.key_id, local)
    assert t.get(info.key_id).origin == "imported"


@pytest.mark.parametrize("algorithm", ALL)
def test_every_algorithm_imports_from_its_seed_form_pkcs8(any_store: KeyStore, algorithm: str) -> None:
    t = any_store.tenant("tenant-a")
    job = t.create_import_job("hpke-x-wing", 3600)
    local = local_key(algorithm)
    wrapped = wrap("hpke-x-wing", job.public_key, job.import_job_id, algorithm, local.pkcs8)
    info = t.import_key(job.import_job_id, algorithm, wrapped, format="pkcs8")
    assert info.public_key == local.public
    check_works(t, info.key_id, local)


def test_an_imported_key_is_stored_exactly_like_a_generated_one(kms_dir: Path, kek_path: Path,
                                                                   backend: Backend) -> None:
    store = reopen(kms_dir, kek_path, backend)
    t = store.tenant("tenant-a")
    job = t.create_import_job("hpke-ml-kem-768")
    local = local_key("ml-dsa-65")
    info = t.import_key(job.import_job_id, "ml-dsa-65",
                        wrap("hpke-ml-kem-768", job.public_key, job.import_job_id, "ml-dsa-65", local.seed))
    files = list((kms_dir / "keys").rglob("*.qkey"))
    assert len(files) == 1 and local.seed not in files[0].read_bytes()
    for path in kms_dir.rglob("*"):
        if path.is_file():
            assert local.seed not in path.read_bytes(), path
    store.close()
    again = reopen(kms_dir, kek_path, backend)  # a fresh worker loads it from its key file
    try:
        check_works(again.tenant("tenant-a"), info.key_id, local)
        assert again.tenant("tenant-a").rotate(info.key_id).origin == "generated"
        assert again.tenant("tenant-a").get(info.key_id, 1).origin == "imported"
    finally:
        again.close()


def test_import_version_adds_a_version_like_rotate(store: KeyStore) -> None:
    t = store.tenant("tenant-a")
    k = t.create(algorithm="ml-kem-1024")
    assert (k.origin, k.import_job_id) == ("generated", None) and "import_job_id" not in k.to_wire()
    job = t.create_import_job("hpke-x-wing")
    first, second = local_key("ml-kem-1024"), local_key("ml-kem-1024")
    for n, local in ((2, first), (3, second)):  # a job is reusable until it expires
        wrapped = wrap("hpke-x-wing", job.public_key, job.import_job_id, "ml-kem-1024", local.seed)
        info = t.import_key(job.import_job_id, "ml-kem-1024", wrapped, key_id=k.key_id)
        assert (info.key_id, info.version, info.latest_version, info.origin) == (k.key_id, n, n, "imported")
        assert info.public_key == local.public
    check_works(t, k.key_id, second)
    ss, ct = first.obj.public_key().encapsulate()
    assert t.private_key(k.key_id, 2)[0].decapsulate(ct) == ss
    assert [v.version for v in t.get(k.key_id).versions] == [1, 2, 3]
    assert t.get(k.key_id, 1).origin == "generated"


def test_a_repeated_import_with_an_idempotency_key_answers_the_first_key(store: KeyStore, clock: FakeClock
                                                                          ) -> None:
    t = store.tenant("tenant-a")
    job = t.create_import_job("hpke-ml-kem-768", 60)
    local = local_key("ml-dsa-44")
    wrapped = wrap("hpke-ml-kem-768", job.public_key, job.import_job_id, "ml-dsa-44", local.seed)
    first = t.import_key(job.import_job_id, "ml-dsa-44", wrapped, idempotency_key="imp-1")
    clock.advance(120)  # the job has expired since; the retry still gets its answer
    again = t.import_key(job.import_job_id, "ml-dsa-44", wrapped, idempotency_key="imp-1")
    assert again.replayed and again.key_id == first.key_id and again.origin == "imported"
    assert len(t.list().keys) == 1
    with pytest.raises(QpherError) as info:  # the same idempotency key for a creation
        t.create(algorithm="ml-dsa-44", idempotency_key="imp-1")
    assert info.value.code == "idempotency_key_reused"


# ---- jobs ---------------------------------------------------------------------------------------


def test_jobs_are_listed_per_tenant_and_expire(store: KeyStore, clock: FakeClock) -> None:
    t, other = store.tenant("tenant-a"), store.tenant("tenant-b")
    jobs = [t.create_import_job(m, 600) for m in METHODS]
    other.create_import_job("hpke-x-wing")
    page = t.list_import_jobs(2)
    assert len(page.jobs) == 2 and page.next_cursor == page.jobs[-1].import_job_id
    rest = t.list_import_jobs(2, page.next_cursor)
    assert rest.next_cursor is None
    assert sorted(j.import_job_id for j in page.jobs + rest.jobs) == sorted(j.import_job_id for j in jobs)
    assert t.get_import_job(jobs[0].import_job_id) == jobs[0]
    clock.advance(600)
    assert t.get_import_job(jobs[0].import_job_id).state == "expired"  # before the sweep, too
    store.sweep_due()
    db = store._db
    assert db.execute("SELECT count(*) FROM import_jobs WHERE sealed IS NOT NULL").fetchone() == (1,)
    assert [j.state for j in t.list_import_jobs().jobs] == ["expired"] * 3
    assert other.list_import_jobs().jobs[0].state == "active"


@pytest.mark.parametrize("ttl", [59, 604801, 0, -1, 1.5, "60", True])
def test_a_ttl_outside_a_minute_to_a_week_is_invalid_input(store: KeyStore, ttl: object) -> None:
    with pytest.raises(InvalidInput, match="ttl_seconds"):
        store.tenant("tenant-a").create_import_job("hpke-x-wing", ttl)
    assert store.tenant("tenant-a").create_import_job("hpke-x-wing", 604800).state == "active"


@pytest.mark.parametrize("method", ["hpke-x25519", "", None, 1])
def test_an_unknown_method_is_invalid_input(store: KeyStore, method: object) -> None:
    with pytest.raises(InvalidInput, match="method must be one of"):
        store.tenant("tenant-a").create_import_job(method)
    assert store.tenant("tenant-a").list_import_jobs().jobs == ()


# ---- refusals: each stores nothing ------------------------------------------------------------


@dataclass
class Setup:
    t: TenantKeys
    job_id: str
    job_public: bytes
    kms_dir: Path

    def wrap(self, algorithm: str, plaintext: bytes, job_id: str | None = None,
             info_algorithm: str | None = None) -> bytes:
        return wrap("hpke-x-wing", self.job_public, job_id or self.job_id, info_algorithm or algorithm,
                    plaintext)


@pytest.fixture
def setup(store: KeyStore, kms_dir: Path) -> Setup:
    t = store.tenant("tenant-a")
    t.create(algorithm="ml-dsa-65")  # something to keep
    job = t.create_import_job("hpke-x-wing", 600)
    return Setup(t, job.import_job_id, job.public_key, kms_dir)


def _refused(s: Setup, exc: type[QpherError], code: str, status: int, **kw: Any) -> QpherError:
    before = ([k.to_wire() for k in s.t.list().keys], tree_snapshot(s.kms_dir / "keys"))
    with pytest.raises(exc) as info:
        s.t.import_key(**kw)
    assert (info.value.code, info.value.status) == (code, status)
    assert ([k.to_wire() for k in s.t.list().keys], tree_snapshot(s.kms_dir / "keys")) == before
    return info.value


def test_tampered_wrapped_keys_are_invalid_wrapped_key(setup: Setup) -> None:
    local = local_key("ml-dsa-65")
    good = setup.wrap("ml-dsa-65", local.seed)
    for bad in (good[:-1] + bytes([good[-1] ^ 1]), bytes([good[0] ^ 1]) + good[1:],
                good[:1130] + bytes([good[1130] ^ 0x80]) + good[1131:], good[:-1], good[:1135], b""):
        err = _refused(setup, InvalidWrappedKey, "invalid_wrapped_key", 400, job_id=setup.job_id,
                       algorithm="ml-dsa-65", wrapped_key=bad)
        assert local.seed.hex() not in err.message
    assert setup.t.import_key(setup.job_id, "ml-dsa-65", good).public_key == local.public


def test_a_key_wrapped_for_another_job_or_algorithm_does_not_open(setup: Setup) -> None:
    other = setup.t.create_import_job("hpke-x-wing")
    local = local_key("ml-dsa-65")
    for_other_job = wrap("hpke-x-wing", other.public_key, other.import_job_id, "ml-dsa-65", local.seed)
    _refused(setup, InvalidWrappedKey, "invalid_wrapped_key", 400, job_id=setup.job_id, algorithm="ml-dsa-65",
             wrapped_key=for_other_job)
    # the right job key, but info naming another job or another algorithm
    for bad in (setup.wrap("ml-dsa-65", local.seed, job_id=other.import_job_id),
                setup.wrap("ml-dsa-65", local.seed, info_algorithm="ml-dsa-44")):
        _refused(setup, InvalidWrappedKey, "invalid_wrapped_key", 400, job_id=setup.job_id,
                 algorithm="ml-dsa-65", wrapped_key=bad)


def test_another_tenants_job_is_not_found_like_a_made_up_one(store: KeyStore, setup: Setup) -> None:
    theirs = store.tenant("tenant-b").create_import_job("hpke-x-wing")
    local = local_key("ml-dsa-65")
    wrapped = wrap("hpke-x-wing", theirs.public_key, theirs.import_job_id, "ml-dsa-65", local.seed)
    made_up = "ij_" + "a" * 26
    messages = []
    for job_id in (theirs.import_job_id, made_up):
        messages.append(_refused(setup, ImportJobNotFound, "import_job_not_found", 404, job_id=job_id,
                                 algorithm="ml-dsa-65", wrapped_key=wrapped).message.replace(job_id, "<id>"))
        with pytest.raises(ImportJobNotFound):
            setup.t.get_import_job(job_id)
    assert messages[0] == messages[1]
    for junk in ("k_" + "a" * 26, "", None, 5, "ij_" + "A" * 26):
        with pytest.raises(ImportJobNotFound):
            setup.t.get_import_job(junk)
    assert [j.import_job_id for j in setup.t.list_import_jobs().jobs] == [setup.job_id]


def test_an_expired_job_is_refused_before_and_after_the_sweep(store: KeyStore, setup: Setup,
                                                               clock: FakeClock) -> None:
    local = local_key("ml-kem-768")
    wrapped = setup.wrap("ml-kem-768", local.seed)
    clock.advance(600)
    _refused(setup, ImportJobExpired, "import_job_expired", 400, job_id=setup.job_id, algorithm="ml-kem-768",
             wrapped_key=wrapped)
    store.sweep_due()
    row = store._db.execute("SELECT sealed, kek_id, destroyed_at FROM import_jobs WHERE job_id = ?",
                            (setup.job_id,)).fetchone()
    assert row == (None, None, clock.now)
    _refused(setup, ImportJobExpired, "import_job_expired", 400, job_id=setup.job_id, algorithm="ml-kem-768",
             wrapped_key=wrapped)
    assert setup.t.get_import_job(setup.job_id).state == "expired"


@pytest.mark.parametrize("algorithm", ALL)
def test_a_seed_of_the_wrong_length_is_invalid_key_material(setup: Setup, algorithm: str) -> None:
    n = ALGORITHMS[algorithm].private_key_size
    for bad in (os.urandom(n - 1), os.urandom(n + 1), b""):
        err = _refused(setup, InvalidKeyMaterial, "invalid_key_material", 400, job_id=setup.job_id,
                       algorithm=algorithm, wrapped_key=setup.wrap(algorithm, bad))
        assert f"{n} bytes, not {len(bad)}" in err.message


def test_pkcs8_of_another_algorithm_is_invalid_key_material(setup: Setup) -> None:
    for mine, theirs in (("ml-dsa-65", "ml-dsa-87"), ("ml-kem-768", "ml-kem-1024"), ("ml-dsa-65-ecdsa-p256",
                                                                                     "ml-dsa-65")):
        wrapped = setup.wrap(mine, local_key(theirs).pkcs8)
        _refused(setup, InvalidKeyMaterial, "invalid_key_material", 400, job_id=setup.job_id, algorithm=mine,
                 wrapped_key=wrapped, format="pkcs8")
    # a seed sent as PKCS#8, and PKCS#8 sent as a seed
    local = local_key("ml-dsa-65")
    for material, fmt in ((local.seed, "pkcs8"), (local.pkcs8, "seed")):
        _refused(setup, InvalidKeyMaterial, "invalid_key_material", 400, job_id=setup.job_id,
                 algorithm="ml-dsa-65", wrapped_key=setup.wrap("ml-dsa-65", material), format=fmt)


def test_a_pkcs8_whose_public_key_is_not_its_seeds_is_invalid_key_material(setup: Setup) -> None:
    local, other = local_key("ml-dsa-65"), local_key("ml-dsa-65")
    der = seed_pkcs8(ALGORITHMS["ml-dsa-65"], local.seed, other.public)
    err = _refused(setup, InvalidKeyMaterial, "invalid_key_material", 400, job_id=setup.job_id,
                   algorithm="ml-dsa-65", wrapped_key=setup.wrap("ml-dsa-65", der), format="pkcs8")
    assert "does not match" in err.message
    der = seed_pkcs8(ALGORITHMS["ml-dsa-65"], local.seed, local.public)
    info = setup.t.import_key(setup.job_id, "ml-dsa-65", setup.wrap("ml-dsa-65", der), format="pkcs8")
    assert info.public_key == local.public


def test_an_inconsistent_composite_key_is_invalid_key_material(setup: Setup) -> None:
    good = local_key("ml-dsa-65-ecdsa-p256").seed
    n = (0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551).to_bytes(32, "big")
    for bad in (good[:-1] + b"\x08",  # another curve
                good[:32] + SEC1_PREFIX + n + SEC1_SUFFIX,  # scalar = the group order
                good[:32] + SEC1_PREFIX + bytes(32) + SEC1_SUFFIX,  # scalar 0
                good[51:] + good[:51]):  # the halves swapped
        assert len(bad) == 83
        _refused(setup, InvalidKeyMaterial, "invalid_key_material", 400, job_id=setup.job_id,
                 algorithm="ml-dsa-65-ecdsa-p256", wrapped_key=setup.wrap("ml-dsa-65-ecdsa-p256", bad))


def test_import_version_of_another_algorithm_is_invalid_key_material(setup: Setup) -> None:
    k = setup.t.list().keys[0]
    local = local_key("ml-dsa-87")
    err = _refused(setup, InvalidKeyMaterial, "invalid_key_material", 400, job_id=setup.job_id,
                   algorithm="ml-dsa-87", wrapped_key=setup.wrap("ml-dsa-87", local.seed), key_id=k.key_id)
    assert "ml-dsa-65 key" in err.message
    _refused(setup, KeyNotFound, "key_not_found", 404, job_id=setup.job_id, algorithm="ml-dsa-87",
             wrapped_key=setup.wrap("ml-dsa-87", local.seed), key_id="k_" + "b" * 26)
    assert setup.t.get(k.key_id).latest_version == 1


@pytest.mark.parametrize(
    "args, code",
    [
        ({"algorithm": "rsa-2048"}, "unknown_algorithm"),
        ({"wrapped_key": "not bytes"}, "invalid_input"),
        ({"format": "jwk"}, "invalid_input"),
        ({"label": "x" * 200}, "invalid_input"),
        ({"idempotency_key": "has space"}, "invalid_idempotency_key"),
    ],
)
def test_bad_arguments_are_400_and_store_nothing(setup: Setup, args: dict[str, Any], code: str) -> None:
    kw: dict[str, Any] = {"job_id": setup.job_id, "algorithm": "ml-dsa-65",
                          "wrapped_key": setup.wrap("ml-dsa-65", local_key("ml-dsa-65").seed)}
    kw.update(args)
    _refused(setup, QpherError, code, 400, **kw)


# ---- the store around it ------------------------------------------------------------------------


def _as_schema_version_2(kms_dir: Path) -> None:
    """Make a closed store look like one written by a build of schema version 2."""
    db = sqlite3.connect(kms_dir / DB_FILE)
    try:
        db.execute("DROP TABLE import_jobs")
        db.execute("ALTER TABLE key_versions DROP COLUMN import_job_id")
        db.execute("ALTER TABLE key_versions DROP COLUMN origin")
        db.execute("UPDATE meta SET value = '2' WHERE name = 'schema_version'")
        db.commit()
    finally:
        db.close()


def test_a_store_of_schema_version_2_opens_and_gains_import_jobs(kms_dir: Path, kek_path: Path,
                                                                 backend: Backend) -> None:
    s = reopen(kms_dir, kek_path, backend)
    old = s.tenant("tenant-a").create(kind="signature")
    s.close()
    _as_schema_version_2(kms_dir)
    s = reopen(kms_dir, kek_path, backend)
    try:
        assert SCHEMA_VERSION >= 3
        assert s._db.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone() == (
            str(SCHEMA_VERSION),)
        t = s.tenant("tenant-a")
        assert t.get(old.key_id).origin == "generated"
        t.private_key(old.key_id)
        job = t.create_import_job("hpke-ml-kem-1024")
        local = local_key("ml-kem-768")
        info = t.import_key(job.import_job_id, "ml-kem-768",
                            wrap("hpke-ml-kem-1024", job.public_key, job.import_job_id, "ml-kem-768",
                                 local.seed))
        check_works(t, info.key_id, local)
    finally:
        s.close()


def test_kek_rotation_rewraps_live_jobs(
    kms_dir: Path, kek_path: Path, backend: Backend, tmp_path: Path
) -> None:
    s = reopen(kms_dir, kek_path, backend)
    job = s.tenant("tenant-a").create_import_job("hpke-x-wing")
    s.close()
    new_path = tmp_path / "secrets" / "kek-2.b64"
    generate_kek_file(new_path)
    old, new = FileKEKProvider(kek_path), FileKEKProvider(new_path)
    rotate_kek(kms_dir, old, new)
    s = reopen(kms_dir, new_path, backend)
    try:
        kek_ids = s._db.execute("SELECT kek_id FROM import_jobs").fetchall()
        assert kek_ids == [(new.kek_id,)]
        local = local_key("x-wing")
        wrapped = wrap("hpke-x-wing", job.public_key, job.import_job_id, "x-wing", local.seed)
        info = s.tenant("tenant-a").import_key(job.import_job_id, "x-wing", wrapped)
        check_works(s.tenant("tenant-a"), info.key_id, local)
    finally:
        s.close()


# ---- real worker processes ----------------------------------------------------------------------


@pytest.mark.parametrize("backend_name", BACKENDS)
async def test_workers_import_every_algorithm_and_answer_every_error_code(
    kms_dir: Path, kek_path: Path, backend_name: str
) -> None:
    _backend(backend_name)
    async with open_kms(**kms_settings(kms_dir, kek_path, backend=backend_name)) as sup:  # type: ignore[arg-type]
        c = sup.client
        jobs = {m: await c.create_import_job(ctx(), m) for m in METHODS}
        for m, job in jobs.items():
            assert job["method"] == m and job["state"] == "active" and type(job["public_key"]) is bytes
            assert await c.get_import_job(ctx(), job["import_job_id"]) == job
        listed = await c.list_import_jobs(ctx(), limit=2)
        assert len(listed["jobs"]) == 2 and listed["next_cursor"] is not None
        for i, algorithm in enumerate(ALL):
            method = METHODS[i % len(METHODS)]
            job = jobs[method]
            local = local_key(algorithm)
            wrapped = wrap(method, job["public_key"], job["import_job_id"], algorithm, local.seed)
            info = await c.import_key(ctx(), job["import_job_id"], algorithm, wrapped, label=f"l{i}")
            assert (info.origin, info.import_job_id, info.public_key) == ("imported", job["import_job_id"],
                                                                          local.public)
            if ALGORITHMS[algorithm].kind.value == "signature":
                sig, _v = await c.sign(ctx(), info.key_id, MESSAGE)
                if algorithm == "ml-dsa-65-ecdsa-p256":
                    m_prime = composite_message(MESSAGE, b"")
                    local.obj[0].public_key().verify(sig[:3309], m_prime, COMPOSITE_LABEL)
                else:
                    local.obj.public_key().verify(sig, MESSAGE)
            else:  # the KMS encapsulates to the imported key; the local private key decapsulates
                ss, ct, _v = await c.encapsulate(ctx(), info.key_id)
                if algorithm == "x-wing":
                    assert await c.decapsulate(ctx(), info.key_id, ct) == ss
                else:
                    assert local.obj.decapsulate(ct) == ss
        job = jobs["hpke-x-wing"]
        local = local_key("ml-dsa-65")
        good = wrap("hpke-x-wing", job["public_key"], job["import_job_id"], "ml-dsa-65", local.seed)
        cases = [
            ((job["import_job_id"], "ml-dsa-65", good[:-1] + b"\x00"), {}, "invalid_wrapped_key", 400),
            ((job["import_job_id"], "ml-dsa-65", wrap("hpke-x-wing", job["public_key"], job["import_job_id"],
                                                      "ml-dsa-65", local.seed[:31])), {},
             "invalid_key_material", 400),
            (("ij_" + "q" * 26, "ml-dsa-65", good), {}, "import_job_not_found", 404),
        ]
        before = await c.list_keys(ctx())
        for args, kw, code, status in cases:
            with pytest.raises(QpherError) as info_:
                await c.import_key(ctx(), *args, **kw)
            assert (info_.value.code, info_.value.status, type(info_.value).__name__) == (
                code, status, {"invalid_wrapped_key": "InvalidWrappedKey", "invalid_key_material":
                               "InvalidKeyMaterial", "import_job_not_found": "ImportJobNotFound"}[code])
        with pytest.raises(ImportJobNotFound):  # another tenant's job
            await c.import_key(ctx("tenant-b"), job["import_job_id"], "ml-dsa-65", good)
        with pytest.raises(ImportJobNotFound):
            await c.get_import_job(ctx("tenant-b"), job["import_job_id"])
        with pytest.raises(InvalidInput):
            await c.create_import_job(ctx(), "hpke-x-wing", ttl_seconds=8 * 86400)
        assert (await c.list_keys(ctx())).keys == before.keys
        assert (await c.list_import_jobs(ctx("tenant-b")))["jobs"] == []


# ---- fuzz: no argument makes the KMS answer a 5xx -------------------------------------------------

_ANY = st.one_of(st.none(), st.booleans(), st.integers(-2, 2**40), st.floats(allow_nan=True),
                 st.text(max_size=40), st.binary(max_size=64), st.lists(st.integers(), max_size=2))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    job=st.one_of(_ANY, st.just("ij_" + "a" * 26), st.sampled_from(["JOB"])),
    algorithm=st.one_of(_ANY, st.sampled_from(ALL)),
    wrapped=st.one_of(_ANY, st.binary(min_size=1100, max_size=1300)),
    fmt=st.one_of(_ANY, st.sampled_from(["seed", "pkcs8"])),
    label=_ANY,
    key_id=st.one_of(st.none(), _ANY),
    ttl=_ANY,
    method=st.one_of(_ANY, st.sampled_from(METHODS)),
)
def test_no_import_argument_answers_a_5xx(setup: Setup, job: Any, algorithm: Any, wrapped: Any, fmt: Any,
                                           label: Any, key_id: Any, ttl: Any, method: Any) -> None:
    t = setup.t
    args = {"import_job_id": setup.job_id if job == "JOB" else job, "algorithm": algorithm,
            "wrapped_key": wrapped, "format": fmt, "label": label, "key_id": key_id}
    from qpher_proxy.kms.worker.service import KMSService

    service = KMSService(t._store, b"t" * 32)
    for op, op_args in (("import_key", args), ("create_import_job", {"method": method, "ttl_seconds": ttl}),
                        ("get_import_job", {"import_job_id": job}),
                        ("list_import_jobs", {"limit": ttl, "cursor": job})):
        try:
            service._ops[op](t, op_args)
        except QpherError as exc:
            assert exc.status < 500, (op, exc)
