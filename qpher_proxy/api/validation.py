"""Strict request validation for the /v1 API: JSON, field types, base64, sizes.

Theory of operation
-------------------
Every request body is parsed exactly once, here, into plain Python values (``bytes`` for
base64 fields, ``int`` for versions, an :class:`~qpher_proxy.crypto.algorithms.Algorithm`
name for algorithms). Handlers never see raw JSON. The rules, which ``openapi.yaml`` states
for each schema and ``tests/api`` checks against it:

* the body is one UTF-8 JSON document; duplicate object keys, ``NaN``/``Infinity``, integers
  of more than 4300 digits and nesting deep enough to exhaust the parser are refused as
  ``invalid_json`` (duplicate keys, because two parsers could read two different requests
  from one body);
* the body is a JSON object whose fields are exactly the documented ones: an unknown field is
  ``invalid_input`` (a typo such as ``"contxt"`` must not silently sign without a context);
  optional fields are omitted, not ``null``;
* bytes are standard base64 (RFC 4648 §4) with padding, canonical (no whitespace, no
  non-zero pad bits): anything else is ``invalid_base64`` naming the field;
* an integer is what JSON Schema calls one: a JSON number with a zero fraction, so a key
  version of ``3.0`` is 3;
* key ids that cannot be ours are ``key_not_found`` (404) without asking the KMS, exactly what
  an unknown or another tenant's id answers, so the format check reveals nothing;
* a signature context longer than 255 bytes (FIPS 204 §5.2) is ``invalid_context``;
* import job ids that cannot be ours are ``import_job_not_found`` (404), exactly what an
  unknown or another tenant's job answers;
* a wrapped key (key import) is at most :data:`MAX_WRAPPED_KEY_BYTES` decoded, else
  ``invalid_input``; whether it opens is the KMS's to say (``invalid_wrapped_key``);
* an ``Idempotency-Key`` header (key creation, rotation and import only) is one header of
  1..255 visible ASCII characters, else ``invalid_idempotency_key``; its value is never echoed.

Messages name the field (``items[3].ciphertext``) and the expected type; they never echo a
value other than an identifier (a truncated algorithm name or key id), so no plaintext or
secret reaches an error message.
"""

from __future__ import annotations

import binascii
import enum
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..crypto.algorithms import (
    DEFAULT_KEM,
    DEFAULT_SIGNATURE,
    HYBRID_KEM,
    HYBRID_SIGNATURE,
    MAX_CONTEXT_BYTES,
    Kind,
    Mode,
    get_algorithm,
)
from ..crypto.key_import import IMPORT_FORMATS
from ..crypto.key_import import IMPORT_METHODS as _IMPORT_METHODS
from ..errors import (
    InvalidBase64,
    InvalidContext,
    InvalidIdempotencyKey,
    InvalidInput,
    InvalidJSON,
)
from ..kms.wire.model import (
    DEFAULT_IMPORT_JOB_TTL,
    DEFAULT_LIST_LIMIT,
    IDEMPOTENCY_KEY_RE,
    IMPORT_JOB_ID_RE,
    KEY_ID_RE,
    MAX_IDEMPOTENCY_KEY_CHARS,
    MAX_IMPORT_JOB_TTL,
    MAX_LIST_LIMIT,
    MIN_IMPORT_JOB_TTL,
    import_job_not_found,
    key_not_found,
)

__all__ = [
    "FieldType", "Field", "REQUEST_FIELDS", "NO_BODY_OPERATIONS", "DEFAULT_ALGORITHMS",
    "load_json", "load_object", "parse_fields", "decode_b64", "check_key_id", "parse_query",
    "parse_list_query", "parse_version_query", "KEY_ID_PATTERN", "LABEL_PATTERN",
    "MAX_KEY_VERSION", "MAX_LIST_LIMIT", "DEFAULT_LIST_LIMIT", "MAX_REASON_CHARS", "REASON_PATTERN",
    "IDEMPOTENT_OPERATIONS", "parse_idempotency_key", "IMPORT_METHODS", "IMPORT_FORMATS",
    "DEFAULT_IMPORT_JOB_TTL_SECONDS", "MIN_IMPORT_JOB_TTL_SECONDS", "MAX_IMPORT_JOB_TTL_SECONDS",
    "MAX_WRAPPED_KEY_BYTES",
    "IMPORT_JOB_ID_PATTERN", "check_import_job_id", "import_job_not_found",
]

