"""The record line is exactly ``json.dumps`` of the record (the writer assembles it piece by
piece for speed), and the writer's per-record shortcuts change nothing about what is refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qpher_proxy.audit import AuditLog, verify
from qpher_proxy.audit.records import encode_record, format_ts, normalize_severity
from qpher_proxy.errors import AuditFieldRefused


def reference_line(seq: int, ts: str, event: str, severity: str, fields: dict[str, Any], prev: str) -> bytes:
    """The definition: the record as one JSON object, fields sorted by name between the fixed
    head and ``prev``, compact separators, ASCII only."""
    obj: dict[str, Any] = {"seq": seq, "ts": ts, "event": event, "severity": severity}
    for name in sorted(fields):
        obj[name] = fields[name]
    obj["prev"] = prev
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


text = st.text(st.characters(codec="utf-8"), max_size=12)
scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=False, allow_infinity=False), text)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(text, inner, max_size=3)),
    max_leaves=6,
)
names = st.text(st.characters(codec="utf-8"), min_size=1, max_size=10).filter(
    lambda n: n not in ("seq", "ts", "event", "severity", "prev"))


@settings(max_examples=300, deadline=None)
@given(fields=st.dictionaries(names, values, max_size=8), seq=st.integers(min_value=1, max_value=2**63))
def test_line_is_json_dumps_of_the_record(fields: dict[str, Any], seq: int) -> None:
    ts, prev = "2025-06-15T15:06:40.123Z", "ab" * 32
    assert encode_record(seq, ts, "policy.decision", "INFO", fields, prev) == \
        reference_line(seq, ts, "policy.decision", "INFO", fields, prev)


def test_same_names_in_another_order_give_the_same_line() -> None:
    a = {"tenant": "t", "effect": "allow", "algorithm": None, "n": 3}
    b = dict(reversed(list(a.items())))
    assert encode_record(1, "t", "e", "INFO", a, "0" * 64) == encode_record(1, "t", "e", "INFO", b, "0" * 64)


def test_a_reserved_name_given_directly_keeps_dict_semantics() -> None:
    # the writer refuses reserved names before encoding; a direct caller gets what json.dumps gives
    fields = {"seq": 99, "zz": 1}
    assert encode_record(1, "t", "e", "INFO", fields, "0" * 64) == reference_line(
        1, "t", "e", "INFO", fields, "0" * 64
    )


def test_timestamps_across_second_boundaries() -> None:
    assert format_ts(1_750_000_000.999) == "2025-06-15T15:06:40.999Z"
    assert format_ts(1_750_000_001.0) == "2025-06-15T15:06:41.000Z"
    assert format_ts(1_750_000_000.5) == "2025-06-15T15:06:40.500Z"  # an earlier second again
    assert format_ts(0.25) == "1970-01-01T00:00:00.250Z"


@pytest.mark.parametrize("spelling", ["info", "INFO", "Info", "warning", "Critical"])
def test_severity_spellings_are_remembered_but_still_canonical(spelling: str) -> None:
    assert normalize_severity(spelling) == spelling.upper()
    assert normalize_severity(spelling) == spelling.upper()  # second time from the cache


@pytest.mark.parametrize("bad", ["LOUD", "", "info ", 3, None])
def test_unknown_severities_are_refused_every_time(bad: Any) -> None:
    for _ in range(2):
        with pytest.raises(AuditFieldRefused):
            normalize_severity(bad)


def test_bad_event_names_are_refused_every_time_and_unhashable_ones_too(tmp_path: Path) -> None:
    with AuditLog(tmp_path / "audit.log") as log:
        log.record("ok.event", "INFO")
        log.record("ok.event", "INFO")  # from the cache of checked names
        for bad in ("two words", "", ["a"], {"a": 1}):
            with pytest.raises(AuditFieldRefused):
                log.record(bad, "INFO")  # type: ignore[arg-type]
        assert log.last_seq == 2


def test_written_lines_match_the_reference_and_verify(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    with AuditLog(path) as log:
        log.record("policy.decision", "info", request_id="r1", tenant="t", api_key_id="abcdefghijkl",
                   algorithm=None, effect="allow", ratio=0.25, items=[1, "x", {"k": None}], ok=True)
        log.record("policy.decision", "warning", tenant="t\u00e9\n\"", effect="deny")
    lines = path.read_bytes().split(b"\n")[:-1]
    for line in lines:
        rec = json.loads(line)
        fields = {k: v for k, v in rec.items() if k not in ("seq", "ts", "event", "severity", "prev")}
        assert line == reference_line(
            rec["seq"], rec["ts"], rec["event"], rec["severity"], fields, rec["prev"]
        )
    assert verify([path]).ok
