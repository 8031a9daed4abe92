"""Validated rules (the loader's output) and the compiled policy set (the evaluator's input).

A ``Rule`` holds normalized matcher values: frozensets for the any-of matchers, pattern tuples
for globs, network tuples for CIDRs. ``PolicySet`` turns each rule into a tuple of small
closures (one per matcher) once, and builds an index so that evaluation visits only the rules
that can match a request's tenant, plan, scopes, operation and method. See ``evaluate.py`` for
why the index cannot change the outcome.
"""

from __future__ import annotations

import ipaddress
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, tzinfo
from types import MappingProxyType
from typing import cast
from zoneinfo import ZoneInfo

from ._glob import compile_alternatives, label_glob_regex, path_glob_regex
from .model import DEFAULT_DENY_REASON, Decision, Effect, Plan, RequestFacts

__all__ = ["Rule", "TimeWindow", "UsageOver", "MATCHERS", "PolicySet", "CompiledRule", "covers"]

# Canonical matcher order: explanations list failures in this order.
MATCHERS: tuple[str, ...] = (
    "tenant", "plan", "scope", "method", "path", "operation", "algorithm", "key_label", "mode",
    "source_cidr", "tls_group", "tls_pq", "time", "usage_over", "plan_allows",
)
# any-of over a set of exact values: the fact is in the set (scope: the sets intersect)
SET_MATCHERS = frozenset({"tenant", "plan", "scope", "method", "operation", "algorithm", "mode", "tls_group"})
GLOB_MATCHERS = frozenset({"path", "key_label"})
# matchers the index answers; their checks are dropped from the evaluation fast path
INDEXED = ("tenant", "plan", "scope", "operation", "method", "algorithm", "mode")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Check = Callable[[RequestFacts], bool]
DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


@dataclass(frozen=True, slots=True)
class TimeWindow:
    """Local weekday in ``days`` (0 = Monday; None = every day) and local time of day in
    [start, end) minutes (None = all day); ``start > end`` wraps past midnight. The weekday is
    that of the instant being judged: 02:00 Saturday is a Saturday even inside a window that
    opened on Friday evening."""

    days: frozenset[int] | None
    start: int | None
    end: int | None
    tz: str

    def zone(self) -> tzinfo:
        return UTC if self.tz == "UTC" else ZoneInfo(self.tz)


@dataclass(frozen=True, slots=True)
class UsageOver:
    """Any of ``classes`` has used at least ``percent`` % of its monthly quota, or at least
    ``at_least`` units (exactly one of the two is set). A class without a quota is unlimited
    and never over a percentage."""

    classes: frozenset[str]
    percent: float | None
    at_least: int | None


@dataclass(frozen=True, slots=True, eq=False)
class Rule:
    """One validated rule. ``match``/``unless`` map matcher names (canonical order) to values."""

    id: str
    effect: Effect
    reason: str
    match: Mapping[str, object]
    unless: Mapping[str, object] | None
    file: str
    line: int
    index_in_file: int = 0
    description: str = ""

    @property
    def location(self) -> str:
        return f"{self.file}:{self.line}"


# ---- reachability ---------------------------------------------------------------------------

def _value_covers(name: str, wide: object, narrow: object) -> bool:
    if name in SET_MATCHERS:
        return cast("frozenset[str]", narrow) <= cast("frozenset[str]", wide)
    if name in GLOB_MATCHERS:
        return set(cast("tuple[str, ...]", narrow)) <= set(cast("tuple[str, ...]", wide))
    if name == "source_cidr":
        wide_nets = cast("tuple[Network, ...]", wide)
        return all(
            any(n.version == w.version and n.subnet_of(w) for w in wide_nets)  # type: ignore[arg-type]
            for n in cast("tuple[Network, ...]", narrow)
        )
    return wide == narrow


