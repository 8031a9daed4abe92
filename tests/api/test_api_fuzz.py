"""Property-based fuzzing of every route: random JSON, field-aware near-valid bodies, random bytes,
random path key ids and query strings. Whatever comes in, the answer is a success that matches
openapi.yaml or a documented 4xx ``QpherError``: never a 5xx, never another exception."""

from __future__ import annotations

import base64
import json

import _api_strategies as strategies
import pytest
import trio
from _api_fake_kms import FakeKMS
from _api_openapi import documented_codes, validate_response
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qpher_proxy.api import ROUTES, CryptoAPI, Route
from qpher_proxy.api.validation import IMPORT_METHODS
from qpher_proxy.context import TenantContext
from qpher_proxy.crypto.algorithms import ALGORITHMS
from qpher_proxy.errors import QpherError

CTX = TenantContext("t-fuzz", "req-fuzz", "ak_fuzz")
OTHER = TenantContext("t-other", "req-other", "ak_other")
MAX_BATCH = 6


class Env:
    """A FakeKMS holding one key of every algorithm for CTX, a disabled and a pending one, and
    another tenant's key; built once per test (keys may change state as the fuzzer goes)."""

    def __init__(self) -> None:
        self.kms = FakeKMS()
        self.api = CryptoAPI(
            self.kms, max_batch_items=MAX_BATCH, backend_info={"name": "fake", "versions": {}}
        )

        async def setup() -> list[str]:
            ids = [(await self.kms.create_key(CTX, algorithm=a)).key_id for a in ALGORITHMS]
            off = (await self.kms.create_key(CTX, algorithm="ml-dsa-65")).key_id
            await self.kms.disable_key(CTX, off)
            pending = (await self.kms.create_key(CTX, algorithm="ml-kem-768")).key_id
            await self.kms.schedule_destroy(CTX, pending)
            theirs = (await self.kms.create_key(OTHER, algorithm="ml-kem-768")).key_id
            return [*ids, off, pending, theirs, "k_" + "a" * 26]

        async def jobs() -> tuple[list[str], list[str]]:
            mine = [(await self.kms.create_import_job(CTX, m))["import_job_id"] for m in IMPORT_METHODS]
            old = (await self.kms.create_import_job(CTX, "hpke-x-wing", ttl_seconds=60))["import_job_id"]
            theirs = (await self.kms.create_import_job(OTHER, "hpke-ml-kem-768"))["import_job_id"]
            self.kms.advance(3600)  # `old` has expired
            materials = [("ml-dsa-65", 32), ("ml-kem-768", 64), ("x-wing", 8)]
            wrapped = [base64.b64encode(self.kms.wrap(j, alg, bytes(n))).decode()
                       for j in [*mine, old] for alg, n in materials]
            return [*mine, old, theirs, "ij_" + "a" * 26], wrapped

        self.key_ids = trio.run(setup)
        self.job_ids, self.wrapped = trio.run(jobs)


@pytest.fixture(scope="module")
def env() -> Env:
    return Env()


def _params(route: Route, key_ids: list[str], job_ids: list[str]) -> st.SearchStrategy[dict[str, str]]:
    if "{import_job_id}" in route.template:
        return st.fixed_dictionaries(
            {"import_job_id": st.sampled_from(job_ids) | st.text(min_size=1, max_size=40)})
    if "{key_id}" not in route.template:
        return st.just({})
    return st.fixed_dictionaries({"key_id": st.sampled_from(key_ids) | st.text(min_size=1, max_size=40)})


def _query(route: Route, key_ids: list[str]) -> st.SearchStrategy[str | None]:
    pairs = st.lists(st.tuples(st.sampled_from(["limit", "cursor", "version", "x", ""]),
                               st.sampled_from(["1", "2", "50", "100", "101", "0", "-1", "", *key_ids[:3],
                                                "ij_" + "a" * 26])),
                     max_size=3)
    return st.none() | pairs.map(lambda ps: "&".join(f"{k}={v}" for k, v in ps))


async def _check(env: Env, route: Route, body: bytes, params: dict[str, str], query: str | None) -> None:
    try:
        parsed = env.api.parse(route, body, params, query)
        if route.owner != "api":
            return  # answered by the server, not by CryptoAPI: parsing is all we own
        status, obj = await env.api.handle(parsed, CTX)
    except QpherError as exc:
        assert 400 <= exc.status < 500, (exc.status, exc.code, exc.message)
        assert exc.code in documented_codes(route, exc.status), (route.name, exc.status, exc.code)
        return
    assert status == route.status
    validate_response(route, status, json.loads(json.dumps(obj)))


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: r.name)
def test_fuzz_route_answers_only_documented_outcomes(env: Env, route: Route) -> None:
    @settings(max_examples=60, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        body = data.draw(strategies.body(route, env.key_ids, max_batch=MAX_BATCH + 1, job_ids=env.job_ids,
                                         wrapped=env.wrapped), label="body")
        params = data.draw(_params(route, env.key_ids, env.job_ids), label="params")
        query = data.draw(_query(route, env.key_ids), label="query") if route.method == "GET" else None
        trio.run(_check, env, route, body, params, query)

    run()