# The API operations that honour an Idempotency-Key header; every other route ignores it.
IDEMPOTENT_OPERATIONS = frozenset({"keys.create", "keys.rotate", "keys.import", "keys.import_version"})

# Key import (BYOK). A job's method is its HPKE KEM (with HKDF-SHA256 and AES-256-GCM, as
# /v1/encrypt); a job lives ttl_seconds (default a day, a minute to a week) and serves until then.
IMPORT_METHODS = tuple(_IMPORT_METHODS)  # hpke-x-wing, hpke-ml-kem-768, hpke-ml-kem-1024
DEFAULT_IMPORT_JOB_TTL_SECONDS = DEFAULT_IMPORT_JOB_TTL
MIN_IMPORT_JOB_TTL_SECONDS = MIN_IMPORT_JOB_TTL
MAX_IMPORT_JOB_TTL_SECONDS = MAX_IMPORT_JOB_TTL
# enc (at most 1568 bytes, ML-KEM-1024) + the key material (at most 86 bytes: a seed-form PKCS#8
# of ML-KEM) + the 16-byte tag is under 1.7 KiB. A multiple of 3, so that openapi.yaml states the
# limit exactly as a base64 maxLength (4096 characters).
MAX_WRAPPED_KEY_BYTES = 3 * 1024
# Import job ids are minted by the KMS (``ij_`` + 130 random bits); nothing else can be one.
IMPORT_JOB_ID_PATTERN = IMPORT_JOB_ID_RE.pattern.removesuffix(r"\Z")

# Key ids are minted by the KMS (random, 130 bits); anything outside this shape cannot be one.
KEY_ID_PATTERN = KEY_ID_RE.pattern.removesuffix(r"\Z")
# Labels show up in logs and policy facts: a restricted alphabet keeps them printable and inert.
LABEL_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}"
MAX_KEY_VERSION = 2**31 - 1
MAX_REASON_CHARS = 500
# A fail-open reason is one line of text that operators read in the audit log: not only
# spaces; no control characters, no whitespace but the space, no bidirectional formatting
# characters (they reorder what a reader sees: CVE-2021-42574). A fixed character class rather
# than str.isprintable(), whose answer moves with the Unicode database of the running Python;
# openapi.yaml states this same pattern. Lone surrogates, which no pattern can portably name,
# are refused beside it.
_REASON_BANNED = (r"\x00-\x1f\x7f-\xa0\u061c\u1680\u2000-\u200a\u200e\u200f\u2028-\u202f\u205f"
                  r"\u2066-\u2069\u3000")
REASON_PATTERN = rf" *[^ {_REASON_BANNED}][^{_REASON_BANNED}]*"

_KEY_ID = re.compile(KEY_ID_PATTERN)
_LABEL = re.compile(LABEL_PATTERN)
_REASON = re.compile(REASON_PATTERN)
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_IMPORT_JOB_ID = re.compile(IMPORT_JOB_ID_PATTERN)
_CURSOR = _KEY_ID  # a cursor is the last key id of the previous page


class FieldType(enum.Enum):
    KEY_ID = "key_id"
    BYTES = "bytes"  # standard base64
    CONTEXT = "context"  # standard base64, at most 255 bytes decoded
    VERSION = "version"  # integer 1 .. 2**31-1
    ALGORITHM = "algorithm"
    KIND = "kind"
    MODE = "mode"
    LABEL = "label"
    REASON = "reason"  # one line of text, 1..500 characters (REASON_PATTERN)
    SECONDS = "seconds"  # finite number > 0
    IMPORT_JOB_ID = "import_job_id"
    IMPORT_METHOD = "import_method"  # one of IMPORT_METHODS
    TTL = "ttl"  # integer seconds MIN_IMPORT_JOB_TTL_SECONDS .. MAX_IMPORT_JOB_TTL_SECONDS
    WRAPPED_KEY = "wrapped_key"  # standard base64, at most MAX_WRAPPED_KEY_BYTES decoded
    FORMAT = "format"  # one of IMPORT_FORMATS


