"""The PostgreSQL schema: versioned migrations, the roles, their GRANTs and row-level security.

``qpher-proxy db migrate`` applies every migration the database has not seen, each in its own
transaction, under a transaction-level advisory lock (two nodes starting at once migrate once).
``serve`` does the same when the schema is older than this build and refuses to start when it
is newer (``SchemaTooNew``): an old binary must not write rows a newer schema reinterprets.

What the schema guarantees (the four layers of tenant isolation of the trust-center page, plus
row-level security):

* every tenant table has ``tenant_id`` with a ``CHECK`` and a composite unique index or primary
  key that starts with it;
* **row-level security** on every tenant table: the product's roles see and write only the rows
  whose ``tenant_id`` equals ``current_setting('qpher.tenant')``, which the repository sets per
  transaction (``Database.transaction(tenant=...)``). The roles are neither owner nor
  ``BYPASSRLS``. The two reads that cannot know the tenant in advance are ``SECURITY DEFINER``
  functions returning exactly what they must: ``<p>_api_key_lookup(key_id)`` (authentication
  derives the tenant *from* the key) and ``<p>_kms_due(now)`` / ``<p>_kms_sample_version()`` /
  ``<p>_kms_idempotency_expire(before)`` / ``<p>_kms_import_jobs_expire(now)`` (the KMS's
  cross-tenant sweeps and KEK check, which answer no request);
* the **gateway role has no privilege at all on the KMS tables** and the **KMS role none on
  the API keys** (the process boundary, enforced again by the database);
* key state is monotonic: a trigger refuses to bring a destroyed key or version back, and no
  role may ``DELETE`` a key row.

Change notification: a statement-level trigger bumps ``<p>``'s ``change_counters`` row for
``api_keys`` / ``kms_keys`` and sends ``NOTIFY``; gateways poll the counter (one indexed read per
``auth.cache_ttl``), which bounds how long a revocation made on another node goes unseen.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from ..crypto.algorithms import ALGORITHMS
from ..errors import QpherError, StorageUnavailable
from .postgres import connect_owner, mapped, role_name

__all__ = ["Migration", "MIGRATIONS", "SCHEMA_VERSION", "SchemaTooNew", "SchemaTooOld",
           "current_version", "migrate", "check_schema"]

log = logging.getLogger("qpher.storage.migrations")


class SchemaTooNew(QpherError):
    code = "schema_too_new"
    status = 503


class SchemaTooOld(QpherError):
    code = "schema_too_old"
    status = 503


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: Callable[[dict[str, str]], list[str]]


def _v1(n: dict[str, str]) -> list[str]:
    algs = ", ".join(f"'{a}'" for a in sorted(ALGORITHMS))
    tenant_check = "CHECK (length(tenant_id) BETWEEN 1 AND 255)"
    tenant_is = "tenant_id = current_setting('qpher.tenant', true)"
    gw, kms, admin = n["gateway"], n["kms"], n["admin"]
    p = n["prefix"]
    out = []
    for role in (gw, kms, admin):
        out.append(
            f"DO $$ BEGIN CREATE ROLE {role} NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE "
            f"NOINHERIT; EXCEPTION WHEN duplicate_object THEN NULL; END $$"
        )
        # the migrating user may SET ROLE to it (a superuser may anyway)
        out.append(f"GRANT {role} TO CURRENT_USER")
    out += [
        # ---- gateway tables ----
        f"""CREATE TABLE api_keys (
            key_id     text PRIMARY KEY CHECK (key_id ~ '^[a-z0-9]{{12}}$'),
            tenant_id  text NOT NULL {tenant_check},
            plan       text NOT NULL CHECK (length(plan) BETWEEN 1 AND 128),
            scopes     text NOT NULL,
            created_at double precision NOT NULL,
            expires_at double precision,
            revoked_at double precision,
            label      text CHECK (label IS NULL OR length(label) <= 128),
            secret_mac bytea NOT NULL CHECK (length(secret_mac) = 32),
            UNIQUE (tenant_id, key_id)
        )""",
        f"""CREATE TABLE quota_usage (
            tenant_id text NOT NULL {tenant_check},
            month     text NOT NULL CHECK (month ~ '^[0-9]{{4}}-[0-9]{{2}}$'),
            op_class  text NOT NULL CHECK (length(op_class) BETWEEN 1 AND 64),
            count     bigint NOT NULL CHECK (count >= 0),
            PRIMARY KEY (tenant_id, month, op_class)
        )""",
        # ---- KMS tables ----
        f"""CREATE TABLE kms_keys (
            tenant_id      text NOT NULL {tenant_check},
            key_id         text NOT NULL CHECK (length(key_id) = 28 AND key_id LIKE 'k\\_%'),
            kind           text NOT NULL CHECK (kind IN ('kem', 'signature')),
            algorithm      text NOT NULL CHECK (algorithm IN ({algs})),
            label          text CHECK (label IS NULL OR length(label) <= 256),
            state          text NOT NULL
                           CHECK (state IN ('enabled', 'disabled', 'pending_destruction', 'destroyed')),
            resume_state   text CHECK (resume_state IS NULL OR resume_state IN ('enabled', 'disabled')),
            latest_version integer NOT NULL CHECK (latest_version >= 1),
            created_at     double precision NOT NULL,
            updated_at     double precision NOT NULL,
            destroy_at     double precision,
            destroyed_at   double precision,
            PRIMARY KEY (tenant_id, key_id),
            CHECK ((state = 'pending_destruction') = (destroy_at IS NOT NULL AND resume_state IS NOT NULL))
        )""",
        "CREATE INDEX kms_keys_due ON kms_keys (destroy_at) WHERE state = 'pending_destruction'",
        f"""CREATE TABLE kms_key_versions (
            tenant_id  text NOT NULL {tenant_check},
            key_id     text NOT NULL,
            version    integer NOT NULL CHECK (version >= 1),
            algorithm  text NOT NULL CHECK (algorithm IN ({algs})),
            state      text NOT NULL CHECK (state IN ('active', 'destroyed')),
            public_key bytea NOT NULL,
            sealed     bytea,
            kek_id     text,
            created_at double precision NOT NULL,
            PRIMARY KEY (tenant_id, key_id, version),
            CHECK ((state = 'active') = (sealed IS NOT NULL)),
            FOREIGN KEY (tenant_id, key_id) REFERENCES kms_keys (tenant_id, key_id)
        )""",
        "CREATE TABLE kms_meta (name text PRIMARY KEY, value bytea NOT NULL)",
        # ---- coordination ----
        """CREATE TABLE leases (
            name       text PRIMARY KEY,
            holder     text NOT NULL,
            token      bigint NOT NULL CHECK (token >= 1),
            expires_at timestamptz NOT NULL
        )""",
        "CREATE TABLE change_counters (name text PRIMARY KEY, version bigint NOT NULL)",
        "INSERT INTO change_counters (name, version) VALUES ('api_keys', 0), ('kms_keys', 0)",
        # ---- monotonic key state ----
        f"""CREATE FUNCTION {p}_kms_monotonic() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF OLD.state = 'destroyed' AND (NEW.state <> 'destroyed') THEN
                RAISE EXCEPTION 'a destroyed key never comes back' USING ERRCODE = 'check_violation';
            END IF;
            RETURN NEW;
        END $$""",
        f"CREATE TRIGGER kms_keys_monotonic BEFORE UPDATE ON kms_keys FOR EACH ROW "
        f"EXECUTE FUNCTION {p}_kms_monotonic()",
        f"""CREATE FUNCTION {p}_kms_version_monotonic() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF OLD.state = 'destroyed' AND (NEW.state <> 'destroyed' OR NEW.sealed IS NOT NULL) THEN
                RAISE EXCEPTION 'a destroyed key version never comes back' USING ERRCODE = 'check_violation';
            END IF;
            RETURN NEW;
        END $$""",
        f"CREATE TRIGGER kms_versions_monotonic BEFORE UPDATE ON kms_key_versions FOR EACH ROW "
        f"EXECUTE FUNCTION {p}_kms_version_monotonic()",
        # ---- change counters (SECURITY DEFINER: the roles cannot write the counters) ----
        f"""CREATE FUNCTION {p}_bump_counter() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
            SET search_path = pg_catalog, public AS $$
        BEGIN
            UPDATE change_counters SET version = version + 1 WHERE name = TG_ARGV[0];
            PERFORM pg_notify('{p}_' || TG_ARGV[0], '');
            RETURN NULL;
        END $$""",
        f"CREATE TRIGGER api_keys_changed AFTER INSERT OR UPDATE OR DELETE ON api_keys "
        f"FOR EACH STATEMENT EXECUTE FUNCTION {p}_bump_counter('api_keys')",
        f"CREATE TRIGGER kms_keys_changed AFTER INSERT OR UPDATE OR DELETE ON kms_keys "
        f"FOR EACH STATEMENT EXECUTE FUNCTION {p}_bump_counter('kms_keys')",
        # ---- the cross-tenant reads, as narrow functions ----
        f"""CREATE FUNCTION {p}_api_key_lookup(p_key_id text)
            RETURNS TABLE (key_id text, tenant_id text, plan text, scopes text,
                           created_at double precision, expires_at double precision,
                           revoked_at double precision, label text, secret_mac bytea)
            LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public AS $$
            SELECT key_id, tenant_id, plan, scopes, created_at, expires_at, revoked_at, label, secret_mac
            FROM api_keys WHERE api_keys.key_id = p_key_id
        $$""",
        f"""CREATE FUNCTION {p}_kms_due(p_now double precision, p_limit integer)
            RETURNS TABLE (tenant_id text, key_id text)
            LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public AS $$
            SELECT tenant_id, key_id FROM kms_keys
            WHERE state = 'pending_destruction' AND destroy_at <= p_now
            ORDER BY destroy_at LIMIT p_limit
        $$""",
        f"""CREATE FUNCTION {p}_kms_sample_version()
            RETURNS TABLE (tenant_id text, key_id text, version integer, algorithm text, sealed bytea)
            LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public AS $$
            SELECT tenant_id, key_id, version, algorithm, sealed FROM kms_key_versions
            WHERE sealed IS NOT NULL LIMIT 1
        $$""",
    ]
    for fn in (f"{p}_api_key_lookup(text)", f"{p}_kms_due(double precision, integer)",
               f"{p}_kms_sample_version()", f"{p}_bump_counter()", f"{p}_kms_monotonic()",
               f"{p}_kms_version_monotonic()"):
        out.append(f"REVOKE ALL ON FUNCTION {fn} FROM PUBLIC")
    out += [
        # ---- row-level security ----
        "ALTER TABLE api_keys ENABLE ROW LEVEL SECURITY",
        "ALTER TABLE quota_usage ENABLE ROW LEVEL SECURITY",
        "ALTER TABLE kms_keys ENABLE ROW LEVEL SECURITY",
        "ALTER TABLE kms_key_versions ENABLE ROW LEVEL SECURITY",
        f"CREATE POLICY api_keys_gateway ON api_keys TO {gw} USING ({tenant_is})",
        f"CREATE POLICY api_keys_admin ON api_keys TO {admin} USING (true) WITH CHECK (true)",
        f"CREATE POLICY quota_gateway ON quota_usage TO {gw} USING ({tenant_is}) WITH CHECK ({tenant_is})",
        f"CREATE POLICY quota_admin ON quota_usage TO {admin} USING (true)",
        f"CREATE POLICY kms_keys_kms ON kms_keys TO {kms} USING ({tenant_is}) WITH CHECK ({tenant_is})",
        f"CREATE POLICY kms_versions_kms ON kms_key_versions TO {kms} "
        f"USING ({tenant_is}) WITH CHECK ({tenant_is})",
        # ---- GRANTs: exactly what each process needs ----
        "REVOKE ALL ON api_keys, quota_usage, kms_keys, kms_key_versions, kms_meta, leases, change_counters "
        "FROM PUBLIC",
        f"GRANT USAGE ON SCHEMA public TO {gw}, {kms}, {admin}",
        f"GRANT SELECT ON api_keys TO {gw}",
        f"GRANT SELECT, INSERT, UPDATE ON quota_usage TO {gw}",
        f"GRANT SELECT ON change_counters TO {gw}, {kms}, {admin}",
        f"GRANT EXECUTE ON FUNCTION {p}_api_key_lookup(text) TO {gw}",
        f"GRANT SELECT, INSERT, UPDATE ON api_keys TO {admin}",
        f"GRANT SELECT ON quota_usage TO {admin}",
        f"GRANT SELECT, INSERT, UPDATE ON kms_keys, kms_key_versions TO {kms}",
        f"GRANT SELECT, INSERT ON kms_meta TO {kms}",
        f"GRANT SELECT, INSERT, UPDATE ON leases TO {kms}",
        f"GRANT EXECUTE ON FUNCTION {p}_kms_due(double precision, integer), {p}_kms_sample_version() "
        f"TO {kms}",
    ]
    return out


def _v2(n: dict[str, str]) -> list[str]:
    """Idempotency records of key creation and rotation (see ``kms/worker/key_rules``): the KMS
    role only, row-level security per tenant, and one ``SECURITY DEFINER`` function for the
    sweep's cross-tenant expiry. The idempotency key itself is never stored, only its SHA-256."""
    tenant_check = "CHECK (length(tenant_id) BETWEEN 1 AND 255)"
    tenant_is = "tenant_id = current_setting('qpher.tenant', true)"
    kms, p = n["kms"], n["prefix"]
    expire = f"{p}_kms_idempotency_expire(double precision)"
    return [
        f"""CREATE TABLE kms_idempotency (
            tenant_id   text NOT NULL {tenant_check},
            key_hash    bytea NOT NULL CHECK (length(key_hash) = 32),
            operation   text NOT NULL CHECK (operation IN ('create_key', 'rotate_key')),
            fingerprint bytea NOT NULL CHECK (length(fingerprint) = 32),
            key_id      text NOT NULL,
            version     integer NOT NULL CHECK (version >= 1),
            created_at  double precision NOT NULL,
            PRIMARY KEY (tenant_id, key_hash)
        )""",
        "CREATE INDEX kms_idempotency_age ON kms_idempotency (created_at)",
        f"""CREATE FUNCTION {p}_kms_idempotency_expire(p_before double precision) RETURNS integer
            LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, public AS $$
            WITH gone AS (DELETE FROM kms_idempotency WHERE created_at <= p_before RETURNING 1)
            SELECT count(*)::integer FROM gone
        $$""",
        f"REVOKE ALL ON FUNCTION {expire} FROM PUBLIC",
        "ALTER TABLE kms_idempotency ENABLE ROW LEVEL SECURITY",
        f"CREATE POLICY kms_idempotency_kms ON kms_idempotency TO {kms} "
        f"USING ({tenant_is}) WITH CHECK ({tenant_is})",
        "REVOKE ALL ON kms_idempotency FROM PUBLIC",
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON kms_idempotency TO {kms}",
        f"GRANT EXECUTE ON FUNCTION {expire} TO {kms}",
    ]


