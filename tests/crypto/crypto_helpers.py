"""Shared helpers for the crypto tests: vector loading, backend parametrisation, and the
independent implementations (kyber-py, cryptography's own HPKE) used as references."""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import pathlib
from typing import Any

import pytest

from qpher_proxy.kms.worker.backends import liboqs_status, select_backend

VECTORS = pathlib.Path(__file__).resolve().parent.parent / "vectors"
ALL_ALGORITHMS = ["ml-kem-768", "ml-kem-1024", "x-wing", "ml-dsa-44", "ml-dsa-65", "ml-dsa-87",
                  "ml-dsa-65-ecdsa-p256"]
KEM_ALGORITHMS = ["ml-kem-768", "ml-kem-1024", "x-wing"]
SIGNATURE_ALGORITHMS = ["ml-dsa-44", "ml-dsa-65", "ml-dsa-87", "ml-dsa-65-ecdsa-p256"]
BACKENDS = ["openssl", pytest.param("liboqs", marks=pytest.mark.liboqs)]


@functools.cache
def vectors(name: str) -> Any:
    return json.loads((VECTORS / name).read_text())


def h(value: str) -> bytes:
    return bytes.fromhex(value)


def b64(value: str) -> bytes:
    return base64.b64decode(value)


def liboqs_skip_reason() -> str | None:
    present, reason = liboqs_status()
    return None if present else f"{reason}: set OQS_INSTALL_PATH to a liboqs build"


def get_backend(name: str) -> Any:
    if name == "liboqs":
        reason = liboqs_skip_reason()
        if reason:
            pytest.skip(reason)
    return select_backend(name)


def sample(items: list[Any], n: int) -> list[Any]:
    """A spread-out, deterministic sample (first, last and evenly spaced in between)."""
    if len(items) <= n:
        return list(items)
    step = (len(items) - 1) / (n - 1)
    return [items[round(i * step)] for i in range(n)]


# ---- independent references ---------------------------------------------------------

def kyber_encaps_derand(pk_m: bytes, m: bytes) -> tuple[bytes, bytes]:
    """ML-KEM-768 Encaps_internal(ek, m) by kyber-py (pure Python, independent of both backends)."""
    from kyber_py.ml_kem import ML_KEM_768

    k, c = ML_KEM_768._encaps_internal(pk_m, m)
    return k, c


def mlkem_encaps_derand(backend: Any, public_key: Any, m: bytes) -> tuple[bytes, bytes]:
    """Derandomised ML-KEM-768 encapsulation: liboqs natively, kyber-py for OpenSSL."""
    if backend.name == "liboqs":
        return public_key._encapsulate_derand(m)
    return kyber_encaps_derand(public_key.public_bytes(), m)


def xwing_encaps_derand(backend: Any, public_key: Any, eseed: bytes) -> tuple[bytes, bytes]:
    if backend.name == "liboqs":
        return public_key._encapsulate_derand(eseed)
    return public_key._encapsulate_derand(eseed, mlkem_encaps_derand=kyber_encaps_derand)


def hpke_labeled_derive(kem_id: int, ikm: bytes, label: bytes, context: bytes, length: int) -> bytes:
    """draft-ietf-hpke-pq SHAKE256.LabeledDerive with the KEM suite_id."""
    suite_id = b"KEM" + kem_id.to_bytes(2, "big")
    data = (ikm + b"HPKE-v1" + suite_id + len(label).to_bytes(2, "big") + label
            + length.to_bytes(2, "big") + context)
    return hashlib.shake_256(data).digest(length)


def cryptography_hpke_keys(
    algorithm: str, private_seed: bytes | None, public_raw: bytes | None
) -> tuple[Any, Any]:
    """The same keys as ``cryptography`` HPKE objects (for interop both ways)."""
    from cryptography.hazmat.primitives import hpke
    from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

    from qpher_proxy.kms.worker.backends._hybrid import xwing_expand

    private = public = None
    if algorithm == "ml-kem-768":
        if private_seed is not None:
            private = mlkem.MLKEM768PrivateKey.from_seed_bytes(private_seed)
        if public_raw is not None:
            public = mlkem.MLKEM768PublicKey.from_public_bytes(public_raw)
    elif algorithm == "ml-kem-1024":
        if private_seed is not None:
            private = mlkem.MLKEM1024PrivateKey.from_seed_bytes(private_seed)
        if public_raw is not None:
            public = mlkem.MLKEM1024PublicKey.from_public_bytes(public_raw)
    elif algorithm == "x-wing":
        if private_seed is not None:
            dz, sk_x = xwing_expand(private_seed)
            private = hpke.MLKEM768X25519PrivateKey(
                mlkem.MLKEM768PrivateKey.from_seed_bytes(dz), x25519.X25519PrivateKey.from_private_bytes(sk_x)
            )
        if public_raw is not None:
            public = hpke.MLKEM768X25519PublicKey(
                mlkem.MLKEM768PublicKey.from_public_bytes(public_raw[:1184]),
                x25519.X25519PublicKey.from_public_bytes(public_raw[1184:]),
            )
    else:  # pragma: no cover
        raise AssertionError(algorithm)
    return private, public


def cryptography_hpke_suite(algorithm: str) -> Any:
    from cryptography.hazmat.primitives import hpke

    kem = {"ml-kem-768": hpke.KEM.MLKEM768, "ml-kem-1024": hpke.KEM.MLKEM1024,
           "x-wing": hpke.KEM.MLKEM768_X25519}[algorithm]
    return hpke.Suite(kem, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
