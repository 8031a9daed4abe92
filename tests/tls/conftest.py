"""The dev PKI every TLS test module shares: made once per test process, never modified in place
(a test that needs to change files works on `copy_pki`)."""

from __future__ import annotations

import pytest

from qpher_proxy.tls.certs import DevPKI, make_dev_pki


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPKI:
    return make_dev_pki(tmp_path_factory.mktemp("pki") / "certs")
