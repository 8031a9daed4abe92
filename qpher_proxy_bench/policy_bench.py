"""Micro-benchmark of the policy engine: µs per decision for chains of 10, 100 and 1,000 rules.

    python -m qpher_proxy_bench.policy_bench --quick
    python -m qpher_proxy_bench.policy_bench --iterations 50000 --json

The chains are synthetic but shaped like real ones: a few guards (admin scope, admin networks,
metrics), the plan restrictions, then per-tenant rules (4 per tenant: a deny by operation, an
allow by operation and algorithm, a deny by network and path glob, an allow by path and time
window), and a final allow-within-plan. Requests:

* ``allow``         a tenant in the middle of the chain, signing within its plan (allowed by the
                    last rule: every candidate deny had to be looked at first);
* ``guard_deny``    an admin path without the admin scope (denied by the first rule);
* ``default_deny``  a tenant outside the plan lists: nothing allows it;
* ``unindexed``     a chain of N rules none of which constrains tenant, plan, scope, operation,
                    method, algorithm or mode (path + source CIDR rules): the index cannot help,
                    every rule is visited. This is the honest worst case.

Figures: ``evaluate`` (the pure function), ``decide`` (the engine: CPU-clock budget check and a
no-op audit sink per decision), ``facts`` (building one RequestFacts), ``compile`` (ms to load
the chain, reachability analysis included). Each is the best of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from qpher_proxy.policy import PolicySet, RequestFacts, compile_policy, evaluate
from qpher_proxy.policy.engine import PolicyEngine

_PLANS = """\
version: 1
plans:
  free:
    rate_limit: {requests_per_second: 5, burst: 10}
    quotas: {sign: 10000}
    algorithms: [ml-kem-768, ml-dsa-65]
    operations: ["keys.*", kem.encapsulate, kem.decapsulate, encrypt, decrypt, sign, verify, info, forward]
  pro:
    rate_limit: {requests_per_second: 100, burst: 200}
    algorithms: ["*"]
    operations: ["*"]
