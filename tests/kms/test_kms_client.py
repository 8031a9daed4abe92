"""The gateway-side KMS client with the real protocol: how KMS errors are rebuilt, and which
failures are the caller's (413) and which the worker's (503)."""

from __future__ import annotations

import ast
import secrets
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio
from kms_helpers import ctx

import qpher_proxy
from qpher_proxy import errors
from qpher_proxy.errors import BodyTooLarge, KMSUnavailable, QpherError
from qpher_proxy.kms.client import KMS_ERRORS, KMSClient, WorkerChannel, error_from_frame
from qpher_proxy.kms.wire import protocol
from qpher_proxy.kms.wire.protocol import (
    NEED_DATA,
    ClientConnection,
    Error,
    FrameTooLarge,
    ProtocolError,
    Request,
    ServerConnection,
)

TOKEN = secrets.token_bytes(32)


# ---- KMS errors, rebuilt on the gateway side ---------------------------------------------------


@pytest.mark.parametrize("code", sorted(KMS_ERRORS))
def test_every_kms_error_code_comes_back_as_its_own_class(code: str) -> None:
    cls = KMS_ERRORS[code]
    s = ServerConnection()
    c = ClientConnection(TOKEN)
    s.receive_data(c.hello({}))
    s.next_event()
    c.receive_data(s.ready({}))
    c.next_event()
    c.receive_data(s.error_from(7, cls("what went wrong")))  # through a real ERROR frame
    event = c.next_event()
    assert isinstance(event, Error)
    exc = error_from_frame(event.code, event.status, event.message)
    assert type(exc) is cls
    assert (exc.code, exc.status, exc.message) == (code, cls.status, "what went wrong")


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("no_such_code", 418),
        ("policy_denied", 403),  # exists in errors.py, but its constructor takes a rule and a reason
        ("rate_limited", 429),  # ... a Retry-After
        ("unauthenticated", 401),  # ... an audit reason
        ("key_not_found", 500),  # a known code with another status than its class
    ],
)
def test_any_other_code_becomes_a_plain_error_with_the_given_code_and_status(code: str, status: int) -> None:
    exc = error_from_frame(code, status, "what went wrong")
    assert type(exc) is QpherError
    assert (exc.code, exc.status, exc.message) == (code, status, "what went wrong")


def _raised_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
            func = node.exc.func
            if isinstance(func, ast.Name):
                names.add(func.id)
            elif isinstance(func, ast.Attribute):
                names.add(func.attr)
    return names


def test_every_error_of_errors_py_the_kms_side_raises_is_in_the_table() -> None:
    root = Path(qpher_proxy.__file__).parent
    kms_side = [root / "kms" / "worker" / f"{m}.py" for m in (
        "service", "keystore", "keydb", "tenant_keys", "kek_rotation", "keyfile", "kek")]
    kms_side += [root / "kms" / "wire" / "model.py"]
    kms_side += sorted((root / "crypto").rglob("*.py")) + sorted(
        (root / "kms" / "worker" / "backends").rglob("*.py")
    )
    raised = set().union(*(_raised_names(p) for p in kms_side))
    ours = {
        name for name in raised
        if isinstance(getattr(errors, name, None), type) and issubclass(getattr(errors, name), QpherError)
    }
    assert ours, "the scan found nothing: the KMS modules moved?"
    missing = {name for name in ours if getattr(errors, name) is not QpherError} - {
        c.__name__ for c in KMS_ERRORS.values()
    }
    assert missing == set()


# ---- the protocol's size error is distinguishable from a closed connection ----------------------


def test_only_a_frame_over_the_limit_is_frame_too_large() -> None:
    c = ClientConnection(TOKEN, max_frame_size=protocol.MIN_FRAME_SIZE)
    s = ServerConnection()
    s.receive_data(c.hello({}))
    s.next_event()
    c.receive_data(s.ready({}))
    c.next_event()
    with pytest.raises(FrameTooLarge, match="exceeds the maximum"):
        c.request(ctx(), "encrypt", {"plaintext": b"x" * protocol.MIN_FRAME_SIZE})
    c.request(ctx(), "ping", {})  # refusing to build it left the connection serving
    c.receive_data(b"")
    c.next_event()  # ConnectionClosed
    with pytest.raises(ProtocolError) as info:
        c.request(ctx(), "ping", {})
    assert not isinstance(info.value, FrameTooLarge)


# ---- the client: 413 for the caller's fault, 503 for the worker's --------------------------------


def _serving_pair(
    max_frame_size: int = protocol.DEFAULT_MAX_FRAME_SIZE,
) -> tuple[ClientConnection, ServerConnection]:
    c = ClientConnection(TOKEN, max_frame_size=max_frame_size)
    s = ServerConnection()
    s.receive_data(c.hello({}))
    s.next_event()
    c.receive_data(s.ready({}))
    c.next_event()
    return c, s


@contextmanager
def _channel(
    conn: ClientConnection, ops: list[tuple[str, str | None]]
) -> Iterator[tuple[KMSClient, WorkerChannel, socket.socket]]:
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    client = KMSClient(on_op=lambda op, _seconds, code: ops.append((op, code)))
    channel = WorkerChannel(0, ours, conn)
    client._attach(channel)
    try:
        yield client, channel, theirs
    finally:
        theirs.close()
        ours.close()


