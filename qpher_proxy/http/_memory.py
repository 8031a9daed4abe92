"""Giving the memory of closed connections back to the operating system.

A connection's memory (OpenSSL's state for it, the Python objects of its task) is freed the
moment it closes; ``free()`` keeps it in the process's heap for reuse, which is what we want
while connections keep coming. After a wave of connections has gone (a load test, a client
pool shrinking, a flood that ended), that heap holds tens of megabytes nobody uses: glibc only
shrinks the top of the heap on its own, and the free pages are scattered through it.
``malloc_trim(0)`` hands every whole free page back (``madvise(MADV_DONTNEED)``), as a long
running server should once its connection count has fallen well below its peak.

:class:`MemoryReleaser` decides when: the HTTP server tells it each close, and once at least
:data:`TRIM_AFTER_CLOSES` connections closed since the last trim and the active count is at
most half of the peak seen since then, it schedules one trim, run when :data:`MIN_INTERVAL`
seconds have passed since the previous one (so the rest of a wave that is still closing is given
back by the same trim, and a wave that ends within the interval is not left holding its memory),
in a worker thread (a trim of a large heap takes milliseconds; the allocator's lock makes it safe
beside the event loop's allocations). Where the C library has no ``malloc_trim`` (musl, macOS),
it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Callable

import trio

__all__ = ["MIN_INTERVAL", "TRIM_AFTER_CLOSES", "MemoryReleaser", "malloc_trim", "tune_heap"]

log = logging.getLogger("qpher.http")

TRIM_AFTER_CLOSES = 256
MIN_INTERVAL = 1.0  # seconds between two trims


def _load_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        fn = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return,unused-ignore]


_TRIM = _load_trim()


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 4 << 20  # bytes: buffers below this come from the heap, not fresh mmap()s
TRIM_THRESHOLD = 32 << 20  # bytes of free heap top that free() keeps before shrinking it


def _load_mallopt() -> Callable[[int, int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        fn = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return,unused-ignore]


# Looked up at import, before the gateway confines itself (find_library may run ldconfig).
_MALLOPT = _load_mallopt()


def tune_heap() -> bool:
    """Serve the buffers of large requests and answers (a batch of 64 signatures is ~300 KB of
    JSON, built and encoded per request) from the heap instead of a fresh ``mmap()`` each time:
    glibc maps every allocation over 128 KiB anew and the kernel zero-fills each of its pages on
    first touch, which costs as much as building the JSON. With the threshold at 4 MiB such a
    buffer reuses heap pages; the heap is still given back after waves of connections
    (:class:`MemoryReleaser`) and once 32 MiB of its top is free. False where the C library has
    no ``mallopt`` (nothing changes there)."""
    mallopt = _MALLOPT
    if mallopt is None:
        return False
    mapped = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    return mapped and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def malloc_trim() -> bool:
    """Return the heap's free pages to the OS; False where the C library cannot."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True


class MemoryReleaser:
    """Trims the heap after waves of closed connections; see the module docstring."""

    def __init__(self, active: Callable[[], int], *, after_closes: int = TRIM_AFTER_CLOSES,
                 min_interval: float = MIN_INTERVAL, trim: Callable[[], bool] = malloc_trim) -> None:
        self._active = active  # the server's count of open connections
        self._after = after_closes
        self._interval = min_interval
        self._trim = trim
        self._closed = 0
        self._peak = 0
        self._last = -min_interval
        self._scheduled = False
        self.trims = 0

    def opened(self, active: int) -> None:
        if active > self._peak:
            self._peak = active

    def closed(self, active: int, nursery: trio.Nursery) -> None:
        self._closed += 1
        if not self._scheduled and self._closed >= self._after and active * 2 <= self._peak:
            self._scheduled = True
            nursery.start_soon(self._release)

    async def _release(self) -> None:
        """Trim once ``min_interval`` has passed since the last trim (at once if it has): a wave
        that is still closing connections meanwhile is given back in the same trim."""
        try:
            await trio.sleep_until(self._last + self._interval)
            await trio.to_thread.run_sync(self._trim)
        except Exception:  # a trim failing must never take a connection down
            log.debug("malloc_trim failed", exc_info=True)
        finally:
            self.trims += 1
            self._closed = 0
            self._peak = self._active()
            self._last = trio.current_time()
            self._scheduled = False
