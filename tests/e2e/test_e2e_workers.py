"""``server.workers: 2`` on real processes: two gateway processes behind one SO_REUSEPORT port.

The supervisor binds a listening socket per gateway process (all on the one port the kernel
picked for the first), keeps its copies, and restarts a gateway that dies on the same sockets:
a connection that reaches the dead process's socket waits in its queue for the new process
instead of failing. Each ``/metrics`` answer names the process that served it
(``qpher_process_info{pid=...}``), which is how these tests see who answered.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from ._gateway import Gateway, cli, gateway_pids, init_state, kms_worker_pids, start_gateway

_PID = re.compile(rb'^qpher_process_info\{pid="(\d+)"\} 1', re.M)


def _wait(what: str, cond: Callable[[], Any], seconds: float = 20) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def _answered_by(gw: Gateway) -> int:
    """One request on a fresh TLS connection; the pid of the gateway process that served it."""
    c = gw.client()
    try:
        status, body, _ = c.call("GET", "/metrics")
    finally:
        c.close()
    assert status == 200, (status, body)
    m = _PID.search(body)
    assert m, body[:500]
    return int(m.group(1))


def _logged(gw: Gateway, msg: str) -> list[dict[str, Any]]:
    return [r for r in gw.read_logs() if r.get("msg") == msg]


def _alive(pid: int) -> bool:
    try:
        state = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines()
                     if ln.startswith("State:"))
    except (FileNotFoundError, StopIteration):
        return False
    return "Z" not in state.split()[1]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One supervisor for the three tests below, which run in this order (the last stops it)."""
    d = tmp_path_factory.mktemp("workers") / "state"
    init_state(d, **{"crypto.backend": "openssl", "server.workers": 2, "server.listen": ["127.0.0.1:0"]})
    (d / "policies" / "05-host.yaml").write_text(yaml.safe_dump(HOST_PLAN, sort_keys=False))
    gw = start_gateway(d)
    try:
        _wait("both gateways serving", lambda: len(_logged(gw, "serving")) >= 2)
        yield gw
    finally:
        gw.stop(signal.SIGKILL)


def test_two_gateways_share_one_port_and_both_serve(gw: Gateway) -> None:
    serving = _logged(gw, "serving")
    assert sorted(r["gateway"] for r in serving) == [0, 1]
    assert {tuple(r["listen"]) for r in serving} == {(f"127.0.0.1:{gw.port}",)}  # one port for both
    pids = gateway_pids(gw.proc.pid)
    assert len(pids) == 2
    assert len(kms_worker_pids(gw.proc.pid)) == 2  # kms.workers: 1 per gateway process
    if importlib.util.find_spec("qpher_proxy.ratelimit.shared") is not None:
        for pid in pids:  # the supervisor's shared rate-limit table reached each gateway
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
            assert any(ln.startswith("/memfd:qpher-ratelimit") for ln in links), links

    seen: set[int] = set()
    for _ in range(200):  # fresh connections: the kernel spreads them over the two sockets
        seen.add(_answered_by(gw))
        if seen == set(pids):
            break
    assert seen == set(pids)


HOST_RATE, HOST_BURST = 20, 5
HOST_PLAN = {
    "version": 1,
    "plans": {"host": {"rate_limit": {"requests_per_second": HOST_RATE, "burst": HOST_BURST},
                       "operations": ["info"], "algorithms": ["ml-dsa-65"]}},
}


def test_a_plans_rate_limit_holds_for_the_host_not_per_process(gw: Gateway) -> None:
    # ratelimit.backend local with two processes: one table in shared memory for the host.
    out = cli("apikey", "create", "--config", str(gw.directory / "config.yaml"), "--tenant", "t-host",
              "--plan", "host").stdout
    key = next(w for w in out.split() if w.startswith("qph_"))
    statuses: dict[int, int] = {}
    served_by: set[int] = set()
    seconds = 2.0
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        c = gw.client(key)  # a fresh connection each time: the kernel spreads them
        try:
            status, _, _ = c.call("GET", "/v1/info")
        finally:
            c.close()
        statuses[status] = statuses.get(status, 0) + 1
        if len(served_by) < 2:
            served_by.add(_answered_by(gw))
    elapsed = time.monotonic() - start
    expected = HOST_RATE * elapsed + HOST_BURST
    assert set(statuses) == {200, 429}, statuses
    assert served_by == set(gateway_pids(gw.proc.pid))
    # per-process buckets would admit twice as many
    assert abs(statuses[200] - expected) <= 0.15 * expected, (statuses, expected)


