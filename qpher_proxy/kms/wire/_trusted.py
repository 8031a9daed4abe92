"""Trusted constructors: the decoder's fast way to build the events it has already checked.

The decoder builds a Request (and its TenantContext) or a Response for every frame, and it has
already checked every field as the dataclasses' own __init__/__post_init__ would. These build
the same frozen objects without running those checks again: the slots are filled through their
descriptors (what the generated __init__ does by name, at twice the cost). Only for fields
checked by the caller; ``tests/kms/test_kms_wire_trusted.py`` proves they build exactly what
the checked constructors build.
"""

from __future__ import annotations

from ...context import TenantContext
from ._events import Request, Response
from ._values import Value

_new = object.__new__
_set_tenant, _set_request_id, _set_api_key_id = (
    TenantContext.__dict__[f].__set__ for f in ("tenant_id", "request_id", "api_key_id")
)
_set_rid, _set_token, _set_context, _set_op, _set_args = (
    Request.__dict__[f].__set__ for f in ("rid", "token", "context", "op", "args")
)
_set_resp_rid, _set_resp_value = (Response.__dict__[f].__set__ for f in ("rid", "value"))


def trusted_request(
    rid: int, token: bytes, tenant_id: str, request_id: str, api_key_id: str, op: str, args: dict[str, Value]
) -> Request:
    """``Request(rid, token, TenantContext(tenant_id, request_id, api_key_id), op, args)`` for
    fields the caller has checked (non-empty context strings and op, a 32-byte token, rid > 0)."""
    ctx = _new(TenantContext)
    _set_tenant(ctx, tenant_id)
    _set_request_id(ctx, request_id)
    _set_api_key_id(ctx, api_key_id)
    req = _new(Request)
    _set_rid(req, rid)
    _set_token(req, token)
    _set_context(req, ctx)
    _set_op(req, op)
    _set_args(req, args)
    return req


def trusted_response(rid: int, value: Value) -> Response:
    """``Response(rid, value)`` (which checks nothing itself, but costs a generated __init__)."""
    resp = _new(Response)
    _set_resp_rid(resp, rid)
    _set_resp_value(resp, value)
    return resp
