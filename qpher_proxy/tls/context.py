"""Server TLS settings and the OpenSSL context built from them (pure: no trio, no sockets).

Theory of operation
-------------------
One ``TLSSettings`` (validated when constructed) becomes one ``OpenSSL.SSL.Context`` through
``build_server_context``. A context is immutable once a connection used it (pyOpenSSL enforces
that), so a reload builds a *new* context and swaps a reference: connections accepted later
use the new one, connections already running keep the context they were created with
(``ServerTLSContextHolder``). If the new files are bad the old context stays in force.

What the context enforces, and why:

- Versions: TLS 1.3 is preferred (OpenSSL always picks the highest common version); TLS 1.2
  is the floor unless ``min_version`` is "1.3". Nothing older is ever negotiated.
- TLS 1.2 cipher suites: ECDHE key exchange with an AEAD (AES-GCM, ChaCha20-Poly1305) only: no
  static RSA, no CBC, no SHA-1 MACs. TLS 1.3 suites are all AEAD; OpenSSL's default list is kept.
- Key-exchange groups per context (``_openssl.set_groups``), in preference order, default
  X25519MLKEM768, X25519, secp256r1. A post-quantum client sends an X25519MLKEM768 key share and
  gets it; a classical client (OpenSSL 3.0, curl, Python's ssl) offers only classical groups and
  gets X25519. Every name is checked against this OpenSSL when the context is built, so a typo
  stops start-up with a one-line ``ConfigError``. With ``require_pq`` the context only *offers*
  the hybrid groups (and TLS 1.3, the only version with hybrid groups): a classical client then
  fails inside the handshake with a proper ``handshake_failure`` alert, instead of completing a
  handshake that we would have to tear down afterwards. (The engine checks the group again
  after every handshake, as defence in depth.)
- Renegotiation off (``OP_NO_RENEGOTIATION``; TLS 1.3 has none), compression off.
- Session resumption: TLS 1.3 stateless tickets (``session_tickets``, default on), no 0-RTT
  (``SSL_CTX_set_max_early_data(0)``: tickets carry no early-data allowance), no server-side
  session cache (``SESS_CACHE_OFF``), TLS 1.2 never resumed (the engine sets ``OP_NO_TICKET``
  on a connection whose ClientHello does not offer TLS 1.3). With ``session_tickets: false``
  the context sets ``OP_NO_TICKET``: nothing resumes. (The bundled OpenSSL then still sends two
  small, useless stateful NewSessionTicket messages after a TLS 1.3 handshake: pyOpenSSL has no
  binding for ``SSL_CTX_set_num_tickets``.) Each of the old objections to resumption is met:

  1. Ticket keys. pyOpenSSL cannot set or read them, but OpenSSL gives every new context its
     own random key, in memory only. So a rotation is a new context ("generation" of the
     holder) every ``ticket_key_rotation`` seconds, built from the same settings; the previous
     context is kept only to *accept* its tickets for one more period, anything older is
     dropped, and ``SSL_CTX_set_timeout`` makes a ticket's session expire after two periods
     anyway. A leaked key therefore decrypts at most two periods' worth of tickets, and since
     resumption is psk_dhe_ke, the traffic of a resumed connection also depends on a fresh key
     exchange: a ticket key alone does not decrypt it. A connection resumed with the previous
     key gets its new tickets from that key too (OpenSSL encrypts with the connection's own
     context): they go with it, and that client's next visit after that is a full handshake.
  2. Routing a ticket to its key. OpenSSL decrypts with the key of the context a connection
     was created with, so the context is chosen per connection from the ClientHello, before
     OpenSSL sees it: an OpenSSL ticket starts with its key's 16-byte name, and the holder
     learns each new context's key name right after building it (``ticket_key_name``: one
     in-memory handshake with a throw-away client). The engine reads the first identity of the
     client's pre_shared_key extension (engine.py, clienthello.py); an unknown name, or a hello
     it cannot read, gets the current context: a full handshake, never an error. This runs in
     the connection's task; accept never waits for the client.
  3. Settings changed by a reload. A resumed session skips the certificate (and a client
     certificate's verification), so ``reload()`` keeps no earlier context: tickets issued
     before it are useless, a new ``client_ca`` or ``require_pq`` applies to every connection
     after it. A rotation that finds the files changed on disk is treated the same way.
  4. ``require_pq``. Resumption is psk_dhe_ke only: ``SSL_OP_ALLOW_NO_DHE_KEX`` is never set,
     so OpenSSL refuses psk_ke, every resumed handshake runs a key exchange over the
     context's groups, and the engine's group check applies to it as to a full handshake.

  Several gateway processes (``server.workers`` > 1): each process has its own keys, and the
  kernel spreads connections over the processes' SO_REUSEPORT listeners by address and port,
  so a reconnection (a new source port) lands on a random process. So the processes tell each
  other, through their supervisor, which key names they hold (``on_keys_changed`` out,
  ``holder.peers`` in; server/privsep.py), ``select`` answers ``HandOff(index)`` for a ticket of
  another process, and the stream passes the socket and the bytes read so far to its
  ``on_handoff`` callback (sent with SCM_RIGHTS via the supervisor), for the owner's
  ``HandOverListener`` (listener.py), which resumes the session. A process that receives a
  handed-over connection never hands it on: if it no longer holds the key, the client gets a
  full handshake there. If the hand-over cannot be made (control queue full, message too
  large) the client gets a full handshake where it landed; if the owner went away meanwhile,
  the connection is lost and the client reconnects.
- Certificates: an ECDSA (or RSA) chain, and optionally an ML-DSA-65 chain beside it. OpenSSL
  keeps one certificate slot per key type and picks the slot from the signature schemes both
  sides accept. We set server preference, so a TLS 1.3 client that offers ``mldsa65`` at all
  gets the ML-DSA-65 chain (post-quantum authentication); every other client (TLS 1.2, OpenSSL
  3.0, browsers today) gets the ECDSA chain.
- Client certificates (mTLS): ``client_auth`` "optional" asks for one and verifies it against
  ``client_ca`` if sent; "required" also refuses a handshake without one.
- Private keys are parsed with ``cryptography`` before OpenSSL sees them: an encrypted key is
  refused with a clear message instead of OpenSSL prompting on the terminal and hanging start-up.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, mldsa, rsa
from OpenSSL import SSL

from ..errors import ConfigError
from . import _openssl
from .clienthello import ClientHelloFacts, parse_client_hello

__all__ = [
    "DEFAULT_GROUPS",
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "DEFAULT_TICKET_KEY_ROTATION",
    "HandOff",
    "HYBRID_PQ_GROUPS",
    "LoadedTLSContext",
    "PeerTicketKeys",
    "ServerTLSContextHolder",
    "TLSSettings",
    "build_server_context",
    "canonical_group_name",
    "is_hybrid_pq_group",
    "ticket_key_name",
]

log = logging.getLogger("qpher.tls")

DEFAULT_GROUPS: tuple[str, ...] = ("X25519MLKEM768", "X25519", "secp256r1")
DEFAULT_HANDSHAKE_TIMEOUT = 10.0  # seconds; nginx's ssl_handshake_timeout is 60 s, ours is stricter
DEFAULT_ALPN: tuple[str, ...] = ("http/1.1",)
H2 = b"h2"  # the ALPN id of HTTP/2 over TLS (RFC 9113 §3.2); offered to TLS 1.3 clients only
_TLS1_3_WIRE = 0x0304  # SSL_version() of a TLS 1.3 connection
DEFAULT_TICKET_KEY_ROTATION = 3600.0  # seconds one ticket key issues tickets (it accepts them twice as long)
TICKET_KEY_ROTATION_RANGE = (60.0, 86_400.0)
ROTATION_RETRY = 60.0  # seconds before a failed rotation (unreadable files) is tried again

# Hybrid (classical + ML-KEM) groups of draft-ietf-tls-ecdhe-mlkem, as OpenSSL names them.
HYBRID_PQ_GROUPS: frozenset[str] = frozenset({"X25519MLKEM768", "SecP256r1MLKEM768", "SecP384r1MLKEM1024"})

# Our spelling of group names (IANA/config style). OpenSSL reports some in lower case
# ("x25519"); TLSInfo and metrics use these spellings so that labels match the config.
_GROUP_SPELLING: dict[str, str] = {
    name.lower(): name
    for name in (
        *sorted(HYBRID_PQ_GROUPS),
        "X25519", "X448", "secp256r1", "secp384r1", "secp521r1",
        "MLKEM512", "MLKEM768", "MLKEM1024",
        "ffdhe2048", "ffdhe3072", "ffdhe4096", "ffdhe6144", "ffdhe8192",
        "brainpoolP256r1tls13", "brainpoolP384r1tls13", "brainpoolP512r1tls13",
    )
}
_GROUP_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")  # "X25519MLKEM768", "P-256"

# TLS 1.2 only (TLS 1.3 suites are configured separately and are all AEAD).
_TLS12_CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20"
_VERIFY_DEPTH = 8
_SESSION_ID_CONTEXT = b"qpher-proxy"
_VERSIONS = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}


def canonical_group_name(name: str) -> str:
    """Our spelling of an OpenSSL group name ("x25519" -> "X25519"); unknown names unchanged."""
    return _GROUP_SPELLING.get(name.lower(), name)


def is_hybrid_pq_group(name: str | None) -> bool:
    return name is not None and canonical_group_name(name) in HYBRID_PQ_GROUPS


def _as_path(value: str | os.PathLike[str] | None) -> Path | None:
    return None if value is None else Path(value)


@dataclass(frozen=True, slots=True)
class TLSSettings:
    """What the TLS layer needs from the ``tls:`` config section. Value checks happen here
    (``ConfigError`` naming ``tls.<field>``); file and OpenSSL checks in ``build_server_context``."""

    cert_file: Path
    key_file: Path
    mldsa_cert_file: Path | None = None
    mldsa_key_file: Path | None = None
    min_version: Literal["1.2", "1.3"] = "1.2"
    groups: tuple[str, ...] = DEFAULT_GROUPS
    require_pq: bool = False
    client_auth: Literal["none", "optional", "required"] = "none"
    client_ca: Path | None = None
    alpn: tuple[str, ...] = field(default=DEFAULT_ALPN)
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    session_tickets: bool = True
    ticket_key_rotation: float = DEFAULT_TICKET_KEY_ROTATION

    def __post_init__(self) -> None:
        for name in ("cert_file", "key_file", "mldsa_cert_file", "mldsa_key_file", "client_ca"):
            object.__setattr__(self, name, _as_path(getattr(self, name)))
        object.__setattr__(self, "groups", tuple(self.groups))
        object.__setattr__(self, "alpn", tuple(self.alpn))
        if self.min_version not in _VERSIONS:
            raise ConfigError(f'tls.min_version: expected "1.2" or "1.3", got {self.min_version!r}')
        if not self.groups:
            raise ConfigError("tls.groups: expected at least one group")
        seen: set[str] = set()
        for group in self.groups:
            if not isinstance(group, str) or not _GROUP_NAME.fullmatch(group):
                raise ConfigError(
                    f"tls.groups: expected plain group names like 'X25519MLKEM768', got {group!r}"
                )
            if group.upper() == "DEFAULT":
                raise ConfigError("tls.groups: expected group names, got the keyword 'DEFAULT'")
            if group.lower() in seen:
                raise ConfigError(f"tls.groups: group {group!r} is listed twice")
            seen.add(group.lower())
        if self.require_pq and not any(is_hybrid_pq_group(g) for g in self.groups):
            raise ConfigError(
                "tls.require_pq: expected tls.groups to contain a hybrid post-quantum group "
                f"({', '.join(sorted(HYBRID_PQ_GROUPS))}), got {list(self.groups)!r}"
            )
        if self.client_auth not in ("none", "optional", "required"):
            raise ConfigError(
                f'tls.client_auth: expected "none", "optional" or "required", got {self.client_auth!r}'
            )
        if self.client_auth != "none" and self.client_ca is None:
            raise ConfigError(f'tls.client_ca: expected a CA file when client_auth is "{self.client_auth}"')
        if (self.mldsa_cert_file is None) != (self.mldsa_key_file is None):
            raise ConfigError("tls.mldsa_cert_file: expected mldsa_cert_file and mldsa_key_file together")
        if not self.alpn or not all(isinstance(p, str) and 0 < len(p.encode()) < 256 for p in self.alpn):
            raise ConfigError(
                f"tls.alpn: expected protocol names such as 'http/1.1', got {list(self.alpn)!r}"
            )
        timeout = self.handshake_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (
            math.isfinite(timeout) and timeout > 0
        ):
            raise ConfigError(
                f"tls.handshake_timeout: expected a positive number of seconds, got {timeout!r}"
            )
        if not isinstance(self.session_tickets, bool):
            raise ConfigError(f"tls.session_tickets: expected true or false, got {self.session_tickets!r}")
        rotation = self.ticket_key_rotation
        low, high = TICKET_KEY_ROTATION_RANGE
        if isinstance(rotation, bool) or not isinstance(rotation, (int, float)) or not (
            math.isfinite(rotation) and low <= rotation <= high
        ):
            raise ConfigError(
                f"tls.ticket_key_rotation: expected seconds from {low:g} to {high:g}, got {rotation!r}"
            )

    @property
    def ticket_lifetime(self) -> int:
        """Seconds a ticket may be used: the period its key issues tickets, plus one more."""
        return int(2 * self.ticket_key_rotation)

    @property
    def offered_groups(self) -> tuple[str, ...]:
        """The groups the context offers: all of them, or only the hybrid ones with require_pq."""
        if self.require_pq:
            return tuple(g for g in self.groups if is_hybrid_pq_group(g))
        return self.groups


# ---- building --------------------------------------------------------------------------

def _read_certificate(path: Path, option: str) -> x509.Certificate:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{option}: cannot read {str(path)!r}: {exc.strerror or 'unreadable'}") from exc
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise ConfigError(f"{option}: expected a PEM certificate in {str(path)!r}") from exc


def _check_private_key(path: Path, option: str) -> bytes:
    """Parse the key with cryptography first: a clear error for an encrypted or malformed key,
    where OpenSSL would prompt for a passphrase on the terminal (and hang start-up) or fail
    with a generic message. The message never includes the file's content."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{option}: cannot read {str(path)!r}: {exc.strerror or 'unreadable'}") from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:
        raise ConfigError(
            f"{option}: the private key in {str(path)!r} is encrypted; expected an unencrypted PEM key"
        ) from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{option}: expected a PEM private key in {str(path)!r}") from exc
    return _spki(key.public_key())


