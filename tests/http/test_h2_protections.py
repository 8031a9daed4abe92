"""Each HTTP/2 protection: the abusive frame pattern, sent as raw frames over real TLS, ends that
connection with the GOAWAY code RFC 9113 assigns, is counted, and a second connection is served."""

from __future__ import annotations

import pytest
import trio
from _h2_helpers import H2Client, RawH2, goaway_of, running_h2_server
from _http_helpers import make_pki
from h2.errors import ErrorCodes
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from qpher_proxy.http import HTTP2Limits, HTTPLimits, Request, Response
from qpher_proxy.tls.certs import DevPKI

LIMITS = HTTP2Limits(max_concurrent_streams=10, max_resets_per_window=50, max_control_frames_per_window=50,
                     max_continuation_frames=8, initial_window_size=65_535)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPKI:
    return make_pki(tmp_path_factory.mktemp("pki") / "certs")


async def app(request: Request) -> Response:
    if request.path == "/hold":
        await trio.sleep(30)
    if request.path == "/upload":
        await request.read_body(max_bytes=1 << 30)
    return Response(200, (), b"ok")


async def _second_connection_works(port: int, pki: DevPKI) -> None:
    client = await H2Client.connect(port, pki.ca_cert)
    answer = await client.answer(await client.request("GET", "/"))
    assert answer.status == 200 and answer.body == b"ok"
    await client.aclose()


async def _expect_goaway(raw: RawH2, code: ErrorCodes) -> None:
    goaway = goaway_of(await raw.frames())
    assert goaway is not None, "no GOAWAY"
    assert ErrorCodes(goaway.error_code) is code
    await raw.aclose()


def _get(raw: RawH2, sid: int, path: str = "/") -> HeadersFrame:
    return HeadersFrame(sid, raw.headers_block(path), flags=["END_HEADERS", "END_STREAM"])


async def test_rapid_reset_gets_enhance_your_calm_long_before_a_thousand_resets(pki: DevPKI) -> None:
    async with running_h2_server(app, pki, h2_limits=LIMITS) as (_, port, observed):
        raw = await RawH2.connect(port, pki.ca_cert)
        frames: list[HeadersFrame | RstStreamFrame] = []
        for i in range(200):  # open and cancel at once, CVE-2023-44487
            sid = 2 * i + 1
            frames += [_get(raw, sid, "/upload"), RstStreamFrame(sid, error_code=ErrorCodes.CANCEL)]
        try:
            await raw.send(*frames)
        except Exception:
            pass  # the server may have closed before the last frames
        await _expect_goaway(raw, ErrorCodes.ENHANCE_YOUR_CALM)
        assert ("ENHANCE_YOUR_CALM", "rapid_reset") in observed.goaways
        await _second_connection_works(port, pki)


async def test_ping_flood_gets_enhance_your_calm(pki: DevPKI) -> None:
    async with running_h2_server(app, pki, h2_limits=LIMITS) as (_, port, observed):
        raw = await RawH2.connect(port, pki.ca_cert)
        await raw.send(*[PingFrame(0, opaque_data=b"%08d" % i) for i in range(100)])
        await _expect_goaway(raw, ErrorCodes.ENHANCE_YOUR_CALM)
        assert ("ENHANCE_YOUR_CALM", "ping_flood") in observed.goaways
        await _second_connection_works(port, pki)


async def test_settings_flood_gets_enhance_your_calm(pki: DevPKI) -> None:
    async with running_h2_server(app, pki, h2_limits=LIMITS) as (_, port, observed):
        raw = await RawH2.connect(port, pki.ca_cert)
        await raw.send(*[SettingsFrame(0, settings={SettingsFrame.MAX_CONCURRENT_STREAMS: i})
                         for i in range(100)])
        await _expect_goaway(raw, ErrorCodes.ENHANCE_YOUR_CALM)
        assert ("ENHANCE_YOUR_CALM", "settings_flood") in observed.goaways
        await _second_connection_works(port, pki)


async def test_empty_data_frame_flood_gets_enhance_your_calm(pki: DevPKI) -> None:
    async with running_h2_server(app, pki, h2_limits=LIMITS) as (_, port, observed):
        raw = await RawH2.connect(port, pki.ca_cert)
        headers = HeadersFrame(1, raw.headers_block("/upload"), flags=["END_HEADERS"])
        await raw.send(headers, *[DataFrame(1, b"") for _ in range(100)])
        await _expect_goaway(raw, ErrorCodes.ENHANCE_YOUR_CALM)
        assert ("ENHANCE_YOUR_CALM", "empty_frame_flood") in observed.goaways
        await _second_connection_works(port, pki)


