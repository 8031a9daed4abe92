"""Memory of connections: an idle keep-alive connection holds no request, a closed one is freed
by reference counting at once (no cycle waiting for the GC), and after a wave of closed
connections the server hands the heap's free pages back to the OS."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
import trio
import trio.testing

from qpher_proxy.http import Request, Response, SecurityHeaders, _memory, serve_connection
from qpher_proxy.http._connection import Connection


@pytest.fixture
def no_automatic_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


async def _ok(request: Request) -> Response:
    await request.read_body()
    return Response(200, ((b"content-type", b"text/plain"),), b"ok")


def _alive(kind: type) -> list[object]:
    return [o for o in gc.get_objects() if type(o) is kind]


async def test_an_idle_connection_holds_no_request_and_a_closed_one_no_cycle(no_automatic_gc: None) -> None:
    # other tests of this process may keep connections and requests of their own alive
    before = {id(o) for o in gc.get_objects() if type(o) in (Connection, Request)}
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: serve_connection(server, _ok, security_headers=SecurityHeaders()))
        await client.send_all(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
        received = b""
        while not received.endswith(b"ok"):
            received += await client.receive_some(65536)
        await trio.testing.wait_all_tasks_blocked()
        # idle, waiting for the next request: the served connection keeps no Request
        connections = [c for c in _alive(Connection) if id(c) not in before and isinstance(c, Connection)]
        assert len(connections) == 1
        assert connections[0]._request is None
        assert [r for r in _alive(Request) if id(r) not in before] == []
        await client.aclose()
    del connections
    gc.set_debug(gc.DEBUG_SAVEALL)
    gc.collect()
    leaked = {type(o).__name__ for o in gc.garbage} & {"Connection", "Request", "ConnectionState"}
    assert leaked == set(), "a closed connection was left in a reference cycle"


async def test_the_heap_is_trimmed_once_a_wave_of_closes_is_over(
    autojump_clock: trio.testing.MockClock,
) -> None:
    trims: list[int] = []
    active = [8]
    releaser = _memory.MemoryReleaser(lambda: active[0], after_closes=4, min_interval=10.0,
                                      trim=lambda: trims.append(1) or True)  # runs in a worker thread
    async with trio.open_nursery() as nursery:
        for n in range(1, 9):
            releaser.opened(n)  # a peak of 8
        for n in (7, 6, 5):
            active[0] = n
            releaser.closed(n, nursery)
        await trio.testing.wait_all_tasks_blocked()
        assert trims == []  # three closes: not yet
        active[0] = 4
        releaser.closed(4, nursery)  # the fourth, and half the peak: a trim now
        while releaser.trims < 1:
            await trio.sleep(0.01)
        assert len(trims) == 1
        first = trio.current_time()
        # a second wave right after: one more trim, but only once min_interval has passed
        for n in range(5, 9):
            releaser.opened(n)
        for n in (3, 2, 1, 0):
            active[0] = n
            releaser.closed(n, nursery)
        while releaser.trims < 2:
            await trio.sleep(0.5)
        assert len(trims) == 2 and trio.current_time() - first >= 10.0 - 1e-9  # float sums on the fake clock


async def test_no_trim_while_the_connection_count_stays_high() -> None:
    trims: list[int] = []
    releaser = _memory.MemoryReleaser(lambda: 10, after_closes=2, min_interval=0.0,
                                      trim=lambda: trims.append(1) or True)
    async with trio.open_nursery() as nursery:
        releaser.opened(10)
        for _ in range(20):  # connections come and go around 9-10 active: nothing to give back
            releaser.closed(9, nursery)
            releaser.opened(10)
        await trio.testing.wait_all_tasks_blocked()
    assert trims == []


def test_malloc_trim_runs_on_this_machine() -> None:
    assert _memory.malloc_trim() is True  # glibc, as on every machine this product supports


def test_the_heap_is_tuned_for_large_buffers_on_this_machine() -> None:
    assert _memory.tune_heap() is True  # glibc's mallopt took both thresholds
