"""The key lifecycle rules both key stores enforce, free of any storage.  KMS only.

:class:`~.tenant_keys.TenantKeys` (SQLite + key files) and :class:`~.pg_keystore.PgTenantKeys`
(PostgreSQL) differ in how they read and write; what a request may do, which error it gets and
what a key's metadata looks like on the wire are decided here, once, so the two cannot drift:

* argument checks: key id, version, label, list limit and cursor, destruction delay;
* :func:`choose_algorithm` (``algorithm`` / ``kind`` / ``mode`` -> an algorithm);
* :func:`require_usable` (the state of a key that must do crypto or be rotated);
* :func:`transition` (disable / enable / cancel_destroy: the state a key moves to, or the error);
* :func:`build_info` (a key row and its versions -> :class:`KeyInfo`);
* idempotency keys: :func:`idempotency_claim` (what a store records for a request carrying
  one) and :func:`replay_target` (what a stored record means for a repeated request).

Idempotency keys
----------------
``create_key`` and ``rotate_key`` take an optional ``idempotency_key`` (the client's
``Idempotency-Key`` header). A store records, in the transaction that creates the key or the
version, ``(tenant, SHA-256 of the idempotency key, operation, fingerprint, key id, version,
created_at)``; the fingerprint is SHA-256 over the operation's canonical arguments (the resolved
algorithm and the label, or the key id). The idempotency key itself is never stored. A repeated
request of the same tenant with the same idempotency key then finds the record and:

* same operation and fingerprint: answers with the recorded key at the recorded version and
  creates nothing (``KeyInfo.replayed``);
* anything else: 409 ``idempotency_key_reused``.

A record older than :data:`IDEMPOTENCY_TTL` counts as absent (and is taken over by the next
request with that key, or deleted by the sweep). Two racing requests are decided by the
primary key ``(tenant_id, key_hash)``: see each store for how the loser gets the winner's answer.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ...crypto.algorithms import (
    ALGORITHMS,
    DEFAULT_KEM,
    DEFAULT_SIGNATURE,
    HYBRID_KEM,
    HYBRID_SIGNATURE,
    Algorithm,
    Kind,
    get_algorithm,
)
from ...errors import (
    IdempotencyKeyReused,
    InvalidIdempotencyKey,
    InvalidInput,
    InvalidKeyState,
    KeyDestroyed,
    KeyDisabled,
    KeyNotFound,
)
from ..wire.model import (
    DEFAULT_IMPORT_JOB_TTL,
    IDEMPOTENCY_KEY_RE,
    IMPORT_JOB_ID_RE,
    KEY_ID_RE,
    MAX_DESTROY_DELAY,
    MAX_IDEMPOTENCY_KEY_CHARS,
    MAX_IMPORT_JOB_TTL,
    MAX_LABEL_CHARS,
    MAX_LIST_LIMIT,
    MIN_IMPORT_JOB_TTL,
    ImportJobInfo,
    KeyInfo,
    KeyState,
    VersionInfo,
    import_job_not_found,
    key_not_found,
)

# The key columns both stores select, in this order (``build_info`` reads the first ten).
KEY_COLUMNS = (
    "key_id, kind, algorithm, label, state, latest_version, created_at, updated_at, destroy_at, destroyed_at"
)

TransitionOp = str  # "disable" | "enable" | "cancel_destroy"

IDEMPOTENCY_TTL = 24 * 3600.0  # seconds a record answers repeats (Stripe keeps keys 24 h)
IDEMPOTENT_OPS = ("create_key", "rotate_key")


def check_tenant(tenant_id: object) -> str:
    if type(tenant_id) is not str or not tenant_id or len(tenant_id.encode()) > 255:
        raise InvalidInput("a tenant id (1..255 bytes) is required for every key store call")
    return tenant_id


def check_key_id(key_id: object) -> str:
    """A key id of this service's shape; anything else misses like an unknown id (404)."""
    if type(key_id) is not str or KEY_ID_RE.match(key_id) is None:
        raise key_not_found(key_id)
    return key_id


def check_version(version: object) -> int:
    if type(version) is not int or not 1 <= version <= 2**31:
        raise InvalidInput("key_version must be a positive integer")
    return version


def check_label(label: object) -> str | None:
    if label is not None and (
        type(label) is not str or len(label) > MAX_LABEL_CHARS or not label.isprintable()
    ):
        raise InvalidInput(f"label must be a printable string of at most {MAX_LABEL_CHARS} characters")
    return label


def check_list_args(limit: object, cursor: object) -> tuple[int, str | None]:
    if type(limit) is not int or not 1 <= limit <= MAX_LIST_LIMIT:
        raise InvalidInput(f"limit must be an integer in 1..{MAX_LIST_LIMIT}")
    if cursor is not None and (type(cursor) is not str or KEY_ID_RE.match(cursor) is None):
        raise InvalidInput("cursor is not one this service returned")
    return limit, cursor


