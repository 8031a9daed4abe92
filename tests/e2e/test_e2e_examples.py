"""Every client example in ``examples/`` runs as a subprocess against one live gateway, as a user
would run it, and exits 0; a wrong expectation makes it exit non-zero; it needs nothing beyond
the standard library and ``cryptography``; the README's excerpt is the example's own code."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ._gateway import Gateway, init_state, start_gateway

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    directory = tmp_path_factory.mktemp("examples") / "state"
    init_state(directory, **{"crypto.backend": "openssl"})
    gw = start_gateway(directory)
    try:
        yield gw
    finally:
        assert gw.stop() == 0


def _env(gw: Gateway, **extra: str) -> dict[str, str]:
    # The key as the file holds it, trailing newline included: the examples must strip it.
    key_file = gw.directory / "secrets" / "demo-api-key"
    env = {k: v for k, v in os.environ.items() if not k.startswith("QPHER_")}
    env.update(QPHER_URL=f"https://localhost:{gw.port}", QPHER_API_KEY=key_file.read_text(),
               QPHER_CA=str(gw.ca_file))
    env.update(extra)
    return env


def _run(script: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60)


def test_there_are_examples_for_hpke_signatures_and_kem() -> None:
    assert {p.name for p in EXAMPLES} >= {"hpke_encrypt.py", "sign_verify.py", "kem_encapsulate.py"}


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs_against_a_live_gateway(gateway: Gateway, script: Path) -> None:
    assert (gateway.directory / "secrets" / "demo-api-key").read_text().endswith("\n")
    proc = _run(script, _env(gateway))
    assert proc.returncode == 0, f"{script.name} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    assert proc.stdout.splitlines()[-1].startswith("ok: ") and proc.stderr == ""
    assert "MISMATCH" not in proc.stdout


def test_example_exits_non_zero_on_a_mismatch(gateway: Gateway) -> None:
    # Sealed under another HPKE info string than the proxy's: the proxy cannot open it.
    proc = _run(ROOT / "examples" / "hpke_encrypt.py", _env(gateway, QPHER_HPKE_INFO="qpher/v2/encrypt"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "POST /v1/decrypt: HTTP 400 decryption_failed" in proc.stderr
    assert not proc.stdout.rstrip().endswith("opened in the proxy")


def test_example_exits_non_zero_with_a_wrong_api_key(gateway: Gateway) -> None:
    bad = gateway.demo_key[:-4] + ("AAAA" if not gateway.demo_key.endswith("AAAA") else "BBBB")
    proc = _run(ROOT / "examples" / "kem_encapsulate.py", _env(gateway, QPHER_API_KEY=bad))
    assert proc.returncode == 1
    assert "HTTP 401 unauthenticated" in proc.stderr and bad not in proc.stderr + proc.stdout


def test_examples_default_to_the_make_run_state_of_their_checkout(gateway: Gateway, tmp_path: Path) -> None:
    # A checkout with its `make run` state: .qpher/secrets/demo-api-key and .qpher/certs/ca.crt
    # beside examples/. Only the URL is given (the gateway here does not listen on 8443).
    (tmp_path / "examples").mkdir()
    script = shutil.copy(ROOT / "examples" / "sign_verify.py", tmp_path / "examples")
    (tmp_path / ".qpher" / "secrets").mkdir(parents=True)
    (tmp_path / ".qpher" / "certs").mkdir()
    shutil.copy(gateway.directory / "secrets" / "demo-api-key", tmp_path / ".qpher" / "secrets")
    shutil.copy(gateway.ca_file, tmp_path / ".qpher" / "certs" / "ca.crt")
    env = {k: v for k, v in os.environ.items() if not k.startswith("QPHER_")}
    proc = _run(Path(script), dict(env, QPHER_URL=f"https://localhost:{gateway.port}"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_examples_without_state_say_how_to_get_it(tmp_path: Path) -> None:
    (tmp_path / "examples").mkdir()
    script = shutil.copy(ROOT / "examples" / "hpke_encrypt.py", tmp_path / "examples")
    env = {k: v for k, v in os.environ.items() if not k.startswith("QPHER_")}
    proc = _run(Path(script), env)
    assert proc.returncode == 1 and "set QPHER_API_KEY, or run `make run`" in proc.stderr


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_needs_only_the_standard_library_and_cryptography(script: Path) -> None:
    imported: set[str] = set()
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{script.name}: relative import"
            imported.add((node.module or "").split(".")[0])
    assert imported - set(sys.stdlib_module_names) - {"__future__"} == {"cryptography"}


def test_readme_excerpt_is_the_examples_own_code() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Client examples"):]
    excerpt = re.search(r"```python\n(.*?)```", section, re.S)
    assert excerpt is not None
    source = {line.strip() for line in (ROOT / "examples" / "hpke_encrypt.py").read_text().splitlines()}
    lines = [line.strip() for line in excerpt.group(1).splitlines() if line.strip()]
    assert lines and [line for line in lines if line not in source] == []
    for script in EXAMPLES:
        assert f"examples/{script.name}" in section
