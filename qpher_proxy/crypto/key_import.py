"""Key import (BYOK): the wrapping methods, the HPKE ``info`` and the private-key encodings.

Pure functions over bytes, shared by the KMS (which unwraps and checks) and by clients and tests
(which wrap): nothing here keeps a private key, and nothing here touches a backend.

Theory of operation
===================

An *import job* holds a KEM key pair made in the KMS; its public key is handed out, its private
key never leaves. A client wraps a private key for the job with single-shot HPKE base mode
(RFC 9180; the product suite of ``/v1/encrypt``: HKDF-SHA256, AES-256-GCM) and **no aad**::

    method            HPKE KEM                         enc (bytes)
    hpke-x-wing       0x647a MLKEM768-X25519 (X-Wing)  1120
    hpke-ml-kem-768   0x0041 ML-KEM-768                1088
    hpke-ml-kem-1024  0x0042 ML-KEM-1024               1568

    info       = b"qpher/v1/import:" || job id (ASCII) || b":" || algorithm (ASCII)
    wrapped_key = enc || AES-256-GCM ciphertext of the key material || 16-byte tag

``info`` binds the job and the algorithm, so material wrapped for one job or one algorithm does
not open as another. No aad, so HPKE libraries without one (``cryptography``'s ``hpke.Suite``)
can wrap.

The plaintext (``format``):

``seed`` -- the standard private key seed form, exactly the bytes the KMS stores::

    ml-kem-768 / ml-kem-1024     64   d || z                        (FIPS 203 KeyGen_internal)
    ml-dsa-44 / -65 / -87        32   xi                            (FIPS 204 KeyGen_internal)
    x-wing                       32   seed                          (draft-connolly-cfrg-xwing-kem)
    ml-dsa-65-ecdsa-p256         83   ML-DSA-65 xi (32) || RFC 5915 ECPrivateKey DER (51: version 1,
                                      the 32-byte scalar, [0] secp256r1, no public key)
                                      (draft-ietf-lamps-pq-composite-sigs-19)

``pkcs8`` -- a DER ``PrivateKeyInfo`` / ``OneAsymmetricKey`` (RFC 5958) of that algorithm,
whose ``privateKey`` holds the seed form:

* ML-KEM (draft-ietf-lamps-kyber-certificates): ``seed [0] IMPLICIT OCTET STRING`` -- ``80 40``
  and 64 bytes; ML-DSA (draft-ietf-lamps-dilithium-certificates): ``80 20`` and 32 bytes. These
  are what ``cryptography`` writes (``private_bytes(DER, PKCS8, NoEncryption())``). The
  ``expandedKey`` and ``both`` choices are refused: an expanded key cannot be checked against
  its seed without recomputing it, and only the seed is ever stored.
* X-Wing (OID 1.3.6.1.4.1.62253.25722): the raw 32-byte seed; the composite (OID
  1.3.6.1.5.5.7.6.45): the raw 83 bytes above.

A ``publicKey`` field (version 2) may be present: the KMS then requires it to equal the public
key it derives from the seed. The algorithm identifier must be the imported algorithm's, with no
parameters. Anything else is :class:`~qpher_proxy.errors.InvalidKeyMaterial`, with a message that
names what was expected and never any byte of the material.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import InvalidInput, InvalidKeyMaterial
from .algorithms import (
    ALGORITHMS,
    ML_DSA_44,
    ML_DSA_65,
    ML_DSA_65_ECDSA_P256,
    ML_DSA_87,
    ML_KEM_768,
    ML_KEM_1024,
    X_WING,
    Algorithm,
)

IMPORT_INFO_PREFIX = b"qpher/v1/import:"

# method -> the algorithm of the job's key pair (its HPKE KEM)
IMPORT_METHODS: dict[str, Algorithm] = {
    "hpke-x-wing": X_WING,
    "hpke-ml-kem-768": ML_KEM_768,
    "hpke-ml-kem-1024": ML_KEM_1024,
}
IMPORT_FORMATS = ("seed", "pkcs8")
# the algorithms a key may be imported for: every algorithm the product offers
IMPORTABLE_ALGORITHMS = tuple(sorted(ALGORITHMS))

# RFC 5915 ECPrivateKey, version 1, 32-byte key, [0] namedCurve secp256r1, no publicKey
_SEC1_P256_PREFIX = bytes.fromhex("30310201010420")
_SEC1_P256_SUFFIX = bytes.fromhex("a00a06082a8648ce3d030107")
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551

# DER of each algorithm's OID (the AlgorithmIdentifier carries no parameters for any of them)
_OIDS: dict[str, str] = {
    ML_KEM_768.name: "2.16.840.1.101.3.4.4.2",
    ML_KEM_1024.name: "2.16.840.1.101.3.4.4.3",
    ML_DSA_44.name: "2.16.840.1.101.3.4.3.17",
    ML_DSA_65.name: "2.16.840.1.101.3.4.3.18",
    ML_DSA_87.name: "2.16.840.1.101.3.4.3.19",
    X_WING.name: "1.3.6.1.4.1.62253.25722",
    ML_DSA_65_ECDSA_P256.name: "1.3.6.1.5.5.7.6.45",
}
_SEED_CHOICE = (ML_KEM_768.name, ML_KEM_1024.name, ML_DSA_44.name, ML_DSA_65.name, ML_DSA_87.name)


def import_method(method: object) -> Algorithm:
    """The KEM algorithm of an import method; anything else is InvalidInput naming the choices."""
    if type(method) is str and method in IMPORT_METHODS:
        return IMPORT_METHODS[method]
    shown = method[:40] if isinstance(method, str) else type(method).__name__
    raise InvalidInput(f"method must be one of {sorted(IMPORT_METHODS)}, not {shown!r}")


def import_info(job_id: str, algorithm: str) -> bytes:
    """The HPKE ``info`` a key wrapped for job ``job_id`` as ``algorithm`` is sealed with."""
    return IMPORT_INFO_PREFIX + job_id.encode("ascii") + b":" + algorithm.encode("ascii")


@dataclass(frozen=True, slots=True)
class KeyMaterial:
    """Unwrapped key material: the seed form, and the public key the PKCS#8 carried, if any."""

    seed: bytes = b""
    public_key: bytes | None = None

    def __repr__(self) -> str:
        return f"KeyMaterial(seed=<{len(self.seed)} bytes>, public_key={self.public_key is not None})"


