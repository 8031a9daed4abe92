"""Key import (BYOK) in the API layer: import jobs, keys and key versions imported through a job,
every refusal as a documented error with nothing stored, the Idempotency-Key on imports, and the
KMS's answers rendered as openapi.yaml says. The fake KMS's "HPKE" stands in for the real one
(see _api_fake_kms); the real wrapping, opening and key checks are tested end to end
(tests/e2e/test_e2e_import.py) and in tests/kms."""

from __future__ import annotations

import base64
import json
from types import SimpleNamespace
from typing import Any

import pytest
from _api_call import call, code
from _api_fake_kms import FakeKMS, import_info
from _api_openapi import validate_response

from qpher_proxy.api import CryptoAPI, resolve
from qpher_proxy.api.handlers import REPLAYED_HEADER, import_job_json
from qpher_proxy.api.validation import DEFAULT_IMPORT_JOB_TTL_SECONDS
from qpher_proxy.context import TenantContext
from qpher_proxy.errors import QpherError

B64 = base64.b64encode


def b64(data: bytes) -> str:
    return B64(data).decode()


async def _job(api: CryptoAPI, ctx: TenantContext, method: str = "hpke-ml-kem-768", **extra: Any) -> str:
    status, job = await call(api, ctx, "POST", "/v1/import-jobs", {"method": method, **extra})
    assert status == 201
    return str(job["import_job_id"])


async def _key_ids(api: CryptoAPI, ctx: TenantContext) -> list[tuple[str, int]]:
    _, page = await call(api, ctx, "GET", "/v1/keys", query="limit=100")
    return [(k["key_id"], k["latest_version"]) for k in page["keys"]]


# ---- import jobs ------------------------------------------------------------------------------

class RecordingKMS(FakeKMS):
    def __init__(self) -> None:
        super().__init__()
        self.ttls: list[int | None] = []
        self.imports: list[dict[str, Any]] = []

    async def create_import_job(self, ctx: TenantContext, method: str,
                                ttl_seconds: int | None = None) -> dict[str, Any]:
        self.ttls.append(ttl_seconds)
        return await super().create_import_job(ctx, method, ttl_seconds)

    async def import_key(self, ctx: TenantContext, job_id: str, algorithm: str, wrapped_key: bytes,
                         **kw: Any) -> Any:
        self.imports.append({"job_id": job_id, "algorithm": algorithm, **kw})
        return await super().import_key(ctx, job_id, algorithm, wrapped_key, **kw)


@pytest.fixture
def kms() -> RecordingKMS:
    return RecordingKMS()


@pytest.mark.parametrize("method", ["hpke-x-wing", "hpke-ml-kem-768", "hpke-ml-kem-1024"])
async def test_a_job_answers_its_public_key_expiry_and_state(
    api: CryptoAPI, kms: RecordingKMS, ctx: TenantContext, method: str
) -> None:
    status, job = await call(api, ctx, "POST", "/v1/import-jobs", {"method": method})
    assert status == 201
    assert set(job) == {"import_job_id", "method", "public_key", "expires_at", "state"}
    assert (job["method"], job["state"]) == (method, "active")
    want_size = {"hpke-x-wing": 1216, "hpke-ml-kem-768": 1184, "hpke-ml-kem-1024": 1568}[method]
    assert len(base64.b64decode(job["public_key"])) == want_size
    assert job["expires_at"].endswith("Z")
    assert kms.ttls == [DEFAULT_IMPORT_JOB_TTL_SECONDS]  # the API's documented default, said explicitly
    assert await call(api, ctx, "GET", f"/v1/import-jobs/{job['import_job_id']}") == (200, job)


async def test_ttl_seconds_is_passed_to_the_kms(
    api: CryptoAPI, kms: RecordingKMS, ctx: TenantContext
) -> None:
    await _job(api, ctx, ttl_seconds=60)
    await _job(api, ctx, ttl_seconds=604800.0)
    assert kms.ttls == [60, 604800]


async def test_an_expired_job_reads_as_expired(api: CryptoAPI, kms: FakeKMS, ctx: TenantContext) -> None:
    job_id = await _job(api, ctx, ttl_seconds=60)
    kms.advance(120)
    _, job = await call(api, ctx, "GET", f"/v1/import-jobs/{job_id}")
    assert job["state"] == "expired"


