"""Two nodes, one PostgreSQL, one Redis, one KEK: the acceptance test of scaling out.

Two real ``qpher-proxy serve`` processes (supervisor, gateway, KMS worker each) with their own
ports and state directories share the machine's PostgreSQL (a fresh database) and Redis (a
fresh key prefix), and the same KEK and pepper files. Real TLS on 127.0.0.1.
"""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from e2e._gateway import Gateway, cli, init_state, kms_worker_pids, start_gateway

from .conftest import REDIS_HOST, REDIS_PORT, PgDatabase, require_service

RATE = 50  # requests per second for the whole tenant, across both nodes
BURST = 5
SIGN_QUOTA = 40

SCALE_PLAN = {
    "version": 1,
    "description": "A plan for the two-node test.",
    "plans": {
        "scale": {
            "description": "50 requests per second per tenant across all nodes.",
            "rate_limit": {"requests_per_second": 1000, "burst": 1000},
            "tenant_rate_limit": {"requests_per_second": RATE, "burst": BURST},
            "quotas": {"sign": SIGN_QUOTA},
            "algorithms": ["ml-kem-768", "ml-dsa-65"],
            "operations": ["keys.*", "kem.*", "encrypt", "decrypt", "sign", "verify", "info"],
        },
        "bulk": {
            "description": "No limits to speak of: for the load during the SIGKILL.",
            "rate_limit": {"requests_per_second": 100000, "burst": 100000},
            "algorithms": ["ml-kem-768", "ml-dsa-65"],
            "operations": ["keys.*", "kem.*", "encrypt", "decrypt", "sign", "verify", "info"],
        },
    },
}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


README = Path(__file__).resolve().parents[2] / "README.md"


def readme_config() -> dict[str, Any]:
    """The storage and ratelimit sections of README "Running several nodes", as written there."""
    text = README.read_text()
    section = text[text.index("## Running several nodes"):]
    block = section[section.index("```yaml\n") + 8 : section.index("```\n", section.index("```yaml"))]
    doc = yaml.safe_load(block)
    assert set(doc) == {"storage", "ratelimit"}, doc
    return doc


def _node(tmp: Path, name: str, pg: PgDatabase, redis_url: str, redis_prefix: str, twin: Path | None) -> Path:
    directory = tmp / name
    doc = readme_config()
    overrides = {f"{section}.{k}": v for section, values in doc.items() for k, v in values.items()}
    overrides.update({  # this test's own database, Redis prefix, and a short lease
        "storage.dsn": pg.dsn, "storage.role_prefix": pg.role_prefix,
        "storage.lease_ttl": 2.0, "storage.sweep_interval": 0.5,
        "ratelimit.redis_url": redis_url, "ratelimit.key_prefix": redis_prefix,
        "quotas.flush_interval": 0.2, "kms.destroy_delay": 3.0,
    })
    cfg = init_state(directory, **overrides)
    (directory / "policies" / "05-scale.yaml").write_text(yaml.safe_dump(SCALE_PLAN, sort_keys=False))
    if twin is not None:  # every node shares the KEK and the pepper (README: Running several nodes)
        for rel in ("kek/kek.b64", "secrets/pepper"):
            shutil.copyfile(twin / rel, directory / rel)
    return cfg


@pytest.fixture(scope="module")
def pg(pg_module: PgDatabase) -> PgDatabase:
    return pg_module


@pytest.fixture(scope="module")
def nodes(
    tmp_path_factory: pytest.TempPathFactory, pg: PgDatabase
) -> Iterator[tuple[Gateway, Gateway]]:
    """Both nodes for the whole module: the tests run in file order, the SIGKILL one last."""
    require_service("Redis", REDIS_HOST, REDIS_PORT)
    redis_url, redis_prefix = f"redis://{REDIS_HOST}:{REDIS_PORT}/0", f"qt{secrets.token_hex(5)}"
    tmp_path = tmp_path_factory.mktemp("nodes")
    cfg_a = _node(tmp_path, "a", pg, redis_url, redis_prefix, None)
    _node(tmp_path, "b", pg, redis_url, redis_prefix, tmp_path / "a")
    cli("db", "migrate", "--config", str(cfg_a))
    a = start_gateway(tmp_path / "a")
    try:
        b = start_gateway(tmp_path / "b")
    except BaseException:
        a.stop()
        raise
    try:
        yield a, b
    finally:
        for gw in (a, b):
            gw.stop()


