"""The internal hop's mutual TLS: real pyOpenSSL connections made from the internal contexts,
handshaking over memory BIOs (every byte relayed and captured, then decrypted to check the
wire) and, once, over a real 127.0.0.1 TCP connection through TLSStream."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import trio
from _tls13_decrypt import (
    ECDSA_SECP256R1_SHA256,
    MLDSA65,
    X25519MLKEM768,
    decrypt_handshake,
    handshake_facts,
    run_handshake,
)
from cryptography.exceptions import InvalidTag
from OpenSSL import SSL

from qpher_proxy.errors import ConfigError
from qpher_proxy.pki import InternalPKI, issue_leaf, make_internal_pki
from qpher_proxy.tls import TLSStream, _openssl
from qpher_proxy.tls.internal import (
    EXPORTER_LABEL,
    InternalTLSContextHolder,
    InternalTLSSettings,
    build_internal_client_context,
    build_internal_server_context,
    exporter_token,
    peer_identity,
    refusal_reason,
)

GATEWAY_URI = "spiffe://qpher.internal/gateway"
KMS_URI = "spiffe://qpher.internal/kms"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> InternalPKI:
    pki = make_internal_pki(tmp_path_factory.mktemp("internal-pki") / "pki")
    issue_leaf(pki, "other", uris=("spiffe://qpher.internal/other",), client=True)
    issue_leaf(pki, "no-uri", client=True)
    issue_leaf(pki, "rogue-server", uris=("spiffe://qpher.internal/other",), client=False, server=True)
    return pki


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> InternalPKI:
    """Another internal CA with the same trust domain: its certificates carry the right URIs."""
    return make_internal_pki(tmp_path_factory.mktemp("other-pki") / "pki")


def server_settings(pki: InternalPKI, *, ecdsa: bool = False) -> InternalTLSSettings:
    ml, ec = pki.leaf("kms", "mldsa"), pki.leaf("kms", "ecdsa")
    return InternalTLSSettings(
        cert_file=ml.cert, key_file=ml.key, ca_file=pki.ca_bundle, peer_uri=GATEWAY_URI,
        ecdsa_cert_file=ec.cert if ecdsa else None, ecdsa_key_file=ec.key if ecdsa else None,
    )


def client_settings(pki: InternalPKI, *, ecdsa: bool = False, cert: str = "gateway-mldsa",
                    ca_file: Path | None = None) -> InternalTLSSettings:
    ec = pki.leaf("gateway", "ecdsa")
    return InternalTLSSettings(
        cert_file=pki.directory / f"{cert}.crt", key_file=pki.directory / f"{cert}.key",
        ca_file=ca_file or pki.ca_bundle, peer_uri=KMS_URI,
        ecdsa_cert_file=ec.cert if ecdsa else None, ecdsa_key_file=ec.key if ecdsa else None,
    )


def handshake(client_ctx: SSL.Context, server_ctx: SSL.Context) -> dict[str, Any]:
    return run_handshake(client_ctx, server_ctx)


def assert_refused(run: dict[str, Any], *, server_says: str | None = None,
                   client_says: str | None = None) -> None:
    """Both sides end with an OpenSSL error; the reasons contain what is given."""
    assert isinstance(run["server_result"], SSL.Error), run["server_result"]
    assert isinstance(run["client_result"], SSL.Error), run["client_result"]
    server_reason = refusal_reason(run["server"], run["server_result"])
    client_reason = refusal_reason(run["client"], run["client_result"])
    assert server_reason and client_reason
    if server_says is not None:
        assert server_says in server_reason, server_reason
    if client_says is not None:
        assert client_says in client_reason, client_reason


# ---- accepted ----------------------------------------------------------------------------

def test_gateway_and_kms_handshake_post_quantum_on_both_sides(pki: InternalPKI) -> None:
    facts = handshake_facts(build_internal_client_context(client_settings(pki)),
                            build_internal_server_context(server_settings(pki)))
    client, server = facts["client"], facts["server"]
    assert facts["client_result"] is True and facts["server_result"] is True
    assert client.get_group_name() == "X25519MLKEM768"
    assert client.get_protocol_version_name() == "TLSv1.3"
    gateway_seen_by_kms, kms_seen_by_gateway = peer_identity(server), peer_identity(client)
    assert gateway_seen_by_kms.uri == GATEWAY_URI
    assert kms_seen_by_gateway.uri == KMS_URI
    for who in (gateway_seen_by_kms, kms_seen_by_gateway):
        assert who.key_kind == "ML-DSA-65"
        assert who.signature_scheme == "mldsa65"
        assert who.group == "X25519MLKEM768"
        assert who.version == "TLSv1.3"
    assert refusal_reason(server) is None and refusal_reason(client) is None


def test_the_wire_carries_mldsa65_both_ways_and_the_hybrid_group(pki: InternalPKI) -> None:
    facts = handshake_facts(build_internal_client_context(client_settings(pki)),
                            build_internal_server_context(server_settings(pki)))
    assert facts["group"] == X25519MLKEM768
    assert facts["server_sigalg"] == MLDSA65
    assert facts["client_sigalg"] == MLDSA65
    assert not facts["hello_retry"]
    # EncryptedExtensions, CertificateRequest, Certificate, CertificateVerify, Finished
    assert facts["server_messages"] == [8, 13, 11, 15, 20]
    assert facts["client_messages"] == [11, 15, 20]


def test_ml_dsa_is_preferred_when_both_chains_are_configured(pki: InternalPKI) -> None:
    facts = handshake_facts(build_internal_client_context(client_settings(pki, ecdsa=True)),
                            build_internal_server_context(server_settings(pki, ecdsa=True)))
    assert (facts["server_sigalg"], facts["client_sigalg"]) == (MLDSA65, MLDSA65)
    assert peer_identity(facts["server"]).key_kind == "ML-DSA-65"


def test_ecdsa_only_client_is_accepted_when_the_transition_chain_is_configured(pki: InternalPKI) -> None:
    client_ctx = build_internal_client_context(client_settings(pki, ecdsa=True))
    assert _openssl.set_sigalgs(client_ctx, ("ecdsa_secp256r1_sha256",))
    facts = handshake_facts(client_ctx, build_internal_server_context(server_settings(pki, ecdsa=True)))
    assert facts["client_result"] is True and facts["server_result"] is True
    assert facts["server_sigalg"] == facts["client_sigalg"] == ECDSA_SECP256R1_SHA256
    assert facts["group"] == X25519MLKEM768
    gateway = peer_identity(facts["server"])
    assert (gateway.key_kind, gateway.uri, gateway.signature_scheme) == (
        "ECDSA", GATEWAY_URI, "ecdsa_secp256r1_sha256")


def test_exporter_tokens_match_across_the_connection_and_differ_between_connections(
    pki: InternalPKI,
) -> None:
    client_ctx = build_internal_client_context(client_settings(pki))
    server_ctx = build_internal_server_context(server_settings(pki))
    first, second = handshake(client_ctx, server_ctx), handshake(client_ctx, server_ctx)
    token = exporter_token(first["client"])
    assert len(token) == 32
    assert token == exporter_token(first["server"])
    assert exporter_token(second["client"]) == exporter_token(second["server"]) != token
    # RFC 8446 7.5: the label and an empty context, as any TLS stack would compute it
    assert first["client"].export_keying_material(EXPORTER_LABEL, 32, b"") == token


# ---- refused at the handshake ------------------------------------------------------------

def test_client_without_a_certificate_is_refused(pki: InternalPKI) -> None:
    client_ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    client_ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    assert _openssl.set_groups(client_ctx, ("X25519MLKEM768",))
    run = handshake(client_ctx, build_internal_server_context(server_settings(pki)))
    assert_refused(run, server_says="no certificate", client_says="wants a certificate")


def test_client_certificate_from_another_ca_is_refused(pki: InternalPKI, other_pki: InternalPKI) -> None:
    # the other CA's gateway certificate, with the right URI; the client itself trusts our CA
    settings = client_settings(other_pki, ca_file=pki.ca_bundle)
    server_ctx = build_internal_server_context(server_settings(pki))
    run = handshake(build_internal_client_context(settings), server_ctx)
    assert_refused(run, server_says="unable to get local issuer certificate", client_says="unknown ca")


@pytest.mark.parametrize(
    ("cert", "reason", "alert"),
    [
        # the KMS role (serverAuth EKU, kms URI): OpenSSL's purpose check refuses it
        ("kms-mldsa", "unsuitable certificate purpose", "unsupported certificate"),
        # clientAuth, another URI or none: our URI check refuses it
        ("other", "expected 'spiffe://qpher.internal/gateway'", "bad certificate"),
        ("no-uri", "has SAN URIs []", "bad certificate"),
    ],
)
def test_client_certificate_of_the_right_ca_without_the_gateway_role_is_refused(
    pki: InternalPKI, cert: str, reason: str, alert: str
) -> None:
    run = handshake(build_internal_client_context(client_settings(pki, cert=cert)),
                    build_internal_server_context(server_settings(pki)))
    assert_refused(run, server_says=reason, client_says=f"the peer refused the handshake ({alert})")


def test_gateway_refuses_a_server_without_the_kms_role(pki: InternalPKI) -> None:
    rogue = InternalTLSSettings(
        cert_file=pki.directory / "rogue-server.crt", key_file=pki.directory / "rogue-server.key",
        ca_file=pki.ca_bundle, peer_uri=GATEWAY_URI,
    )
    run = handshake(build_internal_client_context(client_settings(pki)), build_internal_server_context(rogue))
    assert_refused(run, client_says="expected 'spiffe://qpher.internal/kms'", server_says="bad certificate")


def test_classical_only_client_is_refused(pki: InternalPKI) -> None:
    client_ctx = build_internal_client_context(client_settings(pki))
    assert _openssl.set_groups(client_ctx, ("X25519", "secp256r1"))
    run = handshake(client_ctx, build_internal_server_context(server_settings(pki)))
    assert_refused(run, server_says="key exchange group")


def test_ecdsa_only_client_is_refused_when_the_server_has_no_ecdsa_chain(pki: InternalPKI) -> None:
    client_ctx = build_internal_client_context(client_settings(pki, ecdsa=True))
    assert _openssl.set_sigalgs(client_ctx, ("ecdsa_secp256r1_sha256",))
    run = handshake(client_ctx, build_internal_server_context(server_settings(pki)))
    assert_refused(run, server_says="signature scheme")


# ---- configuration and reload ------------------------------------------------------------

def test_a_key_that_does_not_match_its_certificate_is_a_config_error(pki: InternalPKI) -> None:
    settings = InternalTLSSettings(
        cert_file=pki.leaf("kms", "mldsa").cert, key_file=pki.leaf("gateway", "mldsa").key,
        ca_file=pki.ca_bundle, peer_uri=GATEWAY_URI,
    )
    with pytest.raises(ConfigError, match="does not match") as info:
        build_internal_server_context(settings)
    assert "PRIVATE KEY" not in info.value.message


def test_an_ecdsa_certificate_as_the_main_chain_is_a_config_error(pki: InternalPKI) -> None:
    ec = pki.leaf("kms", "ecdsa")
    settings = InternalTLSSettings(cert_file=ec.cert, key_file=ec.key, ca_file=pki.ca_bundle,
                                   peer_uri=GATEWAY_URI)
    with pytest.raises(ConfigError, match="expected an ML-DSA-65 certificate, got ECDSA"):
        build_internal_server_context(settings)


def test_settings_refuse_half_an_ecdsa_pair_and_a_missing_peer_uri(pki: InternalPKI) -> None:
    ml = pki.leaf("kms", "mldsa")
    with pytest.raises(ConfigError, match="together"):
        InternalTLSSettings(ml.cert, ml.key, pki.ca_bundle, GATEWAY_URI, ecdsa_cert_file=ml.cert)
    with pytest.raises(ConfigError, match="SAN URI"):
        InternalTLSSettings(ml.cert, ml.key, pki.ca_bundle, "")


def test_reload_swaps_the_context_and_keeps_it_when_the_new_files_are_bad(
    pki: InternalPKI, tmp_path: Path
) -> None:
    for name in ("kms-mldsa.crt", "kms-mldsa.key"):
        shutil.copy(pki.directory / name, tmp_path / name)
    settings = InternalTLSSettings(tmp_path / "kms-mldsa.crt", tmp_path / "kms-mldsa.key",
                                   pki.ca_bundle, GATEWAY_URI)
    holder = InternalTLSContextHolder(settings, server_side=True)
    first = holder.context
    assert holder.reload() is holder.context is not first and holder.generation == 2

    shutil.copy(pki.leaf("gateway", "mldsa").key, tmp_path / "kms-mldsa.key")  # the wrong key
    with pytest.raises(ConfigError, match="does not match"):
        holder.reload()
    assert holder.generation == 2
    run = handshake(build_internal_client_context(client_settings(pki)), holder.context)
    assert run["server_result"] is True and run["client_result"] is True


# ---- over a real socket, through the project's TLSStream --------------------------------

def connection_of(stream: TLSStream) -> SSL.Connection:
    accessor = getattr(stream, "ssl_connection", None)
    if accessor is not None:
        conn: SSL.Connection = accessor()
        return conn
    return stream._engine._connection()  # a TLSStream without the public accessor


async def test_internal_contexts_work_through_tls_stream_over_tcp(pki: InternalPKI) -> None:
    server_ctx = build_internal_server_context(server_settings(pki))
    client_ctx = build_internal_client_context(client_settings(pki))
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    seen: dict[str, bytes] = {}

    async def serve_one() -> None:
        transport = await listeners[0].accept()
        async with TLSStream(transport, server_ctx, server_side=True) as stream:
            await stream.do_handshake()
            conn = connection_of(stream)
            seen["server"] = exporter_token(conn)
            assert peer_identity(conn).uri == GATEWAY_URI
            await stream.send_all(await stream.receive_some(100))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_one)
            transport = await trio.open_tcp_stream("127.0.0.1", port)
            async with TLSStream(transport, client_ctx, server_side=False) as stream:
                await stream.send_all(b"ping")
                assert await stream.receive_some(100) == b"ping"
                assert stream.info is not None and stream.info.group == "X25519MLKEM768"
                seen["client"] = exporter_token(connection_of(stream))
                assert peer_identity(connection_of(stream)).uri == KMS_URI
    await listeners[0].aclose()
    assert seen["client"] == seen["server"]


def test_refusal_reason_reads_through_the_engine_error(pki: InternalPKI) -> None:
    from qpher_proxy.errors import TLSHandshakeFailed

    client_ctx = build_internal_client_context(client_settings(pki))
    assert _openssl.set_groups(client_ctx, ("X25519",))
    run = handshake(client_ctx, build_internal_server_context(server_settings(pki)))
    no_group = "no common key exchange group (X25519MLKEM768 required)"
    try:
        raise TLSHandshakeFailed("tls handshake failed: no suitable key share") from run["server_result"]
    except TLSHandshakeFailed as wrapped:
        assert refusal_reason(run["server"], wrapped) == no_group
    detached = TLSHandshakeFailed("tls handshake failed: no suitable key share")
    assert refusal_reason(run["server"], detached) == no_group


def test_a_tls12_only_client_is_refused(pki: InternalPKI) -> None:
    client_ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    client_ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
    run = handshake(client_ctx, build_internal_server_context(server_settings(pki)))
    assert_refused(run, server_says="TLS 1.3")


# ---- the transcript decryptor itself ------------------------------------------------------

def _only_suite(ctx: SSL.Context, suite: str) -> None:
    from OpenSSL._util import lib  # pyOpenSSL has no Context.set_ciphersuites

    assert lib.SSL_CTX_set_ciphersuites(ctx._context, suite.encode()) == 1


@pytest.mark.parametrize(
    ("suite", "code"),
    [("TLS_AES_128_GCM_SHA256", 0x1301), ("TLS_AES_256_GCM_SHA384", 0x1302),
     ("TLS_CHACHA20_POLY1305_SHA256", 0x1303)],
)
def test_the_decryptor_reads_every_tls13_cipher_suite(pki: InternalPKI, suite: str, code: int) -> None:
    client_ctx = build_internal_client_context(client_settings(pki))
    _only_suite(client_ctx, suite)
    facts = handshake_facts(client_ctx, build_internal_server_context(server_settings(pki)))
    assert facts["cipher_suite"] == code
    assert facts["group"] == X25519MLKEM768
    assert facts["server_sigalg"] == facts["client_sigalg"] == MLDSA65


def test_the_decryptor_ignores_a_partial_record_and_refuses_wrong_secrets(pki: InternalPKI) -> None:
    run = handshake(build_internal_client_context(client_settings(pki)),
                    build_internal_server_context(server_settings(pki)))
    c2s, s2c, keylog = run["client_to_server"], run["server_to_client"], run["keylog"]
    whole = decrypt_handshake(c2s, s2c, keylog)
    assert decrypt_handshake(c2s + b"\x17\x03\x03\x40", s2c + b"\x17", keylog) == whole
    wrong = [line.replace(line.split()[2], b"00" * (len(line.split()[2]) // 2)) for line in keylog]
    with pytest.raises(InvalidTag):
        decrypt_handshake(c2s, s2c, wrong)