def check_delay(delay: object, default: float) -> float:
    if delay is None:
        delay = default
    if type(delay) not in (int, float) or not 0 <= delay <= MAX_DESTROY_DELAY:  # type: ignore[operator]
        raise InvalidInput(f"delay must be a number of seconds in 0..{MAX_DESTROY_DELAY:.0f}")
    return float(delay)  # type: ignore[arg-type]


def require_usable(key_id: str, state: str) -> None:
    """Raise unless a key in ``state`` may do crypto or be rotated."""
    if state == KeyState.DESTROYED.value:
        raise KeyDestroyed(f"key {key_id!r} was destroyed")
    if state == KeyState.DISABLED.value:
        raise KeyDisabled(f"key {key_id!r} is disabled")
    if state == KeyState.PENDING_DESTRUCTION.value:
        raise KeyDisabled(f"key {key_id!r} is scheduled for destruction")


def transition(key_id: str, op: TransitionOp, state: str, resume_state: str | None) -> str:
    """The state ``op`` moves a key in ``state`` to (maybe the same), or the error it answers."""
    if state == KeyState.DESTROYED.value:
        raise KeyDestroyed(f"key {key_id!r} was destroyed")
    if op in ("disable", "enable"):
        if state == KeyState.PENDING_DESTRUCTION.value:
            raise InvalidKeyState(f"key {key_id!r} is scheduled for destruction; cancel that first")
        return KeyState.DISABLED.value if op == "disable" else KeyState.ENABLED.value
    # cancel_destroy: back to the state before the schedule
    if state != KeyState.PENDING_DESTRUCTION.value or resume_state is None:
        raise InvalidKeyState(f"key {key_id!r} is not scheduled for destruction")
    return resume_state


def check_schedulable(key_id: str, state: str) -> bool:
    """Whether ``schedule_destroy`` writes (an already scheduled key keeps its first date)."""
    if state == KeyState.DESTROYED.value:
        raise KeyDestroyed(f"key {key_id!r} was destroyed")
    return state != KeyState.PENDING_DESTRUCTION.value


def choose_algorithm(algorithm: object, kind: object, mode: object) -> Algorithm:
    if kind is not None and kind not in (Kind.KEM.value, Kind.SIGNATURE.value):
        raise InvalidInput(f"kind must be 'kem' or 'signature', not {str(kind)[:20]!r}")
    if mode is not None and mode not in ("pqc", "hybrid"):
        raise InvalidInput(f"mode must be 'pqc' or 'hybrid', not {str(mode)[:20]!r}")
    if algorithm is not None:
        alg = get_algorithm(algorithm)
        if kind is not None and alg.kind.value != kind:
            raise InvalidInput(f"algorithm {alg.name!r} is a {alg.kind.value} algorithm, not {kind}")
        if mode is not None and alg.mode.value != mode:
            raise InvalidInput(f"algorithm {alg.name!r} is {alg.mode.value}, not {mode}")
        return alg
    if kind is None:
        raise InvalidInput("give an algorithm, or a kind ('kem' or 'signature')")
    hybrid = mode == "hybrid"
    if kind == Kind.KEM.value:
        return ALGORITHMS[HYBRID_KEM if hybrid else DEFAULT_KEM]
    return ALGORITHMS[HYBRID_SIGNATURE if hybrid else DEFAULT_SIGNATURE]


def build_info(
    row: tuple[Any, ...],
    versions: Iterable[tuple[int, str, float]],
    want: int,
    public: bytes | None,
    found: bool,
    origin: str | None = None,
    import_job_id: str | None = None,
) -> KeyInfo:
    """``row``: the :data:`KEY_COLUMNS` of a key; ``versions``: (version, state, created_at) in
    order; ``public``/``found``: the public key of version ``want`` and whether that version exists;
    ``origin``/``import_job_id``: where that version's private key came from."""
    (key_id, kind, algorithm, label, state, latest, created, updated, destroy_at, destroyed_at) = row[:10]
    if not found:
        raise KeyNotFound(f"key {key_id!r} has no version {want}")
    return KeyInfo(
        key_id=key_id, kind=kind, algorithm=algorithm, label=label, state=KeyState(state),
        version=want, latest_version=latest,
        public_key=bytes(public) if public is not None and state != KeyState.DESTROYED.value else None,
        created_at=created, updated_at=updated, destroy_at=destroy_at, destroyed_at=destroyed_at,
        versions=tuple(VersionInfo(v, s, c) for v, s, c in versions),
        origin=origin or "generated", import_job_id=import_job_id,
    )


