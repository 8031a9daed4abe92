"""A TCP stream with trio's exact semantics and less of its generic machinery per call.

Why not ``trio.SocketStream``
-----------------------------
trio's socket stream is correct and general, and a connection of ours makes a dozen calls on
it (the TLS handshake's flights, the request, the response, close_notify). Each call goes
through several layers built for every kind of socket: a per-call conflict detector, a
``contextmanager`` that translates ``OSError``, the socket method wrapper, and
``_nonblocking_helper`` with its ``asynccontextmanager`` -- two generator-based context
managers and a handful of frames per call, a measurable part of what a TLS handshake costs the
gateway in Python.

:class:`FastSocketStream` makes the same system calls at the same moments with the same
scheduling behaviour, in one frame:

- every call starts with ``checkpoint_if_cancelled()``; a system call that succeeds at once is
  followed by one cancel-shielded scheduling round (exactly trio's ``_try_sync``: a ready peer
  never keeps the run loop from other tasks, and a byte taken is never lost to a cancel);
- one that would block waits (``wait_readable`` / ``wait_writable``, cancellable: a cancelled
  receive took nothing; a cancelled send may have sent part of its data, as trio's) and retries,
  with no further round;
- ``BrokenResourceError`` for a failed socket (the ``OSError`` as its cause),
  ``ClosedResourceError`` after ``aclose()``, ``BusyResourceError`` for two tasks sending (or
  receiving) at once; ``TCP_NODELAY`` on and ``TCP_NOTSENT_LOWAT`` 16 KiB, as trio sets them.

``tests/http/test_http_transport.py`` runs trio's own stream conformance checks
(``trio.testing.check_half_closeable_stream``) against it over real sockets.

``socket`` is the trio socket object (``peer_address`` and the TLS layer read it), and
``nonblocking_writes`` tells the TLS stream it may write its session tickets to that socket
directly while no send is in progress (tls/stream.py).

:class:`FastSocketListener` wraps a ``trio.SocketListener`` (the sockets the supervisor bound,
or ``open_tcp_listeners``') and hands out :class:`FastSocketStream`, with the accept errors
trio's listener ignores ignored the same way.
"""

from __future__ import annotations

import errno
import socket as _stdlib
from typing import Final

import trio
from trio.lowlevel import cancel_shielded_checkpoint, checkpoint_if_cancelled, wait_readable, wait_writable

__all__ = ["FastSocketListener", "FastSocketStream"]

DEFAULT_RECEIVE_SIZE: Final = 65536
_NOTSENT_LOWAT = 16 * 1024
_CLOSED_ERRNOS = frozenset({errno.EBADF, errno.ENOTSOCK})
# as trio's SocketListener: a connection that went away before we accepted it is no error
_IGNORABLE_ACCEPT_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPERM, errno.EPROTO})
_TCP_NOTSENT_LOWAT = getattr(_stdlib, "TCP_NOTSENT_LOWAT", None)


def _broken(exc: OSError) -> trio.BrokenResourceError | trio.ClosedResourceError:
    if exc.errno in _CLOSED_ERRNOS:
        return trio.ClosedResourceError("this socket was already closed")
    return trio.BrokenResourceError(f"socket connection broken: {exc}")


class FastSocketStream(trio.abc.HalfCloseableStream):
    """A connected TCP socket as a trio stream; see the module docstring."""

    __slots__ = ("socket", "_sock", "_sending", "_receiving", "_eof_sent")
    nonblocking_writes = True

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.socket = sock
        raw: _stdlib.socket = sock._sock  # type: ignore[attr-defined]  # trio's wrapped socket
        self._sock = raw
        self._sending = False
        self._receiving = False
        self._eof_sent = False
        if raw.family in (_stdlib.AF_INET, _stdlib.AF_INET6):
            try:
                raw.setsockopt(_stdlib.IPPROTO_TCP, _stdlib.TCP_NODELAY, 1)
                if _TCP_NOTSENT_LOWAT is not None:
                    raw.setsockopt(_stdlib.IPPROTO_TCP, _TCP_NOTSENT_LOWAT, _NOTSENT_LOWAT)
            except OSError:
                pass  # e.g. the peer already reset the connection: the first I/O will say so

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this stream")
        if max_bytes is None:
            max_bytes = DEFAULT_RECEIVE_SIZE
        elif max_bytes < 1:
            await trio.lowlevel.checkpoint()
            raise ValueError("max_bytes must be >= 1")
        self._receiving = True
        try:
            await checkpoint_if_cancelled()
            sock = self._sock
            try:
                data = sock.recv(max_bytes)
            except BlockingIOError:
                pass
            except OSError as exc:
                raise _broken(exc) from exc
            else:
                await cancel_shielded_checkpoint()
                return data
            while True:
                await wait_readable(sock)
                try:
                    return sock.recv(max_bytes)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    raise _broken(exc) from exc
        finally:
            self._receiving = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._sending = True
        try:
            await checkpoint_if_cancelled()
            sock = self._sock
            if sock.fileno() < 0:
                raise trio.ClosedResourceError("this socket was already closed")
            if self._eof_sent:
                raise trio.ClosedResourceError("can't send data after sending EOF")
            total = len(data)
            if not total:
                await cancel_shielded_checkpoint()
                return
            view: memoryview | None = None
            sent = 0
            while True:
                try:
                    sent += sock.send(data if view is None else view[sent:])
                except BlockingIOError:
                    pass
                except OSError as exc:
                    raise _broken(exc) from exc
                else:
                    if sent >= total:
                        break
                if view is None:
                    view = memoryview(data).cast("B")
                await wait_writable(sock)
            if view is None:
                await cancel_shielded_checkpoint()  # the whole send went through at once
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._sending = True
        try:
            if self._sock.fileno() < 0:
                await trio.lowlevel.checkpoint()
                raise trio.ClosedResourceError("this socket was already closed")
            await wait_writable(self._sock)
        finally:
            self._sending = False

    async def send_eof(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint()
            if self._eof_sent:
                return
            try:
                self._sock.shutdown(_stdlib.SHUT_WR)
            except OSError as exc:
                raise _broken(exc) from exc
            self._eof_sent = True
        finally:
            self._sending = False

    async def aclose(self) -> None:
        self.socket.close()  # trio's close wakes any task waiting on this socket first
        await trio.lowlevel.checkpoint()


class FastSocketListener(trio.abc.Listener[FastSocketStream]):
    """Accept TCP connections from ``listener``'s socket as :class:`FastSocketStream`."""

    def __init__(self, listener: trio.SocketListener) -> None:
        self.listener = listener
        self.socket = listener.socket
        self._raw: _stdlib.socket = listener.socket._sock  # type: ignore[attr-defined]

    async def accept(self) -> FastSocketStream:
        await checkpoint_if_cancelled()
        raw = self._raw
        waited = False
        while True:
            try:
                conn, _ = raw.accept()
            except BlockingIOError:
                waited = True
                await wait_readable(raw)
                continue
            except OSError as exc:
                if exc.errno in _CLOSED_ERRNOS:
                    raise trio.ClosedResourceError("the listening socket was closed") from None
                if exc.errno not in _IGNORABLE_ACCEPT_ERRNOS:
                    raise
                continue
            break
        if not waited:
            await cancel_shielded_checkpoint()
        conn.setblocking(False)
        return FastSocketStream(trio.socket.from_stdlib_socket(conn))

    async def aclose(self) -> None:
        await self.listener.aclose()
