"""``qpher-proxy db import-sqlite``: move a single-node state (SQLite + key files) to PostgreSQL.

What moves, in one PostgreSQL transaction (all or nothing):

* API key records from ``auth.db`` (the peppered MACs as they are: every node must use the same
  pepper file, so every key keeps authenticating);
* this and past months' usage counts (a re-run keeps the larger count, never adds twice);
* KMS key metadata from ``<kms.dir>/keys.db`` and every key version's **sealed blob**, the bytes
  of its key file, byte for byte: the blob is AES-256-GCM under the KEK with an AAD that binds
  tenant, key id, version and algorithm (not the file's path), so it opens the same from a
  ``bytea`` column. Nothing is decrypted; the KEK is not needed and never read here;
* the KEK check (``kek-check``), so the KMS refuses a wrong KEK on PostgreSQL as it did on disk.

Rows already present (a re-run, or a key id that exists) are skipped and counted, never
overwritten. The single node must be stopped: the KMS directory's lock is taken exclusively
for the duration, so a running KMS makes the import refuse instead of missing its last writes.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, QpherError
from .migrations import migrate
from .postgres import connect_owner, mapped

__all__ = ["ImportReport", "import_sqlite"]

KMS_DB_FILE = "keys.db"
KMS_LOCK_FILE = "lock"
KMS_CANARY_FILE = "kek-check"


@dataclass
class ImportReport:
    api_keys: int = 0
    usage_rows: int = 0
    keys: int = 0
    versions: int = 0
    import_jobs: int = 0
    audit_logs: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    canary: bool = False

    def skip(self, what: str) -> None:
        self.skipped[what] = self.skipped.get(what, 0) + 1


def _open_ro(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise ConfigError(f"{path}: no such database")
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def _table(db: sqlite3.Connection, name: str) -> bool:
    found = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone()
    return found is not None


def _read_sealed(kms_dir: Path, rel: str) -> bytes:
    if rel.startswith("/") or ".." in rel.split("/"):
        raise QpherError(f"refusing the key file handle {rel!r}", code="import_failed")
    path = kms_dir / rel
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise QpherError(f"cannot read key file {rel}: {exc.strerror}; nothing was imported",
                         code="import_failed") from None
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


def import_sqlite(
    *, dsn: str, role_prefix: str, auth_db: str | os.PathLike[str], kms_dir: str | os.PathLike[str],
    connect_timeout: float = 5.0,
) -> ImportReport:
    kms = Path(kms_dir)
    report = ImportReport()
    lock_fd = -1
    if (kms / KMS_LOCK_FILE).exists():
        lock_fd = os.open(kms / KMS_LOCK_FILE, os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(lock_fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise QpherError("the KMS of this state is running: stop the proxy before importing",
                                 code="import_failed") from None
            raise
    try:
        migrate(dsn, role_prefix, connect_timeout=connect_timeout)
        conn = connect_owner(dsn, connect_timeout)
        try:
            with mapped("importing"), conn.transaction():
                if Path(auth_db).exists():
                    _import_gateway(conn, Path(auth_db), report)
                if (kms / KMS_DB_FILE).exists():
                    _import_kms(conn, kms, report)
        finally:
            conn.close()
    finally:
        if lock_fd >= 0:
            os.close(lock_fd)
    return report


def _import_gateway(conn: Any, path: Path, report: ImportReport) -> None:
    src = _open_ro(path)
    try:
        if _table(src, "api_keys"):
            for row in src.execute(
                "SELECT key_id, tenant, plan, scopes, created_at, expires_at, revoked_at, label, secret_mac "
                "FROM api_keys ORDER BY created_at, key_id"
            ):
                cur = conn.execute(
                    "INSERT INTO api_keys (key_id, tenant_id, plan, scopes, created_at, expires_at, "
                    "revoked_at, label, secret_mac) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) "
                    "ON CONFLICT DO NOTHING",
                    (*row[:8], bytes(row[8])),
                )
                if cur.rowcount == 1:
                    report.api_keys += 1
                else:
                    report.skip("api_keys")
        if _table(src, "quota_usage"):
            for tenant, month, op_class, count in src.execute(
                "SELECT tenant, month, op_class, count FROM quota_usage"
            ):
                conn.execute(
                    "INSERT INTO quota_usage (tenant_id, month, op_class, count) VALUES (%s, %s, %s, %s) "
                    "ON CONFLICT (tenant_id, month, op_class) DO UPDATE "
                    "SET count = greatest(quota_usage.count, excluded.count)",
                    (tenant, month, op_class, int(count)),
                )
                report.usage_rows += 1
    finally:
        src.close()


def _import_kms(conn: Any, kms: Path, report: ImportReport) -> None:
    src = _open_ro(kms / KMS_DB_FILE)
    try:
        keys = src.execute(
            "SELECT tenant_id, key_id, kind, algorithm, label, state, resume_state, latest_version, "
            "created_at, updated_at, destroy_at, destroyed_at FROM keys ORDER BY tenant_id, key_id"
        ).fetchall()
        # origin and import_job_id: key stores of schema version 3 on (older ones only generated keys)
        columns = {r[1] for r in src.execute("PRAGMA table_info(key_versions)")}
        origin = "origin, import_job_id" if "origin" in columns else "'generated', NULL"
        versions = src.execute(
            "SELECT tenant_id, key_id, version, algorithm, state, public_key, file, kek_id, created_at, "
            f"{origin} FROM key_versions ORDER BY tenant_id, key_id, version"
        ).fetchall()
        jobs = src.execute(
            "SELECT tenant_id, job_id, method, public_key, sealed, kek_id, created_at, expires_at, "
            "destroyed_at FROM import_jobs ORDER BY tenant_id, job_id"
        ).fetchall() if _table(src, "import_jobs") else []
        audit_logs = src.execute(
            "SELECT origin, mldsa_public, mldsa_sealed, ed25519_public, ed25519_sealed, kek_id, size, root, "
            "created_at, updated_at FROM audit_logs ORDER BY origin"
        ).fetchall() if _table(src, "audit_logs") else []
    finally:
        src.close()
    imported: set[tuple[str, str]] = set()
    for row in keys:
        cur = conn.execute(
            "INSERT INTO kms_keys (tenant_id, key_id, kind, algorithm, label, state, resume_state, "
            "latest_version, created_at, updated_at, destroy_at, destroyed_at) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
            row,
        )
        if cur.rowcount == 1:
            report.keys += 1
            imported.add((row[0], row[1]))
        else:
            report.skip("keys")
    for (tenant_id, key_id, version, algorithm, state, public_key, rel, kek_id, created_at, how,
         job_id) in versions:
        if (tenant_id, key_id) not in imported:
            report.skip("versions")
            continue
        sealed = _read_sealed(kms, rel) if rel is not None else None
        conn.execute(
            "INSERT INTO kms_key_versions (tenant_id, key_id, version, algorithm, state, public_key, sealed, "
            "kek_id, created_at, origin, import_job_id) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (tenant_id, key_id, version, algorithm, state, bytes(public_key), sealed, kek_id, created_at, how,
             job_id),
        )
        report.versions += 1
    for job in jobs:  # key-import jobs: the sealed job key moves as it is (same binding, same KEK)
        cur = conn.execute(
            "INSERT INTO kms_import_jobs (tenant_id, job_id, method, public_key, sealed, kek_id, created_at, "
            "expires_at, destroyed_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
            (*job[:3], bytes(job[3]), None if job[4] is None else bytes(job[4]), *job[5:]),
        )
        if cur.rowcount == 1:
            report.import_jobs += 1
        else:
            report.skip("import_jobs")
    for row in audit_logs:  # the audit log's checkpoint keys and last signed tree head, as they are
        cur = conn.execute(
            "INSERT INTO kms_audit_logs (origin, mldsa_public, mldsa_sealed, ed25519_public, ed25519_sealed, "
            "kek_id, size, root, created_at, updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT DO NOTHING",
            tuple(bytes(v) if isinstance(v, (bytes, memoryview)) else v for v in row),
        )
        if cur.rowcount == 1:
            report.audit_logs += 1
        else:
            report.skip("audit_logs")
    canary = kms / KMS_CANARY_FILE
    if canary.is_file():
        cur = conn.execute(
            "INSERT INTO kms_meta (name, value) VALUES ('kek_canary', %s) ON CONFLICT DO NOTHING",
            (canary.read_bytes(),),
        )
        report.canary = cur.rowcount == 1
