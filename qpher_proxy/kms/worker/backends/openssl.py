"""The ``openssl`` backend: pyca/cryptography (>= 47) and the OpenSSL it bundles.

Theory of operation
-------------------
``cryptography`` 50 exposes FIPS 203 ML-KEM-768/1024 and FIPS 204 ML-DSA-44/65/87
directly, in exactly our storage forms: ML-KEM private keys load from and export to
the 64-byte seed d||z (``from_seed_bytes``/``private_bytes_raw``), ML-DSA keys from
and to the 32-byte seed xi, and public keys are the raw FIPS encodings.
``from_public_bytes`` runs the FIPS 203 §7.2 modulus check. ML-DSA signs *hedged*
(fresh randomness per signature; no deterministic mode) and accepts a context string.

What this module adds is only what the library leaves to the caller: argument types
and lengths checked up front with safe messages, library exceptions turned into our
typed errors, ``verify`` turned into a boolean. Decapsulating a tampered ML-KEM
ciphertext of the right length returns the implicit-rejection secret, as FIPS 203
requires (the library does that; we never add an error path there).

``cryptography`` has no derandomised ML-KEM encapsulation and no deterministic ML-DSA
signing, so known-answer tests that need them use decapsulation/verification on this
backend (see ``tests/crypto``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import cryptography
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import mldsa, mlkem

from ....crypto._primitives import as_bytes, check_context
from ....crypto.algorithms import (
    MAX_CONTEXT_BYTES,
    ML_DSA_44,
    ML_DSA_65,
    ML_DSA_65_ECDSA_P256,
    ML_DSA_87,
    ML_KEM_768,
    ML_KEM_1024,
    X_WING,
    Algorithm,
)
from ....errors import InvalidKey
from . import _hybrid
from ._base import (
    BasePrivateKey,
    BasePublicKey,
    KEMPrivateKey,
    KEMPublicKey,
    SignaturePrivateKey,
    SignaturePublicKey,
    check_private_length,
    check_public_length,
    coerce_ciphertext,
    resolve_algorithm,
)

_MLKEMPrivate = mlkem.MLKEM768PrivateKey | mlkem.MLKEM1024PrivateKey
_MLKEMPublic = mlkem.MLKEM768PublicKey | mlkem.MLKEM1024PublicKey
_MLDSAPrivate = mldsa.MLDSA44PrivateKey | mldsa.MLDSA65PrivateKey | mldsa.MLDSA87PrivateKey
_MLDSAPublic = mldsa.MLDSA44PublicKey | mldsa.MLDSA65PublicKey | mldsa.MLDSA87PublicKey

_MLKEM_CLASSES: dict[str, tuple[type[_MLKEMPrivate], type[_MLKEMPublic]]] = {
    ML_KEM_768.name: (mlkem.MLKEM768PrivateKey, mlkem.MLKEM768PublicKey),
    ML_KEM_1024.name: (mlkem.MLKEM1024PrivateKey, mlkem.MLKEM1024PublicKey),
}
_MLDSA_CLASSES: dict[str, tuple[type[_MLDSAPrivate], type[_MLDSAPublic]]] = {
    ML_DSA_44.name: (mldsa.MLDSA44PrivateKey, mldsa.MLDSA44PublicKey),
    ML_DSA_65.name: (mldsa.MLDSA65PrivateKey, mldsa.MLDSA65PublicKey),
    ML_DSA_87.name: (mldsa.MLDSA87PrivateKey, mldsa.MLDSA87PublicKey),
}


def openssl_version_text() -> str:
    from cryptography.hazmat.backends.openssl.backend import backend

    return str(backend.openssl_version_text())


# ---- ML-KEM ------------------------------------------------------------------------

class OpenSSLMLKEMPublicKey(KEMPublicKey):
    __slots__ = ("algorithm", "_key", "_raw")

    def __init__(self, algorithm: Algorithm, key: _MLKEMPublic, raw: bytes) -> None:
        self.algorithm = algorithm
        self._key = key
        self._raw = raw

    def public_bytes(self) -> bytes:
        return self._raw

    def encapsulate(self) -> tuple[bytes, bytes]:
        return self._key.encapsulate()  # (shared_secret, ciphertext)

    def _encapsulate_derand(self, m: bytes) -> tuple[bytes, bytes]:
        raise NotImplementedError("cryptography offers no derandomised ML-KEM encapsulation")


class OpenSSLMLKEMPrivateKey(KEMPrivateKey):
    __slots__ = ("algorithm", "_key", "_ct_size", "_public")

    def __init__(self, algorithm: Algorithm, key: _MLKEMPrivate) -> None:
        self.algorithm = algorithm
        self._key = key
        self._ct_size = algorithm.ciphertext_size
        self._public: OpenSSLMLKEMPublicKey | None = None

    def private_bytes(self) -> bytes:
        return self._key.private_bytes_raw()

    def public_key(self) -> OpenSSLMLKEMPublicKey:
        if self._public is None:
            pub = self._key.public_key()
            self._public = OpenSSLMLKEMPublicKey(self.algorithm, pub, pub.public_bytes_raw())
        return self._public

    def decapsulate(self, ciphertext: bytes) -> bytes:
        if type(ciphertext) is not bytes or len(ciphertext) != self._ct_size:
            ciphertext = coerce_ciphertext(self.algorithm, ciphertext)
        return self._key.decapsulate(ciphertext)


def _mlkem_from_seed(algorithm: Algorithm, seed: bytes) -> OpenSSLMLKEMPrivateKey:
    private_cls, _ = _MLKEM_CLASSES[algorithm.name]
    return OpenSSLMLKEMPrivateKey(algorithm, private_cls.from_seed_bytes(seed))


def _mlkem_load_public(algorithm: Algorithm, data: bytes) -> OpenSSLMLKEMPublicKey:
    _, public_cls = _MLKEM_CLASSES[algorithm.name]
    try:
        key = public_cls.from_public_bytes(data)
    except ValueError:
        raise InvalidKey(f"{algorithm.name} public key fails the FIPS 203 modulus check") from None
    return OpenSSLMLKEMPublicKey(algorithm, key, data)


# ---- ML-DSA ------------------------------------------------------------------------

class OpenSSLMLDSAPublicKey(SignaturePublicKey):
    __slots__ = ("algorithm", "_key", "_raw", "_sig_size")

    def __init__(self, algorithm: Algorithm, key: _MLDSAPublic, raw: bytes) -> None:
        self.algorithm = algorithm
        self._key = key
        self._raw = raw
        self._sig_size = algorithm.signature_size

    def public_bytes(self) -> bytes:
        return self._raw

    def verify(self, signature: bytes, message: bytes, context: bytes = b"") -> bool:
        if type(context) is not bytes or len(context) > MAX_CONTEXT_BYTES:
            context = check_context(context)
        if type(message) is not bytes:
            message = as_bytes(message, "message")
        if type(signature) is not bytes:
            signature = as_bytes(signature, "signature")
        if len(signature) != self._sig_size:
            return False
        try:
            self._key.verify(signature, message, context)
        except InvalidSignature:
            return False
        return True


class OpenSSLMLDSAPrivateKey(SignaturePrivateKey):
    __slots__ = ("algorithm", "_key", "_public")

    def __init__(self, algorithm: Algorithm, key: _MLDSAPrivate) -> None:
        self.algorithm = algorithm
        self._key = key
        self._public: OpenSSLMLDSAPublicKey | None = None

    def private_bytes(self) -> bytes:
        return self._key.private_bytes_raw()

    def public_key(self) -> OpenSSLMLDSAPublicKey:
        if self._public is None:
            pub = self._key.public_key()
            self._public = OpenSSLMLDSAPublicKey(self.algorithm, pub, pub.public_bytes_raw())
        return self._public

    def sign(self, message: bytes, context: bytes = b"") -> bytes:
        if type(context) is not bytes or len(context) > MAX_CONTEXT_BYTES:
            context = check_context(context)
        if type(message) is not bytes:
            message = as_bytes(message, "message")
        return self._key.sign(message, context)


def _mldsa_from_seed(algorithm: Algorithm, seed: bytes) -> OpenSSLMLDSAPrivateKey:
    private_cls, _ = _MLDSA_CLASSES[algorithm.name]
    return OpenSSLMLDSAPrivateKey(algorithm, private_cls.from_seed_bytes(seed))


def _mldsa_load_public(algorithm: Algorithm, data: bytes) -> OpenSSLMLDSAPublicKey:
    _, public_cls = _MLDSA_CLASSES[algorithm.name]
    try:
        key = public_cls.from_public_bytes(data)
    except ValueError:
        raise InvalidKey(f"{algorithm.name} public key is malformed") from None
    return OpenSSLMLDSAPublicKey(algorithm, key, data)


# ---- the backend -------------------------------------------------------------------

class OpenSSLBackend:
    """Every algorithm of the table on ``cryptography``."""

    name = "openssl"

    def __init__(self) -> None:
        mlkem768_seed = self._bind(_mlkem_from_seed, ML_KEM_768)
        mlkem768_public = self._bind(_mlkem_load_public, ML_KEM_768)
        mldsa65_seed = self._bind(_mldsa_from_seed, ML_DSA_65)
        mldsa65_public = self._bind(_mldsa_load_public, ML_DSA_65)
        # name -> (generate(), load_private(bytes), load_public(bytes))
        self._ops: dict[str, tuple[Callable[[], BasePrivateKey], Callable[[bytes], BasePrivateKey],
                                   Callable[[bytes], BasePublicKey]]] = {}
        for alg in (ML_KEM_768, ML_KEM_1024):
            self._ops[alg.name] = (
                self._bind(lambda a: OpenSSLMLKEMPrivateKey(a, _MLKEM_CLASSES[a.name][0].generate()), alg),
                self._checked_private(alg, self._bind(_mlkem_from_seed, alg)),
                self._checked_public(alg, self._bind(_mlkem_load_public, alg)),
            )
        for alg in (ML_DSA_44, ML_DSA_65, ML_DSA_87):
            self._ops[alg.name] = (
                self._bind(lambda a: OpenSSLMLDSAPrivateKey(a, _MLDSA_CLASSES[a.name][0].generate()), alg),
                self._checked_private(alg, self._bind(_mldsa_from_seed, alg)),
                self._checked_public(alg, self._bind(_mldsa_load_public, alg)),
            )
        self._ops[X_WING.name] = (
            lambda: _hybrid.xwing_generate(mlkem768_seed),
            lambda data: _hybrid.xwing_load_private(data, mlkem768_seed),
            lambda data: _hybrid.xwing_load_public(data, mlkem768_public),
        )
        self._ops[ML_DSA_65_ECDSA_P256.name] = (
            lambda: _hybrid.composite_generate(mldsa65_seed),
            lambda data: _hybrid.composite_load_private(data, mldsa65_seed),
            lambda data: _hybrid.composite_load_public(data, mldsa65_public),
        )

    @staticmethod
    def _bind(fn: Callable[..., Any], algorithm: Algorithm) -> Callable[..., Any]:
        return lambda *args: fn(algorithm, *args)

    @staticmethod
    def _checked_private(algorithm: Algorithm, load: Callable[[bytes], Any]) -> Callable[[object], Any]:
        return lambda data: load(check_private_length(algorithm, data))

    @staticmethod
    def _checked_public(algorithm: Algorithm, load: Callable[[bytes], Any]) -> Callable[[object], Any]:
        return lambda data: load(check_public_length(algorithm, data))

    def supports(self, algorithm: Algorithm) -> bool:
        name = getattr(algorithm, "name", algorithm)
        return name in self._ops

    def generate(self, algorithm: Algorithm | str) -> BasePrivateKey:
        return self._ops[resolve_algorithm(algorithm).name][0]()

    def load_private(self, algorithm: Algorithm | str, data: bytes) -> BasePrivateKey:
        return self._ops[resolve_algorithm(algorithm).name][1](data)

    def load_public(self, algorithm: Algorithm | str, data: bytes) -> BasePublicKey:
        return self._ops[resolve_algorithm(algorithm).name][2](data)

    def versions(self) -> dict[str, str]:
        return {
            "backend": self.name,
            "cryptography": cryptography.__version__,
            "openssl": openssl_version_text(),
        }

    def __repr__(self) -> str:
        return f"<OpenSSLBackend cryptography {cryptography.__version__}>"
