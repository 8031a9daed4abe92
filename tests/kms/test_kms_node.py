"""A KMS node whose workers are gone sends its callers elsewhere (in process, real TLS on 127.0.0.1).

The node's worker is stood in for by one end of a socketpair that the test holds (a
``WorkerChannel`` as the supervisor would attach): closing that end is the worker dying. The
gateway side is the real ``RemoteKMS`` over the real internal mutual TLS.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml

from qpher_proxy.context import TenantContext
from qpher_proxy.errors import KMSUnavailable
from qpher_proxy.kms.client import KMSClient, WorkerChannel
from qpher_proxy.kms.client.remote import RemoteKMS
from qpher_proxy.kms.wire.protocol import NEED_DATA, ClientConnection, Error, Ready
from qpher_proxy.pki import InternalPKI, make_internal_pki
from qpher_proxy.server.kms_node import KMSNode
from qpher_proxy.tls.internal import InternalTLSContextHolder, InternalTLSSettings, exporter_token
from qpher_proxy.tls.stream import TLSStream

CTX = TenantContext(tenant_id="t1", request_id="r1", api_key_id="k1")
TOKEN = bytes(range(32))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> InternalPKI:
    return make_internal_pki(tmp_path_factory.mktemp("pki") / "pki")


def _settings(pki: InternalPKI, role: str, peer: str) -> InternalTLSSettings:
    leaf = pki.leaf(role, "mldsa")  # type: ignore[arg-type]
    return InternalTLSSettings(cert_file=leaf.cert, key_file=leaf.key, ca_file=pki.ca_bundle,
                               peer_uri=pki.uri(peer))


class _Supervisor:
    """What ``KMSNode`` reads of a ``KMSSupervisor``: its client, the workers' facts, their count."""

    def __init__(self) -> None:
        self.client = KMSClient(spin=0)
        self.info: dict[int, dict[str, Any]] = {}
        self.workers = 1


@asynccontextmanager
async def _node(pki: InternalPKI, sup: _Supervisor) -> AsyncIterator[int]:
    """A node with ``sup`` on a port of 127.0.0.1, for the duration of the block."""
    tls = InternalTLSContextHolder.for_server(_settings(pki, "kms", "gateway"))
    node = KMSNode(sup, tls)  # type: ignore[arg-type]
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node.serve_listener, listener, nursery)
            yield int(listener.socket.getsockname()[1])
            nursery.cancel_scope.cancel()
    finally:
        await listener.aclose()


def _remote(pki: InternalPKI, port: int) -> RemoteKMS:
    tls = InternalTLSContextHolder.for_client(_settings(pki, "gateway", "kms"))
    return RemoteKMS([("127.0.0.1", port)], tls, connections_per_endpoint=1, connect_timeout=2.0,
                     health_interval=60, reconnect_backoff_max=0.2)


async def test_a_node_without_a_live_worker_turns_callers_away_at_hello(pki: InternalPKI) -> None:
    sup = _Supervisor()  # no worker attached
    async with _node(pki, sup) as port, trio.open_nursery() as nursery:
        remote = _remote(pki, port)
        await nursery.start(remote.run)
        assert not remote.ready  # the node refused the bootstrap: not ready, never "connected"
        with pytest.raises(KMSUnavailable):
            await remote.client.ping(CTX)
        nursery.cancel_scope.cancel()


async def test_a_node_that_loses_its_last_worker_closes_its_callers_connections(pki: InternalPKI) -> None:
    sup = _Supervisor()
    mine, theirs = socket.socketpair()
    channel = WorkerChannel(0, mine, ClientConnection.bootstrapped(TOKEN))
    sup.client._attach(channel)
    async with _node(pki, sup) as port, trio.open_nursery() as nursery:
        nursery.start_soon(channel.run)
        remote = _remote(pki, port)
        await nursery.start(remote.run)
        assert remote.ready and remote.client.live_workers == 1
        theirs.close()  # the node's only worker dies
        while sup.client.ready:
            await trio.sleep(0.01)
        with pytest.raises(KMSUnavailable):  # the one request that meets it ...
            await remote.client.ping(CTX)
        with trio.fail_after(5):  # ... and the node closes the connection, so none after it does
            while remote.ready:
                await trio.sleep(0.01)
        await trio.sleep(0.5)  # reconnection attempts are turned away at HELLO meanwhile
        assert not remote.ready
        nursery.cancel_scope.cancel()



async def _connect(pki: InternalPKI, port: int) -> TLSStream:
    tls = InternalTLSContextHolder.for_client(_settings(pki, "gateway", "kms"))
    stream = TLSStream(await trio.open_tcp_stream("127.0.0.1", port), tls.context, server_side=False)
    await stream.do_handshake()
    return stream


async def _next(stream: TLSStream, conn: ClientConnection) -> Any:
    with trio.fail_after(5):
        while (event := conn.next_event()) is NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
    return event


