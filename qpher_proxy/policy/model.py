"""The nouns of the policy engine: request facts in, decisions out, plans on the side.

Pure data, no I/O. ``RequestFacts`` is everything a rule may look at; it is built once per
request by the pipeline (after authentication, before dispatch) from the API-key record (tenant,
plan, scopes, key id: never from client headers), the route (method, path, operation), the
parsed body (algorithm, key label, mode), the connection (source address, TLS group) and the
quota layer (usage counters). Nothing in it is a secret.

Vocabulary. Operations and quota classes are a closed vocabulary mirrored from the route table
(``qpher_proxy.api.routes``; a test keeps the two in step) plus ``forward`` for sidecar
requests. The loader rejects names outside it, so that a typo in a policy file (``sing``) is an
error at load time instead of a rule that silently never matches.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Literal

from ..crypto.algorithms import ALGORITHMS
from ..errors import InvalidInput

__all__ = [
    "OPERATIONS", "QUOTA_CLASSES", "OPERATION_QUOTA_CLASS", "METHODS", "MODES",
    "RequestFacts", "Decision", "RateLimit", "Plan", "RuleOutcome", "Explanation",
    "quota_class", "DEFAULT_DENY_REASON",
]

Effect = Literal["allow", "deny"]
Source = Literal["rule", "default", "fail_open"]

# operation -> quota class (None: never counted). Mirrors qpher_proxy.api.routes.ROUTES.
OPERATION_QUOTA_CLASS: Mapping[str, str | None] = MappingProxyType({
    "keys.create": "keys", "keys.list": "keys", "keys.read": "keys", "keys.destroy": "keys",
    "keys.rotate": "keys", "keys.disable": "keys", "keys.enable": "keys",
    "keys.cancel_destroy": "keys", "keys.import": "keys", "keys.import_version": "keys",
    "import_jobs.create": "keys", "import_jobs.read": "keys", "import_jobs.list": "keys",
    "kem.encapsulate": "kem", "kem.decapsulate": "kem",
    "kem.encapsulate.batch": "kem", "kem.decapsulate.batch": "kem",
    "encrypt": "encrypt", "decrypt": "encrypt", "encrypt.batch": "encrypt", "decrypt.batch": "encrypt",
    "sign": "sign", "verify": "verify", "sign.batch": "sign", "verify.batch": "verify",
    "info": "info",
    "health": None, "ready": None, "metrics": None,
    "admin.fail_open.set": None, "admin.fail_open.clear": None,
    "audit.checkpoint.read": None, "audit.checkpoint.create": None, "audit.proof.inclusion": None,
    "audit.proof.consistency": None, "audit.vkeys": None,
    # every request the sidecar forwards to the upstream app
    "forward": "forward",
})
OPERATIONS: frozenset[str] = frozenset(OPERATION_QUOTA_CLASS)
QUOTA_CLASSES: frozenset[str] = frozenset(c for c in OPERATION_QUOTA_CLASS.values() if c is not None)
METHODS: frozenset[str] = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
MODES: frozenset[str] = frozenset({"pqc", "hybrid"})
DEFAULT_DENY_REASON = "no rule allowed this request"


def quota_class(operation: str) -> str | None:
    """The quota class an operation is counted in (``"kem"`` for ``kem.decapsulate.batch``)."""
    return OPERATION_QUOTA_CLASS.get(operation)


_EMPTY: Mapping[str, int] = MappingProxyType({})
_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@functools.lru_cache(maxsize=4096)  # clients come back: parse each address once
def _parse_ip(text: str) -> _IPAddress | None:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    # An IPv4 client on a dual-stack socket shows up as ::ffff:a.b.c.d: match it as IPv4, or
    # a rule written for 10.0.0.0/8 would not see it.
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestFacts:
    """What the policy sees of one request. Built by the pipeline, never from client claims.

    ``path`` is matched byte for byte (no percent-decoding, no dot-segment removal), exactly as
    the router matches it; for a request forwarded to the upstream the pipeline passes the
    normalised, percent-decoded path (``qpher_proxy.upstream.target``), the path the upstream
    routes on. A query string, if left on, is cut off here (the router ignores it too, and
    ``/v1/sign?x`` must not slip past a rule written for ``/v1/sign``). ``mode`` left as None is
    derived from ``algorithm`` when the algorithm is known, so that a ``mode: hybrid`` rule cannot be
    sidestepped by a caller that names a hybrid algorithm but no mode. For operations on an
    existing key, ``algorithm`` should be that key's algorithm.
    ``usage`` and ``quota`` are per quota class (``{"sign": 1234}``): this month's count and, when
    the quota layer knows it, the limit (otherwise the plan's limit in the policy is used).
    """

    tenant: str
    plan: str
    scopes: frozenset[str] = frozenset()
    api_key_id: str
    method: str
    path: str
    operation: str
    algorithm: str | None = None
    key_label: str | None = None
    mode: str | None = None
    source_ip: str = ""
    tls_group: str | None = None
    tls_pq: bool = False
    now: datetime
    usage: Mapping[str, int] = field(default_factory=lambda: _EMPTY)
    quota: Mapping[str, int] = field(default_factory=lambda: _EMPTY)
    request_id: str | None = None
    # derived once here so that a thousand rules do not each re-derive them
    ip: _IPAddress | None = field(init=False, repr=False, compare=False, default=None)
    tls_group_lower: str | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        if not (type(self.tenant) is str and type(self.plan) is str and type(self.api_key_id) is str
                and type(self.method) is str and type(self.path) is str and type(self.operation) is str):
            for name in ("tenant", "plan", "api_key_id", "method", "path", "operation"):
                if not isinstance(getattr(self, name), str):
                    raise TypeError(
                        f"RequestFacts.{name} must be a str, not {type(getattr(self, name)).__name__}"
                    )
        now = self.now
        if not isinstance(now, datetime) or now.tzinfo is None:
            raise TypeError("RequestFacts.now must be a timezone-aware datetime")
        setattr_ = object.__setattr__
        if type(self.scopes) is not frozenset:
            setattr_(self, "scopes", frozenset(self.scopes))
        if "?" in self.path:  # the router ignores a query string; so must the policy
            setattr_(self, "path", self.path[: self.path.index("?")])
        if not self.method.isupper():
            setattr_(self, "method", self.method.upper())
        if self.mode is None and self.algorithm is not None:
            alg = ALGORITHMS.get(self.algorithm)
            if alg is not None:
                setattr_(self, "mode", alg.mode.value)
        if self.source_ip:
            setattr_(self, "ip", _parse_ip(self.source_ip))
        if self.tls_group is not None:
            setattr_(self, "tls_group_lower", self.tls_group.lower())

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> RequestFacts:
        """Facts from plain data (YAML test cases, the CLI): ``now`` may be an ISO 8601 string
        (``Z`` allowed) or a datetime; ``scopes`` any list. Bad data raises InvalidInput."""
        known = {f for f in cls.__dataclass_fields__ if f not in ("ip", "tls_group_lower")}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidInput(f"unknown request fact(s) {unknown}; expected some of {sorted(known)}")
        values = dict(data)
        now = values.get("now")
        if isinstance(now, str):
            try:
                now = datetime.fromisoformat(now.replace("Z", "+00:00"))
            except ValueError as exc:
                raise InvalidInput(f"now: expected an ISO 8601 time, got {now!r}") from exc
        if isinstance(now, datetime) and now.tzinfo is None:
            now = now.replace(tzinfo=UTC)
        values["now"] = now
        scopes = values.get("scopes")
        if scopes is not None:
            if isinstance(scopes, str) or not isinstance(scopes, Iterable):
                raise InvalidInput(f"scopes: expected a list of strings, got {scopes!r}")
            values["scopes"] = frozenset(scopes)
        for name in ("usage", "quota"):
            if name in values and not isinstance(values[name], Mapping):
                raise InvalidInput(f"{name}: expected a mapping of quota class to count")
        try:
            return cls(**values)
        except TypeError as exc:
            raise InvalidInput(f"bad request facts: {exc}") from exc


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer: ``effect`` and, when a rule decided, its id and admin-written reason.

    ``source`` says what decided: a ``rule``, the ``default`` deny (``rule_id`` None) or the
    emergency ``fail_open`` window (an allow with ``rule_id`` None). ``revision`` is the policy
    set's revision hash, for the audit log."""

    effect: Effect
    rule_id: str | None
    reason: str
    source: Source = "rule"
    revision: str | None = None

    @property
    def allowed(self) -> bool:
        return self.effect == "allow"


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A token bucket: refills ``requests_per_second``, holds at most ``burst`` tokens."""

    requests_per_second: float
    burst: int


@dataclass(frozen=True, slots=True)
class Plan:
    """A plan as declared in the policy files. ``quotas`` maps a quota class to its monthly
    count; a class that is absent is unlimited. ``operations`` has its globs expanded."""

    name: str
    rate_limit: RateLimit
    tenant_rate_limit: RateLimit | None
    quotas: Mapping[str, int]
    algorithms: frozenset[str]
    operations: frozenset[str]
    description: str = ""
    file: str = ""
    line: int = 0


@dataclass(frozen=True, slots=True)
class RuleOutcome:
    """One rule's outcome in an explanation. ``failed`` names every matcher that did not match
    (``match.path``) or ``unless.<matcher>`` when the rule's exception applied."""

    index: int
    rule_id: str
    effect: Effect
    file: str
    line: int
    matched: bool
    failed: tuple[str, ...]
    deciding: bool = False


@dataclass(frozen=True, slots=True)
class Explanation:
    outcomes: tuple[RuleOutcome, ...]
    decision: Decision
