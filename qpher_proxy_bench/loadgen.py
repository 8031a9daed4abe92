"""A multi-process TLS load generator for loopback benchmarks.

    with LoadGenerator(clients=1) as lg:
        tls = ClientTLS(group="X25519MLKEM768", cafile="certs/ca.crt")
        hs = lg.run(LoadSpec.handshakes(port, tls, seconds=5))
        ka = lg.run(LoadSpec.keepalive(port, tls, build_request("GET", "/healthz"), connections=16,
                                       seconds=5))
        print(hs.rate, ka.rate, ka.p50_ms, ka.p99_ms, ka.statuses, ka.errors)

Two modes:

- ``handshake``: connect, full TLS 1.3 handshake (never a resumption: the client keeps no
  session and sends no ticket), close; ``connections`` of them in flight at once. The figure
  is completed handshakes per second; the latency is connect-to-handshake-done.
  With ``ClientTLS(resume=True)`` each new connection offers the session (ticket) saved from
  the last one that completed in this worker, and a connection completes once the server's
  NewSessionTicket arrived after the handshake (a real client reads it before it can reuse
  it); ``LoadResult.resumed`` counts the measured handshakes the server actually resumed,
  the first ones (no session yet) and any the server refused are full handshakes. The
  latency is still connect-to-handshake-done. ``ClientTLS(await_ticket=True)`` runs the same
  cycle (wait for the ticket, then close) without offering a session: the full-handshake
  baseline to compare resumption with (a server that sends no ticket at all leaves such
  connections waiting until ``timeout``).
- ``keepalive``: ``connections`` TLS connections, set up before the clock starts, each sending
  one pre-built request, waiting for the whole response, sending the next (one request in
  flight per connection, no pipelining). The figure is 2xx responses per second; latency is
  request-written to response-complete. A non-2xx response counts by status (``statuses``),
  a broken connection, a TLS failure or a timeout by kind (``errors``); a connection that
  breaks or answers ``Connection: close`` is replaced so that concurrency stays constant.

Both run for ``warmup`` seconds unmeasured, then for ``seconds`` (duration-bounded) and/or
until ``count`` completions (count-bounded), whichever comes first, and stop by themselves.
Only loopback addresses are accepted.

Why it looks like this. The machine it was written for has two cores, shared by the server
under test and the client: every microsecond the client spends is taken from the server. So
each client process is one thread running a level-triggered epoll loop over non-blocking
sockets, with pyOpenSSL ``Connection`` objects in socket mode (OpenSSL reads and writes the
file descriptor itself: no Python-level copying between memory BIOs, no trio scheduler); the
request is bytes built once; a response is "parsed" by finding the end of the header block,
the status digits and ``content-length`` (chunked bodies are walked, rarely needed), and the
body is skipped. pyOpenSSL is used for both groups (the stdlib ``ssl`` module links the system
OpenSSL, which may lack ML-KEM) and the groups are set the way the product sets them
(``qpher_proxy.tls._openssl.set_groups``), so the client offers exactly one group.

Processes are started once (``spawn``: nothing of the parent's state is inherited) and reused
for every run of a ``LoadGenerator``; a run is: send each worker its share of the spec, each
sets up (connections for keep-alive) and says ready, then the parent sends one common start
time (``time.monotonic`` is system-wide on Linux) and collects the results. Latencies travel
back as packed doubles and are merged before taking percentiles.
"""

from __future__ import annotations

import array
import errno
import functools
import ipaddress
import multiprocessing as mp
import os
import resource
import select
import socket
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection as Pipe
from types import TracebackType
from typing import Any, Literal

__all__ = [
    "CPUWatch",
    "ClientTLS",
    "LoadGenerator",
    "LoadResult",
    "LoadSpec",
    "ProbeResult",
    "build_request",
    "child_pids",
    "cpu_seconds",
    "probe",
    "process_cpu_seconds",
    "process_tree",
    "response_length",
    "run_load",
]

Mode = Literal["handshake", "keepalive"]

DEFAULT_TIMEOUT = 10.0  # seconds a connect+handshake or a response may take before it counts as an error
DEFAULT_WARMUP = 0.5  # seconds run but not measured (server caches, CPU frequency, connection ramp)
READY_TIMEOUT = 60.0  # seconds for the workers to set up (keep-alive: every connection handshaken)
_RECV_SIZE = 16384 + 64  # one TLS record of plaintext: SSL_read never returns more than that
_TIMEOUT_SCAN = 0.1  # seconds between scans for stuck connections
_RETRY_DELAY = 0.001  # seconds before a failed connection is replaced (no busy loop on a dead server)

# connection states
_HANDSHAKE, _IDLE, _SEND, _RECV, _TICKET = range(5)


