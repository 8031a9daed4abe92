"""Request-target hygiene for sidecar forwarding: what is rewritten, what is refused, and the
property that makes it safe -- a path rule that matches the path a decoding (and, with
parameters allowed, parameter-dropping) server routes on also matches what the policy saw."""

from __future__ import annotations

import re
import timeit
from urllib.parse import unquote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qpher_proxy.errors import BadRequest
from qpher_proxy.policy import RequestFacts
from qpher_proxy.policy._glob import GlobError, compile_alternatives, path_glob_regex
from qpher_proxy.upstream import ForwardTarget, normalize_target

# (client target, forwarded target, policy path)
ACCEPTED = [
    ("/", "/", "/"),
    ("/app/hello", "/app/hello", "/app/hello"),
    ("/app/hello/", "/app/hello/", "/app/hello/"),
    ("/app/hello?x=1&y=%2f", "/app/hello?x=1&y=%2f", "/app/hello"),  # the query is untouched
    ("/app?", "/app?", "/app"),
    ("/a?b?c", "/a?b?c", "/a"),
    ("/a?x\\y", "/a?x\\y", "/a"),  # a backslash in the query is not path structure
    ("/%69nternal/secret", "/internal/secret", "/internal/secret"),
    ("/inter%6eal/secret", "/internal/secret", "/internal/secret"),
    ("/INTER%4EAL", "/INTERNAL", "/INTERNAL"),
    ("/pub/%7Euser/a%2dfile", "/pub/~user/a-file", "/pub/~user/a-file"),
    ("/%5f%30%39%7e", "/_09~", "/_09~"),
    ("/caf%c3%a9", "/caf%C3%A9", "/caf\u00e9"),  # hex upper-cased, kept encoded upstream
    ("/a%21b", "/a%21b", "/a!b"),  # a sub-delim stays encoded; the policy sees it decoded
    ("/a!b:c@d$e&f'g(h)i*j+k,l=m", "/a!b:c@d$e&f'g(h)i*j+k,l=m", "/a!b:c@d$e&f'g(h)i*j+k,l=m"),
    ("/a|b^c", "/a|b^c", "/a|b^c"),  # visible ASCII that h11 admits is passed on as sent
    ("/a%7cb", "/a%7Cb", "/a|b"),
    ("/100%25", "/100%25", "/100%"),
    ("/100%25zz", "/100%25zz", "/100%zz"),
    ("/.well-known/x", "/.well-known/x", "/.well-known/x"),
    ("/a/.b/..c/...", "/a/.b/..c/...", "/a/.b/..c/..."),
    ("/%e2%82%ac?q=%e2", "/%E2%82%AC?q=%e2", "/\u20ac"),
]


@pytest.mark.parametrize(("raw", "forwarded", "policy_path"), ACCEPTED)
def test_accepted_targets_are_forwarded_normalised(raw: str, forwarded: str, policy_path: str) -> None:
    got = normalize_target(raw)
    assert got.target == forwarded
    assert got.path == forwarded.partition("?")[0]
    assert got.policy_path == policy_path
    assert got.query == (raw.partition("?")[2] if "?" in raw else None)


# (client target, what the refusal names)
REFUSED = [
    ("/internal;x/secret", "path parameter"),
    ("/internal/secret;jsessionid=1", "path parameter"),
    ("/internal%00/secret", "encoded control character or space"),
    ("/internal%20/secret", "encoded control character or space"),
    ("/internal%09/secret", "encoded control character or space"),
    ("/internal%0a/secret", "encoded control character or space"),
    ("/internal%0D/secret", "encoded control character or space"),
    ("/internal%1f", "encoded control character or space"),
    ("/internal%7f", "encoded control character or space"),
    ("/a%2fb", "encoded '/'"),
    ("/a%2Fb", "encoded '/'"),
    ("/a%5cb", "encoded '\\'"),
    ("/app/%2e%2e/admin", "encoded '.'"),
    ("/a/%2E", "encoded '.'"),
    ("/a.%2ejson", "encoded '.'"),
    ("/a%3bb", "encoded ';'"),
    ("/a%3Fb", "encoded '?'"),
    ("/a%23b", "encoded '#'"),
    ("/a%2541", "double-encoded"),
    ("/a%25%34%31", "double-encoded"),  # the decoded digits would make "%2541"
    ("/a%252f", "double-encoded"),
    ("/a%", "malformed"),
    ("/a%4", "malformed"),
    ("/a%G1", "malformed"),
    ("/a%%41", "malformed"),
    ("/a%c0%af", "not UTF-8"),  # overlong "/"
    ("/a%c0%ae", "not UTF-8"),  # overlong "."
    ("/a%ff", "not UTF-8"),
    ("/a%ed%a0%80", "not UTF-8"),  # a surrogate
    ("/a%ef%bc%8fb", "compatibility"),  # fullwidth solidus, "/" under NFKC
    ("/a%ef%bc%8e%ef%bc%8e", "compatibility"),  # fullwidth full stops
    ("/%ef%ac%81le", "compatibility"),  # the "fi" ligature
    ("/a%c2%a0", "invisible"),  # no-break space
    ("/a%e2%80%8b", "invisible"),  # zero-width space
    ("/a%e2%80%ae", "invisible"),  # right-to-left override
    ("/a%c2%85", "invisible"),  # next line (C1 control)
    ("/a\\b", "backslash"),
    ("/a#b", "'#'"),
    ("/a?x#y", "'#'"),
    ("/caf\u00e9", "non-ASCII"),
    ("/a b", "space"),
    ("/a\x00b", "control character"),
    ("/a\tb", "control character"),
    ("/a\x7f", "control character"),
    ("/app//x", "empty segment"),
    ("//", "empty segment"),
    ("//app", "empty segment"),
    ("/app/../v1/keys", "dot segment"),
    ("/app/./x", "dot segment"),
    ("/app/.", "dot segment"),
    ("/app/..", "dot segment"),
    ("/..?x", "dot segment"),
    ("*", "origin-form"),
    ("", "origin-form"),
    ("app/x", "origin-form"),
    ("?x", "origin-form"),
    ("http://example.com/x", "origin-form"),
]


