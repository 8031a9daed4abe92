"""The hot path's JSON encoders and timestamp caches, in one place.

Every response body, access-log line and audit record is JSON with a timestamp, so both are
made for every request. The plain paths are ``json.dumps(obj, separators=(",", ":"), ...)``,
which builds a ``JSONEncoder`` and a C encoder per call, and ``time.strftime`` per timestamp.
Here each encoder is built once and each timestamp is formatted once a second.

- :func:`compact_encoder` returns a function that gives exactly what ``json.dumps`` with the same
  settings and compact separators gives. It skips ``json.dumps``'s circular-reference check:
  every caller encodes a tree its own code built (a cycle would recurse until
  ``RecursionError`` instead of raising ``ValueError``).
- :data:`escape` and :data:`escape_ascii` are the C string escapers ``json.dumps`` itself uses
  (``ensure_ascii=False`` and ``True``): callers that assemble a flat object piece by piece use
  them so that their bytes stay those of ``json.dumps``.
- :func:`iso_millis` is ``%Y-%m-%dT%H:%M:%S.mmmZ`` in UTC (logs and audit records) and
  :func:`http_date` the IMF-fixdate of the ``Date`` header (RFC 9110 §5.6.7); each keeps the
  formatted second and formats again only when the second changes.

``tests/test_json_seam.py`` checks each of these against the plain path.
"""

from __future__ import annotations

import json
import json.encoder
import time
from collections.abc import Callable
from email.utils import formatdate
from typing import Any

__all__ = ["compact_encoder", "escape", "escape_ascii", "http_date", "iso_millis"]

escape: Callable[[str], str] = json.encoder.encode_basestring
escape_ascii: Callable[[str], str] = json.encoder.encode_basestring_ascii


def compact_encoder(
    *, ensure_ascii: bool, default: Callable[[Any], Any] | None = None, allow_nan: bool = True
) -> Callable[[Any], str]:
    """``lambda obj: json.dumps(obj, separators=(",", ":"), ensure_ascii=..., default=...,
    allow_nan=...)`` with its encoder made once (CPython's C encoder where there is one)."""
    encoder = json.JSONEncoder(
        separators=(",", ":"), ensure_ascii=ensure_ascii, default=default, allow_nan=allow_nan
    )
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # pragma: no cover - not CPython
        return encoder.encode
    # (markers, default, encoder, indent, key_sep, item_sep, sort_keys, skipkeys, allow_nan):
    # json.dumps's own arguments, but no markers dict (no circular-reference check)
    string = escape_ascii if ensure_ascii else escape
    chunks = make(None, encoder.default, string, None, ":", ",", False, False, allow_nan)
    return lambda obj: "".join(chunks(obj, 0))


_iso_second: tuple[int | None, str] = (None, "")  # (second, its "%Y-%m-%dT%H:%M:%S")


def iso_millis(now: float) -> str:
    """``now`` (seconds since the epoch) as ``2026-01-31T12:00:00.123Z``, milliseconds truncated."""
    global _iso_second
    whole = int(now // 1)
    millis = int((now - whole) * 1000)
    cached = _iso_second
    if cached[0] != whole:
        cached = _iso_second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    return f"{cached[1]}.{millis:03d}Z"


_http_second: tuple[int | None, bytes] = (None, b"")  # (second, its IMF-fixdate)


def http_date(now: float | None = None) -> bytes:
    """The ``Date`` header value for ``now`` (default: the current time)."""
    global _http_second
    whole = int(time.time() if now is None else now)
    cached = _http_second
    if cached[0] != whole:
        cached = _http_second = (whole, formatdate(whole, usegmt=True).encode("ascii"))
    return cached[1]
