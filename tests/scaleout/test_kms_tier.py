"""A remote KMS tier: one gateway, two KMS nodes over post-quantum mutual TLS (issue 14's acceptance).

Real processes on 127.0.0.1: two ``qpher-proxy kms serve`` nodes (each with a KMS worker) sharing
the machine's PostgreSQL (a fresh database) and one KEK, and a ``qpher-proxy serve`` gateway with
``kms.mode: remote`` whose only KMS is those two nodes. The internal PKI is the one
``qpher-proxy init --internal-pki`` makes. The tests run in file order and share the processes;
the SIGKILL test runs last but one, the lost-connection test (its own gateway) last.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2e._gateway import Gateway, cli, init_state, start_gateway

from qpher_proxy.kms.worker.kek import generate_kek_file
from qpher_proxy.pki import InternalPKI, issue_leaf

from .conftest import PgDatabase, _free_port

PLAN = {
    "version": 1,
    "description": "No limits to speak of: the tier's load tests.",
    "plans": {"tier": {
        "description": "Everything, no practical rate limit.",
        "rate_limit": {"requests_per_second": 100000, "burst": 100000},
        "algorithms": ["ml-kem-768", "ml-dsa-65"],
        "operations": ["keys.*", "kem.*", "encrypt", "decrypt", "sign", "verify", "info"],
    }},
}
START_TIMEOUT = 60.0


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass
class Node:
    """One ``qpher-proxy kms serve`` process and its log (JSON lines)."""

    config: Path
    port: int
    log_file: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "qpher_proxy", "kms", "serve", "-c", str(self.config)],
                stdout=subprocess.DEVNULL, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"KMS node exited {self.proc.returncode}: {self.log_file.read_text()}")
            if any(r.get("msg") == "KMS node serving" for r in self.logs()):
                return
            time.sleep(0.05)
        raise AssertionError(f"KMS node did not start: {self.log_file.read_text()}")

    def logs(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_file.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def kill(self) -> None:
        """SIGKILL the node and its whole session (its KMS worker too)."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int | None:
        """SIGTERM; the exit code (0 for a graceful stop), None if it had to be killed."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                return None
        return self.proc.returncode


@dataclass
class Tier:
    pki: InternalPKI
    nodes: list[Node]
    gateway: Gateway
    key: str  # an API key of the "tier" plan
    tmp: Path


def _node(tmp: Path, name: str, pki: InternalPKI, pg: PgDatabase, kek: Path, port: int) -> Node:
    d = tmp / name
    d.mkdir()
    kms_ml, kms_ec = pki.leaf("kms", "mldsa"), pki.leaf("kms", "ecdsa")
    doc = {
        "kms": {"dir": str(d / "kms"), "workers": 1, "user": None, "kek": {"file": str(kek)}},
        "storage": {"backend": "postgresql", "dsn": pg.dsn, "role_prefix": pg.role_prefix},
        "kms_node": {"listen": [f"127.0.0.1:{port}"],
                     "cert_file": str(kms_ml.cert), "key_file": str(kms_ml.key),
                     "ecdsa_cert_file": str(kms_ec.cert), "ecdsa_key_file": str(kms_ec.key),
                     "client_ca": str(pki.ca_bundle), "client_uri": pki.uri("gateway")},
        "logging": {"format": "json", "level": "info"},
    }
    cfg = d / "kms.yaml"
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    return Node(cfg, port, tmp / f"{name}.log")


def _gateway(tmp: Path, name: str, pki: InternalPKI, endpoints: list[str], **extra: Any) -> Gateway:
    gw_ml = pki.leaf("gateway", "mldsa")
    overrides = {
        "kms.mode": "remote", "kms.endpoints": endpoints,
        "kms.client_cert_file": str(gw_ml.cert), "kms.client_key_file": str(gw_ml.key),
        "kms.ca_file": str(pki.ca_bundle), "kms.server_uri": pki.uri("kms"),
        "kms.reconnect_backoff_max": 0.5, "server.user": None, "kms.user": None,
        **extra,
    }
    cfg = init_state(tmp / name, **overrides)
    (tmp / name / "policies" / "05-tier.yaml").write_text(yaml.safe_dump(PLAN, sort_keys=False))
    return start_gateway(tmp / name, cfg)


def _apikey(gw: Gateway, tenant: str) -> str:
    out = cli("apikey", "create", "--config", str(gw.directory / "config.yaml"), "--tenant", tenant,
              "--plan", "tier").stdout
    return next(w for w in out.split() if w.startswith("qph_"))


@pytest.fixture(scope="module")
def tier(tmp_path_factory: pytest.TempPathFactory, pg_module: PgDatabase) -> Iterator[Tier]:
    tmp = tmp_path_factory.mktemp("tier")
    out = cli("init", "--internal-pki", str(tmp / "pki")).stdout
    assert "kms_node" in out and "mode: remote" in out, out
    pki = InternalPKI.at(tmp / "pki")
    kek = tmp / "kek.b64"
    generate_kek_file(kek)
    nodes = [_node(tmp, f"node{i}", pki, pg_module, kek, _free_port()) for i in (1, 2)]
    cli("db", "migrate", "--config", str(nodes[0].config))
    try:
        for n in nodes:
            n.start()
        gw = _gateway(tmp, "gw", pki, [n.endpoint for n in nodes])
        try:
            _wait_connections(gw, {n.endpoint: 2 for n in nodes})
            yield Tier(pki, nodes, gw, _apikey(gw, "t-tier"), tmp)
        finally:
            gw.stop()
    finally:
        running = [n for n in nodes if n.proc is not None and n.proc.poll() is None]
        codes = [n.stop() for n in running]
    assert codes == [0] * len(running), f"KMS nodes did not stop cleanly on SIGTERM: {codes}"


def _metrics(gw: Gateway) -> dict[str, float]:
    status, body, _ = gw.client().call("GET", "/metrics")
    assert status == 200, body
    text = body.decode() if isinstance(body, bytes) else str(body)
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("qpher_kms_endpoint"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def _connections(gw: Gateway, endpoint: str) -> float:
    return _metrics(gw).get(f'qpher_kms_endpoint_connections{{endpoint="{endpoint}"}}', 0.0)


def _wait_connections(gw: Gateway, want: dict[str, int], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        have = {ep: _connections(gw, ep) for ep in want}
        if all(have[ep] >= n for ep, n in want.items()):
            return
        assert time.monotonic() < deadline, f"connections {have}, wanted {want}"
        time.sleep(0.1)


def test_every_internal_connection_is_x25519mlkem768_with_mldsa65_both_ways(tier: Tier) -> None:
    tier.gateway.read_logs()
    gw_side = [r for r in tier.gateway.log_lines if r.get("msg") == "KMS node connected"]
    node_side = [r for n in tier.nodes for r in n.logs() if r.get("msg") == "KMS caller connected"]
    assert len({(r["endpoint"]) for r in gw_side}) == 2 and len(node_side) >= 4, (gw_side, node_side)
    for r in gw_side:  # what the gateway saw of each node
        assert (r["group"], r["version"], r["peer_key"], r["signature_scheme"], r["peer_uri"]) == (
            "X25519MLKEM768", "TLSv1.3", "ML-DSA-65", "mldsa65", tier.pki.uri("kms")), r
    for r in node_side:  # what each node saw of the gateway
        assert (r["group"], r["version"], r["peer_key"], r["signature_scheme"], r["peer_uri"]) == (
            "X25519MLKEM768", "TLSv1.3", "ML-DSA-65", "mldsa65", tier.pki.uri("gateway")), r
    # ... and the API works through them: the answer says which backend the nodes run
    status, info, _ = tier.gateway.client(tier.key).call("GET", "/v1/info")
    assert status == 200 and info["backend"]["name"] in ("liboqs", "openssl"), info


def _tls_client(pki: InternalPKI, *, cert: tuple[Path, Path] | None, groups: str = "X25519MLKEM768",
                ca: Path | None = None) -> Any:
    from OpenSSL import SSL

    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_verify(SSL.VERIFY_NONE)
    if cert is not None:
        ctx.use_certificate_chain_file(str(cert[0]))
        ctx.use_privatekey_file(str(cert[1]))
    from qpher_proxy.tls import _openssl

    assert _openssl.set_groups(ctx, tuple(groups.split(":")))
    return ctx


def _handshake(node: Node, ctx: Any) -> str | None:
    """A blocking pyOpenSSL handshake with ``node``: None if the node accepted us (no alert
    within a second after the handshake), else what OpenSSL reported."""
    import select

    from OpenSSL import SSL

    with socket.create_connection(("127.0.0.1", node.port), timeout=5) as sock:
        sock.settimeout(None)  # blocking: pyOpenSSL does not wait on a socket with a timeout
        conn = SSL.Connection(ctx, sock)
        conn.set_connect_state()
        try:
            conn.do_handshake()
            # TLS 1.3: the server checks the client certificate after the client's Finished;
            # a refusal arrives as an alert on our first read.
            # (a TLS 1.3 server also sends session tickets, so readable is not refused)
            select.select([sock], [], [], 0.5)
            time.sleep(0.2)
            sock.setblocking(False)
            conn.recv(1024)
        except SSL.WantReadError:
            return None  # no alert, no close: the node is waiting for our HELLO
        except SSL.ZeroReturnError:
            return "closed"
        except (SSL.Error, OSError) as exc:
            return str(exc) or type(exc).__name__
    return "the node sent data before our HELLO"


def test_callers_without_the_gateway_role_are_refused_and_logged(tier: Tier) -> None:
    pki, node = tier.pki, tier.nodes[0]
    other = InternalPKI.at(tier.tmp / "other-pki")
    from qpher_proxy.pki import make_internal_pki

    make_internal_pki(other.directory)
    wrong_role = issue_leaf(pki, "not-a-gateway", uris=[pki.uri("batch-job")], directory=tier.tmp / "extra")
    gw_ml = pki.leaf("gateway", "mldsa")
    gw_ec = pki.leaf("gateway", "ecdsa")
    before = len([r for r in node.logs() if r.get("msg") == "KMS caller refused in the TLS handshake"])
    cases = {
        "no certificate": _tls_client(pki, cert=None),
        "another CA": _tls_client(pki, cert=(other.leaf("gateway", "mldsa").cert,
                                             other.leaf("gateway", "mldsa").key)),
        "not the gateway role": _tls_client(pki, cert=(wrong_role.cert, wrong_role.key)),
        "classical key exchange only": _tls_client(pki, cert=(gw_ml.cert, gw_ml.key), groups="X25519"),
    }
    for what, ctx in cases.items():
        assert _handshake(node, ctx) is not None, f"{what}: the node accepted the handshake"
    # the right certificate with the right group gets through (the check above is not vacuous)
    good = _tls_client(pki, cert=(gw_ml.cert, gw_ml.key))
    assert _handshake(node, good) is None
    assert gw_ec.cert.exists()
    deadline = time.monotonic() + 5
    while True:
        refused = [r for r in node.logs() if r.get("msg") == "KMS caller refused in the TLS handshake"]
        if len(refused) - before >= len(cases) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    new = refused[before:]
    assert len(new) == len(cases), new
    assert all(r["reason"] and r["peer"].startswith("127.0.0.1:") for r in new), new
    reasons = " | ".join(r["reason"] for r in new)
    assert "gateway" in reasons or "URI" in reasons or "uri" in reasons, reasons


def _peer_serial(node: Node, pki: InternalPKI) -> int:
    from OpenSSL import SSL

    ml = pki.leaf("gateway", "mldsa")
    ctx = _tls_client(pki, cert=(ml.cert, ml.key))
    with socket.create_connection(("127.0.0.1", node.port), timeout=5) as sock:
        sock.settimeout(None)
        conn = SSL.Connection(ctx, sock)
        conn.set_connect_state()
        conn.do_handshake()
        cert = conn.get_peer_certificate(as_cryptography=True)
        assert cert is not None
        return int(cert.serial_number)


def _wait_log(read: Any, msg: str, count: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while sum(1 for r in read() if r.get("msg") == msg) < count:
        assert time.monotonic() < deadline, f"no {msg!r} in the log"
        time.sleep(0.05)


def test_sighup_reloads_certificates_on_the_node_and_the_gateway(tier: Tier) -> None:
    import shutil

    from cryptography import x509

    pki, node, gw = tier.pki, tier.nodes[0], tier.gateway
    kms_ml = pki.leaf("kms", "mldsa")
    old_serial = _peer_serial(node, pki)
    assert old_serial == x509.load_pem_x509_certificate(kms_ml.cert.read_bytes()).serial_number
    saved = tier.tmp / "saved-kms"
    saved.mkdir()
    for f in (kms_ml.cert, kms_ml.key):
        shutil.copy2(f, saved / f.name)
    try:
        # a new certificate for the same role: new callers get it, the gateway keeps working
        fresh = issue_leaf(pki, "kms-mldsa", uris=[pki.uri("kms")], client=False, server=True,
                           hosts=["127.0.0.1"], force=True)
        assert fresh.cert == kms_ml.cert
        assert node.proc is not None
        node.proc.send_signal(signal.SIGHUP)
        _wait_log(node.logs, "SIGHUP: KMS node certificates reloaded", 1)
        new_serial = _peer_serial(node, pki)
        assert new_serial != old_serial
        # a broken set is refused and the current one stays in force
        kms_ml.key.write_bytes(b"not a key")
        node.proc.send_signal(signal.SIGHUP)
        _wait_log(node.logs, "TLS reload rejected, keeping the current certificates", 1)
        assert _peer_serial(node, pki) == new_serial
    finally:
        for f in (kms_ml.cert, kms_ml.key):
            shutil.copy2(saved / f.name, f)
    node.proc.send_signal(signal.SIGHUP)
    _wait_log(node.logs, "SIGHUP: KMS node certificates reloaded", 2)
    assert _peer_serial(node, pki) == old_serial
    # the gateway side: SIGHUP rereads its client certificates for new connections
    gw.proc.send_signal(signal.SIGHUP)
    _wait_log(lambda: (gw.read_logs(), gw.log_lines)[1], "KMS client certificates reloaded", 1)
    assert gw.client(tier.key).call("GET", "/v1/info")[0] == 200


def _sign_load(gw: Gateway, key: str, key_id: str, stop: threading.Event, out: Counter[str],
               errors: list[Any], lock: threading.Lock) -> None:
    client = gw.client(key)
    while not stop.is_set():
        status, body, _ = client.call("POST", "/v1/sign", {"key_id": key_id, "message": b64(b"tier")})
        with lock:
            if status == 200:
                out["ok"] += 1
            else:
                out[f"{status} {body['error']['code']}"] += 1
                errors.append(body)


def test_sigkill_one_node_under_sign_load_fails_only_its_in_flight_requests_and_rejoins(tier: Tier) -> None:
    gw, key = tier.gateway, tier.key
    status, created, _ = gw.client(key).call("POST", "/v1/keys", {"algorithm": "ml-dsa-65"})
    assert status == 201, created
    key_id = created["key_id"]
    before = _metrics(gw)
    stop, lock = threading.Event(), threading.Lock()
    counts: Counter[str] = Counter()
    errors: list[Any] = []
    threads = [threading.Thread(target=_sign_load, args=(gw, key, key_id, stop, counts, errors, lock))
               for _ in range(6)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        victim, survivor = tier.nodes
        ok_before_kill = counts["ok"]
        victim.kill()
        time.sleep(1.0)
        ok_after_kill = counts["ok"]
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    print(f"\nsign load across the SIGKILL: {dict(counts)}")
    assert ok_before_kill > 0 and ok_after_kill - ok_before_kill > 20, counts  # the survivor serves
    failed = {k: v for k, v in counts.items() if k != "ok"}
    # only requests in flight on the killed node's connections fail, each once: at most one per
    # load thread (each has one request outstanding), and only as 503 kms_unavailable
    gw.read_logs()
    story = [r for r in gw.log_lines if str(r.get("msg", "")).startswith("KMS node")]
    assert set(failed) <= {"503 kms_unavailable"}, (failed, story)
    # Exactly the requests on the killed node's connections failed, none on the survivor's. Each
    # load thread has one request outstanding; once its request failed it may meet the victim's
    # other connection before that one's end is seen too: at most threads x connections.
    after = _metrics(gw)
    lost = f'qpher_kms_endpoint_errors_total{{endpoint="{victim.endpoint}",code="kms_unavailable"}}'
    brief = [(r.get("ts"), r.get("msg"), r.get("endpoint"), r.get("error")) for r in story]
    assert after.get(lost, 0) - before.get(lost, 0) == sum(failed.values()), (
        f"victim errors {before.get(lost, 0)} -> {after.get(lost, 0)}, failed {failed}, "
        f"victim {victim.endpoint}, survivor {survivor.endpoint}, story {brief} LOGFILE {gw.log_file} "
        f"{gw.directory}")
    assert not any(k.startswith(f'qpher_kms_endpoint_errors_total{{endpoint="{survivor.endpoint}"')
                   and v > before.get(k, 0) for k, v in after.items()), (after, story)
    assert sum(failed.values()) <= len(threads) * 2, (failed, errors[:3], story)
    survivor_count = f'qpher_kms_endpoint_duration_seconds_count{{endpoint="{survivor.endpoint}"}}'
    assert after[survivor_count] > before.get(survivor_count, 0)
    assert _connections(gw, victim.endpoint) == 0

    # restarted, it rejoins: the gateway reconnects on its own and sends it requests again
    victim.start()
    _wait_connections(gw, {victim.endpoint: 1})
    victim_count = f'qpher_kms_endpoint_duration_seconds_count{{endpoint="{victim.endpoint}"}}'
    served_before = _metrics(gw).get(victim_count, 0)
    stop.clear()
    threads = [threading.Thread(target=_sign_load, args=(gw, key, key_id, stop, counts, errors, lock))
               for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(30)
    assert _metrics(gw).get(victim_count, 0) > served_before, "the restarted node gets no requests"
    status, readyz, _ = gw.client().call("GET", "/readyz")
    assert status == 200, readyz


class _CuttingProxy:
    """A TCP relay in front of a node that can drop the next answer and cut the connection:
    the request reaches the node (and runs there), the answer never reaches the gateway."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.armed = threading.Event()
        self.cut = threading.Event()
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                a, _ = self.listener.accept()
            except OSError:
                return
            b = socket.create_connection(("127.0.0.1", self.target))
            self.pairs.append((a, b))
            threading.Thread(target=self._pump, args=(a, b, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(b, a, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, answers: bool) -> None:
        try:
            while data := src.recv(65536):
                if answers and self.armed.is_set():
                    self.armed.clear()
                    self.cut.set()
                    for s in (src, dst):
                        s.shutdown(socket.SHUT_RDWR)
                    return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def close(self) -> None:
        """Stop relaying: the listener and every relayed connection (shut down first, which
        wakes a pump blocked in recv; a bare close from another thread would not)."""
        self.listener.close()
        for pair in self.pairs:
            for s in pair:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()


def test_key_creation_retried_after_a_lost_connection_creates_exactly_one_key(tier: Tier) -> None:
    node = tier.nodes[1]
    proxy = _CuttingProxy(node.port)
    gw = _gateway(tier.tmp, "gw-cut", tier.pki, [f"127.0.0.1:{proxy.port}"],
                  **{"kms.connections_per_endpoint": 1, "kms.health_interval": 3600})
    try:
        _wait_connections(gw, {f"127.0.0.1:{proxy.port}": 1})
        key = _apikey(gw, "t-retry")
        client = gw.client(key)
        body = {"algorithm": "ml-kem-768", "label": "retried"}
        headers = {"Idempotency-Key": "create-retried-1"}
        proxy.armed.set()
        status, lost, _ = client.call("POST", "/v1/keys", body, headers=headers)
        assert proxy.cut.is_set()
        assert (status, lost["error"]["code"]) == (503, "kms_unavailable"), lost
        _wait_connections(gw, {f"127.0.0.1:{proxy.port}": 1})  # reconnected
        status, again, answer_headers = client.call("POST", "/v1/keys", body, headers=headers)
        assert status == 201, again
        assert {k.lower(): v for k, v in answer_headers.items()}.get("idempotent-replayed") == "true"
        status, listing, _ = client.call("GET", "/v1/keys")
        assert status == 200
        labelled = [k for k in listing["keys"] if k.get("label") == "retried"]
        assert [k["key_id"] for k in labelled] == [again["key_id"]], listing

        # with no KMS node reachable the gateway is not ready, and says why
        proxy.close()
        deadline = time.monotonic() + 10
        while (ready := gw.client().call("GET", "/readyz"))[0] == 200:
            assert time.monotonic() < deadline, "still ready with no KMS node reachable"
            time.sleep(0.1)
        assert ready[0] == 503 and "kms" in json.dumps(ready[1]), ready
        status, down, _ = client.call("POST", "/v1/kem/encapsulate", {"key_id": again["key_id"]})
        assert (status, down["error"]["code"]) == (503, "kms_unavailable"), down
    finally:
        gw.stop()
        proxy.close()
