"""A small trio-native Redis client: RESP2, a bounded connection pool, URLs without leaks.

Only what the rate limiter needs: ``AUTH``, ``SELECT``, ``PING``, ``SCRIPT LOAD``, ``EVALSHA``
and ``EVAL`` (any other command can be sent through :meth:`RedisClient.execute`).

Layers, bottom up:

* :func:`parse_redis_url` -> :class:`RedisURL` (pure). ``redis://[user:password@]host:port/db``
  and ``unix:///path?db=N`` (``unix://:password@/path`` for a password). The password is never
  part of a ``repr``, a ``str`` or an error message; :meth:`RedisURL.redacted` is what logs show.
  ``rediss://`` is refused with a ``ConfigError`` (TLS to Redis is not supported yet).
* :func:`encode_command` and :class:`RESPReader` (pure, no I/O): the RESP2 wire format as bytes
  in, replies out, in the manner of h11. The reader bounds what a peer can make it hold
  (``MAX_BULK_BYTES``, ``MAX_ARRAY_ITEMS``, ``MAX_DEPTH``) and answers ``NEED_DATA`` until a
  reply is whole. An error reply is *returned* as :class:`RedisReplyError`, not raised, so that
  the caller decides (``NOSCRIPT`` is a normal event for ``EVALSHA``).
* :class:`RedisClient` (trio): at most ``pool_size`` connections, each carrying one command at a
  time. A connection is opened lazily, authenticated and switched to its database before first
  use. Any failure in the middle of a command -- an OS error, EOF, a protocol error, *or a
  cancellation* (a trio timeout around the call) -- leaves the connection in an unknown state,
  so it is closed and discarded, never returned to the pool. There are no threads and no
  blocking calls: every wait is a trio checkpoint, so ``trio.move_on_after`` around any method
  bounds it, and nothing can hang.

Every foreign failure (``OSError``, ``trio.BrokenResourceError``, a malformed reply) becomes
:class:`RedisConnectionError` here, at one boundary; an error reply that the caller did not
expect is raised as :class:`RedisReplyError`. Both derive from :class:`RedisError`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Final, TypeAlias
from urllib.parse import parse_qsl, unquote, urlsplit

import trio

from ..errors import ConfigError

__all__ = [
    "NEED_DATA",
    "RESPReader",
    "RedisClient",
    "RedisConnectionError",
    "RedisError",
    "RedisReplyError",
    "RedisURL",
    "Reply",
    "encode_command",
    "parse_redis_url",
    "script_sha1",
]

DEFAULT_PORT = 6379
DEFAULT_POOL_SIZE = 8
MAX_BULK_BYTES = 1024 * 1024  # our replies are a few numbers; Redis itself allows 512 MiB
MAX_ARRAY_ITEMS = 1024
MAX_DEPTH = 8
MAX_LINE_BYTES = 64 * 1024  # a simple-string, error or integer line
RECEIVE_BYTES = 64 * 1024


class RedisError(Exception):
    """Base for Redis client failures. Messages never hold a password."""


class RedisConnectionError(RedisError):
    """Redis could not be reached, closed the connection or broke the protocol."""


class RedisReplyError(RedisError):
    """An error reply (``-ERR ...``, ``-NOSCRIPT ...``, ``-WRONGPASS ...``).

    ``kind`` is its first word, the error class Redis defines."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.kind = message.split(" ", 1)[0]


# bytes: bulk string; str: simple string; int: integer; None: null bulk/array; list: array;
# RedisReplyError: an error reply (returned, not raised).
Reply: TypeAlias = "bytes | str | int | None | list[Reply] | RedisReplyError"


# ---- URLs ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class RedisURL:
    """Where Redis is and how to log in. ``password`` is kept out of ``repr``."""

    host: str | None = None  # TCP: host name or address
    port: int = DEFAULT_PORT
    path: str | None = None  # unix socket path
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def redacted(self) -> str:
        """The URL as logs and messages show it: no user, no password."""
        if self.path is not None:
            return f"unix://{self.path}?db={self.db}"
        host = f"[{self.host}]" if self.host is not None and ":" in self.host else self.host
        return f"redis://{host}:{self.port}/{self.db}"

    def __str__(self) -> str:
        return self.redacted()


def _db_number(text: str) -> int:
    if re.fullmatch(r"[0-9]{1,5}", text) is None:
        raise ConfigError(f"redis database must be a number from 0, not {text!r}")
    return int(text)


