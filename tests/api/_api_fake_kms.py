"""FakeKMS: an in-memory stand-in for ``KMSClient``, for the handler unit tests in tests/api only.

It keeps the KMS's contract (tenant scoping, key_not_found for another tenant's key, states,
versions, exact ciphertext sizes, error codes) with cheap deterministic stand-ins for the
post-quantum primitives: a "signature" is SHAKE-256 of the key secret and the message, a KEM
shared secret is SHA-256 of the key secret and the ciphertext (so decapsulation of any
well-sized ciphertext succeeds, like ML-KEM's implicit rejection), and "HPKE" is a random
``enc`` of the KEM's ciphertext size followed by real AES-256-GCM under
SHA-256(secret || enc || info), so a wrong HPKE ``info`` fails like it would in the KMS.
Key import: an import job's "public key" is random bytes of its KEM's size and a wrapped key is
``enc`` (random, the KEM's ciphertext size) followed by real AES-256-GCM under
SHA-256(job secret || enc || info) with the import ``info`` (:meth:`FakeKMS.wrap` makes one), so
a wrong job, algorithm or a flipped bit fails to open like in the KMS; key material is checked
for its seed length (or a DER SEQUENCE for ``pkcs8``) only.
The end-to-end tests use the real KMS process and the real algorithms.
"""

from __future__ import annotations

import hashlib
import itertools
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from qpher_proxy.context import TenantContext
from qpher_proxy.crypto.algorithms import ALGORITHMS, MAX_CONTEXT_BYTES, Algorithm, Kind, get_algorithm
from qpher_proxy.errors import (
    AlgorithmMismatch,
    DecryptionFailed,
    IdempotencyKeyReused,
    ImportJobExpired,
    ImportJobNotFound,
    InvalidCiphertext,
    InvalidContext,
    InvalidKeyMaterial,
    InvalidKeyState,
    InvalidWrappedKey,
    KeyDestroyed,
    KeyDisabled,
    KeyNotFound,
    KMSUnavailable,
    QpherError,
)
from qpher_proxy.kms.wire.model import KeyInfo, KeyPage, KeyState, VersionInfo, key_not_found, new_key_id

# method -> the job's KEM; algorithm -> its seed size (the real ones, qpher_proxy.crypto.key_import)
IMPORT_KEMS = {"hpke-x-wing": "x-wing", "hpke-ml-kem-768": "ml-kem-768", "hpke-ml-kem-1024": "ml-kem-1024"}
SEED_SIZES = {"ml-kem-768": 64, "ml-kem-1024": 64, "x-wing": 32, "ml-dsa-44": 32, "ml-dsa-65": 32,
              "ml-dsa-87": 32, "ml-dsa-65-ecdsa-p256": 83}


def import_info(job_id: str, algorithm: str) -> bytes:
    return b"qpher/v1/import:" + job_id.encode("ascii") + b":" + algorithm.encode("ascii")


@dataclass
class _Job:
    tenant: str
    job_id: str
    method: str
    secret: bytes
    public_key: bytes
    created_at: float
    expires_at: float


def _public(secret: bytes, alg: Algorithm) -> bytes:
    return hashlib.shake_256(b"pk" + secret).digest(alg.public_key_size)


@dataclass
class _Key:
    tenant: str
    info: KeyInfo
    secrets: list[bytes] = field(default_factory=list)  # one per version
    resume_state: KeyState = KeyState.ENABLED


