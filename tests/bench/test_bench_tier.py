"""One tiny end-to-end run of ``qpher-proxy bench kms-tier``: a local-mode gateway, then a KMS node
and a remote-mode gateway over PQ mutual TLS, and the node's handshake run; every row measured,
figures positive, no rate asserted (the machine is shared)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qpher_proxy_bench import run_bench, tier_bench


@pytest.mark.slow
def test_kms_tier_bench_end_to_end_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tier.json"
    rc = run_bench("kms-tier", ["--seconds", "0.2", "--warmup", "0", "--concurrency", "4",
                                "--clients", "1", "--handshake-clients", "2",
                                "--backend", "openssl", "--quiet", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    report = json.loads(out.read_text())
    rows = {(r["mode"], r["kind"], r["concurrency"]): r for r in report["rows"]}
    assert set(rows) == {(m, op, 4) for m in tier_bench.MODES for op in tier_bench.OPS}
    for key, row in rows.items():
        assert row["ok"] > 0 and row["errors"] == {} and row["backend"] == "openssl", (key, row)
        assert row["p50_ms"] > 0 and row["p99_ms"] >= row["p50_ms"], (key, row)
        assert row["server_cpu_us_per_op"] > 0, (key, row)
        assert row["negotiated"] == {tier_bench.GROUP: row["concurrency"]}, (key, row)
    diffs = {(d["operation"], d["concurrency"]) for d in report["differences"]}
    assert diffs == {(op, 4) for op in tier_bench.OPS}
    hs = report["handshakes"]
    assert hs["ok"] > 0 and hs["errors"] == {} and hs["connections"] == 2, hs
    assert hs["negotiated"] == {tier_bench.GROUP: hs["ok"]} and hs["server_cpu_us_per_op"] > 0, hs
    assert report["settings"]["connections_per_endpoint"] >= 1
    assert "remote - local" in text and "handshakes/s" in text
