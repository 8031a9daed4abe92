"""The HTTP server's limits: sizes and timeouts, with the nginx settings they mirror."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "DEFAULT_BODY_TIMEOUT",
    "DEFAULT_HEADER_TIMEOUT",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_LINGER_TIMEOUT",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_HEADER_BYTES",
    "DEFAULT_SEND_TIMEOUT",
    "DEFAULT_SHUTDOWN_GRACE",
    "HTTP2Limits",
    "HTTPLimits",
    "RECEIVE_SIZE",
]

KiB = 1024
MiB = 1024 * KiB

DEFAULT_MAX_HEADER_BYTES = 16 * KiB  # nginx large_client_header_buffers allows 8k lines, 32k total
DEFAULT_MAX_BODY_BYTES = 1 * MiB  # nginx client_max_body_size 1m
DEFAULT_HEADER_TIMEOUT = 10.0  # seconds; nginx client_header_timeout is 60s, we are stricter
DEFAULT_IDLE_TIMEOUT = 75.0  # seconds; nginx keepalive_timeout 75s
DEFAULT_BODY_TIMEOUT = 60.0  # seconds between two body reads; nginx client_body_timeout 60s
DEFAULT_SEND_TIMEOUT = 60.0  # seconds for one send_all; nginx send_timeout 60s
DEFAULT_LINGER_TIMEOUT = 5.0  # seconds; nginx lingering_timeout 5s
DEFAULT_MAX_CONNECTIONS = 1024  # nginx worker_connections 512 (compiled default), 768 on Debian
DEFAULT_SHUTDOWN_GRACE = 10.0  # seconds
RECEIVE_SIZE = 64 * KiB  # bound on one receive, hence on one body chunk handed to a handler


@dataclass(frozen=True, slots=True)
class HTTPLimits:
    """Per-connection limits (the config layer validates ranges; we only reject nonsense)."""

    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    send_timeout: float = DEFAULT_SEND_TIMEOUT
    linger_timeout: float = DEFAULT_LINGER_TIMEOUT
    max_requests_per_connection: int | None = None  # None: unlimited (nginx keepalive_requests 1000)
    max_connections: int = DEFAULT_MAX_CONNECTIONS

    def __post_init__(self) -> None:
        for name in ("max_header_bytes", "max_body_bytes", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("header_timeout", "idle_timeout", "body_timeout", "send_timeout", "linger_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.max_requests_per_connection is not None and self.max_requests_per_connection < 1:
            raise ValueError(
                f"max_requests_per_connection must be >= 1 or None, got {self.max_requests_per_connection!r}"
            )



# HTTP/2 (RFC 9113). nginx's http2_max_concurrent_streams is 128; gRPC servers default to 100.
DEFAULT_H2_MAX_CONCURRENT_STREAMS = 100
DEFAULT_H2_HEADER_TABLE_SIZE = 4096  # RFC 9113 §6.5.2 initial value; the HPACK state we keep per peer
DEFAULT_H2_INITIAL_WINDOW_SIZE = 65_535  # RFC 9113 §6.9.2 initial value: what one stream may buffer
DEFAULT_H2_CONNECTION_WINDOW_SIZE = 1 * MiB  # what all streams of one connection may buffer together
DEFAULT_H2_MAX_CONTINUATION_FRAMES = 16  # per header block (h2 itself allows 64; CVE-2024-27316)
DEFAULT_H2_FLOOD_WINDOW = 10.0  # seconds over which resets and control frames are counted
DEFAULT_H2_MAX_RESETS = 200  # client resets per window beyond the streams it completed (CVE-2023-44487)
DEFAULT_H2_MAX_CONTROL_FRAMES = 200  # PING and SETTINGS frames per window (CVE-2019-9512, -9515)


@dataclass(frozen=True, slots=True)
class HTTP2Limits:
    """The HTTP/2 protections of one connection (``http2:`` in the config). The header list size
    is ``HTTPLimits.max_header_bytes`` and the timeouts are ``HTTPLimits``' own."""

    max_concurrent_streams: int = DEFAULT_H2_MAX_CONCURRENT_STREAMS
    header_table_size: int = DEFAULT_H2_HEADER_TABLE_SIZE
    initial_window_size: int = DEFAULT_H2_INITIAL_WINDOW_SIZE
    connection_window_size: int = DEFAULT_H2_CONNECTION_WINDOW_SIZE
    max_continuation_frames: int = DEFAULT_H2_MAX_CONTINUATION_FRAMES
    flood_window: float = DEFAULT_H2_FLOOD_WINDOW
    max_resets_per_window: int = DEFAULT_H2_MAX_RESETS
    max_control_frames_per_window: int = DEFAULT_H2_MAX_CONTROL_FRAMES

    def __post_init__(self) -> None:
        for name in ("max_concurrent_streams", "max_continuation_frames", "max_resets_per_window",
                     "max_control_frames_per_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not 0 <= self.header_table_size <= 1 << 16:
            raise ValueError(f"header_table_size must be in 0..65536, got {self.header_table_size!r}")
        for name in ("initial_window_size", "connection_window_size"):
            if not 1024 <= getattr(self, name) <= (1 << 31) - 1:
                raise ValueError(f"{name} must be in 1024..2**31-1, got {getattr(self, name)!r}")
        if not self.flood_window > 0:
            raise ValueError(f"flood_window must be > 0, got {self.flood_window!r}")
