"""Load and validate policy files into a compiled ``PolicySet``.

Every ``*.yaml`` file of the policy directory (names starting with ``.`` are editor droppings
and skipped; ``*.yml`` is ignored with a warning) is read in name order and the rules are
chained in that order. Each file::

    version: 1                       # required, the only version there is
    description: "..."               # optional
    plans:                           # optional; a plan is declared in exactly one file
      free:
        rate_limit: {requests_per_second: 5, burst: 10}        # per API key
        tenant_rate_limit: {requests_per_second: 20, burst: 40} # optional, per tenant
        quotas: {sign: 10000, kem: 10000}                       # per calendar month; absent = unlimited
        algorithms: [ml-kem-768, ml-dsa-65]
        operations: ["sign*", "verify*", "keys.*", info, forward]   # globs expand over known names
    rules:                           # optional; ordered
      - id: admin-scope-required     # unique across all files
        effect: deny                 # allow | deny
        match: {path: /admin/**}     # all of these must match ({} = every request)
        unless: {scope: admin}       # optional: ...unless all of these match
        reason: admin endpoints need a key with the admin scope   # shown in the 403

Validation is strict and collects every problem (not just the first), each as a
``PolicyIssue`` with ``file:line``, the offending key (``rules[2].match.source_cidr``) and what
was expected: unknown keys, wrong types, YAML duplicate keys, bad globs/CIDRs/times/time zones,
unknown algorithms, operations, quota classes or plans, duplicate rule ids and plan names across
files, and unreachable rules.

Unreachable rules, precisely: rule B is reported when an earlier rule A has no ``unless`` and
*covers* B (every matcher of A appears in B with a value at least as narrow: subset of an any-of
list, subset of the glob patterns compared as text, subnets of its CIDRs, equal otherwise),
and either A is a deny (B can never decide: A denies first whenever B matches) or both are
allows (the first matching allow is the deciding one, so B never is). This catches every rule
after an unconditional deny (``match: {}``) and every exact duplicate, and never reports a rule
that can decide; being syntactic it cannot see every dead rule (say, ``/v1/*`` covering
``/v1/sign``).

YAML subtleties handled here: files are composed to nodes (``yaml.SafeLoader``'s composer, so
every value keeps its line), duplicate mapping keys are errors (PyYAML would keep the last
one), and time-of-day values are read from the source text (YAML 1.1 reads ``18:00`` as the
base-60 integer 1080).
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from ..crypto.algorithms import ALGORITHMS
from ..errors import PolicyInvalid
from ._glob import GlobError, label_glob_regex, name_glob_regex, path_glob_regex
from ._rules import DAY_NAMES, MATCHERS, PolicySet, Rule, TimeWindow, UsageOver, covers
from .model import METHODS, MODES, OPERATIONS, QUOTA_CLASSES, Plan, RateLimit

__all__ = ["PolicyIssue", "load_policy_dir", "compile_policy", "find_unreachable", "check_policy_dir",
           "policy_files", "MAX_POLICY_FILE_BYTES"]

MAX_POLICY_FILE_BYTES = 4 * 1024 * 1024  # a policy is text written by people; 4 MiB is plenty
MAX_RULES = 100_000
_SafeLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
_PLAN_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")  # as API-key records allow
_NAME_RE = re.compile(r"[^\x00-\x20\x7f]{1,128}")  # tenants, scopes: printable, no spaces
_GROUP_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_HHMM_RE = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])|24:00")
_MAX_TEXT = 500


@dataclass(frozen=True, slots=True)
class PolicyIssue:
    file: str
    line: int
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.key}: {self.message}"


def _describe(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    tag = node.tag.rsplit(":", 1)[-1]
    shown = node.value if len(node.value) <= 40 else node.value[:40] + "..."
    return {"str": f"string {shown!r}", "null": "null", "bool": f"boolean {shown}",
            "int": f"integer {shown}", "float": f"number {shown}"}.get(tag, f"{tag} {shown!r}")


class _File:
    """Reads one file's nodes, recording every problem with its line."""

    def __init__(self, name: str, issues: list[PolicyIssue]) -> None:
        self.name = name
        self.issues = issues

    def err(self, node: yaml.Node | None, key: str, message: str) -> None:
        line = node.start_mark.line + 1 if node is not None else 1
        self.issues.append(PolicyIssue(self.name, line, key, message))

    # -- shapes -------------------------------------------------------------------------------
    def mapping(self, node: yaml.Node, key: str, allowed: Sequence[str] | None,
                required: Sequence[str] = ()) -> dict[str, tuple[yaml.Node, yaml.Node]] | None:
        if not isinstance(node, yaml.MappingNode):
            self.err(node, key or "(top level)", f"expected a mapping, got {_describe(node)}")
            return None
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for knode, vnode in node.value:
            if isinstance(knode, yaml.ScalarNode) and knode.value == "<<":
                self.err(knode, f"{key}.<<" if key else "<<", "YAML merge keys (<<) are not supported")
                continue
            if not (isinstance(knode, yaml.ScalarNode) and knode.tag.endswith(":str")):
                self.err(knode, key or "(top level)", f"expected string keys, got {_describe(knode)}")
                continue
            k = knode.value
            sub = f"{key}.{k}" if key else k
            if k in out:
                self.err(knode, sub, f"duplicate key (first at line {out[k][0].start_mark.line + 1})")
                continue
            if allowed is not None and k not in allowed:
                self.err(knode, sub, f"unknown key; expected one of {', '.join(allowed)}")
                continue
            out[k] = (knode, vnode)
        for k in required:
            if k not in out:
                self.err(node, f"{key}.{k}" if key else k, "required key is missing")
        return out

    def _scalar(self, node: yaml.Node) -> Any:
        return _SCALAR_LOADER.yaml_constructors[node.tag](_SCALAR_LOADER, node)

    def string(self, node: yaml.Node, key: str, *, pattern: re.Pattern[str] | None = None,
               what: str = "a string", max_len: int = _MAX_TEXT, multiline: bool = False) -> str | None:
        if not (isinstance(node, yaml.ScalarNode) and node.tag.endswith(":str")):
            hint = ""
            if isinstance(node, yaml.ScalarNode) and not node.style and not node.tag.endswith(":null"):
                hint = f' (quote it: "{node.value}")'
            self.err(node, key, f"expected {what}, got {_describe(node)}{hint}")
            return None
        value: str = node.value
        if pattern is not None and not pattern.fullmatch(value):
            self.err(node, key, f"expected {what}, got {value[:60]!r}")
            return None
        if not value.strip():
            self.err(node, key, f"expected {what}, got an empty string")
            return None
        if len(value) > max_len:
            self.err(node, key, f"expected at most {max_len} characters, got {len(value)}")
            return None
        if any(ord(c) < 0x20 and c != "\t" and not (multiline and c == "\n") for c in value):
            self.err(node, key, "control characters are not allowed")
            return None
        return value

    def boolean(self, node: yaml.Node, key: str) -> bool | None:
        if isinstance(node, yaml.ScalarNode) and node.tag.endswith(":bool"):
            return bool(self._scalar(node))
        self.err(node, key, f"expected true or false, got {_describe(node)}")
        return None

    def number(self, node: yaml.Node, key: str, *, integer: bool, lo: float, hi: float) -> float | None:
        ok_tags = (":int",) if integer else (":int", ":float")
        if not (isinstance(node, yaml.ScalarNode) and node.tag.endswith(ok_tags)):
            self.err(node, key, f"expected {'an integer' if integer else 'a number'}, got {_describe(node)}")
            return None
        value = self._scalar(node)
        if not (lo <= value <= hi):  # NaN fails this too
            self.err(node, key, f"expected a value in [{lo:g}, {hi:g}], got {node.value}")
            return None
        return value  # type: ignore[no-any-return]

    def strings(self, node: yaml.Node, key: str, **kw: Any) -> list[tuple[str, yaml.Node]] | None:
        """A string or a non-empty list of distinct strings (any-of)."""
        items = node.value if isinstance(node, yaml.SequenceNode) else [node]
        if isinstance(node, yaml.SequenceNode) and not items:
            self.err(node, key, "expected a non-empty list")
            return None
        out: list[tuple[str, yaml.Node]] = []
        seen: set[str] = set()
        ok = True
        for i, item in enumerate(items):
            sub = f"{key}[{i}]" if isinstance(node, yaml.SequenceNode) else key
            value = self.string(item, sub, **kw)
            if value is None:
                ok = False
                continue
            if value in seen:
                self.err(item, sub, f"duplicate value {value!r}")
                ok = False
                continue
            seen.add(value)
            out.append((value, item))
        return out if ok else None

    def raw_text(self, node: yaml.Node, key: str) -> str | None:
        """A scalar's source text: time-of-day values, which YAML 1.1 would mangle."""
        if isinstance(node, yaml.ScalarNode) and not node.tag.endswith(":null"):
            return str(node.value)
        self.err(node, key, f"expected a time \"HH:MM\", got {_describe(node)}")
        return None


