"""``TLSStream``: a ``trio.abc.HalfCloseableStream`` that speaks TLS over another stream.

Theory of operation
-------------------
All of TLS happens in ``TLSEngine`` (engine.py), which never blocks. This class is the loop
that connects it to a transport stream: call an engine operation; send whatever it queued;
if it needs data, receive once from the transport, feed the engine and call again. The same
shape serves the handshake, ``receive_some`` and ``send_eof``; ``send_all`` never needs to read
(renegotiation is off, see engine.py).

Concurrency. trio streams allow one task in ``receive_some`` and one in ``send_all`` at the same
time (full duplex), never two in the same direction (``BusyResourceError``, by the two conflict
detectors). Inside, two things are shared:

- The handshake. Whoever needs it first runs it (``receive_some``, ``send_all``, ``send_eof`` or
  ``do_handshake``); a concurrent caller waits for it to finish and then sees its outcome. Until
  it is done, nobody else touches the transport.
- The transport's sending side. Both directions can produce bytes to send: ``send_all`` its
  records, ``receive_some`` a KeyUpdate reply or an alert. Bytes must reach the wire in the order
  the engine produced them (each record's sequence number is fixed when it is made). So every
  producer drains the engine into ``_outbox`` *synchronously*, right after the operation that
  produced the bytes, then takes the strict-FIFO send lock and sends everything in the outbox.
  Whoever holds the lock sends everything queued, including what others queued behind it, so
  when a ``send_all`` returns its bytes have been handed to the transport (backpressure: the
  transport's ``send_all`` blocks while the socket buffer is full, and so do we).

After the handshake only ``receive_some`` reads the transport, so no receive lock is needed.

Failures. Any error from the engine or the transport marks the stream BROKEN (a TLS
connection cannot recover from a lost or half-sent record); ``aclose`` still works. Our errors
from the engine (``qpher_proxy.errors.TLS*``) are re-raised as the subclasses below, which are
also ``trio.BrokenResourceError``: callers that only know trio's contract catch them as a broken
stream, callers that care read ``code`` and ``reason``. ``ClosedResourceError`` (we were closed,
possibly by another task) and trio's own ``BrokenResourceError`` from the transport pass through
as they are.

Session tickets right after the handshake (server, TLS 1.3). Over a ``trio.SocketStream`` (or
a transport with a true ``nonblocking_writes`` and a trio ``socket``, such as http/transport.py's)
the engine's held tickets are written as soon as the handshake completes, before the first
receive: a non-blocking ``write`` when nothing else is queued or being sent; whatever the socket
did not take stays first in the outbox and leaves with the next bytes. They acknowledge the
client's Finished, so a Nagle-on client sends its first request at once instead of after our
delayed ACK (~40 ms). Other transports keep them until our first send (engine.py).

Memory. Nothing per connection is kept between requests: the outbox is emptied by each send,
received and decrypted bytes are handed on, not buffered here, and OpenSSL frees its own record
buffers while a connection is idle (``SSL_MODE_RELEASE_BUFFERS``, context.py).

Handshake timeout. The handshake runs under its own deadline; when it expires the stream is
broken with ``TLSHandshakeTimeout`` and the caller closes it. A client that connects and says
nothing therefore costs one file descriptor for ``handshake_timeout`` seconds at most.

Every failed handshake is reported exactly once, to ``on_handshake_error`` and at DEBUG, with a
reason from the closed set in ``failures.py``: a failure from the engine, a transport that
broke, the timeout, and a handshake cancelled from outside (the server's own connection
deadline or shutdown: ``reason == "cancelled"``). The report comes before the best-effort alert
is sent, so a cancellation during that send cannot lose it. Closing the stream ourselves from
another task is not a failure and is not reported.

Closing. ``aclose`` sends close_notify if the handshake completed and nobody is mid-send, with
a short deadline (a peer that stopped reading must not keep us), then closes the transport. It
never waits for the peer's close_notify (allowed by RFC 8446 §6.1). ``send_eof`` sends
close_notify and keeps the receiving direction open (TLS 1.3 half-close).

EOF without close_notify. With ``suppress_ragged_eofs`` (the listener's default: HTTP frames its
own messages and many clients skip close_notify) a transport EOF reads as ``b""``; otherwise it
is a broken stream (``reason == "truncated"``), which protects protocols that rely on EOF.
"""

