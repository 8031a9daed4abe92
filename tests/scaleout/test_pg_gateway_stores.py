"""API keys and monthly quotas on PostgreSQL: the gateway's and the CLI's stores, RLS, the
non-blocking Authenticator (revocation across nodes < 1 s, fail closed), quotas across nodes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import trio

from qpher_proxy.auth.apikeys import Authenticator
from qpher_proxy.auth.pg_apikeys import PgAPIKeyStore, ReadOnlyStore
from qpher_proxy.errors import (
    AuditUnavailable,
    InvalidInput,
    NotFound,
    QuotaExceeded,
    QuotaUnavailable,
    StorageUnavailable,
    Unauthenticated,
)
from qpher_proxy.ratelimit.pg_quotas import PgQuotaCounter, overshoot_bound
from qpher_proxy.storage.migrations import migrate
from qpher_proxy.storage.postgres import Database, role_name

from .conftest import (
    OwnPostgres,
    PgDatabase,
    migrated_database,
)

PEPPER = b"p" * 32
DEAD_DSN = "postgresql://root@127.0.0.1:1/nowhere"  # nothing listens on port 1


@pytest.fixture(scope="module")
def _module_db() -> Iterator[PgDatabase]:
    """One migrated database for the module (creating and migrating one takes ~0.5 s); the
    ``schema`` fixture empties its tables before each test. Same naming as conftest's ``pg``."""
    with migrated_database() as pg:
        yield pg


@pytest.fixture
def schema(_module_db: PgDatabase) -> PgDatabase:
    with psycopg.connect(_module_db.dsn, autocommit=True) as c:  # the owner
        c.execute("TRUNCATE api_keys, quota_usage")
    return _module_db


def _store(pg: PgDatabase, kind: str, **kw: Any) -> PgAPIKeyStore:
    return PgAPIKeyStore.open(pg.dsn, PEPPER, role_prefix=pg.role_prefix, kind=kind,  # type: ignore[arg-type]
                              pool_size=4, **kw)


@pytest.fixture
def admin(schema: PgDatabase) -> Iterator[PgAPIKeyStore]:
    with _store(schema, "admin") as s:
        yield s


@pytest.fixture
def gateway(schema: PgDatabase) -> Iterator[PgAPIKeyStore]:
    with _store(schema, "gateway") as s:
        yield s


def _as_gateway(pg: PgDatabase, tenant: str | None) -> psycopg.Connection[Any]:
    conn = psycopg.connect(pg.dsn)
    conn.execute(f"SET ROLE {role_name(pg.role_prefix, 'gateway')}")
    if tenant is not None:
        conn.execute("SELECT set_config('qpher.tenant', %s, true)", (tenant,))
    return conn


# ---- the stores ---------------------------------------------------------------------------

def test_admin_creates_lists_revokes(admin: PgAPIKeyStore) -> None:
    r1, key1 = admin.create("t1", "pro", ["sign", "sign", "kem"], label="ci")
    r2, _ = admin.create("t2", "free", expires_at=time.time() + 3600)
    assert key1.startswith(f"qph_{r1.key_id}_") and r1.scopes == ("sign", "kem")
    assert [r.key_id for r in admin.list()] == [r1.key_id, r2.key_id]
    assert admin.list("t2") == [r2]
    assert admin.get(r1.key_id) == r1
    found = admin.lookup(r1.key_id)
    assert found is not None and found[1] == admin.mac(r1.key_id, key1.split("_")[2])
    before = admin.change_token()
    revoked = admin.revoke(r1.key_id)
    assert revoked.revoked_at is not None and admin.get(r1.key_id) == revoked
    assert admin.revoke(r1.key_id) == revoked  # idempotent: the first time stays
    assert admin.change_token() != before
    with pytest.raises(NotFound) as info:
        admin.revoke("zzzzzzzzzzzz")
    assert "zzzzzzzzzzzz" in info.value.message
    with pytest.raises(NotFound) as info:
        admin.revoke(key1)  # a whole key pasted: never echoed
    assert key1 not in info.value.message
    # the shared validation
    with pytest.raises(InvalidInput):
        admin.create("bad tenant", "pro")
    with pytest.raises(InvalidInput):
        admin.create("t1", "pro", "sign")
    with pytest.raises(InvalidInput):
        admin.create("t1", "pro", expires_at=1.0)
    assert len(admin.list()) == 2


