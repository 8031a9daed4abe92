"""Key import (BYOK) end to end: the real CLI, TLS, gateway and KMS worker (openssl backend).

Keys are made here with ``cryptography``, wrapped here with ``cryptography``'s own HPKE
(``hpke.Suite``: base mode, single shot, the job's KEM, HKDF-SHA256, AES-256-GCM, info
``qpher/v1/import:<job>:<algorithm>``, no aad) and imported; the proxy then proves it holds the
very key: its public key is the local one, its signatures verify here, its encapsulations
decapsulate here, what it seals to the key opens here. Every refusal comes through HTTP with its
documented code and leaves the tenant's keys as they were; plans and rules decide on import like
on any key operation; the audit log records each import with its job; the example script runs
against this gateway. Every answer is checked against openapi.yaml (``CheckedClient``).

One gateway for the module. A job's shortest life is a minute: the job that must expire is made
first and checked last (``slow``: it waits out what is left of that minute).
"""

from __future__ import annotations

import base64
import glob
import hashlib
import json
import os
import secrets
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, hpke, serialization
from cryptography.hazmat.primitives.asymmetric import ec, mldsa, mlkem, x25519
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qpher_proxy.api import ROUTES

from ._gateway import Gateway, cli, init_state, start_gateway
from ._openapi_check import CheckedClient, b64, load_api_helper, unb64

ROOT = Path(__file__).resolve().parents[2]

# A plan that may import, but ML-DSA-65 keys only: the imported key's algorithm is a policy fact.
BYOK_PLAN = """\
version: 1
plans:
  byok-mldsa65:
    rate_limit: {requests_per_second: 1000, burst: 2000}
    algorithms: [ml-dsa-65]
    operations: ["keys.*", "import_jobs.*", sign, verify]
"""

METHODS = ("hpke-x-wing", "hpke-ml-kem-768", "hpke-ml-kem-1024")
MLDSA = {"ml-dsa-44": mldsa.MLDSA44PrivateKey, "ml-dsa-65": mldsa.MLDSA65PrivateKey,
         "ml-dsa-87": mldsa.MLDSA87PrivateKey}
MLKEM = {"ml-kem-768": mlkem.MLKEM768PrivateKey, "ml-kem-1024": mlkem.MLKEM1024PrivateKey}
SEED_SIZES = {**dict.fromkeys(MLDSA, 32), **dict.fromkeys(MLKEM, 64), "x-wing": 32,
              "ml-dsa-65-ecdsa-p256": 83}
