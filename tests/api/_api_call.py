"""One helper for handler tests: resolve, parse, handle, and check the answer against openapi.yaml."""

from __future__ import annotations

import json
from typing import Any

from _api_openapi import documented_codes, validate_response

from qpher_proxy.api import CryptoAPI, resolve
from qpher_proxy.context import TenantContext
from qpher_proxy.errors import QpherError


async def call(
    api: CryptoAPI,
    ctx: TenantContext,
    method: str,
    path: str,
    body: Any = b"",
    *,
    query: str | None = None,
    tls: tuple[str | None, str | None] = (None, None),
) -> tuple[int, dict[str, Any]]:
    """Returns ``(status, json)``; an error becomes ``(status, {"error": {...}})`` after checking
    that its status and code are documented for the route. Every answer is schema-checked."""
    found = resolve(method, path)
    assert found is not None, path
    route, params = found
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    try:
        parsed = api.parse(route, raw, params, query)
        status, obj = await api.handle(parsed, ctx, tls_version=tls[0], tls_group=tls[1])
    except QpherError as exc:
        assert exc.code in documented_codes(route, exc.status), (
            f"{route.name}: {exc.status} {exc.code} not documented ({exc.message})")
        obj = {"error": {"code": exc.code, "message": exc.message, "request_id": ctx.request_id}}
        validate_response(route, exc.status, obj)
        return exc.status, obj
    assert status == route.status
    json.dumps(obj)  # plain JSON data only
    validate_response(route, status, obj)
    return status, obj


def code(answer: tuple[int, dict[str, Any]]) -> tuple[int, str]:
    status, obj = answer
    return status, obj["error"]["code"]
