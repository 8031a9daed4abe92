"""The benchmarks are a package beside the runtime one: the runtime never imports them (an
import-linter contract, proven here to catch a deliberate violation), and ``qpher-proxy bench``
without them says in one line how to install them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
CONTRACT = "runtime-never-imports-bench"


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    # lint-imports puts its working directory first on sys.path, so it analyses the copy there.
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--contract", CONTRACT], cwd=root,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="lint-imports is not installed next to this Python")
def test_a_runtime_module_importing_the_benchmarks_breaks_the_contract(tmp_path: Path) -> None:
    shutil.copytree(
        ROOT / "qpher_proxy", tmp_path / "qpher_proxy", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(ROOT / ".importlinter", tmp_path / ".importlinter")
    kept = _lint(tmp_path)
    assert kept.returncode == 0, kept.stdout + kept.stderr

    (tmp_path / "qpher_proxy" / "_stray.py").write_text("import qpher_proxy_bench\n")
    broken = _lint(tmp_path)
    assert broken.returncode != 0
    assert "qpher_proxy._stray -> qpher_proxy_bench" in broken.stdout


def test_bench_without_the_package_says_how_to_install_it_in_one_line() -> None:
    code = (
        "import sys\n"
        "sys.modules['qpher_proxy_bench'] = None  # as if it were not installed\n"
        "from qpher_proxy.cli import main\n"
        "sys.exit(main(['bench', 'kms', '--quick']))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stdout == ""
    assert len(r.stderr.splitlines()) == 1
    assert r.stderr.startswith("qpher-proxy: bench_unavailable: ") and "pip install -e ." in r.stderr
