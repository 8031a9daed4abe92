"""The Idempotency-Key header in the API layer: parsed only for key creation and rotation,
passed to the KMS, the replay header on a replayed answer, and the KMS's idempotency refusals
as documented errors (Retry-After on idempotency_key_in_progress). What the KMS does with the key
is tested in tests/kms and tests/scaleout."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from _api_fake_kms import FakeKMS
from _api_openapi import documented_codes, validate_response

from qpher_proxy.api import APIAnswer, CryptoAPI, resolve
from qpher_proxy.api.handlers import REPLAYED_HEADER
from qpher_proxy.api.validation import parse_idempotency_key
from qpher_proxy.context import TenantContext
from qpher_proxy.errors import (
    IdempotencyKeyInProgress,
    IdempotencyKeyReused,
    InvalidIdempotencyKey,
    QpherError,
)
from qpher_proxy.kms.wire.model import KeyInfo


class RecordingKMS(FakeKMS):
    """The fake KMS, taking ``idempotency_key``: "replay" answers as a replay, "reused" and
    "busy" fail the way a KMS worker's error frame arrives (a plain QpherError by code)."""

    def __init__(self) -> None:
        super().__init__()
        self.passed: list[tuple[str, str | None]] = []

    def _idempotency(self, op: str, key: str | None) -> None:
        self.passed.append((op, key))
        if key == "reused":
            raise QpherError("used for another request", code="idempotency_key_reused", status=409)
        if key == "busy":
            raise QpherError("still in progress", code="idempotency_key_in_progress", status=409)

    async def create_key(self, ctx: TenantContext, algorithm: str | None = None, kind: str | None = None,
                         label: str | None = None, mode: str | None = None, *,
                         idempotency_key: str | None = None) -> KeyInfo:
        self._idempotency("create_key", idempotency_key)
        info = await super().create_key(ctx, algorithm, kind, label, mode)
        return dataclasses.replace(info, replayed=idempotency_key == "replay")

    async def rotate_key(
        self, ctx: TenantContext, key_id: str, *, idempotency_key: str | None = None
    ) -> KeyInfo:
        self._idempotency("rotate_key", idempotency_key)
        info = await super().rotate_key(ctx, key_id)
        return dataclasses.replace(info, replayed=idempotency_key == "replay")


@pytest.fixture
def kms() -> RecordingKMS:
    return RecordingKMS()


async def _respond(api: CryptoAPI, ctx: TenantContext, method: str, path: str, body: Any = b"",
                   key: list[bytes] | None = None) -> APIAnswer:
    found = resolve(method, path)
    assert found is not None
    route, params = found
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    try:
        answer = await api.respond(api.parse(route, raw, params, idempotency_key=key or ()), ctx)
    except QpherError as exc:
        assert exc.code in documented_codes(route, exc.status), (exc.status, exc.code)
        raise
    validate_response(route, answer.status, answer.body)
    return answer


@pytest.mark.parametrize(
    ("values", "want"),
    [([], None), ([b"a"], "a"), ([b"!" + b"~" * 254], "!" + "~" * 254),
     ([b"8e0f3b2c-5d1a-4c7e-9b6f-2a4d8c1e7f90"], "8e0f3b2c-5d1a-4c7e-9b6f-2a4d8c1e7f90")],
)
def test_a_well_formed_key_is_taken_as_is(values: list[bytes], want: str | None) -> None:
    assert parse_idempotency_key(values) == want


@pytest.mark.parametrize(
    "values",
    [[b""], [b"a" * 256], [b"two words"], [b"tab\tin"], ["caf\u00e9".encode()], [b"\x00"], [b"\x7f"],
     [b"one", b"two"], [b"same", b"same"]],
)
def test_a_malformed_or_repeated_key_is_400_without_echoing_it(values: list[bytes]) -> None:
    with pytest.raises(InvalidIdempotencyKey) as info:
        parse_idempotency_key(values)
    assert (info.value.status, info.value.code) == (400, "invalid_idempotency_key")
    for v in values:
        if len(v) > 3:
            assert v.decode("utf-8", "replace") not in info.value.message


async def test_creation_and_rotation_pass_the_key_and_a_replay_carries_the_header(
    api: CryptoAPI, kms: RecordingKMS, ctx: TenantContext
) -> None:
    first = await _respond(api, ctx, "POST", "/v1/keys", {"kind": "kem"}, [b"k-1"])
    assert (first.status, first.headers, first.replayed) == (201, (), False)
    again = await _respond(api, ctx, "POST", "/v1/keys", {"kind": "kem"}, [b"replay"])
    assert (again.status, again.headers, again.replayed) == (201, (REPLAYED_HEADER,), True)
    assert "replayed" not in again.body  # the body is the key, as the first answer was
    kid = first.body["key_id"]
    rot = await _respond(api, ctx, "POST", f"/v1/keys/{kid}/rotate", b"", [b"replay"])
    assert (rot.status, rot.headers) == (200, ((b"idempotent-replayed", b"true"),))
    await _respond(api, ctx, "POST", f"/v1/keys/{kid}/rotate")
    await _respond(api, ctx, "POST", "/v1/keys", {"kind": "kem"})
    assert kms.passed == [("create_key", "k-1"), ("create_key", "replay"), ("rotate_key", "replay"),
                          ("rotate_key", None), ("create_key", None)]
    # handle() keeps its (status, object) answer
    found = resolve("POST", "/v1/keys")
    assert found is not None
    status, obj = await api.handle(api.parse(found[0], b'{"kind":"kem"}', {}, idempotency_key=[b"x"]), ctx)
    assert status == 201 and obj["key_id"].startswith("k_")


async def test_other_routes_ignore_the_header(api: CryptoAPI, kms: RecordingKMS, ctx: TenantContext) -> None:
    kid = (await _respond(api, ctx, "POST", "/v1/keys", {"kind": "kem"})).body["key_id"]
    for method, path in (("GET", f"/v1/keys/{kid}"), ("POST", f"/v1/keys/{kid}/disable"),
                         ("GET", "/v1/keys")):
        answer = await _respond(api, ctx, method, path, b"", [b"not valid here either \x00"])
        assert answer.headers == ()


async def test_the_kms_refusals_become_documented_409s(api: CryptoAPI, ctx: TenantContext) -> None:
    with pytest.raises(IdempotencyKeyReused):
        await _respond(api, ctx, "POST", "/v1/keys", {"kind": "kem"}, [b"reused"])
    with pytest.raises(IdempotencyKeyInProgress) as info:
        await _respond(api, ctx, "POST", "/v1/keys", {"kind": "kem"}, [b"busy"])
    assert info.value.headers == ((b"retry-after", b"1"),)
    kid = (await _respond(api, ctx, "POST", "/v1/keys", {"kind": "kem"})).body["key_id"]
    with pytest.raises(IdempotencyKeyInProgress):
        await _respond(api, ctx, "POST", f"/v1/keys/{kid}/rotate", b"", [b"busy"])
    with pytest.raises(InvalidIdempotencyKey):
        await _respond(api, ctx, "POST", f"/v1/keys/{kid}/rotate", b"", [b"a", b"b"])
