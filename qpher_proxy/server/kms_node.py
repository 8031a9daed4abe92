"""``qpher-proxy kms serve -c kms.yaml``: this host as a node of a remote KMS tier.

Theory of operation
===================

One process in front of ``kms.workers`` ordinary KMS worker processes::

    gateway hosts ──TLS 1.3, X25519MLKEM768, ML-DSA-65 both sides──▶ node (this process)
                                                                     │ KMSClient, socketpairs
                                                                     ▼
                                                       KMS worker ×M (uid kms.user, the keys)

* **Who may connect.** The listener's context (``tls/internal.py``) accepts TLS 1.3 only, the
  hybrid group X25519MLKEM768 only, and ML-DSA-65 signatures (plus ECDSA P-256 when a transition
  chain is configured); a caller must present a certificate that chains to ``kms_node.client_ca``
  and carries the SAN URI ``kms_node.client_uri`` (the gateway role). Anything else -- no
  certificate, another CA, another role, a classical-only client -- fails in the handshake and
  is logged with its reason and address.
* **Frames.** The same framed protocol as the socketpair (``kms/wire``): the caller's HELLO
  carries the connection's *service token*, which both ends derive from the TLS exporter
  (RFC 8446 7.5, label ``EXPORTER-qpher-kms-service-token``); the node answers READY with its
  workers' facts. Every REQUEST must carry that token (constant-time comparison) and a tenant
  context; the node relays it to its least busy worker, which checks its own token, and sends
  the answer back under the caller's request id. A frame recorded on one connection is refused
  on any other (another exporter).
* **The node holds no key.** Private keys live in the workers, as on a gateway host; the node
  process sees requests and answers only. Several nodes share PostgreSQL (``storage:``) so that
  any node serves any key; the sweep lease keeps one destroyer at a time.
* **Signals.** SIGHUP reloads the listener's certificates (a bad set is refused and the old one
  kept); SIGTERM/SIGINT stop accepting, let requests in flight finish (``server.shutdown_grace``
  at most), then stop the workers.
"""

from __future__ import annotations

import functools
import hmac
import logging
import os
import signal
from pathlib import Path
from typing import Any

import trio

from ..config import Config
from ..config.loader import parse_listen
from ..errors import ConfigError, QpherError
from ..kms.launcher import KMSSupervisor
from ..kms.wire.protocol import (
    NEED_DATA,
    ConnectionClosed,
    Hello,
    ProtocolError,
    RejectedRequest,
    Request,
    ServerConnection,
    Value,
)
from ..sandbox import lookup_user
from ..tls.internal import (
    InternalTLSContextHolder,
    InternalTLSSettings,
    exporter_token,
    peer_identity,
    refusal_reason,
)
from ..tls.stream import TLSStream
from .settings import kms_supervisor

log = logging.getLogger("qpher.kms.node")

__all__ = ["KMSNode", "node_tls_settings", "run", "serve_node"]

MAX_IN_FLIGHT_PER_CONNECTION = 1024  # requests relayed at once per connection; then reading waits
_RECEIVE = 256 * 1024


def node_tls_settings(cfg: Config) -> InternalTLSSettings:
    n = cfg.kms_node
    if n.cert_file is None or n.key_file is None or n.client_ca is None:
        raise ConfigError("kms_node.cert_file, kms_node.key_file and kms_node.client_ca are required "
                          "for `kms serve` (`qpher-proxy init --internal-pki DIR` makes them)")
    return InternalTLSSettings(
        cert_file=Path(n.cert_file), key_file=Path(n.key_file), ca_file=Path(n.client_ca),
        peer_uri=n.client_uri,
        ecdsa_cert_file=Path(n.ecdsa_cert_file) if n.ecdsa_cert_file else None,
        ecdsa_key_file=Path(n.ecdsa_key_file) if n.ecdsa_key_file else None,
        handshake_timeout=n.handshake_timeout,
    )