@dataclass(frozen=True, slots=True)
class Field:
    type: FieldType
    required: bool = False


def _f(t: FieldType, required: bool = False) -> Field:
    return Field(t, required)


T = FieldType

# The request fields of every operation with a JSON body. Batch operations take
# {"items": [ <the single operation's object>, ... ]}.
REQUEST_FIELDS: dict[str, dict[str, Field]] = {
    "keys.create": {
        "algorithm": _f(T.ALGORITHM), "kind": _f(T.KIND), "mode": _f(T.MODE), "label": _f(T.LABEL),
    },
    "kem.encapsulate": {"key_id": _f(T.KEY_ID, True)},
    "kem.decapsulate": {
        "key_id": _f(T.KEY_ID, True), "ciphertext": _f(T.BYTES, True), "key_version": _f(T.VERSION),
    },
    "encrypt": {"key_id": _f(T.KEY_ID, True), "plaintext": _f(T.BYTES, True), "aad": _f(T.BYTES)},
    "decrypt": {
        "key_id": _f(T.KEY_ID, True), "ciphertext": _f(T.BYTES, True), "aad": _f(T.BYTES),
        "key_version": _f(T.VERSION),
    },
    "sign": {"key_id": _f(T.KEY_ID, True), "message": _f(T.BYTES, True), "context": _f(T.CONTEXT)},
    "verify": {
        "key_id": _f(T.KEY_ID, True), "message": _f(T.BYTES, True), "signature": _f(T.BYTES, True),
        "context": _f(T.CONTEXT), "key_version": _f(T.VERSION),
    },
    "admin.fail_open.set": {"reason": _f(T.REASON, True), "seconds": _f(T.SECONDS, True)},
    "import_jobs.create": {"method": _f(T.IMPORT_METHOD, True), "ttl_seconds": _f(T.TTL)},
    "keys.import": {
        "import_job_id": _f(T.IMPORT_JOB_ID, True), "algorithm": _f(T.ALGORITHM, True),
        "wrapped_key": _f(T.WRAPPED_KEY, True), "format": _f(T.FORMAT), "label": _f(T.LABEL),
    },
    "keys.import_version": {
        "import_job_id": _f(T.IMPORT_JOB_ID, True), "wrapped_key": _f(T.WRAPPED_KEY, True),
        "format": _f(T.FORMAT),
    },
}

# Operations with a key id in the path and no body (an empty body or {} is accepted).
NO_BODY_OPERATIONS = frozenset({
    "keys.list", "keys.read", "keys.destroy", "keys.rotate", "keys.disable", "keys.enable",
    "keys.cancel_destroy", "info", "health", "ready", "metrics", "admin.fail_open.clear",
    "import_jobs.list", "import_jobs.read",
    # the audit log's routes (answered by the server; proofs read their query there)
    "audit.checkpoint.read", "audit.checkpoint.create", "audit.proof.inclusion", "audit.proof.consistency",
    "audit.vkeys",
})

_JSON_TYPE = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer",
              float: "number", type(None): "null"}


def json_type(value: object) -> str:
    return _JSON_TYPE.get(type(value), type(value).__name__)


def _shown(name: str) -> str:
    return name if len(name) <= 40 else name[:40] + "..."


# ---- JSON -------------------------------------------------------------------------------

def _pairs_no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for k, v in pairs:
        if k in obj:
            raise InvalidJSON(f"duplicate key {_shown(k)!r} in a JSON object")
        obj[k] = v
    return obj


def _no_constant(name: str) -> Any:
    raise InvalidJSON(f"{name} is not valid JSON")


