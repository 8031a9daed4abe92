"""WebSocket tunnels of the sidecar: the per-process limit, the audit records and the metrics.

The gateway authenticates, rate-limits and authorizes an upgrade request like any request to
forward (``gateway.py``); then :meth:`Tunnels.open` runs the upstream handshake
(``upstream/websocket.py``). A 101 from the upstream becomes a ``Response(101, upgrade=session)``
whose :class:`TunnelSession` the HTTP connection runs once its own 101 is out
(``http.messages.Upgrade``); the bytes then flow through ``upstream/tunnel.py``.

Audit: ``websocket.upgrade`` when the upstream has accepted (before the client is switched: if it
cannot be written, the upgrade is refused with 503 and the upstream connection closed), and
``websocket.close`` when the tunnel ends, with its duration, the bytes each way and the reason
(``client``, ``upstream``, ``idle_timeout``, ``max_lifetime``, ``shutdown``; ``aborted`` when the
client was never switched). Never a byte of payload.

Metrics: ``qpher_websocket_tunnels_open`` (a gauge) and ``qpher_websocket_tunnels_total{outcome}``
(the reasons above, and ``refused`` for upgrades over ``max_connections``).
"""

from __future__ import annotations

import logging

import trio

from ..audit import AuditLog
from ..auth.apikeys import APIKeyRecord
from ..auth.headers import redact_target
from ..errors import AuditUnavailable, QpherError
from ..http import Request
from ..metrics import Metrics
from ..upstream import UpstreamClient
from ..upstream.tunnel import Tunnel, TunnelLimits
from ..upstream.websocket import WebSocketHandshake, open_websocket

__all__ = ["ABORTED", "DEFAULT_MAX_TUNNELS", "TunnelSession", "Tunnels"]

log = logging.getLogger("qpher.gateway")

DEFAULT_MAX_TUNNELS = 1024  # per gateway process; each holds two sockets (client, upstream)
ABORTED = "aborted"  # the upstream accepted, the client was never switched (it left first)
REFUSED = "refused"


class Tunnels:
    """The open tunnels of one gateway process."""

    def __init__(self, audit: AuditLog, metrics: Metrics, limits: TunnelLimits | None = None,
                 max_tunnels: int = DEFAULT_MAX_TUNNELS) -> None:
        self.audit = audit
        self.metrics = metrics
        self.limits = limits or TunnelLimits()
        self.max_tunnels = max_tunnels
        self.open_count = 0

    async def open(
        self, upstream: UpstreamClient, req: Request, record: APIKeyRecord, target: str, path: str,
        headers: list[tuple[bytes, bytes]],
    ) -> tuple[WebSocketHandshake, TunnelSession | None]:
        """The upstream's answer to the upgrade and, if it switched, the session to run (the
        ``websocket.upgrade`` record written). 503 ``websocket_limit`` over ``max_tunnels``."""
        if self.open_count >= self.max_tunnels:
            self.metrics.websocket_tunnels.labels(REFUSED).inc()
            raise QpherError("too many open websocket connections", code="websocket_limit", status=503)
        self._opened()  # reserved now: the handshake awaits, and others may pass the check meanwhile
        try:
            key = req.header(b"sec-websocket-key") or b""
            hs = await open_websocket(upstream, target, headers, key)
            if not hs.switched:
                self._closed(None)
                return hs, None
            session = TunnelSession(self, req, record, hs, redact_target(path))
            try:
                self.audit.record("websocket.upgrade", "info", request_id=req.request_id,
                                  tenant=record.tenant, api_key_id=record.key_id, path=session.path,
                                  source_ip=req.client_addr)
            except QpherError as exc:
                hs.close()
                raise AuditUnavailable("the audit log is unavailable") from exc
            return hs, session
        except BaseException:
            self._closed(None)
            raise

    def _opened(self) -> None:
        self.open_count += 1
        self.metrics.websocket_tunnels_open.set(float(self.open_count))

    def _closed(self, outcome: str | None) -> None:
        self.open_count -= 1
        self.metrics.websocket_tunnels_open.set(float(self.open_count))
        if outcome is not None:
            self.metrics.websocket_tunnels.labels(outcome).inc()


class TunnelSession:
    """One switched WebSocket: ``run`` relays it, ``abandon`` drops it (``http.messages.Upgrade``)."""

    def __init__(self, tunnels: Tunnels, req: Request, record: APIKeyRecord, hs: WebSocketHandshake,
                 path: str) -> None:
        self._tunnels = tunnels
        self._hs = hs
        self._request_id = req.request_id
        self._tenant = record.tenant
        self._key_id = record.key_id
        self.path = path
        self._ended = False

    async def run(self, stream: trio.abc.Stream, received: bytes) -> None:
        tunnel = Tunnel(stream, self._hs.stream, self._tunnels.limits)
        try:
            await tunnel.run(client_pending=received, upstream_pending=self._hs.received)
        finally:
            self._end(tunnel.reason or ABORTED, tunnel.duration, tunnel.client_to_upstream,
                      tunnel.upstream_to_client)

    def abandon(self) -> None:
        self._hs.close()
        self._end(ABORTED, 0.0, 0, 0)

    def _end(self, reason: str, duration: float, up: int, down: int) -> None:
        if self._ended:
            return
        self._ended = True
        self._tunnels._closed(reason)
        try:
            self._tunnels.audit.record(
                "websocket.close", "info", request_id=self._request_id, tenant=self._tenant,
                api_key_id=self._key_id, path=self.path, reason=reason,
                duration_ms=round(duration * 1e3, 3), bytes_client_to_upstream=up,
                bytes_upstream_to_client=down,
            )
        except QpherError:
            # The tunnel is over either way; the failure shows in /readyz and the next request.
            log.error("could not audit the end of a websocket",
                      extra={"fields": {"request_id": self._request_id}})