def _spki(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined,no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _load_chain(
    ctx: SSL.Context, cert_path: Path, key_path: Path, cert_option: str, key_option: str
) -> x509.Certificate:
    leaf = _read_certificate(cert_path, cert_option)
    if _check_private_key(key_path, key_option) != _spki(leaf.public_key()):
        raise ConfigError(f"{key_option}: the key in {str(key_path)!r} does not match {cert_option}")
    try:
        ctx.use_certificate_chain_file(os.fsencode(cert_path))
    except SSL.Error as exc:
        raise ConfigError(
            f"{cert_option}: OpenSSL cannot use the certificate chain in {str(cert_path)!r}"
        ) from exc
    try:
        ctx.use_privatekey_file(os.fsencode(key_path))
    except SSL.Error as exc:
        raise ConfigError(f"{key_option}: OpenSSL cannot use the private key in {str(key_path)!r}") from exc
    try:
        ctx.check_privatekey()
    except SSL.Error as exc:
        raise ConfigError(f"{key_option}: the key in {str(key_path)!r} does not match {cert_option}") from exc
    return leaf


def _key_kind(cert: x509.Certificate) -> str:
    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "ECDSA"
    if isinstance(key, rsa.RSAPublicKey):
        return "RSA"
    if isinstance(key, mldsa.MLDSA65PublicKey):
        return "ML-DSA-65"
    return type(key).__name__


def build_server_context(settings: TLSSettings) -> SSL.Context:
    """A fresh server context for ``settings``; ``ConfigError`` (one line) if anything is wrong."""
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    _set_protocol(ctx, settings)
    _set_groups(ctx, settings)
    _load_certificates(ctx, settings)
    if settings.client_auth != "none":
        _require_client_certificates(ctx, settings)
    ctx.set_alpn_select_callback(_alpn_selector(tuple(p.encode() for p in settings.alpn)))
    return ctx


def _set_protocol(ctx: SSL.Context, settings: TLSSettings) -> None:
    """Versions, options, resumption (stateless TLS 1.3 tickets or none), no 0-RTT, idle
    buffers released, the TLS 1.2 cipher list."""
    min_version = "1.3" if settings.require_pq else settings.min_version
    ctx.set_min_proto_version(_VERSIONS[min_version])
    ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
    options = SSL.OP_NO_RENEGOTIATION | SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE
    if not settings.session_tickets:
        options |= SSL.OP_NO_TICKET
    ctx.set_options(options)  # never OP_ALLOW_NO_DHE_KEX: resumption is psk_dhe_ke only
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)  # no stateful cache: tickets are stateless
    ctx.set_session_id(_SESSION_ID_CONTEXT)
    ctx.set_timeout(settings.ticket_lifetime)  # a session (ticket) older than this is not resumed
    _openssl.refuse_early_data(ctx)
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)  # free a connection's record buffers while it is idle
    ctx.set_cipher_list(_TLS12_CIPHERS)


