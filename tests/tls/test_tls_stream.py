"""TLSStream against trio's own stream conformance suite, and its edge cases."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable

import pytest
import trio
import trio.testing
from _tls_helpers import pyopenssl_client_context, settings_for
from OpenSSL import SSL

from qpher_proxy import errors
from qpher_proxy.http.transport import FastSocketStream
from qpher_proxy.tls import TLSInfo, TLSStream, build_server_context
from qpher_proxy.tls.certs import DevPKI
from qpher_proxy.tls.stream import CLOSE_NOTIFY_TIMEOUT


def _contexts(pki: DevPKI) -> tuple[SSL.Context, SSL.Context]:
    return build_server_context(settings_for(pki)), pyopenssl_client_context(pki.ca_cert)


async def _socket_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with listeners[0]:
        port = listeners[0].socket.getsockname()[1]
        client = await trio.open_tcp_stream("127.0.0.1", port)
        server = await listeners[0].accept()
    return server, client


async def test_tls_stream_over_real_sockets_passes_trios_half_closeable_stream_checks(pki: DevPKI) -> None:
    server_ctx, client_ctx = _contexts(pki)

    async def stream_maker() -> tuple[TLSStream, TLSStream]:
        server_sock, client_sock = await _socket_pair()
        return (
            TLSStream(server_sock, server_ctx, server_side=True),
            TLSStream(client_sock, client_ctx, server_side=False, server_hostname="localhost"),
        )

    await trio.testing.check_half_closeable_stream(stream_maker, None)


async def test_tls_stream_over_lockstep_transport_passes_the_clogged_stream_checks(
    pki: DevPKI, autojump_clock: trio.testing.MockClock
) -> None:
    # A lockstep transport blocks send_all until the peer receives: the only way to exercise
    # wait_send_all_might_not_block and concurrent-send detection deterministically. (With it,
    # some polite acloses wait CLOSE_NOTIFY_TIMEOUT for a peer that is not reading: the fake
    # clock skips that wait.)
    server_ctx, client_ctx = _contexts(pki)

    async def stream_maker() -> tuple[TLSStream, TLSStream]:
        a, b = trio.testing.lockstep_stream_pair()
        return (
            TLSStream(a, server_ctx, server_side=True),
            TLSStream(b, client_ctx, server_side=False, server_hostname="localhost"),
        )

    async def clogged_stream_maker() -> tuple[TLSStream, TLSStream]:
        server, client = await stream_maker()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.do_handshake)
            nursery.start_soon(client.do_handshake)
        return server, client

    await trio.testing.check_half_closeable_stream(stream_maker, clogged_stream_maker)


async def test_info_and_callback_after_handshake(pki: DevPKI) -> None:
    server_ctx, client_ctx = _contexts(pki)
    seen: list[TLSInfo] = []
    server_sock, client_sock = await _socket_pair()
    server = TLSStream(server_sock, server_ctx, on_handshake=seen.append)
    client = TLSStream(client_sock, client_ctx, server_side=False, server_hostname="localhost")
    async with server, client:
        assert server.info is None and server.peer_certificate() is None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.do_handshake)
            nursery.start_soon(client.do_handshake)
        assert seen == [server.info]
        assert server.info is not None and server.info.group == "X25519MLKEM768"
        assert client.info is not None and client.info.version == "TLSv1.3"
        await server.do_handshake()  # a second call is a no-op
        assert len(seen) == 1


async def test_bulk_transfer_arrives_intact_in_large_reads(pki: DevPKI) -> None:
    server_ctx, client_ctx = _contexts(pki)
    server_sock, client_sock = await _socket_pair()
    server = TLSStream(server_sock, server_ctx)
    client = TLSStream(client_sock, client_ctx, server_side=False, server_hostname="localhost")
    payload = bytes(range(256)) * 4096  # 1 MiB in one send_all
    sizes: list[int] = []

    async def receive_all() -> bytes:
        got = bytearray()
        while len(got) < len(payload):
            chunk = await server.receive_some()
            sizes.append(len(chunk))
            got += chunk
        return bytes(got)

    async with server, client:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.send_all, payload)
            assert await receive_all() == payload
    # Reads gather several 16 KiB records: far fewer trips than records.
    assert max(sizes) > 16 * 1024
    assert len(sizes) < len(payload) // (16 * 1024)


async def test_send_and_receive_started_together_share_one_handshake(pki: DevPKI) -> None:
    server_ctx, client_ctx = _contexts(pki)
    handshakes: list[TLSInfo] = []
    server_sock, client_sock = await _socket_pair()
    server = TLSStream(server_sock, server_ctx, on_handshake=handshakes.append)
    client = TLSStream(client_sock, client_ctx, server_side=False, server_hostname="localhost")
    received: list[bytes] = []

    async def server_receive() -> None:
        received.append(await server.receive_some())

    async def client_side() -> None:
        assert await client.receive_some() == b"from server"
        await client.send_all(b"from client")

    async with server, client:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server_receive)  # both server tasks wait for the same handshake
            nursery.start_soon(server.send_all, b"from server")
            nursery.start_soon(client_side)
    assert received == [b"from client"]
    assert len(handshakes) == 1


async def test_aclose_does_not_hang_when_the_peer_never_reads(
    pki: DevPKI, autojump_clock: trio.testing.MockClock
) -> None:
    server_ctx, client_ctx = _contexts(pki)
    server_sock, client_sock = await _socket_pair()
    server = TLSStream(server_sock, server_ctx)
    client = TLSStream(client_sock, client_ctx, server_side=False, server_hostname="localhost")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        nursery.start_soon(client.do_handshake)
    # Fill the server's socket buffers behind the stream's back (the client never reads), so
    # that sending close_notify would block forever.
    with socket.socket(fileno=os.dup(server_sock.socket.fileno())) as raw:
        raw.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                raw.send(b"x" * 65536)
    started = trio.current_time()
    with trio.fail_after(60):
        await server.aclose()
    assert trio.current_time() - started <= CLOSE_NOTIFY_TIMEOUT + 0.01
    await client.aclose()


async def test_handshake_failure_is_typed_and_the_stream_stays_broken(pki: DevPKI) -> None:
    server_ctx, _ = _contexts(pki)
    server_sock, client_sock = await _socket_pair()
    server = TLSStream(server_sock, server_ctx)
    async with server, client_sock:
        await client_sock.send_all(b"\x16\x03\x01\x00\x05hello")  # a handshake record of nonsense
        with pytest.raises(errors.TLSHandshakeFailed) as caught:
            await server.receive_some()
        assert isinstance(caught.value, trio.BrokenResourceError)
        assert caught.value.reason == "protocol_error"
        with pytest.raises(trio.BrokenResourceError):
            await server.send_all(b"x")
        # The client saw an alert (7 bytes), then EOF once the server closes.
        alert = await client_sock.receive_some()
        assert alert[:1] == b"\x15"  # content type: alert


async def test_server_sends_its_session_tickets_right_after_the_handshake_on_a_socket(pki: DevPKI) -> None:
    """The first-request stall: a Nagle-on client holds its first request until its Finished is
    acknowledged. The server's post-handshake records (TLS 1.3 session tickets) do that, so
    over a real socket they are on the wire as soon as the handshake completes, before the
    server reads anything: here the client's socket turns readable while the server has not
    called receive_some and the client has sent nothing after its Finished."""
    await _tickets_arrive_before_any_request(pki, lambda sock: sock)


async def _tickets_arrive_before_any_request(
    pki: DevPKI, transport: Callable[[trio.SocketStream], trio.abc.Stream]
) -> None:
    server_ctx, client_ctx = _contexts(pki)
    server_sock, client_sock = await _socket_pair()
    server = TLSStream(transport(server_sock), server_ctx)
    client = TLSStream(client_sock, client_ctx, server_side=False, server_hostname="localhost")
    async with server, client:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.do_handshake)
            nursery.start_soon(client.do_handshake)
        with trio.fail_after(5):
            await trio.lowlevel.wait_readable(client_sock.socket)
        assert server._outbox == []  # everything went out at once: nothing retained
        # The bytes are the tickets: the client reads them as no application data.
        await server.send_all(b"response")
        assert await client.receive_some() == b"response"
        assert client._engine._conn is not None and client._engine._conn.get_session() is not None


async def test_stdlib_client_can_read_the_tickets_before_sending_its_request(pki: DevPKI) -> None:
    """The same with Python's ssl (Nagle on): after the handshake the client receives the
    server's tickets (a resumable session) without having sent a byte of its request."""
    import select
    import ssl

    from _tls_helpers import stdlib_context

    server_ctx = build_server_context(settings_for(pki))
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    ctx = stdlib_context(pki.ca_cert)

    def client() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                assert isinstance(tls, ssl.SSLSocket)
                readable, _, _ = select.select([tls], [], [], 5)
                if not readable:
                    return False
                tls.setblocking(False)
                with contextlib.suppress(ssl.SSLWantReadError):
                    tls.recv(1)  # processes the tickets; there is no application data
                session = tls.session
                return session is not None and session.has_ticket

    async with listeners[0]:
        async with trio.open_nursery() as nursery:
            result: list[bool] = []

            async def run_client() -> None:
                result.append(await trio.to_thread.run_sync(client))

            nursery.start_soon(run_client)
            server_sock = await listeners[0].accept()
            server = TLSStream(server_sock, server_ctx, suppress_ragged_eofs=True)
            async with server:
                await server.do_handshake()
                with trio.fail_after(10):
                    assert await server.receive_some() == b""  # the client closes, having sent nothing
    assert result == [True]


async def test_the_gateways_fast_socket_stream_gets_the_tickets_at_once(pki: DevPKI) -> None:
    """Not a trio.SocketStream, but it declares ``nonblocking_writes`` (http/transport.py)."""
    await _tickets_arrive_before_any_request(pki, lambda sock: FastSocketStream(sock.socket))
