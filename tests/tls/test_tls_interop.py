"""Real clients against a TLSListener on 127.0.0.1: pyOpenSSL (OpenSSL 4, ML-KEM), Python's
ssl (system OpenSSL 3.0, classical only), curl, raw sockets."""

from __future__ import annotations

import logging
import shutil
import ssl
from pathlib import Path

import pytest
import trio
import trustme
from _tls_helpers import (
    HTTP_RESPONSE,
    copy_pki,
    pyopenssl_client_context,
    pyopenssl_request,
    running_server,
    serve_echo,
    settings_for,
    stdlib_context,
    stdlib_request,
    trio_client,
)
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.mldsa import MLDSA65PublicKey
from OpenSSL import SSL

from qpher_proxy import errors
from qpher_proxy.tls import ServerTLSContextHolder, TLSInfo
from qpher_proxy.tls.certs import DevPKI, make_dev_pki


def _info(outcome: object) -> TLSInfo:
    assert isinstance(outcome, TLSInfo), outcome
    return outcome


def _failure(outcome: object) -> errors.TLSHandshakeFailed:
    assert isinstance(outcome, errors.TLSHandshakeFailed), outcome
    assert isinstance(outcome, trio.BrokenResourceError)
    return outcome


# ---- key exchange ---------------------------------------------------------------------------

async def test_pyopenssl_client_negotiates_tls13_with_x25519mlkem768(pki: DevPKI) -> None:
    async with running_server(ServerTLSContextHolder(settings_for(pki))) as srv:
        ctx = pyopenssl_client_context(pki.ca_cert)
        result = await trio.to_thread.run_sync(pyopenssl_request, srv.port, ctx)
        info = _info(await srv.next_outcome())
    assert (result.version, result.group) == ("TLSv1.3", "X25519MLKEM768")
    assert (info.version, info.group, info.alpn) == ("TLSv1.3", "X25519MLKEM768", "http/1.1")
    assert info.post_quantum and info.client_cert_subject is None
    assert result.response == HTTP_RESPONSE


async def test_stdlib_ssl_client_negotiates_tls13_with_x25519(pki: DevPKI) -> None:
    async with running_server(ServerTLSContextHolder(settings_for(pki))) as srv:
        version, _cipher, _der, response = await trio.to_thread.run_sync(
            stdlib_request, srv.port, stdlib_context(pki.ca_cert)
        )
        info = _info(await srv.next_outcome())
    assert version == "TLSv1.3" and response == HTTP_RESPONSE
    assert (info.version, info.group) == ("TLSv1.3", "X25519")
    assert not info.post_quantum


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_fetches_over_tls_with_the_dev_ca(pki: DevPKI) -> None:
    async with running_server(ServerTLSContextHolder(settings_for(pki))) as srv:
        proc = await trio.run_process(
            ["curl", "-sS", "--max-time", "10", "--cacert", str(pki.ca_cert), f"https://127.0.0.1:{srv.port}/"],
            capture_stdout=True, capture_stderr=True, check=False,
        )
        info = _info(await srv.next_outcome())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"ok\n"
    assert info.version == "TLSv1.3" and info.alpn == "http/1.1"


async def test_tls12_client_gets_ecdhe_with_aead_by_default(pki: DevPKI) -> None:
    async with running_server(ServerTLSContextHolder(settings_for(pki))) as srv:
        ctx = stdlib_context(pki.ca_cert, max_version=ssl.TLSVersion.TLSv1_2)
        version, cipher, _der, response = await trio.to_thread.run_sync(stdlib_request, srv.port, ctx)
        info = _info(await srv.next_outcome())
    assert version == "TLSv1.2" and response == HTTP_RESPONSE
    assert cipher.startswith("ECDHE-ECDSA-") and ("GCM" in cipher or "CHACHA20" in cipher)
    assert info.group == "X25519"


# ---- versions -------------------------------------------------------------------------------