def test_audit_failure_rolls_the_write_back(schema: PgDatabase) -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    fail = False

    def audit(event: str, severity: str, **fields: Any) -> None:
        if fail:
            raise AuditUnavailable("audit log is full")
        events.append((event, fields))

    with _store(schema, "admin", audit=audit) as store:
        record, _ = store.create("t1", "pro")
        assert events[0][0] == "apikey.created" and events[0][1]["key_id"] == record.key_id
        fail = True
        with pytest.raises(AuditUnavailable):
            store.create("t1", "pro")
        with pytest.raises(AuditUnavailable):
            store.revoke(record.key_id)
        assert [r.key_id for r in store.list()] == [record.key_id]  # nothing else written
        assert store.get(record.key_id) == record  # not revoked
        fail = False
        store.revoke(record.key_id)
        assert events[-1] == ("apikey.revoked", {"key_id": record.key_id, "tenant": "t1"})


def test_gateway_store_reads_through_the_lookup_function_only(
    admin: PgAPIKeyStore, gateway: PgAPIKeyStore
) -> None:
    r1, _ = admin.create("t1", "pro")
    r2, _ = admin.create("t2", "pro")
    assert gateway.get(r1.key_id) == r1 and gateway.get(r2.key_id) == r2  # any tenant, by id
    assert gateway.get("zzzzzzzzzzzz") is None
    assert gateway.list("t1") == [r1]  # one tenant's rows, under RLS
    assert gateway.change_token() == admin.change_token()[:1] + (0,)
    for refused in (lambda: gateway.create("t1", "pro"), lambda: gateway.revoke(r1.key_id), gateway.list):
        with pytest.raises(ReadOnlyStore) as info:
            refused()
        assert "admin role" in info.value.message and isinstance(info.value, PermissionError)
    assert gateway.get(r1.key_id) == r1


def test_rls_and_grants_of_the_gateway_role(schema: PgDatabase, admin: PgAPIKeyStore) -> None:
    r1, _ = admin.create("t1", "pro")
    admin.create("t2", "pro")
    with _as_gateway(schema, "t1") as conn:
        rows = conn.execute("SELECT key_id, tenant_id FROM api_keys").fetchall()
        assert rows == [(r1.key_id, "t1")]  # t2's row is invisible
        assert conn.execute("SELECT count(*) FROM api_keys WHERE tenant_id = 't2'").fetchone() == (0,)
    with _as_gateway(schema, None) as conn:
        assert conn.execute("SELECT count(*) FROM api_keys").fetchone() == (0,)  # no tenant: nothing
    with _as_gateway(schema, "t1") as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(
                "INSERT INTO api_keys VALUES ('bbbbbbbbbbbb', 't1', 'free', '[]', 1, NULL, NULL, NULL, %s)",
                (b"m" * 32,),
            )
    with _as_gateway(schema, "t1") as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("UPDATE api_keys SET revoked_at = NULL")
    with _as_gateway(schema, "t1") as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT * FROM kms_keys")


# ---- the authenticator ----------------------------------------------------------------------

async def test_authenticate_async_with_a_gateway_store(admin: PgAPIKeyStore, gateway: PgAPIKeyStore) -> None:
    r1, key1 = admin.create("t1", "pro", ["sign"])
    r2, key2 = admin.create("t2", "free", expires_at=time.time() + 3600)
    wall = [time.time()]
    auth = Authenticator(gateway, lambda: wall[0], ttl=0.5)
    assert auth.blocking
    async with trio.open_nursery() as nursery:
        await nursery.start(auth.run_change_poller)
        assert await auth.authenticate_async(key1) == r1
        assert await auth.authenticate_async(key1) == r1  # from the cache
        assert await auth.authenticate_async(key2) == r2
        # many requests of an uncached key at once: all answered, one lookup
        calls = 0
        real_lookup = gateway.lookup

        def counting(key_id: str) -> Any:
            nonlocal calls
            calls += 1
            time.sleep(0.05)
            return real_lookup(key_id)

        gateway.lookup = counting  # type: ignore[method-assign]
        r3, key3 = admin.create("t1", "pro")
        with trio.fail_after(1):  # the poller sees the change: the cache is dropped
            while auth._polled_token == auth._token:
                await trio.sleep(0.01)
        results: list[Any] = []

        async def one() -> None:
            results.append(await auth.authenticate_async(key3))

        async with trio.open_nursery() as inner:
            for _ in range(20):
                inner.start_soon(one)
        assert results == [r3] * 20 and calls == 1
        gateway.lookup = real_lookup  # type: ignore[method-assign]
        # the same errors as authenticate()
        reasons = []
        wrong = key1[:-1] + ("A" if key1[-1] != "A" else "B")
        for bad in (None, "nope", f"qph_{'z' * 12}_{'a' * 43}", wrong):
            with pytest.raises(Unauthenticated) as info:
                await auth.authenticate_async(bad)
            reasons.append(info.value.reason)
        assert reasons == ["missing", "malformed", "unknown_key", "bad_secret"]
        wall[0] += 3600
        with pytest.raises(Unauthenticated) as info:
            await auth.authenticate_async(key2)
        assert info.value.reason == "expired"
        nursery.cancel_scope.cancel()


