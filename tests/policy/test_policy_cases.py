"""Policy semantics as data: every YAML file in cases/ (policy, requests, expected decision and
deciding rule) is run by one parametrized test; loader errors likewise by another."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import yaml
from _policy_helpers import CASES_DIR, REPO, facts, write_files

from qpher_proxy.policy import PolicyInvalid, PolicySet, evaluate, explain, load_policy_dir

_DOC_KEYS = {"description", "policy", "policy_files", "policy_dir", "defaults", "cases"}
_CASE_KEYS = {"name", "request", "want_decision", "want_rule", "want_source"}
_ERROR_CASE_KEYS = {"name", "files", "want"}


@functools.cache
def _docs() -> list[tuple[str, dict[str, Any]]]:
    return [(p.name, yaml.safe_load(p.read_text(encoding="utf-8"))) for p in sorted(CASES_DIR.glob("*.yaml"))]


def _decision_params() -> list[Any]:
    out = []
    for name, doc in _docs():
        if "cases" not in doc:
            continue
        assert set(doc) <= _DOC_KEYS, (name, set(doc) - _DOC_KEYS)
        for case in doc["cases"]:
            assert set(case) <= _CASE_KEYS and {"name", "want_decision", "want_rule"} <= set(case), (
                name,
                case,
            )
            out.append(pytest.param(name, case, id=f"{Path(name).stem}::{case['name']}"))
    return out


def _error_params() -> list[Any]:
    out = []
    for name, doc in _docs():
        for case in doc.get("error_cases", ()):
            assert set(case) == _ERROR_CASE_KEYS, (name, case)
            out.append(pytest.param(case, id=f"{Path(name).stem}::{case['name']}"))
    return out


_POLICY_CACHE: dict[str, PolicySet] = {}


def _policy_for(doc_name: str, tmp_path_factory: pytest.TempPathFactory) -> PolicySet:
    if doc_name not in _POLICY_CACHE:
        doc = dict(_docs())[doc_name]
        if "policy_dir" in doc:
            ps = load_policy_dir(REPO / doc["policy_dir"])
        else:
            files = doc.get("policy_files") or {"50-case.yaml": doc["policy"]}
            ps = load_policy_dir(write_files(tmp_path_factory.mktemp("policy"), files))
        _POLICY_CACHE[doc_name] = ps
    return _POLICY_CACHE[doc_name]


@pytest.mark.parametrize(("doc_name", "case"), _decision_params())
def test_policy_case(doc_name: str, case: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> None:
    ps = _policy_for(doc_name, tmp_path_factory)
    doc = dict(_docs())[doc_name]
    request = {**doc.get("defaults", {}), **case.get("request", {})}
    f = facts(**request)
    decision = evaluate(ps, f)
    assert (decision.effect, decision.rule_id) == (case["want_decision"], case["want_rule"])
    want_source = case.get("want_source", "rule" if case["want_rule"] is not None else "default")
    assert decision.source == want_source
    assert decision.revision == ps.revision
    # explain walks every rule with no index: it must reach the same decision
    exp = explain(ps, f)
    assert exp.decision == decision
    assert [o.rule_id for o in exp.outcomes if o.deciding] == (
        [] if decision.rule_id is None else [decision.rule_id]
    )


def test_every_case_file_is_used() -> None:
    docs = _docs()
    assert docs, "no case files"
    for name, doc in docs:
        assert doc.get("cases") or doc.get("error_cases"), name
    assert len(_decision_params()) >= 100


@pytest.mark.parametrize("case", _error_params())
def test_loader_error_case(case: dict[str, Any], tmp_path: Path) -> None:
    directory = write_files(tmp_path / "p", case["files"])
    with pytest.raises(PolicyInvalid) as info:
        load_policy_dir(directory)
    got = [(Path(i.file).name, i.line, i.key, i.message) for i in info.value.issues]  # type: ignore[attr-defined]
    want = case["want"]
    unmatched = list(got)
    for w in want:
        hit = next((g for g in unmatched if (g[0], g[1], g[2]) == (w["file"], w["line"], w["key"])
                    and w["contains"] in g[3]), None)
        assert hit is not None, f"missing {w!r} in {got!r}"
        unmatched.remove(hit)
    assert not unmatched, f"unexpected issues: {unmatched!r}"
    # the exception message starts with the first issue, formatted file:line: key: message
    first = info.value.issues[0]  # type: ignore[attr-defined]
    assert info.value.message.startswith(f"{first.file}:{first.line}: {first.key}: ")
