"""Sidecar forwarding in process (real auth store, policy engine and audit log; a recording
stand-in for the upstream client): the policy matches, and the upstream receives, one
normalised target -- whatever spelling, form or parameters the client used."""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from qpher_proxy.api import CryptoAPI
from qpher_proxy.audit import AuditLog, parse_record
from qpher_proxy.auth.apikeys import APIKeyStore, Authenticator
from qpher_proxy.http import Request, Response
from qpher_proxy.metrics import Metrics
from qpher_proxy.policy import PolicyEngine
from qpher_proxy.ratelimit import QuotaCounter, TokenBucketLimiter
from qpher_proxy.server.gateway import Gateway

POLICY = """\
version: 1
plans:
  pro:
    rate_limit: {requests_per_second: 1000, burst: 1000}
    algorithms: ["*"]
    operations: ["*"]
rules:
  - id: internal-is-private
    effect: deny
    match: {path: /internal/**}
    reason: internal endpoints are not exposed
  - id: allow-pro
    effect: allow
    match: {plan: pro}
    reason: pro plan
"""


@dataclass
class _UpstreamResponse:
    status: int = 200
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)

    async def body_chunks(self) -> AsyncIterator[bytes]:
        yield b"ok"


class RecordingUpstream:
    """Stands in for ``UpstreamClient``: records each (method, target) it is asked to send."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    async def send(self, method: str, target: str, headers: Any, body: Any = None,
                   content_length: int | None = None) -> _UpstreamResponse:
        self.sent.append((method, target))
        return _UpstreamResponse()


class _NoBody:
    async def _read_body(self, generation: int, max_bytes: int | None) -> bytes:
        return b""


@dataclass
class Sidecar:
    gateway: Gateway
    upstream: RecordingUpstream
    audit_path: Path
    api_key: str

    def request(self, method: str, target: str, *, path: str | None = None, query: str = "") -> Request:
        """A request as the HTTP layer builds it (``path`` and ``query`` cut from ``target``)."""
        if path is None:
            path, _, query = target.partition("?")
        headers = [(b"host", b"localhost"), (b"authorization", b"Bearer " + self.api_key.encode())]
        return Request(method, target, path, query, headers, "1.1", secrets.token_hex(8), "192.0.2.7", {},
                       _NoBody(), 0)  # type: ignore[arg-type]

    def decided_path(self, req: Request) -> str | None:
        """The path the policy decided on for ``req``, from its audited decision."""
        for line in self.audit_path.read_bytes().split(b"\n")[:-1]:
            rec = parse_record(line)
            if (
                rec is not None
                and rec.event == "policy.decision"
                and rec.fields["request_id"] == req.request_id
            ):
                return str(rec.fields["path"])
        return None


def _sidecar(tmp_path: Path, *, allow_path_params: bool) -> Iterator[Sidecar]:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "00-policy.yaml").write_text(POLICY)
    audit_path = tmp_path / "audit.log"
    with AuditLog(audit_path) as audit, APIKeyStore(tmp_path / "g.db", secrets.token_bytes(32)) as store, \
            QuotaCounter(tmp_path / "g.db") as quotas:
        _, key = store.create("acme", "pro")
        policy = PolicyEngine(policies, audit)
        assert policy.reload().ok
        upstream = RecordingUpstream()
        gateway = Gateway(kms=None, api=CryptoAPI(None), authenticator=Authenticator(store),  # type: ignore[arg-type]
                          limiter=TokenBucketLimiter(), quotas=quotas, policy=policy, audit=audit,
                          metrics=Metrics(), upstream=upstream,  # type: ignore[arg-type]
                          allow_path_params=allow_path_params)
        yield Sidecar(gateway, upstream, audit_path, key)


@pytest.fixture
def sidecar(tmp_path: Path) -> Iterator[Sidecar]:
    yield from _sidecar(tmp_path, allow_path_params=False)


@pytest.fixture
def with_params(tmp_path: Path) -> Iterator[Sidecar]:
    yield from _sidecar(tmp_path, allow_path_params=True)


def _error(resp: Response) -> tuple[int, str]:
    return resp.status, json.loads(bytes(resp.body))["error"]["code"]  # type: ignore[arg-type]


@pytest.mark.parametrize(("target", "sent", "decided"), [
    ("/app/x?y=1", "/app/x?y=1", "/app/x"),
    ("/pub/%7Euser/a%2dfile", "/pub/~user/a-file", "/pub/~user/a-file"),
    ("/pub/caf%c3%a9?q=%c3", "/pub/caf%C3%A9?q=%c3", "/pub/caf\u00e9"),
    ("/pub/a%21b", "/pub/a%21b", "/pub/a!b"),
])
async def test_the_upstream_gets_the_normalised_target_and_the_policy_its_decoded_path(
    sidecar: Sidecar, target: str, sent: str, decided: str,
) -> None:
    req = sidecar.request("GET", target)
    resp = await sidecar.gateway.handle(req)
    assert resp.status == 200
    assert sidecar.upstream.sent == [("GET", sent)]
    assert sidecar.decided_path(req) == decided


@pytest.mark.parametrize(("target", "want"), [
    ("/internal/secret", (403, "policy_denied")),
    ("/%69nternal/secret", (403, "policy_denied")),
    ("/inter%6Eal/secret?x=1", (403, "policy_denied")),
    ("/internal;x/secret", (400, "ambiguous_path")),
    ("/internal%00/secret", (400, "ambiguous_path")),
    ("/internal%20/secret", (400, "ambiguous_path")),
    ("/internal%2fsecret", (400, "ambiguous_path")),
])
async def test_no_spelling_of_a_denied_path_reaches_the_upstream(
    sidecar: Sidecar, target: str, want: tuple[int, str],
) -> None:
    resp = await sidecar.gateway.handle(sidecar.request("GET", target))
    assert _error(resp) == want
    assert sidecar.upstream.sent == []


async def test_an_absolute_form_target_is_normalised_and_forwarded_in_origin_form(sidecar: Sidecar) -> None:
    denied = sidecar.request("GET", "http://app.example/%69nternal/x?y=1", path="/%69nternal/x", query="y=1")
    assert _error(await sidecar.gateway.handle(denied)) == (403, "policy_denied")
    allowed = sidecar.request("GET", "http://app.example/p%61ge?y=1", path="/p%61ge", query="y=1")
    assert (await sidecar.gateway.handle(allowed)).status == 200
    assert sidecar.upstream.sent == [("GET", "/page?y=1")]


async def test_an_asterisk_target_is_not_forwarded(sidecar: Sidecar) -> None:
    resp = await sidecar.gateway.handle(sidecar.request("OPTIONS", "*"))
    assert _error(resp) == (400, "ambiguous_path")
    assert sidecar.upstream.sent == []


@pytest.mark.parametrize(("method", "target"), [
    ("GET", "/v1/%69nfo"),
    ("POST", "/v1/%73ign"),
    ("DELETE", "/v1/%73ign"),  # a path the proxy serves, with another method
    ("GET", "/%68ealthz"),
])
async def test_an_encoded_spelling_of_the_proxys_own_path_is_not_forwarded(
    sidecar: Sidecar, method: str, target: str,
) -> None:
    resp = await sidecar.gateway.handle(sidecar.request(method, target))
    assert _error(resp) == (400, "ambiguous_path")
    assert sidecar.upstream.sent == []


async def test_allowed_path_parameters_are_forwarded_and_dropped_for_the_policy(with_params: Sidecar) -> None:
    denied = with_params.request("GET", "/internal;x/secret")
    assert _error(await with_params.gateway.handle(denied)) == (403, "policy_denied")
    assert with_params.decided_path(denied) == "/internal/secret"
    allowed = with_params.request("GET", "/pub;v=1/%66ile;jsessionid=1?q")
    assert (await with_params.gateway.handle(allowed)).status == 200
    assert with_params.decided_path(allowed) == "/pub/file"
    assert with_params.upstream.sent == [("GET", "/pub;v=1/file;jsessionid=1?q")]
    dotted = with_params.request("GET", "/pub/..;x/internal/secret")
    assert _error(await with_params.gateway.handle(dotted)) == (400, "ambiguous_path")
    own = with_params.request("GET", "/v1/info;x")
    assert _error(await with_params.gateway.handle(own)) == (400, "ambiguous_path")
    assert len(with_params.upstream.sent) == 1


async def test_an_unauthenticated_request_is_refused_before_its_path_is_judged(sidecar: Sidecar) -> None:
    req = sidecar.request("GET", "/internal%00/secret")
    req.headers[1] = (b"authorization", b"Bearer qph_nope_nope")
    assert _error(await sidecar.gateway.handle(req)) == (401, "unauthenticated")
