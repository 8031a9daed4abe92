"""gRPC unary latency through the sidecar vs direct to the upstream, in the same run.

    qpher-proxy bench grpc [--quick] [--calls N] [--size BYTES] [--concurrency K]

Starts a grpcio server (a generic unary echo handler on raw bytes, cleartext h2c on 127.0.0.1)
and a throwaway gateway in front of it (``qpher-proxy init`` + ``serve``, ``upstream.protocol:
h2c``, generous plan limits), then makes the same unary calls with grpcio clients two ways:
*direct* (h2c to the upstream) and *sidecar* (TLS 1.3 + h2 to the gateway, which
authenticates the API key, rate-limits, applies the policy (operation ``forward``), audits and
forwards over h2c). Each way is warmed up, then ``--calls`` calls are timed one by one, from K
client threads on one channel. Prints p50, p99 and mean latency in milliseconds, calls per
second, and what the sidecar adds at p50. Figures are printed, never asserted.

grpcio is a test dependency of the project, not a runtime one: without it the benchmark says so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any

from .gateway_bench import BenchError, GatewayProcess, add_output_options, bench_main

SERVICE = "qpher.bench.Echo"
METHOD = f"/{SERVICE}/Unary"


@dataclass
class GRPCRow:
    way: str  # "direct", "sidecar"
    calls: int
    concurrency: int
    seconds: float
    latencies_ms: list[float]

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]

    @property
    def rate(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0


def _grpc() -> Any:
    try:
        import grpc  # type: ignore[import-untyped]  # a test dependency without stubs
    except ImportError as exc:
        raise BenchError("grpcio is not installed (pip install grpcio, or the project's test extra)") from exc
    return grpc


def _timed_calls(call: Callable[[bytes], bytes], payload: bytes, calls: int, concurrency: int,
                 way: str) -> GRPCRow:
    latencies: list[float] = []
    lock = threading.Lock()
    per_thread = max(1, calls // concurrency)

    def worker() -> None:
        mine = []
        for _ in range(per_thread):
            t0 = time.perf_counter()
            if call(payload) != payload:
                raise BenchError(f"{way}: the echo came back different")
            mine.append((time.perf_counter() - t0) * 1e3)
        with lock:
            latencies.extend(mine)

    started = time.perf_counter()
    with futures.ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    return GRPCRow(way, len(latencies), concurrency, time.perf_counter() - started, latencies)


def run(args: argparse.Namespace) -> list[GRPCRow]:
    grpc = _grpc()
    calls = args.calls or (300 if args.quick else 3000)
    warmup = max(20, calls // 10)
    payload = os.urandom(args.size)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max(8, args.concurrency * 2)))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(lambda request, context: request),
    }),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    rows: list[GRPCRow] = []
    try:
        gw = GatewayProcess(upstream_url=f"http://127.0.0.1:{port}",
                            overrides={"upstream.protocol": "h2c"})
        with gw:
            creds = grpc.ssl_channel_credentials(root_certificates=open(gw.ca_file, "rb").read())
            metadata = [("authorization", f"Bearer {gw.api_key}")]
            ways: tuple[tuple[str, Callable[[], Any], Any], ...] = (
                ("direct", lambda: grpc.insecure_channel(f"127.0.0.1:{port}"), None),
                ("sidecar", lambda: grpc.secure_channel(
                    f"127.0.0.1:{gw.port}", creds, options=[("grpc.ssl_target_name_override", "localhost")]),
                 metadata),
            )
            for way, open_channel, md in ways:
                with open_channel() as channel:
                    stub = channel.unary_unary(METHOD)

                    def call(message: bytes, stub: Any = stub, md: Any = md) -> bytes:
                        return bytes(stub(message, metadata=md, timeout=30))

                    try:
                        _timed_calls(call, payload, warmup, args.concurrency, way)
                        row = _timed_calls(call, payload, calls, args.concurrency, way)
                    except grpc.RpcError as exc:
                        raise BenchError(
                            f"{way}: the call failed with {exc.code()}: {exc.details()}") from None
                rows.append(row)
                if not args.quiet:
                    print(f"  {way:8} p50 {row.percentile(50):7.3f} ms  {row.rate:8.0f} calls/s",
                          file=sys.stderr, flush=True)
    finally:
        server.stop(None)
    return rows


def format_rows(rows: list[GRPCRow]) -> str:
    lines = ["way      calls  threads  p50 ms  p99 ms  mean ms   calls/s"]
    for r in rows:
        lines.append(f"{r.way:8} {r.calls:5} {r.concurrency:8} {r.percentile(50):7.3f} "
                     f"{r.percentile(99):7.3f} {statistics.fmean(r.latencies_ms):8.3f} {r.rate:9.0f}")
    by_way = {r.way: r for r in rows}
    if "direct" in by_way and "sidecar" in by_way:
        d, s = by_way["direct"], by_way["sidecar"]
        lines.append(f"the sidecar adds {s.percentile(50) - d.percentile(50):.3f} ms at p50 "
                     f"({s.percentile(50) / d.percentile(50):.2f}x direct)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="qpher-proxy bench grpc", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="300 timed calls per way")
    ap.add_argument("--calls", type=int, help="timed calls per way (default 3000, --quick 300)")
    ap.add_argument("--size", type=int, default=100, help="message bytes (default 100)")
    ap.add_argument("--concurrency", type=int, default=1,
                    help="client threads on the one channel (default 1)")
    add_output_options(ap)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def report(rows: list[GRPCRow], elapsed: float) -> None:
        if args.json:
            print(json.dumps([{"way": r.way, "calls": r.calls, "concurrency": r.concurrency,
                               "p50_ms": r.percentile(50), "p99_ms": r.percentile(99), "rate": r.rate}
                              for r in rows], indent=2))
        else:
            print(f"gRPC unary {args.size}-byte echo: direct (h2c) vs through the sidecar (TLS 1.3 h2 -> "
                  f"gateway -> h2c), same run, {elapsed:.0f} s, {os.cpu_count()} CPUs "
                  f"shared by client, gateway and upstream")
            print(format_rows(rows))

    return bench_main("grpc", args, run, report)


if __name__ == "__main__":
    raise SystemExit(main())