def test_a_killed_gateway_is_restarted_on_the_same_port_while_the_other_serves(gw: Gateway) -> None:
    victim, survivor = gateway_pids(gw.proc.pid)
    os.kill(victim, signal.SIGKILL)
    _wait("the killed gateway to be reaped", lambda: not _alive(victim))
    # Every request succeeds: those that reach the dead process's socket wait in its queue
    # (the supervisor holds the socket) until the restarted process accepts them.
    answered: list[int] = []
    deadline = time.monotonic() + 25
    while time.monotonic() < deadline:
        answered.append(_answered_by(gw))
        if len(set(answered) - {survivor}) >= 1 and survivor in answered:
            break
    restarted = set(answered) - {survivor, victim}
    assert victim not in answered and survivor in answered, answered
    assert len(restarted) == 1, answered
    assert sorted(gateway_pids(gw.proc.pid)) == sorted([survivor, *restarted])
    exited = _logged(gw, "the gateway process exited; restarting it")
    assert [r["exit_code"] for r in exited] == [-signal.SIGKILL]
    assert len(_logged(gw, "serving")) == 3
    assert len(kms_worker_pids(gw.proc.pid)) == 2  # the victim's KMS worker was replaced


def test_sighup_reaches_both_and_sigterm_stops_every_process(gw: Gateway) -> None:
    children = gateway_pids(gw.proc.pid) + kms_worker_pids(gw.proc.pid)
    assert len(children) == 4
    restarts = len(_logged(gw, "the gateway process exited; restarting it"))
    gw.proc.send_signal(signal.SIGHUP)
    reloaded = _wait("both gateways to reload",
                     lambda: (lambda r: r if len(r) >= 2 else None)(_logged(gw, "TLS certificates reloaded")))
    assert sorted(r["gateway"] for r in reloaded) == [0, 1]
    assert gw.stop(signal.SIGTERM) == 0
    assert [p for p in children if _alive(p)] == []
    assert len(_logged(gw, "the gateway process exited; restarting it")) == restarts


def test_an_env_kek_reaches_the_kms_workers_of_every_gateway(tmp_path: Path) -> None:
    # Each gateway's KMS supervisor gets its own copy of the KEK memfd; a key created through
    # one process is usable through the other (one key store, two sets of workers).
    d = tmp_path / "state"
    init_state(d, **{"crypto.backend": "openssl", "server.workers": 2, "kms.kek.provider": "env"})
    kek_text = (d / "kek" / "kek.b64").read_text().strip()
    gw = start_gateway(d, env={**os.environ, "QPHER_KEK": kek_text})
    try:
        _wait("both gateways serving", lambda: len(_logged(gw, "serving")) >= 2)
        c = gw.client()
        status, key, _ = c.call("POST", "/v1/keys", {"algorithm": "ml-dsa-65"})
        c.close()
        assert status == 201
        seen: set[int] = set()
        for _ in range(200):
            c = gw.client()
            status, body, _ = c.call("POST", "/v1/sign", {"key_id": key["key_id"], "message": "aGk="})
            assert status == 200, body
            status, text, _ = c.call("GET", "/metrics")  # the same keep-alive connection
            c.close()
            m = _PID.search(text)
            assert status == 200 and m
            seen.add(int(m.group(1)))
            if len(seen) == 2:
                break
        assert seen == set(gateway_pids(gw.proc.pid))
    finally:
        assert gw.stop() == 0
