"""The sections of a policy file: plans, and rules with their matchers, read from YAML nodes.

Each reader records every problem it finds in the file's ``FileReader`` and returns ``None``
for a value it could not read; the loader (``loader.py``) chains the files and decides.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from ..crypto.algorithms import ALGORITHMS
from ._glob import GlobError, label_glob_regex, name_glob_regex, path_glob_regex
from ._reader import FileReader, describe
from ._rules import DAY_NAMES, MATCHERS, Rule, TimeWindow, UsageOver
from .model import METHODS, MODES, OPERATIONS, QUOTA_CLASSES, Plan, RateLimit

__all__ = ["read_plans", "read_rules"]

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
_PLAN_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")  # as API-key records allow
_NAME_RE = re.compile(r"[^\x00-\x20\x7f]{1,128}")  # tenants, scopes: printable, no spaces
_GROUP_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_HHMM_RE = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])|24:00")

Parsed = list[tuple[FileReader, dict[str, tuple[yaml.Node, yaml.Node]]]]


# ---- plans -------------------------------------------------------------------------------------

def _expand_names(f: FileReader, items: list[tuple[str, yaml.Node]], key: str, vocabulary: frozenset[str],
                  what: str) -> frozenset[str] | None:
    out: set[str] = set()
    ok = True
    for value, node in items:
        if "*" in value or "?" in value:
            try:
                rx = re.compile(name_glob_regex(value))
            except GlobError as exc:
                f.err(node, key, f"bad pattern {value!r}: {exc}")
                ok = False
                continue
            hits = {v for v in vocabulary if rx.fullmatch(v)}
            if not hits:
                f.err(node, key, f"pattern {value!r} matches no known {what}")
                ok = False
            out |= hits
        elif value in vocabulary:
            out.add(value)
        else:
            f.err(node, key, f"unknown {what} {value!r}; expected one of {', '.join(sorted(vocabulary))}")
            ok = False
    return frozenset(out) if ok else None


def _rate_limit(f: FileReader, node: yaml.Node, key: str) -> RateLimit | None:
    m = f.mapping(node, key, ("requests_per_second", "burst"), ("requests_per_second", "burst"))
    if m is None or len(m) != 2:
        return None
    rps = f.number(m["requests_per_second"][1], f"{key}.requests_per_second", integer=False, lo=0.001, hi=1e6)
    burst = f.number(m["burst"][1], f"{key}.burst", integer=True, lo=1, hi=10_000_000)
    if rps is None or burst is None:
        return None
    return RateLimit(float(rps), int(burst))


_PLAN_KEYS = ("description", "rate_limit", "tenant_rate_limit", "quotas", "algorithms", "operations")


def _plan(f: FileReader, name: str, node: yaml.Node, key: str) -> Plan | None:
    m = f.mapping(node, key, _PLAN_KEYS, ("rate_limit", "algorithms", "operations"))
    if m is None:
        return None
    n_issues = len(f.issues)
    description = ""
    if "description" in m:
        description = f.string(m["description"][1], f"{key}.description", max_len=4000, multiline=True) or ""
    rate = _rate_limit(f, m["rate_limit"][1], f"{key}.rate_limit") if "rate_limit" in m else None
    tenant_rate = None
    if "tenant_rate_limit" in m:
        tenant_rate = _rate_limit(f, m["tenant_rate_limit"][1], f"{key}.tenant_rate_limit")
    quotas: dict[str, int] = {}
    if "quotas" in m:
        qm = f.mapping(m["quotas"][1], f"{key}.quotas", sorted(QUOTA_CLASSES))
        for cls, (_, vnode) in (qm or {}).items():
            v = f.number(vnode, f"{key}.quotas.{cls}", integer=True, lo=0, hi=10**15)
            if v is not None:
                quotas[cls] = int(v)
    algorithms: frozenset[str] | None = None
    if "algorithms" in m:
        anode = m["algorithms"][1]
        if isinstance(anode, yaml.SequenceNode) and not anode.value:
            algorithms = frozenset()
        else:
            items = f.strings(anode, f"{key}.algorithms")
            if items is not None:
                algorithms = _expand_names(f, items, f"{key}.algorithms", frozenset(ALGORITHMS), "algorithm")
    operations: frozenset[str] | None = None
    if "operations" in m:
        items = f.strings(m["operations"][1], f"{key}.operations")
        if items is not None:
            operations = _expand_names(f, items, f"{key}.operations", OPERATIONS, "operation")
    if len(f.issues) != n_issues or rate is None or algorithms is None or operations is None:
        return None
    return Plan(name, rate, tenant_rate, MappingProxyType(quotas), algorithms, operations, description,
                f.name, node.start_mark.line + 1)


# ---- matchers ----------------------------------------------------------------------------------

def _time(f: FileReader, node: yaml.Node, key: str) -> TimeWindow | None:
    m = f.mapping(node, key, ("days", "from", "to", "tz"))
    if m is None:
        return None
    n_issues = len(f.issues)
    days = _days(f, m["days"][1], f"{key}.days") if "days" in m else None
    minutes: dict[str, int] = {}
    for end in ("from", "to"):
        if end in m:
            minute = _minute_of_day(f, m[end][1], f"{key}.{end}", end)
            if minute is not None:
                minutes[end] = minute
    if ("from" in m) != ("to" in m):
        f.err(node, key, "'from' and 'to' go together")
    elif "from" in minutes and "to" in minutes and minutes["from"] % 1440 == minutes["to"] % 1440:
        f.err(m["to"][1], f"{key}.to", "'from' and 'to' are equal: say what you mean with days only")
    if "days" not in m and "from" not in m:
        f.err(node, key, "expected 'days' and/or 'from'/'to'")
    tz = _time_zone(f, m["tz"][1], f"{key}.tz") if "tz" in m else "UTC"
    if len(f.issues) != n_issues or tz is None:
        return None
    return TimeWindow(days, minutes.get("from"), minutes.get("to"), tz)


def _days(f: FileReader, node: yaml.Node, key: str) -> frozenset[int] | None:
    items = f.strings(node, key)
    if items is None:
        return None
    days = set()
    for value, vnode in items:
        if value.lower() in DAY_NAMES:
            days.add(DAY_NAMES.index(value.lower()))
        else:
            f.err(vnode, key, f"expected one of {', '.join(DAY_NAMES)}, got {value!r}")
    return frozenset(days)


def _minute_of_day(f: FileReader, node: yaml.Node, key: str, end: str) -> int | None:
    """``from`` (00:00-23:59) or ``to`` (00:00-24:00) as minutes after midnight."""
    text = f.raw_text(node, key)
    if text is None:
        return None
    if not _HHMM_RE.fullmatch(text) or (end == "from" and text == "24:00"):
        f.err(
            node,
            key,
            f'expected a time "HH:MM" (00:00-23:59{", or 24:00" if end == "to" else ""}), got {text!r}',
        )
        return None
    hh, mm = text.split(":")
    return int(hh) * 60 + int(mm)


def _time_zone(f: FileReader, node: yaml.Node, key: str) -> str | None:
    text = f.string(node, key, max_len=64)
    if text is None or text == "UTC":
        return text
    try:
        ZoneInfo(text)
    except (ZoneInfoNotFoundError, ValueError):
        f.err(node, key, f"unknown time zone {text!r} (an IANA name such as Europe/Paris, or UTC)")
        return None
    return text


def _usage(f: FileReader, node: yaml.Node, key: str) -> UsageOver | None:
    m = f.mapping(node, key, ("operation", "percent_of_quota", "at_least"), ("operation",))
    if m is None or "operation" not in m:
        return None
    items = f.strings(m["operation"][1], f"{key}.operation")
    classes = None
    if items is not None:
        classes = _expand_names(f, items, f"{key}.operation", QUOTA_CLASSES, "quota class")
    if ("percent_of_quota" in m) == ("at_least" in m):
        f.err(node, key, "expected exactly one of percent_of_quota, at_least")
        return None
    percent = at_least = None
    if "percent_of_quota" in m:
        percent = f.number(
            m["percent_of_quota"][1], f"{key}.percent_of_quota", integer=False, lo=0.001, hi=1e6
        )
        if percent is None:
            return None
    else:
        at_least = f.number(m["at_least"][1], f"{key}.at_least", integer=True, lo=0, hi=10**15)
        if at_least is None:
            return None
    if classes is None:
        return None
    return UsageOver(classes, None if percent is None else float(percent),
                     None if at_least is None else int(at_least))


def _matchers(f: FileReader, node: yaml.Node, key: str, plans: Mapping[str, Plan],
              plan_names_pending: set[str]) -> dict[str, object] | None:
    m = f.mapping(node, key, MATCHERS)
    if m is None:
        return None
    n_issues = len(f.issues)
    out: dict[str, object] = {}
    for name in MATCHERS:
        if name not in m:
            continue
        vnode = m[name][1]
        sub = f"{key}.{name}"
        value: object = None
        if name in ("tls_pq", "plan_allows"):
            value = f.boolean(vnode, sub)
        elif name == "time":
            value = _time(f, vnode, sub)
        elif name == "usage_over":
            value = _usage(f, vnode, sub)
        else:
            items = f.strings(vnode, sub, **_STRING_RULES.get(name, {}))
            if items is None:
                continue
            value = _list_matcher(f, name, items, sub, plans, plan_names_pending)
        if value is not None:
            out[name] = value
    return out if len(f.issues) == n_issues else None


_STRING_RULES: dict[str, dict[str, Any]] = {
    "tenant": {"pattern": _NAME_RE, "what": "a tenant id"},
    "scope": {"pattern": _NAME_RE, "what": "a scope name"},
    "tls_group": {"pattern": _GROUP_RE, "what": "a TLS group name"},
    "path": {"max_len": 1024},
    "key_label": {"max_len": 256},
}


def _list_matcher(f: FileReader, name: str, items: list[tuple[str, yaml.Node]], key: str,
                  plans: Mapping[str, Plan], plan_names_pending: set[str]) -> object:
    values = [v for v, _ in items]
    if name in ("tenant", "scope"):
        return frozenset(values)
    if name == "tls_group":
        return frozenset(v.lower() for v in values)
    if name == "plan":
        ok = True
        for v, vnode in items:
            if v not in plans and v not in plan_names_pending:
                known = ", ".join(sorted(set(plans) | plan_names_pending)) or "none declared"
                f.err(vnode, key, f"unknown plan {v!r}; declared plans: {known}")
                ok = False
        return frozenset(values) if ok else None
    if name == "method":
        ok = True
        for v, vnode in items:
            if v.upper() not in METHODS:
                f.err(vnode, key, f"unknown HTTP method {v!r}; expected one of {', '.join(sorted(METHODS))}")
                ok = False
        return frozenset(v.upper() for v in values) if ok else None
    if name == "mode":
        bad = [(v, n) for v, n in items if v not in MODES]
        for v, vnode in bad:
            f.err(vnode, key, f"expected pqc or hybrid, got {v!r}")
        return None if bad else frozenset(values)
    if name == "algorithm":
        return _expand_names(f, items, key, frozenset(ALGORITHMS), "algorithm")
    if name == "operation":
        return _expand_names(f, items, key, OPERATIONS, "operation")
    if name in ("path", "key_label"):
        compile_one = path_glob_regex if name == "path" else label_glob_regex
        ok = True
        for v, vnode in items:
            try:
                re.compile(compile_one(v))
            except (GlobError, re.error) as exc:
                f.err(vnode, key, f"bad pattern {v!r}: {exc}")
                ok = False
        return tuple(sorted(set(values))) if ok else None
    if name == "source_cidr":
        nets = []
        ok = True
        for v, vnode in items:
            try:
                net = ipaddress.ip_network(v, strict=True)
            except ValueError as exc:
                hint = ""
                try:
                    hint = f" (did you mean {ipaddress.ip_network(v, strict=False)}?)"
                except ValueError:
                    pass
                f.err(vnode, key, f"bad CIDR {v!r}: {exc}{hint}")
                ok = False
                continue
            nets.append(net)
        return tuple(nets) if ok else None
    raise AssertionError(name)


# ---- rules ---------------------------------------------------------------------------------------

_RULE_KEYS = ("id", "effect", "match", "unless", "reason", "description")


def _rule(f: FileReader, node: yaml.Node, key: str, index: int, plans: Mapping[str, Plan],
          plan_names_pending: set[str]) -> Rule | None:
    m = f.mapping(node, key, _RULE_KEYS, ("id", "effect", "match", "reason"))
    if m is None:
        return None
    n_issues = len(f.issues)
    rid = f.string(m["id"][1], f"{key}.id", pattern=_ID_RE,
                   what="a rule id (letters, digits, . _ : -; at most 64)") if "id" in m else None
    effect = None
    if "effect" in m:
        effect = f.string(
            m["effect"][1], f"{key}.effect", pattern=re.compile("allow|deny"), what="allow or deny"
        )
    reason = f.string(m["reason"][1], f"{key}.reason") if "reason" in m else None
    description = ""
    if "description" in m:
        description = f.string(m["description"][1], f"{key}.description", max_len=4000, multiline=True) or ""
    match = _matchers(f, m["match"][1], f"{key}.match", plans, plan_names_pending) if "match" in m else None
    unless = None
    if "unless" in m:
        unless = _matchers(f, m["unless"][1], f"{key}.unless", plans, plan_names_pending)
        if unless is not None and not unless:
            f.err(m["unless"][1], f"{key}.unless", "an empty unless would exclude every request")
    if len(f.issues) != n_issues or rid is None or effect is None or reason is None or match is None:
        return None
    return Rule(rid, effect, reason, MappingProxyType(match),  # type: ignore[arg-type]
                None if unless is None else MappingProxyType(unless),
                f.name, node.start_mark.line + 1, index, description)


def read_plans(parsed: Parsed) -> tuple[dict[str, Plan], set[str]]:
    """Every file's plans, and the names of those declared but invalid (rules in any file may
    name a plan declared in any file; an invalid one is not also reported as unknown)."""
    plans: dict[str, Plan] = {}
    declared: dict[str, str] = {}
    pending: set[str] = set()
    for f, top in parsed:
        if "plans" not in top:
            continue
        pm = f.mapping(top["plans"][1], "plans", None)
        for pname, (knode, vnode) in (pm or {}).items():
            key = f"plans.{pname}"
            if not _PLAN_RE.fullmatch(pname):
                f.err(knode, key, "expected a plan name (letters, digits, . _ : -; at most 128)")
                continue
            if pname in declared:
                f.err(knode, key, f"plan declared twice (first in {declared[pname]})")
                continue
            declared[pname] = f"{f.name}:{knode.start_mark.line + 1}"
            plan = _plan(f, pname, vnode, key)
            if plan is None:
                pending.add(pname)
            else:
                plans[pname] = plan
    return plans, pending


def read_rules(parsed: Parsed, plans: Mapping[str, Plan], pending: set[str]) -> list[Rule]:
    """Every file's rules in chain order; rule ids are unique across the files."""
    rules: list[Rule] = []
    ids: dict[str, str] = {}
    for f, top in parsed:
        if "rules" not in top:
            continue
        rnode = top["rules"][1]
        if not isinstance(rnode, yaml.SequenceNode):
            f.err(rnode, "rules", f"expected a list of rules, got {describe(rnode)}")
            continue
        for i, item in enumerate(rnode.value):
            key = f"rules[{i}]"
            rule = _rule(f, item, key, i, plans, pending)
            if rule is None:
                continue
            if rule.id in ids:
                f.err(item, f"{key}.id", f"duplicate rule id {rule.id!r} (first at {ids[rule.id]})")
                continue
            ids[rule.id] = rule.location
            rules.append(rule)
    return rules
