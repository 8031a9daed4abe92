"""Encrypt on the client with HPKE, decrypt in the proxy: ML-KEM-768 and X-Wing keys.

A client that holds only a key's public key seals a message with standard HPKE (RFC 9180 base
mode, single shot): the key's KEM (ML-KEM-768 0x0041, X-Wing 0x647a), HKDF-SHA256,
AES-256-GCM and the proxy's fixed info string "qpher/v1/encrypt". The proxy opens it with
POST /v1/decrypt; the private key never leaves its KMS.

    make run                                    # in another terminal
    .venv/bin/python examples/hpke_encrypt.py

Needs only the standard library and `cryptography` >= 47. Environment (defaults: the state
`make run` creates in this checkout):

    QPHER_URL         https://localhost:8443
    QPHER_API_KEY     the contents of .qpher/secrets/demo-api-key
    QPHER_CA          .qpher/certs/ca.crt (an empty value: the system's trusted CAs)
    QPHER_HPKE_INFO   the info string to seal with, "qpher/v1/encrypt"; any other value makes
                      the proxy refuse the ciphertext, which this script reports

Exit status 0 when the proxy returned every plaintext unchanged, 1 on any mismatch or error.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import ssl
import sys
import urllib.parse
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hpke
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

MESSAGE = b"attack at dawn"
INFO = os.environ.get("QPHER_HPKE_INFO", "qpher/v1/encrypt").encode()
KDF, AEAD = hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM  # HPKE ids 0x0001 and 0x0002
MLKEM768_PUBLIC_KEY = 1184  # bytes (FIPS 203)


def hpke_public_key(algorithm: str, public_key: bytes) -> tuple[hpke.KEM, Any]:
    """The HPKE KEM and the `cryptography` public key for a proxy key's raw public key."""
    if algorithm == "ml-kem-768":
        return hpke.KEM.MLKEM768, mlkem.MLKEM768PublicKey.from_public_bytes(public_key)
    # X-Wing (draft-connolly-cfrg-xwing-kem) is HPKE's MLKEM768-X25519: its public key is the
    # ML-KEM-768 key (1184 bytes) followed by the X25519 key (32 bytes).
    return hpke.KEM.MLKEM768_X25519, hpke.MLKEM768X25519PublicKey(
        mlkem.MLKEM768PublicKey.from_public_bytes(public_key[:MLKEM768_PUBLIC_KEY]),
        x25519.X25519PublicKey.from_public_bytes(public_key[MLKEM768_PUBLIC_KEY:]),
    )


def main() -> None:
    url, api_key, ca = settings()
    proxy = Proxy(url, api_key, ca)
    suite = proxy.call("GET", "/v1/info")["hpke"]
    print(
        f"proxy at {url}: HPKE {suite['mode']} mode, KDF {suite['kdf_id']:#06x}, "
        f"AEAD {suite['aead_id']:#06x}, "
        f"info {base64.b64decode(suite['info'])!r}"
    )
    if (suite["kdf_id"], suite["aead_id"]) != (0x0001, 0x0002):
        sys.exit("MISMATCH: the proxy's HPKE suite is not HKDF-SHA256 with AES-256-GCM")
    for algorithm in ("ml-kem-768", "x-wing"):
        key = proxy.call("POST", "/v1/keys", {"algorithm": algorithm, "label": "example-hpke"})
        kem, public_key = hpke_public_key(algorithm, base64.b64decode(key["public_key"]))
        sealed = hpke.Suite(kem, KDF, AEAD).encrypt(MESSAGE, public_key, info=INFO)
        print(f"{algorithm}: new key {key['key_id']}; sealed {len(MESSAGE)} bytes locally with info {INFO!r} "
              f"into {len(sealed)} bytes (enc || ct)")
        opened = proxy.call("POST", "/v1/decrypt", {"key_id": key["key_id"], "ciphertext": b64(sealed)})
        plaintext = base64.b64decode(opened["plaintext"])
        if plaintext != MESSAGE:
            sys.exit(f"MISMATCH: {algorithm}: the proxy decrypted {plaintext!r}, expected {MESSAGE!r}")
        print(f"{algorithm}: the proxy decrypted it: {plaintext!r}")
    print("ok: every ciphertext sealed here opened in the proxy")


if __name__ == "__main__":
    try:
        main()
    except (OSError, http.client.HTTPException) as exc:  # ssl.SSLError is an OSError
        sys.exit(f"cannot talk to the proxy: {exc}")
