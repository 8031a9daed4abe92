"""HPKE with our product suite (HKDF-SHA256 + AES-256-GCM) against ``cryptography``'s own
``hpke.Suite``, in both directions, for every KEM and backend: a client holding only the
public key can encrypt with any conforming library, and we can open it (and vice versa).
``cryptography``'s public API has no associated data, so interop runs with empty aad;
with aad, tampering with it must fail."""

from __future__ import annotations

from typing import Any

import pytest
from crypto_helpers import KEM_ALGORITHMS, cryptography_hpke_keys, cryptography_hpke_suite

from qpher_proxy.crypto import hpke
from qpher_proxy.crypto.algorithms import get_algorithm
from qpher_proxy.errors import DecryptionFailed, InvalidCiphertext

PLAINTEXT = bytes(range(256)) * 4  # 1 KiB
INFO = b"qpher/v1/encrypt"


@pytest.mark.parametrize("algorithm", KEM_ALGORITHMS)
def test_cryptography_seals_we_open(backend: Any, algorithm: str) -> None:
    key = backend.generate(algorithm)
    _, lib_public = cryptography_hpke_keys(algorithm, None, key.public_key().public_bytes())
    sealed = cryptography_hpke_suite(algorithm).encrypt(PLAINTEXT, lib_public, INFO)
    assert len(sealed) == get_algorithm(algorithm).ciphertext_size + len(PLAINTEXT) + 16
    assert key.hpke_open(sealed, info=INFO) == PLAINTEXT


@pytest.mark.parametrize("algorithm", KEM_ALGORITHMS)
def test_we_seal_cryptography_opens(backend: Any, algorithm: str) -> None:
    key = backend.generate(algorithm)
    lib_private, _ = cryptography_hpke_keys(algorithm, key.private_bytes(), None)
    sealed = key.public_key().hpke_seal(PLAINTEXT, info=INFO)
    assert cryptography_hpke_suite(algorithm).decrypt(sealed, lib_private, INFO) == PLAINTEXT


@pytest.mark.parametrize("algorithm", KEM_ALGORITHMS)
def test_associated_data_and_info_are_bound(backend: Any, algorithm: str) -> None:
    key = backend.generate(algorithm)
    sealed = key.public_key().hpke_seal(PLAINTEXT, aad=b"tenant=a", info=INFO)
    assert key.hpke_open(sealed, aad=b"tenant=a", info=INFO) == PLAINTEXT
    for kwargs in ({"aad": b"tenant=b", "info": INFO}, {"aad": b"tenant=a", "info": b"other"},
                   {"aad": b"", "info": INFO}):
        with pytest.raises(DecryptionFailed):
            key.hpke_open(sealed, **kwargs)
    tampered_enc = bytes([sealed[0] ^ 1]) + sealed[1:]  # ML-KEM implicit rejection -> AEAD fails
    tampered_ct = sealed[:-1] + bytes([sealed[-1] ^ 1])
    for bad in (tampered_enc, tampered_ct, sealed[:-1]):
        with pytest.raises(DecryptionFailed) as info:
            key.hpke_open(bad, aad=b"tenant=a", info=INFO)
        assert info.value.message == "decryption failed"
    # shorter than enc + tag: a length error, which says nothing about the key
    for short in (sealed[:10], b"", sealed[: key.algorithm.ciphertext_size + 15]):
        with pytest.raises(InvalidCiphertext):
            key.hpke_open(short, aad=b"tenant=a", info=INFO)


def test_suite_ids_and_wire_sizes() -> None:
    assert hpke.product_suite(0x0041).suite_id == bytes.fromhex("48504b45004100010002")
    assert hpke.product_suite(0x647A).suite_id == bytes.fromhex("48504b45647a00010002")
    assert hpke.product_suite(0x0042).suite_id == bytes.fromhex("48504b45004200010002")
    assert [get_algorithm(a).hpke_kem_id for a in KEM_ALGORITHMS] == [0x0041, 0x0042, 0x647A]


def test_multi_block_hkdf_expand_matches_cryptography_hkdf() -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

    prk = bytes(range(32))
    for length in (1, 31, 32, 33, 64, 100):
        want = HKDFExpand(hashes.SHA256(), length, b"info").derive(prk)
        assert hpke._hkdf_expand(prk, b"info", length) == want
