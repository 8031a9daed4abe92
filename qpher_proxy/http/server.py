"""HTTP/1.1 server: a thin trio loop around h11, one task per connection.

Theory of operation
-------------------
h11 owns the protocol: parsing, framing, keep-alive and the per-cycle state machine. This module
only moves bytes between a ``trio.abc.Stream`` and an ``h11.Connection`` and decides *when* to
give up on a peer. It works over any stream (plain TCP in tests, ``TLSStream`` in production:
the TLS handshake happens inside the first ``receive_some``, so a failed handshake surfaces as a
failed receive and the connection is closed quietly like any other broken transport).

One connection = one task, requests strictly one at a time. Pipelining needs nothing special:
bytes of request N+1 that arrived with request N stay in h11's buffer and are parsed after
``start_next_cycle()``, so responses go out in order.

Timeouts. Each connection runs inside ONE ``CancelScope`` and carries ONE deadline, a plain
float that moves as the connection changes phase (no ``move_on_after`` per receive, not even a
trio deadline update: a request moves its deadline three or four times and each trio update
costs a heap operation). A single ``_DeadlineWheel`` task per server wakes a few times a second
and cancels the scope of every connection whose deadline has passed; timeouts therefore fire up
to ``resolution`` (at most 1 s, a tenth of the shortest timeout) late, like nginx's coarse timers.

    phase                              deadline
    ---------------------------------  --------------------------------------------
    new connection, waiting for head   accept time + header_timeout   (slowloris)
    keep-alive, nothing buffered       now + idle_timeout             (idle close)
    keep-alive, first byte of a head   now + header_timeout
    handler running                    none (the handler owns its own timeouts)
    handler reading the body           now + body_timeout, per receive
    sending                            now + send_timeout, per send_all
    lingering close                    now + linger_timeout

When the deadline fires the scope swallows the ``Cancelled`` and the connection is closed
without a response (as nginx does for client_header_timeout and keepalive_timeout); a request
cut off this way is still reported to ``on_request_done`` (408, or 503 when the shutdown grace
ran out).

Limits and the statuses users expect: a header block over ``max_header_bytes`` gets 431
(h11 enforces this only for heads still incomplete, so a complete over-sized head that arrived
in one read is measured here too); a body over ``max_body_bytes`` gets 413, raised to the
handler the moment the declared Content-Length or the running total passes the limit, before
any ``100 Continue`` is sent; anything h11 rejects gets 400 (501 for an unsupported
Transfer-Encoding, as h11 hints); all with the JSON error body and ``X-Request-Id``, then close.

Framing strictness (RFC 9112). h11 is more lenient than a gateway may be: it takes a bare LF
for CRLF, unfolds obsolete line folding, reads a body that has both Content-Length and
Transfer-Encoding as chunked (ignoring the length), and waits for the data of a chunk of any
declared size. A server in front of us or behind us that reads such bytes differently sees
other request boundaries than we do (request smuggling), so: the raw head is searched for a
bare LF or a folded line before h11 parses it, once per head (400); a request with both
framing headers is answered 400 and the connection closed (§6.1); in a chunked body, a chunk
whose declared size passes the body limit is refused as soon as its size line is parsed (413),
and a partial chunk-size line that no further byte can make valid at once (400). These checks
read h11's buffer and chunk reader through ``_h11_shortcuts``.

Closing politely. When we close while the client may still be sending (an unread or rejected
body, a protocol error), closing at once would make the kernel answer the unread bytes with a
RST that can destroy our error response in flight. So we half-close if the stream allows it and
read-and-discard for at most ``linger_timeout`` (nginx's lingering close).

Unread bodies. If a handler answers without reading the body: when the client was waiting
for ``100 Continue`` we never invited the body, so the response says ``Connection: close``
(RFC 9110 §10.1.1); otherwise the rest is drained after the response (up to
``max_body_bytes``) so the connection can be reused, or the connection is closed. A streaming
response (echo, sidecar) may consume the body itself, so a waiting client gets its
``100 Continue`` just before the response head, the last moment h11 allows one.

Graceful shutdown (``ShutdownSignal.begin()``): listeners close (new connections are refused by
the kernel), connections waiting idle for a next request are cancelled at once, busy ones get
``Connection: close`` on their current response; ``HTTPServer`` cancels whatever is left after
``shutdown_grace`` seconds.

Security headers: with ``security_headers`` every response the server or its handler
renders gets ``SecurityHeaders.own`` (``Cache-Control: no-store``, ``nosniff``, HSTS when
configured), prebuilt once; a ``Response(forwarded=True)`` gets only the forwarded set, where
its own headers lack them (see ``security_headers.py``).

Connection limit: like nginx with one worker when ``worker_connections`` is exhausted, a
connection over ``max_connections`` is accepted and closed at once (rather than left in the
kernel backlog, where the client would hang until its own timeout); existing connections are
not affected.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import h11
import trio

from .._json import http_date as _http_date
from ..errors import (
    BadRequest,
    BodyTooLarge,
    ClientDisconnected,
    HeaderTooLarge,
    MethodNotAllowed,
    NotImplementedByServer,
    QpherError,
)
from . import _h11_shortcuts as _h11
from ._h11_shortcuts import Headers as _Headers
from ._h11_shortcuts import header_pairs as _header_pairs
from .messages import REQUEST_ID_HEADER, Request, Response, error_body, error_response
from .security_headers import SecurityHeaders

__all__ = [
    "HTTPLimits",
    "HTTPServer",
    "ShutdownSignal",
    "Handler",
    "RequestDoneHook",
    "serve_connection",
    "peer_address",
    "new_request_id",
]

logger = logging.getLogger("qpher.http")

KiB = 1024
MiB = 1024 * KiB

DEFAULT_MAX_HEADER_BYTES = 16 * KiB  # nginx large_client_header_buffers allows 8k lines, 32k total
DEFAULT_MAX_BODY_BYTES = 1 * MiB  # nginx client_max_body_size 1m
DEFAULT_HEADER_TIMEOUT = 10.0  # seconds; nginx client_header_timeout is 60s, we are stricter
DEFAULT_IDLE_TIMEOUT = 75.0  # seconds; nginx keepalive_timeout 75s
DEFAULT_BODY_TIMEOUT = 60.0  # seconds between two body reads; nginx client_body_timeout 60s
DEFAULT_SEND_TIMEOUT = 60.0  # seconds for one send_all; nginx send_timeout 60s
DEFAULT_LINGER_TIMEOUT = 5.0  # seconds; nginx lingering_timeout 5s
DEFAULT_MAX_CONNECTIONS = 1024  # nginx worker_connections 512 (compiled default), 768 on Debian
DEFAULT_SHUTDOWN_GRACE = 10.0  # seconds
RECEIVE_SIZE = 64 * KiB  # bound on one receive, hence on one body chunk handed to a handler

Handler = Callable[[Request], Awaitable[Response]]
RequestDoneHook = Callable[[Request, int, float, int], None]


@dataclass(frozen=True, slots=True)
class HTTPLimits:
    """Per-connection limits (the config layer validates ranges; we only reject nonsense)."""

    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    send_timeout: float = DEFAULT_SEND_TIMEOUT
    linger_timeout: float = DEFAULT_LINGER_TIMEOUT
    max_requests_per_connection: int | None = None  # None: unlimited (nginx keepalive_requests 1000)
    max_connections: int = DEFAULT_MAX_CONNECTIONS

    def __post_init__(self) -> None:
        for name in ("max_header_bytes", "max_body_bytes", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("header_timeout", "idle_timeout", "body_timeout", "send_timeout", "linger_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.max_requests_per_connection is not None and self.max_requests_per_connection < 1:
            raise ValueError(
                f"max_requests_per_connection must be >= 1 or None, got {self.max_requests_per_connection!r}"
            )


def new_request_id() -> str:
    """16 random hex characters; one getrandom() call (~0.3 µs)."""
    return os.urandom(8).hex()


_REASONS: dict[int, bytes] = {s.value: s.phrase.encode("ascii") for s in HTTPStatus}
# Errors a transport may raise when the peer is gone or the TLS layer failed (handshake
# included). They all mean "this connection is over", never "the server is broken".
_TRANSPORT_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError, QpherError)
_NO_BODY_STATUSES = frozenset({204, 304})
_CONTINUE = h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")
_INF = math.inf
_receive_buffer = _h11.receive_buffer
_chunk_position = _h11.chunk_position
_body_is_chunked = _h11.body_is_chunked

# The line endings of a request head, checked on the raw bytes before h11 parses them: h11
# accepts a bare LF and obsolete line folding (RFC 9112 §2.2, §5.2), which a server behind us
# may read differently, so we refuse both. One search from each LF: a match of one byte is a
# LF without its CR, of two a LF then SP/HTAB (a folded line), of three CRLF CRLF, the clean
# end of the head (what follows is body, never searched).
_HEAD_LINE_ENDS = re.compile(rb"\n(?:(?<!\r\n)|[ \t]|\r\n)")
# What may be buffered of a chunk-size line before its CRLF (RFC 9112 §7.1; h11's grammar): any
# other bytes can never become a valid line, so they are refused at once rather than waited on.
_PARTIAL_CHUNK_LINE = re.compile(rb"(?:[0-9A-Fa-f]{1,20}(?:;[^\n]*|[ \t]*\r?))?")


def peer_address(stream: trio.abc.Stream) -> str:
    """The peer IP of a socket stream, looking through wrappers' ``transport_stream``."""
    obj: Any = stream
    for _ in range(4):
        sock = getattr(obj, "socket", None)
        if sock is not None:
            try:
                peer = sock.getpeername()
            except OSError:
                return "unknown"
            if isinstance(peer, tuple):
                return str(peer[0])
            return str(peer) or "unix"
        obj = getattr(obj, "transport_stream", None)
        if obj is None:
            break
    return "unknown"