@pytest.mark.parametrize(("raw", "why"), REFUSED)
def test_ambiguous_targets_are_refused_with_400(raw: str, why: str) -> None:
    with pytest.raises(BadRequest) as info:
        normalize_target(raw)
    exc = info.value
    assert (exc.status, exc.code) == (400, "ambiguous_path")
    assert exc.message.startswith("the request path is not forwarded: it ")
    assert why in exc.message


@pytest.mark.parametrize("raw", ["/internal%00/" + "A" * 40 + "secret", "/x/%2e%2e/qph_k_secret"])
def test_the_refusal_never_echoes_the_path(raw: str) -> None:
    with pytest.raises(BadRequest) as info:
        normalize_target(raw)
    assert "secret" not in info.value.message and "AAAA" not in info.value.message


# (client target, forwarded target, policy path) with allow_path_params=True
WITH_PARAMS = [
    ("/internal;x/secret", "/internal;x/secret", "/internal/secret"),
    ("/a;v=1;w=2/b;c?x=1", "/a;v=1;w=2/b;c?x=1", "/a/b"),
    ("/a/b;jsessionid=abc", "/a/b;jsessionid=abc", "/a/b"),
    ("/a/;x", "/a/;x", "/a/"),
    ("/;x", "/;x", "/"),
    ("/%69nternal;%6b=%76", "/internal;k=v", "/internal"),
    ("/caf%c3%a9;v=%c3%a9/x", "/caf%C3%A9;v=%C3%A9/x", "/caf\u00e9/x"),
]


@pytest.mark.parametrize(("raw", "forwarded", "policy_path"), WITH_PARAMS)
def test_allowed_path_parameters_are_forwarded_and_dropped_for_the_policy(
    raw: str, forwarded: str, policy_path: str,
) -> None:
    got = normalize_target(raw, allow_path_params=True)
    assert (got.target, got.policy_path) == (forwarded, policy_path)


@pytest.mark.parametrize(("raw", "why"), [
    ("/a/..;x/b", "dot segment"),  # Tomcat reads "..;x" as ".."
    ("/a/.;x/b", "dot segment"),
    ("/a/;x/b", "empty segment"),  # "/a//b" once the parameter is dropped
    ("/a;x%3b/b", "encoded ';'"),
    ("/a%3b/b", "encoded ';'"),
])
def test_path_parameters_cannot_hide_dot_or_empty_segments(raw: str, why: str) -> None:
    with pytest.raises(BadRequest) as info:
        normalize_target(raw, allow_path_params=True)
    assert info.value.code == "ambiguous_path" and why in info.value.message


def test_a_plain_target_is_returned_as_it_came() -> None:
    raw = "/app/v2/items:batch?limit=5"
    got = normalize_target(raw)
    assert got == ForwardTarget(raw, "/app/v2/items:batch", "/app/v2/items:batch")
    assert got.target is raw  # nothing rebuilt on the common path


def test_the_common_case_costs_about_a_microsecond() -> None:
    # A loose bound (CI machines are shared and slow); the plain path measures ~0.8 us.
    n = 20_000
    per_call = min(timeit.repeat(lambda: normalize_target("/app/orders/1234?expand=items"),
                                 number=n, repeat=3)) / n
    assert per_call < 10e-6, f"{per_call * 1e6:.2f} us per target"


# ---- properties ---------------------------------------------------------------------------

