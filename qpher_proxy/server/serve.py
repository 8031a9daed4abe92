"""``serve()``: one process tree -- this gateway process and its KMS worker processes.

Start-up order matters for failing early and failing closed:

1. TLS contexts are built from the config (a bad certificate or key stops start-up);
2. the audit log, the gateway's stores (API keys, quotas: SQLite or PostgreSQL, see
   ``state``) and the pepper are opened;
3. the policy directory is loaded (an invalid policy does not stop start-up: the gateway then
   fails closed, 503 policy_unavailable, and /readyz says not ready until a valid one loads);
4. the KMS workers are started and each answers READY (a wrong or unreadable KEK stops
   start-up here, before anything is written with it);
5. the listeners open and the HTTP server accepts.

Signals: SIGTERM/SIGINT start a graceful shutdown (stop accepting, finish in-flight requests
for ``server.shutdown_grace`` seconds, exit 0); SIGHUP reloads the TLS certificates and keys
and the policy files without dropping a connection.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from ..api import CryptoAPI
from ..audit import AuditLog
from ..auth.apikeys import Authenticator, load_pepper
from ..config import Config, parse_listen
from ..errors import ConfigError, QpherError
from ..http import HTTPServer, SecurityHeaders
from ..http._memory import tune_heap
from ..http.transport import FastSocketListener
from ..kms.client.remote import RemoteKMS
from ..kms.launcher import KMSSupervisor
from ..logs import configure_logging
from ..metrics import Metrics
from ..policy.engine import PolicyEngine
from ..tls.context import ServerTLSContextHolder
from ..tls.failures import SUMMARY_INTERVAL, HandshakeFailureSummary, failure_reason
from ..tls.listener import HandOverListener, TLSListener
from ..tls.stream import HandOffCallback
from ..upstream import H2UpstreamClient, UpstreamClient
from .audit_routes import Checkpointer
from .confine import Confinement
from .gateway import Gateway, RateLimiter
from .privsep import SupervisedKMS
from .settings import (
    http2_limits,
    http_limits,
    kms_supervisor,
    remote_kms,
    tls_settings,
    upstream_client,
    websocket_tunnels,
)
from .state import open_limiter, open_stores, run_background

log = logging.getLogger("qpher.server")


@dataclass
class Running:
    """What ``serve`` hands to ``task_status.started``: bound addresses and live components."""

    addresses: list[tuple[str, int]]
    gateway: Gateway
    server: HTTPServer
    supervisor: KMSSupervisor
    tls: ServerTLSContextHolder
    reload: Callable[[], Awaitable[None]] = field(repr=False, default=None)  # type: ignore[assignment]


async def _bind(cfg: Config) -> list[trio.SocketListener]:
    raw: list[trio.SocketListener] = []
    for addr in cfg.server.listen:
        host, port = parse_listen(addr)
        try:
            raw += await trio.open_tcp_listeners(port, host=host)
        except OSError as exc:
            for ln in raw:
                await ln.aclose()
            raise ConfigError(f"server.listen: cannot listen on {addr}: {exc.strerror}") from None
    return raw


async def serve(
    cfg: Config,
    *,
    handle_signals: bool = True,
    kms: SupervisedKMS | None = None,
    confinement: Confinement | None = None,
    inherited: list[trio.SocketListener] | None = None,
    task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the gateway. ``kms``: KMS workers run by a supervisor process (privilege-separated
    mode); without it, this process starts its own workers. ``confinement``: applied once the
    ports are bound and before any other file is opened. ``inherited``: listening sockets the
    supervisor bound (``server.workers``, see :mod:`.privsep`), used instead of binding here."""
    tune_heap()  # large request and answer buffers from the heap, not a fresh mmap() each
    raw_listeners = await _bind(cfg) if inherited is None else inherited
    holder, audit = _confine_and_open(cfg, raw_listeners, confinement)  # steps 1 and 2
    metrics = Metrics()
    try:
        stores = open_stores(cfg, load_pepper(cfg.auth.pepper_file))  # step 2
    except BaseException:
        _close(audit)
        for ln in raw_listeners:
            ln.socket.close()
        raise
    limiter: RateLimiter | None = None
    try:
        policy = _load_policy(cfg, audit)  # step 3
        supervisor = _kms_side(cfg, kms, metrics, audit)
        control = kms  # privilege-separated: the supervisor's control socket (None in one process)
        api = CryptoAPI(supervisor.client, max_batch_items=cfg.api.max_batch_items,
                        backend_info=functools.partial(_backend_info, supervisor),
                        policy_revision=lambda: policy.revision)
        handshakes = _HandshakeMetrics(metrics)
        async with _upstream(cfg) as upstream, trio.open_nursery() as nursery:
            if control is not None and supervisor is not control:  # kms.mode remote
                await nursery.start(control.run)  # the supervisor's messages, no workers
            await nursery.start(supervisor.run)  # step 4: every worker answers READY (remote: a node)
            authenticator = Authenticator(stores.store, ttl=cfg.auth.cache_ttl)
            limiter = open_limiter(cfg, None if control is None else control.ratelimit_fd)
            if control is not None:
                control.ratelimit_fd = None  # the shared table owns that descriptor now
            metrics.watch_rate_limiter(limiter)
            await run_background(nursery, cfg, stores, authenticator)
            checkpointer = Checkpointer(audit, supervisor.client, cfg.audit.origin,
                                        interval=cfg.audit.checkpoint_interval,
                                        records=cfg.audit.checkpoint_records)
            gateway = Gateway(
                kms=supervisor.client, api=api, authenticator=authenticator,
                limiter=limiter, quotas=stores.quotas, policy=policy, audit=audit, metrics=metrics,
                upstream=upstream, pass_api_key=cfg.upstream.pass_api_key,
                allow_path_params=cfg.upstream.allow_path_params, checkpointer=checkpointer,
                tunnels=websocket_tunnels(cfg.upstream.websocket, audit, metrics),
            )
            on_handoff, handover = _ticket_handover(cfg, control, holder, handshakes)
            listeners: list[trio.abc.Listener[Any]] = [
                TLSListener(FastSocketListener(ln), holder, on_handshake=handshakes.on_handshake,
                            on_handshake_error=handshakes.on_handshake_error, on_handoff=on_handoff)
                for ln in raw_listeners
            ]
            if handover is not None:
                listeners.append(handover)
            addresses = [tuple(ln.socket.getsockname()[:2]) for ln in raw_listeners]
            server = _http_server(cfg, gateway)
            reload = _reloader(holder, policy, supervisor if isinstance(supervisor, RemoteKMS) else None)
            running = Running(addresses, gateway, server, supervisor, holder, reload)  # type: ignore[arg-type]
            nursery.start_soon(policy.run, cfg.policy.reload_interval)
            nursery.start_soon(checkpointer.run)
            nursery.start_soon(_summarise_handshake_failures, handshakes.failures)
            if handle_signals:
                nursery.start_soon(_signals, server, reload)
            await nursery.start(server.serve, listeners)  # step 5
            _log_serving(addresses, supervisor, upstream is not None)
            task_status.started(running)
            if control is not None:
                await control.tell({"t": "serving"})
            # server.serve returns after a graceful shutdown; then stop everything else.
            await _wait_for_shutdown(server)
            nursery.cancel_scope.cancel()
    finally:
        if limiter is not None and hasattr(limiter, "aclose"):
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await limiter.aclose()
        try:
            stores.close()
        except QpherError:
            log.error("could not flush quota usage at shutdown", exc_info=True)
        _close(audit)
        for ln in raw_listeners:
            ln.socket.close()


