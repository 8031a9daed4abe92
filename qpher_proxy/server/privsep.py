"""Privilege separation: ``qpher-proxy serve`` as a supervisor, gateway processes and KMS workers.

Theory of operation
===================

As OpenSSH and nginx do, the process that is started is not the one that serves traffic::

    supervisor (qpher-proxy serve)  reads the config and the KEK; binds the ports; spawns,
      |                             watches, restarts
      |- KMS worker x M             python -m qpher_proxy.kms.worker  (uid kms.user when root)
      '- gateway                    python -m qpher_proxy.server      (uid server.user when root,
                                                                       Landlock, clean environment)
    ... and with ``server.workers: N``, N such gateways, each with its own M KMS workers.

* The **supervisor** never accepts a client connection. It starts the KMS workers with
  :class:`~qpher_proxy.kms.launcher.KMSSupervisor` (which moves an env-provided KEK into a
  sealed memfd that only the workers inherit), performs each worker's HELLO/READY bootstrap
  itself -- so the KMS directory, the KEK location and the backend come from the supervisor's
  config, never from the gateway -- and then *hands the bootstrapped socket over* to the
  gateway (``SCM_RIGHTS`` on a ``SOCK_SEQPACKET`` control socketpair) together with the service
  token, and closes its own copy. From then on the gateway talks to the worker directly, as it
  would to a worker it had started itself.
* The **gateway** is started from a clean environment (the KEK variable is gone from it before
  the exec, so ``/proc/<pid>/environ`` cannot show it), inherits no descriptor but its control
  socket and its listening sockets, then drops to ``server.user`` (when root) and confines
  itself with Landlock (see :mod:`qpher_proxy.sandbox`) before it opens any other file.
* **Listening sockets** are bound by the supervisor (:func:`bind_listeners`), one set per
  gateway process, and passed at spawn (``pass_fds``, ``--listen-fds``). The supervisor keeps
  its copies: a restarted gateway gets the same sockets back, and connections that arrived
  while it was down wait in their queue for it instead of being refused.
* **Several gateway processes** (``server.workers: N``, N > 1): gateway ``i`` has its own
  sockets, all with SO_REUSEPORT on the one port (for port 0, the one the kernel picked for
  gateway 0), so the kernel spreads new connections over the N processes; its own
  :class:`~qpher_proxy.kms.launcher.KMSSupervisor` (``kms.workers`` workers per gateway, or for
  0 the spare cores shared out, see :func:`.settings.kms_worker_count`) and its own control
  socket. Each gateway and its workers are restarted independently of the others. Readiness
  (``/readyz``) and metrics (``/metrics``, with ``qpher_process_info{pid}``) are per process: a
  request reaches whichever process the kernel picked, so sum the counters over the processes
  that answer. Log lines carry ``"gateway": i``. With ``ratelimit.backend: local`` the
  supervisor creates one shared-memory limiter table
  (:class:`~qpher_proxy.ratelimit.shared.SharedLimiterTable`) and sends its descriptor to each
  gateway (``ratelimit_fd``), so that a plan's limits hold for the host.
* **Restarts.** A worker that dies is restarted by its supervisor slot, with back-off, and the
  new socket is handed to the gateway; the gateway closes a worker's socket when it stops
  trusting it (a malformed frame, a hung request) and asks the supervisor to kill that pid.
  A gateway that dies after it has served is restarted too; its workers see EOF on their
  sockets, exit, and are restarted for the new gateway. A gateway that fails during start-up
  (a bad certificate) stops the others and ends the supervisor with its exit code: the
  gateway has already printed the one-line reason. A port that cannot be bound stops the
  supervisor before anything is started.
* **Signals.** SIGTERM/SIGINT/SIGHUP sent to the supervisor are forwarded to every gateway
  (graceful shutdown, or reload); the supervisor stops each gateway's workers once that
  gateway has exited.
  Should the supervisor die, the gateway sees its control socket close and shuts down, which
  closes the workers' sockets, and they exit. (``PR_SET_PDEATHSIG`` is no help here: it fires
  when the *thread* that forked exits, and trio starts processes from worker threads.)

Control messages are one JSON object per datagram, at most :data:`MAX_MESSAGE` bytes:

supervisor -> gateway: ``{"t": "hello", "workers": M}``, ``{"t": "ratelimit_fd"}`` with the
shared limiter table's memfd attached (N > 1 only; before the workers), ``{"t": "worker",
"index", "pid", "token" (hex), "info", "max_frame_size"}`` with the socket attached,
``{"t": "restart", "index", "exit_code"}``. gateway -> supervisor: ``{"t": "serving"}``,
``{"t": "kill", "pid"}``.

TLS session tickets across gateways (N > 1; tls/context.py): each gateway announces the
names of the ticket keys it accepts, ``{"t": "ticket_keys", "names": [hex]}`` (at start, after
every rotation and reload); the supervisor sends every gateway the others' names,
``{"t": "ticket_peers", "keys": {hex: index}}``. A gateway that receives a ClientHello with a
ticket of gateway ``i`` sends ``{"t": "handover", "to": i, "data": base64}`` with the
connection's socket attached (``data``: the bytes it read from it); the supervisor forwards
``{"t": "handover", "data"}`` with the socket to gateway ``i``, which resumes the session there.
"""

