"""One error family for the whole product.

Every error that may reach a client carries a stable ``code`` (for machines), an HTTP
``status`` and a ``message`` that is safe to show: no secret, no key material, no
library internals. Foreign exceptions (OpenSSL, trio, OS, cryptography) are mapped to
these at one boundary per layer, ``raise ... from exc``.
"""

from __future__ import annotations


class QpherError(Exception):
    """Base error: ``code`` is stable API, ``message`` is safe to show to a client."""

    code: str = "internal_error"
    status: int = 500

    def __init__(self, message: str = "", *, code: str | None = None, status: int | None = None) -> None:
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.message = message or self.code.replace("_", " ")
        super().__init__(self.message)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, status={self.status}, message={self.message!r})"


class BadRequest(QpherError):
    code = "bad_request"
    status = 400


class InvalidInput(QpherError):
    """A well-formed request whose values are wrong (bad base64, wrong length, ...)."""

    code = "invalid_input"
    status = 400


class NotFound(QpherError):
    code = "not_found"
    status = 404


class ConfigError(QpherError):
    """A configuration mistake: start-up stops with this one line (no traceback)."""

    code = "config_error"
    status = 500


# ---- crypto ------------------------------------------------------------------------

class CryptoError(QpherError):
    """Base for errors raised by the crypto suite. Messages never carry key bytes."""

    code = "crypto_error"
    status = 400


class UnknownAlgorithm(CryptoError):
    code = "unknown_algorithm"
    status = 400


class InvalidKey(CryptoError):
    """A public or private key that is malformed, of the wrong length or fails its checks."""

    code = "invalid_key"
    status = 400


class InvalidCiphertext(CryptoError):
    code = "invalid_ciphertext"
    status = 400


class InvalidContext(CryptoError):
    code = "invalid_context"
    status = 400


class AlgorithmMismatch(CryptoError):
    """An operation asked of a key whose algorithm does not offer it (sign with a KEM key, ...)."""

    code = "algorithm_mismatch"
    status = 400


class DecryptionFailed(CryptoError):
    """An authenticated decryption failed. Deliberately carries no detail."""

    code = "decryption_failed"
    status = 400


class BackendUnavailable(CryptoError):
    code = "backend_unavailable"
    status = 500
