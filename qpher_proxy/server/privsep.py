"""Privilege separation: ``qpher-proxy serve`` as a supervisor, a gateway process and KMS workers.

Theory of operation
===================

As OpenSSH and nginx do, the process that is started is not the one that serves traffic::

    supervisor (qpher-proxy serve)  reads the config and the KEK; spawns, watches, restarts
      |- KMS worker x M             python -m qpher_proxy.kms.worker  (uid kms.user when root)
      '- gateway                    python -m qpher_proxy.server      (uid server.user when root,
                                                                       Landlock, clean environment)

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
  socket, binds its listening ports, then drops to ``server.user`` (when root) and confines
  itself with Landlock (see :mod:`qpher_proxy.sandbox`) before it opens any other file.
* **Restarts.** A worker that dies is restarted by its supervisor slot, with back-off, and the
  new socket is handed to the gateway; the gateway closes a worker's socket when it stops
  trusting it (a malformed frame, a hung request) and asks the supervisor to kill that pid.
  A gateway that dies after it has served is restarted too; its workers see EOF on their
  sockets, exit, and are restarted for the new gateway. A gateway that fails during start-up
  (a port in use, a bad certificate) ends the supervisor with its exit code: the gateway has
  already printed the one-line reason.
* **Signals.** SIGTERM/SIGINT/SIGHUP sent to the supervisor are forwarded to the gateway
  (graceful shutdown, or reload); the supervisor stops the workers once the gateway has exited.
  Should the supervisor die, the gateway sees its control socket close and shuts down, which
  closes the workers' sockets, and they exit. (``PR_SET_PDEATHSIG`` is no help here: it fires
  when the *thread* that forked exits, and trio starts processes from worker threads.)

Control messages are one JSON object per datagram, at most :data:`MAX_MESSAGE` bytes:

supervisor -> gateway: ``{"t": "hello", "workers": M}``, ``{"t": "worker", "index", "pid",
"token" (hex), "info", "max_frame_size"}`` with the socket attached, ``{"t": "restart",
"index", "exit_code"}``. gateway -> supervisor: ``{"t": "serving"}``, ``{"t": "kill", "pid"}``.
"""

from __future__ import annotations

import array
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from ..config import Config
from ..errors import ConfigError
from ..kms.client import KMSClient, OpHook, WorkerChannel
from ..kms.launcher import WorkerHandoff
from ..kms.wire.protocol import ClientConnection, Value
from ..sandbox import RunAs, lookup_user
from .settings import kms_supervisor

log = logging.getLogger("qpher.supervisor")

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
        self._send_lock = trio.Lock()

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

    async def run(self, *, task_status: trio.TaskStatus[SupervisedKMS] = trio.TASK_STATUS_IGNORED) -> None:
        started = False
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.client.watchdog)
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
                elif kind == "worker" and fd is not None:
                    self._attach(nursery, msg, fd)
                    if not started and self.client.live_workers >= self.workers > 0:
                        started = True
                        log.info("KMS ready", extra={"fields": {"workers": self.workers}})
                        task_status.started(self)
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
    """The gateway's whole environment: ours without the KEK variable (whatever the provider)."""
    return {k: v for k, v in os.environ.items() if k != cfg.kms.kek.env}


