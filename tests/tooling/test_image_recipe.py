"""The image recipe agrees with the package it ships: the pins its labels record, the runtime
dependencies, what the build context may carry. (The image itself is built and run by
tests/deploy, under ``make test-deploy``.)"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]


def _args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S*)$", (REPO / "Dockerfile").read_text(), re.M))


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "deploy" / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"deploy/requirements.txt pins exactly: {line}"
            pins[req.name.lower().replace("_", "-")] = spec.version
    return pins


def test_label_pins_match_the_package_and_the_requirements() -> None:
    from cryptography import __version__ as installed_cryptography
    from cryptography.hazmat.backends.openssl.backend import backend

    from qpher_proxy import __version__

    args, pins = _args(), _pins()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert args["QPHER_VERSION"] == __version__ == project["version"]
    assert args["CRYPTOGRAPHY_VERSION"] == pins["cryptography"]
    assert args["LIBOQS_VERSION"] == "none"  # the default image is the OpenSSL-backend one
    if installed_cryptography == pins["cryptography"]:
        # the same wheel as the image's: its OpenSSL is the one the label names
        assert backend.openssl_version_text().split()[1] == args["OPENSSL_VERSION"]


def test_requirements_pin_every_runtime_dependency_within_pyproject_ranges() -> None:
    pins = _pins()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for dep in project["dependencies"]:
        req = Requirement(dep)
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{name} (pyproject.toml) is not pinned in deploy/requirements.txt"
        assert req.specifier.contains(pins[name]), f"{name}=={pins[name]} is outside {req.specifier}"
        for extra in req.extras:  # psycopg[binary] -> psycopg-binary
            assert f"{name}-{extra}" in pins, f"{name}[{extra}] needs {name}-{extra} pinned"


def test_build_context_keeps_out_local_state_and_secrets() -> None:
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", ".qpher", "tests"} <= ignored
    gitignore = (REPO / ".gitignore").read_text()
    assert "deploy/wheelhouse/*.whl" in gitignore and "deploy/liboqs/*.tar.gz" in gitignore


def test_image_runs_non_root_under_tini_with_a_health_check() -> None:
    text = (REPO / "Dockerfile").read_text()
    runtime = text[text.index("AS runtime"):]
    assert re.search(r"^USER 10001:10001$", runtime, re.M)
    assert 'ENTRYPOINT ["tini", "--", "qpher-entrypoint"]' in runtime
    assert re.search(r'^HEALTHCHECK .*CMD \["qpher-proxy", "healthcheck"', runtime, re.M)
    assert re.search(r"^VOLUME \[\"/var/lib/qpher\"\]$", runtime, re.M)
    # the labels are checked against the installation before they are written
    assert runtime.index("qpher-proxy version") < runtime.index("LABEL ")
    for label in ("org.opencontainers.image.version", "io.qpher.cryptography.version",
                  "io.qpher.openssl.version", "io.qpher.liboqs.version"):
        assert label in runtime
    assert os.access(REPO / "deploy" / "docker-entrypoint.sh", os.X_OK)