def _set_groups(ctx: SSL.Context, settings: TLSSettings) -> None:
    """The key-exchange groups; ``ConfigError`` for a group this OpenSSL does not know."""
    for group in settings.groups:
        if not _openssl.group_is_known(group):
            raise ConfigError(
                f"tls.groups: unknown group {group!r} (this OpenSSL knows e.g. "
                f"{', '.join(DEFAULT_GROUPS)}, SecP256r1MLKEM768, secp384r1)"
            )
    if not _openssl.set_groups(ctx, settings.offered_groups):
        raise ConfigError(f"tls.groups: OpenSSL refused the group list {list(settings.offered_groups)!r}")


def _load_certificates(ctx: SSL.Context, settings: TLSSettings) -> None:
    """The classical (ECDSA or RSA) chain, and the ML-DSA-65 one when configured."""
    leaf = _load_chain(ctx, settings.cert_file, settings.key_file, "tls.cert_file", "tls.key_file")
    kind = _key_kind(leaf)
    if kind not in ("ECDSA", "RSA"):
        raise ConfigError(f"tls.cert_file: expected an ECDSA or RSA certificate, got {kind}")
    _warn_if_expired(leaf, "tls.cert_file")
    if settings.mldsa_cert_file is not None and settings.mldsa_key_file is not None:
        pq_leaf = _load_chain(
            ctx,
            settings.mldsa_cert_file,
            settings.mldsa_key_file,
            "tls.mldsa_cert_file",
            "tls.mldsa_key_file",
        )
        pq_kind = _key_kind(pq_leaf)
        if pq_kind != "ML-DSA-65":
            raise ConfigError(f"tls.mldsa_cert_file: expected an ML-DSA-65 certificate, got {pq_kind}")
        _warn_if_expired(pq_leaf, "tls.mldsa_cert_file")


