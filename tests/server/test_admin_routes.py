"""The server's own routes: ``/metrics`` shows the policy engine's state at scrape time."""

from __future__ import annotations

from pathlib import Path

from qpher_proxy.audit import AuditLog
from qpher_proxy.metrics import Metrics
from qpher_proxy.policy import PolicyEngine
from qpher_proxy.server.admin_routes import AdminRoutes

ALLOW = """\
version: 1
plans:
  pro:
    rate_limit: {requests_per_second: 10, burst: 10}
    algorithms: ["*"]
    operations: ["*"]
rules:
  - id: allow-pro
    effect: allow
    match: {plan: pro}
    reason: pro plan
"""

FAILURES = "qpher_policy_reload_failures_total"


def _scraped(routes: AdminRoutes, name: str) -> str:
    body = routes.render_metrics().body
    assert isinstance(body, bytes)
    return next(line for line in body.decode().splitlines() if line.startswith(name + " "))


def test_rejected_policy_reloads_are_counted_on_metrics(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "main.yaml").write_text(ALLOW)
    with AuditLog(tmp_path / "audit.log") as audit:
        engine = PolicyEngine(policies, audit)
        assert engine.reload().ok
        routes = AdminRoutes(engine, Metrics())
        assert _scraped(routes, FAILURES) == f"{FAILURES} 0"
        (policies / "main.yaml").write_text("version: 1\nrules: [{id: broken}]\n")
        assert not engine.reload().ok
        assert not engine.reload().ok
        assert _scraped(routes, FAILURES) == f"{FAILURES} 2"
        # a second scrape reports the same count, not twice it
        assert _scraped(routes, FAILURES) == f"{FAILURES} 2"
        assert _scraped(routes, "qpher_fail_open_active") == "qpher_fail_open_active 0"
