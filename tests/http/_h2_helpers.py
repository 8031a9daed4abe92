"""HTTP/2 test helpers: a server behind our TLSStream offering h2, an ``h2`` client and a raw-frame
client (hyperframe + hpack) for the frame patterns a well-behaved library refuses to send."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import hpack
import trio
from hyperframe.frame import Frame, GoAwayFrame, SettingsFrame

from qpher_proxy.http import HTTP2Limits, HTTPLimits, HTTPServer, SecurityHeaders
from qpher_proxy.tls import TLSSettings, TLSStream
from qpher_proxy.tls.certs import DevPKI
from qpher_proxy.tls.context import build_server_context

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class Observed:
    """An ``HTTP2Observer`` that remembers what it heard."""

    def __init__(self) -> None:
        self.connections = 0
        self.open = 0
        self.streams = 0
        self.goaways: list[tuple[str, str]] = []

    def connection_opened(self) -> None:
        self.connections += 1
        self.open += 1

    def connection_closed(self) -> None:
        self.open -= 1

    def stream_opened(self) -> None:
        self.streams += 1

    def goaway(self, code: str, reason: str) -> None:
        self.goaways.append((code, reason))


@asynccontextmanager
async def running_h2_server(
    handler: Any, pki: DevPKI, *, limits: HTTPLimits | None = None, h2_limits: HTTP2Limits | None = None,
    on_request_done: Any = None,
) -> AsyncIterator[tuple[HTTPServer, int, Observed]]:
    ctx = build_server_context(TLSSettings(cert_file=pki.server_cert, key_file=pki.server_key,
                                           alpn=("h2", "http/1.1")))
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    observed = Observed()
    server = HTTPServer(handler, limits=limits, stream_wrapper=lambda s: TLSStream(s, ctx, server_side=True),
                        security_headers=SecurityHeaders(), http2=h2_limits or HTTP2Limits(),
                        h2_observer=observed, on_request_done=on_request_done)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, listeners)
        try:
            yield server, port, observed
        finally:
            server.shutdown()


async def connect_tls(port: int, cafile: Path, alpn: Sequence[str] = ("h2",),
                      max_version: ssl.TLSVersion | None = None) -> trio.SSLStream[trio.SocketStream]:
    ctx = ssl.create_default_context(cafile=str(cafile))
    ctx.set_alpn_protocols(list(alpn))
    if max_version is not None:
        ctx.maximum_version = max_version
    stream = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), ctx, server_hostname="localhost")
    await stream.do_handshake()
    return stream


@dataclass
class Answer:
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    reset: int | None = None
    ended: bool = False

    def header(self, name: bytes) -> bytes | None:
        for n, v in self.headers:
            if n == name:
                return v
        return None

    @property
    def status(self) -> int:
        return int(self.header(b":status") or 0)


class H2Client:
    """A well-behaved client (python-hyper ``h2``) over a real TLS stream."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.h = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.answers: dict[int, Answer] = {}
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.eof = False

    @classmethod
    async def connect(cls, port: int, cafile: Path) -> H2Client:
        client = cls(await connect_tls(port, cafile))
        client.h.initiate_connection()
        await client.flush()
        return client

    async def flush(self) -> None:
        data = self.h.data_to_send()
        if data:
            await self.stream.send_all(data)

    async def request(self, method: str, path: str, headers: Sequence[tuple[bytes, bytes]] = (),
                      body: bytes | None = None) -> int:
        sid = self.h.get_next_available_stream_id()
        fields = [(b":method", method.encode()), (b":scheme", b"https"), (b":authority", b"localhost"),
                  (b":path", path.encode()), *headers]
        self.h.send_headers(sid, fields, end_stream=body is None)
        self.answers[sid] = Answer()
        if body is not None:
            await self.flush()
            await self.send_body(sid, body)
        await self.flush()
        return sid

    async def send_body(self, sid: int, body: bytes) -> None:
        view = memoryview(body)
        answer = self.answers[sid]
        while view:
            if answer.reset is not None:
                return  # the server answered and reset the stream: stop sending (RFC 9113 §8.1)
            size = min(self.h.local_flow_control_window(sid), self.h.max_outbound_frame_size, len(view))
            if size == 0:
                await self.pump()
                continue
            self.h.send_data(sid, view[:size].tobytes())
            view = view[size:]
            await self.flush()
        self.h.end_stream(sid)
        await self.flush()

    async def pump(self) -> None:
        """One receive, its events applied."""
        data = await self.stream.receive_some(65536)
        if not data:
            self.eof = True
            raise EOFError
        for ev in self.h.receive_data(data):
            sid = getattr(ev, "stream_id", None)
            answer = self.answers.get(sid) if sid else None
            if isinstance(ev, h2.events.ResponseReceived) and answer is not None:
                answer.headers = list(ev.headers)  # type: ignore[arg-type]
            elif isinstance(ev, h2.events.DataReceived) and answer is not None:
                answer.body += ev.data or b""
                self.h.acknowledge_received_data(ev.flow_controlled_length or 0, ev.stream_id or 0)
            elif isinstance(ev, h2.events.TrailersReceived) and answer is not None:
                answer.trailers = list(ev.headers)  # type: ignore[arg-type]
            elif isinstance(ev, h2.events.StreamEnded) and answer is not None:
                answer.ended = True
            elif isinstance(ev, h2.events.StreamReset) and answer is not None:
                answer.reset = int(ev.error_code or 0)
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.goaway = ev
        await self.flush()

    async def answer(self, sid: int) -> Answer:
        with trio.fail_after(10):
            while not (self.answers[sid].ended or self.answers[sid].reset is not None):
                await self.pump()
        return self.answers[sid]

    async def aclose(self) -> None:
        await _close(self.stream)


