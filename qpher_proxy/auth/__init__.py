"""API keys and the header rules around them (see ``apikeys`` and ``headers``)."""

from .apikeys import (
    KEY_SCAN_PATTERN,
    PRODUCT_SCOPES,
    APIKeyRecord,
    APIKeyStore,
    Authenticator,
    check_grants,
    check_key_id,
    generate_pepper_file,
    load_pepper,
    parse_expiry,
    split_api_key,
)
from .headers import (
    WWW_AUTHENTICATE,
    extract_api_key,
    partition_identity_headers,
    redact_target,
    strip_identity_headers,
)

__all__ = [
    "KEY_SCAN_PATTERN",
    "PRODUCT_SCOPES",
    "APIKeyRecord",
    "APIKeyStore",
    "Authenticator",
    "check_grants",
    "check_key_id",
    "generate_pepper_file",
    "load_pepper",
    "parse_expiry",
    "split_api_key",
    "WWW_AUTHENTICATE",
    "extract_api_key",
    "partition_identity_headers",
    "redact_target",
    "strip_identity_headers",
]
