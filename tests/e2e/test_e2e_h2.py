"""HTTP/2 through the real gateway (``qpher-proxy serve``, real TLS on 127.0.0.1) with real h2
clients: curl --http2 and nghttp/h2load against the crypto API, the ALPN rule, refused gRPC calls
answered trailers-only, a forwarded h2 call reaching the upstream with the header hygiene of
HTTP/1.1, and Rapid Reset ending one connection (counted in /metrics) while others are served."""

from __future__ import annotations

import base64
import http.server
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame, HeadersFrame, RstStreamFrame, SettingsFrame

from ._gateway import Gateway, init_state, start_gateway

DENY_PRIVATE = """\
version: 1
rules:
  - id: private-service
    effect: deny
    match: {path: /pkg.Private/**}
    reason: the private service is not exposed
"""


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is missing (apt-get install nghttp2-client curl)")
        pytest.skip(f"{name} is not installed (apt-get install nghttp2-client curl)")
    return path


class _Upstream(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list[tuple[str, dict[str, str], bytes]] = []

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        length = self.headers.get("content-length")
        if length is not None:
            body = self.rfile.read(int(length))
        else:  # chunked (an h2 request without content-length)
            body = b""
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    break
                body += self.rfile.read(size)
                self.rfile.readline()
        self.seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
        out = b"pong:" + body
        self.send_response(200)
        self.send_header("content-type", "application/octet-stream")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


@pytest.fixture(scope="module")
def upstream() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, upstream: int) -> Iterator[Gateway]:
    d = tmp_path_factory.mktemp("h2gw")
    init_state(d, **{"crypto.backend": "openssl", "upstream.url": f"http://127.0.0.1:{upstream}",
                     "http2.max_resets_per_window": 100})
    (d / "policies" / "15-private.yaml").write_text(DENY_PRIVATE)
    gateway = start_gateway(d)
    try:
        yield gateway
    finally:
        gateway.stop()


def _curl(gw: Gateway, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_tool("curl"), "-sS", "--http2", "--cacert", str(gw.ca_file), "-H", f"x-api-key: {gw.demo_key}",
         "-w", "\n%{http_version}", *args], capture_output=True, text=True, timeout=30, check=True)


def _url(gw: Gateway, path: str) -> str:
    return f"https://localhost:{gw.port}{path}"


def test_curl_creates_a_key_and_signs_over_h2(gw: Gateway) -> None:
    made = _curl(gw, "-X", "POST", "-H", "content-type: application/json",
                 "--data", '{"algorithm": "ml-dsa-65"}', _url(gw, "/v1/keys"))
    body, version = made.stdout.rsplit("\n", 1)
    assert version == "2", made.stderr
    key_id = json.loads(body)["key_id"]
    message = base64.b64encode(b"signed over h2").decode()
    signed = _curl(gw, "-X", "POST", "-H", "content-type: application/json",
                   "--data", json.dumps({"key_id": key_id, "message": message}), _url(gw, "/v1/sign"))
    body, version = signed.stdout.rsplit("\n", 1)
    assert version == "2" and json.loads(body)["signature"]


def test_h2load_signs_over_h2(gw: Gateway, tmp_path: Path) -> None:
    made = _curl(gw, "-X", "POST", "-H", "content-type: application/json",
                 "--data", '{"algorithm": "ml-dsa-65"}', _url(gw, "/v1/keys"))
    key_id = json.loads(made.stdout.rsplit("\n", 1)[0])["key_id"]
    body = tmp_path / "sign.json"
    body.write_text(json.dumps({"key_id": key_id, "message": base64.b64encode(b"m").decode()}))
    load = subprocess.run([_tool("h2load"), "-n", "200", "-c", "2", "-m", "8", "-d", str(body),
                           "-H", "content-type: application/json", "-H", f"x-api-key: {gw.demo_key}",
                           _url(gw, "/v1/sign")], capture_output=True, text=True, timeout=60)
    assert "200 succeeded" in load.stdout and "200 2xx" in load.stdout, load.stdout


