"""The internal PKI of the gateway <-> KMS hop (pure: cryptography and files, no TLS, no trio).

What ``make_internal_pki(DIR)`` writes:

    ca.pem                          trust bundle: both CA certificates (both sides' ``ca_file``)
    ca-mldsa.crt, ca-ecdsa.crt      the two CA certificates on their own
    ca/ca-mldsa.key, ca/ca-ecdsa.key
                                    the CA private keys, in a 0700 directory: needed only to issue
                                    more certificates; move them off the hosts that serve
    gateway-mldsa.crt, .key         ML-DSA-65 leaf, SAN URI spiffe://<trust domain>/gateway, clientAuth
    gateway-ecdsa.crt, .key         ECDSA P-256 leaf, same identity (for a transition period)
    kms-mldsa.crt, .key             ML-DSA-65 leaf, SAN URI spiffe://<trust domain>/kms, serverAuth,
                                    and a DNS or IP SAN for every KMS host name given
    kms-ecdsa.crt, .key             ECDSA P-256 leaf, same identity

Two CAs, one per signature algorithm: ML-DSA-65 signs the ML-DSA-65 leaves, ECDSA P-256 signs the
ECDSA leaves, so a chain is post-quantum all the way up or classical all the way up, and dropping
the transition chain later is deleting one CA from ``ca.pem``.

The role of a certificate is its SAN URI (SPIFFE style); the TLS layer of the internal hop
(``tls/internal.py``) refuses, at the handshake, a peer whose leaf lacks the URI it expects. The
extended key usage (clientAuth for gateways, serverAuth for KMS nodes) is checked by OpenSSL's
own chain verification on top of it.

Files, because half of them are private keys: every file is written under a temporary name
created with ``O_EXCL`` and its final mode (0600 for keys, so never readable by others even for
an instant, 0644 for certificates), fsync'ed, then linked to its name (a fresh PKI: ``link``
fails rather than replace a file another run wrote meanwhile) or renamed over it (``force``).
A directory that already holds any of these files is refused unless ``force`` is given.
Private keys are unencrypted PKCS#8 PEM: the processes load them unattended at start-up.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.mldsa import MLDSA65PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import ConfigError
from .tls.certs import _create_new, _replace, make_ca_certificate, sign_certificate

__all__ = [
    "DEFAULT_KMS_HOSTS",
    "DEFAULT_LEAF_DAYS",
    "DEFAULT_TRUST_DOMAIN",
    "InternalPKI",
    "KeyKind",
    "LeafFiles",
    "Role",
    "issue_leaf",
    "make_internal_pki",
    "spiffe_uri",
]

Role = Literal["gateway", "kms"]
KeyKind = Literal["mldsa", "ecdsa"]
ROLES: tuple[Role, ...] = ("gateway", "kms")
KINDS: tuple[KeyKind, ...] = ("mldsa", "ecdsa")

DEFAULT_TRUST_DOMAIN = "qpher.internal"
DEFAULT_KMS_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1")
DEFAULT_LEAF_DAYS = 397  # the CA/Browser Forum maximum for public leaves; a sane internal default too
DEFAULT_CA_DAYS = 3650
_BACKDATE = datetime.timedelta(minutes=5)  # tolerate small clock skew between hosts
_ORG = "qpher-proxy internal"
# SPIFFE trust domain: lower-case letters, digits, '.', '-', '_' (spiffe-id spec, section 2.1).
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]{1,255}")
_HOST = re.compile(r"[A-Za-z0-9*]([A-Za-z0-9.-]{0,252})")
_KIND_LABEL: dict[KeyKind, str] = {"mldsa": "ML-DSA-65", "ecdsa": "ECDSA P-256"}

_PrivateKey = ec.EllipticCurvePrivateKey | MLDSA65PrivateKey


@dataclass(frozen=True, slots=True)
class LeafFiles:
    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class InternalPKI:
    """Where the files of one internal PKI are (see the module docstring for what each holds)."""

    directory: Path
    trust_domain: str
    ca_bundle: Path
    ca_mldsa_cert: Path
    ca_ecdsa_cert: Path
    ca_mldsa_key: Path
    ca_ecdsa_key: Path

    @classmethod
    def at(cls, directory: str | os.PathLike[str], trust_domain: str = DEFAULT_TRUST_DOMAIN) -> InternalPKI:
        """The paths of a PKI in ``directory`` (whether or not the files exist yet)."""
        d = Path(directory)
        return cls(
            d, trust_domain, d / "ca.pem", d / "ca-mldsa.crt", d / "ca-ecdsa.crt",
            d / "ca" / "ca-mldsa.key", d / "ca" / "ca-ecdsa.key",
        )

    def leaf(self, role: Role, kind: KeyKind) -> LeafFiles:
        """``leaf("gateway", "mldsa")`` -> gateway-mldsa.crt, gateway-mldsa.key."""
        return LeafFiles(self.directory / f"{role}-{kind}.crt", self.directory / f"{role}-{kind}.key")

    def uri(self, role: str) -> str:
        return spiffe_uri(self.trust_domain, role)

    def ca(self, kind: KeyKind) -> LeafFiles:
        """The CA certificate and key of one algorithm."""
        if kind == "mldsa":
            return LeafFiles(self.ca_mldsa_cert, self.ca_mldsa_key)
        return LeafFiles(self.ca_ecdsa_cert, self.ca_ecdsa_key)

    @property
    def files(self) -> tuple[Path, ...]:
        """Every file ``make_internal_pki`` writes."""
        leaves = [p for role in ROLES for kind in KINDS for p in (self.leaf(role, kind).cert,
                                                                   self.leaf(role, kind).key)]
        return (self.ca_bundle, self.ca_mldsa_cert, self.ca_ecdsa_cert, self.ca_mldsa_key,
                self.ca_ecdsa_key, *leaves)


def spiffe_uri(trust_domain: str, role: str) -> str:
    """``spiffe://<trust_domain>/<role>``, the SAN URI that names a role."""
    return f"spiffe://{trust_domain}/{role}"