def _require_client_certificates(ctx: SSL.Context, settings: TLSSettings) -> None:
    """Ask for (``optional``) or demand (``required``) a client certificate from ``tls.client_ca``."""
    assert settings.client_ca is not None  # checked by TLSSettings
    _read_certificate(settings.client_ca, "tls.client_ca")
    try:
        ctx.load_verify_locations(os.fsencode(settings.client_ca))
        ctx.load_client_ca(os.fsencode(settings.client_ca))
    except SSL.Error as exc:
        raise ConfigError(
            f"tls.client_ca: OpenSSL cannot load CA certificates from {str(settings.client_ca)!r}"
        ) from exc
    mode = SSL.VERIFY_PEER
    if settings.client_auth == "required":
        mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
    ctx.set_verify(mode)
    ctx.set_verify_depth(_VERIFY_DEPTH)


def _alpn_selector(ours: tuple[bytes, ...]) -> Callable[[SSL.Connection, list[bytes]], bytes]:
    def select(conn: SSL.Connection, offered: list[bytes]) -> bytes:
        for proto in ours:
            if proto in offered:
                # h2 over TLS 1.3 only: RFC 9113 §9.2 would allow TLS 1.2 with a restricted
                # cipher list, but every client that speaks h2 speaks TLS 1.3 too, and one TLS
                # rule for h2 is simpler to audit. OpenSSL selects the version before ALPN, so
                # a TLS 1.2 client offering h2 and http/1.1 gets http/1.1 here.
                if proto == H2 and conn.get_protocol_version() != _TLS1_3_WIRE:
                    continue
                return proto
        # No overlap (e.g. a client offering only "h2"): continue without ALPN rather than
        # fail, as nginx does; the HTTP layer then simply speaks HTTP/1.1.
        return SSL.NO_OVERLAPPING_PROTOCOLS  # type: ignore[return-value]

    return select


