"""Each limit, exercised by sending the offending input over real TCP: 431, 413, slowloris
header timeout, idle keep-alive timeout, body timeout. Timeouts run on trio's autojump clock
(no real sleeping)."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from _http_helpers import RawClient, echo_info, get, running_server

from qpher_proxy.http import HTTPLimits, Request, Response


async def test_header_block_over_the_limit_in_pieces_gets_431() -> None:
    limits = HTTPLimits(max_header_bytes=4096)
    async with running_server(echo_info, limits=limits) as (_, port):
        client = await RawClient.connect(port)
        await client.send(b"GET / HTTP/1.1\r\nHost: x\r\n")
        for i in range(10):  # an endless header block, 1 KiB at a time
            await client.send(b"X-Fill-%d: %s\r\n" % (i, b"a" * 1024))
        resp = await client.read_response()
        assert resp.status == 431
        assert resp.json()["error"]["code"] == "header_too_large"
        assert resp.header(b"x-request-id") is not None
        assert resp.header(b"connection") == b"close"
        assert await client.closed_by_peer()
        await client.aclose()


async def test_complete_header_block_over_the_limit_in_one_write_gets_431() -> None:
    """h11 only bounds incomplete heads; a whole over-sized head must be caught too."""
    limits = HTTPLimits(max_header_bytes=4096)
    async with running_server(echo_info, limits=limits) as (_, port):
        client = await RawClient.connect(port)
        await client.send(get("/", b"X-Big: " + b"b" * 6000 + b"\r\n"))
        resp = await client.read_response()
        assert resp.status == 431 and resp.json()["error"]["code"] == "header_too_large"
        assert await client.closed_by_peer()
        await client.aclose()


async def test_header_block_just_under_the_limit_is_served() -> None:
    limits = HTTPLimits(max_header_bytes=4096)
    async with running_server(echo_info, limits=limits) as (_, port):
        client = await RawClient.connect(port)
        await client.send(get("/", b"X-Big: " + b"b" * 3900 + b"\r\n"))
        assert (await client.read_response()).status == 200
        await client.aclose()


async def test_declared_body_over_the_limit_gets_413_before_the_body_is_sent() -> None:
    limits = HTTPLimits(max_body_bytes=1000)
    async with running_server(echo_info, limits=limits) as (_, port):
        client = await RawClient.connect(port)
        await client.send(
            b"POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n"
        )
        resp = await client.read_response()
        assert resp.status == 413  # and no "100 Continue" before it
        assert resp.json()["error"]["code"] == "body_too_large"
        assert resp.header(b"connection") == b"close"
        assert await client.closed_by_peer()
        await client.aclose()


async def test_declared_body_over_the_limit_with_body_already_sent_gets_413() -> None:
    limits = HTTPLimits(max_body_bytes=1000)
    async with running_server(echo_info, limits=limits) as (_, port):
        client = await RawClient.connect(port)
        await client.send(b"POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 3000\r\n\r\n" + b"z" * 3000)
        resp = await client.read_response()  # not lost to a RST: the server lingers
        assert resp.status == 413 and resp.json()["error"]["code"] == "body_too_large"
        await client.aclose()


async def test_chunked_body_growing_past_the_limit_gets_413() -> None:
    limits = HTTPLimits(max_body_bytes=1000)
    async with running_server(echo_info, limits=limits) as (_, port):
        client = await RawClient.connect(port)
        await client.send(b"POST /body HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(3):
            await client.send(b"190\r\n" + b"c" * 400 + b"\r\n")  # 3 x 400 > 1000
        resp = await client.read_response()
        assert resp.status == 413 and resp.json()["error"]["code"] == "body_too_large"
        assert resp.header(b"connection") == b"close"
        await client.aclose()


async def test_body_exactly_at_the_limit_is_accepted() -> None:
    limits = HTTPLimits(max_body_bytes=1000)
    async with running_server(echo_info, limits=limits) as (_, port):
        client = await RawClient.connect(port)
        await client.send(b"POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"k" * 1000)
        assert (await client.read_response()).json()["len"] == 1000
        await client.aclose()


async def test_handler_may_allow_a_larger_body_explicitly() -> None:
    async def big(request: Request) -> Response:
        return Response.json(200, {"len": len(await request.read_body(max_bytes=5000))})

    async with running_server(big, limits=HTTPLimits(max_body_bytes=1000)) as (_, port):
        client = await RawClient.connect(port)
        await client.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4000\r\n\r\n" + b"k" * 4000)
        assert (await client.read_response()).json()["len"] == 4000
        await client.aclose()


async def test_slowloris_trickling_headers_is_closed_at_header_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limits = HTTPLimits(header_timeout=10.0)
    async with running_server(echo_info, limits=limits) as (_, port):
        client = await RawClient.connect(port)
        start = trio.current_time()
        await client.send(b"GET / HTTP/1.1\r\nHost: x\r\n")
        with trio.move_on_after(30):
            for i in range(100):  # one header line every 2 s, never finishing the head
                await trio.sleep(2)
                try:
                    await client.send(b"X-Slow-%d: 1\r\n" % i)
                except trio.BrokenResourceError:
                    break
        assert await client.closed_by_peer()  # closed without any response
        assert 10.0 <= trio.current_time() - start <= 12.5
        await client.aclose()


async def test_connection_that_never_sends_is_closed_at_header_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running_server(echo_info, limits=HTTPLimits(header_timeout=10.0)) as (_, port):
        client = await RawClient.connect(port)
        start = trio.current_time()
        assert await client.closed_by_peer()
        assert 10.0 <= trio.current_time() - start <= 11.5
        await client.aclose()


async def test_idle_keep_alive_connection_is_closed_at_idle_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limits = HTTPLimits(idle_timeout=30.0, header_timeout=5.0)
    async with running_server(echo_info, limits=limits) as (_, port):
        client = await RawClient.connect(port)
        await client.send(get("/1"))
        assert (await client.read_response()).status == 200
        # 20 s idle (longer than header_timeout, shorter than idle_timeout) is fine
        await trio.sleep(20)
        await client.send(get("/2"))
        assert (await client.read_response()).status == 200
        start = trio.current_time()
        assert await client.closed_by_peer()
        assert 30.0 <= trio.current_time() - start <= 33.5
        await client.aclose()


async def test_stalled_body_is_closed_at_body_timeout(autojump_clock: trio.testing.MockClock) -> None:
    limits = HTTPLimits(body_timeout=15.0)
    logged: list[tuple[str, int]] = []

    def on_done(request: Request, status: int, duration: float, sent: int) -> None:
        logged.append((request.path, status))

    async with running_server(echo_info, limits=limits, on_request_done=on_done) as (_, port):
        client = await RawClient.connect(port)
        await client.send(b"POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly-a-bit")
        start = trio.current_time()
        assert await client.closed_by_peer()
        assert 15.0 <= trio.current_time() - start <= 17.5
        await client.aclose()
    assert logged == [("/body", 408)]  # the access log still sees the request that timed out


def test_limits_reject_nonsense() -> None:
    with pytest.raises(ValueError, match="max_body_bytes"):
        HTTPLimits(max_body_bytes=0)
    with pytest.raises(ValueError, match="idle_timeout"):
        HTTPLimits(idle_timeout=0)
    with pytest.raises(ValueError, match="max_requests_per_connection"):
        HTTPLimits(max_requests_per_connection=0)
