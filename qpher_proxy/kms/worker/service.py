"""The KMS worker: bootstrap, then a synchronous loop serving frames.  KMS process only.

Theory of operation
===================

A worker is started by the gateway's supervisor as ``python -m qpher_proxy.kms.worker --fd N
[--kek-fd M]`` with one end of a socketpair as descriptor ``N``. It then:

1. hardens itself (``_hardening``): closes every other inherited descriptor, disables core
   dumps and ptrace, locks its memory where that is safe;
2. reads the HELLO frame: the per-start service token and its settings (KMS directory, KEK
   provider, crypto backend, destruction delay, ...). Secrets never travel in argv or the
   environment; the KEK for ``provider: env`` arrives as the memfd ``M`` (see kek.py);
3. loads the KEK, the crypto backend and the key store -- which checks the KEK against the
   store *before* writing anything -- and answers READY, or an ERROR frame with rid 0 naming
   what is wrong (then exits 2: a configuration problem a restart will not fix);
4. serves REQUEST frames until the gateway closes the socket (exit 0), or sends something that
   is not a frame (exit 3, after a best-effort ERROR frame): the connection is the worker's only
   one, so ending it ends the process, cleanly and without a traceback.

Requests are handled one at a time, in order, in this single thread: the work is CPU-bound
crypto and one worker runs per core, so there is nothing to overlap. All frames that arrive in
one ``recv`` are handled before their answers are sent in one ``sendall`` (fewer system calls
under load), except that answers are flushed early once ~200 µs of work have accumulated, so
a burst of slow signatures does not hold back the first answers.

Every request is checked in this order, each failure answered with an ERROR frame for that
request only (the worker keeps serving): service token (``hmac.compare_digest``, constant
time) -> tenant present (the protocol layer) -> known operation -> arguments -> the tenant's
key -> the operation. Errors are :class:`~qpher_proxy.errors.QpherError` with safe messages;
anything else is a bug, logged by type only and answered ``internal_error``.

There is no operation that returns private key bytes; the only callers of
``PrivateKey.private_bytes()`` are the key store's writer and ``rotate-kek``.
"""

from __future__ import annotations

import hmac
import logging
import os
import select
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Union

from ...crypto.interface import Backend
from ...errors import InvalidInput, QpherError
from ...sandbox import CAP_IPC_LOCK, RunAs, drop_privileges, preload, set_no_new_privs
from ..wire import protocol
from ..wire.model import BATCH_OPS, DEFAULT_MAX_BATCH
from ..wire.protocol import (
    NEED_DATA,
    Hello,
    ProtocolError,
    RejectedRequest,
    Request,
    ServerConnection,
    Value,
)
from .audit_keys import AuditKeys
from .keystore import KeyStore
from .tenant_keys import TenantKeys

if TYPE_CHECKING:  # imported at run time only with storage.backend postgresql (it needs psycopg)
    from .pg_keystore import PgKeyStore, PgTenantKeys

log = logging.getLogger("qpher.kms.service")

RECV_BYTES = 256 * 1024
FLUSH_AFTER_S = 0.0002  # answer early once this much work has piled up in one batch
DEFAULT_SWEEP_INTERVAL_S = 60.0
EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_PROTOCOL = 3
EXIT_INTERNAL = 4

AnyStore = Union[KeyStore, "PgKeyStore"]
AnyKeys = Union[TenantKeys, "PgTenantKeys"]
Handler = Callable[[AnyKeys, dict[str, Value]], Value]


# ---- argument helpers: typed errors for wrong types, never a KeyError/TypeError ------------


def _req_bytes(args: dict[str, Value], name: str) -> bytes:
    v = args.get(name)
    if type(v) is not bytes:
        raise InvalidInput(f"{name} must be bytes")
    return v


def _opt_bytes(args: dict[str, Value], name: str) -> bytes:
    v = args.get(name, b"")
    if v is None:
        return b""
    if type(v) is not bytes:
        raise InvalidInput(f"{name} must be bytes")
    return v