def _warn_if_expired(cert: x509.Certificate, option: str) -> None:
    if cert.not_valid_after_utc < datetime.datetime.now(datetime.UTC):
        log.warning("%s: certificate expired on %s", option, cert.not_valid_after_utc.date().isoformat())


# ---- ticket keys ---------------------------------------------------------------------------

def ticket_key_name(context: SSL.Context, settings: TLSSettings) -> bytes | None:
    """The name (16 bytes) of the stateless ticket key ``context`` holds, or None if it cannot
    be learned (then tickets of this context only resume while it is the current one).

    OpenSSL makes a random ticket key for every new context and keeps it in memory; pyOpenSSL
    cannot read it. Its name is the first 16 bytes of every ticket, so we ask: one in-memory
    TLS 1.3 handshake of a throw-away client against ``context`` (no client certificate asked,
    nothing verified), then the ClientHello of a second client offering the ticket, read back
    with the same parser the server uses for real clients."""
    if not settings.session_tickets:
        return None
    try:
        client_ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        client_ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
        client_ctx.set_verify(SSL.VERIFY_NONE)
        if not _openssl.set_groups(client_ctx, settings.offered_groups):
            return None
        server = SSL.Connection(context, None)
        server.set_verify(SSL.VERIFY_NONE)
        server.set_accept_state()
        client = SSL.Connection(client_ctx, None)
        client.set_connect_state()
        for _ in range(8):
            client_done = _step(client.do_handshake)
            _move(client, server)
            server_done = _step(server.do_handshake)
            _move(server, client)
            if client_done and server_done:
                break
        _step(lambda: client.recv(1))  # reads the NewSessionTickets
        session = client.get_session()
        if session is None:
            return None
        again = SSL.Connection(client_ctx, None)
        again.set_session(session)
        again.set_connect_state()
        _step(again.do_handshake)
        return parse_client_hello(again.bio_read(65536)).ticket_key_name
    except SSL.Error:
        return None


