"""Key-object base classes shared by every backend.

A key object is a thin handle around the library's own object: the operation methods
(``encapsulate``, ``decapsulate``, ``sign``, ``verify``) are one Python frame over the
library call plus the checks the library does not do itself. Everything an algorithm
does *not* offer (``sign`` with a KEM key, ``hpke_seal`` with a signature key) is
implemented here once and raises :class:`AlgorithmMismatch`.

Private key objects never show key bytes: ``repr`` names the algorithm only, and they
refuse to be pickled or copied, so a key cannot leak into a log line or a file by
accident. ``private_bytes()`` is the one way out, for the KMS key-file writer.
"""

from __future__ import annotations

import hashlib
from typing import Any, NoReturn

from ....crypto import hpke
from ....crypto._primitives import as_bytes
from ....crypto.algorithms import ALGORITHMS, Algorithm, get_algorithm
from ....errors import (
    AlgorithmMismatch,
    CryptoError,
    DecryptionFailed,
    InvalidCiphertext,
    InvalidKey,
    UnknownAlgorithm,
)


def resolve_algorithm(algorithm: object) -> Algorithm:
    """An :class:`Algorithm` from the table, or its name; anything else is UnknownAlgorithm."""
    if isinstance(algorithm, Algorithm):
        known = ALGORITHMS.get(algorithm.name)
        if known is not algorithm and known != algorithm:
            raise UnknownAlgorithm(f"algorithm {algorithm.name!r} is not in the algorithm table")
        return algorithm
    return get_algorithm(algorithm)


def check_private_length(algorithm: Algorithm, data: object) -> bytes:
    data = as_bytes(data, "private key", InvalidKey)
    if len(data) != algorithm.private_key_size:
        raise InvalidKey(
            f"{algorithm.name} private key must be {algorithm.private_key_size} bytes, not {len(data)}"
        )
    return data


def check_public_length(algorithm: Algorithm, data: object) -> bytes:
    data = as_bytes(data, "public key", InvalidKey)
    if len(data) != algorithm.public_key_size:
        raise InvalidKey(
            f"{algorithm.name} public key must be {algorithm.public_key_size} bytes, not {len(data)}"
        )
    return data


def coerce_ciphertext(algorithm: Algorithm, ciphertext: object) -> bytes:
    """The slow path of a decapsulation's argument check: bytes-like of the exact size."""
    data = as_bytes(ciphertext, "ciphertext", InvalidCiphertext)
    if len(data) != algorithm.ciphertext_size:
        raise InvalidCiphertext(
            f"{algorithm.name} ciphertext must be {algorithm.ciphertext_size} bytes, not {len(data)}"
        )
    return data


class BasePublicKey:
    __slots__ = ()
    algorithm: Algorithm

    def public_bytes(self) -> bytes:  # pragma: no cover - every subclass overrides
        raise NotImplementedError

    def verify(self, signature: bytes, message: bytes, context: bytes = b"") -> bool:
        raise AlgorithmMismatch(f"{self.algorithm.name} is a KEM; it cannot verify signatures")

    def encapsulate(self) -> tuple[bytes, bytes]:
        raise AlgorithmMismatch(f"{self.algorithm.name} is a signature algorithm; it cannot encapsulate")

    def hpke_seal(self, plaintext: bytes, *, aad: bytes = b"", info: bytes = b"") -> bytes:
        raise AlgorithmMismatch(f"{self.algorithm.name} is a signature algorithm; it cannot encrypt")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BasePublicKey):
            return NotImplemented
        return self.algorithm.name == other.algorithm.name and self.public_bytes() == other.public_bytes()

    def __hash__(self) -> int:
        return hash((self.algorithm.name, self.public_bytes()))

    def __repr__(self) -> str:
        fingerprint = hashlib.sha256(self.public_bytes()).hexdigest()[:16]
        return f"<{type(self).__name__} {self.algorithm.name} sha256:{fingerprint}>"


class BasePrivateKey:
    __slots__ = ()
    algorithm: Algorithm

    def public_key(self) -> Any:  # pragma: no cover - every subclass overrides
        raise NotImplementedError

    def private_bytes(self) -> bytes:  # pragma: no cover - every subclass overrides
        raise NotImplementedError

    def sign(self, message: bytes, context: bytes = b"") -> bytes:
        raise AlgorithmMismatch(f"{self.algorithm.name} is a KEM; it cannot sign")

    def decapsulate(self, ciphertext: bytes) -> bytes:
        raise AlgorithmMismatch(f"{self.algorithm.name} is a signature algorithm; it cannot decapsulate")

    def hpke_open(self, sealed: bytes, *, aad: bytes = b"", info: bytes = b"") -> bytes:
        raise AlgorithmMismatch(f"{self.algorithm.name} is a signature algorithm; it cannot decrypt")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.algorithm.name} private key>"

    def __reduce__(self) -> NoReturn:
        raise TypeError(f"{type(self).__name__} cannot be pickled or copied")


class KEMPublicKey(BasePublicKey):
    """HPKE seal on top of the subclass's ``encapsulate``."""

    __slots__ = ()

    def hpke_seal(self, plaintext: bytes, *, aad: bytes = b"", info: bytes = b"") -> bytes:
        if type(plaintext) is not bytes:
            plaintext = as_bytes(plaintext, "plaintext")
        if type(aad) is not bytes:
            aad = as_bytes(aad, "aad")
        if type(info) is not bytes:
            info = as_bytes(info, "info")
        shared_secret, enc = self.encapsulate()
        return enc + hpke.product_suite(self.algorithm.hpke_kem_id).seal_with_secret(
            shared_secret, plaintext, aad, info
        )


class KEMPrivateKey(BasePrivateKey):
    """HPKE open on top of the subclass's ``decapsulate``. Every failure is DecryptionFailed."""

    __slots__ = ()

    def hpke_open(self, sealed: bytes, *, aad: bytes = b"", info: bytes = b"") -> bytes:
        if type(sealed) is not bytes:
            sealed = as_bytes(sealed, "sealed message")
        if type(aad) is not bytes:
            aad = as_bytes(aad, "aad")
        if type(info) is not bytes:
            info = as_bytes(info, "info")
        n = self.algorithm.ciphertext_size
        if len(sealed) < n + hpke.TAG_SIZE:
            # A length is public: say what is wrong with it (no key-dependent detail).
            raise InvalidCiphertext(
                f"{self.algorithm.name} HPKE ciphertext must be at least {n + hpke.TAG_SIZE} bytes, "
                f"got {len(sealed)}"
            )
        try:
            shared_secret = self.decapsulate(sealed[:n])
        except CryptoError:
            raise DecryptionFailed() from None
        return hpke.product_suite(self.algorithm.hpke_kem_id).open_with_secret(
            shared_secret, sealed[n:], aad, info
        )


class SignaturePublicKey(BasePublicKey):
    __slots__ = ()


class SignaturePrivateKey(BasePrivateKey):
    __slots__ = ()