def _confine_and_open(
    cfg: Config, raw_listeners: list[trio.SocketListener], confinement: Confinement | None
) -> tuple[ServerTLSContextHolder, AuditLog]:
    """Confine the process, then build the TLS contexts and open the audit log; on any failure
    the bound sockets are closed before the error goes on."""
    try:
        if confinement is not None:
            confinement.apply(cfg)
        holder = ServerTLSContextHolder(tls_settings(cfg.tls, cfg.http2))
        os.makedirs(os.path.dirname(cfg.audit.file), mode=0o700, exist_ok=True)
        audit = AuditLog(cfg.audit.file, rotate_bytes=cfg.audit.rotate_bytes)
    except BaseException:
        for ln in raw_listeners:
            ln.socket.close()
        raise
    return holder, audit


def _load_policy(cfg: Config, audit: AuditLog) -> PolicyEngine:
    """The policy engine with its first load done; an invalid policy is logged, not raised: the
    gateway then fails closed until a valid one loads."""
    policy = PolicyEngine(
        cfg.policy.dir, audit, eval_budget_s=cfg.policy.eval_budget_ms / 1e3,
        fail_open_max_seconds=cfg.policy.fail_open.max_seconds,
    )
    first = policy.reload()
    if not first.ok:
        log.error("no valid policy loaded from %s: requests fail closed (503 policy_unavailable) "
                  "until the files are fixed", cfg.policy.dir)
    return policy


