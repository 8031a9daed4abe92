"""``qpher_proxy._json`` gives exactly what the plain ``json.dumps`` / ``strftime`` paths give."""

from __future__ import annotations

import json
import math
import time
from email.utils import formatdate
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qpher_proxy import _json
from qpher_proxy.audit.records import encode_record
from qpher_proxy.http.messages import Base64Text, Response

_FLOATS = st.floats(allow_nan=False, allow_infinity=False)
_SCALARS = st.none() | st.booleans() | st.integers() | st.text() | _FLOATS
_TREES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@pytest.mark.parametrize("ensure_ascii", [False, True])
@given(obj=_TREES)
def test_compact_encoder_equals_json_dumps(ensure_ascii: bool, obj: Any) -> None:
    dumps = _json.compact_encoder(ensure_ascii=ensure_ascii)
    assert dumps(obj) == json.dumps(obj, separators=(",", ":"), ensure_ascii=ensure_ascii)


def test_compact_encoder_uses_default_like_json_dumps() -> None:
    dumps = _json.compact_encoder(ensure_ascii=True, default=str)
    obj = {"path": object.__new__(type("P", (), {"__str__": lambda self: "/x"})), "n": [1, "é"]}
    assert dumps(obj) == json.dumps(obj, separators=(",", ":"), default=str)


def test_compact_encoder_refuses_nan_like_json_dumps() -> None:
    dumps = _json.compact_encoder(ensure_ascii=True, allow_nan=False)
    with pytest.raises(ValueError):
        dumps({"x": math.nan})
    with pytest.raises(ValueError):
        json.dumps({"x": math.nan}, allow_nan=False)
    assert _json.compact_encoder(ensure_ascii=True)([math.inf]) == json.dumps([math.inf])


@given(obj=st.dictionaries(st.text(max_size=8), _SCALARS, max_size=6))
def test_response_json_equals_json_dumps(obj: dict[str, Any]) -> None:
    body = Response.json(200, obj).body
    assert body == json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


@given(data=st.binary(max_size=64), extra=st.text(max_size=8))
def test_response_json_copies_base64_text_as_json_dumps_writes_it(data: bytes, extra: str) -> None:
    obj = {"signature": Base64Text.of(data), "x": extra}
    assert Response.json(200, obj).body == json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


_FIELD_NAMES = st.sampled_from(["a", "b", "key_id", "ü"])


@given(fields=st.dictionaries(_FIELD_NAMES, _SCALARS | st.lists(_SCALARS, max_size=3)))
def test_audit_line_equals_json_dumps_of_the_sorted_record(fields: dict[str, Any]) -> None:
    line = encode_record(3, "2026-01-01T00:00:00.000Z", "key.created", "info", fields, "0" * 64)
    plain = {"seq": 3, "ts": "2026-01-01T00:00:00.000Z", "event": "key.created", "severity": "info"}
    plain.update(sorted(fields.items()))
    plain["prev"] = "0" * 64
    assert line == json.dumps(plain, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


@given(now=st.floats(min_value=0, max_value=4e9))
def test_iso_millis_equals_strftime(now: float) -> None:
    whole = int(now)
    plain = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{int((now - whole) * 1000):03d}Z"
    assert _json.iso_millis(now) == plain


@given(now=st.integers(min_value=0, max_value=4_000_000_000))
def test_http_date_equals_formatdate(now: int) -> None:
    assert _json.http_date(now) == formatdate(now, usegmt=True).encode("ascii")
    assert _json.http_date(now + 0.5) == formatdate(now, usegmt=True).encode("ascii")  # same second, cached
