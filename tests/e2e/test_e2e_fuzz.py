"""Property-based fuzzing of the live gateway: random requests to every route over real TLS.

Bodies are field-aware near-valid objects (the right field names with values that are often
right: real key ids of every algorithm and state, base64 of the exact sizes of ciphertexts and
signatures), random JSON or random bytes; path key ids are real, another tenant's, random or
garbage; GETs get random query strings; now and then the method is wrong. Whatever comes in,
the answer must keep the contract (``_openapi_check.check_answer``): never a 5xx, a status
documented for the route, a body matching the openapi.yaml schema for that route and status,
an error code documented for it, ``X-Request-Id`` equal to ``error.request_id``.

Bounded for CI: 150 examples in all, derandomized (the same examples every run), no example
database, and a 20 s wall-clock budget. The admin routes are left out: a valid
``POST /admin/fail-open`` would open the emergency switch for the other tests of the session.
"""

from __future__ import annotations

import os
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qpher_proxy.api import ROUTES, Route
from qpher_proxy.crypto.algorithms import ALGORITHMS

from ._gateway import Gateway, cli
from ._openapi_check import CheckedClient, load_api_helper, route_of

strategies = load_api_helper("_api_strategies")

# QPHER_E2E_FUZZ_EXAMPLES=5000 runs a longer, randomized hunt locally (with its budget scaled).
_LONG_RUN = int(os.environ.get("QPHER_E2E_FUZZ_EXAMPLES", "0"))
MAX_EXAMPLES = _LONG_RUN or 150
TIME_BUDGET_S = 20.0 * max(1, MAX_EXAMPLES // 150)
MAX_BATCH = 4  # items per fuzzed batch (the server allows 100; small keeps the run fast)

FUZZED = [r for r in ROUTES if not r.admin or r.operation == "metrics"]


class Env:
    """Keys the fuzzer aims at: one of every algorithm, a disabled one, one pending
    destruction, another tenant's, and ids nobody has. States may change as the fuzzer goes
    (it may disable, rotate or schedule destruction of any of them): that is fine."""

    def __init__(self, gateway: Gateway) -> None:
        self.api = CheckedClient(gateway.client())
        self.key_ids = [
            self.api.ok("POST", "/v1/keys", {"algorithm": a, "label": "fuzz"})["key_id"] for a in ALGORITHMS
        ]
        off = self.api.ok("POST", "/v1/keys", {"algorithm": "ml-dsa-65"})["key_id"]
        self.api.ok("POST", f"/v1/keys/{off}/disable")
        pending = self.api.ok("POST", "/v1/keys", {"algorithm": "ml-kem-768"})["key_id"]
        self.api.ok("DELETE", f"/v1/keys/{pending}")
        other_key = cli("apikey", "create", "--config", str(gateway.directory / "config.yaml"),
                        "--tenant", "e2e-fuzz-other", "--plan", "pro").stdout.strip().splitlines()[-1]
        other = CheckedClient(gateway.client(other_key))
        theirs = other.ok("POST", "/v1/keys", {"algorithm": "ml-kem-768"})["key_id"]
        other.close()
        self.key_ids += [off, pending, theirs, "k_" + "a" * 26, "k_" + "z" * 26]
        self.routes_hit: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()
        self.deadline = 0.0


@pytest.fixture(scope="module")
def env(gateway: Gateway) -> Iterator[Env]:
    e = Env(gateway)
    yield e
    e.api.close()


# ---- strategies -----------------------------------------------------------------------------------

def _path(route: Route, key_ids: list[str]) -> st.SearchStrategy[str]:
    if "{key_id}" not in route.template:
        return st.just(route.template)
    ids = st.sampled_from(key_ids) | st.text(min_size=1, max_size=30).map(
        lambda s: urllib.parse.quote(s, safe="")
    )
    return ids.map(lambda kid: route.template.replace("{key_id}", kid))


_QUERY_VALUES = ["1", "2", "50", "100", "101", "0", "-1", "", "x", "k_" + "a" * 26, "k_" + "z" * 26]


def _query(route: Route) -> st.SearchStrategy[str]:
    pairs = st.lists(st.tuples(st.sampled_from(["limit", "cursor", "version", "x", ""]),
                               st.sampled_from(_QUERY_VALUES)), max_size=3)
    queries = pairs.map(lambda ps: "&".join(f"{k}={v}" for k, v in ps))
    if route.method == "GET":
        return st.just("") | queries
    return st.sampled_from(["", "", "", "", "x=1"])


@st.composite
def requests(draw: st.DrawFn, key_ids: list[str]) -> tuple[str, str, bytes, dict[str, str]]:
    route = draw(st.sampled_from(FUZZED))
    path = draw(_path(route, key_ids))
    query = draw(_query(route))
    wrong_method = draw(st.integers(0, 11)) == 11  # not 0: hypothesis favours small integers
    method = (
        draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"])) if wrong_method else route.method
    )
    body = draw(strategies.body(route, key_ids, max_batch=MAX_BATCH))
    headers = draw(
        st.sampled_from([{"Content-Type": "application/json"}, {}, {"Content-Type": "text/plain"}])
    )
    return method, path + (f"?{query}" if query else ""), body, headers


# ---- the property -------------------------------------------------------------------------------

def test_fuzz_every_route_keeps_the_contract(env: Env) -> None:
    env.deadline = time.monotonic() + TIME_BUDGET_S

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=not _LONG_RUN,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(req=requests(env.key_ids))
    def run(req: tuple[str, str, bytes, dict[str, str]]) -> None:
        if time.monotonic() > env.deadline:
            return  # the wall-clock budget is spent: the remaining examples are not sent
        method, path, body, headers = req
        # check_answer (inside call) raises ContractViolation on a 5xx, an undocumented status
        # or code, a schema violation, or a request id mismatch
        status, _, _ = env.api.call(method, path, raw=body, headers=headers)
        route = route_of(method, path)
        env.routes_hit[route.name if route is not None else "other"] += 1
        env.statuses[status] += 1

    run()
    sent = sum(env.statuses.values())
    assert sent >= MAX_EXAMPLES // 2, f"only {sent} requests within the {TIME_BUDGET_S} s budget"
    assert all(s < 500 for s in env.statuses)
    # the fuzzer reached most routes, and both successes and refusals
    assert len(env.routes_hit) >= len(FUZZED) * 2 // 3, sorted(env.routes_hit)
    assert any(200 <= s < 300 for s in env.statuses) and any(400 <= s < 500 for s in env.statuses), (
        env.statuses
    )
    if _LONG_RUN:
        print(f"\nfuzz: {sent} requests; statuses {dict(env.statuses)}; routes {dict(env.routes_hit)}")