from __future__ import annotations

import array
import base64
import binascii
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from ..config import Config, parse_listen
from ..errors import ConfigError
from ..kms.client import KMSClient, OpHook, WorkerChannel
from ..kms.launcher import KMSSupervisor, WorkerHandoff
from ..kms.wire.protocol import ClientConnection, Value
from ..sandbox import RunAs, lookup_user
from .settings import kek_settings, kms_supervisor

log = logging.getLogger("qpher.supervisor")

MAX_HANDOVER_BYTES = 40 * 1024  # bytes read before a hand-over that fit a control message (base64)

MAX_MESSAGE = 64 * 1024
GATEWAY_START_TIMEOUT = 120.0  # seconds from exec to "serving" (imports, TLS contexts, policy)
RESTART_BACKOFF = (0.2, 10.0)  # first and longest wait before a crashed gateway is restarted


# --- the control socket ----------------------------------------------------------------------


async def send_message(sock: trio.socket.SocketType, msg: dict[str, Any], fd: int | None = None) -> None:
    data = json.dumps(msg, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise ValueError("control message too large")
    if fd is None:
        await sock.send(data)
    else:
        await sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])


async def receive_message(sock: trio.socket.SocketType) -> tuple[dict[str, Any], int | None] | None:
    """The next message and the descriptor that came with it; ``None`` at EOF. Descriptors
    beyond one per message, and any with a malformed message, are closed at once."""
    data, ancdata, _flags, _addr = await sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(4 * 4))
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
            fds.extend(arr)
    if not data and not fds:
        return None
    try:
        msg = json.loads(data)
        if type(msg) is not dict or not isinstance(msg.get("t"), str):
            raise ValueError
    except ValueError:
        for fd in fds:
            os.close(fd)
        raise ValueError("malformed control message") from None
    for extra in fds[1:]:
        os.close(extra)
    return msg, (fds[0] if fds else None)


# --- the gateway's side --------------------------------------------------------------------


