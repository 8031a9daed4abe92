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

__all__ = ["set_groups", "set_sigalgs", "group_is_known"]


def _raw_ctx(context: SSL.Context) -> Any:
    raw = getattr(context, "_context", None)
    if raw is None or raw == _ffi.NULL:
        raise RuntimeError("pyOpenSSL Context has no _context: the private binding moved")
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
