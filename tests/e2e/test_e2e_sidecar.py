"""Sidecar mode through the real gateway: forwarding after auth and policy, header hygiene,
one normalised path for the policy and the upstream, the upstream's caching headers kept and
the security headers filled in (``http.hsts_max_age`` set here), 100 MiB streamed both ways
with bounded gateway memory, 502 and 504."""

from __future__ import annotations

import http.client
import http.server
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ._gateway import Gateway, init_state, start_gateway

MiB = 1024 * 1024
BLOCK = bytes(range(256)) * 256  # 64 KiB
HSTS_MAX_AGE = 600

# Upstream paths that answer with these response headers (besides Content-Type/-Length).
UPSTREAM_HEADERS = {
    "/static/logo.svg": [("Cache-Control", "public, max-age=60"), ("ETag", '"v1"')],
    "/app/own-security-headers": [
        ("Cache-Control", "private, max-age=5"),
        ("X-Content-Type-Options", "nosniff"),
        ("Strict-Transport-Security", "max-age=1"),
    ],
}


# A path rule the sidecar tests run under: the upstream must never see a request for it.
INTERNAL_DENY = """\
version: 1
rules:
  - id: internal-is-private
    effect: deny
    match: {path: /internal/**}
    reason: internal endpoints are not exposed
"""


class _Upstream(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Every request-target the upstream was sent, in arrival order (list.append is atomic).
    received: list[str] = []

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def parse_request(self) -> bool:
        ok = super().parse_request()
        if ok:
            self.received.append(self.path)
        return ok

    def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path in UPSTREAM_HEADERS:
            self.send_response(200)
            for name, value in UPSTREAM_HEADERS[self.path]:
                self.send_header(name, value)
            self.send_header("Content-Type", "image/svg+xml")
            self.send_header("Content-Length", "5")
            self.end_headers()
            self.wfile.write(b"<svg>")
            return
        if "/download/" in self.path:
            size = int(self.path.rsplit("/", 1)[1])
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            sent = 0
            while sent < size:
                chunk = BLOCK[: min(len(BLOCK), size - sent)]
                self.wfile.write(chunk)
                sent += len(chunk)
            return
        if self.path.endswith("/slow"):
            time.sleep(3)
            self._send(200, b"{}")
            return
        echo = {"path": self.path, "headers": [[k.lower(), v] for k, v in self.headers.items()]}
        self._send(200, json.dumps(echo).encode())

    def do_POST(self) -> None:
        total = 0
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                remaining = size
                while remaining:
                    got = self.rfile.read(min(remaining, 1 << 20))
                    remaining -= len(got)
                    total += len(got)
                self.rfile.readline()
        else:
            remaining = int(self.headers.get("Content-Length", "0"))
            while remaining:
                got = self.rfile.read(min(remaining, 1 << 20))
                remaining -= len(got)
                total += len(got)
        self._send(200, json.dumps({"received": total}).encode())


@pytest.fixture(scope="module")
def upstream() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    server.daemon_threads = True
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory, upstream: int) -> Iterator[Gateway]:
    d = tmp_path_factory.mktemp("sidecar") / "state"
    init_state(d, **{"crypto.backend": "openssl", "upstream.url": f"http://127.0.0.1:{upstream}",
                     "upstream.read_timeout": 1.0, "http.hsts_max_age": HSTS_MAX_AGE})
    (d / "policies" / "15-internal.yaml").write_text(INTERNAL_DENY)
    gw = start_gateway(d)
    try:
        yield gw
    finally:
        assert gw.stop() == 0


def _vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_forwarded_after_auth_with_tenant_headers_and_no_spoofing(sidecar: Gateway) -> None:
    c = sidecar.client()
    status, body, headers = c.call("GET", "/app/hello?x=1", headers={
        "X-Qpher-Tenant": "evil", "X-Tenant-Id": "evil", "X-Request-Id": "client-chosen",
        "X-Forwarded-For": "6.6.6.6", "Forwarded": "for=6.6.6.6", "Connection": "keep-alive, X-Hop",
        "X-Hop": "drop me", "X-App": "kept",
    })
    assert status == 200, body
    assert body["path"] == "/app/hello?x=1"
    got: dict[str, list[str]] = {}
    for k, v in body["headers"]:
        got.setdefault(k, []).append(v)
    assert got["x-qpher-tenant"] == ["demo"]
    assert got["x-qpher-key-id"] == [sidecar.demo_key.split("_")[1]]
    assert got["x-request-id"] == [headers["X-Request-Id"]]
    assert got["x-forwarded-for"] == ["127.0.0.1"]
    assert got["x-forwarded-proto"] == ["https"]
    assert "x-tenant-id" not in got and "forwarded" not in got and "x-hop" not in got
    assert "authorization" not in got and "x-api-key" not in got  # the API key is not passed on
    assert got["x-app"] == ["kept"]
    c.close()