async def test_revocation_through_a_is_refused_by_b_within_one_second(schema: PgDatabase) -> None:
    with _store(schema, "admin") as store_a, _store(schema, "gateway") as store_b:
        record, key = store_a.create("t1", "pro")
        auth_b = Authenticator(store_b)  # ttl 1 s, the default and the maximum
        async with trio.open_nursery() as nursery:
            await nursery.start(auth_b.run_change_poller)
            assert await auth_b.authenticate_async(key) == record
            await trio.sleep(0.3)  # somewhere inside a poll period
            await trio.to_thread.run_sync(store_a.revoke, record.key_id)
            revoked_at = trio.current_time()
            while True:
                try:
                    await auth_b.authenticate_async(key)
                except Unauthenticated as exc:
                    assert exc.reason == "revoked"
                    break
                await trio.sleep(0.01)
            seen_after = trio.current_time() - revoked_at
            nursery.cancel_scope.cancel()
    assert seen_after < 1.0, seen_after


async def test_authenticator_fails_closed_when_the_poller_cannot_read(
    admin: PgAPIKeyStore, gateway: PgAPIKeyStore
) -> None:
    _, key = admin.create("t1", "pro")
    gateway.statement_timeout = 0.2
    auth = Authenticator(gateway, ttl=0.2)
    assert auth.stale_after == pytest.approx(0.6)
    with pytest.raises(StorageUnavailable):
        await auth.authenticate_async(key)  # no poll yet: unknown is refused
    async with trio.open_nursery() as nursery:
        await nursery.start(auth.run_change_poller)
        await auth.authenticate_async(key)
        real = gateway.change_token

        def down() -> tuple[int, int]:
            raise StorageUnavailable("database error while reading the API key change counter")

        gateway.change_token = down  # type: ignore[method-assign]
        broke = trio.current_time()
        while True:  # cache hits go on for the staleness window, then 503
            try:
                await auth.authenticate_async(key)
            except StorageUnavailable as exc:
                assert exc.status == 503
                break
            await trio.sleep(0.02)
        refused_after = trio.current_time() - broke
        assert auth.stale_after - auth.poll_interval <= refused_after <= auth.stale_after + 0.2
        gateway.change_token = real  # type: ignore[method-assign]
        await trio.sleep(auth.poll_interval * 2)
        await auth.authenticate_async(key)  # back
        nursery.cancel_scope.cancel()


async def test_unreachable_database_gives_quick_503s() -> None:
    store = PgAPIKeyStore.open(DEAD_DSN, PEPPER, role_prefix="qpher", kind="gateway", connect_timeout=1.0,
                               statement_timeout=0.5, pool_timeout=0.5)
    try:
        t0 = time.monotonic()
        with pytest.raises(StorageUnavailable) as info:
            store.lookup("aaaaaaaaaaaa")
        assert time.monotonic() - t0 < 1.0 + 1.0
        assert "127.0.0.1" not in info.value.message and info.value.status == 503
        auth = Authenticator(store, ttl=0.2)
        key = f"qph_{'a' * 12}_{'b' * 43}"
        with trio.fail_after(1.0 + 1.0):  # no hang
            async with trio.open_nursery() as nursery:
                await nursery.start(auth.run_change_poller)  # starts although the poll failed
                for _ in range(3):
                    with pytest.raises(StorageUnavailable):
                        await auth.authenticate_async(key)
                nursery.cancel_scope.cancel()
    finally:
        store.close()