def _v3(n: dict[str, str]) -> list[str]:
    """Key import (see ``kms/worker/key_import``): import jobs -- the job's public key and its
    *sealed* private key (the bytes a key file would hold, under the KEK; NULL once destroyed) --
    for the KMS role only, row-level security per tenant, one ``SECURITY DEFINER`` function for
    the sweep's cross-tenant destruction of expired jobs; and the origin of every key version."""
    from ..crypto.key_import import IMPORT_METHODS

    tenant_check = "CHECK (length(tenant_id) BETWEEN 1 AND 255)"
    tenant_is = "tenant_id = current_setting('qpher.tenant', true)"
    methods = ", ".join(f"'{m}'" for m in sorted(IMPORT_METHODS))
    kms, p = n["kms"], n["prefix"]
    expire = f"{p}_kms_import_jobs_expire(double precision)"
    return [
        f"""CREATE TABLE kms_import_jobs (
            tenant_id    text NOT NULL {tenant_check},
            job_id       text NOT NULL CHECK (length(job_id) = 29 AND job_id LIKE 'ij\\_%'),
            method       text NOT NULL CHECK (method IN ({methods})),
            public_key   bytea NOT NULL,
            sealed       bytea,
            kek_id       text,
            created_at   double precision NOT NULL,
            expires_at   double precision NOT NULL,
            destroyed_at double precision,
            PRIMARY KEY (tenant_id, job_id),
            CHECK ((sealed IS NULL) = (destroyed_at IS NOT NULL)),
            CHECK ((sealed IS NULL) = (kek_id IS NULL))
        )""",
        "CREATE INDEX kms_import_jobs_due ON kms_import_jobs (expires_at) WHERE sealed IS NOT NULL",
        f"""CREATE FUNCTION {p}_kms_import_jobs_monotonic() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF OLD.sealed IS NULL AND NEW.sealed IS NOT NULL THEN
                RAISE EXCEPTION 'a destroyed import job key never comes back'
                    USING ERRCODE = 'check_violation';
            END IF;
            RETURN NEW;
        END $$""",
        f"CREATE TRIGGER kms_import_jobs_monotonic BEFORE UPDATE ON kms_import_jobs FOR EACH ROW "
        f"EXECUTE FUNCTION {p}_kms_import_jobs_monotonic()",
        f"""CREATE FUNCTION {p}_kms_import_jobs_expire(p_now double precision) RETURNS integer
            LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, public AS $$
            WITH gone AS (
                UPDATE kms_import_jobs SET sealed = NULL, kek_id = NULL, destroyed_at = p_now
                WHERE sealed IS NOT NULL AND expires_at <= p_now RETURNING 1
            )
            SELECT count(*)::integer FROM gone
        $$""",
        f"REVOKE ALL ON FUNCTION {expire}, {p}_kms_import_jobs_monotonic() FROM PUBLIC",
        "ALTER TABLE kms_import_jobs ENABLE ROW LEVEL SECURITY",
        f"CREATE POLICY kms_import_jobs_kms ON kms_import_jobs TO {kms} "
        f"USING ({tenant_is}) WITH CHECK ({tenant_is})",
        "REVOKE ALL ON kms_import_jobs FROM PUBLIC",
        f"GRANT SELECT, INSERT ON kms_import_jobs TO {kms}",
        f"GRANT EXECUTE ON FUNCTION {expire} TO {kms}",
        "ALTER TABLE kms_key_versions ADD COLUMN origin text NOT NULL DEFAULT 'generated' "
        "CHECK (origin IN ('generated', 'imported'))",
        "ALTER TABLE kms_key_versions ADD COLUMN import_job_id text",
    ]


