"""Sidecar forwarding client over HTTP/2: ``upstream.protocol: h2`` (TLS, ALPN h2, to an
``https://`` upstream) or ``h2c`` (cleartext with prior knowledge, to an ``http://`` one), over
trio, with h2 (python-hyper's sans-I/O HTTP/2, the sibling of h11).

Theory of operation
-------------------
**Many streams, few connections.** ``H2UpstreamClient`` keeps up to ``max_connections``
connections to one upstream and opens each request as a *stream* on one of them: the first
whose peer still allows another concurrent stream (its ``SETTINGS_MAX_CONCURRENT_STREAMS``),
else a new connection (one connect at a time), else the request waits for a stream to end. That
wait and the connect together are bounded by ``connect_timeout`` (504, as for HTTP/1.1).

**One connection = one ``h2`` state machine and two tasks** (``_h2connection.py``): a reader
that dispatches frames to per-stream state and a writer that alone writes to the socket.

**One exchange = one stream, two directions at once.** ``send()`` sends the request HEADERS,
starts a *pump* task (in the client's nursery) that streams the request body as DATA frames and
ends the stream when the body ends, and returns as soon as the response HEADERS arrived -
possibly long before the request body is finished, which is what a bidirectional gRPC call
needs. The response body is then pulled with ``resp.body_chunks()`` and the trailers read with
``resp.trailers()`` once the body has ended (a gRPC server's ``grpc-status``).

**Flow control, both ways.** Receiving: each stream may have at most ``stream_window`` bytes
of response body buffered (our ``SETTINGS_INITIAL_WINDOW_SIZE``), the connection at most
``connection_window``; a chunk's bytes are acknowledged (WINDOW_UPDATE) only when the consumer
takes it from the stream's queue, so a slow downstream client slows the upstream down instead
of filling our memory. Sending: the pump sends no more than the peer's window allows and waits
for its WINDOW_UPDATE otherwise (an upstream that stops reading for ``read_timeout`` is a 504).

**Timeouts** are those of the HTTP/1.1 client: while the request body is still being uploaded
the response has no deadline (a slow client is not the upstream's fault); from the end of the
upload on, the response head and each next body chunk must come within ``read_timeout``.

**Refused streams are sent again**, once: a stream the upstream did
not process at all (above a GOAWAY's ``last_stream_id``, or reset with ``REFUSED_STREAM``, RFC
9113 section 8.7) when its body is bytes or an iterator nothing was pulled from yet - what an
upstream's graceful restart does to a call that raced with it.

**Ending.** A stream whose response was read to its end, or which the caller ``aclose()``s, is
forgotten; if it is still open either way, it is reset with ``CANCEL`` (and its pump
cancelled). An ``RST_STREAM`` from the upstream fails that stream only: the response head wait
or the body iterator raises ``UpstreamUnavailable``. A ``GOAWAY`` stops new streams on its
connection; streams up to its ``last_stream_id`` finish (see ``_h2connection.py``),
later ones fail with 502. A broken connection fails all its streams. Errors are mapped where
the HTTP/1.1 client maps them (``_connection.io_step``): connect and TLS failures are 502
``upstream_unavailable``, expired deadlines 504 ``upstream_timeout``, a protocol violation by
the upstream 502 ``upstream_bad_response``.

**Header hygiene on HTTP/2** (RFC 9113 section 8.2): every name is lower case, the
connection-specific fields (``connection``, ``keep-alive``, ``proxy-connection``,
``transfer-encoding``, ``upgrade``) are never sent, ``te`` only as ``te: trailers`` (gRPC
requires it), ``host`` becomes ``:authority``. Response headers lose the same fields;
``grpc-*`` headers and trailers pass untouched.
"""

from __future__ import annotations

import contextlib
import math
import re
import ssl
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import Literal, Self

import h2.errors
import h2.exceptions
import trio

