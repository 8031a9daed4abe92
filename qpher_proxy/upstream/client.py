"""Sidecar forwarding client: HTTP/1.1 to the upstream app, over trio, with h11.

Theory of operation
-------------------
One ``UpstreamClient`` serves the whole gateway. It owns a pool of keep-alive connections to
one upstream (``http://`` or ``https://``) and a nursery, entered with ``async with client:``,
in which the request-body pumps and the idle reaper run.

**One exchange = one connection, two tasks.** ``send()`` checks a connection out of the pool
(or connects a new one), writes the request head, and, if there is a body, starts a *pump*
task in the client's nursery that writes the body while the calling task reads the response.
Both directions must run at once: an upstream that answers while it is still reading (an echo
server, a 413 sent early) would otherwise deadlock against a client that insisted on writing
the whole body first, as soon as both TCP windows are full. h11 is full-duplex by design and
trio streams allow one concurrent sender and one concurrent receiver, so the two tasks share
the h11 ``Connection`` and the stream without a lock (h11 calls are synchronous; trio is
single-threaded). ``send()`` returns as soon as the response head has arrived; the response
body is then pulled on demand by iterating ``resp.body_chunks()``. Nothing is buffered whole:
at most ``chunk_bytes`` (64 KiB) is read per ``receive_some`` and written per ``send_all``,
and at most one chunk per direction is in flight.

The exchange outlives ``send()`` on purpose: the gateway returns a response whose body *is*
our chunk iterator, and the HTTP server drains it after the handler has returned. The
connection is released when the body iterator is exhausted (or fails), or by
``resp.aclose()`` (also reachable as ``resp.body_chunks().aclose()``), which is idempotent and
safe under cancellation; call it in a ``finally``.

The request body iterator belongs to the exchange once the pump has pulled from it: it is read
in the pump task (so a ``Cancelled`` aimed at the exchange may land inside its ``__anext__``),
and if the exchange ends before it is exhausted, its ``aclose()`` (if any) is called. Callers
must not touch it afterwards.

**Reuse rule.** A connection goes back to the pool only if, at the end of the response body,
h11 says both sides are ``DONE`` (the request was fully written, the response fully read,
neither side asked to close), the pump finished without error, and no unread byte is left in
h11's buffer (bytes after a complete response are garbage or an attack on response framing).
Anything else - early response while the body was still uploading, ``aclose()`` before the
end, an error, ``Connection: close``, HTTP/1.0 - closes it. Idle connections expire after
``idle_timeout`` (a reaper task closes them) and the pool keeps at most ``max_idle``. Before
a pooled connection is reused it is polled: an idle HTTP/1.1 connection must have nothing to
read, so a pending EOF (the upstream closed it) or stray bytes discard it.

**Stale-connection retry.** The poll cannot see a close that races with our request. If a
*reused* connection fails before a single response byte arrived, the request is sent once more
on a *fresh* connection, but only when that cannot run it twice with different effect: the
method is idempotent (RFC 9110 section 9.2.2: GET, HEAD, OPTIONS, TRACE, PUT, DELETE) and the
body can be replayed - it is ``None`` or ``bytes``, or an async iterator from which the pump
had not yet pulled anything. A streamed body that has started flowing is never retried.

**Timeouts.** ``connect_timeout`` bounds waiting for a pool slot plus TCP connect plus the TLS
handshake (a pool that stays full for that long is also a 504: the upstream is too slow to
keep up). ``read_timeout`` bounds each single write to the upstream and each single read from
it - an inactivity timeout, not a total. While the request body is still being uploaded the
response read has no deadline (a slow *client* is not the upstream's fault; the HTTP server
times the client out); the moment the upload ends the read deadline starts.

**Errors are mapped at one boundary** (``_io`` and ``_translate``): DNS failure, refused or
reset connections and TLS failures become ``UpstreamUnavailable`` (502), expired deadlines
``UpstreamTimeout`` (504), h11's ``RemoteProtocolError`` ``UpstreamBadResponse`` (502); the
foreign exception is kept as ``__cause__`` for the log, and no message names the upstream's
address. An exception raised by the caller's body iterator (the client went away mid-upload)
aborts the exchange and is re-raised, unchanged, in the task reading the response. A body that
disagrees with its declared ``content_length`` gives ``BadRequest`` (400).

**Concurrency.** No lock is held across I/O: the pool is touched only by synchronous code, and
a ``trio.Semaphore(pool_size)`` bounds concurrent exchanges. A slow upstream response holds
its own connection and nothing else.

**TLS to the upstream** uses the stdlib ``ssl`` module through ``trio.SSLStream``: it verifies
the certificate chain and the host name (``create_default_context``), loads an optional client
certificate, and is the path trio itself tests. Its OpenSSL (3.0 here) has no ML-KEM, so this
leg negotiates classical key exchange; the sidecar leg is normally loopback or inside one pod.
``_open_stream`` is the one place that chooses the stream: the project's own pyOpenSSL
``TLSStream`` (``qpher_proxy.tls``) would bring X25519MLKEM768 to this leg too.
"""

