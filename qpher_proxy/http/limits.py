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