from __future__ import annotations

import enum
import logging
import operator
import os
from collections.abc import Callable

import trio
from cryptography import x509
from OpenSSL import SSL

from .. import errors
from .context import DEFAULT_HANDSHAKE_TIMEOUT
from .engine import NEED_DATA, ContextSelector, HandOffRequested, TLSEngine, TLSInfo

__all__ = [
    "BrokenTLSConnection",
    "BrokenTLSHandshake",
    "BrokenTLSHandshakeTimeout",
    "BrokenTLSNotPostQuantum",
    "BrokenTLSPlaintext",
    "DEFAULT_RECEIVE_SIZE",
    "HandOffCallback",
    "TLSStream",
]

log = logging.getLogger("qpher.tls")

KiB = 1024
DEFAULT_RECEIVE_SIZE = 64 * KiB  # bytes asked of the transport per receive
WRITE_CHUNK = 64 * KiB  # plaintext encrypted per step of send_all (bounds memory, keeps backpressure)
CLOSE_NOTIFY_TIMEOUT = 1.0  # seconds aclose may spend sending close_notify


# ---- errors raised by the stream: ours, and trio's BrokenResourceError ------------------------

class BrokenTLSConnection(errors.TLSError, trio.BrokenResourceError):
    """The TLS record layer failed after the handshake."""


class BrokenTLSHandshake(errors.TLSHandshakeFailed, trio.BrokenResourceError):
    """The handshake failed; ``reason`` says why (metrics label)."""


class BrokenTLSHandshakeTimeout(errors.TLSHandshakeTimeout, trio.BrokenResourceError):
    pass


class BrokenTLSPlaintext(errors.TLSPlaintextOnTLSPort, trio.BrokenResourceError):
    pass


class BrokenTLSNotPostQuantum(errors.TLSNotPostQuantum, trio.BrokenResourceError):
    pass


# Most specific first: the first class the error is an instance of wins.
_STREAM_ERRORS: tuple[tuple[type[errors.TLSError], type[errors.TLSError]], ...] = (
    (errors.TLSHandshakeTimeout, BrokenTLSHandshakeTimeout),
    (errors.TLSPlaintextOnTLSPort, BrokenTLSPlaintext),
    (errors.TLSNotPostQuantum, BrokenTLSNotPostQuantum),
    (errors.TLSHandshakeFailed, BrokenTLSHandshake),
    (errors.TLSError, BrokenTLSConnection),
)


def _as_stream_error(exc: errors.TLSError) -> errors.TLSError:
    if isinstance(exc, trio.BrokenResourceError):
        return exc
    for pure, flavoured in _STREAM_ERRORS:
        if isinstance(exc, pure):
            return flavoured(exc.message, reason=exc.reason)
    raise AssertionError(f"unmapped tls error {type(exc).__name__}")  # pragma: no cover


def _direct_write_socket(transport: trio.abc.Stream) -> trio.socket.SocketType | None:
    """The transport's non-blocking socket if we may write to it directly (when no send of
    ours is in progress): a ``trio.SocketStream``, or a stream that says so with a true
    ``nonblocking_writes`` attribute and has a trio ``socket`` (http/transport.py)."""
    if isinstance(transport, trio.SocketStream):
        return transport.socket
    if getattr(transport, "nonblocking_writes", False):
        sock = getattr(transport, "socket", None)
        if isinstance(sock, trio.socket.SocketType):
            return sock
    return None


class _State(enum.Enum):
    OPEN = "open"
    BROKEN = "broken"
    CLOSED = "closed"


