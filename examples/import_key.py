"""Bring your own key: wrap a local private key for an import job, import it, and prove it.

The proxy makes an import job: a KEM key pair whose private key stays in its KMS. The client
wraps its private key for the job's public key with standard HPKE (RFC 9180 base mode, single
shot) using `cryptography`'s `hpke.Suite` -- a library the proxy did not write:

    KEM   the job's: hpke-x-wing 0x647a (MLKEM768-X25519), hpke-ml-kem-768 0x0041,
          hpke-ml-kem-1024 0x0042
    KDF   HKDF-SHA256 (0x0001)      AEAD  AES-256-GCM (0x0002)      aad  none
    info  b"qpher/v1/import:" + job id + b":" + algorithm          (ASCII)
    wrapped_key = enc || ct

The plaintext is the private key in its standard seed form (ML-KEM d || z, 64 bytes; ML-DSA xi,
32 bytes; X-Wing, the 32-byte seed; composite ML-DSA-65 + ECDSA P-256, xi || the RFC 5915
ECPrivateKey) or, with --format pkcs8, the seed-form PKCS#8 `cryptography` writes (ML-KEM and
ML-DSA). Once imported, the proxy's answers prove it holds this very key: its public key equals
the local one, ML-DSA and composite signatures made by the proxy verify here, a shared secret
encapsulated by the proxy (ML-KEM) decapsulates here, and a message the proxy seals to the key
(X-Wing, /v1/encrypt) opens here.

    make run                                    # in another terminal
    .venv/bin/python examples/import_key.py     # generate and import one key of each kind
    .venv/bin/python examples/import_key.py --algorithm ml-dsa-65 --key seed.bin
    .venv/bin/python examples/import_key.py --algorithm ml-kem-768 --key key.p8 --format pkcs8 \\
        --job ij_...                            # an existing job (any method)

With no --key, each key is generated here (`cryptography`, os.urandom). Needs only the standard
library and `cryptography` >= 47, and an API key whose plan allows key import (pro, enterprise).
Environment (defaults: the state `make run` creates in this checkout):

    QPHER_URL         https://localhost:8443
    QPHER_API_KEY     the contents of .qpher/secrets/demo-api-key
    QPHER_CA          .qpher/certs/ca.crt (an empty value: the system's trusted CAs)

Exit status 0 when every imported key proved to be the local one, 1 on any mismatch or error.
"""

from __future__ import annotations

import argparse
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

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, hpke, serialization
from cryptography.hazmat.primitives.asymmetric import ec, mldsa, mlkem, x25519

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


# ---- wrapping: cryptography's HPKE with the job's KEM ----------------------------------------

KDF, AEAD = hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM  # HPKE ids 0x0001 and 0x0002
MLKEM768_PUBLIC_KEY = 1184  # bytes (FIPS 203)


def job_public_key(method: str, public_key: bytes) -> tuple[hpke.KEM, Any]:
    """The HPKE KEM and the `cryptography` public key of an import job."""
    if method == "hpke-ml-kem-768":
        return hpke.KEM.MLKEM768, mlkem.MLKEM768PublicKey.from_public_bytes(public_key)
    if method == "hpke-ml-kem-1024":
        return hpke.KEM.MLKEM1024, mlkem.MLKEM1024PublicKey.from_public_bytes(public_key)
    if method == "hpke-x-wing":
        # X-Wing (draft-connolly-cfrg-xwing-kem) is HPKE's MLKEM768-X25519: its public key is the
        # ML-KEM-768 key (1184 bytes) followed by the X25519 key (32 bytes).
        return hpke.KEM.MLKEM768_X25519, hpke.MLKEM768X25519PublicKey(
            mlkem.MLKEM768PublicKey.from_public_bytes(public_key[:MLKEM768_PUBLIC_KEY]),
            x25519.X25519PublicKey.from_public_bytes(public_key[MLKEM768_PUBLIC_KEY:]),
        )
    sys.exit(f"import job method {method!r} is not one this example knows")


