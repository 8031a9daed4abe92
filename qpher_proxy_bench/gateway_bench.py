"""``qpher-proxy bench gateway``: the end-to-end figures of the gateway over real TLS.

    qpher-proxy bench gateway --quick                      # both suites, under a minute
    qpher-proxy bench gateway --only handshake --seconds 10 --clients 1
    qpher-proxy bench gateway --suite api --json api.json --backend openssl
    qpher-proxy bench gateway --only keepalive --profile   # where a /healthz request's time goes

Everything runs on 127.0.0.1 in one invocation, against a throwaway state directory:

1. ``qpher-proxy init --dir D --port P`` (a free port), then, in D only: ``upstream.url`` set to a
   trivial upstream (``--suite api``), ``crypto.backend`` set by ``--backend``, and the demo
   plan's rate limits raised so far that the limiter runs on every request but never refuses
   one (``--keep-limits`` keeps the shipped limits; 429s are reported apart in any case).
2. ``qpher-proxy serve --config D/config.yaml`` as a child process, ready when ``GET /healthz``
   answers 200 over TLS (up to 30 s). Its log goes to D/serve.log.
3. Debian's nginx (``bench/nginx.py``: one worker, static ``/healthz``, same TLS 1.3 settings
   and no session resumption), unless ``--skip-nginx``.
4. The load generator (``bench/loadgen.py``): ``--clients`` processes on epoll + pyOpenSSL.

Suites (``--suite tls|api|all``, default all; ``--only`` narrows to one kind of run):

- **tls**: full TLS 1.3 handshakes/s and keep-alive ``GET /healthz`` requests/s, each
  with a client offering only X25519MLKEM768 and only X25519, for the gateway and for nginx
  in the same run, with gateway/nginx ratios. Each pair is first probed with one verified
  handshake and request: a group the server cannot negotiate (Debian's nginx links OpenSSL
  3.0: no ML-KEM) is reported as unsupported, not measured. Handshake runs do not verify the
  certificate (after the verified probe) so that the client's CPU goes to the handshake itself.
- **api**: requests/s, p50 and p99 of ``POST /v1/sign``, ``/v1/verify`` (ML-DSA-65,
  1 KiB message), ``/v1/kem/encapsulate``, ``/v1/kem/decapsulate`` (ML-KEM-768),
  ``/v1/encrypt``, ``/v1/decrypt`` (HPKE with ML-KEM-768, 1 KiB) and a request forwarded to a
  trivial upstream, at concurrency 1, 16 and 64, beside (a) the raw library rate of the same
  operation, single core, measured in this process in the same run (CPU time, so other load
  on the machine does not lower it), and (b) the gateway's own keep-alive ``/healthz`` rate at
  the same concurrency. The ratios are the figures.

Beside each run: the server's CPU use over the measured window (the gateway with its KMS
workers; nginx master and worker), as cores busy and CPU microseconds per request, which does
not depend on how much of the machine the client or other processes took.
On a 2-core machine the client and the server share the CPUs: absolute rates are floors.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .loadgen import (
    ClientTLS,
    CPUWatch,
    LoadGenerator,
    LoadGeneratorError,
    LoadResult,
    LoadSpec,
    build_request,
    probe,
    process_tree,
)

GROUPS = ("X25519MLKEM768", "X25519")
API_CONCURRENCY = (1, 16, 64)
PAYLOAD = bytes(range(256)) * 4  # 1 KiB
READY_TIMEOUT = 30.0  # seconds for `serve` to answer GET /healthz
STOP_TIMEOUT = 20.0  # seconds for `serve` to exit after SIGTERM
GENEROUS_RATE = 1_000_000  # requests/s (the policy loader's maximum): the limiter runs, never refuses
HEALTHZ = build_request("GET", "/healthz", headers={"User-Agent": "qpher-bench", "Accept": "*/*"})


class BenchError(RuntimeError):
    """A benchmark step failed; the message says which and why (one line)."""


_Rows = TypeVar("_Rows")


def add_output_options(ap: argparse.ArgumentParser) -> None:
    """``--json`` and ``--quiet``, as the benchmarks that print rows take them."""
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def bench_main(name: str, args: argparse.Namespace, run: Callable[[argparse.Namespace], _Rows],
               report: Callable[[_Rows, float], None]) -> int:
    """Run one benchmark and ``report`` its rows with the seconds it took; a ``BenchError`` is
    one line on stderr and exit status 1."""
    started = time.monotonic()
    try:
        rows = run(args)
    except BenchError as exc:
        print(f"bench {name}: {exc}", file=sys.stderr)
        return 1
    report(rows, time.monotonic() - started)
    return 0


# ---- the gateway as a child process -------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# The interpreter that runs the gateway's own commands (init, policy check, serve). Another
# checkout's venv (``--gateway-python``) measures that version of the gateway with this version's
# benchmark: how the before/after figures of a change are taken.
GATEWAY_PYTHON = sys.executable


def _cli(*args: str) -> list[str]:
    return [GATEWAY_PYTHON, "-m", "qpher_proxy", *args]


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:]) or "(log empty)"


def raise_plan_limits(policy_dir: Path, plan: str, rate: int = GENEROUS_RATE) -> bool:
    """Raise ``plan``'s per-key and per-tenant rate limits in the policy files of ``policy_dir``
    (a benchmark's throwaway copy): the token buckets still run on every request. True if found."""
    import yaml

    for path in sorted(policy_dir.glob("*.yaml")):
        original = path.read_text()
        doc = yaml.safe_load(original)
        plans = doc.get("plans") if isinstance(doc, dict) else None
        if not isinstance(plans, dict) or not isinstance(plans.get(plan), dict):
            continue
        for key in ("rate_limit", "tenant_rate_limit"):
            if key in plans[plan] or key == "rate_limit":
                plans[plan][key] = {"requests_per_second": rate, "burst": rate}
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        check = subprocess.run(
            _cli("policy", "check", str(policy_dir)), capture_output=True, text=True, timeout=60,
            cwd=policy_dir,
        )
        if check.returncode != 0:
            path.write_text(original)  # the policy language moved on: keep the shipped limits
            return False
        return True
    return False


def stop_process(proc: subprocess.Popen[bytes]) -> bool:
    """SIGTERM a child started in its own session, then SIGKILL its session after
    ``STOP_TIMEOUT``. True if it stopped on SIGTERM (or had already exited)."""
    if proc.poll() is not None:
        return True
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return False
    return True


@dataclass
class GatewayProcess:
    """``qpher-proxy init`` + ``serve`` in a temporary directory, for the length of a ``with``."""

    upstream_url: str | None = None
    backend: str | None = None
    log_level: str | None = None
    generous_limits: bool = True
    profile_to: Path | None = None  # run serve under cProfile, writing here at exit
    keep_state: bool = False
    # dotted config keys set after init (``{"storage.backend": "postgresql"}``), and a hook run
    # between init and serve (a database migration or import, a policy file)
    overrides: dict[str, Any] = field(default_factory=dict)
    before_start: Callable[[GatewayProcess], None] | None = None
    directory: Path = field(init=False)
    port: int = field(init=False, default=0)
    api_key: str = field(init=False, default="", repr=False)
    notes: list[str] = field(init=False, default_factory=list)
    _proc: subprocess.Popen[bytes] | None = field(init=False, default=None, repr=False)
    _log: Any = field(init=False, default=None, repr=False)

    @property
    def ca_file(self) -> str:
        return str(self.directory / "certs" / "ca.crt")

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def pids(self) -> list[int]:
        """The gateway and its KMS workers."""
        return process_tree(self.pid) if self._proc is not None else []

    def serving_pids(self) -> list[int]:
        """The gateway processes that accept connections (not the supervisor, not the KMS)."""
        out = []
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"qpher_proxy.server" in f.read():
                        out.append(pid)
            except OSError:
                continue
        return out or [self.pid]  # profiled_main: the gateway runs in the started process

    def __enter__(self) -> GatewayProcess:
        self.directory = Path(tempfile.mkdtemp(prefix="qpher-bench-"))
        try:
            self._init()
            if self.before_start is not None:
                self.before_start(self)
            self._start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _init(self) -> None:
        import yaml

        d = self.directory / "state"
        self.port = _free_port()
        r = subprocess.run(_cli("init", "--dir", str(d), "--port", str(self.port)), capture_output=True,
                           cwd=self.directory,
                           text=True, timeout=120)
        if r.returncode != 0:
            raise BenchError(
                f"qpher-proxy init failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-500:]}"
            )
        self.directory = d
        key_file = d / "secrets" / "demo-api-key"
        try:
            self.api_key = key_file.read_text().strip()
        except OSError as exc:
            raise BenchError(
                f"qpher-proxy init wrote no demo API key at {key_file}: {exc.strerror}"
            ) from None
        cfg_path = d / "config.yaml"
        cfg = yaml.safe_load(cfg_path.read_text()) or {}
        cfg.setdefault("server", {})["listen"] = [f"127.0.0.1:{self.port}"]
        if self.upstream_url:
            cfg.setdefault("upstream", {})["url"] = self.upstream_url
        if self.backend:
            cfg.setdefault("crypto", {})["backend"] = self.backend
        if self.log_level:
            cfg.setdefault("logging", {})["level"] = self.log_level
        for dotted, value in self.overrides.items():
            node = cfg
            *parents, last = dotted.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = value
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        if self.generous_limits:
            from qpher_proxy.init import DEMO_PLAN

            policy_dir = d / str((cfg.get("policy") or {}).get("dir", "policies"))
            if raise_plan_limits(policy_dir, DEMO_PLAN):
                self.notes.append(
                    f"demo plan {DEMO_PLAN!r}: rate limits raised to {GENEROUS_RATE:,}/s in the "
                    "benchmark's copy of the policies (the limiter still runs on every request)"
                )
            else:
                self.notes.append(
                    f"demo plan {DEMO_PLAN!r} not found in {policy_dir}: shipped rate limits in force"
                )

    def _start(self) -> None:
        cmd = _cli("serve", "--config", str(self.directory / "config.yaml"))
        if self.profile_to is not None:
            cmd = [
                sys.executable,
                "-c",
                "from qpher_proxy_bench.gateway_bench import profiled_main; profiled_main()",
                str(self.profile_to),
                *cmd[3:],
            ]
        self._log = open(self.directory / "serve.log", "ab")
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.directory,
            start_new_session=True,
        )
        tls = ClientTLS("X25519MLKEM768", cafile=self.ca_file)
        deadline = time.monotonic() + READY_TIMEOUT
        last = "no answer"
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BenchError(f"qpher-proxy serve exited with status {self._proc.returncode}: "
                                 f"{_tail(self.directory / 'serve.log')}")
            try:
                r = probe(self.port, tls, request=HEALTHZ, timeout=5.0)
            except OSError as exc:  # not listening yet
                last = f"{type(exc).__name__}: {exc}"
            else:
                if r.ok and r.status == 200:
                    return
                last = r.error or f"status {r.status}"
            time.sleep(0.1)  # polling a child process until it serves
        raise BenchError(f"qpher-proxy serve did not answer GET /healthz with 200 within {READY_TIMEOUT:g} s "
                         f"({last}): {_tail(self.directory / 'serve.log')}")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and not stop_process(proc):
            self.notes.append("qpher-proxy serve did not stop on SIGTERM: killed")
        if self._log is not None:
            self._log.close()
            self._log = None

    def __exit__(self, *exc: object) -> None:
        self.stop()
        root = self.directory.parent if self.directory.name == "state" else self.directory
        if self.keep_state:
            print(f"state kept in {self.directory}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)

    # -- one-off API calls (setup), over the same TLS as the load --

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        raw = json.dumps(body).encode() if body is not None else b""
        req = build_request(method, path, headers=self.api_headers(json_body=body is not None), body=raw)
        r = probe(self.port, ClientTLS("X25519MLKEM768", cafile=self.ca_file), request=req)
        if not r.ok or r.status is None:
            raise BenchError(f"{method} {path}: {r.error}")
        try:
            doc = json.loads(r.body) if r.body else {}
        except ValueError:
            doc = {}
        return r.status, doc

    def api_headers(self, *, json_body: bool) -> dict[str, str]:
        h = {"Authorization": f"Bearer {self.api_key}", "User-Agent": "qpher-bench"}
        if json_body:
            h["Content-Type"] = "application/json"
        return h


# ---- a trivial upstream (sidecar target) -------------------------------------------------------------


UPSTREAM_BODY = b'{"upstream":"ok"}'


def _upstream_main(pipe: Any) -> None:
    """Keep-alive HTTP/1.1 server on raw non-blocking sockets: 200 and a small body to every
    request (request bodies framed by Content-Length are skipped). As cheap as Python gets,
    since it shares the CPUs with what is measured."""
    import selectors

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    response = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (len(UPSTREAM_BODY), UPSTREAM_BODY))
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1024)
    lsock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(lsock, selectors.EVENT_READ)
    sel.register(pipe, selectors.EVENT_READ)  # parent closing the pipe = stop
    pipe.send(lsock.getsockname()[1])
    bufs: dict[socket.socket, bytes] = {}
    while True:
        for key, _ in sel.select():
            obj = key.fileobj
            if obj is lsock:
                try:
                    conn, _addr = lsock.accept()
                except BlockingIOError:
                    continue
                conn.setblocking(False)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                bufs[conn] = b""
                sel.register(conn, selectors.EVENT_READ)
            elif obj is pipe:
                return
            else:
                s: socket.socket = obj  # type: ignore[assignment]
                try:
                    data = s.recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(s)
                    bufs.pop(s, None)
                    s.close()
                    continue
                buf = bufs[s] + data
                out = b""
                while True:
                    end = buf.find(b"\r\n\r\n")
                    if end < 0:
                        break
                    head = buf[:end].lower()
                    i = head.find(b"\r\ncontent-length:")
                    length = int(head[i + 17 : head.find(b"\r\n", i + 17) if head.find(b"\r\n", i + 17) >= 0
                                      else end]) if i >= 0 else 0
                    if len(buf) < end + 4 + length:
                        break
                    buf = buf[end + 4 + length :]
                    out += response
                bufs[s] = buf
                if out:
                    try:
                        s.sendall(out)
                    except OSError:
                        pass


