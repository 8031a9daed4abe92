"""The Makefile's two commands, run for real against a stand-in Python: `make run` and
`make test` create the venv and install once, and install again only when pyproject.toml
changes, so a second `make run` goes straight to serving."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Stands in for python3, and inside the venv it creates for python, pip, qpher-proxy, ruff, mypy
# and lint-imports: each records its command line in calls.log and does nothing else.
_FAKE_PYTHON = """#!/bin/sh
echo "$(basename "$0") $*" >> "$CALLS"
if [ "$1 $2" = "-m venv" ]; then
    mkdir -p "$3/bin"
    for tool in python pip qpher-proxy ruff mypy lint-imports; do cp "$0" "$3/bin/$tool"; done
fi
"""

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


class Checkout:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.calls = root / "calls.log"
        shutil.copy(REPO / "Makefile", root / "Makefile")
        shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
        fake = root / "fake-python3"
        fake.write_text(_FAKE_PYTHON)
        fake.chmod(0o755)
        (root / ".qpher").mkdir()
        (root / ".qpher" / "config.yaml").write_text("{}\n")  # `init` already ran

    def make(self, *args: str) -> list[str]:
        """Run make; the commands the stand-ins saw, in order."""
        self.calls.write_text("")
        env = {**os.environ, "CALLS": str(self.calls)}
        proc = subprocess.run(["make", "--no-print-directory", f"PYTHON={self.root / 'fake-python3'}", *args],
                              cwd=self.root, env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return self.calls.read_text().splitlines()

    def edit_pyproject(self) -> None:
        """An edit after the last install: the stamps are moved back in time rather than the
        file forward, so that the next install's stamp is newer again, whatever the file
        system's timestamp resolution."""
        earlier = time.time() - 10
        for stamp in (self.root / ".venv").glob(".installed*"):
            os.utime(stamp, (earlier, earlier))
        (self.root / "pyproject.toml").touch()


@pytest.fixture
def checkout(tmp_path: Path) -> Checkout:
    return Checkout(tmp_path)


def _installs(calls: list[str]) -> list[str]:
    return [c for c in calls if c.startswith("pip install") or c.startswith("python -m pip install")]


def test_make_run_installs_once_then_serves_straight_away(checkout: Checkout) -> None:
    first = checkout.make("run")
    assert first[0].endswith("-m venv .venv")
    assert _installs(first) == ["python -m pip install --quiet --upgrade pip", "pip install --quiet -e ."]
    assert first[-1] == "qpher-proxy serve --config .qpher/config.yaml"
    assert checkout.make("run") == ["qpher-proxy serve --config .qpher/config.yaml"]
    checkout.edit_pyproject()
    assert _installs(checkout.make("run")) == ["pip install --quiet -e ."]
    assert _installs(checkout.make("run")) == []


def test_make_test_installs_the_extras_once_and_that_also_serves_make_run(checkout: Checkout) -> None:
    first = checkout.make("test")
    assert "pip install --quiet -e .[test]" in first
    assert first[-2:] == ["lint-imports ", "python -m pytest -n auto --dist loadfile"]
    assert _installs(checkout.make("test")) == []
    assert _installs(checkout.make("run")) == []  # the test extras include the package
    checkout.edit_pyproject()
    assert _installs(checkout.make("run")) == ["pip install --quiet -e ."]
    assert _installs(checkout.make("test")) == ["pip install --quiet -e .[test]"]


def test_pytest_workers_and_arguments_stay_overridable(checkout: Checkout) -> None:
    calls = checkout.make("test", "PYTEST_WORKERS=0", "PYTEST_ARGS=tests/policy -x")
    assert calls[-1] == "python -m pytest -n 0 --dist loadfile tests/policy -x"


def test_make_question_mode_says_the_installs_are_current(checkout: Checkout) -> None:
    checkout.make("test")
    for stamp in (".venv/.installed", ".venv/.installed-test"):
        assert subprocess.run(["make", "-q", f"PYTHON={checkout.root / 'fake-python3'}", stamp],
                              cwd=checkout.root, capture_output=True).returncode == 0
