"""HPKE (RFC 9180) base mode, single shot, for the post-quantum KEMs.

Theory of operation
-------------------
HPKE = KEM + key schedule + AEAD. The KEM part belongs to the key objects (a backend's
ML-KEM or X-Wing ``encapsulate``/``decapsulate``); this module is the rest, written out
because ``cryptography``'s public ``hpke.Suite`` takes no associated data and we need
it. For the post-quantum KEMs of draft-ietf-hpke-pq the KEM's shared secret is used as
is (there is no DHKEM ExtractAndExpand step), and the HKDF key schedule is exactly
RFC 9180 §5.1::

    suite_id    = "HPKE" || I2OSP(kem_id, 2) || I2OSP(kdf_id, 2) || I2OSP(aead_id, 2)
    LabeledExtract(salt, label, ikm)   = HKDF-Extract(salt, "HPKE-v1" || suite_id || label || ikm)
    LabeledExpand(prk, label, info, L) = HKDF-Expand(prk, I2OSP(L, 2) || "HPKE-v1" || suite_id
                                                     || label || info, L)
    psk_id_hash = LabeledExtract("", "psk_id_hash", "")          # base mode: psk = psk_id = ""
    info_hash   = LabeledExtract("", "info_hash", info)
    ksc         = 0x00 || psk_id_hash || info_hash
    secret      = LabeledExtract(shared_secret, "secret", "")
    key         = LabeledExpand(secret, "key", ksc, Nk)
    base_nonce  = LabeledExpand(secret, "base_nonce", ksc, Nn = 12)
    exporter    = LabeledExpand(secret, "exp", ksc, Nh)
    Seal(seq)   : AEAD(key, base_nonce XOR I2OSP(seq, 12), aad, pt); single shot uses seq = 0

The wire form of a single-shot message is ``enc || ct`` (``ct`` carries the 16-byte
tag). Our product suite is HKDF-SHA256 + AES-256-GCM; the AEAD is a parameter so the
public draft-ietf-hpke-pq vectors (AES-128-GCM, ChaCha20-Poly1305) check this very
code. ``psk_id_hash`` is a per-suite constant and ``info_hash`` depends only on
``info`` (an application label, not a secret), so both are computed once and cached;
a seal or open then costs three HMAC-SHA256 calls and one AEAD call.

HMAC-SHA256 comes from the standard library (``hmac.digest``, OpenSSL underneath); HKDF
is spelled out because for L <= 32 it is a single HMAC. Nothing here sees a private key.
"""

from __future__ import annotations

import enum
import functools
import hmac
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from ..errors import DecryptionFailed, UnknownAlgorithm

HPKE_VERSION_LABEL = b"HPKE-v1"
MODE_BASE = 0x00
NONCE_SIZE = 12  # Nn for every AEAD we support
TAG_SIZE = 16
SHA256_SIZE = 32  # Nh of HKDF-SHA256


class KDF(enum.IntEnum):
    HKDF_SHA256 = 0x0001


class AEAD(enum.IntEnum):
    AES_128_GCM = 0x0001
    AES_256_GCM = 0x0002
    CHACHA20_POLY1305 = 0x0003


_AEAD_KEY_SIZE = {AEAD.AES_128_GCM: 16, AEAD.AES_256_GCM: 32, AEAD.CHACHA20_POLY1305: 32}
_AEADClass = type[AESGCM] | type[ChaCha20Poly1305]
_AEAD_CLASS: dict[AEAD, _AEADClass] = {
    AEAD.AES_128_GCM: AESGCM,
    AEAD.AES_256_GCM: AESGCM,
    AEAD.CHACHA20_POLY1305: ChaCha20Poly1305,
}


def _hkdf_expand(prk: bytes, info: bytes, length: int) -> bytes:
    # RFC 5869 §2.3 with SHA-256.
    out = b""
    block = b""
    counter = 1
    while len(out) < length:
        block = hmac.digest(prk, block + info + bytes((counter,)), "sha256")
        out += block
        counter += 1
    return out[:length]


