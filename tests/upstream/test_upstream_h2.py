"""The HTTP/2 upstream client against a real gRPC server (grpcio) on h2c and on h2 over TLS: the
four kinds of call at the frame level, trailers, many streams on one connection, flow control,
502 and 504, a stream reset mid-body and a graceful GOAWAY; and a hand-written h2 server for
what grpcio will not do on request."""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator, Iterator
from functools import partial
from pathlib import Path

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest
import trio
import trustme
from _grpc_echo import SERVICE, EchoServer, echo_server, frame, unframe

from qpher_proxy.config import config_from_dict
from qpher_proxy.errors import BadRequest, ConfigError, UpstreamTimeout, UpstreamUnavailable
from qpher_proxy.upstream import H2UpstreamClient, H2UpstreamResponse, prepare_upstream_headers

GRPC_HEADERS = [(b"content-type", b"application/grpc"), (b"te", b"trailers")]


@pytest.fixture
def h2c() -> Iterator[EchoServer]:
    with echo_server() as server:
        yield server


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def path(method: str) -> str:
    return f"/{SERVICE}/{method}"


async def read_all(resp: H2UpstreamResponse) -> bytes:
    return b"".join([chunk async for chunk in resp.body_chunks()])


def grpc_status(resp: H2UpstreamResponse) -> bytes | None:
    return dict(resp.trailers()).get(b"grpc-status")


async def call(client: H2UpstreamClient, method: str, body: bytes | AsyncIterator[bytes]) -> tuple[
        H2UpstreamResponse, list[bytes]]:
    async with client.request("POST", path(method), GRPC_HEADERS, body=body) as resp:
        messages = unframe(await read_all(resp))
    return resp, messages


async def test_unary_call_over_h2c_returns_the_message_and_grpc_status_0_in_trailers(h2c: EchoServer) -> None:
    async with H2UpstreamClient(f"http://127.0.0.1:{h2c.port}", protocol="h2c") as client:
        resp, messages = await call(client, "Unary", frame(b"hello"))
    assert resp.status == 200
    assert dict(resp.headers)[b"content-type"] == b"application/grpc"
    assert not any(n.startswith(b":") for n, _ in resp.headers)
    assert messages == [b"echo:hello"]
    assert grpc_status(resp) == b"0"


async def test_server_streaming_call_yields_every_message(h2c: EchoServer) -> None:
    async with H2UpstreamClient(f"http://127.0.0.1:{h2c.port}", protocol="h2c") as client:
        resp, messages = await call(client, "ServerStream", frame(b"5"))
    assert messages == [b"part-%d" % i for i in range(5)]
    assert grpc_status(resp) == b"0"


async def test_client_streaming_call_reads_a_streamed_body_until_it_ends(h2c: EchoServer) -> None:
    async def body() -> AsyncIterator[bytes]:
        for word in (b"a", b"b", b"c"):
            await trio.sleep(0.01)
            yield frame(word)

    async with H2UpstreamClient(f"http://127.0.0.1:{h2c.port}", protocol="h2c") as client:
        resp, messages = await call(client, "ClientStream", body())
    assert messages == [b"a+b+c"]
    assert grpc_status(resp) == b"0"


async def test_bidi_call_gets_each_answer_before_the_request_body_ends(h2c: EchoServer) -> None:
    send, receive = trio.open_memory_channel[bytes](1)

    async def body() -> AsyncIterator[bytes]:
        async with receive:
            async for message in receive:
                yield frame(message)

    async with H2UpstreamClient(f"http://127.0.0.1:{h2c.port}", protocol="h2c") as client:
        await send.send(b"one")
        with trio.fail_after(5):
            async with client.request("POST", path("Bidi"), GRPC_HEADERS, body=body()) as resp:
                chunks = resp.body_chunks()
                assert unframe(await anext(chunks)) == [b"echo:one"]  # the request body is still open
                await send.send(b"two")
                assert unframe(await anext(chunks)) == [b"echo:two"]
                await send.aclose()
                assert await read_all(resp) == b""
    assert grpc_status(resp) == b"0"


async def test_grpc_error_status_passes_in_trailers(h2c: EchoServer) -> None:
    async with H2UpstreamClient(f"http://127.0.0.1:{h2c.port}", protocol="h2c") as client:
        resp, messages = await call(client, "Fail", frame(b""))
    assert resp.status == 200 and messages == []
    # grpcio answers trailers-only (one HEADERS frame): the status is handed on as trailers
    assert b"grpc-status" not in dict(resp.headers)
    status = dict(resp.trailers())
    assert status[b"grpc-status"] == b"9" and status[b"grpc-message"] == b"told to fail"


