"""Loading a directory: file selection and order, revision hash, file-level errors, the CLI's
check/explain text, and the operation vocabulary kept in step with the route table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from _policy_helpers import REPO, facts, write_files

from qpher_proxy.api.routes import ROUTES
from qpher_proxy.errors import PolicyDenied
from qpher_proxy.policy import (
    OPERATION_QUOTA_CLASS,
    OPERATIONS,
    PolicyInvalid,
    compile_policy,
    evaluate,
    load_policy_dir,
    quota_class,
)
from qpher_proxy.policy.cli import check, explain_text
from qpher_proxy.policy.loader import MAX_POLICY_FILE_BYTES

ALLOW_ALL = "version: 1\nrules:\n  - id: {id}\n    effect: allow\n    match: {{}}\n    reason: r\n"


def test_files_load_in_name_order_and_only_yaml(tmp_path: Path) -> None:
    write_files(
        tmp_path,
        {
            "20-b.yaml": ALLOW_ALL.format(id="b"),
            "10-a.yaml": (
                "version: 1\nrules:\n  - id: a\n    effect: allow\n    match: {tenant: x}\n    reason: r\n"
            ),
            ".#10-a.yaml": "garbage: [",  # editor lock file: skipped
            "30-c.yml": "garbage: [",  # wrong extension: ignored with a warning
            "notes.txt": "garbage",
        },
    )
    ps = load_policy_dir(tmp_path)
    assert [r.id for r in ps.rules] == ["a", "b"]
    assert [Path(f).name for f in ps.files] == ["10-a.yaml", "20-b.yaml"]
    assert (
        len(ps.warnings) == 1 and "30-c.yml" in str(ps.warnings[0]) and "only *.yaml" in str(ps.warnings[0])
    )


def test_revision_changes_with_content_and_names(tmp_path: Path) -> None:
    a = load_policy_dir(write_files(tmp_path / "a", {"10.yaml": ALLOW_ALL.format(id="x")}))
    same = load_policy_dir(write_files(tmp_path / "b", {"10.yaml": ALLOW_ALL.format(id="x")}))
    edited = load_policy_dir(write_files(tmp_path / "c", {"10.yaml": ALLOW_ALL.format(id="y")}))
    renamed = load_policy_dir(write_files(tmp_path / "d", {"20.yaml": ALLOW_ALL.format(id="x")}))
    assert len(a.revision) == 64 and a.short_revision == a.revision[:12]
    assert a.revision != edited.revision
    assert a.revision != renamed.revision
    # the revision covers names and contents, not the directory the files sit in
    assert a.revision == same.revision


def test_revision_does_not_depend_on_how_the_directory_is_spelled(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_files(
        tmp_path / "state" / "policies", {"10.yaml": ALLOW_ALL.format(id="x"), "20.yaml": "version: 1\n"}
    )
    (tmp_path / "link").symlink_to(tmp_path / "state")
    monkeypatch.chdir(tmp_path / "state")
    spellings = [
        "policies",
        "policies/",
        "./policies",
        "../state/policies",
        str(tmp_path / "state" / "policies"),
        str(tmp_path / "link" / "policies"),
        "policies/../policies",
    ]
    revisions = {load_policy_dir(s).revision for s in spellings}
    assert len(revisions) == 1
    assert {check(s)[1][-1].rsplit(" ", 1)[1] for s in spellings} == {revisions.pop()[:12]}


def test_the_revision_is_the_hash_of_file_names_and_contents_only() -> None:
    # what an admin can recompute from the files alone, without the proxy
    import hashlib
    files = [("10-a.yaml", ALLOW_ALL.format(id="x").encode()), ("20-b.yaml", b"version: 1\n")]
    digest = hashlib.sha256()
    for name, data in files:
        digest.update(b"%d:%s\0%d:" % (len(name), name.encode(), len(data)) + data)
    assert compile_policy([(f"/somewhere/{n}", d) for n, d in files]).revision == digest.hexdigest()
    assert compile_policy([(f"elsewhere/{n}", d) for n, d in files]).revision == digest.hexdigest()


@pytest.mark.parametrize(("setup", "expect"), [
    ("missing", "cannot list the policy directory"),
    ("empty", "no *.yaml policy files"),
])
def test_directory_problems(tmp_path: Path, setup: str, expect: str) -> None:
    d = tmp_path / "p"
    if setup == "empty":
        d.mkdir()
    with pytest.raises(PolicyInvalid) as info:
        load_policy_dir(d)
    assert expect in info.value.message
    assert info.value.code == "policy_invalid"


def test_non_utf8_file_names_the_line(tmp_path: Path) -> None:
    tmp_path.joinpath("10.yaml").write_bytes(b"version: 1\n# caf\xe9\n")
    with pytest.raises(PolicyInvalid) as info:
        load_policy_dir(tmp_path)
    assert info.value.message == f"{tmp_path / '10.yaml'}:2: (file): not valid UTF-8"


def test_oversized_file_refused(tmp_path: Path) -> None:
    tmp_path.joinpath("10.yaml").write_bytes(b"version: 1\n" + b"#" * MAX_POLICY_FILE_BYTES)
    with pytest.raises(PolicyInvalid) as info:
        load_policy_dir(tmp_path)
    assert "larger than" in info.value.message


def test_anchors_and_aliases_are_fine(tmp_path: Path) -> None:
    write_files(
        tmp_path,
        {
            "10.yaml": (
                "version: 1\n"
                "plans:\n"
                "  a: {rate_limit: &rl {requests_per_second: 1, burst: 2}, "
                "algorithms: &algs [ml-dsa-65], operations: [sign]}\n"
                "  b: {rate_limit: *rl, algorithms: *algs, operations: [verify]}\n"
            )
        },
    )
    ps = load_policy_dir(tmp_path)
    assert ps.plans["b"].rate_limit == ps.plans["a"].rate_limit
    assert ps.plans["b"].algorithms == frozenset({"ml-dsa-65"})


def test_every_error_is_reported_not_just_the_first(tmp_path: Path) -> None:
    write_files(tmp_path, {
        "10.yaml": "version: 1\nrules:\n  - id: a\n    effect: nope\n    match: {}\n    reason: r\n",
        "20.yaml": "version: 3\n",
    })
    with pytest.raises(PolicyInvalid) as info:
        load_policy_dir(tmp_path)
    assert len(info.value.issues) == 2
    assert info.value.message.endswith("(and 1 more)")


def test_check_reports_ok_and_errors(tmp_path: Path) -> None:
    ok, lines = check(REPO / "policies")
    assert ok, lines
    assert lines[-1].startswith(f"{REPO / 'policies'}: ok: 4 file(s), 3 plan(s)")
    bad = write_files(tmp_path / "bad", {"10.yaml": "version: 1\nrules:\n  - id: a\n    effect: allow\n"
                                                    "    match: {path: nope}\n    reason: r\n"})
    ok, lines = check(bad)
    assert not ok
    assert lines == [
        f"{bad / '10.yaml'}:5: rules[0].match.path: bad pattern 'nope': a path pattern starts with '/'",
        f"{bad}: 1 error(s); policy rejected",
    ]
    ok, lines = check(tmp_path / "missing")
    assert not ok and "cannot list the policy directory" in lines[0]


def test_explain_text_lists_every_rule_and_the_decision() -> None:
    ps = load_policy_dir(REPO / "policies")
    f = facts(plan="free", algorithm="x-wing", operation="kem.encapsulate", path="/v1/kem/encapsulate")
    text = explain_text(ps, f)
    assert text.startswith(f"policy revision {ps.revision[:12]} (4 file(s), ")
    for rule in ps.rules:
        assert rule.id in text
    assert re.search(r"\n +4\. hybrid-needs-paid-plan +deny +MATCH  <- decides +20-plans\.yaml:\d+\n", text)
    assert re.search(r"\n +5\. import-needs-paid-plan +deny +no match +20-plans\.yaml:\d+\n", text)
    assert re.search(r"\n +6\. outside-plan +deny +MATCH +20-plans\.yaml:\d+\n", text)
    assert "match.path: request has '/v1/kem/encapsulate'; rule wants [/admin/**]" in text
    assert "match.plan_allows: plan 'free' does not allow operation 'kem.encapsulate' with 'x-wing'" in text
    assert text.rstrip().endswith(
        "decision: DENY by rule hybrid-needs-paid-plan: hybrid algorithms (x-wing, ml-dsa-65-ecdsa-p256) "
        "need the pro or enterprise plan")
    text = explain_text(ps, facts(plan="free", operation="admin.fail_open.set", path="/admin/fail-open",
                                  scopes=["admin"], source_ip="10.0.0.1"))
    assert "unless.operation: request has 'admin.fail_open.set', which the rule excepts" in text
    assert text.rstrip().endswith("decision: ALLOW by rule allow-admin: admin key on an admin route")


def test_policy_denied_message_names_rule_and_reason() -> None:
    ps = load_policy_dir(REPO / "policies")
    d = evaluate(ps, facts(plan="free", algorithm="ml-dsa-87"))
    err = PolicyDenied(d.rule_id, d.reason)
    assert (err.code, err.status) == ("policy_denied", 403)
    assert (
        err.message == "denied by rule outside-plan: this operation or algorithm is not included in your plan"
    )
    assert (
        PolicyDenied(None, "no rule allowed this request").message
        == "denied by default: no rule allowed this request"
    )


def test_operation_vocabulary_matches_the_route_table() -> None:
    # every route's operation is a name policies can use, with the same quota class
    for route in ROUTES:
        assert route.operation in OPERATIONS, route.operation
        assert quota_class(route.operation) == route.quota, route.operation
    assert set(OPERATIONS) - {r.operation for r in ROUTES} == {"forward"}
    assert OPERATION_QUOTA_CLASS["forward"] == "forward"
