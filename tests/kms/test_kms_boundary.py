"""The process boundary is checked: statically (import-linter) and at run time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
KMS_ONLY = (
    "qpher_proxy.kms.worker.service", "qpher_proxy.kms.worker.keystore", "qpher_proxy.kms.worker.keyfile",
    "qpher_proxy.kms.worker.kek", "qpher_proxy.kms.worker.admin", "qpher_proxy.kms.worker.backends",
)


@pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="lint-imports is not installed next to this Python")
def test_import_linter_contracts_are_kept() -> None:
    r = subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Gateway-side modules never import" in r.stdout and " 0 broken" in r.stdout


def test_importing_the_gateway_side_of_the_kms_loads_nothing_kms_only() -> None:
    code = (
        "import sys, qpher_proxy.kms, qpher_proxy.kms.client, qpher_proxy.kms.launcher, "
        "qpher_proxy.kms.wire.protocol, qpher_proxy.kms.wire.model\n"
        "qpher_proxy.kms.KMSClient, qpher_proxy.kms.open_kms\n"
        f"bad = [m for m in {KMS_ONLY!r} if m in sys.modules]\n"
        "print(bad)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_the_worker_entry_point_does_not_load_trio() -> None:
    code = (
        "import sys, qpher_proxy.kms.worker.service, qpher_proxy.kms.worker.__main__\n"
        "print('trio' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_the_gateway_preload_imports_nothing_of_the_worker() -> None:
    """The gateway imports its whole package before Landlock; the worker's package, skipped,
    is not even imported to be listed."""
    code = (
        "import sys\n"
        "from qpher_proxy.sandbox import preload\n"
        "from qpher_proxy.server.confine import KMS_ONLY\n"
        "preload(['qpher_proxy'], skip=KMS_ONLY)\n"
        "print(sorted(m for m in sys.modules if m.startswith('qpher_proxy.kms.worker')))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_the_worker_preload_imports_neither_trio_nor_the_gateway_side() -> None:
    code = (
        "import sys\n"
        "from qpher_proxy.sandbox import preload\n"
        "from qpher_proxy.kms.worker.service import PRELOAD, PRELOAD_SKIP\n"
        "preload(PRELOAD, skip=PRELOAD_SKIP)\n"
        "print(sorted(m for m in sys.modules if m == 'trio' or m.startswith(PRELOAD_SKIP)))\n"
        "print('qpher_proxy.kms.worker.keystore' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:2] == ["[]", "True"]
