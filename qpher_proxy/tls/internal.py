"""Mutual TLS of the internal hop, gateway <-> KMS node (pure: contexts and facts, no I/O).

Theory of operation
-------------------
Both ends of the internal hop are ours, so nothing here negotiates down: the two contexts
(``build_internal_server_context`` for a KMS node, ``build_internal_client_context`` for a
gateway) allow exactly one way to talk, and a peer that cannot follow it fails *inside* the
handshake, with an alert, before a single frame of the KMS protocol is read.

- Version: TLS 1.3 only (min = max). It is the only version with hybrid groups and with a
  signature scheme per key type, and it encrypts the certificates.
- Key exchange: X25519MLKEM768 only (``_openssl.set_groups``). A classical-only peer finds no
  common group and gets a ``handshake_failure`` alert; nothing falls back to X25519.
- Signatures: ``SSL_CTX_set1_sigalgs_list`` restricts both what we sign with and what we accept
  from the peer to ``mldsa65``, or to ``mldsa65`` then ``ecdsa_secp256r1_sha256`` when an
  ECDSA P-256 chain is configured beside the ML-DSA-65 one (a transition period). OpenSSL keeps
  one certificate slot per key type and picks the slot by the schemes both sides accept; the
  server prefers its own order (``OP_CIPHER_SERVER_PREFERENCE`` orders the shared signature
  schemes too), so any peer that offers ``mldsa65`` at all is authenticated post-quantum. In TLS
  1.3 a scheme is bound to its key type, so the peer's leaf key type tells which scheme signed
  its CertificateVerify (``PeerIdentity.signature_scheme``): ML-DSA-65 only ever signs with
  ``mldsa65``. (The bundled OpenSSL binding has no ``SSL_get_peer_signature_type_nid``; the
  tests decrypt a real handshake transcript and check the wire, tests/tls/_tls13_decrypt.py.)
- Peer authentication, both ways: ``VERIFY_PEER`` against ``ca_file`` (the internal CAs only,
  never the system store), plus ``VERIFY_FAIL_IF_NO_PEER_CERT`` on the server. OpenSSL's chain
  verification checks signatures, validity, CA flags and the extended key usage (a server
  verifying a client wants clientAuth, a client verifying a server wants serverAuth). Our
  verify callback then looks at the leaf (depth 0) only once OpenSSL accepted the chain, and
  refuses it unless one of its SAN URIs is exactly ``peer_uri`` (``spiffe://<domain>/gateway``
  on a node, ``.../kms`` on a gateway): a certificate of the right CA issued for another role
  fails the handshake, it is not "accepted and then ignored". Host names are not checked: the
  URI is the identity, and the client sends no SNI.
- Why a handshake was refused: the callback keeps its reason per connection
  (``refusal_reason``, a ``WeakKeyDictionary`` so nothing outlives the connection); other
  refusals (no certificate, no common group or signature scheme) are named from OpenSSL's
  error, for the log line.
- No resumption (``OP_NO_TICKET``, no session cache: internal connections are long-lived and a
  resumed session would skip the certificate check after a CA change), no 0-RTT, no
  renegotiation, no compression.
- The service token of a connection is the TLS exporter (RFC 8446 section 7.5) with our label and
  an empty context: both ends derive the same 32 bytes, nobody else can, and another connection
  gets other bytes, so a frame that carries it cannot be replayed on another connection.
- Reload: a context is frozen once a connection used it, so ``InternalTLSContextHolder.reload``
  builds a new one from the files and swaps the reference; running connections keep theirs. A
  bad new set raises ``ConfigError`` and the old context stays in force.

Certificates and keys are loaded from PEM files (``use_certificate_chain_file`` /
``use_privatekey_file``): pyOpenSSL cannot hand an ML-DSA key object to OpenSSL, OpenSSL reads
the file itself. Keys are parsed with ``cryptography`` first for a clear error (context.py).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, mldsa
from OpenSSL import SSL, crypto

from ..errors import ConfigError, TLSError
from . import _openssl
from .context import _load_chain, _read_certificate, canonical_group_name
from .engine import _openssl_reasons

__all__ = [
    "EXPORTER_LABEL",
    "EXPORTER_LENGTH",
    "INTERNAL_GROUPS",
    "InternalTLSContextHolder",
    "InternalTLSSettings",
    "PeerIdentity",
    "SIGALG_ECDSA_P256",
    "SIGALG_MLDSA65",
    "build_internal_client_context",
    "build_internal_server_context",
    "exporter_token",
    "peer_identity",
    "refusal_reason",
]

log = logging.getLogger("qpher.tls.internal")

INTERNAL_GROUPS: tuple[str, ...] = ("X25519MLKEM768",)
SIGALG_MLDSA65 = "mldsa65"  # TLS SignatureScheme 0x0905
SIGALG_ECDSA_P256 = "ecdsa_secp256r1_sha256"  # TLS SignatureScheme 0x0403
EXPORTER_LABEL = b"EXPORTER-qpher-kms-service-token"
EXPORTER_LENGTH = 32  # bytes of service token
DEFAULT_HANDSHAKE_TIMEOUT = 10.0  # seconds
_VERIFY_DEPTH = 4  # leaf, internal CA: anything deeper is not ours
_KEY_KIND_SCHEME = {"ML-DSA-65": SIGALG_MLDSA65, "ECDSA": SIGALG_ECDSA_P256}


def _as_path(value: str | os.PathLike[str] | None) -> Path | None:
    return None if value is None else Path(value)


@dataclass(frozen=True, slots=True)
class InternalTLSSettings:
    """One end of the internal hop: its ML-DSA-65 chain (and optionally an ECDSA P-256 one), the
    internal CA bundle it verifies the peer against, and the SAN URI the peer must carry."""

    cert_file: Path
    key_file: Path
    ca_file: Path
    peer_uri: str
    ecdsa_cert_file: Path | None = None
    ecdsa_key_file: Path | None = None
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT

    def __post_init__(self) -> None:
        for name in ("cert_file", "key_file", "ca_file", "ecdsa_cert_file", "ecdsa_key_file"):
            object.__setattr__(self, name, _as_path(getattr(self, name)))
        if (self.ecdsa_cert_file is None) != (self.ecdsa_key_file is None):
            raise ConfigError("internal tls: expected ecdsa_cert_file and ecdsa_key_file together")
        uri = self.peer_uri
        if not isinstance(uri, str) or ":" not in uri or any(c.isspace() for c in uri):
            raise ConfigError(
                f"internal tls: expected the peer's SAN URI such as 'spiffe://qpher.internal/gateway', "
                f"got {uri!r}"
            )
        timeout = self.handshake_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (
            math.isfinite(timeout) and timeout > 0
        ):
            raise ConfigError(
                f"internal tls: expected handshake_timeout to be a positive number of seconds, "
                f"got {timeout!r}"
            )

    @property
    def sigalgs(self) -> tuple[str, ...]:
        """The signature schemes signed with and accepted, in preference order."""
        if self.ecdsa_cert_file is not None:
            return (SIGALG_MLDSA65, SIGALG_ECDSA_P256)
        return (SIGALG_MLDSA65,)


# ---- why a handshake was refused ---------------------------------------------------------

# Written by the verify callback (it runs inside do_handshake, on the connection's thread).
_refusals: weakref.WeakKeyDictionary[SSL.Connection, str] = weakref.WeakKeyDictionary()
_matched_uris: weakref.WeakKeyDictionary[SSL.Connection, str] = weakref.WeakKeyDictionary()

# OpenSSL error reasons -> what they mean on the internal hop.
_REASONS: dict[str, str] = {
    "peer did not return a certificate": "the peer sent no certificate",
    "tlsv13 alert certificate required": "the peer wants a certificate and we sent none",
    "no suitable key share": "no common key exchange group (X25519MLKEM768 required)",
    "no shared groups": "no common key exchange group (X25519MLKEM768 required)",
    "no suitable signature algorithm": "no common signature scheme (mldsa65 required)",
    "no shared signature algorithms": "no common signature scheme (mldsa65 required)",
    "unsupported protocol": "the peer does not speak TLS 1.3",
    "tlsv1 alert protocol version": "the peer does not speak TLS 1.3",
}


def _note(conn: SSL.Connection, reason: str) -> None:
    if conn not in _refusals:  # the first reason is the one that stopped the handshake
        _refusals[conn] = reason


def refusal_reason(conn: SSL.Connection, error: BaseException | None = None) -> str | None:
    """Why the handshake on ``conn`` failed, safe to log: what our verify callback refused, else
    what OpenSSL reported in ``error`` (an ``SSL.Error``, or a ``TLSError`` raised from one),
    else None."""
    reason = _refusals.get(conn)
    if reason is not None:
        return reason
    reasons = _error_reasons(error)
    for r in reasons:
        if r in _REASONS:
            return _REASONS[r]
        if " alert " in r or r.startswith("tls alert "):  # "tls alert bad certificate"
            return f"the peer refused the handshake ({r.split('alert ', 1)[1]})"
    return "; ".join(reasons) or None


def _error_reasons(error: BaseException | None) -> list[str]:
    """OpenSSL's reason strings behind ``error``: from the ``SSL.Error`` it was raised from, or
    from the message of a ``TLSError`` ("tls handshake failed: reason; reason") that lost it."""
    seen = 0
    current = error
    while current is not None and seen < 8:
        if isinstance(current, SSL.Error):
            return _openssl_reasons(current)
        current = current.__cause__ or current.__context__
        seen += 1
    if isinstance(error, TLSError) and ": " in error.message:
        return [r.strip() for r in error.message.split(": ", 1)[1].split(";") if r.strip()]
    return []


def _verify_error_string(errno: int) -> str:
    """OpenSSL's text for a verify error code ("unable to get local issuer certificate")."""
    from OpenSSL._util import ffi, lib  # pyOpenSSL has no public way to name the code

    fn = getattr(lib, "X509_verify_cert_error_string", None)
    if fn is None:
        return f"x509 verify error {errno}"
    text: bytes = ffi.string(fn(errno))
    return text.decode("ascii", "replace")