from __future__ import annotations

import contextlib
import math
import select
import ssl
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Self
from urllib.parse import urlsplit

import h11
import trio

from qpher_proxy.errors import (
    BadRequest,
    ConfigError,
    UpstreamBadResponse,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)

KiB = 1024

#: Largest read from, and largest write to, the upstream socket; bounds per-exchange buffering.
DEFAULT_CHUNK_BYTES = 64 * KiB
#: Idle keep-alive lifetime: below Node.js's 5 s ``server.keepAliveTimeout``, the shortest
#: common upstream default, so we normally close first (httpcore uses 5 s, Go 90 s).
DEFAULT_IDLE_TIMEOUT = 4.0
#: Largest response head accepted (h11's default is 16 KiB; nginx proxy_buffer_size 4-8 KiB).
DEFAULT_MAX_RESPONSE_HEAD_BYTES = 64 * KiB
DEFAULT_POOL_SIZE = 64

#: RFC 9110 section 9.2.2.
IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
_BODY_EXPECTED = frozenset({b"POST", b"PUT", b"PATCH"})

Headers = list[tuple[bytes, bytes]]
Body = bytes | bytearray | memoryview | AsyncIterable[bytes] | None


# ---- the one error boundary ----------------------------------------------------------

_FOREIGN = (
    OSError,
    ssl.SSLError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    h11.RemoteProtocolError,
)

# phase -> (message when the connection failed, message when the deadline expired)
_MESSAGES = {
    "pool": ("", "timed out waiting for a free upstream connection"),
    "connect": ("could not connect to the upstream", "timed out connecting to the upstream"),
    "tls": ("tls handshake with the upstream failed", "timed out in the tls handshake with the upstream"),
    "send": ("the upstream connection failed while sending the request",
             "timed out sending the request to the upstream"),
    "head": ("the upstream closed the connection before responding", "the upstream did not respond in time"),
    "body": ("the upstream connection failed mid-response", "the upstream stalled mid-response"),
}


def _translate(exc: BaseException, phase: str) -> UpstreamError:
    if isinstance(exc, h11.RemoteProtocolError):
        return UpstreamBadResponse("the upstream sent an invalid response")
    return UpstreamUnavailable(_MESSAGES[phase][0])


@contextlib.contextmanager
def _io(phase: str, deadline: float) -> Iterator[trio.CancelScope]:
    """Run one I/O step under ``deadline``; foreign failures leave as ``UpstreamError``."""
    try:
        with trio.CancelScope(deadline=deadline) as scope:
            yield scope
    except _FOREIGN as exc:
        raise _translate(exc, phase) from exc
    if scope.cancelled_caught:
        raise UpstreamTimeout(_MESSAGES[phase][1])


