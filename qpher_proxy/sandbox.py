"""Process confinement shared by the gateway and the KMS workers: privilege drop and Landlock.

Theory of operation
===================

The architecture promises that the gateway process cannot read key material: not the KEK, not
the KMS's sealed key files, not the dev CA's private key. Two mechanisms make that true, and
the gateway uses whichever the way it was started allows (both when it can):

* **Separate uids** (started as root). The supervisor execs each child as root -- the Python
  interpreter may live where only root can read it -- and the child drops to its own system
  user (``server.user`` for the gateway, ``kms.user`` for KMS workers) as soon as it holds
  what needs root: bound ports for the gateway, nothing for a worker. Everything a child
  imports after the drop must be readable by that user, so :func:`preload` imports the
  modules it will need before :func:`drop_privileges`. The kernel clears every capability on
  the uid change; a later ``setuid(0)`` fails, and :func:`drop_privileges` checks that it does.

* **Landlock** (any uid, root included). The gateway restricts itself to an allow-list of
  paths: read access beneath the interpreter, its libraries and the system directories, to the
  certificate and policy files its config names, and read-write access beneath the audit and
  database directories. Whatever is not listed -- the KMS directory, the KEK file, the CA key
  -- is out of reach (``EACCES``), for the process and for every child it could ever start
  (Landlock domains are inherited, which is why only the supervisor spawns KMS workers).
  :func:`landlock_restrict` refuses an allow-list that would cover a protected path, so a
  layout that mixes gateway and KMS files fails closed at start-up instead of silently
  granting the KMS directory. Where the kernel lacks Landlock, the caller logs one warning
  saying that the isolation is by convention only.

Nothing here reads a secret; the functions take paths and ids only.
"""

from __future__ import annotations

import ctypes
import errno
import importlib
import os
import pkgutil
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import ConfigError

# --- Landlock ABI (linux/landlock.h) --------------------------------------------------------
_SYS_LANDLOCK_CREATE_RULESET = 444  # the same number on every architecture (asm-generic)
_SYS_LANDLOCK_ADD_RULE = 445
_SYS_LANDLOCK_RESTRICT_SELF = 446
_LANDLOCK_CREATE_RULESET_VERSION = 1 << 0
_LANDLOCK_RULE_PATH_BENEATH = 1

FS_EXECUTE = 1 << 0
FS_WRITE_FILE = 1 << 1
FS_READ_FILE = 1 << 2
FS_READ_DIR = 1 << 3
FS_REMOVE_DIR = 1 << 4
FS_REMOVE_FILE = 1 << 5
FS_MAKE_CHAR = 1 << 6
FS_MAKE_DIR = 1 << 7
FS_MAKE_REG = 1 << 8
FS_MAKE_SOCK = 1 << 9
FS_MAKE_FIFO = 1 << 10
FS_MAKE_BLOCK = 1 << 11
FS_MAKE_SYM = 1 << 12
FS_REFER = 1 << 13  # ABI 2
FS_TRUNCATE = 1 << 14  # ABI 3
FS_IOCTL_DEV = 1 << 15  # ABI 5

_FS_ABI1 = (1 << 13) - 1
_FS_BY_ABI = {1: _FS_ABI1, 2: _FS_ABI1 | FS_REFER, 3: _FS_ABI1 | FS_REFER | FS_TRUNCATE,
              4: _FS_ABI1 | FS_REFER | FS_TRUNCATE}
_FS_LATEST = _FS_ABI1 | FS_REFER | FS_TRUNCATE | FS_IOCTL_DEV
_FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV

READ = FS_READ_FILE | FS_READ_DIR
READ_WRITE = READ | FS_WRITE_FILE | FS_MAKE_REG | FS_REMOVE_FILE | FS_TRUNCATE | FS_MAKE_DIR | FS_REMOVE_DIR

_PR_SET_NO_NEW_PRIVS = 38


