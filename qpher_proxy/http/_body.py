"""Reading a request body for the handler, and what happens to a body the handler left unread.

The connection reads a body lazily (see ``messages.py``): nothing is read until the handler
asks, so the interim ``100 Continue`` goes out the first time it does. A body over the limit is
refused (413) the moment the declared ``Content-Length`` or the running total passes it, before
any ``100 Continue``; in a chunked body, a chunk whose declared size passes the limit is refused
as soon as its size line is parsed, and a partial chunk-size line that no further byte can make
valid at once (400) -- h11 would wait for the data of a chunk of any declared size. These checks
read h11's chunk reader through ``_h11_shortcuts``.

Unread bodies. If a handler answers without reading the body: when the client was waiting for
``100 Continue`` we never invited the body, so the response says ``Connection: close`` (RFC 9110
§10.1.1); otherwise the rest is drained after the response (up to ``max_body_bytes``) so the
connection can be reused, or the connection is closed.

:class:`BodyReader` holds the methods; :class:`~._connection.Connection` holds their state (one
slotted object per connection, so a request allocates nothing for its body).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import h11
import trio

from ..errors import BadRequest, BodyTooLarge, ClientDisconnected, QpherError
from . import _h11_shortcuts as _h11
from ._deadlines import NO_DEADLINE
from .limits import HTTPLimits
from .messages import Request

__all__ = ["CONTINUE", "BodyReader"]

CONTINUE = h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")
_INF = NO_DEADLINE
_receive_buffer = _h11.receive_buffer
_chunk_position = _h11.chunk_position
# What may be buffered of a chunk-size line before its CRLF (RFC 9112 §7.1; h11's grammar): any
# other bytes can never become a valid line, so they are refused at once rather than waited on.
_PARTIAL_CHUNK_LINE = re.compile(rb"(?:[0-9A-Fa-f]{1,20}(?:;[^\n]*|[ \t]*\r?))?")


class _BodyIterator:
    """``Request.body_chunks()``: a plain async iterator (no async generator to finalise)."""

    __slots__ = ("_conn", "_generation", "_limit")

    def __init__(self, conn: BodyReader, generation: int, limit: int | None) -> None:
        self._conn = conn
        self._generation = generation
        self._limit = limit

    def __aiter__(self) -> _BodyIterator:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._conn._read_chunk(self._generation, self._limit)
        if chunk is None:
            raise StopAsyncIteration
        return chunk


class BodyReader:
    """The request-body half of a connection (a mixin: the state lives in the connection's slots)."""

    # Empty slots at run time (the connection declares them all); hidden from mypy, whose
    # slots check cannot see that the attributes below live in the subclass's slots.
    if not TYPE_CHECKING:
        __slots__ = ()

    _h: h11.Connection
    _limits: HTTPLimits
    _deadline: float
    _generation: int
    _request: Request | None
    _body_started: bool
    _body_done: bool
    _body_error: QpherError | None
    _body_read: int
    _eof: bool

    if TYPE_CHECKING:

        async def _receive(self) -> bytes: ...

        async def _send(self, data: bytes) -> None: ...


    def _fail_body(self, error: QpherError) -> QpherError:
        self._body_error = error
        return error

    def _declared_length(self) -> int | None:
        request = self._request
        if request is None:
            return None
        value = request.header(b"content-length")
        return int(value) if value is not None else None  # h11 validated it

    async def _read_chunk(self, generation: int, limit: int | None) -> bytes | None:
        if generation != self._generation:
            raise RuntimeError("request body read after its response cycle ended")
        if self._body_error is not None:
            raise self._body_error
        if self._body_done:
            return None
        h = self._h
        if limit is None:
            limit = self._limits.max_body_bytes
        if not self._body_started:
            self._body_started = True
            declared = self._declared_length()
            if declared is not None and declared > limit:
                raise self._fail_body(BodyTooLarge(f"request body exceeds {limit} bytes"))
            if h.they_are_waiting_for_100_continue:
                await self._send(h.send(CONTINUE))
                self._deadline = _INF
        while True:
            try:
                event = h.next_event()
            except h11.RemoteProtocolError as exc:
                if self._eof:
                    raise self._fail_body(ClientDisconnected("client disconnected")) from exc
                raise self._fail_body(BadRequest("malformed request body")) from exc
            kind = type(event)
            if kind is h11.Data:
                data = event.data  # type: ignore[union-attr]
                read = self._body_read = self._body_read + len(data)
                # with the rest of the chunk h11 knows is coming: a declared size is refused as
                # soon as it is known, not once that much has been received
                if read > limit or read + _chunk_position(h) > limit:
                    raise self._fail_body(BodyTooLarge(f"request body exceeds {limit} bytes"))
                return bytes(data)
            if kind is h11.EndOfMessage:
                self._body_done = True
                return None
            if event is h11.NEED_DATA:
                error = self._chunk_error(limit)
                if error is not None:
                    raise self._fail_body(error)
                self._deadline = trio.current_time() + self._limits.body_timeout
                try:
                    data = await self._receive()
                except ClientDisconnected as exc:
                    raise self._fail_body(exc) from exc
                self._deadline = _INF
                h.receive_data(data)
                continue
            if kind is h11.ConnectionClosed:
                raise self._fail_body(ClientDisconnected("client disconnected"))
            self._body_done = True  # PAUSED: nothing more belongs to this request
            return None

    def _chunk_error(self, limit: int) -> QpherError | None:
        """Before waiting for more of a chunked body: a chunk declared past ``limit`` (413) or
        a chunk-size line that no byte can make valid (400), which h11 would wait on."""
        h = self._h
        position = _chunk_position(h)
        if position > 0:
            if self._body_read + position > limit:
                return BodyTooLarge(f"request body exceeds {limit} bytes")
        elif position == _h11.AT_CHUNK_SIZE_LINE and not _PARTIAL_CHUNK_LINE.fullmatch(_receive_buffer(h)):
            return BadRequest("malformed chunk-size line in the request body")
        return None

    async def _read_body(self, generation: int, max_bytes: int | None) -> bytes:
        parts: list[bytes] = []
        while (chunk := await self._read_chunk(generation, max_bytes)) is not None:
            parts.append(chunk)
        return b"".join(parts)

    def _body_chunks(self, generation: int, max_bytes: int | None) -> AsyncIterator[bytes]:
        return _BodyIterator(self, generation, max_bytes)

    def _settle_body(self) -> bool:
        """Before responding: consume what is already buffered of the request body and tell
        whether the connection can be kept (possibly after draining the rest)."""
        if self._body_error is not None:
            return False
        h = self._h
        if h.their_state is not h11.SEND_BODY:
            return True
        if h.they_are_waiting_for_100_continue:
            return False  # we never invited the body: close instead of waiting for it
        outcome = self._discard_buffered_body()
        if outcome is not None:
            return outcome
        declared = self._declared_length()
        return declared is None or declared <= self._limits.max_body_bytes

    def _discard_buffered_body(self) -> bool | None:
        """Discard the request body events h11 already has: True at its end, False if the
        body is malformed or passes ``max_body_bytes`` (close), None when more bytes are needed."""
        h = self._h
        limit = self._limits.max_body_bytes
        while True:
            try:
                event = h.next_event()
            except h11.RemoteProtocolError:
                return False
            kind = type(event)
            if kind is h11.EndOfMessage:
                return True
            if kind is h11.Data:
                read = self._body_read = self._body_read + len(event.data)  # type: ignore[union-attr]
                if read > limit or read + _chunk_position(h) > limit:
                    return False
                continue
            if event is h11.NEED_DATA:
                return None if self._chunk_error(limit) is None else False
            return False

    async def _drain(self) -> bool:
        """After the response: read and discard the unread rest of the request body."""
        h = self._h
        while True:
            outcome = self._discard_buffered_body()
            if outcome is not None:
                return outcome
            self._deadline = trio.current_time() + self._limits.body_timeout
            try:
                data = await self._receive()
            except ClientDisconnected:
                return False
            h.receive_data(data)
