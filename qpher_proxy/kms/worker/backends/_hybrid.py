"""The two hybrids, built from a backend's ML-KEM-768 / ML-DSA-65 keys plus ``cryptography``.

Theory of operation
-------------------
Both hybrids are backend-agnostic: they take the backend's own ML-KEM-768 or ML-DSA-65
key objects (liboqs or OpenSSL) for the post-quantum half and ``cryptography`` for the
classical half (X25519, ECDSA P-256), so a hybrid on the liboqs backend runs its lattice
part on liboqs.

X-Wing (draft-connolly-cfrg-xwing-kem-10)::

    private key = 32-byte seed sk                      (the only thing ever stored)
    expanded    = SHAKE256(sk, 96 bytes)
    ML-KEM-768 key from d||z = expanded[0:64];  X25519 scalar sk_X = expanded[64:96]
    pk          = pk_M (1184) || pk_X (32)
    Encapsulate : ek_X random; ct_X = X25519(ek_X, 9); ss_X = X25519(ek_X, pk_X)
                  (ss_M, ct_M) = ML-KEM-768.Encaps(pk_M); ct = ct_M || ct_X (1120)
    Decapsulate : ss_M = ML-KEM-768.Decaps(ct_M)  (implicit rejection: never fails)
                  ss_X = X25519(sk_X, ct_X)
    ss          = SHA3-256(ss_M || ss_X || ct_X || pk_X || "\\.//^\\")   -- the label LAST,
                  and ct_M is not hashed (ML-KEM's FO transform already binds it).

An all-zero X25519 output (a low-order ``pk_X`` or ``ct_X``) is refused, as
``cryptography`` and BoringSSL's X-Wing do: ``InvalidKey`` on encapsulation,
``InvalidCiphertext`` on decapsulation. No honest peer produces such a point, and
whether a point has low order does not depend on our scalar, so the refusal is no
oracle. The derandomised ``_encapsulate_derand(eseed)`` exists for the draft's test
vectors only (``eseed[0:32]`` is the ML-KEM ``m``, ``eseed[32:64]`` the X25519 scalar).

Composite ML-DSA, id-MLDSA65-ECDSA-P256-SHA512 (draft-ietf-lamps-pq-composite-sigs-19)::

    M'  = "CompositeAlgorithmSignatures2025" || Label || len(ctx) (1 byte) || ctx || SHA-512(M)
    sig = ML-DSA-65.Sign(sk_1, M', ctx = Label) || ECDSA-P256-SHA256.Sign(sk_2, M')  (DER)
    pk  = ML-DSA-65 pk (1952) || uncompressed P-256 point (65)                    = 2017 B
    sk  = ML-DSA-65 seed xi (32) || RFC 5915 ECPrivateKey DER, P-256 OID, no pk (51) = 83 B

The application context only enters M'; the ML-DSA context is always the Label.
Verification needs *both* components to verify; any length or encoding problem is
simply "invalid".
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, x25519

from ....crypto._primitives import (
    ECDSA_P256_MAX_DER,
    P256_POINT_SIZE,
    SEC1_P256_SIZE,
    as_bytes,
    check_context,
    ecdsa_p256_from_sec1,
    ecdsa_p256_generate,
    ecdsa_p256_point,
    ecdsa_p256_public_from_point,
    ecdsa_p256_sign,
    ecdsa_p256_to_sec1,
    ecdsa_p256_verify,
    x25519_shared,
)
from ....crypto.algorithms import ML_DSA_65, ML_DSA_65_ECDSA_P256, ML_KEM_768, X_WING
from ....errors import InvalidCiphertext, InvalidKey
from ._base import (
    BasePrivateKey,
    BasePublicKey,
    KEMPrivateKey,
    KEMPublicKey,
    SignaturePrivateKey,
    SignaturePublicKey,
    check_private_length,
    check_public_length,
    coerce_ciphertext,
)

# ---- X-Wing ------------------------------------------------------------------------

XWING_LABEL = b"\\.//^\\"  # 5c 2e 2f 2f 5e 5c
_MLKEM_PK = ML_KEM_768.public_key_size  # 1184
_MLKEM_CT = ML_KEM_768.ciphertext_size  # 1088
_XWING_CT = X_WING.ciphertext_size  # 1120
_sha3_256 = hashlib.sha3_256
_X25519Private = x25519.X25519PrivateKey
_X25519Public = x25519.X25519PublicKey


def xwing_expand(seed: bytes) -> tuple[bytes, bytes]:
    """``(d || z, sk_X)`` from the 32-byte X-Wing seed."""
    expanded = hashlib.shake_256(seed).digest(96)
    return expanded[:64], expanded[64:]


class XWingPublicKey(KEMPublicKey):
    __slots__ = ("algorithm", "_raw", "_mlkem", "_pk_x", "_x_pub")

    def __init__(self, raw: bytes, mlkem_public: Any) -> None:
        self.algorithm = X_WING
        self._raw = raw
        self._mlkem = mlkem_public
        self._pk_x = raw[_MLKEM_PK:]
        self._x_pub = _X25519Public.from_public_bytes(self._pk_x)

    def public_bytes(self) -> bytes:
        return self._raw

    def encapsulate(self) -> tuple[bytes, bytes]:
        ek_x = _X25519Private.generate()
        ss_m, ct_m = self._mlkem.encapsulate()
        return self._combine(ek_x, ss_m, ct_m)

    def _combine(self, ek_x: x25519.X25519PrivateKey, ss_m: bytes, ct_m: bytes) -> tuple[bytes, bytes]:
        ss_x = x25519_shared(ek_x, self._x_pub)
        if ss_x is None:
            raise InvalidKey("x-wing public key has a low-order X25519 component")
        ct_x = ek_x.public_key().public_bytes_raw()
        return _sha3_256(ss_m + ss_x + ct_x + self._pk_x + XWING_LABEL).digest(), ct_m + ct_x

    def _encapsulate_derand(
        self, eseed: bytes, mlkem_encaps_derand: Callable[[bytes, bytes], tuple[bytes, bytes]] | None = None
    ) -> tuple[bytes, bytes]:
        """Test vectors only: ``EncapsulateDerand(pk, eseed)``.

        ``mlkem_encaps_derand(pk_M, m) -> (ss_M, ct_M)`` supplies the ML-KEM half when the
        backend has no derandomised encapsulation (``cryptography`` has none).
        """
        if len(eseed) != 64:
            raise ValueError("eseed must be 64 bytes")
        m, ek_x = eseed[:32], _X25519Private.from_private_bytes(eseed[32:])
        if mlkem_encaps_derand is None:
            ss_m, ct_m = self._mlkem._encapsulate_derand(m)
        else:
            ss_m, ct_m = mlkem_encaps_derand(self._raw[:_MLKEM_PK], m)
        return self._combine(ek_x, ss_m, ct_m)


class XWingPrivateKey(KEMPrivateKey):
    __slots__ = ("algorithm", "_seed", "_mlkem", "_x25519", "_pk_x", "_public")

    def __init__(self, seed: bytes, mlkem_from_seed: Callable[[bytes], Any]) -> None:
        self.algorithm = X_WING
        self._seed = seed
        dz, sk_x = xwing_expand(seed)
        self._mlkem = mlkem_from_seed(dz)
        self._x25519 = _X25519Private.from_private_bytes(sk_x)
        self._pk_x = self._x25519.public_key().public_bytes_raw()
        self._public: XWingPublicKey | None = None

    def private_bytes(self) -> bytes:
        return self._seed

    def public_key(self) -> XWingPublicKey:
        if self._public is None:
            mlkem_public = self._mlkem.public_key()
            self._public = XWingPublicKey(mlkem_public.public_bytes() + self._pk_x, mlkem_public)
        return self._public

    def decapsulate(self, ciphertext: bytes) -> bytes:
        if type(ciphertext) is not bytes or len(ciphertext) != _XWING_CT:
            ciphertext = coerce_ciphertext(X_WING, ciphertext)
        ss_m = self._mlkem.decapsulate(ciphertext[:_MLKEM_CT])
        ct_x = ciphertext[_MLKEM_CT:]
        ss_x = x25519_shared(self._x25519, _X25519Public.from_public_bytes(ct_x))
        if ss_x is None:
            raise InvalidCiphertext("x-wing ciphertext has a low-order X25519 share")
        return _sha3_256(ss_m + ss_x + ct_x + self._pk_x + XWING_LABEL).digest()


def xwing_load_public(data: object, mlkem_load_public: Callable[[bytes], Any]) -> XWingPublicKey:
    raw = check_public_length(X_WING, data)
    return XWingPublicKey(raw, mlkem_load_public(raw[:_MLKEM_PK]))


def xwing_load_private(data: object, mlkem_from_seed: Callable[[bytes], Any]) -> XWingPrivateKey:
    return XWingPrivateKey(check_private_length(X_WING, data), mlkem_from_seed)


def xwing_generate(mlkem_from_seed: Callable[[bytes], Any]) -> XWingPrivateKey:
    return XWingPrivateKey(os.urandom(32), mlkem_from_seed)


# ---- Composite ML-DSA-65 + ECDSA P-256 ----------------------------------------------

COMPOSITE_PREFIX = b"CompositeAlgorithmSignatures2025"
COMPOSITE_LABEL = b"COMPSIG-MLDSA65-ECDSA-P256-SHA512"
_MLDSA_SIG = ML_DSA_65.signature_size  # 3309
_MLDSA_PK = ML_DSA_65.public_key_size  # 1952
_MLDSA_SEED = ML_DSA_65.private_key_size  # 32
_MIN_ECDSA_DER = 8  # SEQUENCE { INTEGER 1 byte, INTEGER 1 byte }
_sha512 = hashlib.sha512


def composite_message(message: bytes, context: bytes) -> bytes:
    """M' = Prefix || Label || len(ctx) || ctx || SHA-512(M)."""
    return (COMPOSITE_PREFIX + COMPOSITE_LABEL + bytes((len(context),)) + context
            + _sha512(message).digest())


