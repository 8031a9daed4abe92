"""The sidecar client against real upstream servers on 127.0.0.1: hygiene end to end, pooling,
error mapping (502/504), retries, concurrency."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import h11
import pytest
import trio
import trio.testing
from _upstream_servers import (
    H11Peer,
    Upstream,
    echo_body,
    echo_request,
    free_port,
    keep_alive,
    lazy_body,
    serve_upstream,
)

from qpher_proxy.errors import (
    BadRequest,
    ConfigError,
    UpstreamBadResponse,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from qpher_proxy.upstream import (
    DEFAULT_IDLE_TIMEOUT,
    UpstreamClient,
    UpstreamResponse,
    prepare_downstream_headers,
    prepare_upstream_headers,
)


async def read_all(resp: UpstreamResponse) -> bytes:
    return b"".join([chunk async for chunk in resp.body_chunks()])


async def get_json(client: UpstreamClient, method: str = "GET", target: str = "/", **kw: object) -> dict:
    async with client.request(method, target, kw.pop("headers", []), **kw) as resp:  # type: ignore[arg-type]
        assert resp.status == 200
        return json.loads(await read_all(resp))  # type: ignore[no-any-return]


# ---- header hygiene end to end ---------------------------------------------------------

async def test_upstream_sees_clean_headers_and_our_identity() -> None:
    async with serve_upstream(keep_alive(echo_request)) as up, UpstreamClient(up.url) as client:
        headers = prepare_upstream_headers(
            [(b"Host", b"api.example"), (b"Connection", b"X-Hop"), (b"X-Hop", b"1"),
             (b"X-Qpher-Tenant", b"victim"), (b"X-Tenant-Id", b"victim"), (b"X-Request-Id", b"forged"),
             (b"Forwarded", b"for=1.2.3.4"), (b"X-Forwarded-For", b"1.2.3.4"),
             (b"X-API-Key", b"qph_k1_secret"), (b"Authorization", b"Bearer qph_k1_secret"),
             (b"Accept", b"text/plain"), (b"Content-Length", b"999"), (b"Transfer-Encoding", b"chunked")],
            client_ip="192.0.2.9", proto="https", host=b"api.example",
            tenant_id="acme", api_key_id="k1", request_id="r-42",
        )
        doc = await get_json(client, "POST", "/app/x?y=1", headers=headers, body=b"hello")
    seen: dict[str, list[str]] = {}
    for name, value in doc["headers"]:
        seen.setdefault(name, []).append(value)
    assert doc["method"] == "POST" and doc["target"] == "/app/x?y=1" and doc["body_length"] == 5
    assert seen["host"] == [f"127.0.0.1:{up.port}"]
    assert seen["x-forwarded-host"] == ["api.example"]
    assert seen["x-qpher-tenant"] == ["acme"]
    assert seen["x-qpher-key-id"] == ["k1"]
    assert seen["x-request-id"] == ["r-42"]
    assert seen["x-forwarded-for"] == ["192.0.2.9"]
    assert seen["x-forwarded-proto"] == ["https"]
    assert seen["content-length"] == ["5"]  # framing is the client's, not the caller's
    assert seen["accept"] == ["text/plain"]
    for gone in ("x-hop", "connection", "x-tenant-id", "forwarded", "x-api-key", "authorization",
                 "transfer-encoding"):
        assert gone not in seen
    assert not any("secret" in v for vs in seen.values() for v in vs)


async def test_response_hop_by_hop_headers_are_stripped_for_the_client() -> None:
    async def respond(peer: H11Peer, request: h11.Request, up: Upstream) -> None:
        await peer.read_body()
        await peer.respond(200, b"ok", [(b"Connection", b"X-Secret-Hop"), (b"X-Secret-Hop", b"1"),
                                         (b"Keep-Alive", b"timeout=5"), (b"X-App", b"yes")])

    async with serve_upstream(keep_alive(respond)) as up, UpstreamClient(up.url) as client:
        async with client.request("GET", "/", []) as resp:
            assert resp.content_length == 2
            assert prepare_downstream_headers(resp.headers) == [
                (b"x-app", b"yes"), (b"content-length", b"2")]
            assert await read_all(resp) == b"ok"


async def test_url_path_prefix_is_prepended() -> None:
    async with serve_upstream(keep_alive(echo_request)) as up, UpstreamClient(up.url + "/base/") as client:
        assert (await get_json(client, target="/x"))["target"] == "/base/x"


async def test_post_without_body_is_sent_with_content_length_zero() -> None:
    async with serve_upstream(keep_alive(echo_request)) as up, UpstreamClient(up.url) as client:
        doc = await get_json(client, "POST")
    assert ["content-length", "0"] in doc["headers"]


async def test_streamed_body_of_unknown_length_is_sent_chunked() -> None:
    async with serve_upstream(keep_alive(echo_request)) as up, UpstreamClient(up.url) as client:
        doc = await get_json(client, "PUT", body=lazy_body(200_000))
    assert doc["body_length"] == 200_000
    assert ["transfer-encoding", "chunked"] in doc["headers"]


# ---- pooling -------------------------------------------------------------------------------

async def test_sequential_requests_reuse_one_connection() -> None:
    async with serve_upstream(keep_alive(echo_request)) as up, UpstreamClient(up.url) as client:
        for _ in range(3):
            await get_json(client)
        await get_json(client, "POST", body=lazy_body(100_000))
        assert client.stats().connections_opened == 1
        assert client.stats().idle == 1 and client.stats().active == 0
    assert up.accepts == 1 and len(up.requests) == 4


async def test_connection_close_from_upstream_is_not_reused() -> None:
    async def respond(peer: H11Peer, request: h11.Request, up: Upstream) -> None:
        await peer.read_body()
        await peer.respond(200, b"bye", [(b"connection", b"close")])

    async with serve_upstream(keep_alive(respond)) as up, UpstreamClient(up.url) as client:
        for _ in range(2):
            async with client.request("GET", "/", []) as resp:
                assert await read_all(resp) == b"bye"
        assert client.stats().idle == 0
    assert up.accepts == 2


async def test_a_response_closed_before_its_end_does_not_go_back_to_the_pool() -> None:
    async def respond(peer: H11Peer, request: h11.Request, up: Upstream) -> None:
        await peer.read_body()
        await peer.respond(200, b"x" * 300_000)

    async with serve_upstream(keep_alive(respond)) as up, UpstreamClient(up.url) as client:
        resp = await client.send("GET", "/", [])
        first = await resp.body_chunks().__anext__()
        assert 0 < len(first) <= 64 * 1024
        await resp.aclose()
        await resp.aclose()  # idempotent
        assert client.stats() == type(client.stats())(connections_opened=1, active=0, idle=0)
        async with client.request("GET", "/", []) as resp:
            assert len(await read_all(resp)) == 300_000
    assert up.accepts == 2


async def test_idle_connections_expire(mock_clock: trio.testing.MockClock) -> None:
    async with serve_upstream(keep_alive(echo_request)) as up, UpstreamClient(up.url) as client:
        await get_json(client)
        assert client.stats().idle == 1
        mock_clock.jump(DEFAULT_IDLE_TIMEOUT + 0.5)
        await trio.testing.wait_all_tasks_blocked()
        assert client.stats().idle == 0  # the reaper closed it
        await get_json(client)
    assert up.accepts == 2


async def test_pool_keeps_at_most_max_idle_connections() -> None:
    gate = trio.Event()

    async def respond(peer: H11Peer, request: h11.Request, up: Upstream) -> None:
        await peer.read_body()
        await gate.wait()
        await peer.respond(200, b"")

    async with serve_upstream(keep_alive(respond)) as up, UpstreamClient(up.url, max_idle=1) as client:
        async def one() -> None:
            async with client.request("GET", "/", []) as resp:
                await read_all(resp)

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(one)
            await trio.testing.wait_all_tasks_blocked()
            assert client.stats().active == 3
            gate.set()
        assert client.stats().idle == 1 and client.stats().connections_opened == 3


async def test_a_dropped_idle_connection_is_detected_before_reuse() -> None:
    async def respond(peer: H11Peer, request: h11.Request, up: Upstream) -> None:
        await echo_request(peer, request, up)
        peer.conn.send(h11.ConnectionClosed())  # no Connection: close, just hang up after answering

    async with serve_upstream(keep_alive(respond)) as up, UpstreamClient(up.url) as client:
        await get_json(client)
        (idle,) = client._idle
        await trio.lowlevel.wait_readable(idle.raw.socket)  # the upstream's FIN has arrived
        # POST is not retried, so this only succeeds because the dead connection was never used.
        assert (await get_json(client, "POST", body=b"x"))["body_length"] == 1
    assert up.accepts == 2


def _dies_on_second_request() -> object:
    async def respond(peer: H11Peer, request: h11.Request, up: Upstream) -> None:
        if len(up.requests) % 2 == 0:  # the second request on the connection: hang up, no answer
            raise trio.ClosedResourceError
        await echo_request(peer, request, up)

    return keep_alive(respond)


@pytest.mark.parametrize(("method", "body"), [("GET", None), ("PUT", b"data"), ("DELETE", None)])
async def test_stale_pooled_connection_is_retried_once_for_idempotent_requests(
    method: str, body: object
) -> None:
    async with serve_upstream(_dies_on_second_request()) as up, UpstreamClient(up.url) as client:  # type: ignore[arg-type]
        await get_json(client)
        doc = await get_json(client, method, body=body)
        assert doc["method"] == method
        assert client.stats().active == 0
    assert up.accepts == 2


@pytest.mark.parametrize("body", [b"data", "stream"])
async def test_stale_pooled_connection_is_not_retried_for_post(body: object) -> None:
    async with serve_upstream(_dies_on_second_request()) as up, UpstreamClient(up.url) as client:  # type: ignore[arg-type]
        await get_json(client)
        with pytest.raises(UpstreamUnavailable) as info:
            await client.send("POST", "/", [], body=lazy_body(1000) if body == "stream" else body)
        assert info.value.status == 502 and info.value.code == "upstream_unavailable"
        assert client.stats().active == 0
    assert up.accepts == 1


# ---- errors: 502 / 504 -----------------------------------------------------------------------

async def test_refused_connection_is_502_upstream_unavailable() -> None:
    async with UpstreamClient(f"http://127.0.0.1:{free_port()}") as client:
        with pytest.raises(UpstreamUnavailable) as info:
            await client.send("GET", "/", [])
        assert (info.value.code, info.value.status) == ("upstream_unavailable", 502)
        assert "127.0.0.1" not in info.value.message
        assert isinstance(info.value.__cause__, OSError)
        assert client.stats().active == 0


async def test_unresolvable_host_is_502_upstream_unavailable() -> None:
    async with UpstreamClient("http://no-such-host.invalid:8080") as client:
        with pytest.raises(UpstreamUnavailable):
            await client.send("GET", "/", [])


async def never_answers(stream: trio.abc.Stream, up: Upstream) -> None:
    peer = H11Peer(stream)
    event = await peer.next_event()
    up.requests.append((b"", b"", []))
    assert isinstance(event, h11.Request)
    await trio.sleep_forever()


async def test_upstream_that_never_answers_is_504(mock_clock: trio.testing.MockClock) -> None:
    mock_clock.autojump_threshold = 0.2  # virtual time runs only while everything is blocked
    async with serve_upstream(never_answers) as up, UpstreamClient(up.url, read_timeout=30) as client:
        start = trio.current_time()
        with pytest.raises(UpstreamTimeout) as info:
            await client.send("GET", "/", [])
        assert (info.value.code, info.value.status) == ("upstream_timeout", 504)
        assert info.value.message == "the upstream did not respond in time"
        assert 30 <= trio.current_time() - start < 31
        assert client.stats().active == 0


async def test_upstream_that_stalls_mid_body_is_504(mock_clock: trio.testing.MockClock) -> None:
    mock_clock.autojump_threshold = 0.2

    async def half(stream: trio.abc.Stream, up: Upstream) -> None:
        peer = H11Peer(stream)
        await peer.next_event()
        await peer.read_body()
        await peer.send(h11.Response(status_code=200, headers=[(b"content-length", b"10")]))
        await peer.send(h11.Data(data=b"12345"))
        await trio.sleep_forever()

    async with serve_upstream(half) as up, UpstreamClient(up.url, read_timeout=5) as client:
        async with client.request("GET", "/", []) as resp:
            chunks = resp.body_chunks()
            assert await chunks.__anext__() == b"12345"
            with pytest.raises(UpstreamTimeout, match="stalled mid-response"):
                await chunks.__anext__()


async def test_upstream_that_stops_reading_the_body_is_504(mock_clock: trio.testing.MockClock) -> None:
    mock_clock.autojump_threshold = 0.2

    async def no_read(stream: trio.abc.Stream, up: Upstream) -> None:
        await stream.receive_some(1)  # accept the connection, read one byte, never read again
        await trio.sleep_forever()

    async with serve_upstream(no_read) as up, UpstreamClient(up.url, read_timeout=7) as client:
        with pytest.raises(UpstreamTimeout, match="timed out sending"):
            await client.send("POST", "/", [], body=lazy_body(1 << 30))


async def test_slow_client_upload_does_not_start_the_response_timeout(
    mock_clock: trio.testing.MockClock,
) -> None:
    # The body producer (the downstream client) takes 100 virtual seconds; the upstream is fine.
    mock_clock.autojump_threshold = 0.2

    async def slow_body() -> AsyncIterator[bytes]:
        for _ in range(3):
            await trio.sleep(40)
            yield b"x" * 10

    async with (
        serve_upstream(keep_alive(echo_request)) as up,
        UpstreamClient(up.url, read_timeout=5) as client,
    ):
        start = trio.current_time()
        assert (await get_json(client, "POST", body=slow_body()))["body_length"] == 30
        assert trio.current_time() - start >= 120


async def test_connect_timeout_is_504(mock_clock: trio.testing.MockClock) -> None:
    # A listener whose accept backlog is full: the SYN is never answered, so connect hangs.
    import socket

    mock_clock.autojump_threshold = 0.2
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = []
        try:
            for _ in range(8):  # fill the backlog (the kernel allows backlog + 1)
                s = socket.socket()
                s.setblocking(False)
                s.connect_ex(("127.0.0.1", port))
                fillers.append(s)
            async with UpstreamClient(f"http://127.0.0.1:{port}", connect_timeout=3) as client:
                with pytest.raises(UpstreamTimeout, match="connecting"):
                    await client.send("GET", "/", [])
        finally:
            for s in fillers:
                s.close()


@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n",
    b"SMTP ready\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n",
])
async def test_protocol_violation_is_502_bad_response(raw: bytes) -> None:
    async def bad(stream: trio.abc.Stream, up: Upstream) -> None:
        await H11Peer(stream).next_event()
        await stream.send_all(raw)
        await trio.sleep_forever()

    async with serve_upstream(bad) as up, UpstreamClient(up.url) as client:
        with pytest.raises(UpstreamBadResponse) as info:
            await client.send("GET", "/", [])
        assert (info.value.code, info.value.status) == ("upstream_bad_response", 502)


async def test_truncated_response_body_is_502_bad_response() -> None:
    async def truncated(stream: trio.abc.Stream, up: Upstream) -> None:
        await H11Peer(stream).next_event()
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")

    async with serve_upstream(truncated) as up, UpstreamClient(up.url) as client:
        async with client.request("GET", "/", []) as resp:
            with pytest.raises(UpstreamBadResponse):
                await read_all(resp)
        assert client.stats().active == 0 and client.stats().idle == 0


async def test_closing_without_a_response_is_502_unavailable() -> None:
    async def closes(stream: trio.abc.Stream, up: Upstream) -> None:
        await H11Peer(stream).next_event()

    async with serve_upstream(closes) as up, UpstreamClient(up.url) as client:
        with pytest.raises(UpstreamUnavailable, match="before responding"):
            await client.send("GET", "/", [])


async def test_early_response_is_delivered_while_the_body_is_still_uploading() -> None:
    async def early(stream: trio.abc.Stream, up: Upstream) -> None:
        peer = H11Peer(stream)
        await peer.next_event()
        await peer.respond(413, b"too big", [(b"connection", b"close")])

    async with serve_upstream(early) as up, UpstreamClient(up.url) as client:
        async with client.request("POST", "/", [], body=lazy_body(1 << 30)) as resp:
            assert resp.status == 413
            assert await read_all(resp) == b"too big"
        assert client.stats().active == 0 and client.stats().idle == 0


async def test_full_pool_waits_then_times_out_as_504(mock_clock: trio.testing.MockClock) -> None:
    mock_clock.autojump_threshold = 0.2
    gate = trio.Event()

    async def respond(peer: H11Peer, request: h11.Request, up: Upstream) -> None:
        await peer.read_body()
        await gate.wait()
        await peer.respond(200, b"done")

    async with serve_upstream(keep_alive(respond)) as up, \
            UpstreamClient(up.url, pool_size=1, connect_timeout=2, read_timeout=60) as client:
        async with trio.open_nursery() as nursery:
            async def hold() -> None:
                async with client.request("GET", "/", []) as resp:
                    assert await read_all(resp) == b"done"

            nursery.start_soon(hold)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(UpstreamTimeout, match="free upstream connection"):
                await client.send("GET", "/", [])
            gate.set()
        assert client.stats().active == 0
        await get_json_or_done(client)


async def get_json_or_done(client: UpstreamClient) -> None:
    async with client.request("GET", "/", []) as resp:
        assert await read_all(resp) == b"done"


async def test_head_response_has_no_body_and_keeps_the_connection() -> None:
    async def respond(peer: H11Peer, request: h11.Request, up: Upstream) -> None:
        await peer.read_body()
        await peer.send(h11.Response(status_code=200, headers=[(b"content-length", b"1234")]))
        await peer.send(h11.EndOfMessage())

    async with serve_upstream(keep_alive(respond)) as up, UpstreamClient(up.url) as client:
        for _ in range(2):
            async with client.request("HEAD", "/", []) as resp:
                assert resp.content_length == 1234
                assert await read_all(resp) == b""
    assert up.accepts == 1


async def test_informational_responses_are_skipped() -> None:
    async def early_hints(stream: trio.abc.Stream, up: Upstream) -> None:
        await H11Peer(stream).next_event()
        await stream.send_all(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
            b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"
        )
        await trio.sleep_forever()

    async with serve_upstream(early_hints) as up, UpstreamClient(up.url) as client:
        async with client.request("POST", "/", [], body=b"x") as resp:
            assert resp.status == 201 and resp.reason == b"Created"
            assert await read_all(resp) == b"ok"


class ClientWentAway(Exception):
    pass


async def test_body_iterator_failure_after_the_response_started_surfaces_in_the_body() -> None:
    release = trio.Event()

    async def failing() -> AsyncIterator[bytes]:
        yield b"a" * 1000
        await release.wait()
        raise ClientWentAway()

    async with serve_upstream(keep_alive(echo_body)) as up, UpstreamClient(up.url) as client:
        async with client.request("POST", "/", [], body=failing()) as resp:
            chunks = resp.body_chunks()
            assert await chunks.__anext__() == b"a" * 1000
            release.set()
            with pytest.raises(ClientWentAway):
                await chunks.__anext__()
        assert client.stats() == type(client.stats())(connections_opened=1, active=0, idle=0)


async def test_body_iterator_failure_aborts_the_exchange_and_is_reraised() -> None:
    saw_eof = trio.Event()

    async def reader(stream: trio.abc.Stream, up: Upstream) -> None:
        peer = H11Peer(stream)
        await peer.next_event()
        with pytest.raises(h11.RemoteProtocolError):  # upstream sees a truncated request
            await peer.read_body()
        saw_eof.set()

    async def failing() -> AsyncIterator[bytes]:
        yield b"a" * 1000
        raise ClientWentAway()

    async with serve_upstream(reader) as up, UpstreamClient(up.url) as client:
        with pytest.raises(ClientWentAway):
            await client.send("POST", "/", [], body=failing(), content_length=5000)
        await saw_eof.wait()
        assert client.stats().active == 0


async def test_body_shorter_than_its_content_length_is_400() -> None:
    async with serve_upstream(keep_alive(echo_request)) as up, UpstreamClient(up.url) as client:
        with pytest.raises(BadRequest):
            await client.send("POST", "/", [], body=lazy_body(10), content_length=20)
        with pytest.raises(BadRequest):
            await client.send("POST", "/", [], body=lazy_body(30), content_length=20)


async def test_bad_targets_and_methods_are_refused_before_connecting() -> None:
    async with UpstreamClient(f"http://127.0.0.1:{free_port()}") as client:
        with pytest.raises(BadRequest):
            await client.send("CONNECT", "example.com:443", [])
        with pytest.raises(BadRequest):
            await client.send("GET", "http://evil.example/", [])
        with pytest.raises(BadRequest):
            await client.send("GET", "/\u00e9", [])
        with pytest.raises(BadRequest):
            await client.send("GET", "/", [(b"x-bad", b"a\r\nx-injected: 1")])
        with pytest.raises(BadRequest):
            await client.send("GET /x HTTP/1.1\r\n", "/", [])
        with pytest.raises(ValueError):
            await client.send("POST", "/", [], body=b"abc", content_length=4)
        assert client.stats() == type(client.stats())(connections_opened=0, active=0, idle=0)


async def test_client_must_be_entered() -> None:
    client = UpstreamClient("http://127.0.0.1:1")
    with pytest.raises(RuntimeError):
        await client.send("GET", "/", [])


@pytest.mark.parametrize("url", ["ftp://x", "http://", "http://u:p@host", "http://h/?q=1", "http://h:99999"])
def test_bad_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError):
        UpstreamClient(url)


def test_tls_options_need_an_https_url() -> None:
    with pytest.raises(ConfigError):
        UpstreamClient("http://127.0.0.1:1", ca_file="/nonexistent")


# ---- concurrency ------------------------------------------------------------------------

async def test_a_slow_upstream_request_does_not_block_a_fast_one() -> None:
    slow_arrived, release = trio.Event(), trio.Event()

    async def respond(peer: H11Peer, request: h11.Request, up: Upstream) -> None:
        await peer.read_body()
        if request.target == b"/slow":
            slow_arrived.set()
            await release.wait()
        await peer.respond(200, request.target)

    async with serve_upstream(keep_alive(respond)) as up, UpstreamClient(up.url) as client:
        slow_result: list[bytes] = []

        async def slow() -> None:
            async with client.request("GET", "/slow", []) as resp:
                slow_result.append(await read_all(resp))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow)
            await slow_arrived.wait()
            for _ in range(3):  # the fast path works (and reuses its own connection) meanwhile
                async with client.request("GET", "/fast", []) as resp:
                    assert await read_all(resp) == b"/fast"
            assert slow_result == []
            release.set()
        assert slow_result == [b"/slow"]
    assert up.accepts == 2
