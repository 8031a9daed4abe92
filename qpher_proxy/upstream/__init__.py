"""Sidecar forwarding: header and request-target hygiene (pure), a pooled, streaming HTTP/1.1
upstream client and a multiplexing HTTP/2 one (h2 over TLS, h2c)."""

from qpher_proxy.upstream.client import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_IDLE_TIMEOUT,
    IDEMPOTENT_METHODS,
    PoolStats,
    UpstreamClient,
    UpstreamResponse,
    UpstreamTarget,
)
from qpher_proxy.upstream.h2client import H2UpstreamClient, H2UpstreamResponse
from qpher_proxy.upstream.headers import (
    HOP_BY_HOP,
    prepare_downstream_headers,
    prepare_upstream_headers,
)
from qpher_proxy.upstream.target import ForwardTarget, normalize_target

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_IDLE_TIMEOUT",
    "ForwardTarget",
    "H2UpstreamClient",
    "H2UpstreamResponse",
    "HOP_BY_HOP",
    "IDEMPOTENT_METHODS",
    "PoolStats",
    "UpstreamClient",
    "UpstreamResponse",
    "UpstreamTarget",
    "normalize_target",
    "prepare_downstream_headers",
    "prepare_upstream_headers",
]