from qpher_proxy.errors import (
    BadRequest,
    ConfigError,
    UpstreamBadResponse,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from qpher_proxy.upstream._connection import io_step
from qpher_proxy.upstream._h2connection import (
    CONNECTION_SPECIFIC,
    STREAM_RESET,
    Headers,
    StreamNotProcessed,
    StreamState,
    UpstreamH2Connection,
)
from qpher_proxy.upstream._lifetime import BodyIterator, NurseryClient
from qpher_proxy.upstream.client import (
    DEFAULT_CHUNK_BYTES,
    Body,
    UpstreamTarget,
    _client_tls_context,
    _framed_body,
)

__all__ = [
    "CONNECTION_SPECIFIC",
    "DEFAULT_CONNECTION_WINDOW",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_STREAM_WINDOW",
    "H2UpstreamClient",
    "H2UpstreamResponse",
]

KiB = 1024
MiB = 1024 * KiB

#: Connections kept to the upstream; each carries up to the peer's SETTINGS_MAX_CONCURRENT_STREAMS
#: streams (grpc-go and grpc C-core allow 100 or more), so a few are plenty for one sidecar.
DEFAULT_MAX_CONNECTIONS = 4
#: Response body bytes buffered per stream before the consumer reads (our INITIAL_WINDOW_SIZE;
#: the RFC default is 64 KiB, which caps one stream at 64 KiB per round trip).
DEFAULT_STREAM_WINDOW = 1 * MiB
#: Response body bytes buffered per connection, all streams together.
DEFAULT_CONNECTION_WINDOW = 16 * MiB
#: Response header block we accept (SETTINGS_MAX_HEADER_LIST_SIZE), as the HTTP/1.1 client's head.
DEFAULT_MAX_HEADER_LIST_BYTES = 64 * KiB

Protocol = Literal["h2", "h2c"]

# RFC 9110 section 5.1 (a token, lower case on HTTP/2) and RFC 9113 section 8.2.1 (no NUL, CR or
# LF in a value, no leading or trailing whitespace): h2 checks less than this before sending.
_FIELD_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")
_FIELD_VALUE = re.compile(rb"(?:[^\x00\r\n \t](?:[^\x00\r\n]*[^\x00\r\n \t])?)?")

#: The fields of a gRPC status (grpc/doc/PROTOCOL-HTTP2.md, "Trailers").
_GRPC_STATUS_FIELDS = frozenset({b"grpc-status", b"grpc-message", b"grpc-status-details-bin"})

# ---- the client -------------------------------------------------------------------------

class H2UpstreamClient(NurseryClient):
    """HTTP/2 client for the sidecar's upstream. Use inside ``async with client:``."""

    _what = "H2UpstreamClient"

    def __init__(
        self,
        url: str,
        *,
        protocol: Protocol = "h2c",
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        ca_file: str | None = None,
        client_cert: str | None = None,
        client_key: str | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        stream_window: int = DEFAULT_STREAM_WINDOW,
        connection_window: int = DEFAULT_CONNECTION_WINDOW,
        max_header_list_bytes: int = DEFAULT_MAX_HEADER_LIST_BYTES,
    ) -> None:
        self.target = UpstreamTarget.from_url(url)
        self.protocol = protocol
        want = {"h2": "https", "h2c": "http"}.get(protocol)
        if want is None:
            raise ConfigError(f"upstream.protocol: expected h2 or h2c, not {protocol!r}")
        if self.target.scheme != want:
            raise ConfigError(f"upstream.protocol: {protocol} needs an {want}:// upstream.url, "
                              f"not {self.target.scheme}://")
        if (max_connections < 1 or chunk_bytes < 1 or connect_timeout <= 0 or read_timeout <= 0
                or not 65_535 <= stream_window <= 2**31 - 1 or not 65_535 <= connection_window <= 2**31 - 1):
            raise ConfigError("upstream: max_connections, chunk_bytes, windows and timeouts must be positive")
        if client_key is not None and client_cert is None:
            raise ConfigError("upstream.client_key is set without upstream.client_cert")
        self._tls: ssl.SSLContext | None = None
        if protocol == "h2":
            self._tls = _client_tls_context(ca_file, client_cert, client_key)
            self._tls.set_alpn_protocols(["h2"])
        elif ca_file is not None or client_cert is not None:
            raise ConfigError("upstream.ca_file/client_cert are set but upstream.url is not https")
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_connections = max_connections
        self.chunk_bytes = chunk_bytes
        self.stream_window = stream_window
        self.connection_window = connection_window
        self.max_header_list_bytes = max_header_list_bytes
        self._scheme = self.target.scheme.encode("ascii")

        self._conns: list[UpstreamH2Connection] = []
        self._connecting = False
        self._capacity = trio.Event()
        self.connections_opened = 0
        super().__init__()

    # -- lifetime ------------------------------------------------------------------------

    def _close_all(self) -> None:
        conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()

    # -- the pool ------------------------------------------------------------------------

    def _capacity_changed(self) -> None:
        self._capacity.set()

    def _forget(self, conn: UpstreamH2Connection) -> None:
        if conn in self._conns:
            self._conns.remove(conn)
        self._capacity_changed()

    def _forget_if_idle(self, conn: UpstreamH2Connection) -> None:
        """A connection that got GOAWAY is closed once its last stream has ended."""
        if conn.goaway and not conn.streams:
            conn.close()
            self._forget(conn)

    async def _checkout(self, deadline: float) -> UpstreamH2Connection:
        """A connection that can take one more stream now; connects one if none can."""
        while True:
            for conn in self._conns:
                if conn.has_capacity():
                    return conn
            if not self._connecting and len(self._conns) < self.max_connections:
                self._connecting = True
                try:
                    conn = await self._connect(deadline)
                finally:
                    self._connecting = False
                    self._capacity_changed()
                self._conns.append(conn)
                continue
            with io_step("pool", deadline):
                if self._capacity.is_set():
                    self._capacity = trio.Event()
                await self._capacity.wait()

    async def _connect(self, deadline: float) -> UpstreamH2Connection:
        assert self._nursery is not None
        with io_step("connect", deadline):
            raw = await trio.open_tcp_stream(self.target.host, self.target.port)
        try:
            stream: trio.abc.Stream = raw
            if self._tls is not None:
                tls = trio.SSLStream(raw, self._tls, server_hostname=self.target.host, https_compatible=True)
                with io_step("tls", deadline):
                    await tls.do_handshake()
                if tls.selected_alpn_protocol() != "h2":
                    raise UpstreamUnavailable("the upstream did not negotiate h2 in the tls handshake")
                stream = tls
            conn = UpstreamH2Connection(self, stream, raw)
            conn.start(self._nursery)
        except BaseException:
            raw.socket.close()
            raise
        self.connections_opened += 1
        return conn

    # -- requests ------------------------------------------------------------------------

    async def send(
        self,
        method: bytes | str,
        target: bytes | str,
        headers: Iterable[tuple[bytes, bytes]],
        body: Body = None,
        content_length: int | None = None,
    ) -> H2UpstreamResponse:
        """Open a stream and send one request on it; return once the response head has arrived.

        As ``UpstreamClient.send``: ``headers`` already cleaned by ``prepare_upstream_headers``
        (with ``keep_te_trailers``), the body as bytes or an async iterator (streamed until it
        ends, which ends the stream). The response must be ``aclose()``d or read to its end."""
        if self._nursery is None or self._closed:
            raise RuntimeError("H2UpstreamClient.send() needs the client entered with 'async with'")
        method_b, target_b = self._request_line(method, target)
        data, content_length = _framed_body(method_b, body, content_length)
        block = self._header_block(method_b, target_b, headers, content_length)
        deadline = trio.current_time() + self.connect_timeout
        for attempt in (1, 2):
            conn = await self._checkout(deadline)
            resp = H2UpstreamResponse(self, conn)
            try:
                await resp._start(block, data)
                return resp
            except StreamNotProcessed:
                resp._finish()
                # Once more, if the body can be sent again: bytes, or an
                # iterator nothing was pulled from yet.
                if attempt == 2 or resp._body_pulled:
                    raise
            except BaseException:
                resp._finish()
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _request_line(self, method: bytes | str, target: bytes | str) -> tuple[bytes, bytes]:
        try:
            method_b = method.encode("ascii") if isinstance(method, str) else bytes(method)
            target_b = target.encode("ascii") if isinstance(target, str) else bytes(target)
        except UnicodeEncodeError as exc:
            raise BadRequest("the request method and target must be ASCII") from exc
        if method_b.upper() == b"CONNECT":
            raise BadRequest("CONNECT is not forwarded to the upstream")
        if not target_b.startswith(b"/"):
            raise BadRequest("only origin-form request targets are forwarded")
        return method_b, self.target.path_prefix + target_b

    def _header_block(self, method: bytes, target: bytes, headers: Iterable[tuple[bytes, bytes]],
                      content_length: int | None) -> Headers:
        authority: bytes | None = None
        fields: Headers = []
        for name, value in headers:
            lname = name.lower()
            if lname == b"host":
                authority = authority or value
            elif lname in CONNECTION_SPECIFIC or lname == b"content-length" or lname[:1] == b":":
                continue  # framing is h2's; pseudo-headers are ours
            elif lname == b"te" and value.strip(b" \t").lower() != b"trailers":
                continue
            elif _FIELD_NAME.fullmatch(lname) and _FIELD_VALUE.fullmatch(value):
                fields.append((lname, value))
            else:
                raise BadRequest("the request cannot be forwarded: invalid header field")
        block = [(b":method", method), (b":scheme", self._scheme),
                 (b":authority", authority or self.target.authority), (b":path", target)]
        block += fields
        if content_length is not None:
            block.append((b"content-length", str(content_length).encode("ascii")))
        return block

    @contextlib.asynccontextmanager
    async def request(
        self,
        method: bytes | str,
        target: bytes | str,
        headers: Iterable[tuple[bytes, bytes]],
        body: Body = None,
        content_length: int | None = None,
    ) -> AsyncIterator[H2UpstreamResponse]:
        """``send()`` as a context manager that always releases the response."""
        resp = await self.send(method, target, headers, body, content_length)
        try:
            yield resp
        finally:
            await resp.aclose()


# ---- one exchange -----------------------------------------------------------------------

class H2UpstreamResponse:
    """The response on one stream, and the exchange that produces it.

    ``status``, ``reason`` (empty: HTTP/2 has none), ``http_version`` (``b"2"``), ``headers``
    (without pseudo-headers and connection-specific fields: pass them through
    ``prepare_downstream_headers``) and ``content_length`` are set when ``send()`` returns.
    ``body_chunks()`` yields the body as it arrives; ``trailers()`` gives the trailer fields
    once it has ended (``[]`` before, or when there were none); ``aclose()`` ends the stream."""

    status: int
    reason: bytes = b""
    http_version: bytes = b"2"
    headers: Headers
    content_length: int | None

    def __init__(self, client: H2UpstreamClient, conn: UpstreamH2Connection) -> None:
        self._client = client
        self._conn = conn
        self._st: StreamState | None = None
        self._upload_done = False
        self._pump_scope: trio.CancelScope | None = None
        self._recv_scope: trio.CancelScope | None = None
        self._abort: BaseException | None = None  # the caller's body iterator failed
        self._body_pulled = False  # the pump has asked the caller's body iterator for a chunk
        self._finished = False
        self._body = BodyIterator(self)

    # -- what the caller uses -----------------------------------------------------------

    def body_chunks(self) -> AsyncIterator[bytes]:
        """The response body; exhausting it ends the exchange. One iterator per response."""
        return self._body

    def trailers(self) -> list[tuple[bytes, bytes]]:
        """The trailer fields the upstream sent after the body (``grpc-status``, ...)."""
        return list(self._st.trailers) if self._st is not None and self._st.ended else []

    async def aclose(self) -> None:
        """End the exchange; a stream still open is reset. Idempotent, safe under cancellation."""
        self._finish()
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<H2UpstreamResponse status={getattr(self, 'status', None)} finished={self._finished}>"

    # -- the exchange -------------------------------------------------------------------

    async def _start(self, block: Headers, body: memoryview | AsyncIterable[bytes] | None) -> None:
        conn = self._conn
        sid = conn.h2.get_next_available_stream_id()
        try:
            conn.h2.send_headers(sid, block, end_stream=body is None)
        except h2.exceptions.ProtocolError as exc:  # h2 validates every field
            raise BadRequest("the request cannot be forwarded: invalid method, target or header") from exc
        st = self._st = conn.streams[sid] = StreamState(sid)
        conn.kick()
        if body is None:
            self._upload_done = True
        else:
            self._pump_scope = trio.CancelScope()
            nursery = self._client._nursery
            assert nursery is not None
            nursery.start_soon(self._pump, body)
        while st.head is None:
            await self._wait("head")
        head = st.head
        status = next((v for n, v in head if n == b":status"), b"")
        if not status.isdigit():
            raise UpstreamBadResponse("the upstream sent an invalid response")
        self.status = int(status)
        self.headers = [(n, v) for n, v in head if n[:1] != b":" and n not in CONNECTION_SPECIFIC]
        if st.ended and not st.chunks and not st.trailers:
            self.headers, st.trailers = _split_trailers_only(self.headers)
        self.content_length = None
        for n, v in self.headers:
            if n == b"content-length" and v.isdigit():
                self.content_length = int(v)

    async def _wait(self, phase: str) -> None:
        """Wait for the stream's next event; raise what ended it, or a timeout."""
        st = self._st
        assert st is not None
        if self._abort is not None:
            raise self._abort
        if st.error is not None:
            raise st.error
        deadline = math.inf if not self._upload_done else trio.current_time() + self._client.read_timeout
        try:
            with io_step(phase, deadline) as scope:
                self._recv_scope = scope
                await st.wait()
        finally:
            self._recv_scope = None

    async def _next_chunk(self) -> bytes | None:
        """The next piece of the body, or None at its end."""
        st = self._st
        assert st is not None
        while True:
            if st.chunks:
                data, n = st.chunks.popleft()
                if n and self._conn.dead is None:
                    self._conn.h2.acknowledge_received_data(n, st.id)
                    self._conn.kick()
                return data
            if st.ended:
                return None
            await self._wait("body")

    async def _pump(self, body: memoryview | AsyncIterable[bytes]) -> None:
        """Send the request body and end the stream (runs in the client's nursery; never raises)."""
        scope = self._pump_scope
        assert scope is not None and self._st is not None
        with scope:
            if scope.cancel_called:
                return  # the exchange ended before we ran: leave the caller's iterator untouched
            iterator: AsyncIterator[bytes] | None = None
            exhausted = False
            try:
                if isinstance(body, memoryview):
                    await self._send_data(body)
                else:
                    iterator = aiter(body)
                    while True:
                        self._body_pulled = True
                        try:
                            chunk = await anext(iterator)
                        except StopAsyncIteration:
                            exhausted = True
                            break
                        await self._send_data(memoryview(chunk).cast("B"))
                self._conn.h2.end_stream(self._st.id)
                await self._conn.flush()
                self._upload_done = True
                self._start_read_deadline()
            except UpstreamTimeout as exc:
                # The upstream opened no window for read_timeout: the call cannot go on.
                self._abort_with(exc)
            except (UpstreamError, h2.exceptions.ProtocolError):
                # The stream or the connection ended (the response says why), or the upstream
                # answered before reading the whole body: the reader sees it.
                self._upload_done = True
                self._start_read_deadline()
            except Exception as exc:
                # The caller's body iterator failed (the client went away, ...): reset the
                # stream and hand the exception to the task reading the response.
                self._abort_with(exc)
            finally:
                try:
                    if iterator is not None and not exhausted and hasattr(iterator, "aclose"):
                        await trio.aclose_forcefully(iterator)  # type: ignore[arg-type]
                except Exception as exc:
                    self._abort_with(exc)

    async def _send_data(self, data: memoryview) -> None:
        conn = self._conn
        st = self._st
        assert st is not None
        while data:
            if st.error is not None or conn.dead is not None:
                raise st.error or conn.dead or UpstreamUnavailable(STREAM_RESET)
            window = min(conn.h2.local_flow_control_window(st.id), conn.h2.max_outbound_frame_size,
                         self._client.chunk_bytes)
            if window <= 0:
                with io_step("send", trio.current_time() + self._client.read_timeout):
                    await conn.wait_for_window()
                continue
            conn.h2.send_data(st.id, bytes(data[:window]))
            data = data[window:]
            await conn.flush()

    def _abort_with(self, exc: BaseException) -> None:
        if self._abort is None:
            self._abort = exc
        self._reset()
        if self._st is not None:
            self._st.wake()

    def _start_read_deadline(self) -> None:
        if self._recv_scope is not None:
            self._recv_scope.deadline = min(self._recv_scope.deadline,
                                            trio.current_time() + self._client.read_timeout)

    def _reset(self) -> None:
        """Reset the stream if h2 still has it open (synchronous; the writer sends the frame)."""
        st = self._st
        conn = self._conn
        if st is None or conn.dead is not None:
            return
        stream = conn.h2.streams.get(st.id)
        if stream is not None and not stream.closed:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                conn.h2.reset_stream(st.id, h2.errors.ErrorCodes.CANCEL)
            conn.kick()

    async def _end_of_body(self) -> None:
        self._finish()

    def _fail(self) -> None:
        self._finish()

    def _finish(self) -> None:
        """End the exchange: cancel the pump, reset the stream if open, give back the window of
        unread data, forget the stream. Synchronous, so it cannot be cancelled half-way."""
        if self._finished:
            return
        self._finished = True
        if self._pump_scope is not None:
            self._pump_scope.cancel()
        conn = self._conn
        st = self._st
        if st is None:
            self._client._capacity_changed()
            return
        self._reset()
        if conn.dead is None:
            for _, n in st.chunks:
                if n:
                    conn.h2.acknowledge_received_data(n, st.id)
            conn.kick()
        st.chunks.clear()
        conn.streams.pop(st.id, None)
        self._client._capacity_changed()
        self._client._forget_if_idle(conn)


def _split_trailers_only(headers: Headers) -> tuple[Headers, Headers]:
    """A gRPC "trailers-only" response (one HEADERS frame with END_STREAM carrying
    ``grpc-status``) as headers plus trailers.

    The two forms mean the same to a gRPC client, but only the first frame of a response may
    carry the status in trailers-only form, and the downstream connection frames the response
    it is given as head, body and trailers: the status fields are handed on as trailers, which
    every gRPC client reads at the end of a stream."""
    if not any(n == b"grpc-status" for n, _ in headers):
        return headers, []
    status = [(n, v) for n, v in headers if n in _GRPC_STATUS_FIELDS]
    return [(n, v) for n, v in headers if n not in _GRPC_STATUS_FIELDS], status