class SupervisedKMS:
    """The gateway's view of KMS workers that the supervisor process runs: the same surface as
    :class:`~qpher_proxy.kms.launcher.KMSSupervisor` offers to ``serve()`` (``client``,
    ``info``, ``pids``, ``ready``, ``workers``, ``restarts``), fed by the control socket."""

    def __init__(
        self,
        control: socket.socket,
        *,
        request_timeout: float | None = 30.0,
        on_op: OpHook | None = None,
        on_restart: Callable[[int, int | None], None] | None = None,
    ) -> None:
        control.setblocking(False)
        self._control = trio.socket.from_stdlib_socket(control)
        self.client = KMSClient(request_timeout=request_timeout, on_op=on_op)
        self.on_restart = on_restart
        self.workers = 0
        self.restarts = 0
        self.pids: dict[int, int] = {}
        self.info: dict[int, dict[str, Value]] = {}
        # server.workers > 1: the shared rate-limit table's descriptor (the supervisor's
        # ``ratelimit_fd`` message), here before ``run`` reports started; None otherwise.
        self.ratelimit_fd: int | None = None
        self._send_lock = trio.Lock()
        # TLS tickets across gateways (serve.py sets the hooks when server.workers > 1).
        self.on_ticket_peers: Callable[[dict[bytes, int]], None] | None = None
        self.on_handover: Callable[[int, bytes], bool] | None = None
        queued = trio.open_memory_channel[tuple[dict[str, Any], int | None]](256)
        self._queued_send, self._queued_receive = queued

    def __repr__(self) -> str:
        return (
            f"<SupervisedKMS workers={self.workers} live={self.client.live_workers} restarts={self.restarts}>"
        )

    @property
    def ready(self) -> bool:
        return self.client.ready

    async def tell(self, msg: dict[str, Any]) -> None:
        async with self._send_lock:
            try:
                await send_message(self._control, msg)
            except OSError:
                log.error("the supervisor's control socket is closed")

    def announce_ticket_keys(self, names: list[bytes]) -> None:
        """Queue ``ticket_keys`` (from the trio thread; dropped if the queue is full)."""
        self._queue({"t": "ticket_keys", "names": [n.hex() for n in names]}, None)

    def hand_over(self, gateway: int, fd: int, data: bytes) -> bool:
        """Queue the connection ``fd`` (duplicated here) and the bytes read from it for gateway
        ``gateway``; False if it cannot go (the caller then serves it itself)."""
        if len(data) > MAX_HANDOVER_BYTES:
            return False
        dup = os.dup(fd)
        if not self._queue({"t": "handover", "to": gateway, "data": base64.b64encode(data).decode()}, dup):
            os.close(dup)
            return False
        return True

    def _queue(self, msg: dict[str, Any], fd: int | None) -> bool:
        try:
            self._queued_send.send_nowait((msg, fd))
        except trio.WouldBlock:
            log.warning("control queue full: dropping a %s message", msg["t"])
            return False
        return True

    async def _send_queued(self) -> None:
        async for msg, fd in self._queued_receive:
            try:
                async with self._send_lock:
                    await send_message(self._control, msg, fd)
            except (OSError, ValueError):
                log.error("could not send a %s message to the supervisor", msg["t"])
            finally:
                if fd is not None:
                    os.close(fd)

    def _ticket_message(self, kind: str, msg: dict[str, Any], fd: int | None) -> None:
        if kind == "ticket_peers":
            keys = msg.get("keys")
            if self.on_ticket_peers is not None and isinstance(keys, dict):
                try:
                    self.on_ticket_peers({bytes.fromhex(k): int(v) for k, v in keys.items()})
                except (TypeError, ValueError):
                    log.error("ignoring malformed ticket_peers")
            return
        # "handover" with the client's socket: ours now (on_handover takes or closes it)
        assert fd is not None
        data = msg.get("data")
        try:
            raw = base64.b64decode(data, validate=True) if isinstance(data, str) else None
        except (binascii.Error, ValueError):
            raw = None
        if raw is None or self.on_handover is None:
            os.close(fd)
            return
        self.on_handover(fd, raw)

    async def run(self, *, task_status: trio.TaskStatus[SupervisedKMS] = trio.TASK_STATUS_IGNORED) -> None:
        started = False
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.client.watchdog)
            nursery.start_soon(self._send_queued)
            while True:
                try:
                    got = await receive_message(self._control)
                except ValueError as exc:
                    log.error("ignoring a control message", extra={"fields": {"reason": str(exc)}})
                    continue
                except OSError:
                    got = None
                if got is None:
                    # The supervisor is gone: nothing would restart a worker or this process.
                    log.critical("the supervisor closed the control socket; shutting down")
                    os.kill(os.getpid(), signal.SIGTERM)
                    await trio.sleep_forever()
                msg, fd = got
                kind = msg["t"]
                if kind == "hello":
                    self.workers = int(msg["workers"])
                    if self.workers == 0 and not started:  # kms.mode remote: the control plane only
                        started = True
                        task_status.started(self)
                elif kind == "worker" and fd is not None:
                    self._attach(nursery, msg, fd)
                    if not started and self.client.live_workers >= self.workers > 0:
                        started = True
                        log.info("KMS ready", extra={"fields": {"workers": self.workers}})
                        task_status.started(self)
                elif kind == "ratelimit_fd" and fd is not None:
                    if self.ratelimit_fd is not None:
                        os.close(self.ratelimit_fd)
                    self.ratelimit_fd = fd
                elif kind == "ticket_peers" or (kind == "handover" and fd is not None):
                    self._ticket_message(kind, msg, fd)
                elif kind == "restart":
                    self.restarts += 1
                    if self.on_restart is not None:
                        code = msg.get("exit_code")
                        self.on_restart(int(msg.get("index", -1)), code if isinstance(code, int) else None)
                elif fd is not None:
                    os.close(fd)

    def _attach(self, nursery: trio.Nursery, msg: dict[str, Any], fd: int) -> None:
        sock = socket.socket(fileno=fd)
        try:
            index, pid = int(msg["index"]), int(msg["pid"])
            token = bytes.fromhex(msg["token"])
            conn = ClientConnection.bootstrapped(token, int(msg["max_frame_size"]))
            info = msg.get("info")
        except (KeyError, TypeError, ValueError):
            sock.close()
            log.error("ignoring a malformed worker hand-over")
            return
        self.pids[index] = pid
        self.info[index] = info if isinstance(info, dict) else {}
        channel = WorkerChannel(index, sock, conn, pid=pid)
        self.client._attach(channel)
        nursery.start_soon(self._serve_channel, channel)

    async def _serve_channel(self, channel: WorkerChannel) -> None:
        await channel.run()
        if self.pids.get(channel.index) == channel.pid:
            del self.pids[channel.index]
        # Whatever ended it, that worker is no longer trusted: make sure it is gone.
        await self.tell({"t": "kill", "pid": channel.pid})