def parse_key_material(algorithm: Algorithm, data: bytes, format: str) -> KeyMaterial:
    """The seed form of ``data`` (``format`` "seed" or "pkcs8") for ``algorithm``; checks every
    length and encoding this module's docstring describes, or raises InvalidKeyMaterial."""
    if format == "seed":
        return KeyMaterial(check_seed(algorithm, data))
    if format == "pkcs8":
        return _parse_pkcs8(algorithm, data)
    raise InvalidInput(f"format must be one of {list(IMPORT_FORMATS)}, not {str(format)[:20]!r}")


def check_seed(algorithm: Algorithm, seed: bytes) -> bytes:
    """``seed`` if it has the length (and, for the composite, the SEC1 layout) of ``algorithm``."""
    if len(seed) != algorithm.private_key_size:
        raise InvalidKeyMaterial(
            f"a {algorithm.name} private key in seed form is {algorithm.private_key_size} bytes, "
            f"not {len(seed)}"
        )
    if algorithm is ML_DSA_65_ECDSA_P256:
        sec1 = seed[ML_DSA_65.private_key_size:]
        if not (sec1.startswith(_SEC1_P256_PREFIX) and sec1.endswith(_SEC1_P256_SUFFIX)):
            raise InvalidKeyMaterial(
                "a ml-dsa-65-ecdsa-p256 private key is the ML-DSA-65 seed (32 bytes) followed by a 51-byte "
                "SEC1 ECPrivateKey with the P-256 OID and no public key"
            )
        scalar = int.from_bytes(sec1[len(_SEC1_P256_PREFIX):len(_SEC1_P256_PREFIX) + 32], "big")
        if not 0 < scalar < _P256_ORDER:
            raise InvalidKeyMaterial("the ECDSA P-256 private scalar of the composite key is out of range")
    return seed


# ---- PKCS#8 --------------------------------------------------------------------------------


def _read_tlv(data: bytes, pos: int, what: str) -> tuple[int, int, int]:
    """``(tag, start of the value, end of the value)`` of the DER element at ``pos``."""
    if pos + 2 > len(data):
        raise _bad_der(what)
    tag, first = data[pos], data[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        n = first & 0x7F
        if n == 0 or n > 3 or pos + n > len(data):
            raise _bad_der(what)
        length = int.from_bytes(data[pos:pos + n], "big")
        if length < 0x80 or (n > 1 and data[pos] == 0):  # DER: the shortest length form
            raise _bad_der(what)
        pos += n
    if pos + length > len(data):
        raise _bad_der(what)
    return tag, pos, pos + length


def _bad_der(what: str) -> InvalidKeyMaterial:
    return InvalidKeyMaterial(f"the PKCS#8 private key is not valid DER ({what})")


def encode_oid(dotted: str) -> bytes:
    """The DER content octets of an OBJECT IDENTIFIER."""
    arcs = [int(a) for a in dotted.split(".")]
    out = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out += bytes(reversed(chunk))
    return bytes(out)


def _der(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes((tag, n)) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(size))) + size + content