def _apikey(gw: Gateway, tenant: str, plan: str) -> str:
    out = cli("apikey", "create", "--config", str(gw.directory / "config.yaml"), "--tenant", tenant,
              "--plan", plan).stdout
    return next(w for w in out.split() if w.startswith("qph_"))


def _paced(gw: Gateway, key: str, method: str, path: str, body: Any = None) -> tuple[int, Any, Any]:
    """One call, no faster than the "scale" plan's tenant rate allows (the functional checks
    must not run into the limit that the rate check further down measures)."""
    time.sleep(1.5 / RATE)
    return gw.client(key).call(method, path, body)


def _ok(gw: Gateway, key: str, method: str, path: str, body: Any = None) -> Any:
    status, value, _ = _paced(gw, key, method, path, body)
    assert status in (200, 201, 202), (status, value)
    return value


def test_two_nodes_share_keys_api_keys_limits_quotas_and_the_sweep(
    nodes: tuple[Gateway, Gateway], pg: PgDatabase
) -> None:
    a, b = nodes
    key = _apikey(a, "t-scale", "scale")

    # -- a key created through A signs and decrypts through B --
    sig = _ok(a, key, "POST", "/v1/keys", {"algorithm": "ml-dsa-65"})["key_id"]
    kem = _ok(a, key, "POST", "/v1/keys", {"algorithm": "ml-kem-768"})["key_id"]
    signature = _ok(b, key, "POST", "/v1/sign", {"key_id": sig, "message": b64(b"two nodes")})["signature"]
    assert _ok(a, key, "POST", "/v1/verify", {"key_id": sig, "message": b64(b"two nodes"),
                                               "signature": signature})["valid"] is True
    sealed = _ok(a, key, "POST", "/v1/encrypt", {"key_id": kem, "plaintext": b64(b"secret")})
    opened = _ok(b, key, "POST", "/v1/decrypt", {"key_id": kem, "ciphertext": sealed["ciphertext"]})
    assert base64.b64decode(opened["plaintext"]) == b"secret"

    # -- a key disabled through A is refused through B within 1 s (and enabled again) --
    spare = _ok(a, key, "POST", "/v1/keys", {"algorithm": "ml-kem-768"})["key_id"]
    assert _paced(b, key, "POST", "/v1/kem/encapsulate", {"key_id": spare})[0] == 200
    _ok(a, key, "POST", f"/v1/keys/{spare}/disable")
    disabled_at = time.monotonic()
    while (answer := _paced(b, key, "POST", "/v1/kem/encapsulate", {"key_id": spare}))[0] != 409:
        assert answer[0] == 200, answer
        assert time.monotonic() - disabled_at < 1.0, "B still uses a key disabled through A"
    assert answer[1]["error"]["code"] == "key_disabled"

    # -- quotas count across both nodes: 4 signs so far (1 on B above, then 3 more here) --
    for gw in (a, b, a):
        _ok(gw, key, "POST", "/v1/sign", {"key_id": sig, "message": b64(b"q")})
    time.sleep(0.6)  # > flush_interval on both nodes
    with psycopg.connect(pg.dsn) as c:
        row = c.execute(
            "SELECT count FROM quota_usage WHERE tenant_id = 't-scale' AND op_class = 'sign'"
        ).fetchone()
    assert row == (4,)

    # -- a plan limited to 50 requests/s admits 50 +- 10 % per second across both nodes --
    time.sleep(BURST / RATE + 0.2)
    admitted = _hammer([a, b], key, seconds=3.0)
    per_second = (admitted["ok"] - BURST) / 3.0
    print(f"\ncross-node rate limit: {per_second:.1f} admitted/s for a limit of {RATE}/s ({dict(admitted)})")
    assert abs(per_second - RATE) <= 0.1 * RATE, admitted
    assert admitted["ok"] and admitted["429"], admitted
    assert admitted.keys() <= {"ok", "429"}, admitted

    # -- an API key revoked on A is refused on B within 1 s --
    victim = _apikey(a, "t-other", "scale")
    assert b.client(victim).call("GET", "/v1/info")[0] == 200
    victim_id = victim.split("_")[1]
    cli("apikey", "revoke", "--config", str(a.directory / "config.yaml"), victim_id)
    revoked_at = time.monotonic()
    client = b.client(victim)
    while client.call("GET", "/v1/info")[0] != 401:
        assert time.monotonic() - revoked_at < 1.0, "B still accepts a key revoked on A"
        time.sleep(0.02)


