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
"""

from __future__ import annotations

import trio

from .context import ServerTLSContextHolder
from .stream import HandshakeCallback, HandshakeErrorCallback, TLSStream

__all__ = ["TLSListener", "open_tls_listeners"]


class TLSListener(trio.abc.Listener[TLSStream]):
    def __init__(
        self,
        transport_listener: trio.abc.Listener[trio.abc.Stream],
        contexts: ServerTLSContextHolder,
        *,
        on_handshake: HandshakeCallback | None = None,
        on_handshake_error: HandshakeErrorCallback | None = None,
        suppress_ragged_eofs: bool = True,
    ) -> None:
        self.transport_listener = transport_listener
        self._contexts = contexts
        self._on_handshake = on_handshake
        self._on_handshake_error = on_handshake_error
        self._suppress_ragged_eofs = suppress_ragged_eofs

    async def accept(self) -> TLSStream:
        transport = await self.transport_listener.accept()
        current = self._contexts.current
        return TLSStream(
            transport,
            current.server_context,
            server_side=True,
            handshake_timeout=current.settings.handshake_timeout,
            require_pq=current.settings.require_pq,
            suppress_ragged_eofs=self._suppress_ragged_eofs,
            on_handshake=self._on_handshake,
            on_handshake_error=self._on_handshake_error,
        )

    async def aclose(self) -> None:
        await self.transport_listener.aclose()


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
