"""The real thing: KMS worker processes over real socketpairs, driven by the supervisor and client."""

from __future__ import annotations

import base64
import functools
import logging
import os
import re
import secrets
import signal
import socket
import struct
from pathlib import Path
from typing import Any

import pytest
import trio
from kms_helpers import ctx, settings, spawn_raw_worker, tree_snapshot
from wire_frames import encode_raw_request

from qpher_proxy.context import TenantContext
from qpher_proxy.crypto.algorithms import ALGORITHMS, ML_DSA_65, ML_KEM_768
from qpher_proxy.crypto.interface import Backend
from qpher_proxy.errors import (
    AlgorithmMismatch,
    ConfigError,
    InvalidCiphertext,
    KeyDestroyed,
    KeyDisabled,
    KeyNotFound,
    KMSUnavailable,
    QpherError,
)
from qpher_proxy.kms.client import KMSClient, WorkerChannel
from qpher_proxy.kms.launcher import KMSSupervisor, open_kms
from qpher_proxy.kms.wire.model import KEKSettings, KeyState
from qpher_proxy.kms.wire.protocol import (
    NEED_DATA,
    ClientConnection,
    Error,
    Ready,
    Response,
    ServerConnection,
)
from qpher_proxy.kms.worker.kek import FileKEKProvider
from qpher_proxy.kms.worker.keyfile import KeyBinding, read_key_file, unseal
from qpher_proxy.kms.worker.keystore import KeyStore


