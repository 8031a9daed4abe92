"""The internal PKI of the gateway <-> KMS hop: files, modes, chains, roles, and the CLI."""

from __future__ import annotations

import ipaddress
import os
import stat
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, mldsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from qpher_proxy.cli import main
from qpher_proxy.errors import ConfigError
from qpher_proxy.pki import InternalPKI, issue_leaf, make_internal_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> InternalPKI:
    old = os.umask(0)  # the modes must not depend on the umask
    try:
        return make_internal_pki(tmp_path_factory.mktemp("internal-pki") / "pki")
    finally:
        os.umask(old)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_every_file_exists_with_its_mode(pki: InternalPKI) -> None:
    names = sorted(p.name for p in pki.directory.iterdir() if p.is_file())
    assert names == sorted([
        "ca.pem", "ca-mldsa.crt", "ca-ecdsa.crt",
        "gateway-mldsa.crt", "gateway-mldsa.key", "gateway-ecdsa.crt", "gateway-ecdsa.key",
        "kms-mldsa.crt", "kms-mldsa.key", "kms-ecdsa.crt", "kms-ecdsa.key",
    ])
    for path in pki.files:
        assert mode(path) == (0o600 if path.suffix == ".key" else 0o644), path
    assert mode(pki.directory) == 0o700
    assert mode(pki.ca_mldsa_key.parent) == 0o700
    for path in pki.files:
        if path.suffix == ".key":
            assert path.read_bytes().startswith(b"-----BEGIN " + b"PRIVATE KEY-----\n")  # PKCS#8, unencrypted


def test_the_bundle_holds_both_self_signed_cas(pki: InternalPKI) -> None:
    bundle = x509.load_pem_x509_certificates(pki.ca_bundle.read_bytes())
    mldsa_ca, ecdsa_ca = bundle
    assert isinstance(mldsa_ca.public_key(), mldsa.MLDSA65PublicKey)
    assert isinstance(ecdsa_ca.public_key(), ec.EllipticCurvePublicKey)
    for ca in bundle:
        assert ca.subject == ca.issuer
        ca.verify_directly_issued_by(ca)
        assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
        assert usage.key_cert_sign and not usage.digital_signature
    assert load(pki.ca_mldsa_cert) == mldsa_ca and load(pki.ca_ecdsa_cert) == ecdsa_ca


def test_mldsa_leaves_verify_with_the_mldsa_ca_public_key(pki: InternalPKI) -> None:
    ca_key = load(pki.ca_mldsa_cert).public_key()
    assert isinstance(ca_key, mldsa.MLDSA65PublicKey)
    for role in ("gateway", "kms"):
        leaf = load(pki.leaf(role, "mldsa").cert)
        assert isinstance(leaf.public_key(), mldsa.MLDSA65PublicKey)
        ca_key.verify(leaf.signature, leaf.tbs_certificate_bytes)
        assert leaf.issuer == load(pki.ca_mldsa_cert).subject


def test_ecdsa_leaves_are_p256_and_issued_by_the_ecdsa_ca(pki: InternalPKI) -> None:
    ca = load(pki.ca_ecdsa_cert)
    for role in ("gateway", "kms"):
        leaf = load(pki.leaf(role, "ecdsa").cert)
        key = leaf.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)
        leaf.verify_directly_issued_by(ca)


