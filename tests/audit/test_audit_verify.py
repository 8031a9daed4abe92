"""Tamper detection: each kind (altered, removed, reordered, inserted), also across rotation,
and the ``audit verify`` entry point."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from qpher_proxy.audit import AuditLog, rotated_files, verify
from qpher_proxy.audit.cli import main_verify, rotation_order
from qpher_proxy.audit.records import encode_record, line_hash


def make_log(tmp_path: Path, n: int = 10, rotate_bytes: int | None = None) -> list[Path]:
    path = tmp_path / "audit.log"
    with AuditLog(path, rotate_bytes=rotate_bytes) as log:
        for i in range(n):
            log.record("policy.decision", "INFO", i=i, rule_id=f"r{i}", effect="allow")
    return [Path(p) for _, p in rotated_files(path)] + [path]


def read_lines(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def write_lines(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def first(files: list[Path]) -> tuple[str, int, int | None, str]:
    result = verify(files)
    assert not result.ok
    f = result.first
    assert f is not None
    return Path(f.file).name, f.line, f.seq, f.kind


def test_untouched_log_verifies(tmp_path: Path) -> None:
    files = make_log(tmp_path)
    result = verify(files)
    assert result.ok and result.records == 10 and result.findings == () and result.notes == ()


def test_altered_field(tmp_path: Path) -> None:
    (path,) = make_log(tmp_path)
    lines = read_lines(path)
    lines[4] = lines[4].replace(b'"effect":"allow"', b'"effect":"deny"')
    write_lines(path, lines)
    assert first([path]) == ("audit.log", 5, 5, "altered")
    assert len(verify([path]).findings) == 1


def test_altered_prev_field(tmp_path: Path) -> None:
    (path,) = make_log(tmp_path)
    lines = read_lines(path)
    obj = json.loads(lines[4])
    obj["prev"] = "f" * 64
    lines[4] = json.dumps(obj, separators=(",", ":")).encode()
    write_lines(path, lines)
    assert first([path]) == ("audit.log", 5, 5, "altered")
    assert len(verify([path]).findings) == 1


def test_altered_seq(tmp_path: Path) -> None:
    (path,) = make_log(tmp_path)
    lines = read_lines(path)
    lines[4] = lines[4].replace(b'"seq":5,', b'"seq":50,')
    write_lines(path, lines)
    assert first([path]) == ("audit.log", 5, 50, "altered")
    assert len(verify([path]).findings) == 1


def test_altered_first_record(tmp_path: Path) -> None:
    (path,) = make_log(tmp_path)
    lines = read_lines(path)
    lines[0] = lines[0].replace(b'"i":0', b'"i":7')
    write_lines(path, lines)
    assert first([path]) == ("audit.log", 1, 1, "altered")


def test_altered_into_garbage(tmp_path: Path) -> None:
    (path,) = make_log(tmp_path)
    lines = read_lines(path)
    lines[3] = b"{not json"
    write_lines(path, lines)
    assert first([path]) == ("audit.log", 4, None, "altered")
    assert len(verify([path]).findings) == 1


def test_removed_record(tmp_path: Path) -> None:
    (path,) = make_log(tmp_path)
    lines = read_lines(path)
    del lines[4]  # seq 5
    write_lines(path, lines)
    name, line, seq, kind = first([path])
    assert (name, line, seq, kind) == ("audit.log", 5, 6, "removed")
    assert "seq 5" in str(verify([path]).first)
    assert len(verify([path]).findings) == 1


def test_removed_first_record(tmp_path: Path) -> None:
    (path,) = make_log(tmp_path)
    write_lines(path, read_lines(path)[1:])
    assert first([path]) == ("audit.log", 1, 2, "removed")
    # unless the verifier is told the chain starts in the middle (older files archived)
    assert verify([path], from_middle=True).ok


def test_removed_several_records(tmp_path: Path) -> None:
    (path,) = make_log(tmp_path)
    lines = read_lines(path)
    del lines[3:6]
    write_lines(path, lines)
    result = verify([path])
    assert result.first is not None and result.first.kind == "removed" and "4..6" in result.first.detail


def test_reordered_swap(tmp_path: Path) -> None:
    (path,) = make_log(tmp_path)
    lines = read_lines(path)
    lines[4], lines[5] = lines[5], lines[4]
    write_lines(path, lines)
    assert first([path]) == ("audit.log", 5, 6, "reordered")
    assert len(verify([path]).findings) == 1


def test_reordered_record_moved_later(tmp_path: Path) -> None:
    (path,) = make_log(tmp_path)
    lines = read_lines(path)
    moved = lines.pop(2)  # seq 3 moved after seq 7
    lines.insert(6, moved)
    write_lines(path, lines)
    assert first([path])[3] == "reordered"
    assert all(f.kind == "reordered" for f in verify([path]).findings)


def test_reordered_late_record_is_still_hash_checked(tmp_path: Path) -> None:
    (path,) = make_log(tmp_path)
    lines = read_lines(path)
    lines[4], lines[5] = lines[5], lines[4].replace(b'"effect":"allow"', b'"effect":"deny"')
    write_lines(path, lines)
    kinds = [f.kind for f in verify([path]).findings]
    assert kinds == ["reordered", "altered"]


def forged(seq: int, prev: str) -> bytes:
    return encode_record(seq, "2025-06-15T15:06:40.000Z", "policy.decision", "INFO",
                         {"rule_id": "forged", "effect": "allow"}, prev)


def test_inserted_linked_record(tmp_path: Path) -> None:
    """A forged record that links perfectly to its predecessor: the genuine successor then
    has the same seq and prev as the forgery."""
    (path,) = make_log(tmp_path)
    lines = read_lines(path)
    lines.insert(5, forged(6, line_hash(lines[4])))
    write_lines(path, lines)
    assert first([path]) == ("audit.log", 6, 6, "inserted")
    assert len(verify([path]).findings) == 1


def test_inserted_unlinked_record(tmp_path: Path) -> None:
    (path,) = make_log(tmp_path)
    lines = read_lines(path)
    lines.insert(5, forged(99, "a" * 64))
    write_lines(path, lines)
    assert first([path]) == ("audit.log", 6, 99, "inserted")
    assert len(verify([path]).findings) == 1


def test_inserted_duplicate_of_an_earlier_record(tmp_path: Path) -> None:
    (path,) = make_log(tmp_path)
    lines = read_lines(path)
    lines.insert(7, lines[1])
    write_lines(path, lines)
    assert first([path]) == ("audit.log", 8, 2, "inserted")


def test_inserted_garbage_line(tmp_path: Path) -> None:
    (path,) = make_log(tmp_path)
    lines = read_lines(path)
    lines.insert(3, b"hello")
    write_lines(path, lines)
    assert first([path]) == ("audit.log", 4, None, "inserted")
    assert len(verify([path]).findings) == 1


# ---- across rotation ---------------------------------------------------------------------

def test_altered_last_record_of_a_rotated_file(tmp_path: Path) -> None:
    files = make_log(tmp_path, n=12, rotate_bytes=450)
    assert len(files) >= 3
    target = files[0]
    lines = read_lines(target)
    lines[-1] = lines[-1].replace(b'"effect":"allow"', b'"effect":"deny"')
    write_lines(target, lines)
    assert first(files) == (target.name, len(lines), len(lines), "altered")


def test_removed_rotated_file(tmp_path: Path) -> None:
    files = make_log(tmp_path, n=12, rotate_bytes=450)
    gone = files[1]
    n_gone = len(read_lines(gone))
    first_after = json.loads(read_lines(files[2])[0])["seq"]
    remaining = [f for f in files if f != gone]
    name, line, seq, kind = first(remaining)
    assert (name, line, seq, kind) == (files[2].name, 1, first_after, "removed")
    assert verify(remaining).first is not None
    assert f"{first_after - n_gone}..{first_after - 1}" in verify(remaining).first.detail  # type: ignore[union-attr]


def test_removed_first_record_of_the_current_file(tmp_path: Path) -> None:
    files = make_log(tmp_path, n=12, rotate_bytes=450)
    current = files[-1]
    lines = read_lines(current)
    assert len(lines) >= 2
    write_lines(current, lines[1:])
    assert first(files)[3] == "removed"


def test_rotated_files_in_the_wrong_order(tmp_path: Path) -> None:
    files = make_log(tmp_path, n=12, rotate_bytes=450)
    swapped = [files[1], files[0], *files[2:]]
    assert not verify(swapped).ok
    assert rotation_order([str(f) for f in reversed(files)]) == [str(f) for f in files]


# ---- the CLI entry point ------------------------------------------------------------------

def test_main_verify_ok_and_failure(tmp_path: Path) -> None:
    files = make_log(tmp_path, n=12, rotate_bytes=450)
    out = io.StringIO()
    # in any order, lock file included (as `audit verify audit.log*` would pass it)
    args = [str(f) for f in reversed(files)] + [str(tmp_path / "audit.log.lock")]
    assert main_verify(args, out=out) == 0
    assert out.getvalue().startswith("ok: 12 records")

    lines = read_lines(files[1])
    del lines[0]
    write_lines(files[1], lines)
    out = io.StringIO()
    assert main_verify(args, out=out) == 1
    printed = out.getvalue().splitlines()
    assert printed[0].startswith(f"{files[1]}:1: seq ") and ": removed: " in printed[0]
    assert printed[-1].startswith("FAILED: 1 finding")


def test_main_verify_unreadable_file_and_usage(tmp_path: Path) -> None:
    out = io.StringIO()
    assert main_verify([str(tmp_path / "missing.log")], out=out) == 1
    assert "unreadable" in out.getvalue()
    assert main_verify([], out=io.StringIO()) == 2


@pytest.mark.parametrize("lookahead", [1, 256])
def test_lookahead_window_does_not_change_verdict_on_intact_logs(tmp_path: Path, lookahead: int) -> None:
    files = make_log(tmp_path, n=30, rotate_bytes=600)
    assert verify(files, lookahead=lookahead).ok


def _single_tamperings(orig: list[bytes]) -> list[tuple[str, list[bytes]]]:
    n = len(orig)
    cases: list[tuple[str, list[bytes]]] = []
    for i in range(n - 1):  # the last record has no successor: see "what cannot be detected"
        lines = list(orig)
        lines[i] = lines[i].replace(b'"i":', b'"i":1')
        cases.append(("altered", lines))
    for i in range(n - 1):  # removing the last record is invisible without an external anchor
        lines = list(orig)
        del lines[i]
        cases.append(("removed", lines))
    for i in range(n):
        for j in range(n):
            if i != j and j != i - 1:  # (moving i before i-1 is the same as moving i-1 after i)
                lines = list(orig)
                lines.insert(j, lines.pop(i))
                if lines != orig:
                    cases.append(("reordered", lines))
    for i in range(n):
        prev = line_hash(orig[i - 1]) if i else "0" * 64
        cases.append(("inserted", orig[:i] + [forged(i + 1, prev)] + orig[i:]))
        for j in range(n):
            cases.append(("inserted", orig[:i] + [orig[j]] + orig[i:]))
    return cases


@pytest.mark.parametrize("split", [False, True], ids=["one-file", "split-across-rotation"])
def test_every_single_tampering_is_reported_with_its_kind(tmp_path: Path, split: bool) -> None:
    (path,) = make_log(tmp_path, n=8)
    orig = read_lines(path)
    a, b = tmp_path / "t.log.000001", tmp_path / "t.log"
    for want, lines in _single_tamperings(orig):
        if split:
            write_lines(a, lines[: len(lines) // 2])
            write_lines(b, lines[len(lines) // 2:])
            files = [a, b]
        else:
            write_lines(b, lines)
            files = [b]
        result = verify(files)
        assert not result.ok and result.first is not None, (want, lines)
        assert result.first.kind == want, (want, [str(f) for f in result.findings])


def test_cli_module_exit_status_in_a_real_process(tmp_path: Path) -> None:
    import subprocess
    import sys

    files = make_log(tmp_path, n=5)
    ok = subprocess.run([sys.executable, "-m", "qpher_proxy.audit.cli", *map(str, files)],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and ok.stdout.startswith("ok: 5 records")
    lines = read_lines(files[0])
    lines[1], lines[2] = lines[2], lines[1]
    write_lines(files[0], lines)
    bad = subprocess.run([sys.executable, "-m", "qpher_proxy.audit.cli", *map(str, files)],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and ": reordered: " in bad.stdout
