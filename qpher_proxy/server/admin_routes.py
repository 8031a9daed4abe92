"""The server's own authenticated routes: ``/metrics`` and the ``/admin`` emergency switch.

``/metrics`` is authorized by the policy like any operation. The ``/admin`` routes are not:
the fail-open switch must work exactly when the policy engine does not, so the admin scope is
checked here instead, and every use is audited by the engine.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast

from ..api.validation import REQUEST_FIELDS, load_object, parse_fields
from ..auth.apikeys import APIKeyRecord
from ..errors import BadRequest, NotFound, PolicyDenied
from ..http import Request, Response
from ..metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from ..metrics import Metrics
from ..policy.engine import PolicyEngine

__all__ = ["AdminRoutes"]

_METRICS_HEADERS = ((b"content-type", METRICS_CONTENT_TYPE.encode()),)


class AdminRoutes:
    """Serves the operations ``metrics``, ``admin.fail_open.set`` and ``admin.fail_open.clear``."""

    def __init__(self, policy: PolicyEngine, metrics: Metrics) -> None:
        self.policy = policy
        self.metrics = metrics

    @staticmethod
    def require_admin(record: APIKeyRecord) -> None:
        """403 unless the key holds the admin scope."""
        if not record.has_scope("admin"):
            raise PolicyDenied("admin-scope-required", "admin endpoints need an API key with the admin scope")

    async def handle(self, operation: str, req: Request, record: APIKeyRecord) -> Response:
        if operation == "metrics":
            return self.render_metrics()
        if operation == "admin.fail_open.set":
            # openapi FailOpenRequest (reason and seconds, both required), as strict as /v1 bodies
            f = parse_fields(load_object(await req.read_body()), REQUEST_FIELDS["admin.fail_open.set"])
            reason, seconds = cast(str, f["reason"]), cast(float, f["seconds"])
            state = self.policy.open_fail_open(reason, record.key_id, seconds)
            return Response.json(200, _fail_open_json(state))
        if operation == "admin.fail_open.clear":
            if load_object(await req.read_body(), allow_empty=True):  # no body, or {}
                raise BadRequest("DELETE /admin/fail-open takes no fields", code="invalid_input")
            return Response.json(200, _fail_open_json(self.policy.close_fail_open(record.key_id)))
        raise NotFound("no such route", code="route_not_found")  # pragma: no cover

    def render_metrics(self) -> Response:
        """The exposition, with the policy engine's own state copied in at scrape time."""
        metrics, policy = self.metrics, self.policy
        metrics.fail_open_active.set(1.0 if policy.fail_open_state().active else 0.0)
        failures = metrics.policy_reload_failures
        failures.inc(max(0, policy.reload_failures_total - failures.value()))  # the engine's count only grows
        return Response(200, _METRICS_HEADERS, metrics.render())


def _fail_open_json(state: Any) -> dict[str, Any]:
    deadline = state.deadline
    return {
        "active": bool(state.active),
        "until": deadline.strftime("%Y-%m-%dT%H:%M:%SZ") if isinstance(deadline, datetime) else None,
        "reason": state.reason,
        "remaining_seconds": state.remaining_seconds,
        "admissions": state.admissions,
    }
