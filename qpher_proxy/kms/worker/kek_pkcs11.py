"""``kms.kek.provider: pkcs11``: a KEK that never leaves an HSM.  KMS process only.

Theory of operation
===================

The KEK is a **non-extractable, sensitive AES-256 secret key inside a PKCS#11 token** (an HSM,
a cloud HSM through its vendor's PKCS#11 library, or SoftHSM2 for development). This process
holds a session and a handle to that key, never its value: ``wrap`` and ``unwrap`` are
``C_Encrypt`` / ``C_Decrypt`` with ``CKM_AES_GCM`` run by the token, binding the key file's
associated data (the same AAD the local providers bind). The binding is python-pkcs11.

Blob format: ``iv (12 bytes) || ciphertext || tag (16 bytes)`` -- the shape of the local
providers'. The IV is 12 fresh random bytes (``os.urandom``) per wrap, handed to the token in
``CK_GCM_PARAMS``; a token that insists on choosing the IV itself (AWS CloudHSM, HSMs in a
FIPS mode) writes it into that same buffer, and the blob stores whatever the buffer holds
after ``C_Encrypt`` (tested with SoftHSM2, which takes the caller's IV).

Opening (the constructor), each step with a one-line error that never shows the PIN:

1. load the module (``pkcs11_module``: the vendor's shared library) and find the token by label;
2. open a read-only session and log in as the user with the PIN (read by the caller from a
   0600 file, or from the environment variable the supervisor moved into a memfd). PKCS#11
   logins belong to the process: a second provider on a token this process is already logged
   in to (``rotate-kek`` between two keys of one token) shares that login;
3. find exactly one secret key with ``pkcs11_key_label`` and refuse it unless it is AES,
   32 bytes, ``CKA_SENSITIVE`` and not ``CKA_EXTRACTABLE``, and allowed to encrypt and decrypt;
4. compute the ``kek_id`` (below), then seal and open a small *probe* blob: the mechanism
   works with this key both ways (see "Errors" for its second use).

``kek_id`` = ``"pkcs11-" + hex(SHA-256(v1 label || token label || key label || CKA_ID ||
CKA_CHECK_VALUE))[:16]``, each part length-prefixed. ``CKA_CHECK_VALUE`` is the token's own key
check value (PKCS#11 3.0: the first bytes of AES-ECB of a zero block, computed inside the
token), so a different key under the same labels gets a different id; tokens that do not
report it leave that part empty, and then only the canary (kek.py) tells two such keys apart,
at start-up, with its "does not open" message. The token's serial number is deliberately left
out: the replicas of one key in an HSM cluster or a restored backup have other serials but
are the same KEK.

Errors
------
* Start-up: no module, no token, wrong PIN (or a locked one), no key / several keys / the
  wrong kind of key: :class:`~qpher_proxy.kms.worker.kek.KEKError`, one line naming the option
  (``kms.kek.pkcs11_...``) and the PKCS#11 return value.
* ``unwrap`` of an altered blob, or one bound to other AAD:
  :class:`~qpher_proxy.kms.worker.kek.UnwrapFailed`, as for every provider. Tokens do not agree
  on the return value for a failed GCM tag (the standard says ``CKR_ENCRYPTED_DATA_INVALID``;
  SoftHSM2 answers ``CKR_GENERAL_ERROR``), so an ambiguous failure is settled by unwrapping the
  probe blob sealed at open: if the probe still opens, the token is fine and the blob was bad.
* The token going away at run time (module error, session closed, device removed, handle no
  longer valid, or a probe that no longer opens): :class:`KEKUnavailable`, which the gateway
  renders as 503 ``kms_unavailable`` for that request -- after one retry on a new session
  (an HSM connection that timed out costs no request). The worker keeps serving (what it has
  already unwrapped stays usable) and tries a new session on each later call; it uses a new
  session only if the key it finds there has the same ``kek_id``.

Deployment: the KMS worker opens the token *after* it drops to ``kms.user`` (when started as
root), so the module, its configuration (``SOFTHSM2_CONF`` for SoftHSM2, the vendor's client
configuration for a cloud HSM) and the token's storage must be readable -- and for SoftHSM2's
token directory writable -- by that user. The worker inherits the supervisor's environment
(without the PIN variable), so such configuration variables reach it.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable
from typing import Any

from ...errors import KMSUnavailable
from .kek import NONCE_BYTES, TAG_BYTES, KEKError, KEKProvider, UnwrapFailed, read_private_file

KEK_ID_PREFIX = "pkcs11-"
KEK_ID_LABEL = b"qpher-proxy pkcs11 kek id v1"
_PROBE_AAD = b"qpher-proxy pkcs11 probe v1"
AES_256_BYTES = 32
GCM_TAG_BITS = TAG_BYTES * 8


class KEKUnavailable(KMSUnavailable):
    """The KEK's token cannot be used right now (503 ``kms_unavailable``); retrying may work."""


