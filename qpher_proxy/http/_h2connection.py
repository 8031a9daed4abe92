"""One HTTP/2 connection: a thin trio loop around one ``h2.connection.H2Connection``.

Theory of operation
-------------------
``h2`` owns the protocol (framing, HPACK, stream states, flow-control arithmetic) and does no
I/O: bytes go in through ``receive_data`` and come back as events, and everything we ``send_*``
is queued until ``data_to_send()``. This module is the loop around it, the same shape as the
HTTP/1.1 ``Connection`` around h11, and it serves the same ``Handler``: a stream becomes the
same ``Request`` (``http_version`` "2"; ``method``, ``target``, ``path``, ``query`` from
``:method`` and ``:path``; lower-case headers without pseudo-headers and with ``host`` from
``:authority``), its response goes out with the same validated headers and security headers,
and ``on_request_done`` sees it as it sees an HTTP/1.1 exchange. So authentication, rate limits,
policy and audit apply per stream with no code of their own.

Tasks. One task reads: it receives from the transport, feeds ``h2`` and acts on the events
(starts a stream, hands DATA to the stream's body queue, wakes a stream waiting for window,
cancels a reset stream, counts frames for the flood guard). Each stream runs in its own task,
in its own cancel scope, in the connection's nursery: it calls the handler and writes the
response. Whoever queued frames in ``h2`` sends them (:meth:`_flush`), under one FIFO lock:
the holder sends until ``h2`` has nothing left, so bytes leave in the order ``h2`` made them and
a writer returns only once its frames reached the transport (backpressure: a client that does
not read stops the writers, and ``send_timeout`` ends the connection).

Flow control, both ways. Inbound, a stream's DATA waits in its queue until the handler reads
it, and only then is it acknowledged (``acknowledge_received_data``: ``h2`` sends WINDOW_UPDATE
once half a window is consumed). So a stream buffers at most ``initial_window_size`` bytes and a
connection at most ``connection_window_size``; a client that sends past a window breaks the
protocol (FLOW_CONTROL_ERROR). A body the handler leaves unread is dropped when its response is
done: RST_STREAM NO_ERROR (RFC 9113 §8.1) and the queued bytes acknowledged for the connection.
Outbound, a response body is cut to the stream's and the connection's send window and the
frame size; with no window the stream waits for WINDOW_UPDATE (at most ``send_timeout``, then
the stream is reset with CANCEL).

Deadlines (the ``DeadlineWheel`` of ``_deadlines.py``): ``header_timeout`` from the handshake
to the first request, ``idle_timeout`` while no stream is open, ``send_timeout`` per
transport send; none while streams run (the handlers own their timeouts), ``body_timeout`` per
wait of a stream for its body. An idle connection is closed with GOAWAY NO_ERROR.

Graceful shutdown: GOAWAY NO_ERROR naming the last stream we accepted (sent as a raw frame,
because ``h2`` refuses to send anything after its own GOAWAY); later streams are refused
(REFUSED_STREAM, safe to retry elsewhere), streams in flight finish, then the connection
closes; the server cancels what is left after its grace.

Protections against abusive peers: see ``_h2guard.py`` (the table of bounds and GOAWAY codes).
Each GOAWAY is reported to the ``HTTP2Observer`` (metrics) with its code and a reason from a
closed set; nothing from the client reaches a label.

gRPC: a refused request with ``content-type: application/grpc...`` gets a trailers-only answer
(``grpc.py``); a response with ``trailers`` ends its stream with them (``grpc-status``).

WebSocket over HTTP/2 (RFC 8441): SETTINGS_ENABLE_CONNECT_PROTOCOL is 1, and an extended CONNECT
with ``:protocol websocket`` becomes the ``Request`` of an HTTP/1.1 opening handshake (``GET``,
``Connection``/``Upgrade``, version 13 and a key of our own: :func:`_websocket_upgrade_headers`),
so the gateway's WebSocket path serves it unchanged. Its ``Response(101, upgrade=...)`` is
answered with ``:status 200`` (the 101's end-to-end fields, no ``Sec-WebSocket-Accept``), then the
upgrade runs on the stream as a byte stream (:class:`_TunnelStream`), or is abandoned if the 200
cannot be sent: exactly one of the two. A tunnel's stream is not cancelled by a client reset (its
reads and writes break instead, the tunnel ends with ``client``), only by a graceful shutdown. A
2xx that is not an upgrade is refused (the client would take it for an open tunnel); another
``:protocol`` is 501.
"""

from __future__ import annotations

import base64
import collections
import logging
import os
import time
from collections.abc import AsyncIterable, AsyncIterator
from typing import TYPE_CHECKING, Protocol

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import hpack
import trio
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame

from .._json import http_date
from ..errors import (
    BadRequest,
    BodyTooLarge,
    ClientDisconnected,
    MethodNotAllowed,
    NotFound,
    QpherError,
    UpstreamBadResponse,
)
from . import grpc
from ._deadlines import NO_DEADLINE, DeadlineWheel, ShutdownSignal
from ._h2encoder import CachingEncoder
from ._h2guard import BoundedFrameBuffer, FloodGuard, MalformedRequest, parse_request_head
from ._response import _aclose_body, _response_items, _validated_item
from .limits import RECEIVE_SIZE, HTTP2Limits, HTTPLimits
from .messages import REQUEST_ID_HEADER, Request, Response, Upgrade, error_response, new_request_id
from .security_headers import SecurityHeaders

