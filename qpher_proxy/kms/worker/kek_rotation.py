"""Offline KEK rotation: re-wrap every key file of a store under a new KEK.  KMS only.

``qpher-proxy kms rotate-kek`` runs this with the proxy stopped (the store's lock, taken
exclusively, proves it). The protocol, safe to interrupt at any point and to re-run, is in
:func:`rotate_kek`; the KEK header of each key file and the ``kek-rotation`` marker are what
let a re-run resume. Every file stays whole and under one of the two KEKs throughout.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import keyfile
from .kek import CANARY_FILE, ROTATION_FILE, KEKError, KEKProvider, canary_kek_id, seal_canary, verify_canary
from .keydb import DB_FILE, StoreLock, connect, verify_store_kek, write_transaction
from .keyfile import KeyBinding


@dataclass(frozen=True, slots=True)
class RotationResult:
    """What one ``rotate-kek`` run did."""

    rewrapped: int  # files re-wrapped by this run
    already: int  # files found already under the new KEK (an earlier, interrupted run)
    total: int


def rotate_kek(
    kms_dir: str | os.PathLike[str],
    old: KEKProvider,
    new: KEKProvider,
    *,
    on_progress: Callable[[int, int], None] | None = None,
) -> RotationResult:
    """Re-wrap every key file under ``new``; safe to interrupt and re-run with the same KEKs.

    1. Take the store's lock exclusively (so no KMS is running) and check that ``old`` is the
       store's KEK -- or, for a re-run, that the rotation marker names ``old`` -> ``new``.
    2. Write ``kek-rotation`` naming both KEK ids: from here on no KMS starts until we finish.
    3. For each key file: its header says which KEK wraps it. Under ``new``: skip (an earlier
       run did it). Under ``old``: unwrap, wrap under ``new``, write atomically, then record
       the new KEK id in the database. Anything else: stop, naming the key.
    4. Replace the canary with one sealed by ``new``; remove the marker.

    A crash at any point leaves every file whole and under one of the two KEKs, and the marker
    in place; the next run resumes at step 3. ``on_progress(done, total)`` is called after
    each file.
    """
    d = Path(kms_dir)
    if old.kek_id == new.kek_id:
        raise KEKError(f"the new KEK has the same id ({new.kek_id!r}) as the current one")
    if not (d / DB_FILE).exists():
        raise KEKError(f"no key store in {str(d)!r}")
    lock = StoreLock(d)
    try:
        if not lock.try_exclusive():
            raise KEKError("the key store is in use by a running KMS; stop the proxy before rotating the KEK")
        db = connect(d)
        try:
            return _rotate_locked(d, db, old, new, on_progress)
        finally:
            db.close()
    finally:
        lock.close()


def _rotate_locked(
    d: Path, db: sqlite3.Connection, old: KEKProvider, new: KEKProvider,
    on_progress: Callable[[int, int], None] | None,
) -> RotationResult:
    _begin_or_resume(d, db, old, new)  # steps 1 and 2
    rows = db.execute(
        "SELECT tenant_id, key_id, version, algorithm, file FROM key_versions WHERE file IS NOT NULL "
        "ORDER BY tenant_id, key_id, version"
    ).fetchall()
    total = len(rows)
    rewrapped = already = 0
    for i, (tenant_id, key_id, version, algorithm, rel) in enumerate(rows, 1):  # step 3
        binding = KeyBinding(tenant_id, key_id, version, algorithm)
        if _rewrap(d / rel, binding, old, new):
            rewrapped += 1
        else:
            already += 1
        with write_transaction(db):
            db.execute(
                "UPDATE key_versions SET kek_id = ? WHERE tenant_id = ? AND key_id = ? AND version = ?",
                (new.kek_id, tenant_id, key_id, version),
            )
        if on_progress is not None:
            on_progress(i, total)
    _rewrap_import_jobs(db, old, new)
    _rewrap_audit_keys(db, old, new)
    keyfile.write_atomic(d / CANARY_FILE, seal_canary(new))  # step 4
    keyfile.remove_file(d / ROTATION_FILE)
    return RotationResult(rewrapped, already, total)


def _rewrap_import_jobs(db: sqlite3.Connection, old: KEKProvider, new: KEKProvider) -> int:
    """Put the sealed private keys of live import jobs (kept in their rows) under ``new``, in one
    transaction; a job already under ``new`` (an earlier, interrupted run) is checked and kept."""
    from ...crypto.key_import import import_method
    from .key_import import job_binding

    n = 0
    with write_transaction(db):
        rows = db.execute(
            "SELECT tenant_id, job_id, method, sealed FROM import_jobs WHERE sealed IS NOT NULL"
        ).fetchall()
        for tenant_id, job_id, method, sealed in rows:
            binding = job_binding(tenant_id, job_id, import_method(method))
            blob = _rewrap_blob(bytes(sealed), binding, old, new)
            if blob is not None:
                db.execute(
                    "UPDATE import_jobs SET sealed = ?, kek_id = ? WHERE tenant_id = ? AND job_id = ?",
                    (blob, new.kek_id, tenant_id, job_id),
                )
                n += 1
    return n


def _rewrap_audit_keys(db: Any, old: KEKProvider, new: KEKProvider, *, table: str = "audit_logs",
                       placeholder: str = "?") -> int:
    """Put the audit logs' checkpoint keys (sealed in their rows) under ``new``, as
    ``_rewrap_import_jobs`` does for import jobs: SQLite (``db`` a connection: one transaction of
    its own) or PostgreSQL (``db`` a connection inside the rotation's transaction)."""
    from .audit_keys import audit_binding

    n = 0
    q = placeholder
    with write_transaction(db) if isinstance(db, sqlite3.Connection) else contextlib.nullcontext():
        rows = db.execute(f"SELECT origin, mldsa_sealed, ed25519_sealed FROM {table}").fetchall()
        for origin, ml, ed in rows:
            ml_blob = _rewrap_blob(bytes(ml), audit_binding(origin, "ml-dsa-65"), old, new)
            ed_blob = _rewrap_blob(bytes(ed), audit_binding(origin, "ed25519"), old, new)
            if ml_blob is not None or ed_blob is not None:
                db.execute(
                    f"UPDATE {table} SET mldsa_sealed = {q}, ed25519_sealed = {q}, kek_id = {q} "
                    f"WHERE origin = {q}",
                    (ml_blob if ml_blob is not None else bytes(ml),
                     ed_blob if ed_blob is not None else bytes(ed), new.kek_id, origin),
                )
                n += 1
    return n


def _rewrap_blob(blob: bytes, binding: KeyBinding, old: KEKProvider, new: KEKProvider) -> bytes | None:
    """``blob`` (sealed bytes) sealed under ``new``; None when it already is (checked, not trusted)."""
    what = binding.describe()
    header = keyfile.parse_header(blob, what)
    if header.kek_id == new.kek_id:
        keyfile.unseal(new, binding, blob)
        return None
    if header.kek_id != old.kek_id:
        raise KEKError(f"{what}: wrapped by a third KEK {header.kek_id!r}; cannot re-wrap it")
    seed = keyfile.unseal(old, binding, blob)
    try:
        return keyfile.seal(new, binding, seed)
    finally:
        del seed


def _begin_or_resume(d: Path, db: sqlite3.Connection, old: KEKProvider, new: KEKProvider) -> None:
    """Check that ``old`` is the store's KEK, or that the pending rotation is ``old`` -> ``new``;
    then make sure the marker naming both is in place."""
    marker = d / ROTATION_FILE
    canary = d / CANARY_FILE
    if marker.exists():
        try:
            info = json.loads(marker.read_text())
            ok = info.get("from") == old.kek_id and info.get("to") == new.kek_id
        except (OSError, ValueError, AttributeError):
            ok = False
        if not ok:
            raise KEKError(
                "an interrupted KEK rotation between other KEKs is pending; re-run it with the KEKs it names "
                f"in {str(marker)!r}"
            )
        # the canary is under old (interrupted in step 3) or new (interrupted in step 4)
        if canary.exists():
            data = canary.read_bytes()
            verify_canary(new if canary_kek_id(data) == new.kek_id else old, data)
        return
    if canary.exists():
        data = canary.read_bytes()
        if canary_kek_id(data) == new.kek_id:
            verify_canary(new, data)  # finished earlier: re-check every file below
        else:
            verify_canary(old, data)
    else:
        verify_store_kek(d, old, db)  # an old store without a canary: check a file, write one
    keyfile.write_atomic(marker, json.dumps({"from": old.kek_id, "to": new.kek_id}).encode())


def _rewrap(path: Path, binding: KeyBinding, old: KEKProvider, new: KEKProvider) -> bool:
    """Put one key file under ``new``. False when an earlier run already had (checked, not trusted)."""
    what = binding.describe()
    data = keyfile.read_key_file(path, what)
    header = keyfile.parse_header(data, what)
    if header.kek_id == new.kek_id:
        keyfile.unseal(new, binding, data)  # verify, do not trust the header alone
        return False
    if header.kek_id != old.kek_id:
        raise KEKError(f"{what}: the key file is wrapped by a third KEK {header.kek_id!r}; cannot re-wrap it")
    seed = keyfile.unseal(old, binding, data)
    keyfile.write_atomic(path, keyfile.seal(new, binding, seed))
    del seed
    return True




# ---- PostgreSQL (storage.backend: postgresql) ----------------------------------------------

APPLICATION_NAME = "qpher-proxy"  # what every node's connections call themselves (storage.postgres)
# A node that has just stopped (or a pool just closed) may still be listed by PostgreSQL for a few
# milliseconds while its backends exit: wait that long before the check that refuses.
CLOSING_CONNECTIONS_GRACE = 2.0


def _node_connections(conn: Any) -> int:
    (others,) = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name = %s AND pid <> pg_backend_pid()", (APPLICATION_NAME,)
    ).fetchone() or (0,)
    return int(others)


