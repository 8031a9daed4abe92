"""Known answers for the hybrids and HPKE: the X-Wing draft-10 vectors, the composite
ML-DSA draft-19 vectors and the draft-ietf-hpke-pq vectors, on every backend."""

from __future__ import annotations

from typing import Any

import pytest
from crypto_helpers import (
    b64,
    h,
    hpke_labeled_derive,
    mlkem_encaps_derand,
    vectors,
    xwing_encaps_derand,
)

from qpher_proxy.crypto import hpke
from qpher_proxy.crypto._primitives import (
    ecdsa_p256_from_sec1,
    ecdsa_p256_point,
    ecdsa_p256_public_from_point,
    ecdsa_p256_verify,
)
from qpher_proxy.kms.worker.backends._hybrid import COMPOSITE_LABEL, composite_message

# ---- X-Wing ------------------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 1, 2])
def test_xwing_draft10_vector(backend: Any, index: int) -> None:
    v = vectors("xwing_draft10_test_vectors.json")[index]
    assert v["sk"] == v["seed"]
    key = backend.load_private("x-wing", h(v["seed"]))
    assert key.private_bytes() == h(v["seed"])
    assert key.public_key().public_bytes() == h(v["pk"])
    assert key.decapsulate(h(v["ct"])) == h(v["ss"])
    pub = backend.load_public("x-wing", h(v["pk"]))
    assert xwing_encaps_derand(backend, pub, h(v["eseed"])) == (h(v["ss"]), h(v["ct"]))


# ---- Composite ML-DSA ---------------------------------------------------------------

def _composite(tc_id: str) -> dict[str, Any]:
    data = vectors("composite_mldsa65_ecdsa_p256_sha512.json")
    (test,) = [t for t in data["tests"] if t["tcId"] == tc_id]
    return {
        "m": b64(data["m"]),
        "ctx": b64(data["ctx"]),
        **{k: b64(v) for k, v in test.items() if k != "tcId"},
    }


def test_composite_vector_key_layout_and_signatures(backend: Any) -> None:
    v = _composite("id-MLDSA65-ECDSA-P256-SHA512")
    assert (len(v["pk"]), len(v["sk"])) == (2017, 83)
    key = backend.load_private("ml-dsa-65-ecdsa-p256", v["sk"])
    assert key.private_bytes() == v["sk"]
    assert key.public_key().public_bytes() == v["pk"]
    # layout: ML-DSA-65 seed -> first 1952 bytes of pk; SEC1 P-256 key -> uncompressed point
    assert backend.load_private("ml-dsa-65", v["sk"][:32]).public_key().public_bytes() == v["pk"][:1952]
    assert ecdsa_p256_point(ecdsa_p256_from_sec1(v["sk"][32:]).public_key()) == v["pk"][1952:]
    # PKCS#8 wraps the same 83 raw bytes under OID 1.3.6.1.5.5.7.6.45
    assert (
        v["sk_pkcs8"].endswith(v["sk"])
        and bytes.fromhex("06082b060105050706 2d".replace(" ", "")) in v["sk_pkcs8"]
    )

    pub = backend.load_public("ml-dsa-65-ecdsa-p256", v["pk"])
    mldsa_pub = backend.load_public("ml-dsa-65", v["pk"][:1952])
    ec_pub = ecdsa_p256_public_from_point(v["pk"][1952:])
    for sig, ctx in ((v["s"], b""), (v["sWithContext"], v["ctx"])):
        assert pub.verify(sig, v["m"], ctx)
        m_prime = composite_message(v["m"], ctx)
        assert mldsa_pub.verify(sig[:3309], m_prime, COMPOSITE_LABEL), "ML-DSA component"
        assert ecdsa_p256_verify(ec_pub, sig[3309:], m_prime), "ECDSA component"
        assert not pub.verify(sig, v["m"], ctx + b"x")
    assert not pub.verify(v["s"], v["m"], v["ctx"])  # the context is bound
    # our own signatures verify under the vector key too
    assert pub.verify(key.sign(v["m"], v["ctx"]), v["m"], v["ctx"])


