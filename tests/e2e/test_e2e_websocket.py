"""WebSocket passthrough through the real gateway (sidecar mode): the ``websockets`` library on both
sides (a plain ws:// echo server behind the proxy, a wss:// client with the dev CA), 10,000
messages both ways, close codes end to end, auth / policy / rate limit before the upstream, the
idle limit and the tunnel limit, the audit records without payload, and SIGTERM with tunnels open."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest
from websockets.asyncio.client import ClientConnection as AsyncClientConnection
from websockets.asyncio.client import connect as async_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.http11 import Request as WSRequest
from websockets.sync.server import Server, ServerConnection, serve

from ._gateway import Gateway, cli, init_state, start_gateway

T = TypeVar("T")
KiB = 1024
MARKER = "PAYLOAD-MARKER-b81d37e0"  # must never show in the audit log or the gateway's log
IDLE_TIMEOUT = 1.0
MAX_TUNNELS = 4

INTERNAL_DENY = """\
version: 1
rules:
  - id: internal-is-private
    effect: deny
    match: {path: /internal/**}
    reason: internal endpoints are not exposed
"""


class EchoUpstream:
    """A websockets server: ``/echo`` echoes, ``/close4001`` closes with 4001 after one message,
    ``/die`` drops its TCP connection after one message. Records every handshake it saw."""

    def __init__(self) -> None:
        self.handshakes: list[tuple[str, dict[str, list[str]]]] = []
        self.close_codes: list[int | None] = []
        self.server: Server = serve(self._handler, "127.0.0.1", 0, process_request=self._seen,
                                    max_size=None, compression=None)
        self.port = self.server.socket.getsockname()[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _seen(self, conn: ServerConnection, request: WSRequest) -> None:
        headers: dict[str, list[str]] = {}
        for name, value in request.headers.raw_items():
            headers.setdefault(name.lower(), []).append(value)
        self.handshakes.append((request.path, headers))

    def _handler(self, ws: ServerConnection) -> None:
        path = ws.request.path if ws.request is not None else ""
        if path.startswith("/echo"):
            try:
                for message in ws:
                    ws.send(message)
            except ConnectionClosed:
                pass
        elif path == "/close4001":
            ws.recv()
            ws.close(4001, "bye now")
        elif path == "/die":
            ws.recv()
            ws.socket.close()  # no close frame: as if the process died
            return
        self.close_codes.append(ws.close_code)

    def paths(self) -> list[str]:
        return [path for path, _ in self.handshakes]

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(5)


@pytest.fixture(scope="module")
def upstream() -> Iterator[EchoUpstream]:
    up = EchoUpstream()
    try:
        yield up
    finally:
        up.stop()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, upstream: EchoUpstream) -> Iterator[Gateway]:
    d = tmp_path_factory.mktemp("websocket") / "state"
    init_state(d, **{"crypto.backend": "openssl", "upstream.url": f"http://127.0.0.1:{upstream.port}",
                     "upstream.websocket.idle_timeout": IDLE_TIMEOUT,
                     "upstream.websocket.max_connections": MAX_TUNNELS,
                     "server.shutdown_grace": 5.0})
    (d / "policies" / "15-internal.yaml").write_text(INTERNAL_DENY)
    gw = start_gateway(d)
    try:
        yield gw
    finally:
        assert gw.stop() == 0


class _Loop:
    """One asyncio event loop in a daemon thread, shared by every client of this module."""

    _loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def run(cls, coro: Coroutine[Any, Any, T]) -> T:
        if cls._loop is None:
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, daemon=True, name="ws-client-loop").start()
            cls._loop = loop
        return asyncio.run_coroutine_threadsafe(coro, cls._loop).result()


class WSClient:
    """A blocking face on the ``websockets`` asyncio client (``send``, ``recv(timeout)``, ``close``,
    ``close_code``), usable from several threads at once.

    Not the library's sync client: that one starts a reader thread on the TLS socket before it
    writes the upgrade request, and about one handshake in a few hundred the request then never
    leaves the client (``ss -tni`` during such a stall: the client's bytes_sent is its ClientHello
    and Finished alone, every queue empty, the gateway waiting in epoll; the same with session
    tickets off). The asyncio client does its TLS on one thread, through memory BIOs."""

    def __init__(self, conn: AsyncClientConnection) -> None:
        self._conn = conn

    @classmethod
    def connect(cls, uri: str, **kwargs: Any) -> WSClient:
        return cls(_Loop.run(_open(uri, **kwargs)))

    def send(self, message: str | bytes) -> None:
        _Loop.run(self._conn.send(message))

    def recv(self, timeout: float | None = None) -> str | bytes:
        return _Loop.run(asyncio.wait_for(self._conn.recv(), timeout))  # TimeoutError past timeout

    def close(self, code: int = 1000, reason: str = "") -> None:
        _Loop.run(self._conn.close(code, reason))

    @property
    def close_code(self) -> int | None:
        return self._conn.close_code

    def __enter__(self) -> WSClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


async def _open(uri: str, **kwargs: Any) -> AsyncClientConnection:
    return await async_connect(uri, **kwargs)


def ws_connect(gw: Gateway, path: str, api_key: str | None = "demo") -> WSClient:
    key = gw.demo_key if api_key == "demo" else api_key
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    return WSClient.connect(f"wss://{gw.host}:{gw.port}{path}", ssl=gw.context(), additional_headers=headers,
                            proxy=None, max_size=None, compression=None, open_timeout=10, close_timeout=5)


def refused(gw: Gateway, path: str, api_key: str | None = "demo") -> tuple[int, dict[str, Any]]:
    with pytest.raises(InvalidStatus) as info, ws_connect(gw, path, api_key):
        pass
    response = info.value.response
    return response.status_code, json.loads(response.body or b"{}")


def audit_records(gw: Gateway, event: str) -> list[dict[str, Any]]:
    lines = (gw.directory / "audit" / "audit.log").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == event]


def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def messages(n: int) -> list[str | bytes]:
    out: list[str | bytes] = []
    for i in range(n):
        if i % 100 == 7:
            out.append(bytes([i % 256]) * (64 * KiB))  # large: many TLS records, TCP windows
        elif i % 2:
            out.append(f"{MARKER} text {i}")
        else:
            out.append(f"{MARKER} binary {i}".encode())
    return out


def test_ten_thousand_messages_both_ways_and_a_clean_close(gateway: Gateway, upstream: EchoUpstream) -> None:
    sent = messages(10_000)
    with ws_connect(gateway, "/echo/bulk?x=1") as ws:
        sender = threading.Thread(target=lambda: [ws.send(m) for m in sent])
        sender.start()
        received = [ws.recv() for _ in sent]
        sender.join()
        assert received == sent
        ws.close(1000)
        assert ws.close_code == 1000
    wait_for(lambda: 1000 in upstream.close_codes)  # the upstream saw the client's 1000

    path, headers = upstream.handshakes[-1]
    assert path == "/echo/bulk?x=1"
    assert headers["x-qpher-tenant"] == ["demo"]
    assert headers["x-qpher-key-id"] == [gateway.demo_key.split("_")[1]]
    assert len(headers["x-request-id"]) == 1 and headers["x-forwarded-proto"] == ["https"]
    assert "authorization" not in headers and "x-api-key" not in headers
    assert headers["upgrade"] == ["websocket"] and headers["sec-websocket-version"] == ["13"]

    wait_for(lambda: len(audit_records(gateway, "websocket.close")) >= 1)
    opened = audit_records(gateway, "websocket.upgrade")[-1]
    closed = audit_records(gateway, "websocket.close")[-1]
    assert opened["request_id"] == headers["x-request-id"][0] == closed["request_id"]
    assert (opened["tenant"], opened["path"]) == ("demo", "/echo/bulk")
    assert closed["reason"] in ("client", "upstream")  # the client's close frame, then either TCP close
    payload = sum(len(m) for m in sent)
    assert closed["bytes_client_to_upstream"] > payload and closed["bytes_upstream_to_client"] > payload


def test_the_upstreams_close_code_and_reason_reach_the_client(gateway: Gateway) -> None:
    with ws_connect(gateway, "/close4001") as ws:
        ws.send(f"{MARKER} hello")
        with pytest.raises(ConnectionClosed) as info:
            ws.recv()
    assert info.value.rcvd is not None
    assert (info.value.rcvd.code, info.value.rcvd.reason) == (4001, "bye now")


def test_an_upstream_that_dies_is_an_abnormal_close(gateway: Gateway) -> None:
    with ws_connect(gateway, "/die") as ws:
        ws.send(f"{MARKER} hello")
        with pytest.raises(ConnectionClosed):
            ws.recv()
        assert ws.close_code == 1006
    wait_for(lambda: any(r["reason"] == "upstream" and r["path"] == "/die"
                         for r in audit_records(gateway, "websocket.close")))


def test_unauthenticated_and_denied_upgrades_never_reach_the_upstream(
    gateway: Gateway, upstream: EchoUpstream
) -> None:
    before = len(upstream.handshakes)
    status, body = refused(gateway, "/echo/anon", api_key=None)
    assert (status, body["error"]["code"]) == (401, "unauthenticated")
    status, body = refused(gateway, "/echo/anon", api_key="qph_nokey_nosecretnosecretnosecret")
    assert (status, body["error"]["code"]) == (401, "unauthenticated")
    status, body = refused(gateway, "/internal/ws")
    assert (status, body["error"]["code"]) == (403, "policy_denied")
    status, body = refused(gateway, "/internal/%77s")  # the normalised path is judged
    assert (status, body["error"]["code"]) == (403, "policy_denied")
    free = cli("apikey", "create", "--config", str(gateway.directory / "config.yaml"),
               "--tenant", "ws-free", "--plan", "free").stdout.strip().splitlines()[-1].strip()
    statuses = [refused(gateway, "/internal/ws", api_key=free) for _ in range(14)]
    codes = {(s, b["error"]["code"]) for s, b in statuses}
    assert (429, "rate_limited") in codes and codes <= {(403, "policy_denied"), (429, "rate_limited")}
    assert len(upstream.handshakes) == before


def test_an_idle_tunnel_is_closed(gateway: Gateway) -> None:
    with ws_connect(gateway, "/echo/idle") as ws:
        ws.send("ping")
        assert ws.recv() == "ping"
        started = time.monotonic()
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=IDLE_TIMEOUT + 5)
    assert IDLE_TIMEOUT * 0.9 <= time.monotonic() - started < IDLE_TIMEOUT + 3
    wait_for(lambda: any(r["reason"] == "idle_timeout" for r in audit_records(gateway, "websocket.close")))


def _open_tunnels(gw: Gateway) -> float:
    status, body, _ = gw.client().call("GET", "/metrics")
    assert status == 200
    text = body.decode() if isinstance(body, bytes) else str(body)
    for line in text.splitlines():
        if line.startswith("qpher_websocket_tunnels_open "):
            return float(line.split()[1])
    raise AssertionError("no qpher_websocket_tunnels_open")


def test_tunnels_over_max_connections_are_refused_and_counted(gateway: Gateway) -> None:
    wait_for(lambda: _open_tunnels(gateway) == 0)
    with contextlib.ExitStack() as stack:
        for i in range(MAX_TUNNELS):
            stack.enter_context(ws_connect(gateway, f"/echo/{i}"))
        assert _open_tunnels(gateway) == MAX_TUNNELS
        status, body = refused(gateway, "/echo/one-too-many")
        assert (status, body["error"]["code"]) == (503, "websocket_limit")
    wait_for(lambda: _open_tunnels(gateway) == 0)
    _, body, _ = gateway.client().call("GET", "/metrics")
    assert 'qpher_websocket_tunnels_total{outcome="refused"} 1' in body.decode()


def test_the_payload_never_reaches_the_audit_log_or_the_logs(gateway: Gateway) -> None:
    audit = "".join(p.read_text() for p in (gateway.directory / "audit").glob("audit.log*"))
    assert "websocket.upgrade" in audit and MARKER not in audit
    assert MARKER not in gateway.raw_log_text()


def test_sigterm_closes_open_tunnels_and_exits_0(gateway: Gateway) -> None:
    with ws_connect(gateway, "/echo/shutdown") as ws:
        ws.send("ping")
        assert ws.recv() == "ping"
        started = time.monotonic()
        assert gateway.stop() == 0
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=5)
    assert time.monotonic() - started < 5.0  # within server.shutdown_grace
    shutdown = [r for r in audit_records(gateway, "websocket.close") if r["path"] == "/echo/shutdown"]
    assert [r["reason"] for r in shutdown] == ["shutdown"]
