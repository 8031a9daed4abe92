"""The places where the HTTP server reaches into h11's internals (h11 0.14-0.16), in one module.

Each shortcut exists because the public API is either too slow for the hot path or does not
say what the server must know, and each has a fallback on the public API that is correct, just
slower or less strict. ``tests/http/test_h11_shortcuts.py`` checks that every shortcut is live
with the installed h11 and gives what the public path gives.

- :func:`header_pairs` reads parsed request headers as stored (the public ``Sequence`` API goes
  through ``__getitem__`` per header); :func:`Headers` hands h11 response headers the server
  has already validated (the public API validates every header twice).
- :func:`receive_buffer` is the bytes h11 holds but has not parsed, without a copy
  (``trailing_data`` copies them): the server checks a request head's raw line endings there,
  before h11 parses it, since h11 accepts bare LF and obsolete line folding.
- :func:`body_is_chunked` and :func:`chunk_position` tell what h11's chunked-body reader
  knows and does not report: that the body is chunked (h11 ignores a ``Content-Length`` next to
  ``Transfer-Encoding``) and how much of the current chunk is still to come (h11 reports a
  chunk's declared size only as its data arrives, so a huge chunk-size line would otherwise
  only be refused once ``max_body_bytes`` of it had been received).
"""

from __future__ import annotations

from typing import Any

import h11

__all__ = [
    "AT_CHUNK_SIZE_LINE",
    "ELSEWHERE",
    "Headers",
    "LIVE",
    "body_is_chunked",
    "chunk_position",
    "header_pairs",
    "receive_buffer",
]

AT_CHUNK_SIZE_LINE = 0  # chunk_position(): what is buffered (if anything) starts a chunk-size line
ELSEWHERE = -1  # chunk_position(): not in a chunked body, in a chunk's CRLF or trailer, or unknown


def _live() -> dict[str, bool]:
    """Which shortcuts work with the installed h11 (probed once, on real objects)."""
    live = {"headers": False, "buffer": False, "chunks": False}
    try:
        from h11._headers import Headers as _Headers

        live["headers"] = "_full_items" in getattr(_Headers, "__slots__", ())
    except ImportError:  # pragma: no cover - a future h11
        pass
    probe = h11.Connection(h11.SERVER)
    probe.receive_data(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n")
    buffer = getattr(getattr(probe, "_receive_buffer", None), "_data", None)
    live["buffer"] = isinstance(buffer, bytearray) and bytes(buffer) == probe.trailing_data[0]
    try:
        from h11._readers import ChunkedReader

        probe.next_event()  # the request; the body reader is now a ChunkedReader
        reader = getattr(probe, "_reader", None)
        before = type(reader) is ChunkedReader and reader._bytes_in_chunk == 0
        after = probe.next_event() is h11.NEED_DATA and reader._bytes_in_chunk == 16  # type: ignore[union-attr]
        live["chunks"] = (
            before and after and reader._bytes_to_discard == b"" and reader._reading_trailer is False  # type: ignore[union-attr]
        )
    except (ImportError, AttributeError, h11.ProtocolError):  # pragma: no cover - a future h11
        pass
    return live


LIVE = _live()

if LIVE["headers"]:
    from h11._headers import Headers

    def header_pairs(headers: Any) -> list[tuple[bytes, bytes]]:
        """``(lower-case name, value)`` pairs of parsed headers, as ``list(headers)`` gives."""
        return [(name, value) for _, name, value in headers._full_items]

else:  # pragma: no cover - a future h11: correct, just slower

    def Headers(items: list[tuple[bytes, bytes, bytes]]) -> Any:  # type: ignore[no-redef]
        return [(name, value) for _, name, value in items]

    def header_pairs(headers: Any) -> list[tuple[bytes, bytes]]:
        return list(headers)


if LIVE["buffer"]:

    def receive_buffer(conn: h11.Connection) -> bytes | bytearray:
        """The received bytes h11 has not parsed yet (its own buffer: read it, never keep it)."""
        return conn._receive_buffer._data

else:  # pragma: no cover - a future h11: a copy

    def receive_buffer(conn: h11.Connection) -> bytes | bytearray:
        return conn.trailing_data[0]


if LIVE["chunks"]:
    from h11._readers import ChunkedReader as _ChunkedReader

    def body_is_chunked(conn: h11.Connection) -> bool | None:
        """Whether the request body being read is chunked (None: cannot tell)."""
        return type(conn._reader) is _ChunkedReader

    def chunk_position(conn: h11.Connection) -> int:
        """In a chunked request body: the bytes of the current chunk not yet read (> 0), or
        :data:`AT_CHUNK_SIZE_LINE`; anywhere else :data:`ELSEWHERE`."""
        reader = conn._reader
        if type(reader) is not _ChunkedReader:
            return ELSEWHERE
        n: int = reader._bytes_in_chunk
        if n:
            return n
        if reader._bytes_to_discard or reader._reading_trailer:
            return ELSEWHERE
        return AT_CHUNK_SIZE_LINE

else:  # pragma: no cover - a future h11: the caller falls back on the headers and running totals

    def body_is_chunked(conn: h11.Connection) -> bool | None:
        return None

    def chunk_position(conn: h11.Connection) -> int:
        return ELSEWHERE