def _v4(n: dict[str, str]) -> list[str]:
    """The audit log's checkpoint keys (see ``kms/worker/audit_keys``): per origin, the sealed
    ML-DSA-65 and Ed25519 seeds and the last signed tree head. Not a tenant table (system keys,
    no tenant reaches them): the KMS role alone may read and write it, no role may delete a row,
    and a trigger keeps the signed size from ever going down."""
    kms, p = n["kms"], n["prefix"]
    return [
        """CREATE TABLE kms_audit_logs (
            origin         text PRIMARY KEY CHECK (length(origin) BETWEEN 1 AND 255),
            mldsa_public   bytea NOT NULL CHECK (length(mldsa_public) = 1952),
            mldsa_sealed   bytea NOT NULL,
            ed25519_public bytea NOT NULL CHECK (length(ed25519_public) = 32),
            ed25519_sealed bytea NOT NULL,
            kek_id         text NOT NULL,
            size           bigint NOT NULL CHECK (size >= 0),
            root           bytea CHECK (root IS NULL OR length(root) = 32),
            created_at     double precision NOT NULL,
            updated_at     double precision NOT NULL,
            CHECK ((size = 0) = (root IS NULL))
        )""",
        f"""CREATE FUNCTION {p}_kms_audit_logs_only_grow() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.size < OLD.size OR NEW.origin <> OLD.origin OR NEW.mldsa_public <> OLD.mldsa_public
               OR NEW.ed25519_public <> OLD.ed25519_public THEN
                RAISE EXCEPTION 'an audit log checkpoint never shrinks and its keys never change'
                    USING ERRCODE = 'check_violation';
            END IF;
            RETURN NEW;
        END $$""",
        f"CREATE TRIGGER kms_audit_logs_only_grow BEFORE UPDATE ON kms_audit_logs FOR EACH ROW "
        f"EXECUTE FUNCTION {p}_kms_audit_logs_only_grow()",
        f"REVOKE ALL ON FUNCTION {p}_kms_audit_logs_only_grow() FROM PUBLIC",
        "REVOKE ALL ON kms_audit_logs FROM PUBLIC",
        f"GRANT SELECT, INSERT, UPDATE ON kms_audit_logs TO {kms}",
    ]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "api keys, usage, KMS keys and sealed versions, leases; roles, grants, RLS", _v1),
    Migration(2, "idempotency records of key creation and rotation (KMS role, RLS)", _v2),
    Migration(3, "key import: import jobs (KMS role, RLS) and the origin of key versions", _v3),
    Migration(4, "the audit log's checkpoint keys and last signed tree heads (KMS role)", _v4),
)
SCHEMA_VERSION = MIGRATIONS[-1].version


