"""Rate-limit check cost: per-process token buckets next to the host-wide shared-memory table.

    python -m qpher_proxy_bench.shared_limiter --quick
    qpher-proxy bench shared-limiter --iterations 200000 --json

Every figure is nanoseconds per ``check`` of one request against a key and a tenant bucket (a
plan whose limits are never reached, so every check is admitted and writes both buckets), as
wall-clock time and as CPU time of the measuring process (``process_time``: what a loaded or
shared machine does not inflate; a check waiting for the lock sleeps, so waits are wall only):

* ``token_bucket``     ``TokenBucketLimiter`` (per process, in a dict): the baseline;
* ``shared``           ``SharedRateLimiter`` on a whole-table lock (``stripes=1``), one process;
* ``shared_striped``   the same with 64 lock stripes (two byte-range locks per check);
* ``shared_refused``   a refused check (the bucket is empty): the lock, and building the 429;
* ``lockf_pair``       the bare lock and unlock (two ``fcntl`` calls) that every shared check pays;
* ``shared_2proc``     two processes checking the same key at once on one table (the mean of
                       what each process measures for its own checks: lock contention included);
* ``shared_2proc_wall`` the same run as wall-clock time over all checks of both processes (the
                       host's throughput; below ``shared_2proc`` when they overlap), and the CPU
                       of both processes per check.

Each figure is the best of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial

from qpher_proxy.errors import RateLimited
from qpher_proxy.ratelimit import RateLimits, TokenBucketLimiter
from qpher_proxy.ratelimit.shared import SharedLimiterTable, SharedRateLimiter

_OPEN = RateLimits(key_rate=1e12, key_burst=10**12, tenant_rate=1e12, tenant_burst=10**15)
_SHUT = RateLimits(key_rate=1e-6, key_burst=1, tenant_rate=None, tenant_burst=1)


Figure = tuple[float, float]  # (wall ns, CPU ns of this process) per check


def _ns_per_call(fn: Callable[[], None], iterations: int, repeat: int) -> Figure:
    best: Figure = (float("inf"), float("inf"))
    for _ in range(repeat):
        c0, t0 = time.process_time_ns(), time.perf_counter_ns()
        for _ in range(iterations):
            fn()
        t1, c1 = time.perf_counter_ns(), time.process_time_ns()
        best = min(best, ((t1 - t0) / iterations, (c1 - c0) / iterations))
    return best


def _lock_pair(fd: int) -> None:
    fcntl.lockf(fd, fcntl.LOCK_EX, 1, 0)
    fcntl.lockf(fd, fcntl.LOCK_UN, 1, 0)


def _refused(rl: SharedRateLimiter) -> Callable[[], None]:
    rl.check("empty-key", "acme", _SHUT)

    def call() -> None:
        try:
            rl.check("empty-key", "acme", _SHUT)
        except RateLimited:
            pass
    return call


def _worker(fd: int, iterations: int) -> int:
    """The second process of ``shared_2proc``: wait for the start line, check, print its times."""
    rl = SharedRateLimiter(SharedLimiterTable.attach(fd))
    rl.check("hot-key", "acme", _OPEN)
    print("ready", flush=True)
    sys.stdin.readline()
    c0, t0 = time.process_time_ns(), time.perf_counter_ns()
    for _ in range(iterations):
        rl.check("hot-key", "acme", _OPEN)
    t1, c1 = time.perf_counter_ns(), time.process_time_ns()
    print(t0, t1, c1 - c0, flush=True)
    return 0


def _two_processes(iterations: int) -> tuple[Figure, Figure]:
    """((wall, CPU) ns per check as each process measures its own, mean of the two;
    (wall ns per check over both processes' checks, total CPU ns per check))."""
    table, fd = SharedLimiterTable.create()
    rl = SharedRateLimiter(table)
    rl.check("hot-key", "acme", _OPEN)
    module = __name__ if __name__ != "__main__" else "qpher_proxy_bench.shared_limiter"
    argv = [sys.executable, "-m", module, "--worker-fd", str(fd), "--iterations", str(iterations)]
    pipe = subprocess.PIPE
    with subprocess.Popen(argv, pass_fds=(fd,), stdin=pipe, stdout=pipe, text=True) as proc:
        try:
            assert proc.stdin is not None and proc.stdout is not None
            if proc.stdout.readline() != "ready\n":
                raise RuntimeError("the second benchmark process did not start")
            proc.stdin.write("go\n")
            proc.stdin.flush()
            # perf_counter is CLOCK_MONOTONIC too: the two processes' times are comparable
            c0, t0 = time.process_time_ns(), time.perf_counter_ns()
            for _ in range(iterations):
                rl.check("hot-key", "acme", _OPEN)
            t1, c1 = time.perf_counter_ns(), time.process_time_ns()
            out, _ = proc.communicate(timeout=600)
            w0, w1, wcpu = map(int, out.split())
        finally:
            if proc.poll() is None:
                proc.kill()
            table.close()
    n2 = 2 * iterations
    own = (((t1 - t0) + (w1 - w0)) / n2, ((c1 - c0) + wcpu) / n2)
    return own, ((max(t1, w1) - min(t0, w0)) / n2, ((c1 - c0) + wcpu) / n2)


def run(iterations: int, repeat: int) -> dict[str, Figure]:
    results: dict[str, Figure] = {}
    local = TokenBucketLimiter()
    results["token_bucket"] = _ns_per_call(partial(local.check, "hot-key", "acme", _OPEN), iterations, repeat)
    for name, stripes in (("shared", 1), ("shared_striped", 64)):
        table, fd = SharedLimiterTable.create(stripes=stripes)
        with table:
            shared = SharedRateLimiter(table)
            results[name] = _ns_per_call(partial(shared.check, "hot-key", "acme", _OPEN), iterations, repeat)
            if stripes == 1:
                results["shared_refused"] = _ns_per_call(_refused(shared), iterations, repeat)
                results["lockf_pair"] = _ns_per_call(partial(_lock_pair, fd), iterations, repeat)
    own, wall = min(_two_processes(iterations) for _ in range(repeat))
    results["shared_2proc"], results["shared_2proc_wall"] = own, wall
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qpher-proxy bench shared-limiter",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="20,000 iterations, one run (a few seconds)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker-fd", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    iterations, repeat = (20_000, 1) if args.quick else (args.iterations, args.repeat)
    if args.worker_fd is not None:
        return _worker(args.worker_fd, args.iterations)
    results = run(iterations, repeat)
    if args.json:
        json.dump({k: {"wall_ns": round(w, 1), "cpu_ns": round(c, 1)} for k, (w, c) in results.items()},
                  sys.stdout)
        print()
    else:
        base = results["token_bucket"][0]
        print(f"{'':18s} {'wall':>9s}  {'cpu':>9s}   (ns per check; wall against token_bucket)")
        for name, (wall, cpu) in results.items():
            print(f"{name:18s} {wall:9.0f}  {cpu:9.0f}   {wall / base:4.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
