"""Key metadata as both processes see it: states, records and their wire form.

Shared by the gateway (``kms.client``) and the KMS (``kms.worker``); public facts
only -- a :class:`KeyInfo` carries a public key, never a private one.
"""

from __future__ import annotations

import enum
import re
import secrets
from base64 import b32encode
from dataclasses import dataclass, field
from typing import Any, Literal

from ...errors import ImportJobNotFound, KeyNotFound

KEY_ID_PREFIX = "k_"
KEY_ID_CHARS = 26  # base32 characters: 130 random bits
KEY_ID_RE = re.compile(r"k_[a-z2-7]{26}\Z")
MAX_LABEL_CHARS = 128
# An idempotency key (the Idempotency-Key header of key creation and rotation, as Stripe's and
# draft-ietf-httpapi-idempotency-key-header): 1..255 visible ASCII characters (VCHAR, RFC 5234)
MAX_IDEMPOTENCY_KEY_CHARS = 255
IDEMPOTENCY_KEY_RE = re.compile(rf"[\x21-\x7e]{{1,{MAX_IDEMPOTENCY_KEY_CHARS}}}\Z")
DEFAULT_LIST_LIMIT = 50
MAX_LIST_LIMIT = 100
# Import jobs (key import, BYOK): ``ij_`` + 26 base32 characters, like key ids
IMPORT_JOB_ID_PREFIX = "ij_"
IMPORT_JOB_ID_RE = re.compile(r"ij_[a-z2-7]{26}\Z")
DEFAULT_IMPORT_JOB_TTL = 24 * 3600  # seconds: a day unless asked, a week at most
MIN_IMPORT_JOB_TTL = 60
MAX_IMPORT_JOB_TTL = 7 * 24 * 3600
KEY_ORIGINS = ("generated", "imported")
DEFAULT_DESTROY_DELAY = 24 * 3600.0  # seconds: a day to notice a mistaken DELETE and cancel it
MAX_DESTROY_DELAY = 365 * 24 * 3600.0

# The operations a KMS worker serves (and nothing else: there is no export).
LIFECYCLE_OPS = frozenset(
    {"create_key", "get_key", "list_keys", "rotate_key", "disable_key", "enable_key",
     "schedule_destroy", "cancel_destroy"}
)
IMPORT_OPS = frozenset({"create_import_job", "get_import_job", "list_import_jobs", "import_key"})
CRYPTO_OPS = frozenset({"encapsulate", "decapsulate", "sign", "verify", "encrypt", "decrypt"})
AUDIT_OPS = frozenset({"audit_vkeys", "audit_sign_checkpoint"})  # the audit log's checkpoints (system keys)
OPS = LIFECYCLE_OPS | IMPORT_OPS | CRYPTO_OPS | AUDIT_OPS | {"batch", "ping"}
BATCH_OPS = CRYPTO_OPS | {"get_key"}  # what one batch item may be
DEFAULT_MAX_BATCH = 1000


def new_key_id() -> str:
    """``k_`` + 26 lower-case base32 characters from the OS CSPRNG (130 bits)."""
    return KEY_ID_PREFIX + b32encode(secrets.token_bytes(20)).decode("ascii").lower()[:KEY_ID_CHARS]


def new_import_job_id() -> str:
    """``ij_`` + 26 lower-case base32 characters from the OS CSPRNG (130 bits)."""
    return IMPORT_JOB_ID_PREFIX + b32encode(secrets.token_bytes(20)).decode("ascii").lower()[:KEY_ID_CHARS]


def import_job_not_found(job_id: object) -> ImportJobNotFound:
    """The one "no such import job" error: identical for a random id and another tenant's id."""
    shown = job_id if isinstance(job_id, str) else type(job_id).__name__
    if len(shown) > 40:
        shown = shown[:40] + "..."
    return ImportJobNotFound(f"no import job {shown!r}")


def key_not_found(key_id: object) -> KeyNotFound:
    """The one "no such key" error: identical for a random id and another tenant's id."""
    shown = key_id if isinstance(key_id, str) else type(key_id).__name__
    if len(shown) > 40:
        shown = shown[:40] + "..."
    return KeyNotFound(f"no key {shown!r}")


class KeyState(enum.StrEnum):
    ENABLED = "enabled"
    DISABLED = "disabled"
    PENDING_DESTRUCTION = "pending_destruction"
    DESTROYED = "destroyed"