# ---- keys and certificates --------------------------------------------------------------

def _generate(kind: KeyKind) -> _PrivateKey:
    if kind == "mldsa":
        return MLDSA65PrivateKey.generate()
    return ec.generate_private_key(ec.SECP256R1())


def _private_pem(key: _PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign, crl_sign=cert_sign,
        encipher_only=False, decipher_only=False,
    )


def _make_ca(key: _PrivateKey, kind: KeyKind, trust_domain: str, now: datetime.datetime,
             days: int) -> x509.Certificate:
    return make_ca_certificate(key, f"{trust_domain} {_KIND_LABEL[kind]} CA", now,
                               datetime.timedelta(days=days), organization=_ORG,
                               digital_signature=False)  # it signs certificates only


def _host_names(hosts: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
            continue
        except ValueError:
            pass
        if not isinstance(host, str) or not _HOST.fullmatch(host):
            raise ConfigError(f"internal pki: expected a host name or IP address, got {host!r}")
        names.append(x509.DNSName(host))
    return names


def _make_leaf(
    key: _PrivateKey,
    ca_cert: x509.Certificate,
    ca_key: _PrivateKey,
    *,
    common_name: str,
    uris: tuple[str, ...],
    client: bool,
    server: bool,
    hosts: tuple[str, ...],
    now: datetime.datetime,
    days: int,
) -> x509.Certificate:
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    sans += _host_names(hosts)
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
    usages += [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORG),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
    )
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return sign_certificate(builder, ca_key)


# ---- files -------------------------------------------------------------------------------

def _write(path: Path, data: bytes, mode: int, force: bool) -> None:
    if force:
        _replace(path, data, mode)
    elif not _create_new(path, data, mode):
        raise ConfigError(f"internal pki: {str(path)!r} appeared while writing; another run is at work")


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o700)


def _check_days(days: int, name: str) -> None:
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise ConfigError(f"internal pki: expected {name} to be a positive number of days, got {days!r}")


