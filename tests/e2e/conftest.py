from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ._gateway import Gateway, init_state, start_gateway


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One gateway for the read-mostly end-to-end tests of the session (openssl backend, so
    that the result does not depend on whether liboqs is installed; the liboqs backend has
    its own test module)."""
    directory = tmp_path_factory.mktemp("gw") / "state"
    init_state(directory, **{"crypto.backend": "openssl"})
    gw = start_gateway(directory)
    try:
        yield gw
    finally:
        code = gw.stop()
        assert code == 0, f"gateway exited {code} on SIGTERM"


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"
