"""API keys: format, storage as peppered HMACs, and constant-time authentication.

Theory of operation
-------------------
**Format.** A key is ``qph_<key_id>_<secret>``: ``key_id`` is 12 characters of lower-case
base32 (``a-z2-7``, 60 random bits: an identifier, not a secret — it appears in logs, audit
records and ``apikey list``) and ``secret`` is 43 characters of base62 (256 random bits; more
than the 190 bits asked of it). The fixed ``qph_`` prefix and shape let secret scanners match a
leaked key with ``qph_[a-z0-9]{12}_[A-Za-z0-9]{32,}`` (see ``KEY_SCAN_PATTERN``).

**Storage.** The database never holds a key, only ``HMAC-SHA256(pepper, "qph-v1:" + key_id +
":" + secret)`` next to the key's metadata (tenant, plan, scopes, created/expires/revoked,
label). The pepper is 32 random bytes in a file outside the database (``generate_pepper_file``
creates it ``0600``; ``load_pepper`` refuses a file that group or others may read), so a
stolen database alone does not allow an offline search — and with 256-bit secrets none is
feasible anyway. Binding ``key_id`` into the MAC means a row's digest cannot be moved to
another row. The full key is returned exactly once, by ``APIKeyStore.create``.

**Authentication** (``Authenticator.authenticate``) parses the key, finds the record by
``key_id`` and compares MACs with ``hmac.compare_digest``. Every failure — missing, malformed,
unknown id, wrong secret, expired, revoked — raises the same ``Unauthenticated`` (same code,
status and message; the cause is kept in ``.reason`` for the audit log only). For an unknown
id the MAC is still computed and compared against a dummy, so the wrong-id and wrong-secret
paths do the same work.

**Revocation within one second.** ``apikey revoke`` runs in another process and writes the
shared SQLite file. The running proxy keeps records in an in-memory cache that it validates at
most every ``ttl`` seconds (≤ 1 s) by reading SQLite's ``PRAGMA data_version`` — a counter that
changes whenever another connection commits. If it changed, the whole cache is dropped and
records are re-read on demand. So a cache hit costs a dict lookup, a clock read and one HMAC;
the database is touched once per ``ttl`` (plus once per key after a change), and a revocation
(or any other change) is seen at the latest ``ttl`` seconds after its commit. Writes made
through the same ``APIKeyStore`` object bump a local counter that the check includes too
(``data_version`` only reports *other* connections' commits). A clock that steps backwards
forces a re-validation.

**On PostgreSQL** (``pg_apikeys.PgAPIKeyStore``, several nodes) the change token is a counter
that a trigger bumps on every change of ``api_keys``, on any node, and every store call is a
network round trip: the gateway uses ``Authenticator.authenticate_async``, which runs lookups in
worker threads and takes the token from ``run_change_poller`` (every ``ttl / 2``); it refuses
with 503 once that token is older than ``2 × ttl + statement_timeout`` (see ``Authenticator``).
``validate_new_key``, ``new_key_material``, ``key_mac`` and ``row_to_record`` are shared by both
stores, so keys, MACs and validation are the same whatever the backend.
"""

from __future__ import annotations

import calendar
import dataclasses
import datetime as _dt
import enum
import hmac
import json
import logging
import math
import os
import re
import secrets
import stat
import time
from collections.abc import Callable, Collection, Hashable, Iterable
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol

import trio

from ..errors import ConfigError, InvalidInput, NotFound, StorageUnavailable, Unauthenticated
from ..storage import sqlite as db

__all__ = [
    "create_key",
    "APIKeyRecord",
    "APIKeyStore",
    "Authenticator",
    "KEY_PREFIX",
    "KEY_SCAN_PATTERN",
    "PEPPER_BYTES",
    "PRODUCT_SCOPES",
    "check_grants",
    "check_key_id",
    "generate_pepper_file",
    "load_pepper",
    "parse_expiry",
    "split_api_key",
]

