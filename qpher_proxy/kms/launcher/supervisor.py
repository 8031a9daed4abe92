"""The KMS supervisor: starts, watches and restarts the KMS worker processes.  Gateway side (trio).

Theory of operation
===================

``KMSSupervisor.run`` starts ``workers`` child processes, each ``python -m qpher_proxy.kms.worker
--fd N`` with one end of its own ``socket.socketpair()`` as inherited descriptor ``N`` (via
``pass_fds``: no path, no port; every other descriptor of ours is closed in the child by
``close_fds`` and again by the child itself). For each start it draws a fresh 32-byte service
token, sends it with the worker's settings in the HELLO frame, and waits for READY. Only then
does the worker's :class:`~qpher_proxy.kms.client.WorkerChannel` join the
:class:`~qpher_proxy.kms.client.KMSClient`.

Start-up: ``await nursery.start(supervisor.run)`` returns once every worker is READY. If any
worker's first start fails -- it answered an ERROR frame (wrong KEK, unreadable KEK file,
missing backend) or died -- the others are stopped and ``run`` raises
:class:`~qpher_proxy.errors.ConfigError` with the worker's own one-line reason. A wrong KEK
therefore stops ``serve`` before anything is written.

After start-up a worker that dies (EOF on its socket, a malformed frame, its process gone):

1. its channel fails every request in flight on it at once with 503 ``kms_unavailable``
   and leaves the client, so new requests go to the other workers (or fail fast if none);
2. its process is reaped (killed if it is somehow still alive);
3. it is started again after a back-off that doubles from ``restart_backoff`` up to
   ``restart_backoff_max`` and resets once a worker has stayed up ``backoff_reset_after``
   seconds; ``on_restart(index, exit_code)`` is called and ``restarts`` counts them.

``ready`` (for ``/readyz``) is true while at least one worker is live.

Shutdown (the nursery is cancelled): each channel is closed, which the worker sees as EOF and
exits 0 on; a worker still running after ``stop_grace`` seconds is killed.

The KEK never passes through here
---------------------------------
``kek.provider: file``: the worker is told the path and reads the file itself. ``provider:
pkcs11``: the KEK never leaves its token; the worker is told the module, the labels and the PIN
file's path, or -- with ``pkcs11_pin_env`` -- gets the PIN exactly as provider env gets its
KEK, below. ``provider: env``: on ``run`` the supervisor *moves* the variable out of this
process's environment (``os.environb.pop``, which also ``unsetenv``\\s it, so no later child or
sidecar inherits it) into a sealed anonymous memory file (``memfd_create``), and keeps only that
descriptor to hand to each worker start (``--kek-fd``). The gateway holds no Python object with the KEK after
that (the bytes object read from the environment is dropped at once; CPython cannot scrub it,
and the copy in the process's original environment block stays until exit: use the file
provider where that matters).

The database DSN (``storage.backend: postgresql``) travels the same way as every other
setting: in the HELLO frame of each start (``storage`` in :meth:`KMSSupervisor._hello_config`),
never in argv or the environment, and :class:`~qpher_proxy.kms.wire.model.KMSStorageSettings`
keeps it out of its ``repr``.

Workers write JSON log lines to stderr; the supervisor re-emits each through the logger
``qpher.kms.worker`` with the worker's index, so KMS logs land in the gateway's log stream.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import trio

from ...errors import ConfigError
from ...sandbox import RunAs
from ..client import KMSClient, OpHook, WorkerChannel
from ..wire.model import DEFAULT_DESTROY_DELAY, DEFAULT_MAX_BATCH, KEKSettings, KMSStorageSettings
from ..wire.protocol import (
    DEFAULT_MAX_FRAME_SIZE,
    NEED_DATA,
    ClientConnection,
    Error,
    ProtocolError,
    Ready,
    Value,
)

log = logging.getLogger("qpher.kms.supervisor")
worker_log = logging.getLogger("qpher.kms.worker")

# The worker is started by module name, never imported: this side holds no worker code.
WORKER_MODULE = "qpher_proxy.kms.worker"

RestartHook = Callable[[int, "int | None"], None]  # (worker index, exit code or None)


@dataclass(frozen=True, slots=True)
class WorkerHandoff:
    """A worker that answered READY, for a process other than ours to talk to: its end of the
    socketpair, the service token its HELLO carried and its READY facts."""

    index: int
    pid: int
    token: bytes = field(repr=False)
    info: dict[str, Value]
    sock: socket.socket
    max_frame_size: int


HandoffHook = Callable[[WorkerHandoff], Awaitable[None]]

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR, "critical": logging.CRITICAL}


def default_worker_count() -> int:
    """``kms.workers: 0``: one per spare core (cores minus one for the gateway), at least 1."""
    return max(1, (os.cpu_count() or 1) - 1)


@dataclass(frozen=True, slots=True)
class _Ended:
    kind: Literal["fatal", "failed", "died", "stopped"]
    message: str
    exit_code: int | None = None


def stash_env_kek(var: str, *, inheritable: bool = False, option: str = "kms.kek.env") -> int:
    """Move ``$var`` out of our environment into a sealed memfd; return its descriptor
    (``inheritable``: it survives an ``exec`` of this process). The KEK for provider env, the
    token's PIN for provider pkcs11 (``option`` kms.kek.pkcs11_pin_env)."""
    raw = os.environb.pop(var.encode(), None)
    if raw is None:
        raise ConfigError(f"environment variable {var!r} ({option}) is not set")
    flags = (0 if inheritable else os.MFD_CLOEXEC) | getattr(os, "MFD_ALLOW_SEALING", 0)
    try:
        fd = os.memfd_create("qpher-kek", flags)
    except (AttributeError, OSError):
        f = tempfile.TemporaryFile()  # unlinked at once, 0600
        fd = os.dup(f.fileno())
        f.close()
        os.set_inheritable(fd, inheritable)
    try:
        view = memoryview(raw)
        while view:
            view = view[os.write(fd, view):]
    finally:
        del raw
    seals = sum(getattr(fcntl, n, 0) for n in ("F_SEAL_SHRINK", "F_SEAL_GROW", "F_SEAL_WRITE", "F_SEAL_SEAL"))
    if seals and hasattr(fcntl, "F_ADD_SEALS"):
        try:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        except OSError:
            pass
    return fd