def wrap(job: dict[str, Any], algorithm: str, material: bytes) -> bytes:
    """``material`` wrapped for the job: single-shot HPKE base mode, no aad, enc || ct."""
    kem, public_key = job_public_key(job["method"], base64.b64decode(job["public_key"]))
    info = b"qpher/v1/import:" + job["import_job_id"].encode("ascii") + b":" + algorithm.encode("ascii")
    return hpke.Suite(kem, KDF, AEAD).encrypt(material, public_key, info=info)


# ---- local keys: seed forms, public keys ---------------------------------------------------

MLDSA = {"ml-dsa-44": mldsa.MLDSA44PrivateKey, "ml-dsa-65": mldsa.MLDSA65PrivateKey,
         "ml-dsa-87": mldsa.MLDSA87PrivateKey}
MLKEM = {"ml-kem-768": mlkem.MLKEM768PrivateKey, "ml-kem-1024": mlkem.MLKEM1024PrivateKey}
SEED_SIZES = {**dict.fromkeys(MLDSA, 32), **dict.fromkeys(MLKEM, 64), "x-wing": 32,
              "ml-dsa-65-ecdsa-p256": 83}
RAW = (serialization.Encoding.Raw, serialization.PublicFormat.Raw)
# RFC 5915 ECPrivateKey with the curve and without the public key: version 1, the 32-byte scalar,
# [0] secp256r1 -- the composite draft's private key form for the ECDSA P-256 component
EC_KEY_HEAD, EC_KEY_TAIL = bytes.fromhex("30310201010420"), bytes.fromhex("a00a06082a8648ce3d030107")


def xwing_keys(seed: bytes) -> tuple[mlkem.MLKEM768PrivateKey, x25519.X25519PrivateKey]:
    """X-Wing's expandDecapsulationKey: SHAKE-256(seed, 96) = ML-KEM-768 d || z, X25519 key."""
    expanded = hashlib.shake_256(seed).digest(96)
    return (mlkem.MLKEM768PrivateKey.from_seed_bytes(expanded[:64]),
            x25519.X25519PrivateKey.from_private_bytes(expanded[64:]))


def composite_keys(seed: bytes) -> tuple[mldsa.MLDSA65PrivateKey, ec.EllipticCurvePrivateKey]:
    if len(seed) != 83 or not (seed[32:39] == EC_KEY_HEAD and seed[71:] == EC_KEY_TAIL):
        sys.exit("a composite seed is ML-DSA-65 xi (32 bytes) || the 51-byte RFC 5915 ECPrivateKey")
    scalar = int.from_bytes(seed[39:71], "big")
    return mldsa.MLDSA65PrivateKey.from_seed_bytes(seed[:32]), ec.derive_private_key(scalar, ec.SECP256R1())


def generate(algorithm: str) -> bytes:
    """A new private key's seed form, from the OS's CSPRNG."""
    if algorithm == "ml-dsa-65-ecdsa-p256":
        scalar = ec.generate_private_key(ec.SECP256R1()).private_numbers().private_value
        return os.urandom(32) + EC_KEY_HEAD + scalar.to_bytes(32, "big") + EC_KEY_TAIL
    return os.urandom(SEED_SIZES[algorithm])


def seed_of(algorithm: str, data: bytes, format: str) -> bytes:
    """The seed form of a key given as a seed or as a PKCS#8 (DER, or PEM)."""
    if format == "seed":
        if len(data) != SEED_SIZES[algorithm]:
            sys.exit(f"a {algorithm} seed is {SEED_SIZES[algorithm]} bytes, not {len(data)}")
        return data
    if algorithm not in {**MLDSA, **MLKEM}:
        sys.exit(f"this example reads PKCS#8 for ML-KEM and ML-DSA only, not {algorithm}")
    if data.startswith(b"-----"):
        key = serialization.load_pem_private_key(data, None)
    else:
        key = serialization.load_der_private_key(data, None)
    if not isinstance(key, (MLDSA | MLKEM)[algorithm]):
        sys.exit(f"the PKCS#8 key is not an {algorithm} key")
    # cryptography writes the seed-only PKCS#8 of the IETF drafts; its last bytes are the seed
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())[-SEED_SIZES[algorithm]:]