# json.loads(text, object_pairs_hook=..., parse_constant=...) builds this decoder on every call.
_DECODER = json.JSONDecoder(object_pairs_hook=_pairs_no_duplicates, parse_constant=_no_constant)


def load_json(body: bytes) -> Any:
    """Parse one strict JSON document (see the module docstring) or raise ``InvalidJSON``."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidJSON("request body is not valid UTF-8") from exc
    if not text.strip():
        raise InvalidJSON("request body is empty; expected a JSON object")
    try:
        if text.startswith("\ufeff"):  # what json.loads says before decoding
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        return _DECODER.decode(text)
    except InvalidJSON:
        raise
    except json.JSONDecodeError as exc:
        raise InvalidJSON(f"request body is not valid JSON: {exc.msg} at offset {exc.pos}") from exc
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise InvalidJSON("request body is not valid JSON: a number is out of range") from exc
    except RecursionError as exc:
        raise InvalidJSON("request body is nested too deeply") from exc


def load_object(body: bytes, *, allow_empty: bool = False) -> dict[str, Any]:
    """A JSON object body; an empty body is ``{}`` when ``allow_empty``."""
    if allow_empty and not body.strip():
        return {}
    value = load_json(body)
    if not isinstance(value, dict):
        raise InvalidInput(f"request body must be a JSON object, not {json_type(value)}")
    return value


# ---- fields -----------------------------------------------------------------------------

def decode_b64(value: object, where: str) -> bytes:
    """Canonical standard base64 (padded, no whitespace, zero pad bits) to bytes."""
    if not isinstance(value, str):
        raise InvalidInput(f"field {where!r} must be a base64 string, not {json_type(value)}")
    if not value.isascii() or len(value) % 4:
        raise InvalidBase64(f"field {where!r} is not valid standard base64")
    raw = value.encode("ascii")
    try:
        data = binascii.a2b_base64(raw, strict_mode=True)
    except binascii.Error as exc:
        raise InvalidBase64(f"field {where!r} is not valid standard base64") from exc
    # strict_mode still accepts non-zero bits in the last symbol before "=": two strings
    # would then decode to the same bytes. Canonical means the round trip is exact; every
    # group but the padded last one round-trips by construction, so only that one is encoded
    # again (the 1 or 2 bytes it decoded to), whatever the size of the field.
    if value.endswith("="):
        tail = 1 if value.endswith("==") else 2
        if binascii.b2a_base64(data[-tail:], newline=False) != raw[-4:]:
            raise InvalidBase64(f"field {where!r} is not canonical base64 (non-zero padding bits)")
    return data


def check_key_id(value: object, where: str = "key_id") -> str:
    if not isinstance(value, str):
        raise InvalidInput(f"field {where!r} must be a string, not {json_type(value)}")
    if not _KEY_ID.fullmatch(value):
        raise key_not_found(value)  # the KMS's own answer for an id it never issued
    return value


def check_import_job_id(value: object, where: str = "import_job_id") -> str:
    if not isinstance(value, str):
        raise InvalidInput(f"field {where!r} must be a string, not {json_type(value)}")
    if not _IMPORT_JOB_ID.fullmatch(value):
        raise import_job_not_found(value)  # the KMS's own answer for a job it never made
    return value


def _integer(value: object, where: str, high: int, low: int = 1) -> int:
    # JSON has one number type: JSON Schema's "integer" is any number with a zero fraction, so
    # 3.0 is the integer 3 (what a client's float-typed JSON encoder may send).
    if type(value) is float and value.is_integer():
        value = int(value)
    if type(value) is not int:
        raise InvalidInput(f"field {where!r} must be an integer, not {json_type(value)}")
    if not low <= value <= high:
        raise InvalidInput(f"field {where!r} must be between {low} and {high}")
    return value


def _version(value: object, where: str) -> int:
    return _integer(value, where, MAX_KEY_VERSION)


def _choice(value: object, where: str, choices: Sequence[str]) -> str:
    s = _string(value, where)
    if s not in choices:
        raise InvalidInput(f"field {where!r} must be one of {list(choices)}")
    return s


def _string(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise InvalidInput(f"field {where!r} must be a string, not {json_type(value)}")
    return value


def _convert(ft: FieldType, value: object, where: str) -> object:
    if ft is T.BYTES:
        return decode_b64(value, where)
    if ft is T.KEY_ID:
        return check_key_id(value, where)
    if ft is T.CONTEXT:
        data = decode_b64(value, where)
        if len(data) > MAX_CONTEXT_BYTES:
            raise InvalidContext(
                f"field {where!r} must be at most {MAX_CONTEXT_BYTES} bytes, not {len(data)}")
        return data
    if ft is T.VERSION:
        return _version(value, where)
    if ft is T.ALGORITHM:
        return get_algorithm(_string(value, where)).name
    if ft is T.KIND:
        s = _string(value, where)
        if s not in {k.value for k in Kind}:
            raise InvalidInput(f"field {where!r} must be one of {[k.value for k in Kind]}")
        return s
    if ft is T.MODE:
        s = _string(value, where)
        if s not in {m.value for m in Mode}:
            raise InvalidInput(f"field {where!r} must be one of {[m.value for m in Mode]}")
        return s
    if ft is T.LABEL:
        s = _string(value, where)
        if not _LABEL.fullmatch(s):
            raise InvalidInput(
                f"field {where!r} must be 1 to 128 characters of A-Z a-z 0-9 . _ : / @ + -, "
                "starting with a letter or digit")
        return s
    if ft is T.REASON:
        s = _string(value, where)
        if not 1 <= len(s) <= MAX_REASON_CHARS or not _REASON.fullmatch(s) or _SURROGATE.search(s):
            raise InvalidInput(f"field {where!r} must be one line of 1 to {MAX_REASON_CHARS} characters, "
                               "not blank, without control or bidirectional-formatting characters")
        return s
    if ft is T.SECONDS:
        if type(value) not in (int, float):
            raise InvalidInput(f"field {where!r} must be a number, not {json_type(value)}")
        f = float(value)  # type: ignore[arg-type]
        if not math.isfinite(f) or f <= 0:
            raise InvalidInput(f"field {where!r} must be a positive number of seconds")
        return f
    if ft is T.IMPORT_JOB_ID:
        return check_import_job_id(value, where)
    if ft is T.IMPORT_METHOD:
        return _choice(value, where, IMPORT_METHODS)
    if ft is T.FORMAT:
        return _choice(value, where, IMPORT_FORMATS)
    if ft is T.TTL:
        return _integer(value, where, MAX_IMPORT_JOB_TTL_SECONDS, MIN_IMPORT_JOB_TTL_SECONDS)
    if ft is T.WRAPPED_KEY:
        data = decode_b64(value, where)
        if len(data) > MAX_WRAPPED_KEY_BYTES:
            raise InvalidInput(
                f"field {where!r} must be at most {MAX_WRAPPED_KEY_BYTES} bytes, not {len(data)}")
        return data
    raise AssertionError(ft)  # pragma: no cover


def parse_fields(obj: object, spec: Mapping[str, Field], prefix: str = "") -> dict[str, object]:
    """Check ``obj`` against ``spec`` (exact field set, types) and return the converted values.

    ``prefix`` locates the object in the body for messages (``"items[3]."``).
    """
    if not isinstance(obj, dict):
        where = prefix.rstrip(".") or "body"
        raise InvalidInput(f"{where} must be a JSON object, not {json_type(obj)}")
    for name in obj:
        if name not in spec:
            raise InvalidInput(f"unknown field {prefix + _shown(name)!r}")
    out: dict[str, object] = {}
    # Check fields in the spec's order so that the first error reported is deterministic.
    for name, field in spec.items():
        if name not in obj:
            if field.required:
                raise InvalidInput(f"missing required field {prefix + name!r}")
            continue
        out[name] = _convert(field.type, obj[name], prefix + name)
    return out


# ---- query strings ----------------------------------------------------------------------

def parse_query(query: str | Mapping[str, object] | None) -> dict[str, str]:
    """The query as ``name -> value``; a repeated or malformed parameter is ``invalid_input``.

    Accepts the raw query string (without ``?``) or an already parsed mapping.
    """
    if query is None:
        return {}
    if isinstance(query, Mapping):
        out: dict[str, str] = {}
        for k, v in query.items():
            if isinstance(v, (list, tuple)):
                if len(v) != 1:
                    raise InvalidInput(f"query parameter {_shown(str(k))!r} must be given once")
                v = v[0]
            out[str(k)] = str(v)
        return out
    out = {}
    if not query:
        return out
    for part in query.split("&"):
        if not part:
            continue
        name, sep, value = part.partition("=")
        # Our parameters (limit, cursor) use an unreserved alphabet: no percent-decoding is
        # needed, and a '%' anywhere is simply not a valid value.
        if name in out:
            raise InvalidInput(f"query parameter {_shown(name)!r} must be given once")
        out[name] = value
    return out


def parse_list_query(
    query: str | Mapping[str, object] | None, *, jobs: bool = False
) -> tuple[int, str | None]:
    """``limit`` (1..100, default 50) and ``cursor`` (the ``next_cursor`` of the previous page)
    for ``GET /v1/keys`` (a key id), or ``GET /v1/import-jobs`` with ``jobs`` (a job id)."""
    params = parse_query(query)
    for name in params:
        if name not in ("limit", "cursor"):
            raise InvalidInput(f"unknown query parameter {_shown(name)!r}; expected limit, cursor")
    limit = DEFAULT_LIST_LIMIT
    if "limit" in params:
        raw = params["limit"]
        if not (raw.isascii() and raw.isdigit() and len(raw) <= 6) or not 1 <= int(raw) <= MAX_LIST_LIMIT:
            raise InvalidInput(f"query parameter 'limit' must be an integer from 1 to {MAX_LIST_LIMIT}")
        limit = int(raw)
    cursor = params.get("cursor")
    if cursor is not None and not (_IMPORT_JOB_ID if jobs else _CURSOR).fullmatch(cursor):
        raise InvalidInput("query parameter 'cursor' is not a cursor this server issued")
    return limit, cursor


def parse_version_query(query: str | Mapping[str, object] | None) -> int | None:
    """``version`` (optional) for ``GET /v1/keys/{key_id}``: which version's public key."""
    params = parse_query(query)
    for name in params:
        if name != "version":
            raise InvalidInput(f"unknown query parameter {_shown(name)!r}; expected version")
    if "version" not in params:
        return None
    raw = params["version"]
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 10) or not 1 <= int(raw) <= MAX_KEY_VERSION:
        raise InvalidInput(f"query parameter 'version' must be an integer from 1 to {MAX_KEY_VERSION}")
    return int(raw)


# (kind, mode) -> the algorithm a key gets when the client names a kind, not an algorithm.
DEFAULT_ALGORITHMS: dict[tuple[str, str], str] = {
    ("kem", "pqc"): DEFAULT_KEM,
    ("signature", "pqc"): DEFAULT_SIGNATURE,
    ("kem", "hybrid"): HYBRID_KEM,
    ("signature", "hybrid"): HYBRID_SIGNATURE,
}



def parse_idempotency_key(values: Sequence[bytes]) -> str | None:
    """The ``Idempotency-Key`` of a request from its header values: None without the header, the
    key for exactly one value of 1..255 visible ASCII characters, else 400
    ``invalid_idempotency_key`` (two values: two servers could pick different ones)."""
    if not values:
        return None
    if len(values) > 1:
        raise InvalidIdempotencyKey("give one Idempotency-Key header, not several")
    raw = values[0]
    text = raw.decode("ascii") if raw.isascii() else ""
    if IDEMPOTENCY_KEY_RE.match(text) is None:
        raise InvalidIdempotencyKey(
            f"Idempotency-Key must be 1..{MAX_IDEMPOTENCY_KEY_CHARS} visible ASCII characters"
        )
    return text
