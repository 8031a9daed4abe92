"""Key-encryption keys (KEKs): the interface and the file and env providers.  KMS process only.

The ``pkcs11`` provider (the KEK inside an HSM) is in :mod:`qpher_proxy.kms.worker.kek_pkcs11`.

Theory of operation
===================

Every key file is sealed under one KEK (see :mod:`qpher_proxy.kms.worker.keyfile`). The KEK itself
is never stored by us: a provider produces it (or keeps it inside an HSM) and offers two
operations, ``wrap`` and ``unwrap``, plus a stable non-secret ``kek_id`` that names it in
every key file header and in the metadata database.

Implementing a provider (cloud KMS, HSM, ...)
---------------------------------------------
Subclass :class:`KEKProvider` and implement:

``kek_id`` (property)
    A stable, non-secret name for *this* key-encryption key, 1..64 ASCII characters, the
    same in every process and on every start (e.g. the cloud key's resource name and version,
    or a fingerprint). Two different KEKs must never share an id: start-up and
    ``rotate-kek`` decide which files to touch by comparing ids.
``wrap(plaintext, aad) -> bytes``
    Authenticated encryption of ``plaintext`` (at most a few hundred bytes: a key seed)
    binding ``aad``; returns an opaque blob that only ``unwrap`` reads. Must use fresh
    randomness per call. A cloud provider typically calls its ``Encrypt`` API with ``aad``
    as the encryption context / additional authenticated data.
``unwrap(wrapped, aad) -> bytes``
    The inverse. Any failure to authenticate (wrong key, altered blob, different aad) raises
    :class:`UnwrapFailed` with no detail. The providers here are local (a key file, the environment),
    so there is no transient failure to report; a provider whose key lives elsewhere raises a
    :class:`~qpher_proxy.errors.KMSUnavailable` (503 ``kms_unavailable``) when it cannot reach it,
    never :class:`UnwrapFailed` (see ``kek_pkcs11.py``).
``close()``
    Release any session or handle. Optional.

Providers are called from the KMS worker's synchronous loop; a remote provider should cache
nothing secret beyond its session and may take milliseconds per call (the KMS caches loaded
private keys, so ``unwrap`` runs once per key version per worker start).

The providers shipped here (``file`` and ``env``) hold 32 random bytes (base64 in their
source) and wrap with AES-256-GCM: ``wrapped = nonce(12 random bytes) || ciphertext || tag``.
Their ``kek_id`` is ``"kek-" + hex(HMAC-SHA256(kek, "qpher-proxy kek id v1"))[:16]``: a
keyed fingerprint, which reveals nothing about the KEK but lets start-up tell a wrong KEK from
a corrupt file.

A wrong KEK stops start-up before anything is written
-----------------------------------------------------
``<kms dir>/kek-check`` holds a *canary*: 32 random bytes wrapped by the current KEK under
a fixed associated data. Start-up (:func:`verify_store_kek`) reads it first: a different
``kek_id`` in its header, or a canary that does not unwrap, stops start-up with a message that
names both KEK ids (never a key byte). A store without a canary but with key files (an old
store, or a lost canary) is checked against one existing key file instead; only then is a
canary written. A store with neither is new, and gets its canary.

``<kms dir>/kek-rotation`` exists only while ``rotate-kek`` runs (it names the old and new
KEK ids); a KMS refuses to start while it is there, because some files may be under either
KEK. Re-running ``rotate-kek`` finishes the job (see :func:`qpher_proxy.kms.worker.kek_rotation.rotate_kek`).

KEK files and variables
-----------------------
A KEK file holds the base64 of 32 random bytes (whitespace ignored), mode 0600 at most: a
file that group or others may read is refused, as is a missing, empty, short, long or
non-base64 one -- each with a one-line message naming the file, never its content.

For ``provider: env`` the gateway never keeps the KEK: before it starts serving, the
supervisor moves the variable's value out of its own environment into a sealed anonymous
memory file (``memfd``) and drops the variable; workers inherit only that descriptor, read the
KEK from it here (:func:`kek_from_fd`), and close it. See ``kms/launcher/supervisor.py``.
"""

from __future__ import annotations

import abc
import base64
import binascii
import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ...errors import ConfigError, QpherError
from .keyfile import write_atomic

KEK_BYTES = 32  # AES-256
NONCE_BYTES = 12  # 96-bit GCM nonce
TAG_BYTES = 16
KEK_ID_LABEL = b"qpher-proxy kek id v1"
CANARY_FILE = "kek-check"
ROTATION_FILE = "kek-rotation"
CANARY_MAGIC = b"QPKC"
CANARY_VERSION = 1
_CANARY_AAD = b"qpher-proxy kek canary v1"


class KEKError(ConfigError):
    """A KEK problem that stops start-up (or ``rotate-kek``) with one clear line."""

    code = "kek_error"


class KEKMismatch(KEKError):
    code = "kek_mismatch"


class UnwrapFailed(QpherError):
    """Authentication failed in ``unwrap``. Deliberately without detail."""

    code = "unwrap_failed"
    status = 500


class KEKProvider(abc.ABC):
    """A key-encryption key: see the module docstring for the contract."""

    @property
    @abc.abstractmethod
    def kek_id(self) -> str: ...

    @abc.abstractmethod
    def wrap(self, plaintext: bytes, aad: bytes) -> bytes: ...

    @abc.abstractmethod
    def unwrap(self, wrapped: bytes, aad: bytes) -> bytes: ...

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release sessions or handles."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} kek_id={self.kek_id!r}>"


