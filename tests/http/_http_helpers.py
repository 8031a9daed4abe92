"""Test helpers: a raw-bytes HTTP/1.1 client and a server runner on 127.0.0.1, plain or TLS.

The client sends exactly the bytes a test gives it and parses responses itself, so tests can
send pipelined, malformed or trickled input and see exactly what comes back.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from OpenSSL import SSL

from qpher_proxy.http import HTTPLimits, HTTPServer, Request, Response
from qpher_proxy.tls import TLSSettings, TLSStream
from qpher_proxy.tls.certs import DevPKI, make_dev_pki
from qpher_proxy.tls.context import build_server_context


@dataclass
class RawResponse:
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    chunk_sizes: list[int] = field(default_factory=list)

    def header(self, name: bytes) -> bytes | None:
        for n, v in self.headers:
            if n == name:
                return v
        return None

    def json(self) -> Any:
        return json.loads(self.body)


class RawClient:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buf = bytearray()

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    @classmethod
    async def connect_tls(cls, port: int, cafile: Path) -> RawClient:
        """TLS with Python's ``ssl`` (an implementation other than the server's pyOpenSSL)."""
        ctx = ssl.create_default_context(cafile=str(cafile))
        stream = trio.SSLStream(
            await trio.open_tcp_stream("127.0.0.1", port), ctx, server_hostname="localhost"
        )
        await stream.do_handshake()
        return cls(stream)

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _fill(self) -> bool:
        try:
            data = await self.stream.receive_some(65536)
        except trio.BrokenResourceError:
            data = b""
        self.buf += data
        return bool(data)

    async def _line(self) -> bytes:
        while (i := self.buf.find(b"\r\n")) < 0:
            if not await self._fill():
                raise EOFError("connection closed while reading a line")
        line = bytes(self.buf[:i])
        del self.buf[: i + 2]
        return line

    async def _exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not await self._fill():
                raise EOFError("connection closed inside a body")
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    async def read_response(self, *, head: bool = False) -> RawResponse:
        status_line = await self._line()
        version, status, *reason = status_line.split(b" ", 2)
        assert version == b"HTTP/1.1", status_line
        headers = []
        while line := await self._line():
            name, _, value = line.partition(b":")
            headers.append((name.strip().lower(), value.strip()))
        resp = RawResponse(int(status), reason[0] if reason else b"", headers, b"")
        if resp.status < 200 or head or resp.status in (204, 304):
            return resp
        length = resp.header(b"content-length")
        if resp.header(b"transfer-encoding") == b"chunked":
            parts = []
            while True:
                size = int((await self._line()).split(b";")[0], 16)
                if size == 0:
                    while await self._line():
                        pass
                    break
                parts.append(await self._exactly(size))
                resp.chunk_sizes.append(size)
                assert await self._line() == b""
            resp.body = b"".join(parts)
        elif length is not None:
            resp.body = await self._exactly(int(length))
        else:
            while await self._fill():
                pass
            resp.body, self.buf = bytes(self.buf), bytearray()
        return resp

    async def closed_by_peer(self) -> bool:
        """True if the server closed (EOF or reset) with nothing more to read."""
        if self.buf:
            return False
        return not await self._fill()

    async def aclose(self) -> None:
        await self.stream.aclose()


def get(path: str = "/", extra: bytes = b"", method: bytes = b"GET") -> bytes:
    return method + b" " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n" + extra + b"\r\n"


@asynccontextmanager
async def running_server(
    handler: Any,
    *,
    limits: HTTPLimits | None = None,
    shutdown_grace: float = 10.0,
    on_request_done: Any = None,
) -> AsyncIterator[tuple[HTTPServer, int]]:
    """An HTTPServer on 127.0.0.1:<ephemeral>; shut down (gracefully) on exit."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    server = HTTPServer(
        handler, limits=limits, shutdown_grace=shutdown_grace, on_request_done=on_request_done
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, listeners)
        try:
            yield server, port
        finally:
            server.shutdown()


def make_pki(directory: Path) -> DevPKI:
    return make_dev_pki(directory, mldsa=False)


@asynccontextmanager
async def running_tls_server(
    handler: Any, pki: DevPKI, *, limits: HTTPLimits | None = None
) -> AsyncIterator[tuple[HTTPServer, int]]:
    """An HTTPServer behind our TLSStream on 127.0.0.1:<ephemeral>, as the gateway serves."""
    ctx: SSL.Context = build_server_context(TLSSettings(cert_file=pki.server_cert, key_file=pki.server_key))
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    server = HTTPServer(handler, limits=limits, stream_wrapper=lambda s: TLSStream(s, ctx, server_side=True))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, listeners)
        try:
            yield server, port
        finally:
            server.shutdown()


async def echo_info(request: Request) -> Response:
    """Handler used by most tests: reports what it saw."""
    if request.path == "/body":
        body = await request.read_body()
        return Response.json(200, {"len": len(body), "body": body.decode("latin-1")})
    return Response.json(
        200,
        {
            "method": request.method,
            "path": request.path,
            "query": request.query,
            "request_id": request.request_id,
            "client_request_id": request.client_request_id,
        },
    )