# ---- specs and results ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientTLS:
    """How the client speaks TLS: exactly one key-exchange group offered; verify against
    ``cafile`` (None: no verification, which saves the client two ECDSA verifications per
    handshake and is what the handshake benchmark uses after a verified probe)."""

    group: str
    cafile: str | None = None
    server_name: str = "localhost"
    alpn: tuple[str, ...] = ("http/1.1",)
    min_version: Literal["1.2", "1.3"] = "1.3"
    resume: bool = False  # handshake mode: offer the last saved session (TLS 1.3 ticket)
    await_ticket: bool = False  # handshake mode: done once the server's ticket arrived (implied by resume)


@dataclass(frozen=True, slots=True)
class LoadSpec:
    mode: Mode
    port: int
    tls: ClientTLS
    host: str = "127.0.0.1"
    connections: int = 16  # keep-alive connections, or handshakes in flight
    seconds: float | None = 5.0
    count: int | None = None
    warmup: float = DEFAULT_WARMUP
    request: bytes = b""  # keep-alive only: the whole request, pre-built (``build_request``)
    timeout: float = DEFAULT_TIMEOUT

    def __post_init__(self) -> None:
        if self.mode not in ("handshake", "keepalive"):
            raise ValueError(f"mode: expected 'handshake' or 'keepalive', got {self.mode!r}")
        try:
            loopback = ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError(f"host: expected a loopback address such as 127.0.0.1, got {self.host!r}")
        if self.seconds is None and self.count is None:
            raise ValueError("expected seconds or count (or both) to bound the run")
        if self.seconds is not None and not self.seconds > 0:
            raise ValueError(f"seconds: expected > 0, got {self.seconds!r}")
        if self.count is not None and self.count < 1:
            raise ValueError(f"count: expected >= 1, got {self.count!r}")
        if self.connections < 1:
            raise ValueError(f"connections: expected >= 1, got {self.connections!r}")
        if self.mode == "keepalive" and not self.request:
            raise ValueError("keepalive: expected a request (build_request(...))")

    @classmethod
    def handshakes(cls, port: int, tls: ClientTLS, *, connections: int = 8, **kw: Any) -> LoadSpec:
        return cls("handshake", port, tls, connections=connections, **kw)

    @classmethod
    def keepalive(
        cls, port: int, tls: ClientTLS, request: bytes, *, connections: int = 16, **kw: Any
    ) -> LoadSpec:
        return cls("keepalive", port, tls, connections=connections, request=request, **kw)


@dataclass(frozen=True, slots=True)
class LoadResult:
    mode: Mode
    group: str
    connections: int
    clients: int
    ok: int  # handshakes completed, or 2xx responses, inside the measured window
    elapsed: float  # seconds of the measured window
    latencies_ms: tuple[float, ...] = field(repr=False)  # sorted, of the ``ok`` completions
    statuses: dict[int, int] = field(default_factory=dict)  # every response status seen (keep-alive)
    errors: dict[str, int] = field(default_factory=dict)  # "status 429", "reset", "tls", "timeout", ...
    error_samples: dict[str, str] = field(default_factory=dict)  # one message per error kind
    negotiated: dict[str, int] = field(default_factory=dict)  # group name -> connections
    client_cpu_s: float = 0.0  # CPU seconds the client processes used in the window
    resumed: int = 0  # of the ``ok`` handshakes, those the server resumed (ClientTLS.resume)

    @property
    def rate(self) -> float:
        return self.ok / self.elapsed if self.elapsed > 0 else 0.0

    def percentile_ms(self, q: float) -> float:
        lat = self.latencies_ms
        if not lat:
            return float("nan")
        return lat[min(len(lat) - 1, int(q * len(lat)))]

    @property
    def p50_ms(self) -> float:
        return self.percentile_ms(0.50)

    @property
    def p99_ms(self) -> float:
        return self.percentile_ms(0.99)

    @property
    def completed(self) -> int:
        """Every measured completion: handshakes, or responses of any status."""
        return sum(self.statuses.values()) if self.statuses else self.ok

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def summary(self) -> dict[str, Any]:
        """JSON-friendly figures (no raw latencies)."""
        return {
            "mode": self.mode, "group": self.group, "connections": self.connections, "clients": self.clients,
            "ok": self.ok, "elapsed_s": round(self.elapsed, 4), "rate": round(self.rate, 1),
            "p50_ms": _round(self.p50_ms), "p99_ms": _round(self.p99_ms),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "errors": dict(sorted(self.errors.items())), "error_samples": dict(self.error_samples),
            "negotiated": dict(self.negotiated), "client_cpu_s": round(self.client_cpu_s, 3),
            "resumed": self.resumed,
        }


