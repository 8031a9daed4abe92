"""The policy engine at run time: the current policy set, reloads, fail-closed, fail-open.

Theory of operation
-------------------
*Current policy.* The engine holds one compiled ``PolicySet`` (or none). ``reload()`` builds a
complete new set off to the side and swaps a single reference, so a request sees the old set
or the new one, never a mixture. A new version that fails validation is rejected: the last
good set stays in force, and the rejection is logged (logger ``qpher.policy``), audited
(``policy.reload_rejected``) and counted (``reload_failures_total``, read by the metrics
layer). A valid new version that cannot be audited (``policy.reload``) is not applied either:
an unrecorded policy change is exactly what the audit log exists to prevent. ``watch()``
polls the directory's ``(name, mtime_ns, size)`` list and reloads when it changes; SIGHUP
(wired by the server) calls ``reload()`` at once.

*Fail closed.* ``decide()`` never turns a failure into an allow. It raises
``PolicyUnavailable`` (503 ``policy_unavailable``) when no valid policy is loaded, when
evaluation raises, and when evaluation exceeds its time budget. The budget is measured on the
thread's CPU clock (``time.thread_time``) by default, not on the wall clock: what we want to
catch is an evaluation that is expensive (a pathological pattern, a huge chain), and on a busy
shared machine the wall clock would also count the time the OS spent running other processes,
turning load into spurious 503s. An over-budget result is discarded, not trusted. (The CPU
clock is a system call, the wall clock is not, and CPU time never exceeds wall time: so with
the default clock an evaluation is timed on the wall clock, and only one that looks over
budget there is evaluated again -- it is pure -- and timed on the CPU clock.)

*Emergency fail-open.* An admin may open a window of at most ``fail_open_max_seconds``
(mandatory reason). Inside it, and only for requests that would have received
``policy_unavailable``, the request is admitted with ``Decision(source="fail_open")``. The
window changes nothing else: a loaded policy still evaluates normally (its explicit denies and
its default deny stand), and an over-budget evaluation whose late result was an explicit deny
still denies (we know it was denied; we only do not trust it enough to allow). When evaluation
*raised* there is no decision to consult, so the request is admitted. Authentication is not
ours: it happens before the engine is asked.

The window lives in memory only (a restart closes it), closes at its deadline even with no
traffic (``run_fail_open_timer``, a trio task sleeping until the deadline) and is also checked
against the clock on every use, so a late or missing timer task cannot extend it. Opening,
every admission and closing are CRITICAL audit events. Auditing is mandatory where it grants
something: if the audit sink raises, the window does not open and a fail-open admission is
refused (fail closed). Closing always happens; a failure to audit it is logged and, for an
admin's explicit close, re-raised after the window is closed.

*Audit sink contract.* ``audit(event: str, severity: str, **fields)`` with severity
``"info"``, ``"warning"`` or ``"critical"``; field values are plain JSON data and never secrets
(key ids yes, keys no). A ``QpherError`` raised by the sink propagates as is (its code, e.g.
``audit_unavailable``, says what happened); any other exception becomes
``PolicyUnavailable``.

Deadlines use ``clock`` (default ``trio.current_time``, so that ``trio.testing.MockClock`` drives
them in tests and the timer task sleeps on the same clock); ``wall_clock`` only labels times in
audit records and in ``fail_open_state()``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import trio

from ..errors import InvalidInput, PolicyDenied, PolicyInvalid, PolicyUnavailable, QpherError
from ._rules import PolicySet
from .evaluate import evaluate
from .loader import PolicyIssue, load_policy_dir, policy_files
from .model import Decision, Plan, RequestFacts

__all__ = ["PolicyEngine", "FailOpenState", "ReloadResult", "AuditFn", "DEFAULT_EVAL_BUDGET_S",
           "DEFAULT_FAIL_OPEN_MAX_SECONDS"]

logger = logging.getLogger("qpher.policy")

AuditFn = Callable[..., object]  # audit(event: str, severity: str, **fields); its result is unused
DEFAULT_EVAL_BUDGET_S = 0.005  # config policy.eval_budget_ms default
DEFAULT_FAIL_OPEN_MAX_SECONDS = 300.0  # config policy.fail_open.max_seconds default
MAX_FAIL_OPEN_REASON_CHARS = 500


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class FailOpenState:
    """For metrics and the admin endpoint. Times are UTC wall-clock times."""

    active: bool
    reason: str | None = None
    opened_by: str | None = None
    opened_at: datetime | None = None
    deadline: datetime | None = None
    remaining_seconds: float | None = None
    admissions: int = 0


@dataclass(frozen=True, slots=True)
class ReloadResult:
    ok: bool  # the directory is valid (and, if changed, now in force)
    changed: bool  # a new revision took effect
    revision: str | None  # the revision in force afterwards
    issues: tuple[PolicyIssue, ...] = ()


@dataclass(slots=True)
class _Window:
    reason: str
    opened_by: str
    opened_at: datetime
    deadline_wall: datetime
    deadline: float  # on ``clock``
    admissions: int = 0


class PolicyEngine:
    """See the module docstring. Call ``reload()`` once at start-up (its result says whether a
    valid policy is in force), run ``watch()`` and ``run_fail_open_timer()`` as trio tasks
    (or ``run()`` for both), and ask ``decide()``/``authorize()`` per request."""

    def __init__(
        self,
        policy_dir: str | os.PathLike[str],
        audit: AuditFn,
        *,
        clock: Callable[[], float] | None = None,
        wall_clock: Callable[[], datetime] = _utcnow,
        eval_clock: Callable[[], float] = time.thread_time,
        eval_budget_s: float = DEFAULT_EVAL_BUDGET_S,
        fail_open_max_seconds: float = DEFAULT_FAIL_OPEN_MAX_SECONDS,
        audit_decisions: bool = True,
    ) -> None:
        if not eval_budget_s > 0:
            raise ValueError(f"eval_budget_s must be positive, not {eval_budget_s!r}")
        if not fail_open_max_seconds > 0:
            raise ValueError(f"fail_open_max_seconds must be positive, not {fail_open_max_seconds!r}")
        self._dir = policy_dir
        self._audit = audit
        self._clock = clock if clock is not None else trio.current_time
        self._wall_clock = wall_clock
        self._eval_clock = eval_clock
        self._budget = eval_budget_s
        self.fail_open_max_seconds = float(fail_open_max_seconds)
        self._audit_decisions = audit_decisions
        self._policy: PolicySet | None = None
        self._uses_usage: tuple[PolicySet | None, bool] = (None, False)
        self._seen: tuple[tuple[str, int, int], ...] | None = None
        self._window: _Window | None = None
        self._timer_wakeup: trio.Event | None = None
        # counters, read by the metrics layer
        self.reloads_total = 0
        self.reload_failures_total = 0
        self.unavailable_total = 0
        self.eval_errors_total = 0
        self.budget_exceeded_total = 0
        self.fail_open_admissions_total = 0

    # ---- current policy ---------------------------------------------------------------------
    @property
    def policy_set(self) -> PolicySet | None:
        return self._policy

    @property
    def revision(self) -> str | None:
        """The revision of the policy in force, None while there is none."""
        ps = self._policy
        return None if ps is None else ps.revision

    @property
    def ready(self) -> bool:
        """A valid policy is in force (for ``/readyz``)."""
        return self._policy is not None

    @property
    def uses_usage(self) -> bool:
        """Whether some rule of the current policy looks at usage (``usage_over``): if none
        does, the pipeline need not gather this month's counters for the facts."""
        ps = self._policy
        if ps is None:
            return False
        cached = self._uses_usage
        if cached[0] is not ps:
            flag = any("usage_over" in r.match or (r.unless is not None and "usage_over" in r.unless)
                       for r in ps.rules)
            cached = self._uses_usage = (ps, flag)
        return cached[1]

    def plan(self, name: str) -> Plan | None:
        """The plan ``name`` in the current policy (rate limits and quotas), or None."""
        ps = self._policy
        return None if ps is None else ps.plans.get(name)

    def _snapshot(self) -> tuple[tuple[str, int, int], ...]:
        try:
            files, _ = policy_files(self._dir)
            out = []
            for p in files:
                st = p.stat()
                out.append((p.name, st.st_mtime_ns, st.st_size))
            return tuple(out)
        except OSError as exc:
            return (("<unreadable>", exc.errno or 0, 0),)

    def reload(self) -> ReloadResult:
        """Load the directory; a valid new version replaces the current one (if it can be
        audited), an invalid one is rejected and the last good one stays. Never raises."""
        snapshot = self._snapshot()
        previous = self._policy
        prev_rev = previous.revision if previous is not None else None
        try:
            ps = load_policy_dir(self._dir)
        except PolicyInvalid as exc:
            issues = tuple(i for i in exc.issues if isinstance(i, PolicyIssue))
            self._seen = snapshot
            self._reject(issues, prev_rev)
            return ReloadResult(False, False, prev_rev, issues)
        except Exception as exc:  # a loader bug must not take the last good policy with it
            logger.error("policy reload failed unexpectedly", exc_info=True)
            issue = PolicyIssue(str(self._dir), 0, "(load)", f"unexpected {type(exc).__name__}")
            self._seen = snapshot
            self._reject((issue,), prev_rev)
            return ReloadResult(False, False, prev_rev, (issue,))
        if previous is not None and ps.revision == prev_rev:
            self._seen = snapshot
            return ReloadResult(True, False, prev_rev)
        try:
            self._audit("policy.reload", "info", revision=ps.revision, previous_revision=prev_rev,
                        files=[os.path.basename(n) for n in ps.files], rules=len(ps.rules),
                        plans=sorted(ps.plans))
        except Exception:
            # Not applied, and the snapshot is not recorded: the watcher tries again next poll.
            self.reload_failures_total += 1
            logger.error("policy revision %s not applied: the reload could not be audited",
                         ps.short_revision, exc_info=True)
            issue = PolicyIssue(
                str(self._dir), 0, "(audit)", "the audit log is unavailable; change not applied"
            )
            return ReloadResult(False, False, prev_rev, (issue,))
        self._policy = ps
        self._seen = snapshot
        self.reloads_total += 1
        logger.info("policy revision %s in force (%d files, %d rules, %d plans)",
                    ps.short_revision, len(ps.files), len(ps.rules), len(ps.plans))
        return ReloadResult(True, True, ps.revision)

    def _reject(self, issues: tuple[PolicyIssue, ...], kept: str | None) -> None:
        self.reload_failures_total += 1
        logger.error(
            "policy reload rejected (%d problems); %s",
            len(issues),
            f"revision {kept[:12]} stays in force"
            if kept
            else "no policy is in force: every request gets 503",
        )
        for issue in issues[:50]:
            logger.error("  %s", issue)
        try:
            self._audit("policy.reload_rejected", "warning", kept_revision=kept,
                        problems=len(issues), first_problems=[str(i) for i in issues[:10]])
        except Exception:
            logger.critical("could not audit a rejected policy reload", exc_info=True)

    async def areload(self) -> ReloadResult:
        """``reload()`` for trio code (it reads a few small files synchronously)."""
        await trio.lowlevel.checkpoint()
        return self.reload()

    async def watch(self, interval: float = 2.0, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Poll the directory every ``interval`` seconds; reload when its file list changes.
        A broken version is tried once per change, not once per poll."""
        if not interval > 0:
            raise ValueError(f"interval must be positive, not {interval!r}")
        task_status.started()
        while True:
            await trio.sleep(interval)
            if self._snapshot() != self._seen:
                self.reload()

    async def run(self, reload_interval: float | None = 2.0, *,
                  task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Both background tasks: the fail-open timer and (unless None) the file watcher."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.run_fail_open_timer)
            if reload_interval is not None:
                await nursery.start(self.watch, reload_interval)
            task_status.started()

    # ---- decisions ----------------------------------------------------------------------------
    def decide(self, facts: RequestFacts) -> Decision:
        """The decision for ``facts`` (allow or deny), or ``PolicyUnavailable`` (fail closed);
        inside a fail-open window, failures admit instead (see the module docstring)."""
        ps = self._policy
        if ps is None:
            return self._unavailable(facts, "no valid policy is loaded", None, None)
        eval_clock = self._eval_clock
        # thread_time is a real system call (~0.4 us), perf_counter is not; and a thread cannot
        # use more CPU than wall time passes. So with the default clock the wall clock is read
        # first, and only an evaluation that took longer than the budget in wall time is timed
        # again (evaluate is pure: the same facts give the same decision) on the CPU clock.
        wall_first = eval_clock is time.thread_time
        t0 = time.perf_counter() if wall_first else eval_clock()
        try:
            decision = evaluate(ps, facts)
        except Exception as exc:  # the policy boundary: any evaluation failure fails closed
            self.eval_errors_total += 1
            logger.error("policy evaluation failed (revision %s): %s", ps.short_revision,
                         type(exc).__name__, exc_info=True)
            return self._unavailable(facts, "policy evaluation failed", None, exc)
        if wall_first:
            elapsed = time.perf_counter() - t0
            if elapsed > self._budget:
                t0 = eval_clock()
                try:
                    decision = evaluate(ps, facts)
                except Exception as exc:  # pragma: no cover - it did not raise the first time
                    self.eval_errors_total += 1
                    return self._unavailable(facts, "policy evaluation failed", None, exc)
                elapsed = eval_clock() - t0
        else:
            elapsed = eval_clock() - t0
        if elapsed > self._budget:
            self.budget_exceeded_total += 1
            logger.warning("policy evaluation took %.3f ms, over its %.3f ms budget (revision %s)",
                           elapsed * 1e3, self._budget * 1e3, ps.short_revision)
            return self._unavailable(facts, "policy evaluation exceeded its time budget", decision, None)
        if self._audit_decisions:
            self._audit_decision(facts, decision)
        return decision

    def authorize(self, facts: RequestFacts) -> Decision:
        """``decide()``, raising ``PolicyDenied`` (403 ``policy_denied``) for a deny."""
        decision = self.decide(facts)
        if decision.effect != "allow":
            raise PolicyDenied(decision.rule_id, decision.reason)
        return decision

    def _audit_decision(self, facts: RequestFacts, decision: Decision) -> None:
        # _audit_or_fail inlined: this runs once per request
        try:
            self._audit(
                "policy.decision", "info" if decision.effect == "allow" else "warning",
                request_id=facts.request_id, tenant=facts.tenant, api_key_id=facts.api_key_id,
                method=facts.method, path=facts.path, operation=facts.operation, algorithm=facts.algorithm,
                effect=decision.effect, rule_id=decision.rule_id, source=decision.source,
                revision=decision.revision[:12] if decision.revision else None,
            )
        except QpherError:
            raise
        except Exception as exc:
            raise PolicyUnavailable("the audit log is unavailable") from exc

    def _unavailable(self, facts: RequestFacts, why: str, late: Decision | None,
                     cause: BaseException | None) -> Decision:
        self.unavailable_total += 1
        window = self._open_window()
        if window is None:
            try:
                self._audit("policy.unavailable", "warning", request_id=facts.request_id,
                            tenant=facts.tenant, api_key_id=facts.api_key_id, method=facts.method,
                            path=facts.path, operation=facts.operation, cause=why)
            except Exception:  # already refusing; the failure to record it is logged
                logger.error("could not audit a policy_unavailable refusal", exc_info=True)
            raise PolicyUnavailable(f"policy unavailable: {why}") from cause
        if late is not None and late.effect == "deny" and late.source == "rule":
            self._audit_decision(facts, late)
            return late  # an explicit deny still denies inside the window
        self._audit_or_fail(
            "policy.fail_open.admit", "critical", request_id=facts.request_id, tenant=facts.tenant,
            api_key_id=facts.api_key_id, method=facts.method, path=facts.path,
            operation=facts.operation, algorithm=facts.algorithm, cause=why,
            window_reason=window.reason, window_deadline=window.deadline_wall.isoformat(),
        )
        window.admissions += 1
        self.fail_open_admissions_total += 1
        ps = self._policy
        return Decision("allow", None, f"admitted by the emergency fail-open window ({why})", "fail_open",
                        ps.revision if ps is not None else None)

    def _audit_or_fail(self, event: str, severity: str, **fields: Any) -> None:
        try:
            self._audit(event, severity, **fields)
        except QpherError:
            raise
        except Exception as exc:
            raise PolicyUnavailable("the audit log is unavailable") from exc

    # ---- emergency fail-open ------------------------------------------------------------------
    def open_fail_open(self, reason: str, actor_key_id: str, seconds: float) -> FailOpenState:
        """Open (or replace) the emergency window for ``seconds`` (at most
        ``fail_open_max_seconds``). Refused with InvalidInput for a missing reason or a bad
        duration, and not opened at all if the opening cannot be audited."""
        if not isinstance(reason, str) or not reason.strip():
            raise InvalidInput("fail-open needs a non-empty reason")
        reason = reason.strip()
        if len(reason) > MAX_FAIL_OPEN_REASON_CHARS:
            raise InvalidInput(f"fail-open reason must be at most {MAX_FAIL_OPEN_REASON_CHARS} characters")
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in reason):
            raise InvalidInput("fail-open reason must be one line of printable text")
        if not isinstance(actor_key_id, str) or not actor_key_id:
            raise InvalidInput("fail-open needs the id of the admin key that opens it")
        if (isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds)
                or not 0 < seconds <= self.fail_open_max_seconds):
            raise InvalidInput(
                f"fail-open window must last more than 0 and at most {self.fail_open_max_seconds:g} "
                f"seconds, not {seconds!r}")
        now, wall = self._clock(), self._wall_clock()
        window = _Window(reason, actor_key_id, wall, wall + timedelta(seconds=seconds), now + seconds)
        previous = self._open_window()
        self._audit_or_fail(
            "policy.fail_open.opened", "critical", reason=reason, opened_by=actor_key_id,
            seconds=float(seconds), deadline=window.deadline_wall.isoformat(),
            max_seconds=self.fail_open_max_seconds, replaces_open_window=previous is not None,
        )
        self._window = window
        logger.critical("EMERGENCY FAIL-OPEN window opened by key %s for %g s: %s",
                        actor_key_id, seconds, reason)
        self._wake_timer()
        return self.fail_open_state()

    def close_fail_open(self, actor_key_id: str) -> FailOpenState:
        """Close the window now (no-op when none is open). The window is closed even if the
        closing cannot be audited; that failure is then raised to the admin."""
        self._close_window("closed by admin", actor_key_id, raise_audit_error=True)
        return self.fail_open_state()

    def fail_open_state(self) -> FailOpenState:
        w = self._open_window()
        if w is None:
            return FailOpenState(False)
        return FailOpenState(True, w.reason, w.opened_by, w.opened_at, w.deadline_wall,
                             max(0.0, w.deadline - self._clock()), w.admissions)

    def _open_window(self) -> _Window | None:
        """The open window, closing it first if its deadline has passed."""
        w = self._window
        if w is not None and self._clock() >= w.deadline:
            self._close_window("deadline reached", None, raise_audit_error=False)
            return None
        return w

    def _close_window(self, cause: str, actor: str | None, *, raise_audit_error: bool) -> None:
        w = self._window
        if w is None:
            return
        self._window = None
        self._wake_timer()
        logger.critical("emergency fail-open window closed (%s) after %d admissions", cause, w.admissions)
        try:
            self._audit("policy.fail_open.closed", "critical", cause=cause, closed_by=actor,
                        reason=w.reason, opened_by=w.opened_by, opened_at=w.opened_at.isoformat(),
                        deadline=w.deadline_wall.isoformat(), admissions=w.admissions)
        except Exception as exc:
            logger.critical("could not audit the closing of the fail-open window", exc_info=True)
            if raise_audit_error:
                if isinstance(exc, QpherError):
                    raise
                raise PolicyUnavailable("fail-open window closed, but the audit log is unavailable") from exc

    def _wake_timer(self) -> None:
        if self._timer_wakeup is not None:
            self._timer_wakeup.set()

    async def run_fail_open_timer(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Close the window at its deadline even when no request arrives."""
        task_status.started()
        while True:
            self._timer_wakeup = wakeup = trio.Event()
            w = self._open_window()
            if w is None:
                await wakeup.wait()
                continue
            with trio.move_on_after(max(0.0, w.deadline - self._clock())):
                await wakeup.wait()
            # woken early (opened again, closed) or deadline: _open_window() sorts it out
