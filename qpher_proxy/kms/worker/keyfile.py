"""Key files: one private key version per file, sealed under the KEK.  KMS process only.

Theory of operation
===================

Where keys live
---------------
Every private key version is its own file under ``<kms dir>/keys/``::

    keys/<tenant slot>/<key id>/v<version>.qkey
    tenant slot = "t" + first 32 hex digits of SHA-256(tenant id)

The slot is derived, so a tenant id never becomes a path component (no traversal, no
case-folding surprises), and the metadata database stores this *relative* path as the key's
handle -- never key bytes. Directories are 0700 and files 0600, created so from the start
(``os.open`` with the mode, under a umask we do not trust).

What a file holds
-----------------
::

    offset  size  field
    0       4     magic  b"QPKF"
    4       1     format version (1)
    5       1     n = length of the KEK id (1..64)
    6       n     KEK id, ASCII: which KEK wraps this file (non-secret fingerprint)
    6+n     rest  wrapped = KEKProvider.wrap(seed, aad)
                  for the file and env providers: nonce (12 random bytes) || AES-256-GCM(seed) || tag (16)

    aad = b"QPKF" || version || n || KEK id
          || u16 len || tenant id || u8 len || key id || u32 key version || u8 len || algorithm

``seed`` is the private key in its standard seed form (FIPS 203 d||z, FIPS 204 xi, X-Wing
seed, composite seed||SEC1 DER), never an expanded key. Everything that says *which* key
this is -- tenant, key id, version, algorithm -- is in the associated data and nowhere in
the file in clear, so the file only opens in the slot it was written for: a file copied to
another tenant's or another key's slot, or relabelled with another version or algorithm,
fails authentication exactly like a file with one flipped bit. The header (format version,
KEK id) is bound too, so it cannot be edited to steer the reader.

Each seal uses a fresh random 96-bit nonce. A KEK seals one file per key version plus
re-wraps; at 2**32 seals the random-nonce collision bound for GCM would start to matter,
which is far beyond any key store this serves.

Failure is per key
------------------
Reading a key file raises, for that key version only:

- :class:`~qpher_proxy.errors.KeyUnavailable` (503) -- the file is missing or unreadable,
  or it is wrapped by a KEK other than the one loaded (a half-finished ``rotate-kek``);
- :class:`~qpher_proxy.errors.KeyCorrupt` (500) -- wrong magic, unknown format version,
  truncated, or authentication failed (altered, moved, or relabelled).

Neither message carries key bytes or the KEK. The service turns them into an error frame
for the one request; every other key keeps working.

Writing is atomic
-----------------
:func:`write_atomic`: write a temporary file in the same directory (``O_EXCL``, 0600),
``fsync`` it, ``rename`` it over the final name, ``fsync`` the directory. A crash leaves
either the old file, the new file, or a stray temporary (swept on the next exclusive start),
never a torn key file. The key store writes a key file *before* committing the metadata that
points at it, so metadata never names a file that does not exist; a crash in between leaves
an orphan file that nothing references, which cannot be used and is removed by the sweep.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import KeyCorrupt, KeyUnavailable

if TYPE_CHECKING:  # pragma: no cover
    from .kek import KEKProvider

MAGIC = b"QPKF"
FORMAT_VERSION = 1
MAX_KEK_ID = 64
MAX_KEY_FILE_BYTES = 64 * 1024  # the largest seed is 83 bytes; anything this big is not ours
KEY_FILE_SUFFIX = ".qkey"
TMP_MARKER = ".tmp-"
FILE_MODE = 0o600
DIR_MODE = 0o700

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


@dataclass(frozen=True, slots=True)
class KeyBinding:
    """Which key a file belongs to: all of it goes into the AEAD associated data."""

    tenant_id: str
    key_id: str
    version: int
    algorithm: str

    def aad(self, kek_id: str) -> bytes:
        t = self.tenant_id.encode()
        k = self.key_id.encode()
        a = self.algorithm.encode()
        return b"".join(
            (
                _header(kek_id),
                _U16.pack(len(t)), t,
                bytes([len(k)]), k,
                _U32.pack(self.version),
                bytes([len(a)]), a,
            )
        )

    def describe(self) -> str:
        """For error messages: no secret, no tenant id (tenants are not told about each other)."""
        return f"key {self.key_id!r} version {self.version}"


@dataclass(frozen=True, slots=True)
class KeyFileHeader:
    format_version: int
    kek_id: str
    body_offset: int


def _header(kek_id: str) -> bytes:
    kb = kek_id.encode("ascii")
    if not 0 < len(kb) <= MAX_KEK_ID:
        raise ValueError(f"kek id must be 1..{MAX_KEK_ID} ASCII characters")
    return MAGIC + bytes([FORMAT_VERSION, len(kb)]) + kb


def tenant_slot(tenant_id: str) -> str:
    return "t" + hashlib.sha256(tenant_id.encode()).hexdigest()[:32]


def relative_path(binding: KeyBinding) -> str:
    """The handle stored in the metadata database (relative to the KMS directory)."""
    return f"keys/{tenant_slot(binding.tenant_id)}/{binding.key_id}/v{binding.version}{KEY_FILE_SUFFIX}"


def seal(provider: KEKProvider, binding: KeyBinding, seed: bytes) -> bytes:
    """The bytes of a key file holding ``seed`` for ``binding`` under ``provider``'s KEK."""
    kek_id = provider.kek_id
    return _header(kek_id) + provider.wrap(seed, binding.aad(kek_id))