def inherited_listeners(fds: str) -> list[trio.SocketListener]:
    """The listening sockets the supervisor passed (``--listen-fds 5,6``), ready to serve on."""
    return [trio.SocketListener(trio.socket.from_stdlib_socket(socket.socket(fileno=int(fd))))
            for fd in fds.split(",")]


# --- the supervisor -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Users:
    gateway: RunAs | None
    kms: RunAs | None


def resolve_users(cfg: Config) -> Users:
    """The users to drop to: only when started as root, and only those the config names."""
    if os.geteuid() != 0:
        return Users(None, None)
    gw = lookup_user(cfg.server.user, "server.user") if cfg.server.user else None
    kms = lookup_user(cfg.kms.user, "kms.user") if cfg.kms.user else None
    if gw is not None and kms is not None and gw.uid == kms.uid:
        raise ConfigError("server.user and kms.user must be different users: the gateway's uid must not "
                          "be able to read the KMS's files")
    return Users(gw, kms)


def gateway_environment(cfg: Config) -> dict[str, str]:
    """The gateway's whole environment: ours without the KEK variable (whatever the provider) and
    without the PKCS#11 PIN variable."""
    secret = {cfg.kms.kek.env, cfg.kms.kek.pkcs11_pin_env}
    return {k: v for k, v in os.environ.items() if k not in secret}


LISTEN_BACKLOG = 65535  # as trio.open_tcp_listeners asks; the kernel caps it at net.core.somaxconn


def bind_listeners(listen: Sequence[str], copies: int) -> list[list[socket.socket]]:
    """For each of ``copies`` gateway processes, its own listening sockets: one per address of
    each ``server.listen`` entry (as ``trio.open_tcp_listeners`` makes them: SO_REUSEADDR,
    IPv6-only for IPv6). With ``copies > 1`` every socket also has SO_REUSEPORT and the copies
    of an address share its port, so the kernel spreads new connections over the processes;
    a port of 0 is the one the kernel picked for the first copy."""
    out: list[list[socket.socket]] = [[] for _ in range(copies)]
    try:
        for addr in listen:
            host, port = parse_listen(addr)
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
                for family, kind, proto, _name, sockaddr in infos:
                    for copy in out:
                        s = socket.socket(family, kind, proto)
                        copy.append(s)
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                        if copies > 1:
                            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                        if family == socket.AF_INET6:
                            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                        s.bind(sockaddr)
                        s.listen(LISTEN_BACKLOG)
                        sockaddr = (sockaddr[0], s.getsockname()[1], *sockaddr[2:])
            except OSError as exc:
                raise ConfigError(f"server.listen: cannot listen on {addr}: {exc.strerror}") from None
    except BaseException:
        for copy in out:
            for s in copy:
                s.close()
        raise
    return out


