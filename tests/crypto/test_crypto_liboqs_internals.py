"""The liboqs backend's seed handling: ML-DSA keys from the FIPS 204 seed through
OQS_randombytes injection, its guards, and its lock against concurrent consumers."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from qpher_proxy.errors import CryptoError

pytestmark = pytest.mark.liboqs


def test_injection_refuses_a_different_consumption_pattern(liboqs_backend: Any) -> None:
    import oqs.rand

    injector = liboqs_backend._injector
    seed = bytes(range(32))
    assert injector.run(seed, lambda: oqs.rand.randombytes(32)) == seed
    with pytest.raises(CryptoError, match="did not consume"):
        injector.run(seed, lambda: oqs.rand.randombytes(64))  # asked for more than injected
    with pytest.raises(CryptoError, match="did not consume"):
        injector.run(seed, lambda: oqs.rand.randombytes(16))  # asked for less
    # the default source is back: fresh, different bytes
    first, second = oqs.rand.randombytes(32), oqs.rand.randombytes(32)
    assert first != second and seed not in (first, second)


def test_an_overrun_never_repeats_seed_bytes(liboqs_backend: Any) -> None:
    import oqs.rand

    seen: list[bytes] = []
    with pytest.raises(CryptoError):
        liboqs_backend._injector.run(b"\x11" * 32, lambda: seen.append(oqs.rand.randombytes(96)))
    assert len(seen[0]) == 96 and b"\x11" * 8 not in seen[0]  # a request that does not fit gets fresh bytes


def test_mldsa_seed_self_test_passed(liboqs_backend: Any) -> None:
    assert liboqs_backend.unsupported == {}


def test_concurrent_randomness_consumers_never_see_injected_seed(liboqs_backend: Any) -> None:
    """Seeded ML-DSA key loads in one thread, encapsulations and hedged signing in another:
    every key must still come out exactly as from its seed (the lock keeps others out)."""
    seeds = [bytes([i]) * 32 for i in range(40)]
    expected = [liboqs_backend.load_private("ml-dsa-44", s).public_key().public_bytes() for s in seeds]
    kem_pub = liboqs_backend.generate("ml-kem-768").public_key()
    signer = liboqs_backend.generate("ml-dsa-44")
    errors: list[BaseException] = []
    stop = threading.Event()

    def consume() -> None:
        try:
            while not stop.is_set():
                kem_pub.encapsulate()
                signer.sign(b"m")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    worker = threading.Thread(target=consume)
    worker.start()
    try:
        for _ in range(3):
            got = [liboqs_backend.load_private("ml-dsa-44", s).public_key().public_bytes() for s in seeds]
            assert got == expected
    finally:
        stop.set()
        worker.join()
    assert not errors


def test_direct_native_calls_sign_and_decapsulate_like_the_standard(liboqs_backend: Any) -> None:
    """Signing, encapsulation and decapsulation call liboqs directly (not through
    liboqs-python's methods): the results are checked by cryptography's implementation, for
    empty and maximal contexts and messages of several sizes, with the buffers reused."""
    from cryptography.hazmat.primitives.asymmetric import mldsa, mlkem

    from qpher_proxy.crypto.algorithms import ML_DSA_65, ML_KEM_768

    sk = liboqs_backend.generate(ML_DSA_65)
    ref = mldsa.MLDSA65PrivateKey.from_seed_bytes(sk.private_bytes()).public_key()
    for message in (b"", b"m", bytes(range(256)) * 40):
        for context in (b"", b"c", bytes(255)):
            sig = sk.sign(message, context)
            assert len(sig) == ML_DSA_65.signature_size
            ref.verify(sig, message, context)
    kem = liboqs_backend.generate(ML_KEM_768)
    ref_kem = mlkem.MLKEM768PrivateKey.from_seed_bytes(kem.private_bytes())
    pub = kem.public_key()
    for _ in range(3):
        ss, ct = pub.encapsulate()
        assert ref_kem.decapsulate(ct) == ss == kem.decapsulate(ct)
        ss2, ct2 = ref_kem.public_key().encapsulate()
        assert kem.decapsulate(ct2) == ss2


def test_an_mlkem_public_key_of_the_wrong_length_is_refused(liboqs_backend: Any) -> None:
    from qpher_proxy.crypto.algorithms import ML_KEM_768
    from qpher_proxy.errors import InvalidKey
    from qpher_proxy.kms.worker.backends.liboqs import LiboqsMLKEMPublicKey

    raw = liboqs_backend.generate(ML_KEM_768).public_key().public_bytes()
    with pytest.raises(InvalidKey):
        LiboqsMLKEMPublicKey(liboqs_backend, ML_KEM_768, raw[:-1])
