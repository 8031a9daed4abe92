"""The KMS service's dispatch (in-process, real key store) and the client's request timeout."""

from __future__ import annotations

import secrets
import socket
import time
from pathlib import Path

import pytest
import trio
import trio.testing
from kms_helpers import FakeClock, ctx
from wire_frames import encode_raw_request

from qpher_proxy.errors import KMSUnavailable
from qpher_proxy.kms.client import KMSClient, WorkerChannel
from qpher_proxy.kms.wire.protocol import (
    NEED_DATA,
    ClientConnection,
    Error,
    Response,
    ServerConnection,
)
from qpher_proxy.kms.worker.keystore import KeyStore
from qpher_proxy.kms.worker.service import KMSService

TOKEN = secrets.token_bytes(32)


def _pair() -> tuple[ClientConnection, ServerConnection]:
    c, s = ClientConnection(TOKEN), ServerConnection()
    s.receive_data(c.hello({}))
    s.next_event()
    c.receive_data(s.ready({}))
    c.next_event()
    return c, s


def _roundtrip(service: KMSService, frames: bytes) -> list[object]:
    c, s = _pair()
    s.receive_data(frames)
    answers = b""
    while (ev := s.next_event()) is not NEED_DATA:
        answers += service.handle(s, ev)
    c.receive_data(answers)
    out = []
    while (ev := c.next_event()) is not NEED_DATA:
        out.append(ev)
    return out


