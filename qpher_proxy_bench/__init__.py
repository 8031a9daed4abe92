"""The benchmarks: a package beside the runtime one, installed with the project.

It imports ``qpher_proxy``; ``qpher_proxy`` never imports it, except ``qpher-proxy bench NAME``,
which calls :func:`run_bench` (the import contract ``runtime-never-imports-bench`` in
``.importlinter`` names that one exception). Each benchmark is a module with a ``main(argv)``,
also runnable as ``python -m qpher_proxy_bench.<module> --quick``.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

_MODULES = {
    "crypto": "crypto_bench", "kms": "kms_bench", "http": "http_bench", "tls": "tls_bench",
    "policy": "policy_bench", "auth": "auth_bench", "gateway": "gateway_bench",
    "scaleout": "scaleout_bench", "kms-tier": "tier_bench",
    "shared-limiter": "shared_limiter", "audit": "audit_bench", "h2": "h2_bench",
    "grpc": "grpc_bench",
}


def run_bench(what: str, argv: Sequence[str]) -> int:
    """``qpher-proxy bench WHAT [ARGS...]``: run one benchmark module's ``main(argv)``."""
    module = importlib.import_module(f"{__name__}.{_MODULES[what]}")
    return int(module.main(list(argv)) or 0)
