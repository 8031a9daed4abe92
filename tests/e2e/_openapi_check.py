"""Contract checks for answers of the live gateway, shared by the end-to-end API, interop and
fuzz tests.

``CheckedClient.call`` sends one request through the real gateway (``_gateway.Client``) and,
before handing the answer back, checks it against ``openapi.yaml`` and the API conventions:

* every answer carries ``X-Request-Id``, ``Cache-Control: no-store`` and
  ``X-Content-Type-Options: nosniff``; an error body is exactly
  ``{"error": {"code", "message", "request_id"}}`` with ``request_id`` equal to that header;
* no 5xx (unless the caller says otherwise);
* for a served route, the status is documented for that route, the body validates against
  the documented response schema, an error ``code`` is one that route documents for that
  status, and a success has the route's success status;
* a 405 names the allowed methods in ``Allow``, a 401 carries ``WWW-Authenticate``, a 429
  ``Retry-After``;
* no answer has a field that could hold private key material, and every public key,
  signature, ciphertext and shared secret has the size of its algorithm (``check_sizes``).

Each answer is appended to a ``Transcript`` so that a test can later scan everything the
gateway said (for secrets, for private material).

The openapi.yaml helpers are the API unit tests' own (``tests/api/_api_openapi.py``), loaded
from that file by path so that ``tests/api`` does not have to be on ``sys.path``.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import importlib.util
import json
import pathlib
import re
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from qpher_proxy.api import Route, RouteMethodNotAllowed, resolve
from qpher_proxy.crypto.algorithms import ALGORITHMS
from qpher_proxy.crypto.key_import import IMPORT_METHODS

from ._gateway import Client


def load_api_helper(name: str) -> ModuleType:
    """A helper module of tests/api (those tests import them by plain name), loaded by path."""
    path = pathlib.Path(__file__).resolve().parents[1] / "api" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_e2e_shared{name}", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


openapi = load_api_helper("_api_openapi")

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4"
_ERROR_POINTER = "/components/schemas/Error"

# Field names that would betray private key material in an answer (anywhere, at any depth).
_FORBIDDEN_FIELD_WORDS = ("private", "seed", "secret_key", "sk", "kek", "xi")
_ALLOWED_SECRETISH_FIELDS = frozenset({"shared_secret"})

_PUBLIC_KEY_SIZES = {a.public_key_size for a in ALGORITHMS.values()}
_SIGNATURE_SIZES = {a.name: a.signature_size for a in ALGORITHMS.values() if a.signature_size}
_KEM_CT_SIZES = {a.ciphertext_size for a in ALGORITHMS.values() if a.ciphertext_size}
_HPKE_TAG = 16
_IMPORT_METHOD_KEMS = {method: alg.name for method, alg in IMPORT_METHODS.items()}
_KEY_MATERIAL_CODES = frozenset({"invalid_key_material", "invalid_wrapped_key"})


@dataclass
class Exchange:
    method: str
    path: str
    status: int
    body: Any
    request_id: str


@dataclass
class Transcript:
    """Everything a set of checked clients received."""

    exchanges: list[Exchange] = field(default_factory=list)

    def json_bodies(self) -> list[Any]:
        return [e.body for e in self.exchanges if not isinstance(e.body, (bytes, str))]

    def values(self, name: str) -> list[Any]:
        """Every value of field ``name`` at any depth of any JSON answer."""
        out: list[Any] = []
        for body in self.json_bodies():
            _collect(body, name, out)
        return out


def _collect(node: Any, name: str, out: list[Any]) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == name:
                out.append(v)
            _collect(v, name, out)
    elif isinstance(node, list):
        for v in node:
            _collect(v, name, out)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    return binascii.a2b_base64(text.encode("ascii"), strict_mode=True)


class ContractViolation(AssertionError):
    pass


def route_of(method: str, path: str) -> Route | None:
    try:
        found = resolve(method, path)
    except RouteMethodNotAllowed:
        return None
    return None if found is None else found[0]


def check_answer(method: str, path: str, status: int, body: Any, headers: http.client.HTTPMessage,
                 *, allow_5xx: bool = False) -> None:
    """Raise ``ContractViolation`` unless the answer keeps the documented contract."""
    where = f"{method} {path[:80]} -> {status}"
    rid = headers.get("X-Request-Id")
    if not rid:
        raise ContractViolation(f"{where}: no X-Request-Id header")
    for name, want in (("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff")):
        if headers.get_all(name) != [want]:
            raise ContractViolation(f"{where}: {name} {headers.get_all(name)!r}, expected one {want!r}")
    if status >= 500 and not allow_5xx:
        raise ContractViolation(f"{where}: server error {body!r:.300}")
    if status >= 400:
        if not headers.get("content-type", "").startswith("application/json") or not isinstance(body, dict):
            raise ContractViolation(f"{where}: error without a JSON body: {body!r:.300}")
        errors = list(openapi.validator(_ERROR_POINTER).iter_errors(body))
        if errors:
            raise ContractViolation(f"{where}: error body {body!r:.300} violates Error: {errors[0].message}")
        if body["error"]["request_id"] != rid:
            raise ContractViolation(
                f"{where}: error.request_id {body['error']['request_id']!r} != X-Request-Id {rid!r}"
            )
    if status == 401 and not headers.get("WWW-Authenticate"):
        raise ContractViolation(f"{where}: 401 without WWW-Authenticate")
    if status == 429 and not headers.get("Retry-After"):
        raise ContractViolation(f"{where}: 429 without Retry-After")

    try:
        found = resolve(method, path)
    except RouteMethodNotAllowed as exc:  # decided before authentication
        if status != 405 or body["error"]["code"] != "method_not_allowed":
            raise ContractViolation(
                f"{where}: a served path with another method must be 405, not {body!r:.200}") from exc
        if headers.get("Allow") != ", ".join(exc.allow):
            raise ContractViolation(
                f"{where}: Allow {headers.get('Allow')!r} != {', '.join(exc.allow)!r}") from exc
        return
    if found is None:  # not a served path (no sidecar upstream here)
        if status not in (401, 404) or (status == 404 and body["error"]["code"] != "route_not_found"):
            raise ContractViolation(
                f"{where}: an unserved path must be 401 or 404 route_not_found, not {body!r:.200}"
            )
        return
    route = found[0]
    if route.operation == "metrics" and status == 200:
        ctype = headers.get("content-type", "")
        if not ctype.startswith(METRICS_CONTENT_TYPE):
            raise ContractViolation(f"{where}: metrics content-type {ctype!r}")
        return
    if str(status) not in openapi.operation(route)["responses"]:
        raise ContractViolation(f"{where}: status {status} is not documented for {route.name}: {body!r:.300}")
    documented = openapi.operation(route)["responses"][str(status)]
    if status < 400 and any(t.startswith("text/plain") for t in documented.get("content", {})):  # notes
        ctype = headers.get("content-type", "")
        if ctype != "text/plain; charset=utf-8" or not isinstance(body, bytes):
            raise ContractViolation(f"{where}: {route.name} answers text/plain; charset=utf-8, not {ctype!r}")
        if status != route.status:
            raise ContractViolation(f"{where}: {route.name} succeeds with {route.status}, not {status}")
        return
    try:
        openapi.validate_response(route, status, body)
    except Exception as exc:  # jsonschema.ValidationError: report it as ours, with the body
        raise ContractViolation(f"{where}: body violates the schema of {route.name} {status}: "
                                f"{getattr(exc, 'message', exc)}; body {json.dumps(body)[:300]}") from None
    if status >= 400:
        code = body["error"]["code"]
        if code not in openapi.documented_codes(route, status):
            raise ContractViolation(f"{where}: code {code!r} is not documented for {route.name} {status}")
    elif status != route.status:
        raise ContractViolation(f"{where}: {route.name} succeeds with {route.status}, not {status}")
    check_no_private_material(body, where)


def check_no_private_material(body: Any, where: str = "") -> None:
    """No field name that could carry private key material; sizes of what may appear."""
    def walk(node: Any, parent: dict[str, Any] | None) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                low = k.lower()
                if k not in _ALLOWED_SECRETISH_FIELDS and any(
                    w == low or w in low.split("_") or (len(w) > 3 and w in low)
                    for w in _FORBIDDEN_FIELD_WORDS
                ):
                    raise ContractViolation(f"{where}: field {k!r} in an answer")
                walk(v, node)
        elif isinstance(node, list):
            for v in node:
                walk(v, parent)

    walk(body, None)
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        msg = str(body["error"].get("message", "")).lower().replace("'seed'", "")  # a key import format
        # a key import's refusal says which private key form was expected (never its bytes)
        if body["error"].get("code") in _KEY_MATERIAL_CODES:
            return
        if "private" in msg or "seed" in msg:
            raise ContractViolation(f"{where}: error message mentions private material: {msg!r}")
    check_sizes(body, where)


def check_sizes(body: Any, where: str = "") -> None:
    """Every public key has its algorithm's size (never a private key size); every signature,
    KEM ciphertext and shared secret has a size its algorithm allows."""
    if not isinstance(body, dict):
        return
    jobs = body.get("import_jobs") if isinstance(body.get("import_jobs"), list) else [body]
    for j in jobs:
        if isinstance(j, dict) and isinstance(j.get("public_key"), str) and "method" in j:
            alg = ALGORITHMS[_IMPORT_METHOD_KEMS[j["method"]]]
            n = len(unb64(j["public_key"]))
            if n != alg.public_key_size:
                raise ContractViolation(f"{where}: {j['method']} job public key of {n} bytes")
    keys = body.get("keys") if isinstance(body.get("keys"), list) else [body]
    for k in keys:
        if isinstance(k, dict) and isinstance(k.get("public_key"), str) and "algorithm" in k:
            alg = ALGORITHMS[k["algorithm"]]
            n = len(unb64(k["public_key"]))
            if n != alg.public_key_size:
                raise ContractViolation(
                    f"{where}: {alg.name} public key of {n} bytes, not {alg.public_key_size}"
                )
    items = body.get("items") if isinstance(body.get("items"), list) else [body]
    for it in items:
        if not isinstance(it, dict):
            continue
        if isinstance(it.get("shared_secret"), str) and len(unb64(it["shared_secret"])) != 32:
            raise ContractViolation(f"{where}: shared secret of {len(unb64(it['shared_secret']))} bytes")
        if isinstance(it.get("signature"), str):
            n = len(unb64(it["signature"]))
            if not (min(_SIGNATURE_SIZES.values()) <= n <= max(_SIGNATURE_SIZES.values())):
                raise ContractViolation(f"{where}: signature of {n} bytes")
        if isinstance(it.get("ciphertext"), str):
            n = len(unb64(it["ciphertext"]))
            if "hpke_suite" in it:
                enc = ALGORITHMS[it["algorithm"]].ciphertext_size
                if n < enc + _HPKE_TAG:
                    raise ContractViolation(f"{where}: HPKE ciphertext of {n} bytes")
            elif n not in _KEM_CT_SIZES:
                raise ContractViolation(f"{where}: KEM ciphertext of {n} bytes")


class CheckedClient:
    """A keep-alive client of the live gateway whose every answer is contract-checked."""

    def __init__(self, client: Client, transcript: Transcript | None = None) -> None:
        self.client = client
        self.transcript = transcript if transcript is not None else Transcript()

    def close(self) -> None:
        self.client.close()

    def call(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
             headers: dict[str, str] | None = None, auth: bool = True,
             allow_5xx: bool = False) -> tuple[int, Any, http.client.HTTPMessage]:
        status, value, h = self.client.call(method, path, body=body, raw=raw, headers=headers, auth=auth)
        check_answer(method, path, status, value, h, allow_5xx=allow_5xx)
        self.transcript.exchanges.append(Exchange(method, path, status, value, h.get("X-Request-Id", "")))
        return status, value, h

    def ok(self, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        """The JSON answer of a request that must succeed."""
        status, value, _ = self.call(method, path, body, **kw)
        if status >= 300:
            raise AssertionError(f"{method} {path}: {status} {value!r:.400}")
        return value

    def error(self, method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, str, dict[str, Any]]:
        """``(status, code, error)`` of a request that must fail."""
        status, value, _ = self.call(method, path, body, **kw)
        if status < 400:
            raise AssertionError(f"{method} {path}: expected an error, got {status} {value!r:.300}")
        return status, value["error"]["code"], value["error"]


KEY_ID_RE = re.compile(r"k_[a-z2-7]{26}")