def make_internal_pki(
    directory: str | os.PathLike[str],
    *,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    kms_hosts: Iterable[str] = DEFAULT_KMS_HOSTS,
    days: int = DEFAULT_LEAF_DAYS,
    ca_days: int = DEFAULT_CA_DAYS,
    force: bool = False,
    now: datetime.datetime | None = None,
) -> InternalPKI:
    """Create both CAs, the trust bundle and the four gateway/KMS leaves in ``directory``.

    ``ConfigError`` if ``directory`` already holds any of the files (unless ``force``: then every
    file is replaced, keys included), or for a bad trust domain, host name or validity."""
    if not isinstance(trust_domain, str) or not _TRUST_DOMAIN.fullmatch(trust_domain):
        raise ConfigError(
            "internal pki: expected a trust domain of lower-case letters, digits, '.', '-' and '_' "
            f"such as 'qpher.internal', got {trust_domain!r}"
        )
    hosts = tuple(kms_hosts)
    _host_names(hosts)  # refuse a bad host before writing anything
    _check_days(days, "days")
    _check_days(ca_days, "ca_days")
    pki = InternalPKI.at(Path(directory), trust_domain)
    if not force:
        existing = [p for p in pki.files if p.exists() or p.is_symlink()]
        if existing:
            raise ConfigError(
                f"internal pki: {str(pki.directory)!r} already holds an internal PKI "
                f"({existing[0].name} exists); pass --force to replace all of it"
            )
    _private_dir(pki.directory)
    _private_dir(pki.ca_mldsa_key.parent)
    now = now or datetime.datetime.now(datetime.UTC)

    cas: dict[KeyKind, tuple[x509.Certificate, _PrivateKey]] = {}
    for kind in KINDS:
        ca_key = _generate(kind)
        ca_cert = _make_ca(ca_key, kind, trust_domain, now, ca_days)
        files = pki.ca(kind)
        _write(files.key, _private_pem(ca_key), 0o600, force)
        _write(files.cert, _cert_pem(ca_cert), 0o644, force)
        cas[kind] = (ca_cert, ca_key)
    bundle = b"".join(_cert_pem(cas[kind][0]) for kind in KINDS)
    _write(pki.ca_bundle, bundle, 0o644, force)

    for role in ROLES:
        for kind in KINDS:
            ca_cert, ca_key = cas[kind]
            key = _generate(kind)
            cert = _make_leaf(
                key, ca_cert, ca_key, common_name=role, uris=(pki.uri(role),),
                client=role == "gateway", server=role == "kms",
                hosts=hosts if role == "kms" else (), now=now, days=days,
            )
            files = pki.leaf(role, kind)
            _write(files.key, _private_pem(key), 0o600, force)
            _write(files.cert, _cert_pem(cert), 0o644, force)
    return pki


def issue_leaf(
    pki: InternalPKI,
    name: str,
    *,
    kind: KeyKind = "mldsa",
    uris: Iterable[str] = (),
    client: bool = True,
    server: bool = False,
    hosts: Iterable[str] = (),
    days: int = DEFAULT_LEAF_DAYS,
    directory: str | os.PathLike[str] | None = None,
    force: bool = False,
    now: datetime.datetime | None = None,
) -> LeafFiles:
    """One more leaf from ``pki``'s CA of ``kind``: ``<name>.crt`` and ``<name>.key`` in
    ``directory`` (default: the PKI's). For another gateway host, or for tests (a certificate
    of the right CA with another role, one without any URI, ...)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
        raise ConfigError(f"internal pki: expected a plain file name stem, got {name!r}")
    _check_days(days, "days")
    files = pki.ca(kind)
    try:
        ca_cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
        ca_key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"internal pki: cannot read the {_KIND_LABEL[kind]} CA in "
                          f"{str(pki.directory)!r}") from exc
    if not isinstance(ca_key, (ec.EllipticCurvePrivateKey, MLDSA65PrivateKey)):
        raise ConfigError(f"internal pki: {str(files.key)!r} holds a {type(ca_key).__name__}")
    out = Path(directory) if directory is not None else pki.directory
    _private_dir(out)
    key = _generate(kind)
    cert = _make_leaf(
        key, ca_cert, ca_key, common_name=name, uris=tuple(uris), client=client, server=server,
        hosts=tuple(hosts), now=now or datetime.datetime.now(datetime.UTC), days=days,
    )
    leaf = LeafFiles(out / f"{name}.crt", out / f"{name}.key")
    _write(leaf.key, _private_pem(key), 0o600, force)
    _write(leaf.cert, _cert_pem(cert), 0o644, force)
    return leaf


def config_snippets(pki: InternalPKI, *, endpoint: str = "127.0.0.1:9443") -> tuple[
        dict[str, object], dict[str, object]]:
    """The gateway's ``kms:`` section and a KMS node's ``kms_node:`` section for ``pki``."""
    gw_ml, gw_ec = pki.leaf("gateway", "mldsa"), pki.leaf("gateway", "ecdsa")
    kms_ml, kms_ec = pki.leaf("kms", "mldsa"), pki.leaf("kms", "ecdsa")
    gateway: dict[str, object] = {"kms": {
        "mode": "remote",
        "endpoints": [endpoint],
        "client_cert_file": str(gw_ml.cert),
        "client_key_file": str(gw_ml.key),
        "client_ecdsa_cert_file": str(gw_ec.cert),
        "client_ecdsa_key_file": str(gw_ec.key),
        "ca_file": str(pki.ca_bundle),
        "server_uri": pki.uri("kms"),
    }}
    node: dict[str, object] = {"kms_node": {
        "listen": [endpoint],
        "cert_file": str(kms_ml.cert),
        "key_file": str(kms_ml.key),
        "ecdsa_cert_file": str(kms_ec.cert),
        "ecdsa_key_file": str(kms_ec.key),
        "client_ca": str(pki.ca_bundle),
        "client_uri": pki.uri("gateway"),
    }}
    return gateway, node
