"""Idempotency keys on key creation and rotation, on the SQLite store: in process (a fake
clock for the 24 h lifetime), through real worker processes (two of them racing on one store),
and a store of the schema before the records table, reopened."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import trio
from kms_helpers import FakeClock, ctx, reopen, settings

from qpher_proxy.crypto.interface import Backend
from qpher_proxy.errors import IdempotencyKeyReused, InvalidIdempotencyKey, QpherError
from qpher_proxy.kms.launcher import open_kms
from qpher_proxy.kms.worker.kek import KEKError
from qpher_proxy.kms.worker.keydb import DB_FILE, SCHEMA_VERSION
from qpher_proxy.kms.worker.keystore import KeyStore

KEY = "9f1c2e4a-retry-me"


def _key_files(kms_dir: Path) -> list[Path]:
    return sorted(p for p in (kms_dir / "keys").rglob("*") if p.is_file())


def test_a_repeated_creation_answers_the_first_key_and_creates_nothing(
    store: KeyStore, kms_dir: Path
) -> None:
    t = store.tenant("tenant-a")
    first = t.create(kind="kem", label="orders", idempotency_key=KEY)
    again = t.create(kind="kem", label="orders", idempotency_key=KEY)
    assert not first.replayed and again.replayed
    assert (again.key_id, again.version, again.public_key) == (first.key_id, 1, first.public_key)
    # kind "kem" and the algorithm it resolves to are one request
    assert t.create(algorithm="ml-kem-768", label="orders", idempotency_key=KEY).key_id == first.key_id
    assert [k.key_id for k in t.list().keys] == [first.key_id]
    assert len(_key_files(kms_dir)) == 1
    # without a key, or with another one, every request creates
    assert t.create(kind="kem", label="orders").key_id != first.key_id
    assert t.create(kind="kem", label="orders", idempotency_key=KEY + "-2").key_id != first.key_id
    assert len(t.list().keys) == 3


@pytest.mark.parametrize(
    "other",
    [
        {"kind": "kem", "label": "invoices"},  # another label
        {"kind": "kem"},  # no label
        {"algorithm": "ml-kem-1024", "label": "orders"},  # another algorithm
        {"kind": "signature", "label": "orders"},
    ],
)
def test_the_same_key_for_another_creation_is_409_reused(store: KeyStore, other: dict[str, str]) -> None:
    t = store.tenant("tenant-a")
    t.create(kind="kem", label="orders", idempotency_key=KEY)
    with pytest.raises(IdempotencyKeyReused) as info:
        t.create(**other, idempotency_key=KEY)
    assert (info.value.status, info.value.code) == (409, "idempotency_key_reused")
    assert KEY not in info.value.message
    assert len(t.list().keys) == 1


def test_a_creation_key_reused_for_a_rotation_is_409_and_rotates_nothing(store: KeyStore) -> None:
    t = store.tenant("tenant-a")
    k = t.create(kind="signature", idempotency_key=KEY)
    with pytest.raises(IdempotencyKeyReused):
        t.rotate(k.key_id, idempotency_key=KEY)
    assert t.get(k.key_id).latest_version == 1
    r = t.rotate(k.key_id, idempotency_key="rotate-1")
    with pytest.raises(IdempotencyKeyReused):  # and the other way round
        t.create(kind="signature", idempotency_key="rotate-1")
    other = t.create(kind="signature")
    with pytest.raises(IdempotencyKeyReused):  # the same key for another key's rotation
        t.rotate(other.key_id, idempotency_key="rotate-1")
    assert r.version == 2 and t.get(other.key_id).latest_version == 1


def test_another_tenants_equal_key_is_independent(store: KeyStore) -> None:
    a = store.tenant("tenant-a").create(kind="kem", idempotency_key=KEY)
    b = store.tenant("tenant-b").create(kind="kem", idempotency_key=KEY)
    c = store.tenant("tenant-c").create(kind="signature", idempotency_key=KEY)  # no 409 across tenants
    assert len({a.key_id, b.key_id, c.key_id}) == 3 and not (b.replayed or c.replayed)
    assert store.tenant("tenant-b").create(kind="kem", idempotency_key=KEY).key_id == b.key_id


def test_a_repeated_rotation_adds_one_version(store: KeyStore, kms_dir: Path) -> None:
    t = store.tenant("tenant-a")
    k = t.create(kind="signature")
    first = t.rotate(k.key_id, idempotency_key=KEY)
    again = t.rotate(k.key_id, idempotency_key=KEY)
    assert (first.version, first.latest_version, first.replayed) == (2, 2, False)
    assert (again.version, again.latest_version, again.replayed) == (2, 2, True)
    assert again.public_key == first.public_key
    assert len(_key_files(kms_dir)) == 2
    t.rotate(k.key_id)  # a later rotation without the key: the replay still names version 2
    late = t.rotate(k.key_id, idempotency_key=KEY)
    assert (late.version, late.latest_version, late.replayed) == (2, 3, True)
    # a replay answers even once the key may no longer rotate: nothing is done
    t.disable(k.key_id)
    assert t.rotate(k.key_id, idempotency_key=KEY).version == 2


@pytest.mark.parametrize("bad", ["", "a" * 256, "two words", "tab\there", "caf\u00e9", "\x7f", 17])
def test_a_malformed_key_is_refused_before_anything_is_written(store: KeyStore, bad: object) -> None:
    t = store.tenant("tenant-a")
    with pytest.raises(InvalidIdempotencyKey) as info:
        t.create(kind="kem", idempotency_key=bad)  # type: ignore[arg-type]
    assert (info.value.status, info.value.code) == (400, "invalid_idempotency_key")
    k = t.create(kind="kem")
    with pytest.raises(InvalidIdempotencyKey):
        t.rotate(k.key_id, idempotency_key=bad)  # type: ignore[arg-type]
    assert len(t.list().keys) == 1 and t.get(k.key_id).latest_version == 1
    assert t.create(kind="kem", idempotency_key="!" + "~" * 254).key_id  # the edges are fine


def test_records_expire_after_24_hours_and_the_sweep_deletes_them(store: KeyStore, clock: FakeClock) -> None:
    t = store.tenant("tenant-a")
    first = t.create(kind="kem", idempotency_key=KEY)
    clock.advance(24 * 3600 - 1)
    assert t.create(kind="kem", idempotency_key=KEY).key_id == first.key_id
    clock.advance(1)  # expired: the key is unknown again, and its record is taken over
    second = t.create(kind="kem", label="new", idempotency_key=KEY)
    assert second.key_id != first.key_id and not second.replayed
    assert t.create(kind="kem", label="new", idempotency_key=KEY).key_id == second.key_id
    t.create(kind="kem", idempotency_key="other")
    assert store.sweep_idempotency(clock()) == 0
    clock.advance(24 * 3600)
    store.sweep_due()
    assert store._db.execute("SELECT count(*) FROM idempotency_keys").fetchone() == (0,)


def test_the_idempotency_key_itself_is_never_stored(store: KeyStore, kms_dir: Path) -> None:
    key = "client-chosen-value-3b1f0c5d"
    t = store.tenant("tenant-a")
    k = t.create(kind="kem", idempotency_key=key)
    t.rotate(k.key_id, idempotency_key=key + "-rotate")
    for path in kms_dir.rglob("*"):
        if path.is_file():
            assert key.encode() not in path.read_bytes(), path


def _as_schema_version_1(kms_dir: Path) -> None:
    """Make a closed store look like one written by a build of schema version 1 (the same
    tables but ``idempotency_keys``)."""
    db = sqlite3.connect(kms_dir / DB_FILE)
    try:
        db.execute("DROP TABLE idempotency_keys")
        db.execute("UPDATE meta SET value = '1' WHERE name = 'schema_version'")
        db.commit()
    finally:
        db.close()


def test_a_store_of_schema_version_1_opens_and_gains_the_records_table(
    kms_dir: Path, kek_path: Path, backend: Backend
) -> None:
    s = reopen(kms_dir, kek_path, backend)
    old = s.tenant("tenant-a").create(kind="signature")
    s.close()
    _as_schema_version_1(kms_dir)
    s = reopen(kms_dir, kek_path, backend)
    try:
        assert s._db.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone() == (
            str(SCHEMA_VERSION),
        )
        t = s.tenant("tenant-a")
        assert t.get(old.key_id).key_id == old.key_id  # the old keys serve
        assert t.private_key(old.key_id)[1] == 1
        k = t.create(kind="kem", idempotency_key=KEY)
        assert t.create(kind="kem", idempotency_key=KEY).key_id == k.key_id
    finally:
        s.close()


def test_a_store_of_a_newer_schema_is_refused_untouched(
    kms_dir: Path, kek_path: Path, backend: Backend
) -> None:
    reopen(kms_dir, kek_path, backend).close()
    db = sqlite3.connect(kms_dir / DB_FILE)
    db.execute("UPDATE meta SET value = ? WHERE name = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    db.commit()
    db.close()
    with pytest.raises(KEKError, match=f"schema version {SCHEMA_VERSION + 1}"):
        reopen(kms_dir, kek_path, backend)


# ---- real worker processes ------------------------------------------------------------------


async def test_workers_answer_a_repeated_creation_with_the_first_key(kms_dir: Path, kek_path: Path) -> None:
    async with open_kms(**settings(kms_dir, kek_path)) as sup:  # type: ignore[arg-type]
        c = sup.client
        first = await c.create_key(ctx(), kind="kem", label="orders", idempotency_key=KEY)
        again = await c.create_key(ctx(), kind="kem", label="orders", idempotency_key=KEY)
        assert not first.replayed and again.replayed and again.key_id == first.key_id
        with pytest.raises(QpherError) as info:
            await c.create_key(ctx(), kind="kem", label="other", idempotency_key=KEY)
        assert (info.value.code, info.value.status) == ("idempotency_key_reused", 409)
        with pytest.raises(QpherError) as info:
            await c.create_key(ctx(), kind="kem", idempotency_key="not ascii \u00e9")
        assert (info.value.code, info.value.status) == ("invalid_idempotency_key", 400)
        other = await c.create_key(ctx("tenant-b"), kind="kem", label="orders", idempotency_key=KEY)
        assert other.key_id != first.key_id and not other.replayed
        r1 = await c.rotate_key(ctx(), first.key_id, idempotency_key="rot")
        r2 = await c.rotate_key(ctx(), first.key_id, idempotency_key="rot")
        assert (r1.version, r2.version, r2.replayed, r2.latest_version) == (2, 2, True, 2)
        assert [k.key_id for k in (await c.list_keys(ctx())).keys] == [first.key_id]


async def test_two_workers_racing_with_one_key_create_one_key(kms_dir: Path, kek_path: Path) -> None:
    """Requests with one idempotency key spread over two worker processes on one store: the
    write transaction's second look at the record makes every one of them answer one key."""
    async with open_kms(**settings(kms_dir, kek_path, workers=2)) as sup:  # type: ignore[arg-type]
        assert len(sup.pids) == 2
        for round_ in range(3):
            got: list[str] = []

            async def create(key: str = f"race-{round_}", got: list[str] = got) -> None:
                info = await sup.client.create_key(ctx(), kind="kem", idempotency_key=key)
                got.append(info.key_id)

            async with trio.open_nursery() as nursery:
                for _ in range(6):
                    nursery.start_soon(create)
            assert len(got) == 6 and len(set(got)) == 1, got
        page = await sup.client.list_keys(ctx())
        assert len(page.keys) == 3
    assert len(_key_files(kms_dir)) == 3  # the losers' key files are gone too
