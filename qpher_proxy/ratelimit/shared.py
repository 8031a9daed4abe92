"""Host-wide rate limits: GCRA buckets in a shared-memory table, for several gateway processes.

Theory of operation
===================

With ``server.workers: N`` the gateway runs as N processes behind ``SO_REUSEPORT``; a plan's
limits (per API key, per tenant) must hold for the host, not for each process. The supervisor
creates one anonymous shared region (:meth:`SharedLimiterTable.create`: ``memfd_create``,
``ftruncate``, ``mmap(MAP_SHARED)``) and hands its descriptor to every gateway process, which
maps the same pages with :meth:`SharedLimiterTable.attach`. :class:`SharedRateLimiter` answers
exactly like :class:`~qpher_proxy.ratelimit.buckets.TokenBucketLimiter` (same ``check``, same
``RateLimited``), so a gateway can use either.

**Algorithm.** Each bucket is one number, its *theoretical arrival time* (GCRA): ``tat`` is the
clock time at which the bucket will be full again. With rate ``r`` and burst ``b`` the bucket
holds ``b - max(0, tat - now) * r`` tokens, so the token-bucket rules of ``buckets.py`` read:

* a request of ``cost`` needs ``need = min(cost, b)`` tokens: it fits when
  ``tat - now <= (b - need) / r``; otherwise it must wait ``(tat - now) - (b - need) / r``;
* an admitted request pays ``cost``: ``tat = max(tat, now) + cost / r``. A cost above the burst
  is admitted when the bucket is full and drives ``tat`` past ``now + b / r`` (debt, repaid by
  time: a batch of N still costs N);
* a bucket whose ``tat <= now`` is full: indistinguishable from a new one, so its slot is free.

A request is checked against its key's and its tenant's buckets together, under one lock: it is
admitted only if both fit, and then both pay; a refusal writes nothing (a request refused by one
scope costs nothing in the other). ``None`` rate: that scope is not looked at. Limits are read
at each call. Because a bucket stores *seconds of debt* rather than tokens, a plan change
re-reads the same debt at the new rate, and a lowered burst applies at once (the bucket holds
the new burst minus its debt; ``buckets.py`` clamps its tokens to the new burst instead, so the
two differ just after a plan change and agree otherwise).
Comparisons allow 1 ns of float noise, so an exact boundary (4 tokens at 2/s, 0.5 s later) fits.

**Table and memory.** A 64-byte header (magic ``QPHRLIM1``, layout version, slot count, lock
stripes, and a random 16-byte hash key) is followed by ``slots`` slots of 16 bytes (a 64-bit
hash and a ``float64`` tat): the default 65,536 slots take 1 MiB + 64 bytes. Slots are grouped
in aligned blocks of 8 (128 bytes, two cache lines: the 8 hashes, then their 8 tats); a bucket
lives in the block chosen by its hash and may sit in any of that block's 8 slots (bounded
probing: one search of 64 bytes, done in C by ``mmap.find``). The hash is a 64-bit keyed
BLAKE2b of ``"k" + key_id`` or ``"t" + tenant``: the key is drawn at creation and stored in the
header, so a client cannot pick names that collide. A hash of zero marks a never-used slot.
The table is little-endian and native to the host; a layout change bumps the version, which
:meth:`SharedLimiterTable.attach` refuses, as it refuses any size that is not the header's.

**Eviction (what it forgives).** When no slot of the block is free (all 8 buckets are in debt,
``tat > now``), the new bucket takes the slot with the smallest ``tat`` -- the bucket nearest to
full. That bucket's remaining debt (at most ``tat - now`` seconds of its refill) is forgiven:
its next request finds a full bucket. Only *live* buckets occupy slots (those used within the
last ``burst / rate`` seconds, or still repaying a batch), so with a table a few times larger
than the number of keys and tenants active in any such window a full block is rare;
``evictions`` counts them in this process. Names are authenticated key ids and
tenants (rate limiting runs after authentication), so a client cannot mint names to evict.

**Locking.** Python has no atomic compare-and-swap on a mapping, so every check holds a lock for
its read-decide-write, and reads the clock inside it (so the ``tat`` values written are in clock
order). Across processes the lock is a POSIX record lock (``fcntl.lockf``) on one byte of the
memfd per stripe. POSIX locks belong to the *process*: they work however the descriptor reached
it (inherited or ``SCM_RIGHTS`` -- ``flock`` would not, since those share one open file
description and ``flock`` locks belong to the description), and the kernel drops them when a
process dies, so a crash never leaves the table locked. Since they do not exclude threads of one
process, a ``threading.Lock`` is taken first. With ``stripes=1`` (the default) the whole table
has one lock: two ``fcntl`` calls per check. Measured with ``qpher-proxy bench shared-limiter``
on the development machine (2 vCPUs of a shared VM, Python 3.11; on a quiet moment, best of 3,
CPU time): an admitted check costs about 8 µs (``TokenBucketLimiter``: about 2 µs), of which
the lock and unlock are about 2 µs; a refused one about 14 µs (building the 429 and its
headers). With two processes hammering the same key each check still costs 7-8 µs of CPU and
the host completes one every 12-15 µs of wall time (the lock serialises them). Under heavy load
of that VM, wall-clock figures are two to three times these. More stripes (byte-range locks, taken
in ascending order when a check needs two: up to four ``fcntl`` calls) cost more per check and
would only pay off with many processes contending; the whole-table lock is the default. A
holder preempted by the scheduler makes the others wait in ``fcntl`` (their event loop blocks
for that time); the critical section itself is a few microseconds of Python.

Note: closing *any* descriptor of the memfd in a process releases that process's POSIX locks on
it. The table owns the descriptor it was given; the process must not close another copy of it
while a check runs (the gateway is single-threaded for checks, so this only matters to code
that closes descriptors from another thread).

**Clock.** ``time.monotonic()`` is ``CLOCK_MONOTONIC`` on Linux: one system-wide clock (time
since boot, not per process), never stepped by ``settimeofday`` or NTP, so a ``tat`` written by
one process means the same instant to every other. The exception is a Linux *time namespace*
(``unshare(CLONE_NEWTIME)``), which offsets ``CLOCK_MONOTONIC``: all processes sharing a table
must be in the same one (fork/exec by one supervisor keeps them so). The clock is injectable
for tests.

State lives as long as some process holds the memfd: a full restart of the supervisor refills
every bucket, as with the per-process limiter.
"""

