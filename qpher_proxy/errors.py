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


# ---- HTTP edge -----------------------------------------------------------------------

class HeaderTooLarge(QpherError):
    """The request line and header block exceed ``http.max_header_bytes``."""

    code = "header_too_large"
    status = 431


class BodyTooLarge(QpherError):
    """The request body (declared or received so far) exceeds the allowed size."""

    code = "body_too_large"
    status = 413


class MethodNotAllowed(QpherError):
    code = "method_not_allowed"
    status = 405


class NotImplementedByServer(QpherError):
    """A protocol feature we do not implement (e.g. a Transfer-Encoding other than chunked)."""

    code = "not_implemented"
    status = 501


class ClientDisconnected(QpherError):
    """The client went away (or its transport failed) while we were reading or writing.

    Nothing can be sent back any more; the status is nginx's 499 for the access log."""

    code = "client_disconnected"
    status = 499


# ---- upstream (sidecar forwarding) ------------------------------------------------------

class UpstreamError(QpherError):
    """Base for failures talking to the sidecar's upstream app. Messages never name its address."""

    code = "upstream_error"
    status = 502


class UpstreamUnavailable(UpstreamError):
    """Connect refused / DNS failure / TLS handshake failure / connection reset before a response."""

    code = "upstream_unavailable"
    status = 502


class UpstreamTimeout(UpstreamError):
    """Connecting, sending to or waiting for the upstream took longer than its timeout."""

    code = "upstream_timeout"
    status = 504


class UpstreamBadResponse(UpstreamError):
    """The upstream broke HTTP/1.1 (malformed head, truncated body, unexpected 101, ...)."""

    code = "upstream_bad_response"
    status = 502


# ---- access control: authentication, rate limits, quotas, audit, gateway storage -----------
# Errors that need a response header carry it in ``headers`` ((name, value) byte pairs) for the
# HTTP edge to add: ``WWW-Authenticate`` on 401, ``Retry-After`` on 429.

class Unauthenticated(QpherError):
    """Missing, malformed, unknown, wrong, expired or revoked API key: one error for all.

    The message is fixed whatever the cause, so a client cannot tell an unknown key id from a
    wrong secret or a revoked key. ``reason`` (for the audit log, never shown to the client and
    not in ``repr``) is one of: missing, malformed, ambiguous, unknown_key, bad_secret, expired,
    revoked. ``key_id`` is the public id part when one could be parsed (safe to log)."""

    code = "unauthenticated"
    status = 401
    MESSAGE = "missing or invalid API key"
    headers: tuple[tuple[bytes, bytes], ...] = ((b"www-authenticate", b'Bearer realm="qpher"'),)

    def __init__(self, reason: str = "unspecified", *, key_id: str | None = None) -> None:
        super().__init__(self.MESSAGE)
        self.reason = reason
        self.key_id = key_id


class APIKeyInURL(BadRequest):
    """An API key (or a parameter named like one) in the URL query string: refused, since URLs
    end up in logs, browser histories and Referer headers."""

    code = "api_key_in_url"
    status = 400


