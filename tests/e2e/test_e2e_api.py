"""The /v1 API end to end: the real CLI, real TLS, the policy engine and the real KMS process.

Every endpoint and every algorithm; the key lifecycle (rotation with old-version decrypt and
verify, disable/enable, scheduled destruction and its cancellation, pagination); batches with
good and bad items side by side; tenant isolation (another tenant's key answers exactly like a
key that does not exist); bad input on every endpoint; /metrics; and, at the end of the module,
the audit chain and a scan of every answer, log line and state file for secrets.

Every request goes through ``CheckedClient`` (``_openapi_check.py``): each answer is checked
against openapi.yaml (status documented for the route, body schema, error code documented for
the status, ``X-Request-Id`` equal to ``error.request_id``, no private material, sizes).
"""

from __future__ import annotations

import base64
import glob
import http.client
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from qpher_proxy.api import ROUTES, Route
from qpher_proxy.api.validation import REQUEST_FIELDS, FieldType
from qpher_proxy.crypto.algorithms import ALGORITHMS, HPKE_INFO, MAX_CONTEXT_BYTES, Kind

from ._gateway import Gateway, cli, init_state, start_gateway
from ._openapi_check import KEY_ID_RE, CheckedClient, ContractViolation, Transcript, b64, route_of, unb64

# Distinctive bytes inside every plaintext and message this module sends: none of them may
# ever show up in a log line, the audit log or a state file, raw or base64 (length divisible
# by 3, and always at the start, so that its base64 form is a fixed prefix).
MARKER = b"QPHER-E2E-PLAINTEXT-MARKER-81b7c3"
assert len(MARKER) % 3 == 0
MARKER_B64 = b64(MARKER)

MAX_BODY_BYTES = 1 << 20  # http.max_body_bytes default (init writes no override)
MAX_BATCH_ITEMS = 100  # api.max_batch_items default

KEMS = [a.name for a in ALGORITHMS.values() if a.kind is Kind.KEM]
SIGS = [a.name for a in ALGORITHMS.values() if a.kind is Kind.SIGNATURE]

TRANSCRIPT = Transcript()  # every answer this module received, scanned at the end
API_KEYS: list[str] = []  # every API key this module used, looked for in logs at the end


def fake_key_id() -> str:
    """A well-formed key id nobody was ever given (130 random bits)."""
    return "k_" + base64.b32encode(os.urandom(17)).decode().lower()[:26]


def new_api_key(gateway: Gateway, tenant: str, plan: str) -> str:
    out = cli("apikey", "create", "--config", str(gateway.directory / "config.yaml"),
              "--tenant", tenant, "--plan", plan).stdout
    key = out.strip().splitlines()[-1].strip()
    API_KEYS.append(key)
    return key


def pt(tag: str, size: int = 0) -> bytes:
    """A plaintext/message: the marker, a tag, then ``size`` random bytes."""
    return MARKER + tag.encode() + os.urandom(size)


# ---- fixtures ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def api(gateway: Gateway) -> Iterator[CheckedClient]:
    API_KEYS.append(gateway.demo_key)
    c = CheckedClient(gateway.client(), TRANSCRIPT)
    yield c
    c.close()


@pytest.fixture(scope="module")
def other(gateway: Gateway) -> Iterator[CheckedClient]:
    """A client of another tenant (plan pro: every algorithm and batches)."""
    c = CheckedClient(gateway.client(new_api_key(gateway, "e2e-api-other", "pro")), TRANSCRIPT)
    yield c
    c.close()


@pytest.fixture(scope="module")
def keys(api: CheckedClient) -> dict[str, dict[str, Any]]:
    """One enabled version-1 key of every algorithm for tenant demo; never changed by tests."""
    return {
        alg: api.ok("POST", "/v1/keys", {"algorithm": alg, "label": f"e2e-api.{alg}"}) for alg in ALGORITHMS
    }


@pytest.fixture(scope="module")
def disabled(api: CheckedClient) -> dict[str, str]:
    """A disabled ml-kem-768 and a disabled ml-dsa-65 key, with a ciphertext and a signature
    made before they were disabled."""
    kem = api.ok("POST", "/v1/keys", {"algorithm": "ml-kem-768"})["key_id"]
    sig = api.ok("POST", "/v1/keys", {"algorithm": "ml-dsa-65"})["key_id"]
    ct = api.ok("POST", "/v1/kem/encapsulate", {"key_id": kem})["ciphertext"]
    sealed = api.ok("POST", "/v1/encrypt", {"key_id": kem, "plaintext": b64(pt("disabled"))})["ciphertext"]
    signature = api.ok("POST", "/v1/sign", {"key_id": sig, "message": b64(pt("disabled"))})["signature"]
    for kid in (kem, sig):
        assert api.ok("POST", f"/v1/keys/{kid}/disable")["state"] == "disabled"
    return {"kem": kem, "sig": sig, "ct": ct, "sealed": sealed, "signature": signature}


# ---- service routes ------------------------------------------------------------------------

def test_health_ready_info(api: CheckedClient) -> None:
    assert api.ok("GET", "/healthz", auth=False) == {"status": "ok"}
    assert api.ok("GET", "/readyz", auth=False)["status"] == "ready"
    info = api.ok("GET", "/v1/info")
    by_name = {a["name"]: a for a in info["algorithms"]}
    assert set(by_name) == set(ALGORITHMS)
    for name, alg in ALGORITHMS.items():
        a = by_name[name]
        assert (a["kind"], a["mode"], a["public_key_size"]) == (
            alg.kind.value,
            alg.mode.value,
            alg.public_key_size,
        )
        if alg.kind is Kind.KEM:
            assert (a["ciphertext_size"], a["shared_secret_size"], a["hpke_kem_id"]) == (
                alg.ciphertext_size, alg.shared_secret_size, alg.hpke_kem_id)
        else:
            assert a["signature_size"] == alg.signature_size
    assert info["modes"] == {"pqc": {"kem": "ml-kem-768", "signature": "ml-dsa-65"},
                             "hybrid": {"kem": "x-wing", "signature": "ml-dsa-65-ecdsa-p256"}}
    assert info["hpke"] == {"mode": "base", "kdf_id": 1, "aead_id": 2, "info": b64(HPKE_INFO)}
    assert info["backend"]["name"] == "openssl" and info["backend"]["versions"]
    assert info["tls"]["version"] == "TLSv1.3" and info["tls"]["group"]
    assert info["limits"] == {"max_batch_items": MAX_BATCH_ITEMS, "max_context_bytes": MAX_CONTEXT_BYTES}


# ---- keys ------------------------------------------------------------------------------------

