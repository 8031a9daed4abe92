"""One HTTP/1.1 connection: a thin trio loop around one ``h11.Connection``.

h11 owns the protocol: parsing, framing, keep-alive and the per-cycle state machine. A
:class:`Connection` only moves bytes between a ``trio.abc.Stream`` and h11 and decides *when* to
give up on a peer (``_deadlines.py``). It works over any stream (plain TCP in tests,
``TLSStream`` in production: the TLS handshake happens inside the first ``receive_some``, so a
failed handshake surfaces as a failed receive and the connection is closed quietly like any
other broken transport).

One connection = one task, requests strictly one at a time. Pipelining needs nothing special:
bytes of request N+1 that arrived with request N stay in h11's buffer and are parsed after
``start_next_cycle()``, so responses go out in order. The class is split by concern: the head
and the exchange here, the request body in ``_body.py``, response writing in ``_response.py``.

Limits and the statuses users expect: a header block over ``max_header_bytes`` gets 431 (h11
enforces this only for heads still incomplete, so a complete over-sized head that arrived in
one read is measured here too); a body over ``max_body_bytes`` gets 413 (``_body.py``); anything
h11 rejects gets 400 (501 for an unsupported Transfer-Encoding, as h11 hints); all with the JSON
error body and ``X-Request-Id``, then close.

Framing strictness (RFC 9112). h11 is more lenient than a gateway may be: it takes a bare LF for
CRLF, unfolds obsolete line folding and reads a body that has both Content-Length and
Transfer-Encoding as chunked (ignoring the length). A server in front of us or behind us that
reads such bytes differently sees other request boundaries than we do (request smuggling), so:
the raw head is searched for a bare LF or a folded line before h11 parses it, once per head
(400), and a request with both framing headers is answered 400 and the connection closed
(§6.1). These checks read h11's buffer through ``_h11_shortcuts``.

Closing politely. When we close while the client may still be sending (an unread or rejected
body, a protocol error), closing at once would make the kernel answer the unread bytes with a
RST that can destroy our error response in flight. So we half-close if the stream allows it and
read-and-discard for at most ``linger_timeout`` (nginx's lingering close).

A streaming response (echo, sidecar) may consume the request body itself, so a client waiting
for ``100 Continue`` gets it just before the response head, the last moment h11 allows one.

Switching protocols. A ``Response(101, upgrade=...)`` (a WebSocket tunnel) ends HTTP on this
connection: once the request (which must have no body) is consumed, h11 waits in
MIGHT_SWITCH_PROTOCOL; the 101 head moves both sides to SWITCHED_PROTOCOL, and the stream, with
the bytes h11 had buffered after the request head (``trailing_data``), belongs to the upgrade
until it returns; then the connection closes. The tunnel has no connection deadline (it keeps its
own), and a graceful shutdown cancels it. If the 101 cannot be sent, the upgrade is abandoned
(``messages.Upgrade``) and the client gets a 500 (a handler's mistake) or nothing (it left).
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import h11
import trio

from ..errors import (
    BadRequest,
    ClientDisconnected,
    HeaderTooLarge,
    MethodNotAllowed,
    NotImplementedByServer,
    QpherError,
)
from . import _h11_shortcuts as _h11
from ._body import CONTINUE, BodyReader
from ._deadlines import NO_DEADLINE, DeadlineWheel, ShutdownSignal
from ._response import ResponseWriter
from .limits import RECEIVE_SIZE, HTTPLimits
from .messages import Request, Response, Upgrade, error_response, new_request_id
from .security_headers import SecurityHeaders

if TYPE_CHECKING:
    from ..tls.engine import TLSInfo

__all__ = ["TRANSPORT_ERRORS", "Connection", "Handler", "RequestDoneHook"]

logger = logging.getLogger("qpher.http")

Handler = Callable[[Request], Awaitable[Response]]
RequestDoneHook = Callable[[Request, int, float, int], None]

# Errors a transport may raise when the peer is gone or the TLS layer failed (handshake
# included). They all mean "this connection is over", never "the server is broken".
TRANSPORT_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError, QpherError)
_INF = NO_DEADLINE
_receive_buffer = _h11.receive_buffer
_body_is_chunked = _h11.body_is_chunked
_header_pairs = _h11.header_pairs

# The line endings of a request head, checked on the raw bytes before h11 parses them: h11
# accepts a bare LF and obsolete line folding (RFC 9112 §2.2, §5.2), which a server behind us
# may read differently, so we refuse both. One search from each LF: a match of one byte is a
# LF without its CR, of two a LF then SP/HTAB (a folded line), of three CRLF CRLF, the clean
# end of the head (what follows is body, never searched).
_HEAD_LINE_ENDS = re.compile(rb"\n(?:(?<!\r\n)|[ \t]|\r\n)")


class Connection(BodyReader, ResponseWriter):
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
        "_tls",
        "_tunnel",
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
        self._deadline = _INF  # enforced by a DeadlineWheel: a plain float, cheap to move
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
        self._tls: TLSInfo | None = None  # the TLSStream's negotiated parameters, read at the first request
        self._tunnel: trio.CancelScope | None = None  # while an upgrade runs (cancelled at shutdown)


    def _shutdown_requested(self) -> None:
        if self._idle:
            self._scope.cancel()
        elif self._tunnel is not None:
            self._tunnel.cancel()

    # ---- transport -------------------------------------------------------------------

    async def _receive(self) -> bytes:
        try:
            data = await self._stream.receive_some(RECEIVE_SIZE)
        except TRANSPORT_ERRORS as exc:
            raise ClientDisconnected("client disconnected") from exc
        if not data:
            self._eof = True
        return data  # type: ignore[return-value]  # a bytearray from some streams: h11 takes either

    async def _send(self, data: bytes) -> None:
        self._deadline = trio.current_time() + self._limits.send_timeout
        try:
            await self._stream.send_all(data)
        except TRANSPORT_ERRORS as exc:
            self._h.send_failed()
            raise ClientDisconnected("client disconnected") from exc
        self._bytes_sent += len(data)

    # ---- main loop -------------------------------------------------------------------

    async def run(self, wheel: DeadlineWheel) -> None:
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
            self._request = None  # it refers back to us: no cycle left for the GC to find
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
            reuse = await self._exchange(event)
            # The request refers back to this connection (its body reader): let it go now, so
            # that an idle connection holds no request and a closed one is freed by reference
            # counting at once, not at the cyclic GC's next full pass.
            self._request = None
            if not reuse:
                return
            h.start_next_cycle()

    async def _receive_head(self, first: bool) -> h11.Request | None:
        """The next request head, or None for a clean end (EOF, idle close, shutdown)."""
        h = self._h
        if _receive_buffer(h) or self._eof:
            checked = self._check_head(0)
            event = h.next_event()
        else:
            # Nothing buffered and no EOF seen: h11 could only answer NEED_DATA (both sides
            # IDLE after start_next_cycle, or the first head). Skip asking.
            checked = 0
            event = h11.NEED_DATA
        if event is h11.NEED_DATA:
            shutdown = self._shutdown
            buffered = bool(_receive_buffer(h))
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
    def _head_error(self, exc: h11.RemoteProtocolError) -> QpherError:
        status = exc.error_status_hint
        if status == 431:
            return HeaderTooLarge(f"request header block exceeds {self._limits.max_header_bytes} bytes")
        if status == 501:
            return NotImplementedByServer("unsupported transfer-encoding")
        return BadRequest("malformed request")

    # ---- one request/response cycle --------------------------------------------------

    async def _exchange(self, event: h11.Request) -> bool:
        """Run the handler and send its response; True if the connection may be reused."""
        started = self._started = time.perf_counter()
        request = self._begin(event)
        response = self._refusal(event, request)
        if response is None:
            response = await self._call_handler(request)
            if response is None:  # the client left while the handler ran
                self._done(request, 499, started)
                return False
        return await self._respond(request, response, started)

    def _begin(self, event: h11.Request) -> Request:
        """A new request/response cycle: fresh body state and the ``Request`` for ``event``."""
        self._generation += 1
        self._requests += 1
        self._body_started = False
        self._body_done = False
        self._body_error = None
        self._body_read = 0
        self._bytes_sent = 0
        tls = self._tls
        if tls is None:
            tls = self._tls = getattr(self._stream, "info", None)
        target = event.target.decode("ascii")  # h11 admits only visible ASCII in a target
        q = target.find("?")
        if q < 0:
            path, query = target, ""
        else:
            path, query = target[:q], target[q + 1 :]
        if path[:1] != "/":
            path = _origin_path(path)
        request = self._request = Request(
            event.method.decode("ascii"),
            target,
            path,
            query,
            _header_pairs(event.headers),
            event.http_version.decode("ascii"),
            new_request_id(),
            self._client_addr,
            {},
            self,
            self._generation,
            tls,
        )
        return request

    def _refusal(self, event: h11.Request, request: Request) -> Response | None:
        """The answer to a request the handler never sees (431, CONNECT, both framings)."""
        limits = self._limits
        headers = request.headers
        head_size = len(event.target) + len(event.method) + 12 + 4 * len(headers)
        for name, value in headers:
            head_size += len(name) + len(value)
        if head_size > limits.max_header_bytes:
            # h11 only bounds heads that are still incomplete; this one arrived whole.
            error: QpherError = HeaderTooLarge(
                f"request header block exceeds {limits.max_header_bytes} bytes"
            )
            self._body_error = error  # never read this request's body; close after answering
            return error_response(error, request.request_id)
        if event.method == b"CONNECT":
            return error_response(MethodNotAllowed("CONNECT is not supported"), request.request_id)
        if _both_framings(self._h, request):
            error = BadRequest("request has both content-length and transfer-encoding")
            self._body_error = error  # never read this body (RFC 9112 §6.1: close after answering)
            return error_response(error, request.request_id)
        return None

    async def _call_handler(self, request: Request) -> Response | None:
        """The handler's response, an error rendered for any failure; None if the client left."""
        try:
            response = await self._handler(request)
            if type(response) is not Response:
                raise TypeError(f"handler returned {type(response).__name__}, not Response")
            return response
        except ClientDisconnected:
            return None
        except QpherError as exc:
            return error_response(exc, request.request_id)
        except Exception:
            logger.error(
                "unhandled exception in handler",
                exc_info=True,
                extra={"fields": {"request_id": request.request_id, "method": request.method}},
            )
            return error_response(QpherError("internal server error"), request.request_id)

    async def _respond(self, request: Request, response: Response, started: float) -> bool:
        """Send ``response``, then settle the request body; True if the connection may be reused."""
        if response.upgrade is not None:
            return await self._switch(request, response, response.upgrade, started)
        h = self._h
        limits = self._limits
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
        most = limits.max_requests_per_connection
        if (shutdown is not None and shutdown.is_set) or (most is not None and self._requests >= most):
            keep_alive = False
        try:
            if invite:
                await self._send(h.send(CONTINUE))
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


    async def _switch(self, request: Request, response: Response, upgrade: Upgrade, started: float) -> bool:
        """Send the 101 and run ``upgrade`` on the stream, or abandon it; either way the connection
        then closes (always False)."""
        h = self._h
        handed = False  # run or abandon called: exactly one of them, whatever happens here
        try:
            try:
                if h.their_state is h11.SEND_BODY and self._body_error is None and not self._body_started:
                    with contextlib.suppress(h11.RemoteProtocolError):
                        h.next_event()  # the EndOfMessage of a request without a body
                if not _h11.switch_pending(h):
                    raise h11.LocalProtocolError("an upgrade needs a request with Upgrade and no body")
                head = self._switch_head(request, response)
            except (h11.LocalProtocolError, TypeError, ValueError, UnicodeError):
                handed = True
                upgrade.abandon()
                logger.error(
                    "handler produced an invalid upgrade",
                    exc_info=True,
                    extra={"fields": {"request_id": request.request_id}},
                )
                fallback = error_response(QpherError("internal server error"), request.request_id)
                with contextlib.suppress(ClientDisconnected):
                    await self._send_response(request, fallback, keep_alive=False)
                self._done(request, fallback.status, started)
                return False
            try:
                await self._send(head)
            finally:
                self._done(request, 101, started)
            received = bytes(h.trailing_data[0])
            self._deadline = _INF  # the tunnel keeps its own deadlines
            tunnel = self._tunnel = trio.CancelScope()
            handed = True
            try:
                with tunnel:
                    await upgrade.run(self._stream, received)
            except Exception:
                logger.error("upgraded connection failed", exc_info=True,
                             extra={"fields": {"request_id": request.request_id}})
            finally:
                self._tunnel = None
            return False
        except ClientDisconnected:
            return False
        finally:
            if not handed:
                upgrade.abandon()

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
        except TRANSPORT_ERRORS:
            pass



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