class Supervisor:
    """The ``serve`` process: KMS workers and one gateway, neither of which it serves traffic for."""

    def __init__(self, cfg: Config, config_path: str, *, python: str = sys.executable,
                 kek_fd: int | None = None) -> None:
        self.cfg = cfg
        self.config_path = os.path.abspath(config_path)
        self.python = python
        self.users = resolve_users(cfg)
        self.kms = kms_supervisor(
            cfg, on_restart=self._worker_restarted, python=python, worker_user=self.users.kms,
            handoff=self._handoff, kek_fd=kek_fd,
        )
        self._control: trio.socket.SocketType | None = None
        self._control_ready = trio.Event()
        self._send_lock = trio.Lock()
        self._gateway: trio.Process | None = None
        self._notes_in, self._notes_out = trio.open_memory_channel[dict[str, Any]](256)
        self._stopping = False
        self._scope: trio.CancelScope | None = None
        self.exit_code = 0

    async def run(self) -> int:
        async with trio.open_nursery() as nursery:
            self._scope = nursery.cancel_scope
            nursery.start_soon(self._signals)
            await nursery.start(self.kms.run)
            self.exit_code = await self._gateway_loop()
            nursery.cancel_scope.cancel()
        return self.exit_code

    # -- worker hand-over --

    async def _handoff(self, h: WorkerHandoff) -> None:
        while True:
            while self._control is None:
                await self._control_ready.wait()
            control = self._control
            msg = {"t": "worker", "index": h.index, "pid": h.pid, "token": h.token.hex(), "info": h.info,
                   "max_frame_size": h.max_frame_size}
            try:
                async with self._send_lock:
                    await send_message(control, msg, h.sock.fileno())
                return
            except OSError:
                if self._control is control:  # that gateway is gone; wait for the next one
                    self._control = None
                    self._control_ready = trio.Event()

    def _worker_restarted(self, index: int, exit_code: int | None) -> None:
        try:  # the gateway counts and audits restarts; a full queue only loses a count
            self._notes_in.send_nowait({"t": "restart", "index": index, "exit_code": exit_code})
        except trio.WouldBlock:
            pass

    async def _forward_notes(self, control: trio.socket.SocketType) -> None:
        async for note in self._notes_out:
            try:
                async with self._send_lock:
                    await send_message(control, note)
            except OSError:
                return

    # -- the gateway --

    def _gateway_command(self, fd: int) -> list[str]:
        cmd = [self.python, "-m", "qpher_proxy.server", "--config", self.config_path, "--control-fd", str(fd)]
        if self.users.gateway is not None:
            cmd += ["--user", self.users.gateway.arg()]
        return cmd

    async def _gateway_loop(self) -> int:
        backoff = RESTART_BACKOFF[0]
        served_once = False
        while True:
            parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                proc = await trio.lowlevel.open_process(
                    self._gateway_command(child.fileno()),
                    pass_fds=[child.fileno()],
                    stdin=subprocess.DEVNULL,
                    env=gateway_environment(self.cfg),
                    start_new_session=True,
                )
            except OSError as exc:
                parent.close()
                raise ConfigError(f"cannot start the gateway process: {exc.strerror}") from None
            finally:
                child.close()
            self._gateway = proc
            parent.setblocking(False)
            control = trio.socket.from_stdlib_socket(parent)
            served = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._listen, control, served)
                nursery.start_soon(self._forward_notes, control)
                async with self._send_lock:
                    await send_message(control, {"t": "hello", "workers": self.kms.workers})
                self._control = control
                self._control_ready.set()
                code = await proc.wait()
                nursery.cancel_scope.cancel()
            self._gateway = None
            if self._control is control:
                self._control = None
                self._control_ready = trio.Event()
            control.close()
            if served.is_set():
                served_once = True
                backoff = RESTART_BACKOFF[0]
            if self._stopping:
                return 0 if code in (0, -signal.SIGTERM, -signal.SIGINT) else code
            if not served_once:
                return code if code > 0 else 1  # the gateway printed why
            log.error("the gateway process exited; restarting it",
                      extra={"fields": {"exit_code": code, "backoff_s": backoff}})
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
            if fd is not None:
                os.close(fd)  # the gateway never has a reason to send us a descriptor
            if msg["t"] == "serving":
                served.set()
            elif msg["t"] == "kill" and isinstance(msg.get("pid"), int):
                self.kms.kill(msg["pid"])

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum != signal.SIGHUP:
                    self._stopping = True
                    self.kms.stopping = True  # the workers end with the gateway: no restarts
                proc = self._gateway
                if proc is not None and proc.returncode is None:
                    proc.send_signal(signum)
                elif self._stopping and self._scope is not None:
                    self._scope.cancel()  # no gateway to wait for (start-up, or between restarts)


def reexec_without_env_kek(cfg: Config, config_path: str) -> None:
    """``kek.provider: env``: move the KEK into a memfd and exec this command again without the
    variable. ``os.environ.pop`` cannot clear the process's initial environment block, which
    ``/proc/<pid>/environ`` and a memory dump show until exit; a new ``exec`` gets a new one."""
    from ..kms.launcher import stash_env_kek

    fd = stash_env_kek(cfg.kms.kek.env, inheritable=True)
    argv = [sys.executable, "-m", "qpher_proxy", "serve", "--config", os.path.abspath(config_path),
            "--kek-fd", str(fd)]
    os.execve(sys.executable, argv, {k: v for k, v in os.environ.items() if k != cfg.kms.kek.env})


def run(cfg: Config, config_path: str, kek_fd: int | None = None) -> int:
    """``qpher-proxy serve``: the supervisor's whole life; returns the exit code."""
    from ..logs import configure_logging
    from .serve import first_qpher_error

    if cfg.kms.kek.provider == "env" and kek_fd is None and cfg.kms.kek.env in os.environ:
        reexec_without_env_kek(cfg, config_path)
    configure_logging(cfg.logging.level, cfg.logging.format)
    try:
        return trio.run(Supervisor(cfg, config_path, kek_fd=kek_fd).run)
    except BaseExceptionGroup as group:
        first = first_qpher_error(group)
        if first is None:
            raise
        raise first from None


__all__ = ["SupervisedKMS", "Supervisor", "receive_message", "resolve_users", "run", "send_message"]
