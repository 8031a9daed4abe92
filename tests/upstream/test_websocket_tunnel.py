"""The WebSocket pieces in process: the byte relay and its limits (fake clock), recognising an
upgrade, the upstream handshake against misbehaving upstreams, and the HTTP/1.1 connection's
switch (the 101, the bytes buffered after the head, abandon when the 101 cannot be sent)."""

from __future__ import annotations

import contextlib

import h11
import pytest
import trio
import trio.testing
from _upstream_servers import H11Peer, Upstream, serve_upstream

from qpher_proxy.errors import UpstreamBadResponse
from qpher_proxy.http import Request, Response
from qpher_proxy.http.server import serve_connection
from qpher_proxy.upstream import UpstreamClient
from qpher_proxy.upstream.tunnel import (
    CLIENT,
    IDLE_TIMEOUT,
    MAX_LIFETIME,
    SHUTDOWN,
    UPSTREAM,
    Tunnel,
    TunnelLimits,
)
from qpher_proxy.upstream.websocket import accept_value, is_websocket_upgrade, open_websocket

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 section 1.3
WS_HEADERS = [
    (b"host", b"a"), (b"connection", b"keep-alive, Upgrade"), (b"upgrade", b"websocket"),
    (b"sec-websocket-version", b"13"), (b"sec-websocket-key", KEY),
]


# ---- the relay ---------------------------------------------------------------------------

def _pairs() -> tuple[trio.abc.HalfCloseableStream, trio.abc.HalfCloseableStream,
                      trio.abc.HalfCloseableStream, trio.abc.HalfCloseableStream]:
    client_peer, client_end = trio.testing.memory_stream_pair()
    upstream_end, upstream_peer = trio.testing.memory_stream_pair()
    return client_peer, client_end, upstream_end, upstream_peer


