"""Glob patterns for paths, key labels and operation names, compiled to regular expressions.

Path globs (``path:``) are segment-aware:

* ``*`` matches within one segment (never a ``/``): ``/v1/keys/*`` matches ``/v1/keys/k1`` but
  not ``/v1/keys/k1/rotate``;
* ``**`` is a whole segment and matches any number of segments, including none:
  ``/admin/**`` matches ``/admin``, ``/admin/`` and ``/admin/fail-open/x``; ``/v1/**/rotate``
  matches ``/v1/rotate`` and ``/v1/keys/k1/rotate``;
* ``?`` matches one character other than ``/``; everything else is literal (case-sensitive).
  ``[``, ``]``, ``{``, ``}`` and ``\\`` are reserved and refused, so that no pattern means
  something else in another glob dialect.

Label globs (``key_label:``) have no segments: ``*`` matches any run of characters.
Operation globs (``operation:``) are expanded at load time against the closed vocabulary.

The path is attacker-chosen and up to the header limit long, and Python's ``re`` backtracks.
To keep matching linear, a path pattern may hold at most one ``*`` per segment and at most one
``**``; a label pattern at most two ``*``. These limits are checked here, at load time.
"""

from __future__ import annotations

import re

__all__ = ["GlobError", "path_glob_regex", "label_glob_regex", "name_glob_regex"]

_RESERVED = frozenset("[]{}\\")
MAX_PATTERN_CHARS = 1024


class GlobError(ValueError):
    pass


def _check_chars(pattern: str) -> None:
    if not pattern:
        raise GlobError("empty pattern")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise GlobError(f"pattern longer than {MAX_PATTERN_CHARS} characters")
    for ch in pattern:
        if ch in _RESERVED:
            raise GlobError(f"{ch!r} is reserved in patterns (only *, ** and ? are special)")
        if ord(ch) < 0x20 or ord(ch) == 0x7F or ch.isspace():
            raise GlobError("whitespace and control characters are not allowed in patterns")


def _segment_regex(seg: str) -> str:
    out = []
    for ch in seg:
        if ch == "*":
            out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        else:
            out.append(re.escape(ch))
    return "".join(out)


def path_glob_regex(pattern: str) -> str:
    """Regex source (for ``fullmatch``) of a path glob; raises GlobError with what is wrong."""
    _check_chars(pattern)
    if not pattern.startswith("/"):
        raise GlobError("a path pattern starts with '/'")
    segments = pattern.split("/")[1:]
    out = []
    doublestars = 0
    for i, seg in enumerate(segments):
        if seg == "**":
            doublestars += 1
            if doublestars > 1:
                raise GlobError("at most one '**' per pattern")
            out.append("(?:/.*)?")
            continue
        if "**" in seg:
            raise GlobError(f"'**' must be a whole segment, not part of {seg!r}")
        if seg.count("*") > 1:
            raise GlobError(f"at most one '*' per segment, {seg!r} has {seg.count('*')}")
        if seg == "" and i != len(segments) - 1 and pattern != "/":
            raise GlobError("empty segment ('//')")
        out.append("/" + _segment_regex(seg))
    return "".join(out)


def label_glob_regex(pattern: str) -> str:
    _check_chars(pattern)
    if pattern.count("*") > 2:
        raise GlobError("at most two '*' per label pattern")
    return "".join(".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in pattern)


def name_glob_regex(pattern: str) -> str:
    """Operation-name globs (``keys.*``, ``*.batch``): ``*`` matches any run of characters.
    Matched only against the small closed vocabulary at load time, so no limit on ``*``."""
    _check_chars(pattern)
    return "".join(".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in pattern)


def compile_alternatives(sources: list[str]) -> re.Pattern[str]:
    """One compiled regex for any-of a list of regex sources (use ``fullmatch``)."""
    if len(sources) == 1:
        return re.compile("(?s:" + sources[0] + ")")
    return re.compile("(?s:" + "|".join("(?:" + s + ")" for s in sources) + ")")