def _shared_limiter(cfg: Config) -> tuple[Any, int | None]:
    """``server.workers > 1`` with ``ratelimit.backend: local``: a shared-memory limiter table
    (kept by the supervisor) and its descriptor, which every gateway gets in a ``ratelimit_fd``
    control message and attaches to, so that the limits hold host-wide. ``(None, None)`` while
    :mod:`qpher_proxy.ratelimit.shared` is not there: each process then limits on its own."""
    if cfg.server.workers <= 1 or cfg.ratelimit.backend != "local":
        return None, None
    try:
        from ..ratelimit import shared
    except ImportError:
        return None, None
    table, fd = shared.SharedLimiterTable.create()  # it owns the descriptor
    return table, fd


class _GatewaySlot:
    """Gateway process ``index``: its KMS workers, its listening sockets (kept here across its
    restarts, so connections queued meanwhile wait for the next process), its control socket."""

    def __init__(self, sup: Supervisor, index: int, listeners: list[socket.socket],
                 kek_fd: int | None) -> None:
        self.sup = sup
        self.index = index
        self.listeners = listeners
        # kms.mode remote: no local workers; the gateway connects to the KMS nodes itself
        self.kms: KMSSupervisor | None = None if sup.cfg.kms.mode == "remote" else kms_supervisor(
            sup.cfg, on_restart=self._worker_restarted, python=sup.python, worker_user=sup.users.kms,
            handoff=self._handoff, kek_fd=kek_fd,
        )
        self.control: trio.socket.SocketType | None = None
        self.control_ready = trio.Event()
        self.send_lock = trio.Lock()
        self.proc: trio.Process | None = None
        self.scope = trio.CancelScope()
        self.notes_in, self.notes_out = trio.open_memory_channel[dict[str, Any]](256)
        self.ticket_keys: list[str] = []  # hex names of the TLS ticket keys the gateway accepts

    # -- worker hand-over --

    async def _handoff(self, h: WorkerHandoff) -> None:
        while True:
            while self.control is None:
                await self.control_ready.wait()
            control = self.control
            msg = {"t": "worker", "index": h.index, "pid": h.pid, "token": h.token.hex(), "info": h.info,
                   "max_frame_size": h.max_frame_size}
            try:
                async with self.send_lock:
                    await send_message(control, msg, h.sock.fileno())
                return
            except OSError:
                if self.control is control:  # that gateway is gone; wait for the next one
                    self.control = None
                    self.control_ready = trio.Event()

    def _worker_restarted(self, index: int, exit_code: int | None) -> None:
        try:  # the gateway counts and audits restarts; a full queue only loses a count
            self.notes_in.send_nowait({"t": "restart", "index": index, "exit_code": exit_code})
        except trio.WouldBlock:
            pass

    async def _forward_notes(self, control: trio.socket.SocketType) -> None:
        async for note in self.notes_out:
            try:
                async with self.send_lock:
                    await send_message(control, note)
            except OSError:
                return

    # -- the gateway process --

    def _command(self, fd: int, listen_fds: list[int]) -> list[str]:
        cmd = [self.sup.python, "-m", "qpher_proxy.server", "--config", self.sup.config_path,
               "--control-fd", str(fd), "--listen-fds", ",".join(map(str, listen_fds)),
               "--gateway-index", str(self.index)]
        if self.sup.users.gateway is not None:
            cmd += ["--user", self.sup.users.gateway.arg()]
        return cmd

    async def _hello(self, control: trio.socket.SocketType) -> None:
        async with self.send_lock:
            # the limiter table first: with no local workers the gateway starts at "hello"
            if self.sup.ratelimit_fd is not None:
                await send_message(control, {"t": "ratelimit_fd"}, self.sup.ratelimit_fd)
            workers = 0 if self.kms is None else self.kms.workers
            await send_message(control, {"t": "hello", "workers": workers})

    async def run(self) -> int:
        """The gateway's life, restarts included; its exit code once it is to stay down."""
        backoff = RESTART_BACKOFF[0]
        served_once = False
        sup = self.sup
        while True:
            parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            listen_fds = [s.fileno() for s in self.listeners]
            try:
                proc = await trio.lowlevel.open_process(
                    self._command(child.fileno(), listen_fds),
                    pass_fds=[child.fileno(), *listen_fds],
                    stdin=subprocess.DEVNULL,
                    env=gateway_environment(sup.cfg),
                    start_new_session=True,
                )
            except OSError as exc:
                parent.close()
                raise ConfigError(f"cannot start the gateway process: {exc.strerror}") from None
            finally:
                child.close()
            self.proc = proc
            parent.setblocking(False)
            control = trio.socket.from_stdlib_socket(parent)
            served = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._listen, control, served)
                nursery.start_soon(self._forward_notes, control)
                await self._hello(control)
                self.control = control
                self.control_ready.set()
                code = await proc.wait()
                nursery.cancel_scope.cancel()
            self.proc = None
            if self.control is control:
                self.control = None
                self.control_ready = trio.Event()
            control.close()
            if self.ticket_keys:  # its keys died with it
                self.ticket_keys = []
                await sup.broadcast_ticket_peers()
            if served.is_set():
                served_once = True
                backoff = RESTART_BACKOFF[0]
            if sup.stopping:
                return 0 if code in (0, -signal.SIGTERM, -signal.SIGINT) else code
            if not served_once:
                return code if code > 0 else 1  # the gateway printed why
            log.error("the gateway process exited; restarting it",
                      extra={"fields": {"exit_code": code, "backoff_s": backoff, "gateway": self.index}})
            await trio.sleep(backoff)
            backoff = min(backoff * 2, RESTART_BACKOFF[1])

    async def _listen(self, control: trio.socket.SocketType, served: trio.Event) -> None:
        while True:
            try:
                got = await receive_message(control)
            except ValueError:
                log.error("ignoring a malformed message from the gateway")
                continue
            except OSError:
                return
            if got is None:
                return
            msg, fd = got
            if msg["t"] == "handover" and fd is not None:
                await self.sup.forward_handover(msg, fd)  # a TLS client for another gateway
                continue
            if fd is not None:
                os.close(fd)  # no other message carries a descriptor
            if msg["t"] == "ticket_keys" and isinstance(msg.get("names"), list):
                self.ticket_keys = [n for n in msg["names"][:8] if isinstance(n, str) and len(n) == 32]
                await self.sup.broadcast_ticket_peers()
            elif msg["t"] == "serving":
                served.set()
            elif msg["t"] == "kill" and isinstance(msg.get("pid"), int):
                if self.kms is not None:
                    self.kms.kill(msg["pid"])

    def signal(self, signum: int) -> None:
        """Forward ``signum``; a stop with no process to stop ends the slot at once."""
        if signum != signal.SIGHUP:
            if self.kms is not None:
                self.kms.stopping = True  # the workers end with the gateway: no restarts
        proc = self.proc
        if proc is not None and proc.returncode is None:
            proc.send_signal(signum)
        elif signum != signal.SIGHUP:
            self.scope.cancel()  # no gateway to wait for (start-up, or between restarts)

    async def supervise(self) -> None:
        """Its KMS workers (ready before the gateway starts), then the gateway; when the gateway
        is to stay down, its exit code goes to the supervisor and the workers stop."""
        code = 0
        with self.scope:
            async with trio.open_nursery() as nursery:
                if self.kms is not None:
                    await nursery.start(self.kms.run)
                code = await self.run()
                nursery.cancel_scope.cancel()
        self.sup.gateway_ended(self.index, code)


