"""Encapsulate on the client, decapsulate in the proxy: ML-KEM-768 and X-Wing.

A client that holds only a key's public key makes a fresh shared secret and a ciphertext for
it; the proxy recovers the same secret from the ciphertext with POST /v1/kem/decapsulate (for
example to unwrap a data key), while the private key never leaves its KMS. ML-KEM-768 is
`cryptography`'s FIPS 203 implementation; X-Wing (draft-connolly-cfrg-xwing-kem) is put
together here from ML-KEM-768, X25519 and SHA3-256.

    make run                                    # in another terminal
    .venv/bin/python examples/kem_encapsulate.py

Needs only the standard library and `cryptography` >= 47. Environment (defaults: the state
`make run` creates in this checkout):

    QPHER_URL         https://localhost:8443
    QPHER_API_KEY     the contents of .qpher/secrets/demo-api-key
    QPHER_CA          .qpher/certs/ca.crt (an empty value: the system's trusted CAs)

Exit status 0 when the proxy derived every shared secret made here, 1 on any mismatch or error.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import os
import ssl
import sys
import urllib.parse
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

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

MLKEM768_PUBLIC_KEY = 1184  # bytes (FIPS 203)
XWING_LABEL = b"\\.//^\\"  # the 6 ASCII bytes \.//^\ that end X-Wing's combiner input


def encapsulate_ml_kem_768(public_key: bytes) -> tuple[bytes, bytes]:
    """(shared secret, ciphertext); note the order: `cryptography` returns the secret first."""
    return mlkem.MLKEM768PublicKey.from_public_bytes(public_key).encapsulate()


def encapsulate_x_wing(public_key: bytes) -> tuple[bytes, bytes]:
    """X-Wing Encapsulate: (shared secret, ciphertext).

    public key = pk_M (ML-KEM-768, 1184 bytes) || pk_X (X25519, 32 bytes)
    ciphertext = ct_M (1088 bytes) || ct_X (the ephemeral X25519 public key, 32 bytes)
    secret     = SHA3-256(ss_M || ss_X || ct_X || pk_X || label): the label goes last and
                 ct_M is not hashed.
    """
    pk_m, pk_x = public_key[:MLKEM768_PUBLIC_KEY], public_key[MLKEM768_PUBLIC_KEY:]
    ss_m, ct_m = mlkem.MLKEM768PublicKey.from_public_bytes(pk_m).encapsulate()
    ephemeral = x25519.X25519PrivateKey.generate()
    ct_x = ephemeral.public_key().public_bytes_raw()
    ss_x = ephemeral.exchange(x25519.X25519PublicKey.from_public_bytes(pk_x))
    return hashlib.sha3_256(ss_m + ss_x + ct_x + pk_x + XWING_LABEL).digest(), ct_m + ct_x


ENCAPSULATE = {"ml-kem-768": encapsulate_ml_kem_768, "x-wing": encapsulate_x_wing}


def main() -> None:
    url, api_key, ca = settings()
    proxy = Proxy(url, api_key, ca)
    print(f"proxy at {url}")
    for algorithm, encapsulate in ENCAPSULATE.items():
        key = proxy.call("POST", "/v1/keys", {"algorithm": algorithm, "label": "example-kem"})
        shared_secret, ciphertext = encapsulate(base64.b64decode(key["public_key"]))
        print(f"{algorithm}: new key {key['key_id']}; encapsulated here: a {len(shared_secret)}-byte secret "
              f"and a {len(ciphertext)}-byte ciphertext")
        answer = proxy.call(
            "POST", "/v1/kem/decapsulate", {"key_id": key["key_id"], "ciphertext": b64(ciphertext)}
        )
        if not hmac.compare_digest(base64.b64decode(answer["shared_secret"]), shared_secret):
            sys.exit(f"MISMATCH: {algorithm}: the proxy decapsulated another shared secret")
        print(f"{algorithm}: the proxy decapsulated the same secret")  # never print the secret itself
    print("ok: every secret encapsulated here was recovered by the proxy")


if __name__ == "__main__":
    try:
        main()
    except (OSError, http.client.HTTPException) as exc:  # ssl.SSLError is an OSError
        sys.exit(f"cannot talk to the proxy: {exc}")
