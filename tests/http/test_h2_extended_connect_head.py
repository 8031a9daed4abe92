"""``parse_request_head`` and RFC 8441: ``:protocol`` only on a CONNECT with ``:scheme``, ``:path``
and ``:authority``; a plain CONNECT stays a request the server refuses (405)."""

from __future__ import annotations

import pytest

from qpher_proxy.http._h2guard import MalformedRequest, parse_request_head

EXTENDED = [(b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":scheme", b"https"),
            (b":path", b"/chat?room=1"), (b":authority", b"example.org"), (b"sec-websocket-version", b"13")]


def test_an_extended_connect_is_parsed_with_its_protocol() -> None:
    head = parse_request_head(EXTENDED)
    assert (head.method, head.target, head.protocol) == ("CONNECT", "/chat?room=1", "websocket")
    assert head.headers == [(b"host", b"example.org"), (b"sec-websocket-version", b"13")]


def test_the_protocol_token_is_lower_cased() -> None:
    head = parse_request_head([(n, b"WebSocket" if n == b":protocol" else v) for n, v in EXTENDED])
    assert head.protocol == "websocket"


@pytest.mark.parametrize("fields", [
    [(b":method", b"GET"), *EXTENDED[1:]],  # :protocol on a GET
    [f for f in EXTENDED if f[0] != b":path"],
    [f for f in EXTENDED if f[0] != b":scheme"],
    [f for f in EXTENDED if f[0] != b":authority"],
    [*EXTENDED[:2], (b":protocol", b"websocket"), *EXTENDED[2:]],  # twice
    [(n, b"/a b" if n == b":path" else v) for n, v in EXTENDED],
    [(n, b"*" if n == b":path" else v) for n, v in EXTENDED],
    [(n, b"web socket" if n == b":protocol" else v) for n, v in EXTENDED],
    [*EXTENDED, (b"upgrade", b"websocket")],  # connection-specific, as on any h2 request
])
def test_malformed_extended_connects_are_stream_errors(fields: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(MalformedRequest):
        parse_request_head(fields)


def test_a_plain_connect_is_still_a_request_without_protocol() -> None:
    head = parse_request_head([(b":method", b"CONNECT"), (b":authority", b"example.org:443")])
    assert (head.method, head.target, head.protocol) == ("CONNECT", "*", None)