async def test_sqlite_store_authenticate_async_is_authenticate(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qpher_proxy.auth.apikeys import APIKeyStore

    async def no_threads(*args: Any, **kw: Any) -> Any:
        raise AssertionError("a SQLite store is called inline")

    monkeypatch.setattr(trio.to_thread, "run_sync", no_threads)
    with APIKeyStore(tmp_path / "g.db", PEPPER) as store:
        record, key = store.create("t1", "pro")
        auth = Authenticator(store, ttl=0)
        assert not auth.blocking
        async with trio.open_nursery() as nursery:
            await nursery.start(auth.run_change_poller)  # nothing to poll: returns
        assert await auth.authenticate_async(key) == record == auth.authenticate(key)
        store.revoke(record.key_id)
        with pytest.raises(Unauthenticated) as info:
            auth.authenticate(key)
        assert info.value.reason == "revoked"
        with pytest.raises(Unauthenticated) as info:
            await auth.authenticate_async(key)
        assert info.value.reason == "revoked"


# ---- quotas -----------------------------------------------------------------------------------

def _gateway_db(pg: PgDatabase, **kw: Any) -> Database:
    return Database(pg.dsn, role=role_name(pg.role_prefix, "gateway"), pool_size=4, **kw)


def _db_count(pg: PgDatabase, tenant: str, op: str) -> int:
    with psycopg.connect(pg.dsn) as c:  # the owner: no RLS
        row = c.execute(
            "SELECT coalesce(sum(count), 0) FROM quota_usage WHERE tenant_id = %s AND op_class = %s",
            (tenant, op),
        ).fetchone()
    return int(row[0]) if row else 0


@pytest.fixture
def two_counters(schema: PgDatabase) -> Iterator[tuple[PgQuotaCounter, PgQuotaCounter]]:
    da, db = _gateway_db(schema), _gateway_db(schema)
    a, b = PgQuotaCounter(da, flush_interval=1.0), PgQuotaCounter(db, flush_interval=1.0)
    try:
        yield a, b
    finally:
        a.close()
        b.close()
        da.close()
        db.close()


async def test_quotas_need_a_load_and_never_touch_the_database_on_the_request_path(
    schema: PgDatabase, two_counters: tuple[PgQuotaCounter, PgQuotaCounter]
) -> None:
    a, _ = two_counters
    with pytest.raises(QuotaUnavailable):
        a.check_and_count("t1", "sign", 10)  # not loaded: refused, not counted on a guess
    with pytest.raises(QuotaUnavailable):
        a.usage("t1")
    await a.ensure_loaded("t1")
    assert a.usage("t1") == {}

    async def no_threads(*args: Any, **kw: Any) -> Any:
        raise AssertionError("the request path touched the database")

    real = trio.to_thread.run_sync
    trio.to_thread.run_sync = no_threads  # type: ignore[assignment]
    try:
        await a.ensure_loaded("t1")  # fresh: no query
        assert [a.check_and_count("t1", "sign", 10) for _ in range(3)] == [1, 2, 3]
        assert a.check_and_count("t1", "sign", None, n=5) == 8
        assert a.usage("t1") == {"sign": 8}
    finally:
        trio.to_thread.run_sync = real  # type: ignore[assignment]
    assert _db_count(schema, "t1", "sign") == 0  # nothing written yet
    await a.flush_async()
    assert _db_count(schema, "t1", "sign") == 8
    with pytest.raises(QuotaExceeded) as info:
        a.check_and_count("t1", "sign", 10, n=3)
    assert info.value.retry_after >= 1
    with pytest.raises(InvalidInput):
        a.check_and_count("t1", "x" * 65, 10)  # would break every later flush


async def test_quotas_across_two_counters_and_the_overshoot_bound(
    schema: PgDatabase, two_counters: tuple[PgQuotaCounter, PgQuotaCounter]
) -> None:
    a, b = two_counters
    limit = 10
    # some usage everybody knows before they start
    await a.ensure_loaded("t1")
    for _ in range(4):
        a.check_and_count("t1", "sign", limit)
    await a.flush_async()
    known = 4
    await b.ensure_loaded("t1")
    assert b.usage("t1") == {"sign": known}
    # between two flushes each node admits what its own view allows: up to the limit
    admitted = {a: 0, b: 0}
    for counter in (a, b):
        while True:
            try:
                counter.check_and_count("t1", "sign", limit)
            except QuotaExceeded:
                break
            admitted[counter] += 1
    assert admitted == {a: limit - known, b: limit - known}
    await a.flush_async()
    await b.flush_async()
    total = _db_count(schema, "t1", "sign")
    assert total == known + admitted[a] + admitted[b]
    bound = overshoot_bound(2, limit, known)
    assert bound == limit - known
    assert limit < total <= limit + bound  # the bound is reached, not exceeded
    await a.ensure_loaded("t1")  # a request of t1 on a (its counts are fresh: no query) ...
    await a.flush_async()  # ... so a's next flush synchronises t1: a learns b's increments
    for counter in (a, b):
        assert counter.usage("t1") == {"sign": total}
        with pytest.raises(QuotaExceeded):
            counter.check_and_count("t1", "sign", limit)
    # increments are atomic: concurrent flushes of one row by both nodes add up
    for _ in range(7):
        a.check_and_count("t1", "verify", None)
        b.check_and_count("t1", "verify", None)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.flush_async)
        nursery.start_soon(b.flush_async)
    assert _db_count(schema, "t1", "verify") == 14
    await a.ensure_loaded("t1")
    await a.flush_async()
    assert a.usage("t1")["verify"] == 14
    # another tenant's rows are not visible to a's view of t1, nor counted in it
    await b.ensure_loaded("t2")
    b.check_and_count("t2", "sign", limit)
    await b.flush_async()
    assert b.usage("t2") == {"sign": 1} and "t2" not in repr(a.usage("t1"))


