"""Connection limits, many idle connections, and graceful shutdown, over real TCP."""

from __future__ import annotations

import resource

import pytest
import trio
import trio.testing
from _http_helpers import RawClient, echo_info, get, running_server

from qpher_proxy.http import HTTPLimits, HTTPServer, Request, Response


async def _wait_for(predicate: object, what: str) -> None:
    """Let the server's tasks run until ``predicate()`` holds (no sleeping)."""
    for _ in range(1000):
        if predicate():  # type: ignore[operator]
            return
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(0)
    raise AssertionError(f"never happened: {what}")


async def test_connections_over_max_connections_are_closed_at_once_without_harming_others() -> None:
    async with running_server(echo_info, limits=HTTPLimits(max_connections=2)) as (server, port):
        a = await RawClient.connect(port)
        b = await RawClient.connect(port)
        for c in (a, b):
            await c.send(get("/"))
            assert (await c.read_response()).status == 200
        extra = await RawClient.connect(port)  # the kernel accepts; the server closes it
        assert await extra.closed_by_peer()
        await extra.aclose()
        assert server.rejected_connections == 1
        for c in (a, b):  # the existing ones are untouched
            await c.send(get("/still"))
            assert (await c.read_response()).status == 200
        await a.aclose()
        await _wait_for(lambda: server.active_connections == 1, "the closed connection is released")
        again = await RawClient.connect(port)
        await again.send(get("/"))
        assert (await again.read_response()).status == 200
        for c in (b, again):
            await c.aclose()


@pytest.fixture
def many_fds() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048:
        if hard != resource.RLIM_INFINITY and hard < 2048:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below the 2048 this test needs")
        resource.setrlimit(resource.RLIMIT_NOFILE, (2048, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_500_idle_connections_do_not_stop_a_new_client(many_fds: None) -> None:
    async with running_server(echo_info, limits=HTTPLimits(max_connections=1000)) as (server, port):
        idle: list[RawClient] = []
        try:
            for i in range(500):
                client = await RawClient.connect(port)
                idle.append(client)
                if i % 2:  # half have been served once and sit in keep-alive
                    await client.send(get("/"))
                    assert (await client.read_response()).status == 200
            await _wait_for(lambda: server.active_connections == 500, "500 connections accepted")
            fresh = await RawClient.connect(port)
            await fresh.send(get("/fresh"))
            resp = await fresh.read_response()
            assert resp.status == 200 and resp.json()["path"] == "/fresh"
            await fresh.aclose()
            # and an old idle one still works
            await idle[1].send(get("/old"))
            assert (await idle[1].read_response()).json()["path"] == "/old"
        finally:
            for client in idle:
                await client.aclose()


async def test_graceful_shutdown_finishes_in_flight_closes_idle_refuses_new() -> None:
    release = trio.Event()
    entered = trio.Event()

    async def handler(request: Request) -> Response:
        if request.path == "/slow":
            entered.set()
            await release.wait()
        return Response.json(200, {"path": request.path})

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    server = HTTPServer(handler, shutdown_grace=30.0)
    served = trio.Event()

    async def run_server() -> None:
        await server.serve(listeners)
        served.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_server)
        await trio.testing.wait_all_tasks_blocked()
        busy = await RawClient.connect(port)
        idle = await RawClient.connect(port)
        await idle.send(get("/"))
        assert (await idle.read_response()).status == 200
        await busy.send(get("/slow"))
        await entered.wait()

        server.shutdown()
        assert await idle.closed_by_peer()  # idle keep-alive: closed at once
        with pytest.raises(OSError):  # listener closed: refused by the kernel
            await trio.open_tcp_stream("127.0.0.1", port)
        assert not served.is_set()

        release.set()  # the in-flight request completes, told to close
        resp = await busy.read_response()
        assert resp.status == 200 and resp.header(b"connection") == b"close"
        assert await busy.closed_by_peer()
        await served.wait()
        for c in (busy, idle):
            await c.aclose()


async def test_shutdown_grace_expiry_cancels_stuck_requests(autojump_clock: trio.testing.MockClock) -> None:
    async def stuck(request: Request) -> Response:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    server = HTTPServer(stuck, shutdown_grace=5.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, listeners)
        client = await RawClient.connect(port)
        await client.send(get("/"))
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        server.shutdown()
    # serve() returned (the nursery exited) once the grace period cut the handler off
    assert 5.0 <= trio.current_time() - start <= 6.5
    assert await client.closed_by_peer()
    await client.aclose()


async def test_connection_accepted_during_shutdown_and_partial_head_gets_close() -> None:
    """A request whose head is still arriving when shutdown begins is served with close."""
    async with running_server(echo_info) as (server, port):
        client = await RawClient.connect(port)
        await client.send(b"GET /late HTTP/1.1\r\n")
        await trio.testing.wait_all_tasks_blocked()
        server.shutdown()
        await client.send(b"Host: x\r\n\r\n")
        resp = await client.read_response()
        assert resp.status == 200 and resp.header(b"connection") == b"close"
        await client.aclose()
