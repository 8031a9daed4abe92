"""HTTP/2 towards clients: the same handler per stream, flow control both ways, trailers, gRPC
refusals, header hygiene, graceful shutdown and idle close -- over real TLS on 127.0.0.1."""

from __future__ import annotations

import json
import ssl
from typing import Any

import pytest
import trio
from _h2_helpers import H2Client, RawH2, connect_tls, goaway_of, running_h2_server
from _http_helpers import make_pki
from h2.errors import ErrorCodes
from hyperframe.frame import DataFrame, HeadersFrame

from qpher_proxy.errors import PolicyDenied, RateLimited, Unauthenticated, UpstreamUnavailable
from qpher_proxy.http import HTTPLimits, Request, Response, error_response
from qpher_proxy.tls.certs import DevPKI

pytestmark = pytest.mark.filterwarnings("ignore::trio.TrioDeprecationWarning")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPKI:
    return make_pki(tmp_path_factory.mktemp("pki") / "certs")


async def app(request: Request) -> Response:
    """Reports what it saw; a few paths exercise bodies, streams, trailers and refusals."""
    if request.path == "/api":
        body = await request.read_body()  # the server's max_body_bytes, as the crypto API
        return Response.json(200, {"len": len(body)})
    if request.path == "/echo":
        body = await request.read_body(max_bytes=10_000_000)
        return Response(200, [(b"content-type", b"application/octet-stream")], body)
    if request.path == "/stream":
        async def chunks() -> Any:
            for i in range(3):
                yield b"chunk%d;" % i
        return Response(200, [(b"content-type", b"application/grpc")], chunks(),
                        trailers=lambda: [(b"grpc-status", b"0"), (b"grpc-message", b"ok")])
    if request.path == "/big":
        return Response(200, (), b"x" * 300_000)
    if request.path.startswith("/refuse/"):
        error = {"unauth": Unauthenticated("no key"), "deny": PolicyDenied("r1", "denied"),
                 "limit": RateLimited("slow down", retry_after=1), "down": UpstreamUnavailable("down")}
        return error_response(error[request.path.rsplit("/", 1)[1]], request.request_id)
    if request.path == "/upstream-401":
        return Response(401, [(b"content-type", b"application/grpc"), (b"grpc-status", b"16")], b"",
                        forwarded=True)
    if request.path == "/slow":
        await trio.sleep(0.3)
    return Response.json(200, {
        "method": request.method, "path": request.path, "query": request.query, "target": request.target,
        "http_version": request.http_version,
        "headers": [[n.decode(), v.decode()] for n, v in request.headers],
        "alpn": request.tls.alpn if request.tls else None,
    })


async def test_a_stream_is_served_by_the_same_handler_with_the_same_request(pki: DevPKI) -> None:
    async with running_h2_server(app, pki) as (_, port, observed):
        client = await H2Client.connect(port, pki.ca_cert)
        sid = await client.request("GET", "/info?a=1", [(b"user-agent", b"t"), (b"x-api-key", b"k")])
        answer = await client.answer(sid)
        assert answer.status == 200
        seen = json.loads(answer.body)
        assert (seen["method"], seen["path"], seen["query"]) == ("GET", "/info", "a=1")
        assert seen["target"] == "/info?a=1"
        assert seen["http_version"] == "2" and seen["alpn"] == "h2"
        assert seen["headers"] == [["host", "localhost"], ["user-agent", "t"], ["x-api-key", "k"]]
        assert answer.header(b"x-request-id") and answer.header(b"cache-control") == b"no-store"
        assert answer.header(b"x-content-type-options") == b"nosniff"
        assert answer.header(b"content-length") == str(len(answer.body)).encode()
        assert observed.streams == 1
        await client.aclose()


async def test_bodies_larger_than_every_window_flow_both_ways(pki: DevPKI) -> None:
    async with running_h2_server(app, pki) as (_, port, _obs):
        client = await H2Client.connect(port, pki.ca_cert)
        body = bytes(range(256)) * 1200  # 300 KiB: more than the stream window of 64 KiB
        sids = [await client.request("POST", "/echo", body=body) for _ in range(2)]
        for sid in sids:
            answer = await client.answer(sid)
            assert answer.status == 200 and answer.body == body
        big = await client.answer(await client.request("GET", "/big"))
        assert len(big.body) == 300_000
        await client.aclose()


async def test_a_streamed_response_ends_with_its_trailers(pki: DevPKI) -> None:
    async with running_h2_server(app, pki) as (_, port, _obs):
        client = await H2Client.connect(port, pki.ca_cert)
        answer = await client.answer(await client.request("POST", "/stream", body=b""))
        assert answer.body == b"chunk0;chunk1;chunk2;"
        assert answer.trailers == [(b"grpc-status", b"0"), (b"grpc-message", b"ok")]
        await client.aclose()


