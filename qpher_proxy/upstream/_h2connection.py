"""One HTTP/2 connection to the upstream: its ``h2`` state machine, a reader and a writer task,
and what the reader has received for each stream (``h2client.py`` holds the pool and the
exchanges).

Theory of operation
-------------------
**Three kinds of task, one state machine.** Each connection has a *reader* task (bytes from the
socket into ``h2``, events dispatched to per-stream state) and a *writer* task (whatever ``h2``
has queued, out to the socket). Everybody else touches ``h2`` only through synchronous calls
(``send_headers``, ``send_data``, ``acknowledge_received_data``, ``reset_stream``) followed by
``kick()``, which wakes the writer; trio is single-threaded, so no lock is needed and the
frames leave in the order ``h2`` produced them. A task that must know its frames are on the
wire (the body pump, for back-pressure) awaits ``flush()``. A write is never cancelled half-way
by its caller: only the writer writes, bounded by ``read_timeout``, and a failed or expired
write ends the whole connection (a torn frame would corrupt it for every stream).

**Receiving.** The reader feeds every byte to ``h2`` and turns its events into per-stream state
(``StreamState``): the response head, a queue of body chunks, the trailers, the end, or the
error that ended the stream. The task reading that stream sleeps on it and is woken. A chunk's
bytes are acknowledged to the upstream only when that task takes the chunk (``h2client``), so
the stream and connection windows we advertise bound what is buffered; data for a stream
nobody reads any more is acknowledged at once, so it cannot starve the connection.

**GOAWAY** stops new streams on the connection. With ``NO_ERROR`` the streams up to its
``last_stream_id`` go on to their end (``_goaway_keeps_streams_open``) and later ones fail as
not processed (``StreamNotProcessed``, which the client may send again); with an error code the
connection ends. ``RST_STREAM`` fails its stream alone (``REFUSED_STREAM`` as not processed),
except a ``NO_ERROR`` reset after the whole response, which loses nothing. **A dead connection**
(EOF, a transport error, a protocol violation, a failed write) fails every stream on it that had
not ended, wakes everybody waiting on it and leaves the pool; its socket is closed
synchronously, so cleanup cannot be cancelled half-way.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import trio

from qpher_proxy.errors import UpstreamBadResponse, UpstreamError, UpstreamUnavailable
from qpher_proxy.upstream._connection import _FOREIGN, PHASE_MESSAGES, io_step

if TYPE_CHECKING:
    from qpher_proxy.upstream.h2client import H2UpstreamClient

#: RFC 9113 section 8.2.2: a message carrying one of these is malformed on HTTP/2.
CONNECTION_SPECIFIC: frozenset[bytes] = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade",
})

Headers = list[tuple[bytes, bytes]]

STREAM_RESET = "the upstream reset the stream"
GOAWAY_MESSAGE = "the upstream closed the connection before this stream was accepted"
REFUSED_MESSAGE = "the upstream refused the stream"


class StreamNotProcessed(UpstreamUnavailable):
    """The upstream said it did not process the stream at all (RFC 9113 section 8.7: a stream
    above a GOAWAY's ``last_stream_id``, or reset with ``REFUSED_STREAM``): safe to send again."""


class StreamState:
    """What the reader task has received for one stream, waiting for the task that reads it."""

    __slots__ = ("id", "head", "chunks", "trailers", "ended", "error", "_changed")

    def __init__(self, stream_id: int) -> None:
        self.id = stream_id
        self.head: Headers | None = None
        self.chunks: deque[tuple[bytes, int]] = deque()  # (data, flow-controlled length incl. padding)
        self.trailers: Headers = []
        self.ended = False  # END_STREAM received: nothing more will come
        self.error: UpstreamError | None = None  # reset, GOAWAY or a dead connection
        self._changed = trio.Event()

    def wake(self) -> None:
        self._changed.set()

    async def wait(self) -> None:
        """Sleep until the next ``wake()``. The caller checks its condition first, with no
        checkpoint in between, so a wake cannot fall between the check and this wait."""
        if self._changed.is_set():
            self._changed = trio.Event()
        await self._changed.wait()


def _goaway_keeps_streams_open(conn: h2.connection.H2Connection) -> None:
    """Let ``h2`` go on receiving frames for the streams a GOAWAY lets finish.

    h2 moves its connection state machine to CLOSED on a received GOAWAY and then refuses every
    later frame as a protocol error - even the rest of the same read - although RFC 9113
    section 6.8 has the streams up to ``last_stream_id`` complete (grpc servers send GOAWAY on
    graceful shutdown and then finish the calls in flight). The client stops opening streams on
    that connection itself (the ``goaway`` flag of ``UpstreamH2Connection``), so this connection's state
    machine gets its own copy of h2's transition table in which receiving GOAWAY leaves the state
    as it was. This is the one place that reaches into h2's internals; a GOAWAY with an error code
    still ends the connection (``UpstreamH2Connection._dispatch``)."""
    machine = conn.state_machine
    open_states = (h2.connection.ConnectionState.IDLE, h2.connection.ConnectionState.CLIENT_OPEN)
    table = dict(machine._transitions)
    for state in open_states:
        table[(state, h2.connection.ConnectionInputs.RECV_GOAWAY)] = (None, state)
    machine._transitions = table


class UpstreamH2Connection:
    """One TCP (+TLS) connection to the upstream, its h2 state machine and its two tasks."""

    def __init__(self, client: H2UpstreamClient, stream: trio.abc.Stream, raw: trio.SocketStream) -> None:
        self.client = client
        self.stream = stream
        self.raw = raw
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.h2 = h2.connection.H2Connection(config=config)
        self.h2.local_settings = h2.settings.Settings(client=True, initial_values={
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: client.stream_window,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: client.max_header_list_bytes,
        })
        _goaway_keeps_streams_open(self.h2)
        self.streams: dict[int, StreamState] = {}
        self.goaway = False  # no new streams on this connection
        self.dead: UpstreamError | None = None
        self._writer_wakeup = trio.Event()
        self._sent = trio.Event()
        self._sent.set()
        self._window = trio.Event()  # set on every WINDOW_UPDATE / SETTINGS that may open a window

    # -- capacity -----------------------------------------------------------------------

    def has_capacity(self) -> bool:
        return (self.dead is None and not self.goaway
                and self.h2.open_outbound_streams < self.h2.remote_settings.max_concurrent_streams)

    # -- writing ------------------------------------------------------------------------

    def start(self, nursery: trio.Nursery) -> None:
        self.h2.initiate_connection()
        extra = self.client.connection_window - 65_535  # RFC 9113 section 6.9.2: the initial window
        if extra > 0:
            self.h2.increment_flow_control_window(extra)
        nursery.start_soon(self._write_loop)
        nursery.start_soon(self._read_loop)

    def kick(self) -> None:
        """Wake the writer: ``h2`` has frames queued (synchronous, so callable anywhere)."""
        if self.dead is not None:
            return  # nobody writes any more; flush() raises
        if self._sent.is_set():
            self._sent = trio.Event()
        self._writer_wakeup.set()

    async def flush(self) -> None:
        """Wait until every frame queued so far is written (raises if the connection died)."""
        self.kick()
        await self._sent.wait()
        if self.dead is not None:
            raise self.dead

    async def _write_loop(self) -> None:
        try:
            while self.dead is None:
                data = self.h2.data_to_send()
                if data:
                    with io_step("send", trio.current_time() + self.client.read_timeout):
                        await self.stream.send_all(data)
                    continue
                self._sent.set()
                if self._writer_wakeup.is_set():
                    self._writer_wakeup = trio.Event()
                await self._writer_wakeup.wait()
        except UpstreamError as exc:
            self.die(exc)

    async def wait_for_window(self) -> None:
        if self._window.is_set():
            self._window = trio.Event()
        await self._window.wait()

    # -- reading ------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        try:
            while True:
                try:
                    data = await self.stream.receive_some(self.client.chunk_bytes)
                except _FOREIGN as exc:
                    raise UpstreamUnavailable(PHASE_MESSAGES["body"][0]) from exc
                if not data:
                    raise UpstreamUnavailable("the upstream closed the connection")
                try:
                    events = self.h2.receive_data(data)
                except h2.exceptions.ProtocolError as exc:
                    self.kick()  # h2 has queued a GOAWAY saying why
                    raise UpstreamBadResponse("the upstream sent an invalid http/2 frame") from exc
                for event in events:
                    self._dispatch(event)
                self.kick()  # SETTINGS and PING acknowledgements, window updates
        except UpstreamError as exc:
            self.die(exc)

    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            st = self.streams.get(event.stream_id)
            if st is not None:
                st.head = list(event.headers)  # bytes: header_encoding=None
                st.wake()
        elif isinstance(event, h2.events.DataReceived):
            st = self.streams.get(event.stream_id)
            n = event.flow_controlled_length or 0
            if st is not None and event.data:
                st.chunks.append((event.data, n))
                st.wake()
            elif n:  # a stream we gave up, or padding only: give the window back now
                self.h2.acknowledge_received_data(n, event.stream_id)
        elif isinstance(event, h2.events.TrailersReceived):
            st = self.streams.get(event.stream_id)
            if st is not None:
                st.trailers = list(event.headers)
                st.wake()
        elif isinstance(event, h2.events.StreamEnded):
            st = self.streams.get(event.stream_id)
            if st is not None:
                st.ended = True
                st.wake()
        elif isinstance(event, h2.events.StreamReset):
            st = self.streams.get(event.stream_id)
            # A reset after the whole response (a server that answered before reading the
            # request body to its end, as RFC 9113 section 8.1 allows) loses nothing.
            if st is not None and not (st.ended and event.error_code == h2.errors.ErrorCodes.NO_ERROR):
                refused = event.error_code == h2.errors.ErrorCodes.REFUSED_STREAM
                error = StreamNotProcessed(REFUSED_MESSAGE) if refused else UpstreamUnavailable(STREAM_RESET)
                st.error = st.error or error
                st.wake()
            self._window.set()  # a pump waiting for this stream's window must look again
        elif isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            self._window.set()
            self.client._capacity_changed()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = True
            last = event.last_stream_id if event.last_stream_id is not None else 0
            for sid, st in self.streams.items():
                if sid > last:
                    st.error = st.error or StreamNotProcessed(GOAWAY_MESSAGE)
                    st.wake()
            if event.error_code != h2.errors.ErrorCodes.NO_ERROR:
                raise UpstreamUnavailable(PHASE_MESSAGES["body"][0])
            self.client._forget_if_idle(self)

    # -- ending -------------------------------------------------------------------------

    def die(self, exc: UpstreamError) -> None:
        """End the connection: every stream on it fails with ``exc`` (unless already complete)."""
        if self.dead is not None:
            return
        self.dead = exc
        self.goaway = True
        for st in self.streams.values():
            if not st.ended:
                st.error = st.error or exc
            st.wake()
        self._sent.set()
        self._writer_wakeup.set()  # the writer sees ``dead`` and ends
        self._window.set()
        self.close()
        self.client._forget(self)

    def close(self) -> None:
        # Synchronous, as in _connection.UpstreamConnection.close: both tasks wake with
        # ClosedResourceError and end.
        self.raw.socket.close()
