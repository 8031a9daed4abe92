"""One request/response exchange with the upstream: the request-body pump and the response reader.

Theory of operation
-------------------
**One exchange = one connection, two tasks.** ``send()`` checks a connection out of the pool
(or connects a new one), writes the request head, and, if there is a body, starts a *pump*
task in the client's nursery that writes the body while the calling task reads the response.
Both directions must run at once: an upstream that answers while it is still reading (an echo
server, a 413 sent early) would otherwise deadlock against a client that insisted on writing
the whole body first, as soon as both TCP windows are full. h11 is full-duplex by design and
trio streams allow one concurrent sender and one concurrent receiver, so the two tasks share
the h11 ``Connection`` and the stream without a lock (h11 calls are synchronous; trio is
single-threaded). ``send()`` returns as soon as the response head has arrived; the response
body is then pulled on demand by iterating ``resp.body_chunks()``. Nothing is buffered whole:
at most ``chunk_bytes`` (64 KiB) is read per ``receive_some`` and written per ``send_all``,
and at most one chunk per direction is in flight.

The exchange outlives ``send()`` on purpose: the gateway returns a response whose body *is*
our chunk iterator, and the HTTP server drains it after the handler has returned. The
connection is released when the body iterator is exhausted (or fails), or by
``resp.aclose()`` (also reachable as ``resp.body_chunks().aclose()``), which is idempotent and
safe under cancellation; call it in a ``finally``.

The request body iterator belongs to the exchange once the pump has pulled from it: it is read
in the pump task (so a ``Cancelled`` aimed at the exchange may land inside its ``__anext__``),
and if the exchange ends before it is exhausted, its ``aclose()`` (if any) is called. Callers
must not touch it afterwards.

**Reuse rule.** A connection goes back to the pool only if, at the end of the response body,
h11 says both sides are ``DONE`` (the request was fully written, the response fully read,
neither side asked to close), the pump finished without error, and no unread byte is left in
h11's buffer (bytes after a complete response are garbage or an attack on response framing).
Anything else - early response while the body was still uploading, ``aclose()`` before the end,
an error, ``Connection: close``, HTTP/1.0 - closes it.

**Errors of the exchange.** An exception raised by the caller's body iterator (the client went
away mid-upload) aborts the exchange and is re-raised, unchanged, in the task reading the
response. A body that disagrees with its declared ``content_length`` gives ``BadRequest``
(400).
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterable, AsyncIterator
from typing import TYPE_CHECKING, Self

import h11
import trio

from qpher_proxy.errors import (
    BadRequest,
    UpstreamBadResponse,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from qpher_proxy.upstream._connection import PHASE_MESSAGES, UpstreamConnection, io_step, translate
from qpher_proxy.upstream._lifetime import BodyIterator

if TYPE_CHECKING:
    from qpher_proxy.upstream.client import UpstreamClient

Headers = list[tuple[bytes, bytes]]


class UpstreamResponse:
    """The response to one forwarded request, and the exchange that produces it.

    ``status``, ``reason``, ``http_version``, ``headers`` (as the upstream sent them, names
    lower-cased: pass them through ``prepare_downstream_headers``) and ``content_length`` are
    set when ``send()`` returns. ``body_chunks()`` yields the body in pieces of at most
    ``chunk_bytes``; ``aclose()`` releases the connection (idempotent).
    """

    status: int
    reason: bytes
    http_version: bytes
    headers: Headers
    content_length: int | None

    def __init__(self, client: UpstreamClient, conn: UpstreamConnection) -> None:
        self._client = client
        self._conn = conn
        self._upload_done = False  # the request's last byte was handed to the kernel
        self._pump_scope: trio.CancelScope | None = None
        self._pump_finished = trio.Event()
        self._send_error: UpstreamError | None = None  # write failed; an early response may still come
        self._abort: BaseException | None = None  # fatal; raised in the reading task
        self._recv_scope: trio.CancelScope | None = None
        self._received_any = False
        self._body_pulled = False
        self._finished = False
        self._owns_slot = False
        self._body = BodyIterator(self)

    # -- what the caller uses -----------------------------------------------------------

    def body_chunks(self) -> AsyncIterator[bytes]:
        """The response body; exhausting it releases the connection. One iterator per response."""
        return self._body

    async def aclose(self) -> None:
        """Release the connection; if the body was not read to its end, the connection is closed.

        Safe to call any number of times and under cancellation (the release itself is synchronous)."""
        self._finish(reusable=False)
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        status = getattr(self, "status", None)
        return f"<UpstreamResponse status={status} finished={self._finished}>"

    # -- the exchange -------------------------------------------------------------------

    async def _start(self, head: h11.Request, body: memoryview | AsyncIterable[bytes] | None) -> None:
        conn = self._conn
        data = conn.h11.send(head) or b""
        if body is None:
            data += conn.h11.send(h11.EndOfMessage()) or b""
        await self._send_bytes(data)
        if body is None:
            self._upload_done = True
        else:
            self._pump_scope = trio.CancelScope()
            nursery = self._client._nursery
            assert nursery is not None
            nursery.start_soon(self._pump, body)
        while True:
            event = await self._next_event("head")
            if isinstance(event, h11.Response):
                break
            if not isinstance(event, h11.InformationalResponse):  # 100, 102, 103: not forwarded
                raise UpstreamBadResponse("the upstream sent an invalid response")
        self.status = event.status_code
        self.reason = bytes(event.reason)
        self.http_version = bytes(event.http_version)
        self.headers = [(bytes(n), bytes(v)) for n, v in event.headers]
        self.content_length = None
        if not any(n == b"transfer-encoding" for n, _ in self.headers):
            for n, v in self.headers:
                if n == b"content-length":
                    self.content_length = int(v)  # h11 has validated it

    async def _send_bytes(self, data: bytes) -> None:
        with io_step("send", trio.current_time() + self._client.read_timeout):
            await self._conn.stream.send_all(data)

    async def _pump(self, body: memoryview | AsyncIterable[bytes]) -> None:
        """Write the request body (runs in the client's nursery; never raises out of it)."""
        scope = self._pump_scope
        assert scope is not None
        with scope:
            if scope.cancel_called:
                return  # the exchange ended before we ran: leave the caller's iterator untouched
            iterator: AsyncIterator[bytes] | None = None
            exhausted = False
            try:
                step = self._client.chunk_bytes
                if isinstance(body, memoryview):
                    for i in range(0, len(body), step):
                        await self._send_data(body[i:i + step])
                else:
                    iterator = aiter(body)
                    while True:
                        self._body_pulled = True
                        try:
                            chunk = await anext(iterator)
                        except StopAsyncIteration:
                            exhausted = True
                            break
                        view = memoryview(chunk).cast("B")
                        for i in range(0, len(view), step):
                            await self._send_data(view[i:i + step])
                await self._send_bytes(self._conn.h11.send(h11.EndOfMessage()) or b"")
                self._upload_done = True
                self._start_read_deadline()
            except h11.LocalProtocolError as exc:
                self._abort_with(BadRequest("the request body does not match its declared length"), exc)
            except UpstreamTimeout as exc:
                self._abort_with(exc)
            except UpstreamError as exc:
                # The upstream may have answered early (413) and closed: let the reader see it.
                self._send_error = exc
                self._start_read_deadline()
            except Exception as exc:
                # The caller's body iterator failed (client went away, ...) or gave a non-bytes
                # chunk: hand the exception to the task reading the response, which re-raises it.
                self._abort_with(exc)
            finally:
                # From the first pull on, the body iterator is ours: if the exchange ends before
                # it is exhausted, close it (an async generator left suspended would otherwise be
                # finalised by the garbage collector, with a ResourceWarning).
                try:
                    if iterator is not None and not exhausted and hasattr(iterator, "aclose"):
                        # trio types its argument as its AsyncResource ABC; it only calls aclose().
                        await trio.aclose_forcefully(iterator)  # type: ignore[arg-type]
                except Exception as exc:
                    self._abort_with(exc)
                finally:
                    self._pump_finished.set()

    async def _send_data(self, piece: memoryview) -> None:
        if piece:
            # h11 types Data.data as bytes but frames any bytes-like object: a view sends the
            # caller's chunk without copying it.
            await self._send_bytes(self._conn.h11.send(h11.Data(data=piece)) or b"")  # type: ignore[arg-type]

    def _abort_with(self, exc: BaseException, cause: BaseException | None = None) -> None:
        if cause is not None:
            exc.__cause__ = cause
        if self._abort is None:
            self._abort = exc
        if self._recv_scope is not None:
            self._recv_scope.cancel()

    def _start_read_deadline(self) -> None:
        if self._recv_scope is not None:
            self._recv_scope.deadline = min(self._recv_scope.deadline,
                                            trio.current_time() + self._client.read_timeout)

    def _raise_if_aborted(self) -> None:
        if self._abort is not None:
            raise self._abort

    async def _next_event(self, phase: str) -> h11.Event:
        conn = self._conn
        while True:
            self._raise_if_aborted()
            try:
                event = conn.h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise translate(exc, phase) from exc
            if event is not h11.NEED_DATA:
                if event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
                    raise UpstreamBadResponse("the upstream sent an invalid response")
                return event  # type: ignore[return-value]
            uploading = not self._upload_done and self._send_error is None
            deadline = math.inf if uploading else trio.current_time() + self._client.read_timeout
            try:
                with io_step(phase, deadline) as scope:
                    self._recv_scope = scope
                    data = await conn.stream.receive_some(self._client.chunk_bytes)
            except UpstreamError:
                self._raise_if_aborted()
                if self._send_error is not None and not self._received_any:
                    raise self._send_error from None
                raise
            finally:
                self._recv_scope = None
            if not data and not self._received_any:
                raise UpstreamUnavailable(PHASE_MESSAGES["head"][0])
            self._received_any = True
            # h11 types receive_data's argument as bytes; it appends it to a bytearray, so the
            # bytearray a trio stream may return needs no copy.
            conn.h11.receive_data(data)  # type: ignore[arg-type]

    async def _next_chunk(self) -> bytes | None:
        """The next piece of the body, or None at its end."""
        while True:
            event = await self._next_event("body")
            if isinstance(event, h11.Data):
                if event.data:
                    return bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return None
            else:
                raise UpstreamBadResponse("the upstream sent an invalid response")

    async def _end_of_body(self) -> None:
        """The response's EndOfMessage arrived: reuse the connection if the exchange was clean."""
        h = self._conn.h11
        if h.our_state is h11.DONE and not self._pump_finished.is_set() and self._pump_scope is not None:
            await self._pump_finished.wait()  # its last send_all is in flight (bounded by read_timeout)
        clean = (
            h.our_state is h11.DONE and h.their_state is h11.DONE
            and self._abort is None and self._send_error is None and self._upload_done
            and not h.trailing_data[0]
        )
        if clean:
            h.start_next_cycle()
        self._finish(reusable=clean)

    def _fail(self) -> None:
        self._finish(reusable=False)

    def _finish(self, *, reusable: bool) -> None:
        if self._finished:
            return
        self._finished = True
        if self._pump_scope is not None:
            self._pump_scope.cancel()
        try:
            if reusable:
                self._client._checkin(self._conn)
            else:
                self._client._discard(self._conn)
        finally:
            if self._owns_slot:
                self._owns_slot = False
                self._client._slots.release()