async def test_client_offering_only_tls11_is_refused(pki: DevPKI) -> None:
    async with running_server(ServerTLSContextHolder(settings_for(pki))) as srv:
        ctx = pyopenssl_client_context(
            pki.ca_cert, min_version=SSL.TLS1_1_VERSION, max_version=SSL.TLS1_1_VERSION
        )
        with pytest.raises(SSL.Error, match="protocol version"):
            await trio.to_thread.run_sync(pyopenssl_request, srv.port, ctx)
        failure = _failure(await srv.next_outcome())
    assert failure.reason == "unsupported_version" and failure.code == "tls_handshake_failed"


async def test_min_version_13_refuses_a_tls12_only_client(pki: DevPKI) -> None:
    async with running_server(ServerTLSContextHolder(settings_for(pki, min_version="1.3"))) as srv:
        ctx = stdlib_context(pki.ca_cert, max_version=ssl.TLSVersion.TLSv1_2)
        with pytest.raises(ssl.SSLError):
            await trio.to_thread.run_sync(stdlib_request, srv.port, ctx)
        failure = _failure(await srv.next_outcome())
    assert failure.reason == "unsupported_version"


# ---- require_pq -----------------------------------------------------------------------------

async def test_require_pq_refuses_classical_client_and_serves_pq_client(
    pki: DevPKI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="qpher.tls")
    async with running_server(ServerTLSContextHolder(settings_for(pki, require_pq=True))) as srv:
        with pytest.raises(ssl.SSLError, match="HANDSHAKE_FAILURE|handshake failure"):
            await trio.to_thread.run_sync(stdlib_request, srv.port, stdlib_context(pki.ca_cert))
        failure = _failure(await srv.next_outcome())
        result = await trio.to_thread.run_sync(
            pyopenssl_request, srv.port, pyopenssl_client_context(pki.ca_cert)
        )
        info = _info(await srv.next_outcome())
    assert isinstance(failure, errors.TLSNotPostQuantum) and failure.code == "tls_pq_required"
    assert result.group == "X25519MLKEM768" and result.response == HTTP_RESPONSE
    assert info.group == "X25519MLKEM768"
    # one DEBUG line per refusal (the server sums them up at INFO, rate-limited)
    refusals = [
        r for r in caplog.records if r.name == "qpher.tls" and r.getMessage() == "tls handshake failed"
    ]
    assert len(refusals) == 1 and refusals[0].levelno == logging.DEBUG
    assert refusals[0].fields["reason"] == "pq_required" and "post-quantum" in refusals[0].fields["detail"]


# ---- certificates ---------------------------------------------------------------------------

