"""Two TLS figures beside the handshake and keep-alive rates: resumed handshakes, and the
latency of the first request on a new connection from a Nagle-on client.

Meant to be called from ``gateway_bench.py`` for the gateway and for nginx alike (loopback
only; nothing here asserts anything about timing)::

    from .tls_extra_bench import first_request_latency, resumed_handshake_spec, resumed_handshakes

    # (a) with the harness's own LoadGenerator and _measure (server CPU sampled as for the
    #     other rows); the LoadResult has ``resumed`` = handshakes the server resumed:
    spec = resumed_handshake_spec(port, group, concurrency=conc, seconds=st.seconds, warmup=st.warmup)
    row = _measure(lg, spec, pids, Row("tls", name, "resumed", group, conc), st)
    # row.result.rate, row.result.resumed, row.result.ok

    # (b) or standalone, full and resumed side by side (its own LoadGenerator unless given one):
    figures = resumed_handshakes(port, cafile, "X25519MLKEM768", seconds=5, concurrency=8, lg=lg)
    # {"full": {...LoadResult.summary()}, "resumed": {...}, "resumed_fraction": 0.99, "speedup": 1.5}

    # (c) the first request on a fresh connection, handshake excluded, Nagle on:
    first = first_request_latency(port, cafile, n=50)  # Python's ssl client
    # {"client": "ssl", "n": 50, "p50_ms": 0.4, "max_ms": 1.1, "mean_ms": 0.5, "over_20ms": 0}

Resumed handshakes. The load generator's ``ClientTLS(resume=True)``: each new connection offers
the session saved from the last completed one of its worker process, and a connection counts
once the server's NewSessionTicket arrived (what a real client needs before it can resume).
``resumed`` says how many the server actually resumed: a server without tickets
(nginx ``ssl_session_tickets off``, gateway ``tls.session_tickets: false``) gives ~0 and the
rate is then a full-handshake rate. With ``server.workers`` > 1 the gateway resumes only tickets
of the process the connection lands on (tls/context.py), so expect ``resumed`` ~ ok / workers.

First-request latency. A blocking client socket *without* ``TCP_NODELAY`` (Python's ``ssl``,
like most clients; or pyOpenSSL with ``client="pyopenssl"``, which can offer X25519MLKEM768):
connect and handshake untimed, then the clock runs from writing the request to having the
whole response. A server that sends nothing after the handshake until the request arrives
leaves the client's Finished unacknowledged, and Nagle holds the request for the server's
delayed ACK (~40 ms on Linux): that shows as p50 ~40 ms. ``over_20ms`` counts such samples.
"""

from __future__ import annotations

import socket
import ssl
import statistics
import time
from typing import Any, Literal

from .loadgen import (
    ClientTLS,
    LoadGenerator,
    LoadResult,
    LoadSpec,
    build_request,
    client_context,
    response_length,
)

__all__ = ["first_request_latency", "resumed_handshake_spec", "resumed_handshakes"]

DEFAULT_GROUP = "X25519MLKEM768"
STALL_MS = 20.0  # a first request slower than this on loopback waited for a delayed ACK


def resumed_handshake_spec(
    port: int,
    group: str = DEFAULT_GROUP,
    *,
    concurrency: int = 8,
    seconds: float = 5.0,
    warmup: float = 0.5,
    cafile: str | None = None,
    host: str = "127.0.0.1",
) -> LoadSpec:
    """A handshake-mode ``LoadSpec`` whose connections offer the previous session's ticket."""
    return LoadSpec.handshakes(
        port, ClientTLS(group, cafile=cafile, resume=True), connections=concurrency,
        seconds=seconds, warmup=warmup, host=host,
    )


