"""PostgreSQL or Redis stopped under load: clean 503s or the local fallback, never a hang, and
service resumes when they return. Both servers are the test's own (another port), so stopping
them disturbs nothing else on the machine."""

from __future__ import annotations

import base64
import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2e._gateway import Gateway, cli, init_state, start_gateway

from .conftest import OwnPostgres, _free_port

GENEROUS = {
    "version": 1,
    "plans": {"outage": {"rate_limit": {"requests_per_second": 100000, "burst": 100000},
                         "algorithms": ["ml-dsa-65"], "operations": ["keys.*", "sign", "verify", "info"]}},
}
TRANSIENT_503 = {"storage_unavailable", "quota_unavailable", "kms_store_unavailable"}


class OwnRedis:
    def __init__(self, base: Path) -> None:
        self.port = _free_port()
        self.base = base
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.base)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        ping = ["redis-cli", "-p", str(self.port), "ping"]
        while subprocess.run(ping, capture_output=True).stdout.strip() != b"PONG":
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)

    def shutdown(self) -> None:
        subprocess.run(["redis-cli", "-p", str(self.port), "shutdown", "nosave"], capture_output=True)
        if self.proc is not None:
            self.proc.wait(10)


@pytest.fixture(scope="module")
def node(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Gateway, OwnPostgres, OwnRedis, str, str]]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (the machines of this project provide it)")
    base = tmp_path_factory.mktemp("outage")
    pg_base = Path("/tmp") / f"qpher-pg-{base.name}"
    pg_base.mkdir(mode=0o755)
    pg = OwnPostgres(pg_base)
    redis = OwnRedis(base)
    d = base / "state"
    init_state(d, **{
        "storage.backend": "postgresql", "storage.dsn": pg.dsn, "storage.role_prefix": "qpher",
        "storage.connect_timeout": 1.0, "storage.statement_timeout": 1.0, "storage.pool_timeout": 1.0,
        "ratelimit.backend": "redis", "ratelimit.redis_url": f"redis://127.0.0.1:{redis.port}/0",
        "ratelimit.retry_interval": 0.5, "quotas.flush_interval": 0.2, "crypto.backend": "openssl",
    })
    (d / "policies" / "05-outage.yaml").write_text(yaml.safe_dump(GENEROUS, sort_keys=False))
    cfg = str(d / "config.yaml")
    cli("db", "migrate", "--config", cfg)
    out = cli("apikey", "create", "--config", cfg, "--tenant", "t-out", "--plan", "outage").stdout
    key = next(w for w in out.split() if w.startswith("qph_"))
    gw = start_gateway(d)
    try:
        status, body, _ = gw.client(key).call("POST", "/v1/keys", {"algorithm": "ml-dsa-65"})
        assert status == 201, body
        yield gw, pg, redis, key, body["key_id"]
    finally:
        gw.stop()
        redis.shutdown()
        try:
            pg.stop()
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(pg_base, ignore_errors=True)


class Load:
    """Two client threads signing in a loop; every answer's status, code and duration."""

    def __init__(self, gw: Gateway, key: str, key_id: str, path: str = "/v1/sign") -> None:
        self.results: list[tuple[float, int, str, str | None, float]] = []
        self._stop = threading.Event()
        body: Any = {"key_id": key_id, "message": base64.b64encode(b"load").decode()}
        if path == "/v1/info":
            body = None

        def run() -> None:
            client = gw.client(key)
            while not self._stop.is_set():
                t0 = time.monotonic()
                status, value, headers = client.call("GET" if body is None else "POST", path, body)
                code = value["error"]["code"] if isinstance(value, dict) and "error" in value else ""
                self.results.append((t0, status, code, headers.get("retry-after"), time.monotonic() - t0))
                time.sleep(0.005)

        self._threads = [threading.Thread(target=run) for _ in range(2)]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def between(self, t0: float, t1: float) -> list[tuple[float, int, str, str | None, float]]:
        return [r for r in self.results if t0 <= r[0] < t1]


def test_postgresql_stopped_mid_load_gives_clean_503s_and_service_resumes(node: Any) -> None:
    gw, pg, _redis, key, key_id = node
    load = Load(gw, key, key_id)
    try:
        time.sleep(0.5)
        stopped_at = time.monotonic()
        pg.stop()
        time.sleep(3.0)
        restarted_at = time.monotonic()
        pg.start()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            recent = [r for r in load.results if r[0] > time.monotonic() - 0.5]
            if len(recent) >= 5 and all(r[1] == 200 for r in recent):
                break
            time.sleep(0.1)
        else:
            raise AssertionError("service did not resume within 15 s of PostgreSQL's return")
        resumed_at = time.monotonic()
        print(f"\nresumed {resumed_at - restarted_at:.2f} s after PostgreSQL came back")
        time.sleep(1.0)
    finally:
        load.stop()
    before = load.between(0, stopped_at)
    # started once the staleness windows had passed, and answered before PostgreSQL was back
    during = [r for r in load.between(stopped_at + 2.0, restarted_at) if r[0] + r[4] < restarted_at]
    after = load.between(resumed_at, float("inf"))
    assert before and all(r[1] == 200 for r in before), Counter((r[1], r[2]) for r in before)
    assert during, "no request was answered while PostgreSQL was down"
    assert all(r[1] == 503 and r[2] in TRANSIENT_503 and r[3] for r in during), \
        Counter((r[1], r[2], r[3]) for r in during)
    assert after and all(r[1] == 200 for r in after), Counter((r[1], r[2]) for r in after)
    # never a hang: the slowest answer is bounded by the configured timeouts (1 s each)
    slowest = max(r[4] for r in load.results)
    assert slowest < 5.0, slowest
    assert all(r[1] in (200, 503) for r in load.results), Counter((r[1], r[2]) for r in load.results)


def test_redis_stopped_mid_load_falls_back_to_local_limits_and_comes_back(node: Any) -> None:
    gw, _pg, redis, key, key_id = node
    load = Load(gw, key, key_id, path="/v1/info")
    try:
        time.sleep(0.5)
        redis.shutdown()
        time.sleep(1.5)
        redis.start()
        time.sleep(1.5)
    finally:
        load.stop()
    statuses = Counter(r[1] for r in load.results)
    assert set(statuses) == {200}, statuses  # the generous plan, counted locally meanwhile
    assert max(r[4] for r in load.results) < 2.0
    warnings = [r for r in gw.read_logs() if r.get("level") == "warning" and "redis" in str(r).lower()]
    assert 1 <= len(warnings) <= 2, warnings  # one when falling back (no line per request)