def _opt_str(args: dict[str, Value], name: str) -> str | None:
    v = args.get(name)
    if v is not None and type(v) is not str:
        raise InvalidInput(f"{name} must be a string")
    return v


def _opt_int(args: dict[str, Value], name: str) -> int | None:
    v = args.get(name)
    if v is not None and type(v) is not int:
        raise InvalidInput(f"{name} must be an integer")
    return v


def _opt_number(args: dict[str, Value], name: str) -> float | None:
    v = args.get(name)
    if v is not None and type(v) not in (int, float):
        raise InvalidInput(f"{name} must be a number")
    return v  # type: ignore[return-value]


def _error_value(exc: QpherError) -> dict[str, Value]:
    return {"code": exc.code, "status": exc.status, "message": exc.message}


class KMSService:
    """Turns requests into key store and crypto calls. One per worker process."""

    def __init__(
        self,
        store: AnyStore,
        token: bytes,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self._token = token
        self.max_batch = max_batch
        self._clock = clock
        self._tenants: dict[str, AnyKeys] = {}  # repositories are stateless; reuse them
        self._ops: dict[str, Handler] = {
            "ping": self._ping,
            "create_key": self._create_key,
            "get_key": self._get_key,
            "list_keys": self._list_keys,
            "rotate_key": self._rotate_key,
            "disable_key": lambda k, a: k.disable(a.get("key_id")).to_wire(),  # type: ignore[arg-type]
            "enable_key": lambda k, a: k.enable(a.get("key_id")).to_wire(),  # type: ignore[arg-type]
            "cancel_destroy": lambda k, a: k.cancel_destroy(a.get("key_id")).to_wire(),  # type: ignore[arg-type]
            "schedule_destroy": self._schedule_destroy,
            "create_import_job": lambda k, a: k.create_import_job(
                a.get("method"), a.get("ttl_seconds")
            ).to_wire(),
            "get_import_job": lambda k, a: k.get_import_job(a.get("import_job_id")).to_wire(),
            "list_import_jobs": self._list_import_jobs,
            "import_key": self._import_key,
            "encapsulate": self._encapsulate,
            "decapsulate": self._decapsulate,
            "sign": self._sign,
            "verify": self._verify,
            "encrypt": self._encrypt,
            "decrypt": self._decrypt,
            "batch": self._batch,
            "audit_vkeys": lambda k, a: self._audit.vkeys(a),
            "audit_sign_checkpoint": lambda k, a: self._audit.sign_checkpoint(a),
        }
        self._audit = AuditKeys(store)

    def __repr__(self) -> str:
        return f"<KMSService dir={str(self.store.dir)!r}>"

    # ---- dispatch ----

    def handle(self, conn: ServerConnection, event: Request | RejectedRequest) -> bytes:
        """Answer one request event with one frame; never raises for bad input."""
        rid = event.rid
        if type(event) is RejectedRequest:
            return conn.error(rid, event.code, 400, event.message)
        req: Request = event  # type: ignore[assignment]
        if not hmac.compare_digest(req.token, self._token):
            log.warning("request with a wrong service token", extra={"fields": {"rid": rid}})
            return conn.error(rid, "invalid_service_token", 500, "the service token is not valid")
        handler = self._ops.get(req.op)
        if handler is None:
            return conn.error(rid, "unknown_operation", 400, f"unknown KMS operation {req.op[:40]!r}")
        try:
            tenant = req.context.tenant_id
            keys = self._tenants.get(tenant)
            if keys is None:
                if len(self._tenants) >= 4096:
                    self._tenants.clear()
                keys = self._tenants[tenant] = self.store.tenant(tenant)
            value = handler(keys, req.args)
            return conn.response(rid, value)
        except QpherError as exc:
            return conn.error_from(rid, exc)
        except Exception as exc:  # a bug: keep serving, say nothing about the data
            log.error(
                "internal error in a KMS operation",
                extra={
                    "fields": {
                        "op": req.op,
                        "exc_type": type(exc).__name__,
                        "request_id": req.context.request_id,
                    }
                },
            )
            return conn.error(rid, "internal_error", 500, "internal error in the KMS")

    # ---- lifecycle ----

    def _ping(self, keys: AnyKeys, args: dict[str, Value]) -> Value:
        return {"data": _opt_bytes(args, "data"), "pid": os.getpid()}

    def _create_key(self, keys: AnyKeys, args: dict[str, Value]) -> Value:
        return keys.create(
            algorithm=_opt_str(args, "algorithm"),
            kind=_opt_str(args, "kind"),
            mode=_opt_str(args, "mode"),
            label=_opt_str(args, "label"),
            idempotency_key=_opt_str(args, "idempotency_key"),
        ).to_wire()

    def _rotate_key(self, keys: AnyKeys, args: dict[str, Value]) -> Value:
        return keys.rotate(
            args.get("key_id"), idempotency_key=_opt_str(args, "idempotency_key")  # type: ignore[arg-type]
        ).to_wire()

    def _get_key(self, keys: AnyKeys, args: dict[str, Value]) -> Value:
        return keys.get(args.get("key_id"), _opt_int(args, "version")).to_wire()  # type: ignore[arg-type]

    def _list_keys(self, keys: AnyKeys, args: dict[str, Value]) -> Value:
        limit = _opt_int(args, "limit")
        page = keys.list(limit if limit is not None else 50, _opt_str(args, "cursor"))
        return {"keys": [k.to_wire() for k in page.keys], "next_cursor": page.next_cursor}

    def _list_import_jobs(self, keys: AnyKeys, args: dict[str, Value]) -> Value:
        limit = _opt_int(args, "limit")
        page = keys.list_import_jobs(limit if limit is not None else 50, args.get("cursor"))
        return {"jobs": [j.to_wire() for j in page.jobs], "next_cursor": page.next_cursor}

    def _import_key(self, keys: AnyKeys, args: dict[str, Value]) -> Value:
        return keys.import_key(
            args.get("import_job_id"), args.get("algorithm"), args.get("wrapped_key"),
            format=args.get("format"), label=args.get("label"), key_id=args.get("key_id"),
            idempotency_key=_opt_str(args, "idempotency_key"),
        ).to_wire()

    def _schedule_destroy(self, keys: AnyKeys, args: dict[str, Value]) -> Value:
        return keys.schedule_destroy(args.get("key_id"), _opt_number(args, "delay")).to_wire()  # type: ignore[arg-type]

    # ---- crypto ----

    def _encapsulate(self, keys: AnyKeys, args: dict[str, Value]) -> Value:
        pub, version = keys.public_key(args.get("key_id"))
        ss, ct = pub.encapsulate()
        return {"shared_secret": ss, "ciphertext": ct, "version": version}

    def _decapsulate(self, keys: AnyKeys, args: dict[str, Value]) -> Value:
        ct = _req_bytes(args, "ciphertext")
        priv, version = keys.private_key(args.get("key_id"), args.get("version"))
        return {"shared_secret": priv.decapsulate(ct), "version": version}

    def _sign(self, keys: AnyKeys, args: dict[str, Value]) -> Value:
        msg = _req_bytes(args, "message")
        ctx = _opt_bytes(args, "context")
        priv, version = keys.private_key(args.get("key_id"))
        return {"signature": priv.sign(msg, ctx), "version": version}

    def _verify(self, keys: AnyKeys, args: dict[str, Value]) -> Value:
        msg = _req_bytes(args, "message")
        sig = _req_bytes(args, "signature")
        ctx = _opt_bytes(args, "context")
        pub, version = keys.public_key(args.get("key_id"), args.get("version"))
        return {"valid": bool(pub.verify(sig, msg, ctx)), "version": version}

    def _encrypt(self, keys: AnyKeys, args: dict[str, Value]) -> Value:
        pt = _req_bytes(args, "plaintext")
        aad = _opt_bytes(args, "aad")
        info = _opt_bytes(args, "info")
        pub, version = keys.public_key(args.get("key_id"))
        return {"ciphertext": pub.hpke_seal(pt, aad=aad, info=info), "version": version}

    def _decrypt(self, keys: AnyKeys, args: dict[str, Value]) -> Value:
        ct = _req_bytes(args, "ciphertext")
        aad = _opt_bytes(args, "aad")
        info = _opt_bytes(args, "info")
        priv, version = keys.private_key(args.get("key_id"), args.get("version"))
        return {"plaintext": priv.hpke_open(ct, aad=aad, info=info), "version": version}

    def _batch(self, keys: AnyKeys, args: dict[str, Value]) -> Value:
        """Several crypto operations in one frame, each performed and failing on its own.

        Two shapes (see ``KMSClient.batch``): rows, ``{"items": [{"op", "args"}, ...]}``
        answered ``{"results": [{"ok": result} | {"error": {code, status, message}}, ...]}``;
        or columns, for items of one operation (an API batch), ``{"op", "n", "same": {arg:
        value}, "each": {arg: [value] * n}}`` answered ``{"n", "ok": {field: [value or None] *
        n}, "errors": [[index, code, status, message], ...]}``: no dict per item on the wire, and
        what every item shares (the key id, the context) travels once."""
        if "items" not in args and "op" in args:
            return self._batch_columns(keys, args)
        items = args.get("items")
        if type(items) is not list:
            raise InvalidInput("items must be a list")
        if len(items) > self.max_batch:
            raise InvalidInput(f"a batch holds at most {self.max_batch} items, not {len(items)}")
        results: list[Value] = []
        for item in items:
            try:
                op = item.get("op") if isinstance(item, dict) else None
                item_args = item.get("args") if isinstance(item, dict) else None
                if not isinstance(op, str) or not isinstance(item_args, dict):
                    raise InvalidInput("each batch item must be {op: str, args: dict}")
                if op not in BATCH_OPS:
                    raise InvalidInput(f"operation {op[:40]!r} is not allowed in a batch")
                results.append({"ok": self._ops[op](keys, item_args)})
            except QpherError as exc:
                results.append({"error": _error_value(exc)})
            except Exception as exc:
                log.error(
                    "internal error in a batch item", extra={"fields": {"exc_type": type(exc).__name__}}
                )
                results.append(
                    {
                        "error": {
                            "code": "internal_error",
                            "status": 500,
                            "message": "internal error in the KMS",
                        }
                    }
                )
        return {"results": results}

    def _batch_columns(self, keys: AnyKeys, args: dict[str, Value]) -> Value:
        op, n, same, each = args.get("op"), args.get("n"), args.get("same"), args.get("each")
        if type(op) is not str or type(n) is not int or type(same) is not dict or type(each) is not dict:
            raise InvalidInput("a batch in columns is {op: str, n: int, same: dict, each: dict}")
        if not 0 <= n <= self.max_batch:
            raise InvalidInput(f"a batch holds at most {self.max_batch} items, not {n}")
        if op not in BATCH_OPS:
            raise InvalidInput(f"operation {op[:40]!r} is not allowed in a batch")
        columns = list(each.items())
        for _name, col in columns:
            if type(col) is not list or len(col) != n:
                raise InvalidInput("every column of a batch must hold n values")
        handler = self._ops[op]
        ok: dict[str, Value] = {}
        errors: list[Value] = []
        for i in range(n):
            item = same.copy()
            for name, col in columns:
                item[name] = col[i]  # type: ignore[index]  # checked above: a list of n values
            try:
                result = handler(keys, item)
            except QpherError as exc:
                errors.append([i, exc.code, exc.status, exc.message])
                continue
            except Exception as exc:
                log.error(
                    "internal error in a batch item", extra={"fields": {"exc_type": type(exc).__name__}}
                )
                errors.append([i, "internal_error", 500, "internal error in the KMS"])
                continue
            for field, value in result.items():  # type: ignore[union-attr]  # every batch op answers a dict
                out = ok.get(field)
                if out is None:
                    out = ok[field] = [None] * n
                out[i] = value  # type: ignore[index]
        return {"n": n, "ok": ok, "errors": errors}

    # ---- periodic work ----

    def sweep(self) -> None:
        try:
            n = self.store.sweep_due()
        except QpherError as exc:
            log.error("destruction sweep failed", extra={"fields": {"code": exc.code}})
            return
        if n:
            log.info("destruction sweep", extra={"fields": {"destroyed": n}})


def serve(sock: socket.socket, conn: ServerConnection, service: KMSService, sweep_interval: float) -> int:
    """The request loop; returns the process exit code."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    next_sweep = time.monotonic() + sweep_interval
    perf = time.perf_counter
    handle = service.handle
    store = service.store
    # One receive buffer for the life of the worker: with mlockall(MCL_FUTURE) every fresh
    # large allocation is faulted in and locked at once, which made a per-recv 256 KiB bytes
    # object cost ~100 us per round trip.
    rbuf = bytearray(RECV_BYTES)
    rview = memoryview(rbuf)
    while True:
        timeout_ms = max(0, int((next_sweep - time.monotonic()) * 1000)) + 1
        if not poller.poll(timeout_ms):
            service.sweep()
            next_sweep = time.monotonic() + sweep_interval
            continue
        try:
            n = sock.recv_into(rbuf)
        except OSError as exc:
            log.info("socket closed by the gateway", extra={"fields": {"errno": exc.errno}})
            return EXIT_OK
        conn.receive_data(rview[:n])
        out: list[bytes] = []
        start = perf()
        store.begin_batch()
        try:
            while True:
                event = conn.next_event()
                if event is NEED_DATA:
                    break
                if not isinstance(event, (Request, RejectedRequest)):  # ConnectionClosed: all a serving
                    _send(sock, out)  # server connection yields besides requests
                    log.info("gateway closed the connection; exiting")
                    return EXIT_OK
                out.append(handle(conn, event))
                if perf() - start > FLUSH_AFTER_S:
                    _send(sock, out)
                    out = []
                    start = perf()
        except ProtocolError as exc:
            _send(sock, out)
            log.error("protocol error; closing the connection", extra={"fields": {"reason": exc.message}})
            try:
                sock.sendall(ServerConnection().error(0, exc.code, exc.status, exc.message))
            except OSError:
                pass
            return EXIT_PROTOCOL
        finally:
            store.end_batch()
        if not _send(sock, out):
            log.info("gateway went away while answering; exiting")
            return EXIT_OK
        if time.monotonic() >= next_sweep:
            service.sweep()
            next_sweep = time.monotonic() + sweep_interval


def _send(sock: socket.socket, out: list[bytes]) -> bool:
    if not out:
        return True
    try:
        sock.sendall(out[0] if len(out) == 1 else b"".join(out))
    except OSError:
        return False
    return True


# ---- bootstrap -----------------------------------------------------------------------------


def _read_hello(sock: socket.socket, conn: ServerConnection, timeout: float) -> Hello:
    sock.settimeout(timeout)
    try:
        while True:
            event = conn.next_event()
            if type(event) is Hello:
                return event
            if event is not NEED_DATA:
                raise ProtocolError("the gateway closed the connection before HELLO")
            data = sock.recv(RECV_BYTES)
            conn.receive_data(data)
    except TimeoutError as exc:
        raise ProtocolError("no HELLO from the gateway in time") from exc
    finally:
        sock.settimeout(None)


def _kek_from_config(cfg: Any, kek_fd: int | None) -> Any:
    from .kek import FileKEKProvider, KEKError, kek_from_fd

    if type(cfg) is not dict:
        raise KEKError("kms.kek settings missing from the bootstrap")
    provider = cfg.get("provider")
    if provider == "file":
        path = cfg.get("path")
        if type(path) is not str:
            raise KEKError("kms.kek.file is not set")
        return FileKEKProvider(path)
    if provider == "env":
        if kek_fd is None:
            raise KEKError(f"environment variable {cfg.get('env')!r} was not handed to the KMS (is it set?)")
        return kek_from_fd(kek_fd, f"environment variable {cfg.get('env')!r}")
    if provider == "pkcs11":  # the PIN: a file named here, or the supervisor's memfd (kek_fd)
        from .kek_pkcs11 import open_pkcs11_provider

        texts = {n: cfg.get(n) if type(cfg.get(n)) is str else None
                 for n in ("module", "token_label", "key_label", "pin_file", "pin_env")}
        if texts["pin_env"] is not None and texts["pin_file"] is None and kek_fd is None:
            raise KEKError(f"environment variable {texts['pin_env']!r} (kms.kek.pkcs11_pin_env) was not "
                           "handed to the KMS (is it set?)")
        return open_pkcs11_provider(texts["module"], texts["token_label"], texts["key_label"],
                                    pin_file=texts["pin_file"], pin_env=texts["pin_env"], pin_fd=kek_fd)
    raise KEKError(f"unknown KEK provider {str(provider)[:20]!r}; expected 'file', 'env' or 'pkcs11'")


def _setting(cfg: dict[str, Value], name: str, kind: type, default: Any) -> Any:
    v = cfg.get(name, default)
    if kind is float and type(v) is int:
        v = float(v)
    if v is not None and type(v) is not kind:
        raise InvalidInput(f"bootstrap setting {name!r} must be {kind.__name__}")
    return v


# What a worker imports before it drops to the KMS user: the KMS but its gateway side, and the
# crypto suite but the liboqs backend, which is imported only once its shared library is found.
PRELOAD = ("qpher_proxy.kms", "qpher_proxy.crypto")
PRELOAD_SKIP = (
    "qpher_proxy.kms.client",
    "qpher_proxy.kms.launcher",
    "qpher_proxy.kms.worker.backends.liboqs",
    "qpher_proxy.kms.worker.pg_keystore",
)
# With storage.backend postgresql, also the PostgreSQL store and its driver (psycopg loads its
# libpq at import; a run of every store operation, a failed connection included, imports nothing
# more after these).
PRELOAD_PG = ("qpher_proxy.kms.worker.pg_keystore", "qpher_proxy.storage.postgres", "psycopg_pool")


def _become(user: RunAs, *, postgresql: bool = False) -> bool:
    """Drop to the KMS user before the key store is opened, so that every file it creates
    belongs to that user; the modules it will need are imported first, while readable."""
    preload(PRELOAD, skip=PRELOAD_SKIP)
    if postgresql:
        preload(PRELOAD_PG)
    import encodings.idna  # noqa: F401  (looked up lazily by str.encode("idna"))

    from . import _hardening

    try:
        drop_privileges(user, keep=(CAP_IPC_LOCK,))
    except OSError as exc:
        raise QpherError(f"cannot become the KMS user {user.uid}: {exc.strerror}",
                         code="config_error", status=500) from None
    set_no_new_privs()  # no exec could ever give capabilities back
    # Memory is locked only now, with the one capability kept for it: locked as root and then
    # without CAP_IPC_LOCK, every allocation would count against RLIMIT_MEMLOCK and fail once
    # that limit is reached.
    locked, note = _hardening.lock_memory()
    (log.info if locked else log.warning)(note)
    return locked


def run_worker(
    fd: int, kek_fd: int | None, *, notes: dict[str, Value] | None = None, hello_timeout: float = 30.0,
    user: RunAs | None = None,
) -> int:
    """The whole life of a worker after hardening; returns the exit code."""
    sock = socket.socket(fileno=fd)
    conn = ServerConnection()
    try:
        try:
            hello = _read_hello(sock, conn, hello_timeout)
        except ProtocolError as exc:
            log.error("bootstrap failed", extra={"fields": {"reason": exc.message}})
            if kek_fd is not None:
                os.close(kek_fd)
            return EXIT_PROTOCOL
        cfg = hello.config
        try:
            store, notes = _open_store(conn, cfg, kek_fd, user, notes)
        except QpherError as exc:
            log.error("start-up failed", extra={"fields": {"code": exc.code, "reason": exc.message}})
            _best_effort(sock, conn.error(0, exc.code, exc.status, exc.message))
            return EXIT_CONFIG
        service = KMSService(store, hello.token, max_batch=_setting(cfg, "max_batch", int, DEFAULT_MAX_BATCH))
        if not _best_effort(sock, conn.ready(_ready_info(store, cfg, notes))):
            return EXIT_OK
        log.info("KMS worker ready",
                 extra={"fields": {"backend": store.backend.name, "kek_id": store.kek.kek_id,
                                   "storage": _storage_kind(store)}})
        interval = getattr(store, "tick_interval", None)  # PostgreSQL: lease renewal + sweep cadence
        if interval is None:
            interval = _setting(cfg, "sweep_interval", float, DEFAULT_SWEEP_INTERVAL_S)
        try:
            return serve(sock, conn, service, interval)
        finally:
            store.close()
    finally:
        sock.close()


def _open_store(
    conn: ServerConnection, cfg: dict[str, Value], kek_fd: int | None, user: RunAs | None,
    notes: dict[str, Value] | None,
) -> tuple[AnyStore, dict[str, Value] | None]:
    """The key store HELLO's settings describe, opened as the KMS user (``notes`` gains whether
    memory is locked). ``kek_fd`` is consumed either way: handed to the KEK provider, or closed.

    ``storage`` (present when ``storage.backend`` is ``postgresql``): the DSN, role prefix, pool
    and timeouts, lease TTL and sweep interval -- the DSN reaches the worker only in this frame,
    never in argv, the environment or a log line. The KMS directory then holds nothing
    key-related (keys, canary and sweep coordination are all in the database)."""
    try:
        max_frame = _setting(cfg, "max_frame_size", int, protocol.DEFAULT_MAX_FRAME_SIZE)
        conn.max_frame_size = max(max_frame, protocol.MIN_FRAME_SIZE)
        from .backends import select_backend

        # The backend loads its libraries while they are readable, before the user change;
        # the KEK is read after it, as the user that owns the KEK file.
        backend: Backend = select_backend(_setting(cfg, "backend", str, "auto"))
        storage = cfg.get("storage")
        if storage is not None and (type(storage) is not dict or storage.get("backend") != "postgresql"):
            raise InvalidInput("bootstrap setting 'storage' must describe the postgresql backend")
        kms_dir = _setting(cfg, "dir", str, None)
        if not kms_dir and storage is None:
            raise InvalidInput("bootstrap setting 'dir' is required")
        kek_cfg = cfg.get("kek")
        if type(kek_cfg) is dict and kek_cfg.get("provider") == "pkcs11":
            from .kek_pkcs11 import load_binding

            load_binding()  # python-pkcs11 itself; the token's module is loaded as the KMS user
        if user is not None:
            notes = {**(notes or {}), "memory_locked": _become(user, postgresql=storage is not None)}
        kek = _kek_from_config(kek_cfg, kek_fd)
        kek_fd = None
        if storage is not None:
            from .pg_keystore import open_from_settings

            pg = open_from_settings(
                storage, kek, backend,
                destroy_delay=_setting(cfg, "destroy_delay", float, 86_400.0),
                cache_size=_setting(cfg, "cache_size", int, 1024),
            )
            return pg, notes
        store = KeyStore(
            kms_dir,
            kek,
            backend,
            destroy_delay=_setting(cfg, "destroy_delay", float, 86_400.0),
            cache_size=_setting(cfg, "cache_size", int, 1024),
        )
        return store, notes
    finally:
        if kek_fd is not None:
            try:
                os.close(kek_fd)
            except OSError:
                pass


def _storage_kind(store: AnyStore) -> str:
    return "sqlite" if isinstance(store, KeyStore) else "postgresql"


def _ready_info(store: AnyStore, cfg: dict[str, Value], notes: dict[str, Value] | None) -> dict[str, Value]:
    """What READY tells the gateway: non-secret facts about this worker."""
    info: dict[str, Value] = {
        "pid": os.getpid(),
        "backend": store.backend.name,
        "kek_id": store.kek.kek_id,
        "exclusive_start": store.exclusive_start,
        "storage": _storage_kind(store),
        "worker": _setting(cfg, "worker", int, 0),
        "versions": dict(store.backend.versions()),
    }
    info.update(notes or {})
    return info


def _best_effort(sock: socket.socket, data: bytes) -> bool:
    try:
        sock.sendall(data)
        return True
    except OSError:
        return False


__all__ = ["KMSService", "run_worker", "serve"]
