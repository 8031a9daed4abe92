from __future__ import annotations

import pytest

from qpher_proxy.api import ROUTES, RouteMethodNotAllowed, resolve
from qpher_proxy.api.routes import Route

_PARAMS = {"key_id": "k_0123456789abcdef", "import_job_id": "ij_0123456789abcdef"}


def _concrete(template: str) -> str:
    for name, value in _PARAMS.items():
        template = template.replace("{" + name + "}", value)
    return template


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: r.name)
def test_every_route_resolves_to_itself(route: Route) -> None:
    found = resolve(route.method, _concrete(route.template))
    assert found is not None
    got, params = found
    assert got is route
    assert params == {name: value for name, value in _PARAMS.items() if "{" + name + "}" in route.template}


def test_the_import_route_is_not_a_key_named_import() -> None:
    found = resolve("POST", "/v1/keys/import")
    assert found is not None and found[0].operation == "keys.import" and found[1] == {}
    with pytest.raises(RouteMethodNotAllowed) as info:
        resolve("GET", "/v1/keys/import")
    assert info.value.allow == ("POST",)
    found = resolve("POST", "/v1/keys/k_1/import-version")
    assert found is not None and found[0].operation == "keys.import_version"


def test_route_names_are_templates_so_no_key_id_reaches_a_label() -> None:
    route, params = resolve("POST", "/v1/keys/k_secretlooking/rotate")  # type: ignore[misc]
    assert route.name == "POST /v1/keys/{key_id}/rotate"
    assert "k_secretlooking" not in route.name
    assert params == {"key_id": "k_secretlooking"}


def test_route_names_and_operations_are_unique() -> None:
    assert len({r.name for r in ROUTES}) == len(ROUTES)
    assert len({r.operation for r in ROUTES}) == len(ROUTES)


@pytest.mark.parametrize("path", [
    "/", "/v1", "/v1/", "/v1/keys/", "/v1/sign/", "/v1/keys/a/b", "/v1/keys//rotate",
    "/v1/keys/a/rotate/", "/V1/sign", "/v1/kem", "/v1/sign/batch/x", "/healthz/", "/app/anything",
    "/v1/keys/a/destroy", "//v1/sign", "/v1/%73ign",
])
def test_paths_not_served_resolve_to_none(path: str) -> None:
    assert resolve("GET", path) is None
    assert resolve("POST", path) is None


def test_query_string_is_ignored_for_matching() -> None:
    found = resolve("GET", "/v1/keys?limit=5&cursor=abc")
    assert found is not None and found[0].operation == "keys.list"


@pytest.mark.parametrize(("method", "path", "allow"), [
    ("PUT", "/v1/keys", "GET, POST"),
    ("DELETE", "/v1/sign", "POST"),
    ("GET", "/v1/sign/batch", "POST"),
    ("POST", "/v1/keys/k_1", "DELETE, GET"),
    ("GET", "/v1/keys/k_1/rotate", "POST"),
    ("HEAD", "/v1/info", "GET"),
    ("PATCH", "/admin/fail-open", "DELETE, POST"),
    ("DELETE", "/v1/import-jobs", "GET, POST"),
    ("POST", "/v1/import-jobs/ij_1", "GET"),
    ("GET", "/v1/keys/k_1/import-version", "POST"),
    ("post", "/v1/sign", "POST"),
])
def test_wrong_method_on_served_path_is_405_with_allow(method: str, path: str, allow: str) -> None:
    with pytest.raises(RouteMethodNotAllowed) as info:
        resolve(method, path)
    exc = info.value
    assert (exc.status, exc.code) == (405, "method_not_allowed")
    assert exc.headers == ((b"allow", allow.encode()),)
    assert exc.allow == tuple(allow.split(", "))


def test_long_method_is_truncated_in_the_message() -> None:
    with pytest.raises(RouteMethodNotAllowed) as info:
        resolve("X" * 1000, "/v1/sign")
    assert len(info.value.message) < 120


def test_route_classes() -> None:
    by_op = {r.operation: r for r in ROUTES}
    assert by_op["keys.create"].status == 201
    assert by_op["keys.destroy"].status == 202
    assert by_op["import_jobs.create"].status == by_op["keys.import"].status == 201
    assert by_op["keys.import_version"].status == by_op["keys.rotate"].status == 200
    assert {by_op[op].quota for op in ("import_jobs.create", "import_jobs.read", "import_jobs.list",
                                       "keys.import", "keys.import_version")} == {"keys"}
    assert by_op["sign.batch"].batch and by_op["sign.batch"].quota == "sign"
    assert by_op["decrypt"].quota == "encrypt"
    assert by_op["kem.decapsulate.batch"].quota == "kem"
    assert by_op["health"].public and by_op["health"].owner == "server"
    assert by_op["metrics"].admin and not by_op["metrics"].public
    assert all(r.owner == "api" for r in ROUTES if r.template.startswith("/v1/")
               and not r.template.startswith("/v1/audit/"))  # the audit log's routes: the server's
    assert all(r.owner == "server" and r.quota is None for r in ROUTES if r.template.startswith("/v1/audit/"))
    assert all(r.quota is not None for r in ROUTES if r.owner == "api")
