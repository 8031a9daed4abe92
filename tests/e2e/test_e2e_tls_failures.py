"""Failed TLS handshakes against the live gateway: the kinds a scanner, an old client or a
broken one produce are each counted by reason in ``/metrics``, logged at debug one by one and
summed up at info, with no secret in any log line."""

from __future__ import annotations

import base64
import json
import os
import socket
import ssl
import struct
import time
from collections.abc import Callable, Iterator

import pytest
from OpenSSL import SSL

from ._gateway import Gateway, init_state, start_gateway

HANDSHAKE_TIMEOUT = 3.0  # seconds: the silent client is cut off soon, and a loaded machine still
# reads the other clients' EOFs well before any of their handshakes could time out


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    directory = tmp_path_factory.mktemp("tls-failures") / "state"
    init_state(directory, **{"crypto.backend": "openssl", "tls.handshake_timeout": HANDSHAKE_TIMEOUT,
                             "logging.level": "debug"})
    gw = start_gateway(directory)
    try:
        yield gw
    finally:
        assert gw.stop() == 0


def _raw(gw: Gateway, data: bytes, *, reset: bool = False) -> None:
    """Send ``data`` on a plain TCP connection, then wait for the server to close it (or reset)."""
    with socket.create_connection((gw.host, gw.port), timeout=10) as s:
        if data:
            s.sendall(data)
        if reset:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return
        try:
            while s.recv(4096):
                pass
        except ConnectionResetError:
            pass


def _pyopenssl(gw: Gateway, setup: Callable[[SSL.Context], None]) -> None:
    ctx = SSL.Context(SSL.TLS_METHOD)
    setup(ctx)
    with socket.create_connection((gw.host, gw.port), timeout=10) as s:
        conn = SSL.Connection(ctx, s)
        conn.set_connect_state()
        with pytest.raises(SSL.Error):
            conn.do_handshake()


def _tls11_only(ctx: SSL.Context) -> None:
    ctx.set_min_proto_version(SSL.TLS1_1_VERSION)
    ctx.set_max_proto_version(SSL.TLS1_1_VERSION)
    ctx.set_cipher_list(b"DEFAULT:@SECLEVEL=0")


def _tls12_rsa_kx_only(ctx: SSL.Context) -> None:
    ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_cipher_list(b"AES128-SHA")  # no ECDHE-ECDSA suite in common


def _tls13_secp384r1_only(gw: Gateway) -> None:
    ctx = ssl.create_default_context(cafile=str(gw.ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_ecdh_curve("secp384r1")  # the gateway offers X25519MLKEM768, X25519, secp256r1
    with socket.create_connection((gw.host, gw.port), timeout=10) as s:
        with pytest.raises(ssl.SSLError):
            ctx.wrap_socket(s, server_hostname="localhost")


def _untrusted(gw: Gateway) -> None:
    ctx = ssl.create_default_context()  # the system CAs: the dev CA is not among them
    with socket.create_connection((gw.host, gw.port), timeout=10) as s:
        with pytest.raises(ssl.SSLCertVerificationError):
            ctx.wrap_socket(s, server_hostname="localhost")


SSLV2_CLIENT_HELLO = (b"\x80\x2e\x01\x00\x02\x00\x15\x00\x00\x00\x10" + b"\x07\x00\xc0" * 7
                      + bytes(range(16)))

WANT = {
    "plaintext_http": 1, "unsupported_version": 2, "no_shared_cipher": 1, "no_shared_group": 1,
    "certificate_rejected": 1, "not_tls": 1, "eof": 2, "connection_lost": 1, "timeout": 1,
}


def _failure_counts(gw: Gateway) -> dict[str, int]:
    c = gw.client()
    status, body, _ = c.call("GET", "/metrics")
    c.close()
    assert status == 200
    counts: dict[str, int] = {}
    for line in body.decode().splitlines():
        if line.startswith("qpher_tls_handshake_failures_total{"):
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            counts[reason] = int(float(line.rsplit(" ", 1)[1]))
    return counts


def test_failed_handshakes_are_counted_by_reason_and_logged(gateway: Gateway) -> None:
    gw = gateway
    _raw(gw, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")  # plain HTTP to the TLS port
    _pyopenssl(gw, _tls11_only)  # an old client
    _raw(gw, SSLV2_CLIENT_HELLO)  # a scanner probing for SSLv2
    _pyopenssl(gw, _tls12_rsa_kx_only)
    _tls13_secp384r1_only(gw)
    _untrusted(gw)  # the client refuses our certificate
    _raw(gw, b"SSH-2.0-OpenSSH_9.6\r\n")  # another protocol
    socket.create_connection((gw.host, gw.port), timeout=10).close()  # connects and leaves at once
    with socket.create_connection((gw.host, gw.port), timeout=10) as s:
        s.sendall(b"\x16\x03\x01\x02\x00\x01")  # the start of a ClientHello, then closes
    _raw(gw, b"\x16\x03\x01\x02\x00\x01", reset=True)  # the same, but resets the connection
    with socket.create_connection((gw.host, gw.port), timeout=10) as silent:  # connects, says nothing
        silent.settimeout(HANDSHAKE_TIMEOUT + 5)
        assert silent.recv(10) == b""  # closed by the server after tls.handshake_timeout

    want = WANT
    deadline = time.monotonic() + 10
    while (counts := _failure_counts(gw)) != want and time.monotonic() < deadline:
        time.sleep(0.1)
    assert counts == want

    logs = gw.read_logs()
    debug = [r for r in logs if r.get("msg") == "tls handshake failed"]
    assert sorted(r["reason"] for r in debug) == sorted(r for r, n in want.items() for _ in range(n))
    assert {r["level"] for r in debug} == {"debug"}
    # the peer's address, unless a reset took the connection before the handshake began
    assert {r["client"] for r in debug if r["reason"] != "connection_lost"} == {"127.0.0.1"}
    summaries = [r for r in logs if str(r.get("msg", "")).startswith("tls handshakes failed: ")]
    assert summaries and all(r["level"] == "info" for r in summaries)
    assert summaries[0]["by_reason"] == {"plaintext_http": 1}  # the first failure is reported at once
    assert sum(r["failures"] for r in summaries) <= sum(want.values())


def test_no_secret_reaches_the_log(gateway: Gateway) -> None:
    text = gateway.raw_log_text()
    secrets_dir = gateway.directory / "secrets"
    for name in os.listdir(secrets_dir):
        raw = (secrets_dir / name).read_bytes().strip()
        for form in {raw.decode("latin-1"), base64.b64encode(raw).decode()}:
            assert form not in text, f"{name} appears in the log"
    assert json.dumps(gateway.demo_key.split("_")[-1]) not in text
