"""Wycheproof for the classical primitives the hybrids use, through our own helpers:
X25519 (X-Wing), ECDSA P-256/SHA-256 with DER signatures (composite), and AES-GCM with a
96-bit nonce and 128-bit tag (the HPKE AEAD). Both backends use ``cryptography`` for
these, so they run once."""

from __future__ import annotations

import pytest
from crypto_helpers import h, vectors
from cryptography.hazmat.primitives.asymmetric import x25519

from qpher_proxy.crypto import hpke
from qpher_proxy.crypto._primitives import (
    ecdsa_p256_public_from_point,
    ecdsa_p256_verify,
    x25519_public,
    x25519_shared,
)
from qpher_proxy.errors import DecryptionFailed


def test_wycheproof_x25519_through_x25519_shared() -> None:
    (group,) = vectors("wycheproof_x25519_test.json")["testGroups"]
    zero_refused = 0
    for t in group["tests"]:
        private = x25519.X25519PrivateKey.from_private_bytes(h(t["private"]))
        shared = x25519_shared(private, x25519_public(h(t["public"])))
        if "ZeroSharedSecret" in t["flags"]:
            # RFC 7748 gives all zeros; we (like cryptography and BoringSSL's X-Wing) refuse it.
            assert shared is None and h(t["shared"]) == bytes(32), t["tcId"]
            zero_refused += 1
        else:
            assert t["result"] in ("valid", "acceptable")
            assert shared == h(t["shared"]), (t["tcId"], t["flags"])
    assert zero_refused == 31


def test_wycheproof_ecdsa_p256_sha256_der_through_composite_helpers() -> None:
    data = vectors("wycheproof_ecdsa_secp256r1_sha256_test.json")
    results = {"valid": 0, "invalid": 0}
    for group in data["testGroups"]:
        assert group["sha"] == "SHA-256"
        pub = ecdsa_p256_public_from_point(h(group["publicKey"]["uncompressed"]))
        for t in group["tests"]:
            ok = ecdsa_p256_verify(pub, h(t["sig"]), h(t["msg"]))
            assert ok is (t["result"] == "valid"), (t["tcId"], t["flags"])
            results[t["result"]] += 1
    assert results == {"valid": 174, "invalid": 310}


@pytest.mark.parametrize("aead_id", [hpke.AEAD.AES_128_GCM, hpke.AEAD.AES_256_GCM])
def test_wycheproof_aes_gcm_as_the_hpke_aead(aead_id: hpke.AEAD) -> None:
    key_bits = 128 if aead_id == hpke.AEAD.AES_128_GCM else 256
    aead_cls = hpke._AEAD_CLASS[aead_id]
    checked = 0
    for group in vectors("wycheproof_aes_gcm_test.json")["testGroups"]:
        if (int(group["ivSize"]), int(group["tagSize"]), int(group["keySize"])) != (96, 128, key_bits):
            continue  # HPKE only ever uses 96-bit nonces and 128-bit tags
        for t in group["tests"]:
            aead = aead_cls(h(t["key"]))
            sealed = h(t["ct"]) + h(t["tag"])
            ctx = hpke.Context(aead, h(t["iv"]), b"")
            if t["result"] == "valid":
                assert ctx.open(h(t["aad"]), sealed) == h(t["msg"]), t["tcId"]
                assert aead.encrypt(h(t["iv"]), h(t["msg"]), h(t["aad"])) == sealed, t["tcId"]
            else:
                with pytest.raises(DecryptionFailed):
                    ctx.open(h(t["aad"]), sealed)
            checked += 1
    assert checked > 30