class KMSNode:
    """The listener's side: one task per caller connection, relaying frames to local workers."""

    def __init__(self, supervisor: KMSSupervisor, tls: InternalTLSContextHolder, *,
                 handshake_timeout: float = 10.0, max_connections: int = 1024) -> None:
        self.supervisor = supervisor
        self.tls = tls
        self.handshake_timeout = handshake_timeout
        self.connections = trio.Semaphore(max_connections)
        self.refused = 0  # handshakes refused (any reason)
        self.served = 0  # callers that completed the bootstrap
        self.in_flight = 0
        self.stopping = False

    def facts(self) -> dict[str, Value]:
        """READY for a caller: the first live worker's non-secret facts, and the node's size."""
        first = next(iter(self.supervisor.info.values()), {})
        facts: dict[str, Value] = dict(first)
        facts["node_workers"] = self.supervisor.workers
        return facts

    async def serve_listener(self, listener: trio.SocketListener, connections: trio.Nursery) -> None:
        """Accept callers into ``connections`` (a nursery that outlives this loop: a graceful
        stop cancels the accepting, not the requests in flight)."""
        while not self.stopping:
            await self.connections.acquire()
            try:
                tcp = await listener.accept()
            except BaseException:
                self.connections.release()
                raise
            connections.start_soon(self._connection, tcp)

    async def _connection(self, tcp: trio.SocketStream) -> None:
        try:
            peer = _address(tcp)
            stream = TLSStream(tcp, self.tls.context, server_side=True,
                               handshake_timeout=self.handshake_timeout, require_pq=True,
                               suppress_ragged_eofs=True)  # frames are self-delimiting
            try:
                await stream.do_handshake()
            except (trio.BrokenResourceError, QpherError) as exc:
                self.refused += 1
                reason = _refusal(stream, exc)
                log.warning("KMS caller refused in the TLS handshake",
                            extra={"fields": {"peer": peer, "reason": reason}})
                await trio.aclose_forcefully(stream)
                return
            try:
                await self._serve(stream, peer)
            except (trio.BrokenResourceError, trio.ClosedResourceError, QpherError) as exc:
                # the caller went away or broke TLS: its connection ends, nothing else does
                log.info("KMS caller connection ended", extra={"fields": {
                    "peer": peer, "reason": getattr(exc, "code", None) or type(exc).__name__}})
            except Exception:
                # a bug must cost one connection, never the node
                log.error("KMS caller connection failed", exc_info=True, extra={"fields": {"peer": peer}})
            finally:
                await trio.aclose_forcefully(stream)
        finally:
            self.connections.release()

    async def _serve(self, stream: TLSStream, peer: str) -> None:
        conn = stream.ssl_connection()
        identity = peer_identity(conn)
        token = exporter_token(conn)
        proto = ServerConnection()
        hello = await _receive_hello(stream, proto)
        if hello is None:
            return
        if not hmac.compare_digest(hello.token, token):
            log.warning("KMS caller refused: its HELLO token is not this connection's exporter",
                        extra={"fields": {"peer": peer, "peer_uri": identity.uri}})
            await stream.send_all(proto.error(0, "unauthorized", 401,
                                              "the service token does not belong to this connection"))
            return
        if not self.supervisor.client.ready:  # no live worker: not a node to send requests to
            log.warning("KMS caller turned away: no KMS worker is live on this node",
                        extra={"fields": {"peer": peer}})
            await stream.send_all(proto.error(0, "kms_unavailable", 503, "this KMS node has no live worker"))
            return
        await stream.send_all(proto.ready(self.facts()))
        self.served += 1
        log.info("KMS caller connected", extra={"fields": {
            "peer": peer, "peer_uri": identity.uri, "peer_key": identity.key_kind, "group": identity.group,
            "signature_scheme": identity.signature_scheme, "version": identity.version,
            "subject": identity.subject}})
        outbox: list[bytes] = []
        wake = trio.Event()
        slots = trio.Semaphore(MAX_IN_FLIGHT_PER_CONNECTION)
        writing = False
        leaving = trio.Event()  # set when the node lost its last worker: callers go elsewhere

        def queue(frame: bytes) -> None:
            nonlocal wake
            outbox.append(frame)
            wake.set()

        async def writer() -> None:
            nonlocal wake, writing
            while True:
                await wake.wait()
                wake = trio.Event()
                while outbox:
                    chunk = outbox[0] if len(outbox) == 1 else b"".join(outbox)
                    outbox.clear()
                    writing = True
                    await stream.send_all(chunk)
                    writing = False

        async def relay(req: Request) -> None:
            self.in_flight += 1
            try:
                value = await self.supervisor.client.call(req.context, req.op, req.args)
                frame = proto.response(req.rid, value)
            except QpherError as exc:
                frame = proto.error_from(req.rid, exc)
                if exc.code == "kms_unavailable" and not self.supervisor.client.ready:
                    leaving.set()
            finally:
                self.in_flight -= 1
                slots.release()
            queue(frame)

        async def leave(scope: trio.CancelScope) -> None:
            """No worker left: answer what is queued, then close, so that the caller sends its
            requests to other nodes (and comes back when a worker is live: HELLO is refused
            until then) instead of getting a fast 503 from this one, request after request."""
            await leaving.wait()
            with trio.move_on_after(1.0):
                while outbox or writing:
                    await trio.sleep(0.005)
            log.warning("KMS node has no live worker; closing the caller's connection",
                        extra={"fields": {"peer": peer}})
            scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            nursery.start_soon(leave, nursery.cancel_scope)
            while True:
                data = await stream.receive_some(_RECEIVE)
                proto.receive_data(data)
                while True:
                    try:
                        event: Any = proto.next_event()
                    except ProtocolError as exc:
                        log.warning("KMS caller broke the protocol; closing",
                                    extra={"fields": {"peer": peer, "reason": exc.message}})
                        nursery.cancel_scope.cancel()
                        return
                    if event is NEED_DATA:
                        break
                    if isinstance(event, Request):
                        if not hmac.compare_digest(event.token, token):
                            log.warning("KMS frame with a foreign service token refused", extra={
                                "fields": {"peer": peer, "request_id": event.context.request_id}})
                            queue(proto.error(event.rid, "unauthorized", 401,
                                              "the service token does not belong to this connection"))
                            continue
                        await slots.acquire()
                        nursery.start_soon(relay, event)
                    elif isinstance(event, RejectedRequest):
                        queue(proto.error(event.rid, event.code, 400, event.message))
                    elif isinstance(event, ConnectionClosed):
                        break
                if not data:
                    break
            # the caller closed: answer what is in flight, then stop
            while slots.value < MAX_IN_FLIGHT_PER_CONNECTION:
                await trio.sleep(0.01)
            while outbox:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()


