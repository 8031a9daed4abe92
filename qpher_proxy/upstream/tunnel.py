"""A byte tunnel between two trio streams: what a WebSocket becomes after its 101.

Theory of operation
-------------------
A :class:`Tunnel` joins a *client* stream and an *upstream* stream, any ``trio.abc.Stream`` (the
client's ``TLSStream`` after an HTTP/1.1 upgrade, or an HTTP/2 stream of an extended CONNECT;
a TCP or TLS connection to the upstream). It never parses what flows: WebSocket frames, their
masks and their close codes pass as bytes, so the two peers' close handshake reaches each other
untouched.

**Two pumps.** ``run`` starts two tasks, client -> upstream and upstream -> client, each a loop of
``receive_some`` (at most ``chunk_bytes``) then ``send_all`` to the other side. One chunk per
direction is in flight; a slow reader stops its pump, whose socket buffer then fills, and TCP
pushes back on the sender (no buffering in the proxy). trio allows one sender and one receiver
per stream at a time; each stream has exactly one of each (the two pumps).

**Who closed.** The first side whose stream ends decides ``reason``: ``client`` or ``upstream``.
A clean end (EOF) is passed on as a half-close (``send_eof``) when the other stream allows it, and
the other direction keeps flowing until it ends too (TCP, TLS 1.3: a WebSocket close handshake
then completes on both legs as its peers run it). Where the other stream cannot half-close
(``trio.SSLStream``), and after any transport error, both directions stop at once.

**Limits**, one cancel scope over both pumps: its deadline is the earlier of *last byte moved +
idle_timeout* (``idle_timeout``: no byte either way for that long) and *opened + max_lifetime*
(``max_lifetime``, busy or not). Every chunk moved moves the deadline. A cancellation from outside
(the server's graceful shutdown) ends the tunnel with ``shutdown``.

**The end** closes both streams (each ``aclose`` bounded by ``CLOSE_TIMEOUT`` and shielded, so
that a cancelled tunnel still releases its sockets). Afterwards ``reason``, the byte counts per
direction and ``duration`` say what happened; nothing of the payload is kept or logged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import trio

from qpher_proxy.errors import QpherError

__all__ = [
    "CLIENT", "CLOSE_TIMEOUT", "DEFAULT_CHUNK_BYTES", "IDLE_TIMEOUT", "MAX_LIFETIME", "SHUTDOWN", "UPSTREAM",
    "Tunnel", "TunnelLimits",
]

KiB = 1024
DEFAULT_CHUNK_BYTES = 64 * KiB  # one receive per direction in flight, as the HTTP server reads
CLOSE_TIMEOUT = 1.0  # seconds for each stream's polite close (TLS close_notify) at the end

# Why a tunnel ended (``Tunnel.reason``), a closed set: metrics label it, the audit log records it.
CLIENT = "client"
UPSTREAM = "upstream"
IDLE_TIMEOUT = "idle_timeout"
MAX_LIFETIME = "max_lifetime"
SHUTDOWN = "shutdown"

# A peer gone, a reset, a TLS failure: that side of the tunnel is over.
_TRANSPORT_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError, QpherError)


@dataclass(frozen=True, slots=True)
class TunnelLimits:
    """``idle_timeout``: seconds without a byte either way; ``max_lifetime``: seconds in all."""

    idle_timeout: float = 300.0
    max_lifetime: float = 86_400.0
    chunk_bytes: int = DEFAULT_CHUNK_BYTES

    def __post_init__(self) -> None:
        if not (self.idle_timeout > 0 and self.max_lifetime > 0 and self.chunk_bytes > 0):
            raise ValueError(f"tunnel limits must be positive, got {self!r}")


class Tunnel:
    """Relays bytes between ``client`` and ``upstream`` until both ends close or a limit ends it."""

    __slots__ = (
        "_client", "_upstream", "_limits", "_scope", "_deadline_end", "reason",
        "client_to_upstream", "upstream_to_client", "opened", "duration",
    )

    def __init__(self, client: trio.abc.Stream, upstream: trio.abc.Stream, limits: TunnelLimits) -> None:
        self._client = client
        self._upstream = upstream
        self._limits = limits
        self._scope: trio.CancelScope | None = None
        self._deadline_end = math.inf
        self.reason: str | None = None
        self.client_to_upstream = 0
        self.upstream_to_client = 0
        self.opened = 0.0
        self.duration = 0.0

    async def run(self, client_pending: bytes = b"", upstream_pending: bytes = b"") -> None:
        """Relay until the tunnel ends; ``*_pending``: bytes each side sent before the tunnel
        opened (read off the wire with the handshake), delivered first. Closes both streams."""
        limits = self._limits
        now = self.opened = trio.current_time()
        end = self._deadline_end = now + limits.max_lifetime
        try:
            with trio.CancelScope(deadline=min(end, now + limits.idle_timeout)) as scope:
                self._scope = scope
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, self._client, self._upstream, client_pending, True)
                    nursery.start_soon(self._pump, self._upstream, self._client, upstream_pending, False)
            if scope.cancelled_caught and self.reason is None:
                self.reason = MAX_LIFETIME if trio.current_time() >= end else IDLE_TIMEOUT
        finally:
            if self.reason is None:
                self.reason = SHUTDOWN  # cancelled from outside: the server is stopping
            self.duration = trio.current_time() - self.opened
            with trio.CancelScope(shield=True):
                await _close(self._upstream)
                await _close(self._client)

    async def _pump(
        self, src: trio.abc.Stream, dst: trio.abc.Stream, pending: bytes, from_client: bool
    ) -> None:
        src_side, dst_side = (CLIENT, UPSTREAM) if from_client else (UPSTREAM, CLIENT)
        receive_size = self._limits.chunk_bytes
        receiving = False
        try:
            if pending:
                await dst.send_all(pending)
                self._moved(len(pending), from_client)
            while True:
                receiving = True
                data = await src.receive_some(receive_size)
                receiving = False
                if not data:
                    break
                await dst.send_all(data)
                self._moved(len(data), from_client)
        except _TRANSPORT_ERRORS:
            self._stop(src_side if receiving else dst_side)
            return
        # A clean end of src: pass it on, and let the other direction finish.
        if self.reason is None:
            self.reason = src_side
        if isinstance(dst, trio.abc.HalfCloseableStream):
            try:
                await dst.send_eof()
                return
            except _TRANSPORT_ERRORS:
                pass
        self._stop(src_side)

    def _moved(self, n: int, from_client: bool) -> None:
        if from_client:
            self.client_to_upstream += n
        else:
            self.upstream_to_client += n
        scope = self._scope
        assert scope is not None
        scope.deadline = min(self._deadline_end, trio.current_time() + self._limits.idle_timeout)

    def _stop(self, side: str) -> None:
        """End both directions now; ``side`` closed first (unless a side already did)."""
        if self.reason is None:
            self.reason = side
        scope = self._scope
        assert scope is not None
        scope.cancel()


async def _close(stream: trio.abc.Stream) -> None:
    with trio.move_on_after(CLOSE_TIMEOUT) as scope:
        try:
            await stream.aclose()
        except _TRANSPORT_ERRORS:
            pass
    if scope.cancelled_caught:
        await trio.aclose_forcefully(stream)