async def test_a_thousand_concurrent_requests_are_all_answered_correctly(
    kms_dir: Path, kek_path: Path, backend: Backend
) -> None:
    async with open_kms(**settings(kms_dir, kek_path, workers=2)) as sup:  # type: ignore[arg-type]
        client = sup.client
        tenants = [ctx("tenant-a"), ctx("tenant-b")]
        sig = [await client.create_key(t, kind="signature") for t in tenants]
        kem = [await client.create_key(t, kind="kem") for t in tenants]
        sig_pub = [backend.load_public(ML_DSA_65, k.public_key) for k in sig]  # type: ignore[arg-type]
        kem_pub = [backend.load_public(ML_KEM_768, k.public_key) for k in kem]  # type: ignore[arg-type]
        expected = [kem_pub[i].encapsulate() for i in range(2)]  # (ss, ct) made here, decapsulated there
        wrong: list[str] = []
        done = 0

        async def one(i: int) -> None:
            nonlocal done
            t = i % 2
            c = TenantContext(tenants[t].tenant_id, f"req-{i}", "ak_test")
            kind = (i // 2) % 3
            if kind == 0:
                msg = b"message %d" % i
                s, v = await client.sign(c, sig[t].key_id, msg, context=b"ctx")
                if not (v == 1 and sig_pub[t].verify(s, msg, b"ctx")):
                    wrong.append(f"sign {i}")
            elif kind == 1:
                ss = await client.decapsulate(c, kem[t].key_id, expected[t][1])
                if ss != expected[t][0]:
                    wrong.append(f"decapsulate {i}")
            else:
                data = secrets.token_bytes(i % 97)
                if await client.ping(c, data) != data:
                    wrong.append(f"ping {i}")
            done += 1

        async with trio.open_nursery() as nursery:
            for i in range(1000):
                nursery.start_soon(one, i)
        assert (done, wrong) == (1000, [])
        assert len({w["pid"] for w in sup.info.values()}) == 2


async def test_a_batch_of_one_operation_travels_in_columns_answered_item_by_item(kms: KMSSupervisor) -> None:
    """An API batch (one op, the same argument names): each item succeeds or fails on its own,
    exactly as the same items sent one by one would."""
    from qpher_proxy.crypto.algorithms import MAX_CONTEXT_BYTES
    from qpher_proxy.errors import InvalidContext, InvalidInput

    client = kms.client
    a = ctx("tenant-a")
    s = await client.create_key(a, algorithm="ml-dsa-65")
    k = await client.create_key(a, algorithm="ml-kem-768")
    messages = [bytes([i]) * (i + 1) for i in range(6)]
    items: list[tuple[str, dict[str, Any]]] = [
        ("sign", {"key_id": s.key_id, "message": m, "context": b""}) for m in messages
    ]
    too_long = b"x" * (MAX_CONTEXT_BYTES + 1)
    items[2] = ("sign", {"key_id": s.key_id, "message": messages[2], "context": too_long})
    items[3] = ("sign", {"key_id": k.key_id, "message": messages[3], "context": b""})
    items[4] = ("sign", {"key_id": "k_" + "z" * 26, "message": messages[4], "context": b""})
    items[5] = ("sign", {"key_id": s.key_id, "message": "not bytes", "context": b""})
    results = await client.batch(a, items)
    assert isinstance(results[2], InvalidContext)
    assert isinstance(results[3], AlgorithmMismatch)
    assert isinstance(results[4], KeyNotFound)
    assert isinstance(results[5], InvalidInput)
    for i in (0, 1):
        r = results[i]
        assert isinstance(r, dict) and set(r) == {"signature", "version"} and r["version"] == 1
        assert await client.verify(a, s.key_id, messages[i], r["signature"])  # type: ignore[arg-type]
    # the same items one by one, for the errors: the same classes and messages
    for i in (2, 3, 4, 5):
        with pytest.raises(QpherError) as one:
            await client.sign(a, items[i][1]["key_id"], items[i][1]["message"], items[i][1]["context"])
        assert (type(one.value), one.value.message) == (type(results[i]), results[i].message)  # type: ignore[union-attr]

    _ss, ct, _v = await client.encapsulate(a, k.key_id)
    await client.rotate_key(a, k.key_id)
    decaps = await client.batch(a, [
        ("decapsulate", {"key_id": k.key_id, "ciphertext": ct, "version": 1}),
        ("decapsulate", {"key_id": k.key_id, "ciphertext": ct[:-1], "version": None}),
        ("decapsulate", {"key_id": k.key_id, "ciphertext": ct, "version": 9}),
    ])
    assert decaps[0] == {"shared_secret": _ss, "version": 1}
    assert isinstance(decaps[1], InvalidCiphertext) and isinstance(decaps[2], KeyNotFound)
    assert await client.batch(a, [("sign", {"key_id": s.key_id, "message": b"m"})] * 0) == []


async def test_a_large_batch_is_shared_among_idle_workers_and_answered_in_order(
    kms_dir: Path, kek_path: Path
) -> None:
    from qpher_proxy.kms.client.pool import SPLIT_MIN_ITEMS

    async with open_kms(**settings(kms_dir, kek_path, workers=2)) as sup:  # type: ignore[arg-type]
        client = sup.client
        a = ctx("tenant-a")
        s = await client.create_key(a, algorithm="ml-dsa-65")
        used: list[int] = []
        for w in client._live:
            send = w.send

            def spy(frame: bytes, w: WorkerChannel = w, send: Any = send) -> None:
                used.append(w.index)
                send(frame)

            w.send = spy  # type: ignore[method-assign]
        n = 3 * SPLIT_MIN_ITEMS + 1
        messages = [b"message %d" % i for i in range(n)]
        items: list[tuple[str, dict[str, Any]]] = [
            ("sign", {"key_id": s.key_id, "message": m, "context": b""}) for m in messages
        ]
        bad = n // 2  # in the middle: errors stay with their item whichever chunk carries it
        items[bad] = ("sign", {"key_id": "k_" + "q" * 26, "message": messages[bad], "context": b""})
        results = await client.batch(a, items)
        assert sorted(set(used)) == [0, 1] and len(used) == 2  # one chunk per worker, both idle
        assert isinstance(results[bad], KeyNotFound)
        for i, r in enumerate(results):
            if i != bad:
                assert isinstance(r, dict) and await client.verify(a, s.key_id, messages[i], r["signature"])  # type: ignore[arg-type]
        used.clear()
        small = await client.batch(a, items[: 2 * SPLIT_MIN_ITEMS - 1])  # too small to share
        assert len(small) == 2 * SPLIT_MIN_ITEMS - 1 and len(used) == 1


async def test_lifecycle_and_errors_through_a_worker(kms: KMSSupervisor) -> None:
    client = kms.client
    a, b = ctx("tenant-a"), ctx("tenant-b")
    k = await client.create_key(a, algorithm="ml-kem-768", label="inbox")
    assert (k.kind, k.state, k.label, k.version) == ("kem", KeyState.ENABLED, "inbox", 1)
    ss, ct, v = await client.encapsulate(a, k.key_id)
    assert await client.decapsulate(a, k.key_id, ct) == ss and v == 1
    sealed, v = await client.encrypt(a, k.key_id, b"plaintext", aad=b"aad")
    assert await client.decrypt(a, k.key_id, sealed, aad=b"aad") == b"plaintext"
    assert (await client.rotate_key(a, k.key_id)).latest_version == 2
    assert await client.decapsulate(a, k.key_id, ct, version=1) == ss
    assert await client.decrypt(a, k.key_id, sealed, aad=b"aad", version=1) == b"plaintext"
    assert (await client.encapsulate(a, k.key_id))[2] == 2

    # another tenant's key id answers like a random one, in the gateway too
    with pytest.raises(KeyNotFound) as theirs:
        await client.get_key(b, k.key_id)
    random_id = "k_" + "m" * 26
    with pytest.raises(KeyNotFound) as nobody:
        await client.get_key(b, random_id)
    assert theirs.value.message == nobody.value.message.replace(random_id, k.key_id)
    assert (await client.list_keys(b)).keys == ()

    await client.disable_key(a, k.key_id)
    with pytest.raises(KeyDisabled) as info:
        await client.decapsulate(a, k.key_id, ct)
    assert (info.value.code, info.value.status) == ("key_disabled", 409)
    await client.enable_key(a, k.key_id)
    assert (await client.schedule_destroy(a, k.key_id)).state is KeyState.PENDING_DESTRUCTION
    assert (await client.cancel_destroy(a, k.key_id)).state is KeyState.ENABLED

    s = await client.create_key(a, kind="signature", mode="hybrid")
    assert s.algorithm == "ml-dsa-65-ecdsa-p256"
    results = await client.batch(a, [
        ("sign", {"key_id": s.key_id, "message": b"one"}),
        ("sign", {"key_id": k.key_id, "message": b"kem key cannot sign"}),
        ("decapsulate", {"key_id": k.key_id, "ciphertext": b"short"}),
        ("sign", {"key_id": "k_" + "x" * 26, "message": b"nobody"}),
        ("verify", {"key_id": s.key_id, "message": b"one", "signature": b"\0" * 10}),
    ])
    assert isinstance(results[0], dict) and results[0]["version"] == 1
    assert isinstance(results[1], AlgorithmMismatch)
    assert isinstance(results[2], InvalidCiphertext)
    assert isinstance(results[3], KeyNotFound)
    assert results[4] == {"valid": False, "version": 1}
    sig_value = results[0]["signature"]
    assert await client.verify(a, s.key_id, b"one", sig_value)  # type: ignore[arg-type]

    gone = await client.schedule_destroy(a, k.key_id, delay=0)
    assert gone.state is KeyState.DESTROYED and gone.public_key is None
    with pytest.raises(KeyDestroyed) as dead:
        await client.encapsulate(a, k.key_id)
    assert (dead.value.code, dead.value.status) == ("key_destroyed", 410)
    page = await client.list_keys(a, limit=1)
    assert len(page.keys) == 1 and page.next_cursor is not None
    assert len((await client.list_keys(a, limit=1, cursor=page.next_cursor)).keys) == 1


async def test_a_disable_through_one_worker_holds_at_once_in_every_worker(
    kms_dir: Path, kek_path: Path
) -> None:
    async with open_kms(**settings(kms_dir, kek_path, workers=2)) as sup:  # type: ignore[arg-type]
        client = sup.client
        a = ctx("tenant-a")
        k = await client.create_key(a, kind="signature")

        async def burst(expect_ok: bool) -> None:
            async def one() -> None:
                try:
                    await client.sign(a, k.key_id, b"m")
                    assert expect_ok
                except KeyDisabled:
                    assert not expect_ok
            sent_before = [w.conn._next_rid for w in client._live]
            async with trio.open_nursery() as nursery:
                for _ in range(32):
                    nursery.start_soon(one)
            # least-outstanding spreads a burst: every worker handled some of it
            assert all(w.conn._next_rid > n for w, n in zip(client._live, sent_before, strict=True))

        await burst(True)  # both workers have the key's state cached now
        await client.disable_key(a, k.key_id)
        await burst(False)
        await client.enable_key(a, k.key_id)
        await burst(True)


# ---- raw frames against a directly spawned worker ---------------------------------------


def _bootstrap_raw(kms_dir: Path, kek_path: Path) -> tuple[Any, socket.socket, ClientConnection]:
    proc, sock = spawn_raw_worker()
    conn = ClientConnection(secrets.token_bytes(32))
    sock.sendall(conn.hello({"dir": str(kms_dir), "kek": {"provider": "file", "path": str(kek_path)},
                             "backend": "openssl"}))
    ready = _next(sock, conn)
    assert isinstance(ready, Ready), ready
    return proc, sock, conn


def _next(sock: socket.socket, conn: ClientConnection) -> Any:
    while True:
        ev = conn.next_event()
        if ev is not NEED_DATA:
            return ev
        conn.receive_data(sock.recv(1 << 20))


def _finish(proc: Any, sock: socket.socket) -> tuple[int, str]:
    sock.close()
    _out, err = proc.communicate(timeout=30)
    return proc.returncode, err.decode("utf-8", "replace")


def test_bad_token_missing_tenant_and_unknown_op_get_error_frames_and_the_worker_keeps_serving(
    kms_dir: Path, kek_path: Path
) -> None:
    proc, sock, conn = _bootstrap_raw(kms_dir, kek_path)
    token = conn._token
    sock.sendall(
        encode_raw_request(1, secrets.token_bytes(32), "tenant-a", "r", "a", "ping", {})
        + encode_raw_request(2, token[:-1] + bytes([token[-1] ^ 1]), "tenant-a", "r", "a", "ping", {})
        + encode_raw_request(3, token, "", "r", "a", "ping", {})
        + encode_raw_request(4, token, "tenant-a", "r", "a", "export_private_key", {"key_id": "k_x"})
        + encode_raw_request(5, token, "tenant-a", "r", "a", "sign", {"key_id": 7, "message": "not bytes"})
        + encode_raw_request(6, token, "tenant-a", "r", "a", "ping", {"data": b"still here"})
        + encode_raw_request(7, token, "tenant-a", "r", "a", "sign", {"key_id": ["k_x"], "message": b"m"})
    )
    answers = {}
    while len(answers) < 7:
        ev = _next(sock, conn)
        answers[ev.rid] = ev
    for rid in (1, 2):  # a random token and one differing in its last bit: the same answer
        assert answers[rid] == Error(rid, "invalid_service_token", 500, "the service token is not valid")
    assert answers[3].code == "missing_tenant"
    assert answers[4] == Error(4, "unknown_operation", 400, "unknown KMS operation 'export_private_key'")
    assert answers[5].code == "invalid_input"
    assert isinstance(answers[6], Response) and answers[6].value["data"] == b"still here"
    assert answers[7].code == "key_not_found"
    code, err = _finish(proc, sock)
    assert code == 0 and "Traceback" not in err
    assert "wrong service token" in err


def test_a_truncated_frame_ends_that_connection_cleanly(kms_dir: Path, kek_path: Path) -> None:
    proc, sock, conn = _bootstrap_raw(kms_dir, kek_path)
    _, frame = conn.request(ctx(), "ping", {"data": b"x" * 100})
    sock.sendall(frame[: len(frame) // 2])
    sock.shutdown(socket.SHUT_WR)
    ev = _next(sock, conn)  # a last word, then the worker closes its end
    assert isinstance(ev, Error) and ev.rid == 0 and ev.code == "kms_protocol_error"
    assert "middle of a frame" in ev.message
    assert sock.recv(1 << 16) == b""
    code, err = _finish(proc, sock)
    assert code == 3 and "Traceback" not in err
    assert "middle of a frame" in err


def test_an_oversized_frame_is_refused_at_its_length_and_ends_the_connection(
    kms_dir: Path, kek_path: Path
) -> None:
    proc, sock, conn = _bootstrap_raw(kms_dir, kek_path)
    sock.sendall(struct.pack(">IBI", 2**31, 3, 1) + b"x" * 100)  # claims 2 GiB; we never send it
    ev = _next(sock, conn)
    assert isinstance(ev, Error) and ev.rid == 0 and ev.code == "kms_protocol_error"
    assert "exceeds the maximum" in ev.message
    code, err = _finish(proc, sock)
    assert code == 3 and "Traceback" not in err


def test_the_worker_hardens_itself(kms_dir: Path, kek_path: Path) -> None:
    leak_r, leak_w = os.pipe()  # an inheritable descriptor the worker must not keep
    os.set_inheritable(leak_r, True)
    parent, child = socket.socketpair()
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "qpher_proxy.kms.worker", "--fd", str(child.fileno())],
        pass_fds=[child.fileno(), leak_r], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    child.close()
    os.close(leak_r)
    os.close(leak_w)
    parent.settimeout(30)
    conn = ClientConnection(secrets.token_bytes(32))
    parent.sendall(conn.hello({"dir": str(kms_dir), "kek": {"provider": "file", "path": str(kek_path)},
                               "backend": "openssl"}))
    ready = _next(parent, conn)
    assert isinstance(ready, Ready)
    try:
        fds = {int(n): os.readlink(f"/proc/{proc.pid}/fd/{n}") for n in os.listdir(f"/proc/{proc.pid}/fd")}
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        status = Path(f"/proc/{proc.pid}/status").read_text()
    finally:
        code, err = _finish(proc, parent)
    assert leak_r not in fds or "pipe" not in fds[leak_r]
    assert not any("pipe:" in target for n, target in fds.items() if n > 2)
    assert re.search(r"Max core file size\s+0\s+0", limits)
    locked_kb = int(re.search(r"VmLck:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    assert locked_kb > 0 or ready.info.get("memory_locked") is False
    assert code == 0


# ---- the gateway side survives a misbehaving worker ------------------------------------------


async def test_garbage_from_a_worker_fails_its_requests_fast_and_nothing_else() -> None:
    token = secrets.token_bytes(32)
    ours, theirs = socket.socketpair()
    conn = ClientConnection(token)
    server = ServerConnection()
    server.receive_data(conn.hello({}))
    server.next_event()
    conn.receive_data(server.ready({}))
    conn.next_event()
    client = KMSClient()
    channel = WorkerChannel(0, ours, conn)
    client._attach(channel)
    theirs.setblocking(False)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(channel.run)
            results: list[object] = []

            async def call() -> None:
                try:
                    results.append(await client.ping(ctx(), b"x"))
                except QpherError as exc:
                    results.append(exc)

            nursery.start_soon(call)
            await trio.lowlevel.wait_readable(theirs)
            server.receive_data(theirs.recv(65536))
            assert server.next_event().op == "ping"  # type: ignore[union-attr]
            theirs.send(b"\xff\xff\xff\xff garbage")
        assert len(results) == 1 and isinstance(results[0], KMSUnavailable)
        assert results[0].status == 503
        assert not client.ready
        with pytest.raises(KMSUnavailable, match="no KMS worker"):
            await client.ping(ctx())
        assert "protocol error" in channel.death_reason
    finally:
        theirs.close()


async def test_sigkill_mid_load_restarts_the_worker_and_old_keys_still_work(
    kms_dir: Path, kek_path: Path, backend: Backend
) -> None:
    restarts: list[tuple[int, int | None, bool]] = []
    sup_box: list[KMSSupervisor] = []

    def on_restart(index: int, exit_code: int | None) -> None:
        restarts.append((index, exit_code, sup_box[0].ready))

    async with open_kms(**settings(kms_dir, kek_path, on_restart=on_restart)) as sup:  # type: ignore[arg-type]
        sup_box.append(sup)
        client = sup.client
        a = ctx("tenant-a")
        sk = await client.create_key(a, kind="signature")
        kk = await client.create_key(a, kind="kem")
        ss, ct, _ = await client.encapsulate(a, kk.key_id)
        pid = sup.pids[0]
        halfway = trio.Event()
        ok = failed = 0
        other: list[BaseException] = []

        async def one(i: int) -> None:
            nonlocal ok, failed
            try:
                if i % 2:
                    assert await client.decapsulate(a, kk.key_id, ct) == ss
                else:
                    await client.sign(a, sk.key_id, b"m")
                ok += 1
            except KMSUnavailable:
                failed += 1
            except BaseException as exc:  # pragma: no cover - reported below
                other.append(exc)
            if ok + failed == 100:
                halfway.set()

        async with trio.open_nursery() as nursery:
            for i in range(400):
                nursery.start_soon(one, i)
            await halfway.wait()
            os.kill(pid, signal.SIGKILL)
        assert other == []
        assert ok + failed == 400 and failed > 0 and ok >= 100
        await sup.wait_live()
        assert sup.pids[0] != pid and sup.restarts == 1
        assert restarts == [(0, -signal.SIGKILL, False)]  # not ready while the only worker was down
        assert sup.ready
        sig, v = await client.sign(a, sk.key_id, b"after")
        assert backend.load_public(ML_DSA_65, sk.public_key).verify(sig, b"after")  # type: ignore[arg-type]
        assert await client.decapsulate(a, kk.key_id, ct) == ss


# ---- start-up failures --------------------------------------------------------------------


async def test_a_wrong_kek_stops_start_up_with_a_clear_message_and_writes_nothing(
    kms_dir: Path, kek_path: Path, tmp_path: Path
) -> None:
    async with open_kms(**settings(kms_dir, kek_path)) as sup:  # type: ignore[arg-type]
        await sup.client.create_key(ctx(), kind="kem")
    other = tmp_path / "other.b64"
    from qpher_proxy.kms.worker.kek import generate_kek_file

    generate_kek_file(other)
    before = tree_snapshot(kms_dir)
    with pytest.raises(ConfigError, match="is not the KEK of this key store") as info:
        async with open_kms(**settings(kms_dir, other)):  # type: ignore[arg-type]
            pytest.fail("the KMS must not start")  # pragma: no cover
    assert "nothing was written" in info.value.message
    assert tree_snapshot(kms_dir) == before


async def test_a_group_readable_kek_file_stops_start_up(kms_dir: Path, kek_path: Path) -> None:
    kek_path.chmod(0o640)
    with pytest.raises(ConfigError, match="readable by group or others"):
        async with open_kms(**settings(kms_dir, kek_path)):  # type: ignore[arg-type]
            pytest.fail("the KMS must not start")  # pragma: no cover
    assert not kms_dir.exists()


async def test_the_env_kek_leaves_the_gateway_environment_and_survives_restarts(
    kms_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kek = base64.b64encode(secrets.token_bytes(32))
    monkeypatch.setenv("QPHER_TEST_KEK", kek.decode())
    s = settings(kms_dir, Path("/nonexistent"), kek=KEKSettings("env", env="QPHER_TEST_KEK"))
    async with open_kms(**s) as sup:  # type: ignore[arg-type]
        assert "QPHER_TEST_KEK" not in os.environ
        k = await sup.client.create_key(ctx(), kind="signature")
        pid = sup.pids[0]
        assert kek not in Path(f"/proc/{pid}/cmdline").read_bytes()
        os.kill(pid, signal.SIGKILL)
        while sup.pids.get(0) in (None, pid) or not sup.ready:
            await sup._changed.wait()
        await sup.client.sign(ctx(), k.key_id, b"after a restart the KEK came from the memfd again")


async def test_missing_env_kek_is_a_config_error(kms_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QPHER_TEST_KEK", raising=False)
    s = settings(kms_dir, Path("/nonexistent"), kek=KEKSettings("env", env="QPHER_TEST_KEK"))
    with pytest.raises(ConfigError, match="QPHER_TEST_KEK"):
        async with open_kms(**s):  # type: ignore[arg-type]
            pytest.fail("the KMS must not start")  # pragma: no cover


# ---- no private key in clear anywhere -------------------------------------------------------


async def test_no_private_seed_appears_in_the_state_dir_responses_or_logs(
    tmp_path: Path, kms_dir: Path, kek_path: Path, backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[object] = []
    qlog = logging.getLogger("qpher")
    qlog.addHandler(caplog.handler)
    old_level = qlog.level
    qlog.setLevel(logging.DEBUG)
    try:
        async with open_kms(**settings(kms_dir, kek_path, workers=2)) as sup:  # type: ignore[arg-type]
            client = sup.client
            for t in ("tenant-a", "tenant-b"):
                c = ctx(t)
                for alg in ALGORITHMS.values():
                    k = await client.create_key(c, algorithm=alg.name)
                    seen.append(k)
                    seen.append(await client.rotate_key(c, k.key_id))
                    if alg.kind.value == "kem":
                        ss, ct, v = await client.encapsulate(c, k.key_id)
                        seen += [ss, ct, await client.decapsulate(c, k.key_id, ct)]
                        sealed, v = await client.encrypt(c, k.key_id, b"hello", aad=b"a")
                        seen += [sealed, await client.decrypt(c, k.key_id, sealed, aad=b"a")]
                    else:
                        sig, v = await client.sign(c, k.key_id, b"hello")
                        seen += [sig, await client.verify(c, k.key_id, b"hello", sig)]
                    for bad in (functools.partial(client.decapsulate, c, k.key_id, b"x"),
                                functools.partial(client.sign, c, k.key_id, b"")):
                        try:
                            seen.append(await bad())
                        except QpherError as exc:
                            seen.append(repr(exc))
                seen.append(await client.list_keys(c))
                seen.append(
                    await client.schedule_destroy(c, seen[0].key_id, delay=0) if t == "tenant-a" else None
                )  # type: ignore[attr-defined]
    finally:
        qlog.removeHandler(caplog.handler)
        qlog.setLevel(old_level)

    # every private seed, read back the only way there is: with the KEK, from the key files
    store = KeyStore(kms_dir, FileKEKProvider(kek_path), backend)
    seeds: list[bytes] = []
    try:
        db = store.db
        assert db is not None
        for tenant, key_id, version, alg, rel in db.execute(
            "SELECT tenant_id, key_id, version, algorithm, file FROM key_versions WHERE file IS NOT NULL"
        ):
            b = KeyBinding(tenant, key_id, version, alg)
            seeds.append(unseal(store.kek, b, read_key_file(kms_dir / rel, "x")))
    finally:
        store.close()
    assert len(seeds) == 2 * 2 * len(ALGORITHMS) - 2  # minus the destroyed key's two versions
    kek_raw = base64.b64decode(kek_path.read_bytes())
    needles = {s: [s, s.hex().encode(), base64.b64encode(s)] for s in seeds + [kek_raw]}

    blobs: list[bytes] = []
    for dirpath, dirs, files in os.walk(tmp_path / "state"):
        for name in dirs:
            if Path(dirpath, name).is_relative_to(kms_dir):
                assert Path(dirpath, name).stat().st_mode & 0o777 == 0o700, (dirpath, name)
        for name in files:
            path = Path(dirpath) / name
            assert path.stat().st_mode & 0o777 == 0o600, path  # keys, database, WAL, canary, lock
            blobs.append(path.read_bytes())
    blobs.append(repr(seen).encode())
    blobs.append(caplog.text.encode())
    blobs.append(repr([r.__dict__ for r in caplog.records]).encode())
    assert len(caplog.records) > 0
    for forms in needles.values():
        for blob in blobs:
            for form in forms:
                assert form not in blob
