"""``qpher-proxy healthcheck``: is the gateway of this config answering ``/healthz``?

A container's ``HEALTHCHECK`` and a supervisor's liveness probe run it beside the proxy, on the same
host: it connects to the first ``server.listen`` address (a wildcard address becomes the loopback
one), completes a TLS handshake and asks ``GET /healthz``. It checks that the process answers, not
who it is: the certificate is not verified (a production certificate rarely names 127.0.0.1), and
nothing secret is sent. Exit 0 on ``200``, 1 with one line otherwise.
"""

from __future__ import annotations

import socket
import ssl
import time

from .config import load_config, parse_listen

_WILDCARD = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def target_of(config_path: str) -> tuple[str, int]:
    cfg = load_config(config_path, check_files=False)
    host, port = parse_listen(cfg.server.listen[0])
    return _WILDCARD.get(host, host), port


def probe(host: str, port: int, *, timeout: float = 5.0) -> tuple[bool, str]:
    """``(healthy, one line)``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    started = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
                        b"User-Agent: qpher-proxy-healthcheck\r\n\r\n")
            head = b""
            while b"\r\n" not in head and len(head) < 4096:
                chunk = tls.recv(4096)
                if not chunk:
                    break
                head += chunk
    except (OSError, ssl.SSLError) as exc:
        return False, f"https://{_netloc(host, port)}/healthz: {type(exc).__name__}: {exc}"
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1", "replace")
    parts = status_line.split()
    elapsed_ms = (time.monotonic() - started) * 1000
    if len(parts) >= 2 and parts[1] == "200":
        return True, f"https://{_netloc(host, port)}/healthz: 200 in {elapsed_ms:.0f} ms"
    return False, f"https://{_netloc(host, port)}/healthz: unexpected answer {status_line[:80]!r}"


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
