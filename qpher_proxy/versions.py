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


# The facts a container image records as labels (Dockerfile), in the order they are printed.
IMAGE_FACTS = ("qpher-proxy", "cryptography", "openssl", "liboqs")
IMAGE_LABELS = {
    "qpher-proxy": "org.opencontainers.image.version",
    "cryptography": "io.qpher.cryptography.version",
    "openssl": "io.qpher.openssl.version",
    "liboqs": "io.qpher.liboqs.version",
}


def image_facts() -> dict[str, str]:
    """What an image holds, as its labels record it: this product's version, cryptography's, the
    OpenSSL inside cryptography (``4.0.3``), and the liboqs library that would be loaded (its
    version, or ``none``)."""
    from cryptography.hazmat.backends.openssl.backend import backend as openssl_backend

    from .kms.worker.backends import probe_liboqs

    text = openssl_backend.openssl_version_text()  # "OpenSSL 4.0.3 29 Sep 2026"
    parts = text.split()
    openssl = parts[1] if len(parts) > 1 and parts[0] == "OpenSSL" else text
    probe = probe_liboqs()
    return {
        "qpher-proxy": __version__,
        "cryptography": _pkg("cryptography"),
        "openssl": openssl,
        "liboqs": probe.liboqs_version if probe.present and probe.liboqs_version else "none",
    }


def check_expectations(expected: list[str]) -> list[str]:
    """One line per ``NAME=VALUE`` in ``expected`` that this installation does not match (an
    image build runs this, so that its labels cannot describe something it does not hold)."""
    facts = image_facts()
    problems = []
    for item in expected:
        name, sep, value = item.partition("=")
        if not sep or name not in facts:
            problems.append(f"--expect {item!r}: expected NAME=VALUE, NAME one of {', '.join(IMAGE_FACTS)}")
        elif facts[name] != value:
            problems.append(f"{name} is {facts[name]}, expected {value}")
    return problems
