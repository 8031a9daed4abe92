"""The caching HPACK encoder decodes, block after block, to exactly the fields it was given."""

from __future__ import annotations

import hpack

from qpher_proxy.http._h2encoder import CachingEncoder


def _block(i: int) -> list[tuple[bytes, bytes]]:
    return [(b":status", b"200"), (b"content-type", b"application/json"), (b"content-length", b"%d" % i),
            (b"x-frame-options", b"DENY"), (b"x-request-id", b"%016x" % i),
            (b"date", b"Thu, 03 Dec 2026 05:17:%02d GMT" % (i // 7 % 60)), (b"etag", b"e%d" % (i % 5))]


def test_round_trip_with_cache_and_table_changes() -> None:
    enc, dec = CachingEncoder(), hpack.Decoder()
    sizes = []
    for i in range(300):
        if i in (100, 200):  # the client's SETTINGS_HEADER_TABLE_SIZE
            enc.header_table_size = 64 if i == 100 else 4096
        fields = _block(i)
        block = enc.encode(fields)
        sizes.append(len(block))
        decoded = dec.decode(block, raw=True)
        volatile = {b"content-length", b"x-request-id", b"date"}
        assert [f for f in decoded if f[0] not in volatile] == [f for f in fields if f[0] not in volatile]
        assert [f for f in decoded if f[0] in volatile] == [f for f in fields if f[0] in volatile]
    assert sizes[50] < 80  # repeated fields indexed


def test_volatile_fields_stay_out_of_the_table() -> None:
    enc = CachingEncoder()
    for i in range(50):
        enc.encode(_block(0)[:4] + [(b"x-request-id", b"%016x" % i)])
    assert len(enc.header_table.dynamic_entries) == 2  # content-type and x-frame-options only
