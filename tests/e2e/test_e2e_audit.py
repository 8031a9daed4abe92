"""The transparent audit log through a real gateway: checkpoints signed by the KMS, proofs and
verifier keys over HTTPS, scopes, automatic checkpoints, and offline verification of the files."""

from __future__ import annotations

import base64
import glob
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qpher_proxy.audit.merkle import leaf_hash, verify_consistency, verify_inclusion
from qpher_proxy.audit.note import Verifier, open_note, parse_checkpoint
from qpher_proxy.audit.tree import iter_log_lines

from ._gateway import Gateway, cli, init_state, start_gateway


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    d = tmp_path_factory.mktemp("e2e-audit") / "state"
    init_state(d, **{"audit.checkpoint_records": 8, "audit.checkpoint_interval": 3600,
                     "audit.origin": "e2e.example/audit"})
    gw = start_gateway(d)
    yield gw
    gw.stop()


def _log_files(gw: Gateway) -> list[str]:
    return sorted(glob.glob(str(gw.directory / "audit" / "audit.log*")))


def _lines(gw: Gateway) -> list[bytes]:
    return list(iter_log_lines([str(gw.directory / "audit" / "audit.log")]))


def _size(note: bytes) -> int:
    return parse_checkpoint(note.decode().split("\n\n")[0] + "\n").size


def _traffic(gw: Gateway, n: int) -> None:
    c = gw.client(gw.demo_key)
    try:
        for _ in range(n):
            assert c.call("GET", "/v1/info")[0] == 200
    finally:
        c.close()


def test_checkpoints_proofs_and_vkeys_verify_offline(gateway: Gateway, tmp_path: Path) -> None:
    c = gateway.client(gateway.demo_key)  # the demo key has the admin scope
    _traffic(gateway, 3)
    status, body, headers = c.call("POST", "/v1/audit/checkpoint")
    assert status == 200 and headers["content-type"] == "text/plain; charset=utf-8", body
    status, vkeys, _ = c.call("GET", "/v1/audit/vkeys")
    assert status == 200
    verifiers = [Verifier.from_vkey(v) for v in vkeys.decode().splitlines()]
    assert [v.algorithm for v in verifiers] == ["ML-DSA-65", "Ed25519"]
    cp1 = parse_checkpoint(open_note(body.decode(), verifiers, require_all=True).text)
    assert cp1.origin == "e2e.example/audit" and cp1.size >= 3

    lines = _lines(gateway)
    for index in (0, cp1.size // 2, cp1.size - 1):
        status, proof, _ = c.call("GET", f"/v1/audit/proof/inclusion?index={index}&tree_size={cp1.size}")
        assert status == 200 and proof["leaf_index"] == index and proof["tree_size"] == cp1.size
        verify_inclusion(index, cp1.size, leaf_hash(lines[index]),
                         [base64.b64decode(h) for h in proof["hashes"]], cp1.root)

    _traffic(gateway, 4)
    status, body2, _ = c.call("POST", "/v1/audit/checkpoint")
    assert status == 200
    cp2 = parse_checkpoint(open_note(body2.decode(), verifiers, require_all=True).text)
    assert cp2.size > cp1.size
    status, proof, _ = c.call("GET", f"/v1/audit/proof/consistency?first={cp1.size}&second={cp2.size}")
    assert status == 200 and (proof["first"], proof["second"]) == (cp1.size, cp2.size)
    hashes = [base64.b64decode(h) for h in proof["hashes"]]
    verify_consistency(cp1.size, cp2.size, hashes, cp1.root, cp2.root)
    status, latest, _ = c.call("GET", "/v1/audit/checkpoint")
    assert status == 200 and parse_checkpoint(open_note(latest.decode(), verifiers).text).size >= cp2.size

    for bad in ("index=0", "index=x&tree_size=3", f"index=0&tree_size={10**9}", "index=5&tree_size=5",
                "index=-1&tree_size=3", "index=0&tree_size=3&extra=1"):
        status, err, _ = c.call("GET", f"/v1/audit/proof/inclusion?{bad}")
        assert status == 400 and err["error"]["code"] == "invalid_proof_request", (bad, err)
    status, err, _ = c.call("GET", "/v1/audit/proof/consistency?first=0&second=3")
    assert status == 400 and err["error"]["code"] == "invalid_proof_request"
    c.close()

    vk, cpf1, cpf2 = tmp_path / "vkeys", tmp_path / "cp1", tmp_path / "cp2"
    vk.write_bytes(vkeys)
    cpf1.write_bytes(body)
    cpf2.write_bytes(body2)
    proc = cli("audit", "verify", "--vkey", str(vk), "--checkpoint", str(cpf1), "--checkpoint", str(cpf2),
               *_log_files(gateway), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"ok: lines 0..{cp2.size - 1}" in proc.stdout and "not yet attested" in proc.stdout

    env = {**os.environ, "QPHER_API_KEY": gateway.demo_key}
    url = f"https://{gateway.host}:{gateway.port}"
    config = str(gateway.directory / "config.yaml")
    out = cli("audit", "vkeys", "-c", config, "--url", url, env=env).stdout
    assert out.encode() == vkeys
    out = cli("audit", "checkpoint", "-c", config, "--url", url, env=env).stdout
    assert parse_checkpoint(open_note(out, verifiers, require_all=True).text).size > cp2.size


def test_scopes_decide_who_reads_and_who_forces(gateway: Gateway) -> None:
    config = str(gateway.directory / "config.yaml")
    auditor = cli("apikey", "create", "-c", config, "--tenant", "e2e-auditor", "--plan", "free",
                  "--scope", "audit").stdout.strip().splitlines()[-1]
    plain = cli("apikey", "create", "-c", config, "--tenant", "e2e-plain",
                "--plan", "pro").stdout.strip().splitlines()[-1]
    a, p = gateway.client(auditor), gateway.client(plain)
    try:
        assert a.call("GET", "/v1/audit/vkeys")[0] == 200
        assert a.call("GET", "/v1/audit/proof/inclusion?index=0&tree_size=1")[0] == 200
        status, err, _ = a.call("POST", "/v1/audit/checkpoint")
        assert status == 403 and err["error"]["code"] == "policy_denied"
        for path in ("/v1/audit/checkpoint", "/v1/audit/vkeys",
                     "/v1/audit/proof/consistency?first=1&second=1"):
            status, err, _ = p.call("GET", path)
            assert status == 403 and err["error"]["code"] == "policy_denied", path
    finally:
        a.close()
        p.close()


def test_checkpoints_come_by_themselves_after_checkpoint_records(gateway: Gateway) -> None:
    c = gateway.client(gateway.demo_key)
    try:
        before = _size(c.call("GET", "/v1/audit/checkpoint")[1])
        _traffic(gateway, 10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if _size(c.call("GET", "/v1/audit/checkpoint")[1]) > before:
                break
            time.sleep(0.2)
        else:
            pytest.fail("no automatic checkpoint after checkpoint_records records")
    finally:
        c.close()
    records = [line for line in _lines(gateway) if b'"event":"audit.checkpoint"' in line]
    assert len(records) >= 4