class KMSSupervisor:
    """Runs ``workers`` KMS processes; ``client`` talks to whichever are live."""

    def __init__(
        self,
        *,
        kms_dir: str | os.PathLike[str],
        kek: KEKSettings,
        workers: int = 1,
        backend: str = "auto",
        destroy_delay: float = DEFAULT_DESTROY_DELAY,
        request_timeout: float | None = 30.0,
        restart_backoff: float = 0.1,
        restart_backoff_max: float = 10.0,
        backoff_reset_after: float = 30.0,
        start_timeout: float = 30.0,
        stop_grace: float = 2.0,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        max_batch: int = DEFAULT_MAX_BATCH,
        cache_size: int = 1024,
        sweep_interval: float = 60.0,
        on_restart: RestartHook | None = None,
        on_op: OpHook | None = None,
        python: str = sys.executable,
        worker_user: RunAs | None = None,
        handoff: HandoffHook | None = None,
        kek_fd: int | None = None,
        storage: KMSStorageSettings | None = None,
    ) -> None:
        if workers < 1:
            raise ConfigError("kms.workers must be at least 1 here (resolve 0 with default_worker_count())")
        self.kms_dir = os.path.abspath(os.fspath(kms_dir))
        self.kek = kek
        self.workers = workers
        self.backend = backend
        self.destroy_delay = destroy_delay
        self.restart_backoff = restart_backoff
        self.restart_backoff_max = restart_backoff_max
        self.backoff_reset_after = backoff_reset_after
        self.start_timeout = start_timeout
        self.stop_grace = stop_grace
        self.max_frame_size = max_frame_size
        self.max_batch = max_batch
        self.cache_size = cache_size
        self.sweep_interval = sweep_interval
        self.on_restart = on_restart
        self.python = python
        self.worker_user = worker_user
        self.handoff = handoff
        self.kek_fd = kek_fd  # provider env: a memfd with the KEK, already out of the environment
        self.storage = storage  # storage.backend postgresql: the DSN goes to the workers in HELLO only
        self.stopping = False  # set by the owner at shutdown: workers then end without a restart
        self.client = KMSClient(request_timeout=request_timeout, on_op=on_op)
        self.restarts = 0
        self.pids: dict[int, int] = {}  # worker index -> pid of the live process
        self.info: dict[int, dict[str, Value]] = {}  # worker index -> its READY facts
        self._kek_fd: int | None = None
        self._changed = trio.Event()
        self._first: list[trio.Event] = []
        self._first_failure: dict[int, _Ended] = {}

    def __repr__(self) -> str:
        return (
            f"<KMSSupervisor workers={self.workers} live={self.client.live_workers} restarts={self.restarts}>"
        )

    @property
    def ready(self) -> bool:
        return self.client.ready

    async def wait_live(self, count: int | None = None) -> None:
        """Wait until ``count`` workers (default: all) are live."""
        want = self.workers if count is None else count
        while self.client.live_workers < want:
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # ---- run ----

    async def run(self, *, task_status: trio.TaskStatus[KMSSupervisor] = trio.TASK_STATUS_IGNORED) -> None:
        secret_env = self.kek.secret_env  # provider env's KEK, or provider pkcs11's PIN variable
        if secret_env is not None:
            if self.kek_fd is not None:  # stashed before this process re-executed itself
                self._kek_fd, self.kek_fd = self.kek_fd, None
                os.set_inheritable(self._kek_fd, False)
            else:
                option = "kms.kek.env" if self.kek.provider == "env" else "kms.kek.pkcs11_pin_env"
                self._kek_fd = stash_env_kek(secret_env, option=option)
        elif self.kek.provider == "file" and not self.kek.file:
            raise ConfigError("kms.kek: provider 'file' needs kms.kek.file; or use provider 'env'")
        elif self.kek.provider == "pkcs11" and not self.kek.pkcs11_pin_file:
            raise ConfigError("kms.kek: provider 'pkcs11' needs pkcs11_pin_file or pkcs11_pin_env")
        self._first = [trio.Event() for _ in range(self.workers)]
        fatal: _Ended | None = None
        try:
            async with trio.open_nursery() as nursery:
                for i in range(self.workers):
                    nursery.start_soon(self._slot, i)
                nursery.start_soon(self.client.watchdog)
                for ev in self._first:
                    await ev.wait()
                if self._first_failure:
                    fatal = self._first_failure[min(self._first_failure)]
                    nursery.cancel_scope.cancel()
                else:
                    log.info("KMS ready", extra={"fields": {"workers": self.workers}})
                    task_status.started(self)
        finally:
            if self._kek_fd is not None:
                os.close(self._kek_fd)
                self._kek_fd = None
        if fatal is not None:
            code = f" (exit code {fatal.exit_code})" if fatal.exit_code not in (None, 2) else ""
            raise ConfigError(f"the KMS did not start: {fatal.message}{code}")

    async def _slot(self, index: int) -> None:
        backoff = self.restart_backoff
        first = True
        while True:
            started = trio.current_time()
            ended = await self._run_worker(index, first)
            if self.stopping:
                return
            if first and not self._first[index].is_set():
                self._first_failure[index] = ended
                self._first[index].set()
                return
            first = False
            self.restarts += 1
            (log.error if ended.kind == "fatal" else log.warning)(
                "KMS worker stopped; restarting",
                extra={"fields": {"worker": index, "reason": ended.message, "exit_code": ended.exit_code,
                                  "backoff_s": backoff}},
            )
            if self.on_restart is not None:
                self.on_restart(index, ended.exit_code)
            if trio.current_time() - started >= self.backoff_reset_after:
                backoff = self.restart_backoff
            await trio.sleep(backoff)
            backoff = min(backoff * 2, self.restart_backoff_max)

    def _hello_config(self, index: int) -> dict[str, Value]:
        kek: dict[str, Value] = {"provider": self.kek.provider, "env": self.kek.env}
        if self.kek.provider == "file":
            kek["path"] = os.path.abspath(self.kek.file or "")
        elif self.kek.provider == "pkcs11":  # where the PIN is, never the PIN (it is in --kek-fd or a file)
            k = self.kek
            pin_file = None if k.pkcs11_pin_file is None else os.path.abspath(k.pkcs11_pin_file)
            kek.update({"module": k.pkcs11_module, "token_label": k.pkcs11_token_label,
                        "key_label": k.pkcs11_key_label, "pin_env": k.pkcs11_pin_env, "pin_file": pin_file})
        cfg: dict[str, Value] = {
            "dir": self.kms_dir,
            "kek": kek,
            "backend": self.backend,
            "destroy_delay": float(self.destroy_delay),
            "max_frame_size": self.max_frame_size,
            "max_batch": self.max_batch,
            "cache_size": self.cache_size,
            "sweep_interval": float(self.sweep_interval),
            "worker": index,
        }
        if self.storage is not None:  # the key store is PostgreSQL (kms.dir then holds no key)
            cfg["storage"] = dict(self.storage.hello())
        return cfg

    async def _run_worker(self, index: int, first: bool) -> _Ended:
        """One life of worker ``index``: spawn, bootstrap, serve until it dies or we stop."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        token = secrets.token_bytes(32)
        conn = ClientConnection(token, self.max_frame_size)
        try:
            proc = await self._spawn(child)
        except OSError as exc:
            parent.close()
            return _Ended("failed", f"cannot start {self.python!r}: {exc.strerror}")
        finally:
            child.close()
        channel: WorkerChannel | None = None
        ended = _Ended("stopped", "the supervisor stopped")
        # The stderr relay runs until the worker's stderr closes, i.e. until the process is gone;
        # the body always ends by reaping the process (shielded), so the nursery can close.
        async with trio.open_nursery() as nursery:
            assert proc.stderr is not None
            nursery.start_soon(self._relay_stderr, proc.stderr, index)
            try:
                parent.setblocking(False)
                outcome = await self._bootstrap(parent, conn, index)
                if isinstance(outcome, _Ended):
                    ended = outcome
                elif self.handoff is not None:
                    self.pids[index] = proc.pid
                    self.info[index] = outcome.info
                    if first:  # started: the hand-over may wait for a gateway that starts after us
                        self._first[index].set()
                    await self.handoff(WorkerHandoff(index, proc.pid, token, outcome.info, parent,
                                                     self.max_frame_size))
                    parent.close()  # the other process holds the only end now: its EOF ends the worker
                    self._notify()
                    await proc.wait()
                    ended = _Ended("died", "the worker exited")
                else:
                    self.pids[index] = proc.pid
                    self.info[index] = outcome.info
                    channel = WorkerChannel(index, parent, conn, pid=proc.pid)
                    self.client._attach(channel)
                    if first:
                        self._first[index].set()
                    self._notify()
                    await channel.run()
                    ended = _Ended("died", channel.death_reason or "the worker stopped")
            finally:
                with trio.CancelScope(shield=True):
                    self.pids.pop(index, None)
                    if channel is not None:
                        channel.close()  # fails whatever is still in flight, leaves the client
                    self._notify()
                    code = await self._reap(proc, parent)
        if ended.kind != "fatal":
            ended = _Ended(ended.kind, ended.message, code)
        return ended

    async def _spawn(self, child: socket.socket) -> trio.Process:
        """Start a worker process holding ``child`` (and the KEK descriptor, if there is one)."""
        cmd = [self.python, "-m", WORKER_MODULE, "--fd", str(child.fileno())]
        if self.worker_user is not None:
            cmd += ["--user", self.worker_user.arg()]
        pass_fds = [child.fileno()]
        if self._kek_fd is not None:
            cmd += ["--kek-fd", str(self._kek_fd)]
            pass_fds.append(self._kek_fd)
        return await trio.lowlevel.open_process(
            cmd, pass_fds=pass_fds, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, start_new_session=True,  # a terminal's Ctrl-C is for the gateway
        )

    def kill(self, pid: int) -> bool:
        """SIGKILL the live worker ``pid`` (one of ours only); its slot restarts it."""
        if pid not in self.pids.values():
            return False
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return False
        return True

    async def _bootstrap(self, sock: socket.socket, conn: ClientConnection, index: int) -> Ready | _Ended:
        """Send HELLO (token + settings), wait for READY or the worker's fatal ERROR."""
        hello = conn.hello(self._hello_config(index))
        with trio.move_on_after(self.start_timeout):
            view = memoryview(hello)
            while view:
                await trio.lowlevel.wait_writable(sock)
                try:
                    view = view[sock.send(view):]
                except BlockingIOError:
                    continue
                except OSError:
                    return _Ended("failed", "the worker exited during start-up")
            while True:
                try:
                    event = conn.next_event()
                except ProtocolError as exc:
                    return _Ended("failed", f"bad bootstrap answer from the worker: {exc.message}")
                if isinstance(event, Ready):
                    return event
                if isinstance(event, Error):
                    return _Ended("fatal", event.message)
                if event is not NEED_DATA:
                    return _Ended("failed", "the worker exited during start-up")
                await trio.lowlevel.wait_readable(sock)
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                conn.receive_data(data)
        return _Ended("failed", f"the worker did not become ready within {self.start_timeout:g} s")

    async def _reap(self, proc: trio.Process, sock: socket.socket) -> int | None:
        """Close our end (the worker exits on EOF), wait a little, then kill."""
        if sock.fileno() != -1:
            trio.lowlevel.notify_closing(sock)
            sock.close()
        if proc.returncode is None:
            with trio.move_on_after(self.stop_grace):
                await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        return proc.returncode

    async def _relay_stderr(self, stream: trio.abc.ReceiveStream, index: int) -> None:
        """Re-log the worker's stderr lines; runs (shielded) until the worker's stderr closes,
        so that its last words at shutdown are not lost."""
        with trio.CancelScope(shield=True):
            await self._relay_lines(stream, index)

    async def _relay_lines(self, stream: trio.abc.ReceiveStream, index: int) -> None:
        buf = b""
        try:
            while True:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    self._emit(line, index)
                if len(buf) > 65536:  # a line that never ends: cut it
                    self._emit(buf, index)
                    buf = b""
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            if buf:
                self._emit(buf, index)
            await stream.aclose()

    def _emit(self, line: bytes, index: int) -> None:
        text = line.decode("utf-8", "replace").strip()
        if not text:
            return
        try:
            obj: Any = json.loads(text)
            if type(obj) is not dict:
                raise ValueError
        except ValueError:
            worker_log.warning("KMS worker output", extra={"fields": {"worker": index, "line": text[:1000]}})
            return
        level = _LEVELS.get(str(obj.pop("level", "info")), logging.INFO)
        msg = str(obj.pop("msg", ""))
        for k in ("ts", "logger"):
            obj.pop(k, None)
        obj["worker"] = index
        worker_log.log(level, msg, extra={"fields": obj})


@asynccontextmanager
async def open_kms(**settings: Any) -> AsyncIterator[KMSSupervisor]:
    """Run a :class:`KMSSupervisor` for the duration of the block (tests, tools)."""
    supervisor = KMSSupervisor(**settings)
    error: Exception | None = None  # raised after the nursery closes, not wrapped in a group
    async with trio.open_nursery() as nursery:
        try:
            await nursery.start(_run_supervisor, supervisor)
        except Exception as exc:
            error = exc
        else:
            try:
                yield supervisor
            except Exception as exc:
                error = exc
            finally:
                nursery.cancel_scope.cancel()
    if error is not None:
        raise error


async def _run_supervisor(supervisor: KMSSupervisor, *, task_status: trio.TaskStatus[KMSSupervisor]) -> None:
    await supervisor.run(task_status=task_status)


__all__ = [
    "WORKER_MODULE", "HandoffHook", "KEKSettings", "KMSSupervisor", "WorkerHandoff", "default_worker_count",
    "open_kms", "stash_env_kek",
]
