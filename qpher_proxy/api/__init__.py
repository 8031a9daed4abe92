"""The /v1 JSON crypto API: routes, strict request validation and handlers.

Decoupled from HTTP: the server resolves a route, reads the body, calls ``CryptoAPI.parse``
(4xx on bad input), asks policy about ``ParsedRequest.key_ids()`` and its fields, then
``CryptoAPI.handle`` returns ``(status, json_object)``. ``openapi.yaml`` at the repository root
describes every route; ``tests/api`` keeps the two in step.
"""

from .handlers import (
    DEFAULT_MAX_BATCH_ITEMS,
    HPKE_AEAD_ID,
    HPKE_INFO,
    HPKE_KDF_ID,
    APIAnswer,
    CryptoAPI,
    KMSLike,
    ParsedRequest,
    key_json,
)
from .routes import ROUTES, Route, RouteMethodNotAllowed, resolve

__all__ = [
    "APIAnswer", "CryptoAPI", "ParsedRequest", "KMSLike", "key_json", "Route", "ROUTES", "resolve",
    "RouteMethodNotAllowed", "DEFAULT_MAX_BATCH_ITEMS", "HPKE_INFO", "HPKE_KDF_ID", "HPKE_AEAD_ID",
]