class _ConflictDetector:
    """Raise ``trio.BusyResourceError`` if two tasks use the same direction at once."""

    __slots__ = ("_busy", "_message")

    def __init__(self, message: str) -> None:
        self._busy = False
        self._message = message

    def __enter__(self) -> None:
        if self._busy:
            raise trio.BusyResourceError(self._message)
        self._busy = True

    def __exit__(self, *exc_info: object) -> None:
        self._busy = False


HandshakeCallback = Callable[[TLSInfo], None]
HandshakeErrorCallback = Callable[[errors.TLSHandshakeFailed], None]
# (gateway index, the connection's socket descriptor, every byte received so far) -> whether
# the connection was taken over: the callee duplicates the descriptor before it returns.
HandOffCallback = Callable[[int, int, bytes], bool]


class _HandedOff(Exception):
    """The connection went to another gateway process (internal to the handshake)."""


class TLSStream(trio.abc.HalfCloseableStream):
    """TLS over ``transport_stream`` (usually a ``trio.SocketStream``).

    The handshake runs on first use (or ``do_handshake()``). ``info`` tells what was
    negotiated. Server side by default; pass ``server_side=False`` for a client (tests, bench).
    """

    def __init__(
        self,
        transport_stream: trio.abc.Stream,
        context: SSL.Context | ContextSelector,
        *,
        server_side: bool = True,
        server_hostname: str | None = None,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        require_pq: bool = False,
        suppress_ragged_eofs: bool = False,
        on_handshake: HandshakeCallback | None = None,
        on_handshake_error: HandshakeErrorCallback | None = None,
        receive_size: int = DEFAULT_RECEIVE_SIZE,
        on_handoff: HandOffCallback | None = None,
        initial_data: bytes = b"",
    ) -> None:
        self.transport_stream = transport_stream
        self._engine = TLSEngine(
            context, server_side=server_side, server_hostname=server_hostname, require_pq=require_pq
        )
        self._on_handoff = on_handoff
        # Bytes another gateway process already read from this connection (a hand-over).
        self._has_initial_data = bool(initial_data)
        if initial_data:
            self._engine.receive_data(initial_data)
        self._state = _State.OPEN
        self._handshake_timeout = handshake_timeout
        self._suppress_ragged_eofs = suppress_ragged_eofs
        self._on_handshake = on_handshake
        self._on_handshake_error = on_handshake_error
        self._receive_size = receive_size
        self._handshake_done: trio.Event | None = None  # set while/after a handshake ran
        self._handshake_error: errors.TLSError | None = None
        self._outbox: list[bytes] = []
        self._send_lock = trio.StrictFIFOLock()
        self._send_conflict = _ConflictDetector("another task is sending on this TLSStream")
        self._recv_conflict = _ConflictDetector("another task is receiving on this TLSStream")
        self._eof_sent = False
        self._eof_received = False
        self._peer_address: str | None = None  # for the DEBUG line of a failed handshake

    # ---- facts ------------------------------------------------------------------------------

    @property
    def info(self) -> TLSInfo | None:
        """What the handshake negotiated; None before it completed."""
        return self._engine.info

    def peer_certificate(self) -> x509.Certificate | None:
        """The peer's leaf certificate (after the handshake), or None."""
        if self._engine.info is None:
            return None
        return self._engine.peer_certificate()

    def export_keying_material(self, label: bytes, length: int, context: bytes | None = None) -> bytes:
        """The TLS exporter of this connection (after the handshake); see ``TLSEngine``."""
        if self._engine.info is None:
            raise RuntimeError("the handshake has not completed")
        return self._engine.export_keying_material(label, length, context)

    def ssl_connection(self) -> SSL.Connection:
        """The OpenSSL connection, for checks such as the peer's identity (RuntimeError before a
        server with a context selector has seen the ClientHello)."""
        return self._engine.ssl_connection()

    # ---- plumbing ---------------------------------------------------------------------------

    def _check_state(self) -> None:
        if self._state is _State.OPEN:
            return
        if self._state is _State.CLOSED:
            raise trio.ClosedResourceError("this TLSStream was closed")
        raise trio.BrokenResourceError("this TLSStream is broken")

    def _break(self) -> None:
        if self._state is _State.OPEN:
            self._state = _State.BROKEN

    async def _flush(self) -> bool:
        """Send what the engine queued, in order. Returns whether it awaited (sent anything)."""
        out = self._engine.data_to_send()
        if not out:
            return False
        self._outbox.append(out)
        lock = self._send_lock
        try:
            lock.acquire_nowait()  # the common case: nobody else sending, no extra yield
        except trio.WouldBlock:
            await lock.acquire()
        try:
            outbox = self._outbox
            while outbox:
                chunk = outbox[0] if len(outbox) == 1 else b"".join(outbox)
                outbox.clear()
                await self.transport_stream.send_all(chunk)
        except BaseException:
            # Some unknown part of a record may be on the wire: the stream is unusable.
            self._break()
            raise
        finally:
            lock.release()
        return True

    async def _receive(self) -> None:
        """One transport receive into the engine (``b""`` = EOF).

        A cancelled receive lost nothing (no bytes were taken), so it leaves the stream usable;
        a broken transport breaks the stream."""
        try:
            data = await self.transport_stream.receive_some(self._receive_size)
        except trio.BrokenResourceError:
            self._break()
            raise
        self._engine.receive_data(data)

    # ---- handshake --------------------------------------------------------------------------

    async def do_handshake(self) -> None:
        """Run the handshake now if it has not run (it otherwise runs on first use)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check_state()
        if not await self._ensure_handshake():
            await trio.lowlevel.checkpoint()

    async def _ensure_handshake(self) -> bool:
        """Make sure the handshake completed; returns whether it awaited anything."""
        if self._engine.handshake_complete:
            return False
        done = self._handshake_done
        if done is None:
            self._handshake_done = done = trio.Event()
            try:
                await self._run_handshake()
            except trio.Cancelled:
                self._break()
                if self._handshake_error is None and self._state is not _State.CLOSED:
                    failure = BrokenTLSHandshake("tls handshake cancelled by the server", reason="cancelled")
                    self._handshake_error = failure
                    self._report_failure(failure)
                raise
            except BaseException:
                # Failed or cancelled half-way: OpenSSL's handshake state cannot be resumed
                # by another caller, so the stream is unusable.
                self._break()
                raise
            finally:
                done.set()
        else:
            await done.wait()
            self._check_state()
            if self._handshake_error is not None:
                err = self._handshake_error
                raise type(err)(err.message, reason=err.reason) from err
        self._check_state()
        if not self._engine.handshake_complete:  # pragma: no cover - _break() above covers it
            raise trio.BrokenResourceError("the tls handshake did not complete")
        return True

    async def _run_handshake(self) -> None:
        engine = self._engine
        if log.isEnabledFor(logging.DEBUG):
            # now, while the peer is connected: a failure may come from its leaving
            self._peer_address = self._peer()
        try:
            with trio.move_on_after(self._handshake_timeout) as deadline:
                if engine.server_side and not self._has_initial_data:
                    # The client speaks first: wait for its hello instead of asking OpenSSL
                    # for a step it cannot take yet (a WantRead costs an exception).
                    await self._receive()
                while not self._advance_handshake():
                    await self._flush()
                    await self._receive()
                await self._flush()  # client Finished / TLS 1.2 server Finished
                self._push_post_handshake_records()
            if deadline.cancelled_caught:
                self._break()
                raise errors.TLSHandshakeTimeout(
                    f"tls handshake not completed within {self._handshake_timeout:g} s"
                )
        except _HandedOff:
            # Not a failure: another process serves this client now. Nothing is sent from here
            # (no alert, no close_notify) and closing our descriptor leaves the connection open.
            self._break()
            handed = BrokenTLSHandshake("tls connection handed over to another gateway process",
                                        reason="handed_off")
            self._handshake_error = handed
            raise handed from None
        except errors.TLSError as exc:
            self._break()
            failure = _as_stream_error(exc)
            self._handshake_error = failure
            self._report_failure(failure)
            if not isinstance(exc, errors.TLSPlaintextOnTLSPort):
                # Best effort: deliver the alert OpenSSL queued (protocol_version,
                # handshake_failure, ...) so the peer learns why. A plaintext client would
                # only see binary garbage, so it gets a clean close instead.
                await self._send_final_bytes()
            raise failure from exc
        except trio.BrokenResourceError as exc:
            if self._state is _State.CLOSED:
                raise
            failure = errors.TLSHandshakeFailed(
                "tls handshake failed: the connection broke", reason="connection_lost"
            )
            self._break()
            stream_failure = _as_stream_error(failure)
            self._handshake_error = stream_failure
            self._report_failure(stream_failure)
            raise stream_failure from exc
        info = engine.info
        assert info is not None
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "tls handshake ok",
                extra={"fields": {"tls_version": info.version, "tls_cipher": info.cipher,
                                  "tls_group": info.group, "alpn": info.alpn}},
            )
        if self._on_handshake is not None:
            self._on_handshake(info)

    def _advance_handshake(self) -> bool:
        """One handshake step; a client whose ticket another gateway process issued is handed
        over to it (``on_handoff``) or, failing that, gets a full handshake here."""
        engine = self._engine
        try:
            return engine.do_handshake()
        except HandOffRequested as request:
            if self._hand_off(request):
                raise _HandedOff from None
            engine.fall_back()
            return engine.do_handshake()

    def _hand_off(self, request: HandOffRequested) -> bool:
        callback = self._on_handoff
        sock = getattr(self.transport_stream, "socket", None)
        if callback is None or not isinstance(sock, trio.socket.SocketType):
            return False
        try:
            return callback(request.gateway, sock.fileno(), request.data)
        except Exception:  # a hand-over that fails is a full handshake here, never an error
            log.warning("tls hand-over to gateway %d failed", request.gateway, exc_info=True)
            return False

    def _push_post_handshake_records(self) -> None:
        """Put the server's held TLS 1.3 session tickets on the wire now, without blocking.

        They are the first thing that acknowledges the client's Finished: a client with Nagle
        on (Python's ssl, Java) holds its first request until its Finished is acknowledged, and
        without them that takes the server's delayed ACK (~40 ms). Only on a real socket, with
        nothing else queued or being sent, and only what the socket takes at once
        (non-blocking ``write``): the rest stays first in the outbox and leaves with the next
        bytes. Any other transport (e.g. trio's lockstep test stream, where a send waits for
        the peer to read: trio#819) keeps them held until our first send, as before."""
        engine = self._engine
        sock = _direct_write_socket(self.transport_stream)
        if not engine.server_side or sock is None:
            return
        if self._outbox or self._send_lock.locked():
            return
        held = engine.take_held()
        if not held:
            return
        try:
            sent = os.write(sock.fileno(), held)  # trio sockets are non-blocking
        except OSError:  # BlockingIOError, or a broken connection the next send reports
            sent = 0
        if sent < len(held):
            self._outbox.append(held[sent:])

    def _report_failure(self, failure: errors.TLSError) -> None:
        # DEBUG only: a scan produces one failure per probe. The server sums them up at INFO,
        # rate-limited (failures.HandshakeFailureSummary), from on_handshake_error.
        if log.isEnabledFor(logging.DEBUG):
            log.debug("tls handshake failed", extra={"fields": {
                "reason": failure.reason, "code": failure.code, "detail": failure.message,
                "client": self._peer_address}})
        if self._on_handshake_error is not None and isinstance(failure, errors.TLSHandshakeFailed):
            self._on_handshake_error(failure)

    def _peer(self) -> str | None:
        sock = getattr(self.transport_stream, "socket", None)
        try:
            peer = sock.getpeername() if sock is not None else None
        except OSError:
            return None
        return str(peer[0]) if isinstance(peer, tuple) else None

    async def _send_final_bytes(self) -> None:
        """Send a queued alert or close_notify, briefly, ignoring a transport already gone."""
        if self._send_lock.locked():
            return  # another task is mid-send: we cannot add bytes without interleaving
        out = b"".join(self._outbox) + self._engine.data_to_send()
        self._outbox.clear()
        if not out:
            return
        lock = self._send_lock
        lock.acquire_nowait()  # free (checked above, no await since): no extra scheduling round
        try:
            with trio.move_on_after(CLOSE_NOTIFY_TIMEOUT):
                await self.transport_stream.send_all(out)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the peer is gone: there is nobody left to tell
        finally:
            lock.release()

    # ---- trio.abc.Stream --------------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        with self._recv_conflict:
            await trio.lowlevel.checkpoint_if_cancelled()
            if max_bytes is None:
                max_bytes = self._receive_size
            else:
                max_bytes = operator.index(max_bytes)
                if max_bytes < 1:
                    raise ValueError("max_bytes must be >= 1")
            self._check_state()
            engine = self._engine
            # (the common case costs no coroutine: the handshake is done, nothing is queued)
            yielded = False if engine.handshake_complete else await self._ensure_handshake()
            if self._eof_received:
                data: bytes = b""
            else:
                while True:
                    try:
                        result = engine.read(max_bytes)
                    except errors.TLSError as exc:
                        if exc.reason == "truncated" and self._suppress_ragged_eofs:
                            self._eof_received = True
                            result = b""
                        else:
                            self._break()
                            await self._send_final_bytes()
                            raise _as_stream_error(exc) from exc
                    if engine.has_data_to_send() and await self._flush():  # a KeyUpdate reply, ...
                        yielded = True
                    if result is not NEED_DATA:
                        data = result  # type: ignore[assignment]
                        break
                    await self._receive()
                    yielded = True
                if not data:
                    self._eof_received = True
            if not yielded:
                # Data was already decrypted and buffered: still a checkpoint, but one that
                # cannot be cancelled (the bytes were consumed and must reach the caller).
                await trio.lowlevel.cancel_shielded_checkpoint()
            return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        with self._send_conflict:
            await trio.lowlevel.checkpoint_if_cancelled()
            self._check_state()
            if self._eof_sent:
                raise trio.ClosedResourceError("send_eof() was called on this TLSStream")
            yielded = False if self._engine.handshake_complete else await self._ensure_handshake()
            if self._eof_sent:  # another task's send_eof ran while we waited for the handshake
                raise trio.ClosedResourceError("send_eof() was called on this TLSStream")
            size = len(data)
            if size == 0:
                if not yielded:
                    await trio.lowlevel.checkpoint()
                return
            engine = self._engine
            try:
                if size <= WRITE_CHUNK:
                    engine.write(data)
                    await self._flush()
                else:
                    view = memoryview(data).cast("B")
                    for start in range(0, size, WRITE_CHUNK):
                        engine.write(view[start : start + WRITE_CHUNK])
                        await self._flush()
            except errors.TLSError as exc:
                self._break()
                raise _as_stream_error(exc) from exc

    async def wait_send_all_might_not_block(self) -> None:
        with self._send_conflict:
            await trio.lowlevel.checkpoint_if_cancelled()
            self._check_state()
            async with self._send_lock:
                await self.transport_stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        """Send close_notify: no more data from us; the peer may keep sending (TLS 1.3)."""
        with self._send_conflict:
            await trio.lowlevel.checkpoint_if_cancelled()
            self._check_state()
            if self._eof_sent:
                await trio.lowlevel.checkpoint()
                return
            yielded = await self._ensure_handshake()
            self._eof_sent = True
            try:
                self._engine.close_notify()
            except errors.TLSError as exc:
                self._break()
                raise _as_stream_error(exc) from exc
            if not await self._flush() and not yielded:
                await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        if self._state is _State.CLOSED:
            await trio.lowlevel.checkpoint()
            return
        polite = (
            self._state is _State.OPEN
            and self._engine.handshake_complete
            and not self._engine.close_notify_sent
            and not self._send_lock.locked()
        )
        self._state = _State.CLOSED
        try:
            if polite:
                try:
                    self._engine.close_notify()
                except errors.TLSError:
                    pass  # the connection already failed: nothing to notify
                else:
                    await self._send_final_bytes()
        finally:
            await self.transport_stream.aclose()
