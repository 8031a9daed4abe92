"""Development PKI for ``qpher-proxy init``: a local CA and a server certificate (pure, cryptography).

What it makes, in one directory (0700):

    ca.crt, ca.key                  ECDSA P-256 CA (10 years), the trust anchor for clients
    server.crt, server.key          ECDSA P-256 server cert signed by it: SAN localhost, 127.0.0.1
    mldsa-ca.crt, mldsa-ca.key      ML-DSA-65 CA (optional, ``mldsa=True``)
    mldsa-server.crt, .key          ML-DSA-65 server cert signed by it, same names

Rules, because these are private keys:

- A key file is created with ``O_CREAT | O_EXCL`` and mode 0600 under a temporary name,
  written, fsync'ed, then linked to its final name (``link`` fails if the name exists, so an
  existing key is never replaced, even by a concurrent run) and the directory fsync'ed. A crash
  leaves either no key or a whole key, never half a key under the real name.
- Re-running keeps every existing key. Certificates are public and derived: one is (re)issued
  only if it is missing, does not match its key, was not issued by the CA key found, or expires
  within a day; replacing one is an atomic rename.
- Keys are unencrypted PKCS#8 PEM: this is a development PKI. Production certificates come from
  your own CA and are only *named* in the config.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.mldsa import MLDSA65PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..errors import ConfigError

__all__ = ["DevPKI", "make_ca_certificate", "make_dev_pki", "sign_certificate"]

_PrivateKey = ec.EllipticCurvePrivateKey | MLDSA65PrivateKey

CA_VALIDITY = datetime.timedelta(days=3650)
SERVER_VALIDITY = datetime.timedelta(days=397)  # the CA/Browser Forum maximum, a sane dev default
_RENEW_BEFORE = datetime.timedelta(days=1)
_BACKDATE = datetime.timedelta(minutes=5)  # tolerate small clock skew between hosts
_ORG = "qpher-proxy (development)"


@dataclass(frozen=True, slots=True)
class DevPKI:
    """Paths of the development PKI files; ``created`` lists the files written by this run."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    mldsa_ca_cert: Path | None
    mldsa_ca_key: Path | None
    mldsa_server_cert: Path | None
    mldsa_server_key: Path | None
    created: tuple[Path, ...]


# ---- files ---------------------------------------------------------------------------------

def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temp(directory: Path, name: str, data: bytes, mode: int) -> Path:
    tmp = directory / f".{name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # whatever the umask
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    return tmp


def _create_new(path: Path, data: bytes, mode: int) -> bool:
    """Create ``path`` with ``data`` atomically; False (and nothing written) if it exists."""
    tmp = _write_temp(path.parent, path.name, data, mode)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
    _fsync_dir(path.parent)
    return True


