"""``qpher-proxy bench kms-tier``: the KMS over a socketpair next to a KMS node over PQ mutual TLS.

    qpher-proxy bench kms-tier                        # 3 s per run, under 2 minutes
    qpher-proxy bench kms-tier --quick --backend liboqs --json tier.json

Everything runs on 127.0.0.1 in one invocation, against throwaway state directories:

1. ``qpher-proxy init --internal-pki`` makes the PKI of the internal hop (ML-DSA-65 CA, gateway
   and KMS leaves).
2. **local**: a gateway (``gateway_bench.GatewayProcess``: init, plan limits raised, ``serve``)
   with ``kms.workers: 1``, its KMS worker behind a socketpair (the default).
3. **remote**: a KMS node (``qpher-proxy kms serve``: ``kms.workers: 1``, SQLite, the same crypto
   backend, the gateway's KEK) and a gateway with ``kms.mode: remote`` whose only endpoint is that
   node (``kms.connections_per_endpoint``: the default), over TLS 1.3, X25519MLKEM768 and ML-DSA-65
   certificates on both sides. The runs start once the gateway logged all its pool connections.

For each: ``POST /v1/sign`` (ML-DSA-65, 1 KiB) and ``POST /v1/kem/encapsulate`` (ML-KEM-768) at
concurrency 1 and 64 over keep-alive HTTPS (the load generator of ``gateway_bench``):
requests/s, p50, p99, and the server CPU per request over the measured window -- every process
of the gateway (supervisor, gateway, KMS worker) plus, for remote, the KMS node and its worker --
split into the gateway side and the KMS side (KMS worker; node + worker). Then remote - local:
the p50/p99 ratios and the CPU per request the TLS hop adds.

4. **Internal listener**: ``--handshake-clients`` processes, each a loop of blocking full TLS 1.3
   handshakes against the node with the gateway's own client context
   (``tls.internal.build_internal_client_context``, the gateway's ML-DSA-65 leaf), closed at once
   (no HELLO/READY: a completed handshake counts). A TLS 1.3 client finishes before the node has
   checked its certificate, so the node's log is read afterwards for refusals. Handshakes/s, and
   the node's CPU per handshake (node + its worker).

On a 2-core machine the load generator, the gateway, the node and the workers share the CPUs:
rates are floors and noisy from run to run; CPU per request is the steadier figure.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from typing import Any

from .gateway_bench import (
    READY_TIMEOUT,
    BenchError,
    GatewayProcess,
    Row,
    Settings,
    _cli,
    _errors_text,
    _f,
    _free_port,
    _measure,
    _tail,
    api_requests,
    environment,
    resolve_backend,
    stop_process,
)
from .loadgen import (
    ClientTLS,
    CPUWatch,
    LoadGenerator,
    LoadSpec,
    _merge,
    cpu_seconds,
    process_tree,
)

OPS = ("sign", "encapsulate")
CONCURRENCY = (1, 64)
GROUP = "X25519MLKEM768"
MODES = ("local", "remote")
KMS_WORKER_MODULE = b"qpher_proxy.kms.worker"


# ---- the PKI and the KMS node as a child process ---------------------------------------------------


def make_pki(directory: Path) -> Any:
    """``qpher-proxy init --internal-pki DIR``: the internal CA and the gateway/KMS leaves."""
    from qpher_proxy.pki import InternalPKI

    r = subprocess.run(_cli("init", "--internal-pki", str(directory)), capture_output=True, text=True,
                       timeout=120)
    if r.returncode != 0:
        raise BenchError(f"qpher-proxy init --internal-pki failed ({r.returncode}): "
                         f"{(r.stderr or r.stdout).strip()[-500:]}")
    return InternalPKI.at(directory)


@dataclass
class KMSNodeProcess:
    """``qpher-proxy kms serve -c kms.yaml`` in a temporary directory (SQLite, ``workers`` KMS
    workers, the PKI's KMS leaf, callers with the gateway URI), for the length of a ``with``."""

    pki: Any  # qpher_proxy.pki.InternalPKI
    kek_file: Path | None = None  # copied into the node's directory (set before entering)
    backend: str | None = None
    workers: int = 1
    port: int = field(default_factory=_free_port)
    directory: Path = field(init=False)
    _proc: subprocess.Popen[bytes] | None = field(init=False, default=None, repr=False)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.directory / "node.log"

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def pids(self) -> list[int]:
        """The node and its KMS workers."""
        return process_tree(self.pid) if self._proc is not None else []

    def log_count(self, text: str) -> int:
        try:
            return self.log_file.read_text(errors="replace").count(text)
        except OSError:
            return 0

    def __enter__(self) -> KMSNodeProcess:
        import yaml

        if self.kek_file is None:
            raise BenchError("KMSNodeProcess: no kek_file")
        self.directory = Path(tempfile.mkdtemp(prefix="qpher-bench-node-"))
        try:
            kek = self.directory / "kek.b64"
            shutil.copyfile(self.kek_file, kek)
            kek.chmod(0o600)
            leaf = self.pki.leaf("kms", "mldsa")
            doc: dict[str, Any] = {
                "kms": {"dir": str(self.directory / "kms"), "workers": self.workers, "user": None,
                        "kek": {"file": str(kek)}},
                "kms_node": {"listen": [self.endpoint], "cert_file": str(leaf.cert),
                             "key_file": str(leaf.key), "client_ca": str(self.pki.ca_bundle),
                             "client_uri": self.pki.uri("gateway")},
                "logging": {"format": "json", "level": "info"},
            }
            if self.backend:
                doc["crypto"] = {"backend": self.backend}
            cfg = self.directory / "kms.yaml"
            cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
            with open(self.log_file, "ab") as log:
                self._proc = subprocess.Popen(_cli("kms", "serve", "-c", str(cfg)), stdin=subprocess.DEVNULL,
                                              stdout=log, stderr=subprocess.STDOUT, cwd=self.directory,
                                              start_new_session=True)
            deadline = time.monotonic() + READY_TIMEOUT
            while self.log_count("KMS node serving") == 0:
                if self._proc.poll() is not None:
                    raise BenchError(f"qpher-proxy kms serve exited with status {self._proc.returncode}: "
                                     f"{_tail(self.log_file)}")
                if time.monotonic() > deadline:
                    raise BenchError(f"qpher-proxy kms serve did not start within {READY_TIMEOUT:g} s: "
                                     f"{_tail(self.log_file)}")
                time.sleep(0.05)  # polling a child process's log until it serves
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process(proc)
        shutil.rmtree(self.directory, ignore_errors=True)


def remote_overrides(pki: Any, node: KMSNodeProcess) -> dict[str, Any]:
    """The gateway's ``kms:`` section for a remote tier of one node (``init --internal-pki``'s)."""
    leaf = pki.leaf("gateway", "mldsa")
    return {"kms.mode": "remote", "kms.endpoints": [node.endpoint], "kms.client_cert_file": str(leaf.cert),
            "kms.client_key_file": str(leaf.key), "kms.ca_file": str(pki.ca_bundle),
            "kms.server_uri": pki.uri("kms")}


def wait_pool(gw: GatewayProcess, connections: int, timeout: float = READY_TIMEOUT) -> None:
    """Until the remote-mode gateway logged ``connections`` KMS node connections."""
    log = gw.directory / "serve.log"
    deadline = time.monotonic() + timeout
    while True:
        try:
            n = log.read_text(errors="replace").count("KMS node connected")
        except OSError:
            n = 0
        if n >= connections:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"the gateway connected {n} of {connections} KMS connections within "
                             f"{timeout:g} s: {_tail(log)}")
        time.sleep(0.05)  # polling a child process's log