async def test_mldsa65_only_client_gets_the_mldsa_certificate_and_others_get_ecdsa(pki: DevPKI) -> None:
    assert pki.mldsa_server_cert is not None and pki.mldsa_ca_cert is not None
    settings = settings_for(pki, mldsa_cert_file=pki.mldsa_server_cert, mldsa_key_file=pki.mldsa_server_key)
    async with running_server(ServerTLSContextHolder(settings)) as srv:
        pq_ctx = pyopenssl_client_context(pki.mldsa_ca_cert, sigalgs=("mldsa65",))
        pq = await trio.to_thread.run_sync(pyopenssl_request, srv.port, pq_ctx)
        ec_ctx = pyopenssl_client_context(
            pki.ca_cert, sigalgs=("ecdsa_secp256r1_sha256", "rsa_pss_rsae_sha256")
        )
        classical = await trio.to_thread.run_sync(pyopenssl_request, srv.port, ec_ctx)
        # Server preference: offering mldsa65 at all (here after ECDSA) gets post-quantum auth.
        both_ctx = pyopenssl_client_context(
            pki.ca_cert, pki.mldsa_ca_cert, sigalgs=("ecdsa_secp256r1_sha256", "mldsa65")
        )
        both = await trio.to_thread.run_sync(pyopenssl_request, srv.port, both_ctx)
        _v, _c, der, response = await trio.to_thread.run_sync(
            stdlib_request, srv.port, stdlib_context(pki.ca_cert)
        )
    assert isinstance(pq.peer_cert.public_key(), MLDSA65PublicKey) and pq.response == HTTP_RESPONSE
    assert isinstance(both.peer_cert.public_key(), MLDSA65PublicKey)
    assert isinstance(classical.peer_cert.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(x509.load_der_x509_certificate(der).public_key(), ec.EllipticCurvePublicKey)
    assert response == HTTP_RESPONSE


@pytest.fixture(scope="module")
def client_cas(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("client-pki")
    good, other = trustme.CA(), trustme.CA()
    good.cert_pem.write_to_path(str(d / "client-ca.pem"))
    good.issue_cert(
        "client-1@example.test", common_name="client-1"
    ).private_key_and_cert_chain_pem.write_to_path(str(d / "good.pem"))
    other.issue_cert(
        "intruder@example.test", common_name="intruder"
    ).private_key_and_cert_chain_pem.write_to_path(str(d / "other.pem"))
    return {"ca": d / "client-ca.pem", "good": d / "good.pem", "other": d / "other.pem"}


async def _mtls_attempt(pki: DevPKI, port: int, cert_chain: Path | None) -> bytes | None:
    ctx = stdlib_context(pki.ca_cert, cert_chain=cert_chain)
    try:
        return (await trio.to_thread.run_sync(stdlib_request, port, ctx))[3]
    except (ssl.SSLError, ConnectionError):
        return None  # TLS 1.3: the client learns of the refusal after its own handshake finished


async def test_mtls_required_refuses_no_certificate_and_foreign_ca_and_accepts_right_ca(
    pki: DevPKI, client_cas: dict[str, Path]
) -> None:
    settings = settings_for(pki, client_auth="required", client_ca=client_cas["ca"])
    async with running_server(ServerTLSContextHolder(settings)) as srv:
        assert await _mtls_attempt(pki, srv.port, None) is None
        no_cert = _failure(await srv.next_outcome())
        assert await _mtls_attempt(pki, srv.port, client_cas["other"]) is None
        foreign = _failure(await srv.next_outcome())
        response = await _mtls_attempt(pki, srv.port, client_cas["good"])
        info = _info(await srv.next_outcome())
    assert no_cert.reason == "client_certificate_required"
    assert foreign.reason == "certificate_rejected"
    assert response == HTTP_RESPONSE
    assert info.client_cert_subject is not None and "CN=client-1" in info.client_cert_subject


async def test_mtls_optional_accepts_a_client_without_certificate(
    pki: DevPKI, client_cas: dict[str, Path]
) -> None:
    settings = settings_for(pki, client_auth="optional", client_ca=client_cas["ca"])
    async with running_server(ServerTLSContextHolder(settings)) as srv:
        assert await _mtls_attempt(pki, srv.port, None) == HTTP_RESPONSE
        assert _info(await srv.next_outcome()).client_cert_subject is None
        assert await _mtls_attempt(pki, srv.port, client_cas["other"]) is None
        assert _failure(await srv.next_outcome()).reason == "certificate_rejected"


# ---- reload -----------------------------------------------------------------------------------

async def test_reload_serves_new_certificate_to_new_connections_while_old_one_keeps_working(
    pki: DevPKI, tmp_path: Path
) -> None:
    live = copy_pki(pki, tmp_path / "live")
    fresh = make_dev_pki(tmp_path / "fresh", mldsa=False)  # another CA and server key
    holder = ServerTLSContextHolder(settings_for(live))
    ctx = pyopenssl_client_context(live.ca_cert, fresh.ca_cert)
    async with running_server(holder, serve_echo) as srv:
        old = await trio_client(srv.port, ctx)
        async with old:
            await old.send_all(b"before")
            assert await old.receive_some() == b"before"
            old_serial = old.peer_certificate().serial_number  # type: ignore[union-attr]

            for name in ("server.crt", "server.key"):
                (live.directory / name).write_bytes((fresh.directory / name).read_bytes())
            assert holder.reload().generation == 2

            new = await trio_client(srv.port, ctx)
            async with new:
                await new.send_all(b"after")
                assert await new.receive_some() == b"after"
                new_cert = new.peer_certificate()
            assert new_cert is not None and new_cert.serial_number != old_serial
            assert new_cert == x509.load_pem_x509_certificate(fresh.server_cert.read_bytes())

            # A broken file on the next reload: refused, generation 2 stays in force.
            (live.directory / "server.key").write_bytes(
                b"-----BEGIN " + b"PRIVATE KEY-----\nnope\n"
            )  # garbage, not a key
            with pytest.raises(errors.ConfigError, match="tls.key_file"):
                holder.reload()
            assert holder.current.generation == 2

            await old.send_all(b"still here")  # the first connection never noticed
            assert await old.receive_some() == b"still here"


# ---- misbehaving clients ----------------------------------------------------------------------

async def test_handshake_timeout_closes_a_silent_client(
    pki: DevPKI, autojump_clock: trio.testing.MockClock
) -> None:
    holder = ServerTLSContextHolder(settings_for(pki, handshake_timeout=10.0))
    async with running_server(holder) as srv:
        silent = await trio.open_tcp_stream("127.0.0.1", srv.port)
        async with silent:
            started = trio.current_time()
            assert await silent.receive_some() == b""  # closed by the server, nothing sent
            failure = _failure(await srv.next_outcome(timeout=60))
            assert trio.current_time() - started >= 10.0
    assert isinstance(failure, errors.TLSHandshakeTimeout) and failure.code == "tls_handshake_timeout"


async def test_silent_client_does_not_block_the_next_one(pki: DevPKI) -> None:
    async with running_server(ServerTLSContextHolder(settings_for(pki))) as srv:
        silent = await trio.open_tcp_stream("127.0.0.1", srv.port)
        async with silent:
            result = await trio.to_thread.run_sync(
                pyopenssl_request, srv.port, pyopenssl_client_context(pki.ca_cert)
            )
            assert result.response == HTTP_RESPONSE


async def test_plain_http_to_the_tls_port_is_closed_cleanly(pki: DevPKI) -> None:
    async with running_server(ServerTLSContextHolder(settings_for(pki))) as srv:
        plain = await trio.open_tcp_stream("127.0.0.1", srv.port)
        async with plain:
            await plain.send_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert await plain.receive_some() == b""  # no alert bytes, no response: a clean FIN
        failure = _failure(await srv.next_outcome())
    assert isinstance(failure, errors.TLSPlaintextOnTLSPort)
    assert failure.code == "tls_plaintext_request" and failure.reason == "plaintext_http"


async def test_client_that_disconnects_mid_handshake_is_a_typed_failure(pki: DevPKI) -> None:
    async with running_server(ServerTLSContextHolder(settings_for(pki))) as srv:
        quitter = await trio.open_tcp_stream("127.0.0.1", srv.port)
        await quitter.send_all(b"\x16\x03\x01\x02\x00\x01")  # the start of a ClientHello record
        await quitter.aclose()
        failure = _failure(await srv.next_outcome())
    assert failure.reason in ("eof", "connection_lost")


@pytest.mark.parametrize("tickets", [True, False], ids=["tickets-on", "tickets-off"])
async def test_stdlib_client_resumes_only_with_session_tickets(pki: DevPKI, tickets: bool) -> None:
    """Python's ssl (system OpenSSL, classical groups) resumes with the saved session when
    tls.session_tickets is on, with a fresh X25519 key exchange (psk_dhe_ke); with it off every
    connection is a full handshake."""
    import socket

    ctx = stdlib_context(pki.ca_cert)

    def connect_twice() -> tuple[bool, bool]:
        session = None
        reused = []
        for _ in range(2):
            with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as raw:
                with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
                    tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
                    while tls.recv(65536):
                        pass  # read to EOF, so the NewSessionTickets are processed
                    reused.append(tls.session_reused)
                    session = tls.session
        return reused[0], reused[1]

    async with running_server(ServerTLSContextHolder(settings_for(pki, session_tickets=tickets))) as srv:
        assert await trio.to_thread.run_sync(connect_twice) == (False, tickets)
        first, second = _info(await srv.next_outcome()), _info(await srv.next_outcome())
    assert not first.resumed and second.resumed == tickets
    assert second.version == "TLSv1.3" and second.group == "X25519"