class _RulesetAttr(ctypes.Structure):
    # Only the first field: its size (8) is accepted by every Landlock ABI, and the gateway
    # restricts the filesystem only (network and scope rights stay unhandled, i.e. allowed).
    _fields_ = [("handled_access_fs", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


_LIBC: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL:
    # The C library already loaded into this process (no file lookup: after Landlock or a uid
    # change, ctypes.util.find_library could not run its helpers).
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, or 0 when it has none (or it is disabled)."""
    try:
        libc = _libc()
    except OSError:
        return 0
    abi = libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0),
                       ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION))
    return abi if abi > 0 else 0


@dataclass(frozen=True, slots=True)
class Grant:
    """One allow-list entry: ``access`` (``READ``, ``READ_WRITE``) beneath ``path``."""

    path: str
    access: int


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def plan_grants(grants: Iterable[Grant], protected: Iterable[str]) -> list[Grant]:
    """Resolve and check an allow-list: paths that do not exist are dropped, and a grant that
    covers a protected path (or lies inside one) raises :class:`ConfigError` naming both."""
    prot = [os.path.realpath(p) for p in protected if p]
    out: list[Grant] = []
    for g in grants:
        real = os.path.realpath(g.path)
        if not os.path.exists(real):
            continue
        for p in prot:
            if _inside(p, real) or _inside(real, p):
                raise ConfigError(
                    f"cannot confine the gateway: {g.path} would give it access to {p}; keep the "
                    "KMS directory and the KEK file outside the gateway's directories")
        out.append(Grant(real, g.access))
    return out


def landlock_restrict(grants: Iterable[Grant]) -> int:
    """Restrict this process (and its future children) to ``grants``; returns the ABI used.

    Raises :class:`OSError` when the kernel refuses. Call :func:`plan_grants` first."""
    abi = landlock_abi()
    if abi <= 0:
        raise OSError(errno.EOPNOTSUPP, "Landlock is not available")
    handled = _FS_BY_ABI.get(abi, _FS_LATEST)
    libc = _libc()
    attr = _RulesetAttr(handled)
    ruleset = libc.syscall(
        _SYS_LANDLOCK_CREATE_RULESET,
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
        ctypes.c_uint32(0),
    )
    if ruleset < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"landlock_create_ruleset: {os.strerror(err)}")
    try:
        for g in grants:
            fd = os.open(g.path, os.O_PATH | os.O_CLOEXEC)
            try:
                access = g.access & handled
                if not os.path.isdir(g.path):
                    access &= _FILE_RIGHTS
                if not access:
                    continue
                rule = _PathBeneathAttr(access, fd)
                if libc.syscall(_SYS_LANDLOCK_ADD_RULE, ruleset, _LANDLOCK_RULE_PATH_BENEATH,
                                ctypes.byref(rule), ctypes.c_uint32(0)) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"landlock_add_rule({g.path!r}): {os.strerror(err)}")
            finally:
                os.close(fd)
        set_no_new_privs()
        if libc.syscall(_SYS_LANDLOCK_RESTRICT_SELF, ruleset, ctypes.c_uint32(0)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"landlock_restrict_self: {os.strerror(err)}")
    finally:
        os.close(ruleset)
    return abi


def set_no_new_privs() -> None:
    if _libc().prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"PR_SET_NO_NEW_PRIVS: {os.strerror(err)}")


# --- users ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunAs:
    """A system user a child drops to: its name (for messages) and ids."""

    name: str
    uid: int
    gid: int

    def arg(self) -> str:
        return f"{self.uid}:{self.gid}"

    @classmethod
    def from_arg(cls, text: str) -> RunAs:
        uid, _, gid = text.partition(":")
        return cls(text, int(uid), int(gid))


def lookup_user(name: str, option: str) -> RunAs:
    """``name`` as a :class:`RunAs`; a missing user is a one-line :class:`ConfigError`."""
    import pwd

    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise ConfigError(
            f"{option}: user {name!r} does not exist (run `qpher-proxy init` as root to create it, "
            f"or set {option}: null to keep this process's user)") from None
    if pw.pw_uid == 0:
        raise ConfigError(f"{option}: user {name!r} is root; name an unprivileged system user")
    return RunAs(name, pw.pw_uid, pw.pw_gid)


CAP_IPC_LOCK = 14
_PR_SET_KEEPCAPS = 8
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _keep_only(caps: tuple[int, ...]) -> bool:
    """After a uid change under PR_SET_KEEPCAPS: make ``caps`` (numbers below 32) the only
    permitted and effective capabilities. Returns False where the kernel refuses."""
    mask = 0
    for cap in caps:
        mask |= 1 << cap
    data = (_CapData * 2)(_CapData(mask, mask, 0), _CapData(0, 0, 0))
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    result: int = _libc().capset(ctypes.byref(header), data)
    return result == 0


def drop_privileges(user: RunAs, keep: tuple[int, ...] = ()) -> None:
    """Become ``user`` for good: no supplementary groups, real/effective/saved ids all changed,
    and a check that root cannot be regained. ``keep``: capabilities to retain (the KMS keeps
    ``CAP_IPC_LOCK`` so that it can lock its memory); best effort, never anything that could
    undo the drop."""
    if any(cap != CAP_IPC_LOCK for cap in keep):
        raise ValueError("only CAP_IPC_LOCK may be kept")
    libc = _libc()
    if keep:
        libc.prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0)
    os.setgroups([])
    os.setresgid(user.gid, user.gid, user.gid)
    os.setresuid(user.uid, user.uid, user.uid)
    if keep:
        libc.prctl(_PR_SET_KEEPCAPS, 0, 0, 0, 0)
        if not _keep_only(keep):
            _keep_only(())
    if os.getresuid() != (user.uid,) * 3 or os.getresgid() != (user.gid,) * 3:
        raise OSError(errno.EPERM, "the uid change did not take")
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise OSError(errno.EPERM, "root could be regained after dropping privileges")


def preload(packages: Iterable[str], skip: Iterable[str] = ()) -> None:
    """Import every module of ``packages`` (except those under ``skip``) now, while their files
    are readable: after a uid change or Landlock, a lazy import could not read them.

    A skipped package is not imported at all, not even its ``__init__`` to list what is in it
    (``pkgutil.walk_packages`` would): the gateway skips ``qpher_proxy.kms.worker`` and a worker
    skips the gateway side of the KMS, and neither may load a line of the other."""
    skipped = tuple(skip)
    for name in packages:
        mod = importlib.import_module(name)
        path = getattr(mod, "__path__", None)
        if path is not None:
            _preload_tree(path, name + ".", skipped)


def _preload_tree(path: Iterable[str], prefix: str, skipped: tuple[str, ...]) -> None:
    for info in pkgutil.iter_modules(path, prefix):
        if info.name.startswith(skipped) or info.name.endswith(".__main__"):
            continue
        mod = importlib.import_module(info.name)
        if info.ispkg:
            _preload_tree(mod.__path__, info.name + ".", skipped)


__all__ = [
    "CAP_IPC_LOCK", "READ", "READ_WRITE", "Grant", "RunAs", "drop_privileges", "landlock_abi",
    "landlock_restrict", "lookup_user", "plan_grants", "preload", "set_no_new_privs",
]
