"""Offline verification of an audit log against signed checkpoints (``audit verify --checkpoint``).

Theory of operation
-------------------
A checkpoint (``note.py``) signed by the KMS's audit keys attests the root of the Merkle tree
of the log's first ``size`` lines (``tree.py``: leaf *i* = line *i*, across the rotated files).
Given the files (in rotation order), the trusted verifier keys and one or more checkpoints:

1. every checkpoint's note must verify with *every* verifier key given (``--vkey`` for the
   ML-DSA-65 key and the Ed25519 key: both lines must hold), and all must name one origin;
2. the tree of all the lines is rebuilt from the files and its root at each checkpoint's size
   must equal the signed root — so every record up to that size is present, in place and
   unchanged; lines after the largest checkpoint are reported as not yet attested (a note);
3. between two checkpoints, the consistency proof computed from the rebuilt tree must verify
   (RFC 9162 §2.1.4.2) — it does whenever 2 holds for both, and it is what a monitor holding
   only two notes checks;
4. when a root does not match, the first bad record is named: a record the hash chain
   (``verify.py``) reports as altered, removed, inserted or reordered, at its leaf index; else,
   when the files hold fewer lines than the checkpoint attests, index ``lines`` (records cut
   from the end); else (a history rewritten with a consistent chain: a fork) the signed
   ``audit.checkpoint`` records found in the log itself and the checkpoints given bound it: the
   fork lies between the largest signed size whose root still matches and the smallest that
   does not, and the report names that range (its first index). It is exact when two signed
   sizes are one apart; otherwise within one checkpoint interval — a rewrite with a consistent
   chain leaves no other trace in the files to point at.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from .log import CHECKPOINT_EVENT
from .merkle import MemoryTree, consistency_proof, leaf_hash, verify_consistency
from .note import Checkpoint, NoteError, Verifier, open_note, parse_checkpoint
from .records import parse_record
from .verify import verify

__all__ = ["TreeProblem", "TreeReport", "verify_checkpoints"]


@dataclass(frozen=True, slots=True)
class TreeProblem:
    index: int | None  # leaf index (0-based line number across the files), None: the note itself
    where: str  # "file:line" or ""
    detail: str

    def __str__(self) -> str:
        at = f"record at index {self.index}" if self.index is not None else "checkpoint"
        loc = f" ({self.where})" if self.where else ""
        return f"{at}{loc}: {self.detail}"


@dataclass(slots=True)
class TreeReport:
    checkpoints: list[Checkpoint] = field(default_factory=list)
    problems: list[TreeProblem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    lines: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(slots=True)
class _Log:
    tree: MemoryTree
    where: list[tuple[str, int]]  # leaf index -> (file, line number)
    index_of: dict[tuple[str, int], int]
    signed: list[tuple[int, int, bytes]]  # (leaf index, size, root) of verified checkpoint records


def _read_log(files: Sequence[str], verifiers: Sequence[Verifier]) -> _Log:
    tree = MemoryTree()
    where: list[tuple[str, int]] = []
    signed: list[tuple[int, int, bytes]] = []
    for name in files:
        with open(name, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                if not raw.endswith(b"\n"):
                    break  # not a line yet (see tree.py)
                line = raw[:-1]
                if b'"audit.checkpoint"' in line:
                    rec = parse_record(line)
                    if rec is not None and rec.event == CHECKPOINT_EVENT:
                        cp = _checked(rec.fields.get("note"), verifiers)
                        if cp is not None:
                            signed.append((tree.size, cp.size, cp.root))
                tree.append(leaf_hash(line))
                where.append((name, lineno))
    return _Log(tree, where, {w: i for i, w in enumerate(where)}, signed)


def _checked(note: object, verifiers: Sequence[Verifier]) -> Checkpoint | None:
    if not isinstance(note, str):
        return None
    try:
        return parse_checkpoint(open_note(note, verifiers, require_all=True).text)
    except NoteError:
        return None


def verify_checkpoints(
    files: Sequence[str | os.PathLike[str]], notes: Sequence[str], verifiers: Sequence[Verifier]
) -> TreeReport:
    """Check ``files`` (rotation order) against the checkpoint ``notes`` (see the module docstring)."""
    names = [os.fspath(f) for f in files]
    report = TreeReport()
    for text in notes:
        try:
            cp = parse_checkpoint(open_note(text, verifiers, require_all=True).text)
        except NoteError as exc:
            report.problems.append(TreeProblem(None, "", f"does not verify with the keys given ({exc})"))
            return report
        report.checkpoints.append(cp)
    if len({cp.origin for cp in report.checkpoints}) > 1:
        report.problems.append(TreeProblem(None, "", "the checkpoints name different origins"))
        return report
    log = _read_log(names, verifiers)
    report.lines = log.tree.size
    cps = sorted(report.checkpoints, key=lambda c: c.size)
    for cp in cps:
        if cp.size <= log.tree.size and log.tree.root(cp.size) == cp.root:
            continue
        report.problems.append(_first_bad(names, log, cp, cps))
        return report
    for a, b in zip(cps, cps[1:], strict=False):
        if a.size > 0:
            verify_consistency(a.size, b.size, consistency_proof(log.tree, a.size, b.size), a.root, b.root)
    if cps and log.tree.size > cps[-1].size:
        report.notes.append(
            f"{log.tree.size - cps[-1].size} line(s) from index {cps[-1].size} on are not yet attested "
            "by a checkpoint"
        )
    return report


def _first_bad(
    files: Sequence[str], log: _Log, cp: Checkpoint, given: Sequence[Checkpoint]
) -> TreeProblem:
    def at(index: int, detail: str) -> TreeProblem:
        where = log.where[index] if index < len(log.where) else None
        return TreeProblem(index, f"{where[0]}:{where[1]}" if where else "", detail)

    chain = verify(files)
    bad = sorted(
        (log.index_of[(f.file, f.line)], f)
        for f in chain.findings
        if (f.file, f.line) in log.index_of and log.index_of[(f.file, f.line)] < cp.size
    )
    if bad:
        index, finding = bad[0]
        return at(index, f"{finding.kind}: {finding.detail} (the checkpoint of size {cp.size} does not "
                         "match)")
    good, worst = 0, cp.size
    for size, root in [(c.size, c.root) for c in given] + [(z, r) for _, z, r in log.signed]:
        if size > log.tree.size or size == 0:
            continue
        if log.tree.root(size) == root:
            good = max(good, size)
        else:
            worst = min(worst, size)
    if log.tree.size < cp.size and good <= log.tree.size and worst >= log.tree.size:
        return at(
            log.tree.size,
            f"missing: the files hold {log.tree.size} lines, the checkpoint attests {cp.size}",
        )
    good = min(good, worst - 1)
    if worst - good == 1:
        return at(good, f"altered: the log forks from the signed history here (checkpoint size {cp.size})")
    return at(
        good,
        f"the log forks from the signed history at an index in [{good}, {worst}): the signed checkpoints "
        f"match up to size {good} and not at size {worst} (checkpoint size {cp.size})",
    )
