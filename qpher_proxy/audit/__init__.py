"""Tamper-evident audit log: hash-chained JSON lines (``log``), records and the secret guard
(``records``), chain verification (``verify``) and its CLI (``cli``); the transparent log on top:
the RFC 6962 Merkle tree (``merkle``, pure; ``tree``, its files), C2SP signed-note checkpoints
(``note``, pure) and offline verification against them (``tlog``)."""

from .log import AuditLog, rotated_files
from .records import GENESIS, RECOVERY_EVENT, SEVERITIES, AuditRecord, check_fields, parse_record
from .verify import Finding, VerifyResult, verify

__all__ = [
    "AuditLog",
    "AuditRecord",
    "Finding",
    "GENESIS",
    "RECOVERY_EVENT",
    "SEVERITIES",
    "VerifyResult",
    "check_fields",
    "parse_record",
    "rotated_files",
    "verify",
]
