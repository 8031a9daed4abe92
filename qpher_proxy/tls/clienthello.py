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


def parse_client_hello(data: bytes | bytearray) -> ClientHelloFacts:
    """The facts of the ClientHello in the first record of ``data``; nothing known on any doubt."""
    try:
        return _parse(bytes(data[: RECORD_HEADER + MAX_RECORD]))
    except Exception:  # pragma: no cover - the parser checks every length; belt and braces
        return _NOTHING


def _parse(buf: bytes) -> ClientHelloFacts:
    """One pass over the hello with plain indexing (a handshake's worth of Python is precious:
    this runs before every full handshake). Every offset is checked against its enclosing
    vector's end before it is read; the first doubt gives ``_NOTHING``."""
    n = len(buf)
    if n < RECORD_HEADER or buf[0] != _HANDSHAKE:
        return _NOTHING
    declared = (buf[3] << 8) | buf[4]
    end = n if declared > MAX_RECORD else RECORD_HEADER + declared  # as first_record_length
    if end > n or end < RECORD_HEADER + 4 or buf[5] != _CLIENT_HELLO:
        return _NOTHING
    body_end = RECORD_HEADER + 4 + ((buf[6] << 16) | (buf[7] << 8) | buf[8])
    if body_end > end:  # fragmented over several records
        return _NOTHING
    p = RECORD_HEADER + 4 + 2 + 32  # legacy_version, random
    if p + 1 > body_end:
        return _NOTHING
    p += 1 + buf[p]  # legacy_session_id
    if p + 2 > body_end:
        return _NOTHING
    p += 2 + ((buf[p] << 8) | buf[p + 1])  # cipher_suites
    if p + 1 > body_end:
        return _NOTHING
    p += 1 + buf[p]  # legacy_compression_methods
    if p + 2 > body_end:
        return _NOTHING
    ext_end = p + 2 + ((buf[p] << 8) | buf[p + 1])
    if ext_end > body_end:
        return _NOTHING
    p += 2
    identity: bytes | None = None
    tls13 = False
    while p < ext_end:
        if p + 4 > ext_end:
            return _NOTHING
        ext_type = (buf[p] << 8) | buf[p + 1]
        q = p + 4 + ((buf[p + 2] << 8) | buf[p + 3])
        if q > ext_end:
            return _NOTHING
        p += 4
        if ext_type == _EXT_SUPPORTED_VERSIONS:
            if p + 1 > q:
                return _NOTHING
            v, v_end = p + 1, p + 1 + buf[p]
            if v_end > q:
                return _NOTHING
            while v + 2 <= v_end:
                if buf[v] == 3 and buf[v + 1] == 4:
                    tls13 = True
                v += 2
        elif ext_type == _EXT_PRE_SHARED_KEY:
            # identities<7..2^16-1>: the first PskIdentity is identity<1..2^16-1>, then its age
            if p + 2 > q:
                return ClientHelloFacts(None, tls13)
            ids_end = p + 2 + ((buf[p] << 8) | buf[p + 1])
            if ids_end > q or p + 4 > ids_end:
                return ClientHelloFacts(None, tls13)
            first_end = p + 4 + ((buf[p + 2] << 8) | buf[p + 3])
            if first_end > ids_end or first_end == p + 4:
                return ClientHelloFacts(None, tls13)
            identity = buf[p + 4 : first_end]
        p = q
    return ClientHelloFacts(identity, tls13)
