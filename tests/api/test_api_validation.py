"""Every kind of bad input on every endpoint answers a documented 4xx with a stable code."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from _api_openapi import documented_codes
from hypothesis import given, settings
from hypothesis import strategies as st

from qpher_proxy.api import ROUTES, CryptoAPI, Route
from qpher_proxy.api.validation import REQUEST_FIELDS, FieldType, decode_b64, load_json
from qpher_proxy.errors import QpherError

KID = "k_abcdefghijklmnopqrstuvwxyz"
JID = "ij_abcdefghijklmnopqrstuvwxyz"
B = base64.b64encode

VALID: dict[str, dict[str, Any]] = {
    "kem.encapsulate": {"key_id": KID},
    "kem.decapsulate": {"key_id": KID, "ciphertext": B(b"c" * 1088).decode(), "key_version": 1},
    "encrypt": {"key_id": KID, "plaintext": B(b"hello").decode(), "aad": B(b"hdr").decode()},
    "decrypt": {"key_id": KID, "ciphertext": B(b"x" * 1200).decode(), "aad": "", "key_version": 2},
    "sign": {"key_id": KID, "message": B(b"msg").decode(), "context": B(b"ctx").decode()},
    "verify": {"key_id": KID, "message": "", "signature": B(b"s" * 3309).decode(),
               "context": "", "key_version": 1},
    "keys.create": {"algorithm": "ml-dsa-65", "label": "billing/signing-2026"},
    "admin.fail_open.set": {"reason": "policy repo outage", "seconds": 60},
    "import_jobs.create": {"method": "hpke-ml-kem-768", "ttl_seconds": 3600},
    "keys.import": {"import_job_id": JID, "algorithm": "ml-dsa-65", "wrapped_key": B(b"w" * 1136).decode(),
                    "format": "seed", "label": "byok/signing-1"},
    "keys.import_version": {"import_job_id": JID, "wrapped_key": B(b"w" * 1190).decode(), "format": "pkcs8"},
}

BODY_ROUTES = [r for r in ROUTES if r.has_body and not r.batch]
BATCH_ROUTES = [r for r in ROUTES if r.batch]
NO_BODY_ROUTES = [r for r in ROUTES if not r.has_body]


def _expect(
    api: CryptoAPI,
    route: Route,
    body: bytes | Any,
    code: str,
    *,
    params: dict[str, str] | None = None,
    query: str | None = None,
) -> QpherError:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(QpherError) as info:
        api.parse(route, raw, params if params is not None else {"key_id": KID}, query)
    exc = info.value
    assert exc.code == code, (exc.code, exc.message)
    assert 400 <= exc.status < 500
    assert code in documented_codes(route, exc.status), f"{route.name}: {exc.status} {code} undocumented"
    return exc


def _single_cases(op: str) -> list[tuple[str, Any, str]]:
    """(case id, body object, expected code) for one single operation."""
    valid = VALID[op]
    spec = REQUEST_FIELDS[op]
    cases: list[tuple[str, Any, str]] = [("unknown-field", {**valid, "contxt": "AA=="}, "invalid_input")]
    optional = [n for n, f in spec.items() if not f.required]
    if optional:
        cases.append(("null-optional", {**valid, optional[0]: None}, "invalid_input"))
    for name, field in spec.items():
        if field.required:
            cases.append((f"missing-{name}", {k: v for k, v in valid.items() if k != name}, "invalid_input"))
        for bad in [None, True, 7, 1.5, [], {}]:
            if field.type is FieldType.SECONDS and type(bad) in (int, float):
                continue
            if field.type in (FieldType.VERSION, FieldType.TTL) and type(bad) is int:
                continue
            cases.append((f"type-{name}-{type(bad).__name__}", {**valid, name: bad}, "invalid_input"))
        if field.type in (FieldType.BYTES, FieldType.CONTEXT, FieldType.WRAPPED_KEY):
            for i, bad_b64 in enumerate(["abc", "ab=c", "YQ", "YR==", "YWJ=", "Y Q==", "YQ==\n", "-_8=",
                                         "é===", "====", "YQ===", "Y===", "\u0000AAA"]):
                cases.append((f"b64-{name}-{i}", {**valid, name: bad_b64}, "invalid_base64"))
        if field.type is FieldType.KEY_ID:
            for i, bad_id in enumerate(["", "../../etc/passwd", "a" * 65, "k_ü", "k 1", "k/1", "k\u0000",
                                         KID.upper(), KID + "a", KID[:-1], KID[:-1] + "1"]):
                cases.append((f"keyid-{name}-{i}", {**valid, name: bad_id}, "key_not_found"))
        if field.type is FieldType.CONTEXT:
            cases.append((f"long-{name}", {**valid, name: B(b"c" * 256).decode()}, "invalid_context"))
        if field.type is FieldType.WRAPPED_KEY:
            cases.append((f"long-{name}", {**valid, name: B(b"w" * 3073).decode()}, "invalid_input"))
        if field.type is FieldType.IMPORT_JOB_ID:
            for i, bad_id in enumerate(["", "../x", "ij_" + "a" * 60, "ij_ü", JID.upper(), JID + "a",
                                        JID[:-1], JID[:-1] + "1", KID, "k" + JID[1:]]):
                cases.append((f"jobid-{name}-{i}", {**valid, name: bad_id}, "import_job_not_found"))
        if field.type is FieldType.TTL:
            for bad_t in [0, -1, 59, 604801, 10**30, 3600.5]:
                cases.append((f"range-{name}-{bad_t}", {**valid, name: bad_t}, "invalid_input"))
            cases.append((f"string-{name}", {**valid, name: "3600"}, "invalid_input"))
        if field.type in (FieldType.IMPORT_METHOD, FieldType.FORMAT):
            for i, bad_c in enumerate(["", "HPKE-ML-KEM-768", "rsa-oaep", "seed ", "der", "pkcs#8"]):
                cases.append((f"choice-{name}-{i}", {**valid, name: bad_c}, "invalid_input"))
        if field.type is FieldType.VERSION:
            for bad_v in [0, -1, 2**31, 10**30]:
                cases.append((f"range-{name}-{bad_v}", {**valid, name: bad_v}, "invalid_input"))
            cases.append((f"string-{name}", {**valid, name: "1"}, "invalid_input"))
        if field.type is FieldType.LABEL:
            for i, bad_l in enumerate(["", " x", "x y", "a" * 129, "é", "-x", "x\n"]):
                cases.append((f"label-{i}", {**valid, name: bad_l}, "invalid_input"))
        if field.type is FieldType.REASON:
            cases.append(("reason-empty", {**valid, name: ""}, "invalid_input"))
            for i, bad_r in enumerate(["a\nb", "   ", "a\tb", "\u202eevil", "a\u2028b", "a\xa0b", "a\x85",
                                       "\ud800", "x" * 501]):
                cases.append((f"reason-{i}", {**valid, name: bad_r}, "invalid_input"))
        if field.type is FieldType.SECONDS:
            for bad_s in [0, -1, 0.0]:
                cases.append((f"seconds-{bad_s}", {**valid, name: bad_s}, "invalid_input"))
    if op == "keys.create":
        cases += [
            ("alg-unknown", {"algorithm": "rsa-2048"}, "unknown_algorithm"),
            ("alg-case", {"algorithm": "ML-KEM-768"}, "unknown_algorithm"),
            ("alg-and-other-kind", {"algorithm": "ml-kem-768", "kind": "signature"}, "invalid_input"),
            ("alg-and-other-mode", {"algorithm": "ml-kem-768", "mode": "hybrid"}, "invalid_input"),
            ("mode-only", {"mode": "hybrid"}, "invalid_input"),
            ("neither", {}, "invalid_input"),
            ("kind-bad", {"kind": "rsa"}, "invalid_input"),
            ("mode-bad", {"kind": "kem", "mode": "classic"}, "invalid_input"),
        ]
    if op == "keys.import":
        cases += [
            ("alg-unknown", {**valid, "algorithm": "rsa-2048"}, "unknown_algorithm"),
            ("kind-instead-of-alg", {**{k: v for k, v in valid.items() if k != "algorithm"}, "kind": "kem"},
             "invalid_input"),
        ]
    if op == "keys.import_version":
        cases.append(("no-algorithm-here", {**valid, "algorithm": "ml-dsa-65"}, "invalid_input"))
    return cases


BAD_JSON = [b"", b"   ", b"{", b"{'a': 1}", b"\xff\xfe{}", b'{"a":1,"a":2}', b'{"x": NaN}',
            b'{"x": Infinity}', b"[" * 100_000, b'{"k": 1' + b"0" * 5000 + b"}", b"{} {}", b"\xef\xbb\xbf{}"]
NOT_OBJECT = [b"[]", b"1", b'"x"', b"null", b"true"]


@pytest.mark.parametrize(
    ("route", "body", "code"),
    [pytest.param(r, body, code, id=f"{r.name}:{cid}")
     for r in BODY_ROUTES for cid, body, code in _single_cases(r.operation)],
)
def test_bad_field_on_single_endpoint(api: CryptoAPI, route: Route, body: Any, code: str) -> None:
    _expect(api, route, body, code)


@pytest.mark.parametrize("route", BODY_ROUTES + BATCH_ROUTES, ids=lambda r: r.name)
@pytest.mark.parametrize("raw", BAD_JSON, ids=range(len(BAD_JSON)))
def test_malformed_json_is_invalid_json(api: CryptoAPI, route: Route, raw: bytes) -> None:
    _expect(api, route, raw, "invalid_json")


@pytest.mark.parametrize("route", BODY_ROUTES + BATCH_ROUTES, ids=lambda r: r.name)
@pytest.mark.parametrize("raw", NOT_OBJECT)
def test_body_that_is_not_an_object_is_invalid_input(api: CryptoAPI, route: Route, raw: bytes) -> None:
    _expect(api, route, raw, "invalid_input")


@pytest.mark.parametrize("route", BODY_ROUTES + BATCH_ROUTES, ids=lambda r: r.name)
def test_query_parameters_are_refused_on_body_routes(api: CryptoAPI, route: Route) -> None:
    body = (
        {"items": [VALID[route.operation.removesuffix(".batch")]]} if route.batch else VALID[route.operation]
    )
    _expect(api, route, body, "invalid_input", query="debug=1")


# ---- batches --------------------------------------------------------------------------

@pytest.mark.parametrize("route", BATCH_ROUTES, ids=lambda r: r.name)
@pytest.mark.parametrize(("case", "body", "code"), [
    ("missing-items", {}, "invalid_input"),
    ("items-not-array", {"items": {"key_id": KID}}, "invalid_input"),
    ("items-empty", {"items": []}, "invalid_input"),
    ("extra-top-level", {"items": [], "x": 1}, "invalid_input"),
])
def test_bad_batch_envelope(api: CryptoAPI, route: Route, case: str, body: Any, code: str) -> None:
    _expect(api, route, body, code)


@pytest.mark.parametrize("route", BATCH_ROUTES, ids=lambda r: r.name)
def test_batch_over_the_configured_maximum_is_batch_too_large(api: CryptoAPI, route: Route) -> None:
    item = VALID[route.operation.removesuffix(".batch")]
    parsed = api.parse(route, json.dumps({"items": [item] * api.max_batch_items}).encode())
    assert parsed.cost == api.max_batch_items
    exc = _expect(api, route, {"items": [item] * (api.max_batch_items + 1)}, "batch_too_large")
    assert str(api.max_batch_items) in exc.message


@pytest.mark.parametrize("route", BATCH_ROUTES, ids=lambda r: r.name)
def test_bad_items_fail_alone_with_their_own_code(api: CryptoAPI, route: Route) -> None:
    op = route.operation.removesuffix(".batch")
    cases = _single_cases(op)
    items = [VALID[op]] + [body for _, body, _ in cases] + [7, None, "x"]
    want = [None] + [code for _, _, code in cases] + ["invalid_input"] * 3
    api.max_batch_items = len(items)
    parsed = api.parse(route, json.dumps({"items": items}).encode())
    assert len(parsed.items) == len(items)
    for i, (item, code) in enumerate(zip(parsed.items, want, strict=True)):
        if code is None:
            assert not isinstance(item, QpherError)
        else:
            assert isinstance(item, QpherError) and item.code == code, (i, item)
            assert 400 <= item.status < 500
    # messages locate the item
    assert isinstance(parsed.items[1], QpherError) and "items[1]" in parsed.items[1].message


# ---- routes without a body -------------------------------------------------------------

@pytest.mark.parametrize("route", [r for r in NO_BODY_ROUTES if r.method != "GET"], ids=lambda r: r.name)
def test_no_body_routes_accept_empty_or_empty_object_and_refuse_fields(api: CryptoAPI, route: Route) -> None:
    params = {"key_id": KID} if "{key_id}" in route.template else {}
    assert api.parse(route, b"", params).fields.get("key_id") == params.get("key_id")
    assert api.parse(route, b"{}", params).fields.get("key_id") == params.get("key_id")
    _expect(api, route, {"force": True}, "invalid_input", params=params)
    _expect(api, route, b"{", "invalid_json", params=params)
    _expect(api, route, b"[]", "invalid_input", params=params)


@pytest.mark.parametrize(
    "route", [r for r in NO_BODY_ROUTES if "{key_id}" in r.template], ids=lambda r: r.name
)
@pytest.mark.parametrize("bad_id", ["..", "a" * 65, "%2e%2e", "k.1", "k%00"])
def test_malformed_path_key_id_is_key_not_found(api: CryptoAPI, route: Route, bad_id: str) -> None:
    exc = _expect(api, route, b"", "key_not_found", params={"key_id": bad_id})
    assert exc.status == 404


@pytest.mark.parametrize(
    "route", [r for r in NO_BODY_ROUTES if "{import_job_id}" in r.template], ids=lambda r: r.name
)
@pytest.mark.parametrize("bad_id", ["..", "a" * 65, "%2e%2e", "ij.1", "ij%00", KID, JID.upper()])
def test_malformed_path_import_job_id_is_import_job_not_found(
    api: CryptoAPI, route: Route, bad_id: str
) -> None:
    exc = _expect(api, route, b"", "import_job_not_found", params={"import_job_id": bad_id})
    assert exc.status == 404


@pytest.mark.parametrize(
    "route",
    [r for r in NO_BODY_ROUTES if r.owner == "api" and r.operation not in ("keys.list", "import_jobs.list")],
    ids=lambda r: r.name,
)
def test_query_parameters_are_refused_on_routes_without_any(api: CryptoAPI, route: Route) -> None:
    _expect(api, route, b"", "invalid_input", query="x=1")


@pytest.mark.parametrize("query", [
    "limit=0", "limit=101", "limit=abc", "limit=-1", "limit=1.5", "limit=", "limit=５", "limit=1&limit=2",
    "cursor=", "cursor=" + "a" * 513, "cursor=a%20b", "cursor=a b", "sort=asc", "api_key=x",
])
@pytest.mark.parametrize("op", ["keys.list", "import_jobs.list"])
def test_bad_list_query_is_invalid_input(api: CryptoAPI, query: str, op: str) -> None:
    route = next(r for r in ROUTES if r.operation == op)
    _expect(api, route, b"", "invalid_input", params={}, query=query)


def test_a_cursor_is_of_the_listed_kind(api: CryptoAPI) -> None:
    keys = next(r for r in ROUTES if r.operation == "keys.list")
    jobs = next(r for r in ROUTES if r.operation == "import_jobs.list")
    assert api.parse(jobs, b"", {}, f"limit=5&cursor={JID}").fields == {"limit": 5, "cursor": JID}
    _expect(api, jobs, b"", "invalid_input", params={}, query=f"cursor={KID}")
    _expect(api, keys, b"", "invalid_input", params={}, query=f"cursor={JID}")


def test_import_fields_are_converted(api: CryptoAPI) -> None:
    route = next(r for r in ROUTES if r.operation == "keys.import_version")
    parsed = api.parse(route, json.dumps(VALID["keys.import_version"]).encode(), {"key_id": KID})
    assert parsed.fields == {
        "import_job_id": JID, "wrapped_key": b"w" * 1190, "format": "pkcs8", "key_id": KID}
    assert parsed.key_ids() == (KID,)
    route = next(r for r in ROUTES if r.operation == "keys.import")
    body = {**VALID["keys.import"], "wrapped_key": B(b"w" * 3072).decode()}
    parsed = api.parse(route, json.dumps(body).encode())
    assert parsed.fields["wrapped_key"] == b"w" * 3072 and parsed.key_ids() == ()
    route = next(r for r in ROUTES if r.operation == "import_jobs.create")
    for ttl, want in [(60, 60), (604800, 604800), (3600.0, 3600)]:
        fields = api.parse(route, json.dumps({"method": "hpke-x-wing", "ttl_seconds": ttl}).encode()).fields
        assert fields == {"method": "hpke-x-wing", "ttl_seconds": want}
        assert type(fields["ttl_seconds"]) is int


def test_list_query_accepts_raw_string_and_mapping(api: CryptoAPI) -> None:
    route = next(r for r in ROUTES if r.operation == "keys.list")
    assert api.parse(route, b"", {}, f"limit=5&cursor={KID}").fields == {"limit": 5, "cursor": KID}
    assert api.parse(route, b"", {}, {"limit": ["7"]}).fields == {"limit": 7, "cursor": None}
    assert api.parse(route, b"", {}, None).fields == {"limit": 50, "cursor": None}
    _expect(api, route, b"", "invalid_input", params={}, query={"limit": ["1", "2"]})  # type: ignore[arg-type]


# ---- the primitives ---------------------------------------------------------------------

@pytest.mark.parametrize("data", [b"", b"a", b"ab", b"abc", bytes(range(256))])
def test_decode_b64_round_trips_canonical_encodings(data: bytes) -> None:
    assert decode_b64(base64.b64encode(data).decode(), "f") == data


@pytest.mark.parametrize("bad", ["YR==", "YWJ=", "YWJj\n", "YWJj ", " YWJj", "YW Jj", "YWJj=", "=YWJ",
                                 "YW=j", "YWJjZA", "YWJjZA=", "-_-_", "YWJj\r\n"])
def test_decode_b64_refuses_non_canonical_or_invalid(bad: str) -> None:
    with pytest.raises(QpherError) as info:
        decode_b64(bad, "ciphertext")
    assert info.value.code == "invalid_base64" and "'ciphertext'" in info.value.message


@settings(max_examples=400, deadline=None)
@given(text=st.text(st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="),
                    max_size=40).filter(lambda t: len(t) % 4 == 0),
       prefix=st.binary(max_size=600).filter(lambda b: len(b) % 3 == 0))
def test_decode_b64_accepts_exactly_the_canonical_encodings(text: str, prefix: bytes) -> None:
    """Only the padded last group is re-encoded to check it: a long canonical prefix in front
    of any last group changes nothing about the verdict."""
    for candidate in (text, base64.b64encode(prefix).decode() + text):
        try:
            data = decode_b64(candidate, "f")
        except QpherError as exc:
            assert exc.code == "invalid_base64"
            continue
        assert base64.b64encode(data).decode() == candidate


def test_messages_never_echo_values() -> None:
    secret = "c2VjcmV0LXBsYWludGV4dA="  # bad padding: must not appear in the message
    with pytest.raises(QpherError) as info:
        decode_b64(secret, "plaintext")
    assert secret not in info.value.message and secret not in repr(info.value)


def test_load_json_duplicate_keys_at_any_depth() -> None:
    with pytest.raises(QpherError) as info:
        load_json(b'{"items": [{"key_id": "a", "key_id": "b"}]}')
    assert info.value.code == "invalid_json"


@pytest.mark.parametrize(
    "query",
    ["version=0", "version=x", "version=", "version=2147483648", "version=1&version=2", "v=1", "version=01x"],
)
def test_bad_key_version_query_is_invalid_input(api: CryptoAPI, query: str) -> None:
    route = next(r for r in ROUTES if r.operation == "keys.read")
    _expect(api, route, b"", "invalid_input", query=query)


def test_key_version_query_is_parsed(api: CryptoAPI) -> None:
    route = next(r for r in ROUTES if r.operation == "keys.read")
    assert api.parse(route, b"", {"key_id": KID}, "version=3").fields == {"key_id": KID, "version": 3}
    assert api.parse(route, b"", {"key_id": KID}, "").fields == {"key_id": KID, "version": None}


@pytest.mark.parametrize("raw", [b"3", b"3.0", b"3e0", b"0.3e1", b"3.000"])
def test_a_number_with_a_zero_fraction_is_an_integer_key_version(api: CryptoAPI, raw: bytes) -> None:
    route = next(r for r in ROUTES if r.operation == "kem.decapsulate")
    body = b'{"key_id": "%s", "ciphertext": "", "key_version": %s}' % (KID.encode(), raw)
    version = api.parse(route, body).fields["key_version"]
    assert (version, type(version)) == (3, int)


@pytest.mark.parametrize("raw", [b"3.5", b"0.0", b"-1.0", b"2147483648.0", b"1e400", b"true"])
def test_a_number_that_is_not_a_key_version_is_invalid_input(api: CryptoAPI, raw: bytes) -> None:
    route = next(r for r in ROUTES if r.operation == "kem.decapsulate")
    _expect(api, route, b'{"key_id": "%s", "ciphertext": "", "key_version": %s}' % (KID.encode(), raw),
            "invalid_input")


@pytest.mark.parametrize("reason", ["policy repo outage", "  padded  ", "x", "é ü 漢字 🙂", "x" * 500])
def test_one_line_reason_is_accepted(api: CryptoAPI, reason: str) -> None:
    route = next(r for r in ROUTES if r.operation == "admin.fail_open.set")
    assert api.parse(route, json.dumps({"reason": reason, "seconds": 60}).encode()).fields["reason"] == reason
