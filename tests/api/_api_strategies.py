"""Hypothesis strategies for request bodies, shared by the handler fuzz (tests/api) and the
live-gateway fuzz (tests/e2e): random JSON, field-aware near-valid values and random bytes."""

from __future__ import annotations

import base64
import json
from typing import Any

from hypothesis import strategies as st

from qpher_proxy.api import Route
from qpher_proxy.api.validation import (
    IMPORT_FORMATS,
    IMPORT_METHODS,
    LABEL_PATTERN,
    REQUEST_FIELDS,
    Field,
    FieldType,
)
from qpher_proxy.crypto.algorithms import ALGORITHMS

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)

# the sizes the KMS checks: exact and off by a little
_SIZES = sorted({a.ciphertext_size for a in ALGORITHMS.values() if a.ciphertext_size}
                | {a.ciphertext_size + 16 + 5 for a in ALGORITHMS.values() if a.ciphertext_size}
                | {a.signature_size for a in ALGORITHMS.values() if a.signature_size}
                | {a.public_key_size for a in ALGORITHMS.values()})


def b64(max_size: int) -> st.SearchStrategy[str]:
    raw = st.one_of(st.binary(max_size=max_size),
                    st.sampled_from(_SIZES).flatmap(lambda n: st.binary(min_size=n, max_size=n)))
    return raw.map(lambda b: base64.b64encode(b).decode())


def value(field: Field, key_ids: list[str], job_ids: list[str] | None = None,
          wrapped: list[str] | None = None) -> st.SearchStrategy[Any]:
    """Near-valid values of a field: ``job_ids`` and ``wrapped`` (base64 wrapped keys) feed the
    key-import fields, as ``key_ids`` the key ids."""
    t = field.type
    near: st.SearchStrategy[Any]
    if t is FieldType.KEY_ID:
        near = st.sampled_from(key_ids) | st.text(max_size=30)
    elif t is FieldType.IMPORT_JOB_ID:
        near = st.sampled_from(job_ids or ["ij_" + "a" * 26]) | st.text(max_size=30)
    elif t is FieldType.WRAPPED_KEY:
        near = b64(64) | st.sampled_from(wrapped or [""]) | st.text(max_size=12)
    elif t is FieldType.IMPORT_METHOD:
        near = st.sampled_from(list(IMPORT_METHODS) + ["hpke-rsa", ""])
    elif t is FieldType.FORMAT:
        near = st.sampled_from(list(IMPORT_FORMATS) + ["der", ""])
    elif t is FieldType.TTL:
        near = st.integers(-1, 10**6) | st.sampled_from([59, 60, 604800, 604801])
    elif t is FieldType.BYTES:
        near = b64(64) | st.text(max_size=12)
    elif t is FieldType.CONTEXT:
        near = b64(300)
    elif t is FieldType.VERSION:
        near = st.integers(-2, 4) | st.sampled_from([2**31 - 1, 2**31, 2**63]) | st.booleans()
    elif t is FieldType.ALGORITHM:
        near = st.sampled_from([*ALGORITHMS, "rsa-2048", "ML-KEM-768", ""])
    elif t is FieldType.KIND:
        near = st.sampled_from(["kem", "signature", "KEM", ""])
    elif t is FieldType.MODE:
        near = st.sampled_from(["pqc", "hybrid", "classic"])
    elif t is FieldType.LABEL:
        near = st.from_regex(LABEL_PATTERN, fullmatch=True) | st.text(max_size=20)
    elif t is FieldType.REASON:
        near = st.text(max_size=20)
    else:
        near = st.integers(-5, 10**6) | st.floats(allow_nan=False, allow_infinity=False)
    return st.one_of(near, near, near, JSON)


@st.composite
def item(draw: st.DrawFn, spec: dict[str, Field], key_ids: list[str], job_ids: list[str] | None = None,
         wrapped: list[str] | None = None) -> Any:
    if draw(st.integers(0, 9)) == 0:
        return draw(JSON)
    obj: dict[str, Any] = {}
    for name, f in spec.items():
        if draw(st.integers(0, 9)) < (9 if f.required else 5):
            obj[name] = draw(value(f, key_ids, job_ids, wrapped))
    if draw(st.integers(0, 14)) == 0:
        obj[draw(st.text(max_size=8))] = draw(JSON)
    return obj


def body(route: Route, key_ids: list[str], *, max_batch: int, job_ids: list[str] | None = None,
         wrapped: list[str] | None = None) -> st.SearchStrategy[bytes]:
    random_json = JSON.map(lambda v: json.dumps(v).encode())
    raw = st.binary(max_size=64)
    if not route.has_body:
        return st.one_of(st.just(b""), st.just(b"{}"), random_json, raw)
    if route.batch:
        spec = REQUEST_FIELDS[route.operation.removesuffix(".batch")]
        shaped = st.lists(item(spec, key_ids), max_size=max_batch).map(lambda items: {"items": items})
    else:
        shaped = item(REQUEST_FIELDS[route.operation], key_ids, job_ids, wrapped)
    encoded = shaped.map(lambda v: json.dumps(v).encode())
    return st.one_of(encoded, encoded, encoded, random_json, raw)