if TYPE_CHECKING:
    from ..tls.engine import TLSInfo
    from ._connection import Handler, RequestDoneHook

__all__ = ["HTTP2Connection", "HTTP2Observer"]

logger = logging.getLogger("qpher.http")

_TRANSPORT_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError, QpherError)
_NO_BODY_STATUSES = frozenset({204, 304})
# Response fields HTTP/2 has no place for (RFC 9113 §8.2.2), besides those h11 framing owns
_CONNECTION_FIELDS = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                                b"upgrade", b"te", b"date"})
_TUNNEL_END_WAIT = 1.0  # seconds for the tunnels of a connection gone to close their upstream side
_GRPC_REFUSAL_STATUS = 400  # the proxy's own answers from here up become trailers-only for gRPC
# An extended CONNECT's 200 carries the upstream 101's end-to-end fields, never its handshake ones
# (RFC 8441 §5: no Sec-WebSocket-Key/-Accept over HTTP/2)
_TUNNEL_DROPPED = _CONNECTION_FIELDS | {b"sec-websocket-accept", b"content-length"}
_WEBSOCKET_CLIENT_FIELDS = frozenset({b"sec-websocket-key", b"sec-websocket-version"})


class HTTP2Observer(Protocol):
    """Where the connection reports what the metrics count (labels from closed sets only)."""

    def connection_opened(self) -> None: ...

    def connection_closed(self) -> None: ...

    def stream_opened(self) -> None: ...

    def goaway(self, code: str, reason: str) -> None: ...


class _NullObserver:
    def connection_opened(self) -> None:
        pass

    def connection_closed(self) -> None:
        pass

    def stream_opened(self) -> None:
        pass

    def goaway(self, code: str, reason: str) -> None:
        pass