async def test_request_headers_reach_the_upstream_in_lower_case_without_connection_fields(
        h2c: EchoServer) -> None:
    headers = [(b"Content-Type", b"application/grpc"), (b"TE", b"trailers"), (b"X-Qpher-Tenant", b"acme"),
               (b"connection", b"keep-alive"), (b"keep-alive", b"5"), (b"host", b"app.internal")]
    async with H2UpstreamClient(f"http://127.0.0.1:{h2c.port}", protocol="h2c") as client:
        async with client.request("POST", path("Metadata"), headers, body=frame(b"")) as resp:
            (seen,) = unframe(await read_all(resp))
    pairs = dict(tuple(p) for p in json.loads(seen))
    assert pairs["x-qpher-tenant"] == "acme"
    assert ":authority" not in pairs and pairs.get("connection") is None and pairs.get("keep-alive") is None


async def test_concurrent_calls_share_one_connection(h2c: EchoServer) -> None:
    results: list[list[bytes]] = []
    async with H2UpstreamClient(f"http://127.0.0.1:{h2c.port}", protocol="h2c") as client:
        async def one(i: int) -> None:
            results.append((await call(client, "Unary", frame(b"%d" % i)))[1])

        async with trio.open_nursery() as nursery:
            for i in range(40):
                nursery.start_soon(one, i)
        assert client.connections_opened == 1
    assert sorted(m for r in results for m in r) == sorted(b"echo:%d" % i for i in range(40))


async def test_large_streamed_response_passes_through_small_windows(h2c: EchoServer) -> None:
    async with H2UpstreamClient(f"http://127.0.0.1:{h2c.port}", protocol="h2c", stream_window=65_535,
                                connection_window=65_535) as client:
        async with client.request("POST", path("BigStream"), GRPC_HEADERS, body=frame(b"64x65536")) as resp:
            size = 0
            async for chunk in resp.body_chunks():
                size += len(chunk)
                await trio.sleep(0)
    assert size == 64 * (65536 + 5)
    assert grpc_status(resp) == b"0"


async def test_large_request_body_waits_for_the_upstreams_window(h2c: EchoServer) -> None:
    big = b"x" * (3 * 1024 * 1024)
    async with H2UpstreamClient(f"http://127.0.0.1:{h2c.port}", protocol="h2c") as client:
        resp, messages = await call(client, "Unary", frame(big))
    assert messages == [b"echo:" + big]


async def test_unary_call_over_h2_with_tls_and_alpn(ca: trustme.CA, tmp_path: Path) -> None:
    cert = ca.issue_cert("127.0.0.1")
    creds = grpc.ssl_server_credentials([(cert.private_key_pem.bytes(), cert.cert_chain_pems[0].bytes())])
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    with echo_server(creds) as server:
        async with H2UpstreamClient(f"https://127.0.0.1:{server.port}", protocol="h2",
                                    ca_file=str(ca_file)) as client:
            resp, messages = await call(client, "Unary", frame(b"over tls"))
            _, streamed = await call(client, "ServerStream", frame(b"2"))
    assert messages == [b"echo:over tls"] and grpc_status(resp) == b"0"
    assert streamed == [b"part-0", b"part-1"]


async def test_h2_upstream_from_an_unknown_ca_is_unavailable(ca: trustme.CA, tmp_path: Path) -> None:
    cert = trustme.CA().issue_cert("127.0.0.1")
    creds = grpc.ssl_server_credentials([(cert.private_key_pem.bytes(), cert.cert_chain_pems[0].bytes())])
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    with echo_server(creds) as server:
        async with H2UpstreamClient(f"https://127.0.0.1:{server.port}", protocol="h2",
                                    ca_file=str(ca_file)) as client:
            with pytest.raises(UpstreamUnavailable, match="tls handshake"):
                await client.send("POST", path("Unary"), GRPC_HEADERS, body=frame(b""))


async def test_upstream_down_is_unavailable() -> None:
    with echo_server() as server:
        port = server.port
    async with H2UpstreamClient(f"http://127.0.0.1:{port}", protocol="h2c") as client:
        with pytest.raises(UpstreamUnavailable) as info:
            await client.send("POST", path("Unary"), GRPC_HEADERS, body=frame(b""))
    assert info.value.status == 502 and info.value.code == "upstream_unavailable"