_SCALAR_LOADER = yaml.SafeLoader("")  # only its stateless scalar constructors are used


# ---- plans -------------------------------------------------------------------------------------

def _expand_names(f: _File, items: list[tuple[str, yaml.Node]], key: str, vocabulary: frozenset[str],
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


def _rate_limit(f: _File, node: yaml.Node, key: str) -> RateLimit | None:
    m = f.mapping(node, key, ("requests_per_second", "burst"), ("requests_per_second", "burst"))
    if m is None or len(m) != 2:
        return None
    rps = f.number(m["requests_per_second"][1], f"{key}.requests_per_second", integer=False, lo=0.001, hi=1e6)
    burst = f.number(m["burst"][1], f"{key}.burst", integer=True, lo=1, hi=10_000_000)
    if rps is None or burst is None:
        return None
    return RateLimit(float(rps), int(burst))


_PLAN_KEYS = ("description", "rate_limit", "tenant_rate_limit", "quotas", "algorithms", "operations")


def _plan(f: _File, name: str, node: yaml.Node, key: str) -> Plan | None:
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

def _time(f: _File, node: yaml.Node, key: str) -> TimeWindow | None:
    m = f.mapping(node, key, ("days", "from", "to", "tz"))
    if m is None:
        return None
    ok = True
    days: frozenset[int] | None = None
    if "days" in m:
        items = f.strings(m["days"][1], f"{key}.days")
        if items is None:
            ok = False
        else:
            ds = set()
            for value, vnode in items:
                if value.lower() in DAY_NAMES:
                    ds.add(DAY_NAMES.index(value.lower()))
                else:
                    f.err(vnode, f"{key}.days", f"expected one of {', '.join(DAY_NAMES)}, got {value!r}")
                    ok = False
            days = frozenset(ds)
    minutes: dict[str, int] = {}
    for end in ("from", "to"):
        if end in m:
            text = f.raw_text(m[end][1], f"{key}.{end}")
            if text is None:
                ok = False
            elif not _HHMM_RE.fullmatch(text) or (end == "from" and text == "24:00"):
                f.err(
                    m[end][1],
                    f"{key}.{end}",
                    f'expected a time "HH:MM" (00:00-23:59{", or 24:00" if end == "to" else ""}), '
                    f"got {text!r}",
                )
                ok = False
            else:
                hh, mm = text.split(":")
                minutes[end] = int(hh) * 60 + int(mm)
    if ("from" in m) != ("to" in m):
        f.err(node, key, "'from' and 'to' go together")
        ok = False
    elif "from" in minutes and "to" in minutes and minutes["from"] % 1440 == minutes["to"] % 1440:
        f.err(m["to"][1], f"{key}.to", "'from' and 'to' are equal: say what you mean with days only")
        ok = False
    if "days" not in m and "from" not in m:
        f.err(node, key, "expected 'days' and/or 'from'/'to'")
        ok = False
    tz = "UTC"
    if "tz" in m:
        text = f.string(m["tz"][1], f"{key}.tz", max_len=64)
        if text is None:
            ok = False
        elif text != "UTC":
            try:
                ZoneInfo(text)
                tz = text
            except (ZoneInfoNotFoundError, ValueError):
                f.err(
                    m["tz"][1],
                    f"{key}.tz",
                    f"unknown time zone {text!r} (an IANA name such as Europe/Paris, or UTC)",
                )
                ok = False
    if not ok:
        return None
    return TimeWindow(days, minutes.get("from"), minutes.get("to"), tz)


def _usage(f: _File, node: yaml.Node, key: str) -> UsageOver | None:
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


def _matchers(f: _File, node: yaml.Node, key: str, plans: Mapping[str, Plan],
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


def _list_matcher(f: _File, name: str, items: list[tuple[str, yaml.Node]], key: str,
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


def _rule(f: _File, node: yaml.Node, key: str, index: int, plans: Mapping[str, Plan],
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


def find_unreachable(rules: Sequence[Rule]) -> list[tuple[Rule, Rule]]:
    """Pairs (dead rule, the earlier rule that makes it dead); see the module docstring."""
    dead: list[tuple[Rule, Rule]] = []
    keysets = [frozenset(r.match) for r in rules]
    for j, later in enumerate(rules):
        for i in range(j):
            earlier = rules[i]
            if earlier.unless is not None or not keysets[i] <= keysets[j]:
                continue
            if earlier.effect == "allow" and later.effect == "deny":
                continue
            if covers(earlier, later):
                dead.append((later, earlier))
                break
    return dead


# ---- files ---------------------------------------------------------------------------------------

def policy_files(directory: str | os.PathLike[str]) -> tuple[list[Path], list[Path]]:
    """(``*.yaml`` files to load in name order, ``*.yml`` files that are ignored)."""
    d = Path(directory)
    names = sorted(os.listdir(d))
    load = [d / n for n in names if n.endswith(".yaml") and not n.startswith(".") and (d / n).is_file()]
    ignored = [d / n for n in names if n.endswith(".yml") and not n.startswith(".")]
    return load, ignored


def _compose(f: _File, text: str) -> yaml.Node | None:
    loader = _SafeLoader(text)
    try:
        return loader.get_single_node()  # type: ignore[no-any-return]
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        f.issues.append(
            PolicyIssue(f.name, line, "(yaml)", f"{exc.context or ''} {exc.problem or ''}".strip())
        )
    except yaml.YAMLError as exc:
        f.issues.append(PolicyIssue(f.name, 1, "(yaml)", str(exc).splitlines()[0]))
    finally:
        loader.dispose()
    return None


def compile_policy(sources: Sequence[tuple[str, bytes]], *, check_unreachable: bool = True,
                   warnings: Sequence[PolicyIssue] = ()) -> PolicySet:
    """Compile named file contents (in chain order) into a PolicySet; raises PolicyInvalid
    with every issue. ``check_unreachable=False`` is for tests that chain random rules."""
    issues: list[PolicyIssue] = []
    digest = hashlib.sha256()
    parsed: list[tuple[_File, dict[str, tuple[yaml.Node, yaml.Node]]]] = []
    for name, data in sources:
        # The revision hashes each file's name inside the (flat) policy directory, never the
        # path it was read by: `policies/`, `./policies` and `/etc/qpher/policies` holding the
        # same files are the same policy. The name stays in because it orders the chain.
        base = os.path.basename(name).encode()
        digest.update(b"%d:%s\0%d:" % (len(base), base, len(data)))
        digest.update(data)
        f = _File(name, issues)
        if len(data) > MAX_POLICY_FILE_BYTES:
            issues.append(PolicyIssue(name, 1, "(file)", f"larger than {MAX_POLICY_FILE_BYTES} bytes"))
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            issues.append(PolicyIssue(name, line, "(file)", "not valid UTF-8"))
            continue
        root = _compose(f, text)
        if root is None:
            if not issues or issues[-1].file != name:
                issues.append(PolicyIssue(name, 1, "version", "empty file; expected at least 'version: 1'"))
            continue
        top = f.mapping(root, "", ("version", "description", "plans", "rules"), ("version",))
        if top is None:
            continue
        if "version" in top:
            vnode = top["version"][1]
            if not (isinstance(vnode, yaml.ScalarNode) and vnode.tag.endswith(":int") and vnode.value == "1"):
                f.err(vnode, "version", f"expected 1, got {_describe(vnode)}")
        if "description" in top:
            f.string(top["description"][1], "description", max_len=4000, multiline=True)
        parsed.append((f, top))

    # Plans first (rules in any file may name a plan declared in any file).
    plans: dict[str, Plan] = {}
    declared: dict[str, str] = {}
    pending: set[str] = set()  # declared but invalid: do not also report "unknown plan"
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

    rules: list[Rule] = []
    ids: dict[str, str] = {}
    for f, top in parsed:
        if "rules" not in top:
            continue
        rnode = top["rules"][1]
        if not isinstance(rnode, yaml.SequenceNode):
            f.err(rnode, "rules", f"expected a list of rules, got {_describe(rnode)}")
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
    if len(rules) > MAX_RULES:
        issues.append(PolicyIssue(sources[-1][0], 1, "rules", f"more than {MAX_RULES} rules"))

    if check_unreachable and not issues:
        for dead, by in find_unreachable(rules):
            verb = "denied" if by.effect == "deny" else "allowed"
            issues.append(PolicyIssue(
                dead.file, dead.line, f"rules[{dead.index_in_file}]",
                f"unreachable: rule {dead.id!r} never decides, every request it matches is already "
                f"{verb} by rule {by.id!r} ({by.location})"))
    if issues:
        raise PolicyInvalid(tuple(issues))
    return PolicySet(revision=digest.hexdigest(), files=[n for n, _ in sources], plans=plans,
                     rules=rules, warnings=warnings)


def _read_dir(directory: str | os.PathLike[str]) -> tuple[list[tuple[str, bytes]], list[PolicyIssue]]:
    d = str(directory)
    try:
        load, ignored = policy_files(directory)
    except OSError as exc:
        raise PolicyInvalid(
            (PolicyIssue(d, 0, "(dir)", f"cannot list the policy directory: {exc.strerror}"),)
        ) from exc
    warnings = [PolicyIssue(str(p), 0, "(file)", "ignored: only *.yaml files are loaded") for p in ignored]
    if not load:
        raise PolicyInvalid(
            (PolicyIssue(d, 0, "(dir)", "no *.yaml policy files: nothing could ever be allowed"),)
        )
    sources: list[tuple[str, bytes]] = []
    problems: list[PolicyIssue] = []
    for p in load:
        try:
            size = p.stat().st_size
            if size > MAX_POLICY_FILE_BYTES:
                problems.append(
                    PolicyIssue(str(p), 1, "(file)", f"larger than {MAX_POLICY_FILE_BYTES} bytes")
                )
                continue
            sources.append((str(p), p.read_bytes()))
        except OSError as exc:
            problems.append(PolicyIssue(str(p), 0, "(file)", f"cannot read: {exc.strerror}"))
    if problems:
        raise PolicyInvalid(tuple(problems))
    return sources, warnings


def load_policy_dir(directory: str | os.PathLike[str]) -> PolicySet:
    """Load, validate and compile a policy directory; raises PolicyInvalid with every issue."""
    sources, warnings = _read_dir(directory)
    return compile_policy(sources, warnings=warnings)


def check_policy_dir(
    directory: str | os.PathLike[str],
) -> tuple[PolicySet | None, list[PolicyIssue], list[PolicyIssue]]:
    """(policy set or None, errors, warnings) without raising."""
    try:
        sources, warnings = _read_dir(directory)
    except PolicyInvalid as exc:
        return None, list(exc.issues), []  # type: ignore[arg-type]
    try:
        ps = compile_policy(sources, warnings=warnings)
    except PolicyInvalid as exc:
        return None, list(exc.issues), warnings  # type: ignore[arg-type]
    return ps, [], list(ps.warnings)  # type: ignore[arg-type]
