"""The quickstart path: init, serve, a few requests over real TLS to the real KMS."""

from __future__ import annotations

from ._gateway import Gateway


def test_health_ready_and_info(gateway: Gateway) -> None:
    c = gateway.client()
    status, body, _ = c.call("GET", "/healthz", auth=False)
    assert (status, body) == (200, {"status": "ok"})
    status, body, _ = c.call("GET", "/readyz", auth=False)
    assert status == 200 and body["status"] == "ready"
    status, body, _ = c.call("GET", "/v1/info")
    assert status == 200
    assert body["modes"]["pqc"] == {"kem": "ml-kem-768", "signature": "ml-dsa-65"}
    assert body["backend"]["name"] == "openssl"
    assert body["tls"]["version"] == "TLSv1.3"
    assert body["tls"]["group"] == "X25519"  # the stdlib client links OpenSSL 3.0: no ML-KEM
    c.close()