def parse_header(data: bytes, what: str) -> KeyFileHeader:
    if len(data) < 6 or data[:4] != MAGIC:
        raise KeyCorrupt(f"{what}: not a key file (bad magic)")
    if data[4] != FORMAT_VERSION:
        raise KeyCorrupt(f"{what}: unknown key file format version {data[4]}")
    n = data[5]
    if not 0 < n <= MAX_KEK_ID or len(data) < 6 + n:
        raise KeyCorrupt(f"{what}: truncated key file header")
    try:
        kek_id = data[6 : 6 + n].decode("ascii")
    except UnicodeDecodeError as exc:
        raise KeyCorrupt(f"{what}: malformed KEK id in the key file header") from exc
    return KeyFileHeader(FORMAT_VERSION, kek_id, 6 + n)


def unseal(provider: KEKProvider, binding: KeyBinding, data: bytes) -> bytes:
    """The seed in ``data``, or :class:`KeyCorrupt` / :class:`KeyUnavailable` for this key alone."""
    what = binding.describe()
    header = parse_header(data, what)
    if header.kek_id != provider.kek_id:
        raise KeyUnavailable(
            f"{what}: the key file is wrapped by KEK {header.kek_id!r}, not the loaded KEK "
            f"{provider.kek_id!r} (finish `qpher-proxy kms rotate-kek`)"
        )
    from .kek import UnwrapFailed

    try:
        return provider.unwrap(data[header.body_offset :], binding.aad(header.kek_id))
    except UnwrapFailed as exc:
        raise KeyCorrupt(
            f"{what}: the key file failed authentication (altered, or moved from another key's slot)"
        ) from exc


def read_key_file(path: Path, what: str) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise KeyUnavailable(f"{what}: the key file is missing") from exc
    except OSError as exc:
        raise KeyUnavailable(
            f"{what}: the key file cannot be opened ({errno.errorcode.get(exc.errno or 0, 'error')})"
        ) from exc
    try:
        data = os.read(fd, MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise KeyUnavailable(f"{what}: the key file cannot be read") from exc
    finally:
        os.close(fd)
    if len(data) > MAX_KEY_FILE_BYTES:
        raise KeyCorrupt(f"{what}: the key file is too large to be a key file")
    return data


# ---- atomic files ------------------------------------------------------------------------


def ensure_dir(path: Path) -> None:
    """Create ``path`` and missing parents with mode 0700 (not subject to the umask)."""
    missing: list[Path] = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, DIR_MODE)
        except FileExistsError:
            pass
        os.chmod(d, DIR_MODE)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = FILE_MODE) -> None:
    """Write ``data`` to ``path`` atomically: temp file, fsync, rename, fsync the directory."""
    ensure_dir(path.parent)
    tmp = path.with_name(f".{path.name}{TMP_MARKER}{secrets.token_hex(8)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        try:
            os.fchmod(fd, mode)  # in case of an odd umask
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def remove_file(path: Path) -> bool:
    """Unlink ``path`` and fsync its directory; ``False`` if it was already gone."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    fsync_dir(path.parent)
    return True