async def test_continuation_flood_gets_enhance_your_calm(pki: DevPKI) -> None:
    async with running_h2_server(app, pki, h2_limits=LIMITS) as (_, port, observed):
        raw = await RawH2.connect(port, pki.ca_cert)
        block = raw.headers_block("/")
        # a header block that never ends (CVE-2024-27316): HEADERS, then CONTINUATION after CONTINUATION
        frames = [HeadersFrame(1, block, flags=["END_STREAM"])]
        frames += [ContinuationFrame(1, raw.encoder.encode([(b"x-pad", b"a" * 100)])) for _ in range(20)]
        await raw.send(*frames)
        await _expect_goaway(raw, ErrorCodes.ENHANCE_YOUR_CALM)
        assert ("ENHANCE_YOUR_CALM", "continuation_flood") in observed.goaways
        await _second_connection_works(port, pki)


async def test_a_header_list_over_max_header_bytes_gets_enhance_your_calm(pki: DevPKI) -> None:
    limits = HTTPLimits(max_header_bytes=4096)
    async with running_h2_server(app, pki, limits=limits, h2_limits=LIMITS) as (_, port, observed):
        raw = await RawH2.connect(port, pki.ca_cert)
        # an HPACK bomb: one large indexed value, then many references to it
        big = (b"x-bomb", b"b" * 3000)
        pseudo = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/")]
        first = raw.encoder.encode([*pseudo, big])
        second = raw.encoder.encode([*pseudo, big, big])
        await raw.send(HeadersFrame(1, first, flags=["END_HEADERS", "END_STREAM"]),
                       HeadersFrame(3, second, flags=["END_HEADERS", "END_STREAM"]))
        await _expect_goaway(raw, ErrorCodes.ENHANCE_YOUR_CALM)
        assert ("ENHANCE_YOUR_CALM", "header_list_size") in observed.goaways
        await _second_connection_works(port, pki)


async def test_more_streams_than_max_concurrent_streams_is_a_protocol_error(pki: DevPKI) -> None:
    async with running_h2_server(app, pki, h2_limits=LIMITS) as (_, port, observed):
        raw = await RawH2.connect(port, pki.ca_cert)
        # streams that stay open (a body never sent) past the limit of 10
        await raw.send(*[HeadersFrame(2 * i + 1, raw.headers_block("/upload"), flags=["END_HEADERS"])
                         for i in range(12)])
        await _expect_goaway(raw, ErrorCodes.PROTOCOL_ERROR)
        assert ("PROTOCOL_ERROR", "too_many_streams") in observed.goaways
        await _second_connection_works(port, pki)


async def test_data_past_the_flow_control_window_is_a_flow_control_error(pki: DevPKI) -> None:
    async with running_h2_server(app, pki, h2_limits=LIMITS) as (_, port, observed):
        raw = await RawH2.connect(port, pki.ca_cert)
        headers = HeadersFrame(1, raw.headers_block("/hold"), flags=["END_HEADERS"])
        # 5 x 16 KiB = 80 KiB into a stream window of 64 KiB that nobody widened
        await raw.send(headers, *[DataFrame(1, b"d" * 16_384) for _ in range(5)])
        await _expect_goaway(raw, ErrorCodes.FLOW_CONTROL_ERROR)
        assert ("FLOW_CONTROL_ERROR", "flow_control") in observed.goaways
        await _second_connection_works(port, pki)


async def test_a_window_update_past_two_to_the_31_is_a_flow_control_error(pki: DevPKI) -> None:
    async with running_h2_server(app, pki, h2_limits=LIMITS) as (_, port, observed):
        raw = await RawH2.connect(port, pki.ca_cert)
        await raw.send(WindowUpdateFrame(0, window_increment=(1 << 31) - 1),
                       WindowUpdateFrame(0, window_increment=(1 << 31) - 1))
        await _expect_goaway(raw, ErrorCodes.FLOW_CONTROL_ERROR)
        assert ("FLOW_CONTROL_ERROR", "flow_control") in observed.goaways
        await _second_connection_works(port, pki)


async def test_a_client_that_resets_as_many_as_it_completes_is_served(pki: DevPKI) -> None:
    async with running_h2_server(app, pki, h2_limits=LIMITS) as (_, port, observed):
        client = await H2Client.connect(port, pki.ca_cert)
        for _ in range(60):  # more resets than max_resets_per_window, each beside a completed call
            sid = await client.request("GET", "/")
            client.h.reset_stream(sid, ErrorCodes.CANCEL)
            await client.flush()
            answer = await client.answer(await client.request("GET", "/"))
            assert answer.status == 200
        assert observed.goaways == []
        await client.aclose()


async def test_an_hpack_table_larger_than_allowed_is_a_compression_error(pki: DevPKI) -> None:
    async with running_h2_server(app, pki, h2_limits=LIMITS) as (_, port, observed):
        raw = await RawH2.connect(port, pki.ca_cert)
        resize = b"\x3f\xe1\x3f"  # dynamic table size update to 8192, over our 4096
        await raw.send(HeadersFrame(1, resize + raw.headers_block("/"), flags=["END_HEADERS", "END_STREAM"]))
        await _expect_goaway(raw, ErrorCodes.COMPRESSION_ERROR)
        assert ("COMPRESSION_ERROR", "hpack") in observed.goaways
        await _second_connection_works(port, pki)
