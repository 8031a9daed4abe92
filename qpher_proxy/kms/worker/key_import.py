"""Key import (BYOK) in the KMS: import-job key pairs, unwrapping, and checking what came in.  KMS only.

Both key stores (SQLite + key files, PostgreSQL) keep import jobs and call these functions; the
byte layouts (methods, ``info``, seed and PKCS#8 forms) are in ``qpher_proxy.crypto.key_import``.

Theory of operation
===================

An import job is a KEM key pair of the job's method, made here by the backend in use. Its
private key is sealed exactly like a key version (``keyfile.seal`` under the KEK, bound to
``(tenant, job id, 1, KEM algorithm)`` in the AEAD associated data) and kept in the job's row;
it is never returned, never exported, and destroyed (the sealed bytes set to NULL) by the sweep
once the job has expired. A job answers for its own tenant only: another tenant's job id misses
exactly like a made-up one (404 ``import_job_not_found``).

``import_key`` then, with nothing written before the last step:

1. the job: unknown -> 404 ``import_job_not_found``; past ``expires_at`` (swept or not) -> 400
   ``import_job_expired``;
2. unseal the job's private key and HPKE-open ``wrapped_key`` with ``info`` =
   ``qpher/v1/import:<job id>:<algorithm>`` and no aad; any failure (tampered bytes, another
   job's key, another algorithm in ``info``, a truncated message) -> 400 ``invalid_wrapped_key``;
3. the plaintext in its ``format`` -> the seed form (lengths, encodings, PKCS#8 algorithm and
   form) -> 400 ``invalid_key_material`` on any mismatch;
4. the backend derives the key pair from the seed; a PKCS#8 ``publicKey`` must equal the derived
   public key, and a pairwise consistency test (sign and verify, or encapsulate and decapsulate)
   must pass -- else 400 ``invalid_key_material``;
5. the store writes the key (or the new version) exactly as it writes a generated one, with
   ``origin = 'imported'`` and the job id on the version.

No error message carries a byte of the wrapped key, the plaintext or the seed.
"""

from __future__ import annotations

import hashlib
from typing import Any

from ...crypto.algorithms import Algorithm, Kind, get_algorithm
from ...crypto.interface import Backend, PrivateKey
from ...crypto.key_import import IMPORT_FORMATS, import_info, import_method, parse_key_material
from ...errors import (
    BackendUnavailable,
    CryptoError,
    ImportJobExpired,
    InvalidInput,
    InvalidKeyMaterial,
    InvalidWrappedKey,
    QpherError,
)
from ..wire.model import ImportJobInfo
from . import keyfile
from .kek import KEKProvider
from .key_rules import check_import_job_id, check_key_id, check_label
from .keyfile import KeyBinding

_PCT_MESSAGE = b"qpher key import pairwise consistency test"


def job_binding(tenant_id: str, job_id: str, kem: Algorithm) -> KeyBinding:
    """What a job's sealed private key is bound to (its AEAD associated data)."""
    return KeyBinding(tenant_id, job_id, 1, kem.name)


def new_job_key(backend: Backend, kek: KEKProvider, tenant_id: str, job_id: str, method: object
                ) -> tuple[str, Algorithm, bytes, bytes]:
    """``(method, KEM algorithm, public key, sealed private key)`` of a new job."""
    kem = import_method(method)
    if not backend.supports(kem):
        raise BackendUnavailable(f"the {backend.name} backend does not offer {kem.name}")
    priv = backend.generate(kem)
    public = priv.public_key().public_bytes()
    sealed = keyfile.seal(kek, job_binding(tenant_id, job_id, kem), priv.private_bytes())
    return str(method), kem, public, sealed


