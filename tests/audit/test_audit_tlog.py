"""`audit verify --vkey --checkpoint`: signatures, inclusion of every record up to the checkpoint,
consistency between checkpoints; truncation, a rewritten record and a fork each named by index."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

from _audit_checkpoints import TestSigner

from qpher_proxy.audit import AuditLog
from qpher_proxy.audit.cli import main_verify
from qpher_proxy.audit.records import encode_record, line_hash, parse_record


def _checkpoint(log: AuditLog, signer: TestSigner) -> str:
    size, root = log.tree_head()
    note = signer.note(size, root)
    log.record_checkpoint(size, root, note)
    return note


def _setup(tmp_path: Path, signer: TestSigner, n: int = 30, every: int = 10) -> tuple[Path, list[str]]:
    path = tmp_path / "audit.log"
    notes = []
    with AuditLog(path) as log:
        for i in range(n):
            log.record("test.event", "info", n=i)
            if (i + 1) % every == 0:
                notes.append(_checkpoint(log, signer))
    return path, notes


def _run(tmp_path: Path, signer: TestSigner, path: Path, *notes: str) -> tuple[int, str]:
    vk = tmp_path / "vkeys"
    vk.write_text(signer.vkeys())
    cps = []
    for i, note in enumerate(notes):
        cp = tmp_path / f"cp{i}"
        cp.write_text(note)
        cps.append(str(cp))
    out = io.StringIO()
    rc = main_verify([str(path)], out=out, vkeys=[str(vk)], checkpoints=cps)
    return rc, out.getvalue()


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


def _write(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def test_an_intact_log_verifies_and_later_records_are_not_yet_attested(tmp_path: Path) -> None:
    s = TestSigner()
    path, notes = _setup(tmp_path, s)
    with AuditLog(path) as log:
        log.record("test.event", "info", n=100)
    rc, out = _run(tmp_path, s, path, notes[0], notes[-1])
    assert rc == 0, out
    assert "not yet attested" in out and "ok: lines 0..31" in out


def test_records_dropped_from_the_end_are_named(tmp_path: Path) -> None:
    s = TestSigner()
    path, notes = _setup(tmp_path, s)
    lines = _lines(path)  # 33 lines; the last checkpoint attests 32
    _write(path, lines[:-4])
    rc, out = _run(tmp_path, s, path, notes[-1])
    assert rc == 1
    assert re.search(r"record at index 29\b", out) and "missing" in out, out


def test_a_rewritten_record_is_named(tmp_path: Path) -> None:
    s = TestSigner()
    path, notes = _setup(tmp_path, s)
    lines = _lines(path)
    lines[7] = lines[7].replace(b'"n":7', b'"n":8')
    _write(path, lines)
    rc, out = _run(tmp_path, s, path, notes[-1])
    assert rc == 1
    assert re.search(r"record at index 7\b", out), out


def test_a_fork_with_a_consistent_chain_is_named(tmp_path: Path) -> None:
    s = TestSigner()
    path, notes = _setup(tmp_path, s, n=30, every=1)  # a checkpoint after every record
    lines = _lines(path)
    fork_at = 21
    kept = lines[:fork_at]
    prev = parse_record(kept[-1])
    assert prev is not None
    seq, last = prev.seq, line_hash(kept[-1])
    for i in range(15):  # a different history, correctly chained
        line = encode_record(seq + 1, "2030-01-01T00:00:00.000Z", "test.event", "INFO", {"n": -i}, last)
        kept.append(line)
        seq, last = seq + 1, line_hash(line)
    _write(path, kept)
    by_size = {int(n.split("\n")[1]): n for n in notes}  # sizes 1, 3, 5, ...: records and checkpoints
    rc, out = _run(tmp_path, s, path, by_size[31])
    assert rc == 1
    # the signed checkpoints kept in the log bound the fork: [19, 31)
    assert re.search(r"record at index 19\b", out) and "[19, 31)" in out, out
    # a monitor that kept the checkpoints of sizes 21 and 23 pins it to the two lines after 21
    rc, out = _run(tmp_path, s, path, by_size[21], by_size[23])
    assert rc == 1
    assert re.search(rf"record at index {fork_at}\b", out) and "[21, 23)" in out, out


def test_checkpoints_from_another_key_or_altered_fail(tmp_path: Path) -> None:
    s = TestSigner()
    path, notes = _setup(tmp_path, s)
    rc, out = _run(tmp_path, TestSigner(), path, notes[-1])
    assert rc == 1 and "does not verify" in out
    head, rest = notes[-1].split("\n", 1)
    size, rest2 = rest.split("\n", 1)
    rc, out = _run(tmp_path, s, path, f"{head}\n{int(size) - 1}\n{rest2}")
    assert rc == 1 and "does not verify" in out


def test_checkpoint_records_carry_size_root_and_note(tmp_path: Path) -> None:
    s = TestSigner()
    path, notes = _setup(tmp_path, s, n=10, every=10)
    rec = parse_record(_lines(path)[10])
    assert rec is not None and rec.event == "audit.checkpoint"
    assert rec.fields["size"] == 10 and rec.fields["note"] == notes[0]
    assert json.dumps(rec.fields["root"])