def _replace(path: Path, data: bytes, mode: int) -> None:
    tmp = _write_temp(path.parent, path.name, data, mode)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _private_pem(key: _PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _generate(key_type: type) -> _PrivateKey:
    if key_type is MLDSA65PrivateKey:
        return MLDSA65PrivateKey.generate()
    return ec.generate_private_key(ec.SECP256R1())


def _load_or_create_key(path: Path, key_type: type, created: list[Path]) -> _PrivateKey:
    if not path.exists():
        key = _generate(key_type)
        if _create_new(path, _private_pem(key), 0o600):
            created.append(path)
            return key
        # Lost a race with another run: use the key it wrote.
    try:
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(
            f"certs: cannot use the existing private key {str(path)!r} (unreadable or encrypted)"
        ) from exc
    if not isinstance(loaded, key_type):
        raise ConfigError(
            f"certs: {str(path)!r} holds a {type(loaded).__name__}, expected {key_type.__name__}"
        )
    return loaded  # type: ignore[return-value]


def _load_cert(path: Path) -> x509.Certificate | None:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None


# ---- certificates ------------------------------------------------------------------------

def sign_certificate(builder: x509.CertificateBuilder, key: _PrivateKey) -> x509.Certificate:
    if isinstance(key, MLDSA65PrivateKey):
        return builder.sign(key, None)  # ML-DSA signs the message itself: no separate hash
    return builder.sign(key, hashes.SHA256())


def _same_key(cert: x509.Certificate, key: _PrivateKey) -> bool:
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    return cert.public_key().public_bytes(serialization.Encoding.DER, pub) == key.public_key().public_bytes(
        serialization.Encoding.DER, pub
    )


def _make_ca(key: _PrivateKey, label: str, now: datetime.datetime) -> x509.Certificate:
    return make_ca_certificate(key, f"qpher-proxy dev {label} CA", now, CA_VALIDITY, organization=_ORG)


def make_ca_certificate(
    key: _PrivateKey, common_name: str, now: datetime.datetime, validity: datetime.timedelta, *,
    organization: str, digital_signature: bool = True,
) -> x509.Certificate:
    """A self-signed CA that may issue leaves only (path length 0), back-dated a few minutes for
    clock skew; ML-DSA-65 or ECDSA (the dev PKI here and the internal PKI of ``pki.py``)."""
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=digital_signature, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return sign_certificate(builder, key)


def _make_server(
    key: _PrivateKey,
    ca_cert: x509.Certificate,
    ca_key: _PrivateKey,
    hostnames: tuple[str, ...],
    ip_addresses: tuple[str, ...],
    now: datetime.datetime,
) -> x509.Certificate:
    sans: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    common_name = hostnames[0] if hostnames else ip_addresses[0]
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
        .not_valid_after(min(now + SERVER_VALIDITY, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    return sign_certificate(builder, ca_key)


def _issued_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _pair(
    directory: Path,
    prefix: str,
    label: str,
    key_type: type,
    hostnames: tuple[str, ...],
    ip_addresses: tuple[str, ...],
    now: datetime.datetime,
    created: list[Path],
    key_dir: Path,
    renew: bool = False,
) -> tuple[Path, Path, Path, Path]:
    ca_cert_path, ca_key_path = directory / f"{prefix}ca.crt", key_dir / f"{prefix}ca.key"
    srv_cert_path, srv_key_path = directory / f"{prefix}server.crt", directory / f"{prefix}server.key"
    renew_at = now + _RENEW_BEFORE

    ca_key = _load_or_create_key(ca_key_path, key_type, created)
    ca_cert = _load_cert(ca_cert_path)
    if ca_cert is None or not _same_key(ca_cert, ca_key) or ca_cert.not_valid_after_utc < renew_at:
        ca_cert = _make_ca(ca_key, label, now)
        _replace(ca_cert_path, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
        created.append(ca_cert_path)

    srv_key = _load_or_create_key(srv_key_path, key_type, created)
    srv_cert = _load_cert(srv_cert_path)
    if (
        srv_cert is None
        or renew
        or not _same_key(srv_cert, srv_key)
        or not _issued_by(srv_cert, ca_cert)
        or srv_cert.not_valid_after_utc < renew_at
    ):
        srv_cert = _make_server(srv_key, ca_cert, ca_key, hostnames, ip_addresses, now)
        _replace(srv_cert_path, srv_cert.public_bytes(serialization.Encoding.PEM), 0o644)
        created.append(srv_cert_path)
    return ca_cert_path, ca_key_path, srv_cert_path, srv_key_path


def make_dev_pki(
    directory: str | os.PathLike[str],
    *,
    mldsa: bool = True,
    hostnames: tuple[str, ...] = ("localhost",),
    ip_addresses: tuple[str, ...] = ("127.0.0.1",),
    now: datetime.datetime | None = None,
    ca_key_dir: str | os.PathLike[str] | None = None,
    renew: bool = False,
) -> DevPKI:
    """Create (or complete) the development PKI in ``directory``. Safe to re-run.

    ``ca_key_dir``: where the CA private keys live instead (a directory the server process
    cannot read; a CA key found in ``directory`` from an earlier run is moved there).
    ``renew``: issue new server certificates even when the current ones are still valid."""
    if not hostnames and not ip_addresses:
        raise ConfigError("certs: expected at least one hostname or IP address for the server certificate")
    directory = Path(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if directory.stat().st_mode & 0o077:
        os.chmod(directory, 0o700)  # it holds private keys: owner only
    now = now or datetime.datetime.now(datetime.UTC)
    key_dir = directory
    if ca_key_dir is not None:
        key_dir = Path(ca_key_dir)
        key_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(key_dir, 0o700)
        for name in ("ca.key", "mldsa-ca.key"):
            old, new = directory / name, key_dir / name
            if old.exists() and not new.exists():
                os.replace(old, new)
    created: list[Path] = []
    ca_cert, ca_key, srv_cert, srv_key = _pair(
        directory,
        "",
        "ECDSA",
        ec.EllipticCurvePrivateKey,
        hostnames,
        ip_addresses,
        now,
        created,
        key_dir,
        renew,
    )
    mldsa_paths: tuple[Path | None, Path | None, Path | None, Path | None] = (None, None, None, None)
    if mldsa:
        mldsa_paths = _pair(
            directory, "mldsa-", "ML-DSA-65", MLDSA65PrivateKey,
            hostnames, ip_addresses, now, created, key_dir, renew,
        )
    return DevPKI(directory, ca_cert, ca_key, srv_cert, srv_key, *mldsa_paths, created=tuple(created))
