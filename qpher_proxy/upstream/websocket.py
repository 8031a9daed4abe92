"""WebSocket upgrades for the sidecar: recognising one, and the handshake with the upstream.

Theory of operation
-------------------
**Which requests.** A request is a WebSocket upgrade (RFC 6455 section 4.1) when it is a GET
without a body whose ``Connection`` lists ``upgrade``, whose ``Upgrade`` lists ``websocket``,
with ``Sec-WebSocket-Version: 13`` and a ``Sec-WebSocket-Key`` that is the base64 of 16 bytes
(:func:`is_websocket_upgrade`). Anything else is an ordinary request: its ``Upgrade`` and
``Connection`` are hop-by-hop and stripped (``headers.py``), so ``h2c`` or any other protocol is
never proposed to the upstream.

**The upstream's headers** are those of any forwarded request (``prepare_upstream_headers``: the
identity headers, ``X-Forwarded-*``, no API key, no hop-by-hop header), plus ``Connection:
Upgrade`` and ``Upgrade: websocket`` (:func:`upgrade_request_headers`). The ``Sec-WebSocket-*``
headers are end-to-end and pass as they came.

**The handshake** (:func:`open_websocket`) runs on a *fresh* connection, never a pooled one (the
connection becomes the tunnel and never returns to the pool), opened as the pooled client opens
its own (``UpstreamClient._open_stream``: plain TCP, or TLS verified against ``ca_file``), with
h11 as the client; every step is bounded by the client's timeouts and its failures map to 502/504
as for any forwarded request (``_connection.io_step``). The answer:

- ``101`` with ``Upgrade: websocket`` and the ``Sec-WebSocket-Accept`` that the key calls for
  (SHA-1 of key + GUID, base64) becomes a tunnel; any bytes the upstream sent after the head are
  kept in ``received`` for the client. A 101 that fails either check is ``UpstreamBadResponse``
  (502): the client is never switched to a protocol the upstream did not agree to.
- anything else (``400``, ``403``, ``426``, a redirect) is an ordinary response, its body streamed
  from the same connection, which is closed once read (``body_chunks``, ``aclose``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable

import h11
import trio

from qpher_proxy.errors import BadRequest, UpstreamBadResponse, UpstreamUnavailable
from qpher_proxy.upstream._connection import PHASE_MESSAGES, io_step, translate
from qpher_proxy.upstream.client import UpstreamClient
from qpher_proxy.upstream.headers import prepare_downstream_headers

__all__ = [
    "WEBSOCKET_GUID",
    "WebSocketHandshake",
    "accept_value",
    "downstream_101_headers",
    "is_websocket_upgrade",
    "open_websocket",
    "upgrade_request_headers",
]

Headers = list[tuple[bytes, bytes]]

WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3
_TOKEN_SPLIT = re.compile(rb"[ \t]*,[ \t]*")
_NOT_SENT = frozenset({b"host", b"content-length", b"transfer-encoding", b"connection", b"upgrade"})


def _tokens(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> set[bytes]:
    found: set[bytes] = set()
    for n, v in headers:
        if n.lower() == name:
            found.update(t.lower() for t in _TOKEN_SPLIT.split(v.strip(b" \t")) if t)
    return found


def _only(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The value of ``name`` if it occurs exactly once."""
    values = [v for n, v in headers if n.lower() == name]
    return values[0].strip(b" \t") if len(values) == 1 else None