class ShutdownSignal:
    """Starts a graceful shutdown of every connection that registered with it."""

    __slots__ = ("_event", "_connections")

    def __init__(self) -> None:
        self._event = trio.Event()
        self._connections: set[_Connection] = set()

    @property
    def is_set(self) -> bool:
        return self._event.is_set()

    def begin(self) -> None:
        """Idle connections close now; busy ones close after their current response."""
        if self._event.is_set():
            return
        self._event.set()
        for conn in list(self._connections):
            conn._shutdown_requested()

    async def wait(self) -> None:
        await self._event.wait()


class _DeadlineWheel:
    """Enforces every registered connection's ``_deadline`` with one sleeping task.

    Moving a trio ``CancelScope`` deadline costs a heap operation and a context manager (~1.3 µs),
    and a request moves its deadline three or four times. Here a deadline is a float attribute;
    this task wakes every ``resolution`` seconds and cancels the connections whose deadline has
    passed (timeouts fire up to ``resolution`` late, like nginx's coarse timers).
    """

    __slots__ = ("_connections", "resolution")

    def __init__(self, limits: HTTPLimits) -> None:
        self._connections: set[_Connection] = set()
        shortest = min(
            limits.header_timeout, limits.idle_timeout, limits.body_timeout,
            limits.send_timeout, limits.linger_timeout,
        )
        self.resolution = min(1.0, max(0.005, shortest / 10))

    async def run(self) -> None:
        connections = self._connections
        while True:
            await trio.sleep(self.resolution)
            now = trio.current_time()
            for conn in connections:  # no await in this loop: the set cannot change under us
                if conn._deadline <= now:
                    conn._scope.cancel()


