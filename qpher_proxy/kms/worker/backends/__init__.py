"""Crypto backends: choose one, get key objects from it.

``select_backend("auto" | "openssl" | "liboqs")`` returns a :class:`Backend`
(``qpher_proxy.crypto.interface``). ``auto`` takes liboqs when its shared library is
present and it supports every algorithm of the table, else OpenSSL, and says which and
why in one log line on the ``qpher.crypto`` logger. Asking for ``liboqs`` when it is
absent raises :class:`BackendUnavailable` naming what is missing.

KMS side only: these modules hold private keys. The gateway process imports
``qpher_proxy.crypto.algorithms`` (and ``hpke``), never this package; the offline
``qpher-proxy version`` command loads it lazily to report on it.
"""

from __future__ import annotations

import logging
import threading

from ....crypto.algorithms import ALGORITHMS
from ....crypto.interface import Backend
from ....errors import BackendUnavailable, ConfigError
from ._probe import probe_liboqs

__all__ = [
    "BACKEND_NAMES",
    "BackendUnavailable",
    "available_backends",
    "liboqs_status",
    "probe_liboqs",
    "select_backend",
]

logger = logging.getLogger("qpher.crypto")

BACKEND_NAMES = ("auto", "openssl", "liboqs")

_instances: dict[str, Backend] = {}
_lock = threading.Lock()


def liboqs_status() -> tuple[bool, str]:
    """``(present, reason)``: the version and library path, or what is missing."""
    probe = probe_liboqs()
    return probe.present, probe.reason


def available_backends() -> list[str]:
    names = ["openssl"]
    if probe_liboqs().present:
        names.append("liboqs")
    return names


def _openssl() -> Backend:
    with _lock:
        backend = _instances.get("openssl")
        if backend is None:
            from .openssl import OpenSSLBackend

            backend = _instances["openssl"] = OpenSSLBackend()
    return backend


def _liboqs() -> Backend:
    with _lock:
        backend = _instances.get("liboqs")
        if backend is None:
            probe = probe_liboqs()
            if not probe.present:
                raise BackendUnavailable(probe.reason)
            from .liboqs import LiboqsBackend

            backend = _instances["liboqs"] = LiboqsBackend(probe)
    return backend


def select_backend(name: str = "auto") -> Backend:
    """The configured backend (``crypto.backend`` in the config). Logs one line."""
    if name == "openssl":
        backend = _openssl()
        logger.info("crypto backend: openssl (configured), %s", _describe(backend))
        return backend
    if name == "liboqs":
        backend = _liboqs()
        missing = [a for a in ALGORITHMS if not backend.supports(ALGORITHMS[a])]
        if missing:
            reasons = getattr(backend, "unsupported", {})
            raise BackendUnavailable(
                f"liboqs backend lacks {', '.join(missing)}: {reasons.get(missing[0], 'unsupported')}"
            )
        logger.info("crypto backend: liboqs (configured), %s", _describe(backend))
        return backend
    if name == "auto":
        present, reason = liboqs_status()
        if present:
            try:
                backend = _liboqs()
            except BackendUnavailable as exc:
                why = exc.message
            else:
                missing = [a for a in ALGORITHMS if not backend.supports(ALGORITHMS[a])]
                if not missing:
                    logger.info("crypto backend: liboqs (auto: %s), %s", reason, _describe(backend))
                    return backend
                why = f"liboqs found but lacks {', '.join(missing)}"
        else:
            why = reason
        backend = _openssl()
        logger.info("crypto backend: openssl (auto: %s), %s", why, _describe(backend))
        return backend
    shown = name if not isinstance(name, str) or len(name) <= 40 else name[:40] + "..."
    raise ConfigError(f"crypto.backend must be one of {list(BACKEND_NAMES)}, not {shown!r}")


def _describe(backend: Backend) -> str:
    return ", ".join(
        f"{k} {v}" for k, v in backend.versions().items() if k not in ("backend", "liboqs-library")
    )
