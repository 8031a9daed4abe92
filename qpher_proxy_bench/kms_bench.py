"""KMS round trips: ML-DSA-65 sign and ML-KEM-768 decapsulate through the socketpair.

    python -m qpher_proxy_bench.kms_bench --quick
    python -m qpher_proxy_bench.kms_bench --duration 5 --backend liboqs --json

In one run, for 1 and 64 requests in flight (``--inflight``):

* ``socketpair echo``: a bare baseline. A child process echoes raw bytes on a socketpair
  (blocking ``recv_into``/``sendall``, no decoding); the gateway side uses the same trio
  machinery as the KMS client (one reader task with a reusable receive buffer waking the
  waiting task by a 4-byte id; a lone request may keep the loop awake for its answer for up
  to ``--spin-us``, chosen as the client chooses). This is what moving 64 bytes to another
  process and back costs here.
* ``kms ping``: the full protocol (token, tenant context, op, args; token check and dispatch
  in the worker) with no key work. ``ping / echo`` is the protocol's overhead ratio.
* ``kms sign ml-dsa-65`` and ``kms decapsulate ml-kem-768`` through a real KMS worker
  (``--workers``, default 1), next to ``in-process``: the same backend call in this process.

Requests per second are over the whole measurement; p50/p99 are per request; ``cpu us`` is
the CPU time of this process (the gateway side) per request, ``kms cpu`` that of the KMS
worker processes (from /proc, at clock-tick resolution). On a machine shared with other
work, treat the numbers as relative to each other within one run. ``--spin-us 0`` measures
the client (and the echo baseline) without the spin.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

from qpher_proxy.kms.client.pool import DEFAULT_SPIN, _LoneTrips

from .loadgen import process_cpu_seconds

ECHO_BYTES = 64


# ---- the echo child ------------------------------------------------------------------------


def _echo_child(fd: int) -> int:
    sock = socket.socket(fileno=fd)
    buf = bytearray(256 * 1024)
    view = memoryview(buf)
    while True:
        n = sock.recv_into(buf)
        if not n:
            return 0
        sock.sendall(view[:n])


# ---- measurement -------------------------------------------------------------------------


def _stats(name: str, latencies: list[float], elapsed: float, cpu: float, *, inflight: int) -> dict[str, Any]:
    lat = sorted(latencies)
    n = len(lat)
    return {
        "name": name,
        "inflight": inflight,
        "requests": n,
        "rps": n / elapsed if elapsed > 0 else 0.0,
        "p50_us": lat[n // 2] * 1e6 if n else 0.0,
        "p99_us": lat[min(n - 1, int(n * 0.99))] * 1e6 if n else 0.0,
        "us_per_req": elapsed / n * 1e6 if n else 0.0,
        "cpu_us_per_req": cpu / n * 1e6 if n else 0.0,
    }


async def _drive(
    op: Callable[[], Awaitable[Any]], inflight: int, duration: float,
    on_start: Callable[[], None] | None = None,
) -> tuple[list[float], float, float]:
    import trio

    latencies: list[float] = []
    perf = time.perf_counter
    # warm-up
    warm_until = perf() + min(0.3, duration / 4)
    while perf() < warm_until:
        await op()
    if on_start is not None:
        on_start()
    stop = perf() + duration

    async def worker() -> None:
        while perf() < stop:
            t0 = perf()
            await op()
            latencies.append(perf() - t0)

    start, cpu0 = perf(), time.process_time()
    async with trio.open_nursery() as nursery:
        for _ in range(inflight):
            nursery.start_soon(worker)
    return latencies, perf() - start, time.process_time() - cpu0


def _drive_sync(op: Callable[[], Any], duration: float) -> tuple[list[float], float, float]:
    perf = time.perf_counter
    warm_until = perf() + min(0.3, duration / 4)
    while perf() < warm_until:
        op()
    latencies: list[float] = []
    start, cpu0 = perf(), time.process_time()
    stop = start + duration
    while perf() < stop:
        t0 = perf()
        op()
        latencies.append(perf() - t0)
    return latencies, perf() - start, time.process_time() - cpu0


class _EchoClient:
    """The baseline's gateway side: send, park, be woken by the reader (no protocol), with the
    KMS client's spin for a lone request (``spin`` seconds at most)."""

    def __init__(self, sock: socket.socket, spin: float) -> None:
        import trio

        self.sock = sock
        sock.setblocking(False)
        self.waiting: dict[int, trio.lowlevel.Task] = {}
        self.next_id = 0
        self.payload = b"x" * (ECHO_BYTES - 4)
        self.spin = spin
        self.lone = _LoneTrips()  # the client's choice whether to spin
        self.spinner: trio.lowlevel.Task | None = None
        self.spin_id = 0
        self.spin_until = 0.0

    async def spinner_task(self) -> None:
        import trio

        me = trio.lowlevel.current_task()

        def abort(_: Any) -> trio.lowlevel.Abort:
            self.spinner = None
            return trio.lowlevel.Abort.SUCCEEDED

        while True:
            self.spinner = me
            await trio.lowlevel.wait_task_rescheduled(abort)
            while self.spin_id in self.waiting and time.perf_counter() < self.spin_until:
                await trio.lowlevel.cancel_shielded_checkpoint()

    async def reader(self) -> None:
        import outcome
        import trio

        buf = b""
        rbuf = bytearray(256 * 1024)
        while True:
            await trio.lowlevel.wait_readable(self.sock)
            try:
                n = self.sock.recv_into(rbuf)
            except BlockingIOError:
                continue
            if not n:
                return
            buf += rbuf[:n]
            n = len(buf) // ECHO_BYTES
            for i in range(n):
                (rid,) = struct.unpack_from(">I", buf, i * ECHO_BYTES)
                task = self.waiting.pop(rid, None)
                if task is not None:
                    trio.lowlevel.reschedule(task, outcome.Value(None))
            buf = buf[n * ECHO_BYTES :]

    async def echo(self) -> None:
        import trio

        self.next_id += 1
        rid = self.next_id
        spun = not self.waiting and self.spin > 0 and self.lone.choose(self.spin)
        self.waiting[rid] = trio.lowlevel.current_task()
        self.sock.send(struct.pack(">I", rid) + self.payload)
        if spun:
            self.spin_id, self.spin_until = rid, time.perf_counter() + self.spin
            spinner, self.spinner = self.spinner, None
            if spinner is not None:
                trio.lowlevel.reschedule(spinner)
        t0 = time.perf_counter()
        await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.SUCCEEDED)
        if spun:
            self.lone.note(time.perf_counter() - t0)