def _step(op: Callable[[], object]) -> bool:
    try:
        op()
    except SSL.WantReadError:
        return False
    return True


def _move(src: SSL.Connection, dst: SSL.Connection) -> None:
    try:
        data = src.bio_read(65536)
    except SSL.WantReadError:
        return
    dst.bio_write(data)


def _files_digest(settings: TLSSettings) -> bytes:
    """A digest of every file the context is built from: a rotation that finds them changed
    (new certificates or client CA on disk) is a reload and keeps no previous generation."""
    h = hashlib.sha256()
    for path in (settings.cert_file, settings.key_file, settings.mldsa_cert_file,
                 settings.mldsa_key_file, settings.client_ca):
        if path is None:
            h.update(b"\0")
            continue
        try:
            h.update(hashlib.sha256(path.read_bytes()).digest())
        except OSError:
            h.update(b"unreadable")
    return h.digest()


# ---- the host's other gateway processes -------------------------------------------------------

@dataclass(frozen=True, slots=True)
class HandOff:
    """The ticket a client offers was issued by another gateway process of this host: hand the
    connection over to ``gateway`` (the stream's ``on_handoff``), or, if that cannot be done,
    give it a full handshake on ``fallback``."""

    gateway: int
    fallback: SSL.Context


class PeerTicketKeys:
    """The ticket key names of the host's other gateway processes -> their index, as the
    supervisor last told us (``server.workers`` > 1). Replaced whole, read per connection."""

    __slots__ = ("_names",)

    def __init__(self) -> None:
        self._names: Mapping[bytes, int] = {}

    def update(self, names: Mapping[bytes, int]) -> None:
        self._names = dict(names)

    def get(self, name: bytes) -> int | None:
        return self._names.get(name)

    def __len__(self) -> int:
        return len(self._names)


