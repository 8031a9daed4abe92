"""TLS termination: settings and contexts (pure), a sans-I/O engine, and trio adapters.

Layers, bottom up: ``context`` (TLSSettings -> OpenSSL context, reload and ticket-key rotation
holder), ``clienthello`` (the ticket a ClientHello offers), ``certs`` (dev PKI with
cryptography), ``engine`` (TLS over memory BIOs, no I/O), ``stream`` and ``listener``
(trio). The errors raised are in ``qpher_proxy.errors`` (``TLSError`` family); the stream raises
subclasses that are also ``trio.BrokenResourceError``.
"""

from .context import (
    DEFAULT_GROUPS,
    HYBRID_PQ_GROUPS,
    LoadedTLSContext,
    ServerTLSContextHolder,
    TLSSettings,
    build_server_context,
    is_hybrid_pq_group,
)
from .engine import NEED_DATA, TLSEngine, TLSInfo
from .listener import HandOverListener, TLSListener, open_tls_listeners
from .stream import TLSStream

__all__ = [
    "DEFAULT_GROUPS",
    "HYBRID_PQ_GROUPS",
    "HandOverListener",
    "LoadedTLSContext",
    "NEED_DATA",
    "ServerTLSContextHolder",
    "TLSEngine",
    "TLSInfo",
    "TLSListener",
    "TLSSettings",
    "TLSStream",
    "build_server_context",
    "is_hybrid_pq_group",
    "open_tls_listeners",
]