class RawH2:
    """Frames as bytes, both ways: for the patterns a well-behaved library will not send."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buf = bytearray()
        self.encoder = hpack.Encoder()

    @classmethod
    async def connect(cls, port: int, cafile: Path, settings: dict[int, int] | None = None) -> RawH2:
        raw = cls(await connect_tls(port, cafile))
        frame = SettingsFrame(0, settings=settings or {})
        await raw.stream.send_all(PREFACE + frame.serialize())
        return raw

    def headers_block(self, path: str = "/", extra: Sequence[tuple[bytes, bytes]] = ()) -> bytes:
        return self.encoder.encode([(b":method", b"GET"), (b":scheme", b"https"),
                                    (b":authority", b"localhost"), (b":path", path.encode()), *extra])

    async def send(self, *frames: Frame | bytes) -> None:
        await self.stream.send_all(b"".join(f if isinstance(f, bytes) else f.serialize() for f in frames))

    async def frames(self, until: type[Frame] = GoAwayFrame, timeout: float = 10) -> list[Frame]:
        """Frames received until one of type ``until`` (included), EOF or a broken stream."""
        out: list[Frame] = []
        with trio.fail_after(timeout):
            while True:
                while len(self.buf) >= 9:
                    frame, length = Frame.parse_frame_header(memoryview(bytes(self.buf[:9])))
                    if len(self.buf) < 9 + length:
                        break
                    frame.parse_body(memoryview(bytes(self.buf[9:9 + length])))
                    del self.buf[:9 + length]
                    out.append(frame)
                    if isinstance(frame, until):
                        return out
                try:
                    data = await self.stream.receive_some(65536)
                except (trio.BrokenResourceError, ssl.SSLError):
                    return out
                if not data:
                    return out
                self.buf += data

    async def aclose(self) -> None:
        await _close(self.stream)


async def _close(stream: trio.abc.Stream) -> None:
    """Close the TLS stream and, whatever state it is in (a peer that has gone leaves
    ``trio.SSLStream`` broken), its TCP socket too: never a socket left to the garbage collector."""
    await trio.aclose_forcefully(stream)
    transport = getattr(stream, "transport_stream", None)
    if transport is not None:
        await trio.aclose_forcefully(transport)


def goaway_of(frames: list[Frame]) -> GoAwayFrame | None:
    for f in frames:
        if isinstance(f, GoAwayFrame):
            return f
    return None
