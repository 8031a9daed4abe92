"""The response writer's fast path (a pre-built head, written without h11's writers) sends
byte for byte what h11's public send path sends, and leaves the connection in the same state:
the same exchanges are run through a real ``serve_connection`` twice, once with the fast path
and once with it switched off, with the request id and the date pinned."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from qpher_proxy.http import Request, Response, SecurityHeaders, _response, messages, serve_connection

JSON = (b"content-type", b"application/json")


async def _handler(request: Request) -> Response:
    if request.path == "/json":
        return Response.json(200, {"a": 1})
    if request.path == "/tuple":
        return Response(201, (JSON, (b"X-Extra", b"v 1")), b'{"made":true}')
    if request.path == "/list":
        return Response(200, [JSON], b"[]")
    if request.path == "/empty":
        return Response(200, (), b"")
    if request.path == "/with-id":
        return Response(200, ((b"x-request-id", b"handler-id"),), b"x")
    if request.path == "/bad":
        return Response(200, ((b"x-bad", b"a\r\nb"),), b"x")
    if request.path == "/nocontent":
        return Response(204, (), b"")
    if request.path == "/echo":
        return Response(200, (JSON,), await request.read_body())
    return Response.json(404, {"error": {"code": "not_found"}})


REQUESTS = [
    b"GET /json HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /tuple HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /tuple HTTP/1.1\r\nHost: x\r\n\r\n",  # the cached head
    b"GET /list HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /empty HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /with-id HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /nocontent HTTP/1.1\r\nHost: x\r\n\r\n",
    b"HEAD /json HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
    b"GET /missing HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /bad HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
]


async def _run(requests: bytes, security: SecurityHeaders) -> bytes:
    client, server = trio.testing.memory_stream_pair()
    received = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: serve_connection(server, _handler, security_headers=security))
        await client.send_all(requests)
        while True:
            data = await client.receive_some(65536)
            if not data:
                break
            received += data
        await client.aclose()
    return bytes(received)


def _pinned(monkeypatch: pytest.MonkeyPatch) -> None:
    counter = iter(range(10**6))
    monkeypatch.setattr(_response, "http_date", lambda: b"Wed, 02 Dec 2026 20:00:00 GMT")
    from qpher_proxy.http import _connection

    def rid() -> str:
        return f"{next(counter):032x}"

    monkeypatch.setattr(_connection, "new_request_id", rid)
    monkeypatch.setattr(_response, "new_request_id", rid)
    assert messages  # the ids come from the connection's new_request_id


@pytest.mark.parametrize("hsts", [None, 31536000])
@pytest.mark.parametrize("version", [b"1.1", b"1.0"])
async def test_fast_and_h11_paths_send_the_same_bytes(
    monkeypatch: pytest.MonkeyPatch, hsts: int | None, version: bytes
) -> None:
    requests = b"".join(r.replace(b"HTTP/1.1", b"HTTP/" + version, 1) for r in REQUESTS)
    _pinned(monkeypatch)
    fast = await _run(requests, SecurityHeaders(hsts_max_age=hsts))
    _pinned(monkeypatch)
    monkeypatch.setattr(_response, "_can_finish", lambda h: False)
    slow = await _run(requests, SecurityHeaders(hsts_max_age=hsts))
    assert fast == slow
    # and the exchange really ran: every keep-alive request was answered
    answered = fast.count(b"HTTP/1.1 ")
    assert answered == (len(REQUESTS) if version == b"1.1" else 1)


async def test_the_fast_path_is_taken_for_a_plain_json_response(monkeypatch: pytest.MonkeyPatch) -> None:
    taken: list[bool] = []
    real = _response._finish

    def spy(h: object, close: bool) -> None:
        taken.append(close)
        real(h, close)  # type: ignore[arg-type]

    monkeypatch.setattr(_response, "_finish", spy)
    out = await _run(b"GET /json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", SecurityHeaders())
    assert out.startswith(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncache-control: no-store\r\n")
    assert b"\r\nConnection: close\r\n\r\n" in out  # the client asked: h11's spelling
    assert taken == [True]