_HEX = "0123456789abcdefABCDEF"
# Pieces of paths the normaliser accepts (mostly), and pieces it must refuse. Half the targets
# are built from the first kind alone, so that the properties see many accepted targets.
_GOOD_PIECES = st.one_of(
    st.text("abcXYZ019-._~!$&'()*+,=:@|^", min_size=1, max_size=4),
    st.sampled_from(["%25", "%25zz", "%c3%a9", "%E2%82%AC", "%21", "%3a", "%40", ";", ";v=1", ";a=%41"]),
    st.tuples(st.sampled_from("234567"), st.sampled_from(_HEX)).map(lambda t: "%" + t[0] + t[1]),
    st.sampled_from("AaZz09-_~").map(lambda c: "%" + format(ord(c), "02" + ("x" if c.islower() else "X"))),
)
_BAD_PIECES = st.sampled_from([
    "%", "%2", "%zz", "%00", "%20", "%7f", "%2e", "%2E", "%2f", "%5c", "%3b", "%3f", "%23", "%2541", "%C0%AF",
    "%ef%bc%8f", "%e2%80%8b", "%ff", ".", "..", "\\", "#", " ", "\u00e9", "",
])


def _targets(pieces: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    segment = st.lists(pieces, min_size=1, max_size=4).map("".join)
    return st.builds(
        lambda segs, slash, query: "/" + "/".join(segs) + slash + query,
        st.lists(segment, max_size=5),
        st.sampled_from(["", "/"]),
        st.sampled_from(["", "?", "?x=1", "?a=%2f&b=%ZZ", "?../.."]),
    )


_TARGET = st.one_of(_targets(_GOOD_PIECES), _targets(st.one_of(_GOOD_PIECES, _BAD_PIECES)))


def _server_path(path: str) -> str:
    """The path a decoding, parameter-dropping server routes on (a servlet path): ``;params``
    cut from each segment, then percent-decoded -- computed with the standard library,
    independently of the normaliser."""
    return unquote("/".join(seg.partition(";")[0] for seg in path.split("/")), errors="strict")


def _globs_for(path: str) -> list[str]:
    """Path rules an operator could write that match ``path``: itself, every prefix with
    ``/**``, and each segment replaced by ``*``."""
    segs = path.split("/")[1:]
    out = [path]
    for i in range(len(segs) + 1):
        out.append("/" + "/".join([*segs[:i], "**"]))
    for i in range(len(segs)):
        out.append("/" + "/".join([*segs[:i], "*", *segs[i + 1 :]]))
    return out


def _policy_saw(policy_path: str) -> str:
    facts = RequestFacts.from_mapping({
        "tenant": "t", "plan": "p", "api_key_id": "k", "method": "GET", "path": policy_path,
        "operation": "forward", "now": "2025-01-06T10:00:00Z",
    })
    return facts.path


@settings(max_examples=600, derandomize=True, deadline=None)
@given(target=_TARGET, allow_params=st.booleans())
def test_a_rule_matching_the_path_the_upstream_routes_on_matches_what_the_policy_saw(
    target: str, allow_params: bool,
) -> None:
    try:
        fwd = normalize_target(target, allow_path_params=allow_params)
    except BadRequest:
        return
    seen = _policy_saw(fwd.policy_path)
    # The client's target and the forwarded one mean the same path to a decoding server.
    upstream_path = _server_path(fwd.path)
    assert upstream_path == _server_path(target.partition("?")[0])
    assert upstream_path == fwd.policy_path == seen
    for pattern in _globs_for(upstream_path):
        try:
            rx = compile_alternatives([path_glob_regex(pattern)])
        except GlobError:  # a pattern no policy file could hold ("[", whitespace, ...)
            continue
        assert rx.fullmatch(seen), (target, pattern, seen)
    # No segment of what the policy saw, nor of what the upstream receives, is empty or a dot
    # segment, and nothing ambiguous is left encoded.
    inner = seen.split("/")[1:-1]
    assert "" not in inner and "." not in seen.split("/") and ".." not in seen.split("/")
    assert not re.search(r"%(2[eEfF3]|5[cC]|3[bBfF]|[01][0-9a-fA-F]|20|7[fF])", fwd.path)
    assert fwd.query == (target.partition("?")[2] if "?" in target else None)


@settings(max_examples=300, derandomize=True, deadline=None)
@given(target=_TARGET, allow_params=st.booleans())
def test_normalising_twice_changes_nothing(target: str, allow_params: bool) -> None:
    try:
        once = normalize_target(target, allow_path_params=allow_params)
    except BadRequest:
        return
    assert normalize_target(once.target, allow_path_params=allow_params) == once


@settings(max_examples=200, derandomize=True, deadline=None)
@given(target=_TARGET)
def test_without_parameters_allowed_no_semicolon_reaches_the_upstream_path(target: str) -> None:
    try:
        fwd = normalize_target(target)
    except BadRequest:
        return
    assert ";" not in fwd.path and fwd.policy_path == unquote(fwd.path, errors="strict")
