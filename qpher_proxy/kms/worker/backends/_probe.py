"""Find the liboqs shared library *without* importing ``oqs``.

Why this exists: ``import oqs`` (liboqs-python 0.16) looks for ``liboqs`` and, when it
finds none, starts ``git clone`` + ``cmake`` of liboqs into ``$OQS_INSTALL_PATH`` (or
``~/_oqs``) and raises ``SystemExit`` if that fails. A gateway must never do that at
start-up, so we look for the library first, in exactly the places and the order
liboqs-python's own loader uses, and import ``oqs`` only when one of them actually
loads with ``ctypes``:

1. ``ctypes.util.find_library("liboqs")`` and ``find_library("oqs")`` (the system
   library path: ldconfig cache, ``LD_LIBRARY_PATH``, ...);
2. ``$OQS_INSTALL_PATH/lib/liboqs.so`` and ``$OQS_INSTALL_PATH/lib64/liboqs.so``, where
   ``OQS_INSTALL_PATH`` defaults to ``~/_oqs`` as in liboqs-python.

If the probe loads a library, liboqs-python's loader (same candidates, same order)
loads that same library, so the install branch is unreachable on our import path.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os
import platform
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class LiboqsProbe:
    present: bool
    reason: str  # the version and path when present; what is missing otherwise
    library: str | None = None
    liboqs_version: str | None = None
    python_version: str | None = None


_cache: dict[tuple[str | None, str], LiboqsProbe] = {}


def _suffix() -> str:
    return ".dylib" if platform.system() == "Darwin" else ".so"


def _candidates(install_dir: Path) -> list[str]:
    found: list[str] = []
    for name in ("liboqs", "oqs"):  # liboqs-python inserts both at the front, "liboqs" first
        try:
            lib = ctypes.util.find_library(name)
        except Exception:  # noqa: BLE001 - find_library may run helpers that fail
            lib = None
        if lib:
            found.append(lib)
    for sub in ("lib", "lib64"):
        found.append(str(install_dir.absolute() / sub / f"liboqs{_suffix()}"))
    return found


def _library_version(lib: ctypes.CDLL) -> str | None:
    try:
        fn = lib.OQS_version
    except AttributeError:
        return None
    fn.restype = ctypes.c_char_p
    value = fn()
    return value.decode("ascii", "replace") if value else None


def probe_liboqs(*, refresh: bool = False) -> LiboqsProbe:
    """Is liboqs usable here? Cached per (``OQS_INSTALL_PATH``, home directory)."""
    env = os.environ.get("OQS_INSTALL_PATH")
    key = (env, str(Path.home()))
    if not refresh and key in _cache:
        return _cache[key]
    result = _probe(env)
    _cache[key] = result
    return result


def _probe(env: str | None) -> LiboqsProbe:
    if platform.system() == "Windows":
        return LiboqsProbe(False, "liboqs backend is not supported on Windows")
    if importlib.util.find_spec("oqs") is None:
        return LiboqsProbe(False, "liboqs-python is not installed")
    try:
        python_version = importlib.metadata.version("liboqs-python")
    except importlib.metadata.PackageNotFoundError:
        python_version = None
    install_dir = Path(env) if env is not None else Path.home() / "_oqs"  # as liboqs-python does
    for candidate in _candidates(install_dir):
        try:
            lib = ctypes.CDLL(candidate)
        except OSError:
            continue
        version = _library_version(lib)
        if version is None:
            continue
        return LiboqsProbe(
            True,
            f"liboqs {version} at {candidate} (liboqs-python {python_version})",
            library=candidate,
            liboqs_version=version,
            python_version=python_version,
        )
    if env is not None:
        where = f"OQS_INSTALL_PATH={env} has no lib/liboqs{_suffix()} or lib64/liboqs{_suffix()}"
    else:
        where = f"OQS_INSTALL_PATH unset, no {install_dir}/lib/liboqs{_suffix()}"
    return LiboqsProbe(
        False,
        f"liboqs shared library not found ({where}, no liboqs in the system library path)",
        python_version=python_version,
    )