@dataclass(frozen=True, slots=True)
class Suite:
    """One HPKE ciphersuite. ``Suite(kem_id)`` is our product suite (HKDF-SHA256, AES-256-GCM)."""

    kem_id: int
    kdf_id: int = KDF.HKDF_SHA256
    aead_id: int = AEAD.AES_256_GCM
    suite_id: bytes = field(init=False, repr=False, compare=False)
    _label_prefix: bytes = field(init=False, repr=False, compare=False)
    _psk_id_hash: bytes = field(init=False, repr=False, compare=False)
    _key_size: int = field(init=False, repr=False, compare=False)
    _aead_cls: _AEADClass = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kdf_id != KDF.HKDF_SHA256:
            raise UnknownAlgorithm(
                f"HPKE KDF 0x{self.kdf_id:04x} is not supported; expected 0x0001 (HKDF-SHA256)"
            )
        try:
            aead = AEAD(self.aead_id)
        except ValueError:
            raise UnknownAlgorithm(f"HPKE AEAD 0x{self.aead_id:04x} is not supported") from None
        suite_id = (b"HPKE" + self.kem_id.to_bytes(2, "big") + self.kdf_id.to_bytes(2, "big")
                    + self.aead_id.to_bytes(2, "big"))
        object.__setattr__(self, "suite_id", suite_id)
        object.__setattr__(self, "_label_prefix", HPKE_VERSION_LABEL + suite_id)
        object.__setattr__(self, "_key_size", _AEAD_KEY_SIZE[aead])
        object.__setattr__(self, "_aead_cls", _AEAD_CLASS[aead])
        object.__setattr__(self, "_psk_id_hash", self.labeled_extract(b"", b"psk_id_hash", b""))

    # -- RFC 9180 §4 labeled HKDF ----------------------------------------------------

    def labeled_extract(self, salt: bytes, label: bytes, ikm: bytes) -> bytes:
        return hmac.digest(salt, self._label_prefix + label + ikm, "sha256")

    def labeled_expand(self, prk: bytes, label: bytes, info: bytes, length: int) -> bytes:
        return _hkdf_expand(prk, length.to_bytes(2, "big") + self._label_prefix + label + info, length)

    # -- key schedule ------------------------------------------------------------------

    def _context(self, info: bytes) -> bytes:
        return _key_schedule_context(self, info)

    def key_schedule(self, shared_secret: bytes, info: bytes) -> tuple[bytes, bytes, bytes]:
        """``(key, base_nonce, exporter_secret)`` for base mode (used by the vector tests)."""
        ksc = self._context(info)
        secret = self.labeled_extract(shared_secret, b"secret", b"")
        return (
            self.labeled_expand(secret, b"key", ksc, self._key_size),
            self.labeled_expand(secret, b"base_nonce", ksc, NONCE_SIZE),
            self.labeled_expand(secret, b"exp", ksc, SHA256_SIZE),
        )

    def _key_and_nonce(self, shared_secret: bytes, info: bytes) -> tuple[bytes, bytes]:
        # The single-block HKDF-Expand inlined: T(1) = HMAC(prk, info || 0x01).
        ksc = self._context(info)
        prefix = self._label_prefix
        secret = hmac.digest(shared_secret, prefix + b"secret", "sha256")
        nk = self._key_size
        key = hmac.digest(secret, nk.to_bytes(2, "big") + prefix + b"key" + ksc + b"\x01", "sha256")[:nk]
        nonce = hmac.digest(secret, b"\x00\x0c" + prefix + b"base_nonce" + ksc + b"\x01", "sha256")[
            :NONCE_SIZE
        ]
        return key, nonce

    # -- single shot -------------------------------------------------------------------

    def seal_with_secret(self, shared_secret: bytes, plaintext: bytes, aad: bytes, info: bytes) -> bytes:
        """AEAD part of a single-shot seal: ``ct`` (the caller prepends ``enc``)."""
        key, nonce = self._key_and_nonce(shared_secret, info)
        return self._aead_cls(key).encrypt(nonce, plaintext, aad)

    def open_with_secret(self, shared_secret: bytes, ciphertext: bytes, aad: bytes, info: bytes) -> bytes:
        key, nonce = self._key_and_nonce(shared_secret, info)
        try:
            return self._aead_cls(key).decrypt(nonce, ciphertext, aad)
        except InvalidTag:
            raise DecryptionFailed() from None

    def context(self, shared_secret: bytes, info: bytes) -> Context:
        """A multi-message context (sequence numbers); only the vector tests need it."""
        key, nonce, exporter = self.key_schedule(shared_secret, info)
        return Context(self._aead_cls(key), nonce, exporter)


@functools.lru_cache(maxsize=256)
def _key_schedule_context(suite: Suite, info: bytes) -> bytes:
    # ksc = mode || psk_id_hash || info_hash. ``info`` is an application label, not a
    # secret, so caching it is harmless; the cache is bounded.
    return bytes((MODE_BASE,)) + suite._psk_id_hash + suite.labeled_extract(b"", b"info_hash", info)


class Context:
    """RFC 9180 §5.2 encryption context with a sequence number (tests only)."""

    __slots__ = ("_aead", "_base_nonce", "exporter_secret", "seq")

    def __init__(self, aead: AESGCM | ChaCha20Poly1305, base_nonce: bytes, exporter_secret: bytes) -> None:
        self._aead = aead
        self._base_nonce = base_nonce
        self.exporter_secret = exporter_secret
        self.seq = 0

    def _nonce(self) -> bytes:
        seq = self.seq.to_bytes(NONCE_SIZE, "big")
        return bytes(a ^ b for a, b in zip(self._base_nonce, seq, strict=True))

    def seal(self, aad: bytes, plaintext: bytes) -> bytes:
        ct = self._aead.encrypt(self._nonce(), plaintext, aad)
        self.seq += 1
        return ct

    def open(self, aad: bytes, ciphertext: bytes) -> bytes:
        try:
            pt = self._aead.decrypt(self._nonce(), ciphertext, aad)
        except InvalidTag:
            raise DecryptionFailed() from None
        self.seq += 1
        return pt


@functools.cache
def product_suite(kem_id: int) -> Suite:
    """The suite every ``hpke_seal``/``hpke_open`` uses: HKDF-SHA256 + AES-256-GCM."""
    return Suite(kem_id, KDF.HKDF_SHA256, AEAD.AES_256_GCM)
