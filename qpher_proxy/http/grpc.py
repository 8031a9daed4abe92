"""The proxy's own refusals, as a gRPC client expects them: a trailers-only answer.

A gRPC client reads the outcome of a call from ``grpc-status`` and ``grpc-message`` (in the
trailers, or in the headers of a "trailers-only" response: one HEADERS frame with END_STREAM),
never from the HTTP status, which is 200 for every call that reached a gRPC server. A proxy
that answers 401 or 403 makes the client report a transport failure (``UNKNOWN`` or
``UNAVAILABLE``, "unexpected HTTP status"), which retries and dashboards misread. So a refusal
of the proxy itself (no key, a policy deny, a rate limit, a bad path) to a request whose
``content-type`` is ``application/grpc`` (``+proto``, ``+json``...) goes out as HTTP 200 with
``grpc-status`` from the table below and ``grpc-message`` the error code (``policy_denied``).

Only the proxy's own responses are mapped: a forwarded upstream response
(``Response.forwarded``) is the gRPC server's answer and passes as it is.

The table (gRPC's ``doc/http-grpc-status-mapping.md`` for the HTTP statuses it lists, our own
choices for the others)::

    HTTP  gRPC status                              proxy error codes seen with it
    400   3  INVALID_ARGUMENT                      bad_request, ambiguous_path, invalid_input
    401   16 UNAUTHENTICATED                       unauthenticated
    403   7  PERMISSION_DENIED                     policy_denied, forbidden
    404   12 UNIMPLEMENTED                         route_not_found
    405   12 UNIMPLEMENTED                         method_not_allowed
    408   4  DEADLINE_EXCEEDED
    413   8  RESOURCE_EXHAUSTED                    body_too_large
    429   8  RESOURCE_EXHAUSTED                    rate_limited, quota_exceeded
    431   8  RESOURCE_EXHAUSTED                    header_too_large
    499   1  CANCELLED                             client_disconnected
    501   12 UNIMPLEMENTED                         not_implemented
    502   14 UNAVAILABLE                           upstream_unavailable, upstream_bad_response
    503   14 UNAVAILABLE                           kms_unavailable, audit_unavailable, ...
    504   4  DEADLINE_EXCEEDED                     upstream_timeout
    other 4xx: 9 FAILED_PRECONDITION; other 5xx: 13 INTERNAL
"""

from __future__ import annotations

import json
import re

__all__ = ["GRPC_STATUS_BY_HTTP", "grpc_status_for", "is_grpc", "trailers_only_headers"]

# HTTP status -> gRPC status code (grpc/grpc doc/statuscodes.md numbers)
GRPC_STATUS_BY_HTTP: dict[int, int] = {
    400: 3,  # INVALID_ARGUMENT
    401: 16,  # UNAUTHENTICATED
    403: 7,  # PERMISSION_DENIED
    404: 12,  # UNIMPLEMENTED
    405: 12,
    408: 4,  # DEADLINE_EXCEEDED
    413: 8,  # RESOURCE_EXHAUSTED
    429: 8,
    431: 8,
    499: 1,  # CANCELLED
    501: 12,
    502: 14,  # UNAVAILABLE
    503: 14,
    504: 4,
}
_FAILED_PRECONDITION = 9
_INTERNAL = 13
_GRPC_CT = b"application/grpc"
# grpc-message is percent-encoded (PROTOCOL-HTTP2.md): our codes are [a-z_], kept as they are
_MESSAGE_SAFE = re.compile(rb"[A-Za-z0-9_.-]{1,64}")


def is_grpc(content_type: bytes | None) -> bool:
    """``application/grpc`` itself or with a ``+format`` or ``;parameters`` suffix."""
    if content_type is None or not content_type.lower().startswith(_GRPC_CT):
        return False
    rest = content_type[len(_GRPC_CT):]
    return rest == b"" or rest[:1] in (b"+", b";")


def grpc_status_for(http_status: int) -> int:
    """The gRPC status of one of the proxy's own HTTP refusals (the table above)."""
    status = GRPC_STATUS_BY_HTTP.get(http_status)
    if status is not None:
        return status
    return _FAILED_PRECONDITION if 400 <= http_status < 500 else _INTERNAL


def _error_code(body: bytes, http_status: int) -> bytes:
    """The ``error.code`` of our JSON error body, or ``http_<status>`` for any other body."""
    try:
        code = json.loads(body)["error"]["code"]
    except (ValueError, TypeError, KeyError):
        code = None
    if isinstance(code, str):
        raw = code.encode("ascii", "replace")
        if _MESSAGE_SAFE.fullmatch(raw):
            return raw
    return b"http_%d" % http_status


def trailers_only_headers(http_status: int, body: bytes, request_id: bytes) -> list[tuple[bytes, bytes]]:
    """The one header block (with END_STREAM) that answers a refused gRPC call."""
    return [
        (b":status", b"200"),
        (b"content-type", _GRPC_CT),
        (b"grpc-status", b"%d" % grpc_status_for(http_status)),
        (b"grpc-message", _error_code(body, http_status)),
        (b"x-request-id", request_id),
    ]