# ---- configuration --------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class UpstreamTarget:
    """Where to forward: parsed once from ``upstream.url``."""

    scheme: str
    host: str
    port: int
    authority: bytes  # the Host header we send: host[:port], IPv6 bracketed, default port omitted
    path_prefix: bytes  # prepended to every target ("" or "/base", no trailing slash)

    @classmethod
    def from_url(cls, url: str) -> UpstreamTarget:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise ConfigError(f"upstream.url: expected http(s)://host[:port][/prefix], not {url!r}") from exc
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"upstream.url: expected http(s)://host[:port][/prefix], not {url!r}")
        if parts.username is not None or parts.password is not None or parts.query or parts.fragment:
            raise ConfigError("upstream.url: credentials, query and fragment are not allowed")
        if not (parts.hostname.isascii() and parts.path.isascii()):
            raise ConfigError("upstream.url: use the ASCII (punycode, percent-encoded) form of the url")
        default = 443 if parts.scheme == "https" else 80
        port = port if port is not None else default
        host = parts.hostname
        shown = f"[{host}]" if ":" in host else host
        authority = shown if port == default else f"{shown}:{port}"
        return cls(
            scheme=parts.scheme,
            host=host,
            port=port,
            authority=authority.encode("ascii"),
            path_prefix=parts.path.rstrip("/").encode("ascii"),
        )


def _client_tls_context(
    ca_file: str | None, client_cert: str | None, client_key: str | None
) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"upstream.ca_file: cannot load CA certificates from {ca_file!r}") from exc
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    if client_cert is not None:
        try:
            ctx.load_cert_chain(client_cert, client_key)
        except (OSError, ssl.SSLError) as exc:
            # The message names the files, never their content.
            raise ConfigError(
                f"upstream.client_cert/client_key: cannot load the client certificate {client_cert!r}"
            ) from exc
    return ctx


# ---- connections ----------------------------------------------------------------------

class _Connection:
    """One TCP (+TLS) connection to the upstream and its h11 state machine."""

    __slots__ = ("stream", "raw", "h11", "requests", "idle_since")

    def __init__(self, stream: trio.abc.Stream, raw: trio.SocketStream, max_head: int) -> None:
        self.stream = stream
        self.raw = raw
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_head)
        self.requests = 0
        self.idle_since = 0.0

    def looks_dropped(self) -> bool:
        """True if the idle socket is readable: EOF from the upstream, or bytes nobody asked for."""
        try:
            poller = select.poll()
            poller.register(self.raw.socket.fileno(), select.POLLIN)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return True

    def close(self) -> None:
        # Synchronous on purpose: closing the socket is all there is to do (no close_notify is
        # owed in https_compatible mode), trio wakes any task blocked on it with
        # ClosedResourceError, and a cleanup path that cannot checkpoint cannot be cancelled
        # half-way - the pool's bookkeeping stays exact whatever is being cancelled around it.
        self.raw.socket.close()


@dataclass(frozen=True, slots=True)
class PoolStats:
    connections_opened: int  # total TCP connections made since start
    active: int  # exchanges in progress (hold a pool slot)
    idle: int  # keep-alive connections waiting in the pool