def parse_redis_url(url: str) -> RedisURL:
    """``redis://[user:password@]host[:port][/db]`` or ``unix://[:password@]/path[?db=N]``.

    Raises ``ConfigError`` naming what is wrong, never echoing the password (nor the URL,
    which may hold it)."""
    try:
        parts = urlsplit(url)
        port_text = parts.port  # raises ValueError on a bad port
    except ValueError:
        raise ConfigError("redis_url is not a valid URL (host or port malformed)") from None
    scheme = parts.scheme.lower()
    if scheme == "rediss":
        raise ConfigError("rediss:// (TLS to Redis) is not supported yet; use redis:// or unix://")
    if scheme not in ("redis", "unix"):
        raise ConfigError(f"redis_url must start with redis:// or unix://, not {scheme + '://'!r}")
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    if username is not None and password is None:
        raise ConfigError("redis_url names a user but no password (redis://user:password@host)")
    if password == "":
        password = None
    if parts.fragment:
        raise ConfigError("redis_url must not have a #fragment")
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    unknown = sorted(set(query) - {"db"})
    if unknown:
        raise ConfigError(f"redis_url has unknown query parameters {unknown!r} (only db is known)")
    db = _db_number(query["db"]) if "db" in query else None

    if scheme == "unix":
        if not parts.path or parts.path == "/":
            raise ConfigError("unix:// redis_url needs a socket path (unix:///run/redis.sock)")
        if parts.hostname:
            raise ConfigError("unix:// redis_url takes a path, not a host (unix:///run/redis.sock)")
        return RedisURL(path=parts.path, db=db or 0, username=username, password=password)

    if not parts.hostname:
        raise ConfigError("redis:// redis_url needs a host (redis://127.0.0.1:6379/0)")
    path = parts.path.strip("/")
    if path:
        if db is not None:
            raise ConfigError("redis_url gives the database twice (path and ?db=)")
        db = _db_number(path)
    return RedisURL(
        host=parts.hostname,
        port=port_text if port_text is not None else DEFAULT_PORT,
        db=db or 0,
        username=username,
        password=password,
    )


# ---- RESP2, sans I/O -----------------------------------------------------------------------

def _arg(value: bytes | str | int | float) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bool):
        raise TypeError("a Redis argument cannot be a bool")
    return repr(value).encode("ascii")  # int, or float as Python's shortest round-trip form


def encode_command(*args: bytes | str | int | float) -> bytes:
    """One command as a RESP2 array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = _arg(a)
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()


class _Incomplete(Exception):
    pass


class RESPReader:
    """Feed bytes with :meth:`receive_data`; take whole replies with :meth:`next_reply`.

    Replies are small, so an incomplete reply is simply parsed again from its start when more
    bytes arrive. Malformed or oversized input raises ``RedisConnectionError``."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def receive_data(self, data: bytes | bytearray) -> None:
        self._buf += data

    @property
    def pending(self) -> int:
        return len(self._buf)

    def next_reply(self) -> Reply | _NeedData:
        try:
            reply, end = self._parse(0, 0)
        except _Incomplete:
            if len(self._buf) > MAX_BULK_BYTES + MAX_LINE_BYTES:
                raise RedisConnectionError("redis reply too large") from None
            return NEED_DATA
        del self._buf[:end]
        return reply

    def _line(self, pos: int) -> tuple[bytes, int]:
        end = self._buf.find(b"\r\n", pos, pos + MAX_LINE_BYTES + 2)
        if end < 0:
            if len(self._buf) - pos > MAX_LINE_BYTES:
                raise RedisConnectionError("redis reply line too long")
            raise _Incomplete
        return bytes(self._buf[pos:end]), end + 2

    @staticmethod
    def _int(text: bytes) -> int:
        if re.fullmatch(rb"-?[0-9]{1,19}", text) is None:
            raise RedisConnectionError(f"malformed integer in redis reply: {text[:32]!r}")
        return int(text)

    def _parse(self, pos: int, depth: int) -> tuple[Reply, int]:
        if depth > MAX_DEPTH:
            raise RedisConnectionError("redis reply nested too deeply")
        if pos >= len(self._buf):
            raise _Incomplete
        kind = self._buf[pos : pos + 1]
        line, pos = self._line(pos + 1)
        if kind == b"+":
            return line.decode("utf-8", "replace"), pos
        if kind == b"-":
            return RedisReplyError(line.decode("utf-8", "replace")), pos
        if kind == b":":
            return self._int(line), pos
        if kind == b"$":
            n = self._int(line)
            if n == -1:
                return None, pos
            if n < 0 or n > MAX_BULK_BYTES:
                raise RedisConnectionError(f"redis bulk reply length out of range: {n}")
            if len(self._buf) < pos + n + 2:
                raise _Incomplete
            if self._buf[pos + n : pos + n + 2] != b"\r\n":
                raise RedisConnectionError("redis bulk reply not terminated by CRLF")
            return bytes(self._buf[pos : pos + n]), pos + n + 2
        if kind == b"*":
            n = self._int(line)
            if n == -1:
                return None, pos
            if n < 0 or n > MAX_ARRAY_ITEMS:
                raise RedisConnectionError(f"redis array reply length out of range: {n}")
            items: list[Reply] = []
            for _ in range(n):
                item, pos = self._parse(pos, depth + 1)
                items.append(item)
            return items, pos
        raise RedisConnectionError(f"unknown redis reply type {bytes(kind)!r}")


