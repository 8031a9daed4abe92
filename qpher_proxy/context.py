"""The service context every request carries from authentication down to the KMS.

The gateway builds one ``TenantContext`` per authenticated request; the KMS protocol copies
it into every frame, so that the KMS scopes every key lookup to ``tenant_id``. None of the
fields is a secret (``api_key_id`` is the public id of an API key, never the key itself).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TenantContext:
    tenant_id: str
    request_id: str
    api_key_id: str
