"""Evaluate a compiled policy set against the facts of one request.

Theory of operation
-------------------
The semantics are these, and nothing else:

1. Rules are considered in chain order (files in name order, rules in file order).
2. A rule *matches* when every matcher of its ``match`` holds (``{}``: always) and, if it has
   an ``unless``, not every matcher of the ``unless`` holds.
3. The first matching **deny** decides, and evaluation stops, even if allows matched earlier.
4. With no matching deny, the request is allowed if some allow matched; the deciding rule is
   the *first* allow that matched (its id and reason go in the audit log).
5. Otherwise the default decides: deny, with no rule id and the reason
   ``"no rule allowed this request"``.

So an allow is never final when it matches: every later rule that could deny must still be
looked at. This is what makes a deny anywhere in the chain a guarantee.

The fast path must give exactly these answers with less work. It uses two facts:

* A rule that cannot match does not change the outcome (steps 3-5 only look at matching rules).
  ``PolicySet.candidates`` computes, with a few dictionary lookups and AND-ed bit masks, the
  set of rules whose ``tenant``, ``plan``, ``scope``, ``operation``, ``method``, ``algorithm``
  and ``mode`` matchers accept the request (rules without such a matcher are in every set). Only
  those rules are visited, in chain order (lowest bit first), and their remaining matchers are
  checked. A rule outside the set fails one of those matchers, so skipping it skips a
  non-match, nothing else.
* Once an allow has matched, only a later deny can change the outcome, so the remaining
  candidates are masked down to deny rules.

``explain`` deliberately does none of this: it walks every rule, checks every matcher and
reports all that failed, for an admin reading the outcome. Tests check that both agree with
each other and with an independent reference evaluator.

Evaluation is pure and synchronous; it touches no clock, no file and no lock. Time budgets,
fail-closed handling and auditing are the engine's business (``engine.py``).
"""

from __future__ import annotations

from ._rules import PolicySet
from .model import Decision, Explanation, RequestFacts, RuleOutcome

__all__ = ["evaluate", "explain"]


def evaluate(policy_set: PolicySet, facts: RequestFacts) -> Decision:
    """The decision for ``facts`` under ``policy_set`` (see the module docstring)."""
    mask = policy_set.candidates(facts)
    rules = policy_set.compiled
    allow: Decision | None = None
    while mask:
        low = mask & -mask
        mask ^= low
        r = rules[low.bit_length() - 1]
        for check in r.residual:
            if not check(facts):
                break
        else:
            if r.unless_fns:
                for check in r.unless_fns:
                    if not check(facts):
                        break
                else:
                    continue  # the exception applies: the rule does not match
            if r.deny:
                return r.decision
            if allow is None:
                allow = r.decision
                mask &= policy_set.deny_mask
    return allow if allow is not None else policy_set.default_decision


def explain(policy_set: PolicySet, facts: RequestFacts) -> Explanation:
    """Every rule's outcome (matched or not, and every matcher that failed) and the decision."""
    matched_flags: list[tuple[bool, tuple[str, ...]]] = []
    first_deny = first_allow = None
    for i, r in enumerate(policy_set.compiled):
        failed = tuple(name for name, check in r.checks if not check(facts))
        matched = not failed
        if matched and r.unless:
            held = tuple(name for name, check in r.unless if check(facts))
            if len(held) == len(r.unless):
                matched, failed = False, held
        matched_flags.append((matched, failed))
        if matched:
            if r.deny and first_deny is None:
                first_deny = i
            elif not r.deny and first_allow is None:
                first_allow = i
    deciding = first_deny if first_deny is not None else first_allow
    outcomes = tuple(
        RuleOutcome(i, r.rule.id, r.rule.effect, r.rule.file, r.rule.line, m, failed, i == deciding)
        for i, (r, (m, failed)) in enumerate(zip(policy_set.compiled, matched_flags, strict=True))
    )
    decision = policy_set.compiled[deciding].decision if deciding is not None else policy_set.default_decision
    return Explanation(outcomes, decision)