async def _bench(args: argparse.Namespace) -> list[dict[str, Any]]:
    import trio

    from qpher_proxy.context import TenantContext
    from qpher_proxy.crypto.algorithms import ML_DSA_65, ML_KEM_768
    from qpher_proxy.kms.launcher import open_kms
    from qpher_proxy.kms.wire.model import KEKSettings
    from qpher_proxy.kms.worker.backends import select_backend
    from qpher_proxy.kms.worker.kek import generate_kek_file

    results: list[dict[str, Any]] = []
    levels = [int(x) for x in args.inflight.split(",")]
    d = args.duration
    spin = args.spin_us / 1e6

    # 1. bare socketpair echo
    parent, child = socket.socketpair()
    proc = subprocess.Popen(
        [sys.executable, "-m", "qpher_proxy_bench.kms_bench", "--echo-child", str(child.fileno())],
        pass_fds=[child.fileno()],
    )
    child.close()
    try:
        echo = _EchoClient(parent, spin)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(echo.reader)
            nursery.start_soon(echo.spinner_task)
            for n in levels:
                results.append(_stats("socketpair echo", *await _drive(echo.echo, n, d), inflight=n))
            parent.shutdown(socket.SHUT_WR)
            nursery.cancel_scope.cancel()
    finally:
        trio.lowlevel.notify_closing(parent)
        parent.close()
        proc.wait()

    # 2. through the KMS
    backend = select_backend(args.backend)
    with tempfile.TemporaryDirectory() as tmp:
        kek_path = os.path.join(tmp, "kek.b64")
        generate_kek_file(kek_path)
        async with open_kms(
            kms_dir=os.path.join(tmp, "kms"), kek=KEKSettings("file", kek_path), workers=args.workers,
            backend=backend.name, request_timeout=None,
        ) as sup:
            client = sup.client
            client.spin = spin
            ctx = TenantContext("bench-tenant", "bench-request", "bench-key")
            sk = await client.create_key(ctx, algorithm="ml-dsa-65")
            kk = await client.create_key(ctx, algorithm="ml-kem-768")
            _ss, ct, _v = await client.encapsulate(ctx, kk.key_id)
            msg = b"m" * 64

            async def ping() -> None:
                await client.ping(ctx)

            async def sign() -> None:
                await client.sign(ctx, sk.key_id, msg)

            async def decap() -> None:
                await client.decapsulate(ctx, kk.key_id, ct)

            pids = [w.pid for w in client._live if w.pid is not None]

            async def measured(name: str, op: Callable[[], Awaitable[Any]], n: int) -> dict[str, Any]:
                w0 = [0.0]

                def start() -> None:
                    w0[0] = process_cpu_seconds(pids)

                row = _stats(name, *await _drive(op, n, d, start), inflight=n)
                spent = process_cpu_seconds(pids) - w0[0]  # clock ticks: ~10 ms resolution
                row["worker_cpu_us_per_req"] = spent / row["requests"] * 1e6 if row["requests"] else 0.0
                return row

            for n in levels:
                results.append(await measured("kms ping (protocol only)", ping, n))
            for name, op in (("kms sign ml-dsa-65", sign), ("kms decapsulate ml-kem-768", decap)):
                for n in levels:
                    results.append(await measured(name, op, n))

    # 3. in-process, same backend
    priv_sig = backend.generate(ML_DSA_65)
    priv_kem = backend.generate(ML_KEM_768)
    _ss, ct2 = priv_kem.public_key().encapsulate()
    results.append(
        _stats("in-process sign ml-dsa-65", *_drive_sync(lambda: priv_sig.sign(msg), d), inflight=1)
    )
    results.append(
        _stats(
            "in-process decapsulate ml-kem-768",
            *_drive_sync(lambda: priv_kem.decapsulate(ct2), d),
            inflight=1,
        )
    )
    for r in results:
        r["backend"] = backend.name
        r["spin_us"] = args.spin_us
    return results


