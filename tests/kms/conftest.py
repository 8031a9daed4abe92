"""Fixtures for the KMS tests: KEK files, an in-process key store with a fake clock, real workers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from kms_helpers import FakeClock, settings

from qpher_proxy.crypto.interface import Backend
from qpher_proxy.kms.launcher import KMSSupervisor, open_kms
from qpher_proxy.kms.worker.backends import select_backend
from qpher_proxy.kms.worker.kek import FileKEKProvider, generate_kek_file
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
