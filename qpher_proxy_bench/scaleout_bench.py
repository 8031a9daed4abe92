"""``qpher-proxy bench scaleout``: what PostgreSQL, Redis and several gateway processes cost and give.

    qpher-proxy bench scaleout                 # 5 s per run, concurrency 64
    qpher-proxy bench scaleout --quick --json scaleout.json

In one invocation, on 127.0.0.1, against throwaway state directories and a throwaway database
on the machine's PostgreSQL (``--admin-dsn``, a user that may CREATE DATABASE) and a fresh key
prefix on its Redis (``--redis-url``):

1. **Throughput and latency** of ``POST /v1/sign`` (ML-DSA-65, 1 KiB) and
   ``POST /v1/kem/encapsulate`` (ML-KEM-768) at ``--concurrency`` keep-alive connections, for
   (a) one gateway process on SQLite (the embedded default), (b0) one gateway process on
   PostgreSQL with local rate limits, (b) one gateway process on PostgreSQL + Redis (rate limits
   in Redis), (c) ``server.workers: 2`` on PostgreSQL + Redis.
   Each row gives requests/s, p50, p99, and CPU microseconds per request of the proxy's
   processes (supervisor, gateways, KMS workers), of the PostgreSQL server processes and of
   redis-server over the measured window: the CPU that PostgreSQL and Redis add per request.
   The PostgreSQL states are made from the SQLite one with ``db import-sqlite`` (the demo key
   moves with it). The plan's limits are raised so that the limiter runs but never refuses.
2. **Cross-node rate-limit accuracy**: two nodes (PostgreSQL + Redis), one tenant limited to
   ``--limit`` requests/s (burst 5), both hammered at once for ``--accuracy-seconds``; the
   admitted rate across both, against the limit.

On a 2-core machine the load generator, the proxy, PostgreSQL and Redis share the CPUs: the
absolute rates are floors; CPU per request does not depend on that.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import secrets
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .gateway_bench import GatewayProcess, _cli, api_requests
from .loadgen import (
    ClientTLS,
    CPUWatch,
    LoadGenerator,
    LoadResult,
    LoadSpec,
    build_request,
    process_cpu_seconds,
)

DEFAULT_ADMIN_DSN = "postgresql://root@127.0.0.1:5432/test"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
OPS = ("sign", "encapsulate")


def _pids_named(*names: str) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        if comm in names:
            out.append(int(entry.name))
    return out


class ServerCPU:
    """CPU seconds that the processes named ``names`` (a server's backends) used over the window:
    a per-process delta, so a backend that exits meanwhile (another client's) subtracts nothing."""

    def __init__(self, *names: str) -> None:
        self.names = names
        self.cpu = 0.0
        self._start: dict[int, float] = {}

    def __call__(self, start: float | None, end: float | None) -> None:
        if start is not None:
            self._start = {p: process_cpu_seconds([p]) for p in _pids_named(*self.names)}
        elif end is not None:
            now = {p: process_cpu_seconds([p]) for p in _pids_named(*self.names)}
            self.cpu = sum(max(0.0, c - self._start.get(p, 0.0)) for p, c in now.items())


@contextlib.contextmanager
def database(admin_dsn: str) -> Iterator[tuple[str, str]]:
    """A fresh database (and role prefix) for one configuration; dropped afterwards."""
    import psycopg

    tag = secrets.token_hex(4)
    name, prefix = f"qpher_bench_{tag}", f"qb{tag}"
    with psycopg.connect(admin_dsn, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    base = admin_dsn.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}", prefix
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            for role in ("gateway", "kms", "admin"):
                c.execute(f'DROP ROLE IF EXISTS "{prefix}_{role}"')


def _pg_overrides(dsn: str, prefix: str, redis_url: str, redis_prefix: str, workers: int) -> dict[str, Any]:
    return {
        "storage.backend": "postgresql",
        "storage.dsn": dsn,
        "storage.role_prefix": prefix,
        "ratelimit.backend": "redis",
        "ratelimit.redis_url": redis_url,
        "ratelimit.key_prefix": redis_prefix,
        "server.workers": workers,
    }


def _import_state(gw: GatewayProcess) -> None:
    r = subprocess.run(
        _cli("db", "import-sqlite", "--config", str(gw.directory / "config.yaml")),
        capture_output=True,
        text=True,
        timeout=120,
    )
    if r.returncode != 0:
        raise RuntimeError(f"db import-sqlite: {r.stderr.strip()[-300:]}")


def measure_config(
    name: str, gw: GatewayProcess, lg: LoadGenerator, args: argparse.Namespace
) -> list[dict[str, Any]]:
    requests = api_requests(gw)
    tls = ClientTLS("X25519MLKEM768", cafile=gw.ca_file)
    rows = []
    for op in OPS:
        proxy = CPUWatch(gw.pids())
        pg = ServerCPU("postgres")
        redis = ServerCPU("redis-server")

        watches = (proxy, pg, redis)

        def on_window(start: float | None, end: float | None, watches: Any = watches) -> None:
            for w in watches:
                w(start, end)

        spec = LoadSpec.keepalive(
            gw.port, tls, requests[op], connections=args.concurrency, seconds=args.seconds, warmup=args.warmup
        )
        print(f"  {name:22} {op:12} c={args.concurrency} ...", end="", file=sys.stderr, flush=True)
        r: LoadResult = lg.run(spec, on_window=on_window)
        ok = max(r.ok, 1)
        row = {
            "config": name,
            "op": op,
            "concurrency": args.concurrency,
            "rate": round(r.rate, 1),
            "p50_ms": round(r.p50_ms, 2),
            "p99_ms": round(r.p99_ms, 2),
            "errors": dict(r.errors),
            "statuses": {str(k): v for k, v in r.statuses.items()},
            "proxy_cpu_us": round(proxy.cpu / ok * 1e6, 1),
            "postgres_cpu_us": round(pg.cpu / ok * 1e6, 1),
            "redis_cpu_us": round(redis.cpu / ok * 1e6, 1),
        }
        print(
            f" {r.rate:8.0f}/s p50 {r.p50_ms:6.2f} ms p99 {r.p99_ms:6.2f} ms  cpu/req: proxy "
            f"{row['proxy_cpu_us']:.0f} us, postgres {row['postgres_cpu_us']:.0f} us, redis "
            f"{row['redis_cpu_us']:.0f} us",
            file=sys.stderr,
        )
        rows.append(row)
    return rows


def throughput(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    redis_prefix = f"qb{secrets.token_hex(4)}"
    with LoadGenerator(args.clients).start() as lg:
        with GatewayProcess(backend=args.backend) as gw:
            rows += measure_config("a: 1 process, sqlite", gw, lg, args)
        configs = (
            # PostgreSQL alone (local limits): splits what PostgreSQL and Redis each add
            ("b0: 1 process, pg only", 1, False),
            ("b: 1 process, pg+redis", 1, True),
            ("c: 2 processes, pg+redis", 2, True),
        )
        for label, workers, redis in configs:
            overrides = _pg_overrides(dsn="", prefix="", redis_url=args.redis_url, redis_prefix=redis_prefix,
                                      workers=workers)
            if not redis:
                overrides["ratelimit.backend"] = "local"
            with database(args.admin_dsn) as (dsn, prefix):
                overrides.update({"storage.dsn": dsn, "storage.role_prefix": prefix})
                gateway = GatewayProcess(
                    backend=args.backend, overrides=overrides, before_start=_import_state
                )
                with gateway as gw:
                    rows += measure_config(label, gw, lg, args)
    return rows


def _plan_file(limit: int) -> str:
    import yaml

    return yaml.safe_dump(
        {
            "version": 1,
            "plans": {
                "accuracy": {
                    "rate_limit": {"requests_per_second": 1_000_000, "burst": 1_000_000},
                    "tenant_rate_limit": {"requests_per_second": limit, "burst": 5},
                    "operations": ["info"],
                    "algorithms": ["ml-dsa-65"],
                }
            },
        }
    )


def accuracy(args: argparse.Namespace) -> dict[str, Any]:
    """Two nodes, one tenant limited to ``args.limit``/s: the admitted rate across both."""
    redis_prefix = f"qb{secrets.token_hex(4)}"
    with database(args.admin_dsn) as (dsn, prefix), contextlib.ExitStack() as stack:
        overrides = _pg_overrides(dsn, prefix, args.redis_url, redis_prefix, 1)
        overrides["ratelimit.expected_nodes"] = 2

        def prepare_a(gw: GatewayProcess) -> None:
            (gw.directory / "policies" / "05-accuracy.yaml").write_text(_plan_file(args.limit))
            _import_state(gw)

        a = stack.enter_context(
            GatewayProcess(backend=args.backend, overrides=overrides, before_start=prepare_a)
        )

        def prepare_b(gw: GatewayProcess) -> None:
            (gw.directory / "policies" / "05-accuracy.yaml").write_text(_plan_file(args.limit))
            for rel in ("kek/kek.b64", "secrets/pepper"):  # every node shares the KEK and the pepper
                shutil.copyfile(a.directory / rel, gw.directory / rel)

        b = stack.enter_context(
            GatewayProcess(backend=args.backend, overrides=overrides, before_start=prepare_b)
        )
        out = subprocess.run(
            _cli(
                "apikey",
                "create",
                "--config",
                str(a.directory / "config.yaml"),
                "--tenant",
                "t-accuracy",
                "--plan",
                "accuracy",
            ),
            capture_output=True,
            text=True,
            timeout=60,
        )
        key = next(w for w in out.stdout.split() if w.startswith("qph_"))
        headers = {"Authorization": f"Bearer {key}", "User-Agent": "qpher-bench"}
        req = build_request("GET", "/v1/info", headers=headers)
        results: dict[str, LoadResult] = {}

        def run(name: str, gw: GatewayProcess) -> None:
            with LoadGenerator(1).start() as lg:
                results[name] = lg.run(
                    LoadSpec.keepalive(
                        gw.port,
                        ClientTLS("X25519MLKEM768", cafile=gw.ca_file),
                        req,
                        connections=4,
                        seconds=args.accuracy_seconds,
                        warmup=0.5,
                    )
                )

        threads = [threading.Thread(target=run, args=(n, g)) for n, g in (("a", a), ("b", b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    admitted = sum(r.statuses.get(200, 0) for r in results.values())
    refused = sum(r.statuses.get(429, 0) for r in results.values())
    elapsed = max(r.elapsed for r in results.values())
    rate = admitted / elapsed
    report = {
        "limit": args.limit,
        "seconds": round(elapsed, 2),
        "admitted": admitted,
        "refused_429": refused,
        "admitted_per_s": round(rate, 2),
        "error_pct": round((rate - args.limit) / args.limit * 100, 2),
        "per_node": {n: r.statuses.get(200, 0) for n, r in results.items()},
    }
    print(
        f"  cross-node rate limit: {rate:.1f}/s admitted for a limit of {args.limit}/s "
        f"({report['error_pct']:+.1f} %; {admitted} admitted, {refused} refused, "
        f"per node {report['per_node']})",
        file=sys.stderr,
    )
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qpher-proxy bench scaleout", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--clients", type=int, default=1, help="load generator processes")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--backend", choices=("auto", "openssl", "liboqs"), default=None)
    p.add_argument("--admin-dsn", default=DEFAULT_ADMIN_DSN)
    p.add_argument("--redis-url", default=DEFAULT_REDIS)
    p.add_argument("--limit", type=int, default=50, help="the tenant rate limit of the accuracy run")
    p.add_argument("--accuracy-seconds", type=float, default=10.0)
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--quick", action="store_true", help="2 s runs, 0.5 s warm-up, 4 s accuracy run")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.seconds, args.warmup, args.accuracy_seconds = 2.0, 0.5, 4.0
    report: dict[str, Any] = {"command": "qpher-proxy bench scaleout " + " ".join(argv or [])}
    if not args.skip_throughput:
        report["throughput"] = throughput(args)
    if not args.skip_accuracy:
        report["rate_limit_accuracy"] = accuracy(args)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
