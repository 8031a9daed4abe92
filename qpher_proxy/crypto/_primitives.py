"""Small classical and byte-level primitives shared by the hybrids and both backends.

Nothing here holds a long-term private key: these are functions over bytes and
``cryptography`` objects. They exist so that the byte-level rules (argument types,
the FIPS 203 modulus check, the X25519 all-zero rule, the SEC1 layout of the composite
ECDSA key) live in one place and are tested once (Wycheproof vectors in
``tests/crypto``).
"""

from __future__ import annotations

import functools

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, x25519

from ..errors import CryptoError, InvalidContext, InvalidKey
from .algorithms import MAX_CONTEXT_BYTES

# ---- argument types ------------------------------------------------------------------

def as_bytes(value: object, what: str, error: type[CryptoError] = CryptoError) -> bytes:
    """Accept ``bytes``/``bytearray``/``memoryview``; anything else is a typed error.

    The message names the argument and the type received, never the value.
    """
    if type(value) is bytes:
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise error(f"{what} must be bytes, not {type(value).__name__}")


def check_context(context: object) -> bytes:
    """FIPS 204 context string: bytes, at most 255 of them."""
    if type(context) is not bytes:
        context = as_bytes(context, "context", InvalidContext)
    if len(context) > MAX_CONTEXT_BYTES:
        raise InvalidContext(
            f"context must be at most {MAX_CONTEXT_BYTES} bytes, not {len(context)}"
        )
    return context


# ---- FIPS 203 §7.2 encapsulation-key check (modulus check) ---------------------------
#
# ek = ByteEncode12(t_hat) || rho. Each 12-bit field of the first 384*k bytes must be a
# canonical coefficient (< q = 3329). ByteEncode12 packs coefficient i into bits
# 12i .. 12i+11 of the little-endian integer, so the whole check can run on one Python
# integer with per-field bit masks (no per-coefficient loop):
#   f >= 3329 = 0xD01  <=>  top nibble >= 14, or top nibble == 13 and low byte != 0
#                      <=>  b11 & b10 & (b9 | (b8 & (low8 != 0)))
# "low8 != 0" is computed for every field at once by adding 255 to each low byte (the
# sum stays inside its 12-bit field, so no carry crosses fields) and reading bit 8.

_MLKEM_Q = 3329


@functools.cache
def _modulus_masks(k: int) -> tuple[int, int]:
    m0 = sum(1 << (12 * i) for i in range(256 * k))  # bit 0 of every 12-bit field
    return m0, m0 * 0xFF  # ...and 0xFF in every field: the low-byte mask, also "+255 each"


def mlkem_encapsulation_key_ok(ek: bytes, k: int) -> bool:
    """True when every coefficient of ``ek``'s t-hat part is < 3329 (FIPS 203 §7.2)."""
    m0, low = _modulus_masks(k)
    x = int.from_bytes(ek[: 384 * k], "little")
    nonzero_low = (((x & low) + low) >> 8) & m0
    bad = ((x >> 11) & m0) & ((x >> 10) & m0) & (((x >> 9) & m0) | (((x >> 8) & m0) & nonzero_low))
    return bad == 0


def mlkem_encapsulation_key_ok_slow(ek: bytes, k: int) -> bool:
    """Reference form of the same check, coefficient by coefficient (used by tests)."""
    for i in range(0, 384 * k, 3):
        b0, b1, b2 = ek[i], ek[i + 1], ek[i + 2]
        if (b0 | ((b1 & 0x0F) << 8)) >= _MLKEM_Q or ((b1 >> 4) | (b2 << 4)) >= _MLKEM_Q:
            return False
    return True


# ---- X25519 (RFC 7748) ---------------------------------------------------------------

def x25519_shared(private: x25519.X25519PrivateKey, peer: x25519.X25519PublicKey) -> bytes | None:
    """RFC 7748 X25519; ``None`` when the result is all-zero (a low-order peer point).

    ``cryptography`` (like BoringSSL's X-Wing) refuses the all-zero output; callers turn
    ``None`` into their own typed error. Whether a point has low order does not depend
    on our scalar, so reporting it leaks nothing about the key.
    """
    try:
        return private.exchange(peer)
    except ValueError:
        return None


def x25519_public(data: bytes) -> x25519.X25519PublicKey:
    return x25519.X25519PublicKey.from_public_bytes(data)


# ---- ECDSA P-256 / SHA-256 (composite traditional component) -------------------------

_P256 = ec.SECP256R1()
_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())
# RFC 5915 ECPrivateKey, version 1, 32-byte key, [0] namedCurve secp256r1, no publicKey.
SEC1_P256_PREFIX = bytes.fromhex("30310201010420")
SEC1_P256_SUFFIX = bytes.fromhex("a00a06082a8648ce3d030107")
SEC1_P256_SIZE = len(SEC1_P256_PREFIX) + 32 + len(SEC1_P256_SUFFIX)  # 51
P256_POINT_SIZE = 65  # uncompressed X9.62: 04 || X || Y
ECDSA_P256_MAX_DER = 72


def ecdsa_p256_generate() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(_P256)


def ecdsa_p256_from_sec1(data: bytes) -> ec.EllipticCurvePrivateKey:
    """Parse exactly the 51-byte SEC1 form the composite draft specifies."""
    if (len(data) != SEC1_P256_SIZE or not data.startswith(SEC1_P256_PREFIX)
            or not data.endswith(SEC1_P256_SUFFIX)):
        raise InvalidKey("composite ECDSA key must be a 51-byte SEC1 ECPrivateKey with the P-256 OID")
    scalar = int.from_bytes(data[len(SEC1_P256_PREFIX):len(SEC1_P256_PREFIX) + 32], "big")
    try:
        return ec.derive_private_key(scalar, _P256)
    except ValueError:
        raise InvalidKey("composite ECDSA private scalar is out of range") from None


def ecdsa_p256_to_sec1(key: ec.EllipticCurvePrivateKey) -> bytes:
    return SEC1_P256_PREFIX + key.private_numbers().private_value.to_bytes(32, "big") + SEC1_P256_SUFFIX


def ecdsa_p256_public_from_point(point: bytes) -> ec.EllipticCurvePublicKey:
    if len(point) != P256_POINT_SIZE or point[0] != 0x04:
        raise InvalidKey("ECDSA P-256 public key must be a 65-byte uncompressed point")
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(_P256, point)
    except ValueError:
        raise InvalidKey("ECDSA P-256 public key is not a point on the curve") from None


def ecdsa_p256_point(key: ec.EllipticCurvePublicKey) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)


def ecdsa_p256_sign(key: ec.EllipticCurvePrivateKey, message: bytes) -> bytes:
    """ECDSA over ``message`` with SHA-256; DER ``Ecdsa-Sig-Value``."""
    return key.sign(message, _ECDSA_SHA256)


def ecdsa_p256_verify(key: ec.EllipticCurvePublicKey, signature: bytes, message: bytes) -> bool:
    try:
        key.verify(signature, message, _ECDSA_SHA256)
    except (InvalidSignature, ValueError):
        return False
    return True
