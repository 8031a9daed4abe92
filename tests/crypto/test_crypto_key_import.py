"""The key-import encodings (``qpher_proxy.crypto.key_import``): the HPKE ``info``, the seed forms
and the seed-form PKCS#8 -- against what ``cryptography`` writes and the composite draft's vectors."""

from __future__ import annotations

from typing import Any

import pytest
from crypto_helpers import b64, cryptography_hpke_keys, cryptography_hpke_suite, vectors
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import mldsa, mlkem

from qpher_proxy.crypto.algorithms import ALGORITHMS
from qpher_proxy.crypto.key_import import (
    IMPORT_METHODS,
    check_seed,
    encode_oid,
    import_info,
    import_method,
    parse_key_material,
    seed_pkcs8,
    wrap_key,
)
from qpher_proxy.errors import DecryptionFailed, InvalidInput, InvalidKeyMaterial

CRYPTOGRAPHY_KEYS = {
    "ml-kem-768": mlkem.MLKEM768PrivateKey,
    "ml-kem-1024": mlkem.MLKEM1024PrivateKey,
    "ml-dsa-44": mldsa.MLDSA44PrivateKey,
    "ml-dsa-65": mldsa.MLDSA65PrivateKey,
    "ml-dsa-87": mldsa.MLDSA87PrivateKey,
}
COMPOSITE = ALGORITHMS["ml-dsa-65-ecdsa-p256"]


def _pkcs8(key: object) -> bytes:
    return key.private_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def test_info_is_the_prefix_the_job_id_and_the_algorithm_in_ascii() -> None:
    assert import_info("ij_abcdefghijklmnopqrstuvwxyz", "ml-dsa-65") == (
        b"qpher/v1/import:ij_abcdefghijklmnopqrstuvwxyz:ml-dsa-65"
    )


def test_methods_name_the_job_kems() -> None:
    assert {m: a.name for m, a in IMPORT_METHODS.items()} == {
        "hpke-x-wing": "x-wing", "hpke-ml-kem-768": "ml-kem-768", "hpke-ml-kem-1024": "ml-kem-1024",
    }
    for bad in ("hpke-x25519", "", None, 7):
        with pytest.raises(InvalidInput, match="method must be one of"):
            import_method(bad)


@pytest.mark.parametrize("name", sorted(CRYPTOGRAPHY_KEYS))
def test_cryptographys_pkcs8_is_read_as_its_seed_and_written_back_byte_for_byte(name: str) -> None:
    key = CRYPTOGRAPHY_KEYS[name].generate()
    der = _pkcs8(key)
    material = parse_key_material(ALGORITHMS[name], der, "pkcs8")
    assert material.seed == key.private_bytes_raw() and material.public_key is None
    assert seed_pkcs8(ALGORITHMS[name], material.seed) == der
    assert parse_key_material(ALGORITHMS[name], key.private_bytes_raw(), "seed").seed == material.seed
    assert "seed=<" in repr(material) and key.private_bytes_raw().hex() not in repr(material)


@pytest.mark.parametrize("name", sorted(CRYPTOGRAPHY_KEYS))
def test_a_version_2_pkcs8_carries_its_public_key(name: str) -> None:
    key = CRYPTOGRAPHY_KEYS[name].generate()
    public = key.public_key().public_bytes_raw()
    der = seed_pkcs8(ALGORITHMS[name], key.private_bytes_raw(), public)
    material = parse_key_material(ALGORITHMS[name], der, "pkcs8")
    assert (material.seed, material.public_key) == (key.private_bytes_raw(), public)


def test_the_composite_drafts_vectors_parse_to_their_raw_private_keys() -> None:
    by_id = {t["tcId"]: t for t in vectors("composite_mldsa65_ecdsa_p256_sha512.json")["tests"]}
    comp = by_id["id-MLDSA65-ECDSA-P256-SHA512"]
    assert parse_key_material(COMPOSITE, b64(comp["sk_pkcs8"]), "pkcs8").seed == b64(comp["sk"])
    assert parse_key_material(COMPOSITE, b64(comp["sk"]), "seed").seed == b64(comp["sk"])
    assert seed_pkcs8(COMPOSITE, b64(comp["sk"])) == b64(comp["sk_pkcs8"])
    alone = by_id["id-ML-DSA-65"]
    material = parse_key_material(ALGORITHMS["ml-dsa-65"], b64(alone["sk_pkcs8"]), "pkcs8")
    assert material.seed == b64(alone["sk"])


def test_x_wing_pkcs8_holds_the_raw_seed() -> None:
    seed = bytes(range(32))
    der = seed_pkcs8(ALGORITHMS["x-wing"], seed)
    assert encode_oid("1.3.6.1.4.1.62253.25722") in der and der.endswith(b"\x04\x20" + seed)
    assert parse_key_material(ALGORITHMS["x-wing"], der, "pkcs8").seed == seed


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_a_seed_of_the_wrong_length_is_invalid_key_material(name: str) -> None:
    alg = ALGORITHMS[name]
    for n in (0, alg.private_key_size - 1, alg.private_key_size + 1):
        with pytest.raises(InvalidKeyMaterial, match=f"{alg.private_key_size} bytes, not {n}"):
            parse_key_material(alg, b"\x07" * n, "seed")


def _composite_seed(scalar: bytes = b"\x11" * 32) -> bytes:
    return b"\x22" * 32 + bytes.fromhex("30310201010420") + scalar + bytes.fromhex("a00a06082a8648ce3d030107")


