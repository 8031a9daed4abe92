"""The /v1 crypto API: parse a request once, then dispatch it to the KMS.

Two steps, so that the pipeline can decide on policy between them:

1. ``CryptoAPI.parse(route, body, path_params, query) -> ParsedRequest`` validates everything
   the client sent (see :mod:`.validation`) and raises a 4xx ``QpherError`` for bad input.
   ``ParsedRequest.key_ids()`` and its ``fields`` tell the policy what the request is about
   (the keys it names; the algorithm and label of a key being created) without a KMS call,
   and ``ParsedRequest.cost`` how many quota units it uses (the item count of a batch).
2. ``CryptoAPI.handle(parsed, ctx) -> (status, json_object)`` performs it through the KMS
   (``CryptoAPI.respond`` gives the same as an :class:`APIAnswer` with response headers).
   Errors are ``QpherError``s: 4xx for the client's mistakes (``key_not_found``,
   ``invalid_ciphertext``, ``decryption_failed``, ...), 5xx when the KMS is unavailable.

Idempotency keys. ``POST /v1/keys``, ``POST /v1/keys/{key_id}/rotate`` and the two key imports
take an optional ``Idempotency-Key`` header (``parse(..., idempotency_key=<its values>)``), passed to the KMS,
which records it with the key or version it creates in one transaction. A repeated request
with the same key and the same arguments is answered with the first one's key and version,
the first one's status and ``Idempotent-Replayed: true``, and creates nothing; the same key
with other arguments is 409 ``idempotency_key_reused``, and one whose first request another
KMS node has not finished yet 409 ``idempotency_key_in_progress`` with ``Retry-After``. So a
client whose request failed with 503 ``kms_unavailable`` (a KMS connection lost) retries it
with the same key and gets exactly one key.

Nothing here touches HTTP: the server turns ``(status, obj)`` into a JSON response and a
``QpherError`` into ``{"error": {...}}``. Nothing here sees a private key: the KMS answers with
public keys, ciphertexts, signatures, plaintexts and shared secrets only.

Batches. Every item of a batch is validated and performed on its own: a bad item becomes
``{"ok": false, "error": {"code", "message"}}`` in its place and the others go on. The items
that pass validation go to the KMS in one batch frame (one round trip). A failure that is not
about the item (any 5xx, such as ``kms_unavailable``) fails the whole request instead, so a
client retries the batch rather than reading "503" in each item.

Key import (BYOK). ``POST /v1/import-jobs`` has the KMS make a job: a KEM key pair whose
public key the client wraps a private key to (single-shot HPKE, see
:mod:`qpher_proxy.crypto.key_import`), ``POST /v1/keys/import`` and
``POST /v1/keys/{key_id}/import-version`` hand the wrapped key to the KMS, which opens and
checks it and stores it like a generated key. Their answers are the ``POST /v1/keys`` and
rotate answers plus ``"origin": "imported"``. The gateway never sees the key material: it
passes ``wrapped_key`` through as it came. A job id that cannot be one is
``import_job_not_found`` without a KMS call, as a malformed key id is ``key_not_found``.

HPKE. ``/v1/encrypt`` and ``/v1/decrypt`` always pass the fixed application ``info``
(:data:`~qpher_proxy.crypto.algorithms.HPKE_INFO`, ``b"qpher/v1/encrypt"``) to the KMS, so a
ciphertext sealed locally with any RFC 9180 library, the key's public key and that ``info``
opens here, and the other way round.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from .. import __version__
from ..context import TenantContext
from ..crypto.algorithms import (
    ALGORITHMS,
    HPKE_AEAD_ID,
    HPKE_INFO,
    HPKE_KDF_ID,
    MAX_CONTEXT_BYTES,
    Algorithm,
    Kind,
)
from ..errors import (
    BatchTooLarge,
    IdempotencyKeyInProgress,
    IdempotencyKeyReused,
    InvalidInput,
    QpherError,
)
from ..http.messages import Base64Text
from .routes import Route
from .validation import (
    DEFAULT_ALGORITHMS,
    DEFAULT_IMPORT_JOB_TTL_SECONDS,
    IDEMPOTENT_OPERATIONS,
    NO_BODY_OPERATIONS,
    REQUEST_FIELDS,
    check_import_job_id,
    check_key_id,
    json_type,
    load_object,
    parse_fields,
    parse_idempotency_key,
    parse_list_query,
    parse_version_query,
)

__all__ = [
    "APIAnswer", "CryptoAPI", "ParsedRequest", "KMSLike", "REPLAYED_HEADER",
    "HPKE_KDF_ID", "HPKE_AEAD_ID", "HPKE_INFO",
    "DEFAULT_MAX_BATCH_ITEMS", "key_json", "import_job_json",
]

DEFAULT_MAX_BATCH_ITEMS = 100  # config api.max_batch_items

HPKE_AEAD_TAG_BYTES = 16  # AES-256-GCM tag at the end of every HPKE ct
_HPKE_INFO_B64 = base64.b64encode(HPKE_INFO).decode("ascii")


class KMSLike(Protocol):
    """What the handlers need of :class:`qpher_proxy.kms.client.KMSClient` (same signatures)."""

    async def create_key(self, ctx: TenantContext, algorithm: str | None = None, kind: str | None = None,
                         label: str | None = None, mode: str | None = None, *,
                         idempotency_key: str | None = None) -> Any: ...
    async def get_key(self, ctx: TenantContext, key_id: str, version: int | None = None) -> Any: ...
    async def list_keys(self, ctx: TenantContext, limit: int = ..., cursor: str | None = None) -> Any: ...
    async def rotate_key(self, ctx: TenantContext, key_id: str, *,
                         idempotency_key: str | None = None) -> Any: ...
    async def disable_key(self, ctx: TenantContext, key_id: str) -> Any: ...
    async def enable_key(self, ctx: TenantContext, key_id: str) -> Any: ...
    async def schedule_destroy(self, ctx: TenantContext, key_id: str, delay: float | None = None) -> Any: ...
    async def cancel_destroy(self, ctx: TenantContext, key_id: str) -> Any: ...
    async def encapsulate(self, ctx: TenantContext, key_id: str) -> tuple[bytes, bytes, int]: ...
    async def decapsulate(self, ctx: TenantContext, key_id: str, ciphertext: bytes,
                          version: int | None = None) -> bytes: ...
    async def sign(self, ctx: TenantContext, key_id: str, message: bytes,
                   context: bytes = b"") -> tuple[bytes, int]: ...
    async def verify(self, ctx: TenantContext, key_id: str, message: bytes, signature: bytes,
                     context: bytes = b"", version: int | None = None) -> bool: ...
    async def encrypt(self, ctx: TenantContext, key_id: str, plaintext: bytes, aad: bytes = b"",
                      info: bytes = b"") -> tuple[bytes, int]: ...
    async def decrypt(self, ctx: TenantContext, key_id: str, ciphertext: bytes, aad: bytes = b"",
                      version: int | None = None, info: bytes = b"") -> bytes: ...
    async def batch(self, ctx: TenantContext,
                    items: Sequence[tuple[str, Mapping[str, Any]]]) -> list[dict[str, Any] | QpherError]: ...
    # key import: a job is a mapping (or an object) with import_job_id, method, public_key (bytes),
    # expires_at (epoch seconds) and state; a page has jobs and next_cursor
    async def create_import_job(self, ctx: TenantContext, method: str,
                                ttl_seconds: int | None = None) -> Any: ...
    async def get_import_job(self, ctx: TenantContext, job_id: str) -> Any: ...
    async def list_import_jobs(self, ctx: TenantContext, limit: int = ...,
                               cursor: str | None = None) -> Any: ...
    async def import_key(self, ctx: TenantContext, job_id: str, algorithm: str, wrapped_key: bytes, *,
                         format: str = "seed", label: str | None = None, key_id: str | None = None,
                         idempotency_key: str | None = None) -> Any: ...


def _b64(data: bytes) -> str:
    return Base64Text.of(data)  # a str that Response.json copies without scanning it


def _timestamp(value: float | None) -> str | None:
    """RFC 3339 UTC (``2026-01-31T12:00:00Z``) from epoch seconds."""
    if value is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(value))


def key_json(info: Any) -> dict[str, Any]:
    """The public view of a :class:`qpher_proxy.kms.wire.model.KeyInfo`: metadata and a public key,
    never private bytes (the KMS has no way to send any)."""
    state = info.state
    return {
        "key_id": info.key_id,
        "algorithm": info.algorithm,
        "kind": info.kind,
        "label": info.label,
        "state": getattr(state, "value", state),
        "version": info.version,
        "latest_version": info.latest_version,
        "public_key": None if info.public_key is None else _b64(info.public_key),
        "created_at": _timestamp(info.created_at),
        "updated_at": _timestamp(info.updated_at),
        "destroy_at": _timestamp(info.destroy_at),
        "destroyed_at": _timestamp(info.destroyed_at),
        "versions": [
            {"version": v.version, "state": v.state, "created_at": _timestamp(v.created_at)}
            for v in info.versions
        ],
    }


def _field(obj: Any, name: str) -> Any:
    """``obj[name]`` of a mapping, else the attribute: the KMS client answers import jobs as either."""
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def import_job_json(job: Any) -> dict[str, Any]:
    """The public view of an import job: its method and public key, never its private key (the
    KMS has no way to send it). A malformed KMS answer is a 500, not a KeyError."""
    job_id, method, state = _field(job, "import_job_id"), _field(job, "method"), _field(job, "state")
    public_key, expires_at = _field(job, "public_key"), _field(job, "expires_at")
    if not (type(job_id) is str and type(method) is str and type(state) is str
            and type(public_key) is bytes and type(expires_at) in (int, float)):
        raise QpherError("the KMS answered with a malformed import job")
    return {
        "import_job_id": job_id,
        "method": method,
        "public_key": _b64(public_key),
        "expires_at": _timestamp(expires_at),
        "state": state,
    }


def _imported_key_json(info: Any) -> dict[str, Any]:
    """The ``POST /v1/keys`` (or rotate) answer for an imported key or version."""
    return {**key_json(info), "origin": "imported"}


# ---- parsed requests ------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ParsedRequest:
    """A validated request: what ``handle`` performs and what policy decides on.

    ``fields`` holds the converted body fields (bytes, ints, names) of a single operation,
    plus ``key_id`` from the path, ``limit``/``cursor`` from the query. ``items`` holds, for a
    batch, each item's fields or the 4xx error that item failed validation with.
    """

    route: Route
    fields: Mapping[str, Any] = field(default_factory=dict)
    items: tuple[Mapping[str, Any] | QpherError, ...] = ()
    idempotency_key: str | None = None  # the client's Idempotency-Key (key creation and rotation)

    @property
    def cost(self) -> int:
        """Quota units: one per item for a batch, else one."""
        return len(self.items) if self.route.batch else 1

    def key_ids(self) -> tuple[str, ...]:
        if self.route.batch:
            seen = dict.fromkeys(i["key_id"] for i in self.items if not isinstance(i, QpherError))
            return tuple(seen)
        kid = self.fields.get("key_id")
        return (kid,) if kid is not None else ()

    def __repr__(self) -> str:  # fields hold plaintexts and messages: never in a repr
        return f"ParsedRequest(route={self.route.name!r}, items={len(self.items)})"


REPLAYED_HEADER = (b"idempotent-replayed", b"true")


class APIAnswer(NamedTuple):
    """What ``CryptoAPI.respond`` answers: the status, the JSON object and response headers."""

    status: int
    body: dict[str, Any]
    headers: tuple[tuple[bytes, bytes], ...] = ()

    @property
    def replayed(self) -> bool:
        """Whether this repeats the answer to an earlier request with the same idempotency key."""
        return REPLAYED_HEADER in self.headers


# ---- the API --------------------------------------------------------------------------

BackendInfo = Mapping[str, Any] | Callable[[], Mapping[str, Any]]


class CryptoAPI:
    """The /v1 handlers. ``kms`` is the gateway's ``KMSClient``; ``backend_info`` (a mapping or
    a function returning one) gives ``{"name": str, "versions": {library: version}}`` as the KMS
    reports it, and ``policy_revision`` the revision of the policy in force (None while there is
    none), both for ``GET /v1/info``."""

    def __init__(
        self,
        kms: KMSLike,
        *,
        max_batch_items: int = DEFAULT_MAX_BATCH_ITEMS,
        backend_info: BackendInfo | None = None,
        policy_revision: Callable[[], str | None] | None = None,
    ) -> None:
        if max_batch_items < 1:
            raise ValueError(f"max_batch_items must be >= 1, not {max_batch_items!r}")
        self.kms = kms
        self.max_batch_items = max_batch_items
        self._backend_info = backend_info
        self._policy_revision = policy_revision

    # -- step 1 -----------------------------------------------------------------------

    def parse(
        self,
        route: Route,
        body: bytes,
        path_params: Mapping[str, str] | None = None,
        query: str | Mapping[str, Any] | None = None,
        *,
        idempotency_key: Sequence[bytes] = (),
    ) -> ParsedRequest:
        """Validate a request for ``route``; raises a 4xx ``QpherError``. ``idempotency_key``:
        the values of the request's ``Idempotency-Key`` header (read by key creation and
        rotation only)."""
        parsed = self._parse(route, body, path_params, query)
        if route.operation in IDEMPOTENT_OPERATIONS:
            key = parse_idempotency_key(idempotency_key)
            if key is not None:
                return ParsedRequest(route, parsed.fields, parsed.items, key)
        return parsed

    def _parse(
        self,
        route: Route,
        body: bytes,
        path_params: Mapping[str, str] | None,
        query: str | Mapping[str, Any] | None,
    ) -> ParsedRequest:
        op = route.operation
        params = path_params or {}
        if route.batch:
            if query:
                raise InvalidInput(f"{route.name} takes no query parameters")
            return self._parse_batch(route, body)
        if op in NO_BODY_OPERATIONS:
            fields: dict[str, Any] = {}
            if "key_id" in params:
                fields["key_id"] = check_key_id(params["key_id"])
            if "import_job_id" in params:
                fields["import_job_id"] = check_import_job_id(params["import_job_id"])
            if op == "keys.list":
                fields["limit"], fields["cursor"] = parse_list_query(query)
            elif op == "import_jobs.list":
                fields["limit"], fields["cursor"] = parse_list_query(query, jobs=True)
            elif op == "keys.read":
                fields["version"] = parse_version_query(query)
            elif query and route.owner == "api":  # the server's own routes ignore queries
                raise InvalidInput(f"{route.name} takes no query parameters")
            if route.method != "GET":
                obj = load_object(body, allow_empty=True)
                if obj:
                    raise InvalidInput(
                        f"unknown field {next(iter(obj))[:40]!r}; this request takes no fields"
                    )
            return ParsedRequest(route, fields)
        if query:
            raise InvalidInput(f"{route.name} takes no query parameters")
        key_id = check_key_id(params.get("key_id")) if "{key_id}" in route.template else None
        fields = parse_fields(load_object(body), REQUEST_FIELDS[op])
        if key_id is not None:
            fields["key_id"] = key_id
        if op == "keys.create":
            fields = _resolve_algorithm(fields)
        return ParsedRequest(route, fields)

    def _parse_batch(self, route: Route, body: bytes) -> ParsedRequest:
        obj = load_object(body)
        for name in obj:
            if name != "items":
                raise InvalidInput(f"unknown field {name[:40]!r}; a batch takes only 'items'")
        if "items" not in obj:
            raise InvalidInput("missing required field 'items'")
        raw = obj["items"]
        if not isinstance(raw, list):
            raise InvalidInput(f"field 'items' must be an array, not {json_type(raw)}")
        if not raw:
            raise InvalidInput("field 'items' must hold at least one item")
        if len(raw) > self.max_batch_items:
            raise BatchTooLarge(
                f"a batch holds at most {self.max_batch_items} items, not {len(raw)}")
        spec = REQUEST_FIELDS[route.operation.removesuffix(".batch")]
        items: list[Mapping[str, Any] | QpherError] = []
        for i, item in enumerate(raw):
            try:
                items.append(parse_fields(item, spec, f"items[{i}]."))
            except QpherError as exc:
                items.append(exc)
        return ParsedRequest(route, {}, tuple(items))

    # -- step 2 -----------------------------------------------------------------------

    async def handle(
        self,
        parsed: ParsedRequest,
        ctx: TenantContext,
        *,
        tls_version: str | None = None,
        tls_group: str | None = None,
    ) -> tuple[int, dict[str, Any]]:
        """Perform a parsed request; returns ``(status, json_object)``."""
        answer = await self.respond(parsed, ctx, tls_version=tls_version, tls_group=tls_group)
        return answer.status, answer.body

    async def respond(
        self,
        parsed: ParsedRequest,
        ctx: TenantContext,
        *,
        tls_version: str | None = None,
        tls_group: str | None = None,
    ) -> APIAnswer:
        """Perform a parsed request; the answer carries ``Idempotent-Replayed: true`` when it
        repeats an earlier request's (same idempotency key, same arguments)."""
        route = parsed.route
        op = route.operation
        f = parsed.fields
        kms = self.kms
        if route.batch:
            return APIAnswer(route.status, await self._batch(op.removesuffix(".batch"), ctx, parsed.items))
        if op in _KMS_OP:
            return APIAnswer(route.status, await self._crypto(op, ctx, f))
        if op == "keys.create":
            with _idempotency_errors():
                if parsed.idempotency_key is None:
                    info = await kms.create_key(ctx, algorithm=f["algorithm"], label=f.get("label"))
                else:
                    info = await kms.create_key(ctx, algorithm=f["algorithm"], label=f.get("label"),
                                                idempotency_key=parsed.idempotency_key)
        elif op == "keys.list":
            return APIAnswer(route.status, await self._list(ctx, f["limit"], f["cursor"]))
        elif op == "keys.read":
            info = await kms.get_key(ctx, f["key_id"], version=f["version"])
        elif op == "keys.rotate":
            with _idempotency_errors():
                if parsed.idempotency_key is None:
                    info = await kms.rotate_key(ctx, f["key_id"])
                else:
                    info = await kms.rotate_key(ctx, f["key_id"], idempotency_key=parsed.idempotency_key)
        elif op == "keys.disable":
            info = await kms.disable_key(ctx, f["key_id"])
        elif op == "keys.enable":
            info = await kms.enable_key(ctx, f["key_id"])
        elif op == "keys.destroy":
            info = await kms.schedule_destroy(ctx, f["key_id"])
        elif op == "keys.cancel_destroy":
            info = await kms.cancel_destroy(ctx, f["key_id"])
        elif op == "info":
            return APIAnswer(route.status, self.info(tls_version=tls_version, tls_group=tls_group))
        elif op in _IMPORT_OPS:
            return await self._import(parsed, ctx)
        else:
            raise QpherError(f"route {route.name!r} is not served by the crypto API")
        if getattr(info, "replayed", False) is True:
            return APIAnswer(route.status, key_json(info), (REPLAYED_HEADER,))
        return APIAnswer(route.status, key_json(info))

    # -- key import ---------------------------------------------------------------------

    async def _import(self, parsed: ParsedRequest, ctx: TenantContext) -> APIAnswer:
        route, f = parsed.route, parsed.fields
        op = route.operation
        kms = self.kms
        if op == "import_jobs.create":
            ttl = f.get("ttl_seconds", DEFAULT_IMPORT_JOB_TTL_SECONDS)
            return APIAnswer(route.status,
                             import_job_json(await kms.create_import_job(ctx, f["method"], ttl_seconds=ttl)))
        if op == "import_jobs.read":
            return APIAnswer(route.status, import_job_json(await kms.get_import_job(ctx, f["import_job_id"])))
        if op == "import_jobs.list":
            page = await kms.list_import_jobs(ctx, limit=f["limit"], cursor=f["cursor"])
            jobs, cursor = _field(page, "jobs"), _field(page, "next_cursor")
            if not isinstance(jobs, (list, tuple)) or not (cursor is None or type(cursor) is str):
                raise QpherError("the KMS answered with a malformed page of import jobs")
            return APIAnswer(route.status,
                             {"import_jobs": [import_job_json(j) for j in jobs], "next_cursor": cursor})
        # keys.import / keys.import_version: a new key, or a new version of the key in the path
        # (whose algorithm the wrapped key was made for: the HPKE info names it)
        key_id = f.get("key_id")
        algorithm = f["algorithm"] if key_id is None else (await self.kms.get_key(ctx, key_id)).algorithm
        with _idempotency_errors():
            info = await kms.import_key(
                ctx, f["import_job_id"], algorithm, f["wrapped_key"], format=f.get("format", "seed"),
                label=f.get("label"), key_id=key_id, idempotency_key=parsed.idempotency_key,
            )
        body = _imported_key_json(info)
        if getattr(info, "replayed", False) is True:
            return APIAnswer(route.status, body, (REPLAYED_HEADER,))
        return APIAnswer(route.status, body)

    # -- operations ---------------------------------------------------------------------

    async def _list(self, ctx: TenantContext, limit: int, cursor: str | None) -> dict[str, Any]:
        page = await self.kms.list_keys(ctx, limit, cursor)
        return {"keys": [key_json(k) for k in page.keys], "next_cursor": page.next_cursor}

    # Each crypto operation is three small pieces: the KMS args from the validated fields, the
    # typed single call, and the JSON rendering of the KMS's result dict (the same dict a
    # batch item answers with). Single requests use the typed calls; batches send every good
    # item in ONE batch frame, so a batch costs one socketpair round trip.

    async def _single_call(self, op: str, ctx: TenantContext, a: Mapping[str, Any]) -> dict[str, Any]:
        kms = self.kms
        if op == "encapsulate":
            ss, ct, version = await kms.encapsulate(ctx, a["key_id"])
            return {"shared_secret": ss, "ciphertext": ct, "version": version}
        if op == "decapsulate":
            return {
                "shared_secret": await kms.decapsulate(
                    ctx, a["key_id"], a["ciphertext"], version=a["version"]
                )
            }
        if op == "sign":
            sig, version = await kms.sign(ctx, a["key_id"], a["message"], context=a["context"])
            return {"signature": sig, "version": version}
        if op == "verify":
            ok = await kms.verify(ctx, a["key_id"], a["message"], a["signature"], context=a["context"],
                                  version=a["version"])
            return {"valid": ok}
        if op == "encrypt":
            ct, version = await kms.encrypt(ctx, a["key_id"], a["plaintext"], aad=a["aad"], info=a["info"])
            return {"ciphertext": ct, "version": version}
        if op == "decrypt":
            return {"plaintext": await kms.decrypt(ctx, a["key_id"], a["ciphertext"], aad=a["aad"],
                                                   version=a["version"], info=a["info"])}
        raise AssertionError(op)  # pragma: no cover

    async def _crypto(self, op: str, ctx: TenantContext, f: Mapping[str, Any]) -> dict[str, Any]:
        kms_op = _KMS_OP[op]
        return _render(kms_op, await self._single_call(kms_op, ctx, _kms_args(kms_op, f)), f)

    async def _batch(
        self, op: str, ctx: TenantContext, items: Sequence[Mapping[str, Any] | QpherError]
    ) -> dict[str, Any]:
        kms_op = _KMS_OP[op]
        good = [(i, item) for i, item in enumerate(items) if not isinstance(item, QpherError)]
        results: list[Mapping[str, Any] | QpherError] = list(items)
        if good:
            answers = await self.kms.batch(ctx, [(kms_op, _kms_args(kms_op, f)) for _, f in good])
            for (i, f), answer in zip(good, answers, strict=True):
                results[i] = answer if isinstance(answer, QpherError) else _render(kms_op, answer, f)
        out: list[dict[str, Any]] = []
        for r in results:
            if isinstance(r, QpherError):
                if r.status >= 500:  # not about the item: fail the request, the client retries it
                    raise r
                out.append({"ok": False, "error": {"code": r.code, "message": r.message}})
            else:
                out.append({"ok": True, **r})
        return {"items": out}

    # -- GET /v1/info --------------------------------------------------------------------

    def info(self, *, tls_version: str | None = None, tls_group: str | None = None) -> dict[str, Any]:
        backend = self._backend_info() if callable(self._backend_info) else (self._backend_info or {})
        name = backend.get("name")
        versions = backend.get("versions") or {}
        return {
            "service": {"name": "qpher-proxy", "version": __version__},
            "algorithms": [_algorithm_json(a) for a in ALGORITHMS.values()],
            "modes": {
                mode: {"kem": DEFAULT_ALGORITHMS[("kem", mode)],
                       "signature": DEFAULT_ALGORITHMS[("signature", mode)]}
                for mode in ("pqc", "hybrid")
            },
            "hpke": {
                "mode": "base", "kdf_id": HPKE_KDF_ID, "aead_id": HPKE_AEAD_ID,
                "info": _HPKE_INFO_B64,
            },
            "backend": {
                "name": name if isinstance(name, str) else "unknown",
                "versions": {str(k): str(v) for k, v in dict(versions).items()},
            },
            "tls": {"version": tls_version, "group": tls_group},
            "limits": {"max_batch_items": self.max_batch_items, "max_context_bytes": MAX_CONTEXT_BYTES},
            "policy": {"revision": self._policy_revision() if self._policy_revision is not None else None},
        }