# ---- sign / encapsulate, local against remote --------------------------------------------------------


@dataclass
class TierRow:
    """One API run and the part of its server CPU that the KMS side used."""

    row: Row
    kms_cpu_s: float = 0.0

    @property
    def mode(self) -> str:
        return self.row.server

    def per_request(self, cpu_s: float) -> float | None:
        res = self.row.result
        return cpu_s / res.ok * 1e6 if res is not None and res.ok else None

    @property
    def gateway_us(self) -> float | None:
        return self.per_request(self.row.server_cpu_s - self.kms_cpu_s)

    @property
    def kms_us(self) -> float | None:
        return self.per_request(self.kms_cpu_s)

    def to_json(self) -> dict[str, Any]:
        out = self.row.to_json()
        out["mode"] = out.pop("server")
        for name, value in (("gateway_cpu_us_per_op", self.gateway_us), ("kms_cpu_us_per_op", self.kms_us)):
            out[name] = round(value, 1) if value is not None else None
        return out


def kms_worker_pids(pids: list[int]) -> list[int]:
    """Of ``pids``, the KMS workers (``python -m qpher_proxy.kms.worker``)."""
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if KMS_WORKER_MODULE in f.read():
                    out.append(pid)
        except OSError:
            continue
    return out


def measure_mode(lg: LoadGenerator, gw: GatewayProcess, mode: str, kms_pids: list[int], st: Settings,
                 concurrencies: Sequence[int], backend: str) -> list[TierRow]:
    """sign and encapsulate at each concurrency against ``gw``; CPU of the gateway's tree and of
    ``kms_pids``' trees (the KMS side, counted once)."""
    status, info = gw.call("GET", "/v1/info")
    served_by = (info.get("backend") or {}).get("name") if status == 200 else None
    if served_by != backend:
        raise BenchError(f"{mode}: GET /v1/info says backend {served_by!r} (status {status}), "
                         f"expected {backend!r}")
    requests = api_requests(gw)
    tls = ClientTLS(GROUP, cafile=gw.ca_file)
    all_pids = sorted({*gw.pids(), *kms_pids})
    rows = []
    for op in OPS:
        for conc in concurrencies:
            kms = CPUWatch(kms_pids)
            row = Row("kms-tier", mode, op, GROUP, conc, backend=backend)
            spec = LoadSpec.keepalive(gw.port, tls, requests[op], connections=conc, seconds=st.seconds,
                                      warmup=st.warmup)
            _measure(lg, spec, all_pids, row, st, also=(kms,))
            rows.append(TierRow(row, kms.cpu))
    return rows


