"""Sidecar forwarding client: HTTP/1.1 to the upstream app, over trio, with h11.

Theory of operation
-------------------
One ``UpstreamClient`` serves the whole gateway. It owns a pool of keep-alive connections to
one upstream (``http://`` or ``https://``) and a nursery, entered with ``async with client:``,
in which the request-body pumps and the idle reaper run.

``send()`` runs one exchange (``_exchange.py``: the request-body pump, the response reader and
the reuse rule) on one connection (``_connection.py``, where foreign errors become ours). This
module holds the pool and what ``send()`` decides before and around an exchange.

**Idle connections** expire after ``idle_timeout`` (a reaper task closes them) and the pool
keeps at most ``max_idle``. Before a pooled connection is reused it is polled: an idle HTTP/1.1
connection must have nothing to read, so a pending EOF (the upstream closed it) or stray bytes
discard it.

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
import ssl
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11
import trio

from qpher_proxy.errors import BadRequest, ConfigError, UpstreamUnavailable
from qpher_proxy.upstream._connection import UpstreamConnection, io_step
from qpher_proxy.upstream._exchange import Headers, UpstreamResponse
from qpher_proxy.upstream._lifetime import NurseryClient

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_MAX_RESPONSE_HEAD_BYTES",
    "DEFAULT_POOL_SIZE",
    "IDEMPOTENT_METHODS",
    "PoolStats",
    "UpstreamClient",
    "UpstreamResponse",
    "UpstreamTarget",
]

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

Body = bytes | bytearray | memoryview | AsyncIterable[bytes] | None


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


@dataclass(frozen=True, slots=True)
class PoolStats:
    connections_opened: int  # total TCP connections made since start
    active: int  # exchanges in progress (hold a pool slot)
    idle: int  # keep-alive connections waiting in the pool


class UpstreamClient(NurseryClient):
    """Pooled HTTP/1.1 client for the sidecar's upstream. Use inside ``async with client:``."""

    _what = "UpstreamClient"

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
        self._idle: list[UpstreamConnection] = []  # oldest first; reuse takes the newest (warmest)
        self._busy: set[UpstreamConnection] = set()
        self._idle_added = trio.Event()
        self._opened = 0
        super().__init__()

    # -- lifetime ------------------------------------------------------------------------

    def _started(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self._reap_idle)

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

    async def _checkout(self, deadline: float, *, fresh: bool) -> UpstreamConnection:
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
        conn = UpstreamConnection(stream, raw, self.max_response_head_bytes)
        self._busy.add(conn)
        return conn

    async def _open_stream(self, deadline: float) -> tuple[trio.abc.Stream, trio.SocketStream]:
        with io_step("connect", deadline):
            raw = await trio.open_tcp_stream(self.target.host, self.target.port)
        if self._tls is None:
            return raw, raw
        stream = trio.SSLStream(raw, self._tls, server_hostname=self.target.host, https_compatible=True)
        try:
            with io_step("tls", deadline):
                await stream.do_handshake()
        except BaseException:
            raw.socket.close()
            raise
        return stream, raw

    def _checkin(self, conn: UpstreamConnection) -> None:
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

    def _discard(self, conn: UpstreamConnection) -> None:
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
        method_b, target_b = self._request_line(method, target)
        data, content_length = _framed_body(method_b, body, content_length)
        try:
            head = h11.Request(method=method_b, target=target_b,
                               headers=self._head_headers(headers, content_length, data is not None))
        except h11.LocalProtocolError as exc:  # h11 validates method, target and every header
            raise BadRequest("the request cannot be forwarded: invalid method, target or header") from exc

        idempotent = method_b.upper() in IDEMPOTENT_METHODS
        deadline = trio.current_time() + self.connect_timeout
        with io_step("pool", deadline):
            await self._slots.acquire()
        try:
            return await self._exchange(head, data, deadline, idempotent=idempotent)
        except BaseException:
            self._slots.release()
            raise

    def _request_line(self, method: bytes | str, target: bytes | str) -> tuple[bytes, bytes]:
        """The method and the origin-form target (under the upstream's path prefix) to send."""
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
        return method_b, target_b

    async def _exchange(
        self, head: h11.Request, body: memoryview | AsyncIterable[bytes] | None, deadline: float,
        *, idempotent: bool,
    ) -> UpstreamResponse:
        """Run the exchange on a pooled connection, and once more on a fresh one when the
        stale-connection retry allows it. The caller holds a pool slot; on success the response
        owns it."""
        replayable = body is None or isinstance(body, memoryview)
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


def _framed_body(
    method: bytes, body: Body, content_length: int | None
) -> tuple[memoryview | AsyncIterable[bytes] | None, int | None]:
    """The body to send (bytes as a byte view, an empty one as ``None``) and its length, if known.

    A method that expects a body and has none is sent with ``Content-Length: 0``."""
    if isinstance(body, (bytes, bytearray, memoryview)):
        body = memoryview(body).cast("B")
        if content_length is not None and content_length != len(body):
            raise ValueError(f"content_length is {content_length} but the body has {len(body)} bytes")
        content_length = len(body)
        if content_length == 0:
            body = None
    elif body is None and content_length:
        raise ValueError(f"content_length is {content_length} but there is no body")
    if body is None and content_length is None and method.upper() in _BODY_EXPECTED:
        content_length = 0
    return body, content_length
