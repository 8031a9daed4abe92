"""The KMS wire protocol: a sans-I/O framed protocol between the gateway and a KMS worker.

Theory of operation
===================

The gateway and each KMS worker share one ``socket.socketpair()``: a private, reliable,
ordered byte stream that nobody else can open (no path, no port). This module turns that
byte stream into *frames* and frames into *events*, in the manner of h11: it never touches
a socket, a thread or trio. The gateway-side client and the KMS service are thin loops that
move bytes between their socket and a connection object from here::

    conn.receive_data(data)          # bytes in (b"" means the peer closed)
    event = conn.next_event()        # -> an event, or NEED_DATA
    data = conn.request(ctx, op, args)   # events out -> bytes to send

Framing
-------
Every frame is ``length:u32be || type:u8 || rid:u32be || payload`` where ``length`` counts
the bytes after itself (so it is at least 5). ``rid`` is the request id chosen by the client;
responses carry it back, which lets many requests be in flight on one socket and be answered
in any order. Frames are binary-safe: payloads are length-prefixed everywhere, never
delimited. A connection refuses a length above ``max_frame_size`` *as soon as the four
length bytes arrive*, before buffering the body, so a peer cannot make us hold more than one
maximal frame.

Frame types and who sends them::

    HELLO     gateway -> KMS   first frame, rid 0: service token + worker configuration
    READY     KMS -> gateway   bootstrap succeeded, rid 0: non-secret facts (pid, backend, kek id)
    REQUEST   gateway -> KMS   token, tenant context, op name, args
    RESPONSE  KMS -> gateway   the op's result
    ERROR     KMS -> gateway   code, HTTP status hint, safe message; rid 0 = fatal for the worker

Payload encodings::

    HELLO     token[32] || value(config)
    READY     value(info)
    REQUEST   token[32] || str8 tenant_id || str8 request_id || str8 api_key_id || str8 op || value(args)
    RESPONSE  value(result)
    ERROR     status:u16 || str8 code || str16 message

``strN`` is a uN length then UTF-8. ``value`` is a tiny self-describing tagged encoding of
``None``, ``bool``, ``int``, ``float``, ``bytes``, ``str``, ``list`` and ``dict``: its own theory
of operation is in :mod:`._values`, beside the code. Decoding checks every length against what
is left of the frame first, so a lying count cannot make us allocate.

State machine
-------------
One table, as in h11's ``_state.py``::

    role     state           accepts (receive)                  may send
    SERVER   AWAIT_HELLO     HELLO                              (nothing)
    SERVER   SERVING         REQUEST                            READY (once, first), RESPONSE, ERROR
    CLIENT   AWAIT_READY     READY, ERROR(rid 0)                HELLO (once, first)
    CLIENT   SERVING         RESPONSE, ERROR                    REQUEST
    any      CLOSED          (nothing; EOF seen or an error)    (nothing)

Anything else -- a frame type not accepted in the current state, a length out of range, a
header too short for its type, bytes after EOF, EOF in the middle of a frame -- raises
:class:`ProtocolError`, and the connection is dead from then on (``next_event`` keeps
raising). The loop around us ends that connection; for a KMS worker that means the process
exits cleanly and the supervisor starts a fresh one. A length above ``max_frame_size`` raises
the subclass :class:`FrameTooLarge`. The sending methods raise it too for a frame they refuse
to build; that leaves the connection as it was, so a caller tells "this request is too large"
(its own 413) from "this connection is gone" (any other :class:`ProtocolError`) by type.

A REQUEST frame that is well framed but whose *contents* are unacceptable (no tenant, a
token of the wrong length, undecodable args) is not a framing error: we know its rid and its
end, so the server gets a :class:`RejectedRequest` event, answers it with an ERROR frame and
keeps serving. Checking that the token is *the right one* is the service's job
(``hmac.compare_digest`` against the secret it was given in HELLO): this module never holds
the expected token.

What a Request is
-----------------
A :class:`Request` cannot be constructed without a 32-byte service token and a tenant context
(see :mod:`._events`); :meth:`ClientConnection.request` takes the token from the connection and
the context from the caller, so the gateway has no way to emit a frame without either.

Where the code is
-----------------
This module holds the framing and the two connections (the state machine). The pieces it is
built from are private modules of this package, and every name the rest of the code uses is
re-exported here::

    _values    the ``value`` encoding (encode_value, decode_value, Value)
    _events    the events (Hello, Ready, Request, RejectedRequest, Response, Error, ...)
    _trusted   trusted_request, trusted_response: the decoder's unchecked constructors

Secrets
-------
Frames carry secrets (the token; plaintexts, shared secrets, messages). Nothing here logs,
and no ``repr`` or exception message in this module contains frame bytes: errors say what was
expected and what came in terms of sizes and type codes only.
"""