def differences(rows: list[TierRow]) -> list[dict[str, Any]]:
    """remote - local per operation and concurrency: latency ratios and the CPU the hop adds."""
    by = {(r.mode, r.row.kind, r.row.concurrency): r for r in rows if r.row.result and r.row.result.ok}
    out = []
    for (mode, op, conc), remote in by.items():
        local = by.get(("local", op, conc))
        if mode != "remote" or local is None:
            continue
        lr, rr = local.row, remote.row
        assert lr.result is not None and rr.result is not None
        item: dict[str, Any] = {
            "operation": op, "concurrency": conc,
            "p50_ratio": round(rr.result.p50_ms / lr.result.p50_ms, 3) if lr.result.p50_ms else None,
            "p99_ratio": round(rr.result.p99_ms / lr.result.p99_ms, 3) if lr.result.p99_ms else None,
            "p50_added_ms": round(rr.result.p50_ms - lr.result.p50_ms, 3),
            "rate_ratio": round(rr.rate / lr.rate, 3) if lr.rate else None,
        }
        for key, a, b in (("cpu_us_added", rr.cpu_us_per_op, lr.cpu_us_per_op),
                          ("gateway_cpu_us_added", remote.gateway_us, local.gateway_us),
                          ("kms_cpu_us_added", remote.kms_us, local.kms_us)):
            item[key] = round(a - b, 1) if a is not None and b is not None else None
        out.append(item)
    return out


# ---- handshakes per second of the internal listener ---------------------------------------------------


def internal_client_context(pki_dir: str) -> Any:
    """The gateway's own client context for the internal hop (its ML-DSA-65 leaf)."""
    from qpher_proxy.pki import InternalPKI
    from qpher_proxy.tls.internal import InternalTLSSettings, build_internal_client_context

    pki = InternalPKI.at(pki_dir)
    leaf = pki.leaf("gateway", "mldsa")
    return build_internal_client_context(InternalTLSSettings(
        cert_file=leaf.cert, key_file=leaf.key, ca_file=pki.ca_bundle, peer_uri=pki.uri("kms")))


