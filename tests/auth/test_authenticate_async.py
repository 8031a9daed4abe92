"""Authenticator.authenticate_async with a blocking store (no database: a fake one)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import trio

from qpher_proxy.auth.apikeys import APIKeyRecord, Authenticator, key_mac
from qpher_proxy.errors import StorageUnavailable, Unauthenticated

PEPPER = b"q" * 32
KEY_ID, SECRET = "abcdefghijkl", "S" * 43
KEY = f"qph_{KEY_ID}_{SECRET}"
ACTIVE = APIKeyRecord(KEY_ID, "t1", "pro", (), 1.0, None, None, None)
REVOKED = APIKeyRecord(KEY_ID, "t1", "pro", (), 1.0, None, 2.0, None)


class FakeStore:
    blocking = True
    pool_size = 2
    statement_timeout = 0.1

    def __init__(self) -> None:
        self.record = ACTIVE
        self.version = 0
        self.lookups = 0
        self.running = 0
        self.max_running = 0
        self.gate: threading.Event | None = None
        self.entered = threading.Event()
        self.fail_lookups = False
        self.fail_tokens = False
        self._lock = threading.Lock()

    def mac(self, key_id: str, secret: str) -> bytes:
        return key_mac(PEPPER, key_id, secret)

    def lookup(self, key_id: str) -> tuple[APIKeyRecord, bytes] | None:
        with self._lock:
            self.lookups += 1
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        try:
            record = self.record  # read first, as a query would
            self.entered.set()
            if self.gate is not None:
                self.gate.wait(5)
            else:
                time.sleep(0.02)
            if self.fail_lookups:
                raise StorageUnavailable("database error while reading an API key")
            if key_id != KEY_ID:
                return None
            return record, self.mac(key_id, SECRET)
        finally:
            with self._lock:
                self.running -= 1

    def change_token(self) -> tuple[int, int]:
        if self.fail_tokens:
            raise StorageUnavailable("database error while reading the API key change counter")
        return self.version, 0


async def test_a_lookup_racing_a_change_is_not_cached() -> None:
    store = FakeStore()
    auth = Authenticator(store, ttl=0.1)
    assert await auth.poll_once()
    store.gate = threading.Event()
    results: list[Any] = []

    async def request() -> None:
        results.append(await auth.authenticate_async(KEY))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(request)
        await trio.to_thread.run_sync(store.entered.wait)  # it read the active record and waits
        store.record, store.version = REVOKED, 1  # revoked meanwhile, on another node
        assert await auth.poll_once()
        store.gate.set()
    assert results == [ACTIVE]  # read before the revocation: fine for that one request
    store.gate = None
    with pytest.raises(Unauthenticated) as info:
        await auth.authenticate_async(KEY)  # ... but it was not cached under the new token
    assert info.value.reason == "revoked"


async def test_concurrent_misses_share_one_lookup_and_its_error() -> None:
    store = FakeStore()
    auth = Authenticator(store, ttl=0.1)
    assert await auth.poll_once()
    store.fail_lookups = True
    errors: list[BaseException] = []

    async def request() -> None:
        try:
            await auth.authenticate_async(KEY)
        except StorageUnavailable as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(request)
    assert len(errors) == 10 and store.lookups == 1
    store.fail_lookups = False
    assert await auth.authenticate_async(KEY) == ACTIVE and store.lookups == 2


async def test_lookups_run_at_most_pool_size_at_once() -> None:
    store = FakeStore()
    auth = Authenticator(store, ttl=0.1)
    assert await auth.poll_once()

    async def request(i: int) -> None:
        with pytest.raises(Unauthenticated):
            await auth.authenticate_async(f"qph_{i:012d}_{SECRET}")  # distinct unknown ids

    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(request, i)
    assert store.lookups == 8 and store.max_running == store.pool_size


async def test_a_stale_token_refuses_even_cache_hits() -> None:
    store = FakeStore()
    auth = Authenticator(store, ttl=0.2)
    assert auth.poll_interval == 0.1 and auth.stale_after == pytest.approx(0.5)
    with pytest.raises(StorageUnavailable):
        await auth.authenticate_async(KEY)  # never polled
    async with trio.open_nursery() as nursery:
        await nursery.start(auth.run_change_poller)
        assert await auth.authenticate_async(KEY) == ACTIVE
        store.fail_tokens = True
        t0 = trio.current_time()
        await trio.sleep(0.2)
        assert await auth.authenticate_async(KEY) == ACTIVE  # within the window: cached answer
        while True:
            try:
                await auth.authenticate_async(KEY)
            except StorageUnavailable:
                break
            await trio.sleep(0.01)
        assert auth.stale_after - auth.poll_interval <= trio.current_time() - t0 <= auth.stale_after + 0.1
        store.fail_tokens = False
        await trio.sleep(auth.poll_interval * 2)
        assert await auth.authenticate_async(KEY) == ACTIVE
        nursery.cancel_scope.cancel()
