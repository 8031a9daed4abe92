"""The gateway's KMS client: async calls over the worker socketpairs.  Gateway side (trio).

Theory of operation
===================

The supervisor (``kms/launcher/supervisor.py``) owns the worker processes; for each live, bootstrapped
worker it hands this client a :class:`WorkerChannel`: the gateway's end of that worker's
socketpair (a non-blocking stdlib socket) and a :class:`~qpher_proxy.kms.wire.protocol.ClientConnection`
holding that start's service token.

A call (``await client.sign(ctx, key_id, msg)``):

1. picks the live worker with the fewest requests outstanding (ties: the first), or fails at
   once with 503 ``kms_unavailable`` if none is live -- a request never waits for a restart;
2. encodes one REQUEST frame (token + tenant context + op + args; see protocol.py). If it is
   the only request in flight on that worker it goes to the socket at once (lowest latency);
   otherwise it is queued, and the channel's writer task sends everything queued during this
   scheduling round in one system call (under load, about half the gateway's cost per call);
3. parks the calling task (``wait_task_rescheduled``) keyed by the frame's request id. There
   is no cancel scope per call: the client's ``watchdog`` fails requests older than
   ``request_timeout`` (to a tenth of it) with ``kms_unavailable``; a caller may still wrap a
   call in its own scope.
4. if that request is the only one in flight on the worker, wakes the channel's *spinner*: a
   task that keeps the event loop turning (a scheduler checkpoint at a time, so every other
   task and every ready socket is still served in between) until the answer arrives or
   ``spin`` seconds (default 200 us) have passed, whichever is first. Without it the gateway
   goes to sleep in ``epoll_wait`` the moment it has sent the request, and the answer, a
   signature later, has to wake it again: on a virtual machine waking an idle CPU costs tens
   of microseconds, and the caches it then runs with are cold (the worker may have run on that
   CPU meanwhile). Measured end to end at concurrency 1 (HTTPS ``/v1/sign`` and
   ``/v1/kem/decapsulate``, liboqs), the spin takes ~40-80 us off the p50 for at most ``spin``
   of gateway CPU per call.

   The spin is skipped for an operation whose spun round trips average ``spin`` or more
   (``_LoneTrips``): a slow backend's signature, a key creation, or a machine so busy that the
   answer does not come back within the spin. There it would only burn a CPU, which the
   worker may need (a spinning CPU is not an idle one the scheduler can hand the woken worker);
   every 256th lone call of such an operation spins again, to notice when that changes. (With
   the other CPUs busy, a spun round trip that still fits can itself be slower: +30-45 us for a
   signature in ``bench kms``; end to end that measured neutral.) The
   spin never runs with two requests in flight (the loop is busy then anyway), never when
   nothing is in flight, and never longer than ``spin``; ``KMSClient(spin=0)`` turns it off.

The channel's reader task reads whatever arrived, feeds it to the protocol, and for each
RESPONSE or ERROR frame wakes the task waiting on that request id with its value or with the
error rebuilt as the matching :class:`~qpher_proxy.errors.QpherError` (same code, status and
safe message as in the KMS; see :data:`KMS_ERRORS`). A worker that dies -- EOF on the socket,
a malformed frame -- leaves the client at once and wakes every task it owed an answer with
``kms_unavailable``; a cancelled caller just forgets its request id (a late answer for it is
dropped). Only a request too large for a frame is the caller's fault (413 ``body_too_large``).

Nothing here ever sees a private key: the operations return public keys, ciphertexts,
signatures, shared secrets and plaintexts, which the API layer hands to the client that asked.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, cast

import outcome
import trio

from ...context import TenantContext
from ...errors import (
    AlgorithmMismatch,
    BackendUnavailable,
    BadRequest,
    BatchTooLarge,
    BodyTooLarge,
    CheckpointInconsistent,
    ConfigError,
    CryptoError,
    DecryptionFailed,
    ImportJobExpired,
    ImportJobNotFound,
    InvalidBase64,
    InvalidCiphertext,
    InvalidContext,
    InvalidInput,
    InvalidKey,
    InvalidKeyMaterial,
    InvalidKeyState,
    InvalidWrappedKey,
    KeyCorrupt,
    KeyDestroyed,
    KeyDisabled,
    KeyNotFound,
    KeyUnavailable,
    KMSUnavailable,
    NotFound,
    QpherError,
    UnknownAlgorithm,
)
from ..wire.model import DEFAULT_LIST_LIMIT, KeyInfo, KeyPage
from ..wire.protocol import NEED_DATA, ClientConnection, Error, FrameTooLarge, ProtocolError, Response, Value

log = logging.getLogger("qpher.kms.client")

RECV_BYTES = 256 * 1024
DEFAULT_SPIN = 200e-6  # seconds the loop stays awake for a lone request's answer (see point 4 above)
_MAX_OPS_TRACKED = 64
_EXPLORE_EVERY = 256
_EWMA = 0.125
SPLIT_MIN_ITEMS = 8  # a batch is shared among idle workers in chunks of at least this many items

OpHook = Callable[[str, float, "str | None"], None]  # (op, seconds, error code or None)


# The errors a KMS worker answers with, rebuilt on this side as the same class so that gateway
# code can catch them by type (``except KeyNotFound``). An explicit table rather than a walk over
# ``QpherError.__subclasses__()``: only classes whose constructor takes just a message can be
# rebuilt from (code, status, message); an error carrying more (``PolicyDenied``'s rule,
# ``RateLimited``'s Retry-After) never comes from the KMS, and any code not listed here becomes
# a plain ``QpherError`` with the KMS's code, status and message.
KMS_ERRORS: Mapping[str, type[QpherError]] = MappingProxyType({cls.code: cls for cls in (
    BadRequest, InvalidInput, NotFound, ConfigError, BodyTooLarge, InvalidBase64, BatchTooLarge,
    CryptoError, UnknownAlgorithm, InvalidKey, InvalidCiphertext, InvalidContext, AlgorithmMismatch,
    DecryptionFailed, BackendUnavailable,
    KMSUnavailable, KeyNotFound, KeyDisabled, KeyDestroyed, InvalidKeyState, KeyUnavailable, KeyCorrupt,
    ImportJobNotFound, ImportJobExpired, InvalidWrappedKey, InvalidKeyMaterial, CheckpointInconsistent,
)})


def error_from_frame(code: str, status: int, message: str) -> QpherError:
    """Rebuild the KMS's error on this side: the class of :data:`KMS_ERRORS` for ``code`` when
    its status matches too, else a plain :class:`QpherError` with that code and status."""
    cls = KMS_ERRORS.get(code)
    if cls is not None and cls.status == status:
        return cls(message)
    return QpherError(message, code=code, status=status)


class _LoneTrips:
    """One operation's spun round trips (alone in flight, with the spin): a moving average,
    and :meth:`choose`, which says whether the next lone call of it should spin."""

    __slots__ = ("spun", "count")

    def __init__(self) -> None:
        self.spun: float | None = None
        self.count = 0

    def choose(self, budget: float) -> bool:
        self.count += 1
        if self.spun is None or self.spun < budget:
            return True  # unknown yet, or the spin usually catches the answer
        # too slow for the spin (a slow backend, a key creation, a busy machine): spin again
        # only every EXPLORE_EVERY-th time, to notice when that changes
        return self.count % _EXPLORE_EVERY == 0

    def note(self, seconds: float) -> None:
        self.spun = seconds if self.spun is None else self.spun + (seconds - self.spun) * _EWMA


class WorkerChannel:
    """The gateway's end of one worker's socketpair, after a successful bootstrap."""

    def __init__(
        self, index: int, sock: socket.socket | None, conn: ClientConnection, pid: int | None = None
    ) -> None:
        """``sock``: the worker's socketpair end; None for a subclass with its own transport
        (``remote.TLSChannel``), which then overrides ``send``, ``_writer``, ``_reader``, ``run``."""
        if sock is not None:
            sock.setblocking(False)
        self.index = index
        self.pid = pid
        # None only for a subclass whose overrides never touch it (``remote.TLSChannel``)
        self.sock: socket.socket = cast(socket.socket, sock)
        self.conn = conn
        self.inflight: dict[int, tuple[trio.lowlevel.Task, int]] = {}  # rid -> (task, watchdog tick at send)
        self.alive = True
        self._out: list[bytes | memoryview] = []
        self._wake_writer = trio.Event()
        self._spinner: trio.lowlevel.Task | None = None  # the spinner task while it is parked
        self._spin_rid = 0  # the request the spinner waits for ...
        self._spin_until = 0.0  # ... until this perf_counter() time at the latest
        self.death_reason = ""
        self.on_close: Callable[[WorkerChannel], None] | None = None
        # remote KMS nodes (remote.py): each answer's (op, seconds, error code or None), per endpoint
        self.observe: OpHook | None = None

    def __repr__(self) -> str:
        return (f"<WorkerChannel index={self.index} pid={self.pid} alive={self.alive} "
                f"inflight={len(self.inflight)}>")

    # ---- sending ----

    def send(self, frame: bytes) -> None:
        """Queue ``frame``. Alone in flight: straight to the socket (lowest latency). Otherwise
        the writer task sends everything queued in this scheduling round in one system call
        (under load this halves the gateway's per-request cost)."""
        if self._out or len(self.inflight) > 1:
            if not self._out:
                self._wake_writer.set()
            self._out.append(frame)
            return
        try:
            n = self.sock.send(frame)
        except BlockingIOError:
            n = 0
        except OSError:
            n = 0  # the reader will see the end of the stream and fail everything
        if n < len(frame):
            self._out.append(memoryview(frame)[n:])
            self._wake_writer.set()

    # ---- spinning ----

    def spin_for(self, rid: int, seconds: float) -> None:
        """Keep the event loop awake until ``rid`` is answered, for ``seconds`` at most."""
        self._spin_rid = rid
        self._spin_until = time.perf_counter() + seconds
        spinner = self._spinner
        if spinner is not None:
            self._spinner = None
            trio.lowlevel.reschedule(spinner)

    async def _spin(self) -> None:
        inflight = self.inflight
        perf = time.perf_counter
        checkpoint = trio.lowlevel.cancel_shielded_checkpoint
        wait = trio.lowlevel.wait_task_rescheduled
        me = trio.lowlevel.current_task()

        def abort(_: Any) -> trio.lowlevel.Abort:
            self._spinner = None  # cancelled (the channel is closing): nobody may wake it now
            return trio.lowlevel.Abort.SUCCEEDED

        while True:
            self._spinner = me
            await wait(abort)
            # each checkpoint is one turn of trio's loop: other runnable tasks run, and the
            # loop polls (without sleeping) for I/O, the reader's socket included
            while self._spin_rid in inflight and perf() < self._spin_until:
                await checkpoint()

    async def _writer(self) -> None:
        while True:
            await self._wake_writer.wait()
            self._wake_writer = trio.Event()
            while self._out:
                await trio.lowlevel.wait_writable(self.sock)
                chunk: bytes | memoryview = self._out[0] if len(self._out) == 1 else b"".join(self._out)
                try:
                    n = self.sock.send(chunk)
                except BlockingIOError:
                    continue
                except OSError:
                    return
                self._out.clear()
                if n < len(chunk):
                    self._out.append(memoryview(chunk)[n:])

    # ---- receiving ----

    async def _reader(self) -> None:
        sock = self.sock
        conn = self.conn
        # One receive buffer for the channel's life rather than a fresh 256 KiB bytes object
        # per ``recv`` (allocated, then shrunk to what arrived); the protocol copies what it keeps.
        rbuf = bytearray(RECV_BYTES)
        rview = memoryview(rbuf)
        while True:
            await trio.lowlevel.wait_readable(sock)
            try:
                n = sock.recv_into(rbuf)
            except BlockingIOError:
                continue
            except OSError:
                n = 0
            conn.receive_data(rview[:n])
            if not self._deliver() or not n:
                self.death_reason = self.death_reason or "the worker closed its end"
                return

    def _deliver(self) -> bool:
        """Wake the callers whose answers the received bytes complete; False once the
        connection is over (``death_reason`` says why)."""
        conn = self.conn
        inflight = self.inflight
        reschedule = trio.lowlevel.reschedule
        while True:
            try:
                event = conn.next_event()
            except ProtocolError as exc:
                self.death_reason = f"protocol error: {exc.message}"
                return False
            if event is NEED_DATA:
                return True
            if isinstance(event, Response):
                entry = inflight.pop(event.rid, None)
                if entry is not None:
                    reschedule(entry[0], outcome.Value(event.value))
            elif isinstance(event, Error):
                if event.rid == 0:
                    self.death_reason = f"worker reported {event.code}: {event.message}"
                    return False
                entry = inflight.pop(event.rid, None)
                if entry is not None:
                    reschedule(
                        entry[0], outcome.Error(error_from_frame(event.code, event.status, event.message))
                    )
            else:  # ConnectionClosed: the only other event a serving client connection yields
                self.death_reason = "the worker closed its end"
                return False

    async def run(self) -> None:
        """Serve until the worker's stream ends; then fail whatever is still in flight."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer)
                nursery.start_soon(self._spin)
                await self._reader()
                # Retired at once, with no checkpoint after the reader saw the end: cancelling
                # the writer and the spinner takes a scheduling round, and a request that picked
                # this channel meanwhile would meet a closed connection.
                self._retire()
                nursery.cancel_scope.cancel()
        finally:
            self.close()

    def _retire(self) -> None:
        """Leave the client and fail whatever is in flight (idempotent, synchronous)."""
        self.alive = False
        if self.on_close is not None:
            self.on_close(self)
            self.on_close = None
        pending = list(self.inflight.values())
        self.inflight.clear()
        for task, _sent in pending:
            trio.lowlevel.reschedule(
                task, outcome.Error(KMSUnavailable("the KMS worker handling this request stopped"))
            )

    def close(self) -> None:
        """Synchronous, so no request can pick this channel between its death and its detach."""
        self._retire()
        sock: socket.socket | None = self.sock
        if sock is not None and sock.fileno() != -1:
            trio.lowlevel.notify_closing(sock)
            sock.close()


class KMSClient:
    """Async access to the KMS workers. Every call takes the request's :class:`TenantContext`."""

    def __init__(
        self, *, request_timeout: float | None = 30.0, on_op: OpHook | None = None, spin: float = DEFAULT_SPIN
    ) -> None:
        self._live: list[WorkerChannel] = []
        self.request_timeout = request_timeout
        self.on_op = on_op
        self.spin = spin  # seconds; 0 = never keep the loop awake for an answer
        self._lone: dict[str, _LoneTrips] = {}  # op -> its spun round trips
        self._tick = 0  # advanced by watchdog()

    # ---- supervisor interface ----

    def _attach(self, channel: WorkerChannel) -> None:
        channel.on_close = self._detach
        self._live.append(channel)

    def _detach(self, channel: WorkerChannel) -> None:
        if channel in self._live:
            self._live.remove(channel)

    @property
    def ready(self) -> bool:
        """True while at least one worker is live (``/readyz``)."""
        return bool(self._live)

    @property
    def live_workers(self) -> int:
        return len(self._live)

    # ---- the call ----

    async def call(self, ctx: TenantContext, op: str, args: dict[str, Value]) -> Value:
        """One raw operation; raises the KMS's error as a :class:`QpherError`."""
        hook = self.on_op
        t0 = time.perf_counter() if hook is not None else 0.0
        live = self._live
        if not live:
            if hook is not None:
                hook(op, 0.0, KMSUnavailable.code)
            raise KMSUnavailable("no KMS worker is running")
        w = live[0]
        if len(live) > 1:  # least outstanding requests; ties go to the first
            n = len(w.inflight)
            for other in live:
                m = len(other.inflight)
                if m < n:
                    w, n = other, m
        try:
            rid, frame = w.conn.request(ctx, op, args)
        except (ProtocolError, TypeError, ValueError) as exc:
            raise self._unsendable(op, t0, exc) from exc
        observe = w.observe
        if observe is not None:
            return await self._observed(w, observe, rid, frame, op)
        inflight = w.inflight
        spin = self.spin
        lone: _LoneTrips | None = None
        if not inflight and spin > 0:  # alone in flight: spin for the answer?
            lone = self._lone.get(op)
            if lone is None:
                lone = self._lone_trips(op)
            if not lone.choose(spin):
                lone = None
        # nothing between registering the request and parking may raise
        inflight[rid] = (trio.lowlevel.current_task(), self._tick)
        w.send(frame)
        t1 = 0.0
        if lone is not None:
            w.spin_for(rid, spin)
            t1 = time.perf_counter()

        def abort(_: Any) -> trio.lowlevel.Abort:
            inflight.pop(rid, None)
            return trio.lowlevel.Abort.SUCCEEDED

        try:
            value: Value = await trio.lowlevel.wait_task_rescheduled(abort)
        except QpherError as exc:
            if lone is not None:
                lone.note(time.perf_counter() - t1)
            if hook is not None:
                hook(op, time.perf_counter() - t0, exc.code)
            raise
        if lone is not None:
            lone.note(time.perf_counter() - t1)
        if hook is not None:
            hook(op, time.perf_counter() - t0, None)
        return value

    async def _observed(self, w: WorkerChannel, observe: OpHook, rid: int, frame: bytes, op: str) -> Value:
        """A call on a channel that reports each answer (a remote node's connection): no spin --
        the answer crosses a network, the loop has other work meanwhile."""
        hook = self.on_op
        t0 = time.perf_counter()
        try:
            value = await self._send_and_wait(w, rid, frame)
        except QpherError as exc:
            seconds = time.perf_counter() - t0
            observe(op, seconds, exc.code)
            if hook is not None:
                hook(op, seconds, exc.code)
            raise
        seconds = time.perf_counter() - t0
        observe(op, seconds, None)
        if hook is not None:
            hook(op, seconds, None)
        return value

    async def _send_and_wait(self, w: WorkerChannel, rid: int, frame: bytes) -> Value:
        inflight = w.inflight
        inflight[rid] = (trio.lowlevel.current_task(), self._tick)
        w.send(frame)

        def abort(_: Any) -> trio.lowlevel.Abort:
            inflight.pop(rid, None)
            return trio.lowlevel.Abort.SUCCEEDED

        value: Value = await trio.lowlevel.wait_task_rescheduled(abort)
        return value

    async def call_on(self, w: WorkerChannel, ctx: TenantContext, op: str, args: dict[str, Value]) -> Value:
        """One operation on that channel (health checks of one connection); no hooks, no spin."""
        if not w.alive:
            raise KMSUnavailable("that KMS connection is closed")
        try:
            rid, frame = w.conn.request(ctx, op, args)
        except (ProtocolError, TypeError, ValueError) as exc:
            raise self._unsendable(op, 0.0, exc) from exc
        return await self._send_and_wait(w, rid, frame)

    def _unsendable(self, op: str, t0: float, exc: ProtocolError | TypeError | ValueError) -> QpherError:
        """What :meth:`call` raises for a request its connection refused to encode (nothing was sent)."""
        hook = self.on_op
        if isinstance(exc, FrameTooLarge):
            if hook is not None:
                hook(op, time.perf_counter() - t0, BodyTooLarge.code)
            return BodyTooLarge(f"the request is too large for the KMS ({exc.message})")
        if isinstance(exc, ProtocolError):
            # The connection is no longer serving (its worker died or sent garbage). The reader
            # retires a channel the moment it sees that, so this is a backstop, and it is what
            # it means: the worker is gone, not the request at fault.
            if hook is not None:
                hook(op, time.perf_counter() - t0, KMSUnavailable.code)
            return KMSUnavailable("the KMS worker for this request stopped")
        # a gateway bug (no tenant in the context, an unencodable value); the text names only
        # the field, never its value
        return QpherError(f"bad KMS request: {exc}", code="internal_error", status=500)

    def _lone_trips(self, op: str) -> _LoneTrips:
        if len(self._lone) >= _MAX_OPS_TRACKED:  # op names come from our code; this is a backstop
            self._lone.clear()
        lone = self._lone[op] = _LoneTrips()
        return lone

    async def watchdog(self) -> None:
        """Fail requests older than ``request_timeout`` (run by the supervisor).

        A clock that ticks ten times per timeout (at most once a second): each request notes
        the tick it was sent at, and a request ten ticks old is failed. One attribute read per
        request instead of a cancel scope per request, which cost as much as the rest of the
        client's work per call. Timeouts are therefore accurate to a tenth."""
        timeout = self.request_timeout
        if timeout is None:
            return
        interval = min(1.0, timeout / 10)
        ticks = max(1, round(timeout / interval))
        while True:
            await trio.sleep(interval)
            self._tick += 1
            oldest = self._tick - ticks
            for w in list(self._live):
                late = [rid for rid, (_task, sent) in w.inflight.items() if sent <= oldest]
                for rid in late:
                    task, _sent = w.inflight.pop(rid)
                    trio.lowlevel.reschedule(
                        task, outcome.Error(KMSUnavailable(f"the KMS did not answer within {timeout:g} s"))
                    )

    # ---- lifecycle ----

    async def create_key(
        self, ctx: TenantContext, algorithm: str | None = None, kind: str | None = None,
        label: str | None = None, mode: str | None = None, *, idempotency_key: str | None = None,
    ) -> KeyInfo:
        args: dict[str, Value] = {"algorithm": algorithm, "kind": kind, "label": label, "mode": mode}
        if idempotency_key is not None:
            args["idempotency_key"] = idempotency_key
        return KeyInfo.from_wire(await self.call(ctx, "create_key", args))

    async def get_key(self, ctx: TenantContext, key_id: str, version: int | None = None) -> KeyInfo:
        return KeyInfo.from_wire(await self.call(ctx, "get_key", {"key_id": key_id, "version": version}))

    async def list_keys(
        self, ctx: TenantContext, limit: int = DEFAULT_LIST_LIMIT, cursor: str | None = None
    ) -> KeyPage:
        v: Any = await self.call(ctx, "list_keys", {"limit": limit, "cursor": cursor})
        return KeyPage(tuple(KeyInfo.from_wire(k) for k in v["keys"]), v["next_cursor"])

    async def rotate_key(
        self, ctx: TenantContext, key_id: str, *, idempotency_key: str | None = None
    ) -> KeyInfo:
        args: dict[str, Value] = {"key_id": key_id}
        if idempotency_key is not None:
            args["idempotency_key"] = idempotency_key
        return KeyInfo.from_wire(await self.call(ctx, "rotate_key", args))

    # ---- key import (BYOK) ----

    async def create_import_job(
        self, ctx: TenantContext, method: str, ttl_seconds: int | None = None
    ) -> dict[str, Any]:
        """A new import job: ``{import_job_id, method, public_key, created_at, expires_at, state}``."""
        v: Any = await self.call(ctx, "create_import_job", {"method": method, "ttl_seconds": ttl_seconds})
        return dict(v)

    async def get_import_job(self, ctx: TenantContext, job_id: str) -> dict[str, Any]:
        v: Any = await self.call(ctx, "get_import_job", {"import_job_id": job_id})
        return dict(v)

    async def list_import_jobs(
        self, ctx: TenantContext, limit: int = DEFAULT_LIST_LIMIT, cursor: str | None = None
    ) -> dict[str, Any]:
        """``{"jobs": [job, ...], "next_cursor": str | None}``."""
        v: Any = await self.call(ctx, "list_import_jobs", {"limit": limit, "cursor": cursor})
        return {"jobs": [dict(j) for j in v["jobs"]], "next_cursor": v["next_cursor"]}

    async def import_key(
        self, ctx: TenantContext, job_id: str, algorithm: str, wrapped_key: bytes, *, format: str = "seed",
        label: str | None = None, key_id: str | None = None, idempotency_key: str | None = None,
    ) -> KeyInfo:
        """A key (or, with ``key_id``, a new version of it) from key material wrapped for the job;
        answered like :meth:`create_key`, with ``origin`` "imported" and the job id."""
        args: dict[str, Value] = {
            "import_job_id": job_id, "algorithm": algorithm, "wrapped_key": wrapped_key, "format": format,
            "label": label, "key_id": key_id,
        }
        if idempotency_key is not None:
            args["idempotency_key"] = idempotency_key
        return KeyInfo.from_wire(await self.call(ctx, "import_key", args))

    async def disable_key(self, ctx: TenantContext, key_id: str) -> KeyInfo:
        return KeyInfo.from_wire(await self.call(ctx, "disable_key", {"key_id": key_id}))

    async def enable_key(self, ctx: TenantContext, key_id: str) -> KeyInfo:
        return KeyInfo.from_wire(await self.call(ctx, "enable_key", {"key_id": key_id}))

    async def schedule_destroy(self, ctx: TenantContext, key_id: str, delay: float | None = None) -> KeyInfo:
        return KeyInfo.from_wire(await self.call(ctx, "schedule_destroy", {"key_id": key_id, "delay": delay}))

    async def cancel_destroy(self, ctx: TenantContext, key_id: str) -> KeyInfo:
        return KeyInfo.from_wire(await self.call(ctx, "cancel_destroy", {"key_id": key_id}))

    # ---- crypto ----

    async def encapsulate(self, ctx: TenantContext, key_id: str) -> tuple[bytes, bytes, int]:
        """Returns ``(shared_secret, ciphertext, key_version)``."""
        v: Any = await self.call(ctx, "encapsulate", {"key_id": key_id})
        return v["shared_secret"], v["ciphertext"], v["version"]

    async def decapsulate(
        self, ctx: TenantContext, key_id: str, ciphertext: bytes, version: int | None = None
    ) -> bytes:
        v: Any = await self.call(
            ctx, "decapsulate", {"key_id": key_id, "ciphertext": ciphertext, "version": version}
        )
        return v["shared_secret"]  # type: ignore[no-any-return]

    async def sign(
        self, ctx: TenantContext, key_id: str, message: bytes, context: bytes = b""
    ) -> tuple[bytes, int]:
        """Returns ``(signature, key_version)``."""
        v: Any = await self.call(ctx, "sign", {"key_id": key_id, "message": message, "context": context})
        return v["signature"], v["version"]

    async def verify(
        self, ctx: TenantContext, key_id: str, message: bytes, signature: bytes, context: bytes = b"",
        version: int | None = None,
    ) -> bool:
        v: Any = await self.call(
            ctx,
            "verify",
            {
                "key_id": key_id,
                "message": message,
                "signature": signature,
                "context": context,
                "version": version,
            },
        )
        return v["valid"] is True

    async def encrypt(
        self, ctx: TenantContext, key_id: str, plaintext: bytes, aad: bytes = b"", info: bytes = b""
    ) -> tuple[bytes, int]:
        """HPKE seal to the key's latest public key; returns ``(enc || ct, key_version)``."""
        v: Any = await self.call(
            ctx, "encrypt", {"key_id": key_id, "plaintext": plaintext, "aad": aad, "info": info}
        )
        return v["ciphertext"], v["version"]

    async def decrypt(
        self,
        ctx: TenantContext,
        key_id: str,
        ciphertext: bytes,
        aad: bytes = b"",
        version: int | None = None,
        info: bytes = b"",
    ) -> bytes:
        v: Any = await self.call(
            ctx, "decrypt",
            {"key_id": key_id, "ciphertext": ciphertext, "aad": aad, "version": version, "info": info},
        )
        return v["plaintext"]  # type: ignore[no-any-return]

    async def batch(
        self, ctx: TenantContext, items: Sequence[tuple[str, Mapping[str, Value]]]
    ) -> list[dict[str, Value] | QpherError]:
        """Several crypto operations in one frame; each succeeds or fails on its own.

        ``items`` are ``(op, args)`` with the same args as the single calls (``sign``:
        ``key_id, message, context``; ...). The result has one entry per item: the op's
        result dict (``{"signature": ..., "version": ...}``) or the item's error.

        Items of one operation with the same argument names (an API batch) travel in columns:
        one list per argument, an argument every item gives the same small value (the key id,
        an empty context, no version) once, and the answers likewise; see ``_batch_columns``.

        With more than one worker idle, a batch of at least ``2 * SPLIT_MIN_ITEMS`` items is
        cut into consecutive chunks, one per idle worker (each of ``SPLIT_MIN_ITEMS`` or
        more), sent at once: the workers run them in parallel, and the answers are joined in
        order. Under load no worker is idle and a batch goes whole to one worker."""
        live = self._live
        if len(live) > 1 and len(items) >= 2 * SPLIT_MIN_ITEMS:
            idle = sum(1 for w in live if not w.inflight)
            parts = min(idle, len(items) // SPLIT_MIN_ITEMS)
            if parts > 1:
                return await self._split_batch(ctx, items, parts)
        return await self._batch_one(ctx, items)

    async def _split_batch(
        self, ctx: TenantContext, items: Sequence[tuple[str, Mapping[str, Value]]], parts: int
    ) -> list[dict[str, Value] | QpherError]:
        size = -(-len(items) // parts)
        chunks = [items[i : i + size] for i in range(0, len(items), size)]
        answers: list[list[dict[str, Value] | QpherError]] = [[] for _ in chunks]
        failed: list[QpherError] = []

        async def one(i: int) -> None:
            try:
                answers[i] = await self._batch_one(ctx, chunks[i])
            except QpherError as exc:  # the whole batch fails with it (as one frame would)
                failed.append(exc)

        async with trio.open_nursery() as nursery:
            for i in range(len(chunks)):
                nursery.start_soon(one, i)
        if failed:
            raise failed[0]
        return [a for chunk in answers for a in chunk]

    async def _batch_one(
        self, ctx: TenantContext, items: Sequence[tuple[str, Mapping[str, Value]]]
    ) -> list[dict[str, Value] | QpherError]:
        """One batch frame to one worker (the least busy)."""
        columns = _columns(items)
        if columns is not None:
            op, same, each = columns
            n = len(items)
            v: Any = await self.call(ctx, "batch", {"op": op, "n": n, "same": same, "each": each})
            return _rows(v, n)
        wire: list[Value] = [{"op": op, "args": dict(args)} for op, args in items]
        v = await self.call(ctx, "batch", {"items": wire})
        results = v["results"]
        if type(results) is not list or len(results) != len(items):
            raise KMSUnavailable("the KMS answered a batch with the wrong number of results")
        out: list[dict[str, Value] | QpherError] = []
        for r in results:
            if "ok" in r:
                out.append(r["ok"])
            else:
                e = r["error"]
                out.append(error_from_frame(e["code"], e["status"], e["message"]))
        return out

    async def audit_vkeys(self, ctx: TenantContext, origin: str) -> dict[str, Any]:
        """The audit log's verifier keys (created in the KMS on first use) and the last signed
        tree head: ``{"origin", "vkeys": [ML-DSA-65, Ed25519], "size", "root"}``."""
        v: Any = await self.call(ctx, "audit_vkeys", {"origin": origin})
        return dict(v)

    async def audit_sign_checkpoint(
        self, ctx: TenantContext, origin: str, size: int, root: bytes, consistency: list[bytes]
    ) -> dict[str, Any]:
        """A signed checkpoint note of ``(origin, size, root)``, which the KMS signs only if
        ``consistency`` proves it to extend the last one it signed (else 409
        checkpoint_inconsistent): ``{"note", "vkeys", "size", "root"}``."""
        args: dict[str, Value] = {"origin": origin, "size": size, "root": root,
                                  "consistency": list(consistency)}
        v: Any = await self.call(ctx, "audit_sign_checkpoint", args)
        return dict(v)

    async def ping(self, ctx: TenantContext, data: bytes = b"") -> bytes:
        """A round trip through the protocol with no key work (health checks, benchmarks)."""
        v: Any = await self.call(ctx, "ping", {"data": data})
        return v["data"]  # type: ignore[no-any-return]


_SAME_TYPES = (str, int, type(None))


def _columns(
    items: Sequence[tuple[str, Mapping[str, Value]]],
) -> tuple[str, dict[str, Value], dict[str, Value]] | None:
    """``(op, same, each)`` for items of one operation with the same argument names, else None.

    ``same``: the arguments every item gives the same str, int, None or empty bytes (sent once);
    ``each``: a list per other argument. Data (messages, ciphertexts) always goes per item, even
    when equal: the frame carries what the items carry."""
    if len(items) < 2:
        return None
    op, first = items[0]
    names = first.keys()
    for o, a in items:
        if o != op or a.keys() != names:
            return None
    same: dict[str, Value] = {}
    each: dict[str, Value] = {}
    for name, v0 in first.items():
        col = [a[name] for _o, a in items]
        t = type(v0)
        if (t in _SAME_TYPES or v0 == b"") and all(type(x) is t and x == v0 for x in col):
            same[name] = v0
        else:
            each[name] = col
    return op, same, each


def _rows(v: Any, n: int) -> list[dict[str, Value] | QpherError]:
    """The per-item answers of a batch sent in columns (the worker's ``_batch_columns``)."""
    try:
        ok, errors = v["ok"], v["errors"]
        if v["n"] != n or type(ok) is not dict or type(errors) is not list:
            raise ValueError
        out: list[Any] = [None] * n
        for i, code, status, message in errors:
            if type(i) is not int or not 0 <= i < n or out[i] is not None:
                raise ValueError
            out[i] = error_from_frame(code, status, message)
        pairs = list(ok.items())
        for _f, col in pairs:
            if type(col) is not list or len(col) != n:
                raise ValueError
        for i in range(n):
            if out[i] is None:
                out[i] = {f: col[i] for f, col in pairs}
    except (KeyError, TypeError, ValueError, IndexError):
        raise KMSUnavailable("the KMS answered a batch in columns malformed") from None
    return out


__all__ = ["KMS_ERRORS", "KMSClient", "WorkerChannel", "error_from_frame"]
