"""Shared pieces of the TLS tests: settings over the dev PKI (conftest.py), a server on
127.0.0.1:0, and blocking clients.

The server records one *outcome* per connection (the TLSInfo of a completed handshake, or the
handshake error) in a channel, so a test waits for "what the server saw" instead of sleeping.
"""

from __future__ import annotations

import math
import shutil
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio
from cryptography import x509
from OpenSSL import SSL

from qpher_proxy import errors
from qpher_proxy.tls import (
    ServerTLSContextHolder,
    TLSInfo,
    TLSSettings,
    TLSStream,
    _openssl,
    open_tls_listeners,
)
from qpher_proxy.tls.certs import DevPKI, make_dev_pki

HTTP_REQUEST = b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
HTTP_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"
CLIENT_TIMEOUT = 10  # seconds a blocking client may wait on a socket before failing the test


def settings_for(pki: DevPKI, **overrides: object) -> TLSSettings:
    base: dict[str, object] = {"cert_file": pki.server_cert, "key_file": pki.server_key}
    base.update(overrides)
    return TLSSettings(**base)  # type: ignore[arg-type]


def copy_pki(pki: DevPKI, dest: Path) -> DevPKI:
    """A private copy of the PKI files (tests that rewrite files must not touch the shared one)."""
    shutil.copytree(pki.directory, dest)
    return make_dev_pki(dest)


# ---- server -----------------------------------------------------------------------------

Outcome = TLSInfo | errors.TLSHandshakeFailed | trio.BrokenResourceError


@dataclass
class Server:
    port: int
    holder: ServerTLSContextHolder
    _outcomes: trio.MemoryReceiveChannel[Outcome]
    streams: list[TLSStream] = field(default_factory=list)

    async def next_outcome(self, timeout: float = 10) -> Outcome:
        with trio.fail_after(timeout):
            return await self._outcomes.receive()


async def serve_tiny_http(stream: TLSStream) -> None:
    """Read one request head (or EOF) and answer a fixed response."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = await stream.receive_some()
        if not chunk:
            return
        buf += chunk
    await stream.send_all(HTTP_RESPONSE)


async def serve_echo(stream: TLSStream) -> None:
    while True:
        chunk = await stream.receive_some()
        if not chunk:
            return
        await stream.send_all(chunk)


@asynccontextmanager
async def running_server(
    holder: ServerTLSContextHolder,
    app: Callable[[TLSStream], Awaitable[None]] = serve_tiny_http,
) -> AsyncIterator[Server]:
    send, receive = trio.open_memory_channel[Outcome](math.inf)
    listeners = await open_tls_listeners(0, holder, host="127.0.0.1")
    port = listeners[0].transport_listener.socket.getsockname()[1]  # type: ignore[attr-defined]
    server = Server(port, holder, receive)

    async def handler(stream: TLSStream) -> None:
        server.streams.append(stream)
        try:
            try:
                await stream.do_handshake()
            except trio.BrokenResourceError as exc:  # our TLS errors are BrokenResourceErrors too
                send.send_nowait(exc)
                return
            assert stream.info is not None
            send.send_nowait(stream.info)
            await app(stream)
        except trio.BrokenResourceError:
            pass  # the client went away mid-response: not what these tests look at
        finally:
            await stream.aclose()

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()


# ---- clients --------------------------------------------------------------------------------

def pyopenssl_client_context(
    *cafiles: Path,
    groups: tuple[str, ...] | None = None,
    sigalgs: tuple[str, ...] | None = None,
    min_version: int | None = None,
    max_version: int | None = None,
    cert: tuple[Path, Path] | None = None,
) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    for ca in cafiles:
        ctx.load_verify_locations(str(ca))
    ctx.set_verify(SSL.VERIFY_PEER)
    ctx.set_alpn_protos([b"http/1.1"])
    if groups is not None:
        assert _openssl.set_groups(ctx, groups)
    if sigalgs is not None:
        assert _openssl.set_sigalgs(ctx, sigalgs)
    if min_version is not None:
        ctx.set_min_proto_version(min_version)
    if max_version is not None:
        ctx.set_max_proto_version(max_version)
    if min_version is not None and min_version < SSL.TLS1_2_VERSION:
        ctx.set_cipher_list(b"DEFAULT:@SECLEVEL=0")  # let OpenSSL actually send a TLS 1.1 hello
    if cert is not None:
        ctx.use_certificate_chain_file(str(cert[0]))
        ctx.use_privatekey_file(str(cert[1]))
    return ctx


@dataclass(frozen=True)
class ClientResult:
    version: str
    cipher: str
    group: str | None
    peer_cert: x509.Certificate
    response: bytes


def _blocking_socket(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    # A receive timeout that keeps the fd blocking (pyOpenSSL needs a blocking socket): a
    # broken server fails the test after CLIENT_TIMEOUT instead of hanging it.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", CLIENT_TIMEOUT, 0))
    return sock


def read_to_eof(conn: SSL.Connection) -> bytes:
    """Everything a blocking pyOpenSSL connection receives until the server closes it."""
    response = b""
    while True:
        try:
            chunk = conn.recv(65536)
        except (SSL.ZeroReturnError, SSL.SysCallError):
            break
        if not chunk:
            break
        response += chunk
    return response


def pyopenssl_request(port: int, ctx: SSL.Context, request: bytes = HTTP_REQUEST) -> ClientResult:
    """A blocking pyOpenSSL client (run it in a thread): handshake, one request, read to EOF."""
    with _blocking_socket(port) as sock:
        conn = SSL.Connection(ctx, sock)
        conn.set_tlsext_host_name(b"localhost")
        conn.set_connect_state()
        conn.do_handshake()
        conn.sendall(request)
        response = read_to_eof(conn)
        peer = conn.get_peer_certificate(as_cryptography=True)
        assert peer is not None
        return ClientResult(
            conn.get_protocol_version_name(),
            conn.get_cipher_name() or "",
            conn.get_group_name(),
            peer,
            response,
        )


def stdlib_context(
    cafile: Path,
    *,
    max_version: ssl.TLSVersion | None = None,
    cert_chain: Path | None = None,
) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cafile))
    if max_version is not None:
        ctx.maximum_version = max_version
    if cert_chain is not None:
        ctx.load_cert_chain(str(cert_chain))
    return ctx


def stdlib_request(
    port: int, ctx: ssl.SSLContext, request: bytes = HTTP_REQUEST
) -> tuple[str, str, bytes, bytes]:
    """A blocking client on Python's ssl (system OpenSSL 3.0, no ML-KEM): version, cipher,
    DER of the server certificate, response."""
    with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(request)
            response = b""
            while True:
                try:
                    chunk = tls.recv(65536)
                except ssl.SSLZeroReturnError:
                    break
                if not chunk:
                    break
                response += chunk
            version, cipher = tls.version() or "", tls.cipher()[0]  # type: ignore[index]
            der = tls.getpeercert(binary_form=True) or b""
            return version, cipher, der, response


async def trio_client(
    port: int, ctx: SSL.Context, **kwargs: object
) -> TLSStream:
    transport = await trio.open_tcp_stream("127.0.0.1", port)
    return TLSStream(transport, ctx, server_side=False, server_hostname="localhost", **kwargs)  # type: ignore[arg-type]
