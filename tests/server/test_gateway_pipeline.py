"""The request pipeline in process (real auth store, limiter, quota counter, policy engine and
audit log; a small stand-in for the KMS client): what the per-request shortcuts of
``Gateway.handle`` must keep -- usage reaches the policy exactly when a rule reads it, quotas are
counted either way, every decision is audited (hash-chained) before the answer, and API answers
are the JSON of what the handlers returned."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from qpher_proxy.api import CryptoAPI
from qpher_proxy.audit import AuditLog, parse_record, verify
from qpher_proxy.audit.log import DEFAULT_PROBE_INTERVAL
from qpher_proxy.auth.apikeys import APIKeyStore, Authenticator
from qpher_proxy.context import TenantContext
from qpher_proxy.crypto.algorithms import ALGORITHMS
from qpher_proxy.errors import KeyNotFound
from qpher_proxy.http import Request, Response
from qpher_proxy.kms.wire.model import new_key_id
from qpher_proxy.metrics import Metrics
from qpher_proxy.policy import PolicyEngine, load_policy_dir
from qpher_proxy.ratelimit import QuotaCounter, TokenBucketLimiter
from qpher_proxy.server.gateway import Gateway

PLANS = """\
version: 1
plans:
  pro:
    rate_limit: {requests_per_second: 1000, burst: 1000}
    quotas: {kem: 1000}
    algorithms: ["*"]
    operations: ["*"]
"""
ALLOW = """\
version: 1
rules:
  - id: allow-pro
    effect: allow
    match: {plan: pro}
    reason: pro plan
"""
USAGE_GUARD = """\
version: 1
rules:
  - id: kem-cap
    effect: deny
    match: {usage_over: {operation: kem, at_least: 2}}
    reason: two encapsulations a month