def _parse_pkcs8(algorithm: Algorithm, data: bytes) -> KeyMaterial:
    tag, start, end = _read_tlv(data, 0, "PrivateKeyInfo")
    if tag != 0x30 or end != len(data):
        raise _bad_der("PrivateKeyInfo")
    tag, v0, v1 = _read_tlv(data, start, "version")
    if tag != 0x02 or data[v0:v1] not in (b"\x00", b"\x01"):
        raise InvalidKeyMaterial("the PKCS#8 version must be v1 (0) or v2 (1)")
    version = data[v0]
    tag, a0, a1 = _read_tlv(data, v1, "AlgorithmIdentifier")
    if tag != 0x30:
        raise _bad_der("AlgorithmIdentifier")
    tag, o0, o1 = _read_tlv(data, a0, "algorithm OID")
    if tag != 0x06:
        raise _bad_der("algorithm OID")
    if o1 != a1 or data[o0:o1] != encode_oid(_OIDS[algorithm.name]):
        raise InvalidKeyMaterial(
            f"the PKCS#8 key is not a {algorithm.name} key (expected algorithm OID "
            f"{_OIDS[algorithm.name]} with no parameters)"
        )
    tag, p0, p1 = _read_tlv(data, a1, "privateKey")
    if tag != 0x04:
        raise _bad_der("privateKey")
    private = data[p0:p1]
    pos = p1
    public: bytes | None = None
    if pos < end:
        tag, s0, s1 = _read_tlv(data, pos, "attributes")
        if tag == 0xA0:  # [0] attributes: allowed, ignored
            pos = s1
    if pos < end:
        tag, s0, s1 = _read_tlv(data, pos, "publicKey")
        if tag != 0x81 or version != 1 or s1 - s0 < 1 or data[s0] != 0:  # [1] IMPLICIT BIT STRING
            raise _bad_der("publicKey")
        public = data[s0 + 1:s1]
        pos = s1
    if pos != end:
        raise _bad_der("trailing fields")
    return KeyMaterial(_private_seed(algorithm, private), public)


def _private_seed(algorithm: Algorithm, private: bytes) -> bytes:
    """The seed inside the ``privateKey`` OCTET STRING of ``algorithm``'s PKCS#8."""
    if algorithm.name not in _SEED_CHOICE:  # x-wing, composite: the raw seed form
        return check_seed(algorithm, private)
    n = algorithm.private_key_size
    if len(private) == 2 + n and private[0] == 0x80 and private[1] == n:
        return private[2:]
    if private[:1] == b"\x80":
        raise InvalidKeyMaterial(f"a {algorithm.name} seed in PKCS#8 is {n} bytes")
    raise InvalidKeyMaterial(
        f"only the seed form of a {algorithm.name} PKCS#8 private key is accepted (privateKey = "
        f"[0] IMPLICIT OCTET STRING of {n} bytes), not the expanded or both forms"
    )


def seed_pkcs8(algorithm: Algorithm, seed: bytes, public_key: bytes | None = None) -> bytes:
    """The seed-form PKCS#8 of ``seed`` (what :func:`parse_key_material` reads): for clients
    that hold only a seed, and for tests. With ``public_key``, a version 2 OneAsymmetricKey."""
    seed = check_seed(algorithm, seed)
    if algorithm.name in _SEED_CHOICE:
        private = bytes((0x80, len(seed))) + seed
    else:
        private = seed
    body = _der(0x02, b"\x01" if public_key is not None else b"\x00")
    body += _der(0x30, _der(0x06, encode_oid(_OIDS[algorithm.name])))
    body += _der(0x04, private)
    if public_key is not None:
        body += _der(0x81, b"\x00" + public_key)
    return _der(0x30, body)


# ---- the client's side ------------------------------------------------------------------------


def wrap_key(method: str, job_public_key: bytes, job_id: str, algorithm: str, key_material: bytes) -> bytes:
    """``wrapped_key`` for an import: ``key_material`` (a seed form or a seed-form PKCS#8 of
    ``algorithm``) sealed to the job's public key with ``cryptography``'s own HPKE
    (``hpke.Suite``, single shot, base mode, HKDF-SHA256, AES-256-GCM, no aad)."""
    from cryptography.hazmat.primitives import hpke
    from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

    kem = import_method(method)
    if len(job_public_key) != kem.public_key_size:
        raise InvalidInput(
            f"a {method} job public key is {kem.public_key_size} bytes, not {len(job_public_key)}"
        )
    public: Any
    if kem is X_WING:
        suite_kem = hpke.KEM.MLKEM768_X25519
        public = hpke.MLKEM768X25519PublicKey(
            mlkem.MLKEM768PublicKey.from_public_bytes(job_public_key[:ML_KEM_768.public_key_size]),
            x25519.X25519PublicKey.from_public_bytes(job_public_key[ML_KEM_768.public_key_size:]),
        )
    elif kem is ML_KEM_768:
        suite_kem, public = hpke.KEM.MLKEM768, mlkem.MLKEM768PublicKey.from_public_bytes(job_public_key)
    else:
        suite_kem, public = hpke.KEM.MLKEM1024, mlkem.MLKEM1024PublicKey.from_public_bytes(job_public_key)
    suite = hpke.Suite(suite_kem, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
    return suite.encrypt(key_material, public, info=import_info(job_id, algorithm))


__all__ = [
    "wrap_key",
    "IMPORTABLE_ALGORITHMS", "IMPORT_FORMATS", "IMPORT_INFO_PREFIX", "IMPORT_METHODS", "KeyMaterial",
    "check_seed", "encode_oid", "import_info", "import_method", "parse_key_material", "seed_pkcs8",
]
