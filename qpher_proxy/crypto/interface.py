"""The small interface every crypto backend implements.

A backend turns standard encodings into key objects and back. Key objects are cheap
handles around the library's own objects, so that the KMS can load a key once and use it
many times; the wrapper must cost little over the raw library call.

Private key objects exist only inside the KMS process. The gateway only ever touches
:class:`PublicKey` (verify, encapsulate, HPKE seal to a public key).

All methods raise only :class:`qpher_proxy.errors.CryptoError` subclasses for bad input;
``verify`` returns ``False`` for a bad signature and never explains why.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from .algorithms import Algorithm


@runtime_checkable
class PublicKey(Protocol):
    algorithm: Algorithm

    def public_bytes(self) -> bytes:
        """The standard raw encoding (FIPS 203/204 ek/pk, X-Wing 1216 B, composite 2017 B)."""

    # signatures
    def verify(self, signature: bytes, message: bytes, context: bytes = b"") -> bool: ...

    # KEMs
    def encapsulate(self) -> tuple[bytes, bytes]:
        """Returns ``(shared_secret, ciphertext)``."""

    def hpke_seal(self, plaintext: bytes, *, aad: bytes = b"", info: bytes = b"") -> bytes:
        """RFC 9180 base mode, HKDF-SHA256, AES-256-GCM; returns ``enc || ct``."""


@runtime_checkable
class PrivateKey(Protocol):
    algorithm: Algorithm

    def public_key(self) -> PublicKey: ...

    def private_bytes(self) -> bytes:
        """The standard seed form, for the KMS key-file writer only."""

    # signatures
    def sign(self, message: bytes, context: bytes = b"") -> bytes: ...

    # KEMs
    def decapsulate(self, ciphertext: bytes) -> bytes: ...

    def hpke_open(self, sealed: bytes, *, aad: bytes = b"", info: bytes = b"") -> bytes: ...


class Backend(Protocol):
    name: str  # "openssl" | "liboqs"

    def supports(self, algorithm: Algorithm) -> bool: ...

    def generate(self, algorithm: Algorithm) -> PrivateKey: ...

    def load_private(self, algorithm: Algorithm, data: bytes) -> PrivateKey:
        """From the standard seed form (see ``Algorithm.private_key_format``)."""

    def load_public(self, algorithm: Algorithm, data: bytes) -> PublicKey:
        """From the standard raw encoding; runs the standard's checks (ML-KEM modulus check)."""

    def versions(self) -> dict[str, str]:
        """Exact library versions for reporting (``/v1/info``, ``qpher-proxy version``)."""
