"""Streaming bodies both ways without buffering them whole (the sidecar's need)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator

import pytest
import trio
from _http_helpers import RawClient, get, running_server

from qpher_proxy.errors import QpherError
from qpher_proxy.http import HTTPLimits, Request, Response

MiB = 1024 * 1024
TOTAL = 20 * MiB


async def test_20_mib_echo_streams_in_bounded_chunks() -> None:
    seen_chunks: list[int] = []

    async def echo(request: Request) -> Response:
        async def stream() -> AsyncIterator[bytes]:
            async for chunk in request.body_chunks(max_bytes=64 * MiB):
                seen_chunks.append(len(chunk))
                yield chunk

        return Response(200, [(b"content-type", b"application/octet-stream")], stream())

    pattern = hashlib.sha256(b"seed").digest() * 8192  # 256 KiB of non-repeating-ish bytes
    sent_when_first_echo_arrived: list[int] = []

    async with running_server(echo, limits=HTTPLimits(max_body_bytes=MiB)) as (_, port):
        client = await RawClient.connect(port)
        sent = 0
        digest_out = hashlib.sha256()

        async def upload() -> None:
            nonlocal sent
            await client.send(b"PUT /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % TOTAL)
            while sent < TOTAL:
                await client.send(pattern)
                digest_out.update(pattern)
                sent += len(pattern)

        received = hashlib.sha256()
        got = 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(upload)
            # read the chunked response incrementally, as a streaming client would
            head = b""
            while b"\r\n\r\n" not in head:
                head += await client.stream.receive_some(65536)
            head, _, rest = head.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ") and b"transfer-encoding: chunked" in head.lower()
            client.buf = bytearray(rest)
            while True:
                size = int((await client._line()).split(b";")[0], 16)
                if size == 0:
                    assert await client._line() == b""
                    break
                if not sent_when_first_echo_arrived:
                    sent_when_first_echo_arrived.append(sent)
                received.update(await client._exactly(size))
                got += size
                assert await client._line() == b""
        assert got == TOTAL
        assert received.digest() == digest_out.digest()
        # streamed, not buffered: the echo began long before the upload ended ...
        assert sent_when_first_echo_arrived[0] < TOTAL // 2
        # ... in chunks of at most one receive
        assert max(seen_chunks) <= 64 * 1024
        assert sum(seen_chunks) == TOTAL
        # the connection is reusable afterwards
        await client.send(get("/echo", b"Content-Length: 2\r\n") + b"ok")
        assert (await client.read_response()).body == b"ok"
        await client.aclose()


async def test_streamed_response_with_declared_length_is_not_chunked() -> None:
    async def handler(request: Request) -> Response:
        async def parts() -> AsyncIterator[bytes]:
            for _ in range(4):
                yield b"abcd"

        return Response(200, [(b"content-length", b"16")], parts())

    async with running_server(handler) as (_, port):
        client = await RawClient.connect(port)
        await client.send(get("/"))
        resp = await client.read_response()
        assert resp.header(b"transfer-encoding") is None and resp.body == b"abcd" * 4
        await client.aclose()


async def test_streaming_body_over_the_limit_stops_the_stream() -> None:
    async def echo(request: Request) -> Response:
        async def stream() -> AsyncIterator[bytes]:
            async for chunk in request.body_chunks():
                yield chunk

        return Response(200, [], stream())

    async with running_server(echo, limits=HTTPLimits(max_body_bytes=1000)) as (_, port):
        client = await RawClient.connect(port)
        await client.send(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        await client.send(b"800\r\n" + b"q" * 2048 + b"\r\n")
        # headers went out already; the truncated chunked stream and the close say "failed"
        with pytest.raises(EOFError):
            await client.read_response()
        await client.aclose()


async def test_response_stream_failure_truncates_and_closes(caplog: pytest.LogCaptureFixture) -> None:
    closed = trio.Event()

    async def handler(request: Request) -> Response:
        async def parts() -> AsyncIterator[bytes]:
            try:
                yield b"first"
                raise RuntimeError("upstream died")
            finally:
                closed.set()

        return Response(200, [], parts())

    with caplog.at_level(logging.ERROR, logger="qpher.http"):
        async with running_server(handler) as (_, port):
            client = await RawClient.connect(port)
            await client.send(get("/"))
            with pytest.raises(EOFError):
                await client.read_response()
            await client.aclose()
    assert closed.is_set()
    assert any("response body stream failed" in r.getMessage() for r in caplog.records)


async def test_head_with_streaming_body_closes_the_iterator() -> None:
    closed = trio.Event()

    async def handler(request: Request) -> Response:
        async def parts() -> AsyncIterator[bytes]:
            try:
                yield b"never sent"
            finally:
                closed.set()

        gen = parts()
        await gen.__anext__()  # started, so that aclose runs its finally
        return Response(200, [], gen)

    async with running_server(handler) as (_, port):
        client = await RawClient.connect(port)
        await client.send(get("/", method=b"HEAD") + get("/x", method=b"HEAD"))
        for _ in range(2):
            assert (await client.read_response(head=True)).status == 200
        await client.aclose()
    assert closed.is_set()


async def test_client_disconnect_during_body_read_reaches_the_handler() -> None:
    outcome: list[str] = []

    async def handler(request: Request) -> Response:
        try:
            await request.read_body()
        except QpherError as exc:
            outcome.append(exc.code)
            raise
        return Response(200)

    async with running_server(handler) as (server, port):
        client = await RawClient.connect(port)
        await client.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\npartial")
        await trio.testing.wait_all_tasks_blocked()
        await client.aclose()
        for _ in range(100):
            if outcome:
                break
            await trio.testing.wait_all_tasks_blocked()
            await trio.sleep(0)
    assert outcome == ["client_disconnected"]


async def test_streaming_handler_gets_the_body_of_an_expect_100_request() -> None:
    async def echo(request: Request) -> Response:
        return Response(200, [], request.body_chunks())  # returns before reading anything

    async with running_server(echo) as (_, port):
        client = await RawClient.connect(port)
        await client.send(b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        assert (await client.read_response()).status == 100
        await client.send(b"hello")
        resp = await client.read_response()
        assert resp.status == 200 and resp.body == b"hello"
        assert resp.header(b"connection") is None
        await client.send(get("/again", b"Content-Length: 1\r\n") + b"!")
        assert (await client.read_response()).body == b"!"
        await client.aclose()
