"""The PostgreSQL schema on the machine's server: migrations, roles, GRANTs, RLS, monotonic state."""

from __future__ import annotations

import threading

import psycopg
import pytest

from qpher_proxy.errors import StorageUnavailable
from qpher_proxy.storage.migrations import SCHEMA_VERSION, SchemaTooNew, check_schema, migrate
from qpher_proxy.storage.postgres import Database, redact_dsn

from .conftest import PgDatabase

MAC = b"m" * 32


def _seed(pg: PgDatabase) -> None:
    with psycopg.connect(pg.dsn, autocommit=True) as c:  # the owner: no RLS
        for key_id, tenant in (("aaaaaaaaaaa1", "t1"), ("aaaaaaaaaaa2", "t2")):
            c.execute(
                "INSERT INTO api_keys VALUES (%s, %s, 'free', '[]', 1, NULL, NULL, NULL, %s)",
                (key_id, tenant, MAC),
            )
        for key_id, tenant in (("k_" + "a" * 26, "t1"), ("k_" + "b" * 26, "t2")):
            c.execute(
                "INSERT INTO kms_keys (tenant_id, key_id, kind, algorithm, state, latest_version, "
                "created_at, updated_at) VALUES (%s, %s, 'signature', 'ml-dsa-65', 'enabled', 1, 1, 1)",
                (tenant, key_id),
            )
            c.execute(
                "INSERT INTO kms_key_versions VALUES (%s, %s, 1, 'ml-dsa-65', 'active', %s, %s, 'kek', 1)",
                (tenant, key_id, b"pub", b"sealed"),
            )


def _as(pg: PgDatabase, kind: str, tenant: str | None) -> psycopg.Connection:  # type: ignore[type-arg]
    conn = psycopg.connect(pg.dsn)
    conn.execute(f"SET ROLE {pg.role_prefix}_{kind}")  # type: ignore[arg-type]
    if tenant is not None:
        conn.execute("SELECT set_config('qpher.tenant', %s, true)", (tenant,))
    return conn


def test_migrate_is_idempotent_and_versioned(pg: PgDatabase) -> None:
    assert migrate(pg.dsn, pg.role_prefix) == (0, SCHEMA_VERSION)
    assert migrate(pg.dsn, pg.role_prefix) == (SCHEMA_VERSION, SCHEMA_VERSION)
    with psycopg.connect(pg.dsn, autocommit=True) as c:
        roles = c.execute(
            "SELECT rolname, rolsuper, rolbypassrls, rolcanlogin FROM pg_roles WHERE rolname LIKE %s "
            "ORDER BY 1",
            (pg.role_prefix + "\\_%",),
        ).fetchall()
        owners = {r[0] for r in c.execute("SELECT tableowner FROM pg_tables WHERE schemaname = 'public'")}
    assert [r[0] for r in roles] == [f"{pg.role_prefix}_{k}" for k in ("admin", "gateway", "kms")]
    assert all(not sup and not bypass and not login for _, sup, bypass, login in roles)
    assert not owners & {r[0] for r in roles}  # the product's roles own nothing