def _security(headers: http.client.HTTPMessage) -> dict[str, list[str]]:
    names = ("cache-control", "x-content-type-options", "strict-transport-security")
    return {name: headers.get_all(name) or [] for name in names}


def test_forwarded_response_keeps_the_upstreams_caching_headers(sidecar: Gateway) -> None:
    c = sidecar.client()
    status, body, headers = c.call("GET", "/static/logo.svg")
    assert (status, body) == (200, b"<svg>")
    assert _security(headers) == {
        "cache-control": ["public, max-age=60"],  # the upstream's, untouched: never no-store
        "x-content-type-options": ["nosniff"],  # filled in: the upstream sent none
        "strict-transport-security": [f"max-age={HSTS_MAX_AGE}"],
    }
    assert headers.get_all("etag") == ['"v1"']
    # an upstream answer without caching headers gets none from the proxy either
    status, _, headers = c.call("GET", "/app/hello")
    assert status == 200 and headers.get_all("cache-control") is None
    assert headers["x-content-type-options"] == "nosniff"
    c.close()


def test_forwarded_response_keeps_the_upstreams_own_security_headers(sidecar: Gateway) -> None:
    c = sidecar.client()
    status, _, headers = c.call("GET", "/app/own-security-headers")
    c.close()
    assert status == 200
    assert _security(headers) == {
        "cache-control": ["private, max-age=5"],
        "x-content-type-options": ["nosniff"],  # one copy, not two
        "strict-transport-security": ["max-age=1"],  # the upstream's value wins
    }


@pytest.mark.parametrize(("path", "auth", "status"), [("/healthz", False, 200), ("/v1/info", True, 200),
                                                      ("/app/hello", False, 401), ("/internal/x", True, 403)])
def test_the_proxys_own_answers_carry_hsts_when_configured(
        sidecar: Gateway, path: str, auth: bool, status: int) -> None:
    c = sidecar.client(api_key=None if not auth else sidecar.demo_key)
    got, _, headers = c.call("GET", path, auth=auth)
    c.close()
    assert got == status
    assert _security(headers) == {"cache-control": ["no-store"], "x-content-type-options": ["nosniff"],
                                  "strict-transport-security": [f"max-age={HSTS_MAX_AGE}"]}


def test_unauthenticated_request_is_not_forwarded(sidecar: Gateway) -> None:
    c = sidecar.client(api_key=None)
    status, body, _ = c.call("GET", "/app/hello", auth=False)
    assert status == 401 and body["error"]["code"] == "unauthenticated"
    c.close()


def test_ambiguous_path_is_refused(sidecar: Gateway) -> None:
    c = sidecar.client()
    for path in ("/app/%2e%2e/admin", "/app//x", "/app/../v1/keys", "/app/a%2Fb"):
        status, body, _ = c.call("GET", path)
        assert status == 400 and body["error"]["code"] == "ambiguous_path", path
    c.close()


# Spellings of /internal/secret that servers read as that path (or as a path a prefix rule
# would cover): a WSGI server decodes %69 and %6e, Tomcat drops ";x", C servers stop at %00,
# some servers trim the space.
PATH_RULE_BYPASSES = [
    ("/%69nternal/secret", 403, "policy_denied"),
    ("/inter%6eal/secret", 403, "policy_denied"),
    ("/%69%6E%74%65%72%6E%61%6C/secret?x=1", 403, "policy_denied"),
    ("/internal;x/secret", 400, "ambiguous_path"),
    ("/internal%00/secret", 400, "ambiguous_path"),
    ("/internal%20/secret", 400, "ambiguous_path"),
    ("/internal%2fsecret", 400, "ambiguous_path"),
    ("/x/..%2finternal/secret", 400, "ambiguous_path"),
    ("/%ef%bd%89nternal/secret", 400, "ambiguous_path"),  # fullwidth "i"
]