class FakeKMS:
    """In-memory KMS double. ``unavailable = True`` makes every call raise ``kms_unavailable``."""

    def __init__(self, *, destroy_delay: float = 86_400.0) -> None:
        self._keys: dict[str, _Key] = {}
        self._clock = itertools.count(1_767_225_600)  # 2026-01-01T00:00:00Z, one second per call
        self.destroy_delay = destroy_delay
        self.unavailable = False
        self.calls: list[str] = []
        self._jobs: dict[str, _Job] = {}
        self._skew = 0.0  # advance(): seconds added to the clock
        # (tenant, idempotency key) -> (the request's arguments, the key id it created)
        self._idempotent: dict[tuple[str, str], tuple[tuple[Any, ...], str]] = {}

    # -- helpers ------------------------------------------------------------------------

    def _enter(self, op: str) -> float:
        self.calls.append(op)
        if self.unavailable:
            raise KMSUnavailable("no KMS worker is available")
        return float(next(self._clock)) + self._skew

    def advance(self, seconds: float) -> None:
        """Test hook: move the clock forward (import jobs expire)."""
        self._skew += seconds

    def _get(self, ctx: TenantContext, key_id: str) -> _Key:
        k = self._keys.get(key_id)
        if k is None or k.tenant != ctx.tenant_id:
            raise key_not_found(key_id)
        return k

    @staticmethod
    def _require_usable(k: _Key) -> None:
        if k.info.state is KeyState.DESTROYED:
            raise KeyDestroyed(f"key {k.info.key_id!r} was destroyed")
        if k.info.state is not KeyState.ENABLED:
            raise KeyDisabled(f"key {k.info.key_id!r} is {k.info.state.value}")

    def _usable(self, ctx: TenantContext, key_id: str, kind: Kind) -> tuple[_Key, Algorithm]:
        k = self._get(ctx, key_id)
        self._require_usable(k)
        alg = ALGORITHMS[k.info.algorithm]
        if alg.kind is not kind:
            raise AlgorithmMismatch(f"key algorithm {alg.name!r} does not offer this operation")
        return k, alg

    @staticmethod
    def _version(k: _Key, version: int | None) -> int:
        v = k.info.latest_version if version is None else version
        if not 1 <= v <= k.info.latest_version:
            raise KeyNotFound(f"key {k.info.key_id!r} has no version {v}")
        return v

    def _set(self, k: _Key, now: float, **changes: object) -> KeyInfo:
        k.info = replace(k.info, updated_at=now, **changes)  # type: ignore[arg-type]
        return k.info

    # -- lifecycle ----------------------------------------------------------------------

    async def create_key(self, ctx: TenantContext, algorithm: str | None = None, kind: str | None = None,
                         label: str | None = None, mode: str | None = None) -> KeyInfo:
        now = self._enter("create_key")
        assert kind is None and mode is None, "the API resolves kind/mode to an algorithm itself"
        alg = get_algorithm(algorithm)
        key_id = new_key_id()
        secret = secrets.token_bytes(32)
        info = KeyInfo(
            key_id=key_id, kind=alg.kind.value, algorithm=alg.name, label=label, state=KeyState.ENABLED,
            version=1, latest_version=1, public_key=_public(secret, alg), created_at=now, updated_at=now,
            destroy_at=None, destroyed_at=None, versions=(VersionInfo(1, "active", now),),
        )
        self._keys[key_id] = _Key(ctx.tenant_id, info, [secret])
        return info

    async def get_key(self, ctx: TenantContext, key_id: str, version: int | None = None) -> KeyInfo:
        self._enter("get_key")
        k = self._get(ctx, key_id)
        v = self._version(k, version)
        if k.info.public_key is None:
            return k.info
        return replace(k.info, version=v, public_key=_public(k.secrets[v - 1], ALGORITHMS[k.info.algorithm]))

    async def list_keys(self, ctx: TenantContext, limit: int = 50, cursor: str | None = None) -> KeyPage:
        self._enter("list_keys")
        mine = sorted(
            (k.info for k in self._keys.values() if k.tenant == ctx.tenant_id), key=lambda i: i.key_id
        )
        after = [i for i in mine if cursor is None or i.key_id > cursor]
        page = tuple(after[:limit])
        return KeyPage(page, page[-1].key_id if len(after) > limit else None)

    async def rotate_key(self, ctx: TenantContext, key_id: str) -> KeyInfo:
        now = self._enter("rotate_key")
        k = self._get(ctx, key_id)
        self._require_usable(k)
        secret = secrets.token_bytes(32)
        k.secrets.append(secret)
        v = k.info.latest_version + 1
        return self._set(
            k,
            now,
            version=v,
            latest_version=v,
            public_key=_public(secret, ALGORITHMS[k.info.algorithm]),
            versions=(*k.info.versions, VersionInfo(v, "active", now)),
        )

    def _transition(self, ctx: TenantContext, key_id: str, op: str) -> KeyInfo:
        now = self._enter(op)
        k = self._get(ctx, key_id)
        state = k.info.state
        if state is KeyState.DESTROYED:
            raise KeyDestroyed(f"key {key_id!r} was destroyed")
        if op == "cancel_destroy":
            if state is not KeyState.PENDING_DESTRUCTION:
                raise InvalidKeyState(f"key {key_id!r} is not scheduled for destruction")
            return self._set(k, now, state=k.resume_state, destroy_at=None)
        if state is KeyState.PENDING_DESTRUCTION:
            raise InvalidKeyState(f"key {key_id!r} is scheduled for destruction; cancel that first")
        return self._set(k, now, state=KeyState.DISABLED if op == "disable_key" else KeyState.ENABLED)

    async def disable_key(self, ctx: TenantContext, key_id: str) -> KeyInfo:
        return self._transition(ctx, key_id, "disable_key")

    async def enable_key(self, ctx: TenantContext, key_id: str) -> KeyInfo:
        return self._transition(ctx, key_id, "enable_key")

    async def cancel_destroy(self, ctx: TenantContext, key_id: str) -> KeyInfo:
        return self._transition(ctx, key_id, "cancel_destroy")

    async def schedule_destroy(self, ctx: TenantContext, key_id: str, delay: float | None = None) -> KeyInfo:
        now = self._enter("schedule_destroy")
        k = self._get(ctx, key_id)
        if k.info.state is KeyState.DESTROYED:
            raise KeyDestroyed(f"key {key_id!r} was destroyed")
        if k.info.state is KeyState.PENDING_DESTRUCTION:  # already scheduled: keep the first date
            return k.info
        k.resume_state = k.info.state
        at = now + (self.destroy_delay if delay is None else delay)
        return self._set(k, now, state=KeyState.PENDING_DESTRUCTION, destroy_at=at)

    def destroy_now(self, key_id: str) -> None:
        """Test hook: what the KMS does once the destruction delay has passed."""
        k = self._keys[key_id]
        k.secrets = []
        now = float(next(self._clock))
        self._set(k, now, state=KeyState.DESTROYED, public_key=None, destroyed_at=now,
                  versions=tuple(replace(v, state="destroyed") for v in k.info.versions))

    # -- key import ---------------------------------------------------------------------

    def _job_answer(self, job: _Job, now: float) -> dict[str, Any]:
        return {"import_job_id": job.job_id, "method": job.method, "public_key": job.public_key,
                "created_at": job.created_at, "expires_at": job.expires_at,
                "state": "active" if now < job.expires_at else "expired"}

    def _job(self, ctx: TenantContext, job_id: str) -> _Job:
        job = self._jobs.get(job_id)
        if job is None or job.tenant != ctx.tenant_id:
            raise ImportJobNotFound(f"no import job {job_id!r}")
        return job

    async def create_import_job(self, ctx: TenantContext, method: str,
                                ttl_seconds: int | None = None) -> dict[str, Any]:
        now = self._enter("create_import_job")
        alg = ALGORITHMS[IMPORT_KEMS[method]]
        secret = secrets.token_bytes(32)
        job_id = "ij_" + new_key_id()[2:]
        job = _Job(ctx.tenant_id, job_id, method, secret, _public(secret, alg), now,
                   now + (86_400 if ttl_seconds is None else ttl_seconds))
        self._jobs[job_id] = job
        return self._job_answer(job, now)

    async def get_import_job(self, ctx: TenantContext, job_id: str) -> dict[str, Any]:
        now = self._enter("get_import_job")
        return self._job_answer(self._job(ctx, job_id), now)

    async def list_import_jobs(self, ctx: TenantContext, limit: int = 50,
                               cursor: str | None = None) -> dict[str, Any]:
        now = self._enter("list_import_jobs")
        mine = sorted((j for j in self._jobs.values() if j.tenant == ctx.tenant_id), key=lambda j: j.job_id)
        after = [j for j in mine if cursor is None or j.job_id > cursor]
        page = after[:limit]
        return {"jobs": [self._job_answer(j, now) for j in page],
                "next_cursor": page[-1].job_id if len(after) > limit else None}

    def wrap(self, job_id: str, algorithm: str, material: bytes) -> bytes:
        """Test hook: ``material`` wrapped for the job as a client would (fake HPKE, see above)."""
        job = self._jobs[job_id]
        enc = secrets.token_bytes(ALGORITHMS[IMPORT_KEMS[job.method]].ciphertext_size)
        key = hashlib.sha256(job.secret + enc + import_info(job_id, algorithm)).digest()
        return enc + AESGCM(key).encrypt(bytes(12), material, None)

    def _unwrap(self, job: _Job, algorithm: str, wrapped: bytes) -> bytes:
        enc_size = ALGORITHMS[IMPORT_KEMS[job.method]].ciphertext_size
        if len(wrapped) < enc_size + 16:
            raise InvalidWrappedKey("the wrapped key does not open with this import job")
        key = hashlib.sha256(job.secret + wrapped[:enc_size] + import_info(job.job_id, algorithm)).digest()
        try:
            return AESGCM(key).decrypt(bytes(12), wrapped[enc_size:], None)
        except InvalidTag as exc:
            raise InvalidWrappedKey("the wrapped key does not open with this import job") from exc

    async def import_key(self, ctx: TenantContext, job_id: str, algorithm: str, wrapped_key: bytes, *,
                         format: str = "seed", label: str | None = None, key_id: str | None = None,
                         idempotency_key: str | None = None) -> KeyInfo:
        now = self._enter("import_key")
        args = (job_id, algorithm, wrapped_key, format, label, key_id)
        if idempotency_key is not None and (ctx.tenant_id, idempotency_key) in self._idempotent:
            first_args, first_key = self._idempotent[(ctx.tenant_id, idempotency_key)]
            if first_args != args:
                raise IdempotencyKeyReused("this Idempotency-Key was used for another request")
            return replace(self._keys[first_key].info, replayed=True)
        job = self._job(ctx, job_id)
        if now >= job.expires_at:
            raise ImportJobExpired(f"import job {job_id!r} has expired")
        target = None if key_id is None else self._get(ctx, key_id)
        if target is not None:
            self._require_usable(target)
            if target.info.algorithm != algorithm:
                raise InvalidKeyMaterial(f"key {key_id!r} is {target.info.algorithm}, not {algorithm}")
        material = self._unwrap(job, algorithm, wrapped_key)
        if format == "seed" and len(material) != SEED_SIZES[algorithm]:
            raise InvalidKeyMaterial(
                f"a {algorithm} seed is {SEED_SIZES[algorithm]} bytes, not {len(material)}")
        if format == "pkcs8" and material[:1] != b"\x30":
            raise InvalidKeyMaterial("the PKCS#8 key is not a DER SEQUENCE")
        secret = hashlib.sha256(material).digest()
        alg = ALGORITHMS[algorithm]
        if target is None:
            info = await self.create_key(ctx, algorithm=algorithm, label=label)
            k = self._keys[info.key_id]
            k.secrets[0] = secret
            info = self._set(k, now, public_key=_public(secret, alg))
        else:
            k = target
            k.secrets.append(secret)
            v = k.info.latest_version + 1
            info = self._set(k, now, version=v, latest_version=v, public_key=_public(secret, alg),
                             versions=(*k.info.versions, VersionInfo(v, "active", now)))
        if idempotency_key is not None:
            self._idempotent[(ctx.tenant_id, idempotency_key)] = (args, info.key_id)
        return info

    # -- crypto -------------------------------------------------------------------------

    async def encapsulate(self, ctx: TenantContext, key_id: str) -> tuple[bytes, bytes, int]:
        self._enter("encapsulate")
        k, alg = self._usable(ctx, key_id, Kind.KEM)
        ct = secrets.token_bytes(alg.ciphertext_size)
        ss = hashlib.sha256(k.secrets[-1] + ct).digest()
        return ss, ct, k.info.latest_version

    async def decapsulate(self, ctx: TenantContext, key_id: str, ciphertext: bytes,
                          version: int | None = None) -> bytes:
        self._enter("decapsulate")
        k, alg = self._usable(ctx, key_id, Kind.KEM)
        v = self._version(k, version)
        if len(ciphertext) != alg.ciphertext_size:
            raise InvalidCiphertext(
                f"{alg.name} ciphertext must be {alg.ciphertext_size} bytes, not {len(ciphertext)}"
            )
        return hashlib.sha256(k.secrets[v - 1] + ciphertext).digest()

    async def sign(
        self, ctx: TenantContext, key_id: str, message: bytes, context: bytes = b""
    ) -> tuple[bytes, int]:
        self._enter("sign")
        k, alg = self._usable(ctx, key_id, Kind.SIGNATURE)
        if len(context) > MAX_CONTEXT_BYTES:
            raise InvalidContext("context too long")
        return self._sig(k.secrets[-1], alg, message, context), k.info.latest_version

    @staticmethod
    def _sig(secret: bytes, alg: Algorithm, message: bytes, context: bytes) -> bytes:
        data = secret + bytes((len(context),)) + context + message
        return hashlib.shake_256(data).digest(alg.signature_size)

    async def verify(self, ctx: TenantContext, key_id: str, message: bytes, signature: bytes,
                     context: bytes = b"", version: int | None = None) -> bool:
        self._enter("verify")
        k, alg = self._usable(ctx, key_id, Kind.SIGNATURE)
        v = self._version(k, version)
        if len(context) > MAX_CONTEXT_BYTES:
            raise InvalidContext("context too long")
        return secrets.compare_digest(signature, self._sig(k.secrets[v - 1], alg, message, context))

    async def encrypt(self, ctx: TenantContext, key_id: str, plaintext: bytes, aad: bytes = b"",
                      info: bytes = b"") -> tuple[bytes, int]:
        self._enter("encrypt")
        k, alg = self._usable(ctx, key_id, Kind.KEM)
        enc = secrets.token_bytes(alg.ciphertext_size)
        key = hashlib.sha256(k.secrets[-1] + enc + info).digest()
        return enc + AESGCM(key).encrypt(bytes(12), plaintext, aad), k.info.latest_version

    async def decrypt(self, ctx: TenantContext, key_id: str, ciphertext: bytes, aad: bytes = b"",
                      version: int | None = None, info: bytes = b"") -> bytes:
        self._enter("decrypt")
        k, alg = self._usable(ctx, key_id, Kind.KEM)
        v = self._version(k, version)
        if len(ciphertext) < alg.ciphertext_size + 16:
            raise InvalidCiphertext("ciphertext too short")
        enc, ct = ciphertext[: alg.ciphertext_size], ciphertext[alg.ciphertext_size:]
        key = hashlib.sha256(k.secrets[v - 1] + enc + info).digest()
        try:
            return AESGCM(key).decrypt(bytes(12), ct, aad)
        except InvalidTag as exc:
            raise DecryptionFailed("decryption failed") from exc

    # -- batch: one call, results shaped like KMSClient.batch's --------------------------

    async def batch(self, ctx: TenantContext,
                    items: Sequence[tuple[str, Mapping[str, Any]]]) -> list[dict[str, Any] | QpherError]:
        self._enter("batch")
        out: list[dict[str, Any] | QpherError] = []
        for op, a in items:
            try:
                out.append(await self._batch_item(ctx, op, a))
            except QpherError as exc:
                out.append(exc)
        return out

    async def _batch_item(self, ctx: TenantContext, op: str, a: Mapping[str, Any]) -> dict[str, Any]:
        k = self._get(ctx, a["key_id"])
        if op == "encapsulate":
            ss, ct, v = await self.encapsulate(ctx, a["key_id"])
            return {"shared_secret": ss, "ciphertext": ct, "version": v}
        if op == "decapsulate":
            ss = await self.decapsulate(ctx, a["key_id"], a["ciphertext"], a["version"])
            return {"shared_secret": ss, "version": self._version(k, a["version"])}
        if op == "sign":
            sig, v = await self.sign(ctx, a["key_id"], a["message"], a["context"])
            return {"signature": sig, "version": v}
        if op == "verify":
            ok = await self.verify(ctx, a["key_id"], a["message"], a["signature"], a["context"], a["version"])
            return {"valid": ok, "version": self._version(k, a["version"])}
        if op == "encrypt":
            ct, v = await self.encrypt(ctx, a["key_id"], a["plaintext"], a["aad"], a["info"])
            return {"ciphertext": ct, "version": v}
        if op == "decrypt":
            pt = await self.decrypt(ctx, a["key_id"], a["ciphertext"], a["aad"], a["version"], a["info"])
            return {"plaintext": pt, "version": self._version(k, a["version"])}
        raise AssertionError(op)
