"""TLSSettings validation and build_server_context: one-line ConfigErrors, what the context allows."""

from __future__ import annotations

from pathlib import Path

import pytest
from _tls_helpers import settings_for
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL

from qpher_proxy.errors import ConfigError
from qpher_proxy.tls import ServerTLSContextHolder, TLSSettings, build_server_context
from qpher_proxy.tls.certs import DevPKI

_SSL_OP_ALLOW_NO_DHE_KEX = 1 << 10  # ssl.h SSL_OP_BIT(10); the binding does not export it


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"min_version": "1.1"}, 'tls.min_version: expected "1.2" or "1.3", got \'1.1\''),
        ({"groups": ()}, "tls.groups: expected at least one group"),
        ({"groups": ("X25519:secp256r1",)}, "tls.groups: expected plain group names"),
        ({"groups": ("X25519", "x25519")}, "tls.groups: group 'x25519' is listed twice"),
        ({"groups": ("DEFAULT",)}, "tls.groups: expected group names, got the keyword 'DEFAULT'"),
        (
            {"require_pq": True, "groups": ("X25519",)},
            "tls.require_pq: expected tls.groups to contain a hybrid",
        ),
        ({"client_auth": "sometimes"}, "tls.client_auth: expected"),
        ({"client_auth": "required"}, 'tls.client_ca: expected a CA file when client_auth is "required"'),
        (
            {"mldsa_cert_file": "x.crt"},
            "tls.mldsa_cert_file: expected mldsa_cert_file and mldsa_key_file together",
        ),
        ({"handshake_timeout": 0}, "tls.handshake_timeout: expected a positive number of seconds, got 0"),
        ({"handshake_timeout": float("nan")}, "tls.handshake_timeout: expected a positive number"),
        ({"alpn": ()}, "tls.alpn: expected protocol names"),
        ({"ticket_key_rotation": 59}, "tls.ticket_key_rotation: expected seconds from 60 to 86400, got 59"),
        ({"ticket_key_rotation": 86401}, "tls.ticket_key_rotation: expected seconds from 60 to 86400"),
        ({"ticket_key_rotation": True}, "tls.ticket_key_rotation: expected seconds"),
        ({"session_tickets": "yes"}, "tls.session_tickets: expected true or false, got 'yes'"),
    ],
)
def test_settings_refuse_bad_values_with_one_line(
    pki: DevPKI, overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        settings_for(pki, **overrides)
    assert caught.value.message.startswith(message)
    assert "\n" not in caught.value.message


def test_unknown_group_is_refused_at_load(pki: DevPKI) -> None:
    with pytest.raises(ConfigError, match=r"tls.groups: unknown group 'X25519Kyber768Draft00'"):
        build_server_context(settings_for(pki, groups=("X25519MLKEM768", "X25519Kyber768Draft00")))


def test_other_hybrid_groups_are_accepted(pki: DevPKI) -> None:
    build_server_context(settings_for(pki, groups=("SecP256r1MLKEM768", "SecP384r1MLKEM1024", "X25519")))


def test_tls12_is_limited_to_ecdhe_with_aead_and_no_renegotiation_or_compression(
    pki: DevPKI,
) -> None:
    ctx = build_server_context(settings_for(pki))
    options = ctx.set_options(0)  # returns the options in force (before the context is used)
    for flag in (
        SSL.OP_NO_RENEGOTIATION,
        SSL.OP_NO_COMPRESSION,
        SSL.OP_CIPHER_SERVER_PREFERENCE,
    ):
        assert options & flag == flag
    assert options & SSL.OP_NO_TICKET == 0  # stateless TLS 1.3 tickets (session_tickets: true)
    assert options & _SSL_OP_ALLOW_NO_DHE_KEX == 0  # resumption is psk_dhe_ke only
    ciphers = SSL.Connection(ctx, None).get_cipher_list()
    tls12 = [c for c in ciphers if not c.startswith("TLS_")]
    assert tls12, ciphers
    assert all(c.startswith("ECDHE-") and ("-GCM-" in c or "CHACHA20-POLY1305" in c) for c in tls12), tls12
    assert ctx.get_session_cache_mode() == SSL.SESS_CACHE_OFF


def test_missing_certificate_file_names_the_option_and_path(pki: DevPKI, tmp_path: Path) -> None:
    missing = tmp_path / "nope.crt"
    with pytest.raises(ConfigError) as caught:
        build_server_context(settings_for(pki, cert_file=missing))
    assert caught.value.message == f"tls.cert_file: cannot read {str(missing)!r}: No such file or directory"


def test_key_that_does_not_match_the_certificate(pki: DevPKI, tmp_path: Path) -> None:
    other = tmp_path / "other.key"
    other.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with pytest.raises(ConfigError, match="tls.key_file: the key in .* does not match tls.cert_file"):
        build_server_context(settings_for(pki, key_file=other))


def test_encrypted_key_is_refused_without_prompting(pki: DevPKI, tmp_path: Path) -> None:
    key = serialization.load_pem_private_key(pki.server_key.read_bytes(), None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(key.private_bytes(  # type: ignore[union-attr]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"correct horse")))
    with pytest.raises(ConfigError, match="tls.key_file: the private key in .* is encrypted"):
        build_server_context(settings_for(pki, key_file=encrypted))


def test_garbage_key_file_message_holds_no_file_content(pki: DevPKI, tmp_path: Path) -> None:
    bad = tmp_path / "bad.key"
    pem = b"PRIVATE KEY-----"  # a garbage body under a real-looking header (split so secret scanners pass)
    bad.write_bytes(b"-----BEGIN " + pem + b"\nc2VjcmV0LXN0dWZm\n-----END " + pem + b"\n")
    with pytest.raises(ConfigError) as caught:
        build_server_context(settings_for(pki, key_file=bad))
    assert caught.value.message.startswith("tls.key_file: expected a PEM private key")
    assert "c2VjcmV0" not in caught.value.message


def test_certificate_slots_hold_the_right_key_types(pki: DevPKI) -> None:
    assert pki.mldsa_server_cert is not None and pki.mldsa_server_key is not None
    with pytest.raises(
        ConfigError, match="tls.cert_file: expected an ECDSA or RSA certificate, got ML-DSA-65"
    ):
        build_server_context(
            settings_for(pki, cert_file=pki.mldsa_server_cert, key_file=pki.mldsa_server_key)
        )
    with pytest.raises(
        ConfigError, match="tls.mldsa_cert_file: expected an ML-DSA-65 certificate, got ECDSA"
    ):
        build_server_context(
            settings_for(pki, mldsa_cert_file=pki.server_cert, mldsa_key_file=pki.server_key)
        )


def test_client_ca_must_be_a_certificate(pki: DevPKI) -> None:
    with pytest.raises(ConfigError, match="tls.client_ca: expected a PEM certificate"):
        build_server_context(settings_for(pki, client_auth="optional", client_ca=pki.server_key))


def test_reload_failure_keeps_the_previous_context(pki: DevPKI, tmp_path: Path) -> None:
    holder = ServerTLSContextHolder(settings_for(pki))
    first = holder.current
    broken = TLSSettings(cert_file=tmp_path / "gone.crt", key_file=pki.server_key)
    with pytest.raises(ConfigError, match="tls.cert_file"):
        holder.reload(broken)
    assert holder.current is first
    second = holder.reload()
    assert second.generation == 2 and second.context is not first.context and holder.context is second.context


def test_context_releases_idle_buffers_and_sets_the_ticket_lifetime(pki: DevPKI) -> None:
    ctx = build_server_context(settings_for(pki, ticket_key_rotation=600))
    assert ctx.set_mode(0) & SSL.MODE_RELEASE_BUFFERS  # set_mode returns the mode in force
    assert ctx.get_timeout() == 1200  # a ticket lives two rotation periods


def test_session_tickets_off_sets_no_ticket(pki: DevPKI) -> None:
    ctx = build_server_context(settings_for(pki, session_tickets=False))
    assert ctx.set_options(0) & SSL.OP_NO_TICKET


def test_config_tls_section_reaches_the_ticket_settings(tmp_path: Path) -> None:
    from qpher_proxy.config import config_from_dict
    from qpher_proxy.server.settings import tls_settings

    default = tls_settings(config_from_dict({}, tmp_path, check_files=False).tls)
    assert (default.session_tickets, default.ticket_key_rotation) == (True, 3600.0)
    cfg = config_from_dict(
        {"tls": {"session_tickets": False, "ticket_key_rotation": 120}}, tmp_path, check_files=False
    )
    tls = tls_settings(cfg.tls)
    assert (tls.session_tickets, tls.ticket_key_rotation, tls.ticket_lifetime) == (False, 120, 240)
    with pytest.raises(ConfigError, match="tls.ticket_key_rotation"):
        config_from_dict({"tls": {"ticket_key_rotation": 30}}, tmp_path, check_files=False)