def pkcs8(algorithm: str, seed: bytes) -> bytes:
    """The seed-form PKCS#8 (DER) that `cryptography` writes for an ML-KEM or ML-DSA key."""
    key = (MLDSA | MLKEM)[algorithm].from_seed_bytes(seed)
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def public_key(algorithm: str, seed: bytes) -> bytes:
    """The standard raw public key of a seed, computed here."""
    if algorithm in MLDSA or algorithm in MLKEM:
        return (MLDSA | MLKEM)[algorithm].from_seed_bytes(seed).public_key().public_bytes(*RAW)
    if algorithm == "x-wing":
        kem_key, dh_key = xwing_keys(seed)
        return kem_key.public_key().public_bytes(*RAW) + dh_key.public_key().public_bytes(*RAW)
    ml_key, ec_key = composite_keys(seed)
    point = ec_key.public_key().public_bytes(serialization.Encoding.X962,
                                             serialization.PublicFormat.UncompressedPoint)
    return ml_key.public_key().public_bytes(*RAW) + point


# ---- proofs: the proxy holds the key we hold ------------------------------------------------

MESSAGE = b"imported, and still mine"
CONTEXT = b"example/import-key"
HPKE_INFO = b"qpher/v1/encrypt"  # the proxy's fixed /v1/encrypt info
COMPOSITE_PREFIX = b"CompositeAlgorithmSignatures2025"
COMPOSITE_LABEL = b"COMPSIG-MLDSA65-ECDSA-P256-SHA512"
MLDSA65_SIGNATURE = 3309