def _kms_side(
    cfg: Config, kms: SupervisedKMS | None, metrics: Metrics, audit: AuditLog
) -> KMSSupervisor | SupervisedKMS | RemoteKMS:
    """The KMS workers' supervisor, not yet started: ``kms`` (run by the privilege-separated
    supervisor process) wired to this process's metrics and audit log, or workers of our own."""

    def on_restart(index: int, exit_code: int | None) -> None:
        metrics.kms_restarts.inc()
        try:
            audit.record("kms.restart", "warning", worker=index, exit_code=exit_code)
        except QpherError:
            log.error("could not audit a KMS restart", exc_info=True)

    def on_op(op: str, seconds: float, error: str | None) -> None:
        metrics.kms_op_duration.labels(op).observe(seconds)

    if cfg.kms.mode == "remote":
        remote = remote_kms(cfg, on_op=on_op)
        metrics.watch_kms_endpoints(remote.stats)
        return remote
    if kms is None:
        return kms_supervisor(cfg, on_restart=on_restart, on_op=on_op)
    kms.client.request_timeout = cfg.kms.request_timeout
    kms.client.on_op = on_op
    kms.on_restart = on_restart
    return kms


def _backend_info(supervisor: KMSSupervisor | SupervisedKMS | RemoteKMS) -> dict[str, Any]:
    """The crypto backend's name and library versions, as the first KMS worker reported them."""
    facts = next(iter(supervisor.info.values()), {})
    versions = facts.get("versions")
    return {"name": facts.get("backend", "unknown"),
            "versions": dict(versions) if isinstance(versions, dict) else {}}