def _names(prefix: str) -> dict[str, str]:
    return {
        "prefix": prefix,
        "gateway": role_name(prefix, "gateway"),
        "kms": role_name(prefix, "kms"),
        "admin": role_name(prefix, "admin"),
    }


def _lock_id(prefix: str) -> int:
    digest = hashlib.sha256(b"qpher-migrate:" + prefix.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


_VERSION_TABLE = """CREATE TABLE IF NOT EXISTS qpher_schema (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    role_prefix text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""


def current_version(conn: psycopg.Connection[Any]) -> int:
    """The schema version of the database (0: none), read with any role (the table is public)."""
    row = conn.execute("SELECT to_regclass('qpher_schema') IS NOT NULL").fetchone()
    if not row or not row[0]:
        return 0
    got = conn.execute("SELECT coalesce(max(version), 0) FROM qpher_schema").fetchone()
    return int(got[0]) if got else 0


def check_schema(version: int) -> None:
    if version > SCHEMA_VERSION:
        raise SchemaTooNew(
            f"the database schema is version {version}; this build knows up to {SCHEMA_VERSION}: "
            "upgrade qpher-proxy on this node"
        )
    if version < SCHEMA_VERSION:
        raise SchemaTooOld(
            f"the database schema is version {version}; this build needs {SCHEMA_VERSION}: "
            "run `qpher-proxy db migrate`"
        )


def migrate(dsn: str, role_prefix: str, *, connect_timeout: float = 5.0) -> tuple[int, int]:
    """Apply the missing migrations as the DSN's user; returns (version before, version after).
    ``SchemaTooNew`` if the database is ahead of this build; ``StorageUnavailable`` if it cannot
    be reached. Safe to run from several nodes at once (advisory lock)."""
    names = _names(role_prefix)
    conn = connect_owner(dsn, connect_timeout)
    try:
        with mapped("migrating the schema"):
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_id("schema"),))
                conn.execute(_VERSION_TABLE)
                conn.execute("GRANT SELECT ON qpher_schema TO PUBLIC")
                before = current_version(conn)
                if before > SCHEMA_VERSION:
                    check_schema(before)
                if before:
                    row = conn.execute(
                        "SELECT role_prefix FROM qpher_schema ORDER BY version LIMIT 1"
                    ).fetchone()
                    if row and row[0] != role_prefix:
                        raise StorageUnavailable(
                            f"this database was set up with storage.role_prefix {row[0]!r}, "
                            f"not {role_prefix!r}"
                        )
            for m in MIGRATIONS:
                if m.version <= before:
                    continue
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_id("schema"),))
                    if current_version(conn) >= m.version:
                        continue  # another node got here first
                    for statement in m.statements(names):
                        conn.execute(sql.SQL(statement))  # our own text, no parameters
                    conn.execute(
                        "INSERT INTO qpher_schema (version, name, role_prefix) VALUES (%s, %s, %s)",
                        (m.version, m.name, role_prefix),
                    )
                log.info("schema migrated", extra={"fields": {"version": m.version, "name": m.name}})
            with conn.transaction():
                after = current_version(conn)
        return before, after
    finally:
        conn.close()
