"""Micro-benchmarks (``python -m qpher_proxy_bench.<name> --quick``)."""

from __future__ import annotations

import importlib
from collections.abc import Sequence

_MODULES = {
    "crypto": "crypto_bench", "kms": "kms_bench", "http": "http_bench", "tls": "tls_bench",
    "policy": "policy_bench", "auth": "auth_bench", "gateway": "gateway_bench",
}


def run_bench(what: str, argv: Sequence[str]) -> int:
    """``qpher-proxy bench WHAT [ARGS...]``: run one benchmark module's ``main(argv)``."""
    module = importlib.import_module(f"{__name__}.{_MODULES[what]}")
    return int(module.main(list(argv)) or 0)