def check_idempotency_key(value: object) -> str | None:
    """``value`` if it is None or 1..255 visible ASCII characters; else invalid_idempotency_key."""
    if value is None:
        return None
    if type(value) is not str or IDEMPOTENCY_KEY_RE.match(value) is None:
        raise InvalidIdempotencyKey(
            f"an idempotency key is 1..{MAX_IDEMPOTENCY_KEY_CHARS} visible ASCII characters"
        )
    return value


@dataclass(frozen=True, slots=True)
class IdempotencyClaim:
    """What a store records for a request carrying an idempotency key (never the key itself)."""

    key_hash: bytes  # SHA-256 of the idempotency key
    operation: str  # one of IDEMPOTENT_OPS
    fingerprint: bytes  # SHA-256 of the operation and its canonical arguments

    def __repr__(self) -> str:
        return f"IdempotencyClaim(operation={self.operation!r})"


def idempotency_claim(
    idempotency_key: object, operation: str, *, request: str | None = None, **args: str | None
) -> IdempotencyClaim | None:
    """The claim of one request (None without an idempotency key). ``args`` are the operation's
    arguments after validation (the resolved algorithm, not the kind or mode that chose it).

    ``operation`` is what the request writes ("create_key": a new key; "rotate_key": a new version),
    ``request`` the operation the client asked for when it differs: an import records
    ``create_key`` or ``rotate_key`` with ``request="import_key"`` in its fingerprint, so an
    idempotency key used for a creation and then for an import is ``idempotency_key_reused``."""
    key = check_idempotency_key(idempotency_key)
    if key is None:
        return None
    assert operation in IDEMPOTENT_OPS, operation
    canonical = json.dumps({"op": request or operation, **args}, sort_keys=True, separators=(",", ":"))
    return IdempotencyClaim(
        hashlib.sha256(key.encode("ascii")).digest(), operation, hashlib.sha256(canonical.encode()).digest()
    )


def replay_target(
    claim: IdempotencyClaim, record: tuple[Any, ...] | None, now: float
) -> tuple[str, int] | None:
    """What a stored ``record`` -- ``(operation, fingerprint, key_id, version, created_at)`` or
    None -- means for ``claim``: None when there is no live record (absent or expired), the
    ``(key_id, version)`` to answer with when it is the same request, else
    ``idempotency_key_reused``."""
    if record is None:
        return None
    operation, fingerprint, key_id, version, created_at = record[:5]
    if created_at <= now - IDEMPOTENCY_TTL:
        return None
    if operation != claim.operation or bytes(fingerprint) != claim.fingerprint:
        raise IdempotencyKeyReused(
            "this idempotency key was used for another request; use a new key for a new request"
        )
    return str(key_id), int(version)


# ---- import jobs ----------------------------------------------------------------------------


def check_import_job_id(job_id: object) -> str:
    """An import job id of this service's shape; anything else misses like an unknown id (404)."""
    if type(job_id) is not str or IMPORT_JOB_ID_RE.match(job_id) is None:
        raise import_job_not_found(job_id)
    return job_id


def check_import_ttl(ttl: object) -> int:
    """The lifetime of a new import job in seconds (None: the default day)."""
    if ttl is None:
        return DEFAULT_IMPORT_JOB_TTL
    if type(ttl) is not int or not MIN_IMPORT_JOB_TTL <= ttl <= MAX_IMPORT_JOB_TTL:
        raise InvalidInput(
            f"ttl_seconds must be an integer in {MIN_IMPORT_JOB_TTL}..{MAX_IMPORT_JOB_TTL} (7 days)"
        )
    return ttl


def check_job_cursor(cursor: object) -> str | None:
    if cursor is not None and (type(cursor) is not str or IMPORT_JOB_ID_RE.match(cursor) is None):
        raise InvalidInput("cursor is not one this service returned")
    return cursor


def job_info(row: tuple[Any, ...], now: float) -> ImportJobInfo:
    """``row``: :data:`JOB_COLUMNS` of a job; its state is "expired" from ``expires_at`` on,
    whether or not the sweep has destroyed its private key yet."""
    job_id, method, public, created, expires, destroyed = row[:6]
    expired = destroyed is not None or expires <= now
    return ImportJobInfo(job_id, method, bytes(public), created, expires, "expired" if expired else "active")


# The import job columns both stores select, in this order (``job_info`` reads them).
JOB_COLUMNS = "job_id, method, public_key, created_at, expires_at, destroyed_at"


__all__ = [
    "JOB_COLUMNS", "check_import_job_id", "check_import_ttl", "check_job_cursor", "job_info",
    "IDEMPOTENCY_TTL", "IDEMPOTENT_OPS", "IdempotencyClaim", "check_idempotency_key", "idempotency_claim",
    "replay_target",
    "KEY_COLUMNS", "build_info", "check_delay", "check_key_id", "check_label", "check_list_args",
    "check_schedulable", "check_tenant", "check_version", "choose_algorithm", "require_usable", "transition",
]
