"""Backend selection: auto/openssl/liboqs, the one log line, versions, and — in a fresh
interpreter — that an absent liboqs never triggers liboqs-python's git clone."""

from __future__ import annotations

import ctypes.util
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from crypto_helpers import liboqs_skip_reason

from qpher_proxy.crypto.algorithms import ALGORITHMS
from qpher_proxy.errors import BackendUnavailable
from qpher_proxy.kms.worker.backends import available_backends, liboqs_status, select_backend

REPO = Path(__file__).resolve().parents[2]


def test_available_backends_follow_the_probe() -> None:
    present, reason = liboqs_status()
    assert reason
    assert available_backends() == (["openssl", "liboqs"] if present else ["openssl"])


def test_every_algorithm_is_supported(backend: Any) -> None:
    assert all(backend.supports(alg) for alg in ALGORITHMS.values())
    assert backend.supports("ml-kem-768") and not backend.supports("ml-kem-512")


def test_openssl_versions_are_exact() -> None:
    import cryptography

    versions = select_backend("openssl").versions()
    assert versions["backend"] == "openssl"
    assert versions["cryptography"] == cryptography.__version__
    assert versions["openssl"].startswith("OpenSSL ")


def test_liboqs_versions_are_exact(liboqs_backend: Any) -> None:
    import importlib.metadata

    versions = liboqs_backend.versions()
    assert versions["backend"] == "liboqs"
    assert versions["liboqs"] == liboqs_status()[1].split()[1]
    assert versions["liboqs-python"] == importlib.metadata.version("liboqs-python")
    assert versions["openssl"].startswith("OpenSSL ")


def test_auto_logs_exactly_one_line_saying_which_and_why(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="qpher.crypto"):
        backend = select_backend("auto")
    lines = [r.getMessage() for r in caplog.records if r.name == "qpher.crypto"]
    assert len(lines) == 1
    present, reason = liboqs_status()
    assert backend.name == ("liboqs" if present else "openssl")
    assert lines[0].startswith(f"crypto backend: {backend.name} (auto: ")
    assert reason in lines[0]


def _run(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=REPO, capture_output=True, text=True,
        timeout=60, check=False,
    )


_PROBE_SCRIPT = """
    import json, logging, sys
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    from qpher_proxy.kms.worker.backends import select_backend
    from qpher_proxy.errors import BackendUnavailable
    result = {"auto": select_backend("auto").name, "oqs_imported": "oqs" in sys.modules}
    try:
        select_backend("liboqs")
    except BackendUnavailable as exc:
        result["liboqs_error"] = exc.message
    print(json.dumps(result))
"""


def test_absent_liboqs_never_starts_a_clone(tmp_path: Path) -> None:
    if ctypes.util.find_library("oqs") or ctypes.util.find_library("liboqs"):
        pytest.skip("a liboqs is installed in the system library path, so absence cannot be simulated")
    empty = tmp_path / "empty-oqs"
    empty.mkdir()
    home = tmp_path / "home"
    home.mkdir()
    # Tripwires: liboqs-python's installer runs `git clone` then `cmake`; make both record a call.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("git", "cmake"):
        script = bin_dir / tool
        script.write_text(f"#!/bin/sh\necho {tool} >> {tmp_path / 'tripwire'}\nexit 1\n")
        script.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH", "PYOQS_VERSION")}
    env.update(OQS_INSTALL_PATH=str(empty), HOME=str(home), PATH=f"{bin_dir}:{env.get('PATH', '')}")
    proc = _run(_PROBE_SCRIPT, env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["auto"] == "openssl"
    assert result["oqs_imported"] is False
    assert result["liboqs_error"].startswith("liboqs shared library not found (")
    assert f"OQS_INSTALL_PATH={empty}" in result["liboqs_error"]
    assert not (tmp_path / "tripwire").exists()
    assert "SystemExit" not in proc.stderr and "Installing" not in proc.stdout + proc.stderr
    assert "crypto backend: openssl (auto: liboqs shared library not found" in proc.stderr


def test_present_liboqs_is_chosen_and_keeps_stdout_clean() -> None:
    reason = liboqs_skip_reason()
    if reason:
        pytest.skip(reason)
    proc = _run(_PROBE_SCRIPT, dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, "liboqs-python's import-time stdout logging leaked"  # only our JSON
    result = json.loads(lines[0])
    assert result == {"auto": "liboqs", "oqs_imported": True}


def test_asking_for_liboqs_when_absent_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    from qpher_proxy.kms.worker.backends import _probe

    monkeypatch.setattr(_probe, "_cache", {})
    monkeypatch.setattr(
        _probe, "_probe", lambda env: _probe.LiboqsProbe(False, "liboqs shared library not found (test)")
    )
    import qpher_proxy.kms.worker.backends as backends

    monkeypatch.setattr(backends, "_instances", {"openssl": select_backend("openssl")})
    with pytest.raises(BackendUnavailable, match=r"liboqs shared library not found \(test\)"):
        select_backend("liboqs")
    assert select_backend("auto").name == "openssl"
    assert available_backends() == ["openssl"]
