"""The algorithm table: names, kinds and sizes. Public-key-only facts, safe to share
between the gateway and the KMS (no private key handling here).

Names are the ones used throughout config, the HTTP API and key files.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..errors import UnknownAlgorithm


class Kind(enum.StrEnum):
    KEM = "kem"
    SIGNATURE = "signature"


class Mode(enum.StrEnum):
    PQC = "pqc"
    HYBRID = "hybrid"


@dataclass(frozen=True, slots=True)
class Algorithm:
    name: str
    kind: Kind
    mode: Mode
    public_key_size: int
    private_key_size: int  # the standard seed form we store
    ciphertext_size: int = 0  # KEM only
    shared_secret_size: int = 0  # KEM only
    signature_size: int = 0  # signatures: maximum size (composite ECDSA DER varies)
    hpke_kem_id: int | None = None  # RFC 9180 / draft-ietf-hpke-pq KEM id, when HPKE is offered
    private_key_format: str = ""  # how the stored private bytes are laid out


ML_KEM_768 = Algorithm(
    "ml-kem-768", Kind.KEM, Mode.PQC, 1184, 64, 1088, 32,
    hpke_kem_id=0x0041, private_key_format="fips203-seed-d||z",
)
ML_KEM_1024 = Algorithm(
    "ml-kem-1024", Kind.KEM, Mode.PQC, 1568, 64, 1568, 32,
    hpke_kem_id=0x0042, private_key_format="fips203-seed-d||z",
)
X_WING = Algorithm(
    "x-wing", Kind.KEM, Mode.HYBRID, 1216, 32, 1120, 32,
    hpke_kem_id=0x647A, private_key_format="xwing-seed",
)
ML_DSA_44 = Algorithm("ml-dsa-44", Kind.SIGNATURE, Mode.PQC, 1312, 32, signature_size=2420,
                      private_key_format="fips204-seed-xi")
ML_DSA_65 = Algorithm("ml-dsa-65", Kind.SIGNATURE, Mode.PQC, 1952, 32, signature_size=3309,
                      private_key_format="fips204-seed-xi")
ML_DSA_87 = Algorithm("ml-dsa-87", Kind.SIGNATURE, Mode.PQC, 2592, 32, signature_size=4627,
                      private_key_format="fips204-seed-xi")
# Composite: 32-byte ML-DSA seed || SEC1 DER ECPrivateKey (51 bytes) = 83; signature
# is 3309 || DER ECDSA (<= 72), so at most 3381.
ML_DSA_65_ECDSA_P256 = Algorithm(
    "ml-dsa-65-ecdsa-p256", Kind.SIGNATURE, Mode.HYBRID, 2017, 83, signature_size=3381,
    private_key_format="composite-mldsa-seed||sec1-der",
)

ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (ML_KEM_768, ML_KEM_1024, X_WING, ML_DSA_44, ML_DSA_65, ML_DSA_87, ML_DSA_65_ECDSA_P256)
}

DEFAULT_KEM = ML_KEM_768.name
DEFAULT_SIGNATURE = ML_DSA_65.name
HYBRID_KEM = X_WING.name
HYBRID_SIGNATURE = ML_DSA_65_ECDSA_P256.name

MAX_CONTEXT_BYTES = 255  # FIPS 204 §5.2


def get_algorithm(name: object) -> Algorithm:
    """Look an algorithm up by its API name; unknown names raise :class:`UnknownAlgorithm`."""
    if isinstance(name, str):
        alg = ALGORITHMS.get(name)
        if alg is not None:
            return alg
        shown = name if len(name) <= 40 else name[:40] + "..."
        raise UnknownAlgorithm(f"unknown algorithm {shown!r}; expected one of {sorted(ALGORITHMS)}")
    raise UnknownAlgorithm(f"algorithm must be a string, not {type(name).__name__}")

# The fixed HPKE application ``info`` of POST /v1/encrypt and /v1/decrypt (RFC 9180 base mode,
# HKDF-SHA256, AES-256-GCM). Public and documented in openapi.yaml, so that a client can seal
# locally with any HPKE library; the KMS must seal and open with exactly this value.
HPKE_INFO = b"qpher/v1/encrypt"
HPKE_KDF_ID = 0x0001  # HKDF-SHA256
HPKE_AEAD_ID = 0x0002  # AES-256-GCM