def _handshake_client(pipe: Pipe, port: int, pki_dir: str, warmup: float, seconds: float, start: Any) -> None:
    """One client process: blocking full handshakes, closed at once, from the common start
    (``start``: a barrier) for ``warmup`` + ``seconds``; the measured ones sent back in
    ``loadgen``'s result shape."""
    import signal
    import socket

    from OpenSSL import SSL

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ctx = internal_client_context(pki_dir)
    except Exception as exc:  # reported to the parent as one line
        start.abort()
        pipe.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    start.wait()
    window_start = time.monotonic() + warmup
    window_end = window_start + seconds
    ok, latencies = 0, array.array("d")
    errors: Counter[str] = Counter()
    samples: dict[str, str] = {}
    negotiated: Counter[str] = Counter()
    cpu0: float | None = None
    while (t0 := time.monotonic()) < window_end:
        if cpu0 is None and t0 >= window_start:
            cpu0 = cpu_seconds()
        try:
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn = SSL.Connection(ctx, sock)
                conn.set_connect_state()
                conn.do_handshake()
                t1 = time.monotonic()
                group = conn.get_group_name()
        except (SSL.Error, OSError) as exc:
            if t0 >= window_start:
                kind = "tls" if isinstance(exc, SSL.Error) else type(exc).__name__
                errors[kind] += 1
                samples.setdefault(kind, str(exc)[:200])
            time.sleep(0.001)  # a refusing or absent listener must not become a busy loop
            continue
        if window_start <= t1 <= window_end:
            ok += 1
            latencies.append(t1 - t0)
            negotiated[group or "?"] += 1
    elapsed = seconds if cpu0 is not None else 1e-9
    pipe.send(("result", {"ok": ok, "elapsed": elapsed, "latencies": latencies.tobytes(), "statuses": {},
                          "errors": dict(errors), "samples": samples, "negotiated": dict(negotiated),
                          "cpu": cpu_seconds() - (cpu0 if cpu0 is not None else cpu_seconds())}))


