"""Frames the protocol's own encoders refuse to build, for tests that put bad frames on the wire."""

from __future__ import annotations

from qpher_proxy.kms.wire.protocol import FrameType, Value, _frame, _str8, encode_value


def encode_raw_request(
    rid: int, token: bytes, tenant_id: str, request_id: str, api_key_id: str, op: str, args: Value
) -> bytes:
    """A REQUEST frame with *no* checks (an empty tenant, a wrong token, args that are not a dict)."""
    payload = [token, _str8(tenant_id), _str8(request_id), _str8(api_key_id), _str8(op), encode_value(args)]
    return _frame(FrameType.REQUEST, rid, payload, 2**32 - 1)
