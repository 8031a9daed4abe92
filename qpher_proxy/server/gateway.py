"""The request pipeline: every request the gateway answers goes through ``Gateway.handle``.

Every route except ``/healthz`` and ``/readyz`` passes these stages, each a method with one
reason to fail::

    _route          the API route (405 for a known path with the wrong method; 404 when
                    nothing matches and there is no upstream)
    _authenticate   the API key from the headers only (400 api_key_in_url for one in the
                    query string), its record (401 unauthenticated, one body whatever the
                    cause; audited); the tenant comes from the record alone, never from a
                    client header
    _rate_limit     per key and per tenant, from the plan (429 rate_limited + Retry-After)
    _parse          the validated body (4xx)
    _authorize      the policy on the facts: route, operation, algorithm / key label (the key's
                    own, from the KMS, cached), this month's usage, source address, TLS group;
                    first deny wins, default deny, fail closed (403 policy_denied / 503
                    policy_unavailable); every decision is audited by the engine. A request to
                    forward is matched on its normalised, decoded path (400 ambiguous_path
                    when servers could read it differently)
    _count          the monthly quota (429 quota_exceeded + Retry-After)
    dispatch        the /v1 crypto API (``_api``: the KMS over the socketpair), the server's
                    own routes (``_own_route``: metrics and admin, ``admin_routes.py``) or the
                    upstream app (``_forward``: sidecar)
    audit           key lifecycle events (``_audit_lifecycle``); the access log line and the
                    request metrics once the response is sent (``request_done``)

Errors are :class:`~qpher_proxy.errors.QpherError` all the way and are rendered once, by the
HTTP layer, as ``{"error": {"code", "message", "request_id"}}``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Protocol

from ..api import CryptoAPI, ParsedRequest, Route, RouteMethodNotAllowed, resolve
from ..api.validation import IDEMPOTENT_OPERATIONS
from ..audit import AuditLog
from ..auth.apikeys import APIKeyRecord, Authenticator
from ..auth.headers import extract_api_key, redact_target
from ..context import TenantContext
from ..errors import (
    AuditUnavailable,
    BadRequest,
    KeyNotFound,
    NotFound,
    PolicyDenied,
    PolicyUnavailable,
    QpherError,
    QuotaExceeded,
    RateLimited,
    Unauthenticated,
)
from ..http import Request, Response
from ..http.messages import error_response
from ..kms.client import KMSClient
from ..logs import AccessLog
from ..metrics import Metrics
from ..policy.engine import PolicyEngine
from ..policy.model import RequestFacts
from ..ratelimit import QuotaCounter, RateLimits, TokenBucketLimiter
from ..ratelimit.redis_gcra import LocalRateLimiter
from ..upstream import (
    ForwardTarget,
    H2UpstreamClient,
    H2UpstreamResponse,
    UpstreamClient,
    normalize_target,
    prepare_downstream_headers,
    prepare_upstream_headers,
)
from ..upstream.websocket import downstream_101_headers, is_websocket_upgrade, upgrade_request_headers
from .admin_routes import AdminRoutes
from .audit_routes import AuditRoutes, Checkpointer
from .tunnels import Tunnels

log = logging.getLogger("qpher.gateway")

_JSON = (b"content-type", b"application/json")
_NO_META: list[tuple[str | None, str | None]] = [(None, None)]  # never mutated
_NO_USAGE: Mapping[str, int] = MappingProxyType({})
_HEALTH_BODY = b'{"status":"ok"}'
_IDEMPOTENCY_KEY = b"idempotency-key"  # read by key creation and rotation (api.validation)
_KEY_META_CACHE = 100_000  # (tenant, key id) -> (algorithm, label); metadata only, never key bytes
_FORWARD_MAX_BODY = 1 << 62  # sidecar bodies are streamed, not limited (nginx: client_max_body_size 0)
_LIFECYCLE_EVENTS = {
    "keys.create": "key.created", "keys.rotate": "key.rotated", "keys.disable": "key.disabled",
    "keys.enable": "key.enabled", "keys.destroy": "key.destroy_scheduled",
    "keys.cancel_destroy": "key.destroy_cancelled", "keys.import": "key.imported",
    "keys.import_version": "key.version_imported",
}
_NEW_KEY_OPERATIONS = ("keys.create", "keys.import")  # the key's algorithm and label are in the body


class RateLimiter(Protocol):
    async def acquire(self, key_id: str, tenant: str, limits: RateLimits, cost: int = 1) -> None: ...


class BlockingQuotas(Protocol):
    """A quota counter on a remote database (``PgQuotaCounter``): ``ensure_loaded`` first."""

    blocking: bool

    async def ensure_loaded(self, tenant: str) -> None: ...
    def usage(self, tenant: str) -> dict[str, int]: ...
    def check_and_count(self, tenant: str, op_class: str, limit: int | None, n: int = 1) -> int: ...


class Gateway:
    def __init__(
        self,
        *,
        kms: KMSClient,
        api: CryptoAPI,
        authenticator: Authenticator,
        limiter: TokenBucketLimiter | RateLimiter,
        quotas: QuotaCounter | BlockingQuotas,
        policy: PolicyEngine,
        audit: AuditLog,
        metrics: Metrics,
        upstream: UpstreamClient | H2UpstreamClient | None = None,
        pass_api_key: bool = False,
        allow_path_params: bool = False,
        kms_ready: Any = None,
        checkpointer: Checkpointer | None = None,
        tunnels: Tunnels | None = None,
    ) -> None:
        self.kms = kms
        self.api = api
        self.auth = authenticator
        # every limiter is awaited alike: in-process buckets (one process), the host's shared
        # memory (server.workers > 1) or Redis (ratelimit.backend: redis)
        self.limiter: RateLimiter = (
            LocalRateLimiter(limiter) if isinstance(limiter, TokenBucketLimiter) else limiter
        )
        self.quotas = quotas
        # PostgreSQL counters load a tenant's month in a thread before its first count
        self._quotas_load: Any = (
            getattr(quotas, "ensure_loaded", None) if getattr(quotas, "blocking", False) else None
        )
        self.policy = policy
        self.audit = audit
        self.metrics = metrics
        self._admin = AdminRoutes(policy, metrics)
        self.checkpointer = checkpointer if checkpointer is not None else Checkpointer(audit, kms)
        self._audit_routes = AuditRoutes(audit, self.checkpointer)
        self.upstream = upstream
        self.tunnels = tunnels if tunnels is not None else Tunnels(audit, metrics)
        self.pass_api_key = pass_api_key
        self.allow_path_params = allow_path_params
        self._kms_ready = kms_ready if kms_ready is not None else (lambda: kms.ready)
        self._key_meta: OrderedDict[tuple[str, str], tuple[str, str | None]] = OrderedDict()
        self._limits_cache: dict[str, tuple[Any, RateLimits]] = {}
        self._scope_sets: dict[tuple[str, ...], frozenset[str]] = {}
        self._access = AccessLog()

    # ---- readiness ------------------------------------------------------------------------

    def readiness(self) -> dict[str, Any]:
        """``/readyz``: ready only while requests can be served -- a KMS worker is live, a
        policy is loaded and audit records can be written (an audited request is refused
        otherwise). Not ready names the reasons. Cheap: no audit record per probe. The policy
        revision in force is shown either way, so an admin can tell which rules are live."""
        audit = self.audit.health()
        checks = {"kms": bool(self._kms_ready()), "policy": self.policy.ready, "audit": audit is None}
        policy = {"revision": self.policy.revision}
        if all(checks.values()):
            return {"status": "ready", "checks": checks, "policy": policy}
        reasons: dict[str, str] = {}
        if not checks["kms"]:
            reasons["kms"] = "no KMS worker is running"
        if not checks["policy"]:
            reasons["policy"] = "no valid policy is loaded"
        if audit is not None:
            reasons["audit"] = audit
        return {"status": "not_ready", "checks": checks, "reasons": reasons, "policy": policy}

    # ---- the handler ----------------------------------------------------------------------

    async def handle(self, req: Request) -> Response:
        path = req.path
        if path == "/healthz" and req.method in ("GET", "HEAD"):
            req.state["route"] = "GET /healthz"
            return Response(200, (_JSON,), _HEALTH_BODY)
        if path == "/readyz" and req.method in ("GET", "HEAD"):
            req.state["route"] = "GET /readyz"
            r = self.readiness()
            return Response.json(200 if r["status"] == "ready" else 503, r)
        try:
            return await self._handle(req)
        except QpherError as exc:
            return error_response(exc, req.request_id)

    async def _handle(self, req: Request) -> Response:
        route, params = self._route(req)
        record = await self._authenticate(req)
        if route is None and self.upstream is None:
            raise NotFound(f"no route for {req.method} {redact_target(req.path)}", code="route_not_found")
        await self._rate_limit(record)
        if self._quotas_load is not None:
            await self._quotas_load(record.tenant)
        if route is None:
            return await self._forward(req, record)
        if route.owner == "api":
            return await self._api(req, record, route, params)
        return await self._own_route(req, record, route)

    # ---- the stages, in order -------------------------------------------------------------

    def _route(self, req: Request) -> tuple[Route | None, dict[str, str]]:
        """The API route of the request (None: forward it, or 404), named in ``req.state``;
        405 for a known path with the wrong method."""
        try:
            resolved = resolve(req.method, req.path)
        except RouteMethodNotAllowed:
            req.state["route"] = "method_not_allowed"
            raise
        if resolved is None:
            req.state["route"] = "upstream" if self.upstream else "unmatched"
            return None, {}
        route, params = resolved
        req.state["route"] = route.name
        return route, params

    async def _authenticate(self, req: Request) -> APIKeyRecord:
        """The key's record, named in ``req.state``; 401 unauthenticated (or 400 api_key_in_url),
        audited either way."""
        try:
            api_key = extract_api_key(req.headers, req.query, path=req.path)
            record = await self.auth.authenticate_async(api_key)
        except Unauthenticated as exc:
            self._audit_auth_failure(
                req, exc.code, getattr(exc, "reason", None), getattr(exc, "key_id", None)
            )
            raise
        except QpherError as exc:  # api_key_in_url
            self._audit_auth_failure(req, exc.code, exc.code, None)
            raise
        req.state["tenant"] = record.tenant
        req.state["api_key_id"] = record.key_id
        return record

    def _audit_auth_failure(self, req: Request, code: str, reason: str | None, key_id: str | None) -> None:
        try:
            self.audit.record("auth.failure", "warning", request_id=req.request_id, code=code,
                              reason=reason, api_key_id=key_id, source_ip=req.client_addr,
                              method=req.method, path=redact_target(req.path))
        except QpherError as exc:
            raise AuditUnavailable("the audit log is unavailable") from exc

    def _plan_limits(self, plan_name: str) -> RateLimits | None:
        ps = self.policy.policy_set
        cached = self._limits_cache.get(plan_name)
        if cached is not None and cached[0] is ps:
            return cached[1]
        plan = self.policy.plan(plan_name)
        if plan is None:
            return None
        trl = plan.tenant_rate_limit
        limits = RateLimits(
            plan.rate_limit.requests_per_second, plan.rate_limit.burst,
            trl.requests_per_second if trl else None, trl.burst if trl else 1,
        )
        self._limits_cache[plan_name] = (ps, limits)
        return limits

    def _scopes(self, record: APIKeyRecord) -> frozenset[str]:
        """The key's scopes as the frozenset the policy facts hold, built once per record."""
        cached = self._scope_sets.get(record.scopes)
        if cached is None:
            if len(self._scope_sets) >= _KEY_META_CACHE:
                self._scope_sets.clear()
            cached = self._scope_sets[record.scopes] = frozenset(record.scopes)
        return cached

    async def _rate_limit(self, record: APIKeyRecord) -> None:
        """429 rate_limited when the key or its tenant is over the plan's rate."""
        limits = self._plan_limits(record.plan)
        if limits is None:
            return  # an unknown plan is denied by policy (default deny / plan rules)
        try:
            await self.limiter.acquire(record.key_id, record.tenant, limits)
        except RateLimited as exc:
            self.metrics.rate_limited.labels(getattr(exc, "scope", None) or "api_key").inc()
            raise

    async def _parse(self, req: Request, route: Route, params: dict[str, str]) -> ParsedRequest:
        """The validated request (4xx on bad input). Routes without fields still take an empty
        body or {} (anything else is refused by parse); GET bodies are never read."""
        body = await req.read_body() if route.method != "GET" or route.has_body else b""
        if route.operation in IDEMPOTENT_OPERATIONS:
            return self.api.parse(
                route, body, params, req.query, idempotency_key=req.header_values(_IDEMPOTENCY_KEY)
            )
        return self.api.parse(route, body, params, req.query)

    def _authorize(
        self, req: Request, record: APIKeyRecord, operation: str, algorithm: str | None = None,
        label: str | None = None, *, path: str | None = None,
    ) -> None:
        """403 policy_denied / 503 policy_unavailable unless the policy allows the request."""
        policy = self.policy
        tls = req.tls
        facts = RequestFacts(
            tenant=record.tenant,
            plan=record.plan,
            scopes=self._scopes(record),
            api_key_id=record.key_id,
            method=req.method,
            path=req.path if path is None else path,
            operation=operation,
            algorithm=algorithm,
            key_label=label,
            source_ip=req.client_addr,
            tls_group=tls.group if tls is not None else None,
            tls_pq=tls is not None and tls.post_quantum,
            now=datetime.now(UTC),
            # this month's counters are copied only when some rule reads them (usage_over)
            usage=self.quotas.usage(record.tenant) if policy.uses_usage else _NO_USAGE,
            request_id=req.request_id,
        )
        try:
            decision = policy.authorize(facts)
        except PolicyDenied as exc:
            self.metrics.policy_decisions.labels(exc.rule_id or "default", "deny").inc()
            raise
        except PolicyUnavailable:
            self.metrics.policy_decisions.labels("unavailable", "deny").inc()
            raise
        self.metrics.policy_decisions.labels(decision.rule_id or decision.source, decision.effect).inc()

    def _count(self, record: APIKeyRecord, quota_class: str | None, cost: int) -> None:
        """429 quota_exceeded when ``cost`` more operations would pass the plan's monthly quota."""
        if quota_class is None or cost <= 0:
            return
        plan = self.policy.plan(record.plan)
        limit = plan.quotas.get(quota_class) if plan is not None else None
        try:
            self.quotas.check_and_count(record.tenant, quota_class, limit, n=cost)
        except QuotaExceeded:
            self.metrics.rate_limited.labels("quota").inc()
            raise

    async def _api(
        self, req: Request, record: APIKeyRecord, route: Route, params: dict[str, str]
    ) -> Response:
        """parse -> authorize (per key the request names) -> count -> dispatch to the KMS -> audit."""
        ctx = TenantContext(record.tenant, req.request_id, record.key_id)
        parsed = await self._parse(req, route, params)
        operation = route.operation
        for algorithm, label in await self._subjects(ctx, operation, parsed):
            self._authorize(req, record, operation, algorithm, label)
        self._count(record, route.quota, parsed.cost)
        tls = req.tls
        answer = await self.api.respond(
            parsed, ctx, tls_version=tls.version if tls is not None else None,
            tls_group=tls.group if tls is not None else None,
        )
        self._audit_lifecycle(req, record, operation, answer.body, replayed=answer.replayed,
                              import_job_id=parsed.fields.get("import_job_id"))
        return Response.json(answer.status, answer.body, answer.headers)

    async def _subjects(
        self, ctx: TenantContext, operation: str, parsed: ParsedRequest
    ) -> list[tuple[str | None, str | None]]:
        """The (algorithm, key label) pairs the policy decides on: the new (or imported) key's,
        or those of the keys the request names."""
        if operation in _NEW_KEY_OPERATIONS:
            f = parsed.fields
            return [(f["algorithm"], f.get("label"))]
        key_ids = parsed.key_ids()
        return await self._key_metas(ctx, key_ids) if key_ids else _NO_META

    def _audit_lifecycle(
        self, req: Request, record: APIKeyRecord, operation: str, obj: dict[str, Any], *,
        replayed: bool = False, import_job_id: str | None = None,
    ) -> None:
        """A key lifecycle event for the operations that change a key; ``idempotent_replay``
        when the answer repeats an earlier request's (nothing changed this time); an import's
        ``origin`` and job."""
        event = _LIFECYCLE_EVENTS.get(operation)
        if event is None:
            return
        extra: dict[str, Any] = {"idempotent_replay": True} if replayed else {}
        if import_job_id is not None:
            extra.update(origin="imported", import_job_id=import_job_id)
        self.audit.record(event, "info", request_id=req.request_id, tenant=record.tenant,
                          api_key_id=record.key_id, key_id=obj.get("key_id"),
                          algorithm=obj.get("algorithm"), version=obj.get("version"), **extra)
        if operation in _NEW_KEY_OPERATIONS and isinstance(obj.get("key_id"), str):
            self._remember_key(record.tenant, obj["key_id"], obj.get("algorithm"), obj.get("label"))

    async def _own_route(self, req: Request, record: APIKeyRecord, route: Route) -> Response:
        """authorize (the admin scope for /admin, the policy otherwise) -> count -> dispatch."""
        if route.admin:
            self._admin.require_admin(record)
        else:
            self._authorize(req, record, route.operation)
            self._count(record, route.quota, 1)
        if route.operation.startswith("audit."):
            return await self._audit_routes.handle(route.operation, req)
        return await self._admin.handle(route.operation, req, record)

    async def _key_metas(
        self, ctx: TenantContext, key_ids: tuple[str, ...]
    ) -> list[tuple[str | None, str | None]]:
        """The (algorithm, label) of each distinct key, for policy. Cached per (tenant, key):
        neither changes over a key's life. A key the tenant does not own is key_not_found."""
        cache = self._key_meta
        if len(key_ids) == 1:  # the common case: one key, already known
            meta = cache.get((ctx.tenant_id, key_ids[0]))
            if meta is not None:
                cache.move_to_end((ctx.tenant_id, key_ids[0]))
                return [meta]
        seen: dict[tuple[str | None, str | None], None] = {}
        for kid in key_ids:
            meta = cache.get((ctx.tenant_id, kid))
            if meta is None:
                try:
                    info = await self.kms.get_key(ctx, kid)
                except KeyNotFound:
                    # Not this tenant's key (or no such key): the operation itself answers
                    # key_not_found -- for a batch, on that item alone.
                    continue
                meta = self._remember_key(ctx.tenant_id, kid, info.algorithm, info.label)
            else:
                cache.move_to_end((ctx.tenant_id, kid))
            seen[meta] = None
        return list(seen) or [(None, None)]

    def _remember_key(self, tenant: str, key_id: str, algorithm: Any, label: Any) -> tuple[str, str | None]:
        meta = (str(algorithm), label if isinstance(label, str) else None)
        cache = self._key_meta
        cache[(tenant, key_id)] = meta
        if len(cache) > _KEY_META_CACHE:
            cache.popitem(last=False)
        return meta

    def _forward_target(self, req: Request) -> ForwardTarget:
        """The normalised origin-form target of a request to forward (400 ambiguous_path if
        servers could read it differently, upstream.target)."""
        raw = req.target
        if raw[:1] != "/":  # absolute form: the HTTP layer has cut the path out of it
            q = raw.find("?")
            raw = req.path + raw[q:] if q >= 0 else req.path
        target = normalize_target(raw, allow_path_params=self.allow_path_params)
        if target.policy_path != req.path:
            # "/v1/%73ign" is forwarded because the router did not know it, yet it is one of
            # the proxy's own paths once decoded: the same resource must not be served by the
            # proxy under one spelling and by the upstream under another.
            try:
                ours = resolve(req.method, target.policy_path) is not None
            except RouteMethodNotAllowed:
                ours = True
            if ours:
                raise BadRequest("the request path is not forwarded: it is an encoded form of a path "
                                 "the proxy serves", code="ambiguous_path")
        return target

    async def _forward(self, req: Request, record: APIKeyRecord) -> Response:
        """authorize -> count -> dispatch to the upstream. The policy matches, and the upstream
        receives, one normalised target; the API routes keep the raw path, since the proxy
        alone interprets those."""
        target = self._forward_target(req)
        self._authorize(req, record, "forward", path=target.policy_path)
        self._count(record, "forward", 1)
        return await self._send_upstream(req, record, target)

    async def _send_upstream(self, req: Request, record: APIKeyRecord, target: ForwardTarget) -> Response:
        upstream = self.upstream
        assert upstream is not None
        h2 = isinstance(upstream, H2UpstreamClient)
        headers = prepare_upstream_headers(
            req.headers, client_ip=req.client_addr, proto="https", host=req.header(b"host"),
            tenant_id=record.tenant, api_key_id=record.key_id, request_id=req.request_id,
            pass_api_key=self.pass_api_key, keep_te_trailers=h2,
        )
        if is_websocket_upgrade(req.method, req.headers):
            return await self._open_websocket(req, record, target, headers)
        cl_raw = req.header(b"content-length")
        # HTTP/2 frames bodies itself (a gRPC call has no Content-Length): the stream says whether one follows
        has_body = (cl_raw is not None or req.header(b"transfer-encoding") is not None
                    or req.state.get("h2_body") is True)
        content_length = int(cl_raw) if cl_raw is not None and cl_raw.isdigit() else None
        body = req.body_chunks(max_bytes=_FORWARD_MAX_BODY) if has_body else None
        try:
            resp = await upstream.send(
                req.method, target.target, headers, body=body, content_length=content_length
            )
        except QpherError as exc:
            self.metrics.upstream_requests.labels(exc.code).inc()
            raise
        self.metrics.upstream_requests.labels(str(resp.status)).inc()
        # an HTTP/2 upstream's trailers (a gRPC server's grpc-status) follow the body downstream
        trailers = resp.trailers if isinstance(resp, H2UpstreamResponse) else None
        return Response(resp.status, prepare_downstream_headers(resp.headers), body=resp.body_chunks(),
                        forwarded=True, trailers=trailers)

    async def _open_websocket(
        self, req: Request, record: APIKeyRecord, target: ForwardTarget, headers: list[tuple[bytes, bytes]]
    ) -> Response:
        """The upstream's answer to a WebSocket upgrade: a 101 that hands the connection to a
        tunnel (``tunnels.py``), or its ordinary response."""
        upstream = self.upstream
        assert upstream is not None
        if not isinstance(upstream, UpstreamClient):
            # A WebSocket upgrade is an HTTP/1.1 exchange; RFC 8441 towards an HTTP/2 upstream is not built.
            raise QpherError("WebSocket passthrough needs upstream.protocol http1",
                             code="websocket_unsupported", status=501)
        try:
            hs, session = await self.tunnels.open(upstream, req, record, target.target, target.policy_path,
                                                  upgrade_request_headers(headers))
        except QpherError as exc:
            self.metrics.upstream_requests.labels(exc.code).inc()
            raise
        self.metrics.upstream_requests.labels(str(hs.status)).inc()
        if session is None:
            return Response(hs.status, prepare_downstream_headers(hs.headers), body=hs.body_chunks(),
                            forwarded=True)
        return Response(101, downstream_101_headers(hs.headers), forwarded=True, upgrade=session)

    # ---- per request, after the response ----------------------------------------------------

    def request_done(self, req: Request, status: int, duration: float, sent: int) -> None:
        route = req.state.get("route") or ("invalid" if not req.method else "unmatched")
        self.metrics.observe_request(route, status, duration)
        state = req.state
        self._access.write({
            "request_id": req.request_id, "tenant": state.get("tenant"),
            "api_key_id": state.get("api_key_id"), "method": req.method, "route": route,
            "status": status, "duration_ms": round(duration * 1e3, 3), "bytes_sent": sent,
            "client": req.client_addr,
        })