def internal_handshakes(node: KMSNodeProcess, pki_dir: Path, clients: int, st: Settings) -> Row:
    """Full handshakes/s of the node's listener from ``clients`` processes, and the node's CPU."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(clients + 1)
    pipes, procs = [], []
    row = Row("kms-tier", "node", "handshake", GROUP, clients)
    refused_before = node.log_count("refused")
    try:
        for _ in range(clients):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_handshake_client, daemon=True, name="qpher-bench-handshakes",
                               args=(child, node.port, str(pki_dir), st.warmup, st.seconds, barrier))
            proc.start()
            child.close()
            pipes.append(parent)
            procs.append(proc)
        if not st.quiet:
            print(f"  node   handshake    {GROUP:15} clients={clients} ...", end="", file=sys.stderr,
                  flush=True)
        watch = CPUWatch(node.pids())
        try:
            barrier.wait(READY_TIMEOUT)
        except threading.BrokenBarrierError:  # a client failed to set up, or timed out
            detail = next((p.recv()[1] for p in pipes if p.poll(1)), "a client did not start")
            raise BenchError(f"handshake clients: {detail}") from None
        time.sleep(st.warmup)
        watch(time.monotonic(), None)
        results = []
        for p in pipes:
            if not p.poll(st.seconds + 60):
                raise BenchError("a handshake client did not answer")
            kind, detail = p.recv()
            if kind != "result":
                raise BenchError(f"handshake client: {detail}")
            results.append(detail)
        watch(None, time.monotonic())
    finally:
        for p in pipes:
            p.close()
        for proc in procs:
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
                proc.join()
    spec = LoadSpec.handshakes(node.port, ClientTLS(GROUP), connections=clients, seconds=st.seconds,
                               warmup=st.warmup)
    row.result = _merge(spec, clients, results)
    row.server_cpu_s, row.server_cores = watch.cpu, watch.cores
    row.skipped = ""
    refused = node.log_count("refused") - refused_before
    if refused:  # a TLS 1.3 client finishes first: the node's refusal is in its log only
        row.result = replace(row.result, errors={**row.result.errors, "refused by the node": refused})
    if not st.quiet:
        r = row.result
        print(f" {r.rate:9.0f}/s  p50 {r.p50_ms:.2f} ms  p99 {r.p99_ms:.2f} ms  "
              f"node {row.server_cores:.2f} cores" + (f"  errors {_errors_text(r)}" if r.errors else ""),
              file=sys.stderr)
    return row


# ---- output ---------------------------------------------------------------------------------------


def format_api(rows: list[TierRow], backend: str) -> str:
    lines = [f"KMS tier, backend {backend}: POST /v1/sign (ML-DSA-65, 1 KiB) and /v1/kem/encapsulate "
             f"(ML-KEM-768) over keep-alive HTTPS ({GROUP}); local = KMS worker over a socketpair, remote = "
             "KMS node over TLS 1.3 X25519MLKEM768 + ML-DSA-65 mutual TLS on loopback; 1 KMS worker each. "
             "srv = every server process (remote: gateway + node + worker); gw = gateway side, kms = KMS "
             "worker (remote: node + worker)"]
    h = (f"{'operation':12} {'conc':>4} {'mode':6} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'srv cores':>9} "
         f"{'srv us/req':>10} {'gw us':>6} {'kms us':>6} errors")
    lines += [h, "-" * len(h)]
    for t in rows:
        r = t.row
        if r.skipped or r.result is None:
            lines.append(f"{r.kind:12} {r.concurrency:>4} {t.mode:6} {r.skipped}")
            continue
        res = r.result
        lines.append(f"{r.kind:12} {r.concurrency:>4} {t.mode:6} {r.rate:8.0f} {res.p50_ms:7.2f} "
                     f"{res.p99_ms:7.2f} {r.server_cores:9.2f} {_f(r.cpu_us_per_op):>10} "
                     f"{_f(t.gateway_us):>6} {_f(t.kms_us):>6} {_errors_text(res)}")
    return "\n".join(lines)


def format_differences(items: list[dict[str, Any]]) -> str:
    if not items:
        return ""
    lines = ["remote - local, same run: latency ratios, and the server CPU per request the TLS hop adds "
             "(gateway side + KMS side)"]
    h = (f"{'operation':12} {'conc':>4} {'p50 ratio':>9} {'p50 added':>9} {'p99 ratio':>9} "
         f"{'req/s ratio':>11} {'CPU us/req added':>16} {'(gw':>6} {'+ kms)':>7}")
    lines += [h, "-" * len(h)]
    for i in items:
        lines.append(f"{i['operation']:12} {i['concurrency']:>4} {_f(i['p50_ratio'], '{:.2f}x'):>9} "
                     f"{_f(i['p50_added_ms'], '{:+.2f} ms'):>9} {_f(i['p99_ratio'], '{:.2f}x'):>9} "
                     f"{_f(i['rate_ratio'], '{:.2f}x'):>11} {_f(i['cpu_us_added'], '{:+.0f}'):>16} "
                     f"{_f(i['gateway_cpu_us_added'], '{:+.0f}'):>6} "
                     f"{_f(i['kms_cpu_us_added'], '{:+.0f}'):>7}")
    return "\n".join(lines)


def format_handshakes(row: Row) -> str:
    lines = [f"internal listener (kms serve): full TLS 1.3 handshakes, {GROUP} only, ML-DSA-65 certificates "
             f"both ways (the gateway's client context), closed at once; {row.concurrency} client processes, "
             "blocking pyOpenSSL, one handshake in flight each; node = the node process and its worker"]
    if row.skipped or row.result is None:
        return "\n".join([*lines, f"  {row.skipped}"])
    res = row.result
    client_us = res.client_cpu_s / res.ok * 1e6 if res.ok else None
    per_core = 1e6 / row.cpu_us_per_op if row.cpu_us_per_op else None
    lines.append(f"  {res.rate:.0f} handshakes/s  p50 {res.p50_ms:.2f} ms  p99 {res.p99_ms:.2f} ms  "
                 f"node {row.server_cores:.2f} cores, {_f(row.cpu_us_per_op)} us CPU per handshake "
                 f"(= {_f(per_core)}/s per node core; the node accepts on one process)  "
                 f"client {_f(client_us)} us CPU per handshake  negotiated {res.negotiated}  "
                 f"errors {_errors_text(res)}")
    return "\n".join(lines)


# ---- main -----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="qpher-proxy bench kms-tier", description=__doc__.split("\n")[0]
                                 .replace("``", ""), formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, help="measured seconds per run (default 3, --quick 1)")
    ap.add_argument("--warmup", type=float,
                    help="unmeasured seconds before each run (default 0.5, --quick 0.25)")
    ap.add_argument("--quick", action="store_true", help="1 s runs (the whole benchmark in about 20 s)")
    ap.add_argument("--backend", choices=("auto", "openssl", "liboqs"), default="auto",
                    help="crypto.backend of the gateway and the node (default auto)")
    ap.add_argument("--concurrency", type=int, action="append",
                    help="keep-alive connections per API run (repeatable; default 1 and 64)")
    ap.add_argument("--clients", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                    help="load generator processes for the API runs (default: CPUs - 1)")
    ap.add_argument("--handshake-clients", type=int, default=4,
                    help="client processes of the handshake run (default 4)")
    ap.add_argument("--json", metavar="FILE", help="also write every figure as JSON to FILE ('-' = stdout)")
    ap.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(argv) if argv is not None else sys.argv[1:]
    args = build_parser().parse_args(argv)
    if args.clients < 1 or args.handshake_clients < 1:
        print("qpher-proxy bench kms-tier: --clients and --handshake-clients: expected >= 1", file=sys.stderr)
        return 2
    st = Settings(seconds=args.seconds or (1.0 if args.quick else 3.0),
                  warmup=args.warmup if args.warmup is not None else (0.25 if args.quick else 0.5),
                  clients=args.clients, handshake_concurrency=args.handshake_clients,
                  keepalive_concurrency=max(args.concurrency or CONCURRENCY), quiet=args.quiet)
    command = "qpher-proxy bench kms-tier " + " ".join(argv)
    try:
        return _run(args, st, command)
    except BenchError as exc:
        print(f"qpher-proxy bench kms-tier: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _run(args: argparse.Namespace, st: Settings, command: str) -> int:
    started = time.time()
    backend = resolve_backend(args.backend)
    notes: list[str] = []
    if args.backend == "liboqs" and backend != "liboqs":
        raise BenchError("--backend liboqs: the liboqs shared library is not installed here "
                         "(set OQS_INSTALL_PATH)")
    concurrencies = args.concurrency or CONCURRENCY
    env = environment(backend, None)
    rows: list[TierRow] = []
    with contextlib.ExitStack() as stack:
        tmp = Path(tempfile.mkdtemp(prefix="qpher-bench-tier-"))
        stack.callback(shutil.rmtree, tmp, True)
        pki = make_pki(tmp / "pki")
        lg = stack.enter_context(LoadGenerator(args.clients))
        with GatewayProcess(backend=backend, overrides={"kms.workers": 1}) as gw:
            notes.extend(gw.notes)
            if not st.quiet:
                print(f"local gateway on 127.0.0.1:{gw.port} (pid {gw.pid})", file=sys.stderr)
            rows += measure_mode(lg, gw, "local", kms_worker_pids(gw.pids()), st, concurrencies, backend)
        node = KMSNodeProcess(pki, backend=backend, workers=1)

        def start_node(gw: GatewayProcess) -> None:  # between the gateway's init and its serve
            node.kek_file = gw.directory / "kek" / "kek.b64"  # the node uses the gateway's KEK
            stack.enter_context(node)

        remote = stack.enter_context(GatewayProcess(backend=backend, overrides=remote_overrides(pki, node),
                                                    before_start=start_node))
        from qpher_proxy.config.model import KMSConfig

        pool = KMSConfig().connections_per_endpoint
        wait_pool(remote, pool)
        if not st.quiet:
            print(f"KMS node on {node.endpoint} (pid {node.pid}), remote gateway on 127.0.0.1:{remote.port} "
                  f"(pid {remote.pid}, {pool} connections)", file=sys.stderr)
        rows += measure_mode(lg, remote, "remote", [node.pid], st, concurrencies, backend)
        handshakes = internal_handshakes(node, tmp / "pki", args.handshake_clients, st)
    diffs = differences(rows)
    report: dict[str, Any] = {
        "command": command,
        "settings": {"seconds": st.seconds, "warmup": st.warmup, "clients": st.clients,
                     "handshake_clients": args.handshake_clients, "connections_per_endpoint": pool},
        "environment": env, "rows": [t.to_json() for t in rows], "differences": diffs,
        "handshakes": handshakes.to_json(), "notes": notes, "elapsed_s": round(time.time() - started, 1),
    }
    if handshakes.result is not None and handshakes.result.ok:
        report["handshakes"]["client_cpu_us_per_op"] = round(
            handshakes.result.client_cpu_s / handshakes.result.ok * 1e6, 1)
    if handshakes.cpu_us_per_op:
        report["handshakes"]["per_node_core"] = round(1e6 / handshakes.cpu_us_per_op, 1)
    footer = [f"# {command}",
              f"# {env['cpus']} CPUs, load avg at start {env.get('loadavg_at_start')}, {env['openssl']}, "
              f"cryptography {env['cryptography']}, pyOpenSSL {env['pyopenssl']}",
              f"# {st.clients} load generator process(es), {st.seconds:g} s per run after {st.warmup:g} s "
              f"warm-up, {report['elapsed_s']:g} s in all; the clients share the CPUs with the servers: "
              "rates are floors and noisy, CPU per request is the steadier figure"]
    footer += [f"# note: {n}" for n in notes]
    text = "\n\n".join(s for s in (format_api(rows, backend), format_differences(diffs),
                                   format_handshakes(handshakes)) if s) + "\n\n" + "\n".join(footer)
    if args.json == "-":
        print(json.dumps(report, indent=2))
    else:
        print(text)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    failed = [t for t in rows if t.row.skipped] + ([handshakes] if handshakes.skipped else [])
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