def _parse_ts(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def test_create_and_get_every_algorithm(api: CheckedClient, keys: dict[str, dict[str, Any]]) -> None:
    now = datetime.now(UTC)
    for alg, k in keys.items():
        assert KEY_ID_RE.fullmatch(k["key_id"])
        assert (k["algorithm"], k["kind"], k["label"], k["state"]) == (
            alg, ALGORITHMS[alg].kind.value, f"e2e-api.{alg}", "enabled")
        assert (k["version"], k["latest_version"], k["destroy_at"], k["destroyed_at"]) == (1, 1, None, None)
        assert [v["version"] for v in k["versions"]] == [1] and k["versions"][0]["state"] == "active"
        assert abs((_parse_ts(k["created_at"]) - now).total_seconds()) < 120
        assert len(unb64(k["public_key"])) == ALGORITHMS[alg].public_key_size
        assert api.ok("GET", f"/v1/keys/{k['key_id']}") == k
        assert api.ok("GET", f"/v1/keys/{k['key_id']}?version=1") == k
    assert len({k["key_id"] for k in keys.values()}) == len(keys)
    assert len({k["public_key"] for k in keys.values()}) == len(keys)


@pytest.mark.parametrize(("request_body", "algorithm"), [
    ({"kind": "kem"}, "ml-kem-768"),
    ({"kind": "signature"}, "ml-dsa-65"),
    ({"kind": "kem", "mode": "pqc"}, "ml-kem-768"),
    ({"kind": "kem", "mode": "hybrid"}, "x-wing"),
    ({"kind": "signature", "mode": "hybrid"}, "ml-dsa-65-ecdsa-p256"),
    ({"algorithm": "ml-dsa-87", "kind": "signature", "mode": "pqc"}, "ml-dsa-87"),
], ids=["kem", "signature", "kem-pqc", "kem-hybrid", "signature-hybrid", "all-agree"])
def test_create_by_kind_and_mode(api: CheckedClient, request_body: dict[str, str], algorithm: str) -> None:
    status, k, _ = api.call("POST", "/v1/keys", request_body)
    assert status == 201 and k["algorithm"] == algorithm and k["label"] is None


# ---- KEM ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("alg", KEMS)
def test_encapsulate_decapsulate(api: CheckedClient, keys: dict[str, dict[str, Any]], alg: str) -> None:
    kid = keys[alg]["key_id"]
    spec = ALGORITHMS[alg]
    e = api.ok("POST", "/v1/kem/encapsulate", {"key_id": kid})
    ct, ss = unb64(e["ciphertext"]), unb64(e["shared_secret"])
    assert e["key_version"] == 1 and len(ct) == spec.ciphertext_size and len(ss) == spec.shared_secret_size
    assert (
        unb64(
            api.ok("POST", "/v1/kem/decapsulate", {"key_id": kid, "ciphertext": e["ciphertext"]})[
                "shared_secret"
            ]
        )
        == ss
    )
    assert (
        unb64(
            api.ok(
                "POST",
                "/v1/kem/decapsulate",
                {"key_id": kid, "ciphertext": e["ciphertext"], "key_version": 1},
            )["shared_secret"]
        )
        == ss
    )
    # a fresh encapsulation is fresh
    e2 = api.ok("POST", "/v1/kem/encapsulate", {"key_id": kid})
    assert e2["ciphertext"] != e["ciphertext"] and e2["shared_secret"] != e["shared_secret"]
    # implicit rejection: a well-sized altered ciphertext gives another secret, not an error
    bad = bytes([ct[0] ^ 1]) + ct[1:]
    other = unb64(
        api.ok("POST", "/v1/kem/decapsulate", {"key_id": kid, "ciphertext": b64(bad)})["shared_secret"]
    )
    assert len(other) == 32 and other != ss
    for wrong in (ct[:-1], ct + b"\0", b""):
        status, code, _ = api.error("POST", "/v1/kem/decapsulate", {"key_id": kid, "ciphertext": b64(wrong)})
        assert (status, code) == (400, "invalid_ciphertext")
    status, code, err = api.error("POST", "/v1/kem/decapsulate",
                                  {"key_id": kid, "ciphertext": e["ciphertext"], "key_version": 2})
    assert (status, code) == (404, "key_not_found")


# ---- HPKE --------------------------------------------------------------------------------------

@pytest.mark.parametrize("aad", [None, b"e2e associated data"], ids=["no-aad", "aad"])
@pytest.mark.parametrize("alg", KEMS)
def test_encrypt_decrypt(
    api: CheckedClient, keys: dict[str, dict[str, Any]], alg: str, aad: bytes | None
) -> None:
    kid = keys[alg]["key_id"]
    spec = ALGORITHMS[alg]
    plaintext = pt(f"hpke {alg}", 1000)
    req: dict[str, Any] = {"key_id": kid, "plaintext": b64(plaintext)}
    if aad is not None:
        req["aad"] = b64(aad)
    r = api.ok("POST", "/v1/encrypt", req)
    ct = unb64(r["ciphertext"])
    assert len(ct) == spec.ciphertext_size + len(plaintext) + 16
    assert r["key_version"] == 1 and r["algorithm"] == alg and r["info"] == b64(HPKE_INFO)
    assert r["hpke_suite"] == {"kem_id": spec.hpke_kem_id, "kdf_id": 1, "aead_id": 2}
    opened = {
        "key_id": kid,
        "ciphertext": r["ciphertext"],
        **({"aad": req["aad"]} if aad is not None else {}),
    }
    assert unb64(api.ok("POST", "/v1/decrypt", opened)["plaintext"]) == plaintext
    assert unb64(api.ok("POST", "/v1/decrypt", {**opened, "key_version": 1})["plaintext"]) == plaintext
    assert api.ok("POST", "/v1/encrypt", req)["ciphertext"] != r["ciphertext"]  # fresh enc each time
    # authentication failures: wrong aad, missing aad, altered enc, altered ct
    wrong_aad = {"key_id": kid, "ciphertext": r["ciphertext"], "aad": b64(b"other aad")}
    no_aad = {"key_id": kid, "ciphertext": r["ciphertext"]}
    flip_enc = {**opened, "ciphertext": b64(bytes([ct[0] ^ 1]) + ct[1:])}
    flip_tag = {**opened, "ciphertext": b64(ct[:-1] + bytes([ct[-1] ^ 1]))}
    for bad in (wrong_aad, no_aad if aad is not None else None, flip_enc, flip_tag):
        if bad is None:
            continue
        status, code, err = api.error("POST", "/v1/decrypt", bad)
        assert (status, code, err["message"]) == (400, "decryption_failed", "decryption failed")


def test_encrypt_empty_plaintext(api: CheckedClient, keys: dict[str, dict[str, Any]]) -> None:
    kid = keys["ml-kem-768"]["key_id"]
    r = api.ok("POST", "/v1/encrypt", {"key_id": kid, "plaintext": ""})
    assert len(unb64(r["ciphertext"])) == ALGORITHMS["ml-kem-768"].ciphertext_size + 16
    assert api.ok("POST", "/v1/decrypt", {"key_id": kid, "ciphertext": r["ciphertext"]}) == {"plaintext": ""}


def test_decrypt_too_short_is_invalid_ciphertext(api: CheckedClient, keys: dict[str, dict[str, Any]]) -> None:
    kid = keys["ml-kem-768"]["key_id"]
    short = os.urandom(ALGORITHMS["ml-kem-768"].ciphertext_size + 15)
    status, code, _ = api.error("POST", "/v1/decrypt", {"key_id": kid, "ciphertext": b64(short)})
    assert (status, code) == (400, "invalid_ciphertext")


# ---- signatures --------------------------------------------------------------------------------

def _check_signature_size(alg: str, sig: bytes) -> None:
    if alg == "ml-dsa-65-ecdsa-p256":
        assert ALGORITHMS["ml-dsa-65"].signature_size + 8 <= len(sig) <= ALGORITHMS[alg].signature_size
    else:
        assert len(sig) == ALGORITHMS[alg].signature_size


@pytest.mark.parametrize("context", [None, b"e2e-context"], ids=["no-context", "context"])
@pytest.mark.parametrize("alg", SIGS)
def test_sign_verify(
    api: CheckedClient, keys: dict[str, dict[str, Any]], alg: str, context: bytes | None
) -> None:
    kid = keys[alg]["key_id"]
    msg = pt(f"sign {alg}", 100)
    ctx = {"context": b64(context)} if context is not None else {}
    s = api.ok("POST", "/v1/sign", {"key_id": kid, "message": b64(msg), **ctx})
    sig = unb64(s["signature"])
    assert s["key_version"] == 1
    _check_signature_size(alg, sig)
    verify = {"key_id": kid, "message": b64(msg), "signature": s["signature"], **ctx}
    assert api.ok("POST", "/v1/verify", verify) == {"valid": True}
    assert api.ok("POST", "/v1/verify", {**verify, "key_version": 1}) == {"valid": True}
    s2 = api.ok("POST", "/v1/sign", {"key_id": kid, "message": b64(msg), **ctx})
    assert api.ok("POST", "/v1/verify", {**verify, "signature": s2["signature"]}) == {"valid": True}
    wrong_ctx = {"context": b64((context or b"") + b"!")}
    for bad in (
        {**verify, "message": b64(msg + b"x")},
        {**verify, **wrong_ctx},
        {k: v for k, v in verify.items() if k != "context"} if context else {**verify, "context": b64(b"x")},
        {**verify, "signature": b64(sig[:-1])},
        {**verify, "signature": b64(sig + b"\0")},
        {**verify, "signature": b64(bytes([sig[0] ^ 1]) + sig[1:])},
        {**verify, "signature": ""},
        {**verify, "key_id": keys[next(a for a in SIGS if a != alg)]["key_id"]},  # another key
    ):
        assert api.ok("POST", "/v1/verify", bad) == {"valid": False}


@pytest.mark.parametrize("alg", SIGS)
def test_context_limit(api: CheckedClient, keys: dict[str, dict[str, Any]], alg: str) -> None:
    kid = keys[alg]["key_id"]
    msg = b64(pt("context limit"))
    longest = b64(b"c" * MAX_CONTEXT_BYTES)
    s = api.ok("POST", "/v1/sign", {"key_id": kid, "message": msg, "context": longest})
    assert api.ok("POST", "/v1/verify", {"key_id": kid, "message": msg, "signature": s["signature"],
                                         "context": longest}) == {"valid": True}
    too_long = b64(b"c" * (MAX_CONTEXT_BYTES + 1))
    for path, body in (("/v1/sign", {"key_id": kid, "message": msg, "context": too_long}),
                       ("/v1/verify", {"key_id": kid, "message": msg, "signature": s["signature"],
                                       "context": too_long})):
        status, code, err = api.error("POST", path, body)
        assert (status, code) == (400, "invalid_context") and "255" in err["message"]


# ---- rotation ----------------------------------------------------------------------------------

@pytest.mark.parametrize("alg", list(ALGORITHMS))
def test_rotation_new_ops_use_latest_old_versions_still_work(api: CheckedClient, alg: str) -> None:
    k1 = api.ok("POST", "/v1/keys", {"algorithm": alg})
    kid = k1["key_id"]
    kem = ALGORITHMS[alg].kind is Kind.KEM
    msg, plaintext = pt("rotation v1"), pt("rotation v1 hpke", 64)
    if kem:
        e1 = api.ok("POST", "/v1/kem/encapsulate", {"key_id": kid})
        c1 = api.ok("POST", "/v1/encrypt", {"key_id": kid, "plaintext": b64(plaintext), "aad": b64(b"v1")})
        assert e1["key_version"] == c1["key_version"] == 1
    else:
        s1 = api.ok("POST", "/v1/sign", {"key_id": kid, "message": b64(msg)})
        assert s1["key_version"] == 1

    k2 = api.ok("POST", f"/v1/keys/{kid}/rotate")
    assert (k2["key_id"], k2["version"], k2["latest_version"], k2["state"]) == (kid, 2, 2, "enabled")
    assert k2["public_key"] != k1["public_key"] and k2["created_at"] == k1["created_at"]
    assert [(v["version"], v["state"]) for v in k2["versions"]] == [(1, "active"), (2, "active")]
    assert api.ok("GET", f"/v1/keys/{kid}") == k2
    old = api.ok("GET", f"/v1/keys/{kid}?version=1")
    assert (old["version"], old["latest_version"], old["public_key"]) == (1, 2, k1["public_key"])
    assert api.error("GET", f"/v1/keys/{kid}?version=3")[:2] == (404, "key_not_found")

    if kem:
        e2 = api.ok("POST", "/v1/kem/encapsulate", {"key_id": kid})
        c2 = api.ok("POST", "/v1/encrypt", {"key_id": kid, "plaintext": b64(plaintext)})
        assert e2["key_version"] == c2["key_version"] == 2
        dec = "/v1/kem/decapsulate"
        assert (
            api.ok("POST", dec, {"key_id": kid, "ciphertext": e2["ciphertext"]})["shared_secret"]
            == e2["shared_secret"]
        )
        assert api.ok("POST", dec, {"key_id": kid, "ciphertext": e1["ciphertext"],
                                    "key_version": 1})["shared_secret"] == e1["shared_secret"]
        # without key_version the latest is used: v1's ciphertext gives an unrelated secret
        assert (
            api.ok("POST", dec, {"key_id": kid, "ciphertext": e1["ciphertext"]})["shared_secret"]
            != e1["shared_secret"]
        )
        assert (
            unb64(
                api.ok(
                    "POST",
                    "/v1/decrypt",
                    {"key_id": kid, "ciphertext": c1["ciphertext"], "aad": b64(b"v1"), "key_version": 1},
                )["plaintext"]
            )
            == plaintext
        )
        assert (
            unb64(api.ok("POST", "/v1/decrypt", {"key_id": kid, "ciphertext": c2["ciphertext"]})["plaintext"])
            == plaintext
        )
        assert api.error("POST", "/v1/decrypt", {"key_id": kid, "ciphertext": c1["ciphertext"],
                                                 "aad": b64(b"v1")})[:2] == (400, "decryption_failed")
    else:
        s2 = api.ok("POST", "/v1/sign", {"key_id": kid, "message": b64(msg)})
        assert s2["key_version"] == 2
        v = {"key_id": kid, "message": b64(msg)}
        assert api.ok("POST", "/v1/verify", {**v, "signature": s2["signature"]}) == {"valid": True}
        assert api.ok("POST", "/v1/verify", {**v, "signature": s1["signature"], "key_version": 1}) == {
            "valid": True
        }
        assert api.ok("POST", "/v1/verify", {**v, "signature": s1["signature"]}) == {"valid": False}
        assert api.ok("POST", "/v1/verify", {**v, "signature": s2["signature"], "key_version": 1}) == {
            "valid": False
        }


# ---- disable / enable / destroy / cancel --------------------------------------------------------

def _operations(kid: str, kind: Kind, material: dict[str, str]) -> list[tuple[str, dict[str, Any]]]:
    """Every crypto operation on ``kid`` (single and batch), with valid arguments."""
    if kind is Kind.KEM:
        single = [
            ("/v1/kem/encapsulate", {"key_id": kid}),
            ("/v1/kem/decapsulate", {"key_id": kid, "ciphertext": material["ct"]}),
            ("/v1/encrypt", {"key_id": kid, "plaintext": b64(pt("lifecycle"))}),
            ("/v1/decrypt", {"key_id": kid, "ciphertext": material["sealed"]}),
        ]
    else:
        single = [
            ("/v1/sign", {"key_id": kid, "message": b64(pt("lifecycle"))}),
            ("/v1/verify", {"key_id": kid, "message": material["msg"], "signature": material["signature"]}),
        ]
    return single + [(p + "/batch", {"items": [b]}) for p, b in single]


def _material(api: CheckedClient, kid: str, kind: Kind) -> dict[str, str]:
    if kind is Kind.KEM:
        return {
            "ct": api.ok("POST", "/v1/kem/encapsulate", {"key_id": kid})["ciphertext"],
            "sealed": api.ok("POST", "/v1/encrypt", {"key_id": kid, "plaintext": b64(pt("m"))})["ciphertext"],
        }
    msg = b64(pt("lifecycle message"))
    return {"msg": msg, "signature": api.ok("POST", "/v1/sign", {"key_id": kid, "message": msg})["signature"]}


def _all_refused(api: CheckedClient, ops: list[tuple[str, dict[str, Any]]], status: int, code: str,
                 message_part: str) -> None:
    for path, body in ops:
        if path.endswith("/batch"):
            items = api.ok("POST", path, body)["items"]
            assert len(items) == 1 and items[0]["ok"] is False, (path, items)
            assert items[0]["error"]["code"] == code and message_part in items[0]["error"]["message"], (
                path,
                items,
            )
        else:
            got, c, err = api.error("POST", path, body)
            assert (got, c) == (status, code) and message_part in err["message"], (path, err)


def _all_work(api: CheckedClient, ops: list[tuple[str, dict[str, Any]]]) -> None:
    for path, body in ops:
        r = api.ok("POST", path, body)
        if path.endswith("/batch"):
            assert r["items"][0]["ok"] is True, (path, r)
        if path.endswith("/verify"):
            assert r == {"valid": True}


@pytest.mark.parametrize("alg", ["ml-kem-768", "ml-dsa-65"])
def test_disable_enable_destroy_cancel(api: CheckedClient, alg: str) -> None:
    kind = ALGORITHMS[alg].kind
    kid = api.ok("POST", "/v1/keys", {"algorithm": alg})["key_id"]
    ops = _operations(kid, kind, _material(api, kid, kind))
    _all_work(api, ops)

    # disabled: every operation refused with the KMS's 409 key_disabled; metadata still readable
    k = api.ok("POST", f"/v1/keys/{kid}/disable")
    assert k["state"] == "disabled" and k["public_key"] is not None
    assert api.ok("POST", f"/v1/keys/{kid}/disable")["state"] == "disabled"  # idempotent
    _all_refused(api, ops, 409, "key_disabled", "disabled")
    assert api.error("POST", f"/v1/keys/{kid}/rotate")[:2] == (409, "key_disabled")
    assert api.ok("GET", f"/v1/keys/{kid}")["state"] == "disabled"
    assert api.ok("POST", f"/v1/keys/{kid}/enable")["state"] == "enabled"
    _all_work(api, ops)

    # scheduled for destruction: refused the same way; destroy_at about kms.destroy_delay (24 h) away
    before = time.time()
    k = api.ok("DELETE", f"/v1/keys/{kid}")
    assert k["state"] == "pending_destruction" and k["destroyed_at"] is None and k["public_key"] is not None
    delay = _parse_ts(k["destroy_at"]).timestamp() - before
    assert 86_400 - 5 <= delay <= 86_400 + 5
    again = api.call("DELETE", f"/v1/keys/{kid}")
    assert again[0] == 202 and again[1]["destroy_at"] == k["destroy_at"]  # the first date stays
    _all_refused(api, ops, 409, "key_disabled", "destruction")
    for action in ("enable", "disable", "rotate"):
        status, code, _ = api.error("POST", f"/v1/keys/{kid}/{action}")
        assert status == 409 and code in ("invalid_key_state", "key_disabled"), (action, code)
    assert api.ok("GET", f"/v1/keys/{kid}")["state"] == "pending_destruction"

    k = api.ok("POST", f"/v1/keys/{kid}/cancel-destroy")
    assert (k["state"], k["destroy_at"]) == ("enabled", None)
    assert api.error("POST", f"/v1/keys/{kid}/cancel-destroy")[:2] == (409, "invalid_key_state")
    _all_work(api, ops)

    # a disabled key scheduled for destruction and cancelled is disabled again
    api.ok("POST", f"/v1/keys/{kid}/disable")
    assert api.ok("DELETE", f"/v1/keys/{kid}")["state"] == "pending_destruction"
    assert api.ok("POST", f"/v1/keys/{kid}/cancel-destroy")["state"] == "disabled"
    assert api.ok("POST", f"/v1/keys/{kid}/enable")["state"] == "enabled"


# ---- listing -----------------------------------------------------------------------------------

def test_list_pages_through_cursors(gateway: Gateway) -> None:
    c = CheckedClient(gateway.client(new_api_key(gateway, "e2e-api-list", "pro")), TRANSCRIPT)
    try:
        created = [c.ok("POST", "/v1/keys", {"algorithm": alg}) for alg in ALGORITHMS]  # 7 keys
        ids = sorted(k["key_id"] for k in created)
        for limit in (1, 3, 7, 100):
            seen: list[str] = []
            pages: list[int] = []
            path = f"/v1/keys?limit={limit}"
            for _ in range(20):
                page = c.ok("GET", path)
                assert len(page["keys"]) <= limit
                pages.append(len(page["keys"]))
                seen += [k["key_id"] for k in page["keys"]]
                if page["next_cursor"] is None:
                    break
                path = f"/v1/keys?limit={limit}&cursor={page['next_cursor']}"
            else:
                raise AssertionError("pagination does not end")
            assert seen == ids, limit  # every key once, in key-id order
            assert all(n == limit for n in pages[: len(ids) // limit]), (limit, pages)
        assert [k["key_id"] for k in c.ok("GET", "/v1/keys")["keys"]] == ids  # default limit 50
        listed = {k["key_id"]: k for k in c.ok("GET", "/v1/keys?limit=100")["keys"]}
        for k in created:
            assert listed[k["key_id"]] == k
        # a cursor past every key: an empty last page
        assert c.ok("GET", "/v1/keys?cursor=k_" + "z" * 26) == {"keys": [], "next_cursor": None}
        for query in ("limit=0", "limit=101", "limit=-1", "limit=abc", "limit=1.5", "limit=", "cursor=nope",
                      "cursor=" + "K_" + "A" * 26, "x=1", "limit=2&limit=3", "version=1"):
            status, code, _ = c.error("GET", f"/v1/keys?{query}")
            assert (status, code) == (400, "invalid_input"), query
    finally:
        c.close()


def test_destroyed_key_is_a_tombstone(tmp_path: Path) -> None:
    """With ``kms.destroy_delay: 0`` a DELETE destroys at once: the key files go, the metadata
    stays (state destroyed, no public key), every use is 410 key_destroyed, and another tenant
    still cannot tell the tombstone from a key that never existed."""
    directory = tmp_path / "state"
    init_state(directory, **{"crypto.backend": "openssl", "kms.destroy_delay": 0})
    gw = start_gateway(directory)
    c = CheckedClient(gw.client())
    other = CheckedClient(gw.client(new_api_key(gw, "e2e-api-tomb-other", "pro")))
    try:
        kem = c.ok("POST", "/v1/keys", {"algorithm": "ml-kem-768"})["key_id"]
        sig = c.ok("POST", "/v1/keys", {"algorithm": "ml-dsa-65"})["key_id"]
        material = {**_material(c, kem, Kind.KEM), **_material(c, sig, Kind.SIGNATURE)}
        c.ok("POST", f"/v1/keys/{kem}/rotate")

        def key_files(kid: str) -> list[Path]:
            return [p for p in (directory / "kms").rglob("*") if kid in str(p) and p.is_file()]

        assert len(key_files(kem)) == 2 and len(key_files(sig)) == 1
        for kid, versions in ((kem, 2), (sig, 1)):
            k = c.ok("DELETE", f"/v1/keys/{kid}")
            assert (k["state"], k["public_key"], k["destroy_at"]) == ("destroyed", None, None) and k[
                "destroyed_at"
            ]
            assert [v["state"] for v in k["versions"]] == ["destroyed"] * versions
            assert key_files(kid) == []
            assert c.ok("GET", f"/v1/keys/{kid}") == k
            assert c.ok("GET", f"/v1/keys/{kid}?version=1")["public_key"] is None
        listed = {k["key_id"]: k["state"] for k in c.ok("GET", "/v1/keys")["keys"]}
        assert listed == {kem: "destroyed", sig: "destroyed"}
        for kid, kind in ((kem, Kind.KEM), (sig, Kind.SIGNATURE)):
            _all_refused(c, _operations(kid, kind, material), 410, "key_destroyed", "destroyed")
            for method, action in (
                ("DELETE", ""),
                ("POST", "/rotate"),
                ("POST", "/disable"),
                ("POST", "/enable"),
                ("POST", "/cancel-destroy"),
            ):
                assert c.error(method, f"/v1/keys/{kid}{action}")[:2] == (410, "key_destroyed"), action
            unknown = fake_key_id()
            assert _shape(other.call("GET", f"/v1/keys/{kid}")[1], kid) == \
                   _shape(other.call("GET", f"/v1/keys/{unknown}")[1], unknown)
    finally:
        c.close()
        other.close()
        code = gw.stop()
    assert code == 0, f"gateway exited {code} on SIGTERM"


# ---- batches -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Item:
    body: Any
    want: str  # "ok" or an error code
    check: Callable[[dict[str, Any]], bool] | None = None


def _run_batch(api: CheckedClient, path: str, items: list[Item]) -> list[dict[str, Any]]:
    answer = api.ok("POST", path, {"items": [i.body for i in items]})["items"]
    assert len(answer) == len(items)
    for n, (item, got) in enumerate(zip(items, answer, strict=True)):
        if item.want == "ok":
            assert got["ok"] is True, (path, n, got)
            if item.check is not None:
                assert item.check(got), (path, n, got)
        else:
            assert got["ok"] is False and got["error"]["code"] == item.want, (path, n, item.want, got)
    return answer


def test_batches_mix_good_and_bad_items(api: CheckedClient, other: CheckedClient,
                                        keys: dict[str, dict[str, Any]], disabled: dict[str, str]) -> None:
    k768, kxw, k1024 = (keys[a]["key_id"] for a in ("ml-kem-768", "x-wing", "ml-kem-1024"))
    s65, scomp, s44 = (keys[a]["key_id"] for a in ("ml-dsa-65", "ml-dsa-65-ecdsa-p256", "ml-dsa-44"))
    theirs = other.ok("POST", "/v1/keys", {"algorithm": "ml-kem-768"})["key_id"]
    theirs_sig = other.ok("POST", "/v1/keys", {"algorithm": "ml-dsa-65"})["key_id"]
    nobody = fake_key_id()

    # encapsulate
    enc = _run_batch(api, "/v1/kem/encapsulate/batch", [
        Item({"key_id": k768}, "ok"), Item({"key_id": kxw}, "ok"), Item({"key_id": nobody}, "key_not_found"),
        Item({"key_id": theirs}, "key_not_found"), Item({"key_id": disabled["kem"]}, "key_disabled"),
        Item({"key_id": s65}, "algorithm_mismatch"), Item(5, "invalid_input"), Item({}, "invalid_input"),
        Item({"key_id": k768, "x": 1}, "invalid_input"), Item({"key_id": "nope"}, "key_not_found"),
        Item({"key_id": k1024}, "ok"),
    ])
    for kid, got in ((k768, enc[0]), (kxw, enc[1]), (k1024, enc[10])):
        assert api.ok("POST", "/v1/kem/decapsulate", {"key_id": kid, "ciphertext": got["ciphertext"]}
                      )["shared_secret"] == got["shared_secret"]

    # decapsulate
    ct768, ctxw = enc[0]["ciphertext"], enc[1]["ciphertext"]
    _run_batch(
        api,
        "/v1/kem/decapsulate/batch",
        [
            Item(
                {"key_id": k768, "ciphertext": ct768},
                "ok",
                lambda r: r["shared_secret"] == enc[0]["shared_secret"],
            ),
            Item(
                {"key_id": kxw, "ciphertext": ctxw, "key_version": 1},
                "ok",
                lambda r: r["shared_secret"] == enc[1]["shared_secret"],
            ),
            Item({"key_id": k768, "ciphertext": ctxw}, "invalid_ciphertext"),
            Item({"key_id": k768, "ciphertext": "not base64!"}, "invalid_base64"),
            Item({"key_id": k768, "ciphertext": ct768, "key_version": 7}, "key_not_found"),
            Item({"key_id": k768, "ciphertext": ct768, "key_version": 0}, "invalid_input"),
            Item({"key_id": disabled["kem"], "ciphertext": disabled["ct"]}, "key_disabled"),
            Item({"key_id": theirs, "ciphertext": ct768}, "key_not_found"),
            Item({"key_id": s65, "ciphertext": ct768}, "algorithm_mismatch"),
            Item({"key_id": k768}, "invalid_input"),
        ],
    )

    # encrypt
    p1, p2 = pt("batch one"), pt("batch two", 300)
    sealed = _run_batch(
        api,
        "/v1/encrypt/batch",
        [
            Item({"key_id": k768, "plaintext": b64(p1)}, "ok"),
            Item(
                {"key_id": kxw, "plaintext": b64(p2), "aad": b64(b"batch aad")},
                "ok",
                lambda r: r["algorithm"] == "x-wing",
            ),
            Item({"key_id": k768, "plaintext": 17}, "invalid_input"),
            Item({"key_id": k768, "plaintext": "YQ"}, "invalid_base64"),
            Item({"key_id": s44, "plaintext": b64(p1)}, "algorithm_mismatch"),
            Item({"key_id": disabled["kem"], "plaintext": b64(p1)}, "key_disabled"),
            Item({"key_id": nobody, "plaintext": b64(p1)}, "key_not_found"),
            Item([], "invalid_input"),
        ],
    )

    # decrypt
    c1, c2 = sealed[0]["ciphertext"], sealed[1]["ciphertext"]
    raw2 = unb64(c2)
    _run_batch(
        api,
        "/v1/decrypt/batch",
        [
            Item({"key_id": k768, "ciphertext": c1}, "ok", lambda r: unb64(r["plaintext"]) == p1),
            Item(
                {"key_id": kxw, "ciphertext": c2, "aad": b64(b"batch aad")},
                "ok",
                lambda r: unb64(r["plaintext"]) == p2,
            ),
            Item({"key_id": kxw, "ciphertext": c2}, "decryption_failed"),
            Item(
                {
                    "key_id": kxw,
                    "ciphertext": b64(raw2[:-1] + bytes([raw2[-1] ^ 1])),
                    "aad": b64(b"batch aad"),
                },
                "decryption_failed",
            ),
            Item({"key_id": k768, "ciphertext": c2}, "decryption_failed"),
            Item({"key_id": disabled["kem"], "ciphertext": disabled["sealed"]}, "key_disabled"),
            Item({"key_id": theirs, "ciphertext": c1}, "key_not_found"),
            Item({"key_id": k768, "ciphertext": c1, "aad": None}, "invalid_input"),
        ],
    )

    # sign
    m = pt("batch message")
    signed = _run_batch(api, "/v1/sign/batch", [
        Item({"key_id": s65, "message": b64(m)}, "ok", lambda r: r["key_version"] == 1),
        Item({"key_id": scomp, "message": b64(m), "context": b64(b"ctx")}, "ok"),
        Item({"key_id": s44, "message": b64(m), "context": b64(b"c" * 256)}, "invalid_context"),
        Item({"key_id": s44, "message": b64(m) + "\n"}, "invalid_base64"),
        Item({"key_id": k768, "message": b64(m)}, "algorithm_mismatch"),
        Item({"key_id": disabled["sig"], "message": b64(m)}, "key_disabled"),
        Item({"key_id": theirs_sig, "message": b64(m)}, "key_not_found"),
        Item({"key_id": s44}, "invalid_input"),
        Item({"key_id": s44, "message": b64(m)}, "ok"),
    ])

    # verify: a bad signature is an item that succeeded with valid false
    _run_batch(
        api,
        "/v1/verify/batch",
        [
            Item(
                {"key_id": s65, "message": b64(m), "signature": signed[0]["signature"]},
                "ok",
                lambda r: r["valid"] is True,
            ),
            Item(
                {
                    "key_id": scomp,
                    "message": b64(m),
                    "signature": signed[1]["signature"],
                    "context": b64(b"ctx"),
                },
                "ok",
                lambda r: r["valid"] is True,
            ),
            Item(
                {"key_id": scomp, "message": b64(m), "signature": signed[1]["signature"]},
                "ok",
                lambda r: r["valid"] is False,
            ),
            Item(
                {"key_id": s65, "message": b64(m + b"!"), "signature": signed[0]["signature"]},
                "ok",
                lambda r: r["valid"] is False,
            ),
            Item(
                {"key_id": s65, "message": b64(m), "signature": signed[0]["signature"], "key_version": 2},
                "key_not_found",
            ),
            Item(
                {
                    "key_id": s65,
                    "message": b64(m),
                    "signature": signed[0]["signature"],
                    "context": b64(b"c" * 256),
                },
                "invalid_context",
            ),
            Item(
                {"key_id": disabled["sig"], "message": b64(m), "signature": disabled["signature"]},
                "key_disabled",
            ),
            Item(
                {"key_id": k768, "message": b64(m), "signature": signed[0]["signature"]}, "algorithm_mismatch"
            ),
            Item(
                {"key_id": theirs_sig, "message": b64(m), "signature": signed[0]["signature"]},
                "key_not_found",
            ),
            Item({"key_id": s65, "message": b64(m), "signature": True}, "invalid_input"),
        ],
    )


@pytest.mark.parametrize("path", [r.template for r in ROUTES if r.batch])
def test_batch_envelope_errors(api: CheckedClient, keys: dict[str, dict[str, Any]], path: str) -> None:
    for body, code in (
        ({"items": []}, "invalid_input"),
        ({"items": {}}, "invalid_input"),
        ({"items": None}, "invalid_input"),
        ({}, "invalid_input"),
        ({"items": [{}], "extra": 1}, "invalid_input"),
        ([{}], "invalid_input"),
        ({"items": [{}] * (MAX_BATCH_ITEMS + 1)}, "batch_too_large"),
    ):
        status, got, _ = api.error("POST", path, body)
        assert (status, got) == (400, code), (path, body if len(str(body)) < 80 else "...")


def test_batch_of_the_maximum_size(api: CheckedClient, keys: dict[str, dict[str, Any]]) -> None:
    kid = keys["ml-kem-768"]["key_id"]
    items = api.ok("POST", "/v1/kem/encapsulate/batch", {"items": [{"key_id": kid}] * MAX_BATCH_ITEMS})[
        "items"
    ]
    assert len(items) == MAX_BATCH_ITEMS and all(i["ok"] for i in items)
    assert len({i["shared_secret"] for i in items}) == MAX_BATCH_ITEMS


# ---- tenant isolation --------------------------------------------------------------------------

def _shape(body: dict[str, Any], key_id: str) -> dict[str, Any]:
    """An error answer without its request id, with the probed key id replaced."""
    err = dict(body["error"])
    err.pop("request_id", None)
    err["message"] = err["message"].replace(key_id, "<key id>")
    return err


def test_another_tenants_key_answers_like_an_unknown_key(api: CheckedClient, other: CheckedClient,
                                                          keys: dict[str, dict[str, Any]]) -> None:
    kem, sig = keys["ml-kem-768"]["key_id"], keys["ml-dsa-65"]["key_id"]
    e = api.ok("POST", "/v1/kem/encapsulate", {"key_id": kem})
    sealed = api.ok("POST", "/v1/encrypt", {"key_id": kem, "plaintext": b64(pt("isolation"))})["ciphertext"]
    msg = b64(pt("isolation"))
    signature = api.ok("POST", "/v1/sign", {"key_id": sig, "message": msg})["signature"]

    def probes(kem_id: str, sig_id: str) -> list[tuple[str, str, Any]]:
        out: list[tuple[str, str, Any]] = []
        for kid in (kem_id, sig_id):
            out += [("GET", f"/v1/keys/{kid}", None), ("GET", f"/v1/keys/{kid}?version=1", None),
                    ("POST", f"/v1/keys/{kid}/rotate", None), ("POST", f"/v1/keys/{kid}/disable", None),
                    ("POST", f"/v1/keys/{kid}/enable", None), ("DELETE", f"/v1/keys/{kid}", None),
                    ("POST", f"/v1/keys/{kid}/cancel-destroy", None)]
        singles = [
            ("/v1/kem/encapsulate", {"key_id": kem_id}),
            ("/v1/kem/decapsulate", {"key_id": kem_id, "ciphertext": e["ciphertext"]}),
            ("/v1/kem/decapsulate", {"key_id": kem_id, "ciphertext": e["ciphertext"], "key_version": 1}),
            ("/v1/encrypt", {"key_id": kem_id, "plaintext": msg}),
            ("/v1/decrypt", {"key_id": kem_id, "ciphertext": sealed}),
            ("/v1/sign", {"key_id": sig_id, "message": msg}),
            ("/v1/verify", {"key_id": sig_id, "message": msg, "signature": signature}),
            ("/v1/verify", {"key_id": sig_id, "message": msg, "signature": signature, "key_version": 1}),
        ]
        out += [("POST", p, b) for p, b in singles]
        out += [("POST", p + "/batch", {"items": [b]}) for p, b in singles]
        return out

    unknown_kem, unknown_sig = fake_key_id(), fake_key_id()
    theirs = probes(kem, sig)
    nobodys = probes(unknown_kem, unknown_sig)
    for (method, path, body), (_, path2, body2) in zip(theirs, nobodys, strict=True):
        s1, b1, h1 = other.call(method, path, body)
        s2, b2, h2 = other.call(method, path2, body2)
        probed = kem if kem in path + json.dumps(body) else sig
        unknown = unknown_kem if probed == kem else unknown_sig
        if path.endswith("/batch"):
            assert s1 == s2 == 200, (path, b1)
            (i1,), (i2,) = b1["items"], b2["items"]
            assert i1["ok"] is False and i1["error"]["code"] == "key_not_found", (path, i1)
            assert {**i1["error"], "message": i1["error"]["message"].replace(probed, "<key id>")} == \
                   {**i2["error"], "message": i2["error"]["message"].replace(unknown, "<key id>")}, path
        else:
            assert s1 == s2 == 404 and b1["error"]["code"] == "key_not_found", (method, path, b1)
            assert _shape(b1, probed) == _shape(b2, unknown), (method, path)
            assert sorted(h1.keys()) == sorted(h2.keys()), (method, path)
            assert h1["content-length"] == h2["content-length"], (method, path)
    # none of that touched demo's keys, and listings stay within the tenant
    for alg in ("ml-kem-768", "ml-dsa-65"):
        now = api.ok("GET", f"/v1/keys/{keys[alg]['key_id']}")
        assert (now["state"], now["latest_version"], now["destroy_at"]) == ("enabled", 1, None)
    their_ids = {k["key_id"] for k in other.ok("GET", "/v1/keys?limit=100")["keys"]}
    assert not their_ids & {k["key_id"] for k in keys.values()}
    # and the other way round: demo cannot see the other tenant's key either
    mine = other.ok("POST", "/v1/keys", {"algorithm": "ml-dsa-44"})["key_id"]
    unknown = fake_key_id()
    for path in (f"/v1/keys/{mine}", f"/v1/keys/{unknown}"):
        assert api.error("GET", path)[:2] == (404, "key_not_found")
    assert _shape(api.call("POST", "/v1/sign", {"key_id": mine, "message": msg})[1], mine) == \
           _shape(api.call("POST", "/v1/sign", {"key_id": unknown, "message": msg})[1], unknown)


# ---- bad input on every endpoint ----------------------------------------------------------------

@dataclass(frozen=True)
class Bad:
    name: str
    method: str
    path: str
    status: int
    code: str
    body: Any = None
    raw: bytes | None = None


_BAD_JSON: list[tuple[str, bytes, str]] = [
    ("truncated", b'{"key_id": ', "invalid_json"),
    ("not-utf8", b'{"key_id": "\xff"}', "invalid_json"),
    ("empty", b"", "invalid_json"),
    ("whitespace", b"  \n", "invalid_json"),
    ("two-documents", b"{} {}", "invalid_json"),
    ("nan", b'{"key_id": NaN}', "invalid_json"),
    ("duplicate-key", b'{"key_id": "a", "key_id": "b"}', "invalid_json"),
    ("array", b"[]", "invalid_input"),
    ("string", b'"hello"', "invalid_input"),
    ("null", b"null", "invalid_input"),
    ("number", b"5", "invalid_input"),
]
_WRONG_TYPES: list[Any] = [5, None, True, [], {}, 1.5]
_BAD_B64 = ["!!!!", "abc", "YQ", "YR==", "YQ==\n", " YQ==", "YQ==YQ==", "-_-_", "\u00e9A=="]
_BAD_VERSIONS: list[Any] = [0, -1, 2**31, "1", 1.5, True, None]


def _valid_body(op: str, ctx: dict[str, str]) -> dict[str, Any]:
    kem, sig = ctx["kem"], ctx["sig"]
    msg = b64(pt("bad input"))
    return {
        "kem.encapsulate": {"key_id": kem},
        "kem.decapsulate": {"key_id": kem, "ciphertext": ctx["ct"]},
        "encrypt": {"key_id": kem, "plaintext": msg},
        "decrypt": {"key_id": kem, "ciphertext": ctx["sealed"]},
        "sign": {"key_id": sig, "message": msg},
        "verify": {"key_id": sig, "message": ctx["msg"], "signature": ctx["signature"]},
    }[op]


_IMPORT_BODY_OPS = ("import_jobs.create", "keys.import", "keys.import_version")


def _import_bad_cases(route: Route, ctx: dict[str, str], path: str) -> list[Bad]:
    """Key import: every field of the three import bodies, the job ids of the two GETs. What the
    KMS says of the wrapped key itself is tested in test_e2e_import."""
    m, op = route.method, route.operation
    bad_jobs = [("made-up", "ij_" + "q" * 26), ("theirs", ctx["their_job"]), ("malformed", "job-1"),
                ("upper", ctx["job"].upper())]
    if op == "import_jobs.list":
        return [Bad(f"query-{q}", m, f"{path}?{q}", 400, "invalid_input")
                for q in ("limit=0", "limit=101", "cursor=x", f"cursor={ctx['throwaway']}", "x=1")]
    if op == "import_jobs.read":
        at = route.template.replace("{import_job_id}", "{}").format
        return [Bad(f"job-{n}", m, at(j), 404, "import_job_not_found") for n, j in bad_jobs] + [
            Bad("query", m, at(ctx["job"]) + "?x=1", 400, "invalid_input")]
    spec = REQUEST_FIELDS[op]
    valid: dict[str, Any] = {
        "import_jobs.create": {"method": "hpke-x-wing", "ttl_seconds": 3600},
        "keys.import": {"import_job_id": ctx["job"], "algorithm": "ml-dsa-65",
                        "wrapped_key": b64(bytes(1136))},
        "keys.import_version": {"import_job_id": ctx["job"], "wrapped_key": b64(bytes(1136))},
    }[op]
    cases = [Bad("unknown-field", m, path, 400, "invalid_input", body={**valid, "extra": 1}),
             Bad("query", m, path + "?x=1", 400, "invalid_input", body=valid)]
    for fname, f in spec.items():
        if f.required:
            cases.append(Bad(f"missing-{fname}", m, path, 400, "invalid_input",
                             body={k: v for k, v in valid.items() if k != fname}))
        else:
            cases.append(Bad(f"null-{fname}", m, path, 400, "invalid_input", body={**valid, fname: None}))
        for wrong in _WRONG_TYPES:
            if f.type is FieldType.TTL and type(wrong) is int:
                continue
            cases.append(Bad(f"type-{fname}-{type(wrong).__name__}", m, path, 400, "invalid_input",
                             body={**valid, fname: wrong}))
    if op == "import_jobs.create":
        cases += [Bad(f"method-{x}", m, path, 400, "invalid_input", body={"method": x})
                  for x in ("hpke-rsa", "HPKE-X-WING", "")]
        cases += [Bad(f"ttl-{t}", m, path, 400, "invalid_input", body={**valid, "ttl_seconds": t})
                  for t in (0, 59, 604801, 60.5, 2**63)]
        return cases
    cases += [Bad(f"b64-{bad!r}", m, path, 400, "invalid_base64", body={**valid, "wrapped_key": bad})
              for bad in _BAD_B64]
    cases += [Bad(f"job-{n}", m, path, 404, "import_job_not_found", body={**valid, "import_job_id": j})
              for n, j in bad_jobs]
    cases += [
        Bad("wrapped-3073", m, path, 400, "invalid_input", body={**valid, "wrapped_key": b64(bytes(3073))}),
        Bad("format-unknown", m, path, 400, "invalid_input", body={**valid, "format": "der"}),
        Bad("does-not-open", m, path, 400, "invalid_wrapped_key", body=valid),
    ]
    if op == "keys.import":
        cases += [
            Bad("unknown-algorithm", m, path, 400, "unknown_algorithm", body={**valid, "algorithm": "rsa"}),
            Bad("label-space", m, path, 400, "invalid_input", body={**valid, "label": "a b"})]
    else:
        cases += [Bad(f"key-{bad_id[:8]}", m, route.template.replace("{key_id}", bad_id), 404,
                      "key_not_found", body=valid) for bad_id in ("nope", fake_key_id(), ctx["theirs"])]
    return cases


def _bad_cases(route: Route, ctx: dict[str, str]) -> list[Bad]:
    m, op = route.method, route.operation
    path = route.template.replace("{key_id}", ctx["throwaway"])
    cases: list[Bad] = []
    if route.has_body or (m != "GET"):
        for name, raw, code in _BAD_JSON:
            if name in ("empty", "whitespace") and not route.has_body:
                continue  # routes without a body accept an empty one
            cases.append(Bad(f"json-{name}", m, path, 400, code, raw=raw))
    if op.startswith("import_jobs.") or op in _IMPORT_BODY_OPS:
        return cases + _import_bad_cases(route, ctx, path)
    if op in REQUEST_FIELDS and not route.batch and op != "keys.create":
        spec = REQUEST_FIELDS[op]
        valid = _valid_body(op, ctx)
        cases.append(Bad("unknown-field", m, path, 400, "invalid_input", body={**valid, "extra": 1}))
        for fname in (n for n, f in spec.items() if not f.required):  # omitted, never null
            cases.append(Bad(f"null-{fname}", m, path, 400, "invalid_input", body={**valid, fname: None}))
        cases.append(Bad("query", m, path + "?x=1", 400, "invalid_input", body=valid))
        for fname, f in spec.items():
            if f.required:
                cases.append(Bad(f"missing-{fname}", m, path, 400, "invalid_input",
                                 body={k: v for k, v in valid.items() if k != fname}))
            for wrong in _WRONG_TYPES:
                if f.type is FieldType.VERSION and type(wrong) is int:
                    continue  # a well-typed version: see _BAD_VERSIONS
                cases.append(Bad(f"type-{fname}-{type(wrong).__name__}", m, path, 400, "invalid_input",
                                 body={**valid, fname: wrong}))
            if f.type in (FieldType.BYTES, FieldType.CONTEXT):
                for bad in _BAD_B64:
                    cases.append(
                        Bad(
                            f"b64-{fname}-{bad!r}", m, path, 400, "invalid_base64", body={**valid, fname: bad}
                        )
                    )
            if f.type is FieldType.VERSION:
                for bad in _BAD_VERSIONS:
                    cases.append(
                        Bad(f"version-{bad!r}", m, path, 400, "invalid_input", body={**valid, fname: bad})
                    )
                cases.append(Bad("version-unknown", m, path, 404, "key_not_found", body={**valid, fname: 9}))
            if f.type is FieldType.CONTEXT:
                cases.append(Bad("context-256", m, path, 400, "invalid_context",
                                 body={**valid, fname: b64(b"x" * 256)}))
        kind_wrong = ctx["sig"] if valid["key_id"] == ctx["kem"] else ctx["kem"]
        disabled = ctx["disabled_kem"] if valid["key_id"] == ctx["kem"] else ctx["disabled_sig"]
        cases += [
            Bad("unknown-key", m, path, 404, "key_not_found", body={**valid, "key_id": fake_key_id()}),
            Bad("malformed-key", m, path, 404, "key_not_found", body={**valid, "key_id": "not-a-key"}),
            Bad("empty-key", m, path, 404, "key_not_found", body={**valid, "key_id": ""}),
            Bad("other-tenant-key", m, path, 404, "key_not_found", body={**valid, "key_id": ctx["theirs"]}),
            Bad("wrong-kind-key", m, path, 400, "algorithm_mismatch", body={**valid, "key_id": kind_wrong}),
        ]
        if op != "decrypt" and op != "kem.decapsulate" and op != "verify":
            cases.append(
                Bad("disabled-key", m, path, 409, "key_disabled", body={**valid, "key_id": disabled})
            )
        if op == "kem.decapsulate":
            ct = unb64(ctx["ct"])
            cases += [
                Bad(
                    "ct-short", m, path, 400, "invalid_ciphertext", body={**valid, "ciphertext": b64(ct[:-1])}
                ),
                Bad(
                    "ct-long",
                    m,
                    path,
                    400,
                    "invalid_ciphertext",
                    body={**valid, "ciphertext": b64(ct + b"!")},
                ),
                Bad(
                    "disabled-key",
                    m,
                    path,
                    409,
                    "key_disabled",
                    body={**valid, "key_id": ctx["disabled_kem"], "ciphertext": ctx["disabled_ct"]},
                ),
            ]
        if op == "decrypt":
            sealed = unb64(ctx["sealed"])
            cases += [
                Bad(
                    "ct-altered",
                    m,
                    path,
                    400,
                    "decryption_failed",
                    body={**valid, "ciphertext": b64(sealed[:-1] + bytes([sealed[-1] ^ 0x80]))},
                ),
                Bad("ct-wrong-aad", m, path, 400, "decryption_failed", body={**valid, "aad": b64(b"x")}),
                Bad(
                    "disabled-key",
                    m,
                    path,
                    409,
                    "key_disabled",
                    body={**valid, "key_id": ctx["disabled_kem"], "ciphertext": ctx["disabled_sealed"]},
                ),
            ]
        if op == "verify":
            cases.append(
                Bad(
                    "disabled-key",
                    m,
                    path,
                    409,
                    "key_disabled",
                    body={**valid, "key_id": ctx["disabled_sig"], "signature": ctx["disabled_signature"]},
                )
            )
    elif route.batch:
        cases += [Bad("query", m, path + "?x=1", 400, "invalid_input", body={"items": [{}]}),
                  Bad("items-string", m, path, 400, "invalid_input", body={"items": "[]"})]
    elif op == "keys.create":
        cases += [
            Bad("unknown-algorithm", m, path, 400, "unknown_algorithm", body={"algorithm": "rsa-2048"}),
            Bad("algorithm-case", m, path, 400, "unknown_algorithm", body={"algorithm": "ML-KEM-768"}),
            Bad("algorithm-empty", m, path, 400, "unknown_algorithm", body={"algorithm": ""}),
            Bad("algorithm-number", m, path, 400, "invalid_input", body={"algorithm": 768}),
            Bad("algorithm-null", m, path, 400, "invalid_input", body={"algorithm": None}),
            Bad("kind-unknown", m, path, 400, "invalid_input", body={"kind": "KEM"}),
            Bad("mode-unknown", m, path, 400, "invalid_input", body={"kind": "kem", "mode": "classic"}),
            Bad("mode-alone", m, path, 400, "invalid_input", body={"mode": "hybrid"}),
            Bad("nothing", m, path, 400, "invalid_input", body={}),
            Bad(
                "kind-disagrees",
                m,
                path,
                400,
                "invalid_input",
                body={"algorithm": "ml-dsa-65", "kind": "kem"},
            ),
            Bad("mode-disagrees", m, path, 400, "invalid_input", body={"algorithm": "x-wing", "mode": "pqc"}),
            Bad(
                "label-space", m, path, 400, "invalid_input", body={"algorithm": "ml-kem-768", "label": "a b"}
            ),
            Bad(
                "label-leading-dot",
                m,
                path,
                400,
                "invalid_input",
                body={"algorithm": "ml-kem-768", "label": ".a"},
            ),
            Bad(
                "label-129",
                m,
                path,
                400,
                "invalid_input",
                body={"algorithm": "ml-kem-768", "label": "a" * 129},
            ),
            Bad("label-number", m, path, 400, "invalid_input", body={"algorithm": "ml-kem-768", "label": 5}),
            Bad(
                "unknown-field",
                m,
                path,
                400,
                "invalid_input",
                body={"algorithm": "ml-kem-768", "public_key": "AA=="},
            ),
            Bad("query", m, path + "?x=1", 400, "invalid_input", body={"algorithm": "ml-kem-768"}),
        ]
    elif op == "keys.list":
        cases += [Bad(f"query-{q}", m, f"{path}?{q}", 400, "invalid_input")
                  for q in ("limit=0", "limit=101", "limit=x", "cursor=x", "x=1", "limit=1&limit=1")]
    elif op == "info":
        cases.append(Bad("query", m, path + "?x=1", 400, "invalid_input"))
    elif "{key_id}" in route.template:
        for bad_id in ("nope", fake_key_id(), ctx["theirs"], "k_" + "A" * 26, "%00", "k_" + "a" * 27):
            cases.append(
                Bad(f"key-{bad_id[:8]}", m, route.template.replace("{key_id}", bad_id), 404, "key_not_found")
            )
        if m == "GET":
            cases += [Bad(f"query-{q}", m, f"{path}?{q}", 400, "invalid_input")
                      for q in ("version=0", "version=x", "version=2147483648", "x=1", "version=1&version=1")]
            cases.append(Bad("version-unknown", m, f"{path}?version=99", 404, "key_not_found"))
        else:
            cases += [Bad("query", m, f"{path}?x=1", 400, "invalid_input"),
                      Bad("field", m, path, 400, "invalid_input", body={"x": 1}),
                      Bad("field-null", m, path, 400, "invalid_input", body={"reason": None})]
    return cases


@pytest.fixture(scope="module")
def bad_ctx(api: CheckedClient, other: CheckedClient, keys: dict[str, dict[str, Any]],
            disabled: dict[str, str]) -> dict[str, str]:
    kem, sig = keys["ml-kem-768"]["key_id"], keys["ml-dsa-65"]["key_id"]
    msg = b64(pt("bad input verify"))
    return {
        "kem": kem,
        "sig": sig,
        "msg": msg,
        "ct": api.ok("POST", "/v1/kem/encapsulate", {"key_id": kem})["ciphertext"],
        "sealed": api.ok("POST", "/v1/encrypt", {"key_id": kem, "plaintext": b64(pt("bad input"))})[
            "ciphertext"
        ],
        "signature": api.ok("POST", "/v1/sign", {"key_id": sig, "message": msg})["signature"],
        "disabled_kem": disabled["kem"],
        "disabled_sig": disabled["sig"],
        "disabled_ct": disabled["ct"],
        "disabled_sealed": disabled["sealed"],
        "disabled_signature": disabled["signature"],
        "theirs": other.ok("POST", "/v1/keys", {"algorithm": "ml-kem-768"})["key_id"],
        # lifecycle routes act on this one: a request wrongly accepted changes only it
        "throwaway": api.ok("POST", "/v1/keys", {"algorithm": "ml-kem-768"})["key_id"],
        "job": api.ok("POST", "/v1/import-jobs", {"method": "hpke-ml-kem-768"})["import_job_id"],
        "their_job": other.ok("POST", "/v1/import-jobs", {"method": "hpke-ml-kem-768"})["import_job_id"],
    }


_API_ROUTES = [r for r in ROUTES if r.owner == "api"]


@pytest.mark.parametrize("route", _API_ROUTES, ids=lambda r: r.name)
def test_bad_input_gets_the_documented_4xx(api: CheckedClient, bad_ctx: dict[str, str], route: Route) -> None:
    cases = _bad_cases(route, bad_ctx)
    assert cases
    failures: list[str] = []
    for case in cases:
        try:
            status, body, _ = api.call(case.method, case.path, case.body, raw=case.raw)
        except ContractViolation as exc:
            failures.append(f"{case.name}: {exc}")
            continue
        got = (status, body["error"]["code"] if status >= 400 else None)
        if got != (case.status, case.code):
            failures.append(
                f"{case.name}: want {case.status} {case.code}, got {status} {json.dumps(body)[:200]}"
            )
    assert not failures, f"{route.name}: {len(failures)} of {len(cases)} cases:\n" + "\n".join(failures)


_BODY_ROUTES = [
    r for r in ROUTES if r.method in ("POST", "DELETE") and r.operation != "admin.fail_open.clear"
]


@pytest.mark.parametrize("route", _BODY_ROUTES, ids=lambda r: r.name)
def test_body_over_the_limit_is_413(api: CheckedClient, bad_ctx: dict[str, str], route: Route) -> None:
    path = route.template.replace("{key_id}", bad_ctx["throwaway"])
    status, code, err = api.error(route.method, path, raw=b"{" + b" " * MAX_BODY_BYTES,
                                  headers={"Content-Type": "application/json"})
    assert (status, code) == (413, "body_too_large"), err


def test_body_of_exactly_the_limit_is_served(api: CheckedClient, keys: dict[str, dict[str, Any]]) -> None:
    kid = keys["ml-kem-768"]["key_id"]
    plaintext = pt("max body", 700_000)
    body = json.dumps({"key_id": kid, "plaintext": b64(plaintext)}).encode()
    body += b" " * (MAX_BODY_BYTES - len(body))
    assert len(body) == MAX_BODY_BYTES
    r = api.ok("POST", "/v1/encrypt", raw=body)
    assert (
        unb64(api.ok("POST", "/v1/decrypt", {"key_id": kid, "ciphertext": r["ciphertext"]})["plaintext"])
        == plaintext
    )


def test_chunked_body_over_the_limit_is_413(gateway: Gateway) -> None:
    conn = http.client.HTTPSConnection(gateway.host, gateway.port, context=gateway.context(), timeout=30)
    try:
        chunks = iter([b'{"key_id": "k_aaaaaaaaaaaaaaaaaaaaaaaaaa", "plaintext": "'] + [b"A" * 65536] * 17)
        conn.request(
            "POST",
            "/v1/encrypt",
            body=chunks,
            encode_chunked=True,
            headers={
                "Authorization": f"Bearer {gateway.demo_key}",
                "Content-Type": "application/json",
                "Transfer-Encoding": "chunked",
            },
        )
        resp = conn.getresponse()
        body = json.loads(resp.read())
        assert resp.status == 413 and body["error"]["code"] == "body_too_large"
        assert body["error"]["request_id"] == resp.headers["X-Request-Id"]
    finally:
        conn.close()


# ---- authentication, methods, policy -----------------------------------------------------------

def test_every_route_needs_credentials(api: CheckedClient) -> None:
    shapes = set()
    for route in ROUTES:
        if route.public:
            continue
        path = route.template.replace("{key_id}", fake_key_id())
        for headers in ({}, {"Authorization": "Bearer qph_nope_nope"}, {"X-API-Key": "nope"}):
            status, body, _ = api.call(route.method, path, {} if route.method != "GET" else None,
                                       headers=headers, auth=False)
            assert status == 401, (route.name, headers, body)
            shapes.add((body["error"]["code"], body["error"]["message"]))
    assert len(shapes) == 1 and next(iter(shapes))[0] == "unauthenticated"


def test_wrong_method_is_405_with_allow(api: CheckedClient) -> None:
    templates = {r.template for r in ROUTES}
    for template in templates:
        served = {r.method for r in ROUTES if r.template == template}
        for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
            if method in served:
                continue
            status, code, _ = api.error(method, template.replace("{key_id}", fake_key_id()))
            assert (status, code) == (405, "method_not_allowed"), (method, template)


def test_unserved_path_is_404(api: CheckedClient) -> None:
    for path in ("/v1", "/v1/", "/v1/keys/", "/v2/keys", "/v1/kem", "/v1/sign/batch/x", "/"):
        status, code, _ = api.error("GET", path)
        assert (status, code) in ((404, "route_not_found"), (405, "method_not_allowed")), path


def test_plan_limits_are_403_policy_denied(gateway: Gateway) -> None:
    c = CheckedClient(gateway.client(new_api_key(gateway, "e2e-api-free", "free")), TRANSCRIPT)
    try:
        kid = c.ok("POST", "/v1/keys", {"algorithm": "ml-kem-768"})["key_id"]
        assert c.error("POST", "/v1/keys", {"algorithm": "x-wing"})[:2] == (403, "policy_denied")
        assert c.error("POST", "/v1/kem/encapsulate/batch", {"items": [{"key_id": kid}]})[:2] == (
            403,
            "policy_denied",
        )
        assert c.error("GET", "/metrics")[:2] == (403, "policy_denied")
        assert c.error("POST", "/v1/keys", {"algorithm": "ml-kem-1024"})[:2] == (403, "policy_denied")
        # rate limit 5/s, burst 10: a quick burst of 20 runs out
        statuses = [c.call("GET", "/v1/info")[0] for _ in range(20)]
        assert 429 in statuses and set(statuses) <= {200, 429}, statuses
        status, body, headers = c.call("GET", "/v1/info")
        if status == 429:
            assert body["error"]["code"] == "rate_limited" and int(headers["Retry-After"]) >= 1
    finally:
        c.close()


def test_api_key_in_x_api_key_header(gateway: Gateway) -> None:
    c = CheckedClient(gateway.client(), TRANSCRIPT)
    try:
        info = c.ok(
            "GET", "/v1/info", headers={"X-API-Key": gateway.demo_key}, auth=False
        )  # no Authorization
        assert info["service"]["name"] == "qpher-proxy"
    finally:
        c.close()


def test_admin_fail_open_bodies_are_validated(api: CheckedClient) -> None:
    """The emergency switch takes exactly the documented body (FailOpenRequest: reason and
    seconds, both required; strict JSON), and DELETE takes none (or {}). A refused body opens
    nothing. Only refusals are sent here: a valid opening would affect the rest of the session."""
    try:
        for body, raw, code in (
            ({"reason": "e2e"}, None, "invalid_input"),  # seconds is required
            ({"seconds": 5}, None, "invalid_input"),
            ({"reason": "e2e", "seconds": 5, "x": 1}, None, "invalid_input"),
            ({"reason": 5, "seconds": 5}, None, "invalid_input"),
            ({"reason": "", "seconds": 5}, None, "invalid_input"),
            ({"reason": "e2e", "seconds": True}, None, "invalid_input"),
            ({"reason": "e2e", "seconds": "5"}, None, "invalid_input"),
            ({"reason": "e2e", "seconds": 0}, None, "invalid_input"),
            ({"reason": "e2e", "seconds": None}, None, "invalid_input"),
            (None, b'{"reason": "e2e", "seconds": NaN}', "invalid_json"),
            (None, b'{"reason": "e2e", "reason": "other", "seconds": 5}', "invalid_json"),
            (None, b"[]", "invalid_input"),
            (None, b"{", "invalid_json"),
            (None, b"", "invalid_json"),
        ):
            status, got, _ = api.error("POST", "/admin/fail-open", body, raw=raw)
            assert (status, got) == (400, code), (body, raw)
        for body, raw, code in (({"x": 1}, None, "invalid_input"), (None, b"{", "invalid_json"),
                                (None, b"[]", "invalid_input")):
            status, got, _ = api.error("DELETE", "/admin/fail-open", body, raw=raw)
            assert (status, got) == (400, code), (body, raw)
    finally:
        state = api.ok("DELETE", "/admin/fail-open", {})
    assert state["active"] is False
    assert api.ok("DELETE", "/admin/fail-open")["active"] is False


# ---- metrics -----------------------------------------------------------------------------------

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def test_metrics_are_prometheus_text_without_ids(api: CheckedClient, other: CheckedClient, gateway: Gateway,
                                                 keys: dict[str, dict[str, Any]]) -> None:
    status, text, headers = api.call("GET", "/metrics")
    assert status == 200 and isinstance(text, bytes)
    lines = text.decode().splitlines()
    samples: list[tuple[str, dict[str, str], float]] = []
    for line in lines:
        if not line or line.startswith("#"):
            assert not line or line.startswith(("# HELP ", "# TYPE ")), line
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a Prometheus sample: {line!r}"
        labels = dict(_LABEL.findall(m.group(2) or ""))
        samples.append((m.group(1), labels, float(m.group(3))))
    names = {s[0] for s in samples}
    assert {"qpher_requests_total", "qpher_tls_handshakes_total"} <= names, sorted(names)
    served = {r.name for r in ROUTES}
    routes = {lab["route"] for n, lab, _ in samples if n == "qpher_requests_total"}
    assert "POST /v1/sign" in routes and routes <= served | {
        "unmatched",
        "method_not_allowed",
        "invalid",
        "upstream",
    }
    assert any(
        v > 0 and lab.get("version") == "TLSv1.3"
        for n, lab, v in samples
        if n == "qpher_tls_handshakes_total"
    )
    forbidden = [*API_KEYS, *(k.split("_")[1] for k in API_KEYS if k.count("_") >= 2),
                 "demo", "e2e-api-other", "e2e-api-list", "e2e-api-free"]
    for name, labels, _ in samples:
        for value in labels.values():
            assert not KEY_ID_RE.search(value), (name, labels)
            assert value not in forbidden and not any(f in value for f in API_KEYS), (name, labels)
    assert other.error("GET", "/metrics")[:2] == (403, "policy_denied")  # pro key: no metrics scope
    helped = {line.split()[2] for line in lines if line.startswith("# HELP ")}
    assert {
        "qpher_request_duration_seconds",
        "qpher_kms_op_duration_seconds",
        "qpher_kms_restarts_total",
        "qpher_policy_decisions_total",
        "qpher_fail_open_active",
        "qpher_rate_limited_total",
    } <= helped, helped
    assert any(n == "qpher_request_duration_seconds_bucket" for n, _, _ in samples)
    assert any(n == "qpher_policy_decisions_total" and lab.get("effect") == "allow" for n, lab, _ in samples)

    # the request counter counts: three more signs, three more in the series
    def signs() -> float:
        text = api.call("GET", "/metrics")[1].decode()
        m = re.search(r'^qpher_requests_total\{route="POST /v1/sign",status="200"\} (\S+)$', text, re.M)
        return float(m.group(1)) if m else 0.0

    before = signs()
    for _ in range(3):
        api.ok("POST", "/v1/sign", {"key_id": keys["ml-dsa-44"]["key_id"], "message": b64(pt("metrics"))})
    assert signs() == before + 3


# ---- what the gateway said, logged and stored: no private material, no secret ---------------------
# These run last in the module, over everything the tests above sent and received.

def _strings(node: Any, parent_key: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield "key", k
            yield from _strings(v, k)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v, parent_key)
    elif isinstance(node, str):
        yield parent_key, node


_BASE64_FIELDS = {"public_key", "ciphertext", "shared_secret", "signature", "plaintext", "info"}


@pytest.fixture(scope="module")
def traffic(api: CheckedClient, keys: dict[str, dict[str, Any]]) -> None:
    """One of each secret-bearing operation, so that the scans below have something to look
    for even when they run alone (in a full run they also see everything the module did)."""
    for alg in KEMS:
        kid = keys[alg]["key_id"]
        e = api.ok("POST", "/v1/kem/encapsulate", {"key_id": kid})
        api.ok("POST", "/v1/kem/decapsulate", {"key_id": kid, "ciphertext": e["ciphertext"]})
        c = api.ok("POST", "/v1/encrypt", {"key_id": kid, "plaintext": b64(pt("traffic", 30))})
        api.ok("POST", "/v1/decrypt", {"key_id": kid, "ciphertext": c["ciphertext"]})
    for alg in SIGS:
        api.ok("POST", "/v1/sign", {"key_id": keys[alg]["key_id"], "message": b64(pt("traffic"))})
    kid = api.ok("POST", "/v1/keys", {"algorithm": "ml-dsa-44"})["key_id"]
    for method, action in (("POST", "/rotate"), ("POST", "/disable"), ("POST", "/enable"), ("DELETE", ""),
                           ("POST", "/cancel-destroy")):
        api.ok(method, f"/v1/keys/{kid}{action}")


def test_no_answer_holds_private_key_material(traffic: None) -> None:
    assert len(TRANSCRIPT.exchanges) > 20
    for ex in TRANSCRIPT.exchanges:
        if isinstance(ex.body, bytes):  # /metrics text
            assert b"private" not in ex.body.lower() and b"seed" not in ex.body.lower()
            continue
        code = ex.body.get("error", {}).get("code") if isinstance(ex.body, dict) else None
        if code in ("invalid_key_material", "invalid_wrapped_key"):
            continue  # a key import's refusal names the private key form it expected (never its bytes)
        for where, text in _strings(ex.body):
            if where in _BASE64_FIELDS:
                continue  # random bytes: any 4-letter word may appear by chance
            low = text.lower().replace("'seed'", "")  # the name of a key import format
            assert "private" not in low and "seed" not in low, (ex.method, ex.path, where, text)
    # every public key of every answer has its algorithm's public size, never a private size
    sizes = {len(unb64(p)) for p in TRANSCRIPT.values("public_key") if p is not None}
    assert sizes <= {a.public_key_size for a in ALGORITHMS.values()}
    assert not sizes & {a.private_key_size for a in ALGORITHMS.values()}
    for ss in TRANSCRIPT.values("shared_secret"):
        assert len(unb64(ss)) == 32


def _secrets() -> list[str]:
    """Everything that must never be logged, audited or stored outside the KMS store."""
    out = [*API_KEYS, MARKER.decode(), MARKER_B64]
    out += [s for s in TRANSCRIPT.values("shared_secret") if isinstance(s, str)]
    out += [p for p in TRANSCRIPT.values("plaintext") if isinstance(p, str) and len(p) >= 24]
    return out


def test_audit_chain_verifies_and_holds_no_secret(gateway: Gateway, traffic: None) -> None:
    files = sorted(glob.glob(str(gateway.directory / "audit" / "audit.log*")))
    proc = cli("audit", "verify", *files, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = "".join(Path(f).read_text(encoding="utf-8") for f in files if not f.endswith(".lock"))
    events = {json.loads(line)["event"] for line in text.splitlines() if line}
    assert {"policy.decision", "key.created", "key.rotated", "key.disabled", "key.enabled",
            "key.destroy_scheduled", "key.destroy_cancelled"} <= events, events
    secrets = _secrets()
    assert len(secrets) >= 2 + 2 * len(KEMS) + 1
    leaked = [s[:12] for s in secrets if s in text]
    assert not leaked, f"the audit log holds secrets (prefixes): {leaked}"


def test_logs_hold_no_secret(api: CheckedClient, gateway: Gateway, traffic: None) -> None:
    # A request on the same connection: once it is answered, every earlier request of that
    # connection has been logged (the access line is written after the response is sent).
    api.ok("GET", "/v1/info")
    text = gateway.raw_log_text()
    access = {r["request_id"]: r for r in gateway.log_lines if r.get("logger") == "qpher.access"}
    assert access, "no access log"
    for rec in access.values():
        assert not KEY_ID_RE.search(str(rec.get("route"))), rec  # route templates, never ids
    # one access line per request, with our request id, route template and status
    for ex in TRANSCRIPT.exchanges[:-1]:  # the last one is that probe: maybe not logged yet
        rec = access.get(ex.request_id)
        assert rec is not None, (ex.method, ex.path, ex.status)
        assert rec["status"] == ex.status, (ex.method, ex.path, rec)
        assert rec["method"] == ex.method and "duration_ms" in rec
        route = route_of(ex.method, ex.path)
        if route is not None:
            assert rec["route"] == route.name, rec
    leaked = [s[:12] for s in _secrets() if s in text]
    assert not leaked, f"the gateway's logs hold secrets (prefixes): {leaked}"


def test_state_files_hold_no_plaintext_or_shared_secret(gateway: Gateway, traffic: None) -> None:
    needles = [MARKER, MARKER_B64.encode()]
    for ss in TRANSCRIPT.values("shared_secret"):
        needles += [ss.encode(), unb64(ss)]
    needles += [k.encode() for k in API_KEYS if k != gateway.demo_key]
    scanned = 0
    for path in gateway.directory.rglob("*"):
        if not path.is_file() or path.parent.name == "secrets":  # secrets/ holds the demo key by design
            continue
        data = path.read_bytes()
        scanned += 1
        for needle in needles:
            assert needle not in data, (
                f"{path.relative_to(gateway.directory)} holds a secret ({needle[:6]!r}...)"
            )
        assert gateway.demo_key.encode() not in data, path
    assert scanned > 3