class _RetryAfter(QpherError):
    def __init__(self, message: str = "", *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = max(1, int(retry_after))
        self.headers: tuple[tuple[bytes, bytes], ...] = (
            (b"retry-after", str(self.retry_after).encode("ascii")),
        )


class RateLimited(_RetryAfter):
    """A token bucket (per API key or per tenant) is empty; ``retry_after`` is in seconds, >= 1."""

    code = "rate_limited"
    status = 429


class QuotaExceeded(_RetryAfter):
    """The tenant's monthly quota for an operation class is used up; ``retry_after`` is the
    number of seconds until the next calendar month (UTC) starts."""

    code = "quota_exceeded"
    status = 429


class QuotaUnavailable(QpherError):
    """Quota counts cannot be written to the gateway database: refuse rather than not count."""

    code = "quota_unavailable"
    status = 503


class StorageUnavailable(QpherError):
    """The gateway-side SQLite database failed (locked too long, disk full, corrupt, ...)."""

    code = "storage_unavailable"
    status = 503


class AuditUnavailable(QpherError):
    """The audit record could not be written: the request that needed it must be refused."""

    code = "audit_unavailable"
    status = 503


class InvalidProofRequest(BadRequest):
    """A Merkle proof asked for with missing or malformed parameters, or sizes beyond the tree."""

    code = "invalid_proof_request"
    status = 400


class CheckpointNotFound(QpherError):
    """No signed checkpoint of the audit log exists yet."""

    code = "checkpoint_not_found"
    status = 404


class CheckpointInconsistent(QpherError):
    """The KMS refused to sign an audit checkpoint that does not extend the history it signed
    before for the log's origin (a log cut short, rewritten or forked)."""

    code = "checkpoint_inconsistent"
    status = 409


class AuditFieldRefused(QpherError):
    """A caller tried to audit a field named like a secret, a value that looks like an API key,
    or a value that is not plain JSON data. A programming error: nothing was written."""

    code = "audit_field_refused"
    status = 500


# ---- crypto API (/v1 request validation) -----------------------------------------------

class InvalidJSON(BadRequest):
    """The body is not one UTF-8 JSON document (or has duplicate keys, NaN, too deep nesting)."""

    code = "invalid_json"
    status = 400


class InvalidBase64(InvalidInput):
    """A bytes field that is not canonical standard base64 (RFC 4648 §4, padded)."""

    code = "invalid_base64"
    status = 400


class BatchTooLarge(InvalidInput):
    """A batch request with more items than ``api.max_batch_items``."""

    code = "batch_too_large"
    status = 400



# ---- KMS and key lifecycle (raised in the KMS, carried over the socketpair by code) ------

class KMSUnavailable(QpherError):
    """No KMS worker could answer: none is running, or the one holding the request died."""

    code = "kms_unavailable"
    status = 503


class KeyNotFound(QpherError):
    """No such key for this tenant. Another tenant's key id answers exactly like this."""

    code = "key_not_found"
    status = 404


class KeyDisabled(QpherError):
    """The key exists but is disabled or scheduled for destruction: no crypto operation."""

    code = "key_disabled"
    status = 409


class KeyDestroyed(QpherError):
    """The key was destroyed; only its tombstone (metadata) remains."""

    code = "key_destroyed"
    status = 410


class InvalidKeyState(QpherError):
    """A lifecycle transition the key's state does not allow (enable a destroyed key, ...)."""

    code = "invalid_key_state"
    status = 409


class KeyUnavailable(QpherError):
    """The key file of one key version cannot be read (missing, or wrapped by another KEK)."""

    code = "key_unavailable"
    status = 503


class KeyCorrupt(QpherError):
    """The key file of one key version fails authentication (altered, or moved from another slot)."""

    code = "key_corrupt"
    status = 500


# ---- idempotency keys (``Idempotency-Key`` on key creation and rotation) -------------------

class InvalidIdempotencyKey(BadRequest):
    """An ``Idempotency-Key`` that is not 1..255 visible ASCII characters (or is repeated)."""

    code = "invalid_idempotency_key"
    status = 400


class IdempotencyKeyReused(QpherError):
    """The idempotency key already answered another request (other arguments, or another
    operation) of this tenant within its lifetime."""

    code = "idempotency_key_reused"
    status = 409


class IdempotencyKeyInProgress(_RetryAfter):
    """A request with this idempotency key is still being performed elsewhere (another KMS
    worker or node has not committed yet): retry after ``retry_after`` seconds to get its answer."""

    code = "idempotency_key_in_progress"
    status = 409

    def __init__(self, message: str = "", *, retry_after: int = 1) -> None:
        super().__init__(message, retry_after=retry_after)


# ---- TLS termination ----------------------------------------------------------------------
# Raised by qpher_proxy.tls. ``reason`` is a short fixed failure class (a metrics label and a
# log field); the message names what went wrong in words, never key material. TLSStream raises
# subclasses that are also ``trio.BrokenResourceError`` so that stream users need one except.

class TLSError(QpherError):
    """A TLS connection failed (handshake or record layer)."""

    code = "tls_error"
    status = 400
    reason: str = "protocol_error"

    def __init__(self, message: str = "", *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class TLSHandshakeFailed(TLSError):
    """The handshake did not complete: no common version/group/cipher, bad or missing client
    certificate, peer went away, garbage on the wire, ..."""

    code = "tls_handshake_failed"
    reason = "handshake_failed"


class TLSHandshakeTimeout(TLSHandshakeFailed):
    code = "tls_handshake_timeout"
    reason = "timeout"


class TLSPlaintextOnTLSPort(TLSHandshakeFailed):
    """Plain HTTP (or another cleartext protocol) was sent to the TLS port."""

    code = "tls_plaintext_request"
    reason = "plaintext_http"


class TLSNotPostQuantum(TLSHandshakeFailed):
    """``tls.require_pq`` is set and the peer could not (or did not) agree a hybrid PQ group."""

    code = "tls_pq_required"
    reason = "pq_required"


# ---- policy ------------------------------------------------------------------------------
# Raised by qpher_proxy.policy. A denial names the deciding rule and its admin-written reason;
# "unavailable" is the fail-closed answer when no policy can decide (never an allow).

class PolicyDenied(QpherError):
    """A policy rule (or the default) denied the request. ``rule_id`` is None for the default deny."""

    code = "policy_denied"
    status = 403

    def __init__(self, rule_id: str | None, reason: str) -> None:
        self.rule_id = rule_id
        self.reason = reason
        if rule_id is None:
            super().__init__(f"denied by default: {reason}")
        else:
            super().__init__(f"denied by rule {rule_id}: {reason}")


class PolicyUnavailable(QpherError):
    """No valid policy is loaded, or evaluation failed or overran its time budget: fail closed."""

    code = "policy_unavailable"
    status = 503


class PolicyInvalid(QpherError):
    """A policy directory failed validation. ``issues`` holds every problem, each with
    ``file:line``, the offending key and what was expected (a list of ``PolicyIssue``)."""

    code = "policy_invalid"
    status = 500

    def __init__(self, issues: tuple[object, ...]) -> None:
        self.issues = issues
        first = str(issues[0]) if issues else "invalid policy"
        more = f" (and {len(issues) - 1} more)" if len(issues) > 1 else ""
        super().__init__(first + more)


# ---- key import (BYOK): import jobs and wrapped key material ----

class ImportJobNotFound(QpherError):
    """No such import job for this tenant. Another tenant's job id answers exactly like this."""

    code = "import_job_not_found"
    status = 404


class ImportJobExpired(QpherError):
    """The import job's time is over: its private key is (or is about to be) destroyed."""

    code = "import_job_expired"
    status = 400


class InvalidWrappedKey(QpherError):
    """The wrapped key does not open under the job's key (tampered, another job's key, wrong info)."""

    code = "invalid_wrapped_key"
    status = 400


class InvalidKeyMaterial(QpherError):
    """The unwrapped key material is not a valid private key of the stated algorithm and format."""

    code = "invalid_key_material"
    status = 400