class Supervisor:
    """The ``serve`` process: KMS workers and ``server.workers`` gateway processes, none of
    which it serves traffic for."""

    def __init__(self, cfg: Config, config_path: str, *, python: str = sys.executable,
                 kek_fd: int | None = None) -> None:
        self.cfg = cfg
        self.config_path = os.path.abspath(config_path)
        self.python = python
        self.users = resolve_users(cfg)
        self._kek_fd = kek_fd
        self.slots: list[_GatewaySlot] = []
        self.ratelimit_fd: int | None = None
        self._ratelimit_table: Any = None
        self.stopping = False
        self.exit_code = 0

    async def run(self) -> int:
        n = self.cfg.server.workers
        listeners = bind_listeners(self.cfg.server.listen, n)
        try:
            # Each gateway's KMS supervisor owns (and closes) its own copy of the KEK memfd.
            kek_fds = [self._kek_fd] + [None if self._kek_fd is None else os.dup(self._kek_fd)
                                        for _ in range(n - 1)]
            self.slots = [_GatewaySlot(self, i, listeners[i], kek_fds[i]) for i in range(n)]
            self._ratelimit_table, self.ratelimit_fd = _shared_limiter(self.cfg)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._signals)
                async with trio.open_nursery() as gateways:
                    for slot in self.slots:
                        gateways.start_soon(slot.supervise)
                nursery.cancel_scope.cancel()
        finally:
            for copy in listeners:
                for s in copy:
                    s.close()
            if self._ratelimit_table is not None:
                self._ratelimit_table.close()
        return self.exit_code

    async def broadcast_ticket_peers(self) -> None:
        """Tell every gateway the other gateways' TLS ticket key names."""
        for slot in self.slots:
            control = slot.control
            if control is None:
                continue
            keys = {name: other.index for other in self.slots if other is not slot
                    for name in other.ticket_keys}
            try:
                async with slot.send_lock:
                    await send_message(control, {"t": "ticket_peers", "keys": keys})
            except (OSError, ValueError):
                pass  # that gateway is gone; it gets the map again when it announces its keys

    async def forward_handover(self, msg: dict[str, Any], fd: int) -> None:
        """Pass a TLS client's socket from one gateway to the one whose ticket key it names."""
        try:
            to, data = msg.get("to"), msg.get("data")
            if not (isinstance(to, int) and 0 <= to < len(self.slots) and isinstance(data, str)):
                return
            target = self.slots[to]
            control = target.control
            if control is None:
                return  # restarting: the client's connection ends; it reconnects
            async with target.send_lock:
                await send_message(control, {"t": "handover", "data": data}, fd)
        except (OSError, ValueError):
            log.warning("could not hand a TLS connection over", extra={"fields": {"gateway": msg.get("to")}})
        finally:
            os.close(fd)

    def gateway_ended(self, index: int, code: int) -> None:
        """A gateway that is to stay down: at shutdown, or one that failed before it ever
        served (a bad certificate): then the others are stopped and its code is ours."""
        if code != 0 and self.exit_code == 0:
            self.exit_code = code
        if not self.stopping:
            self.stop(signal.SIGTERM)

    def stop(self, signum: int) -> None:
        self.stopping = True
        for slot in self.slots:
            slot.signal(signum)

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    for slot in self.slots:
                        slot.signal(signum)
                else:
                    self.stop(signum)