def test_concurrent_migrations_apply_once(pg: PgDatabase) -> None:
    results: list[tuple[int, int]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(migrate(pg.dsn, pg.role_prefix))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(after == SCHEMA_VERSION for _, after in results)
    with psycopg.connect(pg.dsn) as c:
        assert c.execute("SELECT count(*) FROM qpher_schema").fetchone() == (SCHEMA_VERSION,)


def test_a_newer_schema_is_refused(pg: PgDatabase) -> None:
    migrate(pg.dsn, pg.role_prefix)
    with psycopg.connect(pg.dsn, autocommit=True) as c:
        c.execute("INSERT INTO qpher_schema (version, name, role_prefix) VALUES (999, 'future', %s)",
                  (pg.role_prefix,))
    with pytest.raises(SchemaTooNew, match="999"):
        migrate(pg.dsn, pg.role_prefix)
    with pytest.raises(SchemaTooNew):
        check_schema(999)


def test_row_level_security_scopes_every_tenant_table(pg: PgDatabase) -> None:
    migrate(pg.dsn, pg.role_prefix)
    _seed(pg)
    with _as(pg, "gateway", "t1") as c:
        assert c.execute("SELECT key_id FROM api_keys").fetchall() == [("aaaaaaaaaaa1",)]
        assert c.execute("SELECT key_id FROM api_keys WHERE tenant_id = 't2'").fetchall() == []
        # authentication's one cross-tenant read returns exactly the key asked for
        row = c.execute(f"SELECT tenant_id FROM {pg.role_prefix}_api_key_lookup('aaaaaaaaaaa2')").fetchall()
        assert row == [("t2",)]
    with _as(pg, "gateway", None) as c:  # no tenant set: nothing at all
        assert c.execute("SELECT count(*) FROM api_keys").fetchone() == (0,)
    with _as(pg, "kms", "t1") as c:
        assert c.execute("SELECT tenant_id FROM kms_keys").fetchall() == [("t1",)]
        assert c.execute("SELECT tenant_id FROM kms_key_versions").fetchall() == [("t1",)]
        assert c.execute("SELECT count(*) FROM kms_keys WHERE tenant_id = 't2'").fetchone() == (0,)
        # nor can it write a row of another tenant
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute(
                "INSERT INTO kms_keys (tenant_id, key_id, kind, algorithm, state, latest_version, "
                "created_at, updated_at) VALUES ('t2', %s, 'kem', 'ml-kem-768', 'enabled', 1, 1, 1)",
                ("k_" + "c" * 26,),
            )


@pytest.mark.parametrize(
    ("kind", "table"),
    [("gateway", "kms_keys"), ("gateway", "kms_key_versions"), ("gateway", "kms_meta"),
     ("kms", "api_keys"), ("kms", "quota_usage")],
)
def test_each_role_has_no_privilege_on_the_other_sides_tables(pg: PgDatabase, kind: str, table: str) -> None:
    migrate(pg.dsn, pg.role_prefix)
    with _as(pg, kind, "t1") as c, pytest.raises(psycopg.errors.InsufficientPrivilege):
        c.execute(f"SELECT 1 FROM {table}")  # type: ignore[arg-type]


def test_the_gateway_role_cannot_write_api_keys(pg: PgDatabase) -> None:
    migrate(pg.dsn, pg.role_prefix)
    with _as(pg, "gateway", "t1") as c, pytest.raises(psycopg.errors.InsufficientPrivilege):
        c.execute("UPDATE api_keys SET revoked_at = NULL")


def test_a_destroyed_key_never_comes_back(pg: PgDatabase) -> None:
    migrate(pg.dsn, pg.role_prefix)
    _seed(pg)
    key = "k_" + "a" * 26
    with _as(pg, "kms", "t1") as c:
        c.execute("UPDATE kms_key_versions SET state = 'destroyed', sealed = NULL WHERE key_id = %s", (key,))
        c.execute("UPDATE kms_keys SET state = 'destroyed', destroyed_at = 2 WHERE key_id = %s", (key,))
        c.commit()
        c.execute("SELECT set_config('qpher.tenant', 't1', true)")
        with pytest.raises(psycopg.errors.CheckViolation, match="never comes back"):
            c.execute("UPDATE kms_keys SET state = 'enabled' WHERE key_id = %s", (key,))
        c.rollback()
        c.execute("SELECT set_config('qpher.tenant', 't1', true)")
        with pytest.raises(psycopg.errors.CheckViolation, match="never comes back"):
            c.execute("UPDATE kms_key_versions SET sealed = 'x' WHERE key_id = %s", (key,))
        c.rollback()
        c.execute("SELECT set_config('qpher.tenant', 't1', true)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("DELETE FROM kms_keys WHERE key_id = %s", (key,))


def test_database_roles_apply_through_the_pool_even_for_a_superuser_dsn(pg: PgDatabase) -> None:
    migrate(pg.dsn, pg.role_prefix)
    _seed(pg)
    db = Database(pg.dsn, role=f"{pg.role_prefix}_gateway", pool_size=2)
    try:
        with db.transaction(tenant="t2") as c:
            assert c.execute("SELECT current_user").fetchone() == (f"{pg.role_prefix}_gateway",)
            assert c.execute("SELECT key_id FROM api_keys").fetchall() == [("aaaaaaaaaaa2",)]
        with pytest.raises(StorageUnavailable):  # the process boundary, as a 503 at the edge
            with db.transaction(tenant="t2") as c:
                c.execute("SELECT 1 FROM kms_key_versions")
        with db.transaction() as c:  # the tenant was transaction-local: gone with the transaction
            assert c.execute("SELECT current_setting('qpher.tenant', true)").fetchone() in ((None,), ("",))
    finally:
        db.close()


def test_an_unreachable_database_is_a_quick_503_and_never_shows_the_password() -> None:
    dsn = "postgresql://someone:hunter2-secret@127.0.0.1:1/nowhere"
    db = Database(dsn, role=None, pool_size=1, connect_timeout=1, pool_timeout=0.5)
    try:
        with pytest.raises(StorageUnavailable) as info:
            with db.transaction() as c:
                c.execute("SELECT 1")
        assert "hunter2" not in str(info.value) and "hunter2" not in repr(db)
        assert info.value.status == 503
    finally:
        db.close()
    assert redact_dsn(dsn) == "postgresql://someone:***@127.0.0.1:1/nowhere"
