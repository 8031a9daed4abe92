"""Policy: YAML rule files compiled once into a first-deny-wins chain, evaluated per request.

Pure layers (``model``, ``loader``, ``evaluate``, ``cli``) have no trio import; ``engine`` is
the trio adapter that holds the current policy set, reloads it, fails closed and runs the
emergency fail-open window.
"""

from ..errors import PolicyDenied, PolicyInvalid, PolicyUnavailable
from ._rules import PolicySet, Rule
from .evaluate import evaluate, explain
from .loader import PolicyIssue, check_policy_dir, compile_policy, find_unreachable, load_policy_dir
from .model import (
    METHODS,
    MODES,
    OPERATION_QUOTA_CLASS,
    OPERATIONS,
    QUOTA_CLASSES,
    Decision,
    Explanation,
    Plan,
    RateLimit,
    RequestFacts,
    RuleOutcome,
    quota_class,
)

_ENGINE_NAMES = ("PolicyEngine", "FailOpenState", "ReloadResult")


def __getattr__(name: str) -> object:
    # The engine (a trio adapter) is imported on first use, so that the pure layers can be
    # imported, and import-checked, without trio.
    if name in _ENGINE_NAMES:
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "PolicyEngine", "FailOpenState", "ReloadResult",
    "PolicyDenied", "PolicyInvalid", "PolicyUnavailable", "PolicySet", "Rule", "evaluate", "explain",
    "PolicyIssue", "check_policy_dir", "compile_policy", "find_unreachable", "load_policy_dir",
    "METHODS", "MODES", "OPERATION_QUOTA_CLASS", "OPERATIONS", "QUOTA_CLASSES", "Decision",
    "Explanation", "Plan", "RateLimit", "RequestFacts", "RuleOutcome", "quota_class",
]
