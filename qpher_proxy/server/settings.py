"""Each subsystem's settings built from the config, in one place.

The config model (``config/model.py``) mirrors the YAML file: one dataclass per section, paths
as the strings the loader resolved against the config file's directory. The layers below the
composition never see a config object; like ``h11.Connection(max_incomplete_event_size=...)``
they take their limits and paths as arguments (``TLSSettings``, ``HTTPLimits``, ``KEKSettings``,
the ``KMSSupervisor`` and ``UpstreamClient`` arguments). This module is the one place that reads
the config sections and builds those, with the types each subsystem declares (a TLS path is a
``Path``). The one-process ``serve()``, the privilege-separated supervisor and the offline KEK
rotation all build theirs here, so the modes cannot drift apart field by field.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..audit import AuditLog
from ..config import Config
from ..config.model import HTTP2Config, KEKConfig, TLSConfig, UpstreamConfig, WebSocketConfig
from ..http import HTTP2Limits, HTTPLimits
from ..kms.client import OpHook
from ..kms.client.remote import RemoteKMS
from ..kms.launcher import HandoffHook, KMSSupervisor
from ..kms.launcher.supervisor import RestartHook
from ..kms.wire.model import KEKSettings, KMSStorageSettings
from ..metrics import Metrics
from ..sandbox import RunAs
from ..tls.context import TLSSettings
from ..tls.internal import InternalTLSContextHolder, InternalTLSSettings
from ..upstream import H2UpstreamClient, UpstreamClient
from ..upstream.tunnel import TunnelLimits
from .tunnels import Tunnels

__all__ = ["http2_limits", "http_limits", "kek_settings", "kms_supervisor", "kms_worker_count", "remote_kms",
           "tls_settings", "upstream_client", "websocket_tunnels"]


def _optional_path(path: str | None) -> Path | None:
    return None if path is None else Path(path)


def tls_settings(t: TLSConfig, http2: HTTP2Config | None = None) -> TLSSettings:
    """The ``tls:`` section; with ``http2`` enabled, ALPN offers h2 before http/1.1."""
    alpn = ("h2", "http/1.1") if http2 is not None and http2.enabled else ("http/1.1",)
    return TLSSettings(
        alpn=alpn,
        cert_file=Path(t.cert_file), key_file=Path(t.key_file),
        mldsa_cert_file=_optional_path(t.mldsa_cert_file), mldsa_key_file=_optional_path(t.mldsa_key_file),
        min_version=t.min_version, groups=t.groups, require_pq=t.require_pq, client_auth=t.client_auth,
        client_ca=_optional_path(t.client_ca), handshake_timeout=t.handshake_timeout,
        session_tickets=t.session_tickets, ticket_key_rotation=t.ticket_key_rotation,
    )


def http_limits(cfg: Config) -> HTTPLimits:
    """The ``http:`` section and the connection cap of ``limits:``."""
    h = cfg.http
    return HTTPLimits(
        max_header_bytes=h.max_header_bytes, max_body_bytes=h.max_body_bytes,
        header_timeout=h.header_timeout, idle_timeout=h.idle_timeout,
        max_connections=cfg.limits.max_connections,
    )


def http2_limits(cfg: Config) -> HTTP2Limits | None:
    """The ``http2:`` section, or None when HTTP/2 is off."""
    h = cfg.http2
    if not h.enabled:
        return None
    return HTTP2Limits(
        max_concurrent_streams=h.max_concurrent_streams, header_table_size=h.header_table_size,
        initial_window_size=h.initial_window_size, connection_window_size=h.connection_window_size,
        max_continuation_frames=h.max_continuation_frames, flood_window=h.flood_window,
        max_resets_per_window=h.max_resets_per_window,
        max_control_frames_per_window=h.max_control_frames_per_window,
    )


def kek_settings(k: KEKConfig) -> KEKSettings:
    # KEKSettings travels to the workers in their HELLO frame: its file stays a string.
    return KEKSettings(
        provider=k.provider, file=k.file, env=k.env, pkcs11_module=k.pkcs11_module,
        pkcs11_token_label=k.pkcs11_token_label, pkcs11_key_label=k.pkcs11_key_label,
        pkcs11_pin_file=k.pkcs11_pin_file, pkcs11_pin_env=k.pkcs11_pin_env,
    )


def kms_worker_count(cfg: Config) -> int:
    """KMS workers per gateway process: ``kms.workers``, or for 0 the spare cores (one per core
    less one per gateway process) shared out among the ``server.workers`` gateways, at least 1
    each. With one gateway that is ``default_worker_count()``."""
    if cfg.kms.workers:
        return cfg.kms.workers
    gateways = cfg.server.workers
    return max(1, ((os.cpu_count() or 1) - gateways) // gateways)


def kms_supervisor(
    cfg: Config,
    *,
    on_restart: RestartHook | None = None,
    on_op: OpHook | None = None,
    python: str = sys.executable,
    worker_user: RunAs | None = None,
    handoff: HandoffHook | None = None,
    kek_fd: int | None = None,
) -> KMSSupervisor:
    """The KMS workers the ``kms:`` section describes; the hooks and the process details are the
    caller's (the defaults are ``KMSSupervisor``'s own)."""
    k = cfg.kms
    st = cfg.storage
    storage = None if st.backend != "postgresql" else KMSStorageSettings(  # the DSN travels in HELLO only
        dsn=st.kms_dsn or st.dsn or "", role_prefix=st.role_prefix, pool_size=st.pool_size,
        connect_timeout=st.connect_timeout, statement_timeout=st.statement_timeout,
        pool_timeout=st.pool_timeout, lease_ttl=st.lease_ttl, sweep_interval=st.sweep_interval,
    )
    return KMSSupervisor(
        kms_dir=k.dir, kek=kek_settings(k.kek), workers=kms_worker_count(cfg),
        backend=cfg.crypto.backend, destroy_delay=k.destroy_delay, request_timeout=k.request_timeout,
        restart_backoff_max=k.restart_backoff_max, max_batch=max(cfg.api.max_batch_items, 1),
        on_restart=on_restart, on_op=on_op, python=python, worker_user=worker_user, handoff=handoff,
        kek_fd=kek_fd, storage=storage,
    )


def remote_kms(cfg: Config, *, on_op: OpHook | None = None) -> RemoteKMS:
    """``kms.mode: remote``: the KMS nodes of ``kms.endpoints`` over PQ mutual TLS. The client
    certificate and key are read here, before the gateway confines itself."""
    from ..config.loader import parse_listen

    k = cfg.kms
    assert k.client_cert_file and k.client_key_file and k.ca_file  # the config loader requires them
    tls = InternalTLSContextHolder.for_client(InternalTLSSettings(
        cert_file=Path(k.client_cert_file), key_file=Path(k.client_key_file), ca_file=Path(k.ca_file),
        peer_uri=k.server_uri, ecdsa_cert_file=_optional_path(k.client_ecdsa_cert_file),
        ecdsa_key_file=_optional_path(k.client_ecdsa_key_file), handshake_timeout=k.connect_timeout,
    ))
    endpoints = [parse_listen(e, None, f"kms.endpoints[{i}]") for i, e in enumerate(k.endpoints)]
    return RemoteKMS(
        endpoints, tls, connections_per_endpoint=k.connections_per_endpoint,
        connect_timeout=k.connect_timeout, health_interval=k.health_interval,
        reconnect_backoff_max=k.reconnect_backoff_max, request_timeout=k.request_timeout, on_op=on_op,
    )


def upstream_client(u: UpstreamConfig) -> UpstreamClient | H2UpstreamClient | None:
    """The sidecar's client for ``upstream.protocol``, or None when no ``upstream.url`` is set."""
    if not u.url:
        return None
    if u.protocol != "http1":
        return H2UpstreamClient(
            u.url, protocol=u.protocol, connect_timeout=u.connect_timeout, read_timeout=u.read_timeout,
            ca_file=u.ca_file, client_cert=u.client_cert, client_key=u.client_key,
        )
    return UpstreamClient(
        u.url, connect_timeout=u.connect_timeout, read_timeout=u.read_timeout, pool_size=u.pool_size,
        ca_file=u.ca_file, client_cert=u.client_cert, client_key=u.client_key,
    )


def websocket_tunnels(w: WebSocketConfig, audit: AuditLog, metrics: Metrics) -> Tunnels:
    """The sidecar's WebSocket tunnels: their limits, the audit log and the metrics they report to."""
    return Tunnels(audit, metrics, TunnelLimits(idle_timeout=w.idle_timeout, max_lifetime=w.max_lifetime),
                   max_tunnels=w.max_connections)