from __future__ import annotations

import enum
import struct

from ...context import TenantContext
from ...errors import QpherError
from ._events import (
    MAX_RID,
    NEED_DATA,
    TOKEN_BYTES,
    ConnectionClosed,
    Error,
    Event,
    Hello,
    NeedData,
    Ready,
    RejectedRequest,
    Request,
    Response,
    _check_token,
    _context_parts,
)
from ._trusted import trusted_request, trusted_response
from ._values import (
    _MAX_CACHED_KEYS,
    MAX_DEPTH,
    Value,
    _decode_at,
    _encode_value,
    _str8,
    _str8_at,
    decode_value,
    encode_value,
)

KiB = 1024
MiB = 1024 * KiB

DEFAULT_MAX_FRAME_SIZE = 16 * MiB  # above the default 1 MiB HTTP body limit with room for batches
MIN_FRAME_SIZE = 64 * KiB  # smallest max_frame_size we accept: a maximal error frame must fit

_LEN = struct.Struct(">I")
_HDR = struct.Struct(">IBI")  # length, type, rid
_HDR_SIZE = 9
_BODY_HDR = 5  # type + rid: the minimum value of ``length``
_U16 = struct.Struct(">H")
_OPS: dict[str, bytes] = {}  # op name -> its str8 encoding



class FrameType(enum.IntEnum):
    HELLO = 1
    READY = 2
    REQUEST = 3
    RESPONSE = 4
    ERROR = 5


# plain ints for the hot paths (an IntEnum member costs a class attribute lookup each time)
_REQUEST, _RESPONSE, _ERROR = int(FrameType.REQUEST), int(FrameType.RESPONSE), int(FrameType.ERROR)


class Role(enum.Enum):
    CLIENT = "client"  # the gateway
    SERVER = "server"  # a KMS worker


class State(enum.Enum):
    AWAIT_HELLO = "await_hello"
    AWAIT_READY = "await_ready"
    SERVING = "serving"
    CLOSED = "closed"


class ProtocolError(QpherError):
    """The byte stream is not a valid frame sequence: the connection must end.

    Also raised by the sending methods for a frame this connection cannot send (its state
    does not allow it, or it is too large)."""

    code = "kms_protocol_error"
    status = 500


class FrameTooLarge(ProtocolError):
    """A frame longer than ``max_frame_size``. Received, it ends the connection like any
    framing error; refused while sending, nothing was sent and the connection is unharmed,
    so the caller can tell "this request is too large" from "this connection is gone". Its
    code stays ``kms_protocol_error``: the distinction is for the gateway's own code, by type."""


def _frame(ftype: int, rid: int, payload: list[bytes], max_frame_size: int) -> bytes:
    n = _BODY_HDR + sum(map(len, payload))
    if n > max_frame_size:
        raise FrameTooLarge(f"frame of {n} bytes exceeds the maximum of {max_frame_size}")
    payload.insert(0, _HDR.pack(n, ftype, rid))
    return b"".join(payload)


# ---- connections -------------------------------------------------------------------------


_NOTHING: frozenset[int] = frozenset()
_SMALL_BODY = 4096
_KEEP_BUFFER = 4 * MiB  # receive storage kept between frames; more only while a larger frame needs it
_SMALL_STORAGE = 64 * KiB  # up to this, storage is simply emptied and regrown (cheaper than reuse)