RAW = (serialization.Encoding.Raw, serialization.PublicFormat.Raw)
PKCS8 = (serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
# RFC 5915 ECPrivateKey: version 1, the 32-byte scalar, [0] secp256r1, no public key
EC_HEAD, EC_TAIL = bytes.fromhex("30310201010420"), bytes.fromhex("a00a06082a8648ce3d030107")
COMPOSITE_PREFIX = b"CompositeAlgorithmSignatures2025"
COMPOSITE_LABEL = b"COMPSIG-MLDSA65-ECDSA-P256-SHA512"


# ---- the client side: cryptography only ---------------------------------------------------------

def wrap(job: dict[str, Any], algorithm: str, material: bytes, *, job_id: str | None = None) -> bytes:
    """``material`` wrapped for ``job`` with cryptography's HPKE; ``job_id`` names another job in
    the info (a wrap for the wrong job)."""
    raw = unb64(job["public_key"])
    if job["method"] == "hpke-x-wing":
        kem, pk = hpke.KEM.MLKEM768_X25519, hpke.MLKEM768X25519PublicKey(  # X-Wing: pk_M || pk_X
            mlkem.MLKEM768PublicKey.from_public_bytes(raw[:1184]),
            x25519.X25519PublicKey.from_public_bytes(raw[1184:]))
    elif job["method"] == "hpke-ml-kem-768":
        kem, pk = hpke.KEM.MLKEM768, mlkem.MLKEM768PublicKey.from_public_bytes(raw)
    else:
        kem, pk = hpke.KEM.MLKEM1024, mlkem.MLKEM1024PublicKey.from_public_bytes(raw)
    info = b"qpher/v1/import:" + (job_id or job["import_job_id"]).encode() + b":" + algorithm.encode()
    return hpke.Suite(kem, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM).encrypt(material, pk, info=info)


def xwing(seed: bytes) -> tuple[mlkem.MLKEM768PrivateKey, x25519.X25519PrivateKey]:
    expanded = hashlib.shake_256(seed).digest(96)
    return (mlkem.MLKEM768PrivateKey.from_seed_bytes(expanded[:64]),
            x25519.X25519PrivateKey.from_private_bytes(expanded[64:]))


def composite(seed: bytes) -> tuple[mldsa.MLDSA65PrivateKey, ec.EllipticCurvePrivateKey]:
    return (mldsa.MLDSA65PrivateKey.from_seed_bytes(seed[:32]),
            ec.derive_private_key(int.from_bytes(seed[39:71], "big"), ec.SECP256R1()))


def new_seed(algorithm: str) -> bytes:
    if algorithm == "ml-dsa-65-ecdsa-p256":
        scalar = ec.generate_private_key(ec.SECP256R1()).private_numbers().private_value
        return os.urandom(32) + EC_HEAD + scalar.to_bytes(32, "big") + EC_TAIL
    return os.urandom(SEED_SIZES[algorithm])


def pkcs8(algorithm: str, seed: bytes) -> bytes:
    return (MLDSA | MLKEM)[algorithm].from_seed_bytes(seed).private_bytes(*PKCS8)


def public_key(algorithm: str, seed: bytes) -> bytes:
    if algorithm in MLDSA or algorithm in MLKEM:
        return (MLDSA | MLKEM)[algorithm].from_seed_bytes(seed).public_key().public_bytes(*RAW)
    if algorithm == "x-wing":
        k, x = xwing(seed)
        return k.public_key().public_bytes(*RAW) + x.public_key().public_bytes(*RAW)
    m, e = composite(seed)
    point = e.public_key().public_bytes(serialization.Encoding.X962,
                                        serialization.PublicFormat.UncompressedPoint)
    return m.public_key().public_bytes(*RAW) + point


def prove(api: CheckedClient, algorithm: str, seed: bytes, key_id: str) -> None:
    """An operation through the API with the imported key, checked here with the local key."""
    message, context = b"byok " + os.urandom(8), b"e2e/import"
    if algorithm in MLDSA or algorithm == "ml-dsa-65-ecdsa-p256":
        sig = unb64(api.ok("POST", "/v1/sign", {"key_id": key_id, "message": b64(message),
                                                "context": b64(context)})["signature"])
        if algorithm in MLDSA:
            MLDSA[algorithm].from_seed_bytes(seed).public_key().verify(sig, message, context)
        else:
            m, e = composite(seed)
            m_prime = (COMPOSITE_PREFIX + COMPOSITE_LABEL + bytes([len(context)]) + context
                       + hashlib.sha512(message).digest())
            m.public_key().verify(sig[:3309], m_prime, COMPOSITE_LABEL)
            e.public_key().verify(sig[3309:], m_prime, ec.ECDSA(hashes.SHA256()))
    elif algorithm in MLKEM:
        out = api.ok("POST", "/v1/kem/encapsulate", {"key_id": key_id})
        assert MLKEM[algorithm].from_seed_bytes(seed).decapsulate(unb64(out["ciphertext"])) == unb64(
            out["shared_secret"])
    else:
        sealed = api.ok("POST", "/v1/encrypt", {"key_id": key_id, "plaintext": b64(message)})["ciphertext"]
        suite = hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
        private = hpke.MLKEM768X25519PrivateKey(*xwing(seed))
        assert suite.decrypt(unb64(sealed), private, info=b"qpher/v1/encrypt") == message


# ---- fixtures -----------------------------------------------------------------------------------

@dataclass
class Env:
    gw: Gateway
    api: CheckedClient
    other: CheckedClient  # another tenant, plan pro
    expiring: dict[str, Any]  # a job of one minute, made first
    jobs: dict[str, dict[str, Any]]  # method -> a job of a day


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    directory = tmp_path_factory.mktemp("import") / "state"
    init_state(directory, **{"crypto.backend": "openssl"})
    (directory / "policies" / "05-byok-test.yaml").write_text(BYOK_PLAN)
    gw = start_gateway(directory)
    try:
        api = CheckedClient(gw.client())
        expiring = api.ok("POST", "/v1/import-jobs", {"method": "hpke-ml-kem-768", "ttl_seconds": 60})
        other = CheckedClient(gw.client(new_api_key(gw, "e2e-import-other", "pro")))
        jobs = {m: api.ok("POST", "/v1/import-jobs", {"method": m}) for m in METHODS}
        yield Env(gw, api, other, expiring, jobs)
    finally:
        assert gw.stop() == 0


def new_api_key(gw: Gateway, tenant: str, plan: str) -> str:
    out = cli("apikey", "create", "--config", str(gw.directory / "config.yaml"), "--tenant", tenant,
              "--plan", plan).stdout
    return out.strip().splitlines()[-1].strip()


def all_keys(api: CheckedClient) -> list[tuple[str, int, str]]:
    found: list[tuple[str, int, str]] = []
    cursor = None
    while True:
        page = api.ok("GET", "/v1/keys?limit=100" + (f"&cursor={cursor}" if cursor else ""))
        found += [(k["key_id"], k["latest_version"], k["public_key"]) for k in page["keys"]]
        cursor = page["next_cursor"]
        if cursor is None:
            return found


def import_key(api: CheckedClient, job: dict[str, Any], algorithm: str, material: bytes,
               format: str = "seed", **extra: Any) -> dict[str, Any]:
    wrapped = wrap(job, algorithm, material)
    return dict(api.ok("POST", "/v1/keys/import", {
        "import_job_id": job["import_job_id"], "algorithm": algorithm, "wrapped_key": b64(wrapped),
        "format": format, **extra}))


# ---- round trips --------------------------------------------------------------------------------

ROUND_TRIPS = [(a, "seed") for a in SEED_SIZES] + [(a, "pkcs8") for a in (*MLDSA, *MLKEM)]


@pytest.mark.parametrize(("algorithm", "format"), ROUND_TRIPS, ids=[f"{a}-{f}" for a, f in ROUND_TRIPS])
def test_a_key_made_and_wrapped_here_is_the_key_the_proxy_uses(env: Env, algorithm: str, format: str) -> None:
    method = METHODS[ROUND_TRIPS.index((algorithm, format)) % len(METHODS)]
    seed = new_seed(algorithm)
    material = seed if format == "seed" else pkcs8(algorithm, seed)
    key = import_key(env.api, env.jobs[method], algorithm, material, format, label="e2e-byok")
    assert (key["origin"], key["algorithm"], key["label"], key["version"]) == (
        "imported", algorithm, "e2e-byok", 1)
    assert unb64(key["public_key"]) == public_key(algorithm, seed)
    prove(env.api, algorithm, seed, key["key_id"])
    read = env.api.ok("GET", f"/v1/keys/{key['key_id']}")
    assert read["public_key"] == key["public_key"] and read["state"] == "enabled"


@pytest.mark.parametrize("method", METHODS)
def test_ml_dsa_65_round_trip_through_every_method(env: Env, method: str) -> None:
    seed = new_seed("ml-dsa-65")
    key = import_key(env.api, env.jobs[method], "ml-dsa-65", seed)
    prove(env.api, "ml-dsa-65", seed, key["key_id"])


def test_an_imported_version_serves_new_operations_and_old_versions_stay(env: Env) -> None:
    created = env.api.ok("POST", "/v1/keys", {"algorithm": "ml-kem-768"})
    seed = new_seed("ml-kem-768")
    job = env.jobs["hpke-x-wing"]
    after = env.api.ok("POST", f"/v1/keys/{created['key_id']}/import-version", {
        "import_job_id": job["import_job_id"], "wrapped_key": b64(wrap(job, "ml-kem-768", seed))})
    assert (after["key_id"], after["version"], after["latest_version"], after["origin"]) == (
        created["key_id"], 2, 2, "imported")
    assert unb64(after["public_key"]) == public_key("ml-kem-768", seed)
    prove(env.api, "ml-kem-768", seed, created["key_id"])  # the latest version is the imported one
    old = env.api.ok("GET", f"/v1/keys/{created['key_id']}?version=1")
    assert old["public_key"] == created["public_key"]


def test_a_job_is_read_listed_and_hidden_from_other_tenants(env: Env) -> None:
    job = env.jobs["hpke-x-wing"]
    assert env.api.ok("GET", f"/v1/import-jobs/{job['import_job_id']}") == job
    assert set(job) == {"import_job_id", "method", "public_key", "expires_at", "state"}
    assert job["state"] == "active"
    expires = datetime.strptime(job["expires_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert 86_000 < (expires - datetime.now(UTC)).total_seconds() <= 86_400
    listed: list[str] = []
    cursor = None
    while True:
        page = env.api.ok("GET", "/v1/import-jobs?limit=2" + (f"&cursor={cursor}" if cursor else ""))
        listed += [j["import_job_id"] for j in page["import_jobs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert {j["import_job_id"] for j in env.jobs.values()} | {env.expiring["import_job_id"]} <= set(listed)
    assert env.other.ok("GET", "/v1/import-jobs")["import_jobs"] == []
    made_up = "ij_" + base64.b32encode(os.urandom(17)).decode().lower()[:26]
    theirs = env.other.error("GET", f"/v1/import-jobs/{job['import_job_id']}")
    unknown = env.other.error("GET", f"/v1/import-jobs/{made_up}")
    assert theirs[:2] == unknown[:2] == (404, "import_job_not_found")
    assert theirs[2]["message"].replace(job["import_job_id"], made_up) == unknown[2]["message"]


# ---- refusals: documented codes, nothing stored -------------------------------------------------

def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes((data[at] ^ 0x01,)) + data[at + 1:]


REFUSALS = ["other-tenants-job", "made-up-job", "tampered-enc", "tampered-ct", "wrapped-for-another-job",
            "wrapped-for-another-algorithm", "wrong-length", "seed-sent-as-pkcs8", "pkcs8-sent-as-seed",
            "pkcs8-of-another-algorithm", "inconsistent-composite", "empty", "too-large"]


@pytest.mark.parametrize("case", REFUSALS)
def test_every_refusal_has_its_code_and_stores_nothing(env: Env, case: str) -> None:
    job = env.jobs["hpke-ml-kem-768"]
    seed = new_seed("ml-dsa-65")
    good = wrap(job, "ml-dsa-65", seed)
    body: dict[str, Any] = {
        "import_job_id": job["import_job_id"], "algorithm": "ml-dsa-65", "wrapped_key": b64(good)}
    want: tuple[int, str] = (400, "invalid_wrapped_key")
    if case == "other-tenants-job":
        theirs = env.other.ok("POST", "/v1/import-jobs", {"method": "hpke-ml-kem-768"})
        body.update(import_job_id=theirs["import_job_id"], wrapped_key=b64(wrap(theirs, "ml-dsa-65", seed)))
        want = (404, "import_job_not_found")
    elif case == "made-up-job":
        body["import_job_id"] = "ij_" + "q" * 26
        want = (404, "import_job_not_found")
    elif case == "tampered-enc":
        body["wrapped_key"] = b64(_flip(good, 10))
    elif case == "tampered-ct":
        body["wrapped_key"] = b64(_flip(good, len(good) - 20))
    elif case == "wrapped-for-another-job":
        another = env.jobs["hpke-x-wing"]["import_job_id"]
        body["wrapped_key"] = b64(wrap(job, "ml-dsa-65", seed, job_id=another))
    elif case == "wrapped-for-another-algorithm":
        body["algorithm"] = "ml-dsa-44"  # the same 32-byte seed form, but the info named ml-dsa-65
    elif case == "wrong-length":
        body["wrapped_key"] = b64(wrap(job, "ml-dsa-65", seed[:31]))
        want = (400, "invalid_key_material")
    elif case == "seed-sent-as-pkcs8":
        body["format"] = "pkcs8"
        want = (400, "invalid_key_material")
    elif case == "pkcs8-sent-as-seed":
        body["wrapped_key"] = b64(wrap(job, "ml-dsa-65", pkcs8("ml-dsa-65", seed)))
        want = (400, "invalid_key_material")
    elif case == "pkcs8-of-another-algorithm":
        body.update(wrapped_key=b64(wrap(job, "ml-dsa-65", pkcs8("ml-dsa-44", seed))), format="pkcs8")
        want = (400, "invalid_key_material")
    elif case == "inconsistent-composite":
        bad = os.urandom(32) + EC_HEAD + b"\xff" * 32 + EC_TAIL  # the scalar is not below the group order
        body.update(algorithm="ml-dsa-65-ecdsa-p256", wrapped_key=b64(wrap(job, "ml-dsa-65-ecdsa-p256", bad)))
        want = (400, "invalid_key_material")
    elif case == "empty":
        body["wrapped_key"] = ""
    elif case == "too-large":
        body["wrapped_key"] = b64(good + bytes(3072 - len(good) + 1))
        want = (400, "invalid_input")
    before = all_keys(env.api)
    status, code, err = env.api.error("POST", "/v1/keys/import", body)
    assert (status, code) == want, err
    if body["wrapped_key"] and case not in ("made-up-job", "other-tenants-job", "too-large"):
        assert body["wrapped_key"][:40] not in err["message"]
    # the same refusal for a new version of an existing key, which keeps its one version
    existing = env.api.ok("POST", "/v1/keys", {"algorithm": body["algorithm"]})
    before.append((existing["key_id"], 1, existing["public_key"]))
    version_body = {k: v for k, v in body.items() if k != "algorithm"}
    if case != "wrapped-for-another-algorithm":  # there the key's own algorithm is the one wrapped for
        status, code, _ = env.api.error("POST", f"/v1/keys/{existing['key_id']}/import-version", version_body)
        assert (status, code) == want
    assert sorted(all_keys(env.api)) == sorted(before)


def test_an_idempotent_import_is_answered_once(env: Env) -> None:
    job = env.jobs["hpke-x-wing"]
    label = f"e2e-idem-{secrets.token_hex(4)}"
    body = {"import_job_id": job["import_job_id"], "algorithm": "ml-dsa-65",
            "wrapped_key": b64(wrap(job, "ml-dsa-65", new_seed("ml-dsa-65"))), "label": label}
    key = f"e2e-import-{secrets.token_hex(8)}"
    s1, first, h1 = env.api.call("POST", "/v1/keys/import", body, headers={"Idempotency-Key": key})
    s2, again, h2 = env.api.call("POST", "/v1/keys/import", body, headers={"Idempotency-Key": key})
    assert (s1, s2) == (201, 201) and first == again
    assert h1.get("Idempotent-Replayed") is None and h2.get("Idempotent-Replayed") == "true"
    assert [k for k in env.api.ok("GET", "/v1/keys?limit=100")["keys"] if k["label"] == label] != []
    status, code, _ = env.api.error("POST", "/v1/keys/import", {**body, "label": label + "-2"},
                                    headers={"Idempotency-Key": key})
    assert (status, code) == (409, "idempotency_key_reused")


def test_a_fuzz_of_the_import_bodies_never_gets_a_5xx(env: Env) -> None:
    """Near-valid bodies (real and made-up job ids, real, tampered and random wrapped keys, every
    algorithm and format), random JSON and bytes: every answer keeps the contract (no 5xx, a
    documented status and code, a schema-valid body), and whatever was refused stored nothing."""
    strategies = load_api_helper("_api_strategies")
    job = env.jobs["hpke-x-wing"]
    target = env.api.ok("POST", "/v1/keys", {"algorithm": "ml-dsa-65"})["key_id"]
    good = [b64(wrap(job, a, new_seed(a))) for a in ("ml-dsa-65", "ml-kem-768", "x-wing")]
    wrapped = good + [b64(_flip(unb64(w), 40)) for w in good] + [b64(wrap(job, "ml-dsa-65", b"\x30" * 54))]
    job_ids = [j["import_job_id"] for j in (*env.jobs.values(), env.expiring)] + ["ij_" + "b" * 26]
    routes = [r for r in ROUTES if r.operation in ("keys.import", "keys.import_version")]
    statuses: Counter[int | str] = Counter()

    @settings(max_examples=80, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        route = data.draw(st.sampled_from(routes))
        fields = {
            "import_job_id": st.sampled_from(job_ids),
            "wrapped_key": st.sampled_from(wrapped) | strategies.b64(80),
            "format": st.sampled_from(["seed", "pkcs8"]), "algorithm": st.sampled_from(sorted(SEED_SIZES))}
        if route.operation == "keys.import_version":
            del fields["algorithm"]
        well_formed = st.fixed_dictionaries(fields).map(lambda v: json.dumps(v).encode())
        body = data.draw(well_formed | strategies.body(route, [target], max_batch=1, job_ids=job_ids,
                                                       wrapped=wrapped))
        path = route.template.replace("{key_id}", target)
        status, answer, _ = env.api.call("POST", path, raw=body, headers={"Content-Type": "application/json"})
        statuses[status if status < 400 else answer["error"]["code"]] += 1

    run()
    # CheckedClient refused any 5xx; the fuzz got past validation to the KMS's own checks
    assert {"invalid_wrapped_key", "import_job_not_found"} <= set(statuses), statuses


# ---- policy and audit ---------------------------------------------------------------------------

def test_plans_decide_on_import_like_on_any_key_operation(env: Env) -> None:
    free = CheckedClient(env.gw.client(new_api_key(env.gw, "e2e-import-free", "free")))
    byok = CheckedClient(env.gw.client(new_api_key(env.gw, "e2e-import-byok", "byok-mldsa65")))
    try:
        job = env.jobs["hpke-ml-kem-768"]
        body = {"import_job_id": job["import_job_id"], "algorithm": "ml-dsa-65",
                "wrapped_key": b64(wrap(job, "ml-dsa-65", new_seed("ml-dsa-65")))}
        for method, path, b in [("POST", "/v1/import-jobs", {"method": "hpke-x-wing"}),
                                ("GET", "/v1/import-jobs", None), ("POST", "/v1/keys/import", body)]:
            status, code, err = free.error(method, path, b)
            assert (status, code) == (403, "policy_denied") and "pro or enterprise" in err["message"]
        assert all_keys(free) == []
        # a plan with import but ML-DSA-65 only: the imported key's algorithm is checked too
        own = byok.ok("POST", "/v1/import-jobs", {"method": "hpke-x-wing"})
        seed65, seed87 = new_seed("ml-dsa-65"), new_seed("ml-dsa-87")
        imported = import_key(byok, own, "ml-dsa-65", seed65)
        prove(byok, "ml-dsa-65", seed65, imported["key_id"])
        status, code, _ = byok.error("POST", "/v1/keys/import", {
            "import_job_id": own["import_job_id"], "algorithm": "ml-dsa-87",
            "wrapped_key": b64(wrap(own, "ml-dsa-87", seed87))})
        assert (status, code) == (403, "policy_denied")
        assert [k[0] for k in all_keys(byok)] == [imported["key_id"]]
    finally:
        free.close()
        byok.close()


def _audit(gw: Gateway) -> list[dict[str, Any]]:
    files = sorted(glob.glob(str(gw.directory / "audit" / "audit.log*")))
    files = [f for f in files if Path(f).is_file() and not f.endswith((".lock", ".tree"))]
    return [json.loads(line) for f in files for line in Path(f).read_text().splitlines() if line]


def test_the_audit_log_records_each_import_and_its_job(env: Env) -> None:
    job = env.jobs["hpke-ml-kem-1024"]
    key = import_key(env.api, job, "ml-kem-1024", new_seed("ml-kem-1024"))
    events = [r for r in _audit(env.gw) if r.get("key_id") == key["key_id"]]
    imported = [r for r in events if r["event"] == "key.imported"]
    assert len(imported) == 1
    assert (imported[0]["origin"], imported[0]["import_job_id"], imported[0]["algorithm"]) == (
        "imported", job["import_job_id"], "ml-kem-1024")


# ---- the example ----------------------------------------------------------------------------

def _run_example(gw: Gateway, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QPHER_")}
    env.update(QPHER_URL=f"https://localhost:{gw.port}", QPHER_CA=str(gw.ca_file),
               QPHER_API_KEY=(gw.directory / "secrets" / "demo-api-key").read_text())
    return subprocess.run([sys.executable, str(ROOT / "examples" / "import_key.py"), *args], env=env,
                          capture_output=True, text=True, timeout=120)


def test_the_example_imports_keys_it_makes_or_reads(env: Env, tmp_path: Path) -> None:
    proc = _run_example(env.gw)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1].startswith("ok: ") and proc.stderr == ""
    for algorithm in ("ml-dsa-65", "ml-kem-768", "x-wing", "ml-dsa-65-ecdsa-p256"):
        assert f"{algorithm}: the proxy's public key is the local one" in proc.stdout
    seed = new_seed("ml-dsa-87")
    (tmp_path / "seed.bin").write_bytes(seed)
    proc = _run_example(env.gw, "--algorithm", "ml-dsa-87", "--key", str(tmp_path / "seed.bin"),
                        "--job", env.jobs["hpke-ml-kem-1024"]["import_job_id"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    pem = mlkem.MLKEM1024PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    (tmp_path / "key.pem").write_bytes(pem)
    proc = _run_example(env.gw, "--algorithm", "ml-kem-1024", "--key", str(tmp_path / "key.pem"),
                        "--format", "pkcs8", "--method", "hpke-ml-kem-768")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ml-kem-1024: wrapped 86 bytes (pkcs8)" in proc.stdout
