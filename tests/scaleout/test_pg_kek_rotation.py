"""``qpher-proxy kms rotate-kek`` on PostgreSQL: every sealed version re-wrapped in one transaction,
refused while a node is connected, and every key works under the new KEK afterwards."""

from __future__ import annotations

import base64
from pathlib import Path

import psycopg
import yaml
from e2e._gateway import cli, init_state, start_gateway

from .conftest import PgDatabase


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_rotate_kek_rewraps_every_sealed_version_and_keys_keep_working(
    tmp_path: Path, pg: PgDatabase
) -> None:
    d = tmp_path / "state"
    cfg_path = init_state(d, **{"crypto.backend": "openssl", "storage.backend": "postgresql",
                                "storage.dsn": pg.dsn, "storage.role_prefix": pg.role_prefix})
    cfg = str(cfg_path)
    cli("db", "import-sqlite", "--config", cfg)  # the demo API key moves to PostgreSQL
    new_kek = d / "kek" / "kek-2.b64"
    gw = start_gateway(d)
    try:
        api = gw.client()
        status, sig, _ = api.call("POST", "/v1/keys", {"algorithm": "ml-dsa-65"})
        assert status == 201, sig
        status, kem, _ = api.call("POST", "/v1/keys", {"algorithm": "ml-kem-768"})
        assert status == 201, kem
        status, sealed, _ = api.call("POST", "/v1/encrypt",
                                     {"key_id": kem["key_id"], "plaintext": b64(b"v1")})
        assert status == 200, sealed
        assert api.call("POST", f"/v1/keys/{kem['key_id']}/rotate")[0] == 200
        status, signed, _ = api.call("POST", "/v1/sign", {"key_id": sig["key_id"], "message": b64(b"m")})
        assert status == 200, signed
        refused = cli("kms", "rotate-kek", "--config", cfg, "--new-kek-file", str(new_kek), "--generate",
                      check=False)
        assert refused.returncode != 0 and "stop every node" in refused.stderr, refused.stderr
    finally:
        assert gw.stop() == 0
    with psycopg.connect(pg.dsn) as c:
        before = dict(c.execute("SELECT key_id || version, sealed FROM kms_key_versions").fetchall())

    out = cli("kms", "rotate-kek", "--config", cfg, "--new-kek-file", str(new_kek)).stdout
    assert "KEK rotated" in out, out
    with psycopg.connect(pg.dsn) as c:
        after = dict(c.execute("SELECT key_id || version, sealed FROM kms_key_versions").fetchall())
        kek_ids = {r[0] for r in c.execute("SELECT kek_id FROM kms_key_versions")}
    assert before.keys() == after.keys() and len(after) == 3
    assert all(bytes(before[k]) != bytes(after[k]) for k in after)
    assert len(kek_ids) == 1
    # a re-run finds every version under the new KEK and changes nothing
    again = cli("kms", "rotate-kek", "--config", cfg, "--new-kek-file", str(new_kek)).stdout
    assert "KEK rotated" in again

    # kms.kek now names the new KEK, under which every key works
    doc = yaml.safe_load(cfg_path.read_text())
    doc["kms"]["kek"]["file"] = str(new_kek)
    cfg_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    gw = start_gateway(d)
    try:
        api = gw.client()
        status, body, _ = api.call("POST", "/v1/verify", {"key_id": sig["key_id"], "message": b64(b"m"),
                                                          "signature": signed["signature"]})
        assert (status, body.get("valid")) == (200, True), body
        opened = {"key_id": kem["key_id"], "key_version": 1, "ciphertext": sealed["ciphertext"]}
        status, body, _ = api.call("POST", "/v1/decrypt", opened)
        assert (status, base64.b64decode(body["plaintext"])) == (200, b"v1"), body
        assert api.call("POST", "/v1/sign", {"key_id": sig["key_id"], "message": b64(b"new")})[0] == 200
    finally:
        assert gw.stop() == 0
