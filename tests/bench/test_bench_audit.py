"""`qpher-proxy bench audit` runs end to end on a small tree and prints its figures."""

from __future__ import annotations

import json

import pytest

from qpher_proxy_bench import audit_bench


def test_audit_bench_tiny(capsys: pytest.CaptureFixture[str]) -> None:
    assert audit_bench.main(["--leaves", "3000", "--records", "200", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tree"]["leaves"] == 3000
    assert out["proofs"]["inclusion_middle"]["hashes"] == 12
    assert out["checkpoint"]["note_bytes"] > 3309