def _round(x: float) -> float | None:
    return None if x != x else round(x, 3)


def build_request(
    method: str,
    path: str,
    *,
    headers: dict[str, str] | tuple[tuple[str, str], ...] = (),
    body: bytes = b"",
    host: str = "localhost",
) -> bytes:
    """One HTTP/1.1 request as bytes (``Content-Length`` added when there is a body or the
    method carries one)."""
    items = list(headers.items()) if isinstance(headers, dict) else list(headers)
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in items]
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# ---- response framing (minimal, fast) ---------------------------------------------------------


class ResponseError(Exception):
    """The bytes received are not an HTTP/1.1 response we can frame."""


def response_length(buf: bytes) -> tuple[int, int, bool] | None:
    """``(total_length, status, close)`` of the first complete response in ``buf``, or None
    if incomplete. Finds the header end, the status and ``content-length``; walks a chunked
    body; never looks at body bytes otherwise."""
    hend = buf.find(b"\r\n\r\n")
    if hend < 0:
        if len(buf) > 65536:
            raise ResponseError("header block over 64 KiB")
        return None
    if buf[:7] != b"HTTP/1." or buf[12:13] not in (b" ", b"\r"):
        raise ResponseError(f"not an HTTP/1.x status line: {bytes(buf[:32])!r}")
    try:
        status = int(buf[9:12])
    except ValueError:
        raise ResponseError(f"bad status: {bytes(buf[:32])!r}") from None
    head = buf[:hend].lower()
    close = b"\r\nconnection: close" in head
    start = hend + 4
    i = head.find(b"\r\ncontent-length:")
    if i >= 0:
        j = head.find(b"\r\n", i + 17)
        try:
            length = int(head[i + 17 : j if j >= 0 else hend])
        except ValueError:
            raise ResponseError("bad content-length") from None
        total = start + length
        return (total, status, close) if len(buf) >= total else None
    if b"\r\ntransfer-encoding: chunked" in head:
        pos = start
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                return None
            try:
                size = int(buf[pos:eol].split(b";", 1)[0], 16)
            except ValueError:
                raise ResponseError("bad chunk size") from None
            if size == 0:
                if buf[eol + 2 : eol + 4] == b"\r\n":  # no trailers
                    return eol + 4, status, close
                end = buf.find(b"\r\n\r\n", eol)  # trailers, then an empty line
                return (end + 4, status, close) if end >= 0 else None
            pos = eol + 2 + size + 2
            if len(buf) < pos:
                return None
    if status in (204, 304) or 100 <= status < 200:
        return start, status, close
    raise ResponseError("response without content-length or chunked framing")


# ---- the client TLS context ---------------------------------------------------------------------


def client_context(tls: ClientTLS) -> Any:
    """A pyOpenSSL client context offering exactly ``tls.group`` (via the product's setter)."""
    from OpenSSL import SSL

    from qpher_proxy.tls import _openssl

    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION if tls.min_version == "1.3" else SSL.TLS1_2_VERSION)
    ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
    if not _openssl.set_groups(ctx, (tls.group,)):
        raise ValueError(f"group: this OpenSSL does not know {tls.group!r}")
    # No client session cache: with ``resume`` the runner keeps the session itself; without,
    # no ticket is asked for and every connection is a full handshake.
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    if not (tls.resume or tls.await_ticket):
        ctx.set_options(SSL.OP_NO_TICKET)
    if tls.cafile:
        ctx.load_verify_locations(os.fsencode(tls.cafile))
        ctx.set_verify(SSL.VERIFY_PEER)
    else:
        ctx.set_verify(SSL.VERIFY_NONE)
    if tls.alpn:
        ctx.set_alpn_protos([p.encode() for p in tls.alpn])
    return ctx


@dataclass(frozen=True, slots=True)
class ProbeResult:
    ok: bool
    version: str | None = None
    cipher: str | None = None
    group: str | None = None
    alpn: str | None = None
    status: int | None = None  # of the request, if one was sent
    error: str | None = None
    body: bytes = field(default=b"", repr=False)  # the response body as framed (chunks not decoded)