async def test_another_tenants_job_is_not_found_like_a_made_up_id(
    api: CryptoAPI, ctx: TenantContext, other_ctx: TenantContext
) -> None:
    theirs = await _job(api, other_ctx)
    made_up = "ij_" + "a" * 26
    for path in (f"/v1/import-jobs/{theirs}",):
        status, err = await call(api, ctx, "GET", path)
        assert (status, err["error"]["code"]) == (404, "import_job_not_found")
    _, mine = await call(api, ctx, "GET", f"/v1/import-jobs/{made_up}")
    _, theirs_err = await call(api, ctx, "GET", f"/v1/import-jobs/{theirs}")
    assert theirs_err["error"]["message"].replace(theirs, made_up) == mine["error"]["message"]
    # a malformed id answers the same without asking the KMS
    _, bad = await call(api, ctx, "GET", "/v1/import-jobs/ij_NOPE")
    assert (bad["error"]["code"], bad["error"]["message"]) == (
        "import_job_not_found", "no import job 'ij_NOPE'")


async def test_jobs_are_listed_per_tenant_in_pages(
    api: CryptoAPI, ctx: TenantContext, other_ctx: TenantContext
) -> None:
    mine = sorted([await _job(api, ctx) for _ in range(3)])
    await _job(api, other_ctx)
    _, page = await call(api, ctx, "GET", "/v1/import-jobs", query="limit=2")
    assert [j["import_job_id"] for j in page["import_jobs"]] == mine[:2] and page["next_cursor"] == mine[1]
    _, page = await call(api, ctx, "GET", "/v1/import-jobs", query=f"limit=2&cursor={mine[1]}")
    assert [j["import_job_id"] for j in page["import_jobs"]] == mine[2:] and page["next_cursor"] is None


def test_a_job_may_come_as_an_object_and_a_malformed_one_is_a_500() -> None:
    job = SimpleNamespace(import_job_id="ij_" + "b" * 26, method="hpke-x-wing", public_key=b"\x01" * 1216,
                          created_at=0.0, expires_at=86400.0, state="active")
    assert import_job_json(job) == {"import_job_id": job.import_job_id, "method": "hpke-x-wing",
                                    "public_key": b64(job.public_key), "expires_at": "1970-01-02T00:00:00Z",
                                    "state": "active"}
    with pytest.raises(QpherError) as info:
        import_job_json({"import_job_id": "ij_x", "method": "hpke-x-wing", "public_key": "not bytes",
                         "expires_at": 1.0, "state": "active"})
    assert info.value.status == 500


# ---- importing keys ---------------------------------------------------------------------------

@pytest.mark.parametrize(("algorithm", "seed_size"), [
    ("ml-kem-768", 64), ("ml-kem-1024", 64), ("x-wing", 32), ("ml-dsa-44", 32), ("ml-dsa-65", 32),
    ("ml-dsa-87", 32), ("ml-dsa-65-ecdsa-p256", 83),
])
async def test_an_imported_key_is_the_create_answer_with_its_origin(
    api: CryptoAPI, kms: RecordingKMS, ctx: TenantContext, algorithm: str, seed_size: int
) -> None:
    job_id = await _job(api, ctx, "hpke-x-wing")
    wrapped = kms.wrap(job_id, algorithm, bytes(seed_size))
    status, key = await call(api, ctx, "POST", "/v1/keys/import", {
        "import_job_id": job_id, "algorithm": algorithm, "wrapped_key": b64(wrapped), "label": "byok"})
    assert status == 201
    assert key["origin"] == "imported"
    assert (key["algorithm"], key["label"], key["version"], key["state"]) == (algorithm, "byok", 1, "enabled")
    _, created = await call(api, ctx, "POST", "/v1/keys", {"algorithm": algorithm})
    assert set(key) == set(created) | {"origin"}
    _, read = await call(api, ctx, "GET", f"/v1/keys/{key['key_id']}")
    assert read == {k: v for k, v in key.items() if k != "origin"}
    assert kms.imports == [{"job_id": job_id, "algorithm": algorithm, "format": "seed", "label": "byok",
                            "key_id": None, "idempotency_key": None}]


async def test_an_imported_key_works_like_any_other(api: CryptoAPI, kms: FakeKMS, ctx: TenantContext) -> None:
    job_id = await _job(api, ctx)
    _, key = await call(api, ctx, "POST", "/v1/keys/import", {
        "import_job_id": job_id, "algorithm": "ml-dsa-65", "wrapped_key": b64(kms.wrap(job_id, "ml-dsa-65",
                                                                                         bytes(32)))})
    msg = b64(b"hello")
    _, sig = await call(api, ctx, "POST", "/v1/sign", {"key_id": key["key_id"], "message": msg})
    _, ok = await call(api, ctx, "POST", "/v1/verify",
                       {"key_id": key["key_id"], "message": msg, "signature": sig["signature"]})
    assert ok == {"valid": True}


