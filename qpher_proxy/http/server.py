"""HTTP/1.1 server: accepts connections and serves each in its own task.

Theory of operation
-------------------
The server is a thin trio loop around h11, split by concern:

- ``limits.py``: the sizes and timeouts (``HTTPLimits``), with the nginx settings they mirror;
- ``_deadlines.py``: one deadline per connection, enforced by one ``DeadlineWheel`` task per
  server, and the ``ShutdownSignal``;
- ``_connection.py``: one connection -- the request head (with the framing checks h11 does not
  make), the request/response exchange, the lingering close;
- ``_body.py``: reading the request body for the handler, and draining what it left unread;
- ``_response.py``: writing responses (validated headers, security headers, streaming, the
  error fallback); a refused head is answered through the same error renderer as any error;
- ``_h11_shortcuts.py``: every place the server reaches into h11's internals;
- ``_h2connection.py`` (with ``_h2guard.py`` and ``grpc.py``): one HTTP/2 connection, the
  same handler per stream;
- this module: the accept loop and the per-connection entry point.

HTTP/2: with ``http2`` limits set, a connection whose stream has a TLS handshake (``TLSStream``)
runs it first and is served by ``HTTP2Connection`` when ALPN chose ``h2`` (offered to TLS 1.3
clients only, ``tls/context.py``); every other connection is served by the HTTP/1.1 loop as
before. Without ``http2`` nothing changes: the handshake runs inside the first receive.

Graceful shutdown (``HTTPServer.shutdown()``): listeners close (new connections are refused by
the kernel), connections waiting idle for a next request are cancelled at once, busy ones get
``Connection: close`` on their current response; ``HTTPServer`` cancels whatever is left after
``shutdown_grace`` seconds.

Connection limit: like nginx with one worker when ``worker_connections`` is exhausted, a
connection over ``max_connections`` is accepted and closed at once (rather than left in the
kernel backlog, where the client would hang until its own timeout); existing connections are
not affected.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Sequence
from typing import Any

import trio

from ._connection import TRANSPORT_ERRORS, Connection, Handler, RequestDoneHook
from ._deadlines import DeadlineWheel, ShutdownSignal
from ._h2connection import HTTP2Connection, HTTP2Observer
from ._memory import MemoryReleaser
from .limits import DEFAULT_SHUTDOWN_GRACE, HTTP2Limits, HTTPLimits
from .messages import new_request_id
from .security_headers import SecurityHeaders

__all__ = [
    "HTTP2Limits",
    "HTTP2Observer",
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


async def serve_connection(
    stream: trio.abc.Stream,
    handler: Handler,
    limits: HTTPLimits | None = None,
    *,
    client_addr: str | None = None,
    on_request_done: RequestDoneHook | None = None,
    shutdown: ShutdownSignal | None = None,
    security_headers: SecurityHeaders | None = None,
    http2: HTTP2Limits | None = None,
    h2_observer: HTTP2Observer | None = None,
) -> None:
    """Serve HTTP/1.1 (or HTTP/2, see the module docstring) on ``stream`` until the peer leaves,
    a limit closes it or shutdown.

    Takes ownership of ``stream`` and closes it (gracefully, bounded by ``linger_timeout``;
    forcefully if cancelled). Never raises for anything the peer does.
    """
    limits = limits or HTTPLimits()
    wheel = DeadlineWheel(limits)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(wheel.run)
        await _serve_connection(
            stream, handler, limits, client_addr, on_request_done, shutdown, wheel, security_headers,
            http2, h2_observer,
        )
        nursery.cancel_scope.cancel()


async def _serve_connection(
    stream: trio.abc.Stream,
    handler: Handler,
    limits: HTTPLimits,
    client_addr: str | None,
    on_request_done: RequestDoneHook | None,
    shutdown: ShutdownSignal | None,
    wheel: DeadlineWheel,
    security: SecurityHeaders | None = None,
    http2: HTTP2Limits | None = None,
    h2_observer: HTTP2Observer | None = None,
) -> None:
    if client_addr is None:
        client_addr = peer_address(stream)
    try:
        if http2 is not None and await _negotiated_h2(stream, limits):
            h2conn = HTTP2Connection(stream, handler, limits, http2, client_addr, on_request_done, shutdown,
                                     security, h2_observer)
            await h2conn.run(wheel)
        else:
            conn = Connection(stream, handler, limits, client_addr, on_request_done, shutdown, security)
            await conn.run(wheel)
    finally:
        with trio.move_on_after(limits.linger_timeout):
            try:
                await stream.aclose()
            except TRANSPORT_ERRORS:
                pass


async def _negotiated_h2(stream: trio.abc.Stream, limits: HTTPLimits) -> bool:
    """Run the TLS handshake of a ``TLSStream`` (bounded by ``header_timeout``, as the first
    request head would be) and tell whether ALPN chose h2. A failed handshake reads as HTTP/1.1:
    its first receive fails again, and the connection closes quietly as before."""
    do_handshake = getattr(stream, "do_handshake", None)
    if do_handshake is None:
        return False
    with trio.move_on_after(limits.header_timeout):
        try:
            await do_handshake()
        except TRANSPORT_ERRORS:
            return False
    info = getattr(stream, "info", None)
    return info is not None and info.alpn == "h2"


class HTTPServer:
    """Accepts connections from any ``trio.abc.Listener`` and serves each with ``serve_connection``.

    ``listeners`` may be plain ``SocketListener``s or a TLS listener whose ``accept()`` returns a
    ``TLSStream`` (handshake on first receive); or pass ``stream_wrapper`` to wrap each accepted
    stream (e.g. ``lambda s: TLSStream(s, ...)``). ``shutdown()`` starts a graceful shutdown and
    ``serve()`` returns once every connection is gone or ``shutdown_grace`` has passed.
    ``security_headers``: added to every response (see ``security_headers.py``); None adds none.
    ``http2``: serve HTTP/2 to clients whose TLS handshake chose it (None: HTTP/1.1 only);
    ``h2_observer`` hears its connection, stream and GOAWAY counts.
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
        http2: HTTP2Limits | None = None,
        h2_observer: HTTP2Observer | None = None,
    ) -> None:
        self._handler = handler
        self._http2 = http2
        self._h2_observer = h2_observer
        self._security = security_headers
        self.limits = limits or HTTPLimits()
        self._on_done = on_request_done
        self._grace = shutdown_grace
        self._wrap = stream_wrapper
        self._shutdown = ShutdownSignal()
        self._wheel = DeadlineWheel(self.limits)
        self.active_connections = 0
        self.accepted_connections = 0
        self.rejected_connections = 0  # over max_connections
        # hands the heap back after waves of closed connections
        self.memory = MemoryReleaser(lambda: self.active_connections)
        self._background: trio.Nursery | None = None

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
            self._background = outer
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
                self.memory.opened(self.active_connections)
                nursery.start_soon(self._run_connection, stream)

    async def _run_connection(self, stream: trio.abc.Stream) -> None:
        try:
            client_addr = peer_address(stream)
            if self._wrap is not None:
                stream = self._wrap(stream)
            await _serve_connection(
                stream, self._handler, self.limits, client_addr, self._on_done, self._shutdown, self._wheel,
                self._security, self._http2, self._h2_observer,
            )
        except Exception:
            logger.error("connection task failed", exc_info=True)
        finally:
            self.active_connections -= 1
            if self._background is not None:
                self.memory.closed(self.active_connections, self._background)
