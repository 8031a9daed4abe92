"""The engine at run time: reloads (good, broken, unauditable, watched), fail closed (no policy,
evaluation error, time budget), the emergency fail-open window (admit, explicit deny, auto-close
on a fake clock, early close, refusals) and the audit sink failing."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from _policy_helpers import RecordingAudit, facts, write_files

from qpher_proxy.errors import AuditUnavailable, InvalidInput, PolicyDenied, PolicyUnavailable
from qpher_proxy.policy import PolicyEngine

GOOD = """\
version: 1
plans:
  pro:
    rate_limit: {requests_per_second: 10, burst: 20}
    quotas: {sign: 100}
    algorithms: ["*"]
    operations: ["*"]
rules:
  - id: deny-mallory
    effect: deny
    match: {tenant: mallory}
    reason: mallory is blocked
  - id: sign-quota
    effect: deny
    match: {usage_over: {operation: sign, percent_of_quota: 100}}
    reason: quota used
  - id: allow-pro
    effect: allow
    match: {plan: pro}
    reason: pro plan
"""
GOOD_V2 = GOOD.replace("reason: pro plan", "reason: pro plan, version two")
BROKEN = GOOD_V2.replace("effect: allow", "effect: alow")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class SteppingClock:
    """An evaluation clock that advances ``step`` seconds every time it is read."""

    def __init__(self, step: float) -> None:
        self.t = 0.0
        self.step = step

    def __call__(self) -> float:
        self.t += self.step
        return self.t


def make_engine(
    tmp_path: Path, files: dict[str, str] | None = None, **kw: Any
) -> tuple[PolicyEngine, RecordingAudit]:
    d = write_files(tmp_path / "policies", files if files is not None else {"50-p.yaml": GOOD})
    audit = RecordingAudit()
    kw.setdefault("clock", FakeClock())
    return PolicyEngine(d, audit, **kw), audit


# ---- decisions and reloads -----------------------------------------------------------------------

def test_decide_allows_denies_and_audits_each_decision(tmp_path: Path) -> None:
    engine, audit = make_engine(tmp_path)
    result = engine.reload()
    assert result.ok and result.changed and engine.ready
    assert audit.events("policy.reload")[0][2]["revision"] == result.revision
    d = engine.decide(facts(request_id="r1"))
    assert (d.effect, d.rule_id, d.source) == ("allow", "allow-pro", "rule")
    with pytest.raises(PolicyDenied) as info:
        engine.authorize(facts(tenant="mallory"))
    assert (info.value.status, info.value.code, info.value.rule_id) == (403, "policy_denied", "deny-mallory")
    assert info.value.message == "denied by rule deny-mallory: mallory is blocked"
    decisions = audit.events("policy.decision")
    assert [(s, f["effect"], f["rule_id"]) for _, s, f in decisions] == [
        ("info", "allow", "allow-pro"), ("warning", "deny", "deny-mallory")]
    assert decisions[0][2]["request_id"] == "r1" and decisions[0][2]["api_key_id"] == "k_test"
    assert engine.plan("pro") is not None and engine.plan("pro").rate_limit.burst == 20  # type: ignore[union-attr]


def test_no_policy_loaded_fails_closed(tmp_path: Path) -> None:
    engine, audit = make_engine(tmp_path)
    assert not engine.ready
    with pytest.raises(PolicyUnavailable) as info:
        engine.decide(facts())
    assert (info.value.status, info.value.code) == (503, "policy_unavailable")
    assert "no valid policy is loaded" in info.value.message
    assert audit.events("policy.unavailable")[0][1] == "warning"
    assert engine.unavailable_total == 1


def test_invalid_policy_at_start_means_nothing_is_allowed(tmp_path: Path) -> None:
    engine, _ = make_engine(tmp_path, {"50-p.yaml": BROKEN})
    result = engine.reload()
    assert not result.ok and result.revision is None and not engine.ready
    with pytest.raises(PolicyUnavailable):
        engine.decide(facts())


def test_reload_with_a_broken_file_keeps_the_last_good(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine, audit = make_engine(tmp_path)
    good = engine.reload()
    (tmp_path / "policies" / "50-p.yaml").write_text(BROKEN)
    with caplog.at_level(logging.ERROR, logger="qpher.policy"):
        result = engine.reload()
    assert not result.ok and not result.changed
    assert result.revision == good.revision == engine.policy_set.revision  # type: ignore[union-attr]
    assert [str(i) for i in result.issues] == [
        f"{tmp_path / 'policies' / '50-p.yaml'}:18: rules[2].effect: expected allow or deny, got 'alow'"]
    assert engine.reload_failures_total == 1 and engine.reloads_total == 1
    (_, severity, fields), = audit.events("policy.reload_rejected")
    assert severity == "warning" and fields["kept_revision"] == good.revision and fields["problems"] == 1
    assert "rules[2].effect" in fields["first_problems"][0]
    assert "policy reload rejected" in caplog.text and "rules[2].effect" in caplog.text
    # the old policy still decides
    assert engine.decide(facts()).reason == "pro plan"


def test_reload_of_unchanged_files_is_a_no_op(tmp_path: Path) -> None:
    engine, audit = make_engine(tmp_path)
    engine.reload()
    result = engine.reload()
    assert result.ok and not result.changed
    assert len(audit.events("policy.reload")) == 1 and engine.reloads_total == 1


def test_unauditable_reload_is_not_applied(tmp_path: Path) -> None:
    engine, audit = make_engine(tmp_path)
    first = engine.reload()
    (tmp_path / "policies" / "50-p.yaml").write_text(GOOD_V2)
    audit.fail_with = OSError("disk full")
    result = engine.reload()
    assert not result.ok and result.revision == first.revision
    assert engine.policy_set.revision == first.revision  # type: ignore[union-attr]
    assert engine.reload_failures_total == 1
    audit.fail_with = None
    assert engine.reload().changed  # applied once it can be recorded


async def test_watch_reloads_changes_and_rejects_a_broken_version_once(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    engine, audit = make_engine(tmp_path, clock=None)
    path = tmp_path / "policies" / "50-p.yaml"
    first = engine.reload().revision
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.watch, 1.0)
        path.write_text(GOOD_V2)
        await trio.sleep(1.5)
        second = engine.policy_set.revision  # type: ignore[union-attr]
        assert second != first and engine.decide(facts()).reason == "pro plan, version two"
        path.write_text(BROKEN + "# broken\n")
        await trio.sleep(10)  # ten polls: the broken version is rejected once
        assert engine.reload_failures_total == 1
        assert engine.policy_set.revision == second  # type: ignore[union-attr]
        path.write_text(GOOD)
        (tmp_path / "policies" / "60-more.yaml").write_text("version: 1\n")
        await trio.sleep(1.5)
        assert engine.reloads_total == 3 and len(engine.policy_set.files) == 2  # type: ignore[union-attr]
        nursery.cancel_scope.cancel()
    assert len(audit.events("policy.reload")) == 3 and len(audit.events("policy.reload_rejected")) == 1


# ---- fail closed ----------------------------------------------------------------------------------

def test_evaluation_error_fails_closed(tmp_path: Path) -> None:
    engine, audit = make_engine(tmp_path)
    engine.reload()
    bad = facts(usage={"sign": "lots"})  # the quota layer handed over garbage: comparing raises
    with pytest.raises(PolicyUnavailable) as info:
        engine.decide(bad)
    assert info.value.status == 503 and "evaluation failed" in info.value.message
    assert isinstance(info.value.__cause__, TypeError)
    assert engine.eval_errors_total == 1
    assert not audit.events("policy.decision")


def test_time_budget_exceeded_fails_closed(tmp_path: Path) -> None:
    engine, _ = make_engine(tmp_path, eval_clock=SteppingClock(0.010), eval_budget_s=0.005)
    engine.reload()
    with pytest.raises(PolicyUnavailable) as info:
        engine.decide(facts())  # would be an allow, but it came too late to be trusted
    assert "exceeded its time budget" in info.value.message
    assert engine.budget_exceeded_total == 1
    fast, _ = make_engine(tmp_path / "fast", eval_clock=SteppingClock(0.001), eval_budget_s=0.005)
    fast.reload()
    assert fast.decide(facts()).allowed


def test_default_budget_clock_is_real(tmp_path: Path) -> None:
    engine, _ = make_engine(tmp_path)  # eval_clock=time.thread_time, 5 ms budget
    engine.reload()
    for _ in range(200):
        assert engine.decide(facts()).allowed
    assert engine.budget_exceeded_total == 0


def _wall_and_cpu(monkeypatch: pytest.MonkeyPatch, wall_step: float, cpu_step: float) -> Any:
    """The engine's view of the time module: a wall clock and a CPU clock stepping as given.
    An engine built with ``eval_clock=<that>.thread_time`` takes it for its default clock."""
    import types

    import qpher_proxy.policy.engine as engine_module

    fake = types.SimpleNamespace(perf_counter=SteppingClock(wall_step), thread_time=SteppingClock(cpu_step))
    monkeypatch.setattr(engine_module, "time", fake)
    return fake


def test_default_clock_reads_the_cpu_clock_only_when_the_wall_clock_says_over_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = _wall_and_cpu(monkeypatch, wall_step=0.001, cpu_step=0.001)
    engine, _ = make_engine(tmp_path, eval_clock=fake.thread_time, eval_budget_s=0.005)
    engine.reload()
    assert engine.decide(facts()).allowed
    assert fake.thread_time.t == 0  # never read: 1 ms of wall time cannot hold 5 ms of CPU


def test_default_clock_slow_on_the_wall_but_cheap_on_the_cpu_is_allowed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import qpher_proxy.policy.engine as engine_module

    fake = _wall_and_cpu(monkeypatch, wall_step=0.010, cpu_step=0.001)  # e.g. the OS ran something else
    calls: list[int] = []
    real_evaluate = engine_module.evaluate
    monkeypatch.setattr(engine_module, "evaluate", lambda ps, f: calls.append(1) or real_evaluate(ps, f))
    engine, audit = make_engine(tmp_path, eval_clock=fake.thread_time, eval_budget_s=0.005)
    engine.reload()
    assert engine.decide(facts(request_id="r1")).allowed
    assert len(calls) == 2  # evaluated again, this time on the CPU clock
    assert engine.budget_exceeded_total == 0
    assert [f["request_id"] for _, _, f in audit.events("policy.decision")] == ["r1"]  # audited once


def test_default_clock_over_budget_on_the_cpu_clock_fails_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = _wall_and_cpu(monkeypatch, wall_step=0.010, cpu_step=0.010)
    engine, audit = make_engine(tmp_path, eval_clock=fake.thread_time, eval_budget_s=0.005)
    engine.reload()
    with pytest.raises(PolicyUnavailable) as info:
        engine.decide(facts())
    assert "exceeded its time budget" in info.value.message
    assert engine.budget_exceeded_total == 1
    assert not audit.events("policy.decision")


def test_uses_usage_follows_the_policy_in_force(tmp_path: Path) -> None:
    engine, _ = make_engine(tmp_path)
    assert engine.uses_usage is False  # nothing loaded
    engine.reload()
    assert engine.uses_usage is True  # GOOD has a usage_over rule
    without = GOOD.replace("match: {usage_over: {operation: sign, percent_of_quota: 100}}",
                           "match: {tenant: nobody}")
    (tmp_path / "policies" / "50-p.yaml").write_text(without)
    assert engine.reload().changed
    assert engine.uses_usage is False
    in_unless = without.replace(
        "match: {plan: pro}", "match: {plan: pro}\n    unless: {usage_over: {operation: sign, at_least: 5}}"
    )
    (tmp_path / "policies" / "50-p.yaml").write_text(in_unless)
    assert engine.reload().changed
    assert engine.uses_usage is True


def test_audit_failure_on_a_decision_fails_closed(tmp_path: Path) -> None:
    engine, audit = make_engine(tmp_path)
    engine.reload()
    audit.fail_with = OSError("read-only file system")
    with pytest.raises(PolicyUnavailable) as info:
        engine.decide(facts())
    assert info.value.status == 503 and "audit log is unavailable" in info.value.message
    audit.fail_with = AuditUnavailable("audit log unavailable")  # a typed error keeps its code
    with pytest.raises(AuditUnavailable):
        engine.decide(facts())


# ---- emergency fail-open ----------------------------------------------------------------------

def test_fail_open_admits_what_would_be_unavailable(tmp_path: Path) -> None:
    clock = FakeClock()
    engine, audit = make_engine(tmp_path, clock=clock)  # nothing loaded: every request would be 503
    state = engine.open_fail_open("policy repo broken, INC-42", "k_admin", 120)
    assert state.active and state.reason == "policy repo broken, INC-42" and state.opened_by == "k_admin"
    assert state.remaining_seconds == 120
    (_, severity, opened), = audit.events("policy.fail_open.opened")
    assert severity == "critical" and opened["seconds"] == 120 and opened["opened_by"] == "k_admin"
    d = engine.authorize(facts(request_id="r9"))
    assert (d.effect, d.rule_id, d.source) == ("allow", None, "fail_open")
    (_, severity, admit), = audit.events("policy.fail_open.admit")
    assert severity == "critical" and admit["request_id"] == "r9" and admit["window_reason"] == state.reason
    assert "no valid policy is loaded" in admit["cause"]
    assert engine.fail_open_state().admissions == 1 and engine.fail_open_admissions_total == 1


def test_fail_open_changes_nothing_while_the_policy_decides(tmp_path: Path) -> None:
    engine, audit = make_engine(
        tmp_path, files={"50-p.yaml": GOOD.replace("match: {plan: pro}", "match: {tenant: acme}")}
    )
    engine.reload()
    engine.open_fail_open("maintenance", "k_admin", 60)
    with pytest.raises(PolicyDenied) as info:  # explicit deny still denies
        engine.authorize(facts(tenant="mallory"))
    assert info.value.rule_id == "deny-mallory"
    with pytest.raises(PolicyDenied) as info:  # and so does the default deny of a working policy
        engine.authorize(facts(tenant="bob"))
    assert info.value.rule_id is None
    assert engine.decide(facts()).source == "rule"
    assert not audit.events("policy.fail_open.admit")


def test_fail_open_after_evaluation_error_or_late_result(tmp_path: Path) -> None:
    engine, audit = make_engine(tmp_path)
    engine.reload()
    engine.open_fail_open("engine bug", "k_admin", 60)
    # evaluation raised: no decision is known, the window admits
    assert engine.decide(facts(usage={"sign": "lots"})).source == "fail_open"
    # over budget: a late explicit deny still denies, a late allow is admitted by the window
    slow, slow_audit = make_engine(tmp_path / "slow", eval_clock=SteppingClock(1.0))
    slow.reload()
    slow.open_fail_open("slow box", "k_admin", 60)
    with pytest.raises(PolicyDenied) as info:
        slow.authorize(facts(tenant="mallory"))
    assert info.value.rule_id == "deny-mallory"
    d = slow.decide(facts())
    assert d.source == "fail_open" and "time budget" in d.reason
    assert len(slow_audit.events("policy.fail_open.admit")) == 1


async def test_fail_open_closes_itself_at_the_deadline_without_traffic(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    engine, audit = make_engine(tmp_path, clock=None)  # deadlines on trio's (mock) clock
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run_fail_open_timer)
        start = trio.current_time()
        engine.open_fail_open("incident", "k_admin", 60)
        assert engine.decide(facts()).source == "fail_open"
        await trio.sleep(59.9)
        assert engine.fail_open_state().active
        assert not audit.events("policy.fail_open.closed")
        await trio.sleep(0.2)
        # closed by the timer task, not by a request
        (_, severity, closed), = audit.events("policy.fail_open.closed")
        assert severity == "critical" and closed["cause"] == "deadline reached" and closed["admissions"] == 1
        assert not engine._window  # noqa: SLF001 - closed by the timer, before anyone asked
        assert trio.current_time() - start == pytest.approx(60, abs=0.2)
        with pytest.raises(PolicyUnavailable):
            engine.decide(facts())
        # a second window works the same way, and reopening replaces the deadline
        engine.open_fail_open("again", "k_admin", 100)
        await trio.sleep(50)
        engine.open_fail_open("extend", "k_admin", 100)
        await trio.sleep(99)
        assert engine.fail_open_state().active
        await trio.sleep(2)
        assert not engine.fail_open_state().active
        assert len(audit.events("policy.fail_open.closed")) == 2
        nursery.cancel_scope.cancel()


def test_deadline_holds_even_without_the_timer_task(tmp_path: Path) -> None:
    clock = FakeClock()
    engine, audit = make_engine(tmp_path, clock=clock)
    engine.open_fail_open("incident", "k_admin", 30)
    clock.now += 29.999
    assert engine.decide(facts()).source == "fail_open"
    clock.now += 0.001
    with pytest.raises(PolicyUnavailable):
        engine.decide(facts())
    assert audit.events("policy.fail_open.closed")[0][2]["cause"] == "deadline reached"


def test_close_early_and_restart_forgets(tmp_path: Path) -> None:
    engine, audit = make_engine(tmp_path)
    engine.open_fail_open("incident", "k_admin", 300)
    state = engine.close_fail_open("k_other_admin")
    assert not state.active
    (_, severity, closed), = audit.events("policy.fail_open.closed")
    assert (
        severity == "critical"
        and closed["closed_by"] == "k_other_admin"
        and closed["cause"] == "closed by admin"
    )
    with pytest.raises(PolicyUnavailable):
        engine.decide(facts())
    assert not engine.close_fail_open("k_admin").active  # closing a closed window: nothing happens
    assert len(audit.events("policy.fail_open.closed")) == 1
    engine.open_fail_open("incident", "k_admin", 300)
    restarted, _ = make_engine(tmp_path / "restart")  # a new process: memory only, nothing survives
    assert not restarted.fail_open_state().active


@pytest.mark.parametrize(("reason", "seconds", "message"), [
    ("", 60, "non-empty reason"),
    ("   ", 60, "non-empty reason"),
    (None, 60, "non-empty reason"),
    ("two\nlines", 60, "one line"),
    ("x" * 501, 60, "at most 500 characters"),
    ("ok", 301, "at most 300 seconds"),
    ("ok", 0, "more than 0"),
    ("ok", -5, "more than 0"),
    ("ok", math.nan, "more than 0"),
    ("ok", math.inf, "more than 0"),
    ("ok", True, "more than 0"),
    ("ok", "60", "more than 0"),
])
def test_fail_open_refused_without_reason_or_over_max(
    tmp_path: Path, reason: Any, seconds: Any, message: str
) -> None:
    engine, audit = make_engine(tmp_path, fail_open_max_seconds=300)
    with pytest.raises(InvalidInput) as info:
        engine.open_fail_open(reason, "k_admin", seconds)
    assert info.value.status == 400 and message in info.value.message
    assert not engine.fail_open_state().active and not audit.records


def test_fail_open_max_is_inclusive(tmp_path: Path) -> None:
    engine, _ = make_engine(tmp_path, fail_open_max_seconds=300)
    assert engine.open_fail_open("ok", "k_admin", 300).remaining_seconds == 300


def test_audit_sink_failing_refuses_to_open_and_to_admit(tmp_path: Path) -> None:
    engine, audit = make_engine(tmp_path)
    audit.fail_with = OSError("disk full")
    with pytest.raises(PolicyUnavailable):
        engine.open_fail_open("incident", "k_admin", 60)
    assert not engine.fail_open_state().active
    with pytest.raises(PolicyUnavailable):  # still closed: the request is refused
        engine.decide(facts())
    audit.fail_with = None
    engine.open_fail_open("incident", "k_admin", 60)
    audit.fail_with = OSError("disk full")
    with pytest.raises(PolicyUnavailable):  # an admission that cannot be recorded is refused
        engine.decide(facts())
    assert engine.fail_open_admissions_total == 0
    # closing always closes, and the admin hears that it was not recorded
    with pytest.raises(PolicyUnavailable):
        engine.close_fail_open("k_admin")
    assert not engine.fail_open_state().active


async def test_run_starts_the_timer_and_the_watcher(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    engine, audit = make_engine(tmp_path, clock=None)
    assert (await engine.areload()).changed
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run, 1.0)
        engine.open_fail_open("incident", "k_admin", 10)
        (tmp_path / "policies" / "50-p.yaml").unlink()
        (tmp_path / "policies" / "70-p.yaml").write_text(GOOD_V2)  # a rename counts as a change
        await trio.sleep(11)
        assert audit.events("policy.fail_open.closed")[0][2]["cause"] == "deadline reached"
        assert engine.reloads_total == 2 and engine.decide(facts()).reason == "pro plan, version two"
        nursery.cancel_scope.cancel()
