"""What the HTTP/2 server checks beyond the ``h2`` library: request heads and abusive peers.

Pure code (no trio, no sockets), used by ``_h2connection.py``.

Request heads (RFC 9113 §8.2, §8.3). ``h2`` can validate headers itself, but it treats every
malformed header block as a *connection* error: one bad request would end every other stream of
the connection. RFC 9113 §8.1.1 makes a malformed request a *stream* error, so the server runs
``h2`` with inbound validation off and checks here: pseudo-header fields only the four a request
may carry (and ``:protocol`` on a CONNECT, RFC 8441 §4), each once and before the regular
fields, ``:method`` ``:scheme`` ``:path`` present (``:path`` visible ASCII and origin-form, or
``*``); an extended CONNECT (``:protocol``) has ``:scheme``, ``:path`` and ``:authority``;
regular field names lower case tokens, values without NUL, CR, LF or surrounding whitespace; no
connection-specific field (``connection``, ``keep-alive``, ``proxy-connection``,
``transfer-encoding``, ``upgrade``) and ``te`` only as ``trailers`` (§8.2.2). A failure is
:class:`MalformedRequest`, answered with RST_STREAM PROTOCOL_ERROR. The result has ``host`` from
``:authority`` (replacing a ``host`` field, §8.3.1) and no pseudo-header, so the header hygiene
of the HTTP/1.1 path (``upstream.headers``) applies to it unchanged.

Abuse (the 2019 and 2023-2024 advisories), each ending the connection with a GOAWAY:

=============================  ==========================================  =================
pattern                        bound                                       GOAWAY code
=============================  ==========================================  =================
too many open streams          ``max_concurrent_streams`` (``h2``)         PROTOCOL_ERROR
HPACK bomb / huge header list  ``max_header_bytes`` (``h2``'s decoder)      ENHANCE_YOUR_CALM
HPACK table size               ``header_table_size`` (``h2``'s decoder)     COMPRESSION_ERROR
CONTINUATION flood (2024)      ``max_continuation_frames`` per block and    ENHANCE_YOUR_CALM
                               ``max_header_bytes`` buffered (this module)
Rapid Reset (CVE-2023-44487)   ``max_resets_per_window`` resets beyond the  ENHANCE_YOUR_CALM
                               streams completed, per ``flood_window``
PING / SETTINGS flood          ``max_control_frames_per_window``           ENHANCE_YOUR_CALM
flow-control abuse             windows (``h2``): DATA past the window,     FLOW_CONTROL_ERROR
                               a WINDOW_UPDATE past 2^31-1
=============================  ==========================================  =================

Counting is by fixed windows (a counter and the window's start), which costs two integer
operations per frame; a burst that straddles two windows may pass twice the bound, which is
still two orders of magnitude below what an attack needs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from h2.exceptions import DenialOfServiceError, ProtocolError
from h2.frame_buffer import FrameBuffer
from hyperframe.frame import ContinuationFrame, Frame, HeadersFrame

__all__ = [
    "BoundedFrameBuffer",
    "FloodGuard",
    "MalformedRequest",
    "RequestHead",
    "parse_request_head",
]

_CONNECTION_SPECIFIC = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                                  b"upgrade"})
_REQUEST_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path", b":protocol"})
_FIELD_NAME = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-z]+")  # RFC 9110 token, lower case (RFC 9113 §8.2.1)
_FIELD_VALUE = re.compile(rb"(?:[^\x00\r\n \t](?:[^\x00\r\n]*[^\x00\r\n \t])?)?")
_METHOD = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
_PATH = re.compile(rb"/[\x21-\x7e]*|\*")  # visible ASCII, as h11 admits in an HTTP/1.1 target
_AUTHORITY = re.compile(rb"[\x21-\x7e]+")


class MalformedRequest(Exception):
    """A request head RFC 9113 §8.1.1 calls malformed: a stream error PROTOCOL_ERROR."""


@dataclass(frozen=True, slots=True)
class RequestHead:
    method: str
    target: str
    headers: list[tuple[bytes, bytes]]  # lower-case names, no pseudo-headers, ``host`` first if known
    protocol: str | None = None  # ``:protocol`` of an extended CONNECT (RFC 8441), lower case


def parse_request_head(fields: list[tuple[bytes, bytes]]) -> RequestHead:
    """Check one request header block (as ``h2`` decoded it, unvalidated) and split it."""
    method = scheme = authority = path = protocol = None
    headers: list[tuple[bytes, bytes]] = []
    regular = False
    for name, value in fields:
        if name[:1] == b":":
            if regular:
                raise MalformedRequest(f"pseudo-header {name!r} after a regular field")
            if name not in _REQUEST_PSEUDO:
                raise MalformedRequest(f"pseudo-header {name!r} is not a request field")
            if name == b":method":
                if method is not None:
                    raise MalformedRequest("duplicate :method")
                method = value
            elif name == b":scheme":
                if scheme is not None:
                    raise MalformedRequest("duplicate :scheme")
                scheme = value
            elif name == b":protocol":
                if protocol is not None:
                    raise MalformedRequest("duplicate :protocol")
                protocol = value
            elif name == b":authority":
                if authority is not None:
                    raise MalformedRequest("duplicate :authority")
                authority = value
            else:
                if path is not None:
                    raise MalformedRequest("duplicate :path")
                path = value
            continue
        regular = True
        if not _FIELD_NAME.fullmatch(name):
            raise MalformedRequest(f"field name {name!r} is not a lower-case token")
        if not _FIELD_VALUE.fullmatch(value):
            raise MalformedRequest(f"field {name!r} has a value with NUL, CR, LF or surrounding space")
        if name in _CONNECTION_SPECIFIC:
            raise MalformedRequest(f"connection-specific field {name!r}")
        if name == b"te" and value.lower() != b"trailers":
            raise MalformedRequest("te other than 'trailers'")
        if name == b"host" and authority is not None:
            continue  # :authority wins (RFC 9113 §8.3.1)
        headers.append((name, value))
    if method is None or not _METHOD.fullmatch(method):
        raise MalformedRequest("missing or invalid :method")
    if protocol is not None:
        # RFC 8441 §4: only on a CONNECT, with :scheme, :path and :authority as for a request
        if method != b"CONNECT":
            raise MalformedRequest(":protocol on a request that is not CONNECT")
        if scheme is None or path is None or authority is None:
            raise MalformedRequest("an extended CONNECT without :scheme, :path or :authority")
        if not _METHOD.fullmatch(protocol):  # a token
            raise MalformedRequest("invalid :protocol")
        if path == b"*" or not _PATH.fullmatch(path) or not _AUTHORITY.fullmatch(authority):
            raise MalformedRequest("invalid :path or :authority")
        headers = [(b"host", authority), *(h for h in headers if h[0] != b"host")]
        return RequestHead("CONNECT", path.decode("ascii"), headers, protocol.decode("ascii").lower())
    if method == b"CONNECT":
        # a plain CONNECT is not supported (no TCP tunnels); §8.5 gives it no :scheme and :path,
        # so answer it as a request
        return RequestHead("CONNECT", "*", headers)
    if scheme is None or path is None:
        raise MalformedRequest("missing :scheme or :path")
    if not _PATH.fullmatch(path) or (path == b"*" and method != b"OPTIONS"):
        raise MalformedRequest("invalid :path")
    if authority is not None:
        if not _AUTHORITY.fullmatch(authority):
            raise MalformedRequest("invalid :authority")
        headers = [(b"host", authority), *(h for h in headers if h[0] != b"host")]
    return RequestHead(method.decode("ascii"), path.decode("ascii"), headers)


class FloodGuard:
    """Counts the client's resets and control frames in fixed windows of ``window`` seconds.

    Each ``on_*`` method returns the name of the breached bound (``"rapid_reset"``,
    ``"control_flood"``) or None. A reset is excused by a completed stream: a client that
    cancels as many calls as it lets finish is a client, one that only resets is Rapid Reset."""

    __slots__ = ("_window", "_max_resets", "_max_control", "_start", "_resets", "_completed", "_control")

    def __init__(self, window: float, max_resets: int, max_control: int, now: float) -> None:
        self._window = window
        self._max_resets = max_resets
        self._max_control = max_control
        self._start = now
        self._resets = 0
        self._completed = 0
        self._control = 0

    def _roll(self, now: float) -> None:
        if now - self._start >= self._window:
            self._start = now
            self._resets = self._completed = self._control = 0

    def on_reset(self, now: float) -> str | None:
        self._roll(now)
        self._resets += 1
        if self._resets - self._completed > self._max_resets:
            return "rapid_reset"
        return None

    def on_completed(self, now: float) -> None:
        self._roll(now)
        self._completed += 1

    def on_control_frame(self, now: float) -> str | None:
        self._roll(now)
        self._control += 1
        if self._control > self._max_control:
            return "control_flood"
        return None


class BoundedFrameBuffer(FrameBuffer):
    """``h2``'s frame buffer with a bound on CONTINUATION frames and on buffered header bytes.

    ``h2`` buffers a header block until END_HEADERS and bounds it at 64 frames of up to
    ``max_frame_size`` each (1 MiB at the default); a header block larger than
    ``max_header_bytes`` will be refused by the decoder anyway, so it is refused here as
    soon as it is buffered, and after ``max_continuation_frames`` frames (CVE-2024-27316: a
    server that buffers an endless block runs out of memory). This reaches into the one
    private method of ``h2`` that sees each frame of a header block."""

    def __init__(self, *, max_continuation_frames: int, max_header_bytes: int) -> None:
        super().__init__(server=True)
        self._max_continuations = max_continuation_frames
        self._max_block = max_header_bytes
        self._continuations = 0
        self._block = 0

    def _update_header_buffer(self, f: Frame | None) -> Frame | None:
        if isinstance(f, HeadersFrame) and "END_HEADERS" not in f.flags:
            self._continuations = 0
            self._block = len(f.data)
        elif isinstance(f, ContinuationFrame):
            self._continuations += 1
            self._block += len(f.data)
            if self._continuations > self._max_continuations:
                raise DenialOfServiceError("too many CONTINUATION frames in one header block")
            if self._block > self._max_block:
                raise DenialOfServiceError("header block larger than the header list size")
        return super()._update_header_buffer(f)


def is_dos(exc: ProtocolError) -> bool:
    return isinstance(exc, DenialOfServiceError)
