"""Micro-benchmark of the per-request access-control steps that are not the policy engine.

    python -m qpher_proxy_bench.auth_bench --quick
    python -m qpher_proxy_bench.auth_bench --iterations 200000 --json

Everything runs in one process on a temporary directory: a real pepper file, a real SQLite
database (WAL) and a real audit file. Each step is timed over ``--iterations`` calls with
``time.perf_counter_ns`` and reported as µs per call (best of ``--repeat`` runs):

* ``extract``      — ``extract_api_key`` on a typical header list (8 headers, short query)
* ``auth_hit``     — ``Authenticator.authenticate`` with the record cached (the hot path)
* ``auth_miss``    — the same with the cache dropped each call (one SQLite lookup)
* ``auth_reject``  — a wrong secret for a cached key id (401 path, exception included)
* ``strip``        — ``strip_identity_headers`` on the same header list
* ``ratelimit``    — ``TokenBucketLimiter.check`` (key and tenant buckets)
* ``quota``        — ``QuotaCounter.check_and_count`` (memory; a flush every 256 calls)
* ``audit``        — ``AuditLog.record`` of a 6-field record (fsync policy "never")
* ``request``      — extract + auth_hit + strip + ratelimit + quota, as the pipeline does them
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable

from qpher_proxy.audit import AuditLog
from qpher_proxy.auth import (
    APIKeyStore,
    Authenticator,
    extract_api_key,
    generate_pepper_file,
    load_pepper,
    strip_identity_headers,
)
from qpher_proxy.errors import Unauthenticated
from qpher_proxy.ratelimit import QuotaCounter, RateLimits, TokenBucketLimiter


def _time(fn: Callable[[], object], iterations: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter_ns()
        for _ in range(iterations):
            fn()
        best = min(best, (time.perf_counter_ns() - start) / iterations / 1000)
    return best


def run(iterations: int, repeat: int) -> dict[str, float]:
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as d:
        generate_pepper_file(os.path.join(d, "pepper"))
        pepper = load_pepper(os.path.join(d, "pepper"))
        with APIKeyStore(os.path.join(d, "gateway.db"), pepper) as store, \
                QuotaCounter(os.path.join(d, "gateway.db")) as quotas, \
                AuditLog(os.path.join(d, "audit.log"), rotate_bytes=None, fsync_policy="never") as audit:
            for i in range(1000):  # a realistically sized key table
                store.create(f"tenant{i % 50}", "pro")
            record, key = store.create("acme", "pro", scopes=["sign"])
            auth = Authenticator(store)
            wrong = key[:-1] + ("A" if key[-1] != "A" else "B")
            headers = [
                (b"host", b"api.example.com"),
                (b"user-agent", b"bench/1.0"),
                (b"accept", b"application/json"),
                (b"content-type", b"application/json"),
                (b"content-length", b"128"),
                (b"authorization", b"Bearer " + key.encode()),
                (b"x-forwarded-for", b"10.0.0.1"),
                (b"x-tenant-id", b"spoofed"),
            ]
            query = "limit=10"
            limiter = TokenBucketLimiter()
            limits = RateLimits(key_rate=1e9, key_burst=10**9, tenant_rate=1e9, tenant_burst=10**9)

            def reject() -> None:
                try:
                    auth.authenticate(wrong)
                except Unauthenticated:
                    pass

            def miss() -> None:
                auth._cache.clear()
                auth.authenticate(key)

            def request() -> None:
                rec = auth.authenticate(extract_api_key(headers, query))
                strip_identity_headers(headers)
                limiter.check(rec.key_id, rec.tenant, limits)
                quotas.check_and_count(rec.tenant, "sign", None)

            steps: dict[str, Callable[[], object]] = {
                "extract": lambda: extract_api_key(headers, query),
                "auth_hit": lambda: auth.authenticate(key),
                "auth_miss": miss,
                "auth_reject": reject,
                "strip": lambda: strip_identity_headers(headers),
                "ratelimit": lambda: limiter.check(record.key_id, record.tenant, limits),
                "quota": lambda: quotas.check_and_count("acme", "sign", None),
                "audit": lambda: audit.record(
                    "policy.decision",
                    "INFO",
                    key_id=record.key_id,
                    tenant="acme",
                    rule_id="allow-sign",
                    effect="allow",
                    method="POST",
                    path="/v1/sign",
                ),
                "request": request,
            }
            for name, fn in steps.items():
                n = iterations // 10 if name in ("auth_miss", "audit") else iterations
                results[name] = _time(fn, max(n, 100), repeat)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qpher-proxy bench auth", description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="20,000 iterations, one run (a few seconds)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    iterations, repeat = (20_000, 1) if args.quick else (args.iterations, args.repeat)
    results = run(iterations, repeat)
    if args.json:
        json.dump({k: round(v, 3) for k, v in results.items()}, sys.stdout)
        print()
    else:
        for name, us in results.items():
            print(f"{name:12s} {us:8.2f} µs/call")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
