"""Every import contract in `.importlinter` can fail: a violation planted in a copy of the package
breaks it, naming the planted import.

A contract whose expressions match nothing (a `**` pattern on a plain module, a source renamed
away) is kept forever without checking anything; `lint-imports` passing on the real tree cannot
tell that apart from a contract that holds. So for each contract this plants the import it
forbids into a throw-away copy of the packages, runs `lint-imports --contract ID` on the copy,
and expects BROKEN with the planted importer in the report. A contract added without a plant
here fails `test_every_contract_has_a_planted_violation`.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / ".importlinter"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


@dataclass(frozen=True)
class Plant:
    """Source text put into the copy: a new module, or lines appended to an existing one."""

    path: str  # relative to the repository root
    text: str
    importer: str  # the module lint-imports must name as the importer

    @property
    def appends(self) -> bool:
        return (ROOT / self.path).exists()


PLANTS: dict[str, tuple[Plant, ...]] = {
    "kms-worker-is-its-own-process": (
        # a gateway package, at module level
        Plant("qpher_proxy/http/_contract_probe.py", "from qpher_proxy.kms.worker import keystore\n",
              "qpher_proxy.http._contract_probe"),
        # the gateway side of the KMS, lazily inside a function (import-linter sees it all the same)
        Plant("qpher_proxy/kms/client/_contract_probe.py", "def load():\n    from ..worker import kek\n",
              "qpher_proxy.kms.client._contract_probe"),
        # an offline command that may import the worker, but by another edge than the listed one
        Plant("qpher_proxy/versions.py", "\n\ndef _probe():\n    from .kms.worker import keystore\n",
              "qpher_proxy.versions"),
        # the benchmarks, a package beside the runtime, are covered too
        Plant("qpher_proxy_bench/_contract_probe.py", "from qpher_proxy.kms.worker import kek_rotation\n",
              "qpher_proxy_bench._contract_probe"),
    ),
    "kms-worker-never-imports-gateway": (
        Plant("qpher_proxy/kms/worker/_contract_probe.py", "from ..client import KMSClient\n",
              "qpher_proxy.kms.worker._contract_probe"),
        Plant("qpher_proxy/kms/worker/backends/_contract_probe.py", "import trio\n",
              "qpher_proxy.kms.worker.backends._contract_probe"),
    ),
    "kms-launcher-only-from-composition": (
        Plant("qpher_proxy/api/_contract_probe.py", "from ..kms.launcher import open_kms\n",
              "qpher_proxy.api._contract_probe"),
    ),
    "kms-wire-is-sans-io": (
        Plant("qpher_proxy/kms/wire/_contract_probe.py", "import socket\n",
              "qpher_proxy.kms.wire._contract_probe"),
    ),
    "policy-core-is-sans-io": (
        Plant("qpher_proxy/policy/evaluate.py", "\nimport trio\n", "qpher_proxy.policy.evaluate"),
    ),
    "upstream-hygiene-is-sans-io": (
        Plant("qpher_proxy/upstream/target.py", "\nimport socket\n", "qpher_proxy.upstream.target"),
    ),
    "runtime-never-imports-bench": (
        Plant("qpher_proxy/_contract_probe.py", "import qpher_proxy_bench\n", "qpher_proxy._contract_probe"),
    ),
}
PACKAGES = ("qpher_proxy", "qpher_proxy_bench")

pytestmark = pytest.mark.skipif(not LINT_IMPORTS.exists(),
                                reason="lint-imports is not installed next to this Python")


def _contracts() -> dict[str, configparser.SectionProxy]:
    parser = configparser.ConfigParser()
    parser.read(CONFIG)
    prefix = "importlinter:contract:"
    return {name[len(prefix):]: parser[name] for name in parser.sections() if name.startswith(prefix)}


def _lines(value: str) -> list[str]:
    return [line.strip() for line in value.splitlines() if line.strip()]


def test_every_contract_has_a_planted_violation() -> None:
    assert sorted(PLANTS) == sorted(_contracts())


@pytest.fixture(scope="module")
def planted_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the package and its contracts with every plant of PLANTS in it."""
    root = tmp_path_factory.mktemp("contracts")
    _copy(root)
    for plant in (p for plants in PLANTS.values() for p in plants):
        target = root / plant.path
        if plant.appends:
            target.write_text(target.read_text() + plant.text)
        else:
            assert not target.exists(), f"two plants write {plant.path}"
            target.write_text(plant.text)
    return root


def _copy(root: Path) -> None:
    for package in PACKAGES:
        shutil.copytree(ROOT / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(CONFIG, root / ".importlinter")


def _lint(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # PYTHONPATH: grimp must find the copy, not the installed package
    env = {**os.environ, "PYTHONPATH": str(root), "COLUMNS": "400"}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--no-logo", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("contract", sorted(PLANTS))
def test_a_planted_violation_breaks_the_contract(planted_copy: Path, contract: str) -> None:
    r = _lint(planted_copy, "--contract", contract)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "BROKEN" in out, out
    flat = re.sub(r"\s+", " ", out)
    for plant in PLANTS[contract]:
        assert f"{plant.importer} ->" in flat, f"{plant.importer} not reported:\n{out}"


def test_the_copy_without_plants_keeps_every_contract(tmp_path: Path) -> None:
    """The planted copy breaks because of the plants alone: without them the same copy passes."""
    _copy(tmp_path)
    r = _lint(tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_module_a_contract_names_exists() -> None:
    """An expression that matches no module (a wildcard on a plain module, a renamed package)
    would make its line a no-op; import-linter stops only on plain names that do not exist."""
    import grimp
    from importlinter.domain.helpers import module_expression_to_modules
    from importlinter.domain.imports import ModuleExpression

    graph = grimp.build_graph(*PACKAGES, include_external_packages=True)
    unmatched = []
    for name, section in _contracts().items():
        for key in ("source_modules", "forbidden_modules"):
            for expr in _lines(section.get(key, "")):
                matched = module_expression_to_modules(graph, ModuleExpression(expr))
                if not any(m.name in graph.modules for m in matched):
                    unmatched.append(f"{name}: {key}: {expr}")
    assert unmatched == []