class CompositePublicKey(SignaturePublicKey):
    __slots__ = ("algorithm", "_raw", "_mldsa", "_ec")

    def __init__(self, raw: bytes, mldsa_public: BasePublicKey) -> None:
        self.algorithm = ML_DSA_65_ECDSA_P256
        self._raw = raw
        self._mldsa = mldsa_public
        self._ec = ecdsa_p256_public_from_point(raw[_MLDSA_PK:])

    def public_bytes(self) -> bytes:
        return self._raw

    def verify(self, signature: bytes, message: bytes, context: bytes = b"") -> bool:
        context = check_context(context)
        if type(message) is not bytes:
            message = as_bytes(message, "message")
        if type(signature) is not bytes:
            signature = as_bytes(signature, "signature")
        if not _MLDSA_SIG + _MIN_ECDSA_DER <= len(signature) <= _MLDSA_SIG + ECDSA_P256_MAX_DER:
            return False
        m_prime = composite_message(message, context)
        mldsa_ok = self._mldsa.verify(signature[:_MLDSA_SIG], m_prime, COMPOSITE_LABEL)
        ecdsa_ok = ecdsa_p256_verify(self._ec, signature[_MLDSA_SIG:], m_prime)
        return mldsa_ok and ecdsa_ok


class CompositePrivateKey(SignaturePrivateKey):
    __slots__ = ("algorithm", "_mldsa", "_ec", "_public")

    def __init__(self, mldsa_private: BasePrivateKey, ec_private: ec.EllipticCurvePrivateKey) -> None:
        self.algorithm = ML_DSA_65_ECDSA_P256
        self._mldsa = mldsa_private
        self._ec = ec_private
        self._public: CompositePublicKey | None = None

    def private_bytes(self) -> bytes:
        return self._mldsa.private_bytes() + ecdsa_p256_to_sec1(self._ec)

    def public_key(self) -> CompositePublicKey:
        if self._public is None:
            mldsa_public = self._mldsa.public_key()
            raw = mldsa_public.public_bytes() + ecdsa_p256_point(self._ec.public_key())
            self._public = CompositePublicKey(raw, mldsa_public)
        return self._public

    def sign(self, message: bytes, context: bytes = b"") -> bytes:
        context = check_context(context)
        if type(message) is not bytes:
            message = as_bytes(message, "message")
        m_prime = composite_message(message, context)
        return self._mldsa.sign(m_prime, COMPOSITE_LABEL) + ecdsa_p256_sign(self._ec, m_prime)


def composite_load_public(
    data: object, mldsa_load_public: Callable[[bytes], BasePublicKey]
) -> CompositePublicKey:
    raw = check_public_length(ML_DSA_65_ECDSA_P256, data)
    return CompositePublicKey(raw, mldsa_load_public(raw[:_MLDSA_PK]))


def composite_load_private(
    data: object, mldsa_from_seed: Callable[[bytes], BasePrivateKey]
) -> CompositePrivateKey:
    raw = check_private_length(ML_DSA_65_ECDSA_P256, data)
    ec_private = ecdsa_p256_from_sec1(raw[_MLDSA_SEED:])
    return CompositePrivateKey(mldsa_from_seed(raw[:_MLDSA_SEED]), ec_private)


def composite_generate(mldsa_from_seed: Callable[[bytes], BasePrivateKey]) -> CompositePrivateKey:
    return CompositePrivateKey(mldsa_from_seed(os.urandom(_MLDSA_SEED)), ecdsa_p256_generate())


assert P256_POINT_SIZE + _MLDSA_PK == ML_DSA_65_ECDSA_P256.public_key_size
assert _MLDSA_SEED + SEC1_P256_SIZE == ML_DSA_65_ECDSA_P256.private_key_size
