"""make_dev_pki: what it creates, file modes, and that re-running never replaces a key."""

from __future__ import annotations

import datetime
import ipaddress
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.mldsa import MLDSA65PublicKey

from qpher_proxy.errors import ConfigError
from qpher_proxy.tls import certs
from qpher_proxy.tls.certs import make_dev_pki


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cert(path: Path | None) -> x509.Certificate:
    assert path is not None
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_creates_ca_and_server_certificates_with_private_modes(tmp_path: Path) -> None:
    pki = make_dev_pki(tmp_path / "certs")
    assert _mode(pki.directory) == 0o700
    keys = [pki.ca_key, pki.server_key, pki.mldsa_ca_key, pki.mldsa_server_key]
    assert all(k is not None and _mode(k) == 0o600 for k in keys)
    assert len(pki.created) == 8
    assert sorted(p.name for p in pki.directory.iterdir()) == sorted(
        p.name for p in pki.created
    )  # no temp files

    ca, server = _cert(pki.ca_cert), _cert(pki.server_cert)
    assert isinstance(server.public_key(), ec.EllipticCurvePublicKey)
    assert server.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]

    pq_ca, pq_server = _cert(pki.mldsa_ca_cert), _cert(pki.mldsa_server_cert)
    assert isinstance(pq_server.public_key(), MLDSA65PublicKey)
    pq_server.verify_directly_issued_by(pq_ca)


def test_rerun_keeps_every_key_and_reissues_only_a_missing_certificate(tmp_path: Path) -> None:
    first = make_dev_pki(tmp_path / "certs")
    before = {p: p.read_bytes() for p in first.directory.iterdir()}
    second = make_dev_pki(tmp_path / "certs")
    assert second.created == ()
    assert {p: p.read_bytes() for p in second.directory.iterdir()} == before

    first.server_cert.unlink()
    third = make_dev_pki(tmp_path / "certs")
    assert third.created == (first.server_cert,)
    assert third.server_key.read_bytes() == before[first.server_key]
    _cert(third.server_cert).verify_directly_issued_by(_cert(third.ca_cert))


def test_new_ca_key_means_new_ca_and_server_certificates_but_same_server_key(tmp_path: Path) -> None:
    pki = make_dev_pki(tmp_path / "certs", mldsa=False)
    server_key = pki.server_key.read_bytes()
    pki.ca_key.unlink()
    again = make_dev_pki(tmp_path / "certs", mldsa=False)
    assert set(again.created) == {pki.ca_key, pki.ca_cert, pki.server_cert}
    assert again.server_key.read_bytes() == server_key
    _cert(again.server_cert).verify_directly_issued_by(_cert(again.ca_cert))


def test_expiring_server_certificate_is_renewed(tmp_path: Path) -> None:
    long_ago = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    pki = make_dev_pki(tmp_path / "certs", mldsa=False, now=long_ago)
    again = make_dev_pki(tmp_path / "certs", mldsa=False)
    assert again.created == (pki.server_cert,)  # the 2020 CA is valid until 2030: kept
    assert _cert(again.server_cert).not_valid_after_utc > datetime.datetime.now(datetime.UTC)


def test_create_new_never_overwrites(tmp_path: Path) -> None:
    target = tmp_path / "k.key"
    assert certs._create_new(target, b"first", 0o600)
    assert not certs._create_new(target, b"second", 0o600)
    assert target.read_bytes() == b"first" and _mode(target) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["k.key"]


def test_key_mode_ignores_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        pki = make_dev_pki(tmp_path / "certs", mldsa=False)
    finally:
        os.umask(old)
    assert _mode(pki.ca_key) == 0o600 and _mode(pki.server_key) == 0o600 and _mode(pki.directory) == 0o700


def test_existing_open_directory_is_tightened(tmp_path: Path) -> None:
    directory = tmp_path / "certs"
    directory.mkdir(mode=0o755)
    os.chmod(directory, 0o755)
    make_dev_pki(directory, mldsa=False)
    assert _mode(directory) == 0o700


def test_unusable_existing_key_stops_without_replacing_it(tmp_path: Path) -> None:
    directory = tmp_path / "certs"
    directory.mkdir(mode=0o700)
    (directory / "ca.key").write_bytes(b"not a key")
    with pytest.raises(ConfigError, match="cannot use the existing private key"):
        make_dev_pki(directory)
    assert (directory / "ca.key").read_bytes() == b"not a key"


def test_without_mldsa_only_the_ecdsa_pair_is_made(tmp_path: Path) -> None:
    pki = make_dev_pki(tmp_path / "certs", mldsa=False)
    assert pki.mldsa_ca_cert is None and pki.mldsa_server_key is None
    assert sorted(p.name for p in pki.directory.iterdir()) == ["ca.crt", "ca.key", "server.crt", "server.key"]
