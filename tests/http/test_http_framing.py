"""HTTP/1.1 framing strictness (RFC 9112), through TLS on a real socket as the gateway serves.

h11 is more lenient than a security gateway may be: it takes a bare LF for CRLF, unfolds
obsolete line folding, reads a body with both Content-Length and Transfer-Encoding as chunked,
and waits for the data of any chunk size. Each such request gets its JSON error and
``Connection: close``, and nothing after it on the connection is answered: a request smuggled
behind it gets end of stream, never a response."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio
from _http_helpers import RawClient, RawResponse, echo_info, get, make_pki, running_tls_server

from qpher_proxy.http import HTTPLimits
from qpher_proxy.tls.certs import DevPKI

AT_ONCE = 5.0  # seconds: far below the header and body timeouts a silent wait would run into
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPKI:
    return make_pki(tmp_path_factory.mktemp("pki") / "certs")


@pytest.fixture
async def port(pki: DevPKI) -> AsyncIterator[int]:
    async with running_tls_server(echo_info, pki, limits=HTTPLimits(max_body_bytes=1000)) as (_, port):
        yield port


async def refused(port: int, pki: DevPKI, *parts: bytes) -> tuple[RawResponse, bool]:
    """Send ``parts`` (one write each) over a fresh TLS connection; the one response and
    whether the server then ended the connection with nothing more to say."""
    client = await RawClient.connect_tls(port, pki.ca_cert)
    try:
        with trio.fail_after(AT_ONCE):
            for part in parts:
                await client.send(part)
            resp = await client.read_response()
            closed = await client.closed_by_peer()
    finally:
        await client.aclose()
    return resp, closed


def assert_json_error(resp: RawResponse, status: int, code: str) -> None:
    assert resp.status == status
    assert resp.header(b"connection") == b"close"
    assert resp.header(b"content-type") == b"application/json"
    error = resp.json()["error"]
    assert error["code"] == code
    assert error["request_id"] == resp.header(b"x-request-id").decode()  # type: ignore[union-attr]
    assert error["message"][:1].islower()


# ---- Content-Length and Transfer-Encoding together (RFC 9112 §6.1) --------------------------------


@pytest.mark.parametrize(
    "head",
    [
        b"POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST /body HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\ntransfer-encoding: CHUNKED\r\ncontent-length: 0\r\n\r\n",
    ],
    ids=["cl-first", "te-first", "handler-does-not-read"],
)
async def test_content_length_with_transfer_encoding_is_400_and_the_connection_ends(
    port: int, pki: DevPKI, head: bytes
) -> None:
    resp, closed = await refused(port, pki, head + b"0\r\n\r\n" + SMUGGLED)
    assert_json_error(resp, 400, "bad_request")
    assert "content-length and transfer-encoding" in resp.json()["error"]["message"]
    assert closed  # the smuggled request was never answered


async def test_transfer_encoding_alone_still_serves_the_next_request(port: int, pki: DevPKI) -> None:
    client = await RawClient.connect_tls(port, pki.ca_cert)
    with trio.fail_after(AT_ONCE):
        await client.send(
            b"POST /body HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
            + get("/next")
        )
        first = await client.read_response()
        second = await client.read_response()
    assert first.status == 200 and first.json()["body"] == "abc"
    assert second.status == 200 and second.json()["path"] == "/next"
    await client.aclose()


# ---- line endings and folding in the head (RFC 9112 §2.2, §5.2) ------------------------------------


@pytest.mark.parametrize(
    ("head", "what"),
    [
        (b"GET / HTTP/1.1\nHost: x\n\n", "LF without CR"),
        (b"GET / HTTP/1.1\r\nHost: x\nX-A: b\r\n\r\n", "LF without CR"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\n", "LF without CR"),
        (b"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer\r\n qk_abc\r\n\r\n", "folded"),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-A: b\r\n\tc\r\n\r\n", "folded"),
    ],
    ids=["all-lf", "one-lf", "lf-ends-head", "fold-sp", "fold-htab"],
)
async def test_bare_lf_and_folded_lines_are_400_and_the_connection_ends(
    port: int, pki: DevPKI, head: bytes, what: str
) -> None:
    resp, closed = await refused(port, pki, head + SMUGGLED)
    assert_json_error(resp, 400, "bad_request")
    assert what in resp.json()["error"]["message"]
    assert closed


async def test_a_folded_line_trickled_byte_by_byte_is_found(port: int, pki: DevPKI) -> None:
    head = b"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer\r\n qk_abc\r\n\r\n"
    resp, closed = await refused(port, pki, *(head[i : i + 1] for i in range(len(head))))
    assert_json_error(resp, 400, "bad_request")
    assert closed


async def test_a_clean_head_trickled_byte_by_byte_is_served(port: int, pki: DevPKI) -> None:
    client = await RawClient.connect_tls(port, pki.ca_cert)
    head = get("/trickled", b"X-A: b\r\n")
    with trio.fail_after(AT_ONCE):
        for i in range(len(head)):
            await client.send(head[i : i + 1])
        resp = await client.read_response()
    assert resp.status == 200 and resp.json()["path"] == "/trickled"
    await client.aclose()


async def test_lf_inside_a_body_is_not_the_heads_business(port: int, pki: DevPKI) -> None:
    client = await RawClient.connect_tls(port, pki.ca_cert)
    with trio.fail_after(AT_ONCE):
        await client.send(b"POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\na\n b" + get("/next"))
        first = await client.read_response()
        second = await client.read_response()
    assert first.status == 200 and first.json()["body"] == "a\n b"
    assert second.status == 200
    await client.aclose()


# ---- chunked bodies (RFC 9112 §7.1) ---------------------------------------------------------------

CHUNKED = b"POST /body HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(
    "body",
    [
        b"7fffffffffffffff\r\n",  # one chunk declared far past max_body_bytes, no data sent
        b"ffffffffffffffffffff\r\n",  # the longest size h11 parses
        b"3e8\r\n" + b"x" * 1000 + b"\r\n1\r\n",  # exactly the limit, then one byte more declared
        b"190\r\n" + b"y" * 400 + b"\r\n259\r\n" + b"x" * 10,  # 400 read + 601 declared, 10 of them sent
    ],
    ids=["2^63-1", "20-hex-digits", "limit-plus-one", "partial-chunk"],
)
async def test_a_chunk_declared_past_the_body_limit_is_413_at_once(
    port: int, pki: DevPKI, body: bytes
) -> None:
    resp, closed = await refused(port, pki, CHUNKED + body)
    assert_json_error(resp, 413, "body_too_large")
    assert closed


async def test_a_huge_chunk_the_handler_never_reads_closes_the_connection(port: int, pki: DevPKI) -> None:
    head = b"POST /not-read HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    resp, closed = await refused(port, pki, head + b"7fffffffffffffff\r\n" + SMUGGLED)
    assert resp.status == 200 and resp.header(b"connection") == b"close"
    assert closed


@pytest.mark.parametrize(
    "body",
    [
        b"5\nhello\n0\n\n",  # bare LF after the chunk size: h11 would wait for a CRLF
        b"zz",  # not hex, no CRLF yet
        b"5;ext\nhello",  # bare LF after an extension
        b"5\r\nhelloXY",  # no CRLF after the chunk data
        b"zz\r\n",  # not hex
        b"5 x\r\n",  # garbage after the size
    ],
    ids=["lf-after-size", "not-hex-partial", "lf-after-ext", "bad-chunk-end", "not-hex", "junk-after-size"],
)
async def test_malformed_chunk_framing_is_400_at_once(port: int, pki: DevPKI, body: bytes) -> None:
    resp, closed = await refused(port, pki, CHUNKED + body)
    assert_json_error(resp, 400, "bad_request")
    assert closed


async def test_a_chunked_body_within_the_limit_in_many_small_chunks_is_read(port: int, pki: DevPKI) -> None:
    client = await RawClient.connect_tls(port, pki.ca_cert)
    chunks = b"".join(b"%x;n=%d\r\n%s\r\n" % (n, n, b"z" * n) for n in range(1, 40))
    with trio.fail_after(AT_ONCE):
        await client.send(CHUNKED + chunks[:300])
        await client.send(chunks[300:] + b"0\r\nX-Trailer: t\r\n\r\n")
        resp = await client.read_response()
    assert resp.status == 200 and resp.json()["len"] == sum(range(1, 40))
    assert resp.header(b"connection") is None
    await client.aclose()