class ImportRequest:
    """The checked arguments of one ``import_key`` (the wrapped bytes are never shown)."""

    __slots__ = ("job_id", "algorithm", "wrapped_key", "format", "label", "key_id", "digest")

    def __init__(
        self, job_id: object, algorithm: object, wrapped_key: object, format: object, label: object,
        key_id: object,
    ) -> None:
        self.job_id = check_import_job_id(job_id)
        self.algorithm = get_algorithm(algorithm)
        if type(wrapped_key) is not bytes:
            raise InvalidInput("wrapped_key must be bytes")
        self.wrapped_key: bytes = wrapped_key
        fmt = "seed" if format is None else format
        if type(fmt) is not str or fmt not in IMPORT_FORMATS:
            shown = fmt[:20] if isinstance(fmt, str) else type(fmt).__name__
            raise InvalidInput(f"format must be one of {list(IMPORT_FORMATS)}, not {shown!r}")
        self.format: str = fmt
        self.label = check_label(label)
        self.key_id = None if key_id is None else check_key_id(key_id)
        # the idempotency fingerprint covers the wrapped bytes through their hash only
        self.digest = hashlib.sha256(wrapped_key).hexdigest()

    def __repr__(self) -> str:
        return f"<ImportRequest job={self.job_id!r} algorithm={self.algorithm.name!r} format={self.format!r}>"

    def fingerprint_args(self) -> dict[str, str | None]:
        return {"import_job_id": self.job_id, "algorithm": self.algorithm.name, "format": self.format,
                "label": self.label, "key_id": self.key_id, "wrapped_key_sha256": self.digest}


def require_open(job: ImportJobInfo, sealed: bytes | None) -> bytes:
    """The sealed job key of a job that may still be used, else 400 import_job_expired."""
    if job.state != "active" or sealed is None:
        raise ImportJobExpired(f"import job {job.import_job_id!r} has expired; create a new one")
    return sealed


def unwrap(
    backend: Backend, kek: KEKProvider, tenant_id: str, job: ImportJobInfo, sealed: bytes, req: ImportRequest
) -> PrivateKey:
    """Steps 2 to 4 of the module docstring: the imported private key, checked, as a backend object."""
    kem = import_method(job.method)
    job_key = backend.load_private(kem, keyfile.unseal(kek, job_binding(tenant_id, job.import_job_id, kem),
                                                       sealed))
    try:
        plaintext = job_key.hpke_open(req.wrapped_key, aad=b"", info=import_info(job.import_job_id,
                                                                                 req.algorithm.name))
    except CryptoError:
        raise InvalidWrappedKey(
            f"the wrapped key does not open under import job {job.import_job_id!r} "
            f"(HPKE {job.method}, info qpher/v1/import:<job id>:{req.algorithm.name}, no aad)"
        ) from None
    alg = req.algorithm
    material = parse_key_material(alg, plaintext, req.format)
    del plaintext
    if not backend.supports(alg):
        raise BackendUnavailable(f"the {backend.name} backend does not offer {alg.name}")
    try:
        priv = backend.load_private(alg, material.seed)
    except QpherError:
        raise InvalidKeyMaterial(f"the key material is not a valid {alg.name} private key") from None
    public = priv.public_key().public_bytes()
    if material.public_key is not None and material.public_key != public:
        raise InvalidKeyMaterial(
            f"the public key in the PKCS#8 does not match the {alg.name} key its seed derives"
        )
    _pairwise_check(backend, alg, priv, public)
    return priv


def _pairwise_check(backend: Backend, alg: Algorithm, priv: PrivateKey, public: bytes) -> None:
    """A pairwise consistency test of the derived key pair (as FIPS 140-3 asks of key generation)."""
    try:
        pub: Any = backend.load_public(alg, public)
        if alg.kind is Kind.SIGNATURE:
            ok = pub.verify(priv.sign(_PCT_MESSAGE), _PCT_MESSAGE)
        else:
            ss, ct = pub.encapsulate()
            ok = priv.decapsulate(ct) == ss
    except QpherError:
        ok = False
    if not ok:
        raise InvalidKeyMaterial(f"the key material does not make a consistent {alg.name} key pair")


__all__ = ["ImportRequest", "job_binding", "new_job_key", "require_open", "unwrap"]