def script_sha1(script: str) -> str:
    """The SHA-1 name Redis gives a Lua script (``SCRIPT LOAD``, ``EVALSHA``)."""
    return hashlib.sha1(script.encode("utf-8"), usedforsecurity=False).hexdigest()


# ---- trio ------------------------------------------------------------------------------

class _Connection:
    __slots__ = ("stream", "reader")

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.reader = RESPReader()

    async def call(self, *args: bytes | str | int | float) -> Reply:
        await self.stream.send_all(encode_command(*args))
        while True:
            reply = self.reader.next_reply()
            if not isinstance(reply, _NeedData):
                if self.reader.pending:
                    raise RedisConnectionError("redis sent more than one reply to one command")
                return reply
            data = await self.stream.receive_some(RECEIVE_BYTES)
            if not data:
                raise RedisConnectionError("redis closed the connection")
            self.reader.receive_data(data)


class RedisClient:
    """A bounded pool of RESP2 connections to one Redis (see the module docstring).

    Callers bound each call with a trio timeout; a call that is cancelled discards its
    connection. :meth:`aclose` closes the idle connections, and each connection in use when its
    call ends; calls after it raise ``RedisConnectionError``."""

    def __init__(self, url: RedisURL, *, pool_size: int = DEFAULT_POOL_SIZE) -> None:
        if pool_size < 1:
            raise ConfigError(f"redis pool_size must be at least 1, not {pool_size!r}")
        self.url = url
        self._slots = trio.Semaphore(pool_size)
        self._idle: list[_Connection] = []
        self._closed = False

    def __repr__(self) -> str:
        return f"RedisClient({self.url.redacted()!r}, idle={len(self._idle)})"

    async def _connect(self) -> _Connection:
        url = self.url
        stream: trio.abc.Stream
        if url.path is not None:
            stream = await trio.open_unix_socket(url.path)
        else:
            assert url.host is not None
            stream = await trio.open_tcp_stream(url.host, url.port)
        conn = _Connection(stream)
        try:
            if url.password is not None:
                auth = ("AUTH", url.username, url.password) if url.username else ("AUTH", url.password)
                self._expect_ok(await conn.call(*auth), "AUTH")
            if url.db:
                self._expect_ok(await conn.call("SELECT", url.db), "SELECT")
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return conn

    @staticmethod
    def _expect_ok(reply: Reply, command: str) -> None:
        if isinstance(reply, RedisReplyError):
            # Redis's own messages (WRONGPASS, NOAUTH, ERR DB index) never echo the password.
            raise RedisReplyError(f"{command} refused: {reply.message}")
        if reply != "OK":
            raise RedisConnectionError(f"unexpected reply to {command}")

    async def execute(self, *args: bytes | str | int | float) -> Reply:
        """Send one command and return its reply (an error reply is returned, not raised).

        Raises ``RedisConnectionError`` when Redis cannot be reached or the connection fails,
        ``RedisReplyError`` when the connection's AUTH or SELECT is refused."""
        if self._closed:
            raise RedisConnectionError("redis client is closed")
        async with self._slots:
            conn = self._idle.pop() if self._idle else None
            try:
                if conn is None:
                    conn = await self._connect()
                reply = await conn.call(*args)
            except BaseException as exc:
                if conn is not None:
                    await trio.aclose_forcefully(conn.stream)
                if isinstance(exc, (OSError, trio.BrokenResourceError, trio.ClosedResourceError)):
                    raise RedisConnectionError(
                        f"redis at {self.url.redacted()} unreachable: {type(exc).__name__}"
                    ) from exc
                raise
            if self._closed:
                await trio.aclose_forcefully(conn.stream)
            else:
                self._idle.append(conn)
            return reply

    async def ping(self) -> None:
        reply = await self.execute("PING")
        if isinstance(reply, RedisReplyError):
            raise reply
        if reply != "PONG":
            raise RedisConnectionError("unexpected reply to PING")

    async def script_load(self, script: str) -> str:
        """``SCRIPT LOAD``: cache the script in Redis and return its SHA-1."""
        reply = await self.execute("SCRIPT", "LOAD", script)
        if isinstance(reply, RedisReplyError):
            raise reply
        if not isinstance(reply, bytes):
            raise RedisConnectionError("unexpected reply to SCRIPT LOAD")
        return reply.decode("ascii")

    async def evalsha(
        self, script: str, keys: tuple[str, ...], args: tuple[bytes | str | int | float, ...],
        *, sha: str | None = None,
    ) -> Reply:
        """``EVALSHA`` the script, sending it whole with ``EVAL`` (which caches it again) when
        Redis answers ``NOSCRIPT`` (a restarted or flushed server). Error replies raise."""
        sha = sha or script_sha1(script)
        reply = await self.execute("EVALSHA", sha, len(keys), *keys, *args)
        if isinstance(reply, RedisReplyError) and reply.kind == "NOSCRIPT":
            reply = await self.execute("EVAL", script, len(keys), *keys, *args)
        if isinstance(reply, RedisReplyError):
            raise reply
        return reply

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await trio.aclose_forcefully(conn.stream)
