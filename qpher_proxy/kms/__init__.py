"""The KMS: the only process that holds private keys and the KEK.

Gateway side (may be imported by the gateway):
    ``client``      KMSClient: async calls over the worker socketpairs
    ``supervisor``  KMSSupervisor / open_kms: starts, watches and restarts the worker processes
    ``protocol``    the sans-I/O framed wire protocol (shared)
    ``model``       key metadata records and states (shared)

KMS side only (never imported by the gateway; enforced by ``.importlinter``):
    ``service``, ``keystore``, ``keyfile``, ``kek``, ``admin``, ``__main__``

The names below are re-exported lazily, so that ``import qpher_proxy.kms.service`` in a worker
does not pull in trio, and importing this package from the gateway pulls in nothing KMS-only.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "KMSClient": "client",
    "KMSSupervisor": "supervisor",
    "open_kms": "supervisor",
    "default_worker_count": "supervisor",
    "KEKSettings": "model",
    "KeyInfo": "model",
    "KeyPage": "model",
    "KeyState": "model",
    "VersionInfo": "model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{module}", __name__), name)