# ---- reload and rotation -----------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class LoadedTLSContext:
    """One generation of server TLS state: the context that issues tickets, the settings it
    was built from and, after a rotation, the previous context, which only accepts its tickets.

    ``generation`` counts reloads; ``rotation`` counts ticket-key rotations since the last one.
    """

    context: SSL.Context
    settings: TLSSettings
    generation: int
    previous: SSL.Context | None = None
    key_names: Mapping[bytes, SSL.Context] = field(default_factory=dict)
    rotation: int = 0
    started: float = 0.0  # holder clock when ``context`` began issuing tickets
    key_name: bytes | None = None  # the ticket key name of ``context``, if learned
    files: bytes = b""  # _files_digest of the files ``context`` was built from
    peers: PeerTicketKeys | None = None  # the other gateway processes' key names (hand-over)

    def select(self, hello: ClientHelloFacts) -> SSL.Context | HandOff:
        """The context for a connection whose ClientHello says ``hello``: the one whose key
        named the offered ticket; a ``HandOff`` if another gateway process of the host holds
        that key; else the current one (a full handshake)."""
        name = hello.ticket_key_name
        if name is not None:
            ctx = self.key_names.get(name)
            if ctx is not None:
                return ctx
            peers = self.peers
            gateway = peers.get(name) if peers is not None else None
            if gateway is not None:
                return HandOff(gateway, self.context)
        return self.context

    def select_local(self, hello: ClientHelloFacts) -> SSL.Context:
        """``select`` without hand-over: for a connection another process handed to us."""
        choice = self.select(hello)
        return choice.fallback if isinstance(choice, HandOff) else choice

    @property
    def server_context(self) -> SSL.Context | Callable[[ClientHelloFacts], SSL.Context | HandOff]:
        """What a server connection is created from: the context itself without tickets, else
        ``select`` (the engine calls it with the client's first record)."""
        return self.select if self.settings.session_tickets else self.context

    @property
    def handed_over_context(self) -> SSL.Context | Callable[[ClientHelloFacts], SSL.Context]:
        """``server_context`` for a connection handed over by another gateway process."""
        return self.select_local if self.settings.session_tickets else self.context

    @property
    def accepted_key_names(self) -> list[bytes]:
        """The ticket key names this generation accepts (to announce to the other processes)."""
        return list(self.key_names)


