"""The audit log's checkpoint keys and the one rule for signing with them.  KMS only.

Theory of operation
-------------------
A gateway keeps its audit log as an RFC 6962 Merkle tree (``qpher_proxy.audit``) and asks the KMS
to sign *checkpoints* of it: ``(origin, size, root)`` as a C2SP signed note with two lines, an
ML-DSA-65 signature (type ``0xff`` + ``ML-DSA-65``) and an Ed25519 co-signature (type ``0x01``),
both under the key name ``origin``. The point of signing in the KMS rather than in the gateway is
that a compromised gateway must not be able to obtain a signature on a history that contradicts
one signed before — a log cut short, rewritten, or forked.

**Keys.** Per origin, one ML-DSA-65 and one Ed25519 key, created on first use inside the KMS
(``_ensure``), their 32-byte seeds sealed under the KEK exactly like a key version
(``keyfile.seal``, bound to ``KeyBinding(AUDIT_TENANT, origin, 1, algorithm)``) and kept in the
origin's row of ``audit_logs`` (SQLite key store, schema 4) or ``kms_audit_logs`` (PostgreSQL,
migration 4: KMS role only). They are system keys, not tenant keys: no tenant repository reaches
them, no operation exports them; only their public halves leave (``audit_vkeys``). ``kms
rotate-kek`` re-seals them with the key versions; ``db import-sqlite`` moves them.

**The rule** (``sign_checkpoint``), in one write transaction per request, so that the KMS
workers (and, on PostgreSQL, the KMS nodes: ``SELECT ... FOR UPDATE``) sharing the store
serialise on it: the row holds the last ``(size, root)`` signed for
the origin. A request ``(size, root, consistency)`` is signed only if

* ``size`` equals the last size and ``root`` the last root (the same checkpoint again), or
* ``size`` is larger and ``consistency`` is a valid RFC 9162 consistency proof from the last
  ``(size, root)`` to the new one (no proof is needed from the empty tree);

anything else is ``409 checkpoint_inconsistent`` with the last signed size in the message (so
that an honest gateway that raced another can build the right proof). The row is updated to the
new ``(size, root)`` in the same transaction, then the note is signed and returned.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519, mldsa

from ...audit.merkle import ProofError, verify_consistency
from ...audit.note import (
    ED25519_TYPE,
    MLDSA65_TYPE,
    NoteError,
    Verifier,
    format_checkpoint,
    signature_line,
    signed_note,
)
from ...errors import CheckpointInconsistent, InvalidInput
from ..wire.protocol import Value
from . import keyfile
from .kek import KEKProvider
from .keydb import mapped_errors
from .keyfile import KeyBinding

__all__ = ["AUDIT_TENANT", "AuditKeys", "CheckpointInconsistent", "audit_binding"]

AUDIT_TENANT = "qpher:audit"  # the binding's tenant field: no tenant id can be spelled like it
MAX_ORIGIN_BYTES = 255
MAX_PROOF_HASHES = 128


def audit_binding(origin: str, algorithm: str) -> KeyBinding:
    return KeyBinding(AUDIT_TENANT, origin, 1, algorithm)


def _origin(value: object) -> str:
    if type(value) is not str or not value or len(value.encode()) > MAX_ORIGIN_BYTES:
        raise InvalidInput("origin must be a string of 1..255 bytes")
    try:
        Verifier(value, ED25519_TYPE, bytes(32))
    except NoteError as exc:
        raise InvalidInput("origin must hold no space and no '+'") from exc
    return value


def _hash(value: object, what: str) -> bytes:
    if type(value) is not bytes or len(value) != 32:
        raise InvalidInput(f"{what} must be 32 bytes")
    return value


class AuditKeys:
    """The audit keys and checkpoint state of a key store: the ``audit_logs`` table of the SQLite
    store (``KeyStore``), ``kms_audit_logs`` of the PostgreSQL one (``PgKeyStore``; KMS role only,
    ``SELECT ... FOR UPDATE`` serialises the KMS nodes)."""

    def __init__(self, store: Any, *, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock
        self._pg = getattr(store, "dir", None) is None  # PgKeyStore keeps nothing in a directory
        self._table = "kms_audit_logs" if self._pg else "audit_logs"

    @contextmanager
    def _tx(self, what: str) -> Iterator[Callable[[str, tuple[Any, ...]], Any]]:
        """One write transaction; yields ``execute(sql, params)`` (``?`` placeholders)."""
        if self._pg:
            with self._store.db.transaction(what=what) as conn:
                yield lambda q, p: conn.execute(q.replace("?", "%s"), p)
        else:
            with mapped_errors(what), self._store._transaction():
                yield lambda q, p: self._store._db.execute(q, p)

    def _row(self, execute: Callable[[str, tuple[Any, ...]], Any], origin: str) -> tuple[Any, ...] | None:
        row = execute(
            "SELECT mldsa_public, mldsa_sealed, ed25519_public, ed25519_sealed, size, root "
            f"FROM {self._table} WHERE origin = ?" + (" FOR UPDATE" if self._pg else ""),
            (origin,),
        ).fetchone()
        return None if row is None else tuple(bytes(v) if isinstance(v, memoryview) else v for v in row)

    def _ensure(self, execute: Callable[[str, tuple[Any, ...]], Any], origin: str) -> tuple[Any, ...]:
        """The origin's row, locked, its keys created first if need be."""
        row = self._row(execute, origin)
        if row is not None:
            return row
        kek: KEKProvider = self._store.kek
        ml_seed, ed_seed = os.urandom(32), os.urandom(32)
        ml_pub = mldsa.MLDSA65PrivateKey.from_seed_bytes(ml_seed).public_key().public_bytes_raw()
        ed_pub = ed25519.Ed25519PrivateKey.from_private_bytes(ed_seed).public_key().public_bytes_raw()
        now = self._clock()
        execute(
            f"INSERT INTO {self._table} (origin, mldsa_public, mldsa_sealed, ed25519_public, ed25519_sealed, "
            "kek_id, size, root, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, 0, NULL, ?, ?) "
            "ON CONFLICT (origin) DO NOTHING",  # another worker made them first: theirs stay
            (origin, ml_pub, keyfile.seal(kek, audit_binding(origin, "ml-dsa-65"), ml_seed),
             ed_pub, keyfile.seal(kek, audit_binding(origin, "ed25519"), ed_seed), kek.kek_id, now, now),
        )
        del ml_seed, ed_seed
        row = self._row(execute, origin)
        assert row is not None
        return row

    def vkeys(self, args: dict[str, Value]) -> Value:
        """``{"origin", "vkeys": [ML-DSA-65 vkey, Ed25519 vkey], "size", "root"}``: the verifier
        keys (created on first use) and the last signed tree head."""
        origin = _origin(args.get("origin"))
        with self._tx("reading the audit keys") as execute:
            row = self._ensure(execute, origin)
        return self._answer(origin, row)

    def sign_checkpoint(self, args: dict[str, Value]) -> Value:
        """Sign ``(origin, size, root)`` if it extends what was signed before (see the module
        docstring); ``{"note", "vkeys", "size", "root"}``."""
        origin = _origin(args.get("origin"))
        size = args.get("size")
        if type(size) is not int or size < 0:
            raise InvalidInput("size must be an integer >= 0")
        root = _hash(args.get("root"), "root")
        proof_arg = args.get("consistency", [])
        if type(proof_arg) is not list or len(proof_arg) > MAX_PROOF_HASHES:
            raise InvalidInput(f"consistency must be a list of at most {MAX_PROOF_HASHES} hashes")
        proof = [_hash(h, "a consistency hash") for h in proof_arg]
        with self._tx("signing an audit checkpoint") as execute:
            row = self._ensure(execute, origin)
            last_size, last_root = int(row[4]), row[5]
            if size < last_size or (size == last_size and last_size > 0 and root != last_root):
                raise CheckpointInconsistent(
                    f"the checkpoint does not extend the last one signed for this origin (size {last_size})"
                )
            if last_size > 0 and size > last_size:
                try:
                    verify_consistency(last_size, size, proof, last_root, root)
                except ProofError as exc:
                    raise CheckpointInconsistent(
                        "the consistency proof from the last checkpoint signed for this origin "
                        f"(size {last_size}) does not verify"
                    ) from exc
            execute(
                f"UPDATE {self._table} SET size = ?, root = ?, updated_at = ? WHERE origin = ?",
                (size, root, self._clock(), origin),
            )
        text = format_checkpoint(origin, size, root)
        kek: KEKProvider = self._store.kek
        ml = mldsa.MLDSA65PrivateKey.from_seed_bytes(
            keyfile.unseal(kek, audit_binding(origin, "ml-dsa-65"), row[1])
        )
        ed = ed25519.Ed25519PrivateKey.from_private_bytes(
            keyfile.unseal(kek, audit_binding(origin, "ed25519"), row[3])
        )
        vm, ve = _verifiers(origin, row)
        body = text.encode()
        note = signed_note(text, [signature_line(origin, vm.key_id, ml.sign(body)),
                                  signature_line(origin, ve.key_id, ed.sign(body))])
        answer = self._answer(origin, row)
        assert isinstance(answer, dict)
        answer.update({"note": note, "size": size, "root": root})
        return answer

    def _answer(self, origin: str, row: tuple[Any, ...]) -> Value:
        vm, ve = _verifiers(origin, row)
        return {"origin": origin, "vkeys": [vm.vkey(), ve.vkey()], "size": int(row[4]),
                "root": row[5] if row[5] is not None else b""}


def _verifiers(origin: str, row: tuple[Any, ...]) -> tuple[Verifier, Verifier]:
    return Verifier(origin, MLDSA65_TYPE, bytes(row[0])), Verifier(origin, ED25519_TYPE, bytes(row[2]))
