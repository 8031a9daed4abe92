"""The KMS: the only processes that hold private keys and the KEK.  One folder per side:

``wire/``      the framed protocol and key model (sans-I/O; shared by both sides)
``client/``    the gateway's side: :class:`KMSClient` over the worker socketpairs
``launcher/``  spawning and bootstrapping workers: :class:`KMSSupervisor`, :func:`open_kms`
``worker/``    KMS side only: service, key store, key files, KEK providers, crypto backends

Nothing outside ``worker/`` imports it (``.importlinter``); a worker is started as
``python -m qpher_proxy.kms.worker``.

The names below are re-exported lazily, so that a worker importing ``qpher_proxy.kms.worker``
does not pull in trio, and importing this package from the gateway pulls in nothing KMS-only.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "KMSClient": "client",
    "KMSSupervisor": "launcher",
    "open_kms": "launcher",
    "default_worker_count": "launcher",
    "KEKSettings": "wire.model",
    "KeyInfo": "wire.model",
    "KeyPage": "wire.model",
    "KeyState": "wire.model",
    "VersionInfo": "wire.model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{module}", __name__), name)
