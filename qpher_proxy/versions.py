"""``qpher-proxy version``: the product, its crypto backend and the exact library versions."""

from __future__ import annotations

import platform
from importlib import metadata

from . import __version__


def _pkg(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def collect_versions(backend: str = "auto") -> dict[str, str]:
    # The CLI may load a backend to report on it; the gateway learns the same facts from
    # the KMS's READY frame instead (it never imports the backends).
    from .kms.worker.backends import liboqs_status, select_backend

    out = {
        "qpher-proxy": __version__,
        "python": platform.python_version(),
        "trio": _pkg("trio"),
        "h11": _pkg("h11"),
        "pyopenssl": _pkg("pyopenssl"),
        "cryptography": _pkg("cryptography"),
        "liboqs-python": _pkg("liboqs-python"),
    }
    present, why = liboqs_status()
    out["liboqs"] = why if present else f"absent ({why})"
    chosen = select_backend(backend)
    out["crypto backend (auto)"] = chosen.name
    for k, v in chosen.versions().items():
        out[f"  {k}"] = str(v)
    return out
