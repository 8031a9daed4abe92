"""The tenant-scoped key repository: every key operation of one tenant.  KMS only.

A :class:`TenantKeys` is obtained from :meth:`.keystore.KeyStore.tenant` with a
non-empty tenant id, and each of its SQL statements binds ``tenant_id``: a key id of another
tenant misses exactly like a random one (404 ``key_not_found``). The lifecycle it enforces, the
write order that keeps a crash harmless and the per-batch state cache are described in
``keystore``; this module is their code.

It is the store's other half: it uses the store's connection, write transaction and caches
(``KeyStore._db``, ``_transaction``, ``_private``/``_public``, ``_hot``), which nothing else
touches. Key files are written and removed through the ``keyfile`` module's functions, looked
up at call time.
"""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...crypto.algorithms import ALGORITHMS, Algorithm, get_algorithm
from ...crypto.interface import PrivateKey
from ...errors import BackendUnavailable, InvalidKeyMaterial, KeyDestroyed, KeyDisabled, KeyNotFound
from ..wire.model import (
    DEFAULT_LIST_LIMIT,
    ImportJobInfo,
    ImportJobPage,
    KeyInfo,
    KeyPage,
    KeyState,
    import_job_not_found,
    key_not_found,
    new_import_job_id,
    new_key_id,
)
from . import keyfile
from .key_import import ImportRequest, new_job_key, require_open, unwrap
from .key_objects import KeyObjects, open_sealed
from .key_rules import (
    IDEMPOTENCY_TTL,
    JOB_COLUMNS,
    KEY_COLUMNS,
    IdempotencyClaim,
    build_info,
    check_delay,
    check_import_job_id,
    check_import_ttl,
    check_job_cursor,
    check_key_id,
    check_label,
    check_list_args,
    check_schedulable,
    check_version,
    choose_algorithm,
    idempotency_claim,
    job_info,
    replay_target,
    require_usable,
    transition,
)
from .keydb import StoreUnavailable, mapped_errors
from .keyfile import KeyBinding

if TYPE_CHECKING:
    from .keystore import KeyStore

log = logging.getLogger("qpher.kms.keystore")

HOT_CACHE_SIZE = 4096  # resolved (tenant, key, version) entries kept between data_version changes

_KEY_COLS = KEY_COLUMNS


@dataclass(frozen=True, slots=True)
class ResolvedVersion:
    """An enabled key's version, resolved for one request: what loading its key object needs."""

    key_id: str
    algorithm: Algorithm
    version: int
    file: str



