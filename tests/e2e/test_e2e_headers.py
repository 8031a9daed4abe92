"""Security response headers through the live gateway, with ``http.hsts_max_age`` unset (the
default): every answer of the proxy itself carries ``Cache-Control: no-store`` and
``X-Content-Type-Options: nosniff`` and no ``Strict-Transport-Security``. With HSTS set, and
for forwarded responses: ``test_e2e_sidecar.py``."""

from __future__ import annotations

import http.client
import socket
from collections.abc import Iterator

import pytest

from ._gateway import Client, Gateway

SECURITY = {
    "cache-control": ["no-store"],
    "x-content-type-options": ["nosniff"],
    "strict-transport-security": [],
}


def _security(headers: http.client.HTTPMessage) -> dict[str, list[str]]:
    return {name: headers.get_all(name) or [] for name in SECURITY}


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> Iterator[Client]:
    c = gateway.client()
    yield c
    c.close()


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("GET", "/healthz", None, 200),
        ("HEAD", "/healthz", None, 200),
        ("GET", "/readyz", None, 200),
        ("GET", "/metrics", None, 200),
        ("GET", "/v1/info", None, 200),
        ("POST", "/v1/keys", {"algorithm": "ml-kem-768"}, 201),
        ("GET", "/v1/keys/k_doesnotexist0000000000000000", None, 404),
        ("POST", "/v1/keys", {"algorithm": "no-such-algorithm"}, 400),
        ("PUT", "/v1/sign", None, 405),
        ("GET", "/no/such/route", None, 404),
    ],
)
def test_every_answer_of_the_proxy_is_no_store_and_nosniff(
        client: Client, method: str, path: str, body: object, status: int) -> None:
    got, _, headers = client.call(method, path, body)
    assert got == status
    assert _security(headers) == SECURITY


def test_an_unauthenticated_error_is_no_store_and_nosniff(gateway: Gateway) -> None:
    c = gateway.client(api_key=None)
    status, _, headers = c.call("GET", "/v1/keys", auth=False)
    c.close()
    assert status == 401 and _security(headers) == SECURITY


def test_a_request_refused_before_it_is_parsed_is_no_store_and_nosniff(gateway: Gateway) -> None:
    # A bare LF in the head: answered 400 by the HTTP layer itself, before any handler.
    with socket.create_connection((gateway.host, gateway.port), timeout=10) as raw:
        with gateway.context().wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\nX: y\r\n\r\n")
            response = http.client.HTTPResponse(tls)  # type: ignore[arg-type]
            response.begin()
            assert response.status == 400
            assert _security(response.headers) == SECURITY
            assert response.headers["connection"] == "close"