def resumed_handshakes(
    port: int,
    cafile: str | None = None,
    group: str = DEFAULT_GROUP,
    seconds: float = 5.0,
    concurrency: int = 8,
    *,
    clients: int = 1,
    warmup: float = 0.5,
    host: str = "127.0.0.1",
    full: bool = True,
    lg: LoadGenerator | None = None,
) -> dict[str, Any]:
    """Full handshakes/s (unless ``full`` is False) and resumed handshakes/s, same settings and
    the same cycle (connect, handshake, wait for the server's ticket, close): the full run
    offers no session (``ClientTLS(await_ticket=True)``), so ``speedup`` is what resumption
    buys. (gateway_bench's own handshake rows close right after the handshake, a shorter cycle:
    compare resumed rows with this ``full``, not with those.)

    ``cafile``: verify the server on full handshakes (a resumed one receives no certificate);
    None skips verification, as gateway_bench's handshake rows do after their probe."""
    own = lg is None
    gen = LoadGenerator(clients).start() if lg is None else lg
    try:
        out: dict[str, Any] = {"group": group, "concurrency": concurrency}
        full_result: LoadResult | None = None
        if full:
            full_result = gen.run(LoadSpec.handshakes(
                port, ClientTLS(group, cafile=cafile, await_ticket=True), connections=concurrency,
                seconds=seconds, warmup=warmup, host=host))
            out["full"] = full_result.summary()
        resumed = gen.run(resumed_handshake_spec(
            port, group, concurrency=concurrency, seconds=seconds, warmup=warmup, cafile=cafile, host=host))
        out["resumed"] = resumed.summary()
        out["resumed_fraction"] = round(resumed.resumed / resumed.ok, 4) if resumed.ok else 0.0
        if full_result is not None and full_result.rate > 0:
            out["speedup"] = round(resumed.rate / full_result.rate, 3)
        return out
    finally:
        if own:
            gen.close()


def first_request_latency(
    port: int,
    cafile: str | None,
    n: int = 50,
    *,
    client: Literal["ssl", "pyopenssl"] = "ssl",
    group: str = DEFAULT_GROUP,
    path: str = "/healthz",
    host: str = "127.0.0.1",
    server_name: str = "localhost",
    timeout: float = 10.0,
) -> dict[str, Any]:
    """p50/max/mean milliseconds of the first request on ``n`` new connections (one after the
    other), Nagle on, handshake excluded. ``group`` applies to ``client="pyopenssl"`` only
    (Python's ssl offers what the system OpenSSL offers, classical groups)."""
    if n < 1:
        raise ValueError(f"n: expected >= 1, got {n!r}")
    LoadSpec("handshake", port, ClientTLS(group), host=host)  # validates host (loopback only)
    request = build_request("GET", path, host=server_name)
    once = _stdlib_once if client == "ssl" else _pyopenssl_once
    prepared = _stdlib_context(cafile) if client == "ssl" else client_context(ClientTLS(group, cafile=cafile))
    samples = [once(prepared, host, port, server_name, request, timeout) for _ in range(n)]
    statuses = sorted({status for _, status in samples})
    ms = sorted(t for t, _ in samples)
    return {
        "client": client, "group": group if client == "pyopenssl" else None, "n": n,
        "p50_ms": round(statistics.median(ms), 3), "max_ms": round(ms[-1], 3),
        "mean_ms": round(statistics.fmean(ms), 3), "over_20ms": sum(1 for t in ms if t > STALL_MS),
        "statuses": statuses,
    }


def _stdlib_context(cafile: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=cafile)
    if cafile is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)  # Nagle on (the default; say so)
    return sock


def _read_response(recv: Any) -> int:
    buf = b""
    while True:
        framed = response_length(buf)
        if framed is not None:
            return framed[1]
        chunk = recv(65536)
        if not chunk:
            raise ConnectionError("the server closed before the whole response")
        buf += chunk


def _stdlib_once(ctx: ssl.SSLContext, host: str, port: int, server_name: str, request: bytes,
                 timeout: float) -> tuple[float, int]:
    with _connect(host, port, timeout) as raw, ctx.wrap_socket(raw, server_hostname=server_name) as tls:
        t0 = time.perf_counter()
        tls.sendall(request)
        status = _read_response(tls.recv)
        return (time.perf_counter() - t0) * 1e3, status


def _pyopenssl_once(ctx: Any, host: str, port: int, server_name: str, request: bytes,
                    timeout: float) -> tuple[float, int]:
    from OpenSSL import SSL

    with _connect(host, port, timeout) as raw:
        raw.settimeout(None)  # pyOpenSSL wants a plain blocking socket
        conn = SSL.Connection(ctx, raw)
        conn.set_tlsext_host_name(server_name.encode("idna"))
        conn.set_connect_state()
        conn.do_handshake()
        t0 = time.perf_counter()
        conn.sendall(request)
        status = _read_response(conn.recv)
        return (time.perf_counter() - t0) * 1e3, status