"""


@dataclass
class _Info:
    key_id: str
    algorithm: str
    label: str | None


class StubKMS:
    """Just what the pipeline asks of the KMS client here: key metadata and encapsulate."""

    ready = True

    def __init__(self) -> None:
        self.keys: dict[tuple[str, str], _Info] = {}

    def add(self, tenant: str, algorithm: str = "ml-kem-768") -> str:
        kid = new_key_id()
        self.keys[(tenant, kid)] = _Info(kid, algorithm, None)
        return kid

    async def get_key(self, ctx: TenantContext, key_id: str, version: int | None = None) -> _Info:
        info = self.keys.get((ctx.tenant_id, key_id))
        if info is None:
            raise KeyNotFound("no such key")
        return info

    async def encapsulate(self, ctx: TenantContext, key_id: str) -> tuple[bytes, bytes, int]:
        await self.get_key(ctx, key_id)
        alg = ALGORITHMS["ml-kem-768"]
        return os.urandom(alg.shared_secret_size), os.urandom(alg.ciphertext_size), 1


@dataclass
class Pipeline:
    gateway: Gateway
    kms: StubKMS
    audit_path: Path
    quotas: QuotaCounter
    api_key: str
    tenant: str = "acme"

    def request(self, method: str, path: str, body: bytes = b"") -> Request:
        headers = [(b"host", b"localhost"), (b"authorization", b"Bearer " + self.api_key.encode())]
        return Request(method, path, path, "", headers, "1.1", secrets.token_hex(8), "192.0.2.7", {},
                       _Body(body), 0)


class _Body:
    def __init__(self, body: bytes) -> None:
        self.body = body

    async def _read_body(self, generation: int, max_bytes: int | None) -> bytes:
        body, self.body = self.body, b""
        return body


def _pipeline(
    tmp_path: Path, policy_files: dict[str, str], audit_probe_interval: float = DEFAULT_PROBE_INTERVAL
) -> Iterator[Pipeline]:
    policies = tmp_path / "policies"
    policies.mkdir()
    for name, text in policy_files.items():
        (policies / name).write_text(text)
    audit_path = tmp_path / "audit.log"
    with (
        AuditLog(audit_path, probe_interval=audit_probe_interval) as audit,
        APIKeyStore(tmp_path / "g.db", secrets.token_bytes(32)) as store,
        QuotaCounter(tmp_path / "g.db") as quotas,
    ):
        _, key = store.create("acme", "pro")
        policy = PolicyEngine(policies, audit)
        assert policy.reload().ok
        kms = StubKMS()
        gateway = Gateway(kms=kms, api=CryptoAPI(kms), authenticator=Authenticator(store),  # type: ignore[arg-type]
                          limiter=TokenBucketLimiter(), quotas=quotas, policy=policy, audit=audit,
                          metrics=Metrics())
        yield Pipeline(gateway, kms, audit_path, quotas, key)


# The fixtures yield from _pipeline; a test that needs its own policy files opens one in a `with`.
open_pipeline = contextmanager(_pipeline)


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[Pipeline]:
    yield from _pipeline(
        tmp_path, {"00-plans.yaml": PLANS, "10-guard.yaml": USAGE_GUARD, "90-allow.yaml": ALLOW}
    )


@pytest.fixture
def plain(tmp_path: Path) -> Iterator[Pipeline]:
    yield from _pipeline(tmp_path, {"00-plans.yaml": PLANS, "90-allow.yaml": ALLOW})


async def _encapsulate(p: Pipeline, kid: str) -> tuple[Request, Response]:
    req = p.request("POST", "/v1/kem/encapsulate", json.dumps({"key_id": kid}).encode())
    return req, await p.gateway.handle(req)


def _decisions(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_bytes().split(b"\n")[:-1]:
        rec = parse_record(line)
        if rec is not None and rec.event == "policy.decision":
            out[str(rec.fields["request_id"])] = str(rec.fields["effect"])
    return out


async def test_a_usage_rule_sees_this_months_counts(guarded: Pipeline) -> None:
    assert guarded.gateway.policy.uses_usage
    kid = guarded.kms.add(guarded.tenant)
    statuses = []
    for _ in range(3):
        req, resp = await _encapsulate(guarded, kid)
        statuses.append(resp.status)
        assert _decisions(guarded.audit_path).get(req.request_id) == (
            "allow" if resp.status == 200 else "deny"
        )
    assert statuses == [200, 200, 403]  # the third one sees kem usage 2
    assert json.loads(bytes(resp.body))["error"]["code"] == "policy_denied"  # type: ignore[arg-type]
    assert guarded.quotas.usage(guarded.tenant) == {"kem": 2}  # the denied one was not counted
    assert verify([guarded.audit_path]).ok


async def test_without_usage_rules_quotas_are_still_counted(plain: Pipeline) -> None:
    assert not plain.gateway.policy.uses_usage
    kid = plain.kms.add(plain.tenant)
    for _ in range(3):
        req, resp = await _encapsulate(plain, kid)
        assert resp.status == 200
        assert _decisions(plain.audit_path)[req.request_id] == "allow"  # audited before the answer
    assert plain.quotas.usage(plain.tenant) == {"kem": 3}
    assert verify([plain.audit_path]).ok


async def test_answers_are_the_compact_json_of_the_handlers_object(plain: Pipeline) -> None:
    kid = plain.kms.add(plain.tenant)
    _, resp = await _encapsulate(plain, kid)
    body = bytes(resp.body)  # type: ignore[arg-type]
    obj = json.loads(body)
    assert body == json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
    assert set(obj) == {"ciphertext", "shared_secret", "key_version"}
    assert len(_b64decode(obj["ciphertext"])) == ALGORITHMS["ml-kem-768"].ciphertext_size
    assert (b"content-type", b"application/json") in list(resp.headers)


async def test_another_tenants_key_is_not_found_and_audited(plain: Pipeline) -> None:
    kid = plain.kms.add("globex")
    req, resp = await _encapsulate(plain, kid)
    assert resp.status == 404
    assert json.loads(bytes(resp.body))["error"]["code"] == "key_not_found"  # type: ignore[arg-type]
    assert _decisions(plain.audit_path)[req.request_id] == "allow"  # decided (on no key facts), then 404


async def test_a_wrong_key_is_refused_and_the_failure_audited(plain: Pipeline) -> None:
    plain.api_key = plain.api_key[:-4] + "AAAA"
    req = plain.request("POST", "/v1/kem/encapsulate", b"{}")
    resp = await plain.gateway.handle(req)
    assert resp.status == 401
    failures = [parse_record(x) for x in plain.audit_path.read_bytes().split(b"\n")[:-1]]
    assert any(r is not None and r.event == "auth.failure" and r.fields["request_id"] == req.request_id
               for r in failures)
    assert plain.api_key not in plain.audit_path.read_text()


def _b64decode(text: Any) -> bytes:
    import base64

    return base64.b64decode(text, validate=True)


async def test_readiness_follows_the_audit_log_and_recovers_without_traffic(tmp_path: Path) -> None:
    with open_pipeline(tmp_path, {"00-plans.yaml": PLANS, "90-allow.yaml": ALLOW},
                       audit_probe_interval=0.0) as pipeline:
        gateway = pipeline.gateway

        async def readyz() -> tuple[int, Any]:
            resp = await gateway.handle(pipeline.request("GET", "/readyz"))
            return resp.status, json.loads(resp.body)  # type: ignore[arg-type]

        assert await readyz() == (
            200,
            {
                "status": "ready",
                "checks": {"kms": True, "policy": True, "audit": True},
                "policy": {"revision": gateway.policy.revision},
            },
        )
        moved = pipeline.audit_path.rename(tmp_path / "moved-away.log")
        pipeline.audit_path.mkdir()  # no audit record can be written now
        refused = await gateway.handle(pipeline.request("GET", "/v1/info"))
        assert refused.status == 503
        status, body = await readyz()
        assert status == 503 and body["status"] == "not_ready"
        assert body["checks"] == {"kms": True, "policy": True, "audit": False}
        assert body["reasons"] == {"audit": "the audit log cannot be written"}
        pipeline.audit_path.rmdir()
        moved.rename(pipeline.audit_path)
        audited = pipeline.audit_path.read_bytes()
        assert (await readyz())[0] == 200  # no request in between: the probe re-opened the log
        assert pipeline.audit_path.read_bytes() == audited  # /readyz itself is never audited
        assert (await gateway.handle(pipeline.request("GET", "/v1/info"))).status == 200
    assert verify([tmp_path / "audit.log"]).ok


async def test_readiness_and_info_name_the_policy_revision_in_force(tmp_path: Path) -> None:
    with open_pipeline(tmp_path, {"00-plans.yaml": PLANS, "90-allow.yaml": ALLOW}) as pipeline:
        gateway = pipeline.gateway
        gateway.api = CryptoAPI(pipeline.kms, policy_revision=lambda: gateway.policy.revision)  # type: ignore[arg-type]
        policies = tmp_path / "policies"

        async def revisions() -> tuple[str, str]:
            ready = await gateway.handle(pipeline.request("GET", "/readyz"))
            info = await gateway.handle(pipeline.request("GET", "/v1/info"))
            assert ready.status == info.status == 200
            return (json.loads(ready.body)["policy"]["revision"],  # type: ignore[arg-type]
                    json.loads(info.body)["policy"]["revision"])  # type: ignore[arg-type]

        first = load_policy_dir(policies).revision
        assert await revisions() == (first, first)
        (policies / "50-broken.yaml").write_text("version: 2\n")
        assert not gateway.policy.reload().ok
        assert await revisions() == (first, first)  # the last good policy stays in force, and says so
        (policies / "50-broken.yaml").write_text("version: 1\n")
        assert gateway.policy.reload().changed
        second = load_policy_dir(policies).revision
        assert second != first and await revisions() == (second, second)


async def test_readiness_without_a_policy_has_no_revision(tmp_path: Path) -> None:
    with open_pipeline(tmp_path, {"00-plans.yaml": PLANS, "90-allow.yaml": ALLOW}) as pipeline:
        empty = tmp_path / "empty"
        empty.mkdir()
        pipeline.gateway.policy = PolicyEngine(empty, lambda *a, **k: None)
        assert not pipeline.gateway.policy.reload().ok
        resp = await pipeline.gateway.handle(pipeline.request("GET", "/readyz"))
        body = json.loads(resp.body)  # type: ignore[arg-type]
        assert (
            resp.status == 503 and body["checks"]["policy"] is False and body["policy"] == {"revision": None}
        )