class ServerTLSContextHolder:
    """The current server context, swapped atomically by ``reload()`` (e.g. on SIGHUP) and, with
    session tickets, by ``rotate()`` every ``ticket_key_rotation`` seconds.

    ``current`` is read once per accepted connection; a connection keeps the context it started
    with, so neither a reload nor a rotation disturbs running connections. A rotation falls due
    when ``current`` is read (the accept loop does, so nothing else needs to run it): it builds
    a fresh context from the same settings (a fresh random ticket key), keeps the one before as
    ``previous`` to accept its tickets for one more period, and drops anything older. If the
    files changed on disk since, the rotation is a reload (no previous kept); if they cannot be
    read, the current context stays and the rotation is retried after ``ROTATION_RETRY`` s.
    """

    def __init__(
        self,
        settings: TLSSettings,
        *,
        builder: Callable[[TLSSettings], SSL.Context] = build_server_context,
        clock: Callable[[], float] = time.monotonic,
        key_namer: Callable[[SSL.Context, TLSSettings], bytes | None] = ticket_key_name,
        on_keys_changed: Callable[[list[bytes]], None] | None = None,
    ) -> None:
        self._builder = builder
        self._clock = clock
        self._key_namer = key_namer
        self.peers = PeerTicketKeys()
        # Called (synchronously, from whoever triggered it) with the accepted key names after
        # every rotation and reload: the gateway announces them to its supervisor.
        self.on_keys_changed = on_keys_changed
        self._lock = threading.Lock()  # reload may be called from a signal-handling thread
        self._retry_at = 0.0
        self._current = self._fresh(settings, 1)

    def _fresh(self, settings: TLSSettings, generation: int) -> LoadedTLSContext:
        files = _files_digest(settings)
        context = self._builder(settings)
        name = self._key_namer(context, settings)
        if name is None and settings.session_tickets:
            log.warning("tls: could not learn the new ticket key's name; its tickets resume only "
                        "while it is the current key")
        return LoadedTLSContext(
            context, settings, generation, key_names={name: context} if name else {},
            started=self._clock(), key_name=name, files=files, peers=self.peers,
        )

    def _keys_changed(self) -> None:
        if self.on_keys_changed is not None:
            self.on_keys_changed(self._current.accepted_key_names)

    @property
    def current(self) -> LoadedTLSContext:
        cur = self._current
        settings = cur.settings
        if settings.session_tickets:
            now = self._clock()
            if now - cur.started >= settings.ticket_key_rotation and now >= self._retry_at:
                try:
                    return self.rotate()
                except ConfigError:
                    pass  # logged by rotate(); the current context keeps issuing meanwhile
        return self._current

    @property
    def context(self) -> SSL.Context:
        return self._current.context

    @property
    def settings(self) -> TLSSettings:
        return self._current.settings

    def rotate(self) -> LoadedTLSContext:
        """A new ticket key now: a fresh context issues tickets, the current one only accepts
        its own for one more period (unless it is that old already, or the files changed)."""
        if not self._lock.acquire(blocking=False):
            return self._current  # a reload or rotation is running: it makes a fresh key anyway
        try:
            old = self._current
            settings = old.settings
            try:
                new = self._fresh(settings, old.generation)
            except ConfigError as exc:
                self._retry_at = self._clock() + ROTATION_RETRY
                log.warning("tls ticket key rotation failed, the current key stays for now: %s",
                            exc.message)
                raise
            keep = new.files == old.files and new.started - old.started < 2 * settings.ticket_key_rotation
            names = dict(new.key_names)
            if keep and old.key_name is not None:
                names[old.key_name] = old.context
            self._current = LoadedTLSContext(
                new.context, settings, old.generation, previous=old.context if keep else None,
                key_names=names, rotation=old.rotation + 1, started=new.started,
                key_name=new.key_name, files=new.files, peers=self.peers,
            )
            log.info("tls ticket key rotated (generation %d, rotation %d)", old.generation,
                     self._current.rotation)
        finally:
            self._lock.release()
        self._keys_changed()
        return self._current

    def reload(self, settings: TLSSettings | None = None) -> LoadedTLSContext:
        """Re-read the certificate/key files (and new ``settings`` if given).

        On failure the previous context stays in force, a warning is logged and the
        ``ConfigError`` is raised for the caller to report. On success no earlier context is
        kept: tickets issued before the reload are not accepted (a resumed session would skip
        the new client CA or ``require_pq``), those clients get a full handshake.
        """
        with self._lock:
            old = self._current
            new_settings = settings if settings is not None else old.settings
            try:
                self._current = self._fresh(new_settings, old.generation + 1)
            except ConfigError as exc:
                log.warning("tls reload failed, keeping generation %d: %s", old.generation, exc.message)
                raise
            log.info("tls certificates reloaded (generation %d)", self._current.generation)
        self._keys_changed()
        return self._current