def reexec_without_env_kek(cfg: Config, config_path: str, var: str | None = None,
                           command: tuple[str, ...] = ("serve",)) -> None:
    """``kek.provider: env``: move the KEK into a memfd and exec this command again without the
    variable. ``os.environ.pop`` cannot clear the process's initial environment block, which
    ``/proc/<pid>/environ`` and a memory dump show until exit; a new ``exec`` gets a new one.
    ``var``: another variable to move the same way (provider pkcs11's ``pkcs11_pin_env``).
    ``command``: the subcommand to run again (``serve``, or ``kms serve`` for a KMS node)."""
    from ..kms.launcher import stash_env_kek

    var = var or cfg.kms.kek.env
    option = "kms.kek.env" if var == cfg.kms.kek.env else "kms.kek.pkcs11_pin_env"
    fd = stash_env_kek(var, inheritable=True, option=option)
    argv = [sys.executable, "-m", "qpher_proxy", *command, "--config", os.path.abspath(config_path),
            "--kek-fd", str(fd)]
    os.execve(sys.executable, argv, {k: v for k, v in os.environ.items() if k != var})


def run(cfg: Config, config_path: str, kek_fd: int | None = None) -> int:
    """``qpher-proxy serve``: the supervisor's whole life; returns the exit code."""
    from ..logs import configure_logging
    from .serve import first_qpher_error

    secret_env = kek_settings(cfg.kms.kek).secret_env  # provider env's KEK or pkcs11's PIN variable
    if secret_env is not None and kek_fd is None and secret_env in os.environ:
        reexec_without_env_kek(cfg, config_path, secret_env)
    configure_logging(cfg.logging.level, cfg.logging.format)
    from .state import prepare_database

    prepare_database(cfg)  # storage.backend postgresql: migrate (or check) before any child starts
    try:
        return trio.run(Supervisor(cfg, config_path, kek_fd=kek_fd).run)
    except BaseExceptionGroup as group:
        first = first_qpher_error(group)
        if first is None:
            raise
        raise first from None


__all__ = ["SupervisedKMS", "Supervisor", "receive_message", "resolve_users", "run", "send_message"]