def test_nghttp_and_h2load_are_served(gw: Gateway) -> None:
    out = subprocess.run([_tool("nghttp"), "-v", "-n", _url(gw, "/healthz")], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0 and ":status: 200" in out.stdout
    assert "The negotiated protocol: h2" in out.stdout
    # the crypto API itself, as nghttp sends it: a key made over h2 (201) and the key list
    auth = ["-H", f"authorization: Bearer {gw.demo_key}"]
    body = gw.directory / "nghttp-body.json"
    body.write_text('{"algorithm": "ml-dsa-65"}')
    made = subprocess.run([_tool("nghttp"), "-v", *auth, "-H", "content-type: application/json",
                           "-d", str(body), _url(gw, "/v1/keys")], capture_output=True, text=True, timeout=30)
    assert made.returncode == 0 and ":status: 201" in made.stdout, made.stdout[-2000:]
    listed = subprocess.run([_tool("nghttp"), "-v", *auth, _url(gw, "/v1/keys")], capture_output=True,
                            text=True, timeout=30)
    assert listed.returncode == 0 and ":status: 200" in listed.stdout and '"key_id"' in listed.stdout
    load = subprocess.run([_tool("h2load"), "-n", "400", "-c", "2", "-m", "20", _url(gw, "/healthz")],
                          capture_output=True, text=True, timeout=60)
    assert "400 succeeded" in load.stdout and "400 2xx" in load.stdout, load.stdout
    assert re.search(r"Application protocol: h2", load.stdout), load.stdout


def test_alpn_gives_h2_to_tls13_and_http11_to_tls12(gw: Gateway) -> None:
    for version, want in ((ssl.TLSVersion.TLSv1_3, "h2"), (ssl.TLSVersion.TLSv1_2, "http/1.1")):
        ctx = ssl.create_default_context(cafile=str(gw.ca_file))
        ctx.maximum_version = version
        ctx.set_alpn_protocols(["h2", "http/1.1"])
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.selected_alpn_protocol() == want


class _Client:
    """A blocking h2 client on the standard library's TLS."""

    def __init__(self, gw: Gateway) -> None:
        ctx = ssl.create_default_context(cafile=str(gw.ca_file))
        ctx.set_alpn_protocols(["h2"])
        self.sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", gw.port), timeout=10),
                                    server_hostname="localhost")
        self.h = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.h.initiate_connection()
        self.sock.sendall(self.h.data_to_send())

    def call(self, path: str, headers: list[tuple[bytes, bytes]], body: bytes | None) -> dict[str, Any]:
        sid = self.h.get_next_available_stream_id()
        fields = [(b":method", b"POST"), (b":scheme", b"https"), (b":authority", b"localhost"),
                  (b":path", path.encode()), *headers]
        self.h.send_headers(sid, fields, end_stream=body is None)
        if body is not None:
            self.h.send_data(sid, body, end_stream=True)
        self.sock.sendall(self.h.data_to_send())
        out: dict[str, Any] = {"headers": {}, "body": b"", "trailers": {}}
        while True:
            data = self.sock.recv(65536)
            assert data, "connection closed"
            for ev in self.h.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                    out["headers"] = dict(ev.headers)  # type: ignore[arg-type]
                elif isinstance(ev, h2.events.DataReceived) and ev.stream_id == sid:
                    out["body"] += ev.data
                    self.h.acknowledge_received_data(ev.flow_controlled_length or 0, sid)
                elif isinstance(ev, h2.events.TrailersReceived) and ev.stream_id == sid:
                    out["trailers"] = dict(ev.headers)  # type: ignore[arg-type]
                elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                    self.sock.sendall(self.h.data_to_send())
                    return out
            self.sock.sendall(self.h.data_to_send())

    def close(self) -> None:
        self.sock.close()


GRPC = [(b"content-type", b"application/grpc"), (b"te", b"trailers")]
FRAME = b"\x00\x00\x00\x00\x03abc"  # one uncompressed gRPC message of 3 bytes


def test_refused_grpc_calls_get_trailers_only_grpc_status(gw: Gateway) -> None:
    client = _Client(gw)
    try:
        no_key = client.call("/pkg.Public/Call", GRPC, FRAME)
        assert no_key["headers"][b":status"] == b"200" and no_key["body"] == b""
        assert (no_key["headers"][b"grpc-status"], no_key["headers"][b"grpc-message"]) == (
            b"16", b"unauthenticated")
        key = [(b"x-api-key", gw.demo_key.encode())]
        denied = client.call("/pkg.Private/Call", [*GRPC, *key], FRAME)
        assert (denied["headers"][b"grpc-status"], denied["headers"][b"grpc-message"]) == (
            b"7", b"policy_denied")
    finally:
        client.close()


def test_a_forwarded_h2_call_reaches_the_upstream_with_clean_headers(gw: Gateway) -> None:
    _Upstream.seen.clear()
    client = _Client(gw)
    try:
        key = [(b"x-api-key", gw.demo_key.encode()), (b"x-qpher-tenant", b"spoofed")]
        answer = client.call("/pkg.Public/%43all", [*GRPC, *key], FRAME)  # %43 is "C": decoded
        assert answer["headers"][b":status"] == b"200" and answer["body"] == b"pong:" + FRAME
    finally:
        client.close()
    path, headers, body = _Upstream.seen[-1]
    assert path == "/pkg.Public/Call" and body == FRAME
    assert headers["x-qpher-tenant"] != "spoofed" and headers["x-qpher-key-id"] and headers["x-request-id"]
    assert "x-api-key" not in headers and "authorization" not in headers
    assert headers["x-forwarded-host"] == "localhost" and headers["content-type"] == "application/grpc"
    assert not any(name.startswith(":") for name in headers)


def test_rapid_reset_ends_that_connection_only_and_is_counted(gw: Gateway) -> None:
    ctx = ssl.create_default_context(cafile=str(gw.ca_file))
    ctx.set_alpn_protocols(["h2"])
    import hpack

    enc = hpack.Encoder()
    frames = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + SettingsFrame(0).serialize()
    for i in range(300):
        sid = 2 * i + 1
        block = enc.encode([(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"localhost"),
                            (b":path", b"/healthz")])
        frames += HeadersFrame(sid, block, flags=["END_HEADERS", "END_STREAM"]).serialize()
        frames += RstStreamFrame(sid, error_code=ErrorCodes.CANCEL).serialize()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        try:
            tls.sendall(frames)
        except OSError:
            pass
        received = b""
        try:
            while chunk := tls.recv(65536):
                received += chunk
        except OSError:
            pass
    code = None
    while len(received) >= 9:
        frame, length = GoAwayFrame.parse_frame_header(memoryview(received[:9]))
        frame.parse_body(memoryview(received[9:9 + length]))
        received = received[9 + length:]
        if isinstance(frame, GoAwayFrame):
            code = frame.error_code
    assert code == ErrorCodes.ENHANCE_YOUR_CALM
    metrics = _curl(gw, _url(gw, "/metrics")).stdout
    assert 'qpher_http2_goaway_total{code="ENHANCE_YOUR_CALM",reason="rapid_reset"} 1' in metrics
    assert "qpher_http2_streams_total" in metrics
