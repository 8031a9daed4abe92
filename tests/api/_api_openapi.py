"""openapi.yaml, loaded once, with helpers to find a route's operation, the error codes it
documents per status, and to validate a JSON body against a response schema."""

from __future__ import annotations

import functools
import pathlib
from typing import Any

import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from qpher_proxy.api import Route

OPENAPI_PATH = pathlib.Path(__file__).resolve().parents[2] / "openapi.yaml"
_URI = "urn:qpher:openapi"


@functools.cache
def doc() -> dict[str, Any]:
    with OPENAPI_PATH.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


@functools.cache
def _registry() -> Registry:
    return Registry().with_resource(_URI, Resource.from_contents(doc(), default_specification=DRAFT202012))


def deref(obj: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in obj:
        ref = obj["$ref"]
        assert ref.startswith("#/"), ref
        node: Any = doc()
        for part in ref[2:].split("/"):
            node = node[part]
        obj = node
    return obj


def operation(route: Route) -> dict[str, Any]:
    return doc()["paths"][route.template][route.method.lower()]


def response(route: Route, status: int) -> dict[str, Any] | None:
    r = operation(route)["responses"].get(str(status))
    return None if r is None else deref(r)


def documented_codes(route: Route, status: int) -> list[str]:
    r = response(route, status)
    return [] if r is None else list(r.get("x-qpher-error-codes", []))


@functools.cache
def validator(pointer: str) -> Draft202012Validator:
    """A validator for the schema at ``pointer`` (e.g. ``/components/schemas/Key``)."""
    return Draft202012Validator({"$ref": f"{_URI}#{pointer}"}, registry=_registry())


def response_schema_pointer(route: Route, status: int) -> str:
    raw = operation(route)["responses"][str(status)]
    ptr = (
        "/paths/"
        + route.template.replace("~", "~0").replace("/", "~1")
        + f"/{route.method.lower()}/responses/{status}"
    )
    if "$ref" in raw:
        ptr = raw["$ref"][1:]
    return ptr + "/content/application~1json/schema"


def validate_response(route: Route, status: int, body: Any) -> None:
    """Raise jsonschema.ValidationError unless ``body`` matches the documented response."""
    assert str(status) in operation(route)["responses"], f"{route.name}: status {status} not documented"
    validator(response_schema_pointer(route, status)).validate(body)


def request_schema(route: Route) -> dict[str, Any]:
    rb = operation(route)["requestBody"]
    return deref(rb["content"]["application/json"]["schema"])


def validate_request(route: Route, body: Any) -> bool:
    rb = operation(route).get("requestBody")
    if rb is None:
        return body == {}
    ptr = ("/paths/" + route.template.replace("/", "~1") + f"/{route.method.lower()}"
           "/requestBody/content/application~1json/schema")
    return validator(ptr).is_valid(body)
