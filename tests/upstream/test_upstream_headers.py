"""Header hygiene for sidecar forwarding: pure functions, no sockets."""

from __future__ import annotations

import pytest

from qpher_proxy.errors import QpherError
from qpher_proxy.upstream import prepare_downstream_headers, prepare_upstream_headers

CTX = dict(client_ip="203.0.113.7", proto="https", host=b"api.example", tenant_id="t-acme",
           api_key_id="k_123", request_id="req-1")


def names(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    return [n for n, _ in headers]


def values(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [v for n, v in headers if n == name]


def test_hop_by_hop_and_connection_named_headers_are_removed() -> None:
    out = prepare_upstream_headers([
        (b"Host", b"api.example"),
        (b"Connection", b"keep-alive, X-Private-Hop"),
        (b"connection", b"Another-One"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Proxy-Authorization", b"Basic Zm9vOmJhcg=="),
        (b"Proxy-Authenticate", b"Basic"),
        (b"Proxy-Connection", b"keep-alive"),
        (b"TE", b"trailers"),
        (b"Trailer", b"Expires"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Upgrade", b"websocket"),
        (b"X-Private-Hop", b"1"),
        (b"another-one", b"2"),
        (b"Expect", b"100-continue"),
        (b"Accept", b"*/*"),
        (b"Content-Length", b"12"),
    ], **CTX)
    kept = set(names(out))
    for gone in (b"connection", b"keep-alive", b"proxy-authorization", b"proxy-authenticate",
                 b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
                 b"x-private-hop", b"another-one", b"expect", b"host"):
        assert gone not in kept, gone
    assert values(out, b"accept") == [b"*/*"]
    assert values(out, b"content-length") == [b"12"]


def test_spoofed_identity_headers_are_dropped_and_ours_injected_once() -> None:
    out = prepare_upstream_headers([
        (b"X-Qpher-Tenant", b"victim"),
        (b"x-qpher-key-id", b"k_victim"),
        (b"X-QPHER-ANYTHING", b"x"),
        (b"X-Tenant-Id", b"victim"),
        (b"X-Request-Id", b"forged"),
        (b"Forwarded", b"for=10.0.0.1;proto=http"),
        (b"X-Forwarded-For", b"10.0.0.1"),
        (b"X-Forwarded-Proto", b"http"),
        (b"X-Forwarded-Host", b"evil.example"),
        (b"X-Forwarded-Port", b"80"),
        (b"X-Real-IP", b"10.0.0.1"),
    ], **CTX)
    assert values(out, b"x-qpher-tenant") == [b"t-acme"]
    assert values(out, b"x-qpher-key-id") == [b"k_123"]
    assert values(out, b"x-request-id") == [b"req-1"]
    assert values(out, b"x-forwarded-for") == [b"203.0.113.7"]
    assert values(out, b"x-forwarded-proto") == [b"https"]
    assert values(out, b"x-forwarded-host") == [b"api.example"]
    for gone in (b"x-qpher-anything", b"x-tenant-id", b"forwarded", b"x-forwarded-port", b"x-real-ip"):
        assert gone not in names(out)


def test_forwarded_for_chain_is_appended_only_when_trusted() -> None:
    client = [(b"X-Forwarded-For", b"198.51.100.1, 10.0.0.2"), (b"x-forwarded-for", b"10.0.0.3")]
    assert values(prepare_upstream_headers(client, **CTX), b"x-forwarded-for") == [b"203.0.113.7"]
    trusted = prepare_upstream_headers(client, **CTX, trust_forwarded_for=True)
    assert values(trusted, b"x-forwarded-for") == [b"198.51.100.1, 10.0.0.2, 10.0.0.3, 203.0.113.7"]


def test_api_key_headers_are_removed_unless_configured() -> None:
    client = [
        (b"X-API-Key", b"qph_k123_s3cr3t"),
        (b"Authorization", b"Bearer qph_k123_s3cr3t"),
    ]
    out = prepare_upstream_headers(client, **CTX)
    assert b"x-api-key" not in names(out) and b"authorization" not in names(out)
    assert not any(b"s3cr3t" in v for _, v in out)
    passed = prepare_upstream_headers(client, **CTX, pass_api_key=True)
    assert values(passed, b"x-api-key") == [b"qph_k123_s3cr3t"]
    assert values(passed, b"authorization") == [b"Bearer qph_k123_s3cr3t"]


@pytest.mark.parametrize("value", [b"bearer qph_k_s", b"BEARER  qph_k_s", b" Bearer\tqph_k_s"])
def test_bearer_api_key_is_recognised_whatever_the_scheme_case(value: bytes) -> None:
    assert b"authorization" not in names(prepare_upstream_headers([(b"Authorization", value)], **CTX))


def test_an_authorization_header_for_the_upstream_app_is_passed_on() -> None:
    for value in (b"Bearer eyJhbGciOi.app-token", b"Basic dXNlcjpwYXNz"):
        out = prepare_upstream_headers([(b"Authorization", value)], **CTX)
        assert values(out, b"authorization") == [value]


def test_host_goes_to_x_forwarded_host_and_is_kept_only_when_asked() -> None:
    client = [(b"Host", b"client.example:8443")]
    ctx = dict(CTX, host=None)
    out = prepare_upstream_headers(client, **ctx)
    assert b"host" not in names(out)
    assert values(out, b"x-forwarded-host") == [b"client.example:8443"]
    kept = prepare_upstream_headers(client, **ctx, preserve_host=True)
    assert values(kept, b"host") == [b"client.example:8443"]
    assert b"x-forwarded-host" not in names(prepare_upstream_headers([], **ctx))


@pytest.mark.parametrize("field", ["tenant_id", "api_key_id", "request_id", "client_ip"])
@pytest.mark.parametrize("bad", ["a\r\nX-Injected: 1", "", "t\x00", "é", "two words"])
def test_injected_values_cannot_split_headers(field: str, bad: str) -> None:
    with pytest.raises(QpherError) as info:
        prepare_upstream_headers([], **dict(CTX, **{field: bad}))
    assert info.value.status == 500
    assert bad not in info.value.message or bad == ""


def test_proto_is_checked() -> None:
    with pytest.raises(ValueError):
        prepare_upstream_headers([], **dict(CTX, proto="gopher"))


def test_downstream_drops_hop_by_hop_and_upstream_connection_management() -> None:
    out = prepare_downstream_headers([
        (b"Content-Type", b"text/plain"),
        (b"Connection", b"close, X-Upstream-Hop"),
        (b"Keep-Alive", b"timeout=5, max=100"),
        (b"X-Upstream-Hop", b"1"),
        (b"Proxy-Authenticate", b"Basic"),
        (b"Upgrade", b"h2c"),
        (b"Trailer", b"Expires"),
        (b"Content-Length", b"5"),
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
    ])
    assert out == [(b"content-type", b"text/plain"), (b"content-length", b"5"),
                   (b"set-cookie", b"a=1"), (b"set-cookie", b"b=2")]


def test_downstream_drops_content_length_when_transfer_encoding_was_also_sent() -> None:
    out = prepare_downstream_headers([(b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"99")])
    assert out == []