class _BodyIterator:
    """``Request.body_chunks()``: a plain async iterator (no async generator to finalise)."""

    __slots__ = ("_conn", "_generation", "_limit")

    def __init__(self, conn: _Connection, generation: int, limit: int | None) -> None:
        self._conn = conn
        self._generation = generation
        self._limit = limit

    def __aiter__(self) -> _BodyIterator:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._conn._read_chunk(self._generation, self._limit)
        if chunk is None:
            raise StopAsyncIteration
        return chunk


class _Connection:
    __slots__ = (
        "_stream",
        "_handler",
        "_limits",
        "_client_addr",
        "_on_done",
        "_shutdown",
        "_h",
        "_scope",
        "_deadline",
        "_idle",
        "_generation",
        "_requests",
        "_request",
        "_body_started",
        "_body_done",
        "_body_error",
        "_body_read",
        "_eof",
        "_bytes_sent",
        "_started",
        "_security",
    )

    def __init__(
        self,
        stream: trio.abc.Stream,
        handler: Handler,
        limits: HTTPLimits,
        client_addr: str,
        on_done: RequestDoneHook | None,
        shutdown: ShutdownSignal | None,
        security: SecurityHeaders | None = None,
    ) -> None:
        self._stream = stream
        self._handler = handler
        self._limits = limits
        self._client_addr = client_addr
        self._on_done = on_done
        self._shutdown = shutdown
        self._h = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
        self._scope = trio.CancelScope()
        self._deadline = _INF  # enforced by a _DeadlineWheel: a plain float, cheap to move
        self._idle = False
        self._generation = 0
        self._requests = 0
        self._request: Request | None = None
        self._body_started = False
        self._body_done = False
        self._body_error: QpherError | None = None
        self._body_read = 0
        self._eof = False
        self._bytes_sent = 0
        self._started: float | None = None  # perf_counter() of the request in flight
        self._security = security

    # ---- shutdown --------------------------------------------------------------------

    def _shutdown_requested(self) -> None:
        if self._idle:
            self._scope.cancel()

    # ---- transport -------------------------------------------------------------------

    async def _receive(self) -> bytes:
        try:
            data = await self._stream.receive_some(RECEIVE_SIZE)
        except _TRANSPORT_ERRORS as exc:
            raise ClientDisconnected("client disconnected") from exc
        if not data:
            self._eof = True
        return data

    async def _send(self, data: bytes) -> None:
        self._deadline = trio.current_time() + self._limits.send_timeout
        try:
            await self._stream.send_all(data)
        except _TRANSPORT_ERRORS as exc:
            self._h.send_failed()
            raise ClientDisconnected("client disconnected") from exc
        self._bytes_sent += len(data)

    # ---- main loop -------------------------------------------------------------------

    async def run(self, wheel: _DeadlineWheel) -> None:
        shutdown = self._shutdown
        if shutdown is not None:
            shutdown._connections.add(self)
        self._deadline = trio.current_time() + self._limits.header_timeout
        wheel._connections.add(self)
        try:
            with self._scope:
                await self._loop()
        finally:
            wheel._connections.discard(self)
            if self._started is not None and self._request is not None:
                # Cut off mid-request (a timeout, or the shutdown grace ran out): still log it.
                timed_out = self._deadline <= trio.current_time()
                self._done(self._request, 408 if timed_out else 503, self._started)
            if shutdown is not None:
                shutdown._connections.discard(self)

    async def _loop(self) -> None:
        h = self._h
        first = True
        while True:
            try:
                event = await self._receive_head(first)
            except h11.RemoteProtocolError as exc:
                await self._reject_head(self._head_error(exc))
                return
            except ClientDisconnected:
                return
            except BadRequest as exc:  # the raw head failed _check_head
                await self._reject_head(exc)
                return
            if event is None:
                return
            first = False
            if not await self._exchange(event):
                return
            h.start_next_cycle()

    async def _receive_head(self, first: bool) -> h11.Request | None:
        """The next request head, or None for a clean end (EOF, idle close, shutdown)."""
        h = self._h
        checked = self._check_head(0)
        event = h.next_event()
        if event is h11.NEED_DATA:
            shutdown = self._shutdown
            buffered = bool(h.trailing_data[0])
            if not buffered:
                if shutdown is not None and shutdown.is_set:
                    return None
                self._idle = True
                if not first:
                    self._deadline = trio.current_time() + self._limits.idle_timeout
            elif not first:
                self._deadline = trio.current_time() + self._limits.header_timeout
            while event is h11.NEED_DATA:
                data = await self._receive()
                h.receive_data(data)
                checked = self._check_head(checked)
                event = h.next_event()
                if self._idle:
                    # First bytes of a head after an idle wait: the head now has header_timeout
                    # (usually it is already complete and no deadline needs to move at all).
                    self._idle = False
                    if not first and event is h11.NEED_DATA:
                        self._deadline = trio.current_time() + self._limits.header_timeout
        self._idle = False
        if type(event) is h11.Request:
            self._deadline = _INF
            return event
        # ConnectionClosed (clean EOF between requests); PAUSED cannot happen here.
        return None

    def _check_head(self, start: int) -> int:
        """Refuse a bare LF or a folded line in the head h11 is about to parse (BadRequest).

        ``start`` is where the search resumes in h11's buffer (0 for a new head); returns where
        the next call resumes, -1 once the head is known clean (nothing left to check). A head
        that arrives whole is searched once; one that trickles in, once per byte received."""
        if start < 0:
            return start
        buf = _receive_buffer(self._h)
        if not buf:
            return 0
        m = _HEAD_LINE_ENDS.search(buf, start)
        if m is None:
            return max(0, len(buf) - 2)  # a LF in the last two bytes is not decided yet
        n = m.end() - m.start()
        if n == 3:
            return -1
        if n == 1:
            raise BadRequest("request head has a line ending in LF without CR")
        raise BadRequest("request head has an obsolete folded header line")

    # ---- one request/response cycle --------------------------------------------------

    async def _exchange(self, event: h11.Request) -> bool:
        """Run the handler and send its response; True if the connection may be reused."""
        started = self._started = time.perf_counter()
        h = self._h
        limits = self._limits
        self._generation += 1
        self._requests += 1
        self._body_started = False
        self._body_done = False
        self._body_error = None
        self._body_read = 0
        self._bytes_sent = 0
        request_id = os.urandom(8).hex()

        raw_target = event.target
        headers: list[tuple[bytes, bytes]] = _header_pairs(event.headers)
        head_size = len(raw_target) + len(event.method) + 12 + 4 * len(headers)
        for name, value in headers:
            head_size += len(name) + len(value)
        target = raw_target.decode("ascii")  # h11 admits only visible ASCII in a target
        q = target.find("?")
        if q < 0:
            path, query = target, ""
        else:
            path, query = target[:q], target[q + 1 :]
        if path[:1] != "/":
            path = _origin_path(path)
        request = Request(
            event.method.decode("ascii"),
            target,
            path,
            query,
            headers,
            event.http_version.decode("ascii"),
            request_id,
            self._client_addr,
            {},
            self,  # type: ignore[arg-type]
            self._generation,
        )
        self._request = request

        response: Response
        if head_size > limits.max_header_bytes:
            # h11 only bounds heads that are still incomplete; this one arrived whole.
            error = HeaderTooLarge(f"request header block exceeds {limits.max_header_bytes} bytes")
            response = error_response(error, request_id)
            self._body_error = error  # never read this request's body; close after answering
        elif event.method == b"CONNECT":
            response = error_response(MethodNotAllowed("CONNECT is not supported"), request_id)
        elif _both_framings(h, request):
            error = BadRequest("request has both content-length and transfer-encoding")
            response = error_response(error, request_id)
            self._body_error = error  # never read this body (RFC 9112 §6.1: close after answering)
        else:
            try:
                response = await self._handler(request)
                if type(response) is not Response:
                    raise TypeError(f"handler returned {type(response).__name__}, not Response")
            except ClientDisconnected:
                self._done(request, 499, started)
                return False
            except QpherError as exc:
                response = error_response(exc, request_id)
            except Exception:
                logger.error(
                    "unhandled exception in handler",
                    exc_info=True,
                    extra={"fields": {"request_id": request_id, "method": request.method}},
                )
                response = error_response(QpherError("internal server error"), request_id)

        invite = False
        if isinstance(response.body, (bytes, bytearray, memoryview)):
            keep_alive = self._settle_body()
        else:
            # The response stream may itself consume the request body (echo, sidecar): leave
            # the body alone now and drain whatever is left once the stream is done. A client
            # still waiting for "100 Continue" gets it now, the last moment h11 allows it.
            keep_alive = self._body_error is None
            invite = keep_alive and h.they_are_waiting_for_100_continue
        shutdown = self._shutdown
        if (
            (shutdown is not None and shutdown.is_set)
            or (limits.max_requests_per_connection is not None and self._requests >= limits.max_requests_per_connection)
        ):
            keep_alive = False
        try:
            if invite:
                await self._send(h.send(_CONTINUE))
            await self._send_response(request, response, keep_alive)
        except ClientDisconnected:
            self._done(request, response.status, started)
            return False
        self._done(request, response.status, started)

        if h.our_state is h11.ERROR:
            return False  # a truncated response: the close tells the client so
        if keep_alive and h.our_state is h11.DONE:
            if h.their_state is h11.SEND_BODY:
                keep_alive = await self._drain()
            if keep_alive and h.their_state is h11.DONE:
                return True
        if h.their_state is h11.SEND_BODY or h.their_state is h11.ERROR:
            await self._linger()
        return False

    def _done(self, request: Request, status: int, started: float) -> None:
        self._started = None
        hook = self._on_done
        if hook is not None:
            try:
                hook(request, status, time.perf_counter() - started, self._bytes_sent)
            except Exception:
                logger.error(
                    "on_request_done hook failed",
                    exc_info=True,
                    extra={"fields": {"request_id": request.request_id}},
                )

    async def _send_response(self, request: Request, response: Response, keep_alive: bool) -> None:
        h = self._h
        status = response.status
        body = response.body
        streaming = not isinstance(body, (bytes, bytearray, memoryview))
        try:
            if streaming and not hasattr(body, "__aiter__"):
                raise TypeError(f"response body must be bytes or an async iterable, not {type(body).__name__}")
            items, has_id = _response_items(response.headers, streaming)
            if type(status) is not int or not 200 <= status <= 599:
                raise h11.LocalProtocolError(f"status must be an int in 200..599, got {status!r}")
        except (h11.LocalProtocolError, TypeError, ValueError, UnicodeError):
            # A handler produced an invalid status or header (CR/LF, bad name...): never send it.
            logger.error(
                "handler produced an invalid response",
                exc_info=True,
                extra={"fields": {"request_id": request.request_id}},
            )
            await _aclose_body(body)
            fallback = error_response(QpherError("internal server error"), request.request_id)
            await self._send_response(request, fallback, keep_alive)
            return
        security = self._security
        if security is not None:
            if response.forwarded:
                items += security.missing_from(items)
            else:
                items += security.own
        append = items.append
        if not streaming and status not in _NO_BODY_STATUSES:
            append((b"content-length", b"content-length", b"%d" % len(body)))  # type: ignore[arg-type]
        if not has_id:
            rid = request.request_id.encode("ascii")
            append((REQUEST_ID_HEADER, REQUEST_ID_HEADER, rid))
        date = _http_date()
        append((b"date", b"date", date))
        if not keep_alive:
            append((b"connection", b"connection", b"close"))
        # Every item is validated (or ours): handing h11 a ready Headers skips its second pass.
        event = h11.Response(status_code=status, headers=_Headers(items), reason=_REASONS.get(status, b""))

        head = h.send(event)
        if request.method == "HEAD" or status in _NO_BODY_STATUSES:
            await _aclose_body(body)
            await self._send(head + h.send(h11.EndOfMessage()))
            return
        if not streaming:
            if body:
                await self._send(head + h.send(h11.Data(data=body)) + h.send(h11.EndOfMessage()))  # type: ignore[arg-type]
            else:
                await self._send(head + h.send(h11.EndOfMessage()))
            return

        # Streaming body: one send per chunk, the deadline lifted between sends so that a
        # slow producer (an upstream) is not mistaken for a slow client.
        await self._send(head)
        self._deadline = _INF
        iterator = aiter(body)  # type: ignore[arg-type]
        try:
            async for chunk in iterator:
                if chunk:
                    await self._send(h.send(h11.Data(data=chunk)))
                    self._deadline = _INF
            await self._send(h.send(h11.EndOfMessage()))
        except ClientDisconnected:
            raise
        except h11.LocalProtocolError:
            # e.g. more or fewer bytes than the handler's Content-Length: abort the message.
            logger.error(
                "streamed body does not match its framing",
                exc_info=True,
                extra={"fields": {"request_id": request.request_id, "status": status}},
            )
            h.send_failed()
        except QpherError as exc:
            # e.g. the request body turned out too large while being streamed back/upstream
            logger.info(
                "response body stream stopped",
                extra={"fields": {"request_id": request.request_id, "status": status, "code": exc.code}},
            )
            h.send_failed()
        except Exception:
            logger.error(
                "response body stream failed",
                exc_info=True,
                extra={"fields": {"request_id": request.request_id, "status": status}},
            )
            h.send_failed()  # our_state ERROR: the message is truncated, the connection closes
        finally:
            await _aclose_body(iterator)

    def _head_error(self, exc: h11.RemoteProtocolError) -> QpherError:
        status = exc.error_status_hint
        if status == 431:
            return HeaderTooLarge(f"request header block exceeds {self._limits.max_header_bytes} bytes")
        if status == 501:
            return NotImplementedByServer("unsupported transfer-encoding")
        return BadRequest("malformed request")

    async def _reject_head(self, error: QpherError) -> None:
        """Answer a request head that was refused (400/431/501), then close."""
        started = time.perf_counter()
        request_id = new_request_id()
        request = Request("", "", "", "", [], "", request_id, self._client_addr)
        self._bytes_sent = 0
        if self._eof:
            return  # the peer closed mid-head: nobody to answer
        data = (
            f"HTTP/1.1 {error.status} {_REASONS.get(error.status, b'').decode()}\r\n"
            f"content-type: application/json\r\nx-request-id: {request_id}\r\n"
        ).encode("ascii")
        if self._security is not None:
            data += self._security.own_block
        body = error_body(error.code, error.message, request_id)
        data += b"content-length: %d\r\ndate: %s\r\nconnection: close\r\n\r\n" % (len(body), _http_date())
        try:
            await self._send(data + body)
        except ClientDisconnected:
            self._done(request, error.status, started)
            return
        self._done(request, error.status, started)
        await self._linger()

    # ---- request body ----------------------------------------------------------------

    def _fail_body(self, error: QpherError) -> QpherError:
        self._body_error = error
        return error

    def _declared_length(self) -> int | None:
        request = self._request
        if request is None:
            return None
        value = request.header(b"content-length")
        return int(value) if value is not None else None  # h11 validated it

    async def _read_chunk(self, generation: int, limit: int | None) -> bytes | None:
        if generation != self._generation:
            raise RuntimeError("request body read after its response cycle ended")
        if self._body_error is not None:
            raise self._body_error
        if self._body_done:
            return None
        h = self._h
        if limit is None:
            limit = self._limits.max_body_bytes
        if not self._body_started:
            self._body_started = True
            declared = self._declared_length()
            if declared is not None and declared > limit:
                raise self._fail_body(BodyTooLarge(f"request body exceeds {limit} bytes"))
            if h.they_are_waiting_for_100_continue:
                await self._send(h.send(_CONTINUE))
                self._deadline = _INF
        while True:
            try:
                event = h.next_event()
            except h11.RemoteProtocolError as exc:
                if self._eof:
                    raise self._fail_body(ClientDisconnected("client disconnected")) from exc
                raise self._fail_body(BadRequest("malformed request body")) from exc
            kind = type(event)
            if kind is h11.Data:
                data = event.data  # type: ignore[union-attr]
                read = self._body_read = self._body_read + len(data)
                # with the rest of the chunk h11 knows is coming: a declared size is refused as
                # soon as it is known, not once that much has been received
                if read > limit or read + _chunk_position(h) > limit:
                    raise self._fail_body(BodyTooLarge(f"request body exceeds {limit} bytes"))
                return bytes(data)
            if kind is h11.EndOfMessage:
                self._body_done = True
                return None
            if event is h11.NEED_DATA:
                error = self._chunk_error(limit)
                if error is not None:
                    raise self._fail_body(error)
                self._deadline = trio.current_time() + self._limits.body_timeout
                try:
                    data = await self._receive()
                except ClientDisconnected as exc:
                    raise self._fail_body(exc) from exc
                self._deadline = _INF
                h.receive_data(data)
                continue
            if kind is h11.ConnectionClosed:
                raise self._fail_body(ClientDisconnected("client disconnected"))
            self._body_done = True  # PAUSED: nothing more belongs to this request
            return None

    def _chunk_error(self, limit: int) -> QpherError | None:
        """Before waiting for more of a chunked body: a chunk declared past ``limit`` (413) or
        a chunk-size line that no byte can make valid (400), which h11 would wait on."""
        h = self._h
        position = _chunk_position(h)
        if position > 0:
            if self._body_read + position > limit:
                return BodyTooLarge(f"request body exceeds {limit} bytes")
        elif position == _h11.AT_CHUNK_SIZE_LINE and not _PARTIAL_CHUNK_LINE.fullmatch(_receive_buffer(h)):
            return BadRequest("malformed chunk-size line in the request body")
        return None

    async def _read_body(self, generation: int, max_bytes: int | None) -> bytes:
        parts: list[bytes] = []
        while (chunk := await self._read_chunk(generation, max_bytes)) is not None:
            parts.append(chunk)
        return b"".join(parts)

    def _body_chunks(self, generation: int, max_bytes: int | None) -> AsyncIterator[bytes]:
        return _BodyIterator(self, generation, max_bytes)

    def _settle_body(self) -> bool:
        """Before responding: consume what is already buffered of the request body and tell
        whether the connection can be kept (possibly after draining the rest)."""
        if self._body_error is not None:
            return False
        h = self._h
        if h.their_state is not h11.SEND_BODY:
            return True
        if h.they_are_waiting_for_100_continue:
            return False  # we never invited the body: close instead of waiting for it
        outcome = self._discard_buffered_body()
        if outcome is not None:
            return outcome
        declared = self._declared_length()
        return declared is None or declared <= self._limits.max_body_bytes

    def _discard_buffered_body(self) -> bool | None:
        """Discard the request body events h11 already has: True at its end, False if the
        body is malformed or passes ``max_body_bytes`` (close), None when more bytes are needed."""
        h = self._h
        limit = self._limits.max_body_bytes
        while True:
            try:
                event = h.next_event()
            except h11.RemoteProtocolError:
                return False
            kind = type(event)
            if kind is h11.EndOfMessage:
                return True
            if kind is h11.Data:
                read = self._body_read = self._body_read + len(event.data)  # type: ignore[union-attr]
                if read > limit or read + _chunk_position(h) > limit:
                    return False
                continue
            if event is h11.NEED_DATA:
                return None if self._chunk_error(limit) is None else False
            return False

    async def _drain(self) -> bool:
        """After the response: read and discard the unread rest of the request body."""
        h = self._h
        while True:
            outcome = self._discard_buffered_body()
            if outcome is not None:
                return outcome
            self._deadline = trio.current_time() + self._limits.body_timeout
            try:
                data = await self._receive()
            except ClientDisconnected:
                return False
            h.receive_data(data)

    async def _linger(self) -> None:
        """Half-close and discard input for a short while so our last response is not lost
        to a RST provoked by unread client bytes."""
        stream = self._stream
        self._deadline = trio.current_time() + self._limits.linger_timeout
        try:
            if isinstance(stream, trio.abc.HalfCloseableStream):
                await stream.send_eof()
            while await stream.receive_some(RECEIVE_SIZE):
                pass
        except _TRANSPORT_ERRORS:
            pass


