"""HTTP/1.1 behaviour over real TCP on 127.0.0.1: keep-alive, pipelining, bodies, 100-continue,
HEAD, malformed input, handler errors."""

from __future__ import annotations

import hashlib
import logging
import re

import pytest
import trio
import trio.testing
from _http_helpers import RawClient, echo_info, get, running_server

from qpher_proxy.errors import InvalidInput, QpherError
from qpher_proxy.http import HTTPLimits, Request, Response, serve_connection

ID_RE = re.compile(rb"[0-9a-f]{16}")


async def test_keep_alive_serves_several_requests_on_one_connection() -> None:
    done: list[tuple[str, int, int]] = []

    def on_done(request: Request, status: int, duration: float, sent: int) -> None:
        assert duration >= 0
        done.append((request.path, status, sent))

    async with running_server(echo_info, on_request_done=on_done) as (_, port):
        client = await RawClient.connect(port)
        ids = set()
        for i in range(3):
            await client.send(get(f"/r{i}?x={i}"))
            resp = await client.read_response()
            assert resp.status == 200
            assert resp.header(b"connection") is None
            rid = resp.header(b"x-request-id")
            assert rid is not None and ID_RE.fullmatch(rid)
            assert resp.json() == {
                "method": "GET",
                "path": f"/r{i}",
                "query": f"x={i}",
                "request_id": rid.decode(),
                "client_request_id": None,
            }
            ids.add(rid)
        assert len(ids) == 3
        await client.aclose()
    assert [(p, s) for p, s, _ in done] == [("/r0", 200), ("/r1", 200), ("/r2", 200)]
    assert all(sent > 100 for _, _, sent in done)


async def test_pipelined_requests_are_answered_in_order() -> None:
    async with running_server(echo_info) as (_, port):
        client = await RawClient.connect(port)
        await client.send(get("/first") + get("/second") + get("/third"))
        paths = [(await client.read_response()).json()["path"] for _ in range(3)]
        assert paths == ["/first", "/second", "/third"]
        await client.aclose()


async def test_incoming_request_id_is_recorded_but_never_used_as_ours() -> None:
    async with running_server(echo_info) as (_, port):
        client = await RawClient.connect(port)
        await client.send(get("/", b"X-Request-Id: client-abc.123\r\n"))
        resp = await client.read_response()
        assert resp.json()["client_request_id"] == "client-abc.123"
        assert resp.header(b"x-request-id") != b"client-abc.123"
        assert resp.json()["request_id"] == resp.header(b"x-request-id").decode()
        await client.send(get("/", b"X-Request-Id: <script>\r\n"))
        assert (await client.read_response()).json()["client_request_id"] is None
        await client.aclose()


async def test_content_length_body_is_read() -> None:
    async with running_server(echo_info) as (_, port):
        client = await RawClient.connect(port)
        await client.send(b"POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\nhello world")
        assert (await client.read_response()).json() == {"len": 11, "body": "hello world"}
        await client.aclose()


async def test_chunked_body_is_read_across_writes() -> None:
    async with running_server(echo_info) as (_, port):
        client = await RawClient.connect(port)
        await client.send(
            b"POST /body HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
        )
        await trio.sleep(0)
        await client.send(b"6;ext=1\r\n world\r\n0\r\n\r\n")
        assert (await client.read_response()).json() == {"len": 11, "body": "hello world"}
        # and the connection is reusable afterwards
        await client.send(get("/after"))
        assert (await client.read_response()).json()["path"] == "/after"
        await client.aclose()


async def test_expect_100_continue_is_sent_when_the_handler_reads_the_body() -> None:
    async with running_server(echo_info) as (_, port):
        client = await RawClient.connect(port)
        await client.send(
            b"POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
        )
        interim = await client.read_response()
        assert interim.status == 100
        await client.send(b"data")
        resp = await client.read_response()
        assert resp.status == 200 and resp.json()["body"] == "data"
        await client.aclose()


