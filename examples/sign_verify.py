"""Sign in the proxy, verify on the client: ML-DSA-65, and composite ML-DSA-65 + ECDSA P-256.

The proxy signs with a key its KMS holds; anyone with the public key verifies with an ordinary
library. ML-DSA-65 signatures (FIPS 204, with a context string) verify with `cryptography`'s
ML-DSA API. A composite signature (draft-ietf-lamps-pq-composite-sigs) is rebuilt from its
parts here: both the ML-DSA-65 and the ECDSA P-256 signature must verify over the same
message representative M'.

    make run                                    # in another terminal
    .venv/bin/python examples/sign_verify.py

Needs only the standard library and `cryptography` >= 47. Environment (defaults: the state
`make run` creates in this checkout):

    QPHER_URL         https://localhost:8443
    QPHER_API_KEY     the contents of .qpher/secrets/demo-api-key
    QPHER_CA          .qpher/certs/ca.crt (an empty value: the system's trusted CAs)

Exit status 0 when every signature verified here (and a tampered message did not), 1 on any
mismatch or error.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import ssl
import sys
import urllib.parse
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, mldsa

STATE = Path(__file__).resolve().parent.parent / ".qpher"  # what `make run` creates


def settings() -> tuple[str, str, str]:
    """QPHER_URL, QPHER_API_KEY and QPHER_CA, or the `make run` defaults."""
    url = os.environ.get("QPHER_URL", "https://localhost:8443")
    api_key = os.environ.get("QPHER_API_KEY")
    if api_key is None:
        try:
            api_key = (STATE / "secrets" / "demo-api-key").read_text()
        except FileNotFoundError:
            sys.exit(
                f"no API key: set QPHER_API_KEY, or run `make run` to create {STATE}/secrets/demo-api-key"
            )
    ca = os.environ.get("QPHER_CA", str(STATE / "certs" / "ca.crt"))
    return url, api_key.strip(), ca  # the key file ends with a newline, which no header may hold


class Proxy:
    """The proxy's JSON API over one keep-alive HTTPS connection (standard library only)."""

    def __init__(self, url: str, api_key: str, ca: str) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            sys.exit(f"QPHER_URL must be an https:// URL, got {url!r}")
        context = ssl.create_default_context(cafile=ca or None)
        self._conn = http.client.HTTPSConnection(
            parts.hostname, parts.port or 443, context=context, timeout=30
        )
        self._prefix = parts.path.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """The JSON answer; an error answer ends the script with its code and message."""
        data = None if body is None else json.dumps(body).encode()
        self._conn.request(method, self._prefix + path, body=data, headers=self._headers)
        response = self._conn.getresponse()
        answer = json.loads(response.read() or b"null")
        if response.status >= 300:
            error = answer.get("error", {}) if isinstance(answer, dict) else {}
            sys.exit(f"{method} {path}: HTTP {response.status} {error.get('code')}: {error.get('message')}")
        return answer


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# ---- the example ---------------------------------------------------------------------------

MESSAGE = b"the quick brown fox jumps over the lazy dog"
CONTEXT = b"example/sign-verify"  # FIPS 204 context string, at most 255 bytes; may be omitted

# Composite ML-DSA-65 + ECDSA P-256 (draft-ietf-lamps-pq-composite-sigs-19):
#   public key = ML-DSA-65 key (1952 bytes) || uncompressed P-256 point (65 bytes)
#   signature  = ML-DSA-65 signature (3309 bytes) || DER ECDSA signature
#   M'         = Prefix || Label || len(ctx) || ctx || SHA-512(message)
# ML-DSA signs M' with the Label as its own context; ECDSA signs M' with SHA-256. The
# application's context is bound only inside M'.
COMPOSITE_PREFIX = b"CompositeAlgorithmSignatures2025"
COMPOSITE_LABEL = b"COMPSIG-MLDSA65-ECDSA-P256-SHA512"
MLDSA65_PUBLIC_KEY, MLDSA65_SIGNATURE = 1952, 3309


def verify_ml_dsa_65(public_key: bytes, signature: bytes, message: bytes, context: bytes) -> None:
    """Raises InvalidSignature unless ``signature`` is valid."""
    mldsa.MLDSA65PublicKey.from_public_bytes(public_key).verify(signature, message, context)


def verify_composite(public_key: bytes, signature: bytes, message: bytes, context: bytes) -> None:
    """Raises InvalidSignature unless both component signatures are valid."""
    if len(public_key) != MLDSA65_PUBLIC_KEY + 65 or len(signature) <= MLDSA65_SIGNATURE:
        raise InvalidSignature()
    mldsa_key = mldsa.MLDSA65PublicKey.from_public_bytes(public_key[:MLDSA65_PUBLIC_KEY])
    ecdsa_key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), public_key[MLDSA65_PUBLIC_KEY:])
    m_prime = (COMPOSITE_PREFIX + COMPOSITE_LABEL + bytes([len(context)]) + context
               + hashlib.sha512(message).digest())
    mldsa_key.verify(signature[:MLDSA65_SIGNATURE], m_prime, COMPOSITE_LABEL)
    ecdsa_key.verify(signature[MLDSA65_SIGNATURE:], m_prime, ec.ECDSA(hashes.SHA256()))


VERIFIERS = {"ml-dsa-65": verify_ml_dsa_65, "ml-dsa-65-ecdsa-p256": verify_composite}


def main() -> None:
    url, api_key, ca = settings()
    proxy = Proxy(url, api_key, ca)
    print(f"proxy at {url}")
    for algorithm, verify in VERIFIERS.items():
        key = proxy.call("POST", "/v1/keys", {"algorithm": algorithm, "label": "example-sign"})
        public_key = base64.b64decode(key["public_key"])
        signed = proxy.call("POST", "/v1/sign", {"key_id": key["key_id"], "message": b64(MESSAGE),
                                                 "context": b64(CONTEXT)})
        signature = base64.b64decode(signed["signature"])
        print(f"{algorithm}: new key {key['key_id']} ({len(public_key)}-byte public key); "
              f"the proxy signed {len(MESSAGE)} bytes: a {len(signature)}-byte signature")
        try:
            verify(public_key, signature, MESSAGE, CONTEXT)
        except (InvalidSignature, ValueError):
            sys.exit(f"MISMATCH: {algorithm}: the proxy's signature does not verify here")
        try:
            verify(public_key, signature, MESSAGE + b"!", CONTEXT)
        except (InvalidSignature, ValueError):
            print(f"{algorithm}: verified here; a tampered message is rejected")
        else:
            sys.exit(f"MISMATCH: {algorithm}: a signature verified for a message that was not signed")
    print("ok: every signature made by the proxy verified here")


if __name__ == "__main__":
    try:
        main()
    except (OSError, http.client.HTTPException) as exc:  # ssl.SSLError is an OSError
        sys.exit(f"cannot talk to the proxy: {exc}")