def test_encoded_spellings_of_a_denied_path_never_reach_the_upstream(sidecar: Gateway) -> None:
    c = sidecar.client()
    status, body, _ = c.call("GET", "/internal/secret")
    assert status == 403 and body["error"]["code"] == "policy_denied"
    for path, want_status, want_code in PATH_RULE_BYPASSES:
        status, body, _ = c.call("GET", path)
        assert (status, body["error"]["code"]) == (want_status, want_code), path
    c.close()
    assert [p for p in _Upstream.received if "nternal" in p or "%" in p] == []


def test_an_allowed_encoded_path_reaches_the_upstream_normalised(sidecar: Gateway) -> None:
    c = sidecar.client()
    status, body, _ = c.call("GET", "/pub/%7Euser/a%2dfile?q=%7e")
    assert status == 200, body
    assert body["path"] == "/pub/~user/a-file?q=%7e"  # the query goes as sent
    status, body, _ = c.call("GET", "/pub/caf%c3%a9")
    assert status == 200 and body["path"] == "/pub/caf%C3%A9"
    c.close()
    assert "/pub/~user/a-file?q=%7e" in _Upstream.received
    assert not [p for p in _Upstream.received if "%7E" in p or "%2d" in p or "%c3" in p]


def test_an_encoded_spelling_of_the_proxys_own_path_is_not_forwarded(sidecar: Gateway) -> None:
    c = sidecar.client()
    status, body, _ = c.call("GET", "/v1/%69nfo")
    assert status == 400 and body["error"]["code"] == "ambiguous_path"
    c.close()
    assert not [p for p in _Upstream.received if p.startswith("/v1/")]


def test_100_mib_both_ways_with_bounded_memory(sidecar: Gateway) -> None:
    pid = sidecar.proc.pid
    before = _vm_hwm_kib(pid)
    c = sidecar.client()
    total = 100 * MiB

    def body() -> Iterator[bytes]:
        for _ in range(total // len(BLOCK)):
            yield BLOCK

    conn = http.client.HTTPSConnection(sidecar.host, sidecar.port, context=sidecar.context(), timeout=60)
    conn.request("POST", "/app/upload", body=body(), encode_chunked=True,
                 headers={"Authorization": f"Bearer {sidecar.demo_key}", "Transfer-Encoding": "chunked"})
    resp = conn.getresponse()
    assert resp.status == 200
    assert json.loads(resp.read()) == {"received": total}

    conn.request("GET", f"/app/download/{total}", headers={"Authorization": f"Bearer {sidecar.demo_key}"})
    resp = conn.getresponse()
    assert resp.status == 200
    received = 0
    while True:
        chunk = resp.read(1 << 20)
        if not chunk:
            break
        received += len(chunk)
    assert received == total, (received, resp.headers.items())
    conn.close()
    c.close()
    growth_mib = (_vm_hwm_kib(pid) - before) / 1024
    assert growth_mib < 40, f"gateway peak RSS grew by {growth_mib:.1f} MiB while streaming 2 x 100 MiB"


def test_upstream_timeout_is_504_and_does_not_block_others(sidecar: Gateway) -> None:
    slow = sidecar.client()
    result: dict[str, object] = {}

    def call_slow() -> None:
        result["slow"] = slow.call("GET", "/app/slow")

    t = threading.Thread(target=call_slow)
    t.start()
    fast = sidecar.client()
    t0 = time.monotonic()
    status, body, _ = fast.call("GET", "/app/fast")
    assert status == 200 and time.monotonic() - t0 < 0.9
    t.join(10)
    status, body, _ = result["slow"]  # type: ignore[misc]
    assert status == 504 and body["error"]["code"] == "upstream_timeout"
    slow.close()
    fast.close()


def test_upstream_down_is_502(tmp_path: Path) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    d = tmp_path / "state"
    init_state(d, **{"crypto.backend": "openssl", "upstream.url": f"http://127.0.0.1:{port}"})
    gw = start_gateway(d)
    try:
        c = gw.client()
        status, body, _ = c.call("GET", "/app/anything")
        assert status == 502 and body["error"]["code"] == "upstream_unavailable"
        # the crypto API is still served by the proxy itself
        assert c.call("GET", "/v1/info")[0] == 200
        c.close()
    finally:
        assert gw.stop() == 0
