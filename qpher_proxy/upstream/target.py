"""Request-target hygiene for sidecar forwarding (pure: no I/O, no trio).

Theory of operation
-------------------
A path rule (``deny /internal/**``) protects the upstream only if the path the policy matched
is the path the upstream acts on. The client's target is read by two parsers that are not
ours: the upstream's HTTP server and its router. They disagree with a byte-for-byte reading in
known ways: a WSGI server percent-decodes (``/%69nternal`` is ``/internal``), Tomcat and Spring
drop ``;params`` from segments (``/internal;x/secret`` is ``/internal/secret``), some servers
trim encoded whitespace or stop at an encoded NUL, and a few decode twice. Rather than guess
which upstream is behind us, :func:`normalize_target` turns every target into one of two
things:

* a :class:`ForwardTarget` whose ``target`` is sent upstream byte for byte and whose
  ``policy_path`` is what path rules match: the path as *every* reasonable server reads it; or
* ``BadRequest`` (400 ``ambiguous_path``) when servers could read the path in different ways.
  Nothing ambiguous is forwarded, so no upstream can see a path the policy did not match.

What is rewritten (RFC 3986 section 6.2.2, equivalent for every conforming server):

* percent-encoded unreserved characters are decoded: ``%41``-``%5A``, ``%61``-``%7A``,
  ``%30``-``%39``, ``%2D`` (-), ``%5F`` (_) and ``%7E`` (~) become ``A``-``Z``, ``a``-``z``,
  ``0``-``9``, ``-``, ``_`` and ``~`` (section 6.2.2.2);
* the hex digits of every other escape are upper-cased: ``%c3%a9`` becomes ``%C3%A9``
  (section 6.2.2.1).

What is refused (in the path; the query is not looked at except as noted):

* ``%2E`` (``.``): unreserved, but decoding it can make a dot segment (``/%2e%2e/``);
* encoded delimiters: ``%2F`` (/), ``%5C`` (\\), ``%3B`` (;), ``%3F`` (?) and ``%23`` (#),
  which a decoding server reads as structure (a segment break, a parameter, a query or a
  fragment) that the policy did not see;
* encoded controls and space, ``%00``-``%20`` and ``%7F``: servers trim, truncate at or reject
  them in different ways (``/internal%20`` and ``/internal%00`` are ``/internal`` to a server
  that strips whitespace or stops at a NUL). A space is not unreserved, so RFC 3986 would keep
  ``%20`` as it is; refusing it too is the price of one reading for all servers, and real
  paths rarely hold one;
* a double-encoded escape, ``%25`` followed by two hex digits (``%2569`` is ``%69`` to a
  server that decodes once and ``i`` to one that decodes twice);
* escapes that do not decode to UTF-8 (overlong forms such as ``%C0%AF``, once a way to
  smuggle ``/`` past a decoder), and decoded characters that are invisible (controls, format
  characters, separators) or change under NFKC (fullwidth ``%EF%BC%8F`` is ``/`` to a server
  that folds compatibility characters);
* malformed escapes (``%``, ``%4``, ``%G1``);
* raw characters outside visible ASCII (controls, space, non-ASCII) and a raw ``#`` anywhere
  in the target (a fragment is never part of a request-target, RFC 9112 section 3.2), and a
  raw backslash in the path (Windows servers and some routers read it as ``/``);
* empty segments (``//``) and dot segments (``.``, ``..``), also as ``..;x`` when parameters
  are allowed;
* ``;`` path parameters, unless ``allow_path_params`` is set (for an upstream that uses
  matrix parameters); then a segment's parameters are kept in the forwarded target and
  dropped from ``policy_path``, as Tomcat drops them before routing;
* a target that is not in origin form (``*``): no path rule could match it.

``policy_path`` is the forwarded path with parameters dropped and every remaining escape
decoded as UTF-8: what a decoding server (WSGI ``PATH_INFO``, a servlet path) routes on.
Matching the decoded form is what makes ``/a%21b`` and ``/a!b`` one path for the policy, as
they are for such servers; the refusals above are exactly what makes this decoding
unambiguous. A rule is therefore written in decoded form (``/café/**``, never ``/caf%C3%A9``).

The query string is passed through untouched (an upstream may sign or hash it as sent) and
never takes part in path matching.

Most targets hold no ``%``, no ``;`` and no dot or empty segment: one regular expression
recognises them and the path is returned as it came, with no further work.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from qpher_proxy.errors import BadRequest

__all__ = ["ForwardTarget", "normalize_target"]


@dataclass(frozen=True, slots=True)
class ForwardTarget:
    """A request-target fit to forward: ``target`` goes upstream byte for byte, ``path`` is
    its path (before any ``?``), ``policy_path`` is what path rules match."""

    target: str
    path: str
    policy_path: str

    @property
    def query(self) -> str | None:
        """The query string as the client sent it, or None when the target has no ``?``."""
        n = len(self.path)
        return self.target[n + 1 :] if len(self.target) > n else None


# Origin-form targets made of pchar without "%" and ";" (RFC 3986 section 3.3), "/" and a
# query of visible ASCII without "#". A match needs no rewriting; only dot and empty segments
# remain to be excluded, which the two substring tests after it do (coarsely: a segment that
# merely starts with "." takes the slow path, which accepts it).
_PLAIN = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,=:@/]*(?:\?[!\"$-~]*)?")

# Anything the target may not hold raw: controls, space, DEL, non-ASCII, "#".
_RAW_REFUSED = re.compile(r"[^!-~]|#")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_MALFORMED_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_DOUBLE_ENCODED = re.compile(r"%25[0-9A-Fa-f]{2}")

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_~")
# Escapes refused because a decoding server would read them as path structure.
_ENCODED_DELIMITERS = {
    0x2E: "an encoded '.' (%2E)",
    0x2F: "an encoded '/' (%2F)",
    0x5C: "an encoded '\\' (%5C)",
    0x3B: "an encoded ';' (%3B)",
    0x3F: "an encoded '?' (%3F)",
    0x23: "an encoded '#' (%23)",
}


class _Refusal(Exception):
    """Carries the reason out of the ``re.sub`` callback; becomes ``BadRequest``."""


def _refuse(what: str, *, verb: str = "contains") -> BadRequest:
    # The path itself is never echoed: it is attacker-chosen and may be long.
    return BadRequest(f"the request path is not forwarded: it {verb} {what}", code="ambiguous_path")


def _rewrite_escape(m: re.Match[str]) -> str:
    hexdigits = m.group(1)
    byte = int(hexdigits, 16)
    if byte in _UNRESERVED:
        return chr(byte)
    if byte <= 0x20 or byte == 0x7F:
        raise _Refusal("an encoded control character or space")
    what = _ENCODED_DELIMITERS.get(byte)
    if what is not None:
        raise _Refusal(what)
    return "%" + hexdigits.upper()


def _decode(path: str) -> str:
    """The path with every escape decoded as UTF-8; refuses what servers could read apart."""
    if "%" not in path:
        return path
    try:
        decoded = unquote_to_bytes(path).decode("utf-8")
    except UnicodeDecodeError:
        raise _refuse("percent-encoded bytes that are not UTF-8") from None
    if not decoded.isascii() and (
        not decoded.isprintable() or unicodedata.normalize("NFKC", decoded) != decoded
    ):
        raise _refuse("invisible or compatibility characters")
    return decoded


def normalize_target(target: str, *, allow_path_params: bool = False) -> ForwardTarget:
    """The origin-form ``target`` as it is forwarded and matched; raises ``BadRequest``
    (400 ``ambiguous_path``) for a target servers could read differently (module docstring)."""
    q = target.find("?")
    path = target if q < 0 else target[:q]
    if _PLAIN.fullmatch(target) is not None and "//" not in path and "/." not in path:
        return ForwardTarget(target, path, path)

    if _RAW_REFUSED.search(target) is not None:
        raise _refuse("a control character, space, non-ASCII character or '#'")
    if "\\" in path:
        raise _refuse("a backslash")
    if path[:1] != "/":
        raise _refuse("with '/' (only origin-form targets are forwarded)", verb="does not start")
    if _MALFORMED_ESCAPE.search(path) is not None:
        raise _refuse("a malformed percent-escape")
    try:
        path = _ESCAPE.sub(_rewrite_escape, path)
    except _Refusal as exc:
        raise _refuse(str(exc)) from None
    # Searched in the rewritten path: decoding "%25%34%31" makes "%2541" out of no "%25XX".
    if _DOUBLE_ENCODED.search(path) is not None:
        raise _refuse("a double-encoded percent-escape (%25 followed by hex digits)")

    segments = path.split("/")
    last = len(segments) - 1
    stripped = segments
    if ";" in path:
        if not allow_path_params:
            raise _refuse("a ';' path parameter")
        stripped = [seg.partition(";")[0] for seg in segments]
    for i in range(1, last + 1):
        seg = stripped[i]
        if seg == "." or seg == "..":
            raise _refuse("a dot segment ('.' or '..')")
        if not seg and i != last:
            raise _refuse("an empty segment ('//')")
    policy_path = _decode("/".join(stripped) if stripped is not segments else path)
    return ForwardTarget(path if q < 0 else path + target[q:], path, policy_path)
