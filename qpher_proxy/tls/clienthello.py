"""Just enough of a TLS ClientHello to route a resumption ticket (pure, bounded, never raises).

The server keeps two ticket-key generations (one SSL context each, see context.py) and must
create the connection with the context whose key encrypted the client's ticket: OpenSSL
decrypts tickets with the keys of the context the connection was created with. So before
OpenSSL sees anything, the engine hands the client's first TLS record to ``parse_client_hello``
and picks the context from the ticket it names.

What is read, from the first record only:

- the first identity of the ``pre_shared_key`` extension (type 41, TLS 1.3): an OpenSSL
  stateless ticket, whose first 16 bytes are the name of the key that encrypted it;
- whether ``supported_versions`` (type 43) offers TLS 1.3 (tickets are only honoured on TLS 1.3
  connections: a TLS 1.2 resumption has no fresh key exchange, see context.py).

Anything unexpected -- not a handshake record, a ClientHello fragmented over several records,
a length that points past the data, a truncated extension -- gives ``ClientHelloFacts()``
(nothing known), which means "use the current context": the client then gets a full handshake,
or OpenSSL refuses a malformed hello exactly as it would have without us. Every length is
checked against the bytes present before it is used, and nothing here allocates more than a
slice of the input.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ClientHelloFacts", "TICKET_KEY_NAME_BYTES", "first_record_length", "parse_client_hello"]

RECORD_HEADER = 5
MAX_RECORD = 16384  # RFC 8446 §5.1: a plaintext record (a ClientHello is one) carries at most 2^14
TICKET_KEY_NAME_BYTES = 16  # OpenSSL: key_name(16) || iv(16) || ciphertext || hmac(32)

_HANDSHAKE = 22
_CLIENT_HELLO = 1
_EXT_SUPPORTED_VERSIONS = 43
_EXT_PRE_SHARED_KEY = 41
_TLS13 = b"\x03\x04"


@dataclass(frozen=True, slots=True)
class ClientHelloFacts:
    """What the first record told: the first PSK identity (TLS 1.3 ticket) and TLS 1.3 support."""

    psk_identity: bytes | None = None
    offers_tls13: bool = False

    @property
    def ticket_key_name(self) -> bytes | None:
        ident = self.psk_identity
        if ident is None or len(ident) <= TICKET_KEY_NAME_BYTES:
            return None
        return ident[:TICKET_KEY_NAME_BYTES]


_NOTHING = ClientHelloFacts()


def first_record_length(data: bytes | bytearray) -> int | None:
    """Bytes the first record occupies (header included), once its header is there; None before.

    A first record that is not a plausible handshake record gives ``len(data)`` (decide now:
    waiting for more would serve nobody, OpenSSL refuses it either way)."""
    if len(data) < RECORD_HEADER:
        return None
    if data[0] != _HANDSHAKE:
        return len(data)
    length = int.from_bytes(data[3:5], "big")
    if length > MAX_RECORD:
        return len(data)
    return RECORD_HEADER + length


class _Reader:
    __slots__ = ("buf", "pos", "end")

    def __init__(self, buf: bytes, pos: int, end: int) -> None:
        self.buf, self.pos, self.end = buf, pos, end

    def take(self, n: int) -> bytes | None:
        if n < 0 or self.pos + n > self.end:
            return None
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def uint(self, n: int) -> int | None:
        raw = self.take(n)
        return None if raw is None else int.from_bytes(raw, "big")

    def sub(self, length_bytes: int) -> _Reader | None:
        """A reader over the next vector (``length_bytes``-byte length prefix)."""
        n = self.uint(length_bytes)
        if n is None or self.pos + n > self.end:
            return None
        r = _Reader(self.buf, self.pos, self.pos + n)
        self.pos += n
        return r

    @property
    def left(self) -> int:
        return self.end - self.pos


def parse_client_hello(data: bytes | bytearray) -> ClientHelloFacts:
    """The facts of the ClientHello in the first record of ``data``; nothing known on any doubt."""
    try:
        return _parse(bytes(data[: RECORD_HEADER + MAX_RECORD]))
    except Exception:  # pragma: no cover - the parser checks every length; belt and braces
        return _NOTHING


def _parse(buf: bytes) -> ClientHelloFacts:
    end = first_record_length(buf)
    if end is None or buf[0] != _HANDSHAKE or end > len(buf):
        return _NOTHING
    record = _Reader(buf, RECORD_HEADER, end)
    if record.uint(1) != _CLIENT_HELLO:
        return _NOTHING
    body_len = record.uint(3)
    if body_len is None or body_len > record.left:  # fragmented over several records
        return _NOTHING
    hello = _Reader(buf, record.pos, record.pos + body_len)
    if hello.take(2 + 32) is None:  # legacy_version, random
        return _NOTHING
    for length_bytes in (1, 2, 1):  # legacy_session_id, cipher_suites, compression_methods
        if hello.sub(length_bytes) is None:
            return _NOTHING
    extensions = hello.sub(2)
    if extensions is None:
        return _NOTHING
    identity: bytes | None = None
    tls13 = False
    while extensions.left:
        ext_type = extensions.uint(2)
        ext = extensions.sub(2)
        if ext_type is None or ext is None:
            return _NOTHING
        if ext_type == _EXT_SUPPORTED_VERSIONS:
            versions = ext.sub(1)
            if versions is None:
                return _NOTHING
            while versions.left >= 2:
                if versions.take(2) == _TLS13:
                    tls13 = True
        elif ext_type == _EXT_PRE_SHARED_KEY:
            identities = ext.sub(2)
            first = identities.sub(2) if identities is not None else None
            if first is None or first.left == 0:
                return ClientHelloFacts(None, tls13)
            identity = first.take(first.left)
    return ClientHelloFacts(identity, tls13)