def prove(proxy: Proxy, algorithm: str, seed: bytes, key_id: str) -> str:
    """One operation in the proxy with the imported key, checked here with the local key."""
    if algorithm in MLDSA or algorithm == "ml-dsa-65-ecdsa-p256":
        signed = proxy.call("POST", "/v1/sign", {"key_id": key_id, "message": b64(MESSAGE),
                                                 "context": b64(CONTEXT)})
        signature = base64.b64decode(signed["signature"])
        try:
            if algorithm in MLDSA:
                MLDSA[algorithm].from_seed_bytes(seed).public_key().verify(signature, MESSAGE, CONTEXT)
            else:  # draft-ietf-lamps-pq-composite-sigs: both parts sign M'
                ml_key, ec_key = composite_keys(seed)
                m_prime = (COMPOSITE_PREFIX + COMPOSITE_LABEL + bytes([len(CONTEXT)]) + CONTEXT
                           + hashlib.sha512(MESSAGE).digest())
                ml_key.public_key().verify(signature[:MLDSA65_SIGNATURE], m_prime, COMPOSITE_LABEL)
                ec_key.public_key().verify(signature[MLDSA65_SIGNATURE:], m_prime, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            sys.exit(f"MISMATCH: {algorithm}: the proxy's signature does not verify with the local key")
        return "the proxy's signature verifies with the local public key"
    if algorithm in MLKEM:
        out = proxy.call("POST", "/v1/kem/encapsulate", {"key_id": key_id})
        shared = MLKEM[algorithm].from_seed_bytes(seed).decapsulate(base64.b64decode(out["ciphertext"]))
        if shared != base64.b64decode(out["shared_secret"]):
            sys.exit(f"MISMATCH: {algorithm}: the local key decapsulates another shared secret")
        return "the proxy's encapsulation decapsulates with the local private key"
    sealed = proxy.call("POST", "/v1/encrypt", {"key_id": key_id, "plaintext": b64(MESSAGE)})
    kem_key, dh_key = xwing_keys(seed)
    try:
        opened = hpke.Suite(hpke.KEM.MLKEM768_X25519, KDF, AEAD).decrypt(
            base64.b64decode(sealed["ciphertext"]), hpke.MLKEM768X25519PrivateKey(kem_key, dh_key),
            info=HPKE_INFO)
    except (InvalidTag, ValueError):
        opened = b""
    if opened != MESSAGE:
        sys.exit(f"MISMATCH: {algorithm}: what the proxy sealed does not open with the local key")
    return "what the proxy sealed to it opens with the local private key"


def import_one(proxy: Proxy, job: dict[str, Any], algorithm: str, seed: bytes, format: str,
               label: str) -> None:
    material = seed if format == "seed" else pkcs8(algorithm, seed)
    wrapped = wrap(job, algorithm, material)
    key = proxy.call("POST", "/v1/keys/import", {
        "import_job_id": job["import_job_id"], "algorithm": algorithm, "wrapped_key": b64(wrapped),
        "format": format, "label": label})
    print(f"{algorithm}: wrapped {len(material)} bytes ({format}) into {len(wrapped)} bytes; "
          f"imported as {key['key_id']} (origin {key['origin']})")
    if base64.b64decode(key["public_key"]) != public_key(algorithm, seed):
        sys.exit(f"MISMATCH: {algorithm}: the proxy's public key is not the local key's")
    proof = prove(proxy, algorithm, seed, key["key_id"])
    print(f"{algorithm}: the proxy's public key is the local one; {proof}")


DEFAULT_RUN = [("ml-dsa-65", "seed"), ("ml-kem-768", "pkcs8"), ("x-wing", "seed"),
               ("ml-dsa-65-ecdsa-p256", "seed")]


def main() -> None:
    parser = argparse.ArgumentParser(description="Import a local private key into qpher-proxy (BYOK).")
    parser.add_argument("--algorithm", choices=sorted(SEED_SIZES),
                        help="the key's algorithm (without it: one key of each kind, generated here)")
    parser.add_argument("--key", type=Path,
                        help="the private key file: a raw seed, or a PKCS#8 (DER or PEM) with --format pkcs8")
    parser.add_argument("--format", choices=["seed", "pkcs8"], default="seed",
                        help="what to wrap: the seed form or a seed-form PKCS#8 (default seed)")
    parser.add_argument("--job", help="an existing import job id (default: create one)")
    parser.add_argument("--method", choices=["hpke-x-wing", "hpke-ml-kem-768", "hpke-ml-kem-1024"],
                        default="hpke-x-wing", help="the method of a new job (default hpke-x-wing)")
    parser.add_argument("--label", default="example-import", help="the imported key's label")
    args = parser.parse_args()
    if args.key is not None and args.algorithm is None:
        parser.error("--key needs --algorithm")
    url, api_key, ca = settings()
    proxy = Proxy(url, api_key, ca)
    if args.job:
        job = proxy.call("GET", f"/v1/import-jobs/{urllib.parse.quote(args.job, safe='')}")
    else:
        job = proxy.call("POST", "/v1/import-jobs", {"method": args.method})
    print(f"proxy at {url}: import job {job['import_job_id']} ({job['method']}, {job['state']} "
          f"until {job['expires_at']})")
    if args.algorithm is None:
        for algorithm, format in DEFAULT_RUN:
            import_one(proxy, job, algorithm, generate(algorithm), format, args.label)
    else:
        if args.key is None:
            seed = generate(args.algorithm)
        else:
            seed = seed_of(args.algorithm, args.key.read_bytes(), args.format)
        import_one(proxy, job, args.algorithm, seed, args.format, args.label)
    print("ok: every imported key is the local one")


if __name__ == "__main__":
    try:
        main()
    except (OSError, http.client.HTTPException) as exc:  # ssl.SSLError is an OSError
        sys.exit(f"cannot talk to the proxy: {exc}")
