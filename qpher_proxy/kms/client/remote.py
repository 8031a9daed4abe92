"""The gateway's side of a remote KMS tier: KMS nodes over post-quantum mutual TLS.  Gateway side (trio).

Theory of operation
===================

With ``kms.mode: remote`` the gateway starts no KMS worker. :class:`RemoteKMS` keeps
``connections_per_endpoint`` TLS connections open to each KMS node (``qpher-proxy kms serve``,
see ``server/kms_node.py``) and offers ``serve()`` the surface a local ``KMSSupervisor`` offers:
``client`` (the same :class:`~.pool.KMSClient`), ``info``, ``workers``, ``ready``, ``run``.

The internal hop::

    gateway                                                     KMS node
    TCP connect, TLS 1.3 handshake  ──────────────────────────▶ X25519MLKEM768 only; ML-DSA-65
      (tls/internal.py: the node must chain to kms.ca_file       certificates on both sides; the
       and carry kms.server_uri, else refused in the handshake)  caller must carry the gateway URI
    token = TLS exporter (RFC 8446 7.5), 32 bytes                 the same exporter
    HELLO(token) ─────────────────────────────────────────────▶ token checked; READY(node facts)
    REQUEST(token, tenant ctx, op, args) ... multiplexed by rid ▶ token checked per frame; relayed
                                                                  to a local KMS worker

Each connection becomes a :class:`TLSChannel`, a :class:`~.pool.WorkerChannel` that writes
its frames to the TLS stream and reads them from it. Everything the client does for local
workers therefore holds here unchanged -- request ids multiplexed on a connection,
least-outstanding balancing over all live connections (so over all endpoints), the watchdog,
and above all failure: when a connection is lost the channel leaves the client at once and
fails every request it had in flight with 503 ``kms_unavailable``. Nothing is ever re-sent on
another connection: a request that may have run (a key creation) is not run twice by us; the
API's ``Idempotency-Key`` lets the caller retry safely.

The service token is not a secret handed out by anybody: both ends derive it from the TLS
connection, so a frame recorded on one connection is worthless on any other.

Health. A connection that has been quiet for ``health_interval`` seconds sends a ``ping``
through the node to one of its workers (one that answers requests is alive: no ping, as with
gRPC keepalives). No answer within ``connect_timeout`` while nothing else arrived either (or a
node that answers ``kms_unavailable``: it has no live worker) closes the connection, which then
reconnects with back-off (``reconnect_backoff_max``). ``ready`` (``/readyz``) is true while at
least one connection is live.

Per-endpoint figures (``stats``): live connections, requests in flight, answers and errors,
and the round-trip time of each answer, for the gateway's metrics.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from ...context import TenantContext
from ...errors import KMSUnavailable, QpherError
from ...tls.internal import InternalTLSContextHolder, exporter_token, peer_identity
from ...tls.stream import TLSStream
from ..wire.protocol import NEED_DATA, ClientConnection, Error, ProtocolError, Ready, Value
from .pool import KMSClient, OpHook, WorkerChannel

log = logging.getLogger("qpher.kms.remote")

_PUMP_BYTES = 256 * 1024
_FIRST_BACKOFF = 0.05  # seconds before the first reconnection attempt
_HEALTH_CONTEXT = TenantContext(tenant_id="qpher-health", request_id="health", api_key_id="-")


@dataclass
class EndpointStats:
    """What one KMS node has done for this gateway process (read by the metrics at scrape time)."""

    name: str  # "host:port" as configured: the metric label
    connections: int = 0  # live connections
    answers: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # error code -> count
    observe: Callable[[str, float, str | None], None] | None = None  # (op, seconds, error code)
    channels: list[WorkerChannel] = field(default_factory=list)

    @property
    def in_flight(self) -> int:
        return sum(len(ch.inflight) for ch in self.channels)

    def note(self, op: str, seconds: float, code: str | None) -> None:
        if code is None:
            self.answers += 1
        else:
            self.errors[code] = self.errors.get(code, 0) + 1
        if self.observe is not None:
            self.observe(op, seconds, code)


class TLSChannel(WorkerChannel):
    """A :class:`~.pool.WorkerChannel` whose peer is a KMS node at the other end of a TLS
    stream: the same bookkeeping (request ids in flight, retirement, failing what is in flight
    when the stream ends), with frames written to and read from the stream directly. Sends are
    queued and written by the channel's writer task, everything queued in one scheduling round
    in one TLS write."""

    def __init__(self, index: int, stream: TLSStream, conn: ClientConnection) -> None:
        super().__init__(index, None, conn)
        self.stream = stream
        self.last_read = trio.current_time()  # when the node last sent anything (health checks)

    def send(self, frame: bytes) -> None:
        if not self._out:
            self._wake_writer.set()
        self._out.append(frame)

    async def _writer(self) -> None:
        out = self._out
        while True:
            await self._wake_writer.wait()
            self._wake_writer = trio.Event()
            while out:
                chunk = out[0] if len(out) == 1 else b"".join(out)
                out.clear()
                await self.stream.send_all(chunk)

    async def _reader(self) -> None:
        stream, conn = self.stream, self.conn
        while True:
            try:
                data = await stream.receive_some(_PUMP_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError, QpherError):
                data = b""
            self.last_read = trio.current_time()
            conn.receive_data(data)
            if not self._deliver() or not data:
                self.death_reason = "the KMS node ended the connection"
                return

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer)
                await self._reader()
                self._retire()  # at once: no request may pick this channel after its end
                nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError, QpherError):
            pass  # the writer met the broken stream; the reader retires the channel
        finally:
            self._retire()

    def close(self) -> None:
        self._retire()  # the stream is closed by its owner (RemoteKMS._connection)


class RemoteKMS:
    """KMS nodes over PQ mutual TLS, with the surface of a local ``KMSSupervisor``."""

    def __init__(
        self,
        endpoints: list[tuple[str, int]],
        tls: InternalTLSContextHolder,
        *,
        connections_per_endpoint: int = 2,
        connect_timeout: float = 3.0,
        health_interval: float = 2.0,
        reconnect_backoff_max: float = 5.0,
        request_timeout: float | None = 30.0,
        on_op: OpHook | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError("at least one endpoint")
        self.endpoints = list(endpoints)
        self.tls = tls
        self.connections_per_endpoint = connections_per_endpoint
        self.connect_timeout = connect_timeout
        self.health_interval = health_interval
        self.reconnect_backoff_max = reconnect_backoff_max
        self.client = KMSClient(request_timeout=request_timeout, on_op=on_op)
        self.workers = len(endpoints) * connections_per_endpoint  # connections, for the logs
        self.info: dict[int, dict[str, Value]] = {}  # connection index -> the node's READY facts
        self.stats = [EndpointStats(f"{h}:{p}" if ":" not in h else f"[{h}]:{p}") for h, p in endpoints]
        self.restarts = 0  # reconnections after a lost connection
        self.on_restart: Callable[[int, int | None], None] | None = None
        self._changed = trio.Event()

    def __repr__(self) -> str:
        return f"<RemoteKMS endpoints={len(self.endpoints)} live={self.client.live_workers}>"

    @property
    def ready(self) -> bool:
        return self.client.ready

    def reload(self) -> None:
        """New client certificates for new connections (SIGHUP); ``ConfigError`` keeps the old."""
        self.tls.reload()

    async def wait_live(self, count: int = 1) -> None:
        while self.client.live_workers < count:
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[RemoteKMS] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep every connection up; report started once one is live or ``connect_timeout`` has
        passed (a gateway starts while the KMS tier is down: ``/readyz`` says so)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.client.watchdog)
            for e in range(len(self.endpoints)):
                for slot in range(self.connections_per_endpoint):
                    nursery.start_soon(self._keep_connected, e, slot)
            with trio.move_on_after(self.connect_timeout):
                await self.wait_live(1)
            if not self.ready:
                log.error("no KMS node reachable yet; requests fail with 503 kms_unavailable until one is",
                          extra={"fields": {"endpoints": [s.name for s in self.stats]}})
            task_status.started(self)

    async def _keep_connected(self, e: int, slot: int) -> None:
        """One connection slot of endpoint ``e``, for ever: connect, serve, and after a loss or a
        failed attempt wait (exponential back-off with jitter, reset once a connection served
        for a while) and try again. Unreachable is logged on the first failure and then at most
        once per ``reconnect_backoff_max``."""
        backoff = _FIRST_BACKOFF
        stats = self.stats[e]
        index = e * 1000 + slot
        while True:
            t0 = time.monotonic()
            reason = await self._connection(e, index)
            if reason is None:  # it had served: a loss
                self.restarts += 1
                if time.monotonic() - t0 > 5.0:
                    backoff = _FIRST_BACKOFF
                log.warning("KMS node connection lost; reconnecting",
                            extra={"fields": {"endpoint": stats.name, "connection": slot}})
            elif backoff == _FIRST_BACKOFF or backoff >= self.reconnect_backoff_max:
                log.warning("KMS node unreachable", extra={"fields": {
                    "endpoint": stats.name, "connection": slot, "reason": reason}})
            await trio.sleep(backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, self.reconnect_backoff_max)

    async def _connection(self, e: int, index: int) -> str | None:
        """One connection's life; a reason if it never served, None once it had served."""
        host, port = self.endpoints[e]
        stats = self.stats[e]
        try:
            with trio.fail_after(self.connect_timeout):
                tcp = await trio.open_tcp_stream(host, port)
                stream = TLSStream(tcp, self.tls.context, server_side=False,
                                   handshake_timeout=self.connect_timeout, require_pq=True)
                try:
                    await stream.do_handshake()
                    conn = stream.ssl_connection()
                    identity = peer_identity(conn)
                    token = exporter_token(conn)
                    info = await _bootstrap(stream, token)
                except BaseException:
                    await trio.aclose_forcefully(stream)
                    raise
        except trio.TooSlowError:
            return "timeout"
        except OSError as exc:
            return exc.strerror or type(exc).__name__
        except trio.BrokenResourceError as exc:
            return getattr(exc, "reason", None) or getattr(exc, "code", None) or "tls handshake failed"
        except QpherError as exc:
            return exc.code
        info = dict(info)
        info.setdefault("endpoint", stats.name)
        info["peer_uri"] = identity.uri
        info["peer_key"] = identity.key_kind
        info["group"] = identity.group
        self.info[index] = info
        log.info("KMS node connected", extra={"fields": {
            "endpoint": stats.name, "peer_uri": identity.uri, "peer_key": identity.key_kind,
            "signature_scheme": identity.signature_scheme, "group": identity.group,
            "version": identity.version, "backend": info.get("backend")}})
        channel = TLSChannel(index, stream, ClientConnection.bootstrapped(token))
        channel.observe = stats.note
        self.client._attach(channel)
        stats.channels.append(channel)
        stats.connections += 1
        self._notify()
        try:
            async with trio.open_nursery() as nursery:
                async def channel_then_stop() -> None:
                    await channel.run()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(channel_then_stop)
                nursery.start_soon(self._health, channel, nursery.cancel_scope)
        finally:
            channel.close()  # in-flight requests of this connection: 503 kms_unavailable
            stats.connections -= 1
            if channel in stats.channels:
                stats.channels.remove(channel)
            self.info.pop(index, None)
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)
            self._notify()
        return None

    async def _health(self, channel: TLSChannel, scope: trio.CancelScope) -> None:
        """Ping the connection when it has been quiet for ``health_interval`` (a connection that
        answers requests is alive: no ping, as with gRPC keepalives). A ping unanswered within
        ``connect_timeout`` while nothing else arrived either closes the connection."""
        while True:
            await trio.sleep(self.health_interval)
            if trio.current_time() - channel.last_read < self.health_interval:
                continue
            before = channel.last_read
            try:
                with trio.fail_after(self.connect_timeout):
                    await self.client.call_on(channel, _HEALTH_CONTEXT, "ping", {"data": b""})
            except trio.TooSlowError:
                if channel.last_read != before:
                    continue  # slow, but answering: busy, not dead
                reason = "timeout"
            except QpherError as exc:
                reason = exc.code  # the node has no live worker, or the connection is gone
            else:
                continue
            log.warning("KMS node failed its health check; reconnecting",
                        extra={"fields": {"connection": channel.index, "reason": reason}})
            scope.cancel()
            return


async def _bootstrap(stream: TLSStream, token: bytes) -> dict[str, Value]:
    """HELLO with the exporter token, then the node's READY (its facts) or its refusal."""
    boot = ClientConnection(token)
    await stream.send_all(boot.hello({}))
    while True:
        data = await stream.receive_some(64 * 1024)
        boot.receive_data(data)
        while True:
            try:
                event: Any = boot.next_event()
            except ProtocolError as exc:
                raise KMSUnavailable(f"the KMS node broke the protocol: {exc.message}") from None
            if event is NEED_DATA:
                break
            if isinstance(event, Ready):
                return event.info
            if isinstance(event, Error):
                raise QpherError(event.message, code=event.code, status=503)
            raise KMSUnavailable("the KMS node closed the connection during the bootstrap")
        if not data:
            raise KMSUnavailable("the KMS node closed the connection during the bootstrap")