class _Connection:
    """Shared receive machinery: a byte buffer, the frame splitter and the state."""

    _accepts: dict[State, frozenset[int]] = {}

    def __init__(self, role: Role, state: State, max_frame_size: int) -> None:
        if max_frame_size < MIN_FRAME_SIZE:
            raise ValueError(f"max_frame_size must be at least {MIN_FRAME_SIZE}")
        self.role = role
        self._state = state
        self._accepting = self._accepts.get(state, _NOTHING)  # frame types valid in ``state``
        self.max_frame_size = max_frame_size
        # Received bytes are ``_buf[_pos:_end]``; ``len(_buf)`` is the storage, kept between frames
        # (see receive_data).
        self._buf = bytearray()
        self._pos = 0
        self._end = 0
        self._eof = False
        self._error: ProtocolError | None = None

    @property
    def state(self) -> State:
        return self._state

    @state.setter
    def state(self, state: State) -> None:
        self._state = state
        self._accepting = self._accepts.get(state, _NOTHING)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes read from the socket (copied); empty means the peer closed its end."""
        if self._eof and data:
            self._fail(ProtocolError("bytes received after end of stream"))
        n = len(data)
        if not n:
            self._eof = True
            return
        buf, pos, end = self._buf, self._pos, self._end
        if pos == end:
            if len(buf) <= _SMALL_STORAGE:  # the common case: small frames, all consumed
                buf.clear()
                buf += data
                self._pos = 0
                self._end = n
                return
            pos = end = 0
        # Large storage is reused from frame to frame: emptying or trimming a bytearray gives its
        # memory back, and a large frame (a batch) would then fault fresh pages in for every
        # frame -- worse in a worker whose memory is locked (mlockall), where each is locked too.
        if end + n > len(buf):
            if pos:  # move what is left of a frame to the front first
                buf[: end - pos] = buf[pos:end]
                end -= pos
                pos = 0
            if end + n > len(buf):
                buf.extend(bytes(max(end + n, 2 * len(buf)) - len(buf)))
        elif pos == 0 and end == 0 and len(buf) > _KEEP_BUFFER and n <= _KEEP_BUFFER:
            # an unusually large frame once: do not hold its storage for the connection's life
            self._buf = buf = bytearray(max(_KEEP_BUFFER, n))
        buf[end : end + n] = data
        self._pos = pos
        self._end = end + n

    @property
    def buffered(self) -> int:
        """Bytes received but not yet turned into events."""
        return self._end - self._pos

    def _fail(self, exc: ProtocolError) -> None:
        self.state = State.CLOSED
        self._error = exc
        self._buf = bytearray()
        self._pos = self._end = 0
        raise exc

    def next_event(self) -> Event | NeedData:
        """The next complete event, :data:`NEED_DATA`, or :class:`ConnectionClosed` once.

        Raises :class:`ProtocolError` on anything malformed, then on every later call."""
        if self._error is not None:
            raise self._error
        buf = self._buf
        pos = self._pos
        avail = self._end - pos
        if avail < _HDR_SIZE:
            if avail >= 4:
                self._check_length(_LEN.unpack_from(buf, pos)[0])
            if self._eof:
                if avail:
                    self._fail(ProtocolError(f"connection closed in the middle of a frame ({avail} bytes)"))
                self.state = State.CLOSED
                return ConnectionClosed()
            return NEED_DATA
        n, ftype, rid = _HDR.unpack_from(buf, pos)
        if n < _BODY_HDR or n > self.max_frame_size:
            self._check_length(n)
        end = pos + 4 + n
        if end > self._end:
            if self._eof:
                self._fail(
                    ProtocolError(f"connection closed in the middle of a frame ({avail} of {n + 4} bytes)")
                )
            return NEED_DATA
        if ftype not in self._accepting:
            name = FrameType(ftype).name if ftype in FrameType._value2member_map_ else str(ftype)
            self._fail(ProtocolError(f"unexpected frame type {name} in state {self._state.value}"))
        self._pos = end
        # the frame body as bytes: payload decoding then slices an immutable object. A small
        # body is sliced out (two copies, but no memoryview to set up); a large one is copied once
        if n <= _SMALL_BODY:
            body = bytes(buf[pos + _HDR_SIZE : end])
        else:
            with memoryview(buf) as view:
                body = bytes(view[pos + _HDR_SIZE : end])
        try:
            return self._decode(ftype, rid, body)
        except ProtocolError as exc:
            self._fail(exc)
            raise  # pragma: no cover  (_fail raises)

    def _check_length(self, n: int) -> None:
        if n < _BODY_HDR:
            self._fail(ProtocolError(f"frame length {n} is below the minimum of {_BODY_HDR}"))
        if n > self.max_frame_size:
            self._fail(FrameTooLarge(f"frame of {n} bytes exceeds the maximum of {self.max_frame_size}"))

    def _decode(self, ftype: int, rid: int, body: bytes) -> Event:  # pragma: no cover
        raise NotImplementedError


class ServerConnection(_Connection):
    """The KMS worker's side: receives HELLO then REQUESTs, sends READY/RESPONSE/ERROR."""

    _accepts = {
        State.AWAIT_HELLO: frozenset({FrameType.HELLO}),
        State.SERVING: frozenset({FrameType.REQUEST}),
    }

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        super().__init__(Role.SERVER, State.AWAIT_HELLO, max_frame_size)
        self._ready_sent = False

    def _decode(self, ftype: int, rid: int, body: bytes) -> Event:
        if ftype == _REQUEST:
            return self._decode_request(rid, body)
        # HELLO: a bad HELLO is fatal; there is no one to answer yet
        if rid != 0 or len(body) < TOKEN_BYTES:
            raise ProtocolError("malformed HELLO frame")
        try:
            config = decode_value(body[TOKEN_BYTES:])
        except (ValueError, UnicodeDecodeError) as exc:
            raise ProtocolError("malformed HELLO frame") from exc
        if type(config) is not dict:
            raise ProtocolError("malformed HELLO frame: config must be a dict")
        self.state = State.SERVING
        return Hello(body[:TOKEN_BYTES], config)

    def _decode_request(self, rid: int, body: bytes) -> Event:
        if rid == 0:
            raise ProtocolError("REQUEST frame with rid 0")
        if len(body) < TOKEN_BYTES + 4:
            return RejectedRequest(rid, "bad_request", "request frame too short for a token and a context")
        try:
            p = TOKEN_BYTES
            q = p + 1 + body[p]
            tenant = body[p + 1 : q].decode()
            p = q + 1 + body[q]
            request_id = body[q + 1 : p].decode()
            q = p + 1 + body[p]
            api_key_id = body[p + 1 : q].decode()
            p = q + 1 + body[q]
            op = body[q + 1 : p].decode()
            if p > len(body):
                raise ValueError("context runs past the end of the frame")
            args, p = _decode_at(body, p, 0)
            if p != len(body):
                raise ValueError("trailing bytes after the args")
        except (ValueError, IndexError, UnicodeDecodeError):
            return RejectedRequest(rid, "bad_request", "undecodable request frame")
        if not tenant:
            return RejectedRequest(rid, "missing_tenant", "request carries no tenant")
        if not request_id or not api_key_id:
            return RejectedRequest(rid, "missing_context", "request carries no request id or api key id")
        if not op:
            return RejectedRequest(rid, "unknown_operation", "request names no operation")
        if type(args) is not dict:
            return RejectedRequest(rid, "bad_request", "request args must be a dict")
        # the checks above are those of Request(...) and TenantContext(...)
        return trusted_request(rid, body[:TOKEN_BYTES], tenant, request_id, api_key_id, op, args)

    # ---- sending ----

    def ready(self, info: dict[str, Value]) -> bytes:
        if self.state is not State.SERVING or self._ready_sent:
            raise ProtocolError(f"cannot send READY in state {self.state.value}")
        self._ready_sent = True
        return _frame(FrameType.READY, 0, [encode_value(info)], self.max_frame_size)

    def response(self, rid: int, value: Value) -> bytes:
        out: list[bytes] = [b""]
        _encode_value(value, out)
        n = _BODY_HDR + sum(map(len, out))
        if n > self.max_frame_size:
            raise FrameTooLarge(f"frame of {n} bytes exceeds the maximum of {self.max_frame_size}")
        out[0] = _HDR.pack(n, _RESPONSE, rid)
        return b"".join(out)

    def error(self, rid: int, code: str, status: int, message: str) -> bytes:
        """An ERROR frame; works in any state (a fatal bootstrap error is sent before READY)."""
        mb = message.encode()[:4096]
        return _frame(
            FrameType.ERROR,
            rid,
            [_U16.pack(status), _str8(code), _U16.pack(len(mb)), mb],
            self.max_frame_size,
        )

    def error_from(self, rid: int, exc: QpherError) -> bytes:
        return self.error(rid, exc.code, exc.status, exc.message)