async def test_expect_100_continue_is_not_sent_when_the_handler_refuses_early() -> None:
    async def refuse(request: Request) -> Response:
        raise QpherError("no key", code="unauthenticated", status=401)

    async with running_server(refuse) as (_, port):
        client = await RawClient.connect(port)
        await client.send(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        resp = await client.read_response()
        assert resp.status == 401  # no 100 before it
        assert resp.json()["error"]["code"] == "unauthenticated"
        # we never invited the body, so we do not wait for it: the connection closes
        assert resp.header(b"connection") == b"close"
        assert await client.closed_by_peer()
        await client.aclose()


async def test_unread_body_is_drained_and_the_connection_reused() -> None:
    async with running_server(echo_info) as (_, port):
        client = await RawClient.connect(port)
        await client.send(b"POST /ignored HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\nabc")
        resp = await client.read_response()
        assert resp.status == 200 and resp.header(b"connection") is None
        await client.send(b"def" + get("/next"))
        assert (await client.read_response()).json()["path"] == "/next"
        await client.aclose()


async def test_head_has_the_get_content_length_and_no_body() -> None:
    async def page(request: Request) -> Response:
        return Response(
            200, [(b"content-type", b"text/plain")], b"x" * 1234 if request.path == "/h" else b"next"
        )

    async with running_server(page) as (_, port):
        client = await RawClient.connect(port)
        await client.send(get("/h"))
        get_resp = await client.read_response()
        assert len(get_resp.body) == 1234
        await client.send(get("/h", method=b"HEAD") + get("/after"))
        head_resp = await client.read_response(head=True)
        assert head_resp.status == 200
        assert head_resp.header(b"content-length") == b"1234"
        after = await client.read_response()  # no stray body bytes between the two
        assert after.body == b"next"
        await client.aclose()


async def test_garbage_gets_400_json_then_close() -> None:
    async with running_server(echo_info) as (_, port):
        client = await RawClient.connect(port)
        await client.send(b"\x16\x03\x01 this is not http\r\n\r\n")
        resp = await client.read_response()
        assert resp.status == 400
        assert resp.header(b"connection") == b"close"
        assert resp.header(b"content-type") == b"application/json"
        err = resp.json()["error"]
        assert err["code"] == "bad_request"
        assert err["request_id"] == resp.header(b"x-request-id").decode()
        assert await client.closed_by_peer()
        await client.aclose()


async def test_bad_header_line_gets_400() -> None:
    async with running_server(echo_info) as (_, port):
        client = await RawClient.connect(port)
        await client.send(b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n")
        resp = await client.read_response()
        assert resp.status == 400 and resp.json()["error"]["code"] == "bad_request"
        await client.aclose()


async def test_unsupported_transfer_encoding_gets_501() -> None:
    async with running_server(echo_info) as (_, port):
        client = await RawClient.connect(port)
        await client.send(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n")
        resp = await client.read_response()
        assert resp.status == 501 and resp.json()["error"]["code"] == "not_implemented"
        assert await client.closed_by_peer()
        await client.aclose()


async def test_malformed_chunked_body_gets_400_and_close() -> None:
    async with running_server(echo_info) as (_, port):
        client = await RawClient.connect(port)
        await client.send(b"POST /body HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
        resp = await client.read_response()
        assert resp.status == 400 and resp.json()["error"]["code"] == "bad_request"
        assert resp.header(b"connection") == b"close"
        await client.aclose()


async def test_connect_method_is_refused() -> None:
    async with running_server(echo_info) as (_, port):
        client = await RawClient.connect(port)
        await client.send(b"CONNECT example.org:443 HTTP/1.1\r\nHost: example.org:443\r\n\r\n")
        resp = await client.read_response()
        assert resp.status == 405 and resp.json()["error"]["code"] == "method_not_allowed"
        await client.aclose()


async def test_absolute_form_target_yields_the_origin_path() -> None:
    async with running_server(echo_info) as (_, port):
        client = await RawClient.connect(port)
        await client.send(b"GET http://127.0.0.1/a/b?c=d HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert (await client.read_response()).json()["path"] == "/a/b"
        await client.aclose()


async def test_http10_request_is_answered_then_closed() -> None:
    async with running_server(echo_info) as (_, port):
        client = await RawClient.connect(port)
        await client.send(b"GET /old HTTP/1.0\r\n\r\n")
        resp = await client.read_response()
        assert resp.status == 200 and resp.header(b"connection") == b"close"
        assert await client.closed_by_peer()
        await client.aclose()


async def test_client_connection_close_is_honoured() -> None:
    async with running_server(echo_info) as (_, port):
        client = await RawClient.connect(port)
        await client.send(get("/", b"Connection: close\r\n"))
        resp = await client.read_response()
        assert resp.status == 200 and resp.header(b"connection") == b"close"
        assert await client.closed_by_peer()
        await client.aclose()


async def test_handler_exception_gives_500_json_without_traceback(caplog: pytest.LogCaptureFixture) -> None:
    async def boom(request: Request) -> Response:
        raise RuntimeError("secret-detail-xyz")

    with caplog.at_level(logging.ERROR, logger="qpher.http"):
        async with running_server(boom) as (_, port):
            client = await RawClient.connect(port)
            await client.send(get("/"))
            resp = await client.read_response()
            await client.send(get("/again"))  # the connection survives a handler error
            assert (await client.read_response()).status == 500
            await client.aclose()
    assert resp.status == 500
    assert resp.json()["error"]["code"] == "internal_error"
    assert resp.json()["error"]["message"] == "internal server error"
    assert b"secret" not in resp.body and b"Traceback" not in resp.body
    rid = resp.header(b"x-request-id").decode()
    records = [r for r in caplog.records if r.name == "qpher.http" and r.levelno == logging.ERROR]
    assert records and records[0].exc_info is not None
    assert records[0].fields["request_id"] == rid  # type: ignore[attr-defined]


async def test_qpher_error_from_handler_keeps_its_status_and_code() -> None:
    async def bad(request: Request) -> Response:
        raise InvalidInput("field 'x' must be base64")

    async with running_server(bad) as (_, port):
        client = await RawClient.connect(port)
        await client.send(get("/"))
        resp = await client.read_response()
        assert resp.status == 400
        assert resp.json()["error"] == {
            "code": "invalid_input",
            "message": "field 'x' must be base64",
            "request_id": resp.header(b"x-request-id").decode(),
        }
        await client.aclose()


async def test_handler_header_injection_is_refused_with_500(caplog: pytest.LogCaptureFixture) -> None:
    async def inject(request: Request) -> Response:
        return Response(200, [(b"x-evil", b"a\r\nSet-Cookie: pwned=1")], b"ok")

    with caplog.at_level(logging.ERROR, logger="qpher.http"):
        async with running_server(inject) as (_, port):
            client = await RawClient.connect(port)
            await client.send(get("/"))
            resp = await client.read_response()
            await client.aclose()
    assert resp.status == 500
    assert resp.header(b"set-cookie") is None and resp.header(b"x-evil") is None


async def test_handler_framing_headers_are_replaced_by_ours() -> None:
    async def lying(request: Request) -> Response:
        return Response(
            200,
            [(b"content-length", b"999"), (b"transfer-encoding", b"chunked"), (b"connection", b"upgrade")],
            b"four",
        )

    async with running_server(lying) as (_, port):
        client = await RawClient.connect(port)
        await client.send(get("/") + get("/"))
        for _ in range(2):
            resp = await client.read_response()
            assert resp.body == b"four" and resp.header(b"content-length") == b"4"
            assert resp.header(b"transfer-encoding") is None and resp.header(b"connection") is None
        await client.aclose()


async def test_max_requests_per_connection_closes_after_the_last() -> None:
    async with running_server(echo_info, limits=HTTPLimits(max_requests_per_connection=2)) as (_, port):
        client = await RawClient.connect(port)
        await client.send(get("/1"))
        assert (await client.read_response()).header(b"connection") is None
        await client.send(get("/2"))
        assert (await client.read_response()).header(b"connection") == b"close"
        assert await client.closed_by_peer()
        await client.aclose()


async def test_serve_connection_over_memory_streams() -> None:
    """Works over any trio Stream, not only sockets."""
    client, server = trio.testing.memory_stream_pair()

    async def handler(request: Request) -> Response:
        body = await request.read_body()
        return Response(200, [(b"content-type", b"text/plain")], hashlib.sha256(body).hexdigest().encode())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_connection, server, handler)
        await client.send_all(b"POST / HTTP/1.1\r\nHost: m\r\nContent-Length: 3\r\n\r\nabc")
        raw = b""
        while not raw.endswith(hashlib.sha256(b"abc").hexdigest().encode()):
            raw += await client.receive_some()
        assert raw.startswith(b"HTTP/1.1 200 OK\r\n")
        await client.aclose()


class _FailingTransport(trio.abc.Stream):
    """Like a TLSStream whose handshake fails inside the first receive."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
        self.closed = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        raise self.exc

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        raise AssertionError("nothing must be sent on a failed handshake")

    async def wait_send_all_might_not_block(self) -> None:
        pass

    async def aclose(self) -> None:
        self.closed = True
        await trio.lowlevel.checkpoint()


@pytest.mark.parametrize(
    "exc",
    [
        trio.BrokenResourceError("tls handshake failed"),
        QpherError("handshake failed", code="tls_handshake_failed", status=400),
        ConnectionResetError(),
    ],
)
async def test_transport_failure_on_first_receive_closes_quietly(
    exc: BaseException, caplog: pytest.LogCaptureFixture
) -> None:
    stream = _FailingTransport(exc)
    with caplog.at_level(logging.WARNING, logger="qpher.http"):
        await serve_connection(stream, echo_info, client_addr="192.0.2.1")
    assert stream.closed
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