async def test_a_job_serves_several_imports(api: CryptoAPI, kms: FakeKMS, ctx: TenantContext) -> None:
    job_id = await _job(api, ctx)
    for alg, n in [("ml-kem-768", 64), ("ml-dsa-65", 32)]:
        status, _ = await call(api, ctx, "POST", "/v1/keys/import", {
            "import_job_id": job_id, "algorithm": alg, "wrapped_key": b64(kms.wrap(job_id, alg, bytes(n)))})
        assert status == 201


async def test_format_is_passed_through(api: CryptoAPI, kms: RecordingKMS, ctx: TenantContext) -> None:
    job_id = await _job(api, ctx)
    wrapped = kms.wrap(job_id, "ml-dsa-65", b"\x30\x34" + bytes(52))
    status, _ = await call(api, ctx, "POST", "/v1/keys/import", {
        "import_job_id": job_id, "algorithm": "ml-dsa-65", "wrapped_key": b64(wrapped), "format": "pkcs8"})
    assert status == 201 and kms.imports[-1]["format"] == "pkcs8"


async def test_an_imported_version_is_the_rotate_answer_with_its_origin(
    api: CryptoAPI, kms: RecordingKMS, ctx: TenantContext
) -> None:
    _, key = await call(api, ctx, "POST", "/v1/keys", {"algorithm": "ml-kem-1024"})
    job_id = await _job(api, ctx, "hpke-ml-kem-1024")
    wrapped = kms.wrap(job_id, "ml-kem-1024", bytes(64))
    status, after = await call(api, ctx, "POST", f"/v1/keys/{key['key_id']}/import-version",
                               {"import_job_id": job_id, "wrapped_key": b64(wrapped)})
    assert status == 200
    assert (after["key_id"], after["version"], after["latest_version"], after["origin"]) == (
        key["key_id"], 2, 2, "imported")
    assert after["public_key"] != key["public_key"]
    # the key's own algorithm is the one the wrapped key was made for (the HPKE info names it)
    assert kms.imports[-1] == {"job_id": job_id, "algorithm": "ml-kem-1024", "format": "seed", "label": None,
                               "key_id": key["key_id"], "idempotency_key": None}


async def test_an_imported_version_needs_an_enabled_key_of_the_tenant(
    api: CryptoAPI, kms: FakeKMS, ctx: TenantContext, other_ctx: TenantContext
) -> None:
    _, theirs = await call(api, other_ctx, "POST", "/v1/keys", {"algorithm": "ml-dsa-65"})
    _, mine = await call(api, ctx, "POST", "/v1/keys", {"algorithm": "ml-dsa-65"})
    await call(api, ctx, "POST", f"/v1/keys/{mine['key_id']}/disable")
    job_id = await _job(api, ctx)
    body = {"import_job_id": job_id, "wrapped_key": b64(kms.wrap(job_id, "ml-dsa-65", bytes(32)))}
    assert code(await call(api, ctx, "POST", f"/v1/keys/{theirs['key_id']}/import-version", body)) == (
        404, "key_not_found")
    assert code(await call(api, ctx, "POST", "/v1/keys/k_nope/import-version", body)) == (
        404, "key_not_found")
    assert code(await call(api, ctx, "POST", f"/v1/keys/{mine['key_id']}/import-version", body)) == (
        409, "key_disabled")
    assert (await call(api, ctx, "GET", f"/v1/keys/{mine['key_id']}"))[1]["latest_version"] == 1


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes((data[at] ^ 1,)) + data[at + 1:]