async def test_slow_upstream_times_out(h2c: EchoServer) -> None:
    async with H2UpstreamClient(f"http://127.0.0.1:{h2c.port}", protocol="h2c", read_timeout=0.2) as client:
        with pytest.raises(UpstreamTimeout) as info:
            await client.send("POST", path("Slow"), GRPC_HEADERS, body=frame(b"1.0"))
        assert info.value.status == 504
        # the connection is still good for the next call
        _, messages = await call(client, "Unary", frame(b"after"))
    assert messages == [b"echo:after"]


async def test_graceful_goaway_lets_the_call_in_flight_finish() -> None:
    with echo_server() as server:
        async with H2UpstreamClient(f"http://127.0.0.1:{server.port}", protocol="h2c") as client:
            async def stop_soon() -> None:
                await trio.sleep(0.2)
                threading.Thread(target=server.server.stop, args=(5,)).start()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(stop_soon)
                resp, messages = await call(client, "Slow", frame(b"0.6"))
    assert messages == [b"slept"] and grpc_status(resp) == b"0"


def test_protocol_and_scheme_must_agree() -> None:
    with pytest.raises(ConfigError, match="h2c needs an http:// upstream.url"):
        H2UpstreamClient("https://127.0.0.1:1", protocol="h2c")
    with pytest.raises(ConfigError, match="h2 needs an https:// upstream.url"):
        H2UpstreamClient("http://127.0.0.1:1", protocol="h2")


async def test_a_header_h2_refuses_is_a_bad_request(h2c: EchoServer) -> None:
    async with H2UpstreamClient(f"http://127.0.0.1:{h2c.port}", protocol="h2c") as client:
        with pytest.raises(BadRequest):
            await client.send("POST", path("Unary"), [(b"x-bad", b"a\r\nb")], body=frame(b""))


# ---- a hand-written h2 server: a stream reset in the middle of a response ------------------

