"""Cross-backend interoperability (needs liboqs): keys, ciphertexts, signatures and HPKE
messages made by one backend are accepted by the other, in both directions."""

from __future__ import annotations

from typing import Any

import pytest
from crypto_helpers import ALL_ALGORITHMS, KEM_ALGORITHMS, SIGNATURE_ALGORITHMS, get_backend

pytestmark = pytest.mark.liboqs

DIRECTIONS = [("openssl", "liboqs"), ("liboqs", "openssl")]


def _pair(direction: tuple[str, str]) -> tuple[Any, Any]:
    return get_backend(direction[0]), get_backend(direction[1])


@pytest.mark.parametrize("direction", DIRECTIONS, ids="->".join)
@pytest.mark.parametrize("algorithm", ALL_ALGORITHMS)
def test_keys_load_in_the_other_backend(direction: tuple[str, str], algorithm: str) -> None:
    a, b = _pair(direction)
    key = a.generate(algorithm)
    again = b.load_private(algorithm, key.private_bytes())
    assert again.public_key().public_bytes() == key.public_key().public_bytes()
    assert again.private_bytes() == key.private_bytes()


@pytest.mark.parametrize("direction", DIRECTIONS, ids="->".join)
@pytest.mark.parametrize("algorithm", SIGNATURE_ALGORITHMS)
def test_signatures_verify_in_the_other_backend(direction: tuple[str, str], algorithm: str) -> None:
    a, b = _pair(direction)
    key = a.generate(algorithm)
    sig = key.sign(b"cross-backend message", b"ctx")
    pub_b = b.load_public(algorithm, key.public_key().public_bytes())
    assert pub_b.verify(sig, b"cross-backend message", b"ctx")
    assert not pub_b.verify(sig, b"cross-backend message", b"ctx2")
    # and the other backend's signature under the same (re-loaded) private key
    sig_b = b.load_private(algorithm, key.private_bytes()).sign(b"m")
    assert key.public_key().verify(sig_b, b"m")


@pytest.mark.parametrize("direction", DIRECTIONS, ids="->".join)
@pytest.mark.parametrize("algorithm", KEM_ALGORITHMS)
def test_encapsulations_and_hpke_open_in_the_other_backend(
    direction: tuple[str, str], algorithm: str
) -> None:
    a, b = _pair(direction)
    key_b = b.generate(algorithm)
    pub_a = a.load_public(algorithm, key_b.public_key().public_bytes())
    ss, ct = pub_a.encapsulate()
    assert key_b.decapsulate(ct) == ss
    sealed = pub_a.hpke_seal(b"plaintext", aad=b"aad", info=b"info")
    assert key_b.hpke_open(sealed, aad=b"aad", info=b"info") == b"plaintext"
    tampered = ct[:5] + bytes([ct[5] ^ 4]) + ct[6:]
    key_a = a.load_private(algorithm, key_b.private_bytes())
    assert key_a.decapsulate(tampered) == key_b.decapsulate(tampered)  # same implicit rejection
