"""100 MiB bodies through the sidecar client, up, down and both ways at once, in bounded memory.

Bodies are produced lazily (one 64 KiB block, repeated) so that any whole-body buffering in the
client would show up in tracemalloc's peak as ~100 MiB; the bound asserted is a few MiB.
"""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Iterator

import h11
import pytest
import trio
from _upstream_servers import BLOCK, H11Peer, Upstream, echo_body, keep_alive, lazy_body, serve_upstream

from qpher_proxy.upstream import DEFAULT_CHUNK_BYTES, UpstreamClient

MiB = 1024 * 1024
SIZE = 100 * MiB
PEAK_LIMIT = 8 * MiB  # traced Python allocations during the transfer (client and test upstream)


@pytest.fixture
def traced() -> Iterator[None]:
    tracemalloc.start()
    try:
        yield
    finally:
        tracemalloc.stop()


def peak_since_reset() -> int:
    return tracemalloc.get_traced_memory()[1]


async def test_100_mib_request_body_is_streamed_up(traced: None) -> None:
    produced = [0]
    stats = {"received": 0, "max_in_flight": 0}

    async def sink(peer: H11Peer, request: h11.Request, up: Upstream) -> None:
        def on_chunk(data: bytes) -> None:
            stats["received"] += len(data)
            # bytes the producer has handed over but the upstream has not yet seen: everything
            # the client (plus both kernels' socket buffers) holds at this moment
            stats["max_in_flight"] = max(stats["max_in_flight"], produced[0] - stats["received"])

        total = await peer.read_body(on_chunk)
        await peer.respond(200, json.dumps({"received": total}).encode())

    async with serve_upstream(keep_alive(sink)) as up, UpstreamClient(up.url) as client:
        tracemalloc.reset_peak()
        async with client.request("POST", "/upload", [], body=lazy_body(SIZE, produced)) as resp:
            body = b"".join([c async for c in resp.body_chunks()])
        peak = peak_since_reset()
    assert json.loads(body) == {"received": SIZE}
    assert stats["max_in_flight"] < 16 * MiB  # kernel socket buffers, not a 100 MiB copy
    assert peak < PEAK_LIMIT, f"peak traced memory {peak} bytes"


async def test_100_mib_response_body_is_streamed_down(traced: None) -> None:
    async def source(stream: trio.abc.Stream, up: Upstream) -> None:
        peer = H11Peer(stream)
        await peer.next_event()
        await peer.read_body()
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % SIZE)
        for _ in range(SIZE // len(BLOCK)):
            await stream.send_all(BLOCK)

    async with serve_upstream(source) as up, UpstreamClient(up.url) as client:
        tracemalloc.reset_peak()
        total, largest = 0, 0
        async with client.request("GET", "/download", []) as resp:
            assert resp.content_length == SIZE
            async for chunk in resp.body_chunks():
                total += len(chunk)
                largest = max(largest, len(chunk))
        peak = peak_since_reset()
    assert total == SIZE
    assert 0 < largest <= DEFAULT_CHUNK_BYTES
    assert peak < PEAK_LIMIT, f"peak traced memory {peak} bytes"


async def test_100_mib_echoed_both_ways_at_once(traced: None) -> None:
    # The upstream echoes each piece as it reads it: a client that wrote the whole request before
    # reading the response would deadlock here once both directions' socket buffers are full.
    async with serve_upstream(keep_alive(echo_body)) as up, UpstreamClient(up.url) as client:
        tracemalloc.reset_peak()
        total, largest, mismatches = 0, 0, 0
        async with client.request("PUT", "/echo", [], body=lazy_body(SIZE), content_length=SIZE) as resp:
            async for chunk in resp.body_chunks():
                # every echoed chunk must be the matching slice of the repeated block
                offset = total % len(BLOCK)
                expected = (BLOCK[offset:] + BLOCK)[: len(chunk)] if len(chunk) <= len(BLOCK) else None
                mismatches += chunk != expected
                total += len(chunk)
                largest = max(largest, len(chunk))
        peak = peak_since_reset()
        assert client.stats().idle == 1  # a clean full-duplex exchange keeps the connection
    assert total == SIZE and mismatches == 0
    assert 0 < largest <= DEFAULT_CHUNK_BYTES
    assert peak < PEAK_LIMIT, f"peak traced memory {peak} bytes"