def _san_uris(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


_VerifyCallback = Callable[[SSL.Connection, crypto.X509, int, int, int], bool]


def _verifier(peer_uri: str) -> _VerifyCallback:
    def verify(conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int) -> bool:
        if not ok:
            _note(conn, f"certificate refused at depth {depth}: {_verify_error_string(errno)}")
            return False
        if depth != 0:
            return True
        leaf = cert.to_cryptography()
        uris = _san_uris(leaf)
        if peer_uri not in uris:
            _note(conn, f"certificate {leaf.subject.rfc4514_string()!r} has SAN URIs {uris!r}, "
                        f"expected {peer_uri!r}")
            return False
        _matched_uris[conn] = peer_uri
        return True

    return verify


def _set_verify(ctx: SSL.Context, mode: int, callback: _VerifyCallback) -> None:
    """``ctx.set_verify(mode, callback)``, and a refusal by ``callback`` of a chain OpenSSL
    accepted sends the peer a ``bad_certificate`` alert.

    pyOpenSSL's wrapper returns 0 for such a refusal but leaves the chain's error at
    ``X509_V_OK``; OpenSSL then reports ``X509_V_ERR_UNSPECIFIED`` and alerts ``internal_error``,
    which tells the refused peer the wrong story. So pyOpenSSL's C callback is wrapped in one
    that sets ``X509_V_ERR_CERT_REJECTED`` first (private pyOpenSSL attributes; if they moved,
    the refusal still happens, with the old alert)."""
    ctx.set_verify(mode, callback)
    from OpenSSL._util import ffi, lib

    inner: Any = getattr(ctx, "_verify_callback", None)
    raw: Any = getattr(ctx, "_context", None)
    if inner is None or raw is None or not hasattr(lib, "X509_STORE_CTX_set_error"):
        return

    def verify(ok: int, store_ctx: Any) -> int:
        result = int(inner(ok, store_ctx))
        if not result and lib.X509_STORE_CTX_get_error(store_ctx) == lib.X509_V_OK:
            lib.X509_STORE_CTX_set_error(store_ctx, lib.X509_V_ERR_CERT_REJECTED)
        return result

    c_callback = ffi.callback("int (*)(int, X509_STORE_CTX *)", verify)
    setattr(ctx, "_qpher_verify_callback", c_callback)  # noqa: B010 - lives as long as the context
    lib.SSL_CTX_set_verify(raw, mode, c_callback)


# ---- contexts ----------------------------------------------------------------------------

def _key_kind(cert: x509.Certificate) -> str:
    key = cert.public_key()
    if isinstance(key, mldsa.MLDSA65PublicKey):
        return "ML-DSA-65"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "ECDSA" if isinstance(key.curve, ec.SECP256R1) else f"ECDSA {key.curve.name}"
    return type(key).__name__


def _build(settings: InternalTLSSettings, *, server_side: bool) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD if server_side else SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
    options = SSL.OP_NO_RENEGOTIATION | SSL.OP_NO_COMPRESSION | SSL.OP_NO_TICKET
    if server_side:
        options |= SSL.OP_CIPHER_SERVER_PREFERENCE  # also orders the shared signature schemes
    ctx.set_options(options)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    _openssl.refuse_early_data(ctx)
    if not _openssl.set_groups(ctx, INTERNAL_GROUPS):
        raise ConfigError(f"internal tls: this OpenSSL does not offer {INTERNAL_GROUPS[0]}")
    if not _openssl.set_sigalgs(ctx, settings.sigalgs):
        raise ConfigError(
            f"internal tls: this OpenSSL refuses the signature schemes {list(settings.sigalgs)!r}"
        )

    leaf = _load_chain(ctx, settings.cert_file, settings.key_file, "cert_file", "key_file")
    kind = _key_kind(leaf)
    if kind != "ML-DSA-65":
        raise ConfigError(f"internal tls: cert_file: expected an ML-DSA-65 certificate, got {kind}")
    if settings.ecdsa_cert_file is not None and settings.ecdsa_key_file is not None:
        ec_leaf = _load_chain(ctx, settings.ecdsa_cert_file, settings.ecdsa_key_file,
                              "ecdsa_cert_file", "ecdsa_key_file")
        ec_kind = _key_kind(ec_leaf)
        if ec_kind != "ECDSA":
            raise ConfigError(f"internal tls: ecdsa_cert_file: expected an ECDSA P-256 certificate, "
                              f"got {ec_kind}")

    _read_certificate(settings.ca_file, "ca_file")  # a clear error for a missing or non-PEM file
    try:
        ctx.load_verify_locations(os.fsencode(settings.ca_file))
        if server_side:
            ctx.load_client_ca(os.fsencode(settings.ca_file))  # certificate_authorities for clients
    except SSL.Error as exc:
        raise ConfigError(
            f"internal tls: ca_file: OpenSSL cannot load CA certificates from {str(settings.ca_file)!r}"
        ) from exc
    mode = SSL.VERIFY_PEER | (SSL.VERIFY_FAIL_IF_NO_PEER_CERT if server_side else 0)
    _set_verify(ctx, mode, _verifier(settings.peer_uri))
    ctx.set_verify_depth(_VERIFY_DEPTH)
    return ctx


def build_internal_server_context(settings: InternalTLSSettings) -> SSL.Context:
    """The KMS node's context: accepts only clients whose verified leaf carries ``peer_uri``."""
    return _build(settings, server_side=True)


def build_internal_client_context(settings: InternalTLSSettings) -> SSL.Context:
    """The gateway's context: talks only to servers whose verified leaf carries ``peer_uri``.
    Connections from it need no server name (no SNI, no host name check)."""
    return _build(settings, server_side=False)


# ---- facts of a connection ---------------------------------------------------------------

def exporter_token(conn: SSL.Connection) -> bytes:
    """The connection's service token: 32 bytes of TLS exporter (RFC 8446 section 7.5), label
    ``EXPORTER_LABEL``, empty context. Equal on both ends, different on every connection."""
    try:
        return conn.export_keying_material(EXPORTER_LABEL, EXPORTER_LENGTH, b"")
    except SSL.Error as exc:
        raise TLSError("tls exporter unavailable: the handshake has not completed") from exc


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """Who is on the other end of a completed internal handshake.

    ``key_kind``: "ML-DSA-65" or "ECDSA" (P-256); ``signature_scheme`` follows from it in TLS 1.3
    ("mldsa65" or "ecdsa_secp256r1_sha256"); ``group``: "X25519MLKEM768"; ``version``: "TLSv1.3".
    """

    uri: str
    subject: str
    key_kind: str
    group: str | None
    version: str
    signature_scheme: str | None = None


def peer_identity(conn: SSL.Connection) -> PeerIdentity:
    """The verified peer of ``conn`` (after the handshake); ``TLSError`` if it has none."""
    cert = conn.get_peer_certificate(as_cryptography=True)
    if cert is None:
        raise TLSError("no peer certificate: the internal handshake has not completed")
    uris = _san_uris(cert)
    uri = _matched_uris.get(conn) or (uris[0] if uris else "")
    kind = _key_kind(cert)
    group = conn.get_group_name()
    return PeerIdentity(
        uri=uri,
        subject=cert.subject.rfc4514_string(),
        key_kind=kind,
        group=canonical_group_name(group) if group else None,
        version=conn.get_protocol_version_name(),
        signature_scheme=_KEY_KIND_SCHEME.get(kind),
    )


# ---- reload ------------------------------------------------------------------------------

class InternalTLSContextHolder:
    """The current internal context of one side, rebuilt from its files by ``reload()`` (on
    SIGHUP). Read ``context`` once per new connection; running connections keep theirs."""

    def __init__(self, settings: InternalTLSSettings, *, server_side: bool) -> None:
        self._server_side = server_side
        self._lock = threading.Lock()  # reload may run on a signal-handling thread
        self._settings = settings
        self._context = _build(settings, server_side=server_side)
        self._generation = 1

    @classmethod
    def for_server(cls, settings: InternalTLSSettings) -> InternalTLSContextHolder:
        return cls(settings, server_side=True)

    @classmethod
    def for_client(cls, settings: InternalTLSSettings) -> InternalTLSContextHolder:
        return cls(settings, server_side=False)

    @property
    def context(self) -> SSL.Context:
        return self._context

    @property
    def settings(self) -> InternalTLSSettings:
        return self._settings

    @property
    def server_side(self) -> bool:
        return self._server_side

    @property
    def generation(self) -> int:
        """1 for the context built first, one more for every successful reload."""
        return self._generation

    def reload(self, settings: InternalTLSSettings | None = None) -> SSL.Context:
        """Rebuild from the files (and new ``settings`` if given). A bad new set raises
        ``ConfigError`` (also logged) and the current context stays in force."""
        with self._lock:
            new_settings = settings if settings is not None else self._settings
            try:
                context = _build(new_settings, server_side=self._server_side)
            except ConfigError as exc:
                log.warning("internal tls reload failed, keeping generation %d: %s",
                            self._generation, exc.message)
                raise
            self._settings, self._context = new_settings, context
            self._generation += 1
            log.info("internal tls certificates reloaded (generation %d)", self._generation)
            return context
