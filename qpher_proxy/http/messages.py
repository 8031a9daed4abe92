"""What a handler sees and returns: ``Request`` and ``Response``.

A ``Request`` is the parsed head of one HTTP request plus a handle on its body, which the
connection reads lazily from the wire: nothing of the body is read until the handler asks
(``read_body`` buffers it under a size limit, ``body_chunks`` streams it chunk by chunk). That
laziness is what makes ``Expect: 100-continue`` work: the interim ``100 Continue`` goes out the
first time the handler reads the body, so a handler that refuses early (401, 413, ...) never
invites the client to upload.

A ``Response`` carries a status, header pairs as bytes and a body that is either ``bytes``
(sent with ``Content-Length``) or an async iterable of ``bytes`` (sent chunked, unless the
handler set ``Content-Length`` itself). Header names and values are validated by h11 when the
response is sent, so a handler cannot inject CR/LF into the header block.

Paths are kept exactly as received (no percent-decoding, no dot-segment removal): the router
decides how to match them, and a gateway must never "normalise" a path into a different one
than the upstream will see.
"""

from __future__ import annotations

import binascii
import os
import re
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .._json import compact_encoder, escape
from ..errors import QpherError

if TYPE_CHECKING:
    import trio

    from ..tls.engine import TLSInfo

__all__ = [
    "Request", "Response", "error_response", "Body", "REQUEST_ID_HEADER", "Base64Text", "new_request_id",
    "Upgrade",
]

REQUEST_ID_HEADER = b"x-request-id"
_JSON_CT = (b"content-type", b"application/json")
# A client-sent X-Request-Id is recorded (never used as ours) only if it looks like a token.
_SANE_CLIENT_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")

Body = bytes | AsyncIterable[bytes]


def new_request_id() -> str:
    """16 random hex characters; one getrandom() call (~0.3 µs)."""
    return os.urandom(8).hex()


class _BodySource(Protocol):
    """What the connection offers a ``Request`` for reading its body (see ``_body.py``)."""

    async def _read_body(self, generation: int, max_bytes: int | None) -> bytes: ...

    def _body_chunks(self, generation: int, max_bytes: int | None) -> AsyncIterator[bytes]: ...


@dataclass(frozen=True, slots=True, repr=False)
class Request:
    """One HTTP request head plus a handle on its (unread) body.

    ``method`` is e.g. ``"GET"``; ``target`` the raw request-target; ``path`` and ``query``
    its two halves split at the first ``?`` (raw, not percent-decoded). ``headers`` are
    ``(lower-cased name, value)`` byte pairs in wire order. ``request_id`` is ours (random);
    ``state`` is a scratch dict for the pipeline (tenant, route, ...). ``tls`` is what the
    connection's TLS handshake negotiated (None over plain TCP).

    A placeholder request with ``method == ""`` is passed to ``on_request_done`` for input
    that could not be parsed as a request at all (400/431 before a request line was read).
    """

    method: str
    target: str
    path: str
    query: str
    headers: list[tuple[bytes, bytes]]
    http_version: str
    request_id: str
    client_addr: str
    state: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    _source: _BodySource | None = field(default=None, repr=False, compare=False)
    _generation: int = field(default=0, repr=False, compare=False)
    tls: TLSInfo | None = field(default=None, repr=False, compare=False)

    def __repr__(self) -> str:
        # Headers, query and body may carry credentials (API keys): never in a repr.
        return (
            f"Request(method={self.method!r}, path={self.path!r}, request_id={self.request_id!r}, "
            f"client_addr={self.client_addr!r})"
        )

    def header(self, name: bytes, default: bytes | None = None) -> bytes | None:
        """The first value of header ``name`` (lower-case bytes), or ``default``."""
        for n, v in self.headers:
            if n == name:
                return v
        return default

    def header_values(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n == name]

    @property
    def client_request_id(self) -> str | None:
        """The client's own ``X-Request-Id`` if it is a sane token; never used as our id."""
        value = self.header(REQUEST_ID_HEADER)
        if value is not None and _SANE_CLIENT_ID.fullmatch(value):
            return value.decode("ascii")
        return None

    async def read_body(self, max_bytes: int | None = None) -> bytes:
        """Read the whole body into memory.

        ``max_bytes`` defaults to the server's ``max_body_bytes``. Raises ``BodyTooLarge``
        (413 ``body_too_large``) as soon as the declared or received size passes it,
        ``BadRequest`` for a malformed body, ``ClientDisconnected`` if the client goes away.
        May be called once; a second call returns ``b""``.
        """
        if self._source is None:
            return b""
        return await self._source._read_body(self._generation, max_bytes)

    def body_chunks(self, max_bytes: int | None = None) -> AsyncIterator[bytes]:
        """Stream the body: yields chunks as they arrive (each at most one receive, 64 KiB).

        Nothing is buffered beyond the chunk in hand. ``max_bytes`` as for ``read_body``;
        pass a large value to stream bodies bigger than ``max_body_bytes`` (sidecar).
        """
        if self._source is None:
            return _empty_chunks()
        return self._source._body_chunks(self._generation, max_bytes)


async def _empty_chunks() -> AsyncIterator[bytes]:
    return
    yield b""  # pragma: no cover  (makes this an async generator)