KEY_PREFIX = "qph_"
KEY_ID_CHARS = 12
KEY_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"  # RFC 4648 base32, lower case
SECRET_CHARS = 43  # 43 × log2(62) ≈ 256 bits
SECRET_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
PEPPER_BYTES = 32
MAX_CACHE_TTL_S = 1.0  # a revoked key stops working within one second
MIN_POLL_INTERVAL_S = 0.01  # the change poller with ttl 0

# What a secret scanner should look for (documented in the README).
KEY_SCAN_PATTERN = r"qph_[a-z0-9]{12}_[A-Za-z0-9]{32,}"
# What we accept: the scanner's shape with a sane upper bound on the secret.
_KEY_RE = re.compile(r"qph_([a-z0-9]{12})_([A-Za-z0-9]{32,128})")
_MAC_DOMAIN = b"qph-v1:"

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")  # tenant, plan
_SCOPE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/*-]{0,63}")
_MAX_LABEL_CHARS = 128
_LOOKS_LIKE_KEY = re.compile(r"qph_[A-Za-z0-9]{12}_[A-Za-z0-9]")
_KEY_ID_RE = re.compile(r"[a-z0-9]{12}")  # the id part of _KEY_RE

# Scopes the product itself gives a meaning to: ``admin`` opens the /admin routes (the gateway
# checks it, not the policy, so that the fail-open switch works without a policy) and
# ``metrics`` is the scraper's scope for /metrics; ``audit`` reads the audit log's checkpoints,
# proofs and verifier keys (/v1/audit/*). A policy gives meaning to more scopes by
# naming them in its rules (``scope:`` in ``match`` or ``unless``).
PRODUCT_SCOPES = frozenset({"admin", "metrics", "audit"})

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS api_keys (
        key_id      TEXT PRIMARY KEY,
        secret_mac  BLOB NOT NULL,
        tenant      TEXT NOT NULL,
        plan        TEXT NOT NULL,
        scopes      TEXT NOT NULL,
        created_at  REAL NOT NULL,
        expires_at  REAL,
        revoked_at  REAL,
        label       TEXT
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS api_keys_tenant ON api_keys (tenant)",
)
_COLUMNS = "key_id, tenant, plan, scopes, created_at, expires_at, revoked_at, label, secret_mac"

AuditFn = Callable[..., object]
log = logging.getLogger("qpher.auth")
Clock = Callable[[], float]


# ---- pepper ----------------------------------------------------------------------------

def generate_pepper_file(path: str | os.PathLike[str]) -> None:
    """Create ``path`` with 32 random bytes, mode 0600 (its directory 0700 if created).

    Refuses to overwrite an existing file: a new pepper invalidates every key."""
    p = os.fspath(path)
    parent = os.path.dirname(p)
    try:
        if parent:
            os.makedirs(parent, mode=0o700, exist_ok=True)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise ConfigError(
            f"pepper file {p!r} already exists; a new pepper would invalidate every key"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot create pepper file {p!r}: {exc.strerror}") from exc
    try:
        data = secrets.token_bytes(PEPPER_BYTES)
        written = 0
        while written < len(data):
            written += os.write(fd, data[written:])
        os.fsync(fd)
    finally:
        os.close(fd)


def load_pepper(path: str | os.PathLike[str]) -> bytes:
    """Read the pepper, refusing a file that is not a regular 32-byte file private to its owner."""
    p = os.fspath(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        raise ConfigError(f"cannot open pepper file {p!r}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"pepper file {p!r} is not a regular file")
        if st.st_mode & 0o077:
            raise ConfigError(
                f"pepper file {p!r} has mode {stat.S_IMODE(st.st_mode):#o}; it must not be "
                "accessible by group or others (chmod 600)"
            )
        data = os.read(fd, PEPPER_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) != PEPPER_BYTES:
        raise ConfigError(f"pepper file {p!r} must hold exactly {PEPPER_BYTES} bytes, not {len(data)}")
    return data


# ---- records ---------------------------------------------------------------------------

KeyStatus = Literal["active", "expired", "revoked"]


@dataclass(frozen=True, slots=True)
class APIKeyRecord:
    """What is known about an API key. Holds no secret and no MAC: safe to log and to print."""

    key_id: str
    tenant: str
    plan: str
    scopes: tuple[str, ...]
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    label: str | None

    def status(self, now: float) -> KeyStatus:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return "active"

    def has_scope(self, scope: str) -> bool:
        return scope in self.scopes

    def to_json(self, now: float) -> dict[str, Any]:
        """What ``apikey list --json`` prints: the record with its status at ``now`` and
        ISO 8601 UTC times (``null`` when unset)."""
        return {
            "key_id": self.key_id,
            "tenant": self.tenant,
            "plan": self.plan,
            "scopes": list(self.scopes),
            "status": self.status(now),
            "created_at": iso_time(self.created_at),
            "expires_at": iso_time(self.expires_at),
            "revoked_at": iso_time(self.revoked_at),
            "label": self.label,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "key_id": self.key_id,
            "tenant": self.tenant,
            "plan": self.plan,
            "scopes": list(self.scopes),
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "revoked_at": self.revoked_at,
            "label": self.label,
        }


def iso_time(t: float | None) -> str | None:
    """Epoch seconds as ISO 8601 UTC to the second (``2030-01-31T12:00:00Z``)."""
    if t is None:
        return None
    return _dt.datetime.fromtimestamp(t, _dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _row_to_record(row: tuple[Any, ...]) -> tuple[APIKeyRecord, bytes]:
    scopes = tuple(json.loads(row[3]))
    record = APIKeyRecord(
        key_id=row[0],
        tenant=row[1],
        plan=row[2],
        scopes=scopes,
        created_at=float(row[4]),
        expires_at=None if row[5] is None else float(row[5]),
        revoked_at=None if row[6] is None else float(row[6]),
        label=row[7],
    )
    return record, bytes(row[8])


def _check_name(what: str, value: object, pattern: re.Pattern[str] = _NAME_RE) -> str:
    if not isinstance(value, str) or pattern.fullmatch(value) is None or _LOOKS_LIKE_KEY.search(value):
        # the value is not echoed: someone may paste a key into the wrong option
        raise InvalidInput(f"{what} must match {pattern.pattern!r} and not look like an API key")
    return value


def _check_label(label: object) -> str | None:
    if label is None:
        return None
    if not isinstance(label, str) or not label or len(label) > _MAX_LABEL_CHARS or not label.isprintable():
        raise InvalidInput(f"label must be 1..{_MAX_LABEL_CHARS} printable characters")
    if _LOOKS_LIKE_KEY.search(label):
        raise InvalidInput("label must not contain an API key")
    return label


def split_api_key(text: str) -> tuple[str, str]:
    """``qph_<key_id>_<secret>`` -> (key_id, secret), surrounding whitespace ignored (a key read
    from a file or a pipe ends with a newline). The text is never echoed: it may be a key."""
    m = _KEY_RE.fullmatch(text.strip())
    if m is None:
        raise InvalidInput("not an API key (expected qph_<key id>_<secret>)")
    return m.group(1), m.group(2)


def check_key_id(text: str) -> str:
    """An API key id as an admin types it: 12 characters ``a-z``/``0-9``. A whole key pasted
    by mistake is refused without being shown (it would end up in a terminal's scroll-back)."""
    if _KEY_ID_RE.fullmatch(text) is not None:
        return text
    if _LOOKS_LIKE_KEY.search(text):
        raise InvalidInput("that is a whole API key, not its id: the id is the 12 characters between "
                           "'qph_' and the second '_'")
    raise InvalidInput("not an API key id (expected 12 characters a-z, 0-9, as `apikey list` shows)")


def check_grants(
    plan: str, scopes: Iterable[str], *, plans: Collection[str], known_scopes: Collection[str]
) -> None:
    """Refuse a plan the policy does not declare, or a scope that neither the product nor the
    policy gives a meaning to: a key holding one would only ever get 403s. The message names
    the bad value and the valid ones."""
    _check_name("plan", plan)
    if plan not in plans:
        raise InvalidInput(f"unknown plan {plan!r} (the policy declares: {_names(plans)})")
    for scope in scopes:
        _check_name("scope", scope, _SCOPE_RE)
        if scope not in known_scopes:
            raise InvalidInput(f"unknown scope {scope!r} (known scopes: {_names(known_scopes)})")


def _names(names: Collection[str]) -> str:
    return ", ".join(sorted(names)) or "none"


def parse_expiry(text: str, now: float) -> float:
    """``--expires`` for the CLI: a duration (``90d``, ``12h``, ``30m``, ``3600s``) from ``now``,
    or a UTC date/time ``YYYY-MM-DD`` / ``YYYY-MM-DDTHH:MM[:SS][Z]``. Returns epoch seconds."""
    t = text.strip()
    m = re.fullmatch(r"(\d{1,7})([smhdw])", t)
    if m:
        unit = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}[m.group(2)]
        return now + int(m.group(1)) * unit
    for fmt in ("%Y-%m-%d", "%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%MZ", "%Y-%m-%dT%H:%M:%SZ"):
        try:
            parsed = time.strptime(t, fmt)
        except ValueError:
            continue
        return float(calendar.timegm(parsed))
    raise InvalidInput("expiry must be a duration like '90d' or a UTC date like '2030-01-31'")


# ---- shared by the SQLite and the PostgreSQL stores -------------------------------------

CREATE_ATTEMPTS = 8
COLUMNS = _COLUMNS  # the column order ``row_to_record`` reads (both backends' tables)


def validate_new_key(
    tenant: object, plan: object, scopes: Iterable[str], expires_at: float | None, label: object, now: float
) -> tuple[str, str, tuple[str, ...], float | None, str | None]:
    """What ``create`` checks, in order: tenant, plan, scopes (de-duplicated, order kept), label,
    expiry (a finite number after ``now``). Returns the values to store; ``InvalidInput`` else."""
    tenant = _check_name("tenant", tenant)
    plan = _check_name("plan", plan)
    if isinstance(scopes, str):
        raise InvalidInput("scopes must be a list of strings, not one string")
    scope_tuple = tuple(dict.fromkeys(_check_name("scope", s, _SCOPE_RE) for s in scopes))
    checked_label = _check_label(label)
    if expires_at is not None:
        if (
            isinstance(expires_at, bool)
            or not isinstance(expires_at, (int, float))
            or not math.isfinite(expires_at)
        ):
            raise InvalidInput("expires_at must be a number of seconds since the epoch")
        if expires_at <= now:
            raise InvalidInput("expires_at is in the past")
        expires_at = float(expires_at)
    return tenant, plan, scope_tuple, expires_at, checked_label


def new_key_material() -> tuple[str, str]:
    """A fresh random (key_id, secret)."""
    key_id = "".join(secrets.choice(KEY_ID_ALPHABET) for _ in range(KEY_ID_CHARS))
    secret = "".join(secrets.choice(SECRET_ALPHABET) for _ in range(SECRET_CHARS))
    return key_id, secret


def full_key(key_id: str, secret: str) -> str:
    return f"{KEY_PREFIX}{key_id}_{secret}"


def key_not_found(key_id: str) -> NotFound:
    """``NotFound`` naming ``key_id`` only if it is shaped like an id: never echo a pasted key."""
    shown = repr(key_id) if re.fullmatch(r"[a-z0-9]{12}", key_id) else "(not a key id)"
    return NotFound(f"no API key with id {shown}")


def row_to_record(row: tuple[Any, ...]) -> tuple[APIKeyRecord, bytes]:
    """A row in ``COLUMNS`` order -> (record, stored MAC)."""
    return _row_to_record(row)


def check_pepper(pepper: object) -> bytes:
    if not isinstance(pepper, bytes) or len(pepper) != PEPPER_BYTES:
        raise ConfigError(f"the pepper must be {PEPPER_BYTES} bytes")
    return pepper


def key_mac(pepper: bytes, key_id: str, secret: str) -> bytes:
    """``HMAC-SHA256(pepper, "qph-v1:" + key_id + ":" + secret)``; hmac.digest is the one-shot C
    fast path (~1 µs)."""
    return hmac.digest(pepper, _MAC_DOMAIN + key_id.encode("ascii") + b":" + secret.encode("ascii"), "sha256")


class KeyStore(Protocol):
    """What ``Authenticator`` needs of a store (``APIKeyStore``, ``PgAPIKeyStore``).

    ``blocking`` is True when ``lookup``/``change_token`` may wait on the network (PostgreSQL):
    ``Authenticator.authenticate_async`` then runs them in threads, at most ``pool_size`` at a
    time, and treats a change token older than ``2 × ttl + statement_timeout`` as unknown."""

    blocking: bool
    pool_size: int
    statement_timeout: float

    def lookup(self, key_id: str) -> tuple[APIKeyRecord, bytes] | None: ...

    def mac(self, key_id: str, secret: str) -> bytes: ...

    def change_token(self) -> Hashable: ...


# ---- store -----------------------------------------------------------------------------

def create_key(
    now: float,
    mac: Callable[[str, str], bytes],
    audit: AuditFn | None,
    insert: Callable[[tuple[Any, ...], Callable[[], None]], bool],
    tenant: str,
    plan: str,
    scopes: Iterable[str],
    expires_at: float | None,
    label: str | None,
) -> tuple[APIKeyRecord, str]:
    """``create`` of both stores: validate, pick a key id and a secret, and ``insert(row, then)``
    -- the store's own INSERT … ON CONFLICT DO NOTHING in its write transaction, returning whether
    the row went in, calling ``then()`` (the audit record) inside that transaction if it did. A
    taken key id (60 random bits: a curiosity, not a failure) draws again."""
    tenant, plan, scope_tuple, expires_at, label = validate_new_key(
        tenant, plan, scopes, expires_at, label, now
    )
    for _attempt in range(CREATE_ATTEMPTS):
        key_id, secret = new_key_material()
        row = (key_id, tenant, plan, json.dumps(list(scope_tuple)), now, expires_at, None, label,
               mac(key_id, secret))

        def audited(key_id: str = key_id) -> None:
            if audit is not None:
                audit("apikey.created", "NOTICE", key_id=key_id, tenant=tenant, plan=plan,
                      scopes=list(scope_tuple), expires_at=expires_at, label=label)

        if insert(row, audited):
            record = APIKeyRecord(key_id, tenant, plan, scope_tuple, now, expires_at, None, label)
            return record, full_key(key_id, secret)
    raise InvalidInput("could not allocate a unique key id")  # pragma: no cover


class APIKeyStore:
    """API key records in the gateway database (see the module docstring).

    ``audit``, if given, is called as ``audit(event, severity, **fields)`` for key lifecycle
    events (``apikey.created``, ``apikey.revoked``) inside the write transaction: if auditing
    fails, the change is rolled back and the error propagates."""

    blocking = False  # SQLite reads are local and short: the Authenticator calls them inline
    pool_size = 1
    statement_timeout = 0.0

    def __init__(
        self,
        db_path: str | os.PathLike[str],
        pepper: bytes,
        *,
        clock: Clock = time.time,
        audit: AuditFn | None = None,
    ) -> None:
        self._pepper = check_pepper(pepper)
        self._clock = clock
        self._audit = audit
        self._local_writes = 0
        self._conn = db.connect(db_path)
        try:
            db.ensure_schema(self._conn, "api_keys", 1, _SCHEMA)
        except BaseException:
            self._conn.close()
            raise

    def __repr__(self) -> str:  # never the pepper
        return f"{type(self).__name__}()"

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> APIKeyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # The MAC of a presented secret. hmac.digest is the one-shot C fast path (~1 µs).
    def mac(self, key_id: str, secret: str) -> bytes:
        return key_mac(self._pepper, key_id, secret)

    def create(
        self,
        tenant: str,
        plan: str,
        scopes: Iterable[str] = (),
        expires_at: float | None = None,
        label: str | None = None,
    ) -> tuple[APIKeyRecord, str]:
        """Create a key; returns its record and the full key, which exists nowhere else: print
        it once and forget it."""
        def insert(row: tuple[Any, ...], then: Callable[[], None]) -> bool:
            with db.transaction(self._conn, "creating an API key"):
                inserted = self._conn.execute(
                    f"INSERT INTO api_keys ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT(key_id) DO NOTHING", row,
                ).rowcount == 1
                if inserted:
                    then()
            return inserted

        created = create_key(
            self._clock(), self.mac, self._audit, insert, tenant, plan, scopes, expires_at, label
        )
        self._local_writes += 1
        return created

    def get(self, key_id: str) -> APIKeyRecord | None:
        found = self.lookup(key_id)
        return None if found is None else found[0]

    def lookup(self, key_id: str) -> tuple[APIKeyRecord, bytes] | None:
        """The record and its stored MAC (for ``Authenticator``; the MAC is not a secret key but
        is not meant for display either)."""
        with db.mapped("reading an API key"):
            # fetchall, not fetchone: a statement left un-stepped would keep its WAL read
            # snapshot open, and this connection would stop seeing other processes' commits
            # (a revocation made by the CLI).
            rows = self._conn.execute(
                f"SELECT {_COLUMNS} FROM api_keys WHERE key_id = ?", (key_id,)
            ).fetchall()
        return _row_to_record(rows[0]) if rows else None

    def list(self, tenant: str | None = None) -> list[APIKeyRecord]:
        """Every key (of ``tenant``), oldest first. Records only: never a secret or a MAC."""
        with db.mapped("listing API keys"):
            if tenant is None:
                rows = self._conn.execute(
                    f"SELECT {_COLUMNS} FROM api_keys ORDER BY created_at, key_id"
                ).fetchall()
            else:
                rows = self._conn.execute(
                    f"SELECT {_COLUMNS} FROM api_keys WHERE tenant = ? ORDER BY created_at, key_id", (tenant,)
                ).fetchall()
        return [_row_to_record(r)[0] for r in rows]

    def revoke(self, key_id: str) -> APIKeyRecord:
        """Revoke ``key_id`` (idempotent: revoking twice keeps the first time). ``NotFound`` if
        there is no such key."""
        now = self._clock()
        with db.transaction(self._conn, "revoking an API key"):
            row = db.one(self._conn.execute(f"SELECT {_COLUMNS} FROM api_keys WHERE key_id = ?", (key_id,)))
            if row is None:
                raise key_not_found(key_id)
            record, _ = _row_to_record(row)
            if record.revoked_at is not None:
                return record
            self._conn.execute("UPDATE api_keys SET revoked_at = ? WHERE key_id = ?", (now, key_id))
            if self._audit is not None:
                self._audit("apikey.revoked", "WARNING", key_id=key_id, tenant=record.tenant)
        self._local_writes += 1
        return dataclasses.replace(record, revoked_at=now)

    def change_token(self) -> tuple[int, int]:
        """Changes whenever the key table may have changed: (SQLite data_version, local writes)."""
        return db.data_version(self._conn), self._local_writes


# ---- authentication --------------------------------------------------------------------

class _Missing(enum.Enum):
    """The cache's "not looked up yet" (``None`` is a cached "no such key")."""

    MISSING = enum.auto()


_MISSING: Final = _Missing.MISSING


class Authenticator:
    """Turns a presented API key into its ``APIKeyRecord`` or raises ``Unauthenticated``.

    ``clock`` is wall time (expiry is wall time); ``ttl`` (≤ 1 s) bounds how long a change made
    by another process (revocation) can go unseen. See the module docstring.

    **Blocking stores (PostgreSQL).** ``authenticate`` calls the store inline, which would stall
    the trio loop on a network round trip. ``authenticate_async`` does the same work without
    blocking: a cache miss runs ``store.lookup`` in a worker thread (at most ``store.pool_size``
    at once; concurrent misses of one key id share one lookup), and the change token is not read
    by requests at all but taken from ``run_change_poller``, a background task that reads it in
    a thread every ``ttl / 2``. A request compares the polled token with the one its cache was
    filled under and drops the cache when they differ, so a change committed anywhere is seen
    within ``ttl / 2`` plus one poll round trip (≤ 1 s while the database answers).

    Fail closed: when the token has not been read successfully for longer than ``stale_after``
    (default ``2 × ttl + store.statement_timeout``; before the first successful poll too),
    ``authenticate_async`` raises ``StorageUnavailable`` (503), cache hits included — a revocation
    must not go unseen because the database stopped answering. A lookup that fails raises the
    same error; each lookup is bounded by the pool and statement timeouts, so a request never
    hangs. With a non-blocking store (SQLite) ``authenticate_async`` is ``authenticate``."""

    def __init__(
        self,
        store: KeyStore,
        clock: Clock = time.time,
        *,
        ttl: float = MAX_CACHE_TTL_S,
        max_cache_entries: int = 100_000,
        stale_after: float | None = None,
    ) -> None:
        if not 0 <= ttl <= MAX_CACHE_TTL_S:
            raise ConfigError(f"auth cache ttl must be between 0 and {MAX_CACHE_TTL_S} s, not {ttl!r}")
        self._store = store
        self._clock = clock
        self._ttl = ttl
        self._max_entries = max_cache_entries
        # key_id -> (record, mac), or None for "no such key" (negative entries bound DB load).
        self._cache: dict[str, tuple[APIKeyRecord, bytes] | None] = {}
        self._token: Hashable | None = None
        self._validated_at = -math.inf
        self._dummy_mac = secrets.token_bytes(32)
        # ---- blocking stores only (authenticate_async, run_change_poller) ----
        self._blocking = bool(getattr(store, "blocking", False))
        self.poll_interval = max(ttl / 2, MIN_POLL_INTERVAL_S)
        self.stale_after = (
            max(2 * ttl, 2 * self.poll_interval) + float(getattr(store, "statement_timeout", 0.0))
            if stale_after is None else stale_after
        )
        self._threads = max(1, int(getattr(store, "pool_size", 1)))
        self._limiter: trio.CapacityLimiter | None = None
        self._polled_token: Hashable | None = None
        self._polled_at = -math.inf  # trio.current_time() when the polled token was read
        self._generation = 0  # bumped whenever the cache is dropped
        self._inflight: dict[str, _Lookup] = {}

    @property
    def blocking(self) -> bool:
        return self._blocking

    def _revalidate(self, now: float) -> None:
        token = self._store.change_token()
        if token != self._token:
            self._drop_cache()
            self._token = token
        self._validated_at = now

    def _drop_cache(self) -> None:
        self._cache.clear()
        self._generation += 1

    def _remember(self, key_id: str, entry: tuple[APIKeyRecord, bytes] | None) -> None:
        if len(self._cache) >= self._max_entries:
            self._drop_cache()
        self._cache[key_id] = entry

    def authenticate(self, api_key: str | None) -> APIKeyRecord:
        """``api_key`` is what ``auth.headers.extract_api_key`` returned (None if absent)."""
        key_id, secret = _parse_presented(api_key)
        now = self._clock()
        if now - self._validated_at >= self._ttl or now < self._validated_at:
            self._revalidate(now)
        entry = self._cache.get(key_id, _MISSING)
        if entry is _MISSING:
            entry = self._store.lookup(key_id)
            self._remember(key_id, entry)
        return self._check(key_id, secret, entry, now)

    def _check(
        self, key_id: str, secret: str, entry: tuple[APIKeyRecord, bytes] | None, now: float
    ) -> APIKeyRecord:
        presented = self._store.mac(key_id, secret)
        if entry is None:
            hmac.compare_digest(presented, self._dummy_mac)  # same work as a wrong secret
            raise Unauthenticated("unknown_key", key_id=key_id)
        record, expected = entry
        if not hmac.compare_digest(presented, expected):
            raise Unauthenticated("bad_secret", key_id=key_id)
        if record.revoked_at is not None:
            raise Unauthenticated("revoked", key_id=key_id)
        if record.expires_at is not None and now >= record.expires_at:
            raise Unauthenticated("expired", key_id=key_id)
        return record

    async def authenticate_async(self, api_key: str | None) -> APIKeyRecord:
        """``authenticate`` for the trio loop (see the class docstring): same results, same
        errors, same work per outcome; plus ``StorageUnavailable`` (503) when the store is
        blocking and its change token is stale or a lookup fails."""
        if not self._blocking:
            return self.authenticate(api_key)
        key_id, secret = _parse_presented(api_key)
        if trio.current_time() - self._polled_at > self.stale_after:
            raise StorageUnavailable("API keys cannot be validated: the key database is not answering")
        if self._polled_token != self._token:
            self._drop_cache()
            self._token = self._polled_token
        entry = self._cache.get(key_id, _MISSING)
        while entry is _MISSING:
            entry = await self._lookup_shared(key_id)
        return self._check(key_id, secret, entry, self._clock())

    async def _lookup_shared(self, key_id: str) -> tuple[APIKeyRecord, bytes] | None | _Missing:
        """Look ``key_id`` up in a thread, or wait for the lookup already running for it and
        share its answer or its error (so N requests of one key cost one query, and with the
        database down they fail together rather than one after another). ``_MISSING`` only
        when the lookup waited for was cancelled: the caller tries itself."""
        running = self._inflight.get(key_id)
        if running is not None:
            await running.done.wait()
            if running.error is not None:
                raise StorageUnavailable(running.error.message) from running.error
            return running.result
        if self._limiter is None:
            self._limiter = trio.CapacityLimiter(self._threads)
        lookup = self._inflight[key_id] = _Lookup()
        generation = self._generation
        try:
            entry = await trio.to_thread.run_sync(self._store.lookup, key_id, limiter=self._limiter)
            lookup.result = entry
        except StorageUnavailable as exc:
            lookup.error = exc
            raise
        finally:
            del self._inflight[key_id]
            lookup.done.set()
        # A change seen while the lookup ran may be newer than what it read: the answer serves
        # the requests waiting for it (it was read after they arrived) but is cached only if the
        # cache was not dropped meanwhile.
        if generation == self._generation and self._polled_token == self._token:
            self._remember(key_id, entry)
        return entry

    async def poll_once(self) -> bool:
        """Read the change token in a thread; True if it was read (the poller's step)."""
        started = trio.current_time()
        try:
            token = await trio.to_thread.run_sync(self._store.change_token)
        except StorageUnavailable:
            return False
        except Exception:  # a bug must not end the poller: the staleness window refuses instead
            log.exception("reading the API key change token failed")
            return False
        self._polled_token = token
        self._polled_at = max(self._polled_at, started)
        return True

    async def run_change_poller(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the change token fresh (every ``poll_interval`` = ``ttl / 2``), forever; start it
        with ``nursery.start``: it reports started after its first attempt, successful or not
        (a database that is down at start-up gives 503s, not a failed start). A failed poll
        keeps the old token and is logged once per outage. Returns at once for a non-blocking
        store (nothing to poll)."""
        if not self._blocking:
            task_status.started()
            return
        ok = await self.poll_once()
        task_status.started()
        failing = False
        while True:
            if not ok and not failing:
                log.warning("cannot read the API key change counter; keys are refused (503) after %.1f s",
                            self.stale_after)
            elif ok and failing:
                log.warning("API key change counter readable again")
            failing = not ok
            await trio.sleep(self.poll_interval)
            ok = await self.poll_once()


class _Lookup:
    """One lookup in a thread, shared by the requests that want the same key id meanwhile."""

    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: tuple[APIKeyRecord, bytes] | None | _Missing = _MISSING
        self.error: StorageUnavailable | None = None


def _parse_presented(api_key: str | None) -> tuple[str, str]:
    if api_key is None:
        raise Unauthenticated("missing")
    m = _KEY_RE.fullmatch(api_key)
    if m is None:
        raise Unauthenticated("malformed")
    return m.group(1), m.group(2)