def load_binding() -> None:
    """Import python-pkcs11 (and its compiled core) now, while its files are readable: the
    worker calls this before it drops to the KMS user."""
    _binding()
    import pkcs11._pkcs11  # noqa: F401


def _binding() -> Any:
    try:
        import pkcs11
    except ImportError as exc:
        raise KEKError(
            "kms.kek.provider is 'pkcs11' but python-pkcs11 is not installed "
            "(pip install 'qpher-proxy[pkcs11]')"
        ) from exc
    return pkcs11


def _rv(exc: BaseException) -> str:
    """A PKCS#11 error as its return-value name (``CKR_PIN_INCORRECT``), never its arguments."""
    name = type(exc).__name__
    if name == "PKCS11Error":  # python-pkcs11's own text for the codes it has no class for
        return str(exc)[:80] or "PKCS#11 error"
    out = "".join("_" + c if c.isupper() and i else c for i, c in enumerate(name)).upper()
    return "CKR_" + out


def _lp(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


class PKCS11KEKProvider(KEKProvider):
    """An AES-256 key inside a PKCS#11 token; see the module docstring."""

    def __init__(self, module: str, token_label: str, key_label: str, pin: str, *, pin_source: str) -> None:
        self.module = module
        self.token_label = token_label
        self.key_label = key_label
        self._pin = pin
        self._pin_source = pin_source  # for messages: "PIN file '/x'" / "environment variable 'V'"
        self._p11 = _binding()
        self._session: Any = None
        self._key: Any = None
        self._kek_id = ""
        self._probe = b""
        self._open()
        try:  # the key must really do AES-GCM both ways (the mechanism may be missing or forbidden)
            self._probe = self.wrap(os.urandom(16), _PROBE_AAD)
            self.unwrap(self._probe, _PROBE_AAD)
        except (KMSUnavailable, UnwrapFailed) as exc:
            self.close()
            raise KEKError(
                f"kms.kek.pkcs11_key_label {key_label!r}: the token cannot AES-GCM encrypt and decrypt "
                f"with this key ({exc.message})"
            ) from None

    # ---- opening ----

    def _open(self) -> None:
        p11 = self._p11
        E = p11.exceptions
        try:
            lib = p11.lib(self.module)
        except E.PKCS11Error as exc:
            if not os.path.exists(self.module):
                raise KEKError(f"kms.kek.pkcs11_module {self.module!r} does not exist") from None
            if type(exc) is E.PKCS11Error:  # dlopen or C_GetFunctionList failed
                raise KEKError(f"kms.kek.pkcs11_module {self.module!r} cannot be loaded as a PKCS#11 module "
                               "(not a PKCS#11 library, or unreadable)") from None
            raise KEKError(  # C_Initialize failed: mostly the module's own configuration or storage
                f"kms.kek.pkcs11_module {self.module!r} failed to initialize ({_rv(exc)}); can uid "
                f"{os.geteuid()} read its configuration (e.g. SOFTHSM2_CONF) and its token storage?"
            ) from None
        try:
            token = lib.get_token(token_label=self.token_label)
        except E.NoSuchToken:
            raise KEKError(
                f"kms.kek.pkcs11_token_label: no token labelled {self.token_label!r} in {self.module!r}"
            ) from None
        except E.MultipleTokensReturned:
            raise KEKError(
                f"kms.kek.pkcs11_token_label: several tokens are labelled {self.token_label!r}"
            ) from None
        except E.PKCS11Error as exc:
            raise KEKError(f"kms.kek.pkcs11_token_label: cannot list the tokens ({_rv(exc)})") from None
        session = self._login(token)
        try:
            key = self._find_key(session)
            kek_id = self._compute_kek_id(key)
        except BaseException:
            _close_quietly(session)
            raise
        if self._kek_id and kek_id != self._kek_id:  # reopened: must be the very same key
            _close_quietly(session)
            raise KEKUnavailable(
                f"the PKCS#11 key {self.key_label!r} is now a different key (id {kek_id!r}, "
                f"expected {self._kek_id!r})"
            )
        self._session, self._key, self._kek_id = session, key, kek_id

    def _login(self, token: Any) -> Any:
        E = self._p11.exceptions
        where = f"token {self.token_label!r}"
        try:
            return token.open(user_pin=self._pin)
        except (E.PinIncorrect, E.PinInvalid, E.PinLenRange):
            raise KEKError(f"{where}: the PIN from {self._pin_source} is not accepted (wrong PIN)") from None
        except E.PinLocked:
            raise KEKError(f"{where}: the user PIN is locked (too many wrong PINs)") from None
        except E.PinExpired:
            raise KEKError(f"{where}: the user PIN has expired; set a new one") from None
        except E.UserAlreadyLoggedIn:
            # PKCS#11 logins are per token and process: another session of ours is logged in
            # (two providers on one token, as in rotate-kek), so a plain session shares it.
            try:
                return token.open()
            except E.PKCS11Error as exc:
                raise KEKError(f"{where}: cannot open a session ({_rv(exc)})") from None
        except E.PKCS11Error as exc:
            raise KEKError(f"{where}: cannot open a session and log in ({_rv(exc)})") from None

    def _find_key(self, session: Any) -> Any:
        p11 = self._p11
        E, A = p11.exceptions, p11.Attribute
        what = f"kms.kek.pkcs11_key_label {self.key_label!r}"
        try:
            key = session.get_key(object_class=p11.ObjectClass.SECRET_KEY, label=self.key_label)
        except E.NoSuchKey:
            raise KEKError(f"{what}: no secret key with this label in token {self.token_label!r}") from None
        except E.MultipleObjectsReturned:
            raise KEKError(f"{what}: several secret keys carry this label; labels must be unique") from None
        except E.PKCS11Error as exc:
            raise KEKError(f"{what}: cannot search the token ({_rv(exc)})") from None
        try:
            key_type, size = key[A.KEY_TYPE], key[A.VALUE_LEN]
            extractable, sensitive = key[A.EXTRACTABLE], key[A.SENSITIVE]
            encrypt, decrypt = key[A.ENCRYPT], key[A.DECRYPT]
        except E.PKCS11Error as exc:
            raise KEKError(f"{what}: cannot read the key's attributes ({_rv(exc)})") from None
        if key_type != p11.KeyType.AES or size != AES_256_BYTES:
            kind = getattr(key_type, "name", str(key_type))
            raise KEKError(f"{what}: expected an AES-256 key, found {kind} of {size} bytes")
        if extractable or not sensitive:
            raise KEKError(
                f"{what}: the key must be non-extractable and sensitive "
                f"(CKA_EXTRACTABLE={bool(extractable)}, CKA_SENSITIVE={bool(sensitive)})"
            )
        if not (encrypt and decrypt):
            raise KEKError(f"{what}: the key must allow encrypt and decrypt (CKA_ENCRYPT, CKA_DECRYPT)")
        return key

    def _compute_kek_id(self, key: Any) -> str:
        A, E = self._p11.Attribute, self._p11.exceptions
        parts = [KEK_ID_LABEL, self.token_label.encode(), self.key_label.encode()]
        for attr in (A.ID, A.CHECK_VALUE):
            try:
                value = key[attr]
            except E.PKCS11Error:  # not reported by this token
                value = b""
            parts.append(value if isinstance(value, bytes) else b"")
        return KEK_ID_PREFIX + hashlib.sha256(b"".join(_lp(p) for p in parts)).hexdigest()[:16]

    # ---- the provider ----

    @property
    def kek_id(self) -> str:
        return self._kek_id

    def _live_key(self) -> Any:
        if self._key is None:
            try:
                self._open()
            except KEKError as exc:
                raise KEKUnavailable(f"the KEK's PKCS#11 token is unavailable: {exc.message}") from None
        return self._key

    def _lost(self, exc: BaseException) -> KEKUnavailable:
        """Forget the session (the next call opens a new one) and say why, briefly."""
        _close_quietly(self._session)
        self._session = self._key = None
        return KEKUnavailable(f"the KEK's PKCS#11 token {self.token_label!r} is unavailable ({_rv(exc)})")

    def _with_key(self, op: Callable[[Any], bytes]) -> bytes:
        """``op(key)``; a PKCS#11 error drops the session and ``op`` runs once more on a new one
        (an HSM connection that timed out), then :class:`KEKUnavailable`."""
        for attempt in (1, 2):
            key = self._live_key()
            try:
                return op(key)
            except self._p11.exceptions.PKCS11Error as exc:
                lost = self._lost(exc)
                if attempt == 2:
                    raise lost from None
        raise AssertionError("unreachable")  # pragma: no cover

    def wrap(self, plaintext: bytes, aad: bytes) -> bytes:
        p11 = self._p11

        def op(key: Any) -> bytes:
            iv = bytes(os.urandom(NONCE_BYTES))  # a fresh object: the token may write its own IV here
            params = p11.GCMParams(iv, aad, GCM_TAG_BITS)
            sealed = key.encrypt(plaintext, mechanism=p11.Mechanism.AES_GCM, mechanism_param=params)
            if len(sealed) != len(plaintext) + TAG_BYTES:
                raise KEKUnavailable(f"the KEK's PKCS#11 token {self.token_label!r} answered a malformed "
                                     "AES-GCM ciphertext")
            return bytes(params.nonce) + bytes(sealed)

        return self._with_key(op)

    def unwrap(self, wrapped: bytes, aad: bytes) -> bytes:
        if len(wrapped) < NONCE_BYTES + TAG_BYTES:
            raise UnwrapFailed()
        p11 = self._p11
        E = p11.exceptions

        def op(key: Any) -> bytes:
            params = p11.GCMParams(wrapped[:NONCE_BYTES], aad, GCM_TAG_BITS)
            try:
                return bytes(key.decrypt(wrapped[NONCE_BYTES:], mechanism=p11.Mechanism.AES_GCM,
                                         mechanism_param=params))
            except (E.EncryptedDataInvalid, E.EncryptedDataLenRange):
                raise UnwrapFailed() from None
            except (E.GeneralError, E.FunctionFailed, E.DataInvalid, E.DataLenRange):
                if wrapped is not self._probe and self._probe_opens():
                    raise UnwrapFailed() from None  # the token works: this blob is bad
                raise

        return self._with_key(op)

    def _probe_opens(self) -> bool:
        try:
            self.unwrap(self._probe, _PROBE_AAD)
        except (UnwrapFailed, KMSUnavailable):
            return False
        return True

    def close(self) -> None:
        _close_quietly(self._session)
        self._session = self._key = None

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} kek_id={self._kek_id!r} token={self.token_label!r} "
                f"key={self.key_label!r}>")


