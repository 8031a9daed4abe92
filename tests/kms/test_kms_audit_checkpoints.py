"""The KMS signs audit checkpoints only when they extend what it signed before for the origin."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from kms_helpers import ctx

from qpher_proxy.audit.merkle import MemoryTree, consistency_proof
from qpher_proxy.audit.note import Verifier, open_note, parse_checkpoint
from qpher_proxy.crypto.interface import Backend
from qpher_proxy.kms.launcher import KMSSupervisor
from qpher_proxy.kms.worker.audit_keys import AuditKeys, CheckpointInconsistent
from qpher_proxy.kms.worker.kek import FileKEKProvider
from qpher_proxy.kms.worker.keydb import DB_FILE
from qpher_proxy.kms.worker.keystore import KeyStore

ORIGIN = "qpher-proxy/test-node"


def _tree(n: int, tag: bytes = b"") -> MemoryTree:
    return MemoryTree.from_data(tag + i.to_bytes(4, "big") for i in range(n))


def _verifiers(answer: dict[str, object]) -> list[Verifier]:
    vkeys = answer["vkeys"]
    assert isinstance(vkeys, list)
    return [Verifier.from_vkey(v) for v in vkeys]


def test_checkpoints_that_extend_history_are_signed_by_both_keys(store: KeyStore) -> None:
    keys = AuditKeys(store)
    first = keys.vkeys({"origin": ORIGIN})
    assert isinstance(first, dict) and first["size"] == 0
    verifiers = _verifiers(first)
    assert [v.algorithm for v in verifiers] == ["ML-DSA-65", "Ed25519"]
    tree = _tree(40)
    a = keys.sign_checkpoint({"origin": ORIGIN, "size": 10, "root": tree.root(10), "consistency": []})
    assert isinstance(a, dict)
    cp = parse_checkpoint(open_note(str(a["note"]), verifiers, require_all=True).text)
    assert (cp.origin, cp.size, cp.root) == (ORIGIN, 10, tree.root(10))
    b = keys.sign_checkpoint({"origin": ORIGIN, "size": 40, "root": tree.root(40),
                              "consistency": consistency_proof(tree, 10, 40)})
    assert isinstance(b, dict) and parse_checkpoint(open_note(str(b["note"]), verifiers).text).size == 40
    again = keys.sign_checkpoint({"origin": ORIGIN, "size": 40, "root": tree.root(40), "consistency": []})
    assert isinstance(again, dict) and again["size"] == 40
    assert _verifiers(keys.vkeys({"origin": ORIGIN})) == verifiers  # the keys stay


def test_a_fork_a_rewrite_or_a_truncation_is_refused(store: KeyStore) -> None:
    keys = AuditKeys(store)
    tree = _tree(40)
    keys.sign_checkpoint({"origin": ORIGIN, "size": 20, "root": tree.root(20), "consistency": []})
    forked = MemoryTree(tree.node(0, i) for i in range(15))
    for i in range(25):
        forked.append(MemoryTree.from_data([b"fork%d" % i]).node(0, 0))
    bad_requests = [
        # a fork: a valid-looking proof for another history
        {"size": 40, "root": forked.root(40), "consistency": consistency_proof(forked, 20, 40)},
        # the right new root with a proof from another old root
        {"size": 40, "root": tree.root(40), "consistency": consistency_proof(forked, 20, 40)},
        # no proof at all
        {"size": 40, "root": tree.root(40), "consistency": []},
        # the same size, another root: a rewrite
        {"size": 20, "root": forked.root(20), "consistency": []},
        # smaller: a truncation
        {"size": 12, "root": tree.root(12), "consistency": []},
    ]
    for req in bad_requests:
        with pytest.raises(CheckpointInconsistent, match="size 20"):
            keys.sign_checkpoint({"origin": ORIGIN, **req})
    ok = keys.sign_checkpoint({"origin": ORIGIN, "size": 40, "root": tree.root(40),
                               "consistency": consistency_proof(tree, 20, 40)})
    assert isinstance(ok, dict) and ok["size"] == 40


def test_origins_are_independent_and_arguments_checked(store: KeyStore) -> None:
    from qpher_proxy.errors import InvalidInput

    keys = AuditKeys(store)
    a, b = keys.vkeys({"origin": "a.example/log"}), keys.vkeys({"origin": "b.example/log"})
    assert isinstance(a, dict) and isinstance(b, dict) and a["vkeys"] != b["vkeys"]
    for bad in ({"origin": "has space"}, {"origin": "a+b"}, {"origin": ""}, {"origin": 3},
                {"origin": ORIGIN, "size": -1, "root": bytes(32)},
                {"origin": ORIGIN, "size": 1, "root": b"x"},
                {"origin": ORIGIN, "size": 1, "root": bytes(32), "consistency": [b"short"]}):
        with pytest.raises(InvalidInput):
            keys.sign_checkpoint(bad) if "size" in bad else keys.vkeys(bad)


def test_the_keys_are_sealed_and_survive_a_reopen(kms_dir: Path, kek_path: Path, backend: Backend) -> None:
    s = KeyStore(kms_dir, FileKEKProvider(kek_path), backend)
    first = AuditKeys(s).vkeys({"origin": ORIGIN})
    s.close()
    db = sqlite3.connect(kms_dir / DB_FILE)
    (ml_sealed, ed_sealed, kek_id) = db.execute(
        "SELECT mldsa_sealed, ed25519_sealed, kek_id FROM audit_logs").fetchone()
    db.close()
    assert kek_id and len(ml_sealed) > 32 and len(ed_sealed) > 32
    s = KeyStore(kms_dir, FileKEKProvider(kek_path), backend)
    try:
        keys = AuditKeys(s)
        assert keys.vkeys({"origin": ORIGIN}) == first
        tree = _tree(3)
        note = keys.sign_checkpoint({"origin": ORIGIN, "size": 3, "root": tree.root(), "consistency": []})
        assert isinstance(note, dict) and isinstance(first, dict)
        open_note(str(note["note"]), _verifiers(first), require_all=True)
    finally:
        s.close()


async def test_through_a_worker(kms: KMSSupervisor) -> None:
    from qpher_proxy.errors import QpherError

    tree = _tree(9)
    vk = await kms.client.audit_vkeys(ctx(), ORIGIN)
    got = await kms.client.audit_sign_checkpoint(ctx(), ORIGIN, 5, tree.root(5), [])
    open_note(got["note"], _verifiers(vk), require_all=True)
    with pytest.raises(QpherError) as info:
        await kms.client.audit_sign_checkpoint(ctx(), ORIGIN, 9, _tree(9, b"x").root(), [])
    assert info.value.code == "checkpoint_inconsistent" and info.value.status == 409
    got = await kms.client.audit_sign_checkpoint(ctx(), ORIGIN, 9, tree.root(), consistency_proof(tree, 5, 9))
    assert got["size"] == 9


def test_kek_rotation_reseals_the_audit_keys(kms_dir: Path, kek_path: Path, backend: Backend,
                                             tmp_path: Path) -> None:
    from qpher_proxy.kms.worker.kek import generate_kek_file
    from qpher_proxy.kms.worker.kek_rotation import rotate_kek

    s = KeyStore(kms_dir, FileKEKProvider(kek_path), backend)
    first = AuditKeys(s).vkeys({"origin": ORIGIN})
    s.close()
    new_path = tmp_path / "secrets" / "kek-2.b64"
    generate_kek_file(new_path)
    old, new = FileKEKProvider(kek_path), FileKEKProvider(new_path)
    rotate_kek(kms_dir, old, new)
    s = KeyStore(kms_dir, new, backend)
    try:
        assert s._db.execute("SELECT kek_id FROM audit_logs").fetchall() == [(new.kek_id,)]
        note = AuditKeys(s).sign_checkpoint({"origin": ORIGIN, "size": 2, "root": _tree(2).root(),
                                             "consistency": []})
        assert isinstance(note, dict) and isinstance(first, dict)
        open_note(str(note["note"]), _verifiers(first), require_all=True)
    finally:
        s.close()
