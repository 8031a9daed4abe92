"""Gateway-side SQLite storage (API keys, quota counts). The KMS has its own database."""

from .sqlite import connect, data_version, ensure_schema, mapped, transaction

__all__ = ["connect", "data_version", "ensure_schema", "mapped", "transaction"]