async def test_a_frame_is_refused_on_any_connection_but_its_own(pki: InternalPKI) -> None:
    """The service token is the connection's TLS exporter: a HELLO or a REQUEST carrying another
    connection's token is refused (the node's worker never sees the request)."""
    sup = _Supervisor()
    mine, theirs = socket.socketpair()
    channel = WorkerChannel(0, mine, ClientConnection.bootstrapped(TOKEN))
    sup.client._attach(channel)
    async with _node(pki, sup) as port, trio.open_nursery() as nursery:
        nursery.start_soon(channel.run)
        one, two = await _connect(pki, port), await _connect(pki, port)
        token_one, token_two = (exporter_token(s.ssl_connection()) for s in (one, two))
        assert token_one != token_two and len(token_one) == 32
        # a HELLO with the other connection's token: refused, connection over
        replayed = ClientConnection(token_one)
        await two.send_all(replayed.hello({}))
        refused = await _next(two, replayed)
        assert isinstance(refused, Error) and (refused.rid, refused.code) == (0, "unauthorized")
        # the right HELLO, then a REQUEST built with the other connection's token
        proper = ClientConnection(token_one)
        await one.send_all(proper.hello({}))
        assert isinstance(await _next(one, proper), Ready)
        rid, frame = ClientConnection.bootstrapped(token_two).request(CTX, "ping", {"data": b"x"})
        await one.send_all(frame)
        answer = await _next(one, proper)
        assert isinstance(answer, Error) and (answer.rid, answer.code) == (rid, "unauthorized")
        theirs.setblocking(False)
        with pytest.raises(BlockingIOError):
            theirs.recv(1)  # nothing reached the worker
        for s in (one, two):
            await s.aclose()
        theirs.close()
        nursery.cancel_scope.cancel()


def _node_config(path: Path, pki: InternalPKI, kms: dict[str, Any]) -> Path:
    kms_ml = pki.leaf("kms", "mldsa")
    path.write_text(yaml.safe_dump({
        "kms": {"workers": 1, **kms},
        "kms_node": {"listen": ["127.0.0.1:0"],
                     "cert_file": str(kms_ml.cert), "key_file": str(kms_ml.key),
                     "client_ca": str(pki.ca_bundle), "client_uri": pki.uri("gateway")},
        "logging": {"format": "json"},
    }))
    return path


@contextmanager
def _serving_node(config: Path, log: Path, env: dict[str, str] | None = None) -> Iterator[list[int]]:
    """A real ``qpher-proxy kms serve`` until the block ends (then SIGTERM, exit 0 required);
    yields the pids of the node and of its workers once it serves."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "qpher_proxy", "kms", "serve", "-c", str(config)],
            env=env, stdout=subprocess.DEVNULL, stderr=out, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 30
        while not any(json.loads(line).get("msg") == "KMS node serving"
                      for line in log.read_text().splitlines() if line.startswith("{")):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        tasks = (Path("/proc") / str(proc.pid) / "task").iterdir()  # trio spawns from worker threads
        pids = [proc.pid] + [int(p) for t in tasks for p in (t / "children").read_text().split()]
        assert len(pids) >= 2  # the node and its worker
        yield pids
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(20) == 0


def test_an_env_kek_never_stays_in_the_nodes_environment(
    pki: InternalPKI, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """``kms serve`` with ``kek.provider: env`` moves the KEK into a memfd and runs itself again
    without the variable (as ``serve`` does): its workers get the KEK, no /proc environ shows it."""
    tmp = tmp_path_factory.mktemp("envnode")
    config = _node_config(tmp / "kms.yaml", pki, {"dir": str(tmp / "kms"), "user": None,
                                                  "kek": {"provider": "env", "env": "QT_KEK"}})
    kek = base64.b64encode(secrets.token_bytes(32)).decode()
    with _serving_node(config, tmp / "node.log", {**os.environ, "QT_KEK": kek}) as pids:
        for pid in pids:
            environ = (Path("/proc") / str(pid) / "environ").read_bytes()
            assert b"QT_KEK" not in environ and kek.encode() not in environ, pid
    assert kek not in (tmp / "node.log").read_text()


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping the workers to kms.user needs root")
def test_started_as_root_the_nodes_workers_run_as_kms_user(
    pki: InternalPKI, request: pytest.FixtureRequest
) -> None:
    """As on a gateway host: the state `init` makes as root (kms dir and KEK owned by qpher-kms),
    and the node's workers drop to kms.user before they read a key."""
    # pytest's own temporary folders are 0700 (root's alone), where `init` keeps every file root's:
    # a folder the KMS user can traverse, as a real state directory is
    tmp = Path(tempfile.mkdtemp(prefix="qpher-rootnode-", dir="/tmp"))
    tmp.chmod(0o711)
    request.addfinalizer(lambda: shutil.rmtree(tmp, ignore_errors=True))
    subprocess.run([sys.executable, "-m", "qpher_proxy", "init", "--dir", str(tmp / "st"), "--port", "0"],
                   check=True, capture_output=True)
    state = tmp / "st"
    config = _node_config(state / "kms.yaml", pki, {"dir": "kms", "user": "qpher-kms",
                                                    "kek": {"provider": "file", "file": "kek/kek.b64"}})
    kms_uid = (state / "kms").stat().st_uid
    assert kms_uid != 0
    with _serving_node(config, tmp / "node.log") as pids:
        uids = {pid: int((Path("/proc") / str(pid) / "status").read_text().split("\nUid:")[1].split()[0])
                for pid in pids}
    assert uids[pids[0]] == 0 and all(uid == kms_uid for pid, uid in uids.items() if pid != pids[0]), uids
