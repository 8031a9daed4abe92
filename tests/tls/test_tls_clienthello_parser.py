"""The ClientHello parser (``clienthello._parse``, plain indexing for speed: it runs before every
full handshake) agrees with a straightforward reader-based parser -- the specification, kept
here -- on real hellos from OpenSSL clients, with and without a PSK identity, and on ten
thousand mutations of them (bytes flipped, truncated, lengths tampered with)."""

from __future__ import annotations

import random

import pytest
from OpenSSL import SSL

from qpher_proxy.tls import _openssl, clienthello
from qpher_proxy.tls.clienthello import RECORD_HEADER, ClientHelloFacts, first_record_length

_NOTHING = ClientHelloFacts()


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
        n = self.uint(length_bytes)
        if n is None or self.pos + n > self.end:
            return None
        r = _Reader(self.buf, self.pos, self.pos + n)
        self.pos += n
        return r

    @property
    def left(self) -> int:
        return self.end - self.pos


def reference_parse(buf: bytes) -> ClientHelloFacts:
    """RFC 8446 §4.1.2 read field by field, every vector through its length prefix."""
    end = first_record_length(buf)
    if end is None or buf[0] != 22 or end > len(buf):
        return _NOTHING
    record = _Reader(buf, RECORD_HEADER, end)
    if record.uint(1) != 1:
        return _NOTHING
    body_len = record.uint(3)
    if body_len is None or body_len > record.left:
        return _NOTHING
    hello = _Reader(buf, record.pos, record.pos + body_len)
    if hello.take(2 + 32) is None:
        return _NOTHING
    for length_bytes in (1, 2, 1):
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
        if ext_type == 43:
            versions = ext.sub(1)
            if versions is None:
                return _NOTHING
            while versions.left >= 2:
                if versions.take(2) == b"\x03\x04":
                    tls13 = True
        elif ext_type == 41:
            identities = ext.sub(2)
            first = identities.sub(2) if identities is not None else None
            if first is None or first.left == 0:
                return ClientHelloFacts(None, tls13)
            identity = first.take(first.left)
    return ClientHelloFacts(identity, tls13)


def _hello(group: str, max_version: int = SSL.TLS1_3_VERSION) -> bytes:
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_max_proto_version(max_version)
    assert _openssl.set_groups(ctx, (group,))
    conn = SSL.Connection(ctx, None)
    conn.set_connect_state()
    try:
        conn.do_handshake()
    except SSL.WantReadError:
        pass
    return conn.bio_read(65536)


def _with_psk(hello: bytes, identity: bytes) -> bytes:
    """``hello`` with a pre_shared_key extension (one identity, one binder) appended last."""
    body = bytearray(hello)
    p = 9 + 34
    p += 1 + body[p]
    p += 2 + int.from_bytes(body[p : p + 2], "big")
    p += 1 + body[p]
    ids = len(identity).to_bytes(2, "big") + identity + b"\0\0\0\0"
    payload = len(ids).to_bytes(2, "big") + ids + b"\x00\x21\x20" + b"b" * 32
    ext = (41).to_bytes(2, "big") + len(payload).to_bytes(2, "big") + payload
    body[p : p + 2] = (int.from_bytes(body[p : p + 2], "big") + len(ext)).to_bytes(2, "big")
    body[6:9] = (int.from_bytes(body[6:9], "big") + len(ext)).to_bytes(3, "big")
    body[3:5] = (int.from_bytes(body[3:5], "big") + len(ext)).to_bytes(2, "big")
    return bytes(body + ext)


@pytest.fixture(scope="module")
def hellos() -> list[bytes]:
    real = [_hello("X25519"), _hello("X25519MLKEM768"), _hello("X25519", SSL.TLS1_2_VERSION)]
    return real + [_with_psk(h, b"K" * 16 + b"ticket" * 20) for h in real[:2]]


def test_real_hellos_give_what_the_reference_gives(hellos: list[bytes]) -> None:
    facts = [clienthello._parse(h) for h in hellos]
    assert facts == [reference_parse(h) for h in hellos]
    assert [f.offers_tls13 for f in facts] == [True, True, False, True, True]
    assert facts[3].ticket_key_name == b"K" * 16 and facts[0].psk_identity is None


def test_mutated_hellos_give_what_the_reference_gives(hellos: list[bytes]) -> None:
    rng = random.Random(13)
    for _ in range(10_000):
        data = bytearray(rng.choice(hellos))
        kind = rng.randrange(4)
        if kind == 0:  # a few bytes anywhere
            for _ in range(rng.randrange(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif kind == 1:  # truncated
            data = data[: rng.randrange(len(data) + 1)]
        elif kind == 2:  # a record, handshake or vector length byte
            at = rng.choice([3, 4, 6, 7, 8, 43, 44, 76, 77, rng.randrange(len(data))])
            if at < len(data):
                data[at] = rng.choice([0, 1, 0xFF, rng.randrange(256)])
        else:  # any 16-bit length
            at = rng.randrange(max(1, len(data) - 2))
            data[at : at + 2] = rng.randrange(65536).to_bytes(2, "big")
        sample = bytes(data)
        assert clienthello._parse(sample) == reference_parse(sample), sample.hex()