class UpstreamClient:
    """Pooled HTTP/1.1 client for the sidecar's upstream. Use inside ``async with client:``."""

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        pool_size: int = DEFAULT_POOL_SIZE,
        max_idle: int | None = None,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        ca_file: str | None = None,
        client_cert: str | None = None,
        client_key: str | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        max_response_head_bytes: int = DEFAULT_MAX_RESPONSE_HEAD_BYTES,
    ) -> None:
        self.target = UpstreamTarget.from_url(url)
        if pool_size < 1 or chunk_bytes < 1 or connect_timeout <= 0 or read_timeout <= 0 or idle_timeout < 0:
            raise ConfigError("upstream: pool_size, chunk_bytes and timeouts must be positive")
        if client_key is not None and client_cert is None:
            raise ConfigError("upstream.client_key is set without upstream.client_cert")
        self._tls: ssl.SSLContext | None = None
        if self.target.scheme == "https":
            self._tls = _client_tls_context(ca_file, client_cert, client_key)
        elif ca_file is not None or client_cert is not None:
            raise ConfigError("upstream.ca_file/client_cert are set but upstream.url is not https")
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.pool_size = pool_size
        self.max_idle = pool_size if max_idle is None else max(0, min(max_idle, pool_size))
        self.idle_timeout = idle_timeout
        self.chunk_bytes = chunk_bytes
        self.max_response_head_bytes = max_response_head_bytes

        self._slots = trio.Semaphore(pool_size)
        self._idle: list[_Connection] = []  # oldest first; reuse takes the newest (warmest)
        self._busy: set[_Connection] = set()
        self._idle_added = trio.Event()
        self._opened = 0
        self._nursery: trio.Nursery | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._closed = False

    # -- lifetime ------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._stack is not None or self._closed:
            raise RuntimeError("an UpstreamClient can be entered only once")
        stack = contextlib.AsyncExitStack()
        self._nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(self._close_all)  # LIFO: runs after the cancel, before the nursery exits
        stack.callback(self._nursery.cancel_scope.cancel)
        self._nursery.start_soon(self._reap_idle)
        self._stack = stack
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        assert self._stack is not None
        self._closed = True
        return await self._stack.__aexit__(exc_type, exc, tb)

    def _close_all(self) -> None:
        conns = self._idle + list(self._busy)
        self._idle.clear()
        self._busy.clear()
        for conn in conns:
            conn.close()

    def stats(self) -> PoolStats:
        return PoolStats(
            connections_opened=self._opened,
            active=self.pool_size - self._slots.value,
            idle=len(self._idle),
        )

    # -- the pool ------------------------------------------------------------------------

    async def _reap_idle(self) -> None:
        while True:
            if not self._idle:
                self._idle_added = trio.Event()
                await self._idle_added.wait()
                continue
            await trio.sleep_until(self._idle[0].idle_since + self.idle_timeout)
            self._prune(trio.current_time())

    def _prune(self, now: float) -> None:
        while self._idle and self._idle[0].idle_since + self.idle_timeout <= now:
            self._idle.pop(0).close()

    async def _checkout(self, deadline: float, *, fresh: bool) -> _Connection:
        if not fresh:
            self._prune(trio.current_time())
            while self._idle:
                conn = self._idle.pop()
                if conn.looks_dropped():
                    conn.close()
                    continue
                self._busy.add(conn)
                return conn
        stream, raw = await self._open_stream(deadline)
        self._opened += 1
        conn = _Connection(stream, raw, self.max_response_head_bytes)
        self._busy.add(conn)
        return conn

    async def _open_stream(self, deadline: float) -> tuple[trio.abc.Stream, trio.SocketStream]:
        with _io("connect", deadline):
            raw = await trio.open_tcp_stream(self.target.host, self.target.port)
        if self._tls is None:
            return raw, raw
        stream = trio.SSLStream(raw, self._tls, server_hostname=self.target.host, https_compatible=True)
        try:
            with _io("tls", deadline):
                await stream.do_handshake()
        except BaseException:
            raw.socket.close()
            raise
        return stream, raw

    def _checkin(self, conn: _Connection) -> None:
        """Return a connection whose exchange ended cleanly (the caller checked h11's states)."""
        self._busy.discard(conn)
        if self._closed or self.max_idle == 0 or self.idle_timeout == 0:
            conn.close()
            return
        conn.idle_since = trio.current_time()
        self._idle.append(conn)
        self._idle_added.set()
        while len(self._idle) > self.max_idle:
            self._idle.pop(0).close()

    def _discard(self, conn: _Connection) -> None:
        self._busy.discard(conn)
        conn.close()

    # -- requests ------------------------------------------------------------------------

    async def send(
        self,
        method: bytes | str,
        target: bytes | str,
        headers: Iterable[tuple[bytes, bytes]],
        body: Body = None,
        content_length: int | None = None,
    ) -> UpstreamResponse:
        """Send one request; return once the response head has arrived.

        ``headers`` should already be cleaned (``prepare_upstream_headers``); framing headers in
        it are ignored: the request is framed from ``body``/``content_length`` (``bytes`` or a
        known length -> ``Content-Length``; an async iterator of unknown length -> chunked). A
        missing ``Host`` is set to the upstream's authority. The caller must ``aclose()`` the
        response (or exhaust its body) to release the connection.
        """
        if self._nursery is None or self._closed:
            raise RuntimeError("UpstreamClient.send() needs the client entered with 'async with'")
        try:
            method_b = method.encode("ascii") if isinstance(method, str) else bytes(method)
            target_b = target.encode("ascii") if isinstance(target, str) else bytes(target)
        except UnicodeEncodeError as exc:
            raise BadRequest("the request method and target must be ASCII") from exc
        if method_b.upper() == b"CONNECT":
            raise BadRequest("CONNECT is not forwarded to the upstream")
        if not (target_b.startswith(b"/") or target_b == b"*"):
            raise BadRequest("only origin-form request targets are forwarded")
        if target_b != b"*":
            target_b = self.target.path_prefix + target_b

        if isinstance(body, (bytes, bytearray, memoryview)):
            body = memoryview(body).cast("B")
            if content_length is not None and content_length != len(body):
                raise ValueError(f"content_length is {content_length} but the body has {len(body)} bytes")
            content_length = len(body)
            if content_length == 0:
                body = None
        elif body is None and content_length:
            raise ValueError(f"content_length is {content_length} but there is no body")
        if body is None and content_length is None and method_b.upper() in _BODY_EXPECTED:
            content_length = 0
        try:
            head = h11.Request(method=method_b, target=target_b,
                               headers=self._head_headers(headers, content_length, body is not None))
        except h11.LocalProtocolError as exc:  # h11 validates method, target and every header
            raise BadRequest("the request cannot be forwarded: invalid method, target or header") from exc
        replayable = body is None or isinstance(body, memoryview)
        idempotent = method_b.upper() in IDEMPOTENT_METHODS

        deadline = trio.current_time() + self.connect_timeout
        with _io("pool", deadline):
            await self._slots.acquire()
        try:
            for attempt in (1, 2):
                conn = await self._checkout(
                    deadline if attempt == 1 else trio.current_time() + self.connect_timeout,
                    fresh=attempt == 2,
                )
                reused = conn.requests > 0
                conn.requests += 1
                ex = UpstreamResponse(self, conn)
                try:
                    await ex._start(head, body)
                    ex._owns_slot = True  # from here on, ex._finish() gives the slot back
                    return ex
                except UpstreamUnavailable:
                    ex._finish(reusable=False)
                    retry = (attempt == 1 and reused and not ex._received_any and idempotent
                             and (replayable or not ex._body_pulled))
                    if not retry:
                        raise
                except BaseException:
                    ex._finish(reusable=False)
                    raise
            raise AssertionError("unreachable")  # pragma: no cover
        except BaseException:
            self._slots.release()
            raise

    @contextlib.asynccontextmanager
    async def request(
        self,
        method: bytes | str,
        target: bytes | str,
        headers: Iterable[tuple[bytes, bytes]],
        body: Body = None,
        content_length: int | None = None,
    ) -> AsyncIterator[UpstreamResponse]:
        """``send()`` as a context manager that always releases the response."""
        resp = await self.send(method, target, headers, body, content_length)
        try:
            yield resp
        finally:
            await resp.aclose()

    def _head_headers(self, headers: Iterable[tuple[bytes, bytes]], content_length: int | None,
                      has_body: bool) -> Headers:
        out: Headers = []
        host: tuple[bytes, bytes] | None = None
        for name, value in headers:
            lname = name.lower()
            if lname in (b"content-length", b"transfer-encoding", b"upgrade"):
                continue  # framing is ours; we never propose a protocol switch
            if lname == b"host":
                host = host or (lname, value)
                continue
            out.append((lname, value))
        out.insert(0, host or (b"host", self.target.authority))
        if content_length is not None:
            out.append((b"content-length", str(content_length).encode("ascii")))
        elif has_body:
            out.append((b"transfer-encoding", b"chunked"))
        return out


