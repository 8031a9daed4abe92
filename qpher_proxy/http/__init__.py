"""HTTP/1.1 edge: h11 server loop, request/response types, error rendering."""

from .limits import HTTP2Limits
from .messages import REQUEST_ID_HEADER, Base64Text, Body, Request, Response, error_response
from .security_headers import SecurityHeaders
from .server import (
    Handler,
    HTTPLimits,
    HTTPServer,
    RequestDoneHook,
    ShutdownSignal,
    new_request_id,
    peer_address,
    serve_connection,
)

__all__ = [
    "REQUEST_ID_HEADER",
    "Base64Text",
    "Body",
    "Request",
    "Response",
    "error_response",
    "HTTP2Limits",
    "HTTPLimits",
    "HTTPServer",
    "Handler",
    "RequestDoneHook",
    "SecurityHeaders",
    "ShutdownSignal",
    "new_request_id",
    "peer_address",
    "serve_connection",
]