class LocalKEKProvider(KEKProvider):
    """A 32-byte KEK held in this (KMS) process; AES-256-GCM with random nonces."""

    def __init__(self, kek: bytes, source: str) -> None:
        if len(kek) != KEK_BYTES:
            raise KEKError(f"{source}: a KEK must be {KEK_BYTES} bytes, not {len(kek)}")
        self._aead = AESGCM(kek)
        self._kek_id = "kek-" + hmac.new(kek, KEK_ID_LABEL, hashlib.sha256).hexdigest()[:16]
        self.source = source  # where it came from, for messages ("file /x/kek.b64")

    @property
    def kek_id(self) -> str:
        return self._kek_id

    def wrap(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext, aad)

    def unwrap(self, wrapped: bytes, aad: bytes) -> bytes:
        if len(wrapped) < NONCE_BYTES + TAG_BYTES:
            raise UnwrapFailed()
        try:
            return self._aead.decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], aad)
        except InvalidTag as exc:
            raise UnwrapFailed() from exc

    def __repr__(self) -> str:
        return f"<{type(self).__name__} kek_id={self._kek_id!r} source={self.source!r}>"


def decode_kek_text(text: bytes, source: str) -> bytes:
    stripped = b"".join(text.split())
    if not stripped:
        raise KEKError(f"{source}: the KEK is empty; expected base64 of {KEK_BYTES} random bytes")
    try:
        kek = base64.b64decode(stripped, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise KEKError(
            f"{source}: the KEK is not valid base64; expected base64 of {KEK_BYTES} random bytes"
        ) from exc
    if len(kek) != KEK_BYTES:
        raise KEKError(f"{source}: the KEK decodes to {len(kek)} bytes; expected {KEK_BYTES}")
    return kek


class FileKEKProvider(LocalKEKProvider):
    """``kms.kek.provider: file``: the base64 KEK in a file of mode 0600 (or stricter)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        source = f"KEK file {str(Path(path))!r}"
        text = read_private_file(path, source, missing_hint=" (create one with `qpher-proxy init`)")
        super().__init__(decode_kek_text(text, source), source)


def read_private_file(path: str | os.PathLike[str], source: str, *, missing_hint: str = "") -> bytes:
    """The first 4 KiB of a secret file (a KEK file, a PKCS#11 PIN file): a regular file owned by
    this user and of mode 0600 or stricter, else a one-line :class:`KEKError` naming ``source``."""
    try:
        fd = os.open(Path(path), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise KEKError(f"{source} does not exist{missing_hint}") from exc
    except OSError as exc:
        raise KEKError(f"{source} cannot be opened: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KEKError(f"{source} is not a regular file")
        if st.st_mode & 0o077:
            raise KEKError(
                f"{source} is readable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
                "run `chmod 600` on it"
            )
        if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
            raise KEKError(f"{source} is owned by uid {st.st_uid}, not by this user ({os.geteuid()})")
        return os.read(fd, 4096)
    finally:
        os.close(fd)


class EnvKEKProvider(LocalKEKProvider):
    """``kms.kek.provider: env``: the base64 KEK in an environment variable.

    Reading it removes the variable from this process's environment. In the product the
    gateway moves it into a memfd before it serves (see the module docstring); this class is
    for the offline ``rotate-kek`` command and tests."""

    def __init__(self, var: str) -> None:
        source = f"environment variable {var!r}"
        raw = os.environb.pop(var.encode(), None)
        if raw is None:
            raise KEKError(f"{source} is not set")
        super().__init__(decode_kek_text(raw, source), source)


def kek_from_fd(fd: int, source: str) -> LocalKEKProvider:
    """Read a base64 KEK from an inherited descriptor (the env provider's memfd), then close it."""
    try:
        text = os.pread(fd, 4096, 0)
    except OSError as exc:
        raise KEKError(f"{source}: cannot read the KEK descriptor: {exc.strerror}") from exc
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
    return LocalKEKProvider(decode_kek_text(text, source), source)


def generate_kek_file(path: str | os.PathLike[str]) -> str:
    """Create a new KEK file (32 random bytes, base64, mode 0600); refuses to overwrite.

    Returns the new KEK's id."""
    p = Path(path)
    if p.exists():
        raise KEKError(f"KEK file {str(p)!r} already exists; refusing to overwrite it")
    kek = secrets.token_bytes(KEK_BYTES)
    write_atomic(p, base64.b64encode(kek) + b"\n", mode=0o600)
    return LocalKEKProvider(kek, "new KEK").kek_id


# ---- the canary ----------------------------------------------------------------------------


def seal_canary(provider: KEKProvider) -> bytes:
    kid = provider.kek_id.encode("ascii")
    header = CANARY_MAGIC + bytes([CANARY_VERSION, len(kid)]) + kid
    return header + provider.wrap(secrets.token_bytes(32), _CANARY_AAD + header)


def canary_kek_id(data: bytes) -> str:
    if len(data) < 6 or data[:4] != CANARY_MAGIC or data[4] != CANARY_VERSION or len(data) < 6 + data[5]:
        raise KEKError("the KEK check file is malformed; restore it from backup or remove it to re-create it")
    return data[6 : 6 + data[5]].decode("ascii", "replace")


def verify_canary(provider: KEKProvider, data: bytes) -> None:
    """Raise :class:`KEKMismatch` unless ``data`` is a canary sealed by ``provider``."""
    stored = canary_kek_id(data)
    if stored != provider.kek_id:
        raise KEKMismatch(
            f"the configured KEK (id {provider.kek_id!r}) is not the KEK of this key store "
            f"(id {stored!r}); nothing was written"
        )
    header_len = 6 + data[5]
    try:
        provider.unwrap(data[header_len:], _CANARY_AAD + data[:header_len])
    except UnwrapFailed as exc:
        raise KEKMismatch(
            f"the configured KEK (id {provider.kek_id!r}) does not open the key store's KEK check file; "
            "nothing was written"
        ) from exc
