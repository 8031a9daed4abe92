from __future__ import annotations

from typing import Any

import pytest
from crypto_helpers import BACKENDS, get_backend


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Any:
    """Every present backend; liboqs is skipped with the probe's reason when absent."""
    return get_backend(request.param)


@pytest.fixture
def openssl_backend() -> Any:
    return get_backend("openssl")


@pytest.fixture
def liboqs_backend() -> Any:
    return get_backend("liboqs")