async def test_bytes_flow_both_ways_pending_first_and_a_half_close_is_passed_on(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client_peer, client_end, upstream_end, upstream_peer = _pairs()
    tunnel = Tunnel(client_end, upstream_end, TunnelLimits(idle_timeout=10, max_lifetime=100))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(tunnel.run, b"early-c", b"early-u")
        assert await upstream_peer.receive_some() == b"early-c"
        assert await client_peer.receive_some() == b"early-u"
        await client_peer.send_all(b"hello")
        assert await upstream_peer.receive_some() == b"hello"
        await client_peer.send_eof()  # the client is done sending...
        assert await upstream_peer.receive_some() == b""
        await upstream_peer.send_all(b"still here")  # ...and still receives
        assert await client_peer.receive_some() == b"still here"
        await upstream_peer.send_eof()
        assert await client_peer.receive_some() == b""
    assert tunnel.reason == CLIENT
    assert (tunnel.client_to_upstream, tunnel.upstream_to_client) == (12, 17)


async def test_the_upstream_going_away_ends_the_tunnel_as_upstream(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client_peer, client_end, upstream_end, upstream_peer = _pairs()
    tunnel = Tunnel(client_end, upstream_end, TunnelLimits(idle_timeout=10, max_lifetime=100))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(tunnel.run)
        await upstream_peer.aclose()
        assert await client_peer.receive_some() == b""
    assert tunnel.reason == UPSTREAM


async def test_no_byte_for_idle_timeout_closes_both_sides(autojump_clock: trio.testing.MockClock) -> None:
    client_peer, client_end, upstream_end, upstream_peer = _pairs()
    tunnel = Tunnel(client_end, upstream_end, TunnelLimits(idle_timeout=5, max_lifetime=100))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(tunnel.run)
        await trio.sleep(4)
        await client_peer.send_all(b"x")  # activity moves the deadline
        assert await upstream_peer.receive_some() == b"x"
        started = trio.current_time()
    assert tunnel.reason == IDLE_TIMEOUT
    assert 5 <= trio.current_time() - started < 5.5
    with pytest.raises(trio.ClosedResourceError):
        await client_end.send_all(b"y")


async def test_a_busy_tunnel_ends_at_max_lifetime(autojump_clock: trio.testing.MockClock) -> None:
    client_peer, client_end, upstream_end, upstream_peer = _pairs()
    tunnel = Tunnel(client_end, upstream_end, TunnelLimits(idle_timeout=2, max_lifetime=7))

    async def chatter() -> None:
        with contextlib.suppress(trio.BrokenResourceError):  # until the tunnel closes
            while await upstream_peer.receive_some(4) != b"":
                await client_peer.send_all(b"tick")
                await trio.sleep(1)

    await client_peer.send_all(b"tick")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(tunnel.run)
        nursery.start_soon(chatter)
    assert tunnel.reason == MAX_LIFETIME
    assert 7 <= tunnel.duration < 7.5


async def test_a_tunnel_cancelled_from_outside_ends_as_shutdown(
    autojump_clock: trio.testing.MockClock,
) -> None:
    _, client_end, upstream_end, _ = _pairs()
    tunnel = Tunnel(client_end, upstream_end, TunnelLimits())
    with trio.move_on_after(3):
        await tunnel.run()
    assert tunnel.reason == SHUTDOWN


# ---- recognising an upgrade --------------------------------------------------------------

def test_accept_value_is_rfc_6455s_example() -> None:
    assert accept_value(KEY) == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.parametrize("change", [
    ("method", "POST"),
    ("upgrade", b"h2c"),
    ("connection", b"keep-alive"),
    ("sec-websocket-version", b"8"),
    ("sec-websocket-key", b"short"),
    ("sec-websocket-key", None),
    ("content-length", b"5"),
    ("transfer-encoding", b"chunked"),
])
def test_only_a_valid_websocket_handshake_is_an_upgrade(change: tuple[str, bytes | str | None]) -> None:
    assert is_websocket_upgrade("GET", WS_HEADERS)
    assert is_websocket_upgrade("GET", [*WS_HEADERS, (b"content-length", b"0")])
    name, value = change
    if name == "method":
        assert not is_websocket_upgrade(str(value), WS_HEADERS)
        return
    headers = [(n, v) for n, v in WS_HEADERS if n != name.encode()]
    if value is not None:
        headers.append((name.encode(), value))  # type: ignore[arg-type]
    assert not is_websocket_upgrade("GET", headers)


# ---- the upstream handshake --------------------------------------------------------------

def _answering(status: int, headers: list[tuple[bytes, bytes]], after: bytes = b"") -> object:
    async def handler(stream: trio.abc.Stream, up: Upstream) -> None:
        peer = H11Peer(stream)
        request = await peer.next_event()
        assert isinstance(request, h11.Request)
        up.requests.append((request.method, request.target, list(request.headers)))
        if status == 101:
            await stream.send_all(peer.conn.send(h11.InformationalResponse(status_code=101, headers=headers))
                                  + after)
            await stream.receive_some(10)  # hold the connection until the test is done
        else:
            body = b"upgrade refused"
            headers.append((b"content-length", str(len(body)).encode()))
            await stream.send_all(peer.conn.send(h11.Response(status_code=status, headers=headers))
                                  + peer.conn.send(h11.Data(data=body)) + peer.conn.send(h11.EndOfMessage()))
    return handler


async def test_a_101_with_the_right_accept_switches_and_keeps_early_bytes() -> None:
    good = [(b"upgrade", b"websocket"), (b"connection", b"Upgrade"),
            (b"sec-websocket-accept", accept_value(KEY))]
    async with serve_upstream(_answering(101, good, b"\x81\x02hi")) as up:  # type: ignore[arg-type]
        async with UpstreamClient(up.url) as client:
            hs = await open_websocket(client, "/chat", [(b"x-qpher-tenant", b"t")], KEY)
            try:
                assert hs.switched and hs.status == 101 and hs.received == b"\x81\x02hi"
            finally:
                hs.close()
        method, target, sent = up.requests[0]
        assert (method, target) == (b"GET", b"/chat")
        assert (b"upgrade", b"websocket") in sent and (b"connection", b"Upgrade") in sent


@pytest.mark.parametrize("headers", [
    [(b"upgrade", b"websocket"), (b"connection", b"Upgrade"), (b"sec-websocket-accept", b"d3Jvbmc=")],
    [(b"upgrade", b"h2c"), (b"connection", b"Upgrade"), (b"sec-websocket-accept", accept_value(KEY))],
    [(b"upgrade", b"websocket"), (b"connection", b"Upgrade")],
])
async def test_a_101_with_a_bad_handshake_is_502(headers: list[tuple[bytes, bytes]]) -> None:
    async with serve_upstream(_answering(101, headers)) as up:  # type: ignore[arg-type]
        async with UpstreamClient(up.url) as client:
            with pytest.raises(UpstreamBadResponse):
                await open_websocket(client, "/chat", [], KEY)


async def test_a_refusal_is_an_ordinary_response_with_its_body() -> None:
    async with serve_upstream(_answering(426, [(b"x-why", b"old")])) as up:  # type: ignore[arg-type]
        async with UpstreamClient(up.url) as client:
            hs = await open_websocket(client, "/chat", [], KEY)
            assert not hs.switched and hs.status == 426 and (b"x-why", b"old") in hs.headers
            assert b"".join([chunk async for chunk in hs.body_chunks()]) == b"upgrade refused"


# ---- the HTTP/1.1 connection's switch ----------------------------------------------------

class _Echo:
    """An ``Upgrade`` that echoes what it receives, once, then returns."""

    def __init__(self) -> None:
        self.ran: bytes | None = None
        self.abandoned = False

    async def run(self, stream: trio.abc.Stream, received: bytes) -> None:
        self.ran = received
        await stream.send_all(b"echo:" + received + await stream.receive_some(100))

    def abandon(self) -> None:
        self.abandoned = True


async def _exchange(request: bytes, upgrade: _Echo, then: bytes = b"") -> bytes:
    client, server = trio.testing.memory_stream_pair()

    async def handler(req: Request) -> Response:
        return Response(101, [(b"upgrade", b"websocket")], upgrade=upgrade)

    got = b""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_connection, server, handler)
        await client.send_all(request)
        if then:
            await trio.sleep(0.05)
            await client.send_all(then)
        while chunk := await client.receive_some():
            got += chunk
    return got


async def test_the_connection_sends_101_and_hands_over_the_stream_with_buffered_bytes() -> None:
    head = b"GET /ws HTTP/1.1\r\nhost: a\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\r\n"
    upgrade = _Echo()
    got = await _exchange(head + b"early", upgrade, then=b"later")
    status, _, rest = got.partition(b"\r\n")
    assert status == b"HTTP/1.1 101 Switching Protocols"
    headers, _, tunnel = rest.partition(b"\r\n\r\n")
    assert b"connection: Upgrade" in headers and b"upgrade: websocket" in headers
    assert tunnel == b"echo:earlylater" and upgrade.ran == b"early" and not upgrade.abandoned


@pytest.mark.parametrize("head", [
    b"GET /ws HTTP/1.1\r\nhost: a\r\n\r\n",  # no Upgrade: h11 refuses a 101
    b"POST /ws HTTP/1.1\r\nhost: a\r\nconnection: Upgrade\r\nupgrade: websocket\r\n"
    b"content-length: 3\r\n\r\nabc",
])
async def test_an_upgrade_that_cannot_be_sent_is_abandoned_and_answered_500(head: bytes) -> None:
    upgrade = _Echo()
    got = await _exchange(head, upgrade)
    assert got.startswith(b"HTTP/1.1 500 ") and b'"internal_error"' in got
    assert upgrade.abandoned and upgrade.ran is None
