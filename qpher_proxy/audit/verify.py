"""Verify an audit log's hash chain and say what broke it, and where.

Theory of operation
-------------------
The files are read as one stream of lines, in the order given (``cli.main_verify`` puts them
in rotation order first). Each line is hashed and parsed. The verifier keeps an *anchor*: the
last record it accepted (its ``seq``, its line hash and its own ``prev``). A record continues
the chain when ``seq == anchor.seq + 1`` and ``prev == hash(anchor line)``. Everything else is a
break, classified with a little context — the next line, and a window of ``lookahead`` lines
ahead — into the four kinds of tampering:

* **altered** — a record in its place whose bytes changed. If record N+1 does not link to
  record N but record N+2 links to N+1, record N was changed (its hash is not what N+1 recorded);
  if N+2 does not link to N+1 either, N+1 itself was changed (its ``prev`` or its whole line).
  A line that is not a record at all is "altered" too, unless the chain skips it (then it was
  inserted) or a recovery record accounts for it as a torn write (see ``log.py``: that is a
  *note*, not a finding).
* **removed** — ``seq`` jumps forward and the missing numbers do not appear nearby.
* **reordered** — ``seq`` jumps forward and the record's ``prev`` is the hash of a line a little
  further on (its real predecessor comes later), or a record turns up after records it should
  precede. Records that turn up late are still checked against their neighbours' hashes.
* **inserted** — a line the chain skips: the record after it continues from the record before
  it; or two records claim the same predecessor and number.

After a finding the verifier re-anchors on the record it was looking at and continues, so
independent tamperings are each reported (one ``Finding`` per break; the first is usually the
one that matters). It cannot see records removed from the very end, nor a chain rewritten from
some point on: signed checkpoints of the log's Merkle tree do (``tlog.py``, ``audit verify
--checkpoint``).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from .records import GENESIS, RECOVERY_EVENT, AuditRecord, line_hash, parse_record

__all__ = ["Finding", "VerifyResult", "verify"]

DEFAULT_LOOKAHEAD = 256
_RECENT_HASHES = 4096


@dataclass(frozen=True, slots=True)
class Finding:
    """One break of the chain. ``kind``: altered, removed, reordered, inserted, unreadable (a
    finding) or torn (a note). ``line`` is 1-based (0: the file as a whole)."""

    file: str
    line: int
    seq: int | None
    kind: str
    detail: str

    def __str__(self) -> str:
        seq = "-" if self.seq is None else str(self.seq)
        return f"{self.file}:{self.line}: seq {seq}: {self.kind}: {self.detail}"


@dataclass(frozen=True, slots=True)
class VerifyResult:
    findings: tuple[Finding, ...]
    notes: tuple[Finding, ...]
    records: int
    files: int
    last_seq: int
    head: str  # hash of the last accepted record's line (GENESIS for an empty log)

    @property
    def ok(self) -> bool:
        return not self.findings

    @property
    def first(self) -> Finding | None:
        return self.findings[0] if self.findings else None


@dataclass(frozen=True, slots=True)
class _Line:
    file: str
    lineno: int
    size: int
    digest: str
    rec: AuditRecord | None
    complete: bool  # ended with a newline


def _read(files: Iterable[str], findings: list[Finding]) -> Iterator[_Line]:
    for name in files:
        lineno = 0
        try:
            with open(name, "rb") as fh:
                for raw in fh:
                    lineno += 1
                    complete = raw.endswith(b"\n")
                    body = raw[:-1] if complete else raw
                    yield _Line(name, lineno, len(body), line_hash(body), parse_record(body), complete)
        except OSError as exc:
            findings.append(
                Finding(name, lineno, None, "unreadable", f"cannot be read ({exc.strerror or exc})")
            )


class _Ahead:
    """An iterator with a bounded look-ahead buffer."""

    def __init__(self, it: Iterator[_Line], window: int) -> None:
        self._it = it
        self._buf: deque[_Line] = deque()
        self._window = window
        self._done = False

    def _fill(self, n: int) -> None:
        while len(self._buf) < n and not self._done:
            try:
                self._buf.append(next(self._it))
            except StopIteration:
                self._done = True

    def next(self) -> _Line | None:
        self._fill(1)
        return self._buf.popleft() if self._buf else None

    def peek(self) -> _Line | None:
        self._fill(1)
        return self._buf[0] if self._buf else None

    def window(self) -> list[_Line]:
        self._fill(self._window)
        return list(self._buf)


def verify(
    files: Iterable[str | os.PathLike[str]],
    *,
    from_middle: bool = False,
    lookahead: int = DEFAULT_LOOKAHEAD,
) -> VerifyResult:
    """Check the chain through ``files`` (in this order). ``from_middle``: the first record
    need not be seq 1 (older files were archived); otherwise a chain that does not start at
    ``GENESIS`` is reported as removed records."""
    names = [os.fspath(f) for f in files]
    findings: list[Finding] = []
    src = _Ahead(_read(names, findings), max(1, lookahead))
    chain = _Chain(src, findings, resync=from_middle)
    while (cur := src.next()) is not None:
        chain.check(cur, src.peek())
    return VerifyResult(
        tuple(findings), tuple(chain.notes), chain.records, len(names), chain.last_seq, chain.last_hash
    )


class _Chain:
    """The verifier's state: the anchor (the last accepted record) and what earlier findings
    leave to check. ``check`` takes one line and the line after it; each kind of break has a
    method of its own."""

    def __init__(self, src: _Ahead, findings: list[Finding], *, resync: bool) -> None:
        self._src = src
        self.findings = findings
        self.notes: list[Finding] = []
        self.records = 0
        self.last_seq, self.last_hash, self._last_prev = 0, GENESIS, ""
        self._last_loc: tuple[str, int] | None = None
        self._resync = resync  # accept the next record as the anchor, unchecked
        self._relaxed = False  # the anchor's bytes were reported altered: accept the next link unchecked
        self._late: set[int] = set()  # seqs seen ahead when a reordering was reported
        self._missing: list[tuple[int, int, str]] = []  # (lo, hi, where) reported as removed
        self._hash_of_seq: dict[int, str] = {}  # recent accepted records
        self._claimed_prev_of: dict[int, str] = {}  # seq -> hash its successor says it has

    def _report(self, loc: tuple[str, int], seq: int | None, kind: str, detail: str) -> None:
        self.findings.append(Finding(loc[0], loc[1], seq, kind, detail))

    def _accept(self, line: _Line, seq: int) -> None:
        assert line.rec is not None
        self.last_seq, self.last_hash, self._last_prev = seq, line.digest, line.rec.prev
        self._last_loc = (line.file, line.lineno)
        self._hash_of_seq[seq] = line.digest
        if len(self._hash_of_seq) > _RECENT_HASHES:
            del self._hash_of_seq[next(iter(self._hash_of_seq))]

    def _continues_anchor(self, x: _Line | None) -> bool:
        return (
            x is not None
            and x.rec is not None
            and x.rec.seq == self.last_seq + 1
            and x.rec.prev == self.last_hash
        )

    def _report_skipped(self, loc: tuple[str, int], seq: int) -> None:
        self._report(
            loc,
            seq,
            "inserted",
            "this record does not belong here: the next record continues the chain from "
            f"seq {self.last_seq}",
        )

    def check(self, cur: _Line, nxt: _Line | None) -> None:
        r = cur.rec
        if r is None:
            self._not_a_record(cur, nxt)
            return
        self.records += 1
        if self._resync:
            self._resync = False
            self._accept(cur, r.seq)
            return
        if r.seq == self.last_seq + 1 and (r.prev == self.last_hash or self._relaxed):
            self._relaxed = False
            self._accept(cur, r.seq)
            return
        self._relaxed = False
        # ---- a break in the chain -------------------------------------------------------
        if r.seq > self.last_seq + 1:
            self._seq_jumps(cur, r, nxt)
        elif r.seq == self.last_seq + 1:
            self._wrong_link(cur, r, nxt)
        else:
            self._seq_passed(cur, r, nxt)

    def _not_a_record(self, cur: _Line, nxt: _Line | None) -> None:
        """A line that does not parse: a torn write (a note), an inserted line, or an altered one."""
        loc = (cur.file, cur.lineno)
        if (
            nxt is not None and nxt.rec is not None and nxt.rec.event == RECOVERY_EVENT
            and nxt.rec.fields.get("torn_sha256") == cur.digest and self._continues_anchor(nxt)
        ):
            self.notes.append(
                Finding(
                    *loc,
                    None,
                    "torn",
                    f"partial line of {cur.size} bytes from an "
                    f"interrupted write, accounted for by the recovery record at line {nxt.lineno}",
                )
            )
        elif nxt is None and not cur.complete:
            self.notes.append(Finding(*loc, None, "torn", "incomplete last line (interrupted write); "
                                      "the writer records its recovery when it next starts"))
        elif self._continues_anchor(nxt):
            self._report(
                loc, None, "inserted", "this line is not an audit record and the chain skips over it"
            )
        else:
            self._report(loc, None, "altered", "this line is not a valid audit record")
            self._resync = True

    def _seq_jumps(self, cur: _Line, r: AuditRecord, nxt: _Line | None) -> None:
        """``seq`` jumps forward: a duplicate, a record that came early, an inserted or an
        altered record, or records removed."""
        loc = (cur.file, cur.lineno)
        lo, hi = self.last_seq + 1, r.seq - 1
        ahead = self._src.window()
        ahead_missing = [x for x in ahead if x.rec is not None and lo <= x.rec.seq <= hi]
        if any(x.rec is not None and x.rec.seq == r.seq for x in ahead):
            self._report(
                loc, r.seq, "inserted", f"record seq {r.seq} appears again further on: this one is extra"
            )
            return
        # its predecessor is ahead, or (it was kept but its predecessor changed) its
        # successor is ahead: a genuine record that came early
        if any(x.digest == r.prev for x in ahead_missing) or (
            ahead_missing and any(x.rec is not None and x.rec.prev == cur.digest for x in ahead)
        ):
            self._late.update(x.rec.seq for x in ahead_missing if x.rec is not None)
            self._report(
                loc, r.seq, "reordered", f"record seq {r.seq} comes before seq {lo}, which follows later"
            )
            self._claimed_prev_of[r.seq - 1] = r.prev
            self._accept(cur, r.seq)
        elif self._continues_anchor(nxt):
            self._report_skipped(loc, r.seq)
        elif (
            r.prev == self.last_hash
            and nxt is not None
            and nxt.rec is not None
            and nxt.rec.seq == self.last_seq + 2
        ):
            self._report(
                loc, r.seq, "altered", f"record seq {self.last_seq + 1} was altered: its seq reads {r.seq}"
            )
            self._accept(cur, self.last_seq + 1)
            self._relaxed = True
        else:
            what = f"record seq {lo} is" if lo == hi else f"records seq {lo}..{hi} are"
            self._report(loc, r.seq, "removed", f"{what} missing before this record")
            self._missing.append((lo, hi, f"{cur.file}:{cur.lineno}"))
            self._claimed_prev_of[r.seq - 1] = r.prev
            self._accept(cur, r.seq)

    def _wrong_link(self, cur: _Line, r: AuditRecord, nxt: _Line | None) -> None:
        """The right number, the wrong link: an inserted record, or the anchor or this record altered."""
        loc = (cur.file, cur.lineno)
        if self._continues_anchor(nxt):
            self._report_skipped(loc, r.seq)
            return
        if self._last_loc is not None and (
            nxt is None or (nxt.rec is not None and nxt.rec.prev == cur.digest)
        ):
            self._report(self._last_loc, self.last_seq, "altered",
                         f"record seq {self.last_seq} was altered: its hash is not the prev recorded "
                         f"by seq {r.seq}")
        else:
            self._report(
                loc,
                r.seq,
                "altered",
                f"record seq {r.seq} was altered: it does not link to seq {self.last_seq}",
            )
            self._relaxed = True  # its successor cannot link to its changed bytes: one report is enough
        self._accept(cur, r.seq)

    def _seq_passed(self, cur: _Line, r: AuditRecord, nxt: _Line | None) -> None:
        """A number already passed: a late record of a reordering, a duplicate, a record reported
        missing that turns up, or an inserted one."""
        loc = (cur.file, cur.lineno)
        if r.seq in self._late:
            self._check_late(cur, r)
            return
        if r.seq == self.last_seq and r.prev == self._last_prev and self._last_loc is not None:
            self._report(self._last_loc, self.last_seq, "inserted",
                         f"record seq {self.last_seq} was inserted: the next record has the same seq "
                         "and predecessor")
            self._accept(cur, r.seq)
            return
        moved = next((m for m in self._missing if m[0] <= r.seq <= m[1]), None)
        if moved is not None:
            self._report(
                loc, r.seq, "reordered", f"record seq {r.seq}, reported missing at {moved[2]}, turns up here"
            )
            return
        if self._continues_anchor(nxt):
            self._report_skipped(loc, r.seq)
            return
        self._report(
            loc,
            r.seq,
            "inserted",
            f"record seq {r.seq} repeats a sequence number already passed (last seq {self.last_seq})",
        )

    def _check_late(self, cur: _Line, r: AuditRecord) -> None:
        """A record that turns up after a reordering: it must match its neighbours' hashes."""
        self._late.discard(r.seq)
        ok_before = self._hash_of_seq.get(r.seq - 1) in (None, r.prev)
        ok_after = self._claimed_prev_of.get(r.seq) in (None, cur.digest)
        if not (ok_before and ok_after):
            self._report(
                (cur.file, cur.lineno),
                r.seq,
                "altered",
                f"record seq {r.seq} (out of order) does not match its neighbours' hashes",
            )
        self._hash_of_seq[r.seq] = cur.digest
