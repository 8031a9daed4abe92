"""Bad input becomes our typed errors with safe messages, on every backend: wrong lengths,
invalid public keys, oversize contexts, unknown algorithms, key/algorithm mismatches.
A bad signature is just ``False``; a tampered ML-KEM ciphertext decapsulates to the
FIPS 203 implicit-rejection secret; private keys never show their bytes."""

from __future__ import annotations

import copy
import hashlib
import pickle
from typing import Any

import pytest
from crypto_helpers import ALL_ALGORITHMS, KEM_ALGORITHMS, SIGNATURE_ALGORITHMS

from qpher_proxy.crypto._primitives import SEC1_P256_PREFIX, SEC1_P256_SUFFIX
from qpher_proxy.crypto.algorithms import get_algorithm
from qpher_proxy.errors import (
    AlgorithmMismatch,
    ConfigError,
    CryptoError,
    InvalidCiphertext,
    InvalidContext,
    InvalidKey,
    UnknownAlgorithm,
)
from qpher_proxy.kms.worker.backends import select_backend

_keys: dict[tuple[str, str], Any] = {}


def key_for(backend: Any, algorithm: str) -> Any:
    """One generated key per (backend, algorithm), shared by the tests of this module."""
    cache_key = (backend.name, algorithm)
    if cache_key not in _keys:
        _keys[cache_key] = backend.generate(algorithm)
    return _keys[cache_key]


@pytest.mark.parametrize("name", ["ml-kem-512", "ML-KEM-768", "rsa", "", "x" * 1000, None, 7, b"ml-kem-768"])
def test_unknown_algorithm_names(backend: Any, name: object) -> None:
    for call in (lambda: backend.generate(name), lambda: backend.load_private(name, bytes(64)),
                 lambda: backend.load_public(name, bytes(1184))):
        with pytest.raises(UnknownAlgorithm) as info:
            call()
        assert len(info.value.message) < 300


def test_unknown_backend_name_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="crypto.backend must be one of"):
        select_backend("openssl3")


@pytest.mark.parametrize("algorithm", ALL_ALGORITHMS)
def test_wrong_key_lengths(backend: Any, algorithm: str) -> None:
    alg = get_algorithm(algorithm)
    for size in (0, 1, alg.private_key_size - 1, alg.private_key_size + 1):
        secret = bytes([0xA5]) * size
        with pytest.raises(InvalidKey) as info:
            backend.load_private(algorithm, secret)
        assert f"{alg.private_key_size} bytes, not {size}" in info.value.message
        assert "a5a5" not in info.value.message and "\\xa5" not in info.value.message
    for size in (0, alg.public_key_size - 1, alg.public_key_size + 1):
        with pytest.raises(InvalidKey):
            backend.load_public(algorithm, bytes(size))
    with pytest.raises(InvalidKey, match="must be bytes, not str"):
        backend.load_private(algorithm, "00" * alg.private_key_size)


@pytest.mark.parametrize("algorithm", ["ml-kem-768", "ml-kem-1024", "x-wing"])
def test_mlkem_modulus_check_on_load(backend: Any, algorithm: str) -> None:
    good = key_for(backend, algorithm).public_key().public_bytes()
    backend.load_public(algorithm, good)
    bad = b"\xff\xff" + good[2:]  # first coefficient 0xfff >= 3329
    with pytest.raises(InvalidKey, match="modulus"):
        backend.load_public(algorithm, bad)


def test_composite_key_checks(backend: Any) -> None:
    key = key_for(backend, "ml-dsa-65-ecdsa-p256")
    pk, sk = key.public_key().public_bytes(), key.private_bytes()
    with pytest.raises(InvalidKey, match="uncompressed point"):
        backend.load_public("ml-dsa-65-ecdsa-p256", pk[:1952] + b"\x02" + pk[1953:])
    with pytest.raises(InvalidKey, match="not a point"):
        backend.load_public("ml-dsa-65-ecdsa-p256", pk[:-1] + bytes([pk[-1] ^ 1]))
    with pytest.raises(InvalidKey, match="SEC1"):
        backend.load_private("ml-dsa-65-ecdsa-p256", sk[:32] + b"\x31" + sk[33:])
    order = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
    for scalar in (0, order):
        sec1 = SEC1_P256_PREFIX + scalar.to_bytes(32, "big") + SEC1_P256_SUFFIX
        with pytest.raises(InvalidKey, match="out of range"):
            backend.load_private("ml-dsa-65-ecdsa-p256", sk[:32] + sec1)


@pytest.mark.parametrize("algorithm", SIGNATURE_ALGORITHMS)
def test_context_limits(backend: Any, algorithm: str) -> None:
    key = key_for(backend, algorithm)
    sig = key.sign(b"m", b"c" * 255)
    assert key.public_key().verify(sig, b"m", b"c" * 255)
    for call in (lambda: key.sign(b"m", b"c" * 256), lambda: key.public_key().verify(sig, b"m", b"c" * 256)):
        with pytest.raises(InvalidContext, match="at most 255 bytes, not 256"):
            call()
    with pytest.raises(InvalidContext):
        key.sign(b"m", "ctx")


