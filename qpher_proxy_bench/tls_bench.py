"""Full TLS 1.3 handshakes per second through ``TLSListener`` (no resumption, no HTTP).

    python -m qpher_proxy_bench.tls_bench --quick
    python -m qpher_proxy_bench.tls_bench --duration 10 --clients 4 --json

The server under test runs in this process: a ``TLSListener`` on 127.0.0.1 with a fresh dev
PKI (ECDSA P-256), whose connection handler completes the handshake and closes. The load comes
from ``--clients`` processes (spawned, so nothing is shared with trio), each running blocking
pyOpenSSL clients back to back: connect, full handshake offering only the group under test,
close. Certificate verification is off in the clients (it costs the client, not the server).
For each group the server-side count of completed handshakes (``on_handshake``) over the
measured window is the figure; the clients' own count is printed beside it.

On a shared 2-core machine the clients compete with the server for CPU: the figure is a floor
for what the server does with a core to itself.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import multiprocessing as mp
import os
import pstats
import resource
import socket
import tempfile
import time
from typing import Any

GROUPS = ("X25519MLKEM768", "X25519")


def _client(port: int, group: str, duration: float, start: Any, results: Any) -> None:
    from OpenSSL import SSL

    from qpher_proxy.tls import _openssl

    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_verify(SSL.VERIFY_NONE)
    if not _openssl.set_groups(ctx, (group,)):
        raise SystemExit(f"client: unknown group {group!r}")
    start.wait()
    done = failed = 0
    negotiated = None
    began = time.perf_counter()
    deadline = began + duration
    while time.perf_counter() < deadline:
        sock = socket.create_connection(("127.0.0.1", port))
        try:
            conn = SSL.Connection(ctx, sock)
            conn.set_connect_state()
            conn.do_handshake()
            negotiated = conn.get_group_name()
            done += 1
        except (SSL.Error, OSError):
            failed += 1
        finally:
            sock.close()
    results.put((done, failed, time.perf_counter() - began, negotiated))


def _cpu_seconds() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def _run_group(
    holder: Any, group: str, clients: int, duration: float, profiler: cProfile.Profile | None = None,
    server: str = "qpher",
) -> dict[str, Any]:
    import trio

    from qpher_proxy.tls import TLSInfo, TLSListener, TLSStream

    spawn = mp.get_context("spawn")
    start, results = spawn.Event(), spawn.Queue()
    listen_sock = socket.socket()
    listen_sock.bind(("127.0.0.1", 0))
    listen_sock.listen(4096)
    port = listen_sock.getsockname()[1]
    procs = [
        spawn.Process(target=_client, args=(port, group, duration, start, results)) for _ in range(clients)
    ]
    for proc in procs:
        proc.start()

    server_groups: dict[str | None, int] = {}
    window: dict[str, Any] = {}

    def counted(info: TLSInfo) -> None:
        server_groups[info.group] = server_groups.get(info.group, 0) + 1

    async def handler(stream: TLSStream) -> None:
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError:
            pass  # a client closing early is part of the load, not a server problem
        finally:
            await stream.aclose()

    async def minimal(transport: trio.SocketStream) -> None:
        # The reference: a bare trio + pyOpenSSL memory-BIO handshake loop with no checks,
        # no timeout, no error mapping (what a "minimal prototype" does).
        from OpenSSL import SSL

        conn = SSL.Connection(holder.context, None)
        conn.set_accept_state()
        try:
            while True:
                try:
                    conn.do_handshake()
                    break
                except SSL.WantReadError:
                    try:
                        out = conn.bio_read(65536)
                    except SSL.WantReadError:
                        out = b""
                    if out:
                        await transport.send_all(out)
                    data = await transport.receive_some(65536)
                    if not data:
                        return
                    conn.bio_write(data)
            server_groups[conn.get_group_name()] = server_groups.get(conn.get_group_name(), 0) + 1
            conn.shutdown()
            await transport.send_all(conn.bio_read(65536))
        except (SSL.Error, trio.BrokenResourceError):
            pass
        finally:
            await transport.aclose()

    async def main() -> list[tuple[int, int, float, str | None]]:
        transport_listener = trio.SocketListener(trio.socket.from_stdlib_socket(listen_sock))
        async with trio.open_nursery() as nursery:
            if server == "minimal":
                nursery.start_soon(trio.serve_listeners, minimal, [transport_listener])
            else:
                listener = TLSListener(transport_listener, holder, on_handshake=counted)
                nursery.start_soon(trio.serve_listeners, handler, [listener])
            await trio.sleep(0)  # let the accept loop start before the clients do
            window["start"], window["cpu0"] = time.perf_counter(), _cpu_seconds()
            if profiler is not None:
                profiler.enable()
            start.set()
            got = await trio.to_thread.run_sync(lambda: [results.get() for _ in procs])
            if profiler is not None:
                profiler.disable()
            window["end"], window["cpu1"] = time.perf_counter(), _cpu_seconds()
            nursery.cancel_scope.cancel()
        return got

    got = trio.run(main)
    for proc in procs:
        proc.join()
    elapsed = window["end"] - window["start"]
    cpu0, cpu1 = window["cpu0"], window["cpu1"]
    served = sum(server_groups.values())
    return {
        "server": server,
        "group": group,
        "clients": clients,
        "seconds": round(elapsed, 2),
        "server_handshakes": served,
        "server_handshakes_per_s": round(served / elapsed, 1),
        # Server CPU (this process, all threads) per handshake: the figure that does not depend
        # on how much CPU the clients and other tenants of the machine took.
        "server_cpu_us_per_handshake": round(
            sum(b - a for a, b in zip(cpu0, cpu1, strict=True)) / max(served, 1) * 1e6
        ),
        "server_user_us_per_handshake": round((cpu1[0] - cpu0[0]) / max(served, 1) * 1e6),
        "server_kernel_us_per_handshake": round((cpu1[1] - cpu0[1]) / max(served, 1) * 1e6),
        "client_handshakes_per_s": round(sum(d / t for d, _f, t, _g in got), 1),
        "client_failures": sum(f for _d, f, _t, _g in got),
        "negotiated": sorted({g for *_r, g in got if g}),
        "server_groups": {str(k): v for k, v in server_groups.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qpher-proxy bench tls", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 s per group")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per group")
    parser.add_argument("--clients", type=int, default=max(2, os.cpu_count() or 2), help="client processes")
    parser.add_argument("--groups", nargs="+", default=list(GROUPS))
    parser.add_argument("--server", choices=("qpher", "minimal", "both"), default="qpher",
                        help="TLSListener+TLSStream, a bare trio+pyOpenSSL loop (reference), or both")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--profile", type=int, metavar="N", default=0,
                        help="profile the server side and print its top N functions by own time")
    args = parser.parse_args(argv)
    duration = 3.0 if args.quick else args.duration

    from qpher_proxy.tls import ServerTLSContextHolder, TLSSettings
    from qpher_proxy.tls.certs import make_dev_pki

    with tempfile.TemporaryDirectory(prefix="qpher-tls-bench-") as tmp:
        pki = make_dev_pki(os.path.join(tmp, "certs"), mldsa=False)
        holder = ServerTLSContextHolder(TLSSettings(cert_file=pki.server_cert, key_file=pki.server_key))
        profiler = cProfile.Profile() if args.profile else None
        servers = ("qpher", "minimal") if args.server == "both" else (args.server,)
        rows = [
            _run_group(holder, group, args.clients, duration, profiler, server)
            for group in args.groups
            for server in servers
        ]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            print(
                f"{row['server']:>7} {row['group']:>14}: {row['server_handshakes_per_s']:8.1f} "
                "full handshakes/s "
                f"(server count {row['server_handshakes']} in {row['seconds']} s; clients saw "
                f"{row['client_handshakes_per_s']}/s, {row['client_failures']} failures; "
                f"{args.clients} client processes; negotiated {','.join(row['negotiated'])}; "
                f"server CPU {row['server_cpu_us_per_handshake']} us/handshake = "
                f"{row['server_user_us_per_handshake']} user + "
                f"{row['server_kernel_us_per_handshake']} kernel)"
            )
    if profiler is not None:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.profile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
