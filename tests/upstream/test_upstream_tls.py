"""https upstreams: certificate verification against a private CA, client certificates, reuse."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trustme
from _upstream_servers import echo_body, echo_request, keep_alive, lazy_body, serve_upstream

from qpher_proxy.errors import ConfigError, UpstreamUnavailable
from qpher_proxy.upstream import UpstreamClient


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def files(ca: trustme.CA, tmp_path: Path) -> dict[str, str]:
    client = ca.issue_cert("gateway.qpher.test")
    paths = {
        "ca_file": tmp_path / "ca.pem",
        "client_cert": tmp_path / "client.pem",
        "client_key": tmp_path / "client.key",
    }
    ca.cert_pem.write_to_path(str(paths["ca_file"]))
    client.cert_chain_pems[0].write_to_path(str(paths["client_cert"]))
    for pem in client.cert_chain_pems[1:]:
        pem.write_to_path(str(paths["client_cert"]), append=True)
    client.private_key_pem.write_to_path(str(paths["client_key"]))
    return {k: str(v) for k, v in paths.items()}


def server_context(ca: trustme.CA, *, require_client_cert: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    if require_client_cert:
        ca.configure_trust(ctx)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


async def test_https_upstream_with_required_client_certificate(ca: trustme.CA, files: dict[str, str]) -> None:
    async with serve_upstream(
        keep_alive(echo_request), tls=server_context(ca, require_client_cert=True)
    ) as up:
        async with UpstreamClient(up.url, **files) as client:
            for _ in range(2):
                async with client.request("POST", "/tls", [], body=b"over tls") as resp:
                    assert resp.status == 200
                    assert b'"body_length": 8' in b"".join([c async for c in resp.body_chunks()])
            assert client.stats().connections_opened == 1
    assert up.accepts == 1  # the TLS connection was kept alive and reused
    ((subject_alt_names,),) = [cert["subjectAltName"] for cert in up.peer_certs]  # type: ignore[index]
    assert subject_alt_names == ("DNS", "gateway.qpher.test")


async def test_tls_exchange_is_full_duplex(ca: trustme.CA, files: dict[str, str]) -> None:
    # One task writes the request body while another reads the echoed response over one SSLStream.
    size = 16 * 1024 * 1024
    async with serve_upstream(keep_alive(echo_body), tls=server_context(ca, require_client_cert=True)) as up:
        async with UpstreamClient(up.url, **files) as client:
            async with client.request("PUT", "/", [], body=lazy_body(size)) as resp:
                total = 0
                async for chunk in resp.body_chunks():
                    total += len(chunk)
            assert total == size and client.stats().idle == 1


async def test_upstream_requiring_a_client_certificate_refuses_one_without(
        ca: trustme.CA, files: dict[str, str]) -> None:
    async with serve_upstream(
        keep_alive(echo_request), tls=server_context(ca, require_client_cert=True)
    ) as up:
        async with UpstreamClient(up.url, ca_file=files["ca_file"]) as client:
            with pytest.raises(UpstreamUnavailable) as info:
                await client.send("GET", "/", [])
            assert info.value.status == 502
            assert client.stats().active == 0


async def test_upstream_certificate_from_an_unknown_ca_is_refused(ca: trustme.CA, tmp_path: Path) -> None:
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    async with serve_upstream(
        keep_alive(echo_request), tls=server_context(ca, require_client_cert=False)
    ) as up:
        async with UpstreamClient(up.url, ca_file=str(other)) as client:
            with pytest.raises(UpstreamUnavailable, match="tls handshake") as info:
                await client.send("GET", "/", [])
            assert isinstance(info.value.__cause__.__cause__, ssl.SSLCertVerificationError)  # type: ignore[union-attr]


def test_unreadable_client_certificate_is_a_config_error(files: dict[str, str], tmp_path: Path) -> None:
    bad = tmp_path / "garbage.pem"
    bad.write_text("not a certificate")
    with pytest.raises(ConfigError) as info:
        UpstreamClient("https://127.0.0.1:1", ca_file=files["ca_file"], client_cert=str(bad))
    assert "not a certificate" not in info.value.message
    with pytest.raises(ConfigError):
        UpstreamClient("https://127.0.0.1:1", client_key=files["client_key"])
