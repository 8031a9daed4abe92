"""AuditLog: chain, rotation, resume, crash recovery, secret refusal, unwritable sink."""

from __future__ import annotations

import itertools
import json
import os
import stat
from pathlib import Path

import pytest

from qpher_proxy.audit import GENESIS, RECOVERY_EVENT, AuditLog, parse_record, rotated_files, verify
from qpher_proxy.audit.records import line_hash
from qpher_proxy.errors import AuditFieldRefused, AuditUnavailable, QpherError

FAKE_KEY = "qph_abcdefghijkl_" + "A" * 43


class FakeClock:
    def __init__(self, t: float = 1_750_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def all_files(path: Path) -> list[str]:
    return [p for _, p in rotated_files(path)] + [str(path)]


def test_records_form_a_chain_from_genesis(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    with AuditLog(path, clock=FakeClock()) as log:
        assert log.record("auth.failed", "warning", key_id="abcdefghijkl", reason="bad_secret") == 1
        assert log.record("policy.decision", "INFO", rule_id="r1", effect="allow", scopes=("a", "b")) == 2
        log("kms.restarted", "ERROR", worker=3)  # the callable form the policy engine uses
    raw = lines_of(path)
    recs = [parse_record(line) for line in raw]
    assert [r.seq for r in recs if r] == [1, 2, 3]
    assert recs[0] is not None and recs[0].prev == GENESIS
    assert recs[1] is not None and recs[1].prev == line_hash(raw[0])
    assert recs[2] is not None and recs[2].prev == line_hash(raw[1])
    first = json.loads(raw[0])
    assert list(first)[:4] == ["seq", "ts", "event", "severity"] and list(first)[-1] == "prev"
    assert first["ts"] == "2025-06-15T15:06:40.000Z" and first["severity"] == "WARNING"
    assert json.loads(raw[1])["scopes"] == ["a", "b"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    result = verify([path])
    assert result.ok and result.records == 3 and result.head == line_hash(raw[2])


def test_resume_after_restart_continues_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    with AuditLog(path) as log:
        log.record("a", "INFO")
        log.record("b", "INFO")
    with AuditLog(path) as log:
        assert log.last_seq == 2
        assert log.record("c", "INFO") == 3
    assert verify([path]).ok


def test_rotation_carries_the_chain_into_the_next_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    with AuditLog(path, rotate_bytes=400) as log:
        for i in range(12):
            log.record("tick", "INFO", i=i)
    rotated = rotated_files(path)
    assert len(rotated) >= 3
    assert all(os.path.getsize(p) <= 400 for _, p in rotated)
    # the first record of each file links to the last record of the previous one
    files = all_files(path)
    for older, newer in itertools.pairwise(files):
        last = lines_of(Path(older))[-1]
        first = parse_record(lines_of(Path(newer))[0])
        assert first is not None and first.prev == line_hash(last)
    result = verify(files)
    assert result.ok and result.records == 12 and result.last_seq == 12
    # a restart after rotation resumes from the current file
    with AuditLog(path, rotate_bytes=400) as log:
        assert log.last_seq == 12


def test_restart_with_current_file_missing_resumes_from_rotated(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    with AuditLog(path, rotate_bytes=300) as log:
        for i in range(6):
            log.record("tick", "INFO", i=i)
    files = all_files(path)
    # simulate a crash between rename and re-create: only rotated files remain
    last_rotated = lines_of(Path(files[-2]))[-1]
    os.unlink(path)
    with AuditLog(path, rotate_bytes=300) as log:
        assert log.head == line_hash(last_rotated)
        log.record("after", "INFO")
    assert verify(all_files(path)).ok


def test_two_writers_interleave_into_one_chain(tmp_path: Path) -> None:
    """The proxy and the apikey CLI append to the same log: the chain stays linear."""
    path = tmp_path / "audit.log"
    with AuditLog(path, rotate_bytes=500) as proxy, AuditLog(path, rotate_bytes=500) as cli:
        for i in range(10):
            proxy.record("proxy.event", "INFO", i=i)
            cli.record("apikey.created", "NOTICE", key_id=f"k{i:011d}")
    result = verify(all_files(path))
    assert result.ok, [str(f) for f in result.findings]
    assert result.records == 20


def test_torn_tail_is_kept_and_explained_by_a_recovery_record(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    with AuditLog(path) as log:
        log.record("a", "INFO")
        log.record("b", "INFO")
    good = lines_of(path)
    with open(path, "ab") as fh:  # a crash in the middle of os.write
        fh.write(b'{"seq":3,"ts":"2025-06-15T15:06:40.000Z","ev')
    # verify before restart: a note, not a failure
    before = verify([path])
    assert before.ok and [n.kind for n in before.notes] == ["torn"]
    with AuditLog(path) as log:
        log.record("c", "INFO")
    raw = lines_of(path)
    assert raw[:2] == good
    assert raw[2].startswith(b'{"seq":3,"ts"') and parse_record(raw[2]) is None  # kept as evidence
    recovery = parse_record(raw[3])
    assert recovery is not None and recovery.event == RECOVERY_EVENT and recovery.seq == 3
    assert recovery.fields["torn_sha256"] == line_hash(raw[2]) and recovery.fields["torn_bytes"] == len(
        raw[2]
    )
    assert recovery.prev == line_hash(raw[1])
    result = verify([path])
    assert result.ok, [str(f) for f in result.findings]
    assert result.records == 4 and [n.kind for n in result.notes] == ["torn"]


def test_torn_tail_missing_only_its_newline_is_adopted(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    with AuditLog(path) as log:
        log.record("a", "INFO")
        log.record("b", "INFO")
    path.write_bytes(path.read_bytes()[:-1])  # the final newline never made it
    with AuditLog(path) as log:
        assert log.last_seq == 2
        log.record("c", "INFO")
    assert [parse_record(x).event for x in lines_of(path)] == ["a", "b", "c"]  # type: ignore[union-attr]
    assert verify([path]).ok


def test_unparseable_last_line_is_noted_and_reported(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    with AuditLog(path) as log:
        log.record("a", "INFO")
        log.record("b", "INFO")
    raw = lines_of(path)
    path.write_bytes(raw[0] + b"\n" + b"garbage that replaced record 2\n")
    with AuditLog(path) as log:
        log.record("c", "INFO")
    recs = [parse_record(x) for x in lines_of(path)]
    assert recs[2] is not None and recs[2].fields["reason"] == "unparseable_tail"
    result = verify([path])
    assert not result.ok and result.first is not None
    assert (result.first.line, result.first.kind) == (2, "altered")
    assert len(result.findings) == 1  # the chain is whole again after the damaged line


@pytest.mark.parametrize(
    "name, value",
    [
        ("api_key", "x"),
        ("secret", "x"),
        ("plaintext", "x"),
        ("shared_secret", "x"),
        ("private_key", "x"),
        ("kek", "x"),
        ("token", "x"),
        ("password", "x"),
        ("client_secret", "x"),
        ("API-Key", "x"),
        ("note", FAKE_KEY),
        ("note", f"Bearer {FAKE_KEY}"),
        ("headers", {"x-api-key": "v"}),
        ("nested", [{"ok": 1, "deeper": {"password": "p"}}]),
        ("items", ["fine", FAKE_KEY]),
        ("blob", b"\x00\x01"),
        ("obj", object()),
        ("n", float("nan")),
        ("seq", 5),
        ("prev", "0" * 64),
    ],
)
def test_secret_like_or_non_json_fields_are_refused_and_nothing_is_written(
    tmp_path: Path, name: str, value: object
) -> None:
    path = tmp_path / "audit.log"
    with AuditLog(path) as log:
        log.record("a", "INFO")
        before = path.read_bytes()
        with pytest.raises(AuditFieldRefused) as info:
            log.record("b", "INFO", **{name: value})
        assert info.value.code == "audit_field_refused"
        assert FAKE_KEY not in str(info.value) and FAKE_KEY not in repr(info.value)
        assert path.read_bytes() == before
        assert log.record("c", "INFO") == 2  # the refused record took no number
    assert verify([path]).ok


def test_identifiers_are_allowed(tmp_path: Path) -> None:
    with AuditLog(tmp_path / "audit.log") as log:
        log.record("a", "INFO", key_id="abcdefghijkl", api_key_id="abcdefghijkl", kek_id="k1", tokens_left=3,
                   token_count=2, key_label="prod")


def test_unknown_severity_and_bad_event_names_are_refused(tmp_path: Path) -> None:
    with AuditLog(tmp_path / "audit.log") as log:
        with pytest.raises(AuditFieldRefused):
            log.record("a", "LOUD")
        with pytest.raises(AuditFieldRefused):
            log.record("two words", "INFO")
        assert log.last_seq == 0


def test_fsync_policy_critical_fsyncs_only_critical_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        calls.append(fd)
        real_fsync(fd)

    with AuditLog(tmp_path / "audit.log", fsync_policy="critical") as log:
        monkeypatch.setattr(os, "fsync", counting_fsync)
        log.record("policy.decision", "INFO")
        assert calls == []
        log.record("failopen.opened", "CRITICAL", reason="incident 42")
        assert len(calls) == 1
    with AuditLog(tmp_path / "always.log", fsync_policy="always") as log:
        log.record("a", "INFO")
        assert len(calls) == 2


# ---- unwritable sink → audit_unavailable (503) -------------------------------------------
# Tests run as root, so chmod cannot make a file unwritable: use paths whose parent is a
# regular file, /dev/full under the log's descriptor, a closed descriptor, a vanished directory.

def test_parent_is_a_regular_file(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    with pytest.raises(AuditUnavailable) as info:
        AuditLog(blocker / "audit.log")
    assert (info.value.code, info.value.status) == ("audit_unavailable", 503)
    assert isinstance(info.value, QpherError)


def test_path_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "audit.log").mkdir()
    with pytest.raises(AuditUnavailable):
        AuditLog(tmp_path / "audit.log")


def test_disk_full_then_heals(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    with AuditLog(path) as log:
        log.record("a", "INFO")
        full = os.open("/dev/full", os.O_WRONLY)
        try:
            os.dup2(full, log._fd)  # type: ignore[arg-type]  # the disk fills up under us
        finally:
            os.close(full)
        with pytest.raises(AuditUnavailable) as info:
            log.record("b", "CRITICAL")
        assert info.value.status == 503
        # the next record re-opens the file and continues the chain
        assert log.record("c", "INFO") == 2
    result = verify([path])
    assert result.ok and result.records == 2


def test_health_reports_a_failed_append_and_recovers_by_a_probe_without_a_record(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    with AuditLog(path, probe_interval=0.0) as log:
        assert log.health() is None
        log.record("a", "INFO")
        moved = path.rename(tmp_path / "moved-away.log")
        path.mkdir()  # the log's path is now a directory: nothing can be appended
        with pytest.raises(AuditUnavailable):
            log.record("b", "INFO")
        assert log.health() == "the audit log cannot be written"  # a probe, and it failed too
        assert log.health() == "the audit log cannot be written"
        path.rmdir()
        moved.rename(path)
        before = path.read_bytes()
        assert log.health() is None  # the probe re-opened the log: ready without any traffic
        assert path.read_bytes() == before  # ... and appended nothing
        assert log.record("c", "INFO") == 2
    assert log.health() == "the audit log is closed"


def test_health_probes_a_failed_log_at_most_once_per_interval(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    with AuditLog(path, probe_interval=3600.0) as log:
        assert log._fd is not None
        os.close(log._fd)  # the descriptor fails under us
        with pytest.raises(AuditUnavailable):
            log.record("a", "INFO")
        assert log.health() is None  # the first probe re-opens the log
        os.close(log._fd)  # type: ignore[arg-type]
        with pytest.raises(AuditUnavailable):
            log.record("b", "INFO")
        assert log.health() == "the audit log cannot be written"  # within the interval: no probe
        assert log.record("c", "INFO") == 1  # an append still heals it at once
        assert log.health() is None


def test_closed_descriptor(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    with AuditLog(path) as log:
        log.record("a", "INFO")
        assert log._fd is not None
        os.close(log._fd)
        with pytest.raises(AuditUnavailable):
            log.record("b", "INFO")
        assert log.record("c", "INFO") == 2
    assert verify([path]).ok


def test_directory_replaced_by_a_file_fails_rotation(tmp_path: Path) -> None:
    logdir = tmp_path / "logs"
    logdir.mkdir()
    path = logdir / "audit.log"
    log = AuditLog(path, rotate_bytes=200)
    try:
        log.record("a", "INFO", pad="x" * 50)
        os.rename(logdir, tmp_path / "moved-away")
        logdir.write_text("now a regular file")
        with pytest.raises(AuditUnavailable):
            for i in range(5):  # the next rotation cannot rename or create anything
                log.record("b", "INFO", pad="x" * 50, i=i)
        with pytest.raises(AuditUnavailable):
            log.record("c", "INFO")  # and it stays unavailable while the directory is gone
    finally:
        log.close()


def test_closed_log_refuses(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.log")
    log.close()
    with pytest.raises(AuditUnavailable):
        log.record("a", "INFO")


def test_torn_first_line_of_a_fresh_file_after_rotation(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    with AuditLog(path, rotate_bytes=300) as log:
        for i in range(4):
            log.record("tick", "INFO", i=i)
    # the process rotated, created the new file and crashed while writing its first record
    os.rename(path, f"{path}.{len(rotated_files(path)) + 1:06d}")
    path.write_bytes(b'{"seq":5,"ts":"2025-')
    with AuditLog(path, rotate_bytes=300) as log:
        assert log.last_seq == 5  # the recovery record took seq 5
        log.record("after", "INFO")
    result = verify(all_files(path))
    assert result.ok, [str(f) for f in result.findings]
    assert [n.kind for n in result.notes] == ["torn"] and result.last_seq == 6
