"""Rate limits shared through Redis (GCRA in one Lua script), against real Redis servers.

The machine's Redis (fixtures ``redis_url``, ``redis_prefix``) serves the limit semantics; tests
that need a password, an outage or a restart start their own ``redis-server`` on a free port.
The URL parser and the RESP reader are tested without any server.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import replace

import pytest
import trio

from qpher_proxy.config.model import RateLimitConfig
from qpher_proxy.errors import ConfigError, RateLimited
from qpher_proxy.ratelimit import RateLimits, TokenBucketLimiter
from qpher_proxy.ratelimit._resp import (
    NEED_DATA,
    RedisClient,
    RedisConnectionError,
    RedisReplyError,
    RedisURL,
    RESPReader,
    encode_command,
    parse_redis_url,
    script_sha1,
)
from qpher_proxy.ratelimit.redis_gcra import (
    GCRA_SCRIPT,
    LocalRateLimiter,
    RateLimitUnavailable,
    RedisRateLimiter,
    per_node_limits,
    redis_key,
)

SECRET = "s3cr3t-Pa55word"
SLACK = 0.15  # seconds a bounded call may overrun its timeout on a busy machine
KEY_ONLY = RateLimits(key_rate=1.0, key_burst=3, tenant_rate=None, tenant_burst=1)


def _config(url: str, prefix: str, **kw: object) -> RateLimitConfig:
    # timeout: generous, so that a busy test machine does not look like an outage
    base = RateLimitConfig(backend="redis", redis_url=url, key_prefix=prefix, timeout=2.0)
    return replace(base, **kw)  # type: ignore[arg-type]


def _headers(exc: RateLimited | RateLimitUnavailable) -> dict[bytes, bytes]:
    return dict(exc.headers)


# ---- the URL parser (pure) ---------------------------------------------------------------

def test_url_host_port_and_db() -> None:
    assert parse_redis_url("redis://10.0.0.5:6380/3") == RedisURL(host="10.0.0.5", port=6380, db=3)
    assert parse_redis_url("redis://cache") == RedisURL(host="cache", port=6379, db=0)
    assert parse_redis_url("redis://[::1]:7000/") == RedisURL(host="::1", port=7000, db=0)
    assert parse_redis_url("redis://h?db=2").db == 2


def test_url_credentials_are_percent_decoded() -> None:
    u = parse_redis_url("redis://:p%40ss%3Aw@h/0")
    assert (u.username, u.password) == (None, "p@ss:w")
    u = parse_redis_url(f"redis://limiter:{SECRET}@h:1/1")
    assert (u.username, u.password, u.port, u.db) == ("limiter", SECRET, 1, 1)


def test_url_unix_socket_with_db_and_password() -> None:
    u = parse_redis_url(f"unix://:{SECRET}@/run/redis/redis.sock?db=5")
    assert (u.path, u.db, u.host, u.password) == ("/run/redis/redis.sock", 5, None, SECRET)
    assert u.redacted() == "unix:///run/redis/redis.sock?db=5"


def test_url_password_never_in_repr_or_str() -> None:
    u = parse_redis_url(f"redis://user:{SECRET}@h:1/2")
    for text in (repr(u), str(u), u.redacted(), repr(RedisClient(u))):
        assert SECRET not in text


@pytest.mark.parametrize(
    "url, expected",
    [
        (f"redis://:{SECRET}@h:notaport/0", "port malformed"),
        (f"redis://:{SECRET}@h:1/x", "database must be a number"),
        (f"redis://:{SECRET}@h:1/1?db=1", "database twice"),
        (f"redis://:{SECRET}@h:1/1?timeout=3", "unknown query parameters"),
        (f"rediss://:{SECRET}@h:1/1", "not supported yet"),
        (f"http://:{SECRET}@h:1/1", "must start with redis://"),
        (f"redis://:{SECRET}@:1/1", "needs a host"),
        ("redis://user@h/1", "no password"),
        (f"unix://:{SECRET}@host/sock", "not a host"),
        ("unix://", "socket path"),
    ],
)
def test_url_errors_name_the_problem_never_the_password(url: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_redis_url(url)
    assert expected in info.value.message
    assert SECRET not in str(info.value) and SECRET not in repr(info.value)
    assert info.value.__cause__ is None or SECRET not in str(info.value.__cause__)


# ---- the RESP reader (pure) -----------------------------------------------------------------

TRANSCRIPT = (
    b"+OK\r\n:-42\r\n$5\r\nhello\r\n$-1\r\n*2\r\n:1\r\n*1\r\n$0\r\n\r\n"
    b"-NOSCRIPT No matching\r\n*-1\r\n"
)


def _drain(reader: RESPReader) -> list[object]:
    out: list[object] = []
    while (reply := reader.next_reply()) is not NEED_DATA:
        out.append(reply)
    return out


@pytest.mark.parametrize("chunk", [len(TRANSCRIPT), 1, 3])
def test_resp_reader_whole_or_byte_by_byte(chunk: int) -> None:
    reader = RESPReader()
    got: list[object] = []
    for i in range(0, len(TRANSCRIPT), chunk):
        reader.receive_data(TRANSCRIPT[i : i + chunk])
        got.extend(_drain(reader))
    errors = [r for r in got if isinstance(r, RedisReplyError)]
    assert [r for r in got if not isinstance(r, RedisReplyError)] == ["OK", -42, b"hello", None,
                                                                      [1, [b""]], None]
    assert len(errors) == 1 and errors[0].kind == "NOSCRIPT"


@pytest.mark.parametrize(
    "garbage", [b"?what\r\n", b"$99999999999\r\n", b":12a\r\n", b"$3\r\nabcXY", b"*2000\r\n"]
)
def test_resp_reader_refuses_malformed_or_oversized(garbage: bytes) -> None:
    reader = RESPReader()
    reader.receive_data(garbage)
    with pytest.raises(RedisConnectionError):
        reader.next_reply()


def test_encode_command() -> None:
    assert encode_command("EVALSHA", b"ab", 2, 0.5) == (
        b"*4\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n2\r\n$3\r\n0.5\r\n"
    )


def test_redis_key_hashes_unusual_names() -> None:
    assert redis_key("qp", "k", "ab12cd34ef56") == "qp:rl:k:ab12cd34ef56"
    odd = redis_key("qp", "t", "a:b c")
    assert odd.startswith("qp:rl:t:h:") and " " not in odd


# ---- the local limiter behind the same acquire ------------------------------------------------

class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


async def test_local_limiter_emits_ratelimit_headers_and_scope() -> None:
    local = LocalRateLimiter(TokenBucketLimiter(FakeClock()))
    limits = RateLimits(key_rate=1.0, key_burst=5, tenant_rate=0.5, tenant_burst=2)
    await local.acquire("k1", "acme", limits)
    await local.acquire("k2", "acme", limits)
    with pytest.raises(RateLimited) as info:
        await local.acquire("k3", "acme", limits)
    assert info.value.scope == "tenant"  # type: ignore[attr-defined]
    assert _headers(info.value) == {b"retry-after": b"2", b"ratelimit-limit": b"2",
                                    b"ratelimit-remaining": b"0", b"ratelimit-reset": b"4"}
    for _ in range(3):
        await local.acquire("k9", "other", KEY_ONLY)
    with pytest.raises(RateLimited) as info:
        await local.acquire("k9", "other", KEY_ONLY)
    assert info.value.scope == "api_key"  # type: ignore[attr-defined]
    assert _headers(info.value)[b"ratelimit-limit"] == b"3"


def test_per_node_limits_divide_rate_and_burst() -> None:
    limits = RateLimits(key_rate=10.0, key_burst=5, tenant_rate=None, tenant_burst=1)
    assert per_node_limits(limits, 2) == RateLimits(5.0, 2, None, 1)
    assert per_node_limits(limits, 10).key_burst == 1


# ---- against the machine's Redis -------------------------------------------------------------

async def test_client_ping_and_script_load(redis_url: str) -> None:
    client = RedisClient(parse_redis_url(redis_url))
    try:
        await client.ping()
        assert await client.script_load(GCRA_SCRIPT) == script_sha1(GCRA_SCRIPT)
        reply = await client.execute("NOSUCHCOMMAND")
        assert isinstance(reply, RedisReplyError) and reply.kind == "ERR"
        await client.ping()  # an error reply leaves the connection usable
    finally:
        await client.aclose()
    with pytest.raises(RedisConnectionError):
        await client.ping()


async def test_burst_then_refusal_with_retry_after_and_headers(redis_url: str, redis_prefix: str) -> None:
    rl = RedisRateLimiter(_config(redis_url, redis_prefix))
    try:
        for _ in range(3):
            await rl.acquire("k1", "acme", KEY_ONLY)
        with pytest.raises(RateLimited) as info:
            await rl.acquire("k1", "acme", KEY_ONLY)
        e = info.value
        assert (e.code, e.status, e.retry_after) == ("rate_limited", 429, 1)
        assert e.scope == "api_key"  # type: ignore[attr-defined]
        assert _headers(e) == {b"retry-after": b"1", b"ratelimit-limit": b"3",
                               b"ratelimit-remaining": b"0", b"ratelimit-reset": b"3"}
        decision = await rl.evaluate("k1", "acme", KEY_ONLY)
        assert not decision.allowed and 0 < decision.retry_after_ms <= 1000
        assert not rl.degraded and rl.backend_failures == 0
    finally:
        await rl.aclose()


async def test_two_nodes_share_one_limit(redis_url: str, redis_prefix: str) -> None:
    rate, burst, duration = 50.0, 10, 2.0
    limits = RateLimits(key_rate=rate, key_burst=burst, tenant_rate=None, tenant_burst=1)
    nodes = [RedisRateLimiter(_config(redis_url, redis_prefix)) for _ in range(2)]
    admitted = [0, 0]
    start = trio.current_time()

    async def offer(i: int) -> None:  # about 400 requests/s per node, 8x the limit in all
        while trio.current_time() - start < duration:
            try:
                await nodes[i].acquire("shared", "acme", limits)
                admitted[i] += 1
            except RateLimited:
                pass
            await trio.sleep(0.0025)

    try:
        async with trio.open_nursery() as nursery:
            for i in range(2):
                nursery.start_soon(offer, i)
        elapsed = trio.current_time() - start
    finally:
        for n in nodes:
            await n.aclose()
    expected = rate * elapsed + burst
    assert abs(sum(admitted) - expected) <= 0.10 * expected, (admitted, expected)
    assert min(admitted) > 0.25 * sum(admitted)  # both nodes took part
    assert all(not n.degraded for n in nodes)


async def test_key_and_tenant_limits_combined(redis_url: str, redis_prefix: str) -> None:
    limits = RateLimits(key_rate=0.5, key_burst=2, tenant_rate=0.25, tenant_burst=3)
    rl = RedisRateLimiter(_config(redis_url, redis_prefix))
    check = RedisClient(parse_redis_url(redis_url))
    try:
        await rl.acquire("ka", "acme", limits)
        await rl.acquire("ka", "acme", limits)
        with pytest.raises(RateLimited) as info:  # the key's burst is spent; the tenant has 1
            await rl.acquire("ka", "acme", limits)
        assert info.value.scope == "api_key"  # type: ignore[attr-defined]
        await rl.acquire("kb", "acme", limits)  # the refusal cost the tenant nothing
        with pytest.raises(RateLimited) as info:
            await rl.acquire("kc", "acme", limits)
        assert info.value.scope == "tenant"  # type: ignore[attr-defined]
        assert _headers(info.value)[b"ratelimit-limit"] == b"3"
        assert info.value.retry_after == 4  # one token at 0.25/s
        # ... and the tenant's refusal cost kc nothing: its key was never written
        assert await check.execute("EXISTS", redis_key(redis_prefix, "k", "kc")) == 0
        assert await check.execute("EXISTS", redis_key(redis_prefix, "k", "kb")) == 1
        ttl = await check.execute("PTTL", redis_key(redis_prefix, "t", "acme"))
        assert isinstance(ttl, int) and 10_000 < ttl <= 12_000  # full again after 3 tokens / 0.25
        await rl.acquire("kc", "other", limits)  # another tenant is not affected
    finally:
        await rl.aclose()
        await check.aclose()


async def test_cost_above_burst_is_admitted_when_full_and_leaves_debt(
    redis_url: str, redis_prefix: str
) -> None:
    limits = RateLimits(key_rate=10.0, key_burst=2, tenant_rate=None, tenant_burst=1)
    rl = RedisRateLimiter(_config(redis_url, redis_prefix))
    try:
        first = await rl.evaluate("batch", "acme", limits, cost=5)  # full: admitted, 500 ms of debt
        assert first.allowed and first.remaining == 0 and first.reset_ms == 500
        again = await rl.evaluate("batch", "acme", limits, cost=5)  # needs 2 tokens: 500 ms
        assert not again.allowed and 250 < again.retry_after_ms <= 500
        assert again.reset_ms == again.retry_after_ms  # it waits for a full bucket
        one = await rl.evaluate("batch", "acme", limits)  # needs 1 token: 400 ms
        # 100 ms less than for cost 5 (minus the time between the two calls)
        assert not one.allowed and 150 < one.retry_after_ms <= again.retry_after_ms - 100
        assert one.reset_ms == one.retry_after_ms + 100
        with pytest.raises(ValueError):
            await rl.evaluate("batch", "acme", limits, cost=0)
    finally:
        await rl.aclose()


async def test_url_db_number_is_honoured(redis_url: str, redis_prefix: str) -> None:
    url3 = redis_url.rsplit("/", 1)[0] + "/3"
    rl = RedisRateLimiter(_config(url3, redis_prefix))
    db0 = RedisClient(parse_redis_url(redis_url.rsplit("/", 1)[0] + "/0"))
    db3 = RedisClient(parse_redis_url(url3))
    key = redis_key(redis_prefix, "k", "k1")
    try:
        await rl.acquire("k1", "acme", KEY_ONLY)
        assert await db3.execute("EXISTS", key) == 1
        assert await db0.execute("EXISTS", key) == 0
        await db3.execute("DEL", key)
    finally:
        for c in (db0, db3):
            await c.aclose()
        await rl.aclose()


# ---- against our own redis-server: password, outage, restart -----------------------------------

class OwnRedis:
    """A throw-away ``redis-server`` on a free port (no persistence)."""

    def __init__(self, password: str | None) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.password = password
        self.dir = tempfile.mkdtemp(prefix="qpher-redis-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.socket_path = os.path.join(self.dir, "redis.sock")

    def url(self, db: int = 0, *, user: str = "") -> str:
        auth = f"{user}:{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    async def start(self) -> None:
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", self.dir, "--logfile", ""]
        if self.password:
            argv += ["--requirepass", self.password]
        argv += ["--unixsocket", self.socket_path, "--unixsocketperm", "700"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with trio.fail_after(5):  # ready when both the port and the unix socket accept
            while True:
                try:
                    await (await trio.open_tcp_stream("127.0.0.1", self.port)).aclose()
                    await (await trio.open_unix_socket(self.socket_path)).aclose()
                except OSError:
                    await trio.sleep(0.01)
                    continue
                return

    def shutdown(self) -> None:
        env = dict(os.environ, REDISCLI_AUTH=self.password or "")
        subprocess.run(["redis-cli", "-p", str(self.port), "shutdown", "nosave"], env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=5, check=False)
        self.reap()

    def reap(self) -> None:
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


@pytest.fixture
def own_redis() -> Iterator[OwnRedis]:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        reason = "redis-server / redis-cli are not installed"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI machines provide them")
        pytest.skip(reason)
    server = OwnRedis(SECRET)
    try:
        yield server
    finally:
        if server.proc is not None:
            server.proc.kill()
            server.reap()
        shutil.rmtree(server.dir, ignore_errors=True)


async def test_auth_with_password_and_with_user(
    own_redis: OwnRedis, caplog: pytest.LogCaptureFixture
) -> None:
    await own_redis.start()
    for url in (own_redis.url(), own_redis.url(user="default")):
        rl = RedisRateLimiter(_config(url, "qt"))
        try:
            await rl.acquire("k1", "acme", KEY_ONLY)
            assert not rl.degraded
            assert SECRET not in repr(rl)
        finally:
            await rl.aclose()
    caplog.set_level(logging.WARNING, logger="qpher.ratelimit")
    wrong = RedisRateLimiter(_config(own_redis.url().replace(SECRET, "wrong-" + SECRET), "qt"))
    try:
        await wrong.acquire("k1", "acme", KEY_ONLY)  # falls back to the local buckets
        assert wrong.degraded and wrong.backend_failures == 1
    finally:
        await wrong.aclose()
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "WRONGPASS" in caplog.text and SECRET not in caplog.text


async def test_unix_socket_and_a_bounded_pool(own_redis: OwnRedis) -> None:
    await own_redis.start()
    url = f"unix://:{SECRET}@{own_redis.socket_path}?db=2"
    rl = RedisRateLimiter(_config(url, "qt"), pool_size=3)
    limits = RateLimits(key_rate=1.0, key_burst=20, tenant_rate=None, tenant_burst=1)
    admitted = 0

    async def one() -> None:
        nonlocal admitted
        try:
            await rl.acquire("k1", "acme", limits)
            admitted += 1
        except RateLimited:
            pass

    check = RedisClient(parse_redis_url(url))
    try:
        async with trio.open_nursery() as nursery:
            for _ in range(40):
                nursery.start_soon(one)
        assert admitted == 20 and not rl.degraded
        assert await check.execute("EXISTS", redis_key("qt", "k", "k1")) == 1
        clients = await check.execute("CLIENT", "LIST")
        assert isinstance(clients, bytes)
        assert len(clients.strip().splitlines()) <= 3 + 1  # the pool's, and ours
    finally:
        await rl.aclose()
        await check.aclose()


async def test_outage_falls_back_locally_with_one_warning_then_recovers(
    own_redis: OwnRedis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="qpher.ratelimit")
    await own_redis.start()
    timeout, retry = 0.5, 0.3
    clock = FakeClock()  # paces the retries and the local buckets; Redis keeps its own clock
    rl = RedisRateLimiter(_config(own_redis.url(), "qt", timeout=timeout, retry_interval=retry,
                                  expected_nodes=2), clock=clock)
    limits = RateLimits(key_rate=1.0, key_burst=10, tenant_rate=None, tenant_burst=1)
    try:
        for _ in range(3):
            await rl.acquire("k1", "acme", limits)
        own_redis.shutdown()  # mid-load: the pooled connection dies, then connects are refused
        admitted = 0
        for _ in range(20):
            t0 = trio.current_time()
            try:
                await rl.acquire("k1", "acme", limits)
                admitted += 1
            except RateLimited as exc:
                assert dict(exc.headers)[b"ratelimit-limit"] == b"5"  # 10 / expected_nodes
            assert trio.current_time() - t0 <= timeout + SLACK
        assert rl.degraded and rl.backend_failures >= 1
        assert admitted == 5  # the local bucket: burst 10 / 2 nodes
        assert [r.levelname for r in caplog.records] == ["WARNING"]

        await own_redis.start()  # the same port, empty: NOSCRIPT, then EVAL
        await rl.acquire("k2", "acme", limits)
        assert rl.degraded  # retry_interval has not passed: Redis is not asked
        clock.t += retry
        await rl.acquire("k2", "acme", limits)
        assert not rl.degraded
        assert [r.levelname for r in caplog.records] == ["WARNING", "INFO"]
        check = RedisClient(parse_redis_url(own_redis.url()))
        try:
            assert await check.execute("EXISTS", redis_key("qt", "k", "k2")) == 1
        finally:
            await check.aclose()
    finally:
        await rl.aclose()


async def test_outage_in_deny_mode_refuses_with_503(own_redis: OwnRedis) -> None:
    await own_redis.start()
    rl = RedisRateLimiter(_config(own_redis.url(), "qt", on_backend_failure="deny", retry_interval=2.5))
    try:
        await rl.acquire("k1", "acme", KEY_ONLY)
        own_redis.shutdown()
        for _ in range(3):
            with pytest.raises(RateLimitUnavailable) as info:
                await rl.acquire("k1", "acme", KEY_ONLY)
            e = info.value
            assert (e.code, e.status) == ("ratelimit_unavailable", 503)
            assert _headers(e) == {b"retry-after": b"3"}
        assert rl.degraded
    finally:
        await rl.aclose()


async def test_injected_fallback_buckets_get_the_per_node_share() -> None:
    with socket.socket() as s:  # a port nobody listens on: connects are refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    buckets = TokenBucketLimiter(FakeClock())
    rl = RedisRateLimiter(_config(f"redis://127.0.0.1:{port}/0", "qt", expected_nodes=3),
                          fallback=buckets)
    limits = RateLimits(key_rate=3.0, key_burst=7, tenant_rate=None, tenant_burst=1)
    try:
        await rl.acquire("k1", "acme", limits)
        await rl.acquire("k1", "acme", limits)  # burst 7 // 3 nodes = 2
        with pytest.raises(RateLimited) as info:
            await rl.acquire("k1", "acme", limits)
        assert len(buckets) == 1 and rl.degraded and rl.backend_failures == 1
        assert _headers(info.value)[b"ratelimit-limit"] == b"2"
        assert info.value.retry_after == 1  # 1 token at 1/s
    finally:
        await rl.aclose()


async def test_silent_server_costs_one_timeout_per_retry_interval() -> None:
    """A peer that accepts and never answers: bounded by ``timeout``, then skipped until retry."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    accepted: list[trio.SocketStream] = []
    clock = FakeClock()
    timeout = 0.15
    rl = RedisRateLimiter(
        _config(f"redis://127.0.0.1:{port}/0", "qt", timeout=timeout, retry_interval=5.0), clock=clock
    )

    async def accept_and_ignore() -> None:
        while True:
            accepted.append(await listeners[0].accept())

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept_and_ignore)
            t0 = trio.current_time()
            await rl.acquire("k1", "acme", KEY_ONLY)
            assert timeout <= trio.current_time() - t0 <= timeout + SLACK
            assert rl.degraded and rl.backend_failures == 1
            t0 = trio.current_time()
            for _ in range(2):
                await rl.acquire("k1", "acme", KEY_ONLY)  # local buckets: no Redis call at all
            assert trio.current_time() - t0 < timeout and rl.backend_failures == 1
            clock.t += 5.0  # retry_interval passed: one request probes again, and pays it
            t0 = trio.current_time()
            await rl.acquire("k1", "acme", KEY_ONLY)
            assert trio.current_time() - t0 >= timeout and rl.backend_failures == 2
            nursery.cancel_scope.cancel()
    finally:
        await rl.aclose()
        for s in accepted:
            await s.aclose()
        for listener in listeners:
            await listener.aclose()
