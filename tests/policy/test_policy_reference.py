"""Property tests: for random rule chains and random requests, ``evaluate`` (indexed fast path)
and ``explain`` agree with a plain reference evaluator written here from the semantics that
``policy/evaluate.py`` states, sharing no code with the engine (its own glob matcher, its own
plan and mode logic)."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from qpher_proxy.policy import RequestFacts, compile_policy, evaluate, explain, find_unreachable

TENANTS = ["t1", "t2", "t3"]
PLANS = {
    "free": {"rate_limit": {"requests_per_second": 1, "burst": 1}, "quotas": {"sign": 100, "kem": 10},
             "algorithms": ["ml-dsa-65", "ml-kem-768"], "operations": ["sign", "verify", "keys.*"]},
    "pro": {"rate_limit": {"requests_per_second": 1, "burst": 1}, "quotas": {"sign": 1000},
            "algorithms": ["ml-dsa-65", "ml-kem-768", "x-wing", "ml-dsa-65-ecdsa-p256"], "operations": ["*"]},
}
SCOPES = ["admin", "a", "b"]
METHODS = ["GET", "POST", "DELETE"]
OPERATIONS = [
    "sign",
    "verify",
    "sign.batch",
    "keys.create",
    "keys.read",
    "info",
    "forward",
    "kem.encapsulate",
]
OPERATION_PATTERNS = OPERATIONS + ["keys.*", "*.batch", "sign*"]
ALGORITHMS = ["ml-dsa-65", "x-wing", "ml-kem-768", "ml-dsa-65-ecdsa-p256"]
HYBRID = {"x-wing", "ml-dsa-65-ecdsa-p256"}
SEGMENTS = ["v1", "keys", "k1", "sign", "admin", "ab"]
LABELS = ["prod-a", "dev-b", "prod-hybrid", "x"]
LABEL_PATTERNS = ["prod-*", "*-b", "*", "dev-?", "prod-hybrid", "*hy*"]
CIDRS = ["10.0.0.0/8", "10.1.0.0/16", "192.0.2.0/24", "::1/128", "fd00::/8"]
IPS = ["10.1.2.3", "10.2.0.1", "192.0.2.5", "::1", "fd00::5", "203.0.113.1", "::ffff:10.1.2.3", ""]
GROUPS = ["X25519MLKEM768", "x25519", "secp256r1"]
WINDOWS = [
    {"days": ["mon", "tue"]},
    {"from": "08:00", "to": "18:00"},
    {"from": "22:00", "to": "06:00", "tz": "Europe/Paris"},
    {"days": ["sat", "sun"], "from": "00:00", "to": "12:00"},
    {"days": ["wed"], "from": "09:30", "to": "24:00", "tz": "America/New_York"},
]
USAGE = [
    {"operation": "sign", "percent_of_quota": 100},
    {"operation": ["sign", "kem"], "percent_of_quota": 50},
    {"operation": "verify", "at_least": 10},
]
DAY = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


# ---- the reference evaluator -------------------------------------------------------------------

def wild(pat: str, s: str) -> bool:
    """``*`` any run, ``?`` one character, else literal: a textbook recursive matcher."""
    if not pat:
        return not s
    if pat[0] == "*":
        return any(wild(pat[1:], s[k:]) for k in range(len(s) + 1))
    return bool(s) and (pat[0] == "?" or pat[0] == s[0]) and wild(pat[1:], s[1:])


def path_match(pattern: str, path: str) -> bool:
    p, s = pattern.split("/")[1:], path.split("/")[1:]

    def rec(i: int, j: int) -> bool:
        if i == len(p):
            return j == len(s)
        if p[i] == "**":
            return any(rec(i + 1, k) for k in range(j, len(s) + 1))
        return j < len(s) and wild(p[i], s[j]) and rec(i + 1, j + 1)

    return path.startswith("/") and rec(0, 0)


def as_list(v: Any) -> list[Any]:
    return v if isinstance(v, list) else [v]


def ref_one(name: str, value: Any, r: dict[str, Any]) -> bool:
    if name in ("tenant", "plan", "method"):
        return r[name] in as_list(value)
    if name == "operation":
        return any(wild(p, r["operation"]) for p in as_list(value))
    if name == "algorithm":
        return r.get("algorithm") in as_list(value)
    if name == "mode":
        mode = r.get("mode") or (None if r.get("algorithm") is None
                                 else "hybrid" if r["algorithm"] in HYBRID else "pqc")
        return mode in as_list(value)
    if name == "scope":
        return any(s in r["scopes"] for s in as_list(value))
    if name == "path":
        return any(path_match(p, r["path"]) for p in as_list(value))
    if name == "key_label":
        return r.get("key_label") is not None and any(wild(p, r["key_label"]) for p in as_list(value))
    if name == "source_cidr":
        if not r["source_ip"]:
            return False
        ip = ipaddress.ip_address(r["source_ip"])
        if ip.version == 6 and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return any(ip.version == n.version and ip in n for n in map(ipaddress.ip_network, as_list(value)))
    if name == "tls_group":
        return r.get("tls_group") is not None and r["tls_group"].lower() in [
            g.lower() for g in as_list(value)
        ]
    if name == "tls_pq":
        return r["tls_pq"] == value
    if name == "time":
        local = r["now"].astimezone(ZoneInfo(value.get("tz", "UTC")))
        if "days" in value and DAY[local.weekday()] not in value["days"]:
            return False
        if "from" in value:
            t = local.hour * 60 + local.minute
            a = int(value["from"][:2]) * 60 + int(value["from"][3:])
            b = int(value["to"][:2]) * 60 + int(value["to"][3:])
            return (a <= t < b) if a < b else (t >= a or t < b)
        return True
    if name == "usage_over":
        for c in as_list(value["operation"]):
            used = r["usage"].get(c, 0)
            if "at_least" in value:
                if used >= value["at_least"]:
                    return True
                continue
            limit = PLANS.get(r["plan"], {}).get("quotas", {}).get(c)  # absent: unlimited
            if limit is not None and used * 100 >= value["percent_of_quota"] * limit:
                return True
        return False
    if name == "plan_allows":
        plan = PLANS.get(r["plan"])
        inside = (plan is not None and any(wild(p, r["operation"]) for p in plan["operations"])
                  and (r.get("algorithm") is None or r["algorithm"] in plan["algorithms"]))
        return inside == value
    raise AssertionError(name)


def ref_matches(cond: dict[str, Any], r: dict[str, Any]) -> bool:
    return all(ref_one(n, v, r) for n, v in cond.items())


def ref_decide(rules: list[dict[str, Any]], r: dict[str, Any]) -> tuple[str, str | None]:
    matched = [rule for rule in rules
               if ref_matches(rule["match"], r) and not ("unless" in rule and ref_matches(rule["unless"], r))]
    for rule in matched:  # the first matching deny decides, whatever matched before it
        if rule["effect"] == "deny":
            return "deny", rule["id"]
    for rule in matched:  # else the first matching allow
        return "allow", rule["id"]
    return "deny", None  # else the default


# ---- strategies ------------------------------------------------------------------------------

def one_or_more(options: list[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.sampled_from(options),
                     st.lists(st.sampled_from(options), min_size=1, max_size=3, unique=True))


def path_patterns() -> st.SearchStrategy[str]:
    seg = st.one_of(st.sampled_from(SEGMENTS), st.just("*"), st.just("?b"), st.just("k*"))

    @st.composite
    def build(draw: Any) -> str:
        segs = draw(st.lists(seg, min_size=1, max_size=3))
        if draw(st.booleans()):
            segs.insert(draw(st.integers(0, len(segs))), "**")
        return "/" + "/".join(segs)

    return build()


MATCHER_STRATEGIES: dict[str, st.SearchStrategy[Any]] = {
    "tenant": one_or_more(TENANTS),
    "plan": one_or_more(list(PLANS)),
    "scope": one_or_more(SCOPES),
    "method": one_or_more(METHODS),
    "path": st.one_of(path_patterns(), st.lists(path_patterns(), min_size=1, max_size=2, unique=True)),
    "operation": one_or_more(OPERATION_PATTERNS),
    "algorithm": one_or_more(ALGORITHMS),
    "key_label": one_or_more(LABEL_PATTERNS),
    "mode": one_or_more(["pqc", "hybrid"]),
    "source_cidr": one_or_more(CIDRS),
    "tls_group": one_or_more(GROUPS),
    "tls_pq": st.booleans(),
    "time": st.sampled_from(WINDOWS),
    "usage_over": st.sampled_from(USAGE),
    "plan_allows": st.booleans(),
}


def conditions(min_size: int) -> st.SearchStrategy[dict[str, Any]]:
    return st.lists(
        st.sampled_from(sorted(MATCHER_STRATEGIES)), min_size=min_size, max_size=3, unique=True
    ).flatmap(lambda names: st.fixed_dictionaries({n: MATCHER_STRATEGIES[n] for n in names}))


@st.composite
def rule_chains(draw: Any) -> list[dict[str, Any]]:
    n = draw(st.integers(0, 12))
    rules = []
    for i in range(n):
        rule: dict[str, Any] = {"id": f"r{i}", "effect": draw(st.sampled_from(["allow", "allow", "deny"])),
                                "match": draw(conditions(0))}
        if draw(st.integers(0, 3)) == 0:
            rule["unless"] = draw(conditions(1))
        rule["reason"] = f"reason {i}"
        rules.append(rule)
    return rules


@st.composite
def requests(draw: Any) -> dict[str, Any]:
    op = draw(st.sampled_from(OPERATIONS))
    segs = draw(st.lists(st.sampled_from(SEGMENTS + ["kb", "zz"]), min_size=0, max_size=4))
    r: dict[str, Any] = {
        "tenant": draw(st.sampled_from(TENANTS + ["t4"])),
        "plan": draw(st.sampled_from(list(PLANS) + ["ghost"])),
        "scopes": draw(st.lists(st.sampled_from(SCOPES + ["c"]), max_size=3, unique=True)),
        "api_key_id": "k",
        "method": draw(st.sampled_from(METHODS)),
        "path": "/" + "/".join(segs) + draw(st.sampled_from(["", "", "/"])),
        "operation": op,
        "algorithm": draw(st.one_of(st.none(), st.sampled_from(ALGORITHMS))),
        "key_label": draw(st.one_of(st.none(), st.sampled_from(LABELS))),
        "source_ip": draw(st.sampled_from(IPS)),
        "tls_group": draw(st.one_of(st.none(), st.sampled_from(GROUPS + ["X25519MLKEM768".lower()]))),
        "tls_pq": draw(st.booleans()),
        "now": datetime(2025, 1, 6, tzinfo=UTC) + timedelta(minutes=draw(st.integers(0, 14 * 24 * 60))),
        "usage": draw(st.fixed_dictionaries({}, optional={
            "sign": st.integers(0, 1500), "kem": st.integers(0, 20), "verify": st.integers(0, 20)})),
    }
    if draw(st.integers(0, 4)) == 0:
        r["mode"] = draw(st.sampled_from(["pqc", "hybrid"]))
    return r


def compile_chain(rules: list[dict[str, Any]], *, check_unreachable: bool = False) -> Any:
    doc = {"version": 1, "plans": PLANS, "rules": rules}
    return compile_policy([("50-gen.yaml", yaml.safe_dump(doc, sort_keys=False).encode())],
                          check_unreachable=check_unreachable)


def to_facts(r: dict[str, Any]) -> RequestFacts:
    return RequestFacts(**{**r, "scopes": frozenset(r["scopes"])})


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(rule_chains(), st.lists(requests(), min_size=1, max_size=15))
def test_evaluate_equals_reference(rules: list[dict[str, Any]], reqs: list[dict[str, Any]]) -> None:
    ps = compile_chain(rules)
    for r in reqs:
        f = to_facts(r)
        want = ref_decide(rules, r)
        got = evaluate(ps, f)
        assert (got.effect, got.rule_id) == want, (r, rules)
        assert explain(ps, f).decision == got
        event(f"{got.effect} by {got.source}")


@SETTINGS
@given(rule_chains(), st.lists(requests(), min_size=1, max_size=15))
def test_unreachable_rules_never_decide(rules: list[dict[str, Any]], reqs: list[dict[str, Any]]) -> None:
    ps = compile_chain(rules)
    dead = {d.id for d, _ in find_unreachable(ps.rules)}
    pruned = compile_chain([r for r in rules if r["id"] not in dead])
    for r in reqs:
        f = to_facts(r)
        full = evaluate(ps, f)
        assert full.rule_id not in dead
        after = evaluate(pruned, f)
        assert (after.effect, after.rule_id) == (full.effect, full.rule_id)
    event(f"dead rules: {min(len(dead), 3)}{'+' if len(dead) >= 3 else ''}")


def test_reference_glob_self_check() -> None:
    # the reference matcher itself, on the documented examples
    assert path_match("/admin/**", "/admin") and path_match("/admin/**", "/admin/x/y")
    assert not path_match("/admin/**", "/administrator")
    assert path_match("/v1/**/rotate", "/v1/rotate") and path_match("/v1/**/rotate", "/v1/keys/k/rotate")
    assert path_match("/v1/keys/*", "/v1/keys/k1") and not path_match("/v1/keys/*", "/v1/keys/k1/x")
    assert wild("prod-*", "prod-a") and not wild("dev-?", "dev-ab")
