"""The route table: every path the proxy serves itself, and nothing else.

``resolve(method, path)`` answers one of three things:

* ``(route, path_params)`` for a served method on a served path;
* ``None`` for a path the proxy does not serve at all: the pipeline forwards it to the
  upstream (sidecar mode) or answers 404;
* raises :class:`RouteMethodNotAllowed` (405 ``method_not_allowed``, with the ``Allow`` header
  in ``headers``) for a served path with another method.

Paths are matched exactly as received (no percent-decoding, no dot-segment removal, no
trailing-slash folding): ``/v1/keys/`` is not ``/v1/keys``. A query string, if the caller
leaves it on, is ignored. ``{key_id}`` matches any one non-empty segment; whether it is a
well-formed key id is checked later and answered like an unknown key (404 ``key_not_found``);
``{import_job_id}`` likewise (404 ``import_job_not_found``). A static path wins over a template:
``/v1/keys/import`` is the import route, never a key named ``import`` (no key id looks so).

``Route.name`` is the route *template* (``"POST /v1/keys/{key_id}/rotate"``): it is what
metrics and logs use as the ``route`` label, so a key id never reaches a label.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from ..errors import MethodNotAllowed

__all__ = ["Route", "ROUTES", "resolve", "RouteMethodNotAllowed", "routes_by_operation"]

Owner = Literal["api", "server"]


@dataclass(frozen=True, slots=True)
class Route:
    """One (method, path template) the proxy serves.

    ``operation`` is the policy fact (``"keys.create"``, ``"sign.batch"``, ...). ``quota`` is the
    rate-limit/quota class (``"sign"``, ``"verify"``, ``"kem"``, ``"encrypt"``, ``"keys"``,
    ``"info"``) or ``None`` for routes that are never counted. ``batch`` routes cost one quota
    unit per item (``ParsedRequest.cost``). ``owner`` says who answers: ``"api"`` routes are
    dispatched to :class:`qpher_proxy.api.CryptoAPI`, ``"server"`` routes (health, readiness,
    metrics, admin) are answered by the server itself. ``public`` routes need no credentials;
    ``admin`` routes need an admin key. ``status`` is the success status.
    """

    method: str
    template: str
    operation: str
    quota: str | None
    owner: Owner = "api"
    batch: bool = False
    public: bool = False
    admin: bool = False
    status: int = 200

    @property
    def name(self) -> str:
        return f"{self.method} {self.template}"

    @property
    def has_body(self) -> bool:
        """Whether the route reads a JSON request body."""
        return self.operation in _BODY_OPERATIONS


_BODY_OPERATIONS = frozenset({
    "keys.create", "keys.import", "keys.import_version", "import_jobs.create",
    "kem.encapsulate", "kem.decapsulate", "encrypt", "decrypt", "sign", "verify",
    "kem.encapsulate.batch", "kem.decapsulate.batch", "encrypt.batch", "decrypt.batch",
    "sign.batch", "verify.batch", "admin.fail_open.set",
})


def _r(method: str, template: str, operation: str, quota: str | None, **kw: object) -> Route:
    return Route(method, template, operation, quota, **kw)  # type: ignore[arg-type]


ROUTES: tuple[Route, ...] = (
    # key management
    _r("POST", "/v1/keys", "keys.create", "keys", status=201),
    _r("GET", "/v1/keys", "keys.list", "keys"),
    _r("GET", "/v1/keys/{key_id}", "keys.read", "keys"),
    _r("DELETE", "/v1/keys/{key_id}", "keys.destroy", "keys", status=202),
    _r("POST", "/v1/keys/{key_id}/rotate", "keys.rotate", "keys"),
    _r("POST", "/v1/keys/{key_id}/disable", "keys.disable", "keys"),
    _r("POST", "/v1/keys/{key_id}/enable", "keys.enable", "keys"),
    _r("POST", "/v1/keys/{key_id}/cancel-destroy", "keys.cancel_destroy", "keys"),
    # key import (BYOK): import jobs, then keys or key versions wrapped to a job's public key
    _r("POST", "/v1/import-jobs", "import_jobs.create", "keys", status=201),
    _r("GET", "/v1/import-jobs", "import_jobs.list", "keys"),
    _r("GET", "/v1/import-jobs/{import_job_id}", "import_jobs.read", "keys"),
    _r("POST", "/v1/keys/import", "keys.import", "keys", status=201),
    _r("POST", "/v1/keys/{key_id}/import-version", "keys.import_version", "keys"),
    # KEM
    _r("POST", "/v1/kem/encapsulate", "kem.encapsulate", "kem"),
    _r("POST", "/v1/kem/decapsulate", "kem.decapsulate", "kem"),
    _r("POST", "/v1/kem/encapsulate/batch", "kem.encapsulate.batch", "kem", batch=True),
    _r("POST", "/v1/kem/decapsulate/batch", "kem.decapsulate.batch", "kem", batch=True),
    # HPKE
    _r("POST", "/v1/encrypt", "encrypt", "encrypt"),
    _r("POST", "/v1/decrypt", "decrypt", "encrypt"),
    _r("POST", "/v1/encrypt/batch", "encrypt.batch", "encrypt", batch=True),
    _r("POST", "/v1/decrypt/batch", "decrypt.batch", "encrypt", batch=True),
    # signatures
    _r("POST", "/v1/sign", "sign", "sign"),
    _r("POST", "/v1/verify", "verify", "verify"),
    _r("POST", "/v1/sign/batch", "sign.batch", "sign", batch=True),
    _r("POST", "/v1/verify/batch", "verify.batch", "verify", batch=True),
    # service description
    _r("GET", "/v1/info", "info", "info"),
    # answered by the server itself
    _r("GET", "/healthz", "health", None, owner="server", public=True),
    _r("GET", "/readyz", "ready", None, owner="server", public=True),
    _r("GET", "/metrics", "metrics", None, owner="server", admin=True),
    _r("POST", "/admin/fail-open", "admin.fail_open.set", None, owner="server", admin=True),
    _r("DELETE", "/admin/fail-open", "admin.fail_open.clear", None, owner="server", admin=True),
    # the transparent audit log: signed checkpoints, Merkle proofs, verifier keys
    _r("GET", "/v1/audit/checkpoint", "audit.checkpoint.read", None, owner="server"),
    _r("POST", "/v1/audit/checkpoint", "audit.checkpoint.create", None, owner="server", admin=True),
    _r("GET", "/v1/audit/proof/inclusion", "audit.proof.inclusion", None, owner="server"),
    _r("GET", "/v1/audit/proof/consistency", "audit.proof.consistency", None, owner="server"),
    _r("GET", "/v1/audit/vkeys", "audit.vkeys", None, owner="server"),
)


class RouteMethodNotAllowed(MethodNotAllowed):
    """405 for a served path with a method it does not serve; ``headers`` carries ``Allow``."""

    def __init__(self, method: str, allow: tuple[str, ...]) -> None:
        shown = method if len(method) <= 16 else method[:16] + "..."
        super().__init__(f"method {shown!r} not allowed here; allowed: {', '.join(allow)}")
        self.allow = allow
        self.headers: tuple[tuple[bytes, bytes], ...] = ((b"allow", ", ".join(allow).encode("ascii")),)


# ---- matching -----------------------------------------------------------------------------
# Static templates go in one dict (one lookup on the hot path). Templates with parameters are
# few and share a shape: split into segments and compare literal segments.

_STATIC: dict[str, dict[str, Route]] = {}
_PARAM: list[tuple[tuple[str, ...], dict[str, Route]]] = []
_PARAM_PREFIXES: list[str] = []  # literal text before the first "{" of each parameter template


def _build() -> None:
    by_template: dict[str, dict[str, Route]] = {}
    for route in ROUTES:
        methods = by_template.setdefault(route.template, {})
        if route.method in methods:
            raise AssertionError(f"duplicate route {route.name}")
        methods[route.method] = route
    for template, methods in by_template.items():
        if "{" in template:
            _PARAM.append((tuple(template.split("/")), methods))
            prefix = template[: template.index("{")]
            if prefix not in _PARAM_PREFIXES:
                _PARAM_PREFIXES.append(prefix)
        else:
            _STATIC[template] = methods


_build()
_PARAM_PREFIX_TUPLE = tuple(_PARAM_PREFIXES)


def _match_params(segments: list[str]) -> tuple[dict[str, Route], dict[str, str]] | None:
    for pattern, methods in _PARAM:
        if len(pattern) != len(segments):
            continue
        params: dict[str, str] = {}
        for want, got in zip(pattern, segments, strict=True):
            if want.startswith("{"):
                if not got:
                    break
                params[want[1:-1]] = got
            elif want != got:
                break
        else:
            return methods, params
    return None


def resolve(method: str, path: str) -> tuple[Route, dict[str, str]] | None:
    """The route serving ``method path``, with its path parameters; see the module docstring."""
    q = path.find("?")
    if q >= 0:
        path = path[:q]
    methods = _STATIC.get(path)
    params: dict[str, str] = {}
    if methods is None:
        if not path.startswith(_PARAM_PREFIX_TUPLE):
            return None
        found = _match_params(path.split("/"))
        if found is None:
            return None
        methods, params = found
    route = methods.get(method)
    if route is None:
        raise RouteMethodNotAllowed(method, tuple(sorted(methods)))
    return route, params


def routes_by_operation() -> Mapping[str, Route]:
    return {r.operation: r for r in ROUTES}
