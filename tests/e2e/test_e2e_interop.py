"""Interoperability through the live gateway: what the proxy produces verifies with independent
implementations of the standards, and what they produce opens in the proxy.

* ML-DSA signatures from ``/v1/sign`` verify with dilithium-py (pure Python FIPS 204) and with
  ``cryptography``'s ML-DSA public keys, with and without a context string.
* Composite ML-DSA-65 + ECDSA-P256 signatures verify when the composite construction
  (draft-ietf-lamps-pq-composite-sigs) is rebuilt here from ``cryptography`` primitives.
* A shared secret encapsulated locally to a ``/v1/keys`` public key (kyber-py and
  ``cryptography`` for ML-KEM; X-Wing assembled here from ML-KEM-768, X25519 and SHA3-256)
  equals what ``/v1/kem/decapsulate`` returns.
* An HPKE ciphertext sealed locally with ``cryptography``'s RFC 9180 implementation (ML-KEM-768,
  ML-KEM-1024, X-Wing = MLKEM768-X25519) opens with ``/v1/decrypt``; ``/v1/encrypt`` output has
  the RFC 9180 single-shot shape ``enc || ct`` with a 16-byte tag.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, hpke
from cryptography.hazmat.primitives.asymmetric import ec, mldsa, mlkem, x25519
from dilithium_py.ml_dsa import ML_DSA_44, ML_DSA_65, ML_DSA_87
from kyber_py.ml_kem import ML_KEM_768, ML_KEM_1024

from qpher_proxy.crypto.algorithms import ALGORITHMS, HPKE_INFO

from ._gateway import Gateway
from ._openapi_check import CheckedClient, b64, unb64

MSG = b"interop: the quick brown fox jumps over the lazy dog"

DILITHIUM = {"ml-dsa-44": ML_DSA_44, "ml-dsa-65": ML_DSA_65, "ml-dsa-87": ML_DSA_87}
PYCA_MLDSA = {"ml-dsa-44": mldsa.MLDSA44PublicKey, "ml-dsa-65": mldsa.MLDSA65PublicKey,
              "ml-dsa-87": mldsa.MLDSA87PublicKey}
KYBER = {"ml-kem-768": ML_KEM_768, "ml-kem-1024": ML_KEM_1024}
PYCA_MLKEM = {"ml-kem-768": mlkem.MLKEM768PublicKey, "ml-kem-1024": mlkem.MLKEM1024PublicKey}

# draft-ietf-lamps-pq-composite-sigs: M' = Prefix || Label || len(ctx) || ctx || PH(M)
COMPOSITE_PREFIX = b"CompositeAlgorithmSignatures2025"
COMPOSITE_LABEL = b"COMPSIG-MLDSA65-ECDSA-P256-SHA512"
MLDSA65_PK, MLDSA65_SIG = 1952, 3309

# draft-connolly-cfrg-xwing-kem: pk = pk_M (1184) || pk_X (32), ct = ct_M (1088) || ct_X (32)
XWING_LABEL = b"\\.//^\\"
MLKEM768_PK = 1184


@pytest.fixture(scope="module")
def api(gateway: Gateway) -> Iterator[CheckedClient]:
    c = CheckedClient(gateway.client())
    yield c
    c.close()


@pytest.fixture(scope="module")
def keys(api: CheckedClient) -> dict[str, dict[str, Any]]:
    return {alg: api.ok("POST", "/v1/keys", {"algorithm": alg}) for alg in ALGORITHMS}


def _ctx_args(ctx: bytes | None) -> dict[str, str]:
    return {} if ctx is None else {"context": b64(ctx)}


def _other_ctx(ctx: bytes | None) -> bytes:
    """Another context of a valid length (the last byte changed, or one byte if none)."""
    return ctx[:-1] + bytes([ctx[-1] ^ 1]) if ctx else b"!"


# ---- ML-DSA ------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "ctx", [None, b"interop-context", b"\xff" * 255], ids=["no-context", "context", "context-255"]
)
@pytest.mark.parametrize("alg", list(DILITHIUM))
def test_ml_dsa_signature_verifies_with_dilithium_py_and_cryptography(
        api: CheckedClient, keys: dict[str, dict[str, Any]], alg: str, ctx: bytes | None) -> None:
    pk = unb64(keys[alg]["public_key"])
    sig = unb64(api.ok("POST", "/v1/sign", {"key_id": keys[alg]["key_id"], "message": b64(MSG),
                                            **_ctx_args(ctx)})["signature"])
    context = ctx or b""
    assert DILITHIUM[alg].verify(pk, MSG, sig, ctx=context)
    PYCA_MLDSA[alg].from_public_bytes(pk).verify(sig, MSG, context)  # raises if invalid
    # the independent verifiers do reject: another message, another context
    assert not DILITHIUM[alg].verify(pk, MSG + b"!", sig, ctx=context)
    assert not DILITHIUM[alg].verify(pk, MSG, sig, ctx=_other_ctx(ctx))
    with pytest.raises(InvalidSignature):
        PYCA_MLDSA[alg].from_public_bytes(pk).verify(sig, MSG, _other_ctx(ctx))


def test_old_version_signature_verifies_with_that_versions_public_key(api: CheckedClient) -> None:
    kid = api.ok("POST", "/v1/keys", {"algorithm": "ml-dsa-65"})["key_id"]
    s1 = unb64(api.ok("POST", "/v1/sign", {"key_id": kid, "message": b64(MSG)})["signature"])
    api.ok("POST", f"/v1/keys/{kid}/rotate")
    s2 = unb64(api.ok("POST", "/v1/sign", {"key_id": kid, "message": b64(MSG)})["signature"])
    pk1 = unb64(api.ok("GET", f"/v1/keys/{kid}?version=1")["public_key"])
    pk2 = unb64(api.ok("GET", f"/v1/keys/{kid}")["public_key"])
    assert ML_DSA_65.verify(pk1, MSG, s1) and ML_DSA_65.verify(pk2, MSG, s2)
    assert not ML_DSA_65.verify(pk2, MSG, s1) and not ML_DSA_65.verify(pk1, MSG, s2)


# ---- composite ML-DSA-65 + ECDSA-P256 -----------------------------------------------------------

def _composite_m_prime(message: bytes, ctx: bytes) -> bytes:
    return COMPOSITE_PREFIX + COMPOSITE_LABEL + bytes([len(ctx)]) + ctx + hashlib.sha512(message).digest()


@pytest.mark.parametrize(
    "ctx", [None, b"composite-context", b"\x00" * 255], ids=["no-context", "context", "context-255"]
)
def test_composite_signature_verifies_when_rebuilt_from_cryptography(
    api: CheckedClient, keys: dict[str, dict[str, Any]], ctx: bytes | None
) -> None:
    key = keys["ml-dsa-65-ecdsa-p256"]
    pk = unb64(key["public_key"])
    sig = unb64(api.ok("POST", "/v1/sign", {"key_id": key["key_id"], "message": b64(MSG),
                                            **_ctx_args(ctx)})["signature"])
    assert len(pk) == MLDSA65_PK + 65 and pk[MLDSA65_PK] == 0x04  # uncompressed SEC1 point
    mldsa_pk = mldsa.MLDSA65PublicKey.from_public_bytes(pk[:MLDSA65_PK])
    ecdsa_pk = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), pk[MLDSA65_PK:])
    mldsa_sig, ecdsa_sig = sig[:MLDSA65_SIG], sig[MLDSA65_SIG:]
    m_prime = _composite_m_prime(MSG, ctx or b"")

    mldsa_pk.verify(mldsa_sig, m_prime, COMPOSITE_LABEL)  # the label is ML-DSA's context
    ecdsa_pk.verify(ecdsa_sig, m_prime, ec.ECDSA(hashes.SHA256()))
    assert ML_DSA_65.verify(pk[:MLDSA65_PK], m_prime, mldsa_sig, ctx=COMPOSITE_LABEL)

    # each half alone binds the message and the context
    other = _composite_m_prime(MSG, _other_ctx(ctx))
    with pytest.raises(InvalidSignature):
        mldsa_pk.verify(mldsa_sig, other, COMPOSITE_LABEL)
    with pytest.raises(InvalidSignature):
        ecdsa_pk.verify(ecdsa_sig, _composite_m_prime(MSG + b"!", ctx or b""), ec.ECDSA(hashes.SHA256()))
    # and the proxy agrees with itself on the same signature
    assert api.ok("POST", "/v1/verify", {"key_id": key["key_id"], "message": b64(MSG), "signature": b64(sig),
                                         **_ctx_args(ctx)}) == {"valid": True}


# ---- KEM ---------------------------------------------------------------------------------------

def _decapsulate(api: CheckedClient, key_id: str, ct: bytes) -> bytes:
    return unb64(
        api.ok("POST", "/v1/kem/decapsulate", {"key_id": key_id, "ciphertext": b64(ct)})["shared_secret"]
    )


@pytest.mark.parametrize("alg", list(KYBER))
def test_ml_kem_encapsulated_locally_decapsulates_in_the_proxy(
        api: CheckedClient, keys: dict[str, dict[str, Any]], alg: str) -> None:
    key = keys[alg]
    ek = unb64(key["public_key"])
    shared, ct = KYBER[alg].encaps(ek)  # kyber-py: (K, c)
    assert _decapsulate(api, key["key_id"], ct) == shared
    ss2, ct2 = PYCA_MLKEM[alg].from_public_bytes(ek).encapsulate()  # cryptography: (ss, ct)
    assert _decapsulate(api, key["key_id"], ct2) == ss2


def _xwing_encapsulate(pk: bytes) -> tuple[bytes, bytes]:
    """X-Wing Encaps from cryptography primitives: (shared secret, ciphertext)."""
    pk_m, pk_x = pk[:MLKEM768_PK], pk[MLKEM768_PK:]
    ss_m, ct_m = mlkem.MLKEM768PublicKey.from_public_bytes(pk_m).encapsulate()
    eph = x25519.X25519PrivateKey.generate()
    ct_x = eph.public_key().public_bytes_raw()
    ss_x = eph.exchange(x25519.X25519PublicKey.from_public_bytes(pk_x))
    ss = hashlib.sha3_256(ss_m + ss_x + ct_x + pk_x + XWING_LABEL).digest()
    return ss, ct_m + ct_x


def test_x_wing_encapsulated_locally_decapsulates_in_the_proxy(
        api: CheckedClient, keys: dict[str, dict[str, Any]]) -> None:
    key = keys["x-wing"]
    pk = unb64(key["public_key"])
    assert len(pk) == ALGORITHMS["x-wing"].public_key_size == MLKEM768_PK + 32
    for _ in range(3):
        ss, ct = _xwing_encapsulate(pk)
        assert len(ct) == ALGORITHMS["x-wing"].ciphertext_size
        assert _decapsulate(api, key["key_id"], ct) == ss
    # with kyber-py for the ML-KEM half
    shared_m, ct_m = ML_KEM_768.encaps(pk[:MLKEM768_PK])
    eph = x25519.X25519PrivateKey.generate()
    ct_x = eph.public_key().public_bytes_raw()
    ss_x = eph.exchange(x25519.X25519PublicKey.from_public_bytes(pk[MLKEM768_PK:]))
    want = hashlib.sha3_256(shared_m + ss_x + ct_x + pk[MLKEM768_PK:] + XWING_LABEL).digest()
    assert _decapsulate(api, key["key_id"], ct_m + ct_x) == want
    # the combiner binds the X25519 half: another ephemeral key, another secret
    ss, ct = _xwing_encapsulate(pk)
    other_x = x25519.X25519PrivateKey.generate().public_key().public_bytes_raw()
    assert _decapsulate(api, key["key_id"], ct[:-32] + other_x) != ss


# ---- HPKE --------------------------------------------------------------------------------------

def _hpke_public(alg: str, pk: bytes) -> tuple[hpke.KEM, Any]:
    if alg == "ml-kem-768":
        return hpke.KEM.MLKEM768, mlkem.MLKEM768PublicKey.from_public_bytes(pk)
    if alg == "ml-kem-1024":
        return hpke.KEM.MLKEM1024, mlkem.MLKEM1024PublicKey.from_public_bytes(pk)
    assert alg == "x-wing"
    return hpke.KEM.MLKEM768_X25519, hpke.MLKEM768X25519PublicKey(
        mlkem.MLKEM768PublicKey.from_public_bytes(pk[:MLKEM768_PK]),
        x25519.X25519PublicKey.from_public_bytes(pk[MLKEM768_PK:]))


@pytest.mark.parametrize("alg", ["ml-kem-768", "ml-kem-1024", "x-wing"])
def test_hpke_sealed_locally_opens_with_decrypt(
    api: CheckedClient, keys: dict[str, dict[str, Any]], alg: str
) -> None:
    key = keys[alg]
    kem, public = _hpke_public(alg, unb64(key["public_key"]))
    suite = hpke.Suite(kem, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
    for plaintext in (b"", b"interop hpke " * 100):
        sealed = suite.encrypt(plaintext, public, info=HPKE_INFO)
        assert len(sealed) == ALGORITHMS[alg].ciphertext_size + len(plaintext) + 16
        opened = api.ok("POST", "/v1/decrypt", {"key_id": key["key_id"], "ciphertext": b64(sealed)})
        assert unb64(opened["plaintext"]) == plaintext
        # an explicit empty aad is the same as none
        opened = api.ok(
            "POST", "/v1/decrypt", {"key_id": key["key_id"], "ciphertext": b64(sealed), "aad": ""}
        )
        assert unb64(opened["plaintext"]) == plaintext
    # sealed under another info string: the proxy's fixed info does not open it
    other = suite.encrypt(b"x", public, info=b"qpher/v2/encrypt")
    status, code, _ = api.error("POST", "/v1/decrypt", {"key_id": key["key_id"], "ciphertext": b64(other)})
    assert (status, code) == (400, "decryption_failed")


@pytest.mark.parametrize("alg", ["ml-kem-768", "ml-kem-1024", "x-wing"])
def test_encrypt_output_has_the_rfc9180_single_shot_shape(
        api: CheckedClient, keys: dict[str, dict[str, Any]], alg: str) -> None:
    key = keys[alg]
    kem, _ = _hpke_public(alg, unb64(key["public_key"]))
    plaintext = b"interop encrypt " * 64
    r = api.ok("POST", "/v1/encrypt", {"key_id": key["key_id"], "plaintext": b64(plaintext)})
    ct = unb64(r["ciphertext"])
    assert len(ct) == ALGORITHMS[alg].ciphertext_size + len(plaintext) + 16  # enc || ct || tag
    assert r["hpke_suite"] == {"kem_id": ALGORITHMS[alg].hpke_kem_id, "kdf_id": 1, "aead_id": 2}
    assert unb64(r["info"]) == HPKE_INFO
    assert (
        unb64(
            api.ok("POST", "/v1/decrypt", {"key_id": key["key_id"], "ciphertext": r["ciphertext"]})[
                "plaintext"
            ]
        )
        == plaintext
    )
