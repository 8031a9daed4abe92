"""Offline KMS administration for the CLI (``init``, ``kms rotate-kek``).  KMS side.

The CLI imports this module lazily, inside the one command that needs it; the serving
gateway never does (``.importlinter``). Each function takes plain values, not the config
object, and returns what the CLI prints.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from ..wire.model import KEKSettings
from .kek import EnvKEKProvider, FileKEKProvider, KEKError, KEKProvider, generate_kek_file
from .kek_rotation import RotationResult, rotate_kek, rotate_kek_postgresql


def ensure_kek_file(path: str | os.PathLike[str]) -> str | None:
    """For ``init``: create the KEK file if it does not exist. Returns the new KEK id, or
    ``None`` if a file was already there (it is never overwritten)."""
    if Path(path).exists():
        return None
    return generate_kek_file(path)


def provider_from_settings(kek: KEKSettings) -> KEKProvider:
    """The KEK provider that ``kms.kek`` names (the env provider pops the variable)."""
    if kek.provider == "file":
        if not kek.file:
            raise KEKError("kms.kek.file is not set")
        return FileKEKProvider(kek.file)
    if kek.provider == "env":
        return EnvKEKProvider(kek.env)
    raise KEKError(f"unknown KEK provider {kek.provider!r}; expected 'file' or 'env'")


def rotate_kek_command(
    kms_dir: str | os.PathLike[str],
    current: KEKSettings,
    new_kek_file: str | os.PathLike[str],
    *,
    generate: bool = False,
    progress: Callable[[int, int], None] | None = None,
    dsn: str | None = None,
    connect_timeout: float = 5.0,
) -> tuple[RotationResult, str, str]:
    """``qpher-proxy kms rotate-kek``: re-wrap every key file under the KEK in ``new_kek_file``.

    With ``generate`` the new KEK file is created first if missing. Safe to interrupt and re-run
    with the same arguments. Returns ``(result, old_kek_id, new_kek_id)``; afterwards point
    ``kms.kek`` at the new KEK (for the file provider: replace the file or change the path).
    The KMS must be stopped (the key store lock is checked). With ``dsn`` (storage.backend
    postgresql) the sealed versions in that database are re-wrapped instead, in one transaction,
    with every node stopped (their connections are checked)."""
    if generate and not Path(new_kek_file).exists():
        generate_kek_file(new_kek_file)
    new = FileKEKProvider(new_kek_file)
    old = provider_from_settings(current)
    if dsn is not None:
        result = rotate_kek_postgresql(dsn, old, new, connect_timeout=connect_timeout, on_progress=progress)
    else:
        result = rotate_kek(kms_dir, old, new, on_progress=progress)
    return result, old.kek_id, new.kek_id


__all__ = ["ensure_kek_file", "provider_from_settings", "rotate_kek_command"]
