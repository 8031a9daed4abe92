"""Request/Response value types and the one error rendering."""

from __future__ import annotations

import dataclasses
import json

import pytest

from qpher_proxy.errors import BodyTooLarge, HeaderTooLarge, NotFound
from qpher_proxy.http import Request, Response, error_response, new_request_id


def _request(**kw: object) -> Request:
    base: dict[str, object] = dict(
        method="GET", target="/a?b=c", path="/a", query="b=c", headers=[(b"host", b"x")],
        http_version="1.1", request_id="0123456789abcdef", client_addr="127.0.0.1",
    )
    base.update(kw)
    return Request(**base)  # type: ignore[arg-type]


def test_error_response_renders_code_message_and_request_id() -> None:
    resp = error_response(NotFound("no such key"), "abcdef0123456789")
    assert resp.status == 404
    headers = dict(resp.headers)
    assert headers[b"content-type"] == b"application/json"
    assert headers[b"x-request-id"] == b"abcdef0123456789"
    assert json.loads(resp.body) == {  # type: ignore[arg-type]
        "error": {"code": "not_found", "message": "no such key", "request_id": "abcdef0123456789"}
    }


def test_http_errors_have_the_statuses_users_expect() -> None:
    assert (HeaderTooLarge().status, HeaderTooLarge().code) == (431, "header_too_large")
    assert (BodyTooLarge().status, BodyTooLarge().code) == (413, "body_too_large")


def test_response_json_is_compact_utf8_with_content_type() -> None:
    resp = Response.json(201, {"k": "é", "n": [1, 2]}, headers=[(b"location", b"/v1/keys/1")])
    assert resp.status == 201
    assert resp.body == '{"k":"é","n":[1,2]}'.encode()
    assert list(resp.headers) == [(b"content-type", b"application/json"), (b"location", b"/v1/keys/1")]


def test_request_is_frozen_and_its_state_is_a_scratch_dict() -> None:
    req = _request()
    with pytest.raises(dataclasses.FrozenInstanceError):
        req.path = "/other"  # type: ignore[misc]
    req.state["tenant"] = "t1"
    assert req.state == {"tenant": "t1"}
    assert "tenant" not in repr(req)


def test_request_header_lookup() -> None:
    req = _request(headers=[(b"host", b"x"), (b"accept", b"a"), (b"accept", b"b")])
    assert req.header(b"accept") == b"a"
    assert req.header(b"missing") is None
    assert req.header_values(b"accept") == [b"a", b"b"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"abc-123_x.y:z", "abc-123_x.y:z"),
        (b"", None),
        (b"has space", None),
        (b"x" * 129, None),
        (b"\xff", None),
    ],
)
def test_client_request_id_is_recorded_only_when_sane(value: bytes, expected: str | None) -> None:
    assert _request(headers=[(b"x-request-id", value)]).client_request_id == expected


async def test_request_without_a_connection_has_an_empty_body() -> None:
    req = _request()
    assert await req.read_body() == b""
    assert [c async for c in req.body_chunks()] == []


def test_request_ids_are_16_hex_and_distinct() -> None:
    ids = {new_request_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) == 16 and int(i, 16) >= 0 for i in ids)


def test_reprs_hold_no_headers_query_or_body() -> None:
    req = _request(
        query="api_key=sekrit", target="/a?api_key=sekrit", headers=[(b"authorization", b"Bearer sekrit")]
    )
    resp = Response.json(200, {"shared_secret": "sekrit"})
    assert "sekrit" not in repr(req) and "/a" in repr(req)
    assert "sekrit" not in repr(resp) and "200" in repr(resp)


def test_every_503_says_when_to_retry_and_a_429_keeps_its_own() -> None:
    from qpher_proxy.errors import QuotaExceeded, StorageUnavailable

    resp = error_response(StorageUnavailable("database error while querying"), "r1")
    assert (b"retry-after", b"1") in resp.headers
    resp = error_response(QuotaExceeded("x", retry_after=30), "r1")
    assert [v for k, v in resp.headers if k == b"retry-after"] == [b"30"]


def test_a_batch_answer_renders_exactly_as_the_general_encoder_would() -> None:
    from qpher_proxy.http.messages import Base64Text, _dumps

    items: list[object] = [
        {"ok": True, "key_id": "k_1", "signature": Base64Text.of(bytes(range(256)) * 13), "version": 1},
        {"ok": False, "error": {"code": "key_not_found", "message": "no key \u00e9 \"k_2\"\n"}},
        {"ok": True, "key_id": "k_\u00fc", "valid": False, "note": None},
        {"ok": True, "nested": [1, 2]},  # not flat: the general encoder
    ]
    obj = {"items": items}
    body = Response.json(200, obj).body
    assert body == _dumps(obj).encode("utf-8")
    assert json.loads(body) == json.loads(json.dumps(obj))
