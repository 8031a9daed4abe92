"""Property-based fuzzing of every route: random JSON, field-aware near-valid bodies, random bytes,
random path key ids and query strings. Whatever comes in, the answer is a success that matches
openapi.yaml or a documented 4xx ``QpherError``: never a 5xx, never another exception."""

from __future__ import annotations

import json

import _api_strategies as strategies
import pytest
import trio
from _api_fake_kms import FakeKMS
from _api_openapi import documented_codes, validate_response
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qpher_proxy.api import ROUTES, CryptoAPI, Route
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

        self.key_ids = trio.run(setup)


@pytest.fixture(scope="module")
def env() -> Env:
    return Env()


def _params(route: Route, key_ids: list[str]) -> st.SearchStrategy[dict[str, str]]:
    if "{key_id}" not in route.template:
        return st.just({})
    return st.fixed_dictionaries({"key_id": st.sampled_from(key_ids) | st.text(min_size=1, max_size=40)})


def _query(route: Route, key_ids: list[str]) -> st.SearchStrategy[str | None]:
    pairs = st.lists(st.tuples(st.sampled_from(["limit", "cursor", "version", "x", ""]),
                               st.sampled_from(["1", "2", "50", "100", "101", "0", "-1", "", *key_ids[:3]])),
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
        body = data.draw(strategies.body(route, env.key_ids, max_batch=MAX_BATCH + 1), label="body")
        params = data.draw(_params(route, env.key_ids), label="params")
        query = data.draw(_query(route, env.key_ids), label="query") if route.method == "GET" else None
        trio.run(_check, env, route, body, params, query)

    run()