async def reset_mid_body(stream: trio.SocketStream) -> None:
    """Answer the first stream with headers and one DATA frame, then RST_STREAM(INTERNAL_ERROR)."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    conn.initiate_connection()
    await stream.send_all(conn.data_to_send())
    while True:
        data = await stream.receive_some(65536)
        if not data:
            return
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                sid = event.stream_id
                conn.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
                conn.send_data(sid, frame(b"first"))
                await stream.send_all(conn.data_to_send())
                await trio.sleep(0.05)
                conn.reset_stream(sid, h2.errors.ErrorCodes.INTERNAL_ERROR)
        await stream.send_all(conn.data_to_send())


async def test_stream_reset_mid_body_makes_the_body_iterator_raise() -> None:
    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(partial(trio.serve_tcp, reset_mid_body, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        async with H2UpstreamClient(f"http://127.0.0.1:{port}", protocol="h2c") as client:
            resp = await client.send("POST", path("Unary"), GRPC_HEADERS, body=frame(b"x"))
            chunks = resp.body_chunks()
            assert unframe(await anext(chunks)) == [b"first"]
            with pytest.raises(UpstreamUnavailable, match="reset the stream"):
                await anext(chunks)
            await resp.aclose()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("protocol, url, ok", [
    ("h2c", "http://127.0.0.1:50051", True), ("h2", "https://app.internal", True),
    ("http1", "https://app.internal", True), ("h2c", "https://app.internal", False),
    ("h2", "http://127.0.0.1:50051", False),
])
def test_config_refuses_a_protocol_that_does_not_fit_the_url_in_one_line(
        tmp_path: Path, protocol: str, url: str, ok: bool) -> None:
    data = {"upstream": {"url": url, "protocol": protocol}}
    if ok:
        assert config_from_dict(data, tmp_path, check_files=False).upstream.protocol == protocol
        return
    with pytest.raises(ConfigError) as info:
        config_from_dict(data, tmp_path, check_files=False)
    assert str(info.value).count("\n") == 0
    assert f"upstream.protocol: {protocol} needs an" in str(info.value)


def test_config_protocol_defaults_to_http1(tmp_path: Path) -> None:
    assert config_from_dict({}, tmp_path, check_files=False).upstream.protocol == "http1"


async def refuse_first_streams(stream: trio.SocketStream, accepted: list[str]) -> None:
    """The first connection: GOAWAY(last_stream_id 0) for its first request; later ones: the
    first request for /b reset with REFUSED_STREAM; anything else 200 with a body."""
    accepted.append("conn")
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    conn.initiate_connection()
    await stream.send_all(conn.data_to_send())
    nth_conn = len(accepted)
    paths: dict[int, bytes] = {}
    while True:
        data = await stream.receive_some(65536)
        if not data:
            return
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                paths[event.stream_id] = dict(event.headers)[b":path"]
            if isinstance(event, h2.events.StreamEnded):
                sid = event.stream_id
                if nth_conn == 1:
                    conn.close_connection(last_stream_id=0)
                    await stream.send_all(conn.data_to_send())
                    return
                if paths[sid] == b"/b" and "refused" not in accepted:
                    accepted.append("refused")
                    conn.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
                else:
                    conn.send_headers(sid, [(b":status", b"200")])
                    conn.send_data(sid, b"served", end_stream=True)
        await stream.send_all(conn.data_to_send())


async def test_streams_the_upstream_did_not_process_are_sent_once_more() -> None:
    accepted: list[str] = []
    async with trio.open_nursery() as nursery:
        handler = partial(refuse_first_streams, accepted=accepted)
        (listener,) = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        async with H2UpstreamClient(f"http://127.0.0.1:{port}", protocol="h2c") as client:
            async with client.request("POST", "/a", [], body=b"once") as resp:  # GOAWAY: a new connection
                assert await read_all(resp) == b"served"
            async with client.request("POST", "/b", [], body=b"twice") as resp:  # REFUSED_STREAM
                assert await read_all(resp) == b"served"
            assert client.connections_opened == 2 and "refused" in accepted
        nursery.cancel_scope.cancel()


async def test_a_refused_stream_whose_streamed_body_was_read_is_not_sent_again() -> None:
    accepted: list[str] = []

    async def body() -> AsyncIterator[bytes]:
        yield b"streamed"

    async with trio.open_nursery() as nursery:
        handler = partial(refuse_first_streams, accepted=accepted)
        (listener,) = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        async with H2UpstreamClient(f"http://127.0.0.1:{port}", protocol="h2c") as client:
            with pytest.raises(UpstreamUnavailable, match="before this stream was accepted"):
                await client.send("POST", "/a", [], body=body())
            assert client.connections_opened == 1
        nursery.cancel_scope.cancel()


async def test_a_failing_request_body_resets_the_stream_and_reaches_the_caller(h2c: EchoServer) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield frame(b"a")
        raise RuntimeError("the client went away")

    async with H2UpstreamClient(f"http://127.0.0.1:{h2c.port}", protocol="h2c") as client:
        with pytest.raises(RuntimeError, match="the client went away"):
            await client.send("POST", path("ClientStream"), GRPC_HEADERS, body=body())
        _, messages = await call(client, "Unary", frame(b"next"))  # the connection goes on
        assert messages == [b"echo:next"] and client.connections_opened == 1


async def drop_after_first_data(stream: trio.SocketStream) -> None:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    conn.initiate_connection()
    await stream.send_all(conn.data_to_send())
    while True:
        data = await stream.receive_some(65536)
        if not data:
            return
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                conn.send_headers(event.stream_id, [(b":status", b"200")])
                conn.send_data(event.stream_id, b"part")
                await stream.send_all(conn.data_to_send())
                return  # the connection closes mid-response
        await stream.send_all(conn.data_to_send())


async def test_a_connection_lost_mid_body_fails_its_streams_and_the_next_call_reconnects() -> None:
    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(partial(trio.serve_tcp, drop_after_first_data, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        async with H2UpstreamClient(f"http://127.0.0.1:{port}", protocol="h2c") as client:
            for _ in range(2):
                async with client.request("GET", "/", []) as resp:
                    chunks = resp.body_chunks()
                    assert await anext(chunks) == b"part"
                    with pytest.raises(UpstreamUnavailable):
                        await anext(chunks)
            assert client.connections_opened == 2
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("keep, sent, want", [
    (True, b"trailers", [(b"te", b"trailers")]), (True, b" Trailers ", [(b"te", b"trailers")]),
    (True, b"gzip", []), (True, b"trailers, gzip", []), (False, b"trailers", []),
])
def test_te_trailers_is_kept_only_for_an_h2_upstream(
        keep: bool, sent: bytes, want: list[tuple[bytes, bytes]]) -> None:
    client = [(b"TE", sent), (b"authorization", b"Bearer qph_k_s")]
    out = prepare_upstream_headers(client, client_ip="10.0.0.1", host=b"proxy", tenant_id="t",
                                   api_key_id="k", request_id="r", keep_te_trailers=keep)
    assert [(n, v) for n, v in out if n == b"te"] == want
    assert not any(n == b"authorization" for n, _ in out)