# ---- the PIN -------------------------------------------------------------------------------
# From a file (0600, owned by the KMS user: read by the worker itself) or an environment variable
# (moved by the supervisor into a sealed memfd that only the workers inherit, as the env
# provider's KEK is). The PIN is never in the config, in HELLO, in argv or in a message.

MAX_PIN_BYTES = 256


def pin_from_bytes(raw: bytes, source: str) -> str:
    """The PIN in ``raw`` (one trailing newline ignored): non-empty UTF-8, at most 256 bytes."""
    pin = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1] if raw.endswith(b"\n") else raw
    if not pin:
        raise KEKError(f"{source}: the PKCS#11 PIN is empty")
    if len(pin) > MAX_PIN_BYTES or b"\n" in pin or b"\0" in pin:
        raise KEKError(f"{source}: expected one line of at most {MAX_PIN_BYTES} bytes holding the PIN")
    try:
        return pin.decode("utf-8")
    except UnicodeDecodeError:
        raise KEKError(f"{source}: the PKCS#11 PIN is not UTF-8") from None


def pin_from_file(path: str | os.PathLike[str]) -> tuple[str, str]:
    """``(pin, source)`` from a PIN file; refused unless private to this user (as a KEK file)."""
    source = f"PIN file {os.fspath(path)!r}"
    return pin_from_bytes(read_private_file(path, source), source), source