@pytest.mark.parametrize(
    "seed",
    [
        _composite_seed()[:-12] + bytes.fromhex("a00a06082a8648ce3d030108"),  # another curve OID
        _composite_seed().replace(bytes.fromhex("020101"), bytes.fromhex("020102")),  # version 2
        b"\x22" * 32 + b"\x00" * 51,  # not SEC1 at all
        _composite_seed(b"\x00" * 32),  # scalar 0
        _composite_seed(b"\xff" * 32),  # scalar >= n
    ],
    ids=["other-curve", "sec1-version", "not-sec1", "zero-scalar", "scalar-too-large"],
)
def test_an_inconsistent_composite_key_is_invalid_key_material(seed: bytes) -> None:
    assert len(seed) == 83
    with pytest.raises(InvalidKeyMaterial):
        check_seed(COMPOSITE, seed)
    assert check_seed(COMPOSITE, _composite_seed()) == _composite_seed()


def test_pkcs8_of_another_algorithm_is_refused() -> None:
    der = _pkcs8(mldsa.MLDSA44PrivateKey.generate())
    with pytest.raises(InvalidKeyMaterial, match=r"not a ml-dsa-65 key \(expected algorithm OID "):
        parse_key_material(ALGORITHMS["ml-dsa-65"], der, "pkcs8")
    with pytest.raises(InvalidKeyMaterial, match="not a ml-kem-768 key"):
        parse_key_material(ALGORITHMS["ml-kem-768"], _pkcs8(mlkem.MLKEM1024PrivateKey.generate()), "pkcs8")


def _der(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes((tag, n)) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(size))) + size + content


def test_the_expanded_and_both_forms_are_refused() -> None:
    algid = _der(0x30, _der(0x06, encode_oid("2.16.840.1.101.3.4.4.2")))

    def pkcs8(private: bytes) -> bytes:
        return _der(0x30, _der(0x02, b"\x00") + algid + _der(0x04, private))

    assert pkcs8(b"\x80\x40" + bytes(64)) == seed_pkcs8(ALGORITHMS["ml-kem-768"], bytes(64))
    expanded = _der(0x04, bytes(2400))
    both = _der(0x30, _der(0x04, bytes(64)) + expanded)
    for private in (expanded, both):
        with pytest.raises(InvalidKeyMaterial, match="only the seed form"):
            parse_key_material(ALGORITHMS["ml-kem-768"], pkcs8(private), "pkcs8")
    with pytest.raises(InvalidKeyMaterial, match="seed in PKCS#8 is 64 bytes"):
        parse_key_material(ALGORITHMS["ml-kem-768"], pkcs8(b"\x80\x20" + bytes(32)), "pkcs8")


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d + b"\x00",  # trailing byte
        lambda d: d[:-1],  # truncated
        lambda d: b"\x31" + d[1:],  # not a SEQUENCE
        lambda d: d[:2] + b"\x02\x01\x02" + d[5:],  # version 3
        lambda d: b"",
        lambda d: b"\x30\x80" + d[2:],  # indefinite length (BER, not DER)
    ],
    ids=["trailing", "truncated", "set", "version", "empty", "indefinite"],
)
def test_malformed_der_is_invalid_key_material(mutate: object) -> None:
    der = _pkcs8(mldsa.MLDSA65PrivateKey.generate())
    with pytest.raises(InvalidKeyMaterial) as info:
        parse_key_material(ALGORITHMS["ml-dsa-65"], mutate(der), "pkcs8")  # type: ignore[operator]
    assert "PKCS#8" in info.value.message


def test_an_unknown_format_is_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="format must be one of"):
        parse_key_material(ALGORITHMS["ml-dsa-65"], bytes(32), "jwk")


# ---- the wrapping: cryptography's HPKE and ours are one suite -------------------------------


@pytest.mark.parametrize("method", sorted(IMPORT_METHODS))
def test_cryptographys_hpke_wraps_what_our_hpke_opens_and_the_other_way_round(
    backend: Any, method: str
) -> None:
    """``wrap_key`` is cryptography's ``hpke.Suite`` (HKDF-SHA256, AES-256-GCM, no aad); a job key
    of either backend opens it with our RFC 9180 code and the import info, and what our code seals
    cryptography opens: ``enc || ct`` with the KEM's fixed ``enc`` length."""
    kem = IMPORT_METHODS[method]
    job = backend.generate(kem)
    job_id = "ij_" + "c" * 26
    info = import_info(job_id, "ml-dsa-65")
    material = bytes(range(32))
    wrapped = wrap_key(method, job.public_key().public_bytes(), job_id, "ml-dsa-65", material)
    assert len(wrapped) == kem.ciphertext_size + len(material) + 16
    assert job.hpke_open(wrapped, aad=b"", info=info) == material
    with pytest.raises(DecryptionFailed):
        job.hpke_open(wrapped, info=import_info(job_id, "ml-dsa-44"))
    ours = job.public_key().hpke_seal(material, aad=b"", info=info)
    private, _public = cryptography_hpke_keys(kem.name, job.private_bytes(), None)
    assert cryptography_hpke_suite(kem.name).decrypt(ours, private, info=info) == material
    with pytest.raises(InvalidInput, match="job public key is"):
        wrap_key(method, b"\x00" * 10, job_id, "ml-dsa-65", material)
