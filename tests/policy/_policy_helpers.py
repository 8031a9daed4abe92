"""Shared helpers for the policy tests: request facts with defaults, policy files, audit sinks."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from qpher_proxy.policy import RequestFacts

REPO = Path(__file__).resolve().parents[2]
CASES_DIR = Path(__file__).resolve().parent / "cases"

# A Monday, 10:00 UTC, from a documentation address, over a PQ TLS key exchange.
BASE_REQUEST: dict[str, Any] = {
    "tenant": "acme",
    "plan": "pro",
    "scopes": [],
    "api_key_id": "k_test",
    "method": "POST",
    "path": "/v1/sign",
    "operation": "sign",
    "now": "2025-01-06T10:00:00Z",
    "source_ip": "192.0.2.10",
    "tls_group": "X25519MLKEM768",
    "tls_pq": True,
}


def facts(**overrides: Any) -> RequestFacts:
    data = dict(BASE_REQUEST)
    data.update(overrides)
    return RequestFacts.from_mapping(data)


def write_files(directory: Path, files: Mapping[str, Any]) -> Path:
    """Write policy files: a str value is written verbatim, anything else as YAML."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        text = content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False)
        (directory / name).write_text(text, encoding="utf-8")
    return directory


class RecordingAudit:
    """An audit sink that records (event, severity, fields) and can be told to fail."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str, dict[str, Any]]] = []
        self.fail_with: BaseException | None = None

    def __call__(self, event: str, severity: str, **fields: Any) -> None:
        assert severity in ("info", "warning", "critical"), severity
        if self.fail_with is not None:
            raise self.fail_with
        self.records.append((event, severity, fields))

    def events(self, name: str | None = None) -> list[tuple[str, str, dict[str, Any]]]:
        return [r for r in self.records if name is None or r[0] == name]