def covers(earlier: Rule, later: Rule) -> bool:
    """Whether every request ``later`` matches is also matched by ``earlier`` (sound, not
    complete: a syntactic check). ``earlier`` must have no ``unless``; each of its matchers
    must appear in ``later`` with a value at least as narrow: a subset for any-of lists and
    globs (globs compared as text), subnets for CIDRs, equality for the rest. ``later``'s own
    ``unless`` only narrows it further, so it does not matter."""
    if earlier.unless is not None:
        return False
    for name, wide in earlier.match.items():
        narrow = later.match.get(name)
        if narrow is None or not _value_covers(name, wide, narrow):
            return False
    return True


# ---- compilation ----------------------------------------------------------------------------

def _fact_in(attr: str, values: frozenset[str]) -> Check:
    get = operator.attrgetter(attr)
    return lambda f: get(f) in values


def _check(name: str, value: object, plans: Mapping[str, Plan]) -> Check:
    """One matcher as a closure over its precompiled value (see the loader for the values)."""
    if name in ("tenant", "plan", "method", "operation", "algorithm", "mode"):
        return _fact_in(name, cast("frozenset[str]", value))
    if name == "tls_group":
        return _fact_in("tls_group_lower", cast("frozenset[str]", value))
    if name == "scope":
        wanted = cast("frozenset[str]", value)
        return lambda f: not wanted.isdisjoint(f.scopes)
    if name == "tls_pq":
        want_pq = bool(value)
        return lambda f: bool(f.tls_pq) is want_pq
    if name == "plan_allows":
        return _plan_allows_check(bool(value), plans)
    if name == "path":
        rx = compile_alternatives([path_glob_regex(p) for p in cast("tuple[str, ...]", value)]).fullmatch
        return lambda f: rx(f.path) is not None
    if name == "key_label":
        lrx = compile_alternatives([label_glob_regex(p) for p in cast("tuple[str, ...]", value)]).fullmatch
        return lambda f: f.key_label is not None and lrx(f.key_label) is not None
    if name == "source_cidr":
        return _cidr_check(cast("tuple[Network, ...]", value))
    if name == "time":
        assert isinstance(value, TimeWindow)
        return _time_check(value)
    if name == "usage_over":
        assert isinstance(value, UsageOver)
        return _usage_check(value, plans)
    raise AssertionError(f"unknown matcher {name!r}")


def _plan_allows_check(want: bool, plans: Mapping[str, Plan]) -> Check:
    def plan_allows(f: RequestFacts) -> bool:
        p = plans.get(f.plan)
        ok = (p is not None and f.operation in p.operations
              and (f.algorithm is None or f.algorithm in p.algorithms))
        return ok is want

    return plan_allows


def _cidr_check(nets: tuple[Network, ...]) -> Check:
    v4 = tuple(n for n in nets if n.version == 4)
    v6 = tuple(n for n in nets if n.version == 6)

    def in_cidr(f: RequestFacts) -> bool:
        ip = f.ip
        if ip is None:
            return False
        return any(ip in n for n in (v4 if ip.version == 4 else v6))

    return in_cidr


def _time_check(window: TimeWindow) -> Check:
    zone, days, start, end = window.zone(), window.days, window.start, window.end

    def in_window(f: RequestFacts) -> bool:
        local = f.now.astimezone(zone)
        if days is not None and local.weekday() not in days:
            return False
        if start is None or end is None:
            return True
        m = local.hour * 60 + local.minute
        return start <= m < end if start < end else (m >= start or m < end)

    return in_window


def _usage_check(usage: UsageOver, plans: Mapping[str, Plan]) -> Check:
    classes, percent, at_least = tuple(sorted(usage.classes)), usage.percent, usage.at_least

    def over(f: RequestFacts) -> bool:
        for c in classes:
            used = f.usage.get(c, 0)
            if at_least is not None:
                if used >= at_least:
                    return True
                continue
            limit = f.quota.get(c)
            if limit is None:
                p = plans.get(f.plan)
                limit = p.quotas.get(c) if p is not None else None
            if limit is not None and percent is not None and used * 100 >= percent * limit:
                return True
        return False

    return over