@contextmanager
def _idempotency_errors() -> Iterator[None]:
    """The KMS's idempotency refusals as their classes here: the KMS client rebuilds an error it
    does not know as a plain ``QpherError``, and ``idempotency_key_in_progress`` needs its
    ``Retry-After``."""
    try:
        yield
    except QpherError as exc:
        if type(exc) is QpherError and exc.code == IdempotencyKeyInProgress.code:
            raise IdempotencyKeyInProgress(exc.message) from exc
        if type(exc) is QpherError and exc.code == IdempotencyKeyReused.code:
            raise IdempotencyKeyReused(exc.message) from exc
        raise


def _algorithm_json(a: Algorithm) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": a.name, "kind": a.kind.value, "mode": a.mode.value, "public_key_size": a.public_key_size,
    }
    if a.kind is Kind.KEM:
        out["ciphertext_size"] = a.ciphertext_size
        out["shared_secret_size"] = a.shared_secret_size
        out["hpke_kem_id"] = a.hpke_kem_id
    else:
        out["signature_size"] = a.signature_size
    return out


_IMPORT_OPS = frozenset({
    "import_jobs.create", "import_jobs.read", "import_jobs.list", "keys.import", "keys.import_version",
})

# API operation -> KMS operation
_KMS_OP = {
    "kem.encapsulate": "encapsulate", "kem.decapsulate": "decapsulate", "encrypt": "encrypt",
    "decrypt": "decrypt", "sign": "sign", "verify": "verify",
}


