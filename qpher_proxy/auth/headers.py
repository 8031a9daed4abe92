"""Header hygiene for authentication and tenant context (pure: no I/O, no state).

* ``extract_api_key`` — where an API key may come from: ``X-API-Key: <key>`` or
  ``Authorization: Bearer <key>``, nowhere else. A key in the URL is refused (400
  ``api_key_in_url``) rather than used, because URLs end up in access logs, proxies' logs,
  browser history and ``Referer`` headers.
* ``redact_target`` — the request-target as it may be logged: query values and anything shaped
  like a key replaced by ``REDACTED``.
* ``strip_identity_headers`` — the client may not claim an identity: the tenant comes from the
  API key record alone. Headers that carry identity or client-address claims are removed before
  anything reads them or forwards them; the sidecar sets its own ``X-Forwarded-*`` and
  ``X-Qpher-*`` headers and the server its own ``X-Request-Id``.
* ``WWW_AUTHENTICATE`` — the challenge sent with every 401.

Header names are compared case-insensitively (h11 already lower-cases them).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import parse_qsl, unquote_plus

from ..errors import APIKeyInURL, Unauthenticated

__all__ = [
    "WWW_AUTHENTICATE",
    "QUERY_PARAMETERS_REFUSED",
    "STRIPPED_HEADERS",
    "STRIPPED_HEADER_PREFIXES",
    "extract_api_key",
    "redact_target",
    "strip_identity_headers",
    "partition_identity_headers",
]

WWW_AUTHENTICATE = b'Bearer realm="qpher"'

# Query parameter names refused outright, whatever their value (compared lower-case, with "-"
# read as "_"): clients that put credentials in URLs use these names.
QUERY_PARAMETERS_REFUSED = frozenset(
    {"api_key", "apikey", "key", "token", "access_token", "x_api_key", "authorization", "bearer"}
)

# Exactly these request headers are removed by strip_identity_headers (lower-case names):
STRIPPED_HEADERS = frozenset(
    {
        b"x-tenant-id",  # tenant claims: the tenant comes from the key record only
        b"x-tenant",
        b"forwarded",  # RFC 7239 client identity/address claims (the sidecar sets its own)
        b"x-real-ip",  # client address claims used by common reverse proxies
        b"x-client-ip",
        b"true-client-ip",
        b"x-request-id",  # ours is random; a client copy is kept only in logs (http.messages)
        b"x-remote-user",  # user identity claims trusted by apps behind auth proxies
        b"remote-user",
        b"x-user-id",
    }
)
# ... and every header whose name starts with one of these:
STRIPPED_HEADER_PREFIXES = (
    b"x-qpher-",  # our own context headers (tenant, plan, key id, request id) towards upstream
    b"x-forwarded-",  # X-Forwarded-For/-Host/-Proto/-User/-Email/...: set by the sidecar itself
    b"x-auth-request-",  # oauth2-proxy style identity headers
)
# Unless keep_api_key=True (config upstream.pass_api_key), the credential headers go as well:
# X-API-Key always, Authorization only when it carries a Bearer qph_ key (another Authorization,
# e.g. the upstream app's own Basic or Bearer token, is left alone).

_API_KEY_HEADER = b"x-api-key"
_AUTHORIZATION = b"authorization"
_KEYISH = re.compile(r"qph_[A-Za-z0-9]{12}_[A-Za-z0-9]")  # a key, even truncated
_KEYISH_RAW = re.compile(r"qph(?:_|%5[Ff])[A-Za-z0-9%_]*")  # for redaction, incl. %-encoded


def _bearer(value: bytes) -> bytes | None:
    scheme, _, credentials = value.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    return credentials.strip()


def _check_url(query: str, path: str) -> None:
    if _KEYISH.search(path) or _KEYISH.search(unquote_plus(path)):
        raise APIKeyInURL(
            "API keys are accepted only in the Authorization or X-API-Key header, never in the URL"
        )
    if not query:
        return
    if _KEYISH.search(query) or _KEYISH.search(unquote_plus(query)):
        raise APIKeyInURL(
            "API keys are accepted only in the Authorization or X-API-Key header, never in the URL"
        )
    for name, _value in parse_qsl(query, keep_blank_values=True, max_num_fields=None):
        if name.strip().lower().replace("-", "_") in QUERY_PARAMETERS_REFUSED:
            raise APIKeyInURL(
                "credentials are accepted only in the Authorization or X-API-Key header, "
                f"never as the query parameter {name[:40]!r}"
            )


def extract_api_key(
    headers: Iterable[tuple[bytes, bytes]], query: str | bytes, *, path: str | bytes = ""
) -> str | None:
    """The API key presented with a request, or None if there is none.

    Raises ``APIKeyInURL`` (400) if the query string (or ``path``, if given) holds something
    shaped like a key or a parameter named like a credential (``QUERY_PARAMETERS_REFUSED``),
    and ``Unauthenticated`` (reason ``ambiguous``) for two X-API-Key headers, two Bearer
    Authorization headers, or an X-API-Key and a *different* Bearer qph_ key. X-API-Key wins
    over a Bearer token that is not a qph_ key (that one is the upstream app's business).

    The returned string is a secret: pass it to ``Authenticator.authenticate`` and drop it.
    A non-ASCII value is returned as decoded Latin-1 and fails authentication as malformed.
    """
    q = query.decode("latin-1") if isinstance(query, bytes) else query
    p = path.decode("latin-1") if isinstance(path, bytes) else path
    _check_url(q, p)
    api_keys: list[bytes] = []
    bearers: list[bytes] = []
    for name, value in headers:
        lname = name.lower()
        if lname == _API_KEY_HEADER:
            api_keys.append(value.strip())
        elif lname == _AUTHORIZATION:
            token = _bearer(value)
            if token is not None:
                bearers.append(token)
    if len(api_keys) > 1 or len(bearers) > 1:
        raise Unauthenticated("ambiguous")
    if api_keys:
        if bearers and bearers[0].startswith(b"qph_") and bearers[0] != api_keys[0]:
            raise Unauthenticated("ambiguous")
        return api_keys[0].decode("latin-1")
    if bearers:
        return bearers[0].decode("latin-1")
    return None


def _printable(text: str) -> str:
    return "".join(c if 0x20 < ord(c) < 0x7F else f"%{ord(c):02X}" for c in text)


def redact_target(target: str | bytes) -> str:
    """The request-target safe to log: every query value (and any key-shaped text anywhere,
    names included) replaced by ``REDACTED``; non-printable characters %-escaped."""
    t = target.decode("latin-1") if isinstance(target, bytes) else target
    path, sep, query = t.partition("?")
    path = _KEYISH_RAW.sub("REDACTED", path)
    if not sep:
        return _printable(path)
    parts = []
    for part in query.split("&"):
        name, eq, _value = part.partition("=")
        name = _KEYISH_RAW.sub("REDACTED", name)
        parts.append(f"{name}=REDACTED" if eq else name)
    return _printable(path + "?" + "&".join(parts))


def _is_identity_header(lname: bytes) -> bool:
    return lname in STRIPPED_HEADERS or lname.startswith(STRIPPED_HEADER_PREFIXES)


def partition_identity_headers(
    headers: Iterable[tuple[bytes, bytes]], *, keep_api_key: bool = False
) -> tuple[list[tuple[bytes, bytes]], list[bytes]]:
    """``(kept headers, lower-case names removed)`` — the names are for the audit log (a
    client that sends ``X-Tenant-Id`` is worth noting); the removed values are dropped."""
    kept: list[tuple[bytes, bytes]] = []
    removed: list[bytes] = []
    for name, value in headers:
        lname = name.lower()
        if _is_identity_header(lname):
            removed.append(lname)
        elif not keep_api_key and lname == _API_KEY_HEADER:
            removed.append(lname)
        elif not keep_api_key and lname == _AUTHORIZATION and (_bearer(value) or b"").startswith(b"qph_"):
            removed.append(lname)
        else:
            kept.append((name, value))
    return kept, removed


def strip_identity_headers(
    headers: Iterable[tuple[bytes, bytes]], *, keep_api_key: bool = False
) -> list[tuple[bytes, bytes]]:
    """``headers`` without the identity headers listed in ``STRIPPED_HEADERS`` /
    ``STRIPPED_HEADER_PREFIXES`` and (unless ``keep_api_key``) without our API key."""
    return partition_identity_headers(headers, keep_api_key=keep_api_key)[0]