async def _answer_pings(sock: socket.socket, server: ServerConnection, stop_after: int | None = None) -> None:
    """A stand-in worker: answers every ping; closes its end after ``stop_after`` answers."""
    answered = 0
    while True:
        await trio.lowlevel.wait_readable(sock)
        data = sock.recv(1 << 20)
        server.receive_data(data)
        out = []
        while (event := server.next_event()) is not NEED_DATA:
            if isinstance(event, Request):
                out.append(server.response(event.rid, {"data": event.args["data"]}))
                answered += 1
        if out:
            sock.sendall(b"".join(out))
        if not data or (stop_after is not None and answered >= stop_after):
            sock.close()
            return


async def test_a_request_on_a_connection_that_ended_is_503_not_413() -> None:
    conn, _ = _serving_pair()
    conn.receive_data(b"")  # the worker's end closed; the reader has not retired the channel yet
    conn.next_event()
    ops: list[tuple[str, str | None]] = []
    with _channel(conn, ops) as (client, _, _):
        with pytest.raises(KMSUnavailable) as info:
            await client.ping(ctx(), b"x")
    assert info.value.status == 503 and info.value.code == "kms_unavailable"
    assert ops == [("ping", "kms_unavailable")]


async def test_a_request_too_large_for_a_frame_is_413_and_the_worker_keeps_serving() -> None:
    conn, server = _serving_pair(max_frame_size=protocol.MIN_FRAME_SIZE)
    ops: list[tuple[str, str | None]] = []
    with _channel(conn, ops) as (client, channel, theirs):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(channel.run)
            nursery.start_soon(_answer_pings, theirs, server)
            with pytest.raises(BodyTooLarge) as info:
                await client.ping(ctx(), b"x" * protocol.MIN_FRAME_SIZE)
            assert info.value.status == 413
            assert await client.ping(ctx(), b"still here") == b"still here"
            assert client.ready
            nursery.cancel_scope.cancel()
    assert ops == [("ping", "body_too_large"), ("ping", None)]


async def test_a_worker_that_goes_away_under_load_gives_every_caller_an_answer_or_503() -> None:
    # Requests keep arriving on their own (as HTTP requests do), not only when an answer comes
    # back, so some arrive in the scheduling rounds right after the worker's end was read.
    conn, server = _serving_pair()
    ops: list[tuple[str, str | None]] = []
    outcomes: list[object] = []

    async def one() -> None:
        try:
            outcomes.append(await client.ping(ctx(), b"x"))
        except BaseException as exc:
            outcomes.append(exc)

    with _channel(conn, ops) as (client, channel, theirs):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(channel.run)
            nursery.start_soon(_answer_pings, theirs, server, 200)
            rounds_after = 0
            while rounds_after < 5:
                nursery.start_soon(one)
                await trio.lowlevel.checkpoint()
                if not client.ready:
                    rounds_after += 1
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(outcomes) - len(failures) >= 200 and failures
    assert all(type(exc) is KMSUnavailable for exc in failures), {repr(exc) for exc in failures}
    assert not channel.alive


async def test_a_shared_batch_fails_whole_with_the_first_chunk_error_not_a_group(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from types import SimpleNamespace

    from qpher_proxy.kms.client.pool import SPLIT_MIN_ITEMS

    client = KMSClient()
    client._live = [SimpleNamespace(inflight={}), SimpleNamespace(inflight={})]  # type: ignore[list-item]
    chunks: list[int] = []

    async def one(_ctx: object, items: list[object]) -> list[object]:
        chunks.append(len(items))
        await trio.sleep(0)
        if len(chunks) == 2:
            raise KMSUnavailable("the KMS worker handling this request stopped")
        return [{"i": i} for i in range(len(items))]

    monkeypatch.setattr(client, "_batch_one", one)
    items = [("encapsulate", {"key_id": "k"})] * (2 * SPLIT_MIN_ITEMS + 1)
    with pytest.raises(KMSUnavailable):
        await client.batch(ctx(), items)  # type: ignore[arg-type]
    assert sorted(chunks) == [SPLIT_MIN_ITEMS, SPLIT_MIN_ITEMS + 1]


async def test_a_shared_batch_cancelled_midway_leaves_nothing_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from qpher_proxy.kms.client.pool import SPLIT_MIN_ITEMS

    client = KMSClient()
    client._live = [SimpleNamespace(inflight={}), SimpleNamespace(inflight={})]  # type: ignore[list-item]
    started: list[int] = []

    async def one(_ctx: object, items: list[object]) -> list[object]:
        started.append(len(items))
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    monkeypatch.setattr(client, "_batch_one", one)
    items = [("encapsulate", {"key_id": "k"})] * (2 * SPLIT_MIN_ITEMS)
    with trio.move_on_after(0.05) as scope:
        await client.batch(ctx(), items)  # type: ignore[arg-type]
    assert scope.cancelled_caught and started == [SPLIT_MIN_ITEMS, SPLIT_MIN_ITEMS]
