"""Small real upstream servers on 127.0.0.1 for the sidecar client tests.

Each server is a trio task serving TCP (optionally TLS) with a handler; it counts accepted
connections so that tests can see pool reuse. Handlers are written with h11 (server role) or
raw bytes when the point is to misbehave.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

import h11
import trio

KiB = 1024
BLOCK = bytes(range(256)) * (64 * KiB // 256)  # one 64 KiB block, repeated lazily for big bodies


@dataclass
class Upstream:
    port: int
    scheme: str = "http"
    accepts: int = 0
    requests: list[tuple[bytes, bytes, list[tuple[bytes, bytes]]]] = field(default_factory=list)
    peer_certs: list[object] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"


Handler = Callable[[trio.abc.Stream, Upstream], Awaitable[None]]


@asynccontextmanager
async def serve_upstream(handler: Handler, *, tls: ssl.SSLContext | None = None) -> AsyncIterator[Upstream]:
    """Serve ``handler`` on an ephemeral 127.0.0.1 port until the block exits."""
    up: Upstream | None = None

    async def on_connection(stream: trio.SocketStream) -> None:
        assert up is not None
        up.accepts += 1
        conn: trio.abc.Stream = stream
        try:
            if tls is not None:
                conn = trio.SSLStream(stream, tls, server_side=True, https_compatible=True)
                await conn.do_handshake()
                up.peer_certs.append(conn.getpeercert())
            await handler(conn, up)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
            pass  # the client went away or (on purpose) spoke nonsense: that is its test's business
        finally:
            await trio.aclose_forcefully(conn)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, on_connection, 0, host="127.0.0.1"))
        up = Upstream(port=listeners[0].socket.getsockname()[1], scheme="https" if tls else "http")
        yield up
        nursery.cancel_scope.cancel()


class H11Peer:
    """The upstream's side of one connection, with h11 in the server role."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.SERVER)

    async def next_event(self) -> object:
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self.stream.receive_some(64 * KiB))
                continue
            return event

    async def send(self, event: object) -> None:
        data = self.conn.send(event)  # type: ignore[arg-type]
        if data:
            await self.stream.send_all(data)

    async def read_body(self, on_chunk: Callable[[bytes], None] | None = None) -> int:
        total = 0
        while True:
            event = await self.next_event()
            if isinstance(event, h11.Data):
                total += len(event.data)
                if on_chunk is not None:
                    on_chunk(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return total

    async def respond(
        self, status: int, body: bytes = b"", headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        hdrs = list(headers or [])
        if not any(n.lower() in (b"content-length", b"transfer-encoding") for n, _ in hdrs):
            hdrs.append((b"content-length", str(len(body)).encode()))
        await self.send(h11.Response(status_code=status, headers=hdrs))
        if body:
            await self.send(h11.Data(data=body))
        await self.send(h11.EndOfMessage())

    def next_cycle(self) -> bool:
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
            return True
        return False


RequestHandler = Callable[[H11Peer, h11.Request, Upstream], Awaitable[None]]


def keep_alive(respond: RequestHandler) -> Handler:
    """A connection handler that serves requests with ``respond`` until the connection ends."""

    async def handler(stream: trio.abc.Stream, up: Upstream) -> None:
        peer = H11Peer(stream)
        while True:
            event = await peer.next_event()
            if isinstance(event, h11.ConnectionClosed):
                return
            assert isinstance(event, h11.Request), event
            up.requests.append((bytes(event.method), bytes(event.target), list(event.headers)))
            await respond(peer, event, up)
            if not peer.next_cycle():
                return

    return handler


async def echo_request(peer: H11Peer, request: h11.Request, up: Upstream) -> None:
    """Answer with JSON describing the request (method, target, headers, body length)."""
    length = await peer.read_body()
    doc = {
        "method": request.method.decode(),
        "target": request.target.decode(),
        "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in request.headers],
        "body_length": length,
    }
    await peer.respond(200, json.dumps(doc).encode(), [(b"content-type", b"application/json")])


async def echo_body(peer: H11Peer, request: h11.Request, up: Upstream) -> None:
    """Stream the request body back as the response body, each piece as soon as it is read."""
    await peer.send(h11.Response(status_code=200, headers=[(b"transfer-encoding", b"chunked")]))
    while True:
        event = await peer.next_event()
        if isinstance(event, h11.Data):
            await peer.send(h11.Data(data=event.data))
        else:
            assert isinstance(event, h11.EndOfMessage)
            await peer.send(h11.EndOfMessage())
            return


async def lazy_body(total: int, counter: list[int] | None = None) -> AsyncIterator[bytes]:
    """``total`` bytes as repeated 64 KiB blocks, produced on demand (``counter[0]`` = produced)."""
    sent = 0
    while sent < total:
        piece = BLOCK if total - sent >= len(BLOCK) else BLOCK[: total - sent]
        sent += len(piece)
        if counter is not None:
            counter[0] = sent
        yield piece


def free_port() -> int:
    """A port on 127.0.0.1 that was just bound and closed: connecting to it is refused."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