def test_an_unexpected_exception_becomes_a_safe_internal_error_and_serving_goes_on(
    store: KeyStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    service = KMSService(store, TOKEN)
    key = store.tenant("tenant-a").create(kind="signature").key_id

    def boom(*_a: object, **_k: object) -> None:
        raise RuntimeError("internal detail with SECRET-ish text")

    monkeypatch.setitem(service._ops, "sign", boom)
    frames = encode_raw_request(1, TOKEN, "tenant-a", "r", "a", "sign", {"key_id": key, "message": b"m"})
    frames += encode_raw_request(2, TOKEN, "tenant-a", "r", "a", "get_key", {"key_id": key})
    with caplog.at_level("ERROR", logger="qpher.kms.service"):
        first, second = _roundtrip(service, frames)
    assert first == Error(1, "internal_error", 500, "internal error in the KMS")
    assert isinstance(second, Response) and second.value["key_id"] == key  # type: ignore[index]
    assert "SECRET-ish" not in caplog.text and "RuntimeError" in repr([r.__dict__ for r in caplog.records])


def test_batches_are_bounded_and_refuse_lifecycle_ops(store: KeyStore) -> None:
    service = KMSService(store, TOKEN, max_batch=3)
    key = store.tenant("tenant-a").create(kind="kem").key_id
    too_many = {"items": [{"op": "encapsulate", "args": {"key_id": key}}] * 4}
    mixed = {
        "items": [
            {"op": "create_key", "args": {"kind": "kem"}},
            {"op": "encapsulate", "args": {"key_id": key}},
            "not an item",
        ]
    }
    a, b = _roundtrip(
        service,
        encode_raw_request(1, TOKEN, "tenant-a", "r", "a", "batch", too_many)
        + encode_raw_request(2, TOKEN, "tenant-a", "r", "a", "batch", mixed),
    )
    assert isinstance(a, Error) and a.code == "invalid_input" and "at most 3" in a.message
    results = b.value["results"]  # type: ignore[attr-defined]
    assert results[0]["error"]["code"] == "invalid_input"
    assert set(results[1]["ok"]) == {"shared_secret", "ciphertext", "version"}
    assert results[2]["error"]["code"] == "invalid_input"
    assert [i.key_id for i in store.tenant("tenant-a").list().keys] == [key]  # no key was created


def test_a_batch_in_columns_is_checked_and_bounded_like_one_in_rows(store: KeyStore) -> None:
    service = KMSService(store, TOKEN, max_batch=3)
    key = store.tenant("tenant-a").create(kind="kem").key_id
    good = {"op": "encapsulate", "n": 2, "same": {"key_id": key}, "each": {}}
    bad = [
        {"op": "encapsulate", "n": 4, "same": {"key_id": key}, "each": {}},  # over max_batch
        {"op": "create_key", "n": 1, "same": {"kind": "kem"}, "each": {}},  # not a batch op
        {"op": "encapsulate", "n": 2, "same": {}, "each": {"key_id": [key]}},  # a column too short
        {"op": "encapsulate", "n": 2, "same": {}, "each": {"key_id": key}},  # not a list
        {"op": "encapsulate", "n": "2", "same": {}, "each": {}},
        {"op": "encapsulate", "n": 2, "same": [], "each": {}},
    ]
    frames = encode_raw_request(1, TOKEN, "tenant-a", "r", "a", "batch", good)
    for i, args in enumerate(bad, start=2):
        frames += encode_raw_request(i, TOKEN, "tenant-a", "r", "a", "batch", args)
    first, *rest = _roundtrip(service, frames)
    assert isinstance(first, Response)
    v = first.value
    assert v["n"] == 2 and v["errors"] == []  # type: ignore[index]
    assert set(v["ok"]) == {"shared_secret", "ciphertext", "version"}  # type: ignore[index]
    assert all(len(col) == 2 for col in v["ok"].values())  # type: ignore[index]
    assert [(type(e), getattr(e, "code", None)) for e in rest] == [(Error, "invalid_input")] * len(bad)
    assert [i.key_id for i in store.tenant("tenant-a").list().keys] == [key]  # no key was created


def test_the_client_sends_shared_small_arguments_once_and_data_always_per_item() -> None:
    from qpher_proxy.kms.client.pool import _columns

    msg = b"m" * 100
    same_data = [("sign", {"key_id": "k1", "message": msg, "context": b""})] * 3
    assert _columns(same_data) == ("sign", {"key_id": "k1", "context": b""}, {"message": [msg] * 3})
    mixed_keys = [("verify", {"key_id": f"k{i}", "message": b"m", "signature": b"s", "version": None})
                  for i in range(2)]
    assert _columns(mixed_keys) == ("verify", {"version": None},
                                    {"key_id": ["k0", "k1"], "message": [b"m"] * 2, "signature": [b"s"] * 2})
    assert _columns([("sign", {"key_id": "k", "version": 1}), ("sign", {"key_id": "k", "version": True})]) \
        == ("sign", {"key_id": "k"}, {"version": [1, True]})  # equal is not enough: the same type too
    assert _columns(same_data[:1]) is None  # one item: rows
    assert _columns([("sign", {"key_id": "k"}), ("verify", {"key_id": "k"})]) is None  # two ops: rows
    assert _columns([("sign", {"key_id": "k"}), ("sign", {"key_id": "k", "context": b""})]) is None


def test_a_malformed_answer_to_a_batch_in_columns_is_the_worker_s_fault() -> None:
    from qpher_proxy.errors import KeyNotFound
    from qpher_proxy.kms.client.pool import _rows

    good = {"n": 2, "ok": {"signature": [b"s", None], "version": [1, None]},
            "errors": [[1, "key_not_found", 404, "no such key"]]}
    first, second = _rows(good, 2)
    assert first == {"signature": b"s", "version": 1}
    assert isinstance(second, KeyNotFound) and second.message == "no such key"
    for bad in (
        {**good, "n": 3},
        {**good, "ok": {"signature": [b"s"]}},
        {**good, "errors": [[1, "key_not_found", 404, "x"], [1, "key_not_found", 404, "x"]]},
        {**good, "errors": [[2, "key_not_found", 404, "x"]]},
        {**good, "errors": [[-1, "key_not_found", 404, "x"]]},
        {**good, "errors": [[1, "key_not_found", 404]]},
        {"results": []},
        None,
    ):
        with pytest.raises(KMSUnavailable):
            _rows(bad, 2)


def test_the_periodic_sweep_destroys_due_keys(store: KeyStore, clock: FakeClock, kms_dir: Path) -> None:
    service = KMSService(store, TOKEN)
    t = store.tenant("tenant-a")
    key = t.create(kind="kem").key_id
    t.schedule_destroy(key, 30)
    service.sweep()
    assert len(list((kms_dir / "keys").rglob("*.qkey"))) == 1
    clock.advance(30)
    service.sweep()
    assert list((kms_dir / "keys").rglob("*.qkey")) == []


async def test_a_request_the_worker_never_answers_times_out(autojump_clock: trio.testing.MockClock) -> None:
    ours, theirs = socket.socketpair()
    conn, server = ClientConnection(TOKEN), ServerConnection()
    server.receive_data(conn.hello({}))
    server.next_event()
    conn.receive_data(server.ready({}))
    conn.next_event()
    client = KMSClient(request_timeout=5.0)
    channel = WorkerChannel(0, ours, conn)
    client._attach(channel)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(channel.run)
            nursery.start_soon(client.watchdog)
            start = trio.current_time()
            with pytest.raises(KMSUnavailable, match="did not answer within 5 s"):
                await client.ping(ctx())
            assert 5.0 <= trio.current_time() - start <= 5.6
            assert channel.inflight == {} and client.ready  # the worker itself is not declared dead
            nursery.cancel_scope.cancel()
    finally:
        theirs.close()


# ---- the client keeps its loop awake for a lone request's answer, and only then -------------


async def _answer_next(theirs: socket.socket, server: ServerConnection, value: dict[str, object]) -> int:
    """Read one REQUEST frame off the worker's end and answer it with ``value``; returns its rid."""
    while True:
        event = server.next_event()
        if event is not NEED_DATA:
            break
        await trio.lowlevel.wait_readable(theirs)
        server.receive_data(theirs.recv(65536))
    theirs.send(server.response(event.rid, value))  # type: ignore[union-attr,arg-type]
    return event.rid  # type: ignore[union-attr]


def _fake_worker(spin: float) -> tuple[KMSClient, WorkerChannel, socket.socket, ServerConnection]:
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    conn, server = _pair()
    client = KMSClient(spin=spin)
    channel = WorkerChannel(0, ours, conn)
    client._attach(channel)
    return client, channel, theirs, server


async def test_a_lone_request_keeps_the_loop_awake_until_its_answer_and_no_longer() -> None:
    client, channel, theirs, server = _fake_worker(spin=30.0)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(channel.run)
            await trio.testing.wait_all_tasks_blocked()
            got: list[bytes] = []

            async def call() -> None:
                got.append(await client.ping(ctx(), b"one"))

            t0 = time.perf_counter()
            nursery.start_soon(call)
            await _answer_next(theirs, server, {"data": b"one"})
            # the answer ends the spin: every task is blocked again long before the 30 s budget
            await trio.testing.wait_all_tasks_blocked()
            assert got == [b"one"] and time.perf_counter() - t0 < 10
            assert channel._spinner is not None  # parked, ready for the next lone request
            nursery.cancel_scope.cancel()
    finally:
        theirs.close()


async def test_the_spin_is_bounded() -> None:
    client, channel, theirs, _server = _fake_worker(spin=0.05)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(channel.run)
            await trio.testing.wait_all_tasks_blocked()
            t0 = time.perf_counter()
            nursery.start_soon(client.ping, ctx(), b"unanswered")
            await trio.testing.wait_all_tasks_blocked()  # the worker never answers: the spin gives up
            assert time.perf_counter() - t0 >= 0.05
            assert len(channel.inflight) == 1 and channel._spinner is not None
            nursery.cancel_scope.cancel()
    finally:
        theirs.close()


async def test_the_spin_waits_for_the_lone_request_only() -> None:
    client, channel, theirs, server = _fake_worker(spin=30.0)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(channel.run)
            await trio.testing.wait_all_tasks_blocked()
            t0 = time.perf_counter()
            nursery.start_soon(client.ping, ctx(), b"first")  # alone: wakes the spinner
            nursery.start_soon(client.ping, ctx(), b"second")  # not alone: no spin of its own
            await _answer_next(theirs, server, {"data": b"first"})
            await trio.testing.wait_all_tasks_blocked()
            assert time.perf_counter() - t0 < 10
            assert len(channel.inflight) == 1 and channel._spinner is not None
            nursery.cancel_scope.cancel()
    finally:
        theirs.close()


async def test_no_spin_for_an_operation_slower_than_the_spin() -> None:
    client, channel, theirs, server = _fake_worker(spin=30.0)
    lone = client._lone_trips("ping")
    lone.spun, lone.count = 60.0, 1  # its spun round trips took longer than the spin
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(channel.run)
            await trio.testing.wait_all_tasks_blocked()
            t0 = time.perf_counter()
            nursery.start_soon(client.ping, ctx(), b"x")
            await trio.testing.wait_all_tasks_blocked()  # at once: nothing spins
            assert time.perf_counter() - t0 < 10
            assert len(channel.inflight) == 1 and channel._spinner is not None
            await _answer_next(theirs, server, {"data": b"x"})
            await trio.testing.wait_all_tasks_blocked()
            assert channel.inflight == {} and lone.spun == 60.0  # only spun round trips count
            nursery.cancel_scope.cancel()
    finally:
        theirs.close()


async def test_no_spin_when_turned_off() -> None:
    client, channel, theirs, server = _fake_worker(spin=0)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(channel.run)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(client.ping, ctx(), b"x")
            await trio.testing.wait_all_tasks_blocked()
            assert len(channel.inflight) == 1 and channel._spinner is not None  # never woken
            await _answer_next(theirs, server, {"data": b"x"})
            await trio.testing.wait_all_tasks_blocked()
            assert channel.inflight == {}
            nursery.cancel_scope.cancel()
    finally:
        theirs.close()


def test_the_spin_stops_for_an_operation_it_does_not_catch_and_keeps_checking() -> None:
    from qpher_proxy.kms.client.pool import _EXPLORE_EVERY, _LoneTrips

    budget = 200e-6
    lone = _LoneTrips()
    assert lone.choose(budget) is True  # nothing known: spin
    lone.note(100e-6)
    assert all(lone.choose(budget) for _ in range(3 * _EXPLORE_EVERY))  # it catches the answer
    for _ in range(40):  # the operation (or the machine) got slow: the spin no longer catches it
        lone.note(900e-6)
    assert [lone.choose(budget) for _ in range(3 * _EXPLORE_EVERY)].count(True) == 3  # the checks
    for _ in range(40):
        lone.note(100e-6)
    assert all(lone.choose(budget) for _ in range(_EXPLORE_EVERY))  # fast again: spins again
