"""``FastSocketStream`` / ``FastSocketListener`` over real 127.0.0.1 sockets: trio's own generic
stream conformance checks (``trio.testing.check_half_closeable_stream``: checkpoints, ordering,
half-close, cancellation, closed and broken resources, conflicting calls, a clogged peer), and
what the gateway relies on: accepted streams have TCP_NODELAY, the peer address and the flag the
TLS stream uses to write its session tickets directly."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from qpher_proxy.http.transport import FastSocketListener, FastSocketStream


async def _pair(buffer: int | None = None) -> tuple[FastSocketStream, FastSocketStream]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    listener = FastSocketListener(listeners[0])
    port = listeners[0].socket.getsockname()[1]
    accepted: list[FastSocketStream] = []
    client = trio.socket.socket()
    if buffer is not None:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
    async with trio.open_nursery() as nursery:

        async def accept() -> None:
            accepted.append(await listener.accept())

        nursery.start_soon(accept)
        await client.connect(("127.0.0.1", port))
    await listener.aclose()
    server = accepted[0]
    if buffer is not None:
        server._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer)
        server._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
    return FastSocketStream(client), server


async def _clogged() -> tuple[FastSocketStream, FastSocketStream]:
    a, b = await _pair(buffer=4096)
    for stream in (a, b):  # fill both directions: the next send_all blocks until the peer reads
        with pytest.raises(BlockingIOError):
            while True:
                stream._sock.send(b"x" * 65536)
    return a, b


async def test_fast_socket_stream_passes_trios_half_closeable_stream_checks() -> None:
    await trio.testing.check_half_closeable_stream(_pair, _clogged)


async def test_accepted_streams_have_nodelay_the_peer_address_and_the_direct_write_flag() -> None:
    a, b = await _pair()
    try:
        assert b._sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert b.socket.getpeername()[0] == "127.0.0.1"
        assert b.nonblocking_writes is True
        await a.send_all(b"hello")
        assert await b.receive_some(10) == b"hello"
    finally:
        await a.aclose()
        await b.aclose()


async def test_a_closed_listener_refuses_accept() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    listener = FastSocketListener(listeners[0])
    await listener.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await listener.accept()
