"""Audit checkpoints on the PostgreSQL key store: the same rule as on SQLite across two stores
(two KMS nodes), KMS-only grants, the size never goes down, KEK rotation re-seals the keys."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import psycopg
import pytest

from qpher_proxy.audit.merkle import MemoryTree, consistency_proof
from qpher_proxy.audit.note import Verifier, open_note, parse_checkpoint
from qpher_proxy.errors import CheckpointInconsistent
from qpher_proxy.kms.worker.audit_keys import AuditKeys
from qpher_proxy.kms.worker.backends import select_backend
from qpher_proxy.kms.worker.kek import LocalKEKProvider
from qpher_proxy.kms.worker.kek_rotation import rotate_kek_postgresql
from qpher_proxy.kms.worker.pg_keystore import PgKeyStore

from .conftest import (
    PgDatabase,
    migrated_database,
)

ORIGIN = "pg.example/audit"


@pytest.fixture(scope="module")
def db() -> Iterator[PgDatabase]:
    with migrated_database() as pg:
        yield pg


def _open(db: PgDatabase, kek: LocalKEKProvider) -> PgKeyStore:
    return PgKeyStore.open(db.dsn, kek, select_backend("openssl"), role_prefix=db.role_prefix, pool_size=1)


def _tree(n: int, tag: bytes = b"") -> MemoryTree:
    return MemoryTree.from_data(tag + i.to_bytes(4, "big") for i in range(n))


def test_two_kms_nodes_share_one_history_and_the_keys(db: PgDatabase) -> None:
    kek = LocalKEKProvider(secrets.token_bytes(32), "pg test KEK")
    a, b = _open(db, kek), _open(db, kek)
    try:
        ka, kb = AuditKeys(a), AuditKeys(b)
        va, vb = ka.vkeys({"origin": ORIGIN}), kb.vkeys({"origin": ORIGIN})
        assert isinstance(va, dict) and va == vb
        verifiers = [Verifier.from_vkey(v) for v in va["vkeys"]]  # type: ignore[union-attr]
        tree = _tree(30)
        note = ka.sign_checkpoint({"origin": ORIGIN, "size": 10, "root": tree.root(10), "consistency": []})
        assert isinstance(note, dict)
        assert parse_checkpoint(open_note(str(note["note"]), verifiers, require_all=True).text).size == 10
        with pytest.raises(CheckpointInconsistent, match="size 10"):  # the other node knows
            kb.sign_checkpoint({"origin": ORIGIN, "size": 30, "root": _tree(30, b"x").root(),
                                "consistency": []})
        with pytest.raises(CheckpointInconsistent):
            kb.sign_checkpoint({"origin": ORIGIN, "size": 5, "root": tree.root(5), "consistency": []})
        ok = kb.sign_checkpoint({"origin": ORIGIN, "size": 30, "root": tree.root(30),
                                 "consistency": consistency_proof(tree, 10, 30)})
        assert isinstance(ok, dict) and ok["size"] == 30
    finally:
        a.close()
        b.close()

    with psycopg.connect(db.dsn) as c:
        c.execute(f"SET ROLE {db.role_prefix}_gateway")  # type: ignore[arg-type]
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("SELECT 1 FROM kms_audit_logs")
    with psycopg.connect(db.dsn) as c:
        c.execute(f"SET ROLE {db.role_prefix}_kms")  # type: ignore[arg-type]
        with pytest.raises(psycopg.errors.CheckViolation):
            c.execute("UPDATE kms_audit_logs SET size = 1, root = %s", (bytes(32),))
    with psycopg.connect(db.dsn) as c:
        c.execute(f"SET ROLE {db.role_prefix}_kms")  # type: ignore[arg-type]
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("DELETE FROM kms_audit_logs")

    new = LocalKEKProvider(secrets.token_bytes(32), "pg test KEK 2")
    rotate_kek_postgresql(db.dsn, kek, new)
    s = _open(db, new)
    try:
        again = AuditKeys(s).sign_checkpoint({"origin": ORIGIN, "size": 30, "root": tree.root(30),
                                              "consistency": []})
        assert isinstance(again, dict)
        open_note(str(again["note"]), verifiers, require_all=True)
    finally:
        s.close()
