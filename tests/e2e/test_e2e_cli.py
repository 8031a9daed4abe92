"""The admin commands, run as a user would: policy check/explain, audit verify, kms rotate-kek."""

from __future__ import annotations

import json
from pathlib import Path

from ._gateway import cli, init_state, start_gateway

REPO_POLICIES = Path(__file__).resolve().parents[2] / "policies"


def test_policy_check_accepts_the_examples_and_names_file_and_line(tmp_path: Path) -> None:
    ok = cli("policy", "check", str(REPO_POLICIES))
    assert ok.returncode == 0 and "ok:" in ok.stdout
    bad = tmp_path / "policies"
    bad.mkdir()
    (bad / "00.yaml").write_text("version: 1\nrules:\n  - id: r1\n    effect: allow\n    match: {pathh: /x}\n"
                                 "    reason: typo\n")
    proc = cli("policy", "check", str(bad), check=False)
    assert proc.returncode == 1
    assert "00.yaml:5" in proc.stderr and "pathh" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_policy_explain_prints_every_rule_and_the_decision(tmp_path: Path) -> None:
    d = tmp_path / "state"
    cfg = init_state(d)
    key_id = (d / "secrets" / "demo-api-key").read_text().split("_")[1]
    out = cli("policy", "explain", "-c", str(cfg), "--key-id", key_id, "--method", "POST",
              "--path", "/v1/sign", "--algorithm", "ml-dsa-65").stdout
    assert "decision: ALLOW by rule" in out
    assert out.count("no match") >= 3  # every rule's outcome is listed, not only the decider
    free = (
        cli("apikey", "create", "-c", str(cfg), "--tenant", "t", "--plan", "free")
        .stdout.strip()
        .splitlines()[-1]
    )
    out = cli("policy", "explain", "-c", str(cfg), "--key-id", free.split("_")[1], "--method", "POST",
              "--path", "/v1/keys", "--algorithm", "x-wing").stdout
    assert "decision: DENY by rule" in out


def test_audit_verify_passes_then_reports_a_tampered_record(tmp_path: Path) -> None:
    d = tmp_path / "state"
    init_state(d, **{"crypto.backend": "openssl"})
    gw = start_gateway(d)
    try:
        c = gw.client()
        for _ in range(3):
            assert c.call("POST", "/v1/keys", {"algorithm": "ml-kem-768"})[0] == 201
        c.close()
    finally:
        assert gw.stop() == 0
    log = d / "audit" / "audit.log"
    assert cli("audit", "verify", str(log)).returncode == 0
    lines = log.read_text().splitlines()
    rec = json.loads(lines[3])
    rec["tenant"] = "someone-else"
    lines[3] = json.dumps(rec, separators=(",", ":"))
    log.write_text("\n".join(lines) + "\n")
    proc = cli("audit", "verify", str(log), check=False)
    assert proc.returncode == 1
    assert ":4" in proc.stdout + proc.stderr or "seq" in proc.stdout + proc.stderr


def test_rotate_kek_then_serve_with_the_new_kek(tmp_path: Path) -> None:
    d = tmp_path / "state"
    cfg = init_state(d, **{"crypto.backend": "openssl"})
    gw = start_gateway(d)
    try:
        c = gw.client()
        status, key, _ = c.call("POST", "/v1/keys", {"algorithm": "ml-dsa-65"})
        assert status == 201
        status, sig, _ = c.call("POST", "/v1/sign", {"key_id": key["key_id"], "message": "aGk="})
        assert status == 200
        c.close()
    finally:
        assert gw.stop() == 0
    new_kek = d / "kek" / "kek-2.b64"
    out = cli("kms", "rotate-kek", "-c", str(cfg), "--new-kek-file", str(new_kek), "--generate")
    assert "KEK rotated" in out.stdout
    # the old KEK no longer opens the store; the new one does
    assert cli("serve", "-c", str(cfg), check=False, timeout=60).returncode == 2
    text = cfg.read_text().replace("kek/kek.b64", "kek/kek-2.b64")
    cfg.write_text(text)
    gw = start_gateway(d)
    try:
        c = gw.client()
        status, body, _ = c.call("POST", "/v1/verify", {"key_id": key["key_id"], "message": "aGk=",
                                                        "signature": sig["signature"]})
        assert (status, body) == (200, {"valid": True})
        assert c.call("POST", "/v1/sign", {"key_id": key["key_id"], "message": "aGk="})[0] == 200
        c.close()
    finally:
        assert gw.stop() == 0
