"""SoftHSM2 tokens for the PKCS#11 KEK tests: a real PKCS#11 module, its tokens in a temporary directory.

``SOFTHSM2_CONF`` names a configuration whose ``directories.tokendir`` is a temporary directory;
it is set in this process's environment before python-pkcs11 first loads the module (SoftHSM2
reads it in ``C_Initialize``), and KMS workers inherit it. Tokens are made with
``softhsm2-util --init-token --free``; their keys are generated in a child process, so that this
process's view of the slots is never a stale one (SoftHSM2 lists new tokens only to a process
that initializes after they were made).

The SoftHSM2 package is a test requirement (``.ci/run`` installs it): without it these tests skip
with the reason, and under ``CI`` they fail instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)
PIN = "4711-qpher-user"
SO_PIN = "0815-qpher-so"
# The session token (tests/kms/conftest.py ``softhsm``): three good KEKs and the kinds a KEK must not be.
TOKEN = "qpher-test"
GOOD_KEYS = ("kek-a", "kek-b", "kek-c")
BAD_KEYS: list[dict[str, object]] = [
    {"label": "kek-extractable", "extractable": True, "id": "10"},
    {"label": "kek-not-sensitive", "sensitive": False, "id": "11"},
    {"label": "kek-aes128", "bits": 128, "id": "12"},
]


def softhsm_module() -> str | None:
    for path in MODULE_CANDIDATES:
        if os.path.exists(path):
            return path
    return None


def require_softhsm() -> str:
    """The SoftHSM2 module path, or skip (fail under CI) saying what is missing."""
    module = softhsm_module()
    missing = []
    if module is None or shutil.which("softhsm2-util") is None:
        missing.append("SoftHSM2 (Debian package softhsm2)")
    try:
        import pkcs11  # noqa: F401
    except ImportError:
        missing.append("python-pkcs11 (the test extra)")
    if missing:
        reason = f"{' and '.join(missing)} not installed"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI installs it (.ci/run), so this is a failure, not a skip")
        pytest.skip(f"{reason}; the PKCS#11 KEK tests need a real token")
    assert module is not None
    return module


@dataclass(frozen=True)
class SoftHSM:
    """A SoftHSM2 configuration with its token directory."""

    module: str
    conf: Path
    tokendir: Path

    def env(self) -> dict[str, str]:
        return {**os.environ, "SOFTHSM2_CONF": str(self.conf)}

    def init_token(self, label: str) -> Path:
        """A new token labelled ``label``; returns its directory (remove it to pull the token)."""
        before = set(self.tokendir.iterdir())
        subprocess.run(
            ["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", PIN, "--so-pin", SO_PIN],
            env=self.env(), check=True, capture_output=True, timeout=60,
        )
        (new,) = set(self.tokendir.iterdir()) - before
        return new

    def generate_keys(self, token_label: str, keys: list[dict[str, object]]) -> None:
        """Generate secret keys in ``token_label`` in a child process. Each spec: ``label``,
        ``bits`` (default 256), ``extractable``/``sensitive`` (default False/True), ``id`` (hex)."""
        subprocess.run(
            [sys.executable, __file__, "generate", self.module, token_label, json.dumps(keys)],
            env=self.env(), check=True, capture_output=True, timeout=60,
        )


def make_softhsm(root: Path, module: str) -> SoftHSM:
    tokendir = root / "tokens"
    tokendir.mkdir(parents=True, mode=0o700)
    conf = root / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokendir}\nobjectstore.backend = file\nlog.level = ERROR\n"
        "slots.removable = false\n"
    )
    return SoftHSM(module, conf, tokendir)


def _generate(module: str, token_label: str, specs: list[dict[str, object]]) -> None:
    import pkcs11
    from pkcs11 import Attribute, KeyType

    token = pkcs11.lib(module).get_token(token_label=token_label)
    with token.open(rw=True, user_pin=PIN) as session:
        for spec in specs:
            bits = int(spec.get("bits", 256))  # type: ignore[call-overload]
            session.generate_key(
                KeyType.AES, bits, label=str(spec["label"]), id=bytes.fromhex(str(spec.get("id", "01"))),
                store=True,
                template={
                    Attribute.EXTRACTABLE: bool(spec.get("extractable", False)),
                    Attribute.SENSITIVE: bool(spec.get("sensitive", True)),
                    Attribute.ENCRYPT: True, Attribute.DECRYPT: True,
                    Attribute.WRAP: False, Attribute.UNWRAP: False, Attribute.SIGN: False,
                    Attribute.VERIFY: False, Attribute.DERIVE: False,
                },
            )


if __name__ == "__main__":  # python pkcs11_helpers.py generate MODULE TOKEN_LABEL JSON
    _generate(sys.argv[2], sys.argv[3], json.loads(sys.argv[4]))