@dataclass(frozen=True, slots=True, eq=False)
class CompiledRule:
    rule: Rule
    deny: bool
    checks: tuple[tuple[str, Check], ...]  # every match check, named "match.<matcher>"
    residual: tuple[Check, ...]  # the match checks the index does not already guarantee
    unless: tuple[tuple[str, Check], ...]  # named "unless.<matcher>"; all true = rule skipped
    unless_fns: tuple[Check, ...]
    decision: Decision


class PolicySet:
    """A compiled, immutable policy set: plans, ordered rules, their index and a revision.

    ``revision`` is the SHA-256 (hex) of the source files' names inside the policy directory
    and their contents, in load order. Where the directory lies and how its path is spelled do
    not enter it: two proxies showing the same revision enforce the same policy."""

    __slots__ = ("revision", "files", "plans", "rules", "compiled", "warnings", "default_decision",
                 "deny_mask", "_tables", "_wildcards")

    def __init__(self, *, revision: str, files: Sequence[str], plans: Mapping[str, Plan],
                 rules: Sequence[Rule], warnings: Sequence[object] = ()) -> None:
        self.revision = revision
        self.files = tuple(files)
        self.plans: Mapping[str, Plan] = MappingProxyType(dict(plans))
        self.rules = tuple(rules)
        self.warnings = tuple(warnings)
        self.default_decision = Decision("deny", None, DEFAULT_DENY_REASON, "default", revision)
        compiled = []
        deny_mask = 0
        tables: dict[str, dict[str, int]] = {d: {} for d in INDEXED}
        wildcards = dict.fromkeys(INDEXED, 0)
        for i, rule in enumerate(self.rules):
            bit = 1 << i
            checks = tuple((f"match.{n}", _check(n, v, self.plans)) for n, v in rule.match.items())
            residual = tuple(c for (n, c) in checks if n[6:] not in INDEXED)
            unless = tuple((f"unless.{n}", _check(n, v, self.plans)) for n, v in (rule.unless or {}).items())
            deny = rule.effect == "deny"
            if deny:
                deny_mask |= bit
            compiled.append(CompiledRule(
                rule, deny, checks, residual, unless, tuple(c for _, c in unless),
                Decision(rule.effect, rule.id, rule.reason, "rule", revision),
            ))
            for dim in INDEXED:
                values = rule.match.get(dim)
                if values is None:
                    wildcards[dim] |= bit
                else:
                    for v in cast("frozenset[str]", values):
                        tables[dim][v] = tables[dim].get(v, 0) | bit
        # A value's mask also holds every rule that does not constrain that dimension.
        for dim in INDEXED:
            if dim != "scope":
                for v in tables[dim]:
                    tables[dim][v] |= wildcards[dim]
        self.compiled = tuple(compiled)
        self.deny_mask = deny_mask
        self._tables = tables
        self._wildcards = wildcards

    def candidates(self, f: RequestFacts) -> int:
        """Bit i set = rule i can match ``f`` on every indexed matcher (and only then)."""
        t, w = self._tables, self._wildcards
        scope_mask = w["scope"]
        by_scope = t["scope"]
        for s in f.scopes:
            scope_mask |= by_scope.get(s, 0)
        return (t["tenant"].get(f.tenant, w["tenant"]) & t["plan"].get(f.plan, w["plan"])
                & t["operation"].get(f.operation, w["operation"]) & t["method"].get(f.method, w["method"])
                & t["algorithm"].get(f.algorithm, w["algorithm"])  # type: ignore[arg-type]
                & t["mode"].get(f.mode, w["mode"])  # type: ignore[arg-type]
                & scope_mask)

    @property
    def short_revision(self) -> str:
        return self.revision[:12]

    def __repr__(self) -> str:
        return (
            f"PolicySet(revision={self.short_revision!r}, files={len(self.files)}, rules={len(self.rules)})"
        )
