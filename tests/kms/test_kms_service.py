"""The KMS service's dispatch (in-process, real key store) and the client's request timeout."""

from __future__ import annotations

import secrets
import socket
from pathlib import Path

import pytest
import trio
import trio.testing
from kms_helpers import FakeClock, ctx

from qpher_proxy.errors import KMSUnavailable
from qpher_proxy.kms.client import KMSClient, WorkerChannel
from qpher_proxy.kms.keystore import KeyStore
from qpher_proxy.kms.protocol import (
    NEED_DATA,
    ClientConnection,
    Error,
    Response,
    ServerConnection,
    encode_raw_request,
)
from qpher_proxy.kms.service import KMSService

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
    mixed = {"items": [{"op": "create_key", "args": {"kind": "kem"}}, {"op": "encapsulate", "args": {"key_id": key}},
                       "not an item"]}
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
