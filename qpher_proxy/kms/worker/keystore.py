"""The key store: SQLite metadata + sealed key files, scoped per tenant.  KMS process only.

(With ``storage.backend: postgresql`` the worker opens ``pg_keystore.PgKeyStore`` instead: the
same sealed bytes, in the database; see its theory of operation.)

Three modules beside this one hold its parts: ``keydb`` (the database, the lock, the KEK check),
``tenant_keys`` (:class:`TenantKeys`, the tenant-scoped repository) and ``kek_rotation`` (the
offline ``rotate-kek``). This one holds :class:`KeyStore`: opening the store, the key caches,
the per-batch state cache and the maintenance sweeps.

Theory of operation
===================

Layout of ``<kms dir>`` (0700)::

    keys.db (+ -wal, -shm)   metadata, 0600; never a key byte in clear (public keys, file handles,
                             and the sealed private keys of import jobs: see ``key_import``)
    keys/<slot>/<key id>/v<n>.qkey   one sealed private key version per file (keyfile.py)
    kek-check                the KEK canary (kek.py)
    kek-rotation             present only while ``rotate-kek`` is running or was interrupted
    lock                     flock: shared by every running worker, exclusive for maintenance

Tenant scoping
--------------
Every metadata query that touches keys is a method of :class:`TenantKeys`, which can only be
obtained with :meth:`KeyStore.tenant` and a non-empty tenant id, and every one of its SQL
statements has ``tenant_id = ?`` bound to it. A key id of another tenant therefore misses
exactly like a random id, and both produce the same :func:`~qpher_proxy.kms.wire.model.key_not_found` error
(404 ``key_not_found``). The few queries across tenants are maintenance sweeps on
:class:`KeyStore` (orphan files, due destructions, ``rotate-kek``) and never answer a request.

Schema guards: ``CHECK`` constraints on algorithm, kind, state and key id shape, and a
unique index on ``(tenant_id, key_id, version)``. Adding an algorithm to the table needs a
schema migration (the CHECK list is written at creation).

Crash safety
------------
The order of every write is: key file first (atomic, fsynced), then the metadata commit
(``BEGIN IMMEDIATE`` ... ``COMMIT`` with ``synchronous=FULL``). So:

* a crash before the commit leaves an orphan file that no metadata names: it cannot be used
  (nothing resolves to it) and the next exclusive start removes it;
* metadata never names a file that was not completely written.

Destruction reverses the order: the commit marks the key ``destroyed`` and drops the file
handles, then the files are unlinked; a crash in between leaves orphans for the sweep.

An idempotency record (``idempotency_keys``, see ``key_rules``) is inserted in the metadata
commit of the key or version it names, so neither exists without the other. The record is
looked up before the key is generated (a repeat costs no key generation) and again inside the
``BEGIN IMMEDIATE`` transaction: another worker that committed the same idempotency key in
between is seen there, and this worker's key file becomes an orphan it removes at once.

Several workers (processes) share the store: SQLite serialises writers (WAL, busy timeout);
each worker holds a *shared* ``flock`` on ``lock`` for its lifetime. A worker that obtains the
lock *exclusively* at start is the only one running, and only then sweeps orphan files (a
file another worker has just written and not yet committed must not be swept).
``rotate-kek`` needs the exclusive lock, so it refuses to run next to a live KMS.

Lifecycle
---------
::

    enabled  <-> disabled                 (disable / enable; disabled: no crypto, 409 key_disabled)
    enabled | disabled -> pending_destruction   (schedule_destroy, destroy_at = now + delay)
    pending_destruction -> enabled | disabled   (cancel_destroy: back to the state before)
    pending_destruction -> destroyed      (when due: by the periodic sweep, or lazily on access)

``rotate`` adds version n+1 (same algorithm); sign / encapsulate / encrypt always use the
latest version; decapsulate / decrypt / verify take an explicit older version. A destroyed
key keeps its metadata (a tombstone, answering 410 ``key_destroyed``); its files are gone.

Private keys are loaded from their files on first use and kept in a per-worker LRU cache of
backend key objects. The key's *state* is read from the database for every request, except
that within one batch of requests (one ``recv`` in the worker) the state of enabled keys is
reused -- and that reuse is dropped whenever ``PRAGMA data_version`` shows another worker
committed since (see :meth:`KeyStore.begin_batch`). So a disable or destroy committed by any
worker takes effect for every request received after the commit, in every worker.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ...crypto.interface import Backend, PrivateKey, PublicKey
from ...errors import InvalidInput
from ..wire.model import DEFAULT_DESTROY_DELAY, MAX_DESTROY_DELAY
from . import keyfile
from .kek import KEKProvider
from .key_objects import KeyCaches
from .key_rules import IDEMPOTENCY_TTL
from .keydb import StoreLock, StoreUnavailable, connect, mapped_errors, verify_store_kek, write_transaction
from .tenant_keys import ResolvedVersion, TenantKeys

log = logging.getLogger("qpher.kms.keystore")

DEFAULT_CACHE_SIZE = 1024  # loaded private keys per worker


class KeyStore(KeyCaches):
    """The whole store of one KMS directory; hand out :class:`TenantKeys` per request."""

    def __init__(
        self,
        kms_dir: str | os.PathLike[str],
        kek: KEKProvider,
        backend: Backend,
        *,
        clock: Callable[[], float] = time.time,
        destroy_delay: float = DEFAULT_DESTROY_DELAY,
        cache_size: int = DEFAULT_CACHE_SIZE,
        maintenance: bool = True,
    ) -> None:
        self.dir = Path(kms_dir)
        self.kek = kek
        self.backend = backend
        self.clock = clock
        if not 0 <= destroy_delay <= MAX_DESTROY_DELAY:
            raise InvalidInput(f"destroy delay must be between 0 and {MAX_DESTROY_DELAY:.0f} s")
        self.destroy_delay = float(destroy_delay)
        self.cache_size = cache_size
        self._hot: dict[tuple[str, str, int | None], ResolvedVersion] = {}  # see begin_batch()
        self._batch_valid = False
        self._data_version: int | None = None
        self._private: OrderedDict[tuple[str, str, int], PrivateKey] = OrderedDict()
        self._public: OrderedDict[tuple[str, str, int], PublicKey] = OrderedDict()
        keyfile.ensure_dir(self.dir)
        os.chmod(self.dir, keyfile.DIR_MODE)
        self._lock = StoreLock(self.dir)
        self.db: sqlite3.Connection | None = None
        try:
            exclusive = self._lock.try_exclusive()
            if not exclusive:
                self._lock.shared()
            with mapped_errors("opening the database"):
                self.db = connect(self.dir)
            verify_store_kek(self.dir, kek, self.db)
            self.exclusive_start = exclusive
            if exclusive and maintenance:
                self.sweep_orphans()
                self.check_files()
                self.sweep_due()
            if exclusive:
                self._lock.shared()  # downgrade: other workers may start now
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None
        self._private.clear()
        self._public.clear()
        self._lock.close()

    def tenant(self, tenant_id: str) -> TenantKeys:
        """The repository for one tenant; there is no other way to reach keys."""
        return TenantKeys(self, tenant_id)

    @property
    def _db(self) -> sqlite3.Connection:
        if self.db is None:
            raise StoreUnavailable("the key store is closed")
        return self.db

    # ---- caches (KeyCaches: _cache_get, _cache_put) ----

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """A write transaction of this worker; clears the per-batch cache (our own commits do
        not change ``PRAGMA data_version`` for us)."""
        try:
            with write_transaction(self._db):
                yield
        finally:
            self._hot.clear()

    # ---- the per-batch metadata cache ----

    def begin_batch(self) -> None:
        """Start handling one batch of requests (the worker calls this after each ``recv``).

        Within a batch, the state of *enabled* keys is served from a small cache instead of one
        SQLite query per request. ``PRAGMA data_version`` changes whenever another connection
        (another worker) has committed, so checking it here -- after the requests were received
        -- means a disable committed anywhere before a request arrived is seen by that request.
        Our own writes clear the cache directly (data_version ignores them)."""
        try:
            (version,) = self._db.execute("PRAGMA data_version").fetchone()
        except sqlite3.Error:
            self._hot.clear()
            self._batch_valid = False
            return
        if version != self._data_version:
            self._hot.clear()
            self._data_version = version
        self._batch_valid = True

    def end_batch(self) -> None:
        self._batch_valid = False

    def _evict(self, tenant_id: str, key_id: str) -> None:
        self._hot.clear()
        for cache in (self._private, self._public):
            for k in [k for k in cache if k[0] == tenant_id and k[1] == key_id]:
                del cache[k]

    # ---- maintenance (across tenants; never answers a request) ----

    def sweep_orphans(self) -> int:
        """Remove key files (and temporaries) no metadata references. Exclusive start only."""
        keys_dir = self.dir / "keys"
        if not keys_dir.exists():
            return 0
        with mapped_errors("listing key files"):
            rows = self._db.execute("SELECT file FROM key_versions WHERE file IS NOT NULL")
            referenced = {r[0] for r in rows}
        removed = 0
        for root, _dirs, files in os.walk(keys_dir):
            for name in files:
                path = Path(root) / name
                rel = path.relative_to(self.dir).as_posix()
                if keyfile.TMP_MARKER in name or rel not in referenced:
                    if keyfile.remove_file(path):
                        removed += 1
        if removed:
            log.warning("removed orphan key files", extra={"fields": {"count": removed}})
        return removed

    def check_files(self) -> int:
        """Log (never fix) metadata whose key file is missing; those keys answer key_unavailable."""
        with mapped_errors("listing key files"):
            rows = self._db.execute(
                "SELECT key_id, version, file FROM key_versions WHERE file IS NOT NULL"
            ).fetchall()
        missing = [(k, v) for k, v, f in rows if not (self.dir / f).is_file()]
        for key_id, version in missing:
            log.error("key file missing", extra={"fields": {"key_id": key_id, "version": version}})
        return len(missing)

    def sweep_due(self) -> int:
        """Destroy every key whose destruction is due. Returns how many."""
        now = self.clock()
        with mapped_errors("finding due destructions"):
            due = self._db.execute(
                "SELECT tenant_id, key_id FROM keys WHERE state = 'pending_destruction' AND destroy_at <= ?",
                (now,),
            ).fetchall()
        n = 0
        for tenant_id, key_id in due:
            if self.tenant(tenant_id)._destroy_if_due(key_id, now):
                n += 1
        self.sweep_idempotency(now)
        self.sweep_import_jobs(now)
        return n

    def sweep_import_jobs(self, now: float) -> int:
        """Destroy the private keys of expired import jobs (the rows stay, answering "expired")."""
        with mapped_errors("destroying expired import jobs"):
            if self._db.execute(
                "SELECT 1 FROM import_jobs WHERE sealed IS NOT NULL AND expires_at <= ? LIMIT 1", (now,)
            ).fetchone() is None:
                return 0
            with self._transaction():
                cur = self._db.execute(
                    "UPDATE import_jobs SET sealed = NULL, kek_id = NULL, destroyed_at = ? "
                    "WHERE sealed IS NOT NULL AND expires_at <= ?",
                    (now, now),
                )
        if cur.rowcount:
            log.info("expired import jobs destroyed", extra={"fields": {"count": cur.rowcount}})
        return cur.rowcount

    def sweep_idempotency(self, now: float) -> int:
        """Delete the idempotency records past their lifetime (they already count as absent)."""
        before = now - IDEMPOTENCY_TTL
        with mapped_errors("expiring idempotency records"):
            if self._db.execute(
                "SELECT 1 FROM idempotency_keys WHERE created_at <= ? LIMIT 1", (before,)
            ).fetchone() is None:
                return 0  # the common case: no write lock taken
            with self._transaction():
                cur = self._db.execute("DELETE FROM idempotency_keys WHERE created_at <= ?", (before,))
        return cur.rowcount


__all__ = ["DEFAULT_CACHE_SIZE", "KeyStore", "StoreUnavailable", "TenantKeys"]
