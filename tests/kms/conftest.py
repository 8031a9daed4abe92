"""Fixtures for the KMS tests: KEK files, an in-process key store with a fake clock, real workers."""

from __future__ import annotations

import base64
import os
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from kms_helpers import FakeClock, settings
from pkcs11_helpers import BAD_KEYS, GOOD_KEYS, PIN, TOKEN, SoftHSM, make_softhsm, require_softhsm

from qpher_proxy.crypto.interface import Backend
from qpher_proxy.kms.launcher import KMSSupervisor, open_kms
from qpher_proxy.kms.worker.backends import select_backend
from qpher_proxy.kms.worker.kek import EnvKEKProvider, FileKEKProvider, KEKProvider, generate_kek_file
from qpher_proxy.kms.worker.keystore import KeyStore


@pytest.fixture(scope="session")
def backend() -> Backend:
    return select_backend("openssl")


@pytest.fixture
def kek_path(tmp_path: Path) -> Path:
    p = tmp_path / "secrets" / "kek.b64"
    generate_kek_file(p)
    return p


@pytest.fixture
def kms_dir(tmp_path: Path) -> Path:
    return tmp_path / "state" / "kms"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(kms_dir: Path, kek_path: Path, backend: Backend, clock: FakeClock) -> Iterator[KeyStore]:
    s = KeyStore(kms_dir, FileKEKProvider(kek_path), backend, clock=clock)
    yield s
    s.close()


@pytest.fixture
async def kms(kms_dir: Path, kek_path: Path) -> AsyncIterator[KMSSupervisor]:
    async with open_kms(**settings(kms_dir, kek_path)) as sup:  # type: ignore[arg-type]
        yield sup


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHSM]:
    """A SoftHSM2 token for this test process (see pkcs11_helpers): ``SOFTHSM2_CONF`` is set
    for the whole session, before python-pkcs11 first loads the module here, and workers inherit it."""
    module = require_softhsm()
    hsm = make_softhsm(tmp_path_factory.mktemp("softhsm"), module)
    hsm.init_token(TOKEN)
    hsm.generate_keys(TOKEN, [{"label": k, "id": f"{i + 1:02x}"} for i, k in enumerate(GOOD_KEYS)] + BAD_KEYS)
    old = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(hsm.conf)
    yield hsm
    if old is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = old


@pytest.fixture(params=["file", "env", "pkcs11"])
def make_kek(request: pytest.FixtureRequest, tmp_path: Path,
             monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], KEKProvider]]:
    """Each call: a provider of the parametrized kind holding a KEK no earlier call held (up to three)."""
    made: list[KEKProvider] = []
    kind = request.param

    def make() -> KEKProvider:
        n = len(made)
        if kind == "file":
            p = tmp_path / f"kek-{n}.b64"
            generate_kek_file(p)
            made.append(FileKEKProvider(p))
        elif kind == "env":
            monkeypatch.setenv("QPHER_TEST_KEK", base64.b64encode(secrets.token_bytes(32)).decode())
            made.append(EnvKEKProvider("QPHER_TEST_KEK"))
        else:
            from qpher_proxy.kms.worker.kek_pkcs11 import PKCS11KEKProvider

            hsm: SoftHSM = request.getfixturevalue("softhsm")
            made.append(PKCS11KEKProvider(hsm.module, TOKEN, GOOD_KEYS[n], PIN, pin_source="test"))
        return made[-1]

    yield make
    for p in made:
        p.close()