from __future__ import annotations

import fcntl
import hashlib
import math
import mmap
import os
import secrets
import struct
import threading
import time
from collections.abc import Callable
from typing import Self

from ..errors import ConfigError, RateLimited
from .buckets import RateLimits

__all__ = ["SharedLimiterTable", "SharedRateLimiter"]

MAGIC = b"QPHRLIM1"
VERSION = 1
HEADER_SIZE = 64
SLOT_SIZE = 16
BLOCK = 8  # slots probed per bucket: one aligned block
DEFAULT_SLOTS = 65536
_HEADER = struct.Struct("<8sIII16s")  # magic, version, slots, stripes, hash key (+ zero padding)
# A block is 8 hashes then their 8 tats, so that finding a bucket is one unpack and a search in C.
_BLOCK_BYTES = BLOCK * SLOT_SIZE
_TATS_AT = 8 * BLOCK
_TATS = struct.Struct(f"<{BLOCK}d")
_TAT = struct.Struct("<d")
_MAX_SLOTS = 1 << 26  # 1 GiB of table: far beyond any sane configuration
_MAX_STRIPES = 4096
_WHOLE_TABLE = (0,)  # the lock offset of stripes=1
_EPS = 1e-9  # seconds of float noise forgiven at an exact boundary
_HASH_CACHE_MAX = 65536


def table_size(slots: int) -> int:
    """Bytes of a table of ``slots`` slots (header included)."""
    return HEADER_SIZE + SLOT_SIZE * slots


def _check_geometry(slots: int, stripes: int) -> None:
    if isinstance(slots, bool) or not isinstance(slots, int) or slots < BLOCK or slots > _MAX_SLOTS \
            or slots & (slots - 1):
        raise ConfigError(f"rate-limit table slots must be a power of two from {BLOCK} to {_MAX_SLOTS}, "
                          f"not {slots!r}")
    if isinstance(stripes, bool) or not isinstance(stripes, int) or not 1 <= stripes <= _MAX_STRIPES:
        raise ConfigError(f"rate-limit table stripes must be an integer from 1 to {_MAX_STRIPES}, "
                          f"not {stripes!r}")