@contextlib.contextmanager
def trivial_upstream() -> Iterator[int]:
    """A trivial HTTP upstream in a child process; yields its port."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_upstream_main, args=(child,), daemon=True, name="qpher-bench-upstream")
    proc.start()
    child.close()
    try:
        if not parent.poll(30):
            raise BenchError("the trivial upstream did not start")
        yield int(parent.recv())
    finally:
        parent.close()
        proc.join(5)
        if proc.is_alive():
            proc.terminate()
            proc.join()
        proc.close()


# ---- raw library rates ------------------------------------------------------------------------------


RAW_OPS = {  # API operation -> (algorithm, raw operation in crypto_bench's tables)
    "sign": ("ml-dsa-65", "sign"),
    "verify": ("ml-dsa-65", "verify"),
    "encapsulate": ("ml-kem-768", "encapsulate"),
    "decapsulate": ("ml-kem-768", "decapsulate"),
    "encrypt": ("ml-kem-768", "hpke_seal"),
    "decrypt": ("ml-kem-768", "hpke_open"),
}


def resolve_backend(name: str) -> str:
    """The backend ``crypto.backend: name`` selects on this machine (what the KMS will use)."""
    import logging

    from qpher_proxy.kms.worker.backends import select_backend

    logging.getLogger("qpher.crypto").setLevel(logging.WARNING)
    return select_backend(name).name


def raw_rates(backend_name: str, seconds: float) -> dict[str, float]:
    """Single-core operations per second of the raw library calls (``crypto_bench``'s
    definitions: cryptography's own calls for openssl, liboqs-python's for liboqs), by CPU time."""
    from qpher_proxy.crypto.algorithms import ALGORITHMS
    from qpher_proxy.kms.worker.backends import select_backend

    from .crypto_bench import _liboqs_raw, _openssl_raw

    backend = select_backend(backend_name)
    factory = _openssl_raw if backend_name == "openssl" else _liboqs_raw
    # The keys must outlive the closures: liboqs' raw calls use objects the key frees on collection.
    keys = {alg: backend.generate(ALGORITHMS[alg]) for alg in sorted({a for a, _ in RAW_OPS.values()})}
    tables = {alg: factory(alg, key) for alg, key in keys.items()}
    rates = {}
    for op, (alg, raw_op) in RAW_OPS.items():
        rates[op] = _ops_per_cpu_second(tables[alg][raw_op], seconds)
    return rates


def _ops_per_cpu_second(fn: Callable[[], Any], seconds: float) -> float:
    fn()
    n, start = 0, time.process_time()
    batch = 8
    while True:
        for _ in range(batch):
            fn()
        n += batch
        spent = time.process_time() - start
        if spent >= seconds:
            return n / spent
        batch = min(batch * 2, 256)


# ---- runs -----------------------------------------------------------------------------------------


@dataclass
class Row:
    """One measured (or skipped) run and what it is compared with."""

    suite: str  # "tls" | "api"
    server: str  # "qpher" | "nginx"
    kind: str  # "handshake" | "keepalive" | an API operation | "healthz"
    group: str
    concurrency: int
    result: LoadResult | None = None
    server_cpu_s: float = 0.0
    server_cores: float = 0.0
    skipped: str = ""
    raw_rate: float | None = None  # api: raw single-core library rate (per item)
    healthz_rate: float | None = None  # api: the gateway's keep-alive /healthz rate, same concurrency
    backend: str | None = None  # api: the gateway's crypto backend
    items: int = 1  # operations per request (a batch): rate and CPU are per item

    @property
    def rate(self) -> float:
        """Operations per second: requests/s times ``items``."""
        return self.result.rate * self.items if self.result else 0.0

    @property
    def request_rate(self) -> float:
        return self.result.rate if self.result else 0.0

    @property
    def cpu_us_per_op(self) -> float | None:
        if not self.result or not self.result.ok:
            return None
        return self.server_cpu_s / (self.result.ok * self.items) * 1e6

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "suite": self.suite, "server": self.server, "kind": self.kind, "group": self.group,
            "concurrency": self.concurrency,
        }
        if self.backend is not None:
            out["backend"] = self.backend
        if self.items != 1:
            out["items_per_request"] = self.items
            out["items_per_s"] = round(self.rate, 1)
        if self.skipped:
            out["skipped"] = self.skipped
            return out
        assert self.result is not None
        out.update(self.result.summary())
        out["server_cpu_s"] = round(self.server_cpu_s, 3)
        out["server_cores"] = round(self.server_cores, 3)
        cpu = self.cpu_us_per_op
        out["server_cpu_us_per_op"] = round(cpu, 1) if cpu is not None else None
        if self.raw_rate is not None:
            out["raw_rate"] = round(self.raw_rate, 1)
            out["ratio_to_raw"] = round(self.rate / self.raw_rate, 4) if self.raw_rate else None
        if self.healthz_rate is not None:
            out["healthz_rate"] = round(self.healthz_rate, 1)
            out["ratio_to_healthz"] = (
                round(self.request_rate / self.healthz_rate, 4) if self.healthz_rate else None
            )
        return out


@dataclass
class Settings:
    seconds: float
    warmup: float
    clients: int
    handshake_concurrency: int
    keepalive_concurrency: int
    quiet: bool = False
    profile_pid: int | None = None  # the gateway runs under profiled_main: signal it around each window
    profiled_ops: int = 0  # completions measured while the gateway's profiler was on


def _measure(lg: LoadGenerator, spec: LoadSpec, pids: list[int], row: Row, st: Settings,
             also: Sequence[Callable[[float | None, float | None], None]] = ()) -> Row:
    """One load run of ``spec``; ``row`` gets its result and the CPU of the process trees of
    ``pids`` over the measured window (``also``: more window callbacks, e.g. a CPUWatch of a part)."""
    watch = CPUWatch(pids)
    profiled = st.profile_pid is not None and row.server == "qpher"

    def on_window(start: float | None, end: float | None) -> None:
        if profiled and start is not None:
            os.kill(st.profile_pid, signal.SIGUSR1)  # type: ignore[arg-type]
        watch(start, end)
        for extra in also:
            extra(start, end)
        if profiled and end is not None:
            os.kill(st.profile_pid, signal.SIGUSR2)  # type: ignore[arg-type]

    if not st.quiet:
        print(f"  {row.server:6} {row.kind:12} {row.group:15} c={row.concurrency:<3} ...", end="",
              file=sys.stderr, flush=True)
    try:
        row.result = lg.run(spec, on_window=on_window)
    except LoadGeneratorError as exc:
        row.skipped = f"failed: {exc}"
        if not st.quiet:
            print(f" {row.skipped}", file=sys.stderr)
        return row
    row.server_cpu_s, row.server_cores = watch.cpu, watch.cores
    if profiled:
        st.profiled_ops += row.result.completed
    if not st.quiet:
        r = row.result
        extra = f" errors {r.errors}" if r.errors else ""
        print(f" {r.rate:9.0f}/s  p50 {r.p50_ms:.2f} ms  p99 {r.p99_ms:.2f} ms{extra}", file=sys.stderr)
    return row


def tls_suite(lg: LoadGenerator, servers: list[tuple[str, int, str, list[int]]], st: Settings,
              only: str | None) -> list[Row]:
    """Handshakes/s (full; full waiting for the session ticket; resumed) and keep-alive
    /healthz req/s per server and group."""
    from .tls_extra_bench import resumed_handshake_spec

    rows = []
    kinds = [k for k in ("handshake", "ticketed", "resumed", "keepalive")
             if only in (None, k) or (only == "handshake" and k in ("ticketed", "resumed"))]
    for name, port, cafile, pids in servers:
        for group in GROUPS:
            p = probe(port, ClientTLS(group, cafile=cafile), request=HEALTHZ)
            for kind in kinds:
                if kind in ("ticketed", "resumed") and name != "qpher":
                    continue  # the reference nginx runs without session tickets (see nginx.py)
                conc = st.keepalive_concurrency if kind == "keepalive" else st.handshake_concurrency
                row = Row("tls", name, kind, group, conc)
                if not p.ok or p.status != 200 or p.group != group:
                    row.skipped = (f"unsupported: {p.error}" if not p.ok else
                                   f"probe got status {p.status}, group {p.group}")
                    rows.append(row)
                    continue
                if kind == "handshake":
                    # verified by the probe above; the load itself skips verification (client CPU)
                    spec = LoadSpec.handshakes(port, ClientTLS(group), connections=conc, seconds=st.seconds,
                                               warmup=st.warmup)
                elif kind == "ticketed":
                    # the same cycle as "resumed" (stay until the server's session ticket arrived),
                    # offering no session: the full-handshake baseline resumption is compared with
                    spec = LoadSpec.handshakes(port, ClientTLS(group, await_ticket=True), connections=conc,
                                               seconds=st.seconds, warmup=st.warmup)
                elif kind == "resumed":
                    spec = resumed_handshake_spec(port, group, concurrency=conc, seconds=st.seconds,
                                                  warmup=st.warmup)
                else:
                    spec = LoadSpec.keepalive(
                        port,
                        ClientTLS(group, cafile=cafile),
                        HEALTHZ,
                        connections=conc,
                        seconds=st.seconds,
                        warmup=st.warmup,
                    )
                rows.append(_measure(lg, spec, pids, row, st))
    return rows


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def api_requests(gw: GatewayProcess) -> dict[str, bytes]:
    """Create the keys and the fixed request bodies of every API operation (checked once each)."""
    keys = {}
    for name, alg in (("sig", "ml-dsa-65"), ("kem", "ml-kem-768"), ("enc", "ml-kem-768")):
        status, doc = gw.call("POST", "/v1/keys", {"algorithm": alg, "label": f"bench-{name}"})
        if status != 201 or "key_id" not in doc:
            raise BenchError(f"POST /v1/keys {alg}: status {status}: {_error_text(doc)}")
        keys[name] = doc["key_id"]
    msg = _b64(PAYLOAD)
    bodies: dict[str, tuple[str, dict[str, Any]]] = {
        "sign": ("/v1/sign", {"key_id": keys["sig"], "message": msg}),
        "encapsulate": ("/v1/kem/encapsulate", {"key_id": keys["kem"]}),
        "encrypt": ("/v1/encrypt", {"key_id": keys["enc"], "plaintext": msg}),
    }
    answers = {}
    for op, (path, body) in bodies.items():
        status, doc = gw.call("POST", path, body)
        if status != 200:
            raise BenchError(f"POST {path}: status {status}: {_error_text(doc)}")
        answers[op] = doc
    bodies["verify"] = ("/v1/verify", {"key_id": keys["sig"], "message": msg,
                                       "signature": answers["sign"]["signature"]})
    bodies["decapsulate"] = ("/v1/kem/decapsulate", {"key_id": keys["kem"],
                                                     "ciphertext": answers["encapsulate"]["ciphertext"]})
    bodies["decrypt"] = (
        "/v1/decrypt",
        {"key_id": keys["enc"], "ciphertext": answers["encrypt"]["ciphertext"]},
    )
    order = ("sign", "verify", "encapsulate", "decapsulate", "encrypt", "decrypt")
    requests = {}
    for op in order:
        path, body = bodies[op]
        raw = json.dumps(body, separators=(",", ":")).encode()
        requests[op] = build_request("POST", path, headers=gw.api_headers(json_body=True), body=raw)
    status, doc = gw.call("POST", "/v1/verify", bodies["verify"][1])
    if status != 200 or doc.get("valid") is not True:
        raise BenchError(f"POST /v1/verify of our own signature: status {status}, {doc!r:.200}")
    return requests


def _error_text(doc: dict[str, Any]) -> str:
    err = doc.get("error") if isinstance(doc, dict) else None
    return f"{err.get('code')}: {err.get('message')}" if isinstance(err, dict) else "(no error body)"


BATCH_ITEMS = 64


def api_suite(lg: LoadGenerator, gw: GatewayProcess, st: Settings, raw: dict[str, float],
              concurrencies: Sequence[int], backend: str | None = None) -> list[Row]:
    from .batch_bench import batch_request, check_batch

    requests = api_requests(gw)
    forward = build_request("GET", "/app/hello", headers=gw.api_headers(json_body=False))
    tls = ClientTLS("X25519MLKEM768", cafile=gw.ca_file)
    p = probe(gw.port, tls, request=forward)
    if not p.ok or p.status != 200:
        raise BenchError(f"GET /app/hello through the sidecar: {p.error or f'status {p.status}'}")
    requests["forward"] = forward
    status, doc = gw.call("POST", "/v1/keys", {"algorithm": "ml-dsa-65", "label": "bench-batch"})
    if status != 201 or "key_id" not in doc:
        raise BenchError(f"POST /v1/keys ml-dsa-65: status {status}: {_error_text(doc)}")
    batch = batch_request(gw.api_key, doc["key_id"], BATCH_ITEMS, PAYLOAD)
    check_batch(gw.port, gw.ca_file, batch, BATCH_ITEMS)
    requests["sign/batch"] = batch
    rows = []
    pids = gw.pids()
    for conc in concurrencies:
        spec = LoadSpec.keepalive(gw.port, tls, HEALTHZ, connections=conc, seconds=st.seconds,
                                  warmup=st.warmup)
        base = _measure(lg, spec, pids, Row("api", "qpher", "healthz", tls.group, conc, backend=backend), st)
        rows.append(base)
        for op, req in requests.items():
            items = BATCH_ITEMS if op == "sign/batch" else 1
            row = Row("api", "qpher", op, tls.group, conc, raw_rate=raw.get(op.split("/")[0]),
                      healthz_rate=base.request_rate if base.result else None, backend=backend,
                      items=items)
            rows.append(
                _measure(
                    lg,
                    LoadSpec.keepalive(
                        gw.port, tls, req, connections=conc, seconds=st.seconds, warmup=st.warmup
                    ),
                    pids,
                    row,
                    st,
                )
            )
    return rows


# ---- connection extras: memory per idle connection, first request with Nagle on ---------------------


@dataclass
class Extra:
    """A figure measured outside the load generator (memory, first-request latency)."""

    kind: str  # "idle_memory" | "first_request"
    server: str
    figures: dict[str, Any] = field(default_factory=dict)
    skipped: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "server": self.server}
        if self.skipped:
            out["skipped"] = self.skipped
        out.update(self.figures)
        return out


def idle_memory_extras(servers: list[tuple[str, int, str, list[int]]], connections: int,
                       quiet: bool) -> list[Extra]:
    from .conn_bench import idle_connection_memory

    out = []
    for name, port, cafile, pids in servers:
        group = "X25519MLKEM768" if name == "qpher" else "X25519"
        if not quiet:
            print(f"  {name:6} idle memory  {group:15} n={connections} ...", end="", file=sys.stderr,
                  flush=True)
        try:
            figures = idle_connection_memory(port, cafile, pids[0], connections=connections, group=group)
        except (OSError, RuntimeError) as exc:
            out.append(Extra("idle_memory", name, skipped=f"failed: {type(exc).__name__}: {exc}"))
        else:
            out.append(Extra("idle_memory", name, figures))
            if not quiet:
                print(f" {figures['bytes_per_idle_connection'] / 1024:.1f} KiB per connection, "
                      f"{_pct(figures['returned_after_close'])} returned after close", file=sys.stderr)
    return out


def first_request_extras(servers: list[tuple[str, int, str, list[int]]], n: int, quiet: bool) -> list[Extra]:
    from .tls_extra_bench import first_request_latency

    out = []
    for name, port, cafile, _pids in servers:
        if not quiet:
            print(f"  {name:6} first request (Nagle on) n={n} ...", end="", file=sys.stderr, flush=True)
        try:
            figures = first_request_latency(port, cafile, n=n)
        except (OSError, ValueError) as exc:
            out.append(Extra("first_request", name, skipped=f"failed: {type(exc).__name__}: {exc}"))
            continue
        out.append(Extra("first_request", name, figures))
        if not quiet:
            print(f" p50 {figures['p50_ms']} ms, max {figures['max_ms']} ms", file=sys.stderr)
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def format_extras(extras: list[Extra]) -> str:
    lines = []
    mem = [e for e in extras if e.kind == "idle_memory"]
    if mem:
        lines.append("memory per idle TLS connection (after a handshake and one GET /healthz), "
                     "server process RSS")
        for e in mem:
            if e.skipped:
                lines.append(f"  {e.server:7} {e.skipped}")
                continue
            f = e.figures
            lines.append(f"  {e.server:7} {f['group']:15} {f['connections']:5} connections: "
                         f"{f['bytes_per_idle_connection'] / 1024:6.1f} KiB each; "
                         f"RSS {f['rss_before_mb']} -> "
                         f"{f['rss_idle_mb']} MB idle -> {f['rss_after_close_mb']} MB after close "
                         f"({_pct(f['returned_after_close'])} returned)")
    first = [e for e in extras if e.kind == "first_request"]
    if first:
        lines.append("first request on a new connection, Nagle-on client (handshake not timed)")
        for e in first:
            if e.skipped:
                lines.append(f"  {e.server:7} {e.skipped}")
                continue
            f = e.figures
            lines.append(f"  {e.server:7} Python ssl client, {f['n']} connections: p50 {f['p50_ms']} ms, "
                         f"mean {f['mean_ms']} ms, max {f['max_ms']} ms, over 20 ms: {f['over_20ms']}")
    return "\n".join(lines)


# ---- the figures, in one table -------------------------------------------------------------


def headline(rows: list[Row], extras: list[Extra]) -> list[dict[str, Any]]:
    """Each figure the performance goals name, from this run's rows, with its reference (measured
    in the same run) and goal. Missing measurements are left out."""
    out: list[dict[str, Any]] = []
    ok = [r for r in rows if r.result is not None and r.result.ok]

    def find(suite: str, server: str, kind: str, group: str | None = None, conc: int | None = None,
             backend: str | None = None) -> Row | None:
        for r in ok:
            if (r.suite, r.server, r.kind) == (suite, server, kind) and group in (None, r.group) \
                    and conc in (None, r.concurrency) and backend in (None, r.backend):
                return r
        return None

    backends = sorted({r.backend for r in ok if r.backend})
    for b in backends:
        hz, enc = find("api", "qpher", "healthz", conc=64, backend=b), find("api", "qpher", "encapsulate",
                                                                            conc=64, backend=b)
        if hz and enc:
            out.append({"figure": f"encapsulate e2e / /healthz e2e, c=64 ({b})",
                        "value": round(enc.request_rate / hz.request_rate, 3), "goal": ">= 0.7"})
    for mode, goal_text in (("keepalive", "<= 8x nginx"), ("handshake", ">= 0.6")):
        gw = find("tls", "qpher", mode, "X25519MLKEM768") or find("tls", "qpher", mode, "X25519")
        ng = find("tls", "nginx", mode, "X25519")
        if gw and ng and gw.cpu_us_per_op and ng.cpu_us_per_op:
            if mode == "keepalive":
                out.append({"figure": f"keep-alive GET /healthz, gateway CPU per request ({gw.group}) "
                                      "vs nginx (X25519)",
                            "value": f"{gw.cpu_us_per_op:.0f} us vs {ng.cpu_us_per_op:.0f} us = "
                                     f"{gw.cpu_us_per_op / ng.cpu_us_per_op:.1f}x", "goal": goal_text})
            else:
                out.append({"figure": f"full TLS 1.3 handshake, CPU per handshake nginx/gateway "
                                      f"({gw.group} vs nginx X25519)",
                            "value": f"{ng.cpu_us_per_op:.0f} us / {gw.cpu_us_per_op:.0f} us = "
                                     f"{ng.cpu_us_per_op / gw.cpu_us_per_op:.2f}", "goal": goal_text})
    for group in ("X25519MLKEM768", "X25519"):
        full, resumed = find("tls", "qpher", "ticketed", group), find("tls", "qpher", "resumed", group)
        if full and resumed and resumed.result:
            out.append({"figure": f"resumed / full handshakes per second, same cycle ({group})",
                        "value": f"{resumed.rate:.0f} / {full.rate:.0f} = {resumed.rate / full.rate:.2f}x "
                                 f"({resumed.result.resumed}/{resumed.result.ok} resumed)",
                        "goal": ">= 3x"})
    for e in extras:
        if e.skipped:
            continue
        f = e.figures
        if e.kind == "first_request" and "p50_ms" in f:
            out.append({"figure": f"first request on a new connection, Nagle-on client ({e.server})",
                        "value": f"p50 {f['p50_ms']} ms, max {f.get('max_ms')} ms", "goal": "<= 1 ms"})
        if e.kind == "idle_memory":
            out.append({"figure": f"memory per idle TLS connection ({e.server}, {f['group']})",
                        "value": f"{f['bytes_per_idle_connection'] / 1024:.1f} KiB, "
                                 f"{_pct(f['returned_after_close'])} returned after close",
                        "goal": "<= 16 KiB, returned"})
    for b in backends:
        sign = find("api", "qpher", "sign", conc=1, backend=b)
        if sign and sign.result:
            out.append({"figure": f"ML-DSA-65 sign p50 at c=1 ({b})", "value": f"{sign.result.p50_ms:.2f} ms",
                        "goal": "<= 0.4 ms (liboqs)"})
        batches = [r for r in ok if r.kind == "sign/batch" and r.backend == b and r.raw_rate]
        if batches:
            best = max(batches, key=lambda r: r.rate)
            assert best.raw_rate is not None
            out.append({"figure": f"sign/batch of {BATCH_ITEMS}, signatures/s vs raw single core ({b}, "
                                  f"c={best.concurrency})",
                        "value": f"{best.rate:.0f} / {best.raw_rate:.0f} = {best.rate / best.raw_rate:.2f}",
                        "goal": ">= 0.9"})
        hz = find("api", "qpher", "healthz", conc=64, backend=b)
        for op in ("sign", "encapsulate"):
            r = find("api", "qpher", op, conc=64, backend=b)
            if hz and r and r.cpu_us_per_op and hz.cpu_us_per_op and r.raw_rate:
                crypto_us = 1e6 / r.raw_rate
                out.append({"figure": f"server CPU per {op} at c=64 ({b}): (op - crypto) / /healthz",
                            "value": f"({r.cpu_us_per_op:.0f} - {crypto_us:.0f}) / "
                                     f"{hz.cpu_us_per_op:.0f} us = "
                                     f"{(r.cpu_us_per_op - crypto_us) / hz.cpu_us_per_op:.2f}",
                            "goal": "<= 1.4"})
    return out


def format_headline(items: list[dict[str, Any]]) -> str:
    if not items:
        return ""
    width = max(len(i["figure"]) for i in items)
    lines = ["the performance figures (each against its reference in this run)"]
    lines += [f"  {i['figure']:{width}}  {i['value']!s:38}  goal {i['goal']}" for i in items]
    return "\n".join(lines)


# ---- server.workers: 1 against 2 ---------------------------------------------------------------------


def workers_compare(lg: LoadGenerator, st: Settings, backend: str | None, upstream_url: str | None,
                    log_level: str | None) -> list[Row]:
    """/healthz and sign at c=64 with ``server.workers`` 1 and 2 (separate gateways, same run)."""
    rows = []
    for workers in (1, 2):
        with GatewayProcess(upstream_url=upstream_url, backend=backend, log_level=log_level,
                            overrides={"server.workers": workers}) as gw:
            tls = ClientTLS("X25519MLKEM768", cafile=gw.ca_file)
            sign = api_requests(gw)["sign"]
            pids = gw.pids()
            for kind, req in (("healthz", HEALTHZ), ("sign", sign)):
                row = Row("workers", "qpher", kind, tls.group, 64, backend=backend)
                row.skipped = ""
                rows.append(_measure(lg, LoadSpec.keepalive(gw.port, tls, req, connections=64,
                                                            seconds=st.seconds, warmup=st.warmup),
                                     pids, row, st))
                row.group = f"workers={workers}"
    return rows


def format_workers(rows: list[Row]) -> str:
    lines = ["server.workers: 1 against 2 on this machine, keep-alive c=64 (X25519MLKEM768)"]
    by = {(r.kind, r.group): r for r in rows}
    for kind in ("healthz", "sign"):
        one, two = by.get((kind, "workers=1")), by.get((kind, "workers=2"))
        if one is None or two is None or not one.result or not two.result:
            continue
        lines.append(f"  {kind:8} 1 worker {one.rate:7.0f}/s ({one.server_cores:.2f} cores)   "
                     f"2 workers {two.rate:7.0f}/s ({two.server_cores:.2f} cores)   "
                     f"ratio {two.rate / one.rate if one.rate else 0:.2f}")
    return "\n".join(lines)


# ---- output -------------------------------------------------------------------------------------------


def _f(x: float | None, fmt: str = "{:.0f}") -> str:
    return "-" if x is None or x != x else fmt.format(x)


def _errors_text(r: LoadResult) -> str:
    parts = [f"{k}:{v}" for k, v in sorted(r.errors.items())]
    return ",".join(parts) if parts else "0"


def format_tls(rows: list[Row]) -> str:
    lines = ["TLS 1.3: handshakes/s -- handshake: full, closed at once; ticketed: full, closed once the "
             "session ticket arrived; resumed: offering the last ticket (resumed = how many the server "
             "resumed) -- and keep-alive GET /healthz requests/s"]
    h = (f"{'server':7} {'mode':10} {'group':15} {'conc':>4} {'rate/s':>9} {'p50 ms':>7} {'p99 ms':>7} "
         f"{'srv cores':>9} {'srv us/op':>9} {'cli cpu':>7} errors")
    lines += [h, "-" * len(h)]
    for r in rows:
        if r.skipped:
            lines.append(f"{r.server:7} {r.kind:10} {r.group:15} {r.concurrency:>4} {r.skipped}")
            continue
        res = r.result
        assert res is not None
        resumed = f" resumed {res.resumed}/{res.ok}" if r.kind == "resumed" else ""
        lines.append(f"{r.server:7} {r.kind:10} {r.group:15} {r.concurrency:>4} {res.rate:9.0f} "
                     f"{res.p50_ms:7.2f} {res.p99_ms:7.2f} {r.server_cores:9.2f} {_f(r.cpu_us_per_op):>9} "
                     f"{res.client_cpu_s / res.elapsed if res.elapsed else 0:7.2f} {_errors_text(res)}"
                     f"{resumed}")
    ratios = tls_ratios(rows)
    if ratios:
        lines.append("")
        lines.append(
            "gateway / nginx: rate ratio, and CPU-per-op ratio (nginx us/op / gateway us/op: the ratio "
            "one core of each would reach, independent of what the client took)"
        )
        for x in ratios:
            rate = x["rate_ratio"] or 0.0
            cpu = x.get("cpu_ratio")
            lines.append(f"  {x['mode']:10} gateway {x['group']:15} vs nginx {x['nginx_group']:7}: "
                         f"rate {rate:.3f} ({_one_in(rate)})"
                         + (f", CPU per op {cpu:.3f} ({_one_in(cpu)})" if cpu else ""))
    return "\n".join(lines)


def _one_in(ratio: float) -> str:
    return f"1/{1 / ratio:.1f}" if ratio > 0 else "-"


def tls_ratios(rows: list[Row]) -> list[dict[str, Any]]:
    """gateway/nginx per mode and gateway group: against nginx with the same group when it was
    measured, else against nginx X25519 (said in ``nginx_group``)."""
    measured = {(r.server, r.kind, r.group): r for r in rows if r.suite == "tls" and r.result and r.result.ok}
    out = []
    for (server, kind, group), r in measured.items():
        if server != "qpher":
            continue
        ng = measured.get(("nginx", kind, group)) or measured.get(("nginx", kind, "X25519"))
        if ng is None:
            continue
        item: dict[str, Any] = {"mode": kind, "group": group, "nginx_group": ng.group,
                                "rate_ratio": round(r.rate / ng.rate, 4) if ng.rate else None}
        if r.cpu_us_per_op and ng.cpu_us_per_op:
            item["cpu_ratio"] = round(ng.cpu_us_per_op / r.cpu_us_per_op, 4)
        out.append(item)
    return out


def format_api(rows: list[Row], backend: str) -> str:
    lines = [f"crypto API over keep-alive TLS (X25519MLKEM768), backend {backend}, 1 KiB payloads; "
             "raw = library, single core, same run; sign/batch: "
             f"{BATCH_ITEMS} signatures per request, rate and CPU per signature; /healthz: request rates"]
    h = (f"{'operation':12} {'conc':>4} {'ops/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'raw/s':>8} {'/raw':>6} "
         f"{'/healthz':>8} {'srv cores':>9} {'srv us/op':>9} errors")
    lines += [h, "-" * len(h)]
    for r in rows:
        if r.skipped:
            lines.append(f"{r.kind:12} {r.concurrency:>4} {r.skipped}")
            continue
        res = r.result
        assert res is not None
        to_raw = r.rate / r.raw_rate if r.raw_rate else None
        to_hz = r.request_rate / r.healthz_rate if r.healthz_rate else None
        lines.append(f"{r.kind:12} {r.concurrency:>4} {r.rate:8.0f} {res.p50_ms:7.2f} {res.p99_ms:7.2f} "
                     f"{_f(r.raw_rate):>8} {_f(to_raw, '{:.2f}'):>6} {_f(to_hz, '{:.2f}'):>8} "
                     f"{r.server_cores:9.2f} {_f(r.cpu_us_per_op):>9} {_errors_text(res)}")
    return "\n".join(lines)


def environment(backend: str | None, nginx_info: dict[str, Any] | None) -> dict[str, Any]:
    import cryptography
    import OpenSSL
    from cryptography.hazmat.backends.openssl.backend import backend as ossl

    env: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
        "cryptography": cryptography.__version__, "pyopenssl": OpenSSL.__version__,
        "openssl": ossl.openssl_version_text(), "backend": backend,
    }
    try:
        env["loadavg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    if nginx_info:
        env["nginx"] = nginx_info
    return env


# ---- main -------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="qpher-proxy bench gateway",
        description=__doc__.split("\n")[0].replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--suite", choices=("tls", "api", "all"), default="all",
                    help="tls: handshakes/s and keep-alive /healthz requests/s, beside nginx; api: /v1 "
                         "requests/s, p50 and p99 beside the raw library; all: both (default)")
    ap.add_argument(
        "--only",
        choices=("handshake", "keepalive", "api"),
        help="only this kind of run (handshake/keepalive imply --suite tls, api implies --suite api; "
             "handshake includes the ticketed and resumed runs)",
    )
    ap.add_argument("--quick", action="store_true", help="short runs (the whole benchmark in about a minute)")
    ap.add_argument("--seconds", type=float, help="measured seconds per run (default 5, --quick 1)")
    ap.add_argument(
        "--warmup", type=float, help="unmeasured seconds before each run (default 0.5, --quick 0.25)"
    )
    ap.add_argument("--clients", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                    help="load generator processes (default: CPUs - 1)")
    ap.add_argument("--handshake-concurrency", type=int, default=8, help="handshakes in flight (default 8)")
    ap.add_argument("--connections", type=int, default=16,
                    help="keep-alive connections for the tls suite (default 16)")
    ap.add_argument("--concurrency", type=int, action="append",
                    help="api suite concurrency (repeatable; default 1, 16, 64)")
    ap.add_argument("--skip-nginx", action="store_true", help="do not start nginx")
    ap.add_argument("--nginx", help="nginx binary (default /usr/sbin/nginx)")
    ap.add_argument("--backend", choices=("auto", "openssl", "liboqs", "both"),
                    help="crypto.backend of the gateway (default: the config's, i.e. auto); both: the API "
                         "suite runs with openssl, then with liboqs (another gateway)")
    ap.add_argument("--memory-connections", type=int,
                    help="idle TLS connections for the memory figure (default 2000, --quick 300; 0: skip)")
    ap.add_argument("--workers-compare", action="store_true",
                    help="also measure /healthz and sign at c=64 with server.workers 1 and 2")
    ap.add_argument(
        "--raw-seconds", type=float, help="CPU seconds per raw library rate (default 1, --quick 0.3)"
    )
    ap.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                    help="logging.level of the gateway (default: the config's, i.e. info)")
    ap.add_argument("--keep-limits", action="store_true",
                    help="keep the demo plan's shipped rate limits (429s are then expected under load)")
    ap.add_argument("--profile", nargs="?", const="-", metavar="FILE",
                    help="run the gateway under cProfile; print the top functions per request "
                         "(and write the pstats file to FILE)")
    ap.add_argument("--keep-state", action="store_true", help="keep the temporary state directory")
    ap.add_argument("--gateway-python", metavar="PATH",
                    help="run the gateway with this interpreter (e.g. OTHER_CHECKOUT/.venv/bin/python): "
                         "measure another version of the gateway with this benchmark")
    ap.add_argument("--json", metavar="FILE", help="also write every figure as JSON to FILE ('-' = stdout)")
    ap.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(argv) if argv is not None else sys.argv[1:]
    args = build_parser().parse_args(argv)
    args.command_line = "qpher-proxy bench gateway " + " ".join(argv)
    if args.clients < 1:
        print("qpher-proxy bench gateway: --clients: expected >= 1", file=sys.stderr)
        return 2
    suite = args.suite
    if args.only in ("handshake", "keepalive"):
        suite = "tls"
    elif args.only == "api":
        suite = "api"
    st = Settings(
        seconds=args.seconds or (1.0 if args.quick else 5.0),
        warmup=args.warmup if args.warmup is not None else (0.25 if args.quick else 0.5),
        clients=args.clients, handshake_concurrency=args.handshake_concurrency,
        keepalive_concurrency=args.connections, quiet=args.quiet,
    )
    raw_seconds = args.raw_seconds or (0.3 if args.quick else 1.0)
    if args.gateway_python:
        global GATEWAY_PYTHON
        if args.profile:
            print("qpher-proxy bench gateway: --profile runs this checkout's gateway; drop --gateway-python",
                  file=sys.stderr)
            return 2
        GATEWAY_PYTHON = args.gateway_python
        args.command_line += f"  (gateway: {args.gateway_python})"
    if args.memory_connections is None:
        args.memory_connections = 300 if args.quick else 2000
    try:
        return _run(args, suite, st, raw_seconds)
    except BenchError as exc:
        print(f"qpher-proxy bench gateway: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _backends(choice: str | None, notes: list[str]) -> list[str]:
    """The backends the API suite measures: ``both`` is openssl then liboqs (when installed)."""
    wanted = ["openssl", "liboqs"] if choice == "both" else [choice or "auto"]
    out = []
    for name in wanted:
        resolved = resolve_backend(name)
        if name == "liboqs" and resolved != "liboqs":
            notes.append("liboqs backend not measured: the liboqs shared library is not installed here "
                         "(set OQS_INSTALL_PATH)")
            continue
        if resolved not in out:
            out.append(resolved)
    return out


def _run(args: argparse.Namespace, suite: str, st: Settings, raw_seconds: float) -> int:
    from .nginx import NginxServer, NginxUnavailable

    started = time.time()
    report: dict[str, Any] = {"command": args.command_line,
                              "settings": {"seconds": st.seconds, "warmup": st.warmup, "clients": st.clients,
                                           "handshake_concurrency": st.handshake_concurrency,
                                           "keepalive_connections": st.keepalive_concurrency},
                              "notes": []}
    notes: list[str] = report["notes"]
    backends = _backends(args.backend, notes) if suite in ("api", "all") else []
    backend = backends[0] if backends else None
    profile_path: Path | None = None
    tmp_profile = None
    if args.profile:
        if args.profile == "-":
            tmp_profile = tempfile.NamedTemporaryFile(prefix="qpher-profile-", suffix=".pstats", delete=False)
            tmp_profile.close()
            profile_path = Path(tmp_profile.name)
        else:
            profile_path = Path(args.profile).resolve()
    rows: list[Row] = []
    extras: list[Extra] = []
    nginx_meta = None
    raw_by_backend: dict[str, dict[str, float]] = {}
    with contextlib.ExitStack() as stack:
        upstream_url = None
        if suite in ("api", "all") or args.workers_compare:
            upstream_url = f"http://127.0.0.1:{stack.enter_context(trivial_upstream())}"
        gw = stack.enter_context(
            GatewayProcess(
                upstream_url=upstream_url,
                backend=backend if backend is not None else (
                    args.backend if args.backend not in (None, "both") else None),
                log_level=args.log_level,
                generous_limits=not args.keep_limits,
                profile_to=profile_path,
                keep_state=args.keep_state,
            )
        )
        notes.extend(gw.notes)
        if profile_path is not None:
            st.profile_pid = gw.pid
        if not st.quiet:
            print(f"gateway on 127.0.0.1:{gw.port} (pid {gw.pid}), state {gw.directory}", file=sys.stderr)
        servers = [("qpher", gw.port, gw.ca_file, gw.pids())]
        serving = [("qpher", gw.port, gw.ca_file, gw.serving_pids())]
        if suite in ("tls", "all") and not args.skip_nginx:
            try:
                ng = stack.enter_context(NginxServer(nginx=args.nginx))
            except NginxUnavailable as exc:
                notes.append(f"nginx not measured: {exc}")
                print(f"qpher-proxy bench gateway: {exc}", file=sys.stderr)
            else:
                nginx_meta = {"path": ng.path, "version": ng.info.version, "openssl": ng.info.openssl_running,
                              "groups": list(ng.groups), "pq_supported": ng.pq_supported}
                if not ng.pq_supported:
                    notes.append(f"nginx figures are for X25519 only: {ng.pq_reason}")
                servers.append(("nginx", ng.port, str(ng.ca_file), [ng.pid, *ng.worker_pids()]))
                serving.append(("nginx", ng.port, str(ng.ca_file), ng.worker_pids()))
        for b in backends:
            if not st.quiet:
                print(f"raw library rates ({b}, {raw_seconds:g} CPU s each) ...", file=sys.stderr)
            raw_by_backend[b] = raw_rates(b, raw_seconds)
        report["raw_rates"] = {b: {k: round(v, 1) for k, v in r.items()} for b, r in raw_by_backend.items()}
        with LoadGenerator(st.clients) as lg:
            if suite in ("tls", "all"):
                rows += tls_suite(lg, servers, st, args.only)
                if args.only is None and profile_path is None:
                    extras += first_request_extras(servers, 20 if args.quick else 50, st.quiet)
                    if args.memory_connections > 0:
                        extras += idle_memory_extras(serving, args.memory_connections, st.quiet)
            if suite in ("api", "all"):
                for n, b in enumerate(backends):
                    target = gw
                    if n > 0:  # another backend: another gateway, same upstream, same machine
                        target = stack.enter_context(GatewayProcess(
                            upstream_url=upstream_url, backend=b, log_level=args.log_level,
                            generous_limits=not args.keep_limits))
                    rows += api_suite(lg, target, st, raw_by_backend[b], args.concurrency or API_CONCURRENCY,
                                      backend=b)
            if args.workers_compare:
                rows += workers_compare(lg, st, backend, upstream_url, args.log_level)
    # everything stopped here (the gateway wrote its profile on exit)
    report["environment"] = environment(", ".join(backends) or None, nginx_meta)
    report["rows"] = [r.to_json() for r in rows]
    report["extras"] = [e.to_json() for e in extras]
    report["tls_ratios"] = tls_ratios(rows)
    report["headline"] = headline(rows, extras)
    report["elapsed_s"] = round(time.time() - started, 1)

    out: list[str] = []
    tls_rows = [r for r in rows if r.suite == "tls"]
    if tls_rows:
        out.append(format_tls(tls_rows))
    if extras:
        out.append(format_extras(extras))
    for b in backends:
        api_rows = [r for r in rows if r.suite == "api" and r.backend == b]
        if api_rows:
            out.append(format_api(api_rows, b))
    worker_rows = [r for r in rows if r.suite == "workers"]
    if worker_rows:
        out.append(format_workers(worker_rows))
    if report["headline"]:
        out.append(format_headline(report["headline"]))
    if profile_path is not None:
        out.append(format_profile(profile_path, st.profiled_ops))
        if tmp_profile is not None:
            os.unlink(profile_path)
        else:
            notes.append(f"profile written to {profile_path}")
    env = report["environment"]
    footer = [f"# {args.command_line}"]
    footer.append(f"# {env['cpus']} CPUs, load avg at start {env.get('loadavg_at_start')}, {env['openssl']}, "
               f"cryptography {env['cryptography']}, pyOpenSSL {env['pyopenssl']}"
               + (f", nginx {nginx_meta['version']} ({nginx_meta['openssl']})" if nginx_meta else ""))
    footer.append(
        f"# {st.clients} client process(es), {st.seconds:g} s per run after {st.warmup:g} s warm-up; "
        "the client shares the CPUs with the server: rates are floors"
    )
    footer += [f"# note: {n}" for n in notes]
    text = "\n\n".join(out) + "\n\n" + "\n".join(footer)
    if args.json == "-":
        print(json.dumps(report, indent=2))
    else:
        print(text)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    failed = [r for r in rows if r.skipped.startswith("failed")]
    return 1 if failed else 0


def profiled_main() -> None:
    """``python -c "...profiled_main()" OUT serve --config C``: the CLI with a profiler that
    SIGUSR1 turns on and SIGUSR2 turns off (writing OUT, cumulative over every window). So the
    profile covers exactly the measured windows: no start-up, no warm-up. (Wall-clock timer: a
    CPU-time timer costs a system call per event, which would multiply the overhead; the time
    spent waiting in epoll is reported apart as idle.)"""
    import cProfile

    out, argv = sys.argv[1], sys.argv[2:]
    prof = cProfile.Profile()

    def on(_sig: int, _frame: Any) -> None:
        prof.enable()

    def off(_sig: int, _frame: Any) -> None:
        prof.disable()
        prof.dump_stats(out)

    signal.signal(signal.SIGUSR1, on)
    signal.signal(signal.SIGUSR2, off)
    # `qpher-proxy serve` is a supervisor that serves no request: profile the gateway itself, run
    # in this process by serve() with its own KMS workers (the same request path, minus the uid
    # change and Landlock, which cost nothing per request).
    from qpher_proxy.config import load_config
    from qpher_proxy.server.serve import run

    if argv[:2] != ["serve", "--config"] or len(argv) != 3:
        raise SystemExit(f"profiled_main: expected serve --config FILE, got {argv!r}")
    raise SystemExit(run(load_config(argv[2])))


def format_profile(path: Path, requests: int) -> str:
    """Top functions of the gateway process by own CPU time, per request measured."""
    import io
    import pstats

    try:
        stats = pstats.Stats(str(path), stream=io.StringIO())
    except (OSError, TypeError, EOFError, ValueError) as exc:
        return f"profile: nothing written by the gateway ({type(exc).__name__})"
    per = max(requests, 1)
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    idle = sum(v[2] for k, v in raw.items() if "select.epoll" in k[2] and "poll" in k[2])
    busy = sum(v[2] for k, v in raw.items()) - idle
    entries = sorted(((k, v) for k, v in raw.items() if not ("select.epoll" in k[2] and "poll" in k[2])),
                     key=lambda kv: kv[1][2], reverse=True)
    lines = [f"gateway process profile (cProfile, measured windows only; KMS workers not included): "
             f"{requests} requests/handshakes, {busy / per * 1e6:.0f} us busy per request including the "
             f"profiler's own overhead (read the shares, not the absolute figures), idle in epoll "
             f"{idle / max(idle + busy, 1e-9):.0%}",
             f"{'own us/req':>10} {'cum us/req':>10} {'calls/req':>9}  function"]
    for (filename, line, func), (_cc, nc, tt, ct, _callers) in entries[:25]:
        short = filename.split("site-packages/")[-1].split("/work/main/")[-1]
        lines.append(f"{tt / per * 1e6:10.1f} {ct / per * 1e6:10.1f} {nc / per:9.2f}  {short}:{line}({func})")
    buckets: dict[str, float] = {}
    for (filename, _line, func), v in entries:
        b = profile_bucket(filename, func)
        buckets[b] = buckets.get(b, 0.0) + v[2]
    lines.append("")
    lines.append("own time by component: " + ", ".join(
        f"{name} {t / max(busy, 1e-9):.0%}" for name, t in sorted(buckets.items(), key=lambda kv: -kv[1])
        if t / max(busy, 1e-9) >= 0.01))
    return "\n".join(lines)


def profile_bucket(filename: str, func: str) -> str:
    """Which component a profile entry belongs to: a package (h11, trio, OpenSSL), one of ours
    (qpher_proxy.http, ...), a stdlib module, or a C call (socket system calls, OpenSSL)."""
    if filename == "~":  # a C function: "<method 'send' of '_socket.socket' objects>"
        if "_socket" in func or "select." in func:
            return "syscalls"
        if "_openssl" in func or "_cffi" in func:
            return "OpenSSL (C)"
        return "builtins"
    path = filename.replace("\\", "/")
    if "site-packages/" in path:
        top = path.split("site-packages/")[-1].split("/")[0]
        return "pyOpenSSL" if top == "OpenSSL" else top
    if "/qpher_proxy/" in path:
        parts = path.split("/qpher_proxy/")[-1].split("/")
        return "qpher_proxy." + (
            parts[0].removesuffix(".py") if len(parts) > 1 else parts[0].removesuffix(".py")
        )
    name = path.rsplit("/", 1)[-1].removesuffix(".py")
    parent = path.rsplit("/", 2)[-2] if path.count("/") >= 2 else ""
    return parent if parent in ("logging", "json", "asyncio", "email", "http") else name


if __name__ == "__main__":
    raise SystemExit(main())
