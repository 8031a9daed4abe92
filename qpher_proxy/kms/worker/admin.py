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


def load_pkcs11_binding() -> None:
    """Import python-pkcs11 now (before the command drops to the KMS user)."""
    from .kek_pkcs11 import load_binding

    load_binding()


def provider_from_settings(kek: KEKSettings) -> KEKProvider:
    """The KEK provider that ``kms.kek`` names (the env provider pops the variable, as does the
    pkcs11 provider its PIN variable)."""
    if kek.provider == "file":
        if not kek.file:
            raise KEKError("kms.kek.file is not set")
        return FileKEKProvider(kek.file)
    if kek.provider == "env":
        return EnvKEKProvider(kek.env)
    if kek.provider == "pkcs11":
        from .kek_pkcs11 import open_pkcs11_provider

        return open_pkcs11_provider(
            kek.pkcs11_module, kek.pkcs11_token_label, kek.pkcs11_key_label,
            pin_file=kek.pkcs11_pin_file, pin_env=kek.pkcs11_pin_env,
        )
    raise KEKError(f"unknown KEK provider {kek.provider!r}; expected 'file', 'env' or 'pkcs11'")


def rotate_kek_command(
    kms_dir: str | os.PathLike[str],
    current: KEKSettings,
    new_kek: str | os.PathLike[str] | KEKSettings,
    *,
    generate: bool = False,
    progress: Callable[[int, int], None] | None = None,
    dsn: str | None = None,
    connect_timeout: float = 5.0,
) -> tuple[RotationResult, str, str]:
    """``qpher-proxy kms rotate-kek``: re-wrap every key file under a new KEK: the one in the
    file ``new_kek``, or the one ``new_kek`` describes as settings (any provider: a pkcs11 key
    in a token, a file, a variable).

    With ``generate`` a new KEK file is created first if missing. Safe to interrupt and re-run
    with the same arguments. Returns ``(result, old_kek_id, new_kek_id)``; afterwards point
    ``kms.kek`` at the new KEK (for the file provider: replace the file or change the path).
    The KMS must be stopped (the key store lock is checked). With ``dsn`` (storage.backend
    postgresql) the sealed versions in that database are re-wrapped instead, in one transaction,
    with every node stopped (their connections are checked)."""
    if not isinstance(new_kek, KEKSettings):
        if generate and not Path(new_kek).exists():
            generate_kek_file(new_kek)
        new_kek = KEKSettings("file", os.fspath(new_kek))
    elif generate:
        if new_kek.provider != "file" or not new_kek.file:
            raise KEKError("--generate makes a KEK file; the new KEK is not a file")
        if not Path(new_kek.file).exists():
            generate_kek_file(new_kek.file)
    new = provider_from_settings(new_kek)
    try:
        old = provider_from_settings(current)
        try:
            if dsn is not None:
                result = rotate_kek_postgresql(dsn, old, new, connect_timeout=connect_timeout,
                                               on_progress=progress)
            else:
                result = rotate_kek(kms_dir, old, new, on_progress=progress)
            return result, old.kek_id, new.kek_id
        finally:
            old.close()
    finally:
        new.close()


__all__ = ["ensure_kek_file", "load_pkcs11_binding", "provider_from_settings", "rotate_kek_command"]