async def test_quota_flusher_fails_closed_and_loses_nothing(schema: PgDatabase) -> None:
    database = _gateway_db(schema)
    counter = PgQuotaCounter(database, flush_interval=0.05)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(counter.run_flusher)
            await counter.ensure_loaded("t1")
            counter.check_and_count("t1", "sign", 100, n=3)
            real_write = counter._write

            def down(*args: Any) -> Any:
                raise StorageUnavailable("database error while counting quota usage")

            counter._write = down  # type: ignore[method-assign,assignment]
            broke = trio.current_time()
            while True:
                try:
                    counter.check_and_count("t1", "sign", 100)
                except QuotaUnavailable:
                    break
                await trio.sleep(0.01)
            refused_after = trio.current_time() - broke
            assert counter.max_staleness - 0.1 <= refused_after <= counter.max_staleness + 0.1
            with trio.fail_after(0.1), pytest.raises(QuotaUnavailable):
                await counter.ensure_loaded("t2")  # flushes fail: no load tried, no wait
            counter._write = real_write  # type: ignore[method-assign]
            with trio.fail_after(1):
                while _db_count(schema, "t1", "sign") < 3:
                    await trio.sleep(0.02)
            counted = _db_count(schema, "t1", "sign")
            # synchronised again: served (within a few 50 ms intervals, however busy the machine)
            with trio.fail_after(2):
                while True:
                    try:
                        await counter.ensure_loaded("t1")
                        counter.check_and_count("t1", "sign", 100)
                        break
                    except QuotaUnavailable:
                        await trio.sleep(0.05)
            assert counter.usage("t2") == {}  # synchronised by the flush that succeeded
            nursery.cancel_scope.cancel()
        assert counted >= 3
        counter.close()  # flushes what is left
        assert _db_count(schema, "t1", "sign") == counted + 1
    finally:
        counter.close()
        database.close()


async def test_quota_load_with_the_database_unreachable() -> None:
    database = Database(DEAD_DSN, role="qpher_gateway", connect_timeout=1.0, statement_timeout=0.5,
                        pool_timeout=0.5)
    counter = PgQuotaCounter(database, flush_interval=0.2)
    try:
        with trio.fail_after(1.0 + 1.0):
            with pytest.raises(QuotaUnavailable):
                await counter.ensure_loaded("t1")
        with pytest.raises(QuotaUnavailable):
            counter.check_and_count("t1", "sign", 10)
    finally:
        counter.close()  # nothing pending: no query
        database.close()


def test_the_apikey_cli_store_follows_storage_backend(schema: PgDatabase, tmp_path: Any) -> None:
    from qpher_proxy.admin import _key_store
    from qpher_proxy.auth.apikeys import APIKeyStore
    from qpher_proxy.config import config_from_dict

    (tmp_path / "pepper").write_bytes(PEPPER)
    (tmp_path / "pepper").chmod(0o600)
    storage = {"backend": "postgresql", "dsn": schema.dsn, "role_prefix": schema.role_prefix}
    cfg = config_from_dict({"auth": {"pepper_file": "pepper"}, "storage": storage}, tmp_path,
                           check_files=False)
    with _key_store(cfg) as store:
        assert isinstance(store, PgAPIKeyStore) and store.kind == "admin"
        record, _ = store.create("t1", "pro")
    with _store(schema, "gateway") as gateway:
        assert gateway.get(record.key_id) == record
    cfg = config_from_dict({"auth": {"pepper_file": "pepper", "db": "g.db"}}, tmp_path, check_files=False)
    with _key_store(cfg) as store:
        assert isinstance(store, APIKeyStore)


