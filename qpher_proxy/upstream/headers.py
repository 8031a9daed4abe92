"""Header hygiene for sidecar forwarding (pure: no I/O, no trio).

Theory of operation
-------------------
The gateway sits between an untrusted client and an upstream app that trusts what the gateway
tells it. Every header the upstream reads as a statement *by the gateway* must therefore be
written by the gateway alone, and every header that only describes the client-to-gateway
connection must stop at the gateway. Three classes of headers are handled:

1. **Hop-by-hop headers** (RFC 9110 section 7.6.1) describe one connection, not the message:
   ``Connection``, ``Keep-Alive``, ``Proxy-Authenticate``, ``Proxy-Authorization``, ``TE``,
   ``Trailer``, ``Transfer-Encoding``, ``Upgrade`` (plus the obsolete ``Proxy-Connection``),
   and every header *named* in a ``Connection`` header. They are removed in both directions.
   Body framing (``Content-Length`` / chunked) is re-decided for each leg: the upstream client
   frames the request from the body it is given, and the HTTP server frames the response.

2. **Identity and provenance headers** the client could forge: ``X-Qpher-*``, ``X-Tenant-Id``,
   ``X-Request-Id``, ``Forwarded``, ``X-Forwarded-*`` and ``X-Real-IP``. Every client-sent copy
   is dropped, whatever its case or how many copies there are, and the gateway then writes its
   own: ``X-Qpher-Tenant``, ``X-Qpher-Key-Id``, ``X-Request-Id``, ``X-Forwarded-For``,
   ``X-Forwarded-Proto`` and ``X-Forwarded-Host``. The upstream sees exactly one of each, and
   it is ours.

   ``X-Forwarded-For`` policy: **we are the edge.** The peer address of the TCP connection is
   the only client address we can vouch for, so ``X-Forwarded-For`` is set to that address
   alone and a client-sent chain is discarded (a client could put anything in it). A
   deployment behind a trusted load balancer may pass ``trust_forwarded_for=True`` to append
   the peer address to the chain the load balancer sent instead.

3. **Credentials for the gateway**: the API key (``X-API-Key``, or ``Authorization: Bearer
   qph_...``) authenticated the client *to us*; the upstream has no use for it and must not
   be able to replay it, so it is removed unless the operator set ``pass_api_key``. An
   ``Authorization`` header carrying anything other than a ``qph_`` bearer token belongs to
   the upstream app and is passed on.

``TE`` is hop-by-hop, except that ``keep_te_trailers=True`` (an HTTP/2 upstream) keeps a
``TE: trailers``: on HTTP/2 it is the one value allowed, and gRPC servers require it to know the
client reads trailers (RFC 9113 section 8.2.2).

``Expect`` is also dropped: the gateway answers ``100-continue`` to its client itself and then
streams the body; the upstream receives a request whose body is already on its way.

The client's ``Host`` becomes ``X-Forwarded-Host``; the ``Host`` sent upstream is the
upstream's own authority (added by the client, like nginx's default ``proxy_set_header Host
$proxy_host``) unless ``preserve_host=True``.

Header names come out lower-cased (HTTP/1.1 names are case-insensitive; h11 lower-cases them
anyway). Values written by the gateway are checked to be visible ASCII, so a bad tenant id can
never split a header (it raises instead of being sent).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from qpher_proxy.errors import QpherError

Headers = list[tuple[bytes, bytes]]

#: RFC 9110 section 7.6.1, plus ``proxy-connection`` (pre-standard, still sent by some clients).
HOP_BY_HOP: frozenset[bytes] = frozenset({
    b"connection",
    b"keep-alive",
    b"proxy-authenticate",
    b"proxy-authorization",
    b"proxy-connection",
    b"te",
    b"trailer",
    b"transfer-encoding",
    b"upgrade",
})

#: Exact names of client-sent identity/provenance headers that are always dropped.
SPOOFABLE: frozenset[bytes] = frozenset({
    b"x-tenant-id",
    b"x-request-id",
    b"forwarded",
    b"x-real-ip",
})

#: Name prefixes of client-sent headers that are always dropped.
SPOOFABLE_PREFIXES: tuple[bytes, ...] = (b"x-qpher-", b"x-forwarded-")

#: The recognisable prefix of an API key (``qph_<key_id>_<secret>``).
API_KEY_PREFIX = b"qph_"

_BEARER_API_KEY = re.compile(rb"\A[ \t]*bearer[ \t]+" + re.escape(API_KEY_PREFIX), re.IGNORECASE)
_VISIBLE_ASCII = re.compile(r"\A[\x21-\x7e]+\Z")
_TOKEN_SPLIT = re.compile(rb"[ \t]*,[ \t]*")


def _connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    """Every header name listed in any ``Connection`` header, lower-cased."""
    named: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            for token in _TOKEN_SPLIT.split(value.strip(b" \t")):
                if token:
                    named.add(token.lower())
    return named


def _is_api_key_header(name: bytes, value: bytes) -> bool:
    if name == b"x-api-key":
        return True
    return name == b"authorization" and _BEARER_API_KEY.match(value) is not None


def _value(what: str, value: str) -> bytes:
    """An ASCII header value we write ourselves; refuse rather than send a malformed one."""
    if not _VISIBLE_ASCII.match(value):
        # The message names the field only: the value may be attacker-influenced or long.
        raise QpherError(f"cannot forward the request: {what} is not a valid header value")
    return value.encode("ascii")


def prepare_upstream_headers(
    client_headers: Iterable[tuple[bytes, bytes]],
    *,
    client_ip: str,
    proto: str = "https",
    host: bytes | None,
    tenant_id: str,
    api_key_id: str,
    request_id: str,
    pass_api_key: bool = False,
    preserve_host: bool = False,
    trust_forwarded_for: bool = False,
    keep_te_trailers: bool = False,
) -> Headers:
    """The headers to send upstream for a request that arrived with ``client_headers``.

    ``host`` is the authority the client addressed (its ``Host`` header, or the authority of
    an absolute-form target); ``None`` means "take the client's ``Host`` header if any". It is
    sent as ``X-Forwarded-Host``. Framing headers (``Content-Length``) are passed through, but
    the upstream client replaces them with the framing of the body it actually sends.

    Raises ``QpherError`` (500) if one of the values we inject is not visible ASCII.
    """
    if proto not in ("https", "http"):
        raise ValueError(f"proto must be 'https' or 'http', not {proto!r}")
    out, client_host, forwarded_chain = _kept_client_headers(
        client_headers, preserve_host=preserve_host, pass_api_key=pass_api_key,
        keep_te_trailers=keep_te_trailers,
    )
    out.append((b"x-forwarded-for", _forwarded_for(client_ip, forwarded_chain, trust_forwarded_for)))
    out.append((b"x-forwarded-proto", proto.encode("ascii")))
    forwarded_host = host if host is not None else client_host
    if forwarded_host:
        out.append((b"x-forwarded-host", forwarded_host))
    out.append((b"x-qpher-tenant", _value("the tenant id", tenant_id)))
    out.append((b"x-qpher-key-id", _value("the key id", api_key_id)))
    out.append((b"x-request-id", _value("the request id", request_id)))
    return out


def _kept_client_headers(
    client_headers: Iterable[tuple[bytes, bytes]], *, preserve_host: bool, pass_api_key: bool,
    keep_te_trailers: bool = False,
) -> tuple[Headers, bytes | None, list[bytes]]:
    """The client's headers that may travel on (names lower-cased), its first ``Host`` value and
    its ``X-Forwarded-For`` values, which are taken out to be rebuilt by ``_forwarded_for``."""
    headers = [(name.lower(), value) for name, value in client_headers]
    connection_named = _connection_tokens(headers)
    out: Headers = []
    client_host: bytes | None = None
    forwarded_chain: list[bytes] = []
    for name, value in headers:
        if name == b"host":
            if client_host is None:
                client_host = value
            if preserve_host:
                out.append((name, value))
            continue
        if name == b"x-forwarded-for":
            forwarded_chain.append(value.strip(b" \t"))
            continue
        if name == b"te" and keep_te_trailers and value.strip(b" \t").lower() == b"trailers":
            out.append((name, b"trailers"))
            continue
        if name in HOP_BY_HOP or name in connection_named or name == b"expect":
            continue
        if name in SPOOFABLE or name.startswith(SPOOFABLE_PREFIXES):
            continue
        if not pass_api_key and _is_api_key_header(name, value):
            continue
        out.append((name, value))
    return out, client_host, forwarded_chain


def _forwarded_for(client_ip: str, forwarded_chain: list[bytes], trust_forwarded_for: bool) -> bytes:
    """``X-Forwarded-For``: the client's address, after the client's own chain only if trusted."""
    peer = _value("the client address", client_ip)
    if trust_forwarded_for and any(forwarded_chain):
        return b", ".join(v for v in forwarded_chain if v) + b", " + peer
    return peer


def prepare_downstream_headers(upstream_headers: Iterable[tuple[bytes, bytes]]) -> Headers:
    """The upstream response's headers as they may be sent to the client.

    Removes hop-by-hop headers and those named in the upstream's ``Connection`` header: the
    upstream's connection management (``Connection: close``, ``Keep-Alive: timeout=5``) is
    about the gateway-to-upstream connection and says nothing about the client's.
    ``Content-Length`` is kept (the HTTP server then frames with it rather than chunking),
    except when the upstream also sent ``Transfer-Encoding``: then the length is not the
    body's and is dropped too (RFC 9112 section 6.3: Transfer-Encoding overrides it).
    """
    headers = [(name.lower(), value) for name, value in upstream_headers]
    connection_named = _connection_tokens(headers)
    had_transfer_encoding = any(name == b"transfer-encoding" for name, _ in headers)
    out: Headers = []
    for name, value in headers:
        if name in HOP_BY_HOP or name in connection_named:
            continue
        if had_transfer_encoding and name == b"content-length":
            continue
        out.append((name, value))
    return out
