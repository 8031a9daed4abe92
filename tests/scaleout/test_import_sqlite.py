"""``qpher-proxy db import-sqlite``, then ``kms rotate-kek`` on PostgreSQL: a single node's state moves
to PostgreSQL and keeps working, then its KEK is rotated in one transaction and it still does.

A real node on SQLite makes keys (a rotated KEM key with a ciphertext of its first version, a
signing key with a signature) and API keys (one revoked); it is stopped, its config switched to
PostgreSQL, the state imported, and the node started again on PostgreSQL: everything answers as
before, byte for byte, and the import refuses to run beside a live node.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import psycopg
import yaml
from e2e._gateway import cli, init_state, start_gateway

from .conftest import PgDatabase


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_a_single_node_moves_to_postgresql_keeps_working_and_survives_a_kek_rotation(
    tmp_path: Path, pg: PgDatabase
) -> None:
    d = tmp_path / "state"
    cfg_path = init_state(d, **{"crypto.backend": "openssl"})
    cfg = str(cfg_path)
    new_kek = d / "kek" / "kek-2.b64"
    gw = start_gateway(d)
    try:
        api = gw.client()

        def ok(method: str, path: str, body: Any = None) -> Any:
            status, value, _ = api.call(method, path, body)
            assert status in (200, 201), (status, value)
            return value

        sig = ok("POST", "/v1/keys", {"algorithm": "ml-dsa-65", "label": "signer"})["key_id"]
        kem = ok("POST", "/v1/keys", {"algorithm": "ml-kem-768"})["key_id"]
        old_ct = ok("POST", "/v1/encrypt", {"key_id": kem, "plaintext": b64(b"under v1")})["ciphertext"]
        assert ok("POST", f"/v1/keys/{kem}/rotate")["latest_version"] == 2
        signature = ok("POST", "/v1/sign", {"key_id": sig, "message": b64(b"signed on sqlite")})["signature"]
        out = cli("apikey", "create", "--config", cfg, "--tenant", "t-gone", "--plan", "free").stdout
        gone = next(w for w in out.split() if w.startswith("qph_"))
        cli("apikey", "revoke", "--config", cfg, gone.split("_")[1])
        status, vkeys_sqlite, _ = api.call("POST", "/v1/audit/checkpoint")  # the audit keys move too
        assert status == 200, vkeys_sqlite
        vkeys_sqlite = api.call("GET", "/v1/audit/vkeys")[1]

        # switch the config to PostgreSQL; importing beside the live node is refused
        doc = yaml.safe_load(cfg_path.read_text())
        doc["storage"] = {"backend": "postgresql", "dsn": pg.dsn, "role_prefix": pg.role_prefix}
        cfg_path.write_text(yaml.safe_dump(doc, sort_keys=False))
        refused = cli("db", "import-sqlite", "--config", cfg, check=False)
        assert refused.returncode == 1 and "stop the proxy" in refused.stderr, refused.stderr
    finally:
        assert gw.stop() == 0

    done = cli("db", "import-sqlite", "--config", cfg).stdout
    assert "imported 2 API keys" in done and "2 keys with 3 sealed versions" in done, done
    assert "1 audit log key set(s)" in done, done
    again = cli("db", "import-sqlite", "--config", cfg).stdout  # a re-run adds nothing
    assert "imported 0 API keys" in again and "2 api_keys" in again and "2 keys" in again, again
    with psycopg.connect(pg.dsn) as c:
        assert c.execute("SELECT count(*) FROM kms_key_versions WHERE sealed IS NOT NULL").fetchone() == (3,)
        assert c.execute("SELECT count(*) FROM kms_meta WHERE name = 'kek_canary'").fetchone() == (1,)

    gw = start_gateway(d)  # now on PostgreSQL
    try:
        api = gw.client()
        status, body, _ = api.call("POST", "/v1/verify", {"key_id": sig, "message": b64(b"signed on sqlite"),
                                                          "signature": signature})
        assert (status, body["valid"]) == (200, True), body
        status, body, _ = api.call("POST", "/v1/sign", {"key_id": sig, "message": b64(b"signed on pg")})
        assert status == 200, body
        opened = {"key_id": kem, "key_version": 1, "ciphertext": old_ct}
        status, body, _ = api.call("POST", "/v1/decrypt", opened)
        assert (status, base64.b64decode(body["plaintext"])) == (200, b"under v1"), body
        status, body, _ = api.call("POST", "/v1/encrypt", {"key_id": kem, "plaintext": b64(b"v2")})
        assert (status, body["key_version"]) == (200, 2), body
        status, body, _ = api.call("GET", f"/v1/keys/{sig}")
        assert (status, body["label"]) == (200, "signer"), body
        assert gw.client(gone).call("GET", "/v1/info")[0] == 401  # still revoked
        assert api.call("GET", "/v1/audit/vkeys")[1] == vkeys_sqlite
        status, body, _ = api.call("POST", "/v1/audit/checkpoint")  # consistent with the one on SQLite
        assert status == 200, body
        refused = cli("kms", "rotate-kek", "--config", cfg, "--new-kek-file", str(new_kek), "--generate",
                      check=False)
        assert refused.returncode != 0 and "stop every node" in refused.stderr, refused.stderr
    finally:
        assert gw.stop() == 0

    # ---- then the KEK of the PostgreSQL store is rotated (the node stopped) ----
    with psycopg.connect(pg.dsn) as c:
        before = dict(c.execute("SELECT key_id || version, sealed FROM kms_key_versions").fetchall())
    assert "KEK rotated" in cli("kms", "rotate-kek", "--config", cfg, "--new-kek-file", str(new_kek)).stdout
    with psycopg.connect(pg.dsn) as c:
        after = dict(c.execute("SELECT key_id || version, sealed FROM kms_key_versions").fetchall())
        kek_ids = {r[0] for r in c.execute("SELECT kek_id FROM kms_key_versions WHERE sealed IS NOT NULL")}
    assert before.keys() == after.keys() and len(after) == 3
    assert all(bytes(before[k]) != bytes(after[k]) for k in after)  # every blob re-wrapped...
    assert len(kek_ids) == 1  # ...under one KEK
    # a re-run finds every version under the new KEK (opening each) and changes nothing
    again = cli("kms", "rotate-kek", "--config", cfg, "--new-kek-file", str(new_kek)).stdout
    assert "rewrapped=0, already=3, total=3" in again, again
    with psycopg.connect(pg.dsn) as c:
        assert dict(c.execute("SELECT key_id || version, sealed FROM kms_key_versions").fetchall()) == after
    doc = yaml.safe_load(cfg_path.read_text())
    doc["kms"]["kek"]["file"] = str(new_kek)  # kms.kek now names the new KEK
    cfg_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    gw = start_gateway(d)
    try:
        api = gw.client()
        status, body, _ = api.call("POST", "/v1/verify", {"key_id": sig, "message": b64(b"signed on sqlite"),
                                                          "signature": signature})
        assert (status, body["valid"]) == (200, True), body
        status, body, _ = api.call("POST", "/v1/decrypt", opened)
        assert (status, base64.b64decode(body["plaintext"])) == (200, b"under v1"), body
    finally:
        assert gw.stop() == 0