class UpstreamResponse:
    """The response to one forwarded request, and the exchange that produces it.

    ``status``, ``reason``, ``http_version``, ``headers`` (as the upstream sent them, names
    lower-cased: pass them through ``prepare_downstream_headers``) and ``content_length`` are
    set when ``send()`` returns. ``body_chunks()`` yields the body in pieces of at most
    ``chunk_bytes``; ``aclose()`` releases the connection (idempotent).
    """

    status: int
    reason: bytes
    http_version: bytes
    headers: Headers
    content_length: int | None

    def __init__(self, client: UpstreamClient, conn: _Connection) -> None:
        self._client = client
        self._conn = conn
        self._upload_done = False  # the request's last byte was handed to the kernel
        self._pump_scope: trio.CancelScope | None = None
        self._pump_finished = trio.Event()
        self._send_error: UpstreamError | None = None  # write failed; an early response may still come
        self._abort: BaseException | None = None  # fatal; raised in the reading task
        self._recv_scope: trio.CancelScope | None = None
        self._received_any = False
        self._body_pulled = False
        self._finished = False
        self._owns_slot = False
        self._body = _BodyIterator(self)

    # -- what the caller uses -----------------------------------------------------------

    def body_chunks(self) -> AsyncIterator[bytes]:
        """The response body; exhausting it releases the connection. One iterator per response."""
        return self._body

    async def aclose(self) -> None:
        """Release the connection; if the body was not read to its end, the connection is closed.

        Safe to call any number of times and under cancellation (the release itself is synchronous)."""
        self._finish(reusable=False)
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        status = getattr(self, "status", None)
        return f"<UpstreamResponse status={status} finished={self._finished}>"

    # -- the exchange -------------------------------------------------------------------

    async def _start(self, head: h11.Request, body: memoryview | AsyncIterable[bytes] | None) -> None:
        conn = self._conn
        data = conn.h11.send(head) or b""
        if body is None:
            data += conn.h11.send(h11.EndOfMessage()) or b""
        await self._send_bytes(data)
        if body is None:
            self._upload_done = True
        else:
            self._pump_scope = trio.CancelScope()
            nursery = self._client._nursery
            assert nursery is not None
            nursery.start_soon(self._pump, body)
        while True:
            event = await self._next_event("head")
            if isinstance(event, h11.Response):
                break
            if not isinstance(event, h11.InformationalResponse):  # 100, 102, 103: not forwarded
                raise UpstreamBadResponse("the upstream sent an invalid response")
        self.status = event.status_code
        self.reason = bytes(event.reason)
        self.http_version = bytes(event.http_version)
        self.headers = [(bytes(n), bytes(v)) for n, v in event.headers]
        self.content_length = None
        if not any(n == b"transfer-encoding" for n, _ in self.headers):
            for n, v in self.headers:
                if n == b"content-length":
                    self.content_length = int(v)  # h11 has validated it

    async def _send_bytes(self, data: bytes) -> None:
        with _io("send", trio.current_time() + self._client.read_timeout):
            await self._conn.stream.send_all(data)

    async def _pump(self, body: memoryview | AsyncIterable[bytes]) -> None:
        """Write the request body (runs in the client's nursery; never raises out of it)."""
        scope = self._pump_scope
        assert scope is not None
        with scope:
            if scope.cancel_called:
                return  # the exchange ended before we ran: leave the caller's iterator untouched
            iterator: AsyncIterator[bytes] | None = None
            exhausted = False
            try:
                step = self._client.chunk_bytes
                if isinstance(body, memoryview):
                    for i in range(0, len(body), step):
                        await self._send_data(body[i:i + step])
                else:
                    iterator = aiter(body)
                    while True:
                        self._body_pulled = True
                        try:
                            chunk = await anext(iterator)
                        except StopAsyncIteration:
                            exhausted = True
                            break
                        view = memoryview(chunk).cast("B")
                        for i in range(0, len(view), step):
                            await self._send_data(view[i:i + step])
                await self._send_bytes(self._conn.h11.send(h11.EndOfMessage()) or b"")
                self._upload_done = True
                self._start_read_deadline()
            except h11.LocalProtocolError as exc:
                self._abort_with(BadRequest("the request body does not match its declared length"), exc)
            except UpstreamTimeout as exc:
                self._abort_with(exc)
            except UpstreamError as exc:
                # The upstream may have answered early (413) and closed: let the reader see it.
                self._send_error = exc
                self._start_read_deadline()
            except Exception as exc:
                # The caller's body iterator failed (client went away, ...) or gave a non-bytes
                # chunk: hand the exception to the task reading the response, which re-raises it.
                self._abort_with(exc)
            finally:
                # From the first pull on, the body iterator is ours: if the exchange ends before
                # it is exhausted, close it (an async generator left suspended would otherwise be
                # finalised by the garbage collector, with a ResourceWarning).
                try:
                    if iterator is not None and not exhausted and hasattr(iterator, "aclose"):
                        # trio types its argument as its AsyncResource ABC; it only calls aclose().
                        await trio.aclose_forcefully(iterator)  # type: ignore[arg-type]
                except Exception as exc:
                    self._abort_with(exc)
                finally:
                    self._pump_finished.set()

    async def _send_data(self, piece: memoryview) -> None:
        if piece:
            # h11 types Data.data as bytes but frames any bytes-like object: a view sends the
            # caller's chunk without copying it.
            await self._send_bytes(self._conn.h11.send(h11.Data(data=piece)) or b"")  # type: ignore[arg-type]

    def _abort_with(self, exc: BaseException, cause: BaseException | None = None) -> None:
        if cause is not None:
            exc.__cause__ = cause
        if self._abort is None:
            self._abort = exc
        if self._recv_scope is not None:
            self._recv_scope.cancel()

    def _start_read_deadline(self) -> None:
        if self._recv_scope is not None:
            self._recv_scope.deadline = min(self._recv_scope.deadline,
                                            trio.current_time() + self._client.read_timeout)

    def _raise_if_aborted(self) -> None:
        if self._abort is not None:
            raise self._abort

    async def _next_event(self, phase: str) -> h11.Event:
        conn = self._conn
        while True:
            self._raise_if_aborted()
            try:
                event = conn.h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise _translate(exc, phase) from exc
            if event is not h11.NEED_DATA:
                if event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
                    raise UpstreamBadResponse("the upstream sent an invalid response")
                return event  # type: ignore[return-value]
            uploading = not self._upload_done and self._send_error is None
            deadline = math.inf if uploading else trio.current_time() + self._client.read_timeout
            try:
                with _io(phase, deadline) as scope:
                    self._recv_scope = scope
                    data = await conn.stream.receive_some(self._client.chunk_bytes)
            except UpstreamError:
                self._raise_if_aborted()
                if self._send_error is not None and not self._received_any:
                    raise self._send_error from None
                raise
            finally:
                self._recv_scope = None
            if not data and not self._received_any:
                raise UpstreamUnavailable(_MESSAGES["head"][0])
            self._received_any = True
            # h11 types receive_data's argument as bytes; it appends it to a bytearray, so the
            # bytearray a trio stream may return needs no copy.
            conn.h11.receive_data(data)  # type: ignore[arg-type]

    async def _end_of_body(self) -> None:
        """The response's EndOfMessage arrived: reuse the connection if the exchange was clean."""
        h = self._conn.h11
        if h.our_state is h11.DONE and not self._pump_finished.is_set() and self._pump_scope is not None:
            await self._pump_finished.wait()  # its last send_all is in flight (bounded by read_timeout)
        clean = (
            h.our_state is h11.DONE and h.their_state is h11.DONE
            and self._abort is None and self._send_error is None and self._upload_done
            and not h.trailing_data[0]
        )
        if clean:
            h.start_next_cycle()
        self._finish(reusable=clean)

    def _finish(self, *, reusable: bool) -> None:
        if self._finished:
            return
        self._finished = True
        if self._pump_scope is not None:
            self._pump_scope.cancel()
        try:
            if reusable:
                self._client._checkin(self._conn)
            else:
                self._client._discard(self._conn)
        finally:
            if self._owns_slot:
                self._owns_slot = False
                self._client._slots.release()


class _BodyIterator:
    """``async for chunk in resp.body_chunks()``: a plain iterator class, not an async generator,
    so that releasing the connection never depends on generator finalisation."""

    __slots__ = ("_resp", "_done")

    def __init__(self, resp: UpstreamResponse) -> None:
        self._resp = resp
        self._done = False

    def __aiter__(self) -> _BodyIterator:
        return self

    async def __anext__(self) -> bytes:
        resp = self._resp
        if self._done or resp._finished:
            self._done = True
            raise StopAsyncIteration
        try:
            while True:
                event = await resp._next_event("body")
                if isinstance(event, h11.Data):
                    if event.data:
                        return bytes(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    self._done = True
                    await resp._end_of_body()
                    raise StopAsyncIteration
                else:
                    raise UpstreamBadResponse("the upstream sent an invalid response")
        except StopAsyncIteration:
            raise
        except BaseException:
            self._done = True
            resp._finish(reusable=False)
            raise

    async def aclose(self) -> None:
        self._done = True
        await self._resp.aclose()