class SharedLimiterTable:
    """A GCRA bucket table in a shared mapping of a memfd. Build with :meth:`create` or :meth:`attach`."""

    def __init__(self, fd: int, mm: mmap.mmap, slots: int, stripes: int, hash_key: bytes) -> None:
        # Private: use create() or attach().
        self._fd = fd
        self._mm = mm
        self._slots = slots
        self._stripes = stripes
        self._blocks = slots // BLOCK
        self._hash_key = hash_key
        self._refs: dict[str, tuple[bytes, int, int]] = {}
        self._tlock = threading.Lock()
        self.evictions = 0  # this process's evictions of live buckets (see the module docstring)

    # ---- construction ----------------------------------------------------------------------

    @classmethod
    def create(cls, slots: int = DEFAULT_SLOTS, *, stripes: int = 1) -> tuple[Self, int]:
        """A new zeroed table in a new memfd (close-on-exec); returns it and the descriptor to hand
        to each gateway process (which calls :meth:`attach`). The table owns the descriptor."""
        _check_geometry(slots, stripes)
        fd = os.memfd_create("qpher-ratelimit", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, table_size(slots))
            mm = mmap.mmap(fd, table_size(slots), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        key = secrets.token_bytes(16)
        _HEADER.pack_into(mm, 0, MAGIC, VERSION, slots, stripes, key)
        return cls(fd, mm, slots, stripes, key), fd

    @classmethod
    def attach(cls, fd: int) -> Self:
        """Map the table a supervisor created. Takes ownership of ``fd`` (closed by :meth:`close`).
        Refuses with ``ConfigError`` anything that is not a table of this layout version."""
        try:
            size = os.fstat(fd).st_size
        except OSError as exc:
            raise ConfigError(f"rate-limit table descriptor {fd} is not usable: {exc.strerror}") from exc
        if size < HEADER_SIZE:
            raise ConfigError(f"rate-limit table descriptor {fd}: {size} bytes, too small for a table")
        try:
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"rate-limit table descriptor {fd} cannot be mapped: {exc}") from exc
        try:
            magic, version, slots, stripes, key = _HEADER.unpack_from(mm, 0)
            if magic != MAGIC:
                raise ConfigError(f"rate-limit table descriptor {fd}: not a qpher rate-limit table")
            if version != VERSION:
                raise ConfigError(f"rate-limit table descriptor {fd}: layout version {version}, "
                                  f"this build reads version {VERSION}")
            _check_geometry(slots, stripes)
            if size != table_size(slots):
                raise ConfigError(f"rate-limit table descriptor {fd}: {size} bytes, but its header says "
                                  f"{slots} slots ({table_size(slots)} bytes)")
        except BaseException:
            mm.close()
            raise
        return cls(fd, mm, slots, stripes, bytes(key))

    @property
    def fd(self) -> int:
        return self._fd

    @property
    def slots(self) -> int:
        return self._slots

    @property
    def stripes(self) -> int:
        return self._stripes

    @property
    def size(self) -> int:
        return table_size(self._slots)

    def close(self) -> None:
        """Unmap and close the descriptor (other processes keep their own mapping)."""
        if self._fd >= 0:
            self._mm.close()
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- buckets ---------------------------------------------------------------------------

    def _ref(self, name: str) -> tuple[bytes, int, int]:
        """(hash, block offset, lock offset) of a scoped name ("k..." or "t..."), cached. The hash is
        8 bytes of keyed BLAKE2b, never all zero (zero marks a never-used slot)."""
        ref = self._refs.get(name)
        if ref is None:
            digest = hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=8,
                                     key=self._hash_key).digest()
            if digest == bytes(8):
                digest = (1).to_bytes(8, "little")
            block = int.from_bytes(digest, "little") % self._blocks
            lock_at = 0 if self._stripes == 1 else self.size + block % self._stripes
            ref = (digest, HEADER_SIZE + block * _BLOCK_BYTES, lock_at)
            if len(self._refs) >= _HASH_CACHE_MAX:
                self._refs.clear()
            self._refs[name] = ref
        return ref

    def _find(self, h: bytes, base: int, now: float, taken: int) -> tuple[int, float, bool]:
        """(offset of the tat of hash ``h``'s slot in the block at ``base``, that tat, False), or
        (offset of a new slot's tat, 0.0, True). The slot whose tat is at ``taken`` (chosen for the
        other scope of the same request) is never given to another hash."""
        mm = self._mm
        end = base + _TATS_AT
        pos = mm.find(h, base, end)  # in C, no integers built: the hit costs one search
        while pos >= 0 and (pos - base) & 7:  # a match straddling two hashes is not one
            pos = mm.find(h, pos + 1, end)
        if pos >= 0:
            return pos + _TATS_AT, _TAT.unpack_from(mm, pos + _TATS_AT)[0], False
        tats = _TATS.unpack_from(mm, end)
        free = victim = -1
        victim_tat = math.inf
        for i, tat in enumerate(tats):
            if end + 8 * i == taken:
                continue
            if tat <= now:
                free = end + 8 * i
                break
            if tat < victim_tat:
                victim, victim_tat = end + 8 * i, tat
        # No free slot: every one holds a bucket in debt; the new bucket takes (when the request is
        # admitted: see _write) the slot of the one nearest to full, forgiving its debt.
        return (free if free >= 0 else victim), 0.0, True

    def _write(self, at: int, h: bytes, tat: float, now: float) -> None:
        """Give the new slot whose tat is at ``at`` to hash ``h``."""
        mm = self._mm
        if _TAT.unpack_from(mm, at)[0] > now:
            self.evictions += 1
        mm[at - _TATS_AT:at - _TATS_AT + 8] = h
        _TAT.pack_into(mm, at, tat)

    def gcra(self, clock: Callable[[], float],
             scopes: list[tuple[str, float, int]], cost: int) -> tuple[int, float, float] | None:
        """Charge ``cost`` to every (name, rate, burst) scope (one or two), or to none of them.

        Returns None when admitted, else (index, wait, full_in) of the refusing scope that must
        wait longest: ``wait`` seconds until the request would fit, ``full_in`` until that bucket
        is full. The clock is read under the lock."""
        cache = self._refs
        refs = [cache.get(name) or self._ref(name) for name, _, _ in scopes]
        # ascending order: two checks never wait for each other's second stripe
        locks = _WHOLE_TABLE if self._stripes == 1 else sorted({ref[2] for ref in refs})
        fd, mm = self._fd, self._mm
        lockf, tat_at = fcntl.lockf, _TAT.unpack_from
        with self._tlock:
            for at in locks:
                lockf(fd, fcntl.LOCK_EX, 1, at)
            try:
                now = clock()
                found: list[tuple[int, float, bool]] = []
                refused: tuple[int, float, float] | None = None
                taken = -1
                for i, (h, base, _) in enumerate(refs):
                    pos = mm.find(h, base, base + _TATS_AT)  # the hit, inline: one search in C
                    if pos >= 0 and not (pos - base) & 7:
                        slot = (pos + _TATS_AT, tat_at(mm, pos + _TATS_AT)[0], False)
                    else:
                        slot = self._find(h, base, now, taken)
                    taken = slot[0]
                    found.append(slot)
                    _, rate, burst = scopes[i]
                    debt = slot[1] - now  # seconds until full (<= 0: full)
                    wait = debt - (burst - cost) / rate if cost < burst else debt
                    if wait > _EPS and (refused is None or wait > refused[1]):
                        refused = (i, wait, debt)
                if refused is not None:
                    return refused
                for i, (at, tat, new) in enumerate(found):
                    tat = (tat if tat > now else now) + cost / scopes[i][1]
                    if new:
                        self._write(at, refs[i][0], tat, now)
                    else:
                        _TAT.pack_into(mm, at, tat)
                return None
            finally:
                for at in locks:
                    lockf(fd, fcntl.LOCK_UN, 1, at)

    def __repr__(self) -> str:
        return f"SharedLimiterTable(fd={self._fd}, slots={self._slots}, stripes={self._stripes})"


