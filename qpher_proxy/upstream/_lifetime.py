"""What the HTTP/1.1 and the HTTP/2 upstream clients share: the nursery they own while entered
(``async with client:``), and the response body iterator.

**Lifetime.** Entering a client opens a nursery (the request-body pumps, and whatever else the
client runs, live in it); exiting closes every connection, then cancels and leaves the nursery.
A client is entered once: after its exit it stays closed.

**The body iterator** (``resp.body_chunks()``) is a plain iterator class, not an async
generator, so that ending the exchange never depends on generator finalisation. It is a hot
path: one await of the response's ``_next_chunk()`` per chunk, nothing else.
"""

from __future__ import annotations

import contextlib
from types import TracebackType
from typing import ClassVar, Protocol, Self

import trio


class NurseryClient:
    """The ``async with`` lifetime of an upstream client. A subclass calls ``__init__``, defines
    ``_close_all`` (close every connection: runs at exit, after the nursery is cancelled) and
    may override ``_started`` (start the client's own tasks)."""

    _what: ClassVar[str]  # the class as named in "can be entered only once"

    def __init__(self) -> None:
        self._nursery: trio.Nursery | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._closed = False

    async def __aenter__(self) -> Self:
        if self._stack is not None or self._closed:
            raise RuntimeError(f"an {self._what} can be entered only once")
        stack = contextlib.AsyncExitStack()
        self._nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(self._close_all)  # LIFO: runs after the cancel, before the nursery exits
        stack.callback(self._nursery.cancel_scope.cancel)
        self._started(self._nursery)
        self._stack = stack
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        assert self._stack is not None
        self._closed = True
        return await self._stack.__aexit__(exc_type, exc, tb)

    def _started(self, nursery: trio.Nursery) -> None:
        """Start the client's own tasks in its nursery (none by default)."""

    def _close_all(self) -> None:
        raise NotImplementedError


class ChunkSource(Protocol):
    """What a response gives its body iterator."""

    _finished: bool  # the exchange has ended (``aclose()``, ...)

    async def _next_chunk(self) -> bytes | None:
        """The next piece of the body, or None at its end."""
        ...

    async def _end_of_body(self) -> None:
        """The body was read to its end: end the exchange."""
        ...

    def _fail(self) -> None:
        """Reading the body failed: end the exchange (synchronous)."""
        ...

    async def aclose(self) -> None: ...


class BodyIterator:
    """``async for chunk in resp.body_chunks()``: the chunks of ``resp._next_chunk()`` until it
    gives ``None`` (then ``resp._end_of_body()``) or raises (then ``resp._fail()``, and the error
    goes on)."""

    __slots__ = ("_resp", "_done")

    def __init__(self, resp: ChunkSource) -> None:
        self._resp = resp
        self._done = False

    def __aiter__(self) -> BodyIterator:
        return self

    async def __anext__(self) -> bytes:
        resp = self._resp
        if self._done or resp._finished:
            self._done = True
            raise StopAsyncIteration
        try:
            chunk = await resp._next_chunk()
            if chunk is None:
                self._done = True
                await resp._end_of_body()
        except BaseException:
            self._done = True
            resp._fail()
            raise
        if chunk is None:
            raise StopAsyncIteration
        return chunk

    async def aclose(self) -> None:
        self._done = True
        await self._resp.aclose()