@dataclass(frozen=True, slots=True, repr=False)
class Response:
    """A response to send. ``headers`` are (name, value) byte pairs; the server adds
    ``Content-Length`` (bytes body) or chunked framing (async iterable body without a
    ``Content-Length``), ``X-Request-Id`` if absent, and ``Connection: close`` when closing.

    ``forwarded`` marks a response relayed from another server (the sidecar upstream): the
    server then leaves its caching headers to that server (see ``security_headers``).

    ``trailers``, when set, is called once after the whole body has been sent and returns the
    trailer fields to send after it (HTTP/2 trailers: a gRPC upstream's ``grpc-status``). Only the
    HTTP/2 connection sends them; HTTP/1.1 responses go without (gRPC needs HTTP/2).

    ``upgrade``, with status 101, switches the connection to another protocol (see ``Upgrade``)."""

    status: int
    headers: Iterable[tuple[bytes, bytes]] = ()
    body: Body = b""
    forwarded: bool = False
    trailers: Callable[[], Sequence[tuple[bytes, bytes]]] | None = None
    upgrade: Upgrade | None = None

    def __repr__(self) -> str:
        # A body may hold a shared secret or a plaintext: only its size is shown.
        size = f"{len(self.body)} bytes" if isinstance(self.body, (bytes, bytearray)) else "stream"
        return f"Response(status={self.status}, body=<{size}>)"

    @classmethod
    def json(
        cls, status: int, obj: Any, headers: Iterable[tuple[bytes, bytes]] = ()
    ) -> Response:
        text = None
        if obj.__class__ is dict:
            text = _dumps_flat(obj)
            if text is None and len(obj) == 1 and obj.get("items").__class__ is list:
                text = _dumps_items(obj["items"])
        body = (text if text is not None else _dumps(obj)).encode("utf-8")
        return cls(status, (_JSON_CT, *headers) if headers else (_JSON_CT,), body)


class Upgrade(Protocol):
    """What a ``Response(101, upgrade=...)`` hands the connection to: a tunnel (WebSocket).

    The connection consumes the request (which must have no body), sends the 101 head with the
    response's headers and its own ``Connection: Upgrade``, then calls ``run`` once with its byte
    stream and the bytes the client sent after the request head (already read off the wire), and
    closes the connection when ``run`` returns. ``run`` owns its timeouts; a graceful shutdown
    cancels it. If the 101 is never sent (the client left, a header was invalid, the request had a
    body, the connection was cancelled), the connection calls ``abandon`` instead: synchronous, so
    that no cancellation can skip it, it releases what the upgrade holds (an upstream connection).
    Exactly one of the two is called."""

    async def run(self, stream: trio.abc.Stream, received: bytes) -> None: ...

    def abandon(self) -> None: ...


class Base64Text(str):
    """Standard base64 text, made only by :meth:`of` (binascii's output: ``A-Z a-z 0-9 + / =``).

    It is an ordinary ``str`` to everyone; ``Response.json`` alone uses what the type promises,
    writing such a value between quotes as is instead of scanning kilobytes of ciphertext or
    signature for characters to escape (there are none)."""

    __slots__ = ()

    @classmethod
    def of(cls, data: bytes) -> Base64Text:
        return cls(binascii.b2a_base64(data, newline=False).decode("ascii"))


_dumps = compact_encoder(ensure_ascii=False)  # json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
_escape = escape  # ensure_ascii=False, as _dumps


def _dumps_flat(obj: dict[Any, Any]) -> str | None:
    """``_dumps(obj)`` for a flat object of strings, ints, booleans and nulls (most API answers),
    with ``Base64Text`` values copied unscanned; None for anything else (``_dumps`` does it)."""
    escape = _escape
    parts = []
    for name, value in obj.items():
        if name.__class__ is not str:
            return None
        cls = value.__class__
        if cls is Base64Text:
            text = '"' + value + '"'
        elif cls is str:
            text = escape(value)
        elif cls is int:
            text = int.__repr__(value)
        elif value is None:
            text = "null"
        elif value is True:
            text = "true"
        elif value is False:
            text = "false"
        else:
            return None
        parts.append(escape(name) + ":" + text)
    return "{" + ",".join(parts) + "}"


def _dumps_items(items: list[Any]) -> str:
    """``_dumps({"items": items})`` for a batch answer: each item through ``_dumps_flat`` (a
    batch of signatures is tens of kilobytes of ``Base64Text``, copied unscanned), any other item
    (an error entry, with its nested object) through ``_dumps``."""
    parts = []
    for item in items:
        text = _dumps_flat(item) if item.__class__ is dict else None
        parts.append(text if text is not None else _dumps(item))
    return '{"items":[' + ",".join(parts) + "]}"


def error_body(code: str, message: str, request_id: str) -> bytes:
    return _dumps({"error": {"code": code, "message": message, "request_id": request_id}}).encode("utf-8")


_RETRY_AFTER_503 = (b"retry-after", b"1")


def error_response(exc: QpherError, request_id: str) -> Response:
    """The one rendering of an error for clients: ``{"error": {code, message, request_id}}``.

    Only the QpherError's safe ``message`` is shown, never a traceback or a foreign message.
    """
    headers = [_JSON_CT, (REQUEST_ID_HEADER, request_id.encode("ascii"))]
    # Errors that need a response header carry it (WWW-Authenticate on 401, Retry-After on
    # 429, Allow on 405) as ``exc.headers``: fixed, safe values set where the error is raised.
    extra = getattr(exc, "headers", ())
    headers.extend(extra)
    if exc.status == 503 and not any(name == b"retry-after" for name, _ in extra):
        # every 503 is temporary here (a database, Redis, a KMS worker or the audit log is
        # away): say when to try again rather than let clients hammer or give up
        headers.append(_RETRY_AFTER_503)
    return Response(exc.status, headers, error_body(exc.code, exc.message, request_id))
