"""Writing a response: validated headers, the security set, framing, and the error fallback.

Every response goes out through :meth:`ResponseWriter._send_response` -- the handler's, an
error rendered by ``messages.error_response`` (the one error renderer), and the answer to a head
refused before h11 produced a request (400/431/501, :meth:`ResponseWriter._reject_head`).

Headers. A handler's header pairs are checked once against h11's own grammar (RFC 9110
field-name token, field-value without CR/LF/NUL and without surrounding whitespace) and good pairs
are remembered, so h11 is handed a ready ``Headers`` and skips its second pass (see
``_h11_shortcuts``). A handler that produces an invalid status or header never has it sent: the
client gets a 500 instead. ``Content-Length`` (bytes bodies), ``Date``, ``X-Request-Id`` when
absent and ``Connection: close`` are the server's.

Security headers: with ``security_headers`` every response the server or its handler renders
gets ``SecurityHeaders.own`` (``Cache-Control: no-store``, ``nosniff``, HSTS when configured),
prebuilt once; a ``Response(forwarded=True)`` gets only the forwarded set, where its own headers
lack them (see ``security_headers.py``).

A 101 (``Response.upgrade``) goes out as h11's InformationalResponse, which moves both sides
to SWITCHED_PROTOCOL (``_switch_head``; the connection then hands its stream to the upgrade).

Streaming bodies go out one send per chunk, the deadline lifted between sends so that a slow
producer (an upstream) is not mistaken for a slow client; a stream that fails half-way leaves
h11 in ERROR, so the truncated message is followed by a close.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterable, Iterable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import h11

from .._json import http_date
from ..errors import ClientDisconnected, QpherError
from ._deadlines import NO_DEADLINE
from ._h11_shortcuts import Headers, can_finish_response, client_closes, finish_response
from .messages import REQUEST_ID_HEADER, Request, Response, error_response, new_request_id
from .security_headers import SecurityHeaders

__all__ = ["ResponseWriter"]

logger = logging.getLogger("qpher.http")

_REASONS: dict[int, bytes] = {s.value: s.phrase.encode("ascii") for s in HTTPStatus}
_NO_BODY_STATUSES = frozenset({204, 304})
_Item = tuple[bytes, bytes, bytes]  # h11's (raw name, lower-case name, value)

# h11's own header grammar; handler headers are validated once and good pairs remembered.
_FIELD_NAME = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_FIELD_VALUE = re.compile(rb"(?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?")
_CONTENT_LENGTH = re.compile(rb"[0-9]{1,19}")
_VALID_CACHE_MAX = 4096
_valid_items: dict[tuple[Any, Any], _Item] = {}
_ours = frozenset({b"transfer-encoding", b"connection", b"date"})  # framing and connection are ours
_can_finish = can_finish_response
_client_closes = client_closes
_finish = finish_response
_CLOSE = b"connection: close\r\n"
_H11_CLOSE = b"Connection: close\r\n"
_HEADS_MAX = 256  # pre-built heads kept per SecurityHeaders (one per status and header tuple)


class ResponseWriter:
    """The response half of a connection (a mixin: the state lives in the connection's slots)."""

    # Empty slots at run time (the connection declares them all); hidden from mypy, whose
    # slots check cannot see that the attributes below live in the subclass's slots.
    if not TYPE_CHECKING:
        __slots__ = ()

    _h: h11.Connection
    _deadline: float
    _security: SecurityHeaders | None
    _client_addr: str
    _bytes_sent: int
    _eof: bool

    if TYPE_CHECKING:

        async def _send(self, data: bytes) -> None: ...

        async def _linger(self) -> None: ...

        def _done(self, request: Request, status: int, started: float) -> None: ...

    async def _send_response(self, request: Request, response: Response, keep_alive: bool) -> None:
        h = self._h
        status = response.status
        body = response.body
        security = self._security
        if (
            type(body) is bytes
            and security is not None
            and not response.forwarded
            and _can_finish(h)
            and status.__class__ is int
            and 200 <= status <= 599
            and status not in _NO_BODY_STATUSES
        ):
            head = _prebuilt_head(security, status, response.headers)
            if head is not None:
                # Connection: close as the h11 path writes it: ours when we close, h11's (its
                # spelling) when only the client asked for it.
                if not keep_alive:
                    close = _CLOSE
                elif _client_closes(h):
                    close = _H11_CLOSE
                else:
                    close = b""
                _finish(h, bool(close))
                await self._send(b"".join((
                    head,
                    b"content-length: %d\r\nx-request-id: %s\r\ndate: %s\r\n%s\r\n" % (
                        len(body), request.request_id.encode("ascii"), http_date(), close
                    ),
                    body,
                )))
                return
        streaming = not isinstance(body, (bytes, bytearray, memoryview))
        try:
            if streaming and not hasattr(body, "__aiter__"):
                raise TypeError(
                    f"response body must be bytes or an async iterable, not {type(body).__name__}"
                )
            items, has_id = _response_items(response.headers, streaming)
            if type(status) is not int or not 200 <= status <= 599:
                raise h11.LocalProtocolError(f"status must be an int in 200..599, got {status!r}")
        except (h11.LocalProtocolError, TypeError, ValueError, UnicodeError):
            # A handler produced an invalid status or header (CR/LF, bad name...): never send it.
            logger.error(
                "handler produced an invalid response",
                exc_info=True,
                extra={"fields": {"request_id": request.request_id}},
            )
            await _aclose_body(body)
            fallback = error_response(QpherError("internal server error"), request.request_id)
            await self._send_response(request, fallback, keep_alive)
            return
        if security is not None:
            if response.forwarded:
                items += security.missing_from(items)
            else:
                items += security.own
        append = items.append
        if not streaming and status not in _NO_BODY_STATUSES:
            append((b"content-length", b"content-length", b"%d" % len(body)))  # type: ignore[arg-type]
        if not has_id:
            rid = request.request_id.encode("ascii")
            append((REQUEST_ID_HEADER, REQUEST_ID_HEADER, rid))
        append((b"date", b"date", http_date()))
        if not keep_alive:
            append((b"connection", b"connection", b"close"))
        # Every item is validated (or ours): handing h11 a ready Headers skips its second pass.
        event = h11.Response(status_code=status, headers=Headers(items), reason=_REASONS.get(status, b""))

        head = h.send(event)
        if request.method == "HEAD" or status in _NO_BODY_STATUSES:
            await _aclose_body(body)
            await self._send(head + h.send(h11.EndOfMessage()))
        elif not streaming:
            if body:
                data = h11.Data(data=body)  # type: ignore[arg-type]
                await self._send(head + h.send(data) + h.send(h11.EndOfMessage()))
            else:
                await self._send(head + h.send(h11.EndOfMessage()))
        else:
            await self._send_stream(request, status, head, body)  # type: ignore[arg-type]

    def _switch_head(self, request: Request, response: Response) -> bytes:
        """The 101 head of an upgrade ``response``: its validated headers, ``X-Request-Id`` when
        absent and our ``Connection: Upgrade``. Raises h11.LocalProtocolError (or TypeError,
        ValueError) for a head that must not be sent; h11 is then left as it was."""
        if response.status != 101:
            raise h11.LocalProtocolError(f"an upgrade needs status 101, not {response.status!r}")
        items, has_id = _response_items(response.headers, False)
        if not has_id:
            rid = request.request_id.encode("ascii")
            items.append((REQUEST_ID_HEADER, REQUEST_ID_HEADER, rid))
        items.append((b"connection", b"connection", b"Upgrade"))
        event = h11.InformationalResponse(
            status_code=101, headers=Headers(items), reason=b"Switching Protocols"
        )
        return self._h.send(event)

    async def _send_stream(
        self, request: Request, status: int, head: bytes, body: AsyncIterable[bytes]
    ) -> None:
        """The head, then one send per chunk of ``body``; a failure leaves h11 in ERROR."""
        h = self._h
        await self._send(head)
        self._deadline = NO_DEADLINE
        iterator = aiter(body)
        try:
            async for chunk in iterator:
                if chunk:
                    await self._send(h.send(h11.Data(data=chunk)))
                    self._deadline = NO_DEADLINE
            await self._send(h.send(h11.EndOfMessage()))
        except ClientDisconnected:
            raise
        except h11.LocalProtocolError:
            # e.g. more or fewer bytes than the handler's Content-Length: abort the message.
            logger.error(
                "streamed body does not match its framing",
                exc_info=True,
                extra={"fields": {"request_id": request.request_id, "status": status}},
            )
            h.send_failed()
        except QpherError as exc:
            # e.g. the request body turned out too large while being streamed back/upstream
            logger.info(
                "response body stream stopped",
                extra={"fields": {"request_id": request.request_id, "status": status, "code": exc.code}},
            )
            h.send_failed()
        except Exception:
            logger.error(
                "response body stream failed",
                exc_info=True,
                extra={"fields": {"request_id": request.request_id, "status": status}},
            )
            h.send_failed()  # our_state ERROR: the message is truncated, the connection closes
        finally:
            await _aclose_body(iterator)

    async def _reject_head(self, error: QpherError) -> None:
        """Answer a request head that was refused (400/431/501), then close.

        h11 lets a server answer before (or instead of) a request: the response goes out as
        HTTP/1.1 with our ``Connection: close``, and the request passed to ``on_request_done`` is
        the placeholder with ``method == ""``."""
        started = time.perf_counter()
        request = Request("", "", "", "", [], "", new_request_id(), self._client_addr)
        self._bytes_sent = 0
        if self._eof:
            return  # the peer closed mid-head: nobody to answer
        try:
            await self._send_response(request, error_response(error, request.request_id), keep_alive=False)
        except ClientDisconnected:
            self._done(request, error.status, started)
            return
        self._done(request, error.status, started)
        await self._linger()


def _prebuilt_head(
    security: SecurityHeaders, status: int, headers: Iterable[tuple[bytes, bytes]]
) -> bytes | None:
    """The status line and the fixed headers of a server response (the handler's, then the
    security set), as bytes, built once per ``(status, headers)`` when ``headers`` is a tuple
    (the handlers' constants); None when the headers carry ``X-Request-Id`` or ``Content-Length``
    of their own or fail validation (the h11 path then sends, or refuses, the response). The
    caller adds ``Content-Length``, ``X-Request-Id``, ``Date`` and ``Connection: close``, in the
    order the h11 path writes them."""
    heads = security.heads
    key = (status, headers) if type(headers) is tuple else None
    if key is not None:
        head = heads.get(key)
        if head is not None:
            return head
    try:
        items, has_id = _response_items(headers, False)
    except (h11.LocalProtocolError, TypeError, ValueError, UnicodeError):
        return None
    if has_id:
        return None
    head = b"HTTP/1.1 %d %s\r\n%s%s" % (
        status,
        _REASONS.get(status, b""),
        b"".join(raw + b": " + value + b"\r\n" for raw, _, value in items),
        security.own_block,
    )
    if key is not None:
        if len(heads) >= _HEADS_MAX:
            heads.clear()
        heads[key] = head
    return head


def _response_items(headers: Iterable[tuple[bytes, bytes]], streaming: bool) -> tuple[list[_Item], bool]:
    """Validated h11 header items (raw name, lower name, value) from a handler's headers, and
    whether they hold an ``X-Request-Id``."""
    items: list[_Item] = []
    has_id = False
    cache = _valid_items
    for pair in headers:
        item = cache.get(pair)
        if item is None:
            item = _validated_item(pair)
            if len(cache) >= _VALID_CACHE_MAX:
                cache.clear()
            cache[pair] = item
        lower = item[1]
        if lower in _ours:
            continue
        if lower == b"content-length":
            if not streaming:
                continue  # a bytes body: we compute it
        elif lower == REQUEST_ID_HEADER:
            has_id = True
        items.append(item)
    return items, has_id


def _validated_item(pair: tuple[Any, Any]) -> _Item:
    name, value = pair
    if type(name) is not bytes:
        name = name.encode("ascii")
    if type(value) is not bytes:
        value = value.encode("latin-1") if isinstance(value, str) else bytes(value)
    if not _FIELD_NAME.fullmatch(name):
        raise h11.LocalProtocolError(f"illegal header name {name!r}")
    if not _FIELD_VALUE.fullmatch(value):
        raise h11.LocalProtocolError(f"illegal header value for {name!r}")
    lower = name.lower()
    if lower == b"content-length" and not _CONTENT_LENGTH.fullmatch(value):
        raise h11.LocalProtocolError("bad content-length")
    return (lower, lower, value)


async def _aclose_body(body: object) -> None:
    aclose = getattr(body, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:
            logger.debug("closing a response body iterator failed", exc_info=True)
