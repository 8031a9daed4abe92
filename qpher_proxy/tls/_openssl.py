"""The few OpenSSL calls pyOpenSSL does not wrap, in one place.

pyOpenSSL 26 has no ``Context.set_groups``. The OpenSSL it drives is the one statically
linked into ``cryptography`` (4.x, with ML-KEM and X25519MLKEM768), and cryptography's cffi
binding, which pyOpenSSL re-exports as ``OpenSSL._util.lib``, does expose
``SSL_CTX_set1_curves_list`` (the historical name of ``SSL_CTX_set1_groups_list``: same
function, groups are not only curves any more). Alternatives considered and rejected:

- ``Context.set_tmp_ecdh(curve)`` takes one classical curve: it cannot name a hybrid group.
- A ``Groups`` line in a file named by ``OPENSSL_CONF``: honoured only if the variable is set
  before OpenSSL initialises (so before ``cryptography`` is imported), process-wide, and
  invisible in our config; per-listener settings and validation are impossible that way.

Everything private (``OpenSSL._util``, ``Context._context``) is touched only here, so that a
pyOpenSSL upgrade that moves it breaks one small module with a clear error, not the engine.
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

__all__ = [
    "disable_tickets",
    "pending_input",
    "pending_output",
    "group_is_known",
    "refuse_early_data",
    "session_max_early_data",
    "session_reused",
    "set_groups",
    "set_sigalgs",
]


def _raw_ctx(context: SSL.Context) -> Any:
    raw = getattr(context, "_context", None)
    if raw is None or raw == _ffi.NULL:
        raise RuntimeError("pyOpenSSL Context has no _context: the private binding moved")
    return raw


def _raw_ssl(conn: SSL.Connection) -> Any:
    raw = getattr(conn, "_ssl", None)
    if raw is None or raw == _ffi.NULL:
        raise RuntimeError("pyOpenSSL Connection has no _ssl: the private binding moved")
    return raw


def _call_list_setter(fn_name: str, context: SSL.Context, value: str) -> bool:
    fn = getattr(_lib, fn_name, None)
    if fn is None:
        raise RuntimeError(f"OpenSSL binding lacks {fn_name}: upgrade cryptography")
    result: int = fn(_raw_ctx(context), value.encode("ascii"))
    ok = result == 1
    # A refused list leaves an entry on OpenSSL's per-thread error queue. pyOpenSSL reads
    # that queue after later, unrelated calls and would raise a stale error there: clear it.
    _lib.ERR_clear_error()
    return ok


def set_groups(context: SSL.Context, groups: tuple[str, ...]) -> bool:
    """Set the key-exchange groups (preference order) of ``context``; False if refused."""
    return _call_list_setter("SSL_CTX_set1_curves_list", context, ":".join(groups))


def set_sigalgs(context: SSL.Context, sigalgs: tuple[str, ...]) -> bool:
    """Set the signature schemes ``context`` offers/accepts (used by test clients)."""
    return _call_list_setter("SSL_CTX_set1_sigalgs_list", context, ":".join(sigalgs))


def group_is_known(name: str) -> bool:
    """Does this OpenSSL know the key-exchange group ``name`` (one plain name)?"""
    return set_groups(SSL.Context(SSL.TLS_METHOD), (name,))


def refuse_early_data(context: SSL.Context) -> None:
    """Never accept TLS 1.3 0-RTT data (replayable): tickets then carry max_early_data 0."""
    _lib.SSL_CTX_set_max_early_data(_raw_ctx(context), 0)


def disable_tickets(conn: SSL.Connection) -> None:
    """``SSL_OP_NO_TICKET`` on one connection (before its handshake): no stateless ticket is
    issued or accepted on it."""
    _lib.SSL_set_options(_raw_ssl(conn), _lib.SSL_OP_NO_TICKET)


def session_reused(conn: SSL.Connection) -> bool:
    """Did the handshake resume a session (a ticket was accepted)?"""
    return bool(_lib.SSL_session_reused(_raw_ssl(conn)))


def session_max_early_data(session: SSL.Session) -> int:
    """The 0-RTT allowance a (client-side) session got from the server's ticket."""
    raw = getattr(session, "_session", None)
    if raw is None or raw == _ffi.NULL:
        raise RuntimeError("pyOpenSSL Session has no _session: the private binding moved")
    return int(_lib.SSL_SESSION_get_max_early_data(raw))


def pending_output(conn: SSL.Connection) -> int:
    """Bytes waiting in ``conn``'s outgoing memory BIO (``BIO_get_mem_data``'s length).

    Asking costs a fraction of a ``bio_read`` that finds nothing (pyOpenSSL raises
    ``WantReadError`` for that, through its error-queue handling), and tells how much one
    ``bio_read`` should take."""
    return int(_lib.BIO_get_mem_data(conn._from_ssl, _ffi.NULL))


def pending_input(conn: SSL.Connection) -> int:
    """Bytes fed into ``conn``'s incoming memory BIO that OpenSSL has not consumed yet."""
    return int(_lib.BIO_get_mem_data(conn._into_ssl, _ffi.NULL))
