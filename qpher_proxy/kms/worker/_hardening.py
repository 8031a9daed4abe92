"""Process hardening for a KMS worker (Linux-first; each step degrades to a log line elsewhere).

Run as the very first thing in the child, before any secret is read:

1. close every inherited descriptor except stdin/stdout/stderr and the ones we were given
   (the socketpair end, the KEK memfd): nothing else the gateway had open is reachable;
2. ``RLIMIT_CORE`` 0 and ``prctl(PR_SET_DUMPABLE, 0)``: no core file, and no ptrace attach
   or ``/proc/<pid>/mem`` read by other processes of the same user;
3. ``mlockall(MCL_CURRENT | MCL_FUTURE)`` where it is safe: keys are never swapped out.
   With a finite ``RLIMIT_MEMLOCK`` and no ``CAP_IPC_LOCK``, ``MCL_FUTURE`` would make later
   allocations fail once the limit is reached, so we do not lock and say why instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource

PR_SET_DUMPABLE = 4
MCL_CURRENT = 1
MCL_FUTURE = 2
CAP_IPC_LOCK = 14
MIN_SAFE_MEMLOCK = 1 << 30  # a finite limit above 1 GiB is enough for a KMS worker


def close_inherited_fds(keep: set[int]) -> None:
    lo = 3
    for fd in sorted(f for f in keep if f >= 3):
        if fd > lo:
            os.closerange(lo, fd)
        lo = fd + 1
    try:
        hi = os.sysconf("SC_OPEN_MAX")
    except (OSError, ValueError):
        hi = 65536
    os.closerange(lo, max(hi, lo))


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name, use_errno=True)
    except OSError:
        return None


def disable_core_dumps() -> list[str]:
    """Returns notes for the log (what could not be done)."""
    notes: list[str] = []
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (OSError, ValueError) as exc:
        notes.append(f"RLIMIT_CORE not set: {exc}")
    libc = _libc()
    if libc is None or not hasattr(libc, "prctl"):
        notes.append("prctl unavailable: process stays dumpable")
    elif libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        notes.append(f"PR_SET_DUMPABLE failed: {os.strerror(ctypes.get_errno())}")
    return notes


def _has_cap_ipc_lock() -> bool:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) & (1 << CAP_IPC_LOCK))
    except (OSError, ValueError):
        pass
    return False


def lock_memory() -> tuple[bool, str]:
    """Try ``mlockall``; returns ``(locked, note)``."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mlockall"):
        return False, "mlockall unavailable on this platform"
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft != resource.RLIM_INFINITY and soft < MIN_SAFE_MEMLOCK and not _has_cap_ipc_lock():
        return False, (
            f"memory not locked: RLIMIT_MEMLOCK is {soft} bytes and the process lacks CAP_IPC_LOCK "
            "(raise it, e.g. LimitMEMLOCK=infinity, to keep keys out of swap)"
        )
    if libc.mlockall(MCL_CURRENT | MCL_FUTURE) != 0:
        return False, f"memory not locked: mlockall failed: {os.strerror(ctypes.get_errno())}"
    return True, "memory locked (mlockall)"