@pytest.mark.parametrize("algorithm", SIGNATURE_ALGORITHMS)
def test_bad_signatures_are_just_false(backend: Any, algorithm: str) -> None:
    key = key_for(backend, algorithm)
    pub = key.public_key()
    sig = key.sign(b"message")
    assert pub.verify(sig, b"message")
    assert pub.verify(sig, b"message", b"") is True
    for bad in (b"", b"\x00", sig[:-1], sig + b"\x00", bytes(len(sig)), b"\xff" * 10000,
                bytes([sig[0] ^ 0x80]) + sig[1:]):
        assert pub.verify(bad, b"message") is False
    assert pub.verify(sig, b"messagf") is False
    assert pub.verify(sig, b"message", b"ctx") is False
    other = backend.generate(algorithm).public_key()
    assert other.verify(sig, b"message") is False
    assert pub.verify(bytearray(sig), memoryview(b"message")) is True


@pytest.mark.parametrize("algorithm", ["ml-kem-768", "ml-kem-1024"])
def test_tampered_ciphertext_gives_the_implicit_rejection_secret(backend: Any, algorithm: str) -> None:
    key = key_for(backend, algorithm)
    ss, ct = key.public_key().encapsulate()
    assert key.decapsulate(ct) == ss
    tampered = bytes([ct[0] ^ 1]) + ct[1:]
    z = key.private_bytes()[32:]
    rejected = key.decapsulate(tampered)
    assert rejected == hashlib.shake_256(z + tampered).digest(32)  # FIPS 203: K = J(z || c)
    assert rejected != ss


def test_xwing_tampered_ciphertext_decapsulates_without_error(backend: Any) -> None:
    key = key_for(backend, "x-wing")
    ss, ct = key.public_key().encapsulate()
    assert key.decapsulate(ct) == ss
    out = key.decapsulate(bytes([ct[0] ^ 1]) + ct[1:])
    assert len(out) == 32 and out != ss


def test_xwing_low_order_points_are_refused(backend: Any) -> None:
    key = key_for(backend, "x-wing")
    ss, ct = key.public_key().encapsulate()
    with pytest.raises(InvalidCiphertext, match="low-order"):
        key.decapsulate(ct[:1088] + bytes(32))
    pk = key.public_key().public_bytes()
    low_order_pub = backend.load_public("x-wing", pk[:1184] + (1).to_bytes(32, "little"))
    with pytest.raises(InvalidKey, match="low-order"):
        low_order_pub.encapsulate()


@pytest.mark.parametrize("algorithm", KEM_ALGORITHMS)
def test_wrong_length_ciphertexts(backend: Any, algorithm: str) -> None:
    key = key_for(backend, algorithm)
    n = get_algorithm(algorithm).ciphertext_size
    for size in (0, 1, n - 1, n + 1, 2 * n):
        with pytest.raises(InvalidCiphertext, match=f"must be {n} bytes, not {size}"):
            key.decapsulate(bytes(size))
    with pytest.raises(InvalidCiphertext, match="must be bytes, not int"):
        key.decapsulate(5)
    ss, ct = key.public_key().encapsulate()
    assert key.decapsulate(bytearray(ct)) == ss


@pytest.mark.parametrize("algorithm", ALL_ALGORITHMS)
def test_algorithm_mismatch(backend: Any, algorithm: str) -> None:
    key = key_for(backend, algorithm)
    pub = key.public_key()
    if get_algorithm(algorithm).kind.value == "kem":
        calls = [lambda: key.sign(b"m"), lambda: pub.verify(b"s", b"m")]
    else:
        calls = [lambda: key.decapsulate(b"c"), lambda: pub.encapsulate(), lambda: pub.hpke_seal(b"p"),
                 lambda: key.hpke_open(b"x")]
    for call in calls:
        with pytest.raises(AlgorithmMismatch):
            call()


@pytest.mark.parametrize("algorithm", ALL_ALGORITHMS)
def test_private_keys_do_not_show_their_bytes(backend: Any, algorithm: str) -> None:
    key = key_for(backend, algorithm)
    secret = key.private_bytes()
    for text in (repr(key), str(key), f"{key!r:}"):
        assert secret.hex() not in text and secret.hex()[:8] not in text and repr(secret)[2:12] not in text
        assert text == f"<{type(key).__name__} {algorithm} private key>"
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(key)
    with pytest.raises(TypeError):
        copy.copy(key)
    assert algorithm in repr(key.public_key()) and "sha256:" in repr(key.public_key())


@pytest.mark.parametrize("algorithm", ALL_ALGORITHMS)
def test_non_bytes_arguments_are_typed_errors(backend: Any, algorithm: str) -> None:
    key = key_for(backend, algorithm)
    pub = key.public_key()
    if get_algorithm(algorithm).kind.value == "kem":
        calls = [lambda: pub.hpke_seal("text"), lambda: pub.hpke_seal(b"p", aad=1),
                 lambda: key.hpke_open(None), lambda: key.hpke_open(b"x" * 2000, info=3.0)]
    else:
        calls = [lambda: key.sign("text"), lambda: pub.verify("sig", b"m"), lambda: pub.verify(b"s", 5),
                 lambda: key.sign(b"m", None)]
    for call in calls:
        with pytest.raises(CryptoError):
            call()
