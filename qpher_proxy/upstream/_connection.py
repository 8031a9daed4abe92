"""One connection to the upstream, and the one place where foreign errors become ours.

Theory of operation
-------------------
**Errors are mapped at one boundary** (``io_step`` and ``translate``): DNS failure, refused or
reset connections and TLS failures become ``UpstreamUnavailable`` (502), expired deadlines
``UpstreamTimeout`` (504), h11's ``RemoteProtocolError`` ``UpstreamBadResponse`` (502); the
foreign exception is kept as ``__cause__`` for the log, and no message names the upstream's
address.

Every await on the upstream's stream runs inside ``io_step(phase, deadline)``; the *phase*
(``pool``, ``connect``, ``tls``, ``send``, ``head``, ``body``) picks the message, so a log line
says how far the exchange got without naming the upstream.
"""

from __future__ import annotations

import contextlib
import select
import ssl
from collections.abc import Iterator

import h11
import trio

from qpher_proxy.errors import UpstreamBadResponse, UpstreamError, UpstreamTimeout, UpstreamUnavailable

_FOREIGN = (
    OSError,
    ssl.SSLError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    h11.RemoteProtocolError,
)

# phase -> (message when the connection failed, message when the deadline expired)
PHASE_MESSAGES = {
    "pool": ("", "timed out waiting for a free upstream connection"),
    "connect": ("could not connect to the upstream", "timed out connecting to the upstream"),
    "tls": ("tls handshake with the upstream failed", "timed out in the tls handshake with the upstream"),
    "send": ("the upstream connection failed while sending the request",
             "timed out sending the request to the upstream"),
    "head": ("the upstream closed the connection before responding", "the upstream did not respond in time"),
    "body": ("the upstream connection failed mid-response", "the upstream stalled mid-response"),
}


def translate(exc: BaseException, phase: str) -> UpstreamError:
    if isinstance(exc, h11.RemoteProtocolError):
        return UpstreamBadResponse("the upstream sent an invalid response")
    return UpstreamUnavailable(PHASE_MESSAGES[phase][0])


@contextlib.contextmanager
def io_step(phase: str, deadline: float) -> Iterator[trio.CancelScope]:
    """Run one I/O step under ``deadline``; foreign failures leave as ``UpstreamError``."""
    try:
        with trio.CancelScope(deadline=deadline) as scope:
            yield scope
    except _FOREIGN as exc:
        raise translate(exc, phase) from exc
    if scope.cancelled_caught:
        raise UpstreamTimeout(PHASE_MESSAGES[phase][1])


class UpstreamConnection:
    """One TCP (+TLS) connection to the upstream and its h11 state machine."""

    __slots__ = ("stream", "raw", "h11", "requests", "idle_since")

    def __init__(self, stream: trio.abc.Stream, raw: trio.SocketStream, max_head: int) -> None:
        self.stream = stream
        self.raw = raw
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_head)
        self.requests = 0
        self.idle_since = 0.0

    def looks_dropped(self) -> bool:
        """True if the idle socket is readable: EOF from the upstream, or bytes nobody asked for."""
        try:
            poller = select.poll()
            poller.register(self.raw.socket.fileno(), select.POLLIN)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return True

    def close(self) -> None:
        # Synchronous on purpose: closing the socket is all there is to do (no close_notify is
        # owed in https_compatible mode), trio wakes any task blocked on it with
        # ClosedResourceError, and a cleanup path that cannot checkpoint cannot be cancelled
        # half-way - the pool's bookkeeping stays exact whatever is being cancelled around it.
        self.raw.socket.close()
