"""``TLSListener``: accept TCP connections and hand out ``TLSStream``s (trio adapter).

Like trio's ``SSLListener``, ``accept()`` does *not* run the handshake: it wraps the accepted
transport and returns at once, and the handshake runs on the stream's first use, inside the
connection's own task. A slow or silent client therefore never delays the accept loop (it only
holds its own task, up to ``handshake_timeout``).

Each accepted connection takes the context that is current *at accept time* from the
``ServerTLSContextHolder``: after ``reload()`` new connections get the new certificates and
settings, connections already open keep theirs. With session tickets the stream gets the
generation's ``select`` instead of a context: the engine creates the OpenSSL connection once the
client's first record is there, with the context whose ticket key the client's ticket names
(context.py). That choice happens in the connection's task, so accept still never waits.

Several gateway processes (``server.workers`` > 1). A ticket names the key of the process that
issued it. When the supervisor has told this process the other processes' key names
(``holder.peers``) and the listener has an ``on_handoff`` callback, a connection whose ticket
names another process's key is handed over: the callback gets the socket descriptor (to
duplicate and pass on with ``SCM_RIGHTS``) and the bytes read so far. The receiving process
puts them into its ``HandOverListener`` (``deliver``), whose ``accept`` gives a ``TLSStream``
that starts from those bytes and resumes the session there (never handed on again). If the
callback declines, the client gets a full handshake where it landed.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Protocol

import trio
from OpenSSL import SSL

from .context import ServerTLSContextHolder, TLSSettings
from .engine import ContextSelector
from .stream import HandOffCallback, HandshakeCallback, HandshakeErrorCallback, TLSStream

__all__ = ["HandOverListener", "TLSListener", "open_tls_listeners"]

HANDOVER_BACKLOG = 256  # handed-over connections waiting for accept; beyond it they are closed


class _Callbacks(Protocol):
    _suppress_ragged_eofs: bool
    _on_handshake: HandshakeCallback | None
    _on_handshake_error: HandshakeErrorCallback | None


def _server_stream(
    listener: _Callbacks, transport: trio.abc.Stream, context: SSL.Context | ContextSelector,
    settings: TLSSettings, **extra: Any,
) -> TLSStream:
    """The server ``TLSStream`` both listeners hand out, with the listener's callbacks."""
    return TLSStream(
        transport,
        context,
        server_side=True,
        handshake_timeout=settings.handshake_timeout,
        require_pq=settings.require_pq,
        suppress_ragged_eofs=listener._suppress_ragged_eofs,
        on_handshake=listener._on_handshake,
        on_handshake_error=listener._on_handshake_error,
        **extra,
    )


class TLSListener(trio.abc.Listener[TLSStream]):
    def __init__(
        self,
        transport_listener: trio.abc.Listener[trio.abc.Stream],
        contexts: ServerTLSContextHolder,
        *,
        on_handshake: HandshakeCallback | None = None,
        on_handshake_error: HandshakeErrorCallback | None = None,
        suppress_ragged_eofs: bool = True,
        on_handoff: HandOffCallback | None = None,
    ) -> None:
        self.transport_listener = transport_listener
        self._contexts = contexts
        self._on_handshake = on_handshake
        self._on_handshake_error = on_handshake_error
        self._suppress_ragged_eofs = suppress_ragged_eofs
        self._on_handoff = on_handoff

    async def accept(self) -> TLSStream:
        transport = await self.transport_listener.accept()
        current = self._contexts.current
        return _server_stream(self, transport, current.server_context, current.settings,
                              on_handoff=self._on_handoff)

    async def aclose(self) -> None:
        await self.transport_listener.aclose()


class HandOverListener(trio.abc.Listener[TLSStream]):
    """Connections another gateway process of this host handed over (``deliver``), accepted as
    ``TLSStream``s that begin with the bytes that process already read."""

    def __init__(
        self,
        contexts: ServerTLSContextHolder,
        *,
        on_handshake: HandshakeCallback | None = None,
        on_handshake_error: HandshakeErrorCallback | None = None,
        suppress_ragged_eofs: bool = True,
        backlog: int = HANDOVER_BACKLOG,
    ) -> None:
        self._contexts = contexts
        self._on_handshake = on_handshake
        self._on_handshake_error = on_handshake_error
        self._suppress_ragged_eofs = suppress_ragged_eofs
        self._send, self._receive = trio.open_memory_channel[tuple[int, bytes]](backlog)
        self.delivered = 0
        self.refused = 0

    def deliver(self, fd: int, data: bytes) -> bool:
        """Take ownership of ``fd`` (a connected TCP socket) and the bytes read from it so far;
        False (and ``fd`` closed) when the backlog is full or the listener closed."""
        try:
            self._send.send_nowait((fd, data))
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            os.close(fd)
            self.refused += 1
            return False
        self.delivered += 1
        return True

    async def accept(self) -> TLSStream:
        while True:
            try:
                fd, data = await self._receive.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                raise trio.ClosedResourceError("the hand-over listener was closed") from None
            try:
                sock = socket.socket(fileno=fd)
            except OSError:
                os.close(fd)
                continue
            if sock.type != socket.SOCK_STREAM:
                sock.close()
                continue
            transport = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
            current = self._contexts.current
            # handed_over_context chooses among our own keys and never hands on
            return _server_stream(self, transport, current.handed_over_context, current.settings,
                                  initial_data=data)

    async def aclose(self) -> None:
        self._send.close()
        while True:  # close what nobody will accept now
            try:
                fd, _ = self._receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            os.close(fd)
        self._receive.close()
        await trio.lowlevel.checkpoint()


async def open_tls_listeners(
    port: int,
    contexts: ServerTLSContextHolder,
    *,
    host: str | None = None,
    backlog: int | None = None,
    on_handshake: HandshakeCallback | None = None,
    on_handshake_error: HandshakeErrorCallback | None = None,
) -> list[TLSListener]:
    """``trio.open_tcp_listeners`` wrapped in ``TLSListener``s (port 0 picks a free port)."""
    listeners = await trio.open_tcp_listeners(port, host=host, backlog=backlog)
    return [
        TLSListener(listener, contexts, on_handshake=on_handshake, on_handshake_error=on_handshake_error)
        for listener in listeners
    ]
