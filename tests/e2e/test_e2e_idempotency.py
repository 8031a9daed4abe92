"""Idempotency-Key end to end: the real CLI, real TLS and the real KMS worker process. A retried
creation or rotation answers the first result with ``Idempotent-Replayed: true`` and creates
nothing; another request with the same key is 409; a malformed key is 400; the audit log marks
the replay and, like the gateway's logs, never holds the key itself. Every answer is checked
against openapi.yaml (``CheckedClient``)."""

from __future__ import annotations

import glob
import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ._gateway import Gateway
from ._openapi_check import CheckedClient


@pytest.fixture(scope="module")
def api(gateway: Gateway) -> Iterator[CheckedClient]:
    c = CheckedClient(gateway.client())
    yield c
    c.close()


def _keys_labelled(api: CheckedClient, label: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = api.ok("GET", "/v1/keys?limit=100" + (f"&cursor={cursor}" if cursor else ""))
        found += [k for k in page["keys"] if k["label"] == label]
        cursor = page["next_cursor"]
        if cursor is None:
            return found


def _audit_records(gateway: Gateway) -> list[dict[str, Any]]:
    files = sorted(glob.glob(str(gateway.directory / "audit" / "audit.log*")))
    files = [f for f in files if not f.endswith(".lock")]
    return [json.loads(line) for f in files for line in Path(f).read_text().splitlines() if line]


def test_a_retried_creation_answers_the_first_key_with_the_replay_header(
    api: CheckedClient, gateway: Gateway
) -> None:
    key = f"e2e-create-{secrets.token_hex(8)}"
    label = f"e2e-idem-{secrets.token_hex(4)}"
    body = {"kind": "signature", "label": label}
    s1, first, h1 = api.call("POST", "/v1/keys", body, headers={"Idempotency-Key": key})
    s2, again, h2 = api.call("POST", "/v1/keys", body, headers={"Idempotency-Key": key})
    assert (s1, s2) == (201, 201)
    assert h1.get("Idempotent-Replayed") is None and h2.get_all("Idempotent-Replayed") == ["true"]
    assert again == first  # the same key, the same body
    assert len(_keys_labelled(api, label)) == 1
    # the same key for another request: 409, nothing created
    status, code, _ = api.error("POST", "/v1/keys", {"kind": "signature", "label": label + "-2"},
                                headers={"Idempotency-Key": key})
    assert (status, code) == (409, "idempotency_key_reused")
    assert _keys_labelled(api, label + "-2") == []
    # without the header, every request creates
    assert api.ok("POST", "/v1/keys", body)["key_id"] != first["key_id"]
    assert len(_keys_labelled(api, label)) == 2

    events = [r for r in _audit_records(gateway)
              if r["event"] == "key.created" and r.get("key_id") == first["key_id"]]
    assert [e.get("idempotent_replay") for e in events] == [None, True]
    assert key not in json.dumps(_audit_records(gateway))
    assert key not in gateway.raw_log_text()


def test_a_retried_rotation_adds_one_version(api: CheckedClient, gateway: Gateway) -> None:
    kid = api.ok("POST", "/v1/keys", {"kind": "kem"})["key_id"]
    key = f"e2e-rotate-{secrets.token_hex(8)}"
    s1, first, h1 = api.call("POST", f"/v1/keys/{kid}/rotate", headers={"Idempotency-Key": key})
    s2, again, h2 = api.call("POST", f"/v1/keys/{kid}/rotate", headers={"Idempotency-Key": key})
    assert (s1, s2) == (200, 200) and again == first
    assert (first["version"], first["latest_version"]) == (2, 2)
    assert h1.get("Idempotent-Replayed") is None and h2.get("Idempotent-Replayed") == "true"
    assert api.ok("GET", f"/v1/keys/{kid}")["latest_version"] == 2
    status, code, _ = api.error("POST", "/v1/keys", {"kind": "kem"}, headers={"Idempotency-Key": key})
    assert (status, code) == (409, "idempotency_key_reused")
    events = [r for r in _audit_records(gateway) if r["event"] == "key.rotated" and r.get("key_id") == kid]
    assert [e.get("idempotent_replay") for e in events] == [None, True]


@pytest.mark.parametrize("bad", ["a" * 256, "two words", "caf\u00e9"])
def test_a_malformed_key_is_400_and_creates_nothing(api: CheckedClient, bad: str) -> None:
    label = f"e2e-idem-bad-{secrets.token_hex(4)}"
    raw = {"Idempotency-Key": bad.encode("utf-8").decode("latin-1")}  # http.client sends latin-1
    status, code, err = api.error("POST", "/v1/keys", {"kind": "kem", "label": label}, headers=raw)
    assert (status, code) == (400, "invalid_idempotency_key")
    assert bad not in err["message"]
    assert _keys_labelled(api, label) == []