def test_composite_vector_pure_mldsa65_entry(backend: Any) -> None:
    v = _composite("id-ML-DSA-65")
    key = backend.load_private("ml-dsa-65", v["sk"])
    assert key.public_key().public_bytes() == v["pk"]
    assert v["sk_pkcs8"].endswith(b"\x80\x20" + v["sk"])
    assert key.public_key().verify(v["s"], v["m"])
    assert key.public_key().verify(v["sWithContext"], v["m"], v["ctx"])


# ---- HPKE (draft-ietf-hpke-pq) ------------------------------------------------------

_KEM_ALGORITHM = {0x0041: "ml-kem-768", 0x647A: "x-wing"}


def _hpke_vector_ids() -> list[str]:
    return [f"kem{v['kem_id']:04x}-kdf{v['kdf_id']:04x}-aead{v['aead_id']:04x}"
            for v in vectors("hpke_pq_mlkem768_xwing.json")]


@pytest.mark.parametrize("index", range(3), ids=_hpke_vector_ids())
def test_hpke_pq_vector_kem(backend: Any, index: int) -> None:
    v = vectors("hpke_pq_mlkem768_xwing.json")[index]
    alg = _KEM_ALGORITHM[v["kem_id"]]
    sk = h(v["skRm"])
    # DeriveKeyPair (SHAKE256.LabeledDerive) gives the stored private key form directly
    assert hpke_labeled_derive(v["kem_id"], h(v["ikmR"]), b"DeriveKeyPair", b"", len(sk)) == sk
    key = backend.load_private(alg, sk)
    assert key.public_key().public_bytes() == h(v["pkRm"])
    assert key.decapsulate(h(v["enc"])) == h(v["shared_secret"])
    pub = backend.load_public(alg, h(v["pkRm"]))
    if alg == "x-wing":
        ss, enc = xwing_encaps_derand(backend, pub, h(v["ikmE"]))
    else:
        ss, enc = mlkem_encaps_derand(backend, pub, h(v["ikmE"]))
    assert (ss, enc) == (h(v["shared_secret"]), h(v["enc"]))


def _hkdf_vector_indexes() -> list[int]:
    # The one vector with KDF 0x0011 (one-stage SHAKE256) is outside our suite (we offer
    # HKDF-SHA256 only): its KEM part is checked by test_hpke_pq_vector_kem, and it is not
    # collected here at all rather than skipped.
    return [
        i for i, v in enumerate(vectors("hpke_pq_mlkem768_xwing.json")) if v["kdf_id"] == hpke.KDF.HKDF_SHA256
    ]


@pytest.mark.parametrize("index", _hkdf_vector_indexes())
def test_hpke_pq_vector_key_schedule_and_aead(index: int) -> None:
    v = vectors("hpke_pq_mlkem768_xwing.json")[index]
    suite = hpke.Suite(v["kem_id"], v["kdf_id"], v["aead_id"])
    assert suite.suite_id == h(v["suite_id"])
    key, base_nonce, exporter = suite.key_schedule(h(v["shared_secret"]), h(v["info"]))
    assert (key, base_nonce, exporter) == (h(v["key"]), h(v["base_nonce"]), h(v["exporter_secret"]))
    sender = suite.context(h(v["shared_secret"]), h(v["info"]))
    receiver = suite.context(h(v["shared_secret"]), h(v["info"]))
    for enc in v["encryptions"]:
        assert sender.seal(h(enc["aad"]), h(enc["pt"])) == h(enc["ct"])
        assert receiver.open(h(enc["aad"]), h(enc["ct"])) == h(enc["pt"])
    # the single-shot path is the sequence-0 message
    first = v["encryptions"][0]
    assert suite.seal_with_secret(h(v["shared_secret"]), h(first["pt"]), h(first["aad"]), h(v["info"])) == h(
        first["ct"]
    )
    assert suite.open_with_secret(h(v["shared_secret"]), h(first["ct"]), h(first["aad"]), h(v["info"])) == h(
        first["pt"]
    )
