"""The HPACK encoder of the HTTP/2 server: ``hpack.Encoder`` with a cache of the header blocks the
proxy sends again and again.

Nearly every response of a connection repeats the same fields (``:status``, ``content-type``, the
security headers): once they are in the dynamic table, their encoding is a string of indices that
only changes when the table changes. Three fields change on (nearly) every response, and each
would be inserted into the table by ``hpack``, evicting the others and changing every index:
``x-request-id``, ``date`` and ``content-length``. So:

* those three are *volatile*: never inserted into the table (``x-request-id`` never indexed,
  RFC 7541 §6.2.3, since no two responses share one; ``date`` and ``content-length`` without
  indexing, §6.2.2, with their static-table names) and encoded after the others; HTTP field order
  matters only among fields of one name (RFC 9110 §5.3), and their relative order is kept;
* the rest of a block is encoded by ``hpack`` and cached by its exact list of pairs, for as long
  as the dynamic table is unchanged: every insertion (and a table size change) starts a new
  *epoch* and empties the cache. A cached block is the bytes ``hpack`` produced in this same
  table state for the same pairs, and encoding it indexed fields only (it inserted nothing, or
  the epoch would have moved on), so reusing it is exactly what ``hpack`` would emit again.

A pending table size update (SETTINGS_HEADER_TABLE_SIZE from the client) must open the next
block: such a block goes all the way through ``hpack``. Blocks with ``HeaderTuple`` entries
(sensitive fields) are never cached.
"""

from __future__ import annotations

from typing import Any

import hpack
from hpack.hpack import encode_integer

__all__ = ["CachingEncoder"]

_CACHE_SIZE = 64  # header lists cached per epoch; a response's upstream fields cannot grow it further


def _raw_string(value: bytes) -> bytes:
    """An HPACK string literal without Huffman coding (RFC 7541 §5.2): for short, high-entropy or
    digit values the saving is a few bytes and the CPU cost is a Huffman pass per response."""
    length = encode_integer(len(value), 7)
    return bytes(length) + value


# Literal without indexing, name from the static table (RFC 7541 §6.2.2; Appendix A: 28
# content-length, 33 date); a 4-bit prefix, so both indices spill into a second byte.
_DATE_PREFIX = b"\x0f\x12"
_CONTENT_LENGTH_PREFIX = b"\x0f\x0d"
# Never indexed, literal name (§6.2.3)
_REQUEST_ID_PREFIX = b"\x10" + _raw_string(b"x-request-id")
_VOLATILE = frozenset({b"x-request-id", b"date", b"content-length"})


class CachingEncoder(hpack.Encoder):
    """``hpack.Encoder`` with the volatile fields kept out of the table and a cache of the rest
    (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._epoch = 0
        self._cache: dict[tuple[tuple[bytes, bytes], ...], bytes] = {}
        self._cache_epoch = 0
        self._date: tuple[bytes, bytes] = (b"", b"")  # the last date value and its encoding

    @property
    def header_table_size(self) -> int:
        return self.header_table.maxsize

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        self.header_table.maxsize = value  # may evict entries: a new epoch
        if self.header_table.resized:
            self.table_size_changes.append(value)
        self._epoch += 1

    def add(self, to_add: tuple[bytes, bytes], sensitive: bool, huffman: bool = False) -> bytes:
        encoded = super().add(to_add, sensitive, huffman)
        if encoded[0] & 0xC0 == 0x40:  # literal with incremental indexing: the table changed
            self._epoch += 1
        return encoded

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        if self.header_table.resized or not isinstance(headers, list):
            return super().encode(headers, huffman)
        stable: list[tuple[bytes, bytes]] = []
        volatile: list[bytes] = []
        for pair in headers:
            if type(pair) is not tuple or len(pair) != 2:
                return super().encode(headers, huffman)  # a HeaderTuple or a sensitivity flag
            name = pair[0]
            if name in _VOLATILE:
                volatile.append(self._volatile(name, pair[1]))
            else:
                stable.append(pair)
        if self._cache_epoch != self._epoch:
            self._cache.clear()
            self._cache_epoch = self._epoch
        key = tuple(stable)
        block = self._cache.get(key)
        if block is None:
            epoch = self._epoch
            block = super().encode(stable, huffman)
            if self._epoch == epoch and len(self._cache) < _CACHE_SIZE:
                self._cache[key] = block
        if volatile:
            return block + b"".join(volatile)
        return block

    def _volatile(self, name: bytes, value: bytes) -> bytes:
        if name == b"date":
            last, encoded = self._date
            if value != last:  # once a second: worth the Huffman pass
                length = encode_integer(len(huffed := self.huffman_coder.encode(value)), 7)
                length[0] |= 0x80
                encoded = _DATE_PREFIX + bytes(length) + huffed
                self._date = (value, encoded)
            return encoded
        if name == b"content-length":
            return _CONTENT_LENGTH_PREFIX + _raw_string(value)
        return _REQUEST_ID_PREFIX + _raw_string(value)