def _print(results: list[dict[str, Any]], workers: int) -> None:
    print(
        f"KMS bench (backend {results[0]['backend']}, {workers} worker(s), {os.cpu_count()} cores, "
        f"client spin {results[0]['spin_us']:g} us)"
    )
    print(
        f"{'operation':36} {'inflight':>8} {'req/s':>10} {'us/req':>9} {'p50 us':>9} {'p99 us':>9} "
        f"{'cpu us':>7} {'kms cpu':>7}"
    )
    for r in results:
        print(
            f"{r['name']:36} {r['inflight']:>8} {r['rps']:>10.0f} {r['us_per_req']:>9.1f} "
            f"{r['p50_us']:>9.1f} {r['p99_us']:>9.1f} {r['cpu_us_per_req']:>7.1f} "
            f"{r['worker_cpu_us_per_req'] if 'worker_cpu_us_per_req' in r else float('nan'):>7.1f}"
        )
    by: dict[tuple[str, int], dict[str, Any]] = {(r["name"], r["inflight"]): r for r in results}
    for n in sorted({r["inflight"] for r in results if r["name"] == "socketpair echo"}):
        e = by.get(("socketpair echo", n))
        p = by.get(("kms ping (protocol only)", n))
        if e and p:
            print(
                f"protocol overhead at {n} in flight: ping {p['us_per_req']:.1f} us/req vs echo "
                f"{e['us_per_req']:.1f} us/req = {p['us_per_req'] / e['us_per_req']:.2f}x "
                f"(p50 {p['p50_us'] / e['p50_us']:.2f}x)"
            )
    for op, raw in (("kms sign ml-dsa-65", "in-process sign ml-dsa-65"),
                    ("kms decapsulate ml-kem-768", "in-process decapsulate ml-kem-768")):
        base = by.get((raw, 1))
        for n in sorted({r["inflight"] for r in results if r["name"] == op}):
            row = by.get((op, n))
            if base and row:
                print(f"{op} at {n} in flight: {row['rps'] / base['rps']:.2f}x the in-process rate")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="qpher-proxy bench kms", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="0.5 s per measurement")
    p.add_argument("--duration", type=float, default=2.0, help="seconds per measurement (default 2)")
    p.add_argument("--inflight", default="1,64", help="comma-separated concurrency levels (default 1,64)")
    p.add_argument("--workers", type=int, default=1, help="KMS worker processes (default 1)")
    p.add_argument("--backend", default="auto", choices=["auto", "openssl", "liboqs"])
    p.add_argument("--spin-us", type=float, default=DEFAULT_SPIN * 1e6,
                   help=f"client spin for a lone request, in us (default {DEFAULT_SPIN * 1e6:g}; 0 = off)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--echo-child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.echo_child is not None:
        return _echo_child(args.echo_child)
    if args.quick:
        args.duration = 0.5
    import trio

    results = trio.run(_bench, args)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        _print(results, args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