# h11's own header grammar (RFC 9110 field-name token, field-value without CR/LF/NUL and
# without surrounding whitespace); we validate handler headers once and remember good pairs.
_FIELD_NAME = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_FIELD_VALUE = re.compile(rb"(?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?")
_CONTENT_LENGTH = re.compile(rb"[0-9]{1,19}")
_VALID_CACHE_MAX = 4096
_valid_items: dict[tuple[Any, Any], tuple[bytes, bytes, bytes]] = {}
_ours = frozenset({b"transfer-encoding", b"connection", b"date"})  # framing and connection are ours


def _response_items(
    headers: Iterable[tuple[bytes, bytes]], streaming: bool
) -> tuple[list[tuple[bytes, bytes, bytes]], bool]:
    """Validated h11 header items (raw name, lower name, value) from a handler's headers."""
    items: list[tuple[bytes, bytes, bytes]] = []
    has_id = False
    cache = _valid_items
    for pair in headers:
        item = cache.get(pair)
        if item is None:
            name, value = pair
            if type(name) is not bytes:
                name = name.encode("ascii")
            if type(value) is not bytes:
                value = value.encode("latin-1") if isinstance(value, str) else bytes(value)
            if not _FIELD_NAME.fullmatch(name):
                raise h11.LocalProtocolError(f"illegal header name {name!r}")
            if not _FIELD_VALUE.fullmatch(value):
                raise h11.LocalProtocolError(f"illegal header value for {name!r}")
            lower = name.lower()
            if lower == b"content-length" and not _CONTENT_LENGTH.fullmatch(value):
                raise h11.LocalProtocolError("bad content-length")
            item = (lower, lower, value)
            if len(cache) >= _VALID_CACHE_MAX:
                cache.clear()
            cache[pair] = item
        lower = item[1]
        if lower in _ours:
            continue
        if lower == b"content-length":
            if not streaming:
                continue  # a bytes body: we compute it
        elif lower == REQUEST_ID_HEADER:
            has_id = True
        items.append(item)
    return items, has_id


