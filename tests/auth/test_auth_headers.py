"""Header hygiene: where a key may come from, URL refusal and redaction, identity stripping."""

from __future__ import annotations

from pathlib import Path

import pytest

from qpher_proxy.auth import (
    WWW_AUTHENTICATE,
    APIKeyStore,
    Authenticator,
    extract_api_key,
    generate_pepper_file,
    load_pepper,
    partition_identity_headers,
    redact_target,
    strip_identity_headers,
)
from qpher_proxy.auth.headers import STRIPPED_HEADER_PREFIXES, STRIPPED_HEADERS
from qpher_proxy.errors import APIKeyInURL, Unauthenticated

KEY = "qph_abcdefghijkl_" + "Z" * 43
OTHER = "qph_mnopqrstuvwx_" + "Y" * 43


def test_key_from_x_api_key() -> None:
    assert extract_api_key([(b"x-api-key", KEY.encode())], "") == KEY
    assert extract_api_key([(b"X-API-Key", b"  " + KEY.encode() + b" ")], "") == KEY


def test_key_from_authorization_bearer() -> None:
    assert extract_api_key([(b"authorization", b"Bearer " + KEY.encode())], "") == KEY
    assert extract_api_key([(b"Authorization", b"bearer   " + KEY.encode())], "") == KEY


def test_no_key() -> None:
    assert extract_api_key([(b"host", b"x")], "a=1") is None
    assert extract_api_key([(b"authorization", b"Basic dXNlcjpwYXNz")], "") is None


def test_x_api_key_wins_over_a_foreign_bearer_token() -> None:
    """In sidecar mode, Authorization may belong to the upstream app."""
    headers = [(b"authorization", b"Bearer eyJhbGciOi.upstream.jwt"), (b"x-api-key", KEY.encode())]
    assert extract_api_key(headers, "") == KEY


@pytest.mark.parametrize(
    "headers",
    [
        [(b"x-api-key", KEY.encode()), (b"x-api-key", OTHER.encode())],
        [(b"authorization", b"Bearer " + KEY.encode()), (b"authorization", b"Bearer " + OTHER.encode())],
        [(b"x-api-key", KEY.encode()), (b"authorization", b"Bearer " + OTHER.encode())],
    ],
)
def test_conflicting_credentials_are_refused(headers: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(Unauthenticated) as info:
        extract_api_key(headers, "")
    assert info.value.reason == "ambiguous" and info.value.status == 401


def test_same_key_in_both_headers_is_fine() -> None:
    headers = [(b"x-api-key", KEY.encode()), (b"authorization", b"Bearer " + KEY.encode())]
    assert extract_api_key(headers, "") == KEY


@pytest.mark.parametrize(
    "query",
    [
        f"api_key={KEY}",
        "api_key=anything",
        "apikey=x",
        "key=x",
        "token=x",
        "access_token=x",
        "Access-Token=x",
        "API_KEY=",
        f"q=1&note={KEY}",
        f"{KEY}",
        "x=" + KEY.replace("_", "%5F"),
        "x=" + KEY[:20],  # even a truncated key
    ],
)
def test_key_in_the_query_string_is_refused(query: str) -> None:
    with pytest.raises(APIKeyInURL) as info:
        extract_api_key([(b"x-api-key", KEY.encode())], query)
    e = info.value
    assert (e.code, e.status) == ("api_key_in_url", 400)
    assert KEY not in e.message and KEY[17:] not in repr(e)


def test_key_in_the_path_is_refused_when_the_path_is_given() -> None:
    with pytest.raises(APIKeyInURL):
        extract_api_key([], "", path=f"/v1/keys/{KEY}")
    assert extract_api_key([], "", path="/v1/keys/abcdefghijkl") is None


def test_harmless_query_strings_pass() -> None:
    assert extract_api_key([(b"x-api-key", KEY.encode())], "limit=10&keys=3&monkey=1&tokenizer=x") == KEY


def test_redact_target() -> None:
    assert redact_target("/v1/sign") == "/v1/sign"
    assert redact_target(f"/v1/sign?api_key={KEY}&limit=10") == "/v1/sign?api_key=REDACTED&limit=REDACTED"
    assert KEY not in redact_target(f"/v1/{KEY}/x?{KEY}")
    assert "qph" not in redact_target(b"/a?x=" + KEY.replace("_", "%5F").encode())
    assert redact_target(b"/a?flag&x=1") == "/a?flag&x=REDACTED"
    assert redact_target("/\x7fa\x00") == "/%7Fa%00"


def test_spoofed_identity_headers_are_stripped() -> None:
    headers = [
        (b"host", b"api.example"),
        (b"X-Tenant-Id", b"victim"),
        (b"x-qpher-tenant", b"victim"),
        (b"X-Qpher-Plan", b"enterprise"),
        (b"forwarded", b"for=10.0.0.1;by=proxy"),
        (b"x-forwarded-for", b"10.0.0.1"),
        (b"X-Forwarded-User", b"admin"),
        (b"x-real-ip", b"10.0.0.1"),
        (b"x-request-id", b"client-chosen"),
        (b"x-remote-user", b"admin"),
        (b"x-auth-request-email", b"boss@example"),
        (b"content-type", b"application/json"),
        (b"x-api-key", KEY.encode()),
        (b"authorization", b"Bearer " + KEY.encode()),
    ]
    kept, removed = partition_identity_headers(headers)
    assert kept == [(b"host", b"api.example"), (b"content-type", b"application/json")]
    assert b"x-tenant-id" in removed and b"x-api-key" in removed and len(removed) == 12
    assert strip_identity_headers(headers) == kept


def test_api_key_may_be_passed_upstream_when_configured() -> None:
    headers = [(b"x-api-key", KEY.encode()), (b"x-tenant-id", b"victim")]
    assert strip_identity_headers(headers, keep_api_key=True) == [(b"x-api-key", KEY.encode())]


def test_foreign_authorization_is_left_for_the_upstream() -> None:
    headers = [(b"authorization", b"Basic dXNlcjpwYXNz"), (b"authorization", b"Bearer upstream-token")]
    assert strip_identity_headers(headers) == headers


def test_stripped_list_is_what_the_docs_say() -> None:
    assert {b"x-tenant-id", b"forwarded", b"x-request-id"} <= STRIPPED_HEADERS
    assert STRIPPED_HEADER_PREFIXES == (b"x-qpher-", b"x-forwarded-", b"x-auth-request-")
    assert WWW_AUTHENTICATE == b'Bearer realm="qpher"'


def test_tenant_comes_from_the_key_record_not_from_headers(tmp_path: Path) -> None:
    """End to end through the pure pieces: a client of tenant acme claiming to be 'victim'."""
    generate_pepper_file(tmp_path / "pepper")
    with APIKeyStore(tmp_path / "g.db", load_pepper(tmp_path / "pepper")) as store:
        _, key = store.create("acme", "free")
        headers = [
            (b"x-tenant-id", b"victim"),
            (b"x-qpher-tenant", b"victim"),
            (b"forwarded", b"for=1.2.3.4"),
            (b"authorization", b"Bearer " + key.encode()),
        ]
        record = Authenticator(store).authenticate(extract_api_key(headers, ""))
        forwarded = strip_identity_headers(headers)
    assert record.tenant == "acme"
    assert forwarded == []
    assert all(b"victim" not in v for _, v in forwarded)
