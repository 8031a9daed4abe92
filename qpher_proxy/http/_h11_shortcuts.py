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
- :func:`can_finish_response` and :func:`finish_response` let the server write a complete
  response (a ``Content-Length`` body, to an HTTP/1.1 client) itself, from a pre-built head,
  and move h11's state machine exactly as ``send(Response)``, ``send(Data)`` and
  ``send(EndOfMessage)`` would: h11 keeps deciding keep-alive and what the client may send
  next, and the server skips building three events and h11's writers (a third of what h11
  costs per request). h11 remains the parser of every byte received.
- :func:`switch_pending` tells that a complete request proposed a protocol switch (``Upgrade``)
  that a 101 may accept: h11's MIGHT_SWITCH_PROTOCOL state, which h11 does not export.
"""


from __future__ import annotations

from typing import Any

import h11

__all__ = [
    "AT_CHUNK_SIZE_LINE",
    "can_finish_response",
    "client_closes",
    "finish_response",
    "ELSEWHERE",
    "Headers",
    "LIVE",
    "body_is_chunked",
    "chunk_position",
    "header_pairs",
    "receive_buffer",
    "switch_pending",
]

AT_CHUNK_SIZE_LINE = 0  # chunk_position(): what is buffered (if anything) starts a chunk-size line
ELSEWHERE = -1  # chunk_position(): not in a chunked body, in a chunk's CRLF or trailer, or unknown


def _live() -> dict[str, bool]:
    """Which shortcuts work with the installed h11 (probed once, on real objects)."""
    live = {"headers": False, "buffer": False, "chunks": False, "finish": False}
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
    live["finish"] = _probe_finish()
    return live


def _probe_finish() -> bool:
    """Does the state shortcut leave h11 exactly where the public send path does? Checked on a
    kept-alive and on a closing exchange."""
    try:
        for close in (False, True):
            a, b = h11.Connection(h11.SERVER), h11.Connection(h11.SERVER)
            head = b"GET / HTTP/1.1\r\nHost: x\r\n" + (b"Connection: close\r\n" if close else b"") + b"\r\n"
            for conn in (a, b):
                conn.receive_data(head + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                request, end = conn.next_event(), conn.next_event()
                if type(request) is not h11.Request or type(end) is not h11.EndOfMessage:
                    return False
            a.send(h11.Response(status_code=200, headers=[(b"content-length", b"2")]))
            a.send(h11.Data(data=b"ok"))
            a.send(h11.EndOfMessage())
            if not _shortcut_applies(b):
                return False
            _advance(b, close)
            if (a.our_state, a.their_state, a._cstate.keep_alive, a._writer, type(a._reader)) != (
                b.our_state, b.their_state, b._cstate.keep_alive, b._writer, type(b._reader)
            ):
                return False
            if not close:
                a.start_next_cycle()
                b.start_next_cycle()
                if type(a.next_event()) is not h11.Request or type(b.next_event()) is not h11.Request:
                    return False
        return True
    except (AttributeError, TypeError, KeyError, h11.ProtocolError):  # pragma: no cover - a future h11
        return False


def _shortcut_applies(conn: Any) -> bool:
    return (
        conn.our_state is h11.SEND_RESPONSE
        and conn.their_http_version == b"1.1"
        and conn._request_method != b"HEAD"
        and not conn._cstate.pending_switch_proposals
    )


def _advance(conn: Any, close: bool) -> None:
    cstate = conn._cstate
    states = cstate.states
    old = {h11.CLIENT: states[h11.CLIENT], h11.SERVER: states[h11.SERVER]}
    cstate.process_event(h11.SERVER, h11.Response)
    if close:
        cstate.process_keep_alive_disabled()
    conn.client_is_waiting_for_100_continue = False
    cstate.process_event(h11.SERVER, h11.EndOfMessage)
    conn._respond_to_state_changes(old)


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


if LIVE["finish"]:

    def can_finish_response(conn: h11.Connection) -> bool:
        """Whether :func:`finish_response` may stand for sending a complete response now: h11
        waits for our response to an HTTP/1.1 request that is not HEAD, with no protocol switch
        pending. Otherwise the caller sends through h11's public API."""
        return _shortcut_applies(conn)

    def client_closes(conn: h11.Connection) -> bool:
        """Whether h11 will close after this response whatever we send (the client asked
        ``Connection: close``): the response must then say ``Connection: close``."""
        return not conn._cstate.keep_alive

    def finish_response(conn: h11.Connection, close: bool) -> None:
        """Move h11 as ``send(Response)`` + ``send(Data)`` + ``send(EndOfMessage)`` of a
        ``Content-Length`` response would; ``close``: the response says ``Connection: close``.
        Call only when :func:`can_finish_response` said so, and write the bytes yourself."""
        _advance(conn, close)

else:  # pragma: no cover - a future h11: the public send path

    def can_finish_response(conn: h11.Connection) -> bool:
        return False

    def client_closes(conn: h11.Connection) -> bool:
        return False

    def finish_response(conn: h11.Connection, close: bool) -> None:
        raise RuntimeError("finish_response is not available with this h11")


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


def switch_pending(conn: h11.Connection) -> bool:
    """Whether h11 waits in MIGHT_SWITCH_PROTOCOL: the client's request, complete, proposed a
    protocol switch that sending a 101 would accept (otherwise h11 refuses the 101 and breaks)."""
    return conn.their_state.__name__ == "MIGHT_SWITCH_PROTOCOL"