def probe(port: int, tls: ClientTLS, *, host: str = "127.0.0.1", request: bytes | None = None,
          timeout: float = 10.0) -> ProbeResult:
    """One blocking handshake (and optionally one request) in this process: what a client
    offering ``tls.group`` actually negotiates, or why it fails."""
    from OpenSSL import SSL

    LoadSpec("handshake", port, tls, host=host)  # validates host (loopback only)
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        sock.settimeout(None)
        sock.setblocking(False)
        conn = SSL.Connection(client_context(tls), sock)
        conn.set_connect_state()
        if tls.server_name:
            conn.set_tlsext_host_name(tls.server_name.encode("idna"))
        deadline = time.monotonic() + timeout
        try:
            _blocking(conn.do_handshake, sock, deadline)
            info = dict(version=conn.get_protocol_version_name(), cipher=conn.get_cipher_name(),
                        group=_canonical(conn.get_group_name()),
                        alpn=(conn.get_alpn_proto_negotiated() or b"").decode() or None)
            status, body = None, b""
            if request is not None:
                view = memoryview(request)
                while view:
                    n = _blocking(functools.partial(conn.send, view), sock, deadline)
                    view = view[n:]
                buf = b""
                while True:
                    buf += _blocking(lambda: conn.recv(_RECV_SIZE), sock, deadline)
                    framed = response_length(buf)
                    if framed is not None:
                        status = framed[1]
                        body = buf[buf.find(b"\r\n\r\n") + 4 : framed[0]]
                        break
            return ProbeResult(True, status=status, body=body, **info)
        except (SSL.Error, OSError, ResponseError, TimeoutError) as exc:
            return ProbeResult(False, error=_describe(exc))
    finally:
        sock.close()


def _blocking(fn: Any, sock: socket.socket, deadline: float) -> Any:
    from OpenSSL import SSL

    while True:
        try:
            return fn()
        except SSL.WantReadError:
            want = select.POLLIN
        except SSL.WantWriteError:
            want = select.POLLOUT
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        p = select.poll()
        p.register(sock, want)
        p.poll(left * 1000)


def _canonical(name: str | None) -> str | None:
    if name is None:
        return None
    from qpher_proxy.tls.context import canonical_group_name

    return canonical_group_name(name)


def _describe(exc: BaseException) -> str:
    """A short, secret-free description of a client-side failure."""
    from OpenSSL import SSL

    if isinstance(exc, SSL.SysCallError):
        return f"connection error: {exc.args[1] if len(exc.args) > 1 else exc}"
    if isinstance(exc, SSL.Error):
        reasons = [
            r[2] for r in (exc.args[0] if exc.args and isinstance(exc.args[0], list) else []) if len(r) > 2
        ]
        return "tls: " + ("; ".join(reasons) if reasons else type(exc).__name__)
    return f"{type(exc).__name__}: {exc}"


# ---- the worker's event loop ---------------------------------------------------------------------


class _Conn:
    __slots__ = ("sock", "tls", "fd", "state", "mask", "buf", "out", "t0", "deadline", "t1", "session0")

    def __init__(self, sock: socket.socket, tls: Any, now: float, timeout: float) -> None:
        self.sock = sock
        self.tls = tls
        self.fd = sock.fileno()
        self.state = _HANDSHAKE
        self.mask = 0
        self.buf = b""
        self.out = b""
        self.t0 = now
        self.deadline = now + timeout
        self.t1 = 0.0  # resume mode: when the handshake completed
        self.session0: Any = None  # resume mode: the session pointer right after the handshake


class _Poller:
    """epoll where there is one (Linux), poll elsewhere; timeouts in seconds."""

    def __init__(self) -> None:
        self._epoll = getattr(select, "epoll", None)
        self._p: Any = self._epoll() if self._epoll else select.poll()
        self.IN = select.EPOLLIN if self._epoll else select.POLLIN
        self.OUT = select.EPOLLOUT if self._epoll else select.POLLOUT

    def register(self, fd: int, mask: int) -> None:
        self._p.register(fd, mask)

    def modify(self, fd: int, mask: int) -> None:
        self._p.modify(fd, mask)

    def unregister(self, fd: int) -> None:
        self._p.unregister(fd)

    def poll(self, timeout: float) -> list[tuple[int, int]]:
        if self._epoll:
            return self._p.poll(timeout)
        return self._p.poll(timeout * 1000)

    def close(self) -> None:
        if self._epoll:
            self._p.close()


