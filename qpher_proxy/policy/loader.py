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

The YAML is read by ``_reader.py``, the plans and rules by ``_sections.py``; this module
chains the files, checks what spans them (unreachable rules) and hashes the revision.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import yaml

from ..errors import PolicyInvalid
from ._reader import FileReader, PolicyIssue, compose, describe
from ._rules import PolicySet, Rule, covers
from ._sections import Parsed, read_plans, read_rules

__all__ = ["PolicyIssue", "load_policy_dir", "compile_policy", "find_unreachable", "check_policy_dir",
           "policy_files", "MAX_POLICY_FILE_BYTES"]

MAX_POLICY_FILE_BYTES = 4 * 1024 * 1024  # a policy is text written by people; 4 MiB is plenty
MAX_RULES = 100_000


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


def compile_policy(sources: Sequence[tuple[str, bytes]], *, check_unreachable: bool = True,
                   warnings: Sequence[PolicyIssue] = ()) -> PolicySet:
    """Compile named file contents (in chain order) into a PolicySet; raises PolicyInvalid
    with every issue. ``check_unreachable=False`` is for tests that chain random rules."""
    issues: list[PolicyIssue] = []
    parsed: Parsed = []
    for name, data in sources:
        f = FileReader(name, issues)
        top = _top_level(f, data)
        if top is not None:
            parsed.append((f, top))
    plans, pending = read_plans(parsed)
    rules = read_rules(parsed, plans, pending)
    if len(rules) > MAX_RULES:
        issues.append(PolicyIssue(sources[-1][0], 1, "rules", f"more than {MAX_RULES} rules"))
    if check_unreachable and not issues:
        issues.extend(_unreachable_issues(rules))
    if issues:
        raise PolicyInvalid(tuple(issues))
    return PolicySet(revision=_revision(sources), files=[n for n, _ in sources], plans=plans,
                     rules=rules, warnings=warnings)


def _revision(sources: Sequence[tuple[str, bytes]]) -> str:
    digest = hashlib.sha256()
    for name, data in sources:
        # The revision hashes each file's name inside the (flat) policy directory, never the
        # path it was read by: `policies/`, `./policies` and `/etc/qpher/policies` holding the
        # same files are the same policy. The name stays in because it orders the chain.
        base = os.path.basename(name).encode()
        digest.update(b"%d:%s\0%d:" % (len(base), base, len(data)))
        digest.update(data)
    return digest.hexdigest()


def _top_level(f: FileReader, data: bytes) -> dict[str, tuple[yaml.Node, yaml.Node]] | None:
    """One file's top-level mapping, its version and description checked; ``None`` if the
    file could not be read as a policy file at all."""
    name, issues = f.name, f.issues
    if len(data) > MAX_POLICY_FILE_BYTES:
        issues.append(PolicyIssue(name, 1, "(file)", f"larger than {MAX_POLICY_FILE_BYTES} bytes"))
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        issues.append(PolicyIssue(name, line, "(file)", "not valid UTF-8"))
        return None
    root = compose(f, text)
    if root is None:
        if not issues or issues[-1].file != name:
            issues.append(PolicyIssue(name, 1, "version", "empty file; expected at least 'version: 1'"))
        return None
    top = f.mapping(root, "", ("version", "description", "plans", "rules"), ("version",))
    if top is None:
        return None
    if "version" in top:
        vnode = top["version"][1]
        if not (isinstance(vnode, yaml.ScalarNode) and vnode.tag.endswith(":int") and vnode.value == "1"):
            f.err(vnode, "version", f"expected 1, got {describe(vnode)}")
    if "description" in top:
        f.string(top["description"][1], "description", max_len=4000, multiline=True)
    return top


def _unreachable_issues(rules: Sequence[Rule]) -> list[PolicyIssue]:
    issues = []
    for dead, by in find_unreachable(rules):
        verb = "denied" if by.effect == "deny" else "allowed"
        issues.append(PolicyIssue(
            dead.file, dead.line, f"rules[{dead.index_in_file}]",
            f"unreachable: rule {dead.id!r} never decides, every request it matches is already "
            f"{verb} by rule {by.id!r} ({by.location})"))
    return issues


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
