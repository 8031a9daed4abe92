"""The events of the KMS wire protocol: what a connection in :mod:`.protocol` turns frames into.

What a Request is
=================

A :class:`Request` cannot be constructed without a 32-byte service token and a
:class:`~qpher_proxy.context.TenantContext` whose ``tenant_id``, ``request_id`` and
``api_key_id`` are non-empty; :meth:`.protocol.ClientConnection.request` takes the token from
the connection (given once at construction) and the context from the caller, so the gateway has
no way to emit a frame without either. There is no second path to the KMS.

Events carry secrets (the token; plaintexts, shared secrets, messages): those fields are left
out of every ``repr``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Final, Literal

from ...context import TenantContext
from ._values import Value

TOKEN_BYTES = 32  # 256-bit service token, fresh per worker start (secrets.token_bytes)
MAX_RID = 0xFFFF_FFFF


class _Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return self.value


NEED_DATA: Final = _Sentinel.NEED_DATA  # "feed me more bytes"; ``event is NEED_DATA`` narrows the type


def _check_token(token: object) -> bytes:
    if type(token) is not bytes or len(token) != TOKEN_BYTES:
        raise ValueError(f"service token must be {TOKEN_BYTES} bytes")
    return token


_LEN8 = [bytes((i,)) for i in range(256)]  # the length byte of a str8, by length


def _context_parts(context: object) -> tuple[bytes, bytes, bytes, bytes, bytes, bytes]:
    """The pieces of ``str8 tenant || str8 request_id || str8 api_key_id``, checking each is present."""
    if type(context) is not TenantContext:
        raise TypeError(f"context must be a TenantContext, not {type(context).__name__}")
    t, r, a = context.tenant_id, context.request_id, context.api_key_id
    if type(t) is str and type(r) is str and type(a) is str:
        tb, rb, ab = t.encode(), r.encode(), a.encode()
        if 0 < len(tb) <= 255 and 0 < len(rb) <= 255 and 0 < len(ab) <= 255:
            return _LEN8[len(tb)], tb, _LEN8[len(rb)], rb, _LEN8[len(ab)], ab
    for name, v in (("tenant_id", t), ("request_id", r), ("api_key_id", a)):
        if type(v) is not str or not v:
            raise ValueError(f"context.{name} must be a non-empty string")
        if len(v.encode()) > 255:
            raise ValueError(f"context.{name} must be at most 255 bytes of UTF-8")
    raise AssertionError("unreachable")  # pragma: no cover


def _check_context(context: object) -> TenantContext:
    _context_parts(context)
    return context  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class Hello:
    """First frame gateway -> KMS: the per-start service token and the worker's settings."""

    token: bytes = field(repr=False)
    config: dict[str, Value]

    def __post_init__(self) -> None:
        _check_token(self.token)


@dataclass(frozen=True, slots=True)
class Ready:
    """KMS -> gateway after a successful bootstrap: non-secret facts about the worker."""

    info: dict[str, Value]


@dataclass(frozen=True, slots=True)
class Request:
    """One operation, always with the service token and the tenant context."""

    rid: int
    token: bytes = field(repr=False)
    context: TenantContext
    op: str
    args: dict[str, Value] = field(repr=False)

    def __post_init__(self) -> None:
        _check_token(self.token)
        _check_context(self.context)
        if type(self.op) is not str or not 0 < len(self.op) <= 64:
            raise ValueError("op must be a non-empty string of at most 64 characters")
        if type(self.rid) is not int or not 0 < self.rid <= MAX_RID:
            raise ValueError(f"rid must be in 1..{MAX_RID}")


@dataclass(frozen=True, slots=True)
class RejectedRequest:
    """A well-framed REQUEST whose contents are not acceptable; answer with an ERROR frame."""

    rid: int
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Response:
    rid: int
    value: Value = field(repr=False)


@dataclass(frozen=True, slots=True)
class Error:
    """An error answer. ``rid == 0`` is about the connection itself (a failed bootstrap)."""

    rid: int
    code: str
    status: int
    message: str


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed its end cleanly, between frames."""


Event = Hello | Ready | Request | RejectedRequest | Response | Error | ConnectionClosed
NeedData = Literal[_Sentinel.NEED_DATA]
