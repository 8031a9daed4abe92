"""openapi.yaml and the code say the same thing: routes, methods, fields, codes, patterns."""

from __future__ import annotations

import base64
import json
import re
from typing import Any

import pytest
from _api_fake_kms import FakeKMS
from _api_openapi import (
    deref,
    doc,
    documented_codes,
    operation,
    request_schema,
    validate_request,
    validate_response,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from qpher_proxy.api import DEFAULT_MAX_BATCH_ITEMS, ROUTES, CryptoAPI, Route
from qpher_proxy.api.routes import RouteMethodNotAllowed, routes_by_operation
from qpher_proxy.api.validation import (
    DEFAULT_IMPORT_JOB_TTL_SECONDS,
    DEFAULT_LIST_LIMIT,
    IMPORT_FORMATS,
    IMPORT_JOB_ID_PATTERN,
    IMPORT_METHODS,
    KEY_ID_PATTERN,
    LABEL_PATTERN,
    MAX_IMPORT_JOB_TTL_SECONDS,
    MAX_LIST_LIMIT,
    MAX_REASON_CHARS,
    MAX_WRAPPED_KEY_BYTES,
    MIN_IMPORT_JOB_TTL_SECONDS,
    REASON_PATTERN,
    REQUEST_FIELDS,
    decode_b64,
)
from qpher_proxy.config.model import FailOpenConfig
from qpher_proxy.crypto.algorithms import ALGORITHMS, MAX_CONTEXT_BYTES
from qpher_proxy.errors import QpherError
from qpher_proxy.policy.engine import DEFAULT_FAIL_OPEN_MAX_SECONDS

METHODS = {"get", "post", "put", "delete", "patch", "head", "options", "trace"}


def _all_codes() -> set[str]:
    seen: set[str] = set()
    todo: list[type[QpherError]] = [QpherError]
    while todo:
        cls = todo.pop()
        seen.add(cls.code)
        todo += cls.__subclasses__()
    return seen


def test_every_route_is_documented_and_every_documented_operation_is_routed() -> None:
    documented = {(m.upper(), path) for path, item in doc()["paths"].items() for m in item if m in METHODS}
    routed = {(r.method, r.template) for r in ROUTES}
    assert documented == routed


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: r.name)
def test_operation_metadata_matches_the_route(route: Route) -> None:
    op = operation(route)
    assert op["x-qpher-operation"] == route.operation
    assert op.get("x-qpher-quota") == route.quota
    assert bool(op.get("x-qpher-admin")) == route.admin
    assert (op.get("security") == []) == route.public
    assert str(route.status) in op["responses"]
    assert "405" in op["responses"]
    if not route.public:
        assert {"401", "403"} <= set(op["responses"])
    if route.has_body or (route.method != "GET" and route.owner == "api"):
        assert "413" in op["responses"], "every route that reads a body can answer 413"
    assert ("requestBody" in op) == route.has_body
    params = [deref(p) for p in doc()["paths"][route.template].get("parameters", [])]
    assert [p["name"] for p in params if p["in"] == "path"] == re.findall(r"{(\w+)}", route.template)


