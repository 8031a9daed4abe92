"""A TLS connection as a sans-I/O state machine over pyOpenSSL memory BIOs.

Theory of operation
-------------------
OpenSSL can run a TLS connection without a socket. ``SSL.Connection(ctx, None)`` gives a
connection whose two ends are in-memory buffers ("BIOs"):

- the *incoming* BIO: we append bytes that arrived from the peer (``bio_write``); OpenSSL
  consumes them when it needs a record;
- the *outgoing* BIO: OpenSSL appends every byte it wants sent (handshake flights, encrypted
  records, alerts); we drain it (``bio_read``) and put the bytes on the wire, in order.

On top of these, four operations drive the protocol: ``do_handshake``, ``read`` (SSL_read:
decrypt application data), ``write`` (SSL_write: encrypt) and ``shutdown`` (send close_notify).
Each may append to the outgoing BIO, consume from the incoming BIO, and either complete or fail
with ``WantReadError``, which means "I need more bytes from the peer before I can finish; call me
again". ``WantWriteError`` cannot happen: a memory BIO accepts any amount. A ``WantReadError`` is
not an error, and it is not final: the same call, repeated once more bytes were fed in, carries
on where it stopped (for ``write``, OpenSSL requires the retry to pass the same data; our writes
never need a retry, see below).

This module wraps exactly that, h11-style: bytes in (``receive_data``), bytes out
(``data_to_send``), and operations that return a result or ``NEED_DATA``. It never blocks, never
touches a socket, never imports trio, and is the *one* place where OpenSSL exceptions become our
errors (``_translate``). The trio stream (``stream.py``) is a loop around it: "call the operation;
send whatever is in ``data_to_send``; if it said ``NEED_DATA``, receive some bytes, feed them, and
call again".

Why this is simpler than trio's SSLStream: TLS 1.2 renegotiation is disabled and TLS 1.3 has
none, so after the handshake a ``write`` never needs to read and a ``read`` never waits for a
write. The only bytes a ``read`` may produce are protocol replies (a KeyUpdate response, an alert),
which the stream sends in order through the same outgoing queue.

Details that matter
-------------------
- Server session tickets (TLS 1.3). When a server handshake completes, OpenSSL immediately
  appends NewSessionTicket messages. The engine holds them (``_held``) instead of handing them
  out with the handshake's last bytes; the stream decides when they go (stream.py): over a real
  socket it takes them (``take_held``) right after the handshake and writes them without
  blocking, because they are what acknowledges the client's Finished -- without them a client
  with Nagle on (Python's ssl, Java) holds its first request for the server's delayed ACK,
  ~40 ms. On any other transport they stay held and go in front of the next bytes we send for
  another reason (first response, close_notify, KeyUpdate reply): a send there may wait for the
  peer to read (trio's lockstep test stream), and a client that sends and closes without reading
  must not make our first send fail (openssl/openssl#7948, trio#819). Order is kept either way:
  they are the oldest bytes and go first.
- Choosing the server context (session resumption). A server engine may be given a selector
  instead of a context: it then buffers the client's bytes until the first TLS record is whole
  (the ClientHello; bounded by the record length, at most 16 KiB, and by the stream's handshake
  timeout), parses it (``clienthello.py``: never raises, "don't know" on any doubt) and creates
  the OpenSSL connection with the context the selector picks for the ticket the client offers
  (the one whose ticket key encrypted it, see context.py). A hello that does not offer TLS 1.3
  gets ``SSL_OP_NO_TICKET`` on its connection: TLS 1.2 resumption would skip the key exchange.
  The selector may instead answer ``HandOff`` (the ticket is another gateway process's):
  ``do_handshake`` then raises ``HandOffRequested`` with every byte received so far, and the
  stream either passes the connection on or calls ``fall_back()`` for a full handshake here.
  ``TLSInfo.resumed`` tells whether a ticket was accepted; a resumed TLS 1.3 handshake is
  psk_dhe_ke (OpenSSL refuses psk_ke without ``SSL_OP_ALLOW_NO_DHE_KEX``, which we never set),
  so it has a group and ``require_pq`` checks it like any other.
- Reads return up to ``max_bytes``, gathering several 16 KiB records when they are already
  buffered, so that a bulk transfer costs one trip through the stream per 64 KiB, not per record.
  An error after some data was gathered is kept and raised by the next ``read``.
- EOF. ``receive_data(b"")`` tells OpenSSL that the transport ended. A peer that sent
  close_notify first gives ``read() -> b""``; one that just closed gives ``TLSError(reason=
  "truncated")`` and the stream decides whether that counts as EOF (HTTP frames its own
  messages and many clients never send close_notify, so the server treats it as EOF).
- Half-close. ``close_notify()`` closes our sending direction only. In TLS 1.3 the peer may
  keep sending and we keep reading (RFC 8446 §6.1); OpenSSL allows it.
- ``require_pq``: after a successful handshake the negotiated group is checked; a classical
  group gets a close_notify queued and ``TLSNotPostQuantum``. (The server context normally does
  not even offer classical groups in that mode, so the handshake fails earlier, with an alert,
  and that failure is reported as ``TLSNotPostQuantum`` too.)
- Failure classes. A failed handshake carries a ``reason`` from a small closed set
  (``tls/failures.py`` lists them): metrics count by it, so it must never grow with the input.
  OpenSSL's reason strings decide most of them; when OpenSSL could not even read a record, the
  first bytes the peer sent tell an SSLv2 ClientHello (a scanner probing old versions:
  ``unsupported_version``) from another protocol altogether (``not_tls``).
- Nothing here logs, and no message carries key material: OpenSSL's reason strings name the
  protocol step that failed, never a secret.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from cryptography import x509
from OpenSSL import SSL

from ..errors import TLSError, TLSHandshakeFailed, TLSNotPostQuantum, TLSPlaintextOnTLSPort
from . import _openssl
from ._openssl import pending_input as _pending_input
from ._openssl import pending_output as _pending_output
from .clienthello import ClientHelloFacts, first_record_length, parse_client_hello
from .context import HandOff, canonical_group_name, is_hybrid_pq_group

__all__ = ["NEED_DATA", "ContextSelector", "HandOffRequested", "NeedData", "TLSEngine", "TLSInfo"]

# A server-side chooser: the server context for a connection, given what its ClientHello says
# (which ticket key it names), or a HandOff to another gateway process. See "Details that
# matter" and context.py.
ContextSelector = Callable[[ClientHelloFacts], SSL.Context | HandOff]


class HandOffRequested(Exception):
    """The client's ticket belongs to gateway process ``gateway``: the stream hands the
    connection and ``data`` (every byte received so far) over, or calls ``fall_back()``."""

    def __init__(self, gateway: int, data: bytes) -> None:
        super().__init__(f"hand-over to gateway {gateway}")
        self.gateway = gateway
        self.data = data

KiB = 1024
MAX_RECORD_PLAINTEXT = 16 * KiB  # RFC 8446 §5.1: a record carries at most 2^14 bytes


class NeedData:
    """Sentinel type: the operation needs more bytes from the peer (``receive_data``)."""

    _instance: NeedData | None = None

    def __new__(cls) -> NeedData:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


@dataclass(frozen=True, slots=True)
class TLSInfo:
    """What was negotiated, recorded once per connection. Never any key material."""

    version: str  # "TLSv1.3"
    cipher: str  # "TLS_AES_256_GCM_SHA384"
    group: str | None  # "X25519MLKEM768"; None if no key exchange happened
    alpn: str | None  # "http/1.1"
    client_cert_subject: str | None  # RFC 4514 subject of the verified client certificate
    resumed: bool = False  # a session ticket was accepted (TLS 1.3 psk_dhe_ke: a fresh key exchange ran)

    @property
    def post_quantum(self) -> bool:
        """True if the key exchange used a hybrid post-quantum group."""
        return is_hybrid_pq_group(self.group)


# ---- the one OpenSSL -> QpherError boundary ----------------------------------------------------

# OpenSSL reason string (lower case) -> our short failure class. Strings, not numeric codes:
# the binding does not export the SSL_R_* constants, and the strings are stable across 3.x/4.x.
_HANDSHAKE_REASONS: dict[str, str] = {
    "unsupported protocol": "unsupported_version",
    "tlsv1 alert protocol version": "unsupported_version",
    "no protocols available": "unsupported_version",
    "version too low": "unsupported_version",
    "no suitable key share": "no_shared_group",
    "no shared groups": "no_shared_group",
    "no shared cipher": "no_shared_cipher",
    "no suitable signature algorithm": "no_shared_signature_algorithm",
    "peer did not return a certificate": "client_certificate_required",
    "certificate verify failed": "certificate_rejected",
    "tlsv1 alert unknown ca": "certificate_rejected",
    "sslv3 alert bad certificate": "certificate_rejected",
    "sslv3 alert certificate unknown": "certificate_rejected",
    "tlsv1 alert decrypt error": "certificate_rejected",
    "sslv3 alert handshake failure": "peer_alert",
    "tlsv1 alert handshake failure": "peer_alert",
    "tls alert handshake failure": "peer_alert",
    "http request": "plaintext_http",
    "https proxy request": "plaintext_http",
}


# The first bytes of a peer's input that classify a record OpenSSL could not read.
_HEAD_BYTES = 3
_TLS_CONTENT_TYPES = frozenset(range(20, 25))  # change_cipher_spec .. heartbeat (RFC 8446 §5.1)


def _unreadable_record_kind(head: bytes) -> str:
    """Why OpenSSL could not read the first record: an SSLv2 ClientHello (2-byte length with
    the high bit set, then message type 1), another protocol, or a malformed TLS record."""
    if len(head) >= 3 and head[0] & 0x80 and head[2] == 1:
        return "unsupported_version"
    if head and head[0] not in _TLS_CONTENT_TYPES:
        return "not_tls"
    return "protocol_error"


def _openssl_reasons(exc: SSL.Error) -> list[str]:
    """The reason strings of an OpenSSL error queue dump, e.g. ['unsupported protocol']."""
    if isinstance(exc, SSL.SysCallError):
        return []
    reasons: list[str] = []
    for entry in exc.args[0] if exc.args and isinstance(exc.args[0], list) else ():
        if isinstance(entry, tuple) and len(entry) == 3 and entry[2]:
            reasons.append(str(entry[2]).lower())
    return reasons


def _is_eof(exc: SSL.Error) -> bool:
    return isinstance(exc, SSL.SysCallError) and exc.args[:1] == (-1,)


def _translate(exc: SSL.Error, *, handshake: bool, require_pq: bool, head: bytes = b"") -> TLSError:
    """Map an OpenSSL exception to our error. The message names the failing step only;
    ``head``: the first bytes the peer sent (handshake failures only)."""
    if _is_eof(exc):
        if handshake:
            return TLSHandshakeFailed("tls handshake failed: the peer closed the connection", reason="eof")
        return TLSError("the peer closed the connection without a tls close_notify", reason="truncated")
    if isinstance(exc, SSL.SysCallError):
        return (TLSHandshakeFailed if handshake else TLSError)(
            "tls transport error", reason="transport_error"
        )
    reasons = _openssl_reasons(exc)
    detail = "; ".join(reasons) or "protocol error"
    if not handshake:
        return TLSError(f"tls record layer failed: {detail}", reason="protocol_error")
    kind = next((_HANDSHAKE_REASONS[r] for r in reasons if r in _HANDSHAKE_REASONS), "protocol_error")
    if kind == "protocol_error":
        kind = _unreadable_record_kind(head)
    if kind == "plaintext_http":
        return TLSPlaintextOnTLSPort("plain http request sent to the tls port")
    if kind == "no_shared_group" and require_pq:
        return TLSNotPostQuantum(
            "tls handshake refused: the client offers no hybrid post-quantum key exchange "
            "and tls.require_pq is set"
        )
    return TLSHandshakeFailed(f"tls handshake failed: {detail}", reason=kind)


# ---- the engine ------------------------------------------------------------------------------

class TLSEngine:
    """One TLS connection, server or client side, with no I/O. See the module docstring."""

    __slots__ = (
        "_conn",
        "_selector",
        "_pending",
        "_handoff",
        "_offers_tls13",
        "_server_side",
        "_require_pq",
        "_info",
        "_held",
        "_release_held",
        "_peer_closed",
        "_close_notify_sent",
        "_deferred_error",
        "_failed",
        "_head",
        "_eof_fed",
    )

    def __init__(
        self,
        context: SSL.Context | ContextSelector,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        require_pq: bool = False,
    ) -> None:
        self._conn: SSL.Connection | None = None
        self._selector: ContextSelector | None = None
        # Server with a selector: the peer's bytes until its first record is whole.
        self._pending = bytearray()
        self._handoff: HandOff | None = None
        self._offers_tls13 = False
        if isinstance(context, SSL.Context):
            conn = SSL.Connection(context, None)
            if server_side:
                conn.set_accept_state()
            else:
                if server_hostname is not None:
                    conn.set_tlsext_host_name(server_hostname.encode("idna"))
                conn.set_connect_state()
            self._conn = conn
        elif server_side:
            self._selector = context
        else:
            raise TypeError("a context selector is for the server side only")
        self._server_side = server_side
        self._require_pq = require_pq
        self._info: TLSInfo | None = None
        self._held = b""  # server TLS 1.3 session tickets, see "Details that matter"
        self._release_held = False
        self._peer_closed = False  # close_notify received
        self._close_notify_sent = False
        self._deferred_error: TLSError | None = None
        self._failed = False
        self._eof_fed = False  # receive_data(b""): SSL_read must run to report the EOF
        self._head = b""  # the peer's first bytes, to classify a failed handshake

    # -- state -----------------------------------------------------------------------------

    @property
    def server_side(self) -> bool:
        return self._server_side

    @property
    def handshake_complete(self) -> bool:
        return self._info is not None

    @property
    def info(self) -> TLSInfo | None:
        """What was negotiated; None until the handshake completed."""
        return self._info

    @property
    def close_notify_sent(self) -> bool:
        return self._close_notify_sent

    @property
    def failed(self) -> bool:
        """A fatal error happened: nothing but ``data_to_send`` (a queued alert) is useful now."""
        return self._failed

    # -- bytes in / out --------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the peer; ``b""`` means the transport reached EOF."""
        if data:
            if self._info is None and len(self._head) < _HEAD_BYTES:
                self._head += bytes(data[: _HEAD_BYTES - len(self._head)])
            if self._conn is None:
                self._pending += data
                end = first_record_length(self._pending)
                if end is not None and end <= len(self._pending):
                    self._start_server_connection()
                return
            self._conn.bio_write(data)
        else:
            if self._conn is None:
                self._start_server_connection()
            assert self._conn is not None
            self._eof_fed = True
            self._conn.bio_shutdown()

    def _start_server_connection(self) -> None:
        """Create the server connection with the context the selector picks for the client's
        first record (or whatever arrived before EOF), and feed it everything received so far.
        A hand-over choice keeps the bytes (``do_handshake`` raises ``HandOffRequested``)."""
        if self._handoff is not None:
            return  # chosen already: the bytes wait for the hand-over or fall_back()
        assert self._selector is not None
        facts = parse_client_hello(self._pending)
        self._offers_tls13 = facts.offers_tls13
        choice = self._selector(facts)
        self._selector = None
        if isinstance(choice, HandOff):
            self._handoff = choice
            return
        self._open(choice)

    def fall_back(self) -> None:
        """After ``HandOffRequested``, when the hand-over cannot happen: a full handshake here."""
        if self._conn is None and self._handoff is not None:
            self._open(self._handoff.fallback)
            self._handoff = None

    def _open(self, context: SSL.Context) -> None:
        pending, self._pending = bytes(self._pending), bytearray()
        conn = SSL.Connection(context, None)
        if not self._offers_tls13:
            # TLS 1.2 ticket resumption skips the key exchange (no forward secrecy against a
            # stolen ticket key, no group for require_pq): tickets are for TLS 1.3 only.
            _openssl.disable_tickets(conn)
        conn.set_accept_state()
        self._conn = conn
        if pending:
            conn.bio_write(pending)

    def has_data_to_send(self) -> bool:
        """Whether ``data_to_send()`` would return bytes now (cheap: no read, no exception)."""
        conn = self._conn
        if conn is not None and _pending_output(conn):
            return True
        return bool(self._held) and self._release_held

    def data_to_send(self) -> bytes:
        """Drain the bytes OpenSSL wants on the wire, oldest first (``b""`` if none)."""
        out = self._drain()
        if self._held and (out or self._release_held):
            out, self._held = self._held + out, b""
        return out

    def take_held(self) -> bytes:
        """The held post-handshake records (session tickets), handed out once: the stream sends
        them right after the handshake when it can do so without blocking."""
        held, self._held = self._held, b""
        return held

    def _drain(self) -> bytes:
        conn = self._conn
        if conn is None:
            return b""
        # Ask the memory BIO how much it holds and take exactly that in one read: no exception
        # for an empty BIO (most calls: after a read that produced nothing to send) and no
        # large scratch buffer per call.
        n = _pending_output(conn)
        if not n:
            return b""
        return conn.bio_read(n)

    # -- operations --------------------------------------------------------------------------

    def do_handshake(self) -> bool:
        """Advance the handshake: True once complete, False if it needs more data."""
        if self._info is not None:
            return True
        conn = self._conn
        if conn is None:
            if self._handoff is not None:
                raise HandOffRequested(self._handoff.gateway, bytes(self._pending))
            return False  # the client's first record is not whole yet
        try:
            conn.do_handshake()
        except SSL.WantReadError:
            return False
        except SSL.Error as exc:
            self._failed = True
            raise _translate(exc, handshake=True, require_pq=self._require_pq, head=self._head) from exc
        info = self._read_info()
        if self._server_side and info.version == "TLSv1.3":
            self._held = self._drain()
        if self._require_pq and not info.post_quantum:
            self._failed = True
            self.close_notify()
            raise TLSNotPostQuantum(
                f"tls handshake refused: group {info.group!r} is not a hybrid post-quantum group "
                "and tls.require_pq is set"
            )
        self._info = info
        self._head = b""
        return True

    def read(self, max_bytes: int) -> bytes | NeedData:
        """Up to ``max_bytes`` of decrypted data; ``b""`` after the peer's close_notify."""
        if self._deferred_error is not None:
            raise self._deferred_error
        if self._peer_closed:
            return b""
        conn = self._connection()
        if not self._eof_fed and not _pending_input(conn) and not conn.pending():
            # Nothing fed that OpenSSL has not consumed and nothing decrypted left: SSL_read
            # could only say "want read" (raised as an exception by pyOpenSSL). A partial record
            # OpenSSL has started on waits for more bytes either way.
            return NEED_DATA
        try:
            data = conn.recv(max_bytes)
        except SSL.WantReadError:
            return NEED_DATA
        except SSL.ZeroReturnError:
            self._peer_closed = True
            return b""
        except SSL.Error as exc:
            self._failed = True
            raise _translate(exc, handshake=False, require_pq=self._require_pq) from exc
        if len(data) < MAX_RECORD_PLAINTEXT or len(data) >= max_bytes:
            return data
        # A full record: more may be buffered already (bulk transfer). Gather them.
        chunks = [data]
        total = len(data)
        while total < max_bytes:
            try:
                more = conn.recv(max_bytes - total)
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                self._peer_closed = True
                break
            except SSL.Error as exc:
                self._failed = True
                error = _translate(exc, handshake=False, require_pq=self._require_pq)
                error.__cause__ = exc
                self._deferred_error = error
                break
            chunks.append(more)
            total += len(more)
        return b"".join(chunks)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt ``data`` (all of it) into the outgoing BIO."""
        if self._info is None:
            raise RuntimeError("write() before the handshake completed")
        self._release_held = True
        conn = self._connection()
        view = memoryview(data)
        try:
            while view:
                written = conn.send(view)
                view = view[written:]
        except SSL.WantReadError as exc:  # pragma: no cover - needs renegotiation, which is off
            self._failed = True
            raise TLSError(
                "tls write needed a read: renegotiation is not supported", reason="protocol_error"
            ) from exc
        except SSL.Error as exc:
            self._failed = True
            raise _translate(exc, handshake=False, require_pq=self._require_pq) from exc

    def close_notify(self) -> None:
        """Queue our close_notify alert (closes our sending direction). Idempotent."""
        if self._close_notify_sent:
            return
        self._close_notify_sent = True
        self._release_held = True
        if self._conn is None:
            return  # nothing was said yet: there is nothing to close
        try:
            self._conn.shutdown()
        except SSL.WantReadError:  # pragma: no cover - only when waiting for the peer's alert
            pass
        except SSL.Error as exc:
            self._failed = True
            raise _translate(exc, handshake=False, require_pq=self._require_pq) from exc

    # -- facts -----------------------------------------------------------------------------

    def peer_certificate(self) -> x509.Certificate | None:
        """The peer's (verified, when verification is on) leaf certificate, if it sent one."""
        return self._connection().get_peer_certificate(as_cryptography=True)

    def export_keying_material(self, label: bytes, length: int, context: bytes | None = None) -> bytes:
        """RFC 8446 7.5 / RFC 5705 exporter (after the handshake): a secret both ends derive alike
        and nobody else can, bound to this connection."""
        return self._connection().export_keying_material(label, length, context)

    def ssl_connection(self) -> SSL.Connection:
        """The OpenSSL connection, once it exists."""
        return self._connection()

    def _connection(self) -> SSL.Connection:
        conn = self._conn
        if conn is None:
            raise RuntimeError("the tls connection has not started (no ClientHello yet)")
        return conn

    def _read_info(self) -> TLSInfo:
        conn = self._connection()
        group = conn.get_group_name()
        alpn = conn.get_alpn_proto_negotiated()
        subject = None
        if self._server_side:
            cert = conn.get_peer_certificate(as_cryptography=True)
            if cert is not None:
                subject = cert.subject.rfc4514_string()
        return TLSInfo(
            version=conn.get_protocol_version_name(),
            cipher=conn.get_cipher_name() or "",
            group=canonical_group_name(group) if group else None,
            alpn=alpn.decode("ascii", "replace") if alpn else None,
            client_cert_subject=subject,
            resumed=_openssl.session_reused(conn),
        )