def _kms_args(kms_op: str, f: Mapping[str, Any]) -> dict[str, Any]:
    """The KMS's arguments for one validated request (or batch item)."""
    if kms_op == "encapsulate":
        return {"key_id": f["key_id"]}
    if kms_op == "decapsulate":
        return {"key_id": f["key_id"], "ciphertext": f["ciphertext"], "version": f.get("key_version")}
    if kms_op == "sign":
        return {"key_id": f["key_id"], "message": f["message"], "context": f.get("context", b"")}
    if kms_op == "verify":
        return {"key_id": f["key_id"], "message": f["message"], "signature": f["signature"],
                "context": f.get("context", b""), "version": f.get("key_version")}
    if kms_op == "encrypt":  # the fixed, documented HPKE info: see HPKE_INFO
        return {
            "key_id": f["key_id"],
            "plaintext": f["plaintext"],
            "aad": f.get("aad", b""),
            "info": HPKE_INFO,
        }
    if kms_op == "decrypt":
        return {"key_id": f["key_id"], "ciphertext": f["ciphertext"], "aad": f.get("aad", b""),
                "version": f.get("key_version"), "info": HPKE_INFO}
    raise AssertionError(kms_op)  # pragma: no cover


def _bytes(result: Mapping[str, Any], name: str) -> bytes:
    v = result.get(name)
    if type(v) is not bytes:
        raise QpherError(f"the KMS answered without {name!r}")
    return v


