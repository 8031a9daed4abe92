"""Keep-alive HTTP/1.1 micro-benchmark for the h11 server (plain TCP on 127.0.0.1).

    python -m qpher_proxy_bench.http_bench --quick
    python -m qpher_proxy_bench.http_bench --connections 32 --duration 10 --json

It starts the server under test in its own process (``--server qpher`` runs ``HTTPServer`` with a
``GET /healthz`` handler returning a small JSON document; ``--server minimal`` runs a bare
trio + h11 loop with no checks, the reference a "minimal prototype" would reach; ``both`` runs
one after the other in the same invocation), then drives it from ``--processes`` load-generator
processes, each holding its share of ``--connections`` keep-alive connections on raw non-blocking
sockets (no pipelining: one request in flight per connection). Prints requests/s and p50/p99
latency. ``--target HOST:PORT`` benchmarks an already running server instead.

The lead extends this to TLS; the load generator only needs a socket factory for that.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import selectors
import socket
import subprocess
import sys
import time
from typing import Any

REQUEST = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: qpher-bench\r\nAccept: */*\r\n\r\n"
WARMUP_S = 0.5


# ---- servers under test (run in a child process) ------------------------------------------


def _serve(kind: str, port: int) -> None:
    import trio

    async def main() -> None:
        listeners = await trio.open_tcp_listeners(port, host="127.0.0.1", backlog=1024)
        print(listeners[0].socket.getsockname()[1], flush=True)
        if kind == "minimal":
            await trio.serve_listeners(_minimal_connection, listeners)
        else:
            from qpher_proxy.http import HTTPLimits, HTTPServer, Request, Response

            health = {"status": "ok"}

            async def handler(request: Request) -> Response:
                if request.path == "/healthz":
                    return Response.json(200, health)
                return Response.json(404, {"error": {"code": "not_found"}})

            def on_done(request: Request, status: int, duration: float, sent: int) -> None:
                pass  # the lead's access log / metrics go here; keep the call in the measured path

            server = HTTPServer(handler, limits=HTTPLimits(max_connections=4096), on_request_done=on_done)
            await server.serve(listeners)

    trio.run(main)


async def _minimal_connection(stream: Any) -> None:
    """The reference: a bare trio + h11 keep-alive loop with no limits or checks."""
    import h11
    import trio

    conn = h11.Connection(h11.SERVER)
    body = b'{"status":"ok"}'
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return
            conn.receive_data(data)
            continue
        if type(event) is h11.Request:
            continue
        if type(event) is h11.EndOfMessage:
            out = conn.send(
                h11.Response(
                    status_code=200,
                    headers=[(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))],
                )
            )
            out += conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
            await stream.send_all(out)
            conn.start_next_cycle()
            continue
        return


# ---- load generator (run in worker processes) ---------------------------------------------


def _response_length(buf: bytes | bytearray) -> int:
    """Total length of the first complete response in buf, or 0 if incomplete."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return 0
    head = bytes(buf[:end]).lower()
    i = head.find(b"content-length:")
    if i < 0:
        raise RuntimeError("benchmark response without content-length")
    j = head.find(b"\r\n", i)
    length = int(head[i + 15 : j if j >= 0 else len(head)])
    total = end + 4 + length
    return total if len(buf) >= total else 0


def _worker(host: str, port: int, connections: int, duration: float, out: Any) -> None:
    sel = selectors.DefaultSelector()
    socks = []
    for _ in range(connections):
        s = socket.create_connection((host, port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        socks.append(s)
    start = time.perf_counter()
    measure_from = start + WARMUP_S
    stop = measure_from + duration
    latencies: list[float] = []
    errors = 0
    state: dict[socket.socket, list[Any]] = {}
    for s in socks:
        state[s] = [bytearray(), time.perf_counter()]
        s.send(REQUEST)
        sel.register(s, selectors.EVENT_READ)
    now = start
    while now < stop and state:
        for key, _ in sel.select(timeout=1.0):
            s = key.fileobj  # type: ignore[assignment]
            st = state[s]
            try:
                chunk = s.recv(65536)
            except OSError:
                chunk = b""
            if not chunk:
                errors += 1
                sel.unregister(s)
                del state[s]
                s.close()
                continue
            buf = st[0]
            buf += chunk
            n = _response_length(buf)
            if n:
                now = time.perf_counter()
                if buf[9:12] != b"200":
                    errors += 1
                if now >= measure_from:
                    latencies.append(now - st[1])
                del buf[:n]
                st[1] = now
                s.send(REQUEST)
        now = time.perf_counter()
    for s in socks:
        s.close()
    sel.close()
    out.put({"latencies": latencies, "errors": errors, "elapsed": max(now - measure_from, 1e-9)})


def run_load(host: str, port: int, *, connections: int, processes: int, duration: float) -> dict[str, Any]:
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    per = [connections // processes + (1 if i < connections % processes else 0) for i in range(processes)]
    procs = [ctx.Process(target=_worker, args=(host, port, n, duration, queue)) for n in per if n]
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    latencies = sorted(x for r in results for x in r["latencies"])
    elapsed = max(r["elapsed"] for r in results)
    n = len(latencies)

    def pct(q: float) -> float:
        return latencies[min(n - 1, int(q * n))] * 1e3 if n else float("nan")

    return {
        "requests": n,
        "errors": sum(r["errors"] for r in results),
        "rps": n / elapsed,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "connections": connections,
        "processes": len(procs),
        "duration_s": duration,
    }


def _start_server(kind: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "qpher_proxy_bench.http_bench", "--serve", kind],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait()
        raise SystemExit(f"{kind} server failed to start")
    return proc, int(line)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="qpher-proxy bench http", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 s per server, 16 connections")
    ap.add_argument("--duration", type=float, default=10.0, help="measured seconds per server")
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--processes", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--server", choices=("qpher", "minimal", "both"), default="both")
    ap.add_argument("--target", help="HOST:PORT of a running server (no server is started)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--serve", choices=("qpher", "minimal"), help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.serve:
        _serve(args.serve, args.port)
        return 0
    if args.quick:
        args.duration = min(args.duration, 3.0)
        args.connections = min(args.connections, 16)

    rows: list[dict[str, Any]] = []
    if args.target:
        host, _, port = args.target.rpartition(":")
        row = run_load(
            host, int(port), connections=args.connections, processes=args.processes, duration=args.duration
        )
        rows.append({"server": args.target, **row})
    else:
        kinds = ("qpher", "minimal") if args.server == "both" else (args.server,)
        for kind in kinds:
            proc, port = _start_server(kind)
            try:
                row = run_load(
                    "127.0.0.1",
                    port,
                    connections=args.connections,
                    processes=args.processes,
                    duration=args.duration,
                )
            finally:
                proc.terminate()
                proc.wait()
                if proc.stdout is not None:
                    proc.stdout.close()
            rows.append({"server": kind, **row})

    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"GET /healthz keep-alive, plain TCP, {args.connections} connections, "
              f"{args.processes} client process(es), {args.duration:g} s each")
        print(f"{'server':<10} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
        for r in rows:
            print(
                f"{r['server']:<10} {r['rps']:>10.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} "
                f"{r['errors']:>7}"
            )
        if len(rows) == 2 and rows[1]["rps"]:
            print(f"qpher / minimal = {rows[0]['rps'] / rows[1]['rps']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