class _Runner:
    """One worker's share of one run: its connections, its counters, its loop."""

    def __init__(self, spec: LoadSpec) -> None:
        from OpenSSL import SSL

        from qpher_proxy.tls import _openssl

        self.SSL = SSL
        self.session_reused = _openssl.session_reused
        self.spec = spec
        self.ctx = client_context(spec.tls)
        self.sni = spec.tls.server_name.encode("idna") if spec.tls.server_name else b""
        family = socket.AF_INET6 if ":" in spec.host else socket.AF_INET
        self.family = family
        self.addr = (spec.host, spec.port)
        self.poller = _Poller()
        self.conns: dict[int, _Conn] = {}
        self.keepalive = spec.mode == "keepalive"
        self.resume = spec.tls.resume and not self.keepalive
        self.await_ticket = (spec.tls.resume or spec.tls.await_ticket) and not self.keepalive
        self.session: Any = None  # resume mode: the last session saved, offered by the next connection
        self.resumed = 0
        self.request = spec.request
        # results (measured window only)
        self.running = False  # between the common start and the end of the window
        self.measuring = False
        self.stopping = False
        self.window_start = self.window_end = 0.0
        self.ok = 0
        self.done = 0  # every measured completion, for count-bounded runs
        self.limit = spec.count if spec.count is not None else float("inf")
        self.latencies = array.array("d")
        self.statuses: Counter[int] = Counter()
        self.errors: Counter[str] = Counter()
        self.samples: dict[str, str] = {}
        self.negotiated: Counter[str] = Counter()
        self.setup_errors: list[str] = []
        # Connections to open once the current batch of events is handled. Never opened from
        # inside a handler: a handshake can complete (or fail) synchronously when the server
        # answers before our call returns, and replacing it there would recurse without bound.
        self.to_open = 0
        self.retry_at: list[float] = []

    # -- connections --

    def _open(self, now: float) -> None:
        SSL = self.SSL
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex(self.addr)
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self._error("connect", os.strerror(err))
            if self.running and not self.stopping:
                self.retry_at.append(now + _RETRY_DELAY)
            return
        tls = SSL.Connection(self.ctx, sock)
        if self.resume and self.session is not None:
            tls.set_session(self.session)
        tls.set_connect_state()
        if self.sni:
            tls.set_tlsext_host_name(self.sni)
        c = _Conn(sock, tls, now, self.spec.timeout)
        self.conns[c.fd] = c
        c.mask = self.poller.OUT
        self.poller.register(c.fd, c.mask)
        # ClientHello now: if the TCP connect is still in progress OpenSSL sees EAGAIN and
        # we wait for writability, which is also how a finished connect is signalled.
        self._handshake(c, now)

    def _close(self, c: _Conn) -> None:
        if self.resume:
            # Freed without a close_notify, OpenSSL would mark the session not resumable
            # (ssl_clear_bad_session); say it was sent, without sending anything.
            c.tls.set_shutdown(self.SSL.SENT_SHUTDOWN)
        self.conns.pop(c.fd, None)
        try:
            self.poller.unregister(c.fd)
        except (OSError, KeyError, ValueError):
            pass
        c.sock.close()

    def _want(self, c: _Conn, mask: int) -> None:
        if c.mask != mask:
            c.mask = mask
            self.poller.modify(c.fd, mask)

    def _error(self, kind: str, message: str) -> None:
        if self.measuring:
            self.errors[kind] += 1
            self.samples.setdefault(kind, message)
        elif not self.stopping and len(self.setup_errors) < 5:
            self.setup_errors.append(f"{kind}: {message}")

    def _fail(self, c: _Conn, exc: BaseException | None, kind: str | None = None, now: float = 0.0) -> None:
        SSL = self.SSL
        if kind is None:
            if isinstance(exc, SSL.ZeroReturnError):
                kind = "closed"
            elif isinstance(exc, SSL.SysCallError):
                kind = "eof" if exc.args and exc.args[0] == -1 else "reset"
            elif isinstance(exc, SSL.Error):
                kind = "tls"
            elif isinstance(exc, ResponseError):
                kind = "protocol"
            else:
                kind = "socket"
        self._error(kind, _describe(exc) if exc is not None else kind)
        self._close(c)
        if self.running and not self.stopping:
            self.retry_at.append((now or time.monotonic()) + _RETRY_DELAY)

    # -- protocol steps --

    def _handshake(self, c: _Conn, now: float) -> None:
        SSL = self.SSL
        try:
            c.tls.do_handshake()
        except SSL.WantReadError:
            self._want(c, self.poller.IN)
            return
        except SSL.WantWriteError:
            self._want(c, self.poller.OUT)
            return
        except (SSL.Error, OSError) as exc:
            self._fail(c, exc, now=now)
            return
        if self.keepalive:
            c.state = _IDLE
            self._want(c, self.poller.IN)
            if self.running:  # a replacement connection: start its first request
                self._start_request(c, time.monotonic())
            return
        t = time.monotonic()
        if self.await_ticket:
            # Wait for the server's NewSessionTicket: OpenSSL replaces the client's session
            # object when one arrives.
            c.t1 = t
            c.session0 = c.tls.get_session()._session
            c.state = _TICKET
            self._want(c, self.poller.IN)
            self._ticket(c)
            return
        self._handshake_done(c, t, t)

    def _handshake_done(self, c: _Conn, t: float, now: float) -> None:
        if self.measuring and now <= self.window_end and self.done < self.limit:
            self.ok += 1
            self.done += 1
            self.latencies.append(t - c.t0)
            self.negotiated[c.tls.get_group_name() or "?"] += 1
            if self.resume and self.session_reused(c.tls):
                self.resumed += 1
        self._close(c)
        if not self.stopping:
            self.to_open += 1

    def _ticket(self, c: _Conn) -> None:
        SSL = self.SSL
        try:
            c.tls.recv(_RECV_SIZE)  # post-handshake messages are consumed inside
        except SSL.WantReadError:
            session = c.tls.get_session()
            if session is not None and session._session != c.session0:
                if self.resume:
                    self.session = session
                self._handshake_done(c, c.t1, time.monotonic())
            return
        except (SSL.Error, OSError) as exc:
            self._fail(c, exc)
            return
        self._fail(c, ResponseError("application data after the handshake"))

    def _start_request(self, c: _Conn, now: float) -> None:
        c.state = _SEND
        c.out = self.request
        c.t0 = now
        c.deadline = now + self.spec.timeout
        self._send(c)

    def _send(self, c: _Conn) -> None:
        SSL = self.SSL
        try:
            n = c.tls.send(c.out)
        except SSL.WantWriteError:
            self._want(c, self.poller.OUT)
            return
        except SSL.WantReadError:
            self._want(c, self.poller.IN)
            return
        except (SSL.Error, OSError) as exc:
            self._fail(c, exc)
            return
        if n < len(c.out):
            c.out = c.out[n:]
            self._want(c, self.poller.OUT)
            return
        c.state = _RECV
        self._want(c, self.poller.IN)

    def _receive(self, c: _Conn) -> None:
        SSL = self.SSL
        recv = c.tls.recv
        while True:
            try:
                data = recv(_RECV_SIZE)
            except SSL.WantReadError:
                return
            except (SSL.Error, OSError) as exc:
                self._fail(c, exc)
                return
            buf = c.buf + data if c.buf else data
            try:
                framed = response_length(buf)
            except ResponseError as exc:
                self._fail(c, exc)
                return
            if framed is None:
                c.buf = buf
                continue
            total, status, close = framed
            t = time.monotonic()
            if len(buf) != total:
                self._fail(c, ResponseError(f"{len(buf) - total} bytes after the response (none requested)"))
                return
            c.buf = b""
            if self.measuring and t <= self.window_end and self.done < self.limit:
                self.done += 1
                self.statuses[status] += 1
                if 200 <= status < 300:
                    self.ok += 1
                    self.latencies.append(t - c.t0)
                else:
                    self.errors[f"status {status}"] += 1
            if close:
                self._close(c)
                if self.running and not self.stopping:
                    self.to_open += 1
            elif not self.stopping:
                self._start_request(c, t)
            return

    def _dispatch(self, c: _Conn, now: float) -> None:
        state = c.state
        if state == _RECV:
            self._receive(c)
        elif state == _SEND:
            self._send(c)
        elif state == _HANDSHAKE:
            self._handshake(c, now)
        elif state == _TICKET:
            self._ticket(c)
        else:  # _IDLE: the server closed (or sent something) on an idle connection
            self._receive_idle(c)

    def _receive_idle(self, c: _Conn) -> None:
        SSL = self.SSL
        try:
            c.tls.recv(_RECV_SIZE)  # post-handshake messages (tickets) are consumed inside
        except SSL.WantReadError:
            return
        except (SSL.Error, OSError) as exc:
            self._fail(c, exc)
            return
        self._fail(c, ResponseError("data on an idle connection"))

    # -- the loop --

    def _loop(self, until: float, done: Any) -> None:
        poll = self.poller.poll
        conns = self.conns
        next_scan = time.monotonic() + _TIMEOUT_SCAN
        while True:
            now = time.monotonic()
            if now >= until or done():
                return
            wait = min(_TIMEOUT_SCAN, until - now)
            if self.to_open:
                wait = 0.0
            elif self.retry_at:
                wait = max(0.0, min(wait, self.retry_at[0] - now))
            events = poll(wait)
            now = time.monotonic()
            for fd, _ in events:
                c = conns.get(fd)
                if c is not None:
                    self._dispatch(c, now)
            if self.retry_at and self.retry_at[0] <= now:
                due = [t for t in self.retry_at if t <= now]
                self.retry_at = [t for t in self.retry_at if t > now]
                self.to_open += len(due)
            if self.to_open and not self.stopping:
                n, self.to_open = self.to_open, 0
                for _ in range(n):
                    self._open(now)
            if now >= next_scan:
                next_scan = now + _TIMEOUT_SCAN
                for c in [c for c in conns.values() if c.state != _IDLE and c.deadline < now]:
                    self._fail(c, None, kind="timeout", now=now)

    def prepare(self) -> None:
        """Keep-alive: open every connection and finish its handshake before the clock starts."""
        if not self.keepalive:
            return
        now = time.monotonic()
        for _ in range(self.spec.connections):
            self._open(now)
        deadline = now + min(self.spec.timeout * 3, READY_TIMEOUT)
        self._loop(deadline, lambda: all(c.state == _IDLE for c in self.conns.values())
                   and len(self.conns) + len(self.setup_errors) >= self.spec.connections)
        if self.setup_errors or len(self.conns) < self.spec.connections or any(
                c.state != _IDLE for c in self.conns.values()):
            detail = "; ".join(self.setup_errors) or "timed out"
            raise RuntimeError(f"could not open {self.spec.connections} keep-alive connections: {detail}")
        for c in self.conns.values():
            self.negotiated[c.tls.get_group_name() or "?"] += 1

    def run(self, t_start: float) -> dict[str, Any]:
        spec = self.spec
        self.window_start = t_start + spec.warmup
        self.window_end = self.window_start + spec.seconds if spec.seconds is not None else float("inf")
        pause = t_start - time.monotonic()
        if pause > 0:
            time.sleep(pause)  # the common start time
        now = time.monotonic()
        self.running = True
        if self.keepalive:
            for c in list(self.conns.values()):
                self._start_request(c, now)
        else:
            self.to_open = spec.connections
        if spec.warmup > 0:
            self._loop(self.window_start, lambda: False)
        self.measuring = True
        cpu0 = cpu_seconds()
        started = time.monotonic()
        self._loop(self.window_end, lambda: self.done >= self.limit)
        ended = min(time.monotonic(), self.window_end)
        cpu1 = cpu_seconds()
        self.measuring = self.running = False
        self.stopping = True
        return {
            "ok": self.ok, "elapsed": max(ended - started, 1e-9), "latencies": self.latencies.tobytes(),
            "statuses": dict(self.statuses), "errors": dict(self.errors), "samples": self.samples,
            "negotiated": {(_canonical(k) or k): v for k, v in self.negotiated.items()}, "cpu": cpu1 - cpu0,
            "resumed": self.resumed,
        }

    def close(self) -> None:
        self.stopping = True
        for c in list(self.conns.values()):
            self._close(c)
        self.poller.close()


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _worker_main(pipe: Pipe) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    while True:
        try:
            spec = pipe.recv()
        except EOFError:
            return
        if spec is None:
            return
        runner: _Runner | None = None
        try:
            runner = _Runner(spec)
            runner.prepare()
            pipe.send(("ready", None))
            go = pipe.recv()
            if go is None:
                continue
            pipe.send(("result", runner.run(go)))
        except Exception as exc:  # reported to the parent as one line, never a traceback
            pipe.send(("failed", f"{type(exc).__name__}: {exc}"))
        finally:
            if runner is not None:
                runner.close()