def _both_framings(h: h11.Connection, request: Request) -> bool:
    """Content-Length next to Transfer-Encoding (RFC 9112 §6.1). h11 reads such a body as
    chunked and ignores the length; a server in front of us or behind us may not, and the bytes
    one of them takes for the rest of this body the other takes for a next request."""
    chunked = _body_is_chunked(h)
    if chunked is False:
        return False
    if chunked is None and request.header(b"transfer-encoding") is None:
        return False
    return request.header(b"content-length") is not None


def _origin_path(target: str) -> str:
    """Path of an absolute-form target (``http://host/p``) or ``*``; else as given."""
    if target == "*":
        return target
    scheme_end = target.find("://")
    if scheme_end > 0:
        slash = target.find("/", scheme_end + 3)
        return target[slash:] if slash >= 0 else "/"
    return target


async def _aclose_body(body: object) -> None:
    aclose = getattr(body, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:
            logger.debug("closing a response body iterator failed", exc_info=True)


async def serve_connection(
    stream: trio.abc.Stream,
    handler: Handler,
    limits: HTTPLimits | None = None,
    *,
    client_addr: str | None = None,
    on_request_done: RequestDoneHook | None = None,
    shutdown: ShutdownSignal | None = None,
    security_headers: SecurityHeaders | None = None,
) -> None:
    """Serve HTTP/1.1 on ``stream`` until the peer leaves, a limit closes it or shutdown.

    Takes ownership of ``stream`` and closes it (gracefully, bounded by ``linger_timeout``;
    forcefully if cancelled). Never raises for anything the peer does.
    """
    limits = limits or HTTPLimits()
    wheel = _DeadlineWheel(limits)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(wheel.run)
        await _serve_connection(
            stream, handler, limits, client_addr, on_request_done, shutdown, wheel, security_headers
        )
        nursery.cancel_scope.cancel()


async def _serve_connection(
    stream: trio.abc.Stream,
    handler: Handler,
    limits: HTTPLimits,
    client_addr: str | None,
    on_request_done: RequestDoneHook | None,
    shutdown: ShutdownSignal | None,
    wheel: _DeadlineWheel,
    security: SecurityHeaders | None = None,
) -> None:
    if client_addr is None:
        client_addr = peer_address(stream)
    conn = _Connection(stream, handler, limits, client_addr, on_request_done, shutdown, security)
    try:
        await conn.run(wheel)
    finally:
        with trio.move_on_after(limits.linger_timeout):
            try:
                await stream.aclose()
            except _TRANSPORT_ERRORS:
                pass


class HTTPServer:
    """Accepts connections from any ``trio.abc.Listener`` and serves each with ``serve_connection``.

    ``listeners`` may be plain ``SocketListener``s or a TLS listener whose ``accept()`` returns a
    ``TLSStream`` (handshake on first receive); or pass ``stream_wrapper`` to wrap each accepted
    stream (e.g. ``lambda s: TLSStream(s, ...)``). ``shutdown()`` starts a graceful shutdown and
    ``serve()`` returns once every connection is gone or ``shutdown_grace`` has passed.
    ``security_headers``: added to every response (see ``security_headers.py``); None adds none.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        limits: HTTPLimits | None = None,
        on_request_done: RequestDoneHook | None = None,
        shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE,
        stream_wrapper: Callable[[trio.abc.Stream], trio.abc.Stream] | None = None,
        security_headers: SecurityHeaders | None = None,
    ) -> None:
        self._handler = handler
        self._security = security_headers
        self.limits = limits or HTTPLimits()
        self._on_done = on_request_done
        self._grace = shutdown_grace
        self._wrap = stream_wrapper
        self._shutdown = ShutdownSignal()
        self._wheel = _DeadlineWheel(self.limits)
        self.active_connections = 0
        self.accepted_connections = 0
        self.rejected_connections = 0  # over max_connections

    @property
    def shutting_down(self) -> bool:
        return self._shutdown.is_set

    def shutdown(self) -> None:
        """Begin a graceful shutdown (idempotent, callable from any task of the same run)."""
        self._shutdown.begin()

    async def serve(
        self,
        listeners: Sequence[trio.abc.Listener[Any]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until ``shutdown()``; takes ownership of (and closes) the listeners."""
        async with trio.open_nursery() as outer:
            outer.start_soon(self._wheel.run)
            async with trio.open_nursery() as connections:
                try:
                    async with trio.open_nursery() as accepters:
                        for listener in listeners:
                            accepters.start_soon(self._accept_loop, listener, connections)
                        task_status.started()
                        await self._shutdown.wait()
                        accepters.cancel_scope.cancel()
                finally:
                    self._shutdown.begin()
                    connections.cancel_scope.deadline = trio.current_time() + self._grace
            outer.cancel_scope.cancel()

    async def _accept_loop(self, listener: trio.abc.Listener[Any], nursery: trio.Nursery) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        logger.error("accept failed: %s; retrying in 0.1 s", errno.errorcode[exc.errno])
                        await trio.sleep(0.1)
                        continue
                    raise
                if self.active_connections >= self.limits.max_connections:
                    self.rejected_connections += 1
                    await trio.aclose_forcefully(stream)
                    continue
                self.active_connections += 1
                self.accepted_connections += 1
                nursery.start_soon(self._run_connection, stream)

    async def _run_connection(self, stream: trio.abc.Stream) -> None:
        try:
            client_addr = peer_address(stream)
            if self._wrap is not None:
                stream = self._wrap(stream)
            await _serve_connection(
                stream, self._handler, self.limits, client_addr, self._on_done, self._shutdown, self._wheel,
                self._security,
            )
        except Exception:
            logger.error("connection task failed", exc_info=True)
        finally:
            self.active_connections -= 1
