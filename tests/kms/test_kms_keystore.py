"""The key store in-process: lifecycle with an injected clock, tenant scoping, tampering, crashes, KEK."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from kms_helpers import FakeClock, reopen, tree_snapshot

from qpher_proxy.crypto.interface import Backend
from qpher_proxy.errors import (
    InvalidInput,
    InvalidKeyState,
    KeyCorrupt,
    KeyDestroyed,
    KeyDisabled,
    KeyNotFound,
    KeyUnavailable,
    UnknownAlgorithm,
)
from qpher_proxy.kms.wire.model import KEY_ID_RE, KeyState
from qpher_proxy.kms.worker import keyfile
from qpher_proxy.kms.worker.kek import FileKEKProvider, KEKError, KEKMismatch, generate_kek_file
from qpher_proxy.kms.worker.kek_rotation import rotate_kek
from qpher_proxy.kms.worker.keystore import KeyStore


def test_create_picks_defaults_by_kind_and_mode(store: KeyStore) -> None:
    t = store.tenant("tenant-a")
    assert t.create(kind="kem").algorithm == "ml-kem-768"
    assert t.create(kind="signature").algorithm == "ml-dsa-65"
    assert t.create(kind="kem", mode="hybrid").algorithm == "x-wing"
    assert t.create(kind="signature", mode="hybrid").algorithm == "ml-dsa-65-ecdsa-p256"
    k = t.create(algorithm="ml-dsa-87", label="release signing")
    assert (k.algorithm, k.kind, k.label, k.state, k.version) == ("ml-dsa-87", "signature", "release signing",
                                                                   KeyState.ENABLED, 1)
    assert k.public_key is not None and len(k.public_key) == 2592
    with pytest.raises(InvalidInput, match="give an algorithm"):
        t.create()
    with pytest.raises(InvalidInput, match="is a kem algorithm"):
        t.create(algorithm="ml-kem-768", kind="signature")
    with pytest.raises(UnknownAlgorithm):
        t.create(algorithm="rsa-2048")
    with pytest.raises(InvalidInput, match="label"):
        t.create(kind="kem", label="x" * 200)


def test_key_ids_are_random_130_bit_base32(store: KeyStore) -> None:
    t = store.tenant("tenant-a")
    ids = {t.create(kind="kem").key_id for _ in range(20)}
    assert len(ids) == 20
    assert all(KEY_ID_RE.match(i) for i in ids)


def test_the_repository_needs_a_tenant(store: KeyStore) -> None:
    for bad in ("", None, "x" * 300):
        with pytest.raises(InvalidInput, match="tenant id"):
            store.tenant(bad)  # type: ignore[arg-type]


def test_another_tenants_key_answers_exactly_like_a_missing_one(store: KeyStore) -> None:
    theirs = store.tenant("tenant-b").create(kind="signature").key_id
    random_id = "k_" + "q" * 26
    mine = store.tenant("tenant-a")
    for call in (
        lambda k: mine.get(k), lambda k: mine.rotate(k), lambda k: mine.disable(k), lambda k: mine.enable(k),
        lambda k: mine.schedule_destroy(k), lambda k: mine.cancel_destroy(k),
        lambda k: mine.private_key(k), lambda k: mine.public_key(k, 1),
    ):
        with pytest.raises(KeyNotFound) as a:
            call(theirs)
        with pytest.raises(KeyNotFound) as b:
            call(random_id)
        assert (a.value.code, a.value.status) == (b.value.code, b.value.status) == ("key_not_found", 404)
        assert a.value.message == b.value.message.replace(random_id, theirs)
    assert mine.list().keys == ()
    # and theirs is untouched
    assert store.tenant("tenant-b").get(theirs).state is KeyState.ENABLED


def test_list_paginates_with_a_cursor(store: KeyStore) -> None:
    t = store.tenant("tenant-a")
    made = sorted(t.create(kind="kem").key_id for _ in range(7))
    store.tenant("tenant-b").create(kind="kem")
    seen: list[str] = []
    cursor = None
    while True:
        page = t.list(limit=3, cursor=cursor)
        seen += [k.key_id for k in page.keys]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == made
    with pytest.raises(InvalidInput, match="cursor"):
        t.list(cursor="'; DROP TABLE keys; --")
    with pytest.raises(InvalidInput, match="limit"):
        t.list(limit=0)


def test_rotation_signs_with_the_latest_and_accepts_older_versions(store: KeyStore) -> None:
    t = store.tenant("tenant-a")
    sk = t.create(kind="signature")
    kk = t.create(kind="kem")
    priv1, v1 = t.private_key(sk.key_id)
    sig1 = priv1.sign(b"m")
    pub_kem1, _ = t.public_key(kk.key_id)
    ss1, ct1 = pub_kem1.encapsulate()
    assert t.rotate(sk.key_id).latest_version == 2
    assert t.rotate(kk.key_id).version == 2
    priv2, v2 = t.private_key(sk.key_id)
    assert (v1, v2) == (1, 2)
    pub1, _ = t.public_key(sk.key_id, 1)
    pub2, _ = t.public_key(sk.key_id)
    assert pub1.verify(sig1, b"m") and not pub2.verify(sig1, b"m")
    assert pub2.verify(priv2.sign(b"m"), b"m")
    kem_priv1, _ = t.private_key(kk.key_id, 1)
    assert kem_priv1.decapsulate(ct1) == ss1
    with pytest.raises(KeyNotFound, match="has no version 3"):
        t.private_key(kk.key_id, 3)
    with pytest.raises(InvalidInput):
        t.private_key(kk.key_id, 0)
    info = t.get(sk.key_id, version=1)
    assert (
        info.version == 1
        and info.public_key == pub1.public_bytes()
        and [v.version for v in info.versions] == [1, 2]
    )


def test_disable_and_enable(store: KeyStore) -> None:
    t = store.tenant("tenant-a")
    k = t.create(kind="signature")
    t.private_key(k.key_id)  # cached now: disabling must still win
    assert t.disable(k.key_id).state is KeyState.DISABLED
    assert t.disable(k.key_id).state is KeyState.DISABLED  # idempotent
    with pytest.raises(KeyDisabled, match="is disabled") as info:
        t.private_key(k.key_id)
    assert (info.value.code, info.value.status) == ("key_disabled", 409)
    with pytest.raises(KeyDisabled):
        t.public_key(k.key_id)
    with pytest.raises(KeyDisabled):
        t.rotate(k.key_id)
    assert t.get(k.key_id).state is KeyState.DISABLED  # metadata still readable
    assert t.enable(k.key_id).state is KeyState.ENABLED
    t.private_key(k.key_id)[0].sign(b"ok")


def test_destruction_is_scheduled_cancelled_and_done_when_due(
    store: KeyStore, clock: FakeClock, kms_dir: Path
) -> None:
    t = store.tenant("tenant-a")
    k = t.create(kind="kem")
    t.rotate(k.key_id)
    files = sorted(p for p in (kms_dir / "keys").rglob("*.qkey"))
    assert len(files) == 2
    info = t.schedule_destroy(k.key_id)
    assert info.state is KeyState.PENDING_DESTRUCTION and info.destroy_at == clock.now + 86_400
    with pytest.raises(KeyDisabled, match="scheduled for destruction"):
        t.private_key(k.key_id)
    with pytest.raises(InvalidKeyState):
        t.enable(k.key_id)
    clock.advance(3600)
    assert t.schedule_destroy(k.key_id, 10).destroy_at == info.destroy_at  # keeps the first date
    assert t.cancel_destroy(k.key_id).state is KeyState.ENABLED
    with pytest.raises(InvalidKeyState, match="not scheduled"):
        t.cancel_destroy(k.key_id)
    t.disable(k.key_id)
    t.schedule_destroy(k.key_id, 60)
    assert t.cancel_destroy(k.key_id).state is KeyState.DISABLED  # back to the state before
    t.schedule_destroy(k.key_id, 60)
    clock.advance(59)
    assert store.sweep_due() == 0 and all(f.exists() for f in files)
    clock.advance(1)
    assert store.sweep_due() == 1
    assert not any(f.exists() for f in files)
    tomb = t.get(k.key_id)
    assert tomb.state is KeyState.DESTROYED and tomb.public_key is None and tomb.destroyed_at == clock.now
    assert [v.state for v in tomb.versions] == ["destroyed", "destroyed"]
    with pytest.raises(KeyDestroyed) as gone:
        t.private_key(k.key_id, 1)
    assert (gone.value.code, gone.value.status) == ("key_destroyed", 410)
    for op in (t.enable, t.rotate, t.schedule_destroy):
        with pytest.raises(KeyDestroyed):
            op(k.key_id)
    assert t.list().keys[0].state is KeyState.DESTROYED  # the tombstone stays listed


def test_a_due_key_is_destroyed_on_access_before_any_sweep(
    store: KeyStore, clock: FakeClock, kms_dir: Path
) -> None:
    t = store.tenant("tenant-a")
    k = t.create(kind="signature")
    t.private_key(k.key_id)
    t.schedule_destroy(k.key_id, 5)
    clock.advance(5)
    with pytest.raises(KeyDestroyed):
        t.private_key(k.key_id)
    assert list((kms_dir / "keys").rglob("*.qkey")) == []
    assert (
        t.schedule_destroy(store.tenant("tenant-a").create(kind="kem").key_id, 0).state is KeyState.DESTROYED
    )


def test_schema_constraints_guard_the_metadata(store: KeyStore) -> None:
    db = store.db
    assert db is not None
    k = store.tenant("tenant-a").create(kind="kem")
    row = ("tenant-a", "k_" + "z" * 26, "kem", "ml-kem-768", None, "enabled", None, 1, 0.0, 0.0, None, None)
    insert = "INSERT INTO keys VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    for i, bad in ((3, "rsa-2048"), (5, "lost"), (2, "cipher"), (0, "")):
        r = list(row)
        r[i] = bad
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            db.execute(insert, r)
    with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
        db.execute(
            "INSERT INTO key_versions (tenant_id, key_id, version, algorithm, state, public_key, file, "
            "kek_id, created_at) VALUES (?, ?, 1, 'ml-kem-768', 'active', x'00', 'keys/x', 'kek', 0)",
            ("tenant-a", k.key_id),
        )
    assert db.execute("SELECT count(*) FROM key_versions WHERE file LIKE '%..%'").fetchone() == (0,)


# ---- tampering with key files ---------------------------------------------------------------


def _file_of(kms_dir: Path, store: KeyStore, tenant: str, key_id: str, version: int = 1) -> Path:
    db = store.db
    assert db is not None
    (rel,) = db.execute(
        "SELECT file FROM key_versions WHERE tenant_id = ? AND key_id = ? AND version = ?",
        (tenant, key_id, version),
    ).fetchone()
    return kms_dir / rel


@pytest.mark.parametrize("across", ["two keys", "two tenants"])
def test_key_files_swapped_between_slots_fail_for_those_keys_alone(
    kms_dir: Path, kek_path: Path, backend: Backend, across: str
) -> None:
    s = reopen(kms_dir, kek_path, backend)
    a = s.tenant("tenant-a").create(algorithm="ml-dsa-65").key_id
    b = s.tenant("tenant-a" if across == "two keys" else "tenant-b").create(algorithm="ml-dsa-65").key_id
    bystander = s.tenant("tenant-a").create(algorithm="ml-dsa-65").key_id
    tb = "tenant-a" if across == "two keys" else "tenant-b"
    fa, fb = _file_of(kms_dir, s, "tenant-a", a), _file_of(kms_dir, s, tb, b)
    s.close()
    da, db_ = fa.read_bytes(), fb.read_bytes()
    fa.write_bytes(db_)
    fb.write_bytes(da)
    s = reopen(kms_dir, kek_path, backend)  # fresh process view: nothing cached
    try:
        with pytest.raises(KeyCorrupt, match="failed authentication") as info:
            s.tenant("tenant-a").private_key(a)
        assert (info.value.code, info.value.status) == ("key_corrupt", 500)
        with pytest.raises(KeyCorrupt):
            s.tenant(tb).private_key(b)
        s.tenant("tenant-a").private_key(bystander)[0].sign(b"still fine")
    finally:
        s.close()


def test_a_flipped_bit_fails_that_key_alone_and_a_missing_file_is_unavailable(
    kms_dir: Path, kek_path: Path, backend: Backend
) -> None:
    s = reopen(kms_dir, kek_path, backend)
    a = s.tenant("t").create(kind="kem").key_id
    b = s.tenant("t").create(kind="kem").key_id
    c = s.tenant("t").create(kind="kem").key_id
    fa, fc = _file_of(kms_dir, s, "t", a), _file_of(kms_dir, s, "t", c)
    s.close()
    data = bytearray(fa.read_bytes())
    data[-20] ^= 0x10
    fa.write_bytes(bytes(data))
    fc.unlink()
    s = reopen(kms_dir, kek_path, backend)
    try:
        with pytest.raises(KeyCorrupt):
            s.tenant("t").private_key(a)
        with pytest.raises(KeyUnavailable, match="missing") as info:
            s.tenant("t").private_key(c)
        assert (info.value.code, info.value.status) == ("key_unavailable", 503)
        s.tenant("t").private_key(b)
    finally:
        s.close()


# ---- the KEK at start-up ---------------------------------------------------------------------


def test_a_wrong_kek_stops_start_up_before_anything_is_written(
    kms_dir: Path, kek_path: Path, backend: Backend, tmp_path: Path
) -> None:
    s = reopen(kms_dir, kek_path, backend)
    s.tenant("t").create(kind="kem")
    s.close()
    other = tmp_path / "other.b64"
    generate_kek_file(other)
    before = tree_snapshot(kms_dir)
    with pytest.raises(KEKMismatch, match="is not the KEK of this key store") as info:
        reopen(kms_dir, other, backend)
    assert "nothing was written" in info.value.message
    assert tree_snapshot(kms_dir) == before
    # without the canary the key files themselves give the wrong KEK away
    (kms_dir / "kek-check").unlink()
    before = tree_snapshot(kms_dir)
    with pytest.raises(KEKMismatch):
        reopen(kms_dir, other, backend)
    assert tree_snapshot(kms_dir) == before
    reopen(kms_dir, kek_path, backend).close()  # the right KEK re-creates the canary
    assert (kms_dir / "kek-check").exists()


# ---- crashes -----------------------------------------------------------------------------------

CRASH = textwrap.dedent(
    """
    import os, sys
    from qpher_proxy.kms.worker.backends import select_backend
    from qpher_proxy.kms.worker.kek import FileKEKProvider
    from qpher_proxy.kms.worker import keyfile, keystore
    kms_dir, kek, what, key_id = sys.argv[1:5]
    store = keystore.KeyStore(kms_dir, FileKEKProvider(kek), select_backend("openssl"))
    def crash(*a, **k):
        os._exit(9)  # the process dies here: no cleanup, no rollback handler runs
    if what == "create":
        keystore.TenantKeys._insert_version = crash
        store.tenant("t").create(kind="signature")
    elif what == "rotate":
        keystore.TenantKeys._insert_version = crash
        store.tenant("t").rotate(key_id)
    elif what == "destroy":
        keyfile.remove_file = crash
        store.tenant("t").schedule_destroy(key_id, 0)
    """
)


@pytest.mark.parametrize("what", ["create", "rotate", "destroy"])
def test_a_crash_between_key_file_and_metadata_leaves_no_usable_orphan_and_no_dangling_metadata(
    kms_dir: Path, kek_path: Path, backend: Backend, what: str
) -> None:
    s = reopen(kms_dir, kek_path, backend)
    k = s.tenant("t").create(kind="signature").key_id
    s.close()
    files_before = set((kms_dir / "keys").rglob("*.qkey"))
    r = subprocess.run(
        [sys.executable, "-c", CRASH, str(kms_dir), str(kek_path), what, k], capture_output=True
    )
    assert r.returncode == 9, r.stderr.decode()
    files_after = set((kms_dir / "keys").rglob("*.qkey"))
    if what == "destroy":
        assert files_after == files_before  # committed as destroyed; the unlink never happened
    else:
        assert len(files_after - files_before) == 1  # the orphan: written, never committed
    s = reopen(kms_dir, kek_path, backend)  # an exclusive start sweeps orphans
    try:
        assert s.exclusive_start
        db = s.db
        assert db is not None
        referenced = {
            kms_dir / f for (f,) in db.execute("SELECT file FROM key_versions WHERE file IS NOT NULL")
        }
        assert set((kms_dir / "keys").rglob("*.qkey")) == referenced  # no orphan, nothing dangling
        assert s.check_files() == 0
        t = s.tenant("t")
        if what == "create":
            assert [i.key_id for i in t.list().keys] == [k]
        elif what == "rotate":
            assert t.get(k).latest_version == 1
            t.private_key(k)[0].sign(b"v1 still works")
            assert t.rotate(k).latest_version == 2  # and the version number is free again
        else:
            assert t.get(k).state is KeyState.DESTROYED and referenced == set()
    finally:
        s.close()


# ---- rotate-kek ------------------------------------------------------------------------------


def test_rotate_kek_interrupted_then_rerun(
    kms_dir: Path, kek_path: Path, backend: Backend, tmp_path: Path
) -> None:
    s = reopen(kms_dir, kek_path, backend)
    ids = [s.tenant(f"t{i % 2}").create(kind="kem" if i % 3 else "signature").key_id for i in range(6)]
    s.tenant("t0").rotate(ids[0])
    s.close()
    new_path = tmp_path / "new.b64"
    generate_kek_file(new_path)
    old, new = FileKEKProvider(kek_path), FileKEKProvider(new_path)

    def interrupt_after_3(done: int, total: int) -> None:
        assert total == 7
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        rotate_kek(kms_dir, old, new, on_progress=interrupt_after_3)
    headers = [keyfile.parse_header(p.read_bytes(), "x").kek_id for p in (kms_dir / "keys").rglob("*.qkey")]
    assert sorted(headers).count(new.kek_id) == 3 and headers.count(old.kek_id) == 4
    for kek in (kek_path, new_path):  # neither KEK may serve a half-rotated store
        with pytest.raises(KEKError, match="interrupted"):
            reopen(kms_dir, kek, backend)
    result = rotate_kek(kms_dir, old, new)
    assert (result.rewrapped, result.already, result.total) == (4, 3, 7)
    assert not (kms_dir / "kek-rotation").exists()
    with pytest.raises(KEKMismatch):
        reopen(kms_dir, kek_path, backend)
    s = reopen(kms_dir, new_path, backend)
    try:
        db = s.db
        assert db is not None
        assert {r[0] for r in db.execute("SELECT kek_id FROM key_versions")} == {new.kek_id}
        for i, k in enumerate(ids):
            s.tenant(f"t{i % 2}").private_key(k)
        s.tenant("t0").private_key(ids[0], 1)
    finally:
        s.close()
    again = rotate_kek(kms_dir, old, new)  # a re-run after success checks and changes nothing
    assert (again.rewrapped, again.already) == (0, 7)


def test_rotate_kek_refuses_a_running_store_and_a_wrong_old_kek(
    kms_dir: Path, kek_path: Path, backend: Backend, tmp_path: Path
) -> None:
    s = reopen(kms_dir, kek_path, backend)
    s.tenant("t").create(kind="kem")
    new_path = tmp_path / "new.b64"
    generate_kek_file(new_path)
    try:
        with pytest.raises(KEKError, match="stop the proxy"):
            rotate_kek(kms_dir, FileKEKProvider(kek_path), FileKEKProvider(new_path))
    finally:
        s.close()
    wrong = tmp_path / "wrong.b64"
    generate_kek_file(wrong)
    with pytest.raises(KEKMismatch):
        rotate_kek(kms_dir, FileKEKProvider(wrong), FileKEKProvider(new_path))
    assert not (kms_dir / "kek-rotation").exists()
    assert os.listdir(kms_dir)  # untouched store still opens with its KEK
    reopen(kms_dir, kek_path, backend).close()


# ---- key files are backend-neutral ------------------------------------------------------------


@pytest.mark.liboqs
def test_keys_written_under_one_backend_serve_under_the_other(kms_dir: Path, kek_path: Path) -> None:
    from qpher_proxy.kms.worker.backends import liboqs_status, select_backend

    present, reason = liboqs_status()
    if not present:
        pytest.skip(f"liboqs is not available: {reason}")
    openssl, liboqs = select_backend("openssl"), select_backend("liboqs")
    s = reopen(kms_dir, kek_path, openssl)
    made = {alg: s.tenant("t").create(algorithm=alg).key_id for alg in ("ml-kem-768", "ml-dsa-65", "x-wing")}
    pub = {alg: s.tenant("t").public_key(k)[0] for alg, k in made.items()}
    s.close()
    s = reopen(kms_dir, kek_path, liboqs)
    try:
        t = s.tenant("t")
        ss, ct = pub["ml-kem-768"].encapsulate()
        assert t.private_key(made["ml-kem-768"])[0].decapsulate(ct) == ss
        ss, ct = pub["x-wing"].encapsulate()
        assert t.private_key(made["x-wing"])[0].decapsulate(ct) == ss
        assert pub["ml-dsa-65"].verify(t.private_key(made["ml-dsa-65"])[0].sign(b"m"), b"m")
    finally:
        s.close()
