"""Audit record encoding and the secret guard (pure: no I/O).

One record is one line of JSON (ASCII only, no spaces, no newline inside):

    {"seq":7,"ts":"2025-06-01T12:00:00.123Z","event":"policy.decision","severity":"INFO",
     <fields, sorted by name>,"prev":"<sha256 hex of the previous record's line>"}

``prev`` is the SHA-256 of the exact bytes of the previous line, without its ``\\n``; the first
record of a log has ``prev`` = 64 zeros (``GENESIS``). ``seq`` counts from 1 across rotated
files. Changing, removing, reordering or inserting a line therefore breaks a ``prev`` link or
the ``seq`` sequence, which ``verify`` reports.

The guard: a field whose name says "secret" (``api_key``, ``secret``, ``plaintext``,
``shared_secret``, ``private_key``, ``kek``, ``token``, ``password``, … — see
``is_secret_name``), a value shaped like an API key, bytes, or anything that is not plain JSON
data is refused with ``AuditFieldRefused`` before a byte is written. Identifiers are fine:
``key_id``, ``api_key_id``, ``kek_id`` (a name ending in ``_id``/``_ids``/``_count``/``_label``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from hashlib import sha256
from typing import Any

from .._json import compact_encoder, escape_ascii, iso_millis
from ..errors import AuditFieldRefused

__all__ = [
    "GENESIS",
    "SEVERITIES",
    "RECOVERY_EVENT",
    "MAX_LINE_BYTES",
    "AuditRecord",
    "check_event",
    "check_fields",
    "encode_record",
    "format_ts",
    "is_secret_name",
    "line_hash",
    "normalize_severity",
    "parse_record",
]

GENESIS = "0" * 64
SEVERITIES = ("DEBUG", "INFO", "NOTICE", "WARNING", "ERROR", "CRITICAL")
RECOVERY_EVENT = "audit.recovered"
RESERVED = frozenset({"seq", "ts", "event", "severity", "prev"})
MAX_LINE_BYTES = 60 * 1024  # the writer reads back a 128 KiB tail: two lines always fit
MAX_DEPTH = 8

_SECRET_WORDS = frozenset(
    {"secret", "secrets", "password", "passwd", "passphrase", "plaintext", "token", "kek", "pepper",
     "apikey", "privkey", "cleartext"}
)
_SECRET_PHRASES = ("api_key", "private_key", "shared_secret", "secret_key", "access_token", "session_key")
_SAFE_SUFFIXES = ("_id", "_ids", "_count", "_label", "_labels")
_KEYISH = re.compile(r"qph_[A-Za-z0-9]{12}_[A-Za-z0-9]")
_EVENT_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.:/-]{0,63}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


def is_secret_name(name: str) -> bool:
    n = name.strip().lower().replace("-", "_")
    if n.endswith(_SAFE_SUFFIXES):
        return False
    if set(n.split("_")) & _SECRET_WORDS:
        return True
    return any(p in n for p in _SECRET_PHRASES)


# The spellings callers use ("info", "INFO", "Warning", ...) -> the canonical name; filled on use.
_SEVERITY_OF: dict[str, str] = {s: s for s in SEVERITIES}


def normalize_severity(severity: str) -> str:
    s = _SEVERITY_OF.get(severity) if severity.__class__ is str else None
    if s is not None:
        return s
    s = severity.upper() if isinstance(severity, str) else ""
    if s not in SEVERITIES:
        raise AuditFieldRefused(
            f"audit severity must be one of {', '.join(SEVERITIES)}, not {severity!r}"[:200]
        )
    if len(_SEVERITY_OF) < _NAME_OK_MAX:
        _SEVERITY_OF[severity] = s
    return s


def _check_value(path: str, value: object, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise AuditFieldRefused(f"audit field {path!r} is nested too deeply")
    if value is None or isinstance(value, (bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise AuditFieldRefused(f"audit field {path!r} is not a finite number")
        return
    if isinstance(value, str):
        if _KEYISH.search(value):
            raise AuditFieldRefused(f"audit field {path!r} holds something shaped like an API key")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_value(f"{path}[{i}]", item, depth + 1)
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise AuditFieldRefused(f"audit field {path!r} has a non-string key")
            if is_secret_name(k) or _KEYISH.search(k):
                raise AuditFieldRefused(f"audit field {path}.{k[:40]} is named like a secret")
            _check_value(f"{path}.{k[:40]}", v, depth + 1)
        return
    # bytes above all: secrets travel as bytes; a record carries ids and facts, not material
    raise AuditFieldRefused(f"audit field {path!r} is a {type(value).__name__}, not plain JSON data")


# Field names come from code, so the same few dozen names are checked on every record: their
# verdicts are remembered (bounded, in case a caller passes open-ended names).
_NAME_OK: dict[str, bool] = {}
_NAME_OK_MAX = 4096


def _name_ok(name: str) -> bool:
    ok = _NAME_OK.get(name)
    if ok is None:
        ok = name not in RESERVED and not is_secret_name(name) and not _KEYISH.search(name)
        if len(_NAME_OK) < _NAME_OK_MAX:
            _NAME_OK[name] = ok
    return ok


def check_fields(fields: Mapping[str, object]) -> None:
    """Raise ``AuditFieldRefused`` unless every field is safe to write (see module docstring)."""
    verdicts = _NAME_OK
    for name, value in fields.items():
        if verdicts.get(name) is not True and not _name_ok(name):
            if name in RESERVED:
                raise AuditFieldRefused(f"audit field name {name!r} is reserved")
            raise AuditFieldRefused(
                f"audit field {name[:40]!r} is named like a secret; record its id instead"
            )
        cls = value.__class__
        if value.__class__ is str:
            if "qph_" in value and _KEYISH.search(value):
                raise AuditFieldRefused(f"audit field {name!r} holds something shaped like an API key")
            continue
        if value is None or cls is int or cls is bool:
            continue
        _check_value(name, value, 0)


format_ts = iso_millis  # the record's "ts"


_EVENTS_OK: set[str] = set()  # event names already checked (they come from code: a few dozen)


def check_event(event: object) -> str:
    if event.__class__ is str and event in _EVENTS_OK:
        return event
    if not isinstance(event, str) or _EVENT_RE.fullmatch(event) is None:
        raise AuditFieldRefused(f"audit event names match {_EVENT_RE.pattern!r}, not {str(event)[:80]!r}")
    if event.__class__ is str and len(_EVENTS_OK) < _NAME_OK_MAX:
        _EVENTS_OK.add(event)
    return event


# The line is json.dumps(record, separators=(",", ":"), ensure_ascii=True, allow_nan=False),
# assembled piece by piece: strings and ints (nearly every value) through the C string escaper,
# anything else through one shared encoder with those same settings, so the bytes are the same.
_encode = compact_encoder(ensure_ascii=True, allow_nan=False)
_escape = escape_ascii
# The field names of a record, in the order the caller gave them -> ((name, '"name":'), ...) in
# sorted order; None if a name is reserved. Callers use a few fixed sets of names.
_LAYOUTS: dict[tuple[str, ...], tuple[tuple[str, str], ...] | None] = {}
_UNSEEN: Any = object()


def _json_value(value: object) -> str:
    cls = value.__class__
    if cls is str:
        return _escape(value)  # type: ignore[arg-type]
    if cls is int:
        return int.__repr__(value)
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    return _encode(value)


def _layout(names: tuple[str, ...]) -> tuple[tuple[str, str], ...] | None:
    plain = RESERVED.isdisjoint(names) and all(n.__class__ is str for n in names)
    layout = tuple((n, _escape(n) + ":") for n in sorted(names)) if plain else None
    if len(_LAYOUTS) < _NAME_OK_MAX:
        _LAYOUTS[names] = layout
    return layout


def encode_record(
    seq: int, ts: str, event: str, severity: str, fields: Mapping[str, Any], prev: str
) -> bytes:
    """The record's line, without the newline. ``fields`` must have passed ``check_fields``."""
    check_event(event)
    names = tuple(fields)
    layout = _LAYOUTS.get(names, _UNSEEN)
    if layout is _UNSEEN:
        layout = _layout(names)
    if layout is None:  # a reserved or odd name: only a direct caller gets here; json.dumps decides
        obj: dict[str, Any] = {"seq": seq, "ts": ts, "event": event, "severity": severity}
        for name in sorted(fields):
            obj[name] = fields[name]
        obj["prev"] = prev
        text = _encode(obj)
    else:
        value, escape = _json_value, _escape
        parts = ['{"seq":', value(seq), ',"ts":', value(ts), ',"event":', value(event), ',"severity":',
                 value(severity), ","]
        add = parts.append
        for name, key in layout:
            v = fields[name]
            add(key + (escape(v) if v.__class__ is str else value(v)) + ",")
        add('"prev":')
        add(value(prev))
        add("}")
        text = "".join(parts)
    line = text.encode("ascii")
    if len(line) > MAX_LINE_BYTES:
        raise AuditFieldRefused(f"audit record would be {len(line)} bytes, more than {MAX_LINE_BYTES}")
    return line


def line_hash(line: bytes) -> str:
    return sha256(line).hexdigest()


@dataclass(frozen=True, slots=True)
class AuditRecord:
    seq: int
    ts: str
    event: str
    severity: str
    fields: Mapping[str, Any]
    prev: str


def parse_record(line: bytes) -> AuditRecord | None:
    """The record on ``line``, or None if it is not one (not JSON, missing/ill-typed keys)."""
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(obj, dict):
        return None
    seq, ts, event, severity, prev = (obj.get(k) for k in ("seq", "ts", "event", "severity", "prev"))
    if (
        not isinstance(seq, int) or isinstance(seq, bool) or seq < 1
        or not isinstance(ts, str) or not isinstance(event, str) or not isinstance(severity, str)
        or not isinstance(prev, str) or _HEX64.fullmatch(prev) is None
    ):
        return None
    fields = {k: v for k, v in obj.items() if k not in RESERVED}
    return AuditRecord(seq, ts, event, severity, fields, prev)
