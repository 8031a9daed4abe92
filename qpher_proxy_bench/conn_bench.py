"""What an idle TLS connection costs a server in memory, and whether closing gives it back.

    from qpher_proxy_bench.conn_bench import idle_connection_memory
    figures = idle_connection_memory(port, cafile, pid, connections=2000)

The measurement, against one server process (``pid``: the gateway that serves; for nginx its
worker) on 127.0.0.1:

1. the server's resident set (``VmRSS`` of ``/proc/PID/status``) after a warm-up of a few
   connections (so that one-time allocations are not counted);
2. ``connections`` TLS connections opened from this process, each with a full handshake and
   one keep-alive ``GET /healthz`` answered 200, then left idle (what a browser or a pooled
   client leaves behind); the resident set again: the difference per connection is the figure;
3. every connection closed, then (once the server's resident set stopped shrinking for 1.5 s,
   at most ``settle`` seconds, polling) the resident set once more: how much of the growth the
   server gave back.

The client side is plain blocking pyOpenSSL on non-blocking sockets, one connection after the
other (the server's handshake cost does not matter here, only what it keeps afterwards), with
``RLIMIT_NOFILE`` raised as far as the hard limit allows. Nothing here is timed.
"""

from __future__ import annotations

import functools
import resource
import socket
import time
from typing import Any

from .loadgen import ClientTLS, _blocking, build_request, client_context, response_length

__all__ = ["idle_connection_memory", "rss_bytes"]

HEALTHZ = build_request("GET", "/healthz", headers={"User-Agent": "qpher-bench", "Accept": "*/*"})
_RECV = 65536


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` in bytes (``VmRSS``)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no VmRSS for pid {pid}")


def _raise_nofile(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def _open_one(port: int, ctx: Any, timeout: float = 10.0) -> tuple[socket.socket, Any]:
    from OpenSSL import SSL

    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setblocking(False)
    conn = SSL.Connection(ctx, sock)
    conn.set_connect_state()
    conn.set_tlsext_host_name(b"localhost")
    deadline = time.monotonic() + timeout
    try:
        _blocking(conn.do_handshake, sock, deadline)
        view = memoryview(HEALTHZ)
        while view:
            view = view[_blocking(functools.partial(conn.send, view), sock, deadline):]
        buf = b""
        while True:
            buf += _blocking(lambda: conn.recv(_RECV), sock, deadline)
            framed = response_length(buf)
            if framed is not None:
                if framed[1] != 200:
                    raise OSError(f"GET /healthz answered {framed[1]}")
                break
    except BaseException:
        sock.close()
        raise
    return sock, conn


def _settled_rss(pid: int, settle: float, quiet: float = 1.5) -> int:
    """The server's RSS once it stopped shrinking for ``quiet`` seconds (it frees closed
    connections as it notices them, and may give its heap back a little later), at most
    ``settle`` seconds after the first reading."""
    deadline = time.monotonic() + settle
    low = rss_bytes(pid)
    low_since = time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - low_since < quiet:
        time.sleep(0.25)  # polling another process's memory while it releases connections
        now = rss_bytes(pid)
        if now < low:
            low, low_since = now, time.monotonic()
    return low


def idle_connection_memory(port: int, cafile: str | None, pid: int, *, connections: int = 2000,
                           group: str = "X25519MLKEM768", settle: float = 5.0) -> dict[str, Any]:
    """Server memory per idle TLS connection and what closing them returns; see the module doc."""
    limit = _raise_nofile(connections + 64)
    connections = min(connections, max(1, limit - 64))
    ctx = client_context(ClientTLS(group, cafile=cafile))
    warm = [_open_one(port, ctx) for _ in range(min(20, connections))]
    for sock, _ in warm:
        sock.close()
    before = _settled_rss(pid, settle)
    held: list[tuple[socket.socket, Any]] = []
    try:
        for _ in range(connections):
            held.append(_open_one(port, ctx))
        time.sleep(0.5)  # let the server finish with the last request before reading its memory
        during = rss_bytes(pid)
    finally:
        for sock, _ in held:
            sock.close()
    after = _settled_rss(pid, settle)
    grown = during - before
    return {
        "connections": len(held),
        "group": group,
        "rss_before_mb": round(before / 2**20, 1),
        "rss_idle_mb": round(during / 2**20, 1),
        "rss_after_close_mb": round(after / 2**20, 1),
        "bytes_per_idle_connection": round(grown / max(1, len(held))),
        "returned_after_close": round((during - after) / grown, 3) if grown > 0 else None,
    }
