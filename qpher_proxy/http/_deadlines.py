"""When to give up on a peer: one deadline per connection, enforced by one task per server.

Each connection runs inside ONE ``CancelScope`` and carries ONE deadline, a plain float that
moves as the connection changes phase (no ``move_on_after`` per receive, not even a trio
deadline update: a request moves its deadline three or four times and each trio update costs a
heap operation and a context manager, ~1.3 µs). A single :class:`DeadlineWheel` task per server
wakes a few times a second and cancels the scope of every connection whose deadline has passed;
timeouts therefore fire up to ``resolution`` (at most 1 s, a tenth of the shortest timeout)
late, like nginx's coarse timers.

    phase                              deadline
    ---------------------------------  --------------------------------------------
    new connection, waiting for head   accept time + header_timeout   (slowloris)
    keep-alive, nothing buffered       now + idle_timeout             (idle close)
    keep-alive, first byte of a head   now + header_timeout
    handler running                    none (the handler owns its own timeouts)
    handler reading the body           now + body_timeout, per receive
    sending                            now + send_timeout, per send_all
    lingering close                    now + linger_timeout

When the deadline fires the scope swallows the ``Cancelled`` and the connection is closed
without a response (as nginx does for client_header_timeout and keepalive_timeout); a request
cut off this way is still reported to ``on_request_done`` (408, or 503 when the shutdown grace
ran out).

Graceful shutdown (:meth:`ShutdownSignal.begin`): connections waiting idle for a next request
are cancelled at once, busy ones get ``Connection: close`` on their current response.
"""

from __future__ import annotations

import math
from typing import Protocol

import trio

from .limits import HTTPLimits

__all__ = ["NO_DEADLINE", "DeadlineWheel", "ShutdownSignal"]

NO_DEADLINE = math.inf  # a connection whose handler runs, or between two sends of a stream


class _Watched(Protocol):
    """What the wheel and the shutdown signal see of a connection."""

    _deadline: float
    _scope: trio.CancelScope

    def _shutdown_requested(self) -> None: ...


class ShutdownSignal:
    """Starts a graceful shutdown of every connection that registered with it."""

    __slots__ = ("_event", "_connections")

    def __init__(self) -> None:
        self._event = trio.Event()
        self._connections: set[_Watched] = set()

    @property
    def is_set(self) -> bool:
        return self._event.is_set()

    def begin(self) -> None:
        """Idle connections close now; busy ones close after their current response."""
        if self._event.is_set():
            return
        self._event.set()
        for conn in list(self._connections):
            conn._shutdown_requested()

    async def wait(self) -> None:
        await self._event.wait()


class DeadlineWheel:
    """Enforces every registered connection's ``_deadline`` with one sleeping task.

    Moving a trio ``CancelScope`` deadline costs a heap operation and a context manager (~1.3 µs),
    and a request moves its deadline three or four times. Here a deadline is a float attribute;
    this task wakes every ``resolution`` seconds and cancels the connections whose deadline has
    passed (timeouts fire up to ``resolution`` late, like nginx's coarse timers).
    """

    __slots__ = ("_connections", "resolution")

    def __init__(self, limits: HTTPLimits) -> None:
        self._connections: set[_Watched] = set()
        shortest = min(
            limits.header_timeout, limits.idle_timeout, limits.body_timeout,
            limits.send_timeout, limits.linger_timeout,
        )
        self.resolution = min(1.0, max(0.005, shortest / 10))

    async def run(self) -> None:
        connections = self._connections
        while True:
            await trio.sleep(self.resolution)
            now = trio.current_time()
            for conn in connections:  # no await in this loop: the set cannot change under us
                if conn._deadline <= now:
                    conn._scope.cancel()