@pytest.mark.parametrize("case", [
    "expired", "other-tenants-job", "made-up-job", "tampered-enc", "tampered-ct", "truncated", "other-job",
    "other-algorithm", "wrong-length", "pkcs8-of-nothing", "empty",
])
async def test_every_refusal_is_documented_and_stores_nothing(
    api: CryptoAPI, kms: FakeKMS, ctx: TenantContext, other_ctx: TenantContext, case: str
) -> None:
    job_id = await _job(api, ctx)
    other_job = await _job(api, ctx)
    theirs = await _job(api, other_ctx)
    _, key = await call(api, ctx, "POST", "/v1/keys", {"algorithm": "ml-dsa-65"})
    good = kms.wrap(job_id, "ml-dsa-65", bytes(32))
    body: dict[str, Any] = {"import_job_id": job_id, "algorithm": "ml-dsa-65", "wrapped_key": b64(good)}
    want = {
        "expired": (400, "import_job_expired"), "other-tenants-job": (404, "import_job_not_found"),
        "made-up-job": (404, "import_job_not_found"),
    }.get(case, (400, "invalid_key_material" if case in ("wrong-length", "pkcs8-of-nothing")
                 else "invalid_wrapped_key"))
    if case == "expired":
        kms.advance(2 * 86400)
    elif case == "other-tenants-job":
        body["import_job_id"] = theirs
        body["wrapped_key"] = b64(kms.wrap(theirs, "ml-dsa-65", bytes(32)))
    elif case == "made-up-job":
        body["import_job_id"] = "ij_" + "a" * 26
    elif case == "tampered-enc":
        body["wrapped_key"] = b64(_flip(good, 5))
    elif case == "tampered-ct":
        body["wrapped_key"] = b64(_flip(good, len(good) - 3))
    elif case == "truncated":
        body["wrapped_key"] = b64(good[:-1])
    elif case == "other-job":
        body["import_job_id"] = other_job
    elif case == "other-algorithm":
        body["algorithm"] = "ml-dsa-44"
    elif case == "wrong-length":
        body["wrapped_key"] = b64(kms.wrap(job_id, "ml-dsa-65", bytes(64)))
    elif case == "pkcs8-of-nothing":
        body["format"] = "pkcs8"
    elif case == "empty":
        body["wrapped_key"] = ""
    before = await _key_ids(api, ctx)
    assert code(await call(api, ctx, "POST", "/v1/keys/import", body)) == want
    version_body = {k: v for k, v in body.items() if k != "algorithm"}
    if case == "other-algorithm":  # the key's own algorithm is used: wrapped for ml-dsa-65, it opens
        return
    path = f"/v1/keys/{key['key_id']}/import-version"
    assert code(await call(api, ctx, "POST", path, version_body)) == want
    assert await _key_ids(api, ctx) == before


def test_the_fake_wraps_with_the_documented_info() -> None:
    assert import_info("ij_x", "ml-dsa-65") == b"qpher/v1/import:ij_x:ml-dsa-65"


# ---- Idempotency-Key ------------------------------------------------------------------------

async def _respond(api: CryptoAPI, ctx: TenantContext, path: str, body: dict[str, Any],
                   key: str | None) -> Any:
    found = resolve("POST", path)
    assert found is not None
    route, params = found
    parsed = api.parse(route, json.dumps(body).encode(), params,
                       idempotency_key=() if key is None else (key.encode(),))
    answer = await api.respond(parsed, ctx)
    validate_response(route, answer.status, answer.body)
    return answer


async def test_a_retried_import_answers_the_first_key_with_the_replay_header(
    api: CryptoAPI, kms: RecordingKMS, ctx: TenantContext
) -> None:
    job_id = await _job(api, ctx)
    body = {"import_job_id": job_id, "algorithm": "ml-dsa-65",
            "wrapped_key": b64(kms.wrap(job_id, "ml-dsa-65", bytes(32)))}
    first = await _respond(api, ctx, "/v1/keys/import", body, "imp-1")
    again = await _respond(api, ctx, "/v1/keys/import", body, "imp-1")
    assert (first.status, again.status) == (201, 201) and first.body == again.body
    assert first.headers == () and again.headers == (REPLAYED_HEADER,)
    assert kms.imports[-1]["idempotency_key"] == "imp-1"
    assert len(await _key_ids(api, ctx)) == 1
    with pytest.raises(QpherError) as info:
        await _respond(api, ctx, "/v1/keys/import", {**body, "label": "other"}, "imp-1")
    assert (info.value.status, info.value.code) == (409, "idempotency_key_reused")


async def test_a_retried_version_import_adds_one_version(
    api: CryptoAPI, kms: RecordingKMS, ctx: TenantContext
) -> None:
    _, key = await call(api, ctx, "POST", "/v1/keys", {"algorithm": "x-wing"})
    job_id = await _job(api, ctx, "hpke-x-wing")
    body = {"import_job_id": job_id, "wrapped_key": b64(kms.wrap(job_id, "x-wing", bytes(32)))}
    path = f"/v1/keys/{key['key_id']}/import-version"
    first = await _respond(api, ctx, path, body, "ver-1")
    again = await _respond(api, ctx, path, body, "ver-1")
    assert first.body == again.body and again.replayed and first.body["version"] == 2
    assert (await call(api, ctx, "GET", f"/v1/keys/{key['key_id']}"))[1]["latest_version"] == 2


async def test_a_malformed_idempotency_key_on_import_is_refused(api: CryptoAPI, ctx: TenantContext) -> None:
    route, _ = resolve("POST", "/v1/keys/import")  # type: ignore[misc]
    body = json.dumps({"import_job_id": "ij_" + "a" * 26, "algorithm": "ml-dsa-65", "wrapped_key": ""})
    with pytest.raises(QpherError) as info:
        api.parse(route, body.encode(), {}, idempotency_key=(b"two words",))
    assert info.value.code == "invalid_idempotency_key"
