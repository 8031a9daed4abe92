"""API keys and the header rules around them (see ``apikeys`` and ``headers``)."""

from .apikeys import (
    KEY_SCAN_PATTERN,
    APIKeyRecord,
    APIKeyStore,
    Authenticator,
    generate_pepper_file,
    load_pepper,
    parse_expiry,
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
    "APIKeyRecord",
    "APIKeyStore",
    "Authenticator",
    "generate_pepper_file",
    "load_pepper",
    "parse_expiry",
    "WWW_AUTHENTICATE",
    "extract_api_key",
    "partition_identity_headers",
    "redact_target",
    "strip_identity_headers",
]
