from __future__ import annotations

import pytest
from _api_fake_kms import FakeKMS

from qpher_proxy.api import CryptoAPI
from qpher_proxy.context import TenantContext

BACKEND = {"name": "openssl", "versions": {"cryptography": "50.0.0", "openssl": "OpenSSL 4.0.3"}}


@pytest.fixture
def kms() -> FakeKMS:
    return FakeKMS()


@pytest.fixture
def api(kms: FakeKMS) -> CryptoAPI:
    return CryptoAPI(kms, max_batch_items=8, backend_info=lambda: BACKEND)


@pytest.fixture
def ctx() -> TenantContext:
    return TenantContext(tenant_id="t-alpha", request_id="req-1", api_key_id="ak_alpha")


@pytest.fixture
def other_ctx() -> TenantContext:
    return TenantContext(tenant_id="t-beta", request_id="req-2", api_key_id="ak_beta")