async def _receive_hello(stream: TLSStream, proto: ServerConnection) -> Hello | None:
    with trio.move_on_after(10.0):
        while True:
            data = await stream.receive_some(_RECEIVE)
            proto.receive_data(data)
            try:
                event: Any = proto.next_event()
            except ProtocolError:
                return None
            if isinstance(event, Hello):
                return event
            if event is not NEED_DATA or not data:
                return None
    return None


def _refusal(stream: TLSStream, exc: BaseException) -> str:
    try:
        why = refusal_reason(stream.ssl_connection(), exc)
    except RuntimeError:
        why = None
    return why or getattr(exc, "reason", None) or getattr(exc, "code", None) or type(exc).__name__


def _address(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return "?"
    return f"{host}:{port}"


async def serve_node(cfg: Config, *, handle_signals: bool = True, kek_fd: int | None = None,
                     task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED) -> None:
    tls = InternalTLSContextHolder.for_server(node_tls_settings(cfg))
    worker_user = lookup_user(cfg.kms.user, "kms.user") if os.geteuid() == 0 and cfg.kms.user else None
    supervisor = kms_supervisor(cfg, worker_user=worker_user, kek_fd=kek_fd)
    listeners: list[trio.SocketListener] = []
    try:
        for i, addr in enumerate(cfg.kms_node.listen):
            host, port = parse_listen(addr, None, f"kms_node.listen[{i}]")
            try:
                listeners += await trio.open_tcp_listeners(port, host=host)
            except OSError as exc:
                raise ConfigError(f"kms_node.listen[{i}]: cannot listen on {addr}: {exc.strerror}") from None
        node = KMSNode(supervisor, tls, handshake_timeout=cfg.kms_node.handshake_timeout,
                       max_connections=cfg.kms_node.max_connections)
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.run)
            async with trio.open_nursery() as connections:
                accepting = trio.CancelScope()

                async def accept_all() -> None:
                    with accepting:
                        async with trio.open_nursery() as loops:
                            for ln in listeners:
                                loops.start_soon(node.serve_listener, ln, connections)

                connections.start_soon(accept_all)
                addresses = [tuple(ln.socket.getsockname()[:2]) for ln in listeners]
                log.info("KMS node serving", extra={"fields": {
                    "listen": [f"{h}:{p}" for h, p in addresses], "kms_workers": supervisor.workers,
                    "client_uri": cfg.kms_node.client_uri}})
                task_status.started(addresses)
                if handle_signals:
                    await _signals(tls)
                else:
                    await trio.sleep_forever()
                # graceful stop: no new callers; requests in flight get their answers
                node.stopping = True
                accepting.cancel()
                with trio.move_on_after(cfg.server.shutdown_grace):
                    while node.in_flight:
                        await trio.sleep(0.02)
                connections.cancel_scope.cancel()
            supervisor.stopping = True
            nursery.cancel_scope.cancel()
    finally:
        for ln in listeners:
            ln.socket.close()


async def _signals(tls: InternalTLSContextHolder) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                try:
                    tls.reload()
                    log.info("SIGHUP: KMS node certificates reloaded")
                except QpherError as exc:
                    log.error("TLS reload rejected, keeping the current certificates",
                              extra={"fields": {"reason": exc.message}})
                continue
            log.info("%s: graceful shutdown", signal.Signals(signum).name)
            return


def run(cfg: Config, config_path: str, kek_fd: int | None = None) -> int:
    """``qpher-proxy kms serve``: the node's whole life; returns the exit code. A KEK (provider
    env) or a token PIN (pkcs11_pin_env) in the environment is moved into a memfd that only the
    workers inherit, and the command runs again without it, as ``serve`` does (privsep.py)."""
    from ..logs import configure_logging
    from .privsep import reexec_without_env_kek
    from .serve import run_trio
    from .settings import kek_settings
    from .state import prepare_database

    secret_env = kek_settings(cfg.kms.kek).secret_env
    if secret_env is not None and kek_fd is None and secret_env in os.environ:
        reexec_without_env_kek(cfg, config_path, secret_env, command=("kms", "serve"))
    configure_logging(cfg.logging.level, cfg.logging.format)
    prepare_database(cfg)
    return run_trio(functools.partial(serve_node, cfg, kek_fd=kek_fd))

