"""Property tests (hypothesis) for every algorithm on every backend: round trips, any
single-bit change breaks a signature, and garbage of every length only ever raises our
typed errors."""

from __future__ import annotations

import functools
import os
from typing import Any

import pytest
from crypto_helpers import ALL_ALGORITHMS, KEM_ALGORITHMS, SIGNATURE_ALGORITHMS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qpher_proxy.crypto.algorithms import get_algorithm
from qpher_proxy.errors import QpherError

PROPERTY_SETTINGS = settings(
    max_examples=25, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

_keys: dict[tuple[str, str], Any] = {}


def key_for(backend: Any, algorithm: str) -> Any:
    if (backend.name, algorithm) not in _keys:
        _keys[(backend.name, algorithm)] = backend.generate(algorithm)
    return _keys[(backend.name, algorithm)]


def flip(data: bytes, bit: int) -> bytes:
    bit %= 8 * len(data)
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def only_typed_errors(call: Any) -> Any:
    try:
        return call()
    except QpherError:
        return None


# ---- round trips -------------------------------------------------------------------

@pytest.mark.parametrize("algorithm", SIGNATURE_ALGORITHMS)
@PROPERTY_SETTINGS
@given(message=st.binary(max_size=300), context=st.binary(max_size=255))
def test_sign_verify_round_trip(backend: Any, algorithm: str, message: bytes, context: bytes) -> None:
    key = key_for(backend, algorithm)
    assert key.public_key().verify(key.sign(message, context), message, context)


@pytest.mark.parametrize("algorithm", KEM_ALGORITHMS)
@PROPERTY_SETTINGS
@given(plaintext=st.binary(max_size=2048), aad=st.binary(max_size=64), info=st.binary(max_size=64))
def test_kem_and_hpke_round_trip(
    backend: Any, algorithm: str, plaintext: bytes, aad: bytes, info: bytes
) -> None:
    key = key_for(backend, algorithm)
    pub = backend.load_public(algorithm, key.public_key().public_bytes())
    ss, ct = pub.encapsulate()
    assert len(ss) == 32 and len(ct) == get_algorithm(algorithm).ciphertext_size
    assert key.decapsulate(ct) == ss
    assert key.hpke_open(pub.hpke_seal(plaintext, aad=aad, info=info), aad=aad, info=info) == plaintext


@pytest.mark.parametrize("algorithm", ALL_ALGORITHMS)
def test_keys_round_trip_through_their_stored_forms(backend: Any, algorithm: str) -> None:
    key = key_for(backend, algorithm)
    again = backend.load_private(algorithm, key.private_bytes())
    assert again.private_bytes() == key.private_bytes()
    assert again.public_key() == key.public_key()
    assert backend.load_public(algorithm, key.public_key().public_bytes()) == key.public_key()
    assert len(key.private_bytes()) == get_algorithm(algorithm).private_key_size
    assert len(key.public_key().public_bytes()) == get_algorithm(algorithm).public_key_size


# ---- single-bit changes ------------------------------------------------------------

@pytest.mark.parametrize("algorithm", SIGNATURE_ALGORITHMS)
@PROPERTY_SETTINGS
@given(message=st.binary(min_size=1, max_size=200), bit=st.integers(min_value=0))
def test_any_single_bit_change_fails_verification(
    backend: Any, algorithm: str, message: bytes, bit: int
) -> None:
    key = key_for(backend, algorithm)
    pub = key.public_key()
    sig = key.sign(message, b"ctx")
    assert not pub.verify(flip(sig, bit), message, b"ctx")
    assert not pub.verify(sig, flip(message, bit), b"ctx")
    assert not pub.verify(sig, message, flip(b"ctx", bit))


# ---- garbage -----------------------------------------------------------------------

def _garbage_calls(backend: Any, algorithm: str, data: bytes) -> list[Any]:
    key = key_for(backend, algorithm)
    pub = key.public_key()
    calls = [lambda: backend.load_public(algorithm, data), lambda: backend.load_private(algorithm, data)]
    if get_algorithm(algorithm).kind.value == "kem":
        calls += [
            lambda: key.decapsulate(data),
            lambda: key.hpke_open(data),
            lambda: key.hpke_open(b"", aad=data),
        ]
    else:
        calls += [lambda: pub.verify(data, b"message"), lambda: pub.verify(b"", data, data),
                  lambda: key.sign(data, data)]
    return calls


@pytest.mark.parametrize("algorithm", ALL_ALGORITHMS)
@PROPERTY_SETTINGS
@given(data=st.binary(max_size=5000))
def test_random_garbage_only_raises_typed_errors(backend: Any, algorithm: str, data: bytes) -> None:
    for call in _garbage_calls(backend, algorithm, data):
        only_typed_errors(call)


@pytest.mark.parametrize("algorithm", ALL_ALGORITHMS)
def test_garbage_of_every_length_only_raises_typed_errors(backend: Any, algorithm: str) -> None:
    alg = get_algorithm(algorithm)
    longest = max(alg.public_key_size, alg.private_key_size, alg.ciphertext_size + 17, alg.signature_size) + 2
    noise = os.urandom(longest)
    key = key_for(backend, algorithm)
    pub = key.public_key()
    for n in range(longest + 1):
        data = noise[:n]
        only_typed_errors(functools.partial(backend.load_public, algorithm, data))
        if n <= alg.private_key_size + 2:
            only_typed_errors(functools.partial(backend.load_private, algorithm, data))
        if alg.kind.value == "kem":
            only_typed_errors(functools.partial(key.decapsulate, data))
            if n >= alg.ciphertext_size:
                with pytest.raises(QpherError):
                    key.hpke_open(data)
        else:
            assert pub.verify(data, b"message") is False


# ---- the FIPS 203 modulus check ----------------------------------------------------

_coefficient = st.one_of(
    st.integers(0, 3328), st.sampled_from([3328, 3329, 3330, 0xD00, 0xDFF, 0xE00, 0xFFF])
)


@pytest.mark.parametrize("k", [3, 4])
@settings(max_examples=60, deadline=None, derandomize=True)
@given(data=st.data())
def test_bitsliced_modulus_check_matches_the_coefficient_loop(k: int, data: st.DataObject) -> None:
    from qpher_proxy.crypto._primitives import mlkem_encapsulation_key_ok, mlkem_encapsulation_key_ok_slow

    coefficients = [data.draw(st.integers(0, 3328)) for _ in range(8)] * (32 * k)
    for _ in range(data.draw(st.integers(0, 3))):  # plant a few boundary values anywhere
        coefficients[data.draw(st.integers(0, 256 * k - 1))] = data.draw(_coefficient)
    packed = sum(c << (12 * i) for i, c in enumerate(coefficients)).to_bytes(384 * k, "little") + bytes(32)
    want = all(c < 3329 for c in coefficients)
    assert mlkem_encapsulation_key_ok(packed, k) is want
    assert mlkem_encapsulation_key_ok_slow(packed, k) is want
