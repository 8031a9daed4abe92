"""A lease with a fencing token in PostgreSQL: one sweeper among all KMS workers of all nodes.

Theory of operation
===================

The row ``leases(name, holder, token, expires_at)`` names who may do a piece of cluster-wide
work (the destruction sweep: ``name = 'kms-sweep'``) and until when. Time is the *database's*
clock (``now()``) throughout, so the nodes' clocks never have to agree.

* **Acquire** inserts the row, or takes it over only if it has expired, and then increments the
  token; ``RETURNING token`` answers whether we got it::

      INSERT INTO leases ... VALUES (name, holder, 1, now() + ttl)
      ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, token = leases.token + 1,
                                       expires_at = excluded.expires_at
      WHERE leases.expires_at <= now() RETURNING token

* **Renew** (every ``ttl / 3``) extends the row only while it is still ours and unexpired; zero
  rows means the lease is lost. A renewal never creates a row and never takes one another
  holder has (it matches holder *and* token *and* ``expires_at > now()``).

* **Fencing.** A holder that was paused (GC, a stalled VM, a partition) may believe it still holds
  an expired lease. Every write done under the lease therefore runs :meth:`Lease.fence` in its own
  transaction first: ``SELECT 1 FROM leases WHERE name, holder, token AND expires_at > now()
  FOR SHARE``. No row: :class:`LeaseLost`, the transaction rolls back and the holder stops. A
  row: it stays share-locked until that transaction commits, so a take-over (which must update
  the row) waits for the write to finish -- a fenced write can never interleave with the next
  holder's work.

Only :meth:`Lease.tick` and :meth:`Lease.fence` change the local view; every SQL statement is a
single short transaction on the store's :class:`~qpher_proxy.storage.postgres.Database`.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ...errors import QpherError

if TYPE_CHECKING:  # pragma: no cover - psycopg is imported by storage.postgres, at run time only there
    import psycopg

    from ...storage.postgres import Database

log = logging.getLogger("qpher.kms.lease")

SWEEP_LEASE = "kms-sweep"

_ACQUIRE = (
    "INSERT INTO leases (name, holder, token, expires_at) "
    "VALUES (%(name)s, %(holder)s, 1, now() + make_interval(secs => %(ttl)s)) "
    "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, token = leases.token + 1, "
    "expires_at = excluded.expires_at WHERE leases.expires_at <= now() RETURNING token"
)
_RENEW = (
    "UPDATE leases SET expires_at = now() + make_interval(secs => %(ttl)s) "
    "WHERE name = %(name)s AND holder = %(holder)s AND token = %(token)s AND expires_at > now() "
    "RETURNING token"
)
_FENCE = (
    "SELECT 1 FROM leases WHERE name = %(name)s AND holder = %(holder)s AND token = %(token)s "
    "AND expires_at > now() FOR SHARE"
)
_RELEASE = (
    "UPDATE leases SET expires_at = now() "
    "WHERE name = %(name)s AND holder = %(holder)s AND token = %(token)s AND expires_at > now()"
)


class LeaseLost(QpherError):
    """The lease expired or another holder took it: the write under it was not done."""

    code = "lease_lost"
    status = 503


def new_holder() -> str:
    """``host:pid:random``: unique per process start, readable in the table."""
    return f"{socket.gethostname()[:100]}:{os.getpid()}:{secrets.token_hex(6)}"


class Lease:
    """One named lease for this process (see the module docstring). Not thread-safe."""

    def __init__(
        self,
        db: Database,
        ttl: float,
        *,
        name: str = SWEEP_LEASE,
        holder: str | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if not ttl > 0:
            raise ValueError("a lease needs a positive TTL")
        self._db = db
        self.name = name
        self.holder = holder or new_holder()
        self.ttl = float(ttl)
        self.token: int | None = None  # set while we believe we hold it
        self._monotonic = monotonic
        self._confirmed = 0.0  # monotonic time of the last successful acquire or renew

    def __repr__(self) -> str:
        return f"<Lease {self.name!r} holder={self.holder!r} token={self.token}>"

    def _params(self) -> dict[str, Any]:
        return {"name": self.name, "holder": self.holder, "token": self.token, "ttl": self.ttl}

    @property
    def held(self) -> bool:
        """Whether we hold it by our own clock (the database decides at :meth:`fence`)."""
        return self.token is not None and self._monotonic() - self._confirmed < self.ttl

    def acquire(self) -> bool:
        """Take the lease if it is free or expired; True with a new, higher token."""
        started = self._monotonic()
        with self._db.transaction(what="acquiring a lease") as conn:
            row = conn.execute(_ACQUIRE, self._params()).fetchone()
        if row is None:
            self.token = None
            return False
        self.token = int(row[0])
        self._confirmed = started
        log.info("lease acquired", extra={"fields": {"lease": self.name, "token": self.token}})
        return True

    def renew(self) -> bool:
        """Extend the lease we hold; False (and forgotten) if it is no longer ours."""
        if self.token is None:
            return False
        started = self._monotonic()
        with self._db.transaction(what="renewing a lease") as conn:
            row = conn.execute(_RENEW, self._params()).fetchone()
        if row is None:
            self._lose("renewal refused")
            return False
        self._confirmed = started
        return True

    def tick(self) -> bool:
        """Renew when a third of the TTL has passed, or try to acquire when not holding; returns
        whether we hold the lease now."""
        if self.token is not None:
            if self._monotonic() - self._confirmed < self.ttl / 3:
                return True
            if self.renew():
                return True
        return self.acquire()

    def fence(self, conn: psycopg.Connection[Any]) -> None:
        """Inside the transaction of a write done under the lease: raise :class:`LeaseLost` unless
        the database still has the lease as ours (it stays share-locked until that commit)."""
        if self.token is None or conn.execute(_FENCE, self._params()).fetchone() is None:
            self._lose("fenced")
            raise LeaseLost(f"the {self.name!r} lease is no longer held by this process")

    def release(self) -> None:
        """Let the lease expire now (shutdown), so that another process takes over at once."""
        if self.token is None:
            return
        try:
            with self._db.transaction(what="releasing a lease") as conn:
                conn.execute(_RELEASE, self._params())
        except QpherError:
            pass  # it expires by itself
        self.token = None

    def _lose(self, why: str) -> None:
        if self.token is not None:
            log.warning("lease lost", extra={"fields": {"lease": self.name, "token": self.token, "why": why}})
        self.token = None


__all__ = ["SWEEP_LEASE", "Lease", "LeaseLost", "new_holder"]
