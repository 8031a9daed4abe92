"""The crypto benchmark runs end to end (tiny budget) and reports ours next to raw."""

from __future__ import annotations

import json
from typing import Any

import pytest

from qpher_proxy_bench import crypto_bench


def test_bench_json_reports_every_operation(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--json", "--backend", "openssl", "--algorithm", "x-wing", "--algorithm", "ml-dsa-44",
            "--seconds", "0", "--rounds", "1"]
    assert crypto_bench.main(argv) == 0
    out: dict[str, Any] = json.loads(capsys.readouterr().out)
    ops = {(r["algorithm"], r["operation"]) for r in out["results"]}
    assert ops == {
        ("x-wing", op) for op in ("keygen", "encapsulate", "decapsulate", "hpke_seal", "hpke_open")
    } | {("ml-dsa-44", op) for op in ("keygen", "sign", "verify")}
    assert all(r["ours_ops"] > 0 and r["raw_ops"] > 0 for r in out["results"])
    assert out["versions"]["openssl"]["cryptography"]
    assert out["payload_bytes"] == 1024


def test_bench_table_on_liboqs(liboqs_backend: Any, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--backend", "liboqs", "--algorithm", "ml-kem-768", "--algorithm", "ml-dsa-65-ecdsa-p256",
            "--seconds", "0", "--rounds", "1"]
    assert crypto_bench.main(argv) == 0
    table = capsys.readouterr().out
    assert "liboqs   ml-kem-768            hpke_open" in table
    assert "overhead" in table and "mean overhead" in table