class TenantKeys(KeyObjects):
    """Every key operation of one tenant. Each SQL statement binds ``tenant_id``."""

    __slots__ = ()
    _store: KeyStore  # set by KeyObjects.__init__, with the tenant id checked

    # ---- helpers ----

    def _check_id(self, key_id: object) -> str:
        return check_key_id(key_id)

    def _row(self, key_id: str) -> tuple[Any, ...]:
        row = self._store._db.execute(
            f"SELECT {_KEY_COLS}, resume_state FROM keys WHERE tenant_id = ? AND key_id = ?",
            (self._tenant, key_id),
        ).fetchone()
        if row is None:
            raise key_not_found(key_id)
        return tuple(row)

    def _info(self, row: tuple[Any, ...], version: int | None = None) -> KeyInfo:
        key_id, latest = row[0], row[5]
        db = self._store._db
        versions = db.execute(
            "SELECT version, state, created_at FROM key_versions WHERE tenant_id = ? AND key_id = ? "
            "ORDER BY version",
            (self._tenant, key_id),
        ).fetchall()
        want = latest if version is None else version
        pub_row = db.execute(
            "SELECT public_key, origin, import_job_id FROM key_versions "
            "WHERE tenant_id = ? AND key_id = ? AND version = ?",
            (self._tenant, key_id, want),
        ).fetchone()
        if pub_row is None:
            return build_info(row, versions, want, None, False)
        return build_info(row, versions, want, pub_row[0], True, pub_row[1], pub_row[2])

    def _lazy_destroy(self, key_id: str, row: tuple[Any, ...]) -> tuple[Any, ...]:
        """A key past its destruction time is destroyed now, whatever the sweep's schedule."""
        state, destroy_at = row[4], row[8]
        if state == KeyState.PENDING_DESTRUCTION.value and destroy_at is not None:
            now = self._store.clock()
            if destroy_at <= now:
                self._destroy_if_due(key_id, now)
                return self._row(key_id)
        return row

    def _write_version(
        self, key_id: str, version: int, alg: Algorithm, priv: PrivateKey | None = None
    ) -> tuple[bytes, str, PrivateKey]:
        """Seal ``priv`` (a new key of ``alg`` when None) into the version's key file."""
        store = self._store
        if priv is None:
            if not store.backend.supports(alg):
                raise BackendUnavailable(f"the {store.backend.name} backend does not offer {alg.name}")
            priv = store.backend.generate(alg)
        public = priv.public_key().public_bytes()
        binding = KeyBinding(self._tenant, key_id, version, alg.name)
        rel = keyfile.relative_path(binding)
        keyfile.write_atomic(store.dir / rel, keyfile.seal(store.kek, binding, priv.private_bytes()))
        return public, rel, priv

    # ---- lifecycle ----

    def create(
        self, *, algorithm: str | None = None, kind: str | None = None, mode: str | None = None,
        label: str | None = None, idempotency_key: str | None = None,
    ) -> KeyInfo:
        alg = choose_algorithm(algorithm, kind, mode)
        label = check_label(label)
        claim = idempotency_claim(idempotency_key, "create_key", algorithm=alg.name, label=label)
        if claim is not None:
            with mapped_errors("reading an idempotency record"):
                earlier = self._recorded(claim, self._store.clock())
            if earlier is not None:
                return self._replay(*earlier)
        return self._create(alg, label, claim)

    def _create(
        self, alg: Algorithm, label: str | None, claim: IdempotencyClaim | None,
        imported: PrivateKey | None = None, import_job_id: str | None = None,
    ) -> KeyInfo:
        """A new key of ``alg`` whose version 1 is ``imported`` (a new key pair when None)."""
        store = self._store
        key_id = new_key_id()
        public, rel, priv = self._write_version(key_id, 1, alg, imported)
        now = store.clock()
        try:
            with mapped_errors("creating a key"), store._transaction():
                # another worker may have committed this idempotency key since the read above;
                # the write lock is held from here to the commit, so this read is the last word
                earlier = None if claim is None else self._recorded(claim, now)
                if earlier is None:
                    store._db.execute(
                        "INSERT INTO keys (tenant_id, key_id, kind, algorithm, label, state, latest_version, "
                        "created_at, updated_at) VALUES (?, ?, ?, ?, ?, 'enabled', 1, ?, ?)",
                        (self._tenant, key_id, alg.kind.value, alg.name, label, now, now),
                    )
                    self._insert_version(key_id, 1, alg, public, rel, now, import_job_id)
                    if claim is not None:
                        self._record(claim, key_id, 1, now)
        except BaseException:
            keyfile.remove_file(store.dir / rel)
            raise
        if earlier is not None:
            keyfile.remove_file(store.dir / rel)
            return self._replay(*earlier)
        store._cache_put(store._private, (self._tenant, key_id, 1), priv)
        return self._info(self._row(key_id))

    # ---- idempotency records (see key_rules) ----

    def _recorded(self, claim: IdempotencyClaim, now: float) -> tuple[str, int] | None:
        """The (key id, version) a live record of ``claim``'s idempotency key answers with, None
        without one; 409 idempotency_key_reused when it recorded another request."""
        row = self._store._db.execute(
            "SELECT operation, fingerprint, key_id, version, created_at FROM idempotency_keys "
            "WHERE tenant_id = ? AND key_hash = ?",
            (self._tenant, claim.key_hash),
        ).fetchone()
        return replay_target(claim, row, now)

    def _record(self, claim: IdempotencyClaim, key_id: str, version: int, now: float) -> None:
        """Record ``claim`` (inside the transaction that writes ``key_id`` / ``version``),
        taking over an expired record of the same idempotency key."""
        db = self._store._db
        db.execute(
            "DELETE FROM idempotency_keys WHERE tenant_id = ? AND key_hash = ? AND created_at <= ?",
            (self._tenant, claim.key_hash, now - IDEMPOTENCY_TTL),
        )
        db.execute(
            "INSERT INTO idempotency_keys (tenant_id, key_hash, operation, fingerprint, key_id, version, "
            "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (self._tenant, claim.key_hash, claim.operation, claim.fingerprint, key_id, version, now),
        )

    def _replay(self, key_id: str, version: int) -> KeyInfo:
        """The answer to a repeated request: the recorded key, at the recorded version, as it is now."""
        with mapped_errors("reading a key"):
            info = self._info(self._lazy_destroy(key_id, self._row(key_id)), version)
        return dataclasses.replace(info, replayed=True)

    def _insert_version(
        self, key_id: str, version: int, alg: Algorithm, public: bytes, rel: str, now: float,
        import_job_id: str | None = None,
    ) -> None:
        self._store._db.execute(
            "INSERT INTO key_versions (tenant_id, key_id, version, algorithm, state, public_key, file, "
            "kek_id, created_at, origin, import_job_id) VALUES (?, ?, ?, ?, 'active', ?, ?, ?, ?, ?, ?)",
            (self._tenant, key_id, version, alg.name, public, rel, self._store.kek.kek_id, now,
             "generated" if import_job_id is None else "imported", import_job_id),
        )

    def get(self, key_id: str, version: int | None = None) -> KeyInfo:
        key_id = self._check_id(key_id)
        if version is not None:
            check_version(version)
        with mapped_errors("reading a key"):
            return self._info(self._lazy_destroy(key_id, self._row(key_id)), version)

    def list(self, limit: int = DEFAULT_LIST_LIMIT, cursor: str | None = None) -> KeyPage:
        limit, cursor = check_list_args(limit, cursor)
        with mapped_errors("listing keys"):
            rows = self._store._db.execute(
                f"SELECT {_KEY_COLS} FROM keys WHERE tenant_id = ? AND key_id > ? ORDER BY key_id LIMIT ?",
                (self._tenant, cursor or "", limit + 1),
            ).fetchall()
            more = len(rows) > limit
            rows = rows[:limit]
            infos = tuple(self._info(self._lazy_destroy(r[0], tuple(r))) for r in rows)
        return KeyPage(infos, rows[-1][0] if more and rows else None)

    def rotate(self, key_id: str, idempotency_key: str | None = None) -> KeyInfo:
        key_id = self._check_id(key_id)
        claim = idempotency_claim(idempotency_key, "rotate_key", key_id=key_id)
        return self._rotate(key_id, claim)

    def _rotate(
        self, key_id: str, claim: IdempotencyClaim | None, imported: PrivateKey | None = None,
        import_job_id: str | None = None,
    ) -> KeyInfo:
        """A new version of ``key_id``: ``imported`` (which must be of the key's algorithm), or a
        new key pair when None."""
        store = self._store
        earlier: tuple[str, int] | None = None
        with mapped_errors("rotating a key"):
            if claim is not None:
                earlier = self._recorded(claim, store.clock())
                if earlier is not None:
                    return self._replay(*earlier)
            row = self._lazy_destroy(key_id, self._row(key_id))
            require_usable(key_id, row[4])
            alg = get_algorithm(row[2])
            if imported is not None and imported.algorithm.name != alg.name:
                raise InvalidKeyMaterial(
                    f"key {key_id!r} is a {alg.name} key; "
                    f"a {imported.algorithm.name} key cannot be its version"
                )
            # the write lock is held from reading latest_version to the commit: concurrent
            # rotations (other workers) serialise and never pick the same version number
            with store._transaction():
                now = store.clock()
                earlier = None if claim is None else self._recorded(claim, now)
                if earlier is None:
                    row = self._row(key_id)
                    require_usable(key_id, row[4])
                    version = row[5] + 1
                    public, rel, priv = self._write_version(key_id, version, alg, imported)
                    try:
                        self._insert_version(key_id, version, alg, public, rel, now, import_job_id)
                        store._db.execute(
                            "UPDATE keys SET latest_version = ?, updated_at = ? "
                            "WHERE tenant_id = ? AND key_id = ?",
                            (version, now, self._tenant, key_id),
                        )
                        if claim is not None:
                            self._record(claim, key_id, version, now)
                    except BaseException:
                        keyfile.remove_file(store.dir / rel)
                        raise
        if earlier is not None:
            return self._replay(*earlier)
        store._cache_put(store._private, (self._tenant, key_id, version), priv)
        return self._info(self._row(key_id))

    # ---- import jobs and key import (see key_import) ----

    def _job_row(self, job_id: str) -> tuple[Any, ...]:
        row = self._store._db.execute(
            f"SELECT {JOB_COLUMNS}, sealed FROM import_jobs WHERE tenant_id = ? AND job_id = ?",
            (self._tenant, job_id),
        ).fetchone()
        if row is None:
            raise import_job_not_found(job_id)
        return tuple(row)

    def create_import_job(self, method: object = None, ttl_seconds: object = None) -> ImportJobInfo:
        ttl = check_import_ttl(ttl_seconds)
        store = self._store
        job_id = new_import_job_id()
        name, _kem, public, sealed = new_job_key(store.backend, store.kek, self._tenant, job_id, method)
        now = store.clock()
        with mapped_errors("creating an import job"), store._transaction():
            store._db.execute(
                "INSERT INTO import_jobs (tenant_id, job_id, method, public_key, sealed, kek_id, created_at, "
                "expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (self._tenant, job_id, name, public, sealed, store.kek.kek_id, now, now + ttl),
            )
        log.info("import job created", extra={"fields": {"import_job_id": job_id, "method": name}})
        return ImportJobInfo(job_id, name, public, now, now + ttl, "active")

    def get_import_job(self, job_id: object) -> ImportJobInfo:
        job_id = check_import_job_id(job_id)
        with mapped_errors("reading an import job"):
            return job_info(self._job_row(job_id), self._store.clock())

    def list_import_jobs(self, limit: int = DEFAULT_LIST_LIMIT, cursor: object = None) -> ImportJobPage:
        limit, _ = check_list_args(limit, None)
        after = check_job_cursor(cursor)
        now = self._store.clock()
        with mapped_errors("listing import jobs"):
            rows = self._store._db.execute(
                f"SELECT {JOB_COLUMNS} FROM import_jobs WHERE tenant_id = ? AND job_id > ? "
                "ORDER BY job_id LIMIT ?",
                (self._tenant, after or "", limit + 1),
            ).fetchall()
        more = len(rows) > limit
        jobs = tuple(job_info(tuple(r), now) for r in rows[:limit])
        return ImportJobPage(jobs, jobs[-1].import_job_id if more and jobs else None)

    def import_key(
        self, job_id: object, algorithm: object, wrapped_key: object, *, format: object = None,
        label: object = None, key_id: object = None, idempotency_key: object = None,
    ) -> KeyInfo:
        """A new key (or, with ``key_id``, a new version of that key) holding the private key
        wrapped for import job ``job_id``; see ``key_import`` for every check on the way."""
        req = ImportRequest(job_id, algorithm, wrapped_key, format, label, key_id)
        store = self._store
        claim = idempotency_claim(
            idempotency_key, "create_key" if req.key_id is None else "rotate_key", request="import_key",
            **req.fingerprint_args(),
        )
        if claim is not None:
            with mapped_errors("reading an idempotency record"):
                earlier = self._recorded(claim, store.clock())
            if earlier is not None:
                return self._replay(*earlier)
        with mapped_errors("reading an import job"):
            row = self._job_row(req.job_id)
        job = job_info(row, store.clock())
        priv = unwrap(store.backend, store.kek, self._tenant, job, require_open(job, row[6]), req)
        if req.key_id is None:
            info = self._create(req.algorithm, req.label, claim, priv, req.job_id)
        else:
            info = self._rotate(req.key_id, claim, priv, req.job_id)
        if not info.replayed:
            log.info("key imported", extra={"fields": {
                "key_id": info.key_id, "version": info.version, "algorithm": info.algorithm,
                "import_job_id": req.job_id}})
        return info

    def _transition(self, key_id: str, op: str) -> KeyInfo:
        key_id = self._check_id(key_id)
        store = self._store
        with mapped_errors(f"{op} a key"):
            self._lazy_destroy(key_id, self._row(key_id))  # outside the transaction: it commits
        with mapped_errors(f"{op} a key"), store._transaction():
            row = self._row(key_id)
            state = row[4]
            now = store.clock()
            new = transition(key_id, op, state, row[10])
            if new != state:
                store._db.execute(
                    "UPDATE keys SET state = ?, resume_state = NULL, destroy_at = NULL, updated_at = ? "
                    "WHERE tenant_id = ? AND key_id = ?",
                    (new, now, self._tenant, key_id),
                )
        return self._info(self._row(key_id))

    def disable(self, key_id: str) -> KeyInfo:
        return self._transition(key_id, "disable")

    def enable(self, key_id: str) -> KeyInfo:
        return self._transition(key_id, "enable")

    def cancel_destroy(self, key_id: str) -> KeyInfo:
        return self._transition(key_id, "cancel_destroy")

    def schedule_destroy(self, key_id: str, delay: float | None = None) -> KeyInfo:
        key_id = self._check_id(key_id)
        store = self._store
        delay = check_delay(delay, store.destroy_delay)
        with mapped_errors("scheduling a destruction"):
            self._lazy_destroy(key_id, self._row(key_id))  # outside the transaction: it commits
        with mapped_errors("scheduling a destruction"), store._transaction():
            row = self._row(key_id)
            state = row[4]
            if check_schedulable(key_id, state):  # already scheduled: keep the first date
                now = store.clock()
                store._db.execute(
                    "UPDATE keys SET state = 'pending_destruction', resume_state = ?, destroy_at = ?, "
                    "updated_at = ? WHERE tenant_id = ? AND key_id = ?",
                    (state, now + float(delay), now, self._tenant, key_id),
                )
        store._evict(self._tenant, key_id)
        row = self._lazy_destroy(key_id, self._row(key_id))  # delay 0: destroyed at once
        return self._info(row)

    def _destroy_if_due(self, key_id: str, now: float) -> bool:
        store = self._store
        # the files are unlinked after *our* commit; inside someone else's transaction that
        # commit could still roll back and leave metadata naming deleted files
        assert not store._db.in_transaction, "destroy must run in its own transaction"
        with mapped_errors("destroying a key"), store._transaction():
            row = store._db.execute(
                "SELECT state, destroy_at FROM keys WHERE tenant_id = ? AND key_id = ?",
                (self._tenant, key_id),
            ).fetchone()
            if row is None or row[0] != KeyState.PENDING_DESTRUCTION.value or row[1] > now:
                return False
            files = [
                r[0]
                for r in store._db.execute(
                    "SELECT file FROM key_versions WHERE tenant_id = ? AND key_id = ? AND file IS NOT NULL",
                    (self._tenant, key_id),
                )
            ]
            store._db.execute(
                "UPDATE keys SET state = 'destroyed', resume_state = NULL, destroy_at = NULL, "
                "destroyed_at = ?, updated_at = ? WHERE tenant_id = ? AND key_id = ?",
                (now, now, self._tenant, key_id),
            )
            store._db.execute(
                "UPDATE key_versions SET state = 'destroyed', file = NULL, kek_id = NULL "
                "WHERE tenant_id = ? AND key_id = ?",
                (self._tenant, key_id),
            )
        # committed: the files are now orphans; remove them (a crash here leaves them to the sweep)
        for rel in files:
            keyfile.remove_file(store.dir / rel)
        store._evict(self._tenant, key_id)
        log.info("key destroyed", extra={"fields": {"key_id": key_id, "versions": len(files)}})
        return True

    # ---- key objects for the crypto operations ----

    _RESOLVE = (
        "SELECT k.state, k.destroy_at, k.latest_version, v.version, v.algorithm, v.file "
        "FROM keys k LEFT JOIN key_versions v ON v.tenant_id = k.tenant_id AND v.key_id = k.key_id "
        "AND v.version = COALESCE(?, k.latest_version) WHERE k.tenant_id = ? AND k.key_id = ?"
    )

    def _resolve(self, key_id: object, version: object) -> ResolvedVersion:
        store = self._store
        if store._batch_valid and type(key_id) is str and (version is None or type(version) is int):
            hot = store._hot.get((self._tenant, key_id, version))
            if hot is not None:
                return hot
        key_id = self._check_id(key_id)
        if version is not None:
            check_version(version)
        db = store._db
        try:
            row = db.execute(self._RESOLVE, (version, self._tenant, key_id)).fetchone()
        except sqlite3.Error as exc:
            raise StoreUnavailable("key store database error while reading a key") from exc
        if row is None:
            raise key_not_found(key_id)
        state, destroy_at, _latest, v, alg, rel = row
        if state != "enabled":
            if state == "pending_destruction" and destroy_at <= self._store.clock():
                self._destroy_if_due(key_id, self._store.clock())
                state = "destroyed"
            if state == "destroyed":
                raise KeyDestroyed(f"key {key_id!r} was destroyed")
            if state == "disabled":
                raise KeyDisabled(f"key {key_id!r} is disabled")
            raise KeyDisabled(f"key {key_id!r} is scheduled for destruction")
        if v is None:
            raise KeyNotFound(f"key {key_id!r} has no version {version}")
        if rel is None:  # pragma: no cover - the CHECK constraint ties state and file
            raise KeyDestroyed(f"key {key_id!r} version {v} was destroyed")
        resolved = ResolvedVersion(key_id, ALGORITHMS[alg], v, rel)
        if store._batch_valid:
            if len(store._hot) >= HOT_CACHE_SIZE:
                store._hot.clear()
            store._hot[(self._tenant, key_id, version)] = resolved  # type: ignore[index]  # checked above
        return resolved

    def _stored_public(self, r: ResolvedVersion) -> bytes:
        row = self._store._db.execute(
            "SELECT public_key FROM key_versions WHERE tenant_id = ? AND key_id = ? AND version = ?",
            (self._tenant, r.key_id, r.version),
        ).fetchone()
        return bytes(row[0])

    def _load_private(self, r: ResolvedVersion) -> PrivateKey:
        store = self._store
        binding = KeyBinding(self._tenant, r.key_id, r.version, r.algorithm.name)
        data = keyfile.read_key_file(store.dir / r.file, binding.describe())
        row = store._db.execute(
            "SELECT public_key FROM key_versions WHERE tenant_id = ? AND key_id = ? AND version = ?",
            (self._tenant, r.key_id, r.version),
        ).fetchone()
        public = None if row is None else bytes(row[0])
        return open_sealed(store, binding, r.algorithm, data, public, "key file")


# the names this module used before the rules moved to key_rules
_check_version = check_version
_require_usable = require_usable
_choose_algorithm = choose_algorithm