@dataclass(frozen=True, slots=True)
class VersionInfo:
    version: int
    state: str  # "active" | "destroyed"
    created_at: float


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """A key's metadata and the public key of ``version`` (the latest unless asked)."""

    key_id: str
    kind: str
    algorithm: str
    label: str | None
    state: KeyState
    version: int  # the version public_key belongs to
    latest_version: int
    public_key: bytes | None  # None once destroyed
    created_at: float
    updated_at: float
    destroy_at: float | None
    destroyed_at: float | None
    versions: tuple[VersionInfo, ...] = ()
    # True when this answers a repeated request with an idempotency key: nothing was created,
    # this is the key (and version) the first request created
    replayed: bool = False
    # where the private key of ``version`` comes from: "generated" in the KMS, or "imported"
    # through the import job ``import_job_id``
    origin: str = "generated"
    import_job_id: str | None = None

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "key_id": self.key_id,
            "kind": self.kind,
            "algorithm": self.algorithm,
            "label": self.label,
            "state": self.state.value,
            "version": self.version,
            "latest_version": self.latest_version,
            "public_key": self.public_key,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "destroy_at": self.destroy_at,
            "destroyed_at": self.destroyed_at,
            "versions": [[v.version, v.state, v.created_at] for v in self.versions],
            "origin": self.origin,
        }
        if self.import_job_id is not None:
            wire["import_job_id"] = self.import_job_id
        if self.replayed:
            wire["replayed"] = True
        return wire

    @classmethod
    def from_wire(cls, d: Any) -> KeyInfo:
        if type(d) is not dict:
            raise ValueError("key info must be a dict")
        return cls(
            key_id=d["key_id"],
            kind=d["kind"],
            algorithm=d["algorithm"],
            label=d["label"],
            state=KeyState(d["state"]),
            version=d["version"],
            latest_version=d["latest_version"],
            public_key=d["public_key"],
            created_at=d["created_at"],
            updated_at=d["updated_at"],
            destroy_at=d["destroy_at"],
            destroyed_at=d["destroyed_at"],
            versions=tuple(VersionInfo(v[0], v[1], v[2]) for v in d["versions"]),
            replayed=d.get("replayed") is True,
            origin=d.get("origin", "generated"),
            import_job_id=d.get("import_job_id"),
        )


@dataclass(frozen=True, slots=True)
class KeyPage:
    keys: tuple[KeyInfo, ...]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class ImportJobInfo:
    """An import job as both sides see it: its method and public key, never its private key.

    ``state`` is "active" until ``expires_at``, then "expired" (the sweep destroys the private key;
    a job past its time is refused whether or not the sweep has run yet)."""

    import_job_id: str
    method: str
    public_key: bytes = field(repr=False)
    created_at: float
    expires_at: float
    state: str  # "active" | "expired"

    def to_wire(self) -> dict[str, Any]:
        return {
            "import_job_id": self.import_job_id,
            "method": self.method,
            "public_key": self.public_key,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "state": self.state,
        }

    @classmethod
    def from_wire(cls, d: Any) -> ImportJobInfo:
        if type(d) is not dict:
            raise ValueError("import job info must be a dict")
        return cls(
            import_job_id=d["import_job_id"], method=d["method"], public_key=d["public_key"],
            created_at=d["created_at"], expires_at=d["expires_at"], state=d["state"],
        )


@dataclass(frozen=True, slots=True)
class ImportJobPage:
    jobs: tuple[ImportJobInfo, ...]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class KEKSettings:
    """Where the KMS finds its KEK (``kms.kek`` in the config). Names a source; holds no secret."""

    provider: Literal["file", "env", "pkcs11"] = "file"
    file: str | None = None  # provider "file": path of the base64 KEK file (0600)
    env: str = "QPHER_KEK"  # provider "env": the variable holding the base64 KEK
    # provider "pkcs11": the token's library, the token and key labels, and where the PIN is (a
    # 0600 file the worker reads, or a variable the supervisor moves into a memfd); never the PIN
    pkcs11_module: str | None = None
    pkcs11_token_label: str | None = None
    pkcs11_key_label: str | None = None
    pkcs11_pin_file: str | None = None
    pkcs11_pin_env: str | None = None

    @property
    def secret_env(self) -> str | None:
        """The variable whose value the supervisor moves into a memfd for the workers (``--kek-fd``):
        the KEK for provider env, the PIN for provider pkcs11 with ``pkcs11_pin_env``."""
        if self.provider == "env":
            return self.env
        if self.provider == "pkcs11" and self.pkcs11_pin_file is None:
            return self.pkcs11_pin_env
        return None


@dataclass(frozen=True, slots=True)
class KMSStorageSettings:
    """Where the KMS keeps its keys when ``storage.backend`` is ``postgresql`` (the SQLite store
    needs nothing beyond the KMS directory). Travels to the workers in their HELLO frame only:
    ``dsn`` may hold a password, so it is never in argv, the environment, a log line or a repr."""

    dsn: str = field(repr=False)
    role_prefix: str = "qpher"
    pool_size: int = 8
    connect_timeout: float = 3.0
    statement_timeout: float = 5.0
    pool_timeout: float = 2.0
    lease_ttl: float = 15.0
    sweep_interval: float = 5.0

    def hello(self) -> dict[str, str | int | float]:
        """The ``storage`` entry of the HELLO settings."""
        return {
            "backend": "postgresql", "dsn": self.dsn, "role_prefix": self.role_prefix,
            "pool_size": self.pool_size, "connect_timeout": float(self.connect_timeout),
            "statement_timeout": float(self.statement_timeout), "pool_timeout": float(self.pool_timeout),
            "lease_ttl": float(self.lease_ttl), "sweep_interval": float(self.sweep_interval),
        }
