"""WebSocket over HTTP/2 (RFC 8441 extended CONNECT) through the real gateway (sidecar mode): an
h2 client (python-hyper ``h2`` on the standard library's TLS 1.3, ALPN h2) speaking WebSocket
frames on a CONNECT stream, the ``websockets`` echo server of ``test_e2e_websocket`` behind the
proxy on HTTP/1.1. SETTINGS_ENABLE_CONNECT_PROTOCOL, 1,000 messages both ways and a 1000 close
seen by the upstream, the identity headers, 401 before the upstream, the audit records, two
tunnels on one connection, and the refusals (another :protocol, a plain CONNECT, a version other
than 13, a 2xx that is not an upgrade: an upstream's 200 instead of 101, a route of the proxy's own),
and the tunnels of a client whose whole connection drops."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import ssl
import struct
import time
from collections.abc import Iterator
from http import HTTPStatus

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import pytest
from websockets.frames import Close, Frame, Opcode
from websockets.http11 import Request as WSRequest
from websockets.http11 import Response as WSResponse
from websockets.sync.server import ServerConnection

from ._gateway import Gateway, init_state, start_gateway
from .test_e2e_websocket import MARKER, EchoUpstream, audit_records, wait_for


class H2Upstream(EchoUpstream):
    """The echo upstream, plus ``/plain200``: a plain 200 instead of the 101 (the upgrade refused
    with a success status); and each tunnel's path once its upstream connection has ended."""

    def __init__(self) -> None:
        self.ended_paths: list[str] = []
        super().__init__()

    def _seen(self, conn: ServerConnection, request: WSRequest) -> WSResponse | None:  # type: ignore[override]
        super()._seen(conn, request)
        if request.path.startswith("/plain200"):
            return conn.respond(HTTPStatus.OK, "a page, not a websocket\n")
        return None

    def _handler(self, ws: ServerConnection) -> None:
        try:
            super()._handler(ws)
        finally:
            self.ended_paths.append(ws.request.path if ws.request is not None else "")


@pytest.fixture(scope="module")
def upstream() -> Iterator[H2Upstream]:
    up = H2Upstream()
    try:
        yield up
    finally:
        up.stop()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, upstream: EchoUpstream) -> Iterator[Gateway]:
    d = tmp_path_factory.mktemp("websocket-h2") / "state"
    init_state(d, **{"crypto.backend": "openssl", "upstream.url": f"http://127.0.0.1:{upstream.port}",
                     "upstream.websocket.idle_timeout": 5.0, "server.shutdown_grace": 5.0})
    gw = start_gateway(d)
    try:
        yield gw
    finally:
        assert gw.stop() == 0


