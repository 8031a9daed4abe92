"""Admin tooling behind ``qpher-proxy policy check DIR`` and ``qpher-proxy policy explain``.

Pure functions returning text; the command-line wiring (argument parsing, resolving an API key
id to its tenant, plan and scopes, exit codes) lives in ``qpher_proxy.cli``/``admin``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from ._rules import DAY_NAMES, PolicySet, TimeWindow, UsageOver
from .evaluate import explain
from .loader import check_policy_dir
from .model import RequestFacts

__all__ = ["check", "explain_text", "describe_matcher"]


def check(directory: str | os.PathLike[str]) -> tuple[bool, list[str]]:
    """Validate a policy directory without starting anything: (ok, lines to print). Errors
    come as ``file:line: key: message``; warnings are prefixed ``warning:``."""
    ps, errors, warnings = check_policy_dir(directory)
    lines = [str(e) for e in errors] + [f"warning: {w}" for w in warnings]
    if ps is None:
        lines.append(f"{directory}: {len(errors)} error(s); policy rejected")
        return False, lines
    lines.append(
        f"{directory}: ok: {len(ps.files)} file(s), {len(ps.plans)} plan(s), {len(ps.rules)} rule(s), "
        f"revision {ps.short_revision}")
    return True, lines


def _minutes(m: int) -> str:
    return f"{m // 60:02d}:{m % 60:02d}"


def describe_matcher(name: str, value: object) -> str:
    """A matcher's expected value in policy-file terms (for explanations)."""
    if isinstance(value, TimeWindow):
        parts = []
        if value.days is not None:
            parts.append("days " + ",".join(DAY_NAMES[d] for d in sorted(value.days)))
        if value.start is not None and value.end is not None:
            parts.append(f"{_minutes(value.start)}-{_minutes(value.end)}")
        return " ".join(parts) + f" {value.tz}"
    if isinstance(value, UsageOver):
        classes = ",".join(sorted(value.classes))
        if value.percent is not None:
            return f"usage of {classes} >= {value.percent:g}% of quota"
        return f"usage of {classes} >= {value.at_least}"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (frozenset, tuple, list)):
        items = sorted(str(v) for v in value)
        if len(items) > 6:
            items = items[:6] + [f"... ({len(value)} in all)"]
        return "[" + ", ".join(items) + "]"
    return str(value)


def _fact(policy_set: PolicySet, facts: RequestFacts, name: str) -> str:
    attr = {"scope": "scopes", "source_cidr": "source_ip"}.get(name, name)
    if name in ("time",):
        return facts.now.isoformat()
    if name == "usage_over":
        return ", ".join(f"{k}={v}" for k, v in sorted(facts.usage.items())) or "no usage"
    if name == "plan_allows":
        plan = policy_set.plans.get(facts.plan)
        within = (plan is not None and facts.operation in plan.operations
                  and (facts.algorithm is None or facts.algorithm in plan.algorithms))
        what = f"operation {facts.operation!r}" + (f" with {facts.algorithm!r}" if facts.algorithm else "")
        if plan is None:
            return f"plan {facts.plan!r} (not declared), so plan_allows is false"
        return f"plan {facts.plan!r} {'allows' if within else 'does not allow'} {what}"
    value = getattr(facts, attr)
    if isinstance(value, frozenset):
        return "[" + ", ".join(sorted(value)) + "]"
    return repr(value)


def explain_text(policy_set: PolicySet, facts: RequestFacts) -> str:
    """Every rule's outcome and the final decision, as an admin reads it."""
    exp = explain(policy_set, facts)
    out = [
        f"policy revision {policy_set.short_revision} ({len(policy_set.files)} file(s), "
        f"{len(policy_set.rules)} rule(s))",
        f"request: {facts.method} {facts.path} operation={facts.operation} tenant={facts.tenant} "
        f"plan={facts.plan} key={facts.api_key_id} scopes=[{', '.join(sorted(facts.scopes))}] "
        f"algorithm={facts.algorithm} mode={facts.mode} source={facts.source_ip or '-'} "
        f"tls_group={facts.tls_group} tls_pq={str(facts.tls_pq).lower()} now={facts.now.isoformat()}",
        "",
    ]
    width = max((len(o.rule_id) for o in exp.outcomes), default=4)
    for o, rule in zip(exp.outcomes, policy_set.rules, strict=True):
        where = f"{os.path.basename(o.file)}:{o.line}"
        if o.matched:
            status = "MATCH  <- decides" if o.deciding else "MATCH"
            out.append(f"  {o.index + 1:>4}. {o.rule_id:<{width}}  {o.effect:<5}  {status:<18} {where}")
            continue
        out.append(f"  {o.index + 1:>4}. {o.rule_id:<{width}}  {o.effect:<5}  {'no match':<18} {where}")
        for failed in o.failed:
            part, name = failed.split(".", 1)
            values: Mapping[str, object] = rule.match if part == "match" else (rule.unless or {})
            expected = describe_matcher(name, values[name])
            fact = ("" if name == "plan_allows" else "request has ") + _fact(policy_set, facts, name)
            if part == "match":
                out.append(f"          {failed}: {fact}; rule wants {expected}")
            else:
                out.append(f"          {failed}: {fact}, which the rule excepts ({expected})")
    if not exp.outcomes:
        out.append("  (no rules)")
    d = exp.decision
    out.append("")
    if d.rule_id is not None:
        out.append(f"decision: {d.effect.upper()} by rule {d.rule_id}: {d.reason}")
    else:
        out.append(f"decision: {d.effect.upper()} by default: {d.reason}")
    return "\n".join(out) + "\n"