# ---- the parent side ---------------------------------------------------------------------------


class LoadGeneratorError(RuntimeError):
    pass


class LoadGenerator:
    """``clients`` worker processes, started once and reused for every ``run``."""

    def __init__(self, clients: int = 1, *, start_method: str = "spawn") -> None:
        if clients < 1:
            raise ValueError(f"clients: expected >= 1, got {clients!r}")
        self.clients = clients
        self._mp: Any = mp.get_context(start_method)
        self._workers: list[tuple[Any, Pipe]] = []

    def start(self) -> LoadGenerator:
        for _ in range(self.clients):
            parent, child = self._mp.Pipe()
            proc = self._mp.Process(target=_worker_main, args=(child,), daemon=True, name="qpher-loadgen")
            proc.start()
            child.close()
            self._workers.append((proc, parent))
        return self

    def pids(self) -> list[int]:
        return [p.pid for p, _ in self._workers]

    def close(self) -> None:
        workers, self._workers = self._workers, []
        for _, pipe in workers:
            try:
                pipe.send(None)
            except (OSError, ValueError):
                pass
        for proc, pipe in workers:
            proc.join(5.0)
            if proc.is_alive():
                proc.terminate()
                proc.join()
            pipe.close()
            proc.close()

    def __enter__(self) -> LoadGenerator:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def run(self, spec: LoadSpec, *, on_window: Any = None) -> LoadResult:
        """Run ``spec`` split over the workers; ``on_window(start, end)`` is called in this
        process at the start (``end`` None) and end of the measured window, for server-side
        sampling such as CPU time."""
        if not self._workers:
            raise LoadGeneratorError("LoadGenerator not started (use it in a with block)")
        n = len(self._workers)
        shares = [spec.connections // n + (1 if i < spec.connections % n else 0) for i in range(n)]
        counts = ([spec.count // n + (1 if i < spec.count % n else 0) for i in range(n)]
                  if spec.count is not None else [None] * n)
        active = [
            (w, replace(spec, connections=s, count=c))
            for w, s, c in zip(self._workers, shares, counts, strict=True)
            if s > 0 and (c is None or c > 0)
        ]
        for (_, pipe), sub in active:
            pipe.send(sub)
        failures, ready = [], []
        for (_, pipe), _sub in active:
            kind, detail = self._receive(pipe, READY_TIMEOUT)
            if kind == "ready":
                ready.append(pipe)
            else:
                failures.append(detail)
        if failures:
            for pipe in ready:
                pipe.send(None)  # they wait for a start time: cancel this run, keep the worker
            raise LoadGeneratorError(f"load generator setup failed: {failures[0]}")
        t_start = time.monotonic() + 0.05
        for (_, pipe), _sub in active:
            pipe.send(t_start)
        if on_window is not None:
            pause = t_start + spec.warmup - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            on_window(time.monotonic(), None)
        limit = (spec.warmup + (spec.seconds or 0) + spec.timeout * 2 + 30.0) if spec.seconds else None
        results = []
        for (_, pipe), _sub in active:
            kind, detail = self._receive(pipe, limit)
            if kind != "result":
                failures.append(str(detail))
            else:
                results.append(detail)
        if on_window is not None:
            on_window(None, time.monotonic())
        if failures:
            raise LoadGeneratorError(f"load generator failed: {failures[0]}")
        return _merge(spec, len(active), results)

    @staticmethod
    def _receive(pipe: Pipe, timeout: float | None) -> tuple[str, Any]:
        if timeout is not None and not pipe.poll(timeout):
            raise LoadGeneratorError(f"a load generator process did not answer within {timeout:g} s")
        try:
            return pipe.recv()
        except EOFError:
            raise LoadGeneratorError("a load generator process died") from None


def _merge(spec: LoadSpec, clients: int, results: list[dict[str, Any]]) -> LoadResult:
    lat = array.array("d")
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    negotiated: Counter[str] = Counter()
    samples: dict[str, str] = {}
    for r in results:
        lat.frombytes(r["latencies"])
        statuses.update(r["statuses"])
        errors.update(r["errors"])
        negotiated.update(r["negotiated"])
        for k, v in r["samples"].items():
            samples.setdefault(k, v)
    return LoadResult(
        mode=spec.mode, group=spec.tls.group, connections=spec.connections, clients=clients,
        ok=sum(r["ok"] for r in results),
        # processes run over the same common window; a count-bounded one may stop early
        elapsed=max((r["elapsed"] for r in results), default=0.0),
        latencies_ms=tuple(sorted(x * 1e3 for x in lat)),
        statuses=dict(statuses), errors=dict(errors), error_samples=samples, negotiated=dict(negotiated),
        client_cpu_s=sum(r["cpu"] for r in results), resumed=sum(r.get("resumed", 0) for r in results),
    )


def run_load(spec: LoadSpec, *, clients: int = 1) -> LoadResult:
    """One run with its own worker processes (started and stopped around it)."""
    with LoadGenerator(clients) as lg:
        return lg.run(spec)


# ---- server-side CPU sampling (Linux /proc) --------------------------------------------------------


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc; empty where there is no /proc)."""
    out = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if int(fields[1]) == pid:
            out.append(int(name))
    return out


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(child_pids(p))
    return tree


def process_cpu_seconds(pids: list[int]) -> float:
    """Sum of user + system CPU seconds of ``pids`` (0 for those gone or unreadable)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / tick


class CPUWatch:
    """``on_window`` for ``LoadGenerator.run``: CPU seconds of the process trees of ``pids``
    over the measured window; ``.cores`` is the average number of cores they kept busy."""

    def __init__(self, pids: list[int]) -> None:
        self.roots = list(pids)
        self.cpu = 0.0
        self.wall = 0.0
        self._t0 = 0.0
        self._c0 = 0.0
        self._pids: list[int] = []

    def __call__(self, start: float | None, end: float | None) -> None:
        if start is not None:
            self._pids = sorted({p for r in self.roots for p in process_tree(r)})
            self._t0, self._c0 = start, process_cpu_seconds(self._pids)
        elif end is not None:
            self.cpu = process_cpu_seconds(self._pids) - self._c0
            self.wall = end - self._t0

    @property
    def cores(self) -> float:
        return self.cpu / self.wall if self.wall > 0 else 0.0
