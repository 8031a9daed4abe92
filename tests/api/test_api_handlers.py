"""Handlers against FakeKMS: every answer is checked against openapi.yaml by ``call``."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from _api_call import call, code
from _api_fake_kms import FakeKMS

from qpher_proxy.api import ROUTES, CryptoAPI, resolve
from qpher_proxy.context import TenantContext
from qpher_proxy.crypto.algorithms import ALGORITHMS, HPKE_INFO, Kind
from qpher_proxy.errors import QpherError

B = base64.b64encode
NEVER_ISSUED = "k_abcdefghijklmnopqrstuvwxyz"


def b64(data: bytes) -> str:
    return B(data).decode()


async def new_key(api: CryptoAPI, ctx: TenantContext, **body: Any) -> dict[str, Any]:
    status, key = await call(api, ctx, "POST", "/v1/keys", body)
    assert status == 201, key
    return key


# ---- key management ---------------------------------------------------------------------

@pytest.mark.parametrize("alg", sorted(ALGORITHMS))
async def test_create_key_returns_public_metadata_for_every_algorithm(api: CryptoAPI, ctx: TenantContext,
                                                                      alg: str) -> None:
    key = await new_key(api, ctx, algorithm=alg, label="team-a/primary")
    a = ALGORITHMS[alg]
    assert (key["algorithm"], key["kind"], key["version"], key["state"]) == (alg, a.kind.value, 1, "enabled")
    assert len(base64.b64decode(key["public_key"])) == a.public_key_size
    assert key["label"] == "team-a/primary" and key["created_at"] == "2026-01-01T00:00:00Z"
    assert key["versions"] == [{"version": 1, "state": "active", "created_at": key["created_at"]}]


@pytest.mark.parametrize(("body", "want"), [
    ({"kind": "kem"}, "ml-kem-768"),
    ({"kind": "signature"}, "ml-dsa-65"),
    ({"kind": "kem", "mode": "hybrid"}, "x-wing"),
    ({"kind": "signature", "mode": "hybrid"}, "ml-dsa-65-ecdsa-p256"),
    ({"kind": "signature", "mode": "pqc"}, "ml-dsa-65"),
    ({"algorithm": "ml-dsa-87", "kind": "signature", "mode": "pqc"}, "ml-dsa-87"),
])
async def test_kind_and_mode_pick_the_default_algorithm(api: CryptoAPI, ctx: TenantContext,
                                                       body: dict[str, str], want: str) -> None:
    assert (await new_key(api, ctx, **body))["algorithm"] == want


async def test_list_keys_paginates_and_is_tenant_scoped(api: CryptoAPI, ctx: TenantContext,
                                                        other_ctx: TenantContext) -> None:
    made = sorted([(await new_key(api, ctx, kind="kem"))["key_id"] for _ in range(5)])
    await new_key(api, other_ctx, kind="kem")
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        q = "limit=2" + (f"&cursor={cursor}" if cursor else "")
        _, page = await call(api, ctx, "GET", "/v1/keys", query=q)
        seen += [k["key_id"] for k in page["keys"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == made and pages == 3
    _, everything = await call(api, other_ctx, "GET", "/v1/keys")
    assert len(everything["keys"]) == 1 and everything["keys"][0]["key_id"] not in made


async def test_another_tenants_key_answers_like_a_key_never_issued(api: CryptoAPI, ctx: TenantContext,
                                                                   other_ctx: TenantContext) -> None:
    theirs = (await new_key(api, other_ctx, kind="signature"))["key_id"]
    for method, path, body in [
        ("GET", "/v1/keys/{}", b""),
        ("POST", "/v1/keys/{}/rotate", b""),
        ("POST", "/v1/keys/{}/disable", b""),
        ("POST", "/v1/keys/{}/enable", b""),
        ("DELETE", "/v1/keys/{}", b""),
        ("POST", "/v1/keys/{}/cancel-destroy", b""),
        ("POST", "/v1/sign", {"key_id": "{}", "message": ""}),
        ("POST", "/v1/verify", {"key_id": "{}", "message": "", "signature": ""}),
    ]:
        answers = []
        for kid in (theirs, NEVER_ISSUED):
            b = json.loads(json.dumps(body).replace("{}", kid)) if isinstance(body, dict) else body
            status, obj = await call(api, ctx, method, path.format(kid), b)
            answers.append((status, obj["error"]["code"], obj["error"]["message"].replace(kid, "<id>")))
        assert answers[0] == answers[1] == (404, "key_not_found", answers[0][2]), (method, path, answers)


async def test_lifecycle_disable_enable_destroy_cancel(
    api: CryptoAPI, kms: FakeKMS, ctx: TenantContext
) -> None:
    kid = (await new_key(api, ctx, kind="signature"))["key_id"]
    sign = {"key_id": kid, "message": b64(b"m")}
    assert (await call(api, ctx, "POST", f"/v1/keys/{kid}/disable"))[1]["state"] == "disabled"
    assert code(await call(api, ctx, "POST", "/v1/sign", sign)) == (409, "key_disabled")
    assert code(await call(api, ctx, "POST", f"/v1/keys/{kid}/rotate")) == (409, "key_disabled")
    assert (await call(api, ctx, "POST", f"/v1/keys/{kid}/enable", b"{}"))[1]["state"] == "enabled"
    assert (await call(api, ctx, "POST", "/v1/sign", sign))[0] == 200

    status, key = await call(api, ctx, "DELETE", f"/v1/keys/{kid}")
    assert status == 202 and key["state"] == "pending_destruction" and key["destroy_at"] is not None
    assert code(await call(api, ctx, "POST", "/v1/sign", sign)) == (409, "key_disabled")
    assert code(await call(api, ctx, "POST", f"/v1/keys/{kid}/enable")) == (409, "invalid_key_state")
    _, key = await call(api, ctx, "POST", f"/v1/keys/{kid}/cancel-destroy")
    assert key["state"] == "enabled" and key["destroy_at"] is None
    assert code(await call(api, ctx, "POST", f"/v1/keys/{kid}/cancel-destroy")) == (409, "invalid_key_state")

    await call(api, ctx, "DELETE", f"/v1/keys/{kid}")
    kms.destroy_now(kid)
    _, tomb = await call(api, ctx, "GET", f"/v1/keys/{kid}")
    assert tomb["state"] == "destroyed" and tomb["public_key"] is None and tomb["destroyed_at"] is not None
    assert code(await call(api, ctx, "POST", "/v1/sign", sign)) == (410, "key_destroyed")
    assert code(await call(api, ctx, "POST", f"/v1/keys/{kid}/enable")) == (410, "key_destroyed")
    assert code(await call(api, ctx, "DELETE", f"/v1/keys/{kid}")) == (410, "key_destroyed")


async def test_rotation_keeps_old_versions_for_verify_and_decrypt(api: CryptoAPI, ctx: TenantContext) -> None:
    sk = (await new_key(api, ctx, kind="signature"))["key_id"]
    kk = (await new_key(api, ctx, kind="kem"))["key_id"]
    msg = b64(b"contract v1")
    _, s1 = await call(api, ctx, "POST", "/v1/sign", {"key_id": sk, "message": msg})
    _, c1 = await call(api, ctx, "POST", "/v1/encrypt", {"key_id": kk, "plaintext": b64(b"old secret")})
    assert s1["key_version"] == c1["key_version"] == 1
    _, rotated = await call(api, ctx, "POST", f"/v1/keys/{sk}/rotate")
    await call(api, ctx, "POST", f"/v1/keys/{kk}/rotate")
    assert rotated["version"] == rotated["latest_version"] == 2 and len(rotated["versions"]) == 2

    _, s2 = await call(api, ctx, "POST", "/v1/sign", {"key_id": sk, "message": msg})
    assert s2["key_version"] == 2
    verify = {"key_id": sk, "message": msg, "signature": s1["signature"]}
    assert (await call(api, ctx, "POST", "/v1/verify", {**verify, "key_version": 1}))[1] == {"valid": True}
    assert (await call(api, ctx, "POST", "/v1/verify", verify))[1] == {"valid": False}
    assert code(await call(api, ctx, "POST", "/v1/verify", {**verify, "key_version": 3})) == (
        404,
        "key_not_found",
    )

    _, v1 = await call(api, ctx, "GET", f"/v1/keys/{sk}", query="version=1")
    _, latest = await call(api, ctx, "GET", f"/v1/keys/{sk}")
    assert (v1["version"], v1["latest_version"], latest["version"]) == (1, 2, 2)
    assert v1["public_key"] != latest["public_key"] == rotated["public_key"]
    assert code(await call(api, ctx, "GET", f"/v1/keys/{sk}", query="version=3")) == (404, "key_not_found")

    dec = {"key_id": kk, "ciphertext": c1["ciphertext"]}
    assert (await call(api, ctx, "POST", "/v1/decrypt", {**dec, "key_version": 1}))[1] == {
        "plaintext": b64(b"old secret")
    }
    assert code(await call(api, ctx, "POST", "/v1/decrypt", dec)) == (400, "decryption_failed")


# ---- crypto operations ---------------------------------------------------------------------

@pytest.mark.parametrize("alg", [a.name for a in ALGORITHMS.values() if a.kind is Kind.KEM])
async def test_encapsulate_then_decapsulate_agree(api: CryptoAPI, ctx: TenantContext, alg: str) -> None:
    kid = (await new_key(api, ctx, algorithm=alg))["key_id"]
    _, enc = await call(api, ctx, "POST", "/v1/kem/encapsulate", {"key_id": kid})
    assert len(base64.b64decode(enc["ciphertext"])) == ALGORITHMS[alg].ciphertext_size
    _, dec = await call(
        api, ctx, "POST", "/v1/kem/decapsulate", {"key_id": kid, "ciphertext": enc["ciphertext"]}
    )
    assert dec["shared_secret"] == enc["shared_secret"]
    short = b64(base64.b64decode(enc["ciphertext"])[:-1])
    assert code(
        await call(api, ctx, "POST", "/v1/kem/decapsulate", {"key_id": kid, "ciphertext": short})
    ) == (400, "invalid_ciphertext")


@pytest.mark.parametrize(("alg", "kem_id"), [("ml-kem-768", 0x41), ("ml-kem-1024", 0x42), ("x-wing", 0x647A)])
async def test_encrypt_reports_the_hpke_suite_and_decrypt_inverts_it(api: CryptoAPI, ctx: TenantContext,
                                                                     alg: str, kem_id: int) -> None:
    kid = (await new_key(api, ctx, algorithm=alg))["key_id"]
    for plaintext in (b"", b"x" * 1024):
        _, enc = await call(api, ctx, "POST", "/v1/encrypt",
                            {"key_id": kid, "plaintext": b64(plaintext), "aad": b64(b"hdr")})
        assert enc["algorithm"] == alg
        assert enc["hpke_suite"] == {"kem_id": kem_id, "kdf_id": 1, "aead_id": 2}
        assert base64.b64decode(enc["info"]) == HPKE_INFO == b"qpher/v1/encrypt"
        dec = {"key_id": kid, "ciphertext": enc["ciphertext"], "aad": b64(b"hdr")}
        assert (await call(api, ctx, "POST", "/v1/decrypt", dec))[1] == {"plaintext": b64(plaintext)}
        assert code(await call(api, ctx, "POST", "/v1/decrypt", {**dec, "aad": b64(b"other")})) == (
            400, "decryption_failed")
    assert code(
        await call(api, ctx, "POST", "/v1/decrypt", {"key_id": kid, "ciphertext": b64(b"short")})
    ) == (400, "invalid_ciphertext")


@pytest.mark.parametrize("alg", [a.name for a in ALGORITHMS.values() if a.kind is Kind.SIGNATURE])
async def test_sign_then_verify_with_context(api: CryptoAPI, ctx: TenantContext, alg: str) -> None:
    kid = (await new_key(api, ctx, algorithm=alg))["key_id"]
    msg, context = b64(b"pay 10 EUR"), b64(b"c" * 255)
    _, sig = await call(api, ctx, "POST", "/v1/sign", {"key_id": kid, "message": msg, "context": context})
    v = {"key_id": kid, "message": msg, "signature": sig["signature"], "context": context}
    assert (await call(api, ctx, "POST", "/v1/verify", v))[1] == {"valid": True}
    assert (await call(api, ctx, "POST", "/v1/verify", {**v, "context": ""}))[1] == {"valid": False}
    assert (await call(api, ctx, "POST", "/v1/verify", {**v, "signature": b64(b"\x00")}))[1] == {
        "valid": False
    }
    assert code(await call(api, ctx, "POST", "/v1/verify", {**v, "context": b64(b"c" * 256)})) == (
        400, "invalid_context")


@pytest.mark.parametrize(("path", "body", "kind"), [
    ("/v1/sign", {"message": ""}, "kem"),
    ("/v1/verify", {"message": "", "signature": ""}, "kem"),
    ("/v1/kem/encapsulate", {}, "signature"),
    ("/v1/kem/decapsulate", {"ciphertext": ""}, "signature"),
    ("/v1/encrypt", {"plaintext": ""}, "signature"),
    ("/v1/decrypt", {"ciphertext": ""}, "signature"),
])
async def test_operation_on_a_key_of_the_other_kind_is_algorithm_mismatch(
        api: CryptoAPI, ctx: TenantContext, path: str, body: dict[str, str], kind: str) -> None:
    kid = (await new_key(api, ctx, kind=kind))["key_id"]
    assert code(await call(api, ctx, "POST", path, {"key_id": kid, **body})) == (400, "algorithm_mismatch")


# ---- batches --------------------------------------------------------------------------------

async def test_sign_batch_with_mixed_items(api: CryptoAPI, kms: FakeKMS, ctx: TenantContext,
                                           other_ctx: TenantContext) -> None:
    sk = (await new_key(api, ctx, kind="signature"))["key_id"]
    kk = (await new_key(api, ctx, kind="kem"))["key_id"]
    off = (await new_key(api, ctx, kind="signature"))["key_id"]
    theirs = (await new_key(api, other_ctx, kind="signature"))["key_id"]
    await call(api, ctx, "POST", f"/v1/keys/{off}/disable")
    items = [
        {"key_id": sk, "message": b64(b"one")},
        {"key_id": NEVER_ISSUED, "message": ""},
        {"key_id": sk, "message": "not base64!"},
        {"key_id": kk, "message": ""},
        {"key_id": off, "message": ""},
        {"key_id": theirs, "message": ""},
        {"key_id": sk, "message": "", "context": b64(b"x" * 256)},
        {"key_id": sk},
        "not an object",
        {"key_id": sk, "message": b64(b"two"), "context": b64(b"ctx")},
    ]
    api.max_batch_items = len(items)
    status, out = await call(api, ctx, "POST", "/v1/sign/batch", {"items": items})
    assert status == 200
    got = [r["ok"] if r["ok"] else r["error"]["code"] for r in out["items"]]
    assert got == [
        True,
        "key_not_found",
        "invalid_base64",
        "algorithm_mismatch",
        "key_disabled",
        "key_not_found",
        "invalid_context",
        "invalid_input",
        "invalid_input",
        True,
    ]
    assert "items[2].message" in out["items"][2]["error"]["message"]
    # the good items really signed: their signatures verify, item by item, in one verify batch
    checks = [
        {"key_id": sk, "message": b64(b"one"), "signature": out["items"][0]["signature"]},
        {
            "key_id": sk,
            "message": b64(b"two"),
            "signature": out["items"][9]["signature"],
            "context": b64(b"ctx"),
        },
        {"key_id": sk, "message": b64(b"two"), "signature": out["items"][9]["signature"]},
        {"key_id": sk, "message": b64(b"two"), "signature": "***"},
    ]
    _, ver = await call(api, ctx, "POST", "/v1/verify/batch", {"items": checks})
    assert [r.get("valid", r.get("error", {}).get("code")) for r in ver["items"]] == [
        True, True, False, "invalid_base64"]
    assert kms.calls.count("batch") == 2, "each batch request is one KMS round trip"


async def test_kem_and_hpke_batches(api: CryptoAPI, ctx: TenantContext) -> None:
    kid = (await new_key(api, ctx, kind="kem"))["key_id"]
    _, enc = await call(api, ctx, "POST", "/v1/kem/encapsulate/batch",
                        {"items": [{"key_id": kid}, {"key_id": kid}, {"key_id": NEVER_ISSUED}]})
    assert [r["ok"] for r in enc["items"]] == [True, True, False]
    dec_items = [{"key_id": kid, "ciphertext": r["ciphertext"]} for r in enc["items"][:2]]
    dec_items.append({"key_id": kid, "ciphertext": b64(b"short")})
    _, dec = await call(api, ctx, "POST", "/v1/kem/decapsulate/batch", {"items": dec_items})
    assert [r.get("shared_secret") for r in dec["items"][:2]] == [
        r["shared_secret"] for r in enc["items"][:2]
    ]
    assert dec["items"][2] == {"ok": False, "error": {"code": "invalid_ciphertext",
                                                     "message": dec["items"][2]["error"]["message"]}}

    pts = [b"a", b"", b"c" * 100]
    _, sealed = await call(api, ctx, "POST", "/v1/encrypt/batch",
                           {"items": [{"key_id": kid, "plaintext": b64(p)} for p in pts]})
    opens = [{"key_id": kid, "ciphertext": r["ciphertext"]} for r in sealed["items"]]
    opens.append({"key_id": kid, "ciphertext": sealed["items"][0]["ciphertext"], "aad": b64(b"x")})
    _, opened = await call(api, ctx, "POST", "/v1/decrypt/batch", {"items": opens})
    assert [r.get("plaintext") for r in opened["items"][:3]] == [b64(p) for p in pts]
    assert opened["items"][3]["error"]["code"] == "decryption_failed"


async def test_kms_outage_fails_the_whole_batch_with_503(
    api: CryptoAPI, kms: FakeKMS, ctx: TenantContext
) -> None:
    kid = (await new_key(api, ctx, kind="signature"))["key_id"]
    kms.unavailable = True
    body = {"items": [{"key_id": kid, "message": ""}, {"key_id": kid, "message": "bad"}]}
    assert code(await call(api, ctx, "POST", "/v1/sign/batch", body)) == (503, "kms_unavailable")
    assert code(await call(api, ctx, "POST", "/v1/sign", body["items"][0])) == (503, "kms_unavailable")


async def test_batch_with_only_bad_items_never_calls_the_kms(
    api: CryptoAPI, kms: FakeKMS, ctx: TenantContext
) -> None:
    _, out = await call(
        api, ctx, "POST", "/v1/sign/batch", {"items": [{"key_id": "nope", "message": ""}, {}]}
    )
    assert [r["error"]["code"] for r in out["items"]] == ["key_not_found", "invalid_input"]
    assert kms.calls == []


# ---- info, facts, reprs -----------------------------------------------------------------

async def test_info_reports_algorithms_modes_backend_and_tls(api: CryptoAPI, ctx: TenantContext) -> None:
    _, info = await call(api, ctx, "GET", "/v1/info", tls=("TLSv1.3", "X25519MLKEM768"))
    assert info["modes"] == {"pqc": {"kem": "ml-kem-768", "signature": "ml-dsa-65"},
                             "hybrid": {"kem": "x-wing", "signature": "ml-dsa-65-ecdsa-p256"}}
    assert info["tls"] == {"version": "TLSv1.3", "group": "X25519MLKEM768"}
    assert info["backend"]["name"] == "openssl" and info["backend"]["versions"]["openssl"] == "OpenSSL 4.0.3"
    assert {a["name"] for a in info["algorithms"]} == set(ALGORITHMS)
    mlkem = next(a for a in info["algorithms"] if a["name"] == "ml-kem-768")
    assert (mlkem["public_key_size"], mlkem["ciphertext_size"], mlkem["hpke_kem_id"]) == (1184, 1088, 0x41)
    assert info["limits"] == {"max_batch_items": 8, "max_context_bytes": 255}
    assert base64.b64decode(info["hpke"]["info"]) == HPKE_INFO


async def test_info_without_backend_or_tls(kms: FakeKMS, ctx: TenantContext) -> None:
    _, info = await call(CryptoAPI(kms), ctx, "GET", "/v1/info")
    assert info["backend"] == {"name": "unknown", "versions": {}}
    assert info["tls"] == {"version": None, "group": None}
    assert info["policy"] == {"revision": None}


async def test_info_reports_the_policy_revision_in_force_at_each_call(
    kms: FakeKMS, ctx: TenantContext
) -> None:
    revisions = iter(["a" * 64, "b" * 64])
    api = CryptoAPI(kms, policy_revision=lambda: next(revisions))
    assert (await call(api, ctx, "GET", "/v1/info"))[1]["policy"] == {"revision": "a" * 64}
    assert (await call(api, ctx, "GET", "/v1/info"))[1]["policy"] == {"revision": "b" * 64}


def test_what_the_policy_is_told_and_the_cost(api: CryptoAPI) -> None:
    route, _ = resolve("POST", "/v1/keys")  # type: ignore[misc]
    parsed = api.parse(route, b'{"kind": "signature", "mode": "hybrid", "label": "l1"}')
    route_facts = (parsed.route.operation, parsed.route.name, parsed.route.quota)
    assert route_facts == ("keys.create", "POST /v1/keys", "keys")
    assert (parsed.key_ids(), parsed.cost) == ((), 1)
    assert (parsed.fields["algorithm"], parsed.fields.get("label")) == ("ml-dsa-65-ecdsa-p256", "l1")
    route, params = resolve("POST", f"/v1/keys/{NEVER_ISSUED}/rotate")  # type: ignore[misc]
    assert api.parse(route, b"", params).key_ids() == (NEVER_ISSUED,)
    route, _ = resolve("POST", "/v1/sign/batch")  # type: ignore[misc]
    other = "k_" + "b" * 26
    body = {"items": [{"key_id": NEVER_ISSUED, "message": ""}, {"key_id": other, "message": ""},
                      {"key_id": NEVER_ISSUED, "message": ""}, {"key_id": "bad", "message": ""}]}
    parsed = api.parse(route, json.dumps(body).encode())
    assert parsed.cost == 4
    assert parsed.key_ids() == (NEVER_ISSUED, other)
    assert parsed.route.quota == "sign"


def test_parsed_request_repr_holds_no_payload(api: CryptoAPI) -> None:
    route, _ = resolve("POST", "/v1/encrypt")  # type: ignore[misc]
    secret = b64(b"TOP-SECRET-PLAINTEXT")
    parsed = api.parse(route, json.dumps({"key_id": NEVER_ISSUED, "plaintext": secret}).encode())
    assert secret not in repr(parsed) and "TOP-SECRET" not in repr(parsed)


async def test_server_owned_routes_are_not_dispatched(api: CryptoAPI, ctx: TenantContext) -> None:
    for route in (r for r in ROUTES if r.owner == "server"):
        parsed = api.parse(route, b'{"reason": "x", "seconds": 1}' if route.has_body else b"")
        with pytest.raises(QpherError) as info:
            await api.handle(parsed, ctx)
        assert info.value.status == 500


def test_max_batch_items_must_be_positive(kms: FakeKMS) -> None:
    with pytest.raises(ValueError):
        CryptoAPI(kms, max_batch_items=0)


async def test_encrypt_and_decrypt_use_the_documented_hpke_info(api: CryptoAPI, kms: FakeKMS,
                                                                ctx: TenantContext) -> None:
    kid = (await new_key(api, ctx, kind="kem"))["key_id"]
    _, enc = await call(api, ctx, "POST", "/v1/encrypt", {"key_id": kid, "plaintext": b64(b"hi")})
    ct = base64.b64decode(enc["ciphertext"])
    assert await kms.decrypt(ctx, kid, ct, info=HPKE_INFO) == b"hi"
    with pytest.raises(QpherError):
        await kms.decrypt(ctx, kid, ct, info=b"")
    sealed, _ = await kms.encrypt(ctx, kid, b"sealed elsewhere", info=HPKE_INFO)
    _, out = await call(
        api, ctx, "POST", "/v1/decrypt/batch", {"items": [{"key_id": kid, "ciphertext": b64(sealed)}]}
    )
    assert out["items"][0]["plaintext"] == b64(b"sealed elsewhere")


class _BrokenKMS(FakeKMS):
    """Answers crypto calls with malformed results, as a buggy KMS would."""

    async def sign(
        self, ctx: TenantContext, key_id: str, message: bytes, context: bytes = b""
    ) -> tuple[bytes, int]:
        return "not bytes", 0  # type: ignore[return-value]

    async def batch(self, ctx: TenantContext, items: Any) -> list[Any]:
        return [{"wrong": 1} for _ in items]


async def test_a_malformed_kms_answer_is_a_500_not_a_crash(ctx: TenantContext) -> None:
    kms = _BrokenKMS()
    api = CryptoAPI(kms)
    kid = (await kms.create_key(ctx, algorithm="ml-dsa-65")).key_id
    for path, body in [("/v1/sign", {"key_id": kid, "message": ""}),
                       ("/v1/sign/batch", {"items": [{"key_id": kid, "message": ""}]})]:
        route, params = resolve("POST", path)  # type: ignore[misc]
        with pytest.raises(QpherError) as info:
            await api.handle(api.parse(route, json.dumps(body).encode(), params), ctx)
        assert info.value.status == 500 and "not bytes" not in info.value.message