class H2Client:
    """A blocking h2 client with any number of streams; events are kept per stream."""

    def __init__(self, gw: Gateway) -> None:
        ctx = ssl.create_default_context(cafile=str(gw.ca_file))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.set_alpn_protocols(["h2"])
        self.sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", gw.port), timeout=10),
                                    server_hostname="localhost")
        assert self.sock.selected_alpn_protocol() == "h2"
        self.gw = gw
        self.h = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.h.initiate_connection()
        self.remote_settings: dict[int, int] = {}
        self.status: dict[int, dict[bytes, bytes]] = {}
        self.data: dict[int, bytearray] = {}
        self.ended: set[int] = set()
        self.reset: dict[int, int] = {}
        self._flush()
        self.wait(lambda: h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL in self.remote_settings)

    def _flush(self) -> None:
        out = self.h.data_to_send()
        if out:
            self.sock.sendall(out)

    def _pump(self) -> None:
        data = self.sock.recv(65536)
        assert data, "connection closed"
        for ev in self.h.receive_data(data):
            if isinstance(ev, h2.events.RemoteSettingsChanged):
                for code, setting in ev.changed_settings.items():
                    self.remote_settings[int(code)] = setting.new_value
            elif isinstance(ev, h2.events.ResponseReceived):
                assert ev.stream_id is not None
                self.status[ev.stream_id] = dict(ev.headers)  # type: ignore[arg-type]
            elif isinstance(ev, h2.events.DataReceived):
                assert ev.stream_id is not None
                self.data.setdefault(ev.stream_id, bytearray()).extend(ev.data or b"")
                self.h.acknowledge_received_data(ev.flow_controlled_length or 0, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                assert ev.stream_id is not None
                self.ended.add(ev.stream_id)
            elif isinstance(ev, h2.events.StreamReset):
                assert ev.stream_id is not None
                self.reset[ev.stream_id] = int(ev.error_code or 0)
                self.ended.add(ev.stream_id)
        self._flush()

    def wait(self, predicate: object) -> None:
        while not predicate():  # type: ignore[operator]
            self._pump()

    def connect(self, path: str, api_key: str | None = "demo", protocol: bytes | None = b"websocket",
                extra: list[tuple[bytes, bytes]] | None = None, version: bytes | None = b"13") -> int:
        """Open an extended CONNECT stream; returns its id once the response head is in."""
        sid = self.h.get_next_available_stream_id()
        fields = [(b":method", b"CONNECT")]
        if protocol is not None:
            fields.append((b":protocol", protocol))
            fields += [(b":scheme", b"https"), (b":path", path.encode())]
        fields.append((b":authority", b"localhost"))
        if version is not None:
            fields.append((b"sec-websocket-version", version))
        fields += extra or []
        key = self.gw.demo_key if api_key == "demo" else api_key
        if key is not None:
            fields.append((b"authorization", b"Bearer " + key.encode()))
        self.h.send_headers(sid, fields)
        self._flush()
        self.wait(lambda: sid in self.status or sid in self.reset)
        return sid

    def send(self, sid: int, data: bytes, end: bool = False) -> None:
        view = memoryview(data)
        while view:
            size = min(self.h.local_flow_control_window(sid), self.h.max_outbound_frame_size, len(view))
            if size <= 0:
                self._pump()
                continue
            self.h.send_data(sid, view[:size].tobytes(), end_stream=end and size == len(view))
            view = view[size:]
            self._flush()
        if end and not data:
            self.h.end_stream(sid)
            self._flush()

    def frame(self, sid: int) -> Frame:
        """The next (unmasked) WebSocket frame from the server on ``sid``."""
        while True:
            buf = self.data.setdefault(sid, bytearray())
            parsed = _parse_frame(buf)
            if parsed is not None:
                return parsed
            assert sid not in self.ended, "the stream ended"
            self._pump()

    def close(self) -> None:
        self.sock.close()


def _parse_frame(buf: bytearray) -> Frame | None:
    if len(buf) < 2:
        return None
    fin, opcode, length, at = buf[0] & 0x80, buf[0] & 0x0F, buf[1] & 0x7F, 2
    assert not buf[1] & 0x80, "server frames are not masked"
    if length == 126:
        if len(buf) < 4:
            return None
        length, at = struct.unpack("!H", buf[2:4])[0], 4
    elif length == 127:
        if len(buf) < 10:
            return None
        length, at = struct.unpack("!Q", buf[2:10])[0], 10
    if len(buf) < at + length:
        return None
    payload = bytes(buf[at:at + length])
    del buf[:at + length]
    return Frame(Opcode(opcode), payload, fin=bool(fin))


def ws_frame(opcode: Opcode, payload: bytes) -> bytes:
    return Frame(opcode, payload).serialize(mask=True, extensions=[])


@pytest.fixture
def client(gateway: Gateway) -> Iterator[H2Client]:
    c = H2Client(gateway)
    try:
        yield c
    finally:
        c.close()


def test_the_server_advertises_extended_connect(client: H2Client) -> None:
    assert client.remote_settings[h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL] == 1


def exchange(client: H2Client, sid: int, n: int, tag: str, batch: int = 50) -> None:
    for start in range(0, n, batch):
        sent = []
        for i in range(start, min(n, start + batch)):
            if i % 2:
                msg, op = f"{MARKER} {tag} text {i}".encode(), Opcode.TEXT
            else:
                msg, op = os.urandom(1 + i % 300), Opcode.BINARY
            sent.append((op, msg))
            client.send(sid, ws_frame(op, msg))
        for op, msg in sent:
            got = client.frame(sid)
            assert (got.opcode, got.data) == (op, msg)


def close_cleanly(client: H2Client, sid: int) -> None:
    client.send(sid, ws_frame(Opcode.CLOSE, Close(1000, "done").serialize()))
    reply = client.frame(sid)
    assert reply.opcode is Opcode.CLOSE and Close.parse(reply.data).code == 1000
    client.send(sid, b"", end=True)  # our half-close after the close handshake
    client.wait(lambda: sid in client.ended)
    assert sid not in client.reset


def test_a_thousand_messages_both_ways_over_an_extended_connect(
    gateway: Gateway, upstream: EchoUpstream, client: H2Client
) -> None:
    sid = client.connect("/echo/h2?x=1", extra=[(b"sec-websocket-protocol", b"chat")])
    head = client.status[sid]
    assert head[b":status"] == b"200", head
    assert b"sec-websocket-accept" not in head and b"upgrade" not in head and b"connection" not in head
    exchange(client, sid, 1000, "bulk")
    close_cleanly(client, sid)
    wait_for(lambda: upstream.close_codes.count(1000) >= 1)

    path, headers = upstream.handshakes[-1]
    assert path == "/echo/h2?x=1"
    assert headers["x-qpher-tenant"] == ["demo"]
    assert headers["x-qpher-key-id"] == [gateway.demo_key.split("_")[1]]
    assert len(headers["x-request-id"]) == 1
    assert "authorization" not in headers and "x-api-key" not in headers
    assert headers["upgrade"] == ["websocket"] and headers["sec-websocket-version"] == ["13"]
    assert len(headers["sec-websocket-key"]) == 1 and headers["sec-websocket-protocol"] == ["chat"]

    rid = headers["x-request-id"][0]
    wait_for(lambda: any(r["request_id"] == rid for r in audit_records(gateway, "websocket.close")))
    opened = [r for r in audit_records(gateway, "websocket.upgrade") if r["request_id"] == rid]
    closed = [r for r in audit_records(gateway, "websocket.close") if r["request_id"] == rid]
    assert [(r["tenant"], r["path"]) for r in opened] == [("demo", "/echo/h2")]
    assert [r["reason"] for r in closed][0] in ("client", "upstream")
    assert closed[0]["bytes_client_to_upstream"] > 0 and closed[0]["bytes_upstream_to_client"] > 0


def test_no_key_is_401_on_the_stream_and_never_reaches_the_upstream(
    upstream: EchoUpstream, client: H2Client
) -> None:
    before = len(upstream.handshakes)
    sid = client.connect("/echo/anon", api_key=None)
    assert client.status[sid][b":status"] == b"401"
    client.wait(lambda: sid in client.ended)
    assert b'"unauthenticated"' in bytes(client.data.get(sid, b""))
    assert len(upstream.handshakes) == before


def test_two_tunnels_on_one_connection_work_independently(upstream: EchoUpstream, client: H2Client) -> None:
    closed_before = upstream.close_codes.count(1000)
    a = client.connect("/echo/a")
    b = client.connect("/echo/b")
    assert client.status[a][b":status"] == client.status[b][b":status"] == b"200"
    exchange(client, a, 20, "a")
    exchange(client, b, 20, "b")
    close_cleanly(client, a)
    exchange(client, b, 20, "b-after")  # a's end leaves b running
    close_cleanly(client, b)
    wait_for(lambda: upstream.close_codes.count(1000) >= closed_before + 2)


def test_other_protocols_and_plain_connect_are_refused(client: H2Client) -> None:
    sid = client.connect("/echo/x", protocol=b"connect-udp")
    assert client.status[sid][b":status"] == b"501"
    plain = client.connect("/", protocol=None)
    assert client.status[plain][b":status"] == b"405"


def test_a_client_reset_ends_the_tunnel_as_client(gateway: Gateway, upstream: EchoUpstream,
                                                   client: H2Client) -> None:
    sid = client.connect("/echo/reset")
    exchange(client, sid, 3, "reset")
    client.h.reset_stream(sid)
    client._flush()
    wait_for(lambda: any(r["path"] == "/echo/reset" for r in audit_records(gateway, "websocket.close")))
    closed = [r for r in audit_records(gateway, "websocket.close") if r["path"] == "/echo/reset"]
    assert closed[0]["reason"] == "client"


def error_code(client: H2Client, sid: int) -> str:
    client.wait(lambda: sid in client.ended)
    return str(json.loads(bytes(client.data.get(sid, b"")))["error"]["code"])


def test_an_upstream_200_instead_of_101_is_502_not_an_open_tunnel(
    gateway: Gateway, upstream: H2Upstream, client: H2Client
) -> None:
    before = len(upstream.handshakes)
    sid = client.connect("/plain200/x")
    assert client.status[sid][b":status"] == b"502", client.status[sid]
    assert error_code(client, sid) == "upstream_bad_response"
    assert sid not in client.reset
    assert upstream.paths()[before:] == ["/plain200/x"]  # it did reach the upstream, which said 200
    assert not any(r["path"] == "/plain200/x" for r in audit_records(gateway, "websocket.upgrade"))


def test_a_connect_to_a_route_of_the_proxy_is_404_not_an_open_tunnel(
    upstream: H2Upstream, client: H2Client
) -> None:
    before = len(upstream.handshakes)
    sid = client.connect("/healthz")
    assert client.status[sid][b":status"] == b"404", client.status[sid]
    assert error_code(client, sid) == "not_found"
    assert len(upstream.handshakes) == before
    # the connection serves on: a tunnel after the refusal works
    ok = client.connect("/echo/after-404")
    assert client.status[ok][b":status"] == b"200"
    exchange(client, ok, 2, "after-404")
    close_cleanly(client, ok)


@pytest.mark.parametrize("version", [b"8", b"12", b"13, 8"])
def test_a_websocket_version_other_than_13_is_400(upstream: H2Upstream, client: H2Client,
                                                     version: bytes) -> None:
    before = len(upstream.handshakes)
    sid = client.connect("/echo/version", version=version)
    assert client.status[sid][b":status"] == b"400", client.status[sid]
    assert error_code(client, sid) == "bad_request"
    assert len(upstream.handshakes) == before


def test_without_a_websocket_version_the_proxy_sends_13(upstream: H2Upstream, client: H2Client) -> None:
    sid = client.connect("/echo/no-version", version=None)
    assert client.status[sid][b":status"] == b"200"
    assert upstream.handshakes[-1][1]["sec-websocket-version"] == ["13"]
    close_cleanly(client, sid)


def test_a_dropped_client_connection_ends_its_tunnels_as_client(
    gateway: Gateway, upstream: H2Upstream, client: H2Client
) -> None:
    paths = ["/echo/drop-a", "/echo/drop-b"]
    sids = [client.connect(p) for p in paths]
    for sid in sids:
        exchange(client, sid, 3, "drop")
    client.sock.close()  # the whole TCP/TLS connection, no RST_STREAM, no GOAWAY
    started = time.monotonic()
    wait_for(lambda: {r["path"] for r in audit_records(gateway, "websocket.close")} >= set(paths))
    assert time.monotonic() - started < 2.0  # _TUNNEL_END_WAIT (1 s), not idle_timeout (5 s)
    closed = [r for r in audit_records(gateway, "websocket.close") if r["path"] in paths]
    assert sorted((r["path"], r["reason"]) for r in closed) == [(p, "client") for p in paths]
    assert all(r["bytes_client_to_upstream"] > 0 and r["bytes_upstream_to_client"] > 0 for r in closed)
    wait_for(lambda: set(upstream.ended_paths) >= set(paths), timeout=3.0)  # the upstream saw it close
    assert time.monotonic() - started < 2.5
    # the gateway serves on
    again = H2Client(gateway)
    try:
        sid = again.connect("/echo/after-drop")
        assert again.status[sid][b":status"] == b"200"
        exchange(again, sid, 2, "after-drop")
        close_cleanly(again, sid)
    finally:
        again.close()


# last: it stops the module's gateway
def test_sigterm_closes_open_h2_tunnels_and_exits_0(gateway: Gateway, client: H2Client) -> None:
    sid = client.connect("/echo/h2-shutdown")
    exchange(client, sid, 2, "shutdown")
    started = time.monotonic()
    assert gateway.stop() == 0
    # GOAWAY, RST_STREAM CANCEL (h2's client state machine refuses a RST after a GOAWAY), the end
    with contextlib.suppress(AssertionError, OSError, h2.exceptions.ProtocolError):
        client.wait(lambda: sid in client.ended)
    assert time.monotonic() - started < 5.0  # at once, not after server.shutdown_grace
    shutdown = [r for r in audit_records(gateway, "websocket.close") if r["path"] == "/echo/h2-shutdown"]
    assert [r["reason"] for r in shutdown] == ["shutdown"]
