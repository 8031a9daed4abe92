"""Security response headers, added by the HTTP server in one place: the server's own answers
(handler responses, errors, requests refused before parsing) get ``Cache-Control: no-store``,
``nosniff`` and HSTS when configured; forwarded responses keep their caching headers and get
only what they lack."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing
from _http_helpers import RawClient, RawResponse, get

from qpher_proxy.errors import InvalidInput
from qpher_proxy.http import Request, Response, SecurityHeaders, serve_connection

OWN = [(b"cache-control", b"no-store"), (b"x-content-type-options", b"nosniff")]
HSTS = (b"strict-transport-security", b"max-age=31536000")
NAMES = (b"cache-control", b"x-content-type-options", b"strict-transport-security")


async def _exchange(handler: object, request: bytes, security: SecurityHeaders | None) -> RawResponse:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: serve_connection(server_stream, handler, security_headers=security))  # type: ignore[arg-type]
        client = RawClient(client_stream)
        await client.send(request)
        response = await client.read_response(head=request.startswith(b"HEAD"))
        await client_stream.aclose()
    return response


def _security(response: RawResponse) -> list[tuple[bytes, bytes]]:
    return [(n, v) for n, v in response.headers if n in NAMES]


async def _json(request: Request) -> Response:
    return Response.json(200, {"shared_secret": "c2VjcmV0"})


async def _refuse(request: Request) -> Response:
    raise InvalidInput("bad field")


async def _invalid(request: Request) -> Response:
    return Response(200, [(b"x-bad", b"a\r\nb")], b"")


async def _forwarded_cached(request: Request) -> Response:
    return Response(200, [(b"content-type", b"text/css"), (b"cache-control", b"public, max-age=60")],
                    b"a{}", forwarded=True)


async def _forwarded_own_security(request: Request) -> Response:
    async def body() -> AsyncIterator[bytes]:
        yield b"streamed"

    return Response(
        200,
        [(b"X-Content-Type-Options", b"nosniff"), (b"strict-transport-security", b"max-age=5")],
        body(),
        forwarded=True,
    )


@pytest.mark.parametrize("hsts", [None, 31536000], ids=["no-hsts", "hsts"])
@pytest.mark.parametrize(
    ("handler", "request_bytes", "status"),
    [
        (_json, get("/v1/kem/decapsulate"), 200),
        (_json, get("/healthz", method=b"HEAD"), 200),
        (_refuse, get("/v1/sign"), 400),
        (_invalid, get("/"), 500),  # the fallback error the server renders instead
        (_json, b"GET / HTTP/1.1\r\nHost: x\nBad: lf\r\n\r\n", 400),  # refused before parsing
        (_json, b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X: " + b"y" * 20000 + b"\r\n\r\n", 431),
    ],
    ids=["json", "head", "error", "invalid-response", "bare-lf", "too-large"],
)
async def test_the_servers_own_answers_carry_the_security_headers(
        handler: object, request_bytes: bytes, status: int, hsts: int | None) -> None:
    response = await _exchange(handler, request_bytes, SecurityHeaders(hsts_max_age=hsts))
    assert response.status == status
    assert _security(response) == OWN + ([] if hsts is None else [HSTS])


async def test_a_forwarded_response_keeps_its_caching_and_gets_what_it_lacks() -> None:
    response = await _exchange(
        _forwarded_cached, get("/static/a.css"), SecurityHeaders(hsts_max_age=31536000)
    )
    assert response.body == b"a{}"
    assert _security(response) == [(b"cache-control", b"public, max-age=60"),
                                   (b"x-content-type-options", b"nosniff"), HSTS]
    response = await _exchange(_forwarded_cached, get("/static/a.css"), SecurityHeaders())
    assert _security(response) == [
        (b"cache-control", b"public, max-age=60"),
        (b"x-content-type-options", b"nosniff"),
    ]


async def test_a_forwarded_responses_own_security_headers_win() -> None:
    response = await _exchange(_forwarded_own_security, get("/app"), SecurityHeaders(hsts_max_age=31536000))
    assert response.body == b"streamed"
    assert _security(response) == [
        (b"x-content-type-options", b"nosniff"),
        (b"strict-transport-security", b"max-age=5"),
    ]


async def test_without_security_headers_nothing_is_added() -> None:
    for handler in (_json, _refuse):
        response = await _exchange(handler, get("/"), None)
        assert _security(response) == []


def test_security_headers_are_prebuilt_once() -> None:
    sh = SecurityHeaders(hsts_max_age=0)  # max-age=0 tells browsers to forget the host
    assert [(name, value) for _, name, value in sh.own] == [
        *OWN,
        (b"strict-transport-security", b"max-age=0"),
    ]
    assert [(name, value) for _, name, value in sh.forwarded] == [
        OWN[1],
        (b"strict-transport-security", b"max-age=0"),
    ]
    assert sh.own_block == (b"cache-control: no-store\r\nx-content-type-options: nosniff\r\n"
                                     b"strict-transport-security: max-age=0\r\n")


@pytest.mark.parametrize("bad", [-1, 10 * 365 * 86_400 + 1, True, 1.5, "60"])
def test_security_headers_refuse_a_bad_max_age(bad: object) -> None:
    with pytest.raises(ValueError, match="hsts_max_age"):
        SecurityHeaders(hsts_max_age=bad)  # type: ignore[arg-type]