async def test_quota_counter_refuses_when_no_flush_succeeded_for_five_intervals(schema: PgDatabase) -> None:
    now = [100.0]
    database = _gateway_db(schema)
    counter = PgQuotaCounter(database, flush_interval=1.0, monotonic=lambda: now[0])
    try:
        assert counter.max_staleness == 5.0
        await counter.ensure_loaded("t1")
        counter.check_and_count("t1", "sign", 10)
        now[0] += 5.01  # no flush at all (the flusher is not running, or every flush failed)
        with pytest.raises(QuotaUnavailable):
            counter.check_and_count("t1", "sign", 10)
        with pytest.raises(QuotaUnavailable):
            counter.usage("t1")
        counter.flush()  # writes the pending one and synchronises t1 (blocking: shutdown, tests)
        assert counter.check_and_count("t1", "sign", 10) == 2
        assert counter.maybe_flush() is None and _db_count(schema, "t1", "sign") == 1  # a no-op
    finally:
        counter.close()
        database.close()
    assert _db_count(schema, "t1", "sign") == 2


@pytest.mark.slow  # initdb + a stop and a start of the server: ~7 s
async def test_a_real_outage_gives_503s_then_recovers(own_postgres: OwnPostgres) -> None:
    """The server stops under a running authenticator and quota counter: clean 503s within the
    staleness windows, never a hang; it starts again: served again."""
    migrate(own_postgres.dsn, "qo")
    timeouts = {"connect_timeout": 1.0, "statement_timeout": 0.5, "pool_timeout": 0.5}
    with PgAPIKeyStore.open(own_postgres.dsn, PEPPER, role_prefix="qo", kind="admin", pool_size=1) as admin:
        _, key = admin.create("t1", "pro")
    gateway = PgAPIKeyStore.open(own_postgres.dsn, PEPPER, role_prefix="qo", kind="gateway", pool_size=2,
                                 **timeouts)
    counter = PgQuotaCounter.open(own_postgres.dsn, role_prefix="qo", pool_size=2, flush_interval=0.1,
                                  **timeouts)
    auth = Authenticator(gateway, ttl=0.1)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(auth.run_change_poller)
            await nursery.start(counter.run_flusher)
            await auth.authenticate_async(key)
            await counter.ensure_loaded("t1")
            counter.check_and_count("t1", "sign", 100)
            await trio.to_thread.run_sync(own_postgres.stop)
            stopped = trio.current_time()
            auth_refused = quota_refused = None
            with trio.fail_after(auth.stale_after + counter.max_staleness + 2):
                while auth_refused is None or quota_refused is None:
                    try:
                        await auth.authenticate_async(key)
                    except StorageUnavailable:
                        auth_refused = auth_refused or trio.current_time() - stopped
                    try:
                        await counter.ensure_loaded("t1")
                        counter.check_and_count("t1", "sign", 100)
                    except QuotaUnavailable:
                        quota_refused = quota_refused or trio.current_time() - stopped
                    await trio.sleep(0.02)
            # one round of the loop may wait one pool timeout (0.5 s) in a reload
            assert auth_refused <= auth.stale_after + 0.5 + 0.3
            assert quota_refused <= counter.max_staleness + 0.5 + 0.3
            with trio.fail_after(1.0 + 1.0):  # a cache miss while down: a quick 503
                with pytest.raises(StorageUnavailable):
                    await auth.authenticate_async(f"qph_{'a' * 12}_{'b' * 43}")
            await trio.to_thread.run_sync(own_postgres.start)
            with trio.fail_after(10):
                while True:
                    try:
                        await auth.authenticate_async(key)
                        await counter.ensure_loaded("t1")
                        counter.check_and_count("t1", "sign", 100)
                        break
                    except (StorageUnavailable, QuotaUnavailable):
                        await trio.sleep(0.1)
                while True:  # the pools reconnect with a backoff: a flush may wait its turn
                    try:
                        await counter.flush_async()
                        break
                    except QuotaUnavailable:
                        await trio.sleep(0.1)
            nursery.cancel_scope.cancel()
    finally:
        gateway.close()
        counter.close()
    with psycopg.connect(own_postgres.dsn) as c:
        row = c.execute("SELECT sum(count) FROM quota_usage WHERE tenant_id = 't1'").fetchone()
    assert row is not None and row[0] >= 2  # what was admitted before and after the outage
