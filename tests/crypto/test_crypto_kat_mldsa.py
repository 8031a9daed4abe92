"""ML-DSA-65 known answers: NIST ACVP (keyGen, sigVer, sigGen) and Wycheproof, on every backend.

Our API is FIPS 204 *external, pure* ML-DSA (``Sign(sk, M, ctx)``), so the ACVP groups
checked are the external/pure ones; the preHash (HashML-DSA), ``internal`` and
external-mu groups exercise interfaces we do not offer.

sigGen: ``cryptography`` signs hedged (no deterministic mode), so on OpenSSL the
expected signature is checked *by verification* (our verify accepts it under the
public key our keygen derived from the seed). On liboqs the signature is reproduced
byte for byte by signing with the vector's ``rnd`` (32 zero bytes when deterministic)
through the randomness-injection test hook.
"""

from __future__ import annotations

from typing import Any

import pytest
from crypto_helpers import h, vectors

from qpher_proxy.errors import InvalidContext, InvalidKey


def test_acvp_keygen_from_seed_gives_pk(backend: Any) -> None:
    (group,) = vectors("acvp_mldsa65_keygen.json")["testGroups"]
    failures = []
    for t in group["tests"]:
        key = backend.load_private("ml-dsa-65", h(t["seed"]))
        if key.public_key().public_bytes() != h(t["pk"]):
            failures.append(t["tcId"])
        if backend.name == "liboqs" and key._sig.export_secret_key() != h(t["sk"]):
            failures.append(f"{t['tcId']}/sk")  # liboqs' expanded key is FIPS 204 sk
    assert not failures, f"tcIds {failures}"
    assert len(group["tests"]) == 25


def test_acvp_sigver_external_pure(backend: Any) -> None:
    groups = [g for g in vectors("acvp_mldsa65_sigver.json")["testGroups"]
              if g["signatureInterface"] == "external" and g["preHash"] == "pure"]
    outcomes = set()
    for group in groups:
        for t in group["tests"]:
            pub = backend.load_public("ml-dsa-65", h(t["pk"]))
            ok = pub.verify(h(t["signature"]), h(t["message"]), h(t["context"]))
            assert ok is t["testPassed"], (t["tcId"], t["reason"])
            outcomes.add(ok)
    assert outcomes == {True, False}


def _siggen_external_pure() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(g, t) for g in vectors("acvp_mldsa65_siggen.json")["testGroups"]
            if g["signatureInterface"] == "external" and g["preHash"] == "pure" for t in g["tests"]]


def test_acvp_siggen_by_verification(backend: Any) -> None:
    cases = _siggen_external_pure()
    assert {g["deterministic"] for g, _ in cases} == {True, False}
    for _, t in cases:
        key = backend.load_private("ml-dsa-65", h(t["seed"]))
        assert key.public_key().verify(h(t["signature"]), h(t["message"]), h(t["context"])), t["tcId"]


def test_acvp_siggen_byte_exact_liboqs(liboqs_backend: Any) -> None:
    for group, t in _siggen_external_pure():
        key = liboqs_backend.load_private("ml-dsa-65", h(t["seed"]))
        rnd = bytes(32) if group["deterministic"] else h(t["rnd"])
        assert key._sign_derand(h(t["message"]), h(t["context"]), rnd) == h(t["signature"]), t["tcId"]


def test_wycheproof_mldsa_65_verify(backend: Any) -> None:
    data = vectors("wycheproof_mldsa_65_verify_test.json")
    seen: set[str] = set()
    for group in data["testGroups"]:
        pk = h(group["publicKey"])
        tests = group["tests"]
        if len(pk) != 1952:
            with pytest.raises(InvalidKey):
                backend.load_public("ml-dsa-65", pk)
            assert {t["result"] for t in tests} == {"invalid"}
            seen.add("bad-key")
            continue
        pub = backend.load_public("ml-dsa-65", pk)
        for t in tests:
            ctx = h(t.get("ctx", ""))
            if len(ctx) > 255:
                with pytest.raises(InvalidContext):
                    pub.verify(h(t["sig"]), h(t["msg"]), ctx)
                assert t["result"] == "invalid"
                seen.add("bad-ctx")
                continue
            assert pub.verify(h(t["sig"]), h(t["msg"]), ctx) is (t["result"] == "valid"), (
                t["tcId"],
                t["flags"],
            )
            seen.add(t["result"])
    assert seen == {"valid", "invalid", "bad-key", "bad-ctx"}


def test_wycheproof_mldsa_65_sign_seed(backend: Any) -> None:
    data = vectors("wycheproof_mldsa_65_sign_seed_test.json")
    checked = 0
    for group in data["testGroups"]:
        seed = h(group["privateSeed"])
        if len(seed) != 32:
            with pytest.raises(InvalidKey):
                backend.load_private("ml-dsa-65", seed)
            continue
        key = backend.load_private("ml-dsa-65", seed)
        assert key.public_key().public_bytes() == h(group["publicKey"])
        for t in group["tests"]:
            if "msg" not in t:
                continue  # external-mu ("Internal") tests: not our interface
            msg, ctx = h(t["msg"]), h(t.get("ctx", ""))
            if t["result"] == "invalid":
                with pytest.raises(InvalidContext):
                    key.sign(msg, ctx)
                continue
            sig = h(t["sig"])
            assert key.public_key().verify(sig, msg, ctx), t["tcId"]
            if backend.name == "liboqs":
                rnd = h(t["rnd"]) if "rnd" in t else bytes(32)
                assert key._sign_derand(msg, ctx, rnd) == sig, t["tcId"]
            checked += 1
    assert checked >= 25