class ClientConnection(_Connection):
    """The gateway's side of one worker: sends HELLO then REQUESTs; receives READY/RESPONSE/ERROR.

    The service token is given once, here; every request frame carries it. Request ids are
    allocated by the connection (wrapping within 1..2**32-1)."""

    _accepts = {
        State.AWAIT_READY: frozenset({FrameType.READY, FrameType.ERROR}),
        State.SERVING: frozenset({FrameType.RESPONSE, FrameType.ERROR}),
    }

    def __init__(self, token: bytes, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        super().__init__(Role.CLIENT, State.AWAIT_READY, max_frame_size)
        self._token = _check_token(token)
        self._hello_sent = False
        self._next_rid = 1

    @classmethod
    def bootstrapped(cls, token: bytes, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> ClientConnection:
        """The client side of a worker whose HELLO/READY exchange another process carried out
        (the supervisor, which then handed the socket over): already SERVING, with the token
        that HELLO carried. The worker sends nothing unasked after READY, so no byte of this
        connection was read by the other process."""
        conn = cls(token, max_frame_size)
        conn._hello_sent = True
        conn.state = State.SERVING
        return conn

    def __repr__(self) -> str:
        return f"<ClientConnection state={self.state.value}>"

    def hello(self, config: dict[str, Value]) -> bytes:
        if self._hello_sent:
            raise ProtocolError("HELLO already sent")
        self._hello_sent = True
        return _frame(FrameType.HELLO, 0, [self._token, encode_value(config)], self.max_frame_size)

    def request(self, context: TenantContext, op: str, args: dict[str, Value]) -> tuple[int, bytes]:
        """Encode one REQUEST; returns ``(rid, frame_bytes)``."""
        if self._state is not State.SERVING:
            raise ProtocolError(f"cannot send a request in state {self._state.value}")
        tl, tb, rl, rb, al, ab = _context_parts(context)
        if type(args) is not dict:
            raise TypeError("args must be a dict")
        rid = self._next_rid
        self._next_rid = 1 if rid == MAX_RID else rid + 1
        opb = _OPS.get(op)
        if opb is None:
            opb = _str8(op)
            if len(_OPS) < _MAX_CACHED_KEYS:
                _OPS[op] = opb
        out: list[bytes] = [b"", self._token, tl, tb, rl, rb, al, ab, opb]
        _encode_value(args, out)
        n = _BODY_HDR + sum(map(len, out))
        if n > self.max_frame_size:
            raise FrameTooLarge(f"frame of {n} bytes exceeds the maximum of {self.max_frame_size}")
        out[0] = _HDR.pack(n, _REQUEST, rid)
        return rid, b"".join(out)

    def _decode(self, ftype: int, rid: int, body: bytes) -> Event:
        try:
            if ftype == _RESPONSE:
                value, p = _decode_at(body, 0, 0)
                if p != len(body):
                    raise ValueError("trailing bytes after the value")
                return trusted_response(rid, value)
            if ftype == _ERROR:
                if len(body) < 2:
                    raise ValueError("short error frame")
                status = _U16.unpack_from(body, 0)[0]
                code, p = _str8_at(body, 2)
                if len(body) < p + 2:
                    raise ValueError("short error frame")
                mlen = _U16.unpack_from(body, p)[0]
                if len(body) != p + 2 + mlen:
                    raise ValueError("error message length does not match the frame")
                message = body[p + 2 :].decode()
                return Error(rid, code, status, message)
            if rid != 0:
                raise ValueError("READY with a non-zero rid")
            info = decode_value(body)
            if type(info) is not dict:
                raise ValueError("READY info must be a dict")
            self.state = State.SERVING
            return Ready(info)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ProtocolError(f"malformed {FrameType(ftype).name} frame") from exc


__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "MAX_DEPTH",
    "MAX_RID",
    "MIN_FRAME_SIZE",
    "NEED_DATA",
    "TOKEN_BYTES",
    "ClientConnection",
    "ConnectionClosed",
    "Error",
    "Event",
    "FrameTooLarge",
    "FrameType",
    "Hello",
    "NeedData",
    "ProtocolError",
    "Ready",
    "RejectedRequest",
    "Request",
    "Response",
    "Role",
    "ServerConnection",
    "State",
    "Value",
    "decode_value",
    "encode_value",
    "trusted_request",
    "trusted_response",
]