class SharedRateLimiter:
    """Per-key and per-tenant rate limits held host-wide in a :class:`SharedLimiterTable`."""

    def __init__(self, table: SharedLimiterTable, clock: Callable[[], float] = time.monotonic) -> None:
        self.table = table
        self._clock = clock

    def check(self, key_id: str, tenant: str, plan_limits: RateLimits, cost: int = 1) -> None:
        """Take ``cost`` from the key's and the tenant's buckets, or raise ``RateLimited`` (with
        ``retry-after`` and the ``ratelimit-*`` headers of the refusing scope, and ``scope``:
        ``"api_key"`` or ``"tenant"``, as ``redis_gcra`` sets it for the metric label)."""
        lim = plan_limits
        scopes: list[tuple[str, float, int]] = []
        kinds: list[str] = []
        if lim.key_rate is not None:
            scopes.append(("k" + key_id, lim.key_rate, lim.key_burst))
            kinds.append("API key")
        if lim.tenant_rate is not None:
            scopes.append(("t" + tenant, lim.tenant_rate, lim.tenant_burst))
            kinds.append("tenant")
        if not scopes:
            return
        refused = self.table.gcra(self._clock, scopes, cost)
        if refused is None:
            return
        i, wait, full_in = refused
        burst, scope = scopes[i][2], kinds[i]
        # 1e-9: float noise must not turn an exact 2.0 s into 3 s
        exc = RateLimited(f"rate limit exceeded for this {scope}", retry_after=math.ceil(wait - 1e-9))
        exc.scope = "api_key" if scope == "API key" else "tenant"  # type: ignore[attr-defined]
        reset = max(exc.retry_after, math.ceil(full_in - 1e-9))
        exc.headers = exc.headers + (
            (b"ratelimit-limit", str(burst).encode("ascii")),
            (b"ratelimit-remaining", b"0"),
            (b"ratelimit-reset", str(reset).encode("ascii")),
        )
        raise exc

    async def acquire(self, key_id: str, tenant: str, limits: RateLimits, cost: int = 1) -> None:
        """The same as :meth:`check` (never waits): lets the gateway await any limiter alike
        (the gateway's ``RateLimiter`` protocol, as ``RedisRateLimiter`` and ``LocalRateLimiter``).
        Use it directly, not wrapped in ``LocalRateLimiter``: its headers are exact already."""
        self.check(key_id, tenant, limits, cost)