class _HandshakeMetrics:
    """TLS handshake outcomes into the metrics, and failures into a periodic log summary."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self.failures = HandshakeFailureSummary()

    def on_handshake(self, info: Any) -> None:
        self._metrics.tls_handshakes.labels(info.group or "none", info.version).inc()
        if info.resumed:
            self._metrics.tls_resumptions.labels(info.group or "none").inc()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("tls handshake", extra={"fields": {
                "version": info.version, "cipher": info.cipher, "group": info.group, "alpn": info.alpn}})

    def on_handshake_error(self, exc: Any) -> None:
        reason = failure_reason(exc)
        self._metrics.tls_handshake_failures.labels(reason).inc()
        self.failures.record(reason)


def _ticket_handover(
    cfg: Config, supervisor: SupervisedKMS | None, holder: ServerTLSContextHolder,
    handshakes: _HandshakeMetrics,
) -> tuple[HandOffCallback | None, HandOverListener | None]:
    """``server.workers`` > 1 with TLS session tickets: announce our ticket keys through the
    supervisor, learn the other gateways' keys, hand a client whose ticket another gateway
    issued over to it, and accept the clients handed to us (privsep.py, tls/context.py)."""
    if supervisor is None or cfg.server.workers < 2:
        return None, None
    if not holder.settings.session_tickets:
        return None, None
    handover = HandOverListener(holder, on_handshake=handshakes.on_handshake,
                                on_handshake_error=handshakes.on_handshake_error)
    supervisor.on_handover = handover.deliver
    supervisor.on_ticket_peers = holder.peers.update
    holder.on_keys_changed = supervisor.announce_ticket_keys
    supervisor.announce_ticket_keys(holder.current.accepted_key_names)
    return supervisor.hand_over, handover


def _upstream(
    cfg: Config,
) -> contextlib.AbstractAsyncContextManager[UpstreamClient | H2UpstreamClient | None]:
    """The upstream client when one is configured, else a context that gives None."""
    client = upstream_client(cfg.upstream)
    return contextlib.nullcontext(None) if client is None else client


def _http_server(cfg: Config, gateway: Gateway) -> HTTPServer:
    return HTTPServer(gateway.handle, limits=http_limits(cfg), on_request_done=gateway.request_done,
                      shutdown_grace=cfg.server.shutdown_grace,
                      security_headers=SecurityHeaders(hsts_max_age=cfg.http.hsts_max_age),
                      http2=http2_limits(cfg), h2_observer=gateway.metrics)


def _reloader(
    holder: ServerTLSContextHolder, policy: PolicyEngine, remote: RemoteKMS | None = None
) -> Callable[[], Awaitable[None]]:
    """SIGHUP's action: new TLS certificates (a bad set keeps the current one), the KMS client
    certificates (kms.mode remote: for new connections), then the policy."""

    async def reload() -> None:
        try:
            holder.reload()
            log.info("TLS certificates reloaded")
        except QpherError as exc:
            log.error("TLS reload rejected, keeping the current certificates: %s", exc.message)
        if remote is not None:
            try:
                remote.reload()
                log.info("KMS client certificates reloaded")
            except QpherError as exc:
                log.error("KMS client certificate reload rejected, keeping the current ones: %s", exc.message)
        await policy.areload()

    return reload


def _log_serving(
    addresses: list[tuple[str, int]], supervisor: KMSSupervisor | SupervisedKMS | RemoteKMS, upstream: bool
) -> None:
    log.info("serving", extra={"fields": {
        "listen": [f"{h}:{p}" for h, p in addresses], "kms_workers": supervisor.workers,
        "backend": _backend_info(supervisor)["name"], "upstream": upstream}})


async def _wait_for_shutdown(server: HTTPServer) -> None:
    while not server.shutting_down:
        await trio.sleep(0.05)
    while server.active_connections:
        await trio.sleep(0.02)


async def _summarise_handshake_failures(summary: HandshakeFailureSummary) -> None:
    while True:
        await trio.sleep(SUMMARY_INTERVAL / 2)
        summary.flush_due()


async def _signals(server: HTTPServer, reload: Callable[[], Awaitable[None]]) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                log.info("SIGHUP: reloading TLS certificates and policy")
                await reload()
            else:
                log.info("%s: graceful shutdown", signal.Signals(signum).name)
                server.shutdown()


def _close(obj: Any) -> None:
    close = getattr(obj, "close", None)
    if close is not None:
        close()


def run(cfg: Config, **kw: Any) -> int:
    """Run the gateway in this process (``kw``: ``kms``, ``confinement``, see :func:`serve`)."""
    configure_logging(cfg.logging.level, cfg.logging.format)
    return run_trio(functools.partial(serve, cfg, **kw))


def run_trio(main: Callable[[], Awaitable[object]]) -> int:
    """``trio.run(main)``; a start-up error raised inside a nursery comes out as itself."""
    try:
        trio.run(main)
    except BaseExceptionGroup as group:
        # A start-up error raised inside a nursery (the KMS refusing a wrong KEK, a port in
        # use) arrives wrapped; show it as the one line it is.
        first = first_qpher_error(group)
        if first is None:
            raise
        raise first from None
    return 0


def first_qpher_error(exc: BaseException) -> QpherError | None:
    if isinstance(exc, QpherError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            found = first_qpher_error(sub)
            if found is not None:
                return found
    return None