def pin_from_env(var: str) -> tuple[str, str]:
    """``(pin, source)`` from ``$var``, which is removed from this process's environment (for the
    offline ``rotate-kek``; a serving KMS reads the supervisor's memfd, :func:`pin_from_fd`)."""
    source = f"environment variable {var!r}"
    raw = os.environb.pop(var.encode(), None)
    if raw is None:
        raise KEKError(f"{source} (kms.kek.pkcs11_pin_env) is not set")
    return pin_from_bytes(raw, source), source


def pin_from_fd(fd: int, source: str) -> tuple[str, str]:
    """``(pin, source)`` from an inherited descriptor (the supervisor's memfd), then close it."""
    try:
        raw = os.pread(fd, MAX_PIN_BYTES + 2, 0)
    except OSError as exc:
        raise KEKError(f"{source}: cannot read the PIN descriptor: {exc.strerror}") from None
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
    return pin_from_bytes(raw, source), source


def open_pkcs11_provider(
    module: str | None, token_label: str | None, key_label: str | None, *,
    pin_file: str | None = None, pin_env: str | None = None, pin_fd: int | None = None,
) -> PKCS11KEKProvider:
    """The provider ``kms.kek`` describes; the PIN from ``pin_fd`` (a serving worker), else the
    file, else the variable. Exactly one PIN source must be configured."""
    if pin_fd is not None and (pin_env is None or pin_file is not None):
        os.close(pin_fd)
        pin_fd = None
    for name, value in (("pkcs11_module", module), ("pkcs11_token_label", token_label),
                        ("pkcs11_key_label", key_label)):
        if not value:
            raise KEKError(f"kms.kek.{name} is required when kms.kek.provider is 'pkcs11'")
    if (pin_file is None) == (pin_env is None):
        raise KEKError("kms.kek: provider 'pkcs11' needs exactly one of pkcs11_pin_file and pkcs11_pin_env")
    if pin_file is not None:
        pin, source = pin_from_file(pin_file)
    elif pin_fd is not None:
        pin, source = pin_from_fd(pin_fd, f"environment variable {pin_env!r}")
    else:
        assert pin_env is not None
        pin, source = pin_from_env(pin_env)
    assert module and token_label and key_label
    return PKCS11KEKProvider(module, token_label, key_label, pin, pin_source=source)


def _close_quietly(session: Any) -> None:
    if session is None:
        return
    try:
        session.close()
    except Exception:  # noqa: BLE001 - the session may be gone with its token; nothing to release
        pass


__all__ = [
    "KEKUnavailable", "PKCS11KEKProvider", "load_binding", "open_pkcs11_provider", "pin_from_bytes",
    "pin_from_env", "pin_from_fd", "pin_from_file",
]