def _wait_for_closing_connections(conn: Any, grace: float = CLOSING_CONNECTIONS_GRACE) -> None:
    """Return once no node connection is listed, or after ``grace`` seconds (the check under
    the table locks then refuses with the count). Each poll ends its transaction: PostgreSQL
    keeps one snapshot of ``pg_stat_activity`` per transaction."""
    deadline = time.monotonic() + grace
    while True:
        others = _node_connections(conn)
        conn.commit()
        if not others or time.monotonic() >= deadline:
            return
        time.sleep(0.05)


def rotate_kek_postgresql(
    dsn: str,
    old: KEKProvider,
    new: KEKProvider,
    *,
    connect_timeout: float = 5.0,
    on_progress: Callable[[int, int], None] | None = None,
) -> RotationResult:
    """Re-wrap every sealed key version in the database under ``new``, in ONE transaction.

    Atomic where the file store needs a marker: a crash or an error anywhere leaves every blob
    and the KEK check as they were. Refused while any node is connected (every node's
    connections carry ``application_name`` qpher-proxy): a running KMS holding only the old KEK
    could not open what this writes. The tables are locked against writers for the duration.
    A re-run after success finds every version under ``new`` (checked by opening each, not by
    trusting its header) and changes nothing."""
    from ...storage.postgres import connect_owner, mapped

    if old.kek_id == new.kek_id:
        raise KEKError(f"the new KEK has the same id ({new.kek_id!r}) as the current one")
    conn = connect_owner(dsn, connect_timeout)
    try:
        with mapped("rotating the KEK"):
            _wait_for_closing_connections(conn)
        with mapped("rotating the KEK"), conn.transaction():
            # import jobs exist from schema version 3 on; an older database has none to re-wrap
            row = conn.execute("SELECT to_regclass('kms_import_jobs') IS NOT NULL").fetchone()
            has_jobs = bool(row and row[0])
            row = conn.execute("SELECT to_regclass('kms_audit_logs') IS NOT NULL").fetchone()
            has_audit = bool(row and row[0])  # schema version 4 on
            conn.execute("LOCK TABLE kms_key_versions, kms_meta"
                         + (", kms_import_jobs" if has_jobs else "")
                         + (", kms_audit_logs" if has_audit else "") + " IN EXCLUSIVE MODE")
            others = _node_connections(conn)
            if others:
                raise KEKError(
                    f"{others} connection(s) of running qpher-proxy nodes use this database: stop every "
                    "node before rotating the KEK (a KMS with only the old KEK could not open the new blobs)"
                )
            row = conn.execute("SELECT value FROM kms_meta WHERE name = 'kek_canary'").fetchone()
            if row is not None:
                data = bytes(row[0])
                verify_canary(new if canary_kek_id(data) == new.kek_id else old, data)
            rows = conn.execute(
                "SELECT tenant_id, key_id, version, algorithm, sealed FROM kms_key_versions "
                "WHERE sealed IS NOT NULL ORDER BY tenant_id, key_id, version"
            ).fetchall()
            rewrapped = already = 0
            for done, (tenant_id, key_id, version, algorithm, sealed) in enumerate(rows, 1):
                binding = KeyBinding(tenant_id, key_id, version, algorithm)
                blob = bytes(sealed)
                header = keyfile.parse_header(blob, binding.describe())
                if header.kek_id == new.kek_id:
                    keyfile.unseal(new, binding, blob)  # verify, do not trust the header alone
                    already += 1
                elif header.kek_id != old.kek_id:
                    raise KEKError(f"{binding.describe()}: wrapped by a third KEK {header.kek_id!r}; "
                                   "nothing was written")
                else:
                    seed = keyfile.unseal(old, binding, blob)
                    conn.execute(
                        "UPDATE kms_key_versions SET sealed = %s, kek_id = %s WHERE tenant_id = %s "
                        "AND key_id = %s AND version = %s",
                        (keyfile.seal(new, binding, seed), new.kek_id, tenant_id, key_id, version),
                    )
                    del seed
                    rewrapped += 1
                if on_progress is not None:
                    on_progress(done, len(rows))
            if has_jobs:
                _rewrap_pg_import_jobs(conn, old, new)
            if has_audit:
                _rewrap_audit_keys(conn, old, new, table="kms_audit_logs", placeholder="%s")
            conn.execute(
                "INSERT INTO kms_meta (name, value) VALUES ('kek_canary', %s) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value", (seal_canary(new),)
            )
        return RotationResult(rewrapped=rewrapped, already=already, total=len(rows))
    finally:
        conn.close()


def _rewrap_pg_import_jobs(conn: Any, old: KEKProvider, new: KEKProvider) -> int:
    """The sealed private keys of live import jobs under ``new`` (inside the caller's transaction)."""
    from ...crypto.key_import import import_method
    from .key_import import job_binding

    n = 0
    rows = conn.execute(
        "SELECT tenant_id, job_id, method, sealed FROM kms_import_jobs WHERE sealed IS NOT NULL"
    ).fetchall()
    for tenant_id, job_id, method, sealed in rows:
        blob = _rewrap_blob(bytes(sealed), job_binding(tenant_id, job_id, import_method(method)), old, new)
        if blob is not None:
            conn.execute(
                "UPDATE kms_import_jobs SET sealed = %s, kek_id = %s WHERE tenant_id = %s AND job_id = %s",
                (blob, new.kek_id, tenant_id, job_id),
            )
            n += 1
    return n


__all__ = ["RotationResult", "rotate_kek", "rotate_kek_postgresql"]