def is_websocket_upgrade(method: str, headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether a request is a valid WebSocket opening handshake (RFC 6455 section 4.1)."""
    if method != "GET":
        return False
    headers = list(headers)
    if b"upgrade" not in _tokens(headers, b"connection") or b"websocket" not in _tokens(headers, b"upgrade"):
        return False
    if _only(headers, b"sec-websocket-version") != b"13":
        return False
    if any(n.lower() == b"transfer-encoding" for n, _ in headers):
        return False
    lengths = [v.strip(b" \t") for n, v in headers if n.lower() == b"content-length"]
    if any(v != b"0" for v in lengths):
        return False
    key = _only(headers, b"sec-websocket-key")
    if key is None:
        return False
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        return False


def accept_value(key: bytes) -> bytes:
    """The ``Sec-WebSocket-Accept`` a server must answer ``key`` with."""
    return base64.b64encode(hashlib.sha1(key.strip(b" \t") + WEBSOCKET_GUID).digest())


def upgrade_request_headers(prepared: Headers) -> Headers:
    """The headers for the upstream: ``prepared`` (``prepare_upstream_headers``) and the upgrade."""
    return [*prepared, (b"connection", b"Upgrade"), (b"upgrade", b"websocket")]


def downstream_101_headers(upstream_headers: Iterable[tuple[bytes, bytes]]) -> Headers:
    """The upstream 101's headers for the client: end-to-end ones (``Sec-WebSocket-Accept``,
    ``-Protocol``, ``-Extensions``, cookies...) and ``Upgrade: websocket``; the HTTP server adds
    ``Connection: Upgrade``."""
    return [*prepare_downstream_headers(upstream_headers), (b"upgrade", b"websocket")]


class WebSocketHandshake:
    """The upstream's answer to an upgrade request, on its own connection.

    ``switched``: the upstream accepted (101); ``stream`` is then the tunnel's upstream end and
    ``received`` what the upstream sent after its head. Otherwise ``body_chunks()`` streams the
    body of the ordinary response. ``close()`` (synchronous, idempotent) releases the connection;
    a tunnel closes ``stream`` itself."""

    status: int
    headers: Headers

    def __init__(self, stream: trio.abc.Stream, raw: trio.SocketStream, conn: h11.Connection,
                 read_timeout: float, chunk_bytes: int) -> None:
        self.stream = stream
        self._raw = raw
        self._h = conn
        self._read_timeout = read_timeout
        self._chunk_bytes = chunk_bytes
        self.switched = False
        self.received = b""
        self._done = False

    def close(self) -> None:
        self._done = True
        self._raw.socket.close()

    async def _next_event(self, phase: str) -> h11.Event:
        h = self._h
        while True:
            try:
                event = h.next_event()
            except h11.RemoteProtocolError as exc:
                raise translate(exc, phase) from exc
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]
            with io_step(phase, trio.current_time() + self._read_timeout):
                data = await self.stream.receive_some(self._chunk_bytes)
            h.receive_data(data)  # type: ignore[arg-type]  # h11 appends any bytes-like object

    def body_chunks(self) -> _RefusalBody:
        return _RefusalBody(self)


class _RefusalBody:
    """The body of a non-101 answer; the connection closes at its end (or ``aclose``)."""

    __slots__ = ("_hs",)

    def __init__(self, hs: WebSocketHandshake) -> None:
        self._hs = hs

    def __aiter__(self) -> _RefusalBody:
        return self

    async def __anext__(self) -> bytes:
        hs = self._hs
        try:
            while not hs._done:
                event = await hs._next_event("body")
                if isinstance(event, h11.Data):
                    if event.data:
                        return bytes(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    raise UpstreamBadResponse("the upstream sent an invalid response")
        except BaseException:
            hs.close()
            raise
        hs.close()
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self._hs.close()
        await trio.lowlevel.cancel_shielded_checkpoint()


async def open_websocket(
    client: UpstreamClient, target: bytes | str, headers: Headers, key: bytes
) -> WebSocketHandshake:
    """Send the upgrade request for ``target`` (origin-form, normalised) on a fresh connection
    and read the upstream's answer. ``headers`` from :func:`upgrade_request_headers`; ``key`` the
    client's ``Sec-WebSocket-Key``."""
    method_b, target_b = client._request_line("GET", target)
    sent: Headers = [(b"host", client.target.authority)]
    sent += [(n.lower(), v) for n, v in headers if n.lower() not in _NOT_SENT]
    sent += [(b"connection", b"Upgrade"), (b"upgrade", b"websocket")]
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=client.max_response_head_bytes)
    try:
        data = conn.send(h11.Request(method=method_b, target=target_b, headers=sent))
        data = (data or b"") + (conn.send(h11.EndOfMessage()) or b"")
    except h11.LocalProtocolError as exc:
        raise BadRequest("the request cannot be forwarded: invalid method, target or header") from exc
    stream, raw = await client._open_stream(trio.current_time() + client.connect_timeout)
    hs = WebSocketHandshake(stream, raw, conn, client.read_timeout, client.chunk_bytes)
    try:
        with io_step("send", trio.current_time() + client.read_timeout):
            await stream.send_all(data)
        while True:
            event = await hs._next_event("head")
            if isinstance(event, h11.InformationalResponse) and event.status_code == 101:
                break
            if isinstance(event, h11.Response):
                hs.status = event.status_code
                hs.headers = [(bytes(n), bytes(v)) for n, v in event.headers]
                return hs
            if isinstance(event, h11.ConnectionClosed):
                raise UpstreamUnavailable(PHASE_MESSAGES["head"][0])
            if not isinstance(event, h11.InformationalResponse):  # 100, 103: not forwarded
                raise UpstreamBadResponse("the upstream sent an invalid response")
        hs.status = 101
        hs.headers = [(bytes(n), bytes(v)) for n, v in event.headers]
        if (b"websocket" not in _tokens(hs.headers, b"upgrade")
                or _only(hs.headers, b"sec-websocket-accept") != accept_value(key)):
            raise UpstreamBadResponse("the upstream accepted the websocket upgrade with an invalid handshake")
        hs.switched = True
        hs.received = bytes(conn.trailing_data[0])
        return hs
    except BaseException:
        hs.close()
        raise