@pytest.mark.parametrize(("which", "grpc_status", "message"), [
    ("unauth", b"16", b"unauthenticated"), ("deny", b"7", b"policy_denied"),
    ("limit", b"8", b"rate_limited"), ("down", b"14", b"upstream_unavailable"),
])
async def test_a_refused_grpc_call_gets_a_trailers_only_grpc_answer(
    pki: DevPKI, which: str, grpc_status: bytes, message: bytes
) -> None:
    async with running_h2_server(app, pki) as (_, port, _obs):
        client = await H2Client.connect(port, pki.ca_cert)
        grpc = [(b"content-type", b"application/grpc+proto"), (b"te", b"trailers")]
        sid = await client.request("POST", f"/refuse/{which}", grpc, body=b"\0\0\0\0\0")
        answer = await client.answer(sid)
        assert answer.status == 200 and answer.body == b"" and answer.trailers == []
        assert (answer.header(b"grpc-status"), answer.header(b"grpc-message")) == (grpc_status, message)
        assert answer.header(b"content-type") == b"application/grpc"
        # the same refusal to a non-gRPC client stays HTTP
        plain = await client.answer(await client.request("GET", f"/refuse/{which}"))
        assert plain.status >= 400 and json.loads(plain.body)["error"]["code"] == message.decode()
        await client.aclose()


async def test_a_forwarded_upstream_answer_to_a_grpc_call_passes_as_it_is(pki: DevPKI) -> None:
    async with running_h2_server(app, pki) as (_, port, _obs):
        client = await H2Client.connect(port, pki.ca_cert)
        answer = await client.answer(await client.request(
            "POST", "/upstream-401", [(b"content-type", b"application/grpc")], body=b""))
        assert answer.status == 401 and answer.header(b"grpc-status") == b"16"
        await client.aclose()


@pytest.mark.parametrize("field", [
    (b"connection", b"keep-alive"), (b"keep-alive", b"5"), (b"proxy-connection", b"x"),
    (b"transfer-encoding", b"chunked"), (b"upgrade", b"websocket"), (b"te", b"gzip"),
])
async def test_a_connection_specific_field_is_a_stream_error_and_the_connection_goes_on(
    pki: DevPKI, field: tuple[bytes, bytes]
) -> None:
    async with running_h2_server(app, pki) as (_, port, _obs):
        client = await H2Client.connect(port, pki.ca_cert)
        client.h.config.validate_outbound_headers = False  # send what a careless client would
        client.h.config.normalize_outbound_headers = False
        bad = await client.answer(await client.request("GET", "/info", [field]))
        assert bad.reset == ErrorCodes.PROTOCOL_ERROR
        good = await client.answer(await client.request("GET", "/info", [(b"te", b"trailers")]))
        assert good.status == 200
        await client.aclose()


async def test_tls12_client_offering_h2_gets_http11(pki: DevPKI) -> None:
    async with running_h2_server(app, pki) as (_, port, _obs):
        stream = await connect_tls(port, pki.ca_cert, ("h2", "http/1.1"), ssl.TLSVersion.TLSv1_2)
        assert stream.selected_alpn_protocol() == "http/1.1"
        await stream.send_all(b"GET /info HTTP/1.1\r\nhost: x\r\n\r\n")
        head = await stream.receive_some(65536)
        assert head.startswith(b"HTTP/1.1 200")
        await trio.aclose_forcefully(stream)
        stream13 = await connect_tls(port, pki.ca_cert, ("h2", "http/1.1"))
        assert stream13.selected_alpn_protocol() == "h2"
        await trio.aclose_forcefully(stream13)


async def test_graceful_shutdown_lets_the_stream_in_flight_finish_after_goaway(pki: DevPKI) -> None:
    # raw frames: python-hyper's client stops reading at the first GOAWAY, real clients do not
    async with running_h2_server(app, pki) as (server, port, observed):
        raw = await RawH2.connect(port, pki.ca_cert)
        await raw.send(HeadersFrame(1, raw.headers_block("/slow"), flags=["END_HEADERS", "END_STREAM"]))
        await trio.sleep(0.1)
        server.shutdown()
        frames = await raw.frames(until=DataFrame)
        goaway = goaway_of(frames)
        assert goaway is not None and (goaway.error_code, goaway.last_stream_id) == (0, 1)
        while "END_STREAM" not in frames[-1].flags:
            frames += await raw.frames(until=DataFrame)
        body = b"".join(f.data for f in frames if isinstance(f, DataFrame) and f.stream_id == 1)
        assert b'"path":"/slow"' in body
        assert ("NO_ERROR", "shutdown") in observed.goaways
        await raw.aclose()


async def test_an_idle_connection_is_closed_with_goaway(pki: DevPKI) -> None:
    limits = HTTPLimits(idle_timeout=0.3)
    async with running_h2_server(app, pki, limits=limits) as (_, port, observed):
        client = await H2Client.connect(port, pki.ca_cert)
        await client.answer(await client.request("GET", "/info"))
        with trio.fail_after(5):
            while client.goaway is None:
                try:
                    await client.pump()
                except EOFError:
                    break
        assert client.goaway is not None and client.goaway.error_code == ErrorCodes.NO_ERROR
        assert ("NO_ERROR", "idle") in observed.goaways
        await client.aclose()


async def test_a_body_over_max_body_bytes_gets_413_and_the_connection_goes_on(pki: DevPKI) -> None:
    async with running_h2_server(app, pki, limits=HTTPLimits(max_body_bytes=1000)) as (_, port, _obs):
        client = await H2Client.connect(port, pki.ca_cert)
        too_big = await client.answer(await client.request("POST", "/api", body=b"x" * 100_000))
        assert too_big.status == 413 and json.loads(too_big.body)["error"]["code"] == "body_too_large"
        declared = await client.answer(await client.request(
            "POST", "/api", [(b"content-length", b"5000")], body=b"y" * 5000))
        assert declared.status == 413
        fits = await client.answer(await client.request("POST", "/api", body=b"z" * 1000))
        assert fits.status == 200 and json.loads(fits.body) == {"len": 1000}
        await client.aclose()