def test_operation_ids_are_unique() -> None:
    ids = [operation(r)["operationId"] for r in ROUTES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("route", [r for r in ROUTES if r.has_body], ids=lambda r: r.name)
def test_request_schema_fields_match_the_validator(route: Route) -> None:
    schema = request_schema(route)
    assert schema["additionalProperties"] is False
    if route.batch:
        assert schema["required"] == ["items"] and set(schema["properties"]) == {"items"}
        items = schema["properties"]["items"]
        assert (items["minItems"], items["maxItems"]) == (1, DEFAULT_MAX_BATCH_ITEMS)
        # an item is the single operation's request, or anything else (refused on its own)
        single, refused = items["items"]["anyOf"]
        assert refused == {"$ref": "#/components/schemas/RefusedBatchItem"}
        assert deref(refused).keys() == {"description"}, "RefusedBatchItem accepts any value"
        single_route = routes_by_operation()[route.operation.removesuffix(".batch")]
        assert deref(single) is request_schema(single_route)
        schema = deref(single)
        assert schema["additionalProperties"] is False
        spec = REQUEST_FIELDS[single_route.operation]
    else:
        spec = REQUEST_FIELDS[route.operation]
    assert set(schema["properties"]) == set(spec)
    assert set(schema.get("required", [])) == {n for n, f in spec.items() if f.required}


def test_documented_error_codes_all_exist() -> None:
    known = _all_codes() | {RouteMethodNotAllowed.code}
    for route in ROUTES:
        for status in operation(route)["responses"]:
            for c in documented_codes(route, int(status)):
                assert c in known, f"{route.name} {status}: unknown code {c!r}"


def test_key_dependent_codes_are_documented_codes() -> None:
    """``x-qpher-key-dependent-codes`` (refusals a schema-valid request may get, because they
    depend on the key) name codes the same response documents."""
    seen = 0
    for route in ROUTES:
        for status, raw in operation(route)["responses"].items():
            extra = deref(raw).get("x-qpher-key-dependent-codes")
            if extra is not None:
                seen += 1
                assert set(extra) <= set(documented_codes(route, int(status))), route.name
    assert seen == 10  # the single crypto operations, the two key imports and the two audit proofs


def test_error_responses_use_the_error_schema() -> None:
    for route in ROUTES:
        for status in operation(route)["responses"]:
            if int(status) >= 400 and documented_codes(route, int(status)):
                validate_response(
                    route, int(status), {"error": {"code": "x", "message": "m", "request_id": "r"}}
                )


def test_every_component_schema_is_a_valid_json_schema() -> None:
    for schema in doc()["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)


def test_constants_in_the_document_match_the_code() -> None:
    s = doc()["components"]["schemas"]
    assert s["KeyIdValue"]["pattern"] == f"^{KEY_ID_PATTERN}$"
    assert s["Cursor"]["pattern"] == f"^{KEY_ID_PATTERN}$"
    assert s["Label"]["pattern"] == f"^{LABEL_PATTERN}$"
    assert s["AlgorithmName"]["enum"] == list(ALGORITHMS)
    assert s["Context"]["allOf"][1]["maxLength"] == 4 * ((MAX_CONTEXT_BYTES + 2) // 3)
    reason = s["FailOpenRequest"]["properties"]["reason"]
    assert (reason["maxLength"], reason["pattern"]) == (MAX_REASON_CHARS, f"^{REASON_PATTERN}$")
    seconds = s["FailOpenRequest"]["properties"]["seconds"]
    assert seconds["maximum"] == DEFAULT_FAIL_OPEN_MAX_SECONDS == FailOpenConfig().max_seconds
    limit = next(p for p in operation(next(r for r in ROUTES if r.operation == "keys.list"))["parameters"]
                 if p["name"] == "limit")["schema"]
    assert (limit["maximum"], limit["default"]) == (MAX_LIST_LIMIT, DEFAULT_LIST_LIMIT)
    kem_ids = sorted(a.hpke_kem_id for a in ALGORITHMS.values() if a.hpke_kem_id is not None)
    assert sorted(s["HPKESuite"]["properties"]["kem_id"]["enum"]) == kem_ids


def test_key_import_constants_in_the_document_match_the_code() -> None:
    s = doc()["components"]["schemas"]
    assert s["ImportJobIdValue"]["pattern"] == s["ImportJobCursor"]["pattern"] == f"^{IMPORT_JOB_ID_PATTERN}$"
    assert s["ImportMethod"]["enum"] == list(IMPORT_METHODS)
    assert s["KeyFormat"]["enum"] == list(IMPORT_FORMATS)
    assert MAX_WRAPPED_KEY_BYTES % 3 == 0, "a base64 maxLength states the limit exactly"
    assert s["WrappedKey"]["allOf"][1]["maxLength"] == 4 * MAX_WRAPPED_KEY_BYTES // 3
    ttl = s["CreateImportJobRequest"]["properties"]["ttl_seconds"]
    assert (ttl["minimum"], ttl["maximum"], ttl["default"]) == (
        MIN_IMPORT_JOB_TTL_SECONDS, MAX_IMPORT_JOB_TTL_SECONDS, DEFAULT_IMPORT_JOB_TTL_SECONDS)
    listing = operation(next(r for r in ROUTES if r.operation == "import_jobs.list"))
    limit = next(p for p in listing["parameters"] if p["name"] == "limit")["schema"]
    assert (limit["maximum"], limit["default"]) == (MAX_LIST_LIMIT, DEFAULT_LIST_LIMIT)


# Every (algorithm, kind, mode) a client may send, each field also absent.
_CREATE_COMBOS = [
    {k: v for k, v in (("algorithm", a), ("kind", k), ("mode", m)) if v is not None}
    for a in [*ALGORITHMS, None] for k in ["kem", "signature", None] for m in ["pqc", "hybrid", None]
]


@pytest.mark.parametrize("body", _CREATE_COMBOS, ids=lambda b: json.dumps(b))
def test_create_key_schema_accepts_exactly_what_the_server_accepts(
    api: CryptoAPI, body: dict[str, str]
) -> None:
    route = routes_by_operation()["keys.create"]
    try:
        api.parse(route, json.dumps(body).encode())
        accepted = True
    except QpherError:
        accepted = False
    assert validate_request(route, body) == accepted


# The pattern as ECMA-262 reads it: its closing `$` is the end of the string (Python's `$` also
# matches before a final newline, which the document does not mean).
_REASON_RE = re.compile(
    doc()["components"]["schemas"]["FailOpenRequest"]["properties"]["reason"]["pattern"].removesuffix("$")
    + r"\Z"
)
_PARSER = CryptoAPI(FakeKMS())


# Lone surrogates are left out: JSON Schema strings are Unicode scalar values, so no pattern
# speaks of them (the description says they are refused, and test_api_validation checks it).
@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.text(alphabet=st.characters(codec="utf-8"), max_size=12),
    st.text(alphabet=st.characters(codec="utf-8", categories=["Cc", "Cf", "Zs", "Zl", "Zp"]), max_size=4),
    st.text(alphabet=" a\t\n\u00a0\u202e\u2028\u200b", max_size=4),
))
def test_reason_pattern_in_the_document_agrees_with_the_validator(reason: str) -> None:
    route = routes_by_operation()["admin.fail_open.set"]
    try:
        _PARSER.parse(route, json.dumps({"reason": reason, "seconds": 1}).encode())
        accepted = True
    except QpherError:
        accepted = False
    assert (bool(_REASON_RE.match(reason)) and 1 <= len(reason) <= MAX_REASON_CHARS) == accepted, ascii(
        reason
    )


_B64_RE = re.compile(doc()["components"]["schemas"]["Base64"]["pattern"])


def _decodes(s: str) -> bool:
    try:
        decode_b64(s, "f")
    except QpherError:
        return False
    return True


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode()),
    st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=-_ \n", max_size=16),
    st.text(max_size=8),
))
def test_base64_pattern_in_the_document_agrees_with_the_decoder(s: str) -> None:
    assert bool(_B64_RE.fullmatch(s)) == _decodes(s), s


@pytest.mark.parametrize("name", sorted(n for n in doc()["components"]["schemas"] if n.endswith("Request")))
def test_request_schemas_are_strict(name: str) -> None:
    schema: dict[str, Any] = doc()["components"]["schemas"][name]
    assert schema.get("additionalProperties") is False, name
