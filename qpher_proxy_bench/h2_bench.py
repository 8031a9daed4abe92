"""HTTP/2 vs HTTP/1.1 keep-alive through the whole gateway over TLS, in the same run.

    qpher-proxy bench h2 [--quick] [--seconds S] [--connections C] [--streams M]

Starts a throwaway gateway (``qpher-proxy init`` + ``serve``, generous plan limits) and drives it
with nghttp2's ``h2load``, the same load generator for both protocols so that only the protocol
differs: ``h2load --h1`` (HTTP/1.1 keep-alive, one request in flight per connection, no
pipelining) and ``h2load`` (h2) with the same C connections and one stream each, then h2 with M
streams on each of the C connections (what h2 is for). Each for ``GET /healthz`` and for
``POST /v1/sign`` (ML-DSA-65 over 1 KiB). Prints requests/s, the gateway process's CPU
microseconds per request (stream) and, for sign, the KMS workers' beside it, and the ratio of
each h2 rate to the HTTP/1.1 rate of the same path. The runs of the protocols are interleaved
(``--rounds``) and the best of each is shown, so that noise from other work on the machine hits
both alike. Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .gateway_bench import PAYLOAD, BenchError, GatewayProcess, _b64, add_output_options, bench_main
from .loadgen import process_cpu_seconds


@dataclass
class H2Row:
    path: str
    protocol: str  # "http/1.1", "h2"
    connections: int
    streams: int
    requests: int
    failed: int
    seconds: float
    gateway_cpu_s: float
    kms_cpu_s: float

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def cpu_us(self, cpu_s: float) -> float | None:
        return cpu_s / self.requests * 1e6 if self.requests else None


def _h2load(h2load: str, url: str, *, h1: bool, connections: int, streams: int, seconds: float,
            warmup: float, headers: Sequence[str], data: Path | None) -> tuple[int, int]:
    """(requests that succeeded with 2xx, requests that failed) of one timed h2load run."""
    cmd = [h2load, "-c", str(connections), "-m", str(streams), "-D", f"{round(seconds * 1000)}ms",
           "--warm-up-time", f"{round(warmup * 1000)}ms", "-t", "1"]
    if h1:
        cmd.append("--h1")
    for h in headers:
        cmd += ["-H", h]
    if data is not None:
        cmd += ["-d", str(data)]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=seconds + warmup + 60)
    m = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed", out.stdout)
    codes = re.search(r"status codes: (\d+) 2xx", out.stdout)
    if m is None or codes is None:
        tail = (out.stderr or out.stdout)[-400:]
        raise BenchError(f"h2load gave no summary (exit {out.returncode}): {tail}")
    return int(codes.group(1)), int(m.group(3))


def run(args: argparse.Namespace) -> list[H2Row]:
    h2load = shutil.which("h2load")
    if h2load is None:
        raise BenchError("h2load is not installed (apt-get install nghttp2-client)")
    seconds = args.seconds or (1.0 if args.quick else 3.0)
    warmup = 0.25 if args.quick else 0.5
    rows: list[H2Row] = []
    with GatewayProcess() as gw, tempfile.TemporaryDirectory() as tmp:
        status, doc = gw.call("POST", "/v1/keys", {"algorithm": "ml-dsa-65", "label": "bench-h2"})
        if status != 201:
            raise BenchError(f"POST /v1/keys: status {status}")
        body = Path(tmp) / "sign.json"
        body.write_text(json.dumps({"key_id": doc["key_id"], "message": _b64(PAYLOAD)}))
        headers = [f"authorization: Bearer {gw.api_key}"]
        env_ca = os.environ.get("SSL_CERT_FILE")
        os.environ["SSL_CERT_FILE"] = gw.ca_file  # h2load does not verify; harmless either way
        gateway_pids = gw.serving_pids()
        kms_pids = [p for p in gw.pids() if p not in gateway_pids and p != gw.pid]
        c, m = args.connections, args.streams
        try:
            json_ct = ["content-type: application/json"]
            for path, data, extra in (("/healthz", None, []), ("/v1/sign", body, json_ct)):
                url = f"https://127.0.0.1:{gw.port}{path}"
                best: dict[tuple[str, int], H2Row] = {}
                runs = (("http/1.1", c, 1), ("h2", c, 1), ("h2", c, m)) * args.rounds
                for protocol, conns, streams in runs:
                    g0, k0 = process_cpu_seconds(gateway_pids), process_cpu_seconds(kms_pids)
                    ok, failed = _h2load(h2load, url, h1=protocol == "http/1.1", connections=conns,
                                         streams=streams, seconds=seconds, warmup=warmup,
                                         headers=[*headers, *extra], data=data)
                    g1, k1 = process_cpu_seconds(gateway_pids), process_cpu_seconds(kms_pids)
                    # the CPU of the warm-up is in the window too: scale it to the measured part
                    share = seconds / (seconds + warmup)
                    row = H2Row(path, protocol, conns, streams, ok, failed, seconds,
                                (g1 - g0) * share, (k1 - k0) * share)
                    seen = best.get((protocol, streams))
                    if seen is None or row.rate > seen.rate:
                        best[protocol, streams] = row
                    if not args.quiet:
                        print(f"  {path:9} {protocol:8} c={conns:<3} m={streams:<3} "
                              f"{ok / seconds:9.0f} req/s", file=sys.stderr, flush=True)
                rows += best.values()
        finally:
            if env_ca is None:
                os.environ.pop("SSL_CERT_FILE", None)
            else:
                os.environ["SSL_CERT_FILE"] = env_ca
    return rows


def format_rows(rows: list[H2Row]) -> str:
    lines = ["path       protocol  conns streams   req/s  vs h1  failed  gateway us/req  kms us/req"]
    base = {r.path: r.rate for r in rows if r.protocol == "http/1.1"}
    for r in rows:
        ratio = r.rate / base[r.path] if base.get(r.path) else None
        g, k = r.cpu_us(r.gateway_cpu_s), r.cpu_us(r.kms_cpu_s)
        lines.append(
            f"{r.path:10} {r.protocol:9} {r.connections:5} {r.streams:7} {r.rate:7.0f} "
            f"{'' if ratio is None else f'{ratio:5.2f}x':>6} {r.failed:7} "
            f"{'-' if g is None else f'{g:14.0f}'} "
            f"{'-' if k is None or r.path == '/healthz' else f'{k:11.0f}'}"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="qpher-proxy bench h2", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 s runs")
    ap.add_argument("--seconds", type=float, help="measured seconds per run (default 3, --quick 1)")
    ap.add_argument("--connections", type=int, default=8, help="client connections (default 8)")
    ap.add_argument("--streams", type=int, default=8,
                    help="concurrent streams per h2 connection in the multiplexed run (default 8)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="runs of each protocol, interleaved; the best is shown (default 2: a shared "
                         "machine's noise hits both protocols alike)")
    add_output_options(ap)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def report(rows: list[H2Row], elapsed: float) -> None:
        if args.json:
            print(json.dumps([{**r.__dict__, "rate": r.rate} for r in rows], indent=2))
        else:
            print(f"HTTP/2 vs HTTP/1.1 keep-alive through the gateway over TLS 1.3 (h2load, same run, "
                  f"{elapsed:.0f} s, {os.cpu_count()} CPUs shared with the load generator)")
            print(format_rows(rows))

    return bench_main("h2", args, run, report)


if __name__ == "__main__":
    raise SystemExit(main())