rules:
  - id: admin-scope
    effect: deny
    match: {path: /admin/**}
    unless: {scope: admin}
    reason: admin scope needed
  - id: admin-networks
    effect: deny
    match: {path: /admin/**}
    unless: {source_cidr: [127.0.0.0/8, 10.0.0.0/8]}
    reason: management networks only
  - id: metrics-scope
    effect: deny
    match: {operation: metrics}
    unless: {scope: [admin, metrics]}
    reason: metrics scope needed
  - id: hybrid-paid
    effect: deny
    match: {plan: free, mode: hybrid}
    reason: hybrids need a paid plan
  - id: outside-plan
    effect: deny
    match: {plan_allows: false}
    unless: {operation: [metrics, admin.fail_open.set, admin.fail_open.clear]}
    reason: not in your plan
"""

_TENANT_RULES = """\
  - id: t{t}-no-destroy
    effect: deny
    match: {{tenant: t{t}, operation: keys.destroy}}
    reason: t{t} never destroys keys
  - id: t{t}-sign
    effect: allow
    match: {{tenant: t{t}, operation: [sign, verify], algorithm: [ml-dsa-65, ml-dsa-87]}}
    reason: t{t} signs
  - id: t{t}-no-keys-from-docs-net
    effect: deny
    match: {{tenant: t{t}, source_cidr: 198.51.100.0/24, path: /v1/keys/**}}
    reason: not from that network
  - id: t{t}-kem-office-hours
    effect: allow
    match: {{tenant: t{t}, path: /v1/kem/*,
             time: {{days: [mon, tue, wed, thu, fri], from: "07:00", to: "19:00"}}}}
    reason: KEM in office hours
"""

_FINAL = """\
  - id: allow-within-plan
    effect: allow
    match: {plan_allows: true}
    reason: within plan
"""


def chain(n_rules: int) -> str:
    tenants = max(0, (n_rules - 6) // 4)
    body = "".join(_TENANT_RULES.format(t=t) for t in range(tenants))
    return _PLANS + body + _FINAL


def unindexed_chain(n_rules: int) -> str:
    rules = "".join(
        f"  - id: u{i}\n    effect: deny\n"
        f"    match: {{path: /p{i}/**, source_cidr: 198.51.100.0/24}}\n    reason: r\n"
        for i in range(n_rules - 1)
    )
    return "version: 1\nrules:\n" + rules + "  - id: allow\n    effect: allow\n    match: {}\n    reason: r\n"


def _facts(**kw: Any) -> RequestFacts:
    base: dict[str, Any] = dict(
        tenant="t0", plan="pro", scopes=frozenset({"sign"}), api_key_id="k1", method="POST",
        path="/v1/sign", operation="sign", algorithm="ml-dsa-65", source_ip="192.0.2.7",
        tls_group="X25519MLKEM768", tls_pq=True, now=datetime(2025, 1, 6, 10, tzinfo=UTC),
        usage={"sign": 10})
    base.update(kw)
    return RequestFacts(**base)


def _time(fn: Callable[[], object], iterations: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter_ns()
        for _ in range(iterations):
            fn()
        best = min(best, (time.perf_counter_ns() - start) / iterations / 1000)
    return best


def _noop_audit(event: str, severity: str, **fields: Any) -> None:
    return None


def _evaluate_us(ps: PolicySet, facts: RequestFacts, iterations: int, repeat: int) -> float:
    return round(_time(lambda: evaluate(ps, facts), iterations, repeat), 2)


def _chain_row(n: int, iterations: int, repeat: int) -> dict[str, Any]:
    text = chain(n).encode()
    t0 = time.perf_counter()
    ps = compile_policy([("bench.yaml", text)])
    compile_ms = (time.perf_counter() - t0) * 1e3
    middle = f"t{max(0, (n - 6) // 8)}"
    requests = {
        "allow": _facts(tenant=middle),
        "guard_deny": _facts(tenant=middle, path="/admin/fail-open", operation="admin.fail_open.set",
                             algorithm=None),
        "default_deny": _facts(tenant=middle, plan="gold"),
    }
    assert evaluate(ps, requests["allow"]).allowed
    assert evaluate(ps, requests["guard_deny"]).rule_id == "admin-scope"
    assert evaluate(ps, requests["default_deny"]).rule_id == "outside-plan"
    uni = compile_policy([("u.yaml", unindexed_chain(n).encode())])
    uni_facts = _facts(path="/v1/sign/x")
    assert evaluate(uni, uni_facts).rule_id == "allow"
    engine = PolicyEngine(".", _noop_audit, clock=time.monotonic)
    engine._policy = ps  # noqa: SLF001 - benchmark a compiled set without a directory
    row: dict[str, Any] = {"rules": len(ps.rules), "compile_ms": round(compile_ms, 2)}
    for name, f in requests.items():
        row[f"evaluate_{name}_us"] = _evaluate_us(ps, f, iterations, repeat)
    row["evaluate_unindexed_us"] = _evaluate_us(uni, uni_facts, iterations, repeat)
    allow = requests["allow"]
    row["decide_allow_us"] = round(_time(lambda: engine.decide(allow), iterations, repeat), 2)
    return row


def run(sizes: list[int], iterations: int, repeat: int) -> dict[str, Any]:
    out: dict[str, Any] = {"iterations": iterations, "repeat": repeat, "chains": {}}
    for n in sizes:
        out["chains"][str(n)] = _chain_row(n, iterations, repeat)
    out["facts_us"] = round(_time(lambda: _facts(), iterations, repeat), 2)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="qpher-proxy bench policy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few seconds: fewer iterations")
    p.add_argument("--iterations", type=int, default=20000)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--sizes", default="10,100,1000", help="chain lengths, comma-separated")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    iterations, repeat = (2000, 3) if args.quick else (args.iterations, args.repeat)
    sizes = [int(s) for s in args.sizes.split(",")]
    result = run(sizes, iterations, repeat)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    cols = ["rules", "compile_ms", "evaluate_allow_us", "evaluate_guard_deny_us", "evaluate_default_deny_us",
            "evaluate_unindexed_us", "decide_allow_us"]
    heads = [
        "rules",
        "compile ms",
        "allow µs",
        "guard deny µs",
        "default deny µs",
        "unindexed µs",
        "decide µs",
    ]
    print("  ".join(f"{h:>15}" for h in heads))
    for row in result["chains"].values():
        print("  ".join(f"{row[c]:>15}" for c in cols))
    print(f"RequestFacts construction: {result['facts_us']} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