def _hammer(gateways: list[Gateway], key: str, seconds: float) -> Counter[str]:
    """Two client threads per node calling GET /v1/info as fast as they can."""
    counts: Counter[str] = Counter()
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def run(gw: Gateway) -> None:
        client = gw.client(key)
        local: Counter[str] = Counter()
        while time.monotonic() < stop:
            status, _, _ = client.call("GET", "/v1/info")
            local["ok" if status == 200 else str(status)] += 1
        with lock:
            counts.update(local)

    threads = [threading.Thread(target=run, args=(gw,)) for gw in gateways for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return counts


def test_node_a_killed_under_load_b_keeps_serving_and_takes_the_sweep(
    nodes: tuple[Gateway, Gateway], pg: PgDatabase
) -> None:
    a, b = nodes
    key = _apikey(a, "t-bulk", "bulk")
    sig = _ok(a, key, "POST", "/v1/keys", {"algorithm": "ml-dsa-65"})["key_id"]
    doomed = _ok(a, key, "POST", "/v1/keys", {"algorithm": "ml-kem-768"})["key_id"]
    # scheduled for destruction 3 s from now (kms.destroy_delay): due after A is gone
    assert a.client(key).call("DELETE", f"/v1/keys/{doomed}")[0] == 202

    results: Counter[str] = Counter()
    stop = threading.Event()

    def load() -> None:
        client = b.client(key)
        while not stop.is_set():
            status, _, _ = client.call("POST", "/v1/sign", {"key_id": sig, "message": b64(os.urandom(16))})
            results[str(status)] += 1

    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    a.stop(signal.SIGKILL)  # the supervisor; its children follow
    time.sleep(2.0)
    stop.set()
    for t in threads:
        t.join()
    assert set(results) == {"200"}, results

    # The lease moves to B, whose sweep destroys the due key exactly once. Nothing touches the
    # key meanwhile (a request would destroy it lazily, in its own transaction): watch the rows.
    deadline = time.monotonic() + 15
    with psycopg.connect(pg.dsn, autocommit=True) as c:
        while time.monotonic() < deadline:
            row = c.execute("SELECT state FROM kms_keys WHERE key_id = %s", (doomed,)).fetchone()
            if row == ("destroyed",):
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"the key was not destroyed by B's sweep: {row}")
        holder = c.execute("SELECT holder, token FROM leases WHERE name = 'kms-sweep'").fetchone()
        versions = c.execute(
            "SELECT state, sealed IS NULL FROM kms_key_versions WHERE key_id = %s", (doomed,)
        ).fetchall()
    assert versions == [("destroyed", True)]
    assert holder is not None and int(holder[0].split(":")[1]) in kms_worker_pids(b.proc.pid), holder
    destroyed = [r for gw in (a, b) for r in gw.read_logs() if r.get("msg") == "key destroyed"]
    assert len(destroyed) == 1, destroyed