def _version(result: Mapping[str, Any]) -> int:
    v = result.get("version")
    if type(v) is not int or v < 1:
        raise QpherError("the KMS answered without a key version")
    return v


def _render(kms_op: str, r: Mapping[str, Any], f: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON answer for one KMS result dict. A malformed KMS answer is a 500, not a KeyError."""
    if kms_op == "encapsulate":
        return {
            "ciphertext": _b64(_bytes(r, "ciphertext")),
            "shared_secret": _b64(_bytes(r, "shared_secret")),
            "key_version": _version(r),
        }
    if kms_op == "decapsulate":
        return {"shared_secret": _b64(_bytes(r, "shared_secret"))}
    if kms_op == "sign":
        return {"signature": _b64(_bytes(r, "signature")), "key_version": _version(r)}
    if kms_op == "verify":
        return {"valid": r.get("valid") is True}
    if kms_op == "encrypt":
        ct = _bytes(r, "ciphertext")
        # The KEM is the key's, which only the KMS knows; its enc size is unique per HPKE KEM,
        # so it is read off the ciphertext instead of costing a second KMS round trip.
        alg = _hpke_algorithm(len(ct) - len(f["plaintext"]) - HPKE_AEAD_TAG_BYTES)
        return {
            "ciphertext": _b64(ct),
            "key_version": _version(r),
            "algorithm": alg.name,
            "hpke_suite": {"kem_id": alg.hpke_kem_id, "kdf_id": HPKE_KDF_ID, "aead_id": HPKE_AEAD_ID},
            "info": _HPKE_INFO_B64,
        }
    if kms_op == "decrypt":
        return {"plaintext": _b64(_bytes(r, "plaintext"))}
    raise AssertionError(kms_op)  # pragma: no cover


_HPKE_BY_ENC_SIZE = {a.ciphertext_size: a for a in ALGORITHMS.values() if a.hpke_kem_id is not None}
assert len(_HPKE_BY_ENC_SIZE) == sum(1 for a in ALGORITHMS.values() if a.hpke_kem_id is not None)


def _hpke_algorithm(enc_size: int) -> Algorithm:
    """The KEM of an HPKE ciphertext, from the size of its ``enc`` (unique per KEM)."""
    alg = _HPKE_BY_ENC_SIZE.get(enc_size)
    if alg is None:
        raise QpherError("the KMS returned an HPKE ciphertext of unexpected size")
    return alg


def _resolve_algorithm(fields: dict[str, Any]) -> dict[str, Any]:
    """``algorithm`` and/or ``kind`` (+ optional ``mode``) to one algorithm name, with the
    KMS's rules: a named algorithm must agree with a ``kind``/``mode`` given beside it; a kind
    alone gets that mode's default (``pqc`` unless ``mode`` says ``hybrid``)."""
    alg, kind, mode = fields.pop("algorithm", None), fields.pop("kind", None), fields.pop("mode", None)
    if alg is not None:
        a = ALGORITHMS[alg]
        if kind is not None and a.kind.value != kind:
            raise InvalidInput(f"algorithm {alg!r} is a {a.kind.value} algorithm, not {kind}")
        if mode is not None and a.mode.value != mode:
            raise InvalidInput(f"algorithm {alg!r} is {a.mode.value}, not {mode}")
    elif kind is not None:
        alg = DEFAULT_ALGORITHMS[(kind, mode or "pqc")]
    else:
        raise InvalidInput("missing required field 'algorithm' (or 'kind': 'kem' or 'signature')")
    fields["algorithm"] = alg
    return fields
