"""Sidecar forwarding: header hygiene (pure) and a pooled, streaming HTTP/1.1 upstream client."""

from qpher_proxy.upstream.client import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_IDLE_TIMEOUT,
    IDEMPOTENT_METHODS,
    PoolStats,
    UpstreamClient,
    UpstreamResponse,
    UpstreamTarget,
)
from qpher_proxy.upstream.headers import (
    HOP_BY_HOP,
    prepare_downstream_headers,
    prepare_upstream_headers,
)

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_IDLE_TIMEOUT",
    "HOP_BY_HOP",
    "IDEMPOTENT_METHODS",
    "PoolStats",
    "UpstreamClient",
    "UpstreamResponse",
    "UpstreamTarget",
    "prepare_downstream_headers",
    "prepare_upstream_headers",
]