class _Breach(Exception):
    """The peer broke a bound: GOAWAY with ``code``, counted under ``reason``."""

    def __init__(self, code: ErrorCodes, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class _Stream:
    """One request stream: its body queue, its window waits, its task's cancel scope."""

    __slots__ = ("id", "request", "scope", "chunks", "ended", "reset", "data_ready", "window_open",
                 "body_started", "body_read", "body_error", "bytes_sent", "grpc", "protocol", "refusal",
                 "tunnel", "finished")

    def __init__(self, stream_id: int) -> None:
        self.id = stream_id
        self.request: Request | None = None
        self.scope = trio.CancelScope()
        self.chunks: collections.deque[tuple[bytes, int]] = collections.deque()  # (data, flow length)
        self.ended = False  # END_STREAM received: the body is complete
        self.reset = False  # RST_STREAM received
        self.data_ready: trio.Event | None = None
        self.window_open: trio.Event | None = None
        self.body_started = False
        self.body_read = 0
        self.body_error: QpherError | None = None
        self.bytes_sent = 0
        self.grpc = False
        self.protocol: str | None = None  # ``:protocol`` of an extended CONNECT (RFC 8441)
        self.refusal: QpherError | None = None  # the answer to an extended CONNECT we cannot serve
        self.tunnel = False  # a WebSocket tunnel runs on the stream (``_TunnelStream``)
        self.finished = trio.Event()  # set when the stream is forgotten (``_finish_stream``)


class _BodyIterator:
    """``Request.body_chunks()`` of an HTTP/2 stream."""

    __slots__ = ("_conn", "_stream", "_limit")

    def __init__(self, conn: HTTP2Connection, stream: _Stream, limit: int | None) -> None:
        self._conn = conn
        self._stream = stream
        self._limit = limit

    def __aiter__(self) -> _BodyIterator:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._conn._read_chunk(self._stream, self._limit)
        if chunk is None:
            raise StopAsyncIteration
        return chunk


class _BodySource:
    """What a ``Request`` of an HTTP/2 stream reads its body through (``messages._BodySource``)."""

    __slots__ = ("_conn", "_stream")

    def __init__(self, conn: HTTP2Connection, stream: _Stream) -> None:
        self._conn = conn
        self._stream = stream

    async def _read_body(self, generation: int, max_bytes: int | None) -> bytes:
        parts: list[bytes] = []
        while (chunk := await self._conn._read_chunk(self._stream, max_bytes)) is not None:
            parts.append(chunk)
        return b"".join(parts)

    def _body_chunks(self, generation: int, max_bytes: int | None) -> AsyncIterator[bytes]:
        return _BodyIterator(self._conn, self._stream, max_bytes)


class HTTP2Connection:
    """Serves HTTP/2 on a stream whose TLS handshake negotiated ``h2``. See the module docstring."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        handler: Handler,
        limits: HTTPLimits,
        h2_limits: HTTP2Limits,
        client_addr: str,
        on_done: RequestDoneHook | None,
        shutdown: ShutdownSignal | None,
        security: SecurityHeaders | None = None,
        observer: HTTP2Observer | None = None,
    ) -> None:
        self._stream = stream
        self._handler = handler
        self._limits = limits
        self._h2_limits = h2_limits
        self._client_addr = client_addr
        self._on_done = on_done
        self._shutdown = shutdown
        self._security = security
        self._observer: HTTP2Observer = observer or _NullObserver()
        self._tls: TLSInfo | None = getattr(stream, "info", None)
        config = h2.config.H2Configuration(
            client_side=False, header_encoding=None, validate_inbound_headers=False,
            normalize_inbound_headers=True,
            # every field we send was validated (``_response_items``, ``_validated_item``: lower-case
            # tokens, clean values) and connection-specific ones dropped, so h2's second pass is off
            validate_outbound_headers=False, normalize_outbound_headers=False,
        )
        h = self._h = h2.connection.H2Connection(config=config)
        h.encoder = CachingEncoder()  # the repeated fields of our responses encoded once (``_h2encoder``)
        h.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: h2_limits.max_concurrent_streams,
            h2.settings.SettingCodes.HEADER_TABLE_SIZE: h2_limits.header_table_size,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: h2_limits.initial_window_size,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_bytes,
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
            # RFC 8441: WebSocket over an extended CONNECT (a gateway without an upstream answers it
            # as it answers any GET it does not serve)
            h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL: 1,
        })
        # The settings above are in force from the first frame (initial values, no ACK awaited);
        # the decoder and the frame buffer take theirs directly.
        h.decoder.max_header_list_size = limits.max_header_bytes
        h.decoder.max_allowed_table_size = h2_limits.header_table_size
        frames = BoundedFrameBuffer(max_continuation_frames=h2_limits.max_continuation_frames,
                                    max_header_bytes=limits.max_header_bytes)
        frames.max_frame_size = h.max_inbound_frame_size
        h.incoming_buffer = frames
        self._guard = FloodGuard(h2_limits.flood_window, h2_limits.max_resets_per_window,
                                 h2_limits.max_control_frames_per_window, trio.current_time())
        self._streams: dict[int, _Stream] = {}
        self._send_lock = trio.StrictFIFOLock()
        self._raw_out = b""  # frames h2 will not send for us (the graceful GOAWAY)
        self._scope = trio.CancelScope()
        self._read_scope = trio.CancelScope()
        self._deadline = NO_DEADLINE
        self._closing = False  # GOAWAY sent (shutdown) or received: no new streams
        self._last_stream_id = 0
        self._goaway_sent = False
        self._broken = False  # a send failed or timed out: nothing more can be sent
        self._started = trio.current_time()
        self._requests = 0
        self._nursery: trio.Nursery | None = None

    # ---- shutdown and deadlines ---------------------------------------------------------

    def _shutdown_requested(self) -> None:
        """GOAWAY NO_ERROR now; streams in flight finish, later ones are refused."""
        if self._closing:
            return
        self._closing = True
        if not self._goaway_sent:
            self._goaway_sent = True
            self._last_stream_id = self._h.highest_inbound_stream_id
            frame = GoAwayFrame(0)
            frame.last_stream_id = self._last_stream_id
            frame.error_code = ErrorCodes.NO_ERROR
            self._raw_out += frame.serialize()
            self._observer.goaway("NO_ERROR", "shutdown")
        if self._nursery is not None:
            self._nursery.start_soon(self._flush_quietly)
        for st in self._streams.values():
            if st.tunnel:
                st.scope.cancel()  # a WebSocket would outlive any grace: closed at once (``shutdown``)
        if not self._streams:
            self._read_scope.cancel()

    def _rest_deadline(self) -> None:
        """The deadline between sends: idle while no stream is open, none while streams run."""
        if self._streams:
            self._deadline = NO_DEADLINE
        elif not self._requests:
            self._deadline = self._started + self._limits.header_timeout  # the first request
        else:
            self._deadline = trio.current_time() + self._limits.idle_timeout

    # ---- sending ------------------------------------------------------------------------

    async def _flush(self) -> None:
        """Send everything ``h2`` (and the raw queue) holds; returns once it reached the transport."""
        async with self._send_lock:
            while True:
                data = self._raw_out + self._h.data_to_send()
                self._raw_out = b""
                if not data:
                    break
                # Shielded: the frames taken from h2 must reach the wire whole, or the stream
                # of frames (and the client's HPACK table) is corrupt, yet the caller may be a
                # stream task whose stream the client just reset. ``send_timeout`` bounds it.
                with trio.CancelScope(shield=True) as sending:
                    sending.deadline = trio.current_time() + self._limits.send_timeout
                    try:
                        await self._stream.send_all(data)
                    except _TRANSPORT_ERRORS as exc:
                        self._broken = True
                        self._scope.cancel()
                        raise ClientDisconnected("client disconnected") from exc
                if sending.cancelled_caught:
                    self._broken = True
                    self._scope.cancel()  # a client that does not read: the connection is over
                    raise ClientDisconnected("client did not read within send_timeout")
            self._rest_deadline()

    async def _flush_quietly(self) -> None:
        try:
            await self._flush()
        except ClientDisconnected:
            self._read_scope.cancel()

    # ---- the connection -----------------------------------------------------------------

    async def run(self, wheel: DeadlineWheel) -> None:
        shutdown = self._shutdown
        if shutdown is not None:
            shutdown._connections.add(self)
        wheel._connections.add(self)
        self._observer.connection_opened()
        self._rest_deadline()
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    await self._serve(nursery)
                    await self._end_tunnels()
                    self._nursery = None
                    nursery.cancel_scope.cancel()
            self._nursery = None
            if self._scope.cancelled_caught and not self._goaway_sent and not self._broken:
                # the idle (or send) deadline: say goodbye, bounded, before closing
                self._goaway(ErrorCodes.NO_ERROR, "idle")
                with trio.move_on_after(self._limits.linger_timeout):
                    await self._flush_quietly()
        finally:
            wheel._connections.discard(self)
            if shutdown is not None:
                shutdown._connections.discard(self)
            self._nursery = None
            self._streams.clear()
            self._observer.connection_closed()

    async def _end_tunnels(self) -> None:
        """The client's connection is gone: its tunnels see their streams broken (the reason
        ``client``, not ``shutdown``) and get a moment to close their upstream side."""
        tunnels = [st for st in self._streams.values() if st.tunnel]
        if not tunnels:
            return
        self._broken = True
        for st in tunnels:
            st.reset = True
            _wake(st.data_ready)
            _wake(st.window_open)
        with trio.move_on_after(_TUNNEL_END_WAIT):
            for st in tunnels:
                await st.finished.wait()

    async def _serve(self, nursery: trio.Nursery) -> None:
        h = self._h
        h.initiate_connection()
        extra = self._h2_limits.connection_window_size - 65_535
        if extra > 0:
            h.increment_flow_control_window(extra)
        if self._shutdown is not None and self._shutdown.is_set:
            self._shutdown_requested()
        try:
            await self._flush()
            while not (self._closing and not self._streams):
                with trio.CancelScope() as self._read_scope:
                    if self._closing and not self._streams:
                        break
                    try:
                        data = await self._stream.receive_some(RECEIVE_SIZE)
                    except _TRANSPORT_ERRORS:
                        return
                if self._read_scope.cancelled_caught:
                    continue
                if not data:
                    return  # EOF: the client left (streams in flight are cancelled)
                try:
                    events = h.receive_data(data)
                    for event in events:
                        self._on_event(event, nursery)
                except h2.exceptions.ProtocolError as exc:
                    # h2 queued GOAWAY with the code RFC 9113 assigns (PROTOCOL_ERROR,
                    # FLOW_CONTROL_ERROR, COMPRESSION_ERROR, ENHANCE_YOUR_CALM for a DoS pattern)
                    code = ErrorCodes(exc.error_code or ErrorCodes.PROTOCOL_ERROR)
                    if code is ErrorCodes.PROTOCOL_ERROR and isinstance(exc.__cause__, hpack.HPACKError):
                        code = self._compression_error()
                    self._goaway_sent = True
                    self._observer.goaway(code.name, _reason_of(exc, code))
                    await self._end_with_goaway()
                    return
                except _Breach as breach:
                    self._goaway(breach.code, breach.reason)
                    await self._end_with_goaway()
                    return
                # Most turns queue nothing (a request's HEADERS, DATA not yet acknowledged): skip
                # the lock and the checkpoint then (``receive_some`` was one). Relies on h2's
                # private ``_data_to_send`` buffer, which ``data_to_send()`` drains.
                if self._raw_out or h._data_to_send:
                    await self._flush()
                else:
                    self._rest_deadline()
            await self._flush()
        except ClientDisconnected:
            return

    def _compression_error(self) -> ErrorCodes:
        """A header block that does not decode is a COMPRESSION_ERROR (RFC 9113 §4.3), which
        h2 reports as PROTOCOL_ERROR: replace the GOAWAY it queued (nothing else queued matters
        now, the connection ends)."""
        self._h.data_to_send()
        frame = GoAwayFrame(0)
        frame.last_stream_id = self._h.highest_inbound_stream_id
        frame.error_code = ErrorCodes.COMPRESSION_ERROR
        self._raw_out += frame.serialize()
        return ErrorCodes.COMPRESSION_ERROR

    def _goaway(self, code: ErrorCodes, reason: str) -> None:
        self._goaway_sent = True
        self._closing = True
        try:
            self._h.close_connection(error_code=code)
        except h2.exceptions.ProtocolError:
            pass  # h2 already closed: nothing more can be sent
        self._observer.goaway(code.name, reason)

    async def _end_with_goaway(self) -> None:
        """Send the GOAWAY, then read and discard briefly (so that a RST provoked by unread
        client bytes cannot destroy the GOAWAY in flight), as the HTTP/1.1 lingering close."""
        for st in self._streams.values():
            st.scope.cancel()
        await self._flush()
        self._deadline = trio.current_time() + self._limits.linger_timeout
        stream = self._stream
        try:
            if isinstance(stream, trio.abc.HalfCloseableStream):
                await stream.send_eof()
            with trio.move_on_after(self._limits.linger_timeout):
                while await stream.receive_some(RECEIVE_SIZE):
                    pass
        except _TRANSPORT_ERRORS:
            pass

    # ---- events -------------------------------------------------------------------------

    def _on_event(self, event: h2.events.Event, nursery: trio.Nursery) -> None:
        kind = type(event)
        now = trio.current_time()
        if kind is h2.events.RequestReceived:
            self._on_request(event, nursery)  # type: ignore[arg-type]
        elif kind is h2.events.DataReceived:
            self._on_data(event)  # type: ignore[arg-type]
        elif kind is h2.events.StreamEnded:
            st = self._streams.get(event.stream_id)  # type: ignore[attr-defined]
            if st is not None:
                st.ended = True
                _wake(st.data_ready)
        elif kind is h2.events.StreamReset:
            st = self._streams.get(event.stream_id)  # type: ignore[attr-defined]
            if st is not None and event.remote_reset:  # type: ignore[attr-defined]
                st.reset = True
                if st.tunnel:  # the tunnel sees a broken stream and ends with ``client``
                    _wake(st.data_ready)
                    _wake(st.window_open)
                else:
                    st.scope.cancel()
            if event.remote_reset and self._guard.on_reset(now) is not None:  # type: ignore[attr-defined]
                raise _Breach(ErrorCodes.ENHANCE_YOUR_CALM, "rapid_reset")
        elif kind is h2.events.WindowUpdated:
            if event.stream_id == 0:  # type: ignore[attr-defined]
                for st in self._streams.values():
                    _wake(st.window_open)
            else:
                st = self._streams.get(event.stream_id)  # type: ignore[attr-defined]
                if st is not None:
                    _wake(st.window_open)
        elif kind is h2.events.PingReceived:
            if self._guard.on_control_frame(now) is not None:
                raise _Breach(ErrorCodes.ENHANCE_YOUR_CALM, "ping_flood")
        elif kind is h2.events.RemoteSettingsChanged:
            if self._guard.on_control_frame(now) is not None:
                raise _Breach(ErrorCodes.ENHANCE_YOUR_CALM, "settings_flood")
            for st in self._streams.values():
                _wake(st.window_open)
        elif kind is h2.events.ConnectionTerminated:
            self._closing = True  # the client said GOAWAY: finish what runs, accept nothing new
            self._goaway_sent = True
        # TrailersReceived (request trailers are not passed on), PriorityUpdated, acks: nothing

    def _on_request(self, event: h2.events.RequestReceived, nursery: trio.Nursery) -> None:
        h = self._h
        stream_id = event.stream_id
        assert stream_id is not None
        if self._closing and stream_id > self._last_stream_id:
            h.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        try:
            head = parse_request_head(list(event.headers or ()))
        except MalformedRequest as exc:
            logger.debug("malformed h2 request: %s", exc)
            h.reset_stream(stream_id, ErrorCodes.PROTOCOL_ERROR)
            return
        st = _Stream(stream_id)
        st.ended = event.stream_ended is not None
        target = head.target
        q = target.find("?")
        path, query = (target, "") if q < 0 else (target[:q], target[q + 1:])
        method, headers = head.method, head.headers
        if head.protocol is not None:
            st.protocol = head.protocol
            if head.protocol == "websocket":
                method, headers = "GET", _websocket_upgrade_headers(headers, st)
            else:
                st.refusal = QpherError(f"extended CONNECT for {head.protocol!r} is not supported",
                                        code="protocol_unsupported", status=501)
        request = st.request = Request(
            method, target, path, query, headers, "2", new_request_id(), self._client_addr,
            {"h2_body": not st.ended}, _BodySource(self, st), 0, self._tls,
        )
        st.grpc = grpc.is_grpc(request.header(b"content-type"))
        self._streams[stream_id] = st
        self._requests += 1
        self._deadline = NO_DEADLINE
        self._observer.stream_opened()
        nursery.start_soon(self._run_stream, st, request)

    def _on_data(self, event: h2.events.DataReceived) -> None:
        stream_id = event.stream_id
        assert stream_id is not None
        data = event.data or b""
        length = event.flow_controlled_length or 0
        st = self._streams.get(stream_id)
        if not data and event.stream_ended is None:
            # empty DATA frames cost us work and the client nothing (CVE-2019-9518)
            if self._guard.on_control_frame(trio.current_time()) is not None:
                raise _Breach(ErrorCodes.ENHANCE_YOUR_CALM, "empty_frame_flood")
        if st is None or st.body_error is not None:
            # a stream whose response is done, or whose body was refused: not buffered
            if length:
                self._h.acknowledge_received_data(length, stream_id)
            return
        st.chunks.append((data, length))
        _wake(st.data_ready)

    # ---- the request body ---------------------------------------------------------------

    async def _read_chunk(self, st: _Stream, limit: int | None) -> bytes | None:
        if st.body_error is not None:
            raise st.body_error
        if limit is None:
            limit = self._limits.max_body_bytes
        request = st.request
        if not st.body_started:
            st.body_started = True
            declared = request.header(b"content-length") if request is not None else None
            if declared is not None and declared.isdigit() and int(declared) > limit:
                raise self._fail_body(st, BodyTooLarge(f"request body exceeds {limit} bytes"))
        while not st.chunks:
            if st.ended:
                return None
            if st.reset:
                raise self._fail_body(st, ClientDisconnected("client reset the stream"))
            st.data_ready = trio.Event()
            with trio.move_on_after(self._limits.body_timeout) as waited:
                await st.data_ready.wait()
            st.data_ready = None
            if waited.cancelled_caught:
                raise self._fail_body(st, ClientDisconnected("request body timed out"))
        data, length = st.chunks.popleft()
        st.body_read += len(data)
        if st.body_read > limit:
            raise self._fail_body(st, BodyTooLarge(f"request body exceeds {limit} bytes"))
        if length:
            self._h.acknowledge_received_data(length, st.id)
            await self._flush()
        return data

    def _fail_body(self, st: _Stream, error: QpherError) -> QpherError:
        st.body_error = error
        self._drop_body(st)
        return error

    def _drop_body(self, st: _Stream) -> None:
        """Give the connection window back for queued DATA nobody will read."""
        h = self._h
        while st.chunks:
            _, length = st.chunks.popleft()
            if length:
                h.acknowledge_received_data(length, st.id)

    # ---- one stream ---------------------------------------------------------------------

    async def _run_stream(self, st: _Stream, request: Request) -> None:
        started = time.perf_counter()
        status = 499
        reported = False
        try:
            with st.scope:
                response = await self._respond_to(st, request)
                status = response.status
                if response.upgrade is not None:
                    reported = True
                    await self._run_tunnel(st, request, response, response.upgrade, started)
                else:
                    if st.protocol is not None and 200 <= status < 300:
                        response = await self._not_a_tunnel(request, response)
                        status = response.status
                    await self._send_response(st, request, response)
            if st.scope.cancelled_caught:
                status = 499
        except ClientDisconnected:
            status = 499
        except h2.exceptions.ProtocolError:
            # the stream was reset, or the connection closed, while we were writing to it
            status = 499
        finally:
            self._finish_stream(st)
            if not reported:
                self._done(request, status, started, st.bytes_sent)

    async def _respond_to(self, st: _Stream, request: Request) -> Response:
        if st.refusal is not None:
            return error_response(st.refusal, request.request_id)
        if request.method == "CONNECT":
            return error_response(MethodNotAllowed("CONNECT is not supported"), request.request_id)
        try:
            response = await self._handler(request)
            if type(response) is not Response:
                raise TypeError(f"handler returned {type(response).__name__}, not Response")
            return response
        except ClientDisconnected:
            raise
        except QpherError as exc:
            return error_response(exc, request.request_id)
        except Exception:
            logger.error("unhandled exception in handler", exc_info=True,
                         extra={"fields": {"request_id": request.request_id, "method": request.method}})
            return error_response(QpherError("internal server error"), request.request_id)

    def _finish_stream(self, st: _Stream) -> None:
        """The response is done (or the stream was reset): forget the stream, stop its body."""
        h = self._h
        self._streams.pop(st.id, None)
        st.finished.set()
        if not st.reset:
            self._guard.on_completed(trio.current_time())
        queued = bool(st.chunks)
        if not st.ended and not st.reset:
            # the client is still sending a body nobody will read (RFC 9113 §8.1)
            try:
                h.reset_stream(st.id, ErrorCodes.NO_ERROR)
                queued = True
            except h2.exceptions.ProtocolError:
                pass
        self._drop_body(st)
        if queued and self._nursery is not None:
            self._nursery.start_soon(self._flush_quietly)  # which sets the deadline once sent
        else:
            # The last stream may finish after the flush that sent its response (which saw it
            # open, so no deadline): the idle clock starts now, not at the client's next frame.
            self._rest_deadline()
        if self._closing and not self._streams:
            self._read_scope.cancel()

    def _done(self, request: Request, status: int, started: float, sent: int) -> None:
        hook = self._on_done
        if hook is not None:
            try:
                hook(request, status, time.perf_counter() - started, sent)
            except Exception:
                logger.error("on_request_done hook failed", exc_info=True,
                             extra={"fields": {"request_id": request.request_id}})

    # ---- WebSocket over HTTP/2 (RFC 8441) -------------------------------------------------

    async def _not_a_tunnel(self, request: Request, response: Response) -> Response:
        """A 2xx to an extended CONNECT would tell the client its tunnel is open: a response that
        is not an upgrade (a route of the proxy's own, an upstream that answered 200 instead of
        101) is refused instead."""
        await _aclose_body(response.body)
        error: QpherError = (
            UpstreamBadResponse("the upstream did not accept the websocket upgrade") if response.forwarded
            else NotFound("no websocket endpoint at this path")
        )
        return error_response(error, request.request_id)

    async def _run_tunnel(
        self, st: _Stream, request: Request, response: Response, upgrade: Upgrade, started: float
    ) -> None:
        """The upstream accepted a WebSocket: answer the extended CONNECT with 200 (the 101's
        end-to-end fields, RFC 8441 §5) and run ``upgrade`` on the stream; if the 200 cannot be
        sent, abandon it. Exactly one of ``run`` and ``abandon`` is called, and ``_done`` once."""
        handed = False
        try:
            if st.protocol != "websocket" or response.status != 101:
                handed = True
                upgrade.abandon()
                logger.error("handler produced an upgrade outside an extended CONNECT",
                             extra={"fields": {"request_id": request.request_id}})
                fallback = error_response(QpherError("internal server error"), request.request_id)
                try:
                    await self._send_response(st, request, fallback)
                finally:
                    self._done(request, fallback.status, started, st.bytes_sent)
                return
            try:
                items, has_id = _response_items(response.headers, True)
            except Exception:
                handed = True
                upgrade.abandon()
                logger.error("handler produced an invalid upgrade", exc_info=True,
                             extra={"fields": {"request_id": request.request_id}})
                fallback = error_response(QpherError("internal server error"), request.request_id)
                try:
                    await self._send_response(st, request, fallback)
                finally:
                    self._done(request, fallback.status, started, st.bytes_sent)
                return
            security = self._security
            if security is not None:
                items += security.missing_from(items)
            fields = [(b":status", b"200")]
            fields += [(name, value) for name, _, value in items if name not in _TUNNEL_DROPPED]
            if not has_id:
                fields.append((REQUEST_ID_HEADER, request.request_id.encode("ascii")))
            fields.append((b"date", http_date()))
            try:
                self._h.send_headers(st.id, fields)
                await self._flush()
            finally:
                self._done(request, 200, started, st.bytes_sent)
            if st.reset:
                raise ClientDisconnected("client reset the stream")
            handed = True
            st.tunnel = True
            try:
                await upgrade.run(_TunnelStream(self, st), b"")
            except Exception:
                logger.error("websocket tunnel over HTTP/2 failed", exc_info=True,
                             extra={"fields": {"request_id": request.request_id}})
        finally:
            if not handed:
                upgrade.abandon()

    # ---- the response -------------------------------------------------------------------

    async def _send_response(self, st: _Stream, request: Request, response: Response) -> None:
        h = self._h
        status = response.status
        body = response.body
        rid = request.request_id.encode("ascii")
        if st.grpc and not response.forwarded and isinstance(status, int) and status >= _GRPC_REFUSAL_STATUS:
            await _aclose_body(body)
            raw = bytes(body) if isinstance(body, (bytes, bytearray, memoryview)) else b""
            h.send_headers(st.id, grpc.trailers_only_headers(status, raw, rid), end_stream=True)
            await self._flush()
            return
        streaming = not isinstance(body, (bytes, bytearray, memoryview))
        try:
            if streaming and not hasattr(body, "__aiter__"):
                raise TypeError(f"response body must be bytes or an async iterable, not {type(body)!r}")
            if type(status) is not int or not 200 <= status <= 599:
                raise ValueError(f"status must be an int in 200..599, got {status!r}")
            items, has_id = _response_items(response.headers, streaming)
        except Exception:
            logger.error("handler produced an invalid response", exc_info=True,
                         extra={"fields": {"request_id": request.request_id}})
            await _aclose_body(body)
            await self._send_response(st, request, error_response(QpherError("internal server error"),
                                                                  request.request_id))
            return
        security = self._security
        if security is not None:
            items += security.missing_from(items) if response.forwarded else security.own
        fields = [(b":status", b"%d" % status)]
        fields += [(name, value) for name, _, value in items if name not in _CONNECTION_FIELDS]
        no_body = request.method == "HEAD" or status in _NO_BODY_STATUSES
        if not streaming and status not in _NO_BODY_STATUSES:
            fields.append((b"content-length", b"%d" % len(body)))  # type: ignore[arg-type]
        if not has_id:
            fields.append((REQUEST_ID_HEADER, rid))
        fields.append((b"date", http_date()))
        trailers = response.trailers
        if no_body or (not streaming and not body and trailers is None):
            await _aclose_body(body)
            h.send_headers(st.id, fields, end_stream=True)
            await self._flush()
            return
        h.send_headers(st.id, fields)
        if streaming:
            await self._flush()
            ok = await self._send_stream(st, request, status, body)  # type: ignore[arg-type]
            if not ok:
                return
        elif trailers is None:
            await self._send_data(st, bytes(body), end_stream=True)  # type: ignore[arg-type]
            return
        else:
            await self._send_data(st, bytes(body))  # type: ignore[arg-type]
        await self._end_stream(st, request, trailers)

    async def _send_stream(
        self, st: _Stream, request: Request, status: int, body: AsyncIterable[bytes]
    ) -> bool:
        """Send a streamed body; False if it failed half-way (the stream is then reset)."""
        iterator = aiter(body)
        try:
            async for chunk in iterator:
                if chunk:
                    await self._send_data(st, bytes(chunk))
            return True
        except (ClientDisconnected, trio.Cancelled):
            raise
        except QpherError as exc:
            logger.info("response body stream stopped", extra={"fields": {
                "request_id": request.request_id, "status": status, "code": exc.code}})
        except Exception:
            logger.error("response body stream failed", exc_info=True,
                         extra={"fields": {"request_id": request.request_id, "status": status}})
        finally:
            await _aclose_body(iterator)
        self._reset(st, ErrorCodes.INTERNAL_ERROR)  # the client sees a truncated message as such
        await self._flush()
        return False

    async def _end_stream(self, st: _Stream, request: Request, trailers: object) -> None:
        h = self._h
        pairs: list[tuple[bytes, bytes]] = []
        if callable(trailers):
            try:
                for pair in trailers():
                    name, _, value = _validated_item(pair)
                    if name not in _CONNECTION_FIELDS:
                        pairs.append((name, value))
            except Exception:
                logger.error("response trailers failed", exc_info=True,
                             extra={"fields": {"request_id": request.request_id}})
                self._reset(st, ErrorCodes.INTERNAL_ERROR)
                await self._flush()
                return
        if pairs:
            h.send_headers(st.id, pairs, end_stream=True)
        else:
            h.end_stream(st.id)
        await self._flush()

    async def _send_data(self, st: _Stream, data: bytes, end_stream: bool = False) -> None:
        """``data`` in frames that fit the send windows, waiting for WINDOW_UPDATE when none;
        ``end_stream`` sets END_STREAM on the last frame."""
        h = self._h
        view = memoryview(data)
        while view:
            size = min(h.local_flow_control_window(st.id), h.max_outbound_frame_size, len(view))
            if size <= 0:
                st.window_open = trio.Event()
                with trio.move_on_after(self._limits.send_timeout) as waited:
                    await st.window_open.wait()
                st.window_open = None
                if waited.cancelled_caught:
                    self._reset(st, ErrorCodes.CANCEL)
                    await self._flush()
                    raise ClientDisconnected("client opened no send window")
                continue
            h.send_data(st.id, view[:size].tobytes(), end_stream=end_stream and size == len(view))
            st.bytes_sent += size
            view = view[size:]
            await self._flush()

    def _reset(self, st: _Stream, code: ErrorCodes) -> None:
        try:
            self._h.reset_stream(st.id, code)
        except h2.exceptions.ProtocolError:
            pass
        st.reset = True


class _TunnelStream(trio.abc.HalfCloseableStream):
    """One HTTP/2 stream as a byte stream, for a WebSocket tunnel (RFC 8441).

    ``receive_some`` gives the client's DATA (acknowledged as it is taken, so the stream's window
    bounds what is buffered) and ``b""`` at END_STREAM; ``send_all`` sends DATA within the
    windows (``send_timeout`` without one resets the stream); ``send_eof`` ends our side
    (END_STREAM); ``aclose`` resets the stream (CANCEL) unless both sides ended it. A stream the
    client reset, or a connection gone, is ``trio.BrokenResourceError``."""

    def __init__(self, conn: HTTP2Connection, st: _Stream) -> None:
        self._conn = conn
        self._st = st
        self._rest = b""  # the part of a DATA payload beyond ``max_bytes``
        self._eof_sent = False
        self._closed = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        st = self._st
        if self._closed:
            raise trio.ClosedResourceError("the stream is closed")
        data = self._rest
        if not data:
            while not st.chunks:
                if st.reset:
                    raise trio.BrokenResourceError("the client reset the stream")
                if st.ended:
                    await trio.lowlevel.checkpoint()
                    return b""
                st.data_ready = trio.Event()
                await st.data_ready.wait()
                st.data_ready = None
                if self._closed:
                    raise trio.ClosedResourceError("the stream is closed")
            data, length = st.chunks.popleft()
            if length:
                self._conn._h.acknowledge_received_data(length, st.id)
                try:
                    await self._conn._flush()
                except ClientDisconnected as exc:
                    raise trio.BrokenResourceError("the client's connection is gone") from exc
        if max_bytes is not None and len(data) > max_bytes:
            data, self._rest = data[:max_bytes], data[max_bytes:]
        else:
            self._rest = b""
        if not data:  # an empty DATA frame: nothing to hand on, read on
            return await self.receive_some(max_bytes)
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the stream is closed")
        if self._eof_sent:
            raise trio.ClosedResourceError("send_eof was called")
        if self._st.reset or self._conn._broken:
            raise trio.BrokenResourceError("the client reset the stream")
        try:
            await self._conn._send_data(self._st, bytes(data))
        except (ClientDisconnected, h2.exceptions.ProtocolError) as exc:
            raise trio.BrokenResourceError("the stream cannot be written") from exc
        if not data:
            await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the stream is closed")
        if self._eof_sent:
            await trio.lowlevel.checkpoint()
            return
        if self._st.reset or self._conn._broken:
            raise trio.BrokenResourceError("the client reset the stream")
        self._eof_sent = True
        try:
            self._conn._h.end_stream(self._st.id)
            await self._conn._flush()
        except (ClientDisconnected, h2.exceptions.ProtocolError) as exc:
            raise trio.BrokenResourceError("the stream cannot be written") from exc

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        st, conn = self._st, self._conn
        _wake(st.data_ready)
        if not st.reset and not (self._eof_sent and st.ended) and not conn._broken:
            conn._reset(st, ErrorCodes.CANCEL)
            try:
                await conn._flush()
            except ClientDisconnected:
                pass
        else:
            await trio.lowlevel.checkpoint()


def _websocket_upgrade_headers(headers: list[tuple[bytes, bytes]], st: _Stream) -> list[tuple[bytes, bytes]]:
    """The head of an extended CONNECT for ``websocket`` as the HTTP/1.1 opening handshake the
    upstream leg sends (RFC 8441 §5): ``Connection: upgrade``, ``Upgrade: websocket``, version 13
    and a ``Sec-WebSocket-Key`` of our own (an HTTP/2 client sends none); ``-Protocol`` and
    ``-Extensions`` pass as sent. Another version is refused (400)."""
    versions = [v for n, v in headers if n == b"sec-websocket-version"]
    if versions and versions != [b"13"]:
        st.refusal = BadRequest("only Sec-WebSocket-Version 13 is supported")
    key = base64.b64encode(os.urandom(16))
    return [*(h for h in headers if h[0] not in _WEBSOCKET_CLIENT_FIELDS),
            (b"connection", b"upgrade"), (b"upgrade", b"websocket"),
            (b"sec-websocket-version", b"13"), (b"sec-websocket-key", key)]


def _wake(event: trio.Event | None) -> None:
    if event is not None:
        event.set()


def _reason_of(exc: h2.exceptions.ProtocolError, code: ErrorCodes) -> str:
    """A closed-set reason for a protocol error h2 raised (the metric label)."""
    if isinstance(exc, h2.exceptions.TooManyStreamsError):
        return "too_many_streams"
    if isinstance(exc, h2.exceptions.DenialOfServiceError):
        text = str(exc)
        if "CONTINUATION" in text or "header block larger" in text:
            return "continuation_flood"
        return "header_list_size"
    if code is ErrorCodes.FLOW_CONTROL_ERROR:
        return "flow_control"
    if code is ErrorCodes.COMPRESSION_ERROR:
        return "hpack"
    if code is ErrorCodes.FRAME_SIZE_ERROR:
        return "frame_size"
    return "protocol"
