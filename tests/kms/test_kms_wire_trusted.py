"""The decoder's trusted constructors build exactly what the checked dataclass constructors build."""

from __future__ import annotations

import secrets
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from qpher_proxy.context import TenantContext
from qpher_proxy.kms.wire.protocol import (
    MAX_RID,
    ClientConnection,
    Request,
    Response,
    ServerConnection,
    trusted_request,
    trusted_response,
)

TOKEN = secrets.token_bytes(32)
_NAMES = st.text(min_size=1, max_size=40).filter(lambda s: len(s.encode()) <= 255)
_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.binary(max_size=32)
    | st.text(max_size=32),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)


def _same(built: Any, checked: Any) -> None:
    assert type(built) is type(checked)
    assert built == checked
    assert repr(built) == repr(checked)
    if isinstance(checked, Request):
        assert type(built.context) is TenantContext and hash(built.context) == hash(checked.context)


@given(rid=st.integers(1, MAX_RID), tenant=_NAMES, request_id=_NAMES, api_key_id=_NAMES,
       op=st.text(min_size=1, max_size=64).filter(lambda s: len(s.encode()) <= 255),
       args=st.dictionaries(st.text(max_size=8), _VALUES, max_size=4))
def test_trusted_request_equals_the_checked_constructor(
    rid: int, tenant: str, request_id: str, api_key_id: str, op: str, args: dict[str, Any]
) -> None:
    checked = Request(rid, TOKEN, TenantContext(tenant, request_id, api_key_id), op, args)
    _same(trusted_request(rid, TOKEN, tenant, request_id, api_key_id, op, args), checked)


@given(rid=st.integers(0, MAX_RID), value=_VALUES)
def test_trusted_response_equals_the_checked_constructor(rid: int, value: Any) -> None:
    _same(trusted_response(rid, value), Response(rid, value))


@given(tenant=_NAMES, args=st.dictionaries(st.text(max_size=8), _VALUES, max_size=4), value=_VALUES)
def test_decoded_frames_equal_the_checked_constructors(tenant: str, args: dict[str, Any], value: Any) -> None:
    client, server = ClientConnection.bootstrapped(TOKEN), ServerConnection()
    server.receive_data(ClientConnection(TOKEN).hello({}))  # the server is SERVING after one HELLO
    server.next_event()
    ctx = TenantContext(tenant, "req-1", "ak_1")
    rid, frame = client.request(ctx, "sign", args)
    server.receive_data(frame)
    _same(server.next_event(), Request(rid, TOKEN, ctx, "sign", args))
    client.receive_data(server.response(rid, value))
    _same(client.next_event(), Response(rid, value))