@pytest.mark.parametrize("kind", ["mldsa", "ecdsa"])
def test_roles_are_in_the_uri_and_the_extended_key_usage(pki: InternalPKI, kind: str) -> None:
    gateway = load(pki.leaf("gateway", kind).cert)  # type: ignore[arg-type]
    kms = load(pki.leaf("kms", kind).cert)  # type: ignore[arg-type]
    gw_san = gateway.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    kms_san = kms.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert gw_san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://qpher.internal/gateway"]
    assert gw_san.get_values_for_type(x509.DNSName) == []
    assert kms_san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://qpher.internal/kms"]
    assert kms_san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert kms_san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    eku = x509.ExtendedKeyUsage
    assert list(gateway.extensions.get_extension_for_class(eku).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert list(kms.extensions.get_extension_for_class(eku).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    for leaf in (gateway, kms):
        assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_a_second_run_refuses_and_force_replaces_everything(tmp_path: Path) -> None:
    first = make_internal_pki(tmp_path / "p", kms_hosts=())
    key_before = first.leaf("gateway", "mldsa").key.read_bytes()
    with pytest.raises(ConfigError, match="already holds an internal PKI"):
        make_internal_pki(tmp_path / "p")
    assert first.leaf("gateway", "mldsa").key.read_bytes() == key_before
    again = make_internal_pki(tmp_path / "p", force=True, trust_domain="prod.example")
    assert again.leaf("gateway", "mldsa").key.read_bytes() != key_before
    assert mode(again.leaf("gateway", "mldsa").key) == 0o600
    leaf = load(again.leaf("kms", "mldsa").cert)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://prod.example/kms"]
    assert not list(tmp_path.joinpath("p").glob(".*.tmp"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"trust_domain": "Qpher Internal"}, "trust domain"),
        ({"kms_hosts": ("bad host",)}, "host name or IP address"),
        ({"days": 0}, "positive number of days"),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_written(
    tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        make_internal_pki(tmp_path / "p", **kwargs)  # type: ignore[arg-type]
    assert not (tmp_path / "p").exists() or not any((tmp_path / "p").rglob("*.key"))


def test_issue_leaf_makes_an_extra_certificate_of_the_chosen_ca(pki: InternalPKI, tmp_path: Path) -> None:
    leaf = issue_leaf(pki, "gateway-2", kind="ecdsa", uris=(pki.uri("gateway"),), directory=tmp_path)
    cert = load(leaf.cert)
    cert.verify_directly_issued_by(load(pki.ca_ecdsa_cert))
    assert mode(leaf.key) == 0o600 and mode(leaf.cert) == 0o644
    with pytest.raises(ConfigError, match="appeared while writing"):
        issue_leaf(pki, "gateway-2", directory=tmp_path)


def test_cli_init_internal_pki_prints_the_two_config_sections(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "ipki"
    rc = main(["init", "--internal-pki", str(directory), "--trust-domain", "corp.example",
               "--kms-host", "kms1.corp.example", "--kms-host", "10.0.0.7", "--kms-listen", "10.0.0.7:9443"])
    assert rc == 0
    gateway, node = yaml.safe_load_all(capsys.readouterr().out)
    d = directory.resolve()
    assert gateway == {"kms": {
        "mode": "remote",
        "endpoints": ["10.0.0.7:9443"],
        "client_cert_file": str(d / "gateway-mldsa.crt"),
        "client_key_file": str(d / "gateway-mldsa.key"),
        "client_ecdsa_cert_file": str(d / "gateway-ecdsa.crt"),
        "client_ecdsa_key_file": str(d / "gateway-ecdsa.key"),
        "ca_file": str(d / "ca.pem"),
        "server_uri": "spiffe://corp.example/kms",
    }}
    assert node == {"kms_node": {
        "listen": ["10.0.0.7:9443"],
        "cert_file": str(d / "kms-mldsa.crt"),
        "key_file": str(d / "kms-mldsa.key"),
        "ecdsa_cert_file": str(d / "kms-ecdsa.crt"),
        "ecdsa_key_file": str(d / "kms-ecdsa.key"),
        "client_ca": str(d / "ca.pem"),
        "client_uri": "spiffe://corp.example/gateway",
    }}
    kms = load(d / "kms-mldsa.crt").extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert kms.get_values_for_type(x509.DNSName) == ["kms1.corp.example"]

    assert main(["init", "--internal-pki", str(directory)]) == 2
    assert "already holds an internal PKI" in capsys.readouterr().err
    assert main(["init", "--internal-pki", str(directory), "--force"]) == 0
