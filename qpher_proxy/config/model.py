"""The configuration model: frozen dataclasses, one per section, every option with its default.

``config.example.yaml`` at the repository root documents each option; a test keeps the two in
step. Constraints live beside the field (``meta(...)``) so that the strict loader can name the
dotted path and what was expected when a value is wrong.

Path options are resolved relative to the directory of the config file. ``must_exist`` paths are
checked at load time ("a missing file stops start-up").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

KiB = 1024
MiB = 1024 * KiB


def meta(
    *,
    min: float | None = None,
    max: float | None = None,
    path: bool = False,
    must_exist: bool = False,
    choices: tuple[str, ...] | None = None,
    doc: str = "",
) -> dict[str, Any]:
    return {
        "min": min, "max": max, "path": path, "must_exist": must_exist, "choices": choices, "doc": doc,
    }


def opt(default: Any, **kw: Any) -> Any:
    if isinstance(default, (list, dict, set)):
        raise TypeError("use tuples for defaults")
    return field(default=default, metadata=meta(**kw))


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: tuple[str, ...] = opt(("127.0.0.1:8443",))
    shutdown_grace: float = opt(10.0, min=0, max=3600)
    user: str | None = opt("qpher", doc="started as root: the gateway drops to this user after binding")
    sandbox: Literal["auto", "required", "off"] = opt("auto")
    workers: int = opt(1, min=1, max=256, doc="gateway processes on SO_REUSEPORT listeners")


@dataclass(frozen=True, slots=True)
class TLSConfig:
    cert_file: str = opt("certs/server.crt", path=True, must_exist=True)
    key_file: str = opt("certs/server.key", path=True, must_exist=True)
    mldsa_cert_file: str | None = opt(None, path=True, must_exist=True)
    mldsa_key_file: str | None = opt(None, path=True, must_exist=True)
    min_version: Literal["1.2", "1.3"] = opt("1.2")
    groups: tuple[str, ...] = opt(("X25519MLKEM768", "X25519", "secp256r1"))
    require_pq: bool = opt(False)
    client_auth: Literal["none", "optional", "required"] = opt("none")
    client_ca: str | None = opt(None, path=True, must_exist=True)
    handshake_timeout: float = opt(10.0, min=0.1, max=300)
    session_tickets: bool = opt(True, doc="TLS 1.3 resumption with stateless tickets (psk_dhe_ke, no 0-RTT)")
    ticket_key_rotation: float = opt(3600.0, min=60, max=86_400, doc="seconds a ticket key issues tickets")


@dataclass(frozen=True, slots=True)
class HTTPConfig:
    max_header_bytes: int = opt(16 * KiB, min=1 * KiB, max=1 * MiB)  # nginx large_client_header_buffers
    max_body_bytes: int = opt(1 * MiB, min=1, max=1024 * MiB)
    header_timeout: float = opt(10.0, min=0.1, max=600)
    idle_timeout: float = opt(75.0, min=0.1, max=3600)  # nginx keepalive_timeout
    hsts_max_age: int | None = opt(None, min=0, max=315_360_000)  # seconds; ten years at most


@dataclass(frozen=True, slots=True)
class HTTP2Config:
    enabled: bool = opt(True, doc="offer h2 in ALPN (TLS 1.3 clients only)")
    max_concurrent_streams: int = opt(100, min=1, max=10_000)
    header_table_size: int = opt(4096, min=0, max=65_536, doc="HPACK dynamic table a client may use")
    initial_window_size: int = opt(65_535, min=1024, max=2_147_483_647, doc="bytes buffered per stream")
    connection_window_size: int = opt(1 * MiB, min=1024, max=2_147_483_647)
    max_continuation_frames: int = opt(16, min=1, max=64)
    flood_window: float = opt(10.0, min=0.1, max=3600)
    max_resets_per_window: int = opt(200, min=1, max=100_000)
    max_control_frames_per_window: int = opt(200, min=1, max=100_000)


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_connections: int = opt(10_000, min=1, max=1_000_000)


@dataclass(frozen=True, slots=True)
class CryptoConfig:
    backend: Literal["auto", "liboqs", "openssl"] = opt("auto")


@dataclass(frozen=True, slots=True)
class KEKConfig:
    provider: Literal["file", "env", "pkcs11"] = opt("file")
    file: str = opt("kek/kek.b64", path=True)
    env: str = opt("QPHER_KEK")
    # provider pkcs11: an AES-256 key inside a token; the PIN comes from a file or a variable, never here
    pkcs11_module: str | None = opt(None, path=True, doc="path of the token's PKCS#11 library")
    pkcs11_token_label: str | None = opt(None)
    pkcs11_key_label: str | None = opt(None, doc="a non-extractable AES-256 secret key in that token")
    pkcs11_pin_file: str | None = opt(None, path=True, doc="the user PIN, one line, 0600")
    pkcs11_pin_env: str | None = opt(None, doc="or: the variable holding the user PIN")


@dataclass(frozen=True, slots=True)
class KMSConfig:
    workers: int = opt(0, min=0, max=256, doc="0 = one per spare core, at least 1")
    dir: str = opt("kms", path=True)
    destroy_delay: float = opt(86_400.0, min=0, max=365 * 86_400)
    request_timeout: float = opt(30.0, min=0.1, max=600)
    restart_backoff_max: float = opt(10.0, min=0.1, max=600)
    user: str | None = opt("qpher-kms", doc="started as root: KMS workers run as this user")
    kek: KEKConfig = field(default_factory=KEKConfig)
    # remote: no local workers; the gateway reaches KMS nodes (`qpher-proxy kms serve`) over PQ mTLS
    mode: Literal["local", "remote"] = opt("local")
    endpoints: tuple[str, ...] = opt((), doc="remote: HOST:PORT of each KMS node")
    client_cert_file: str | None = opt(None, path=True, must_exist=True, doc="remote: ML-DSA-65 chain")
    client_key_file: str | None = opt(None, path=True, must_exist=True)
    client_ecdsa_cert_file: str | None = opt(None, path=True, must_exist=True, doc="transition chain")
    client_ecdsa_key_file: str | None = opt(None, path=True, must_exist=True)
    ca_file: str | None = opt(None, path=True, must_exist=True, doc="remote: the internal CA bundle")
    server_uri: str = opt("spiffe://qpher.internal/kms", doc="SAN URI every KMS node must carry")
    connections_per_endpoint: int = opt(2, min=1, max=64)
    connect_timeout: float = opt(3.0, min=0.05, max=120)
    health_interval: float = opt(2.0, min=0.05, max=3600)
    reconnect_backoff_max: float = opt(5.0, min=0.05, max=600)


@dataclass(frozen=True, slots=True)
class KMSNodeConfig:
    """``qpher-proxy kms serve``: this host as a KMS node behind PQ mutual TLS."""

    listen: tuple[str, ...] = opt(("127.0.0.1:9443",))
    cert_file: str | None = opt(None, path=True, must_exist=True, doc="ML-DSA-65 chain of the node")
    key_file: str | None = opt(None, path=True, must_exist=True)
    ecdsa_cert_file: str | None = opt(None, path=True, must_exist=True, doc="transition chain")
    ecdsa_key_file: str | None = opt(None, path=True, must_exist=True)
    client_ca: str | None = opt(None, path=True, must_exist=True, doc="the internal CA bundle")
    client_uri: str = opt("spiffe://qpher.internal/gateway", doc="SAN URI a caller must carry")
    handshake_timeout: float = opt(10.0, min=0.1, max=300)
    max_connections: int = opt(1024, min=1, max=1_000_000)


@dataclass(frozen=True, slots=True)
class AuthConfig:
    db: str = opt("data/gateway.db", path=True)
    pepper_file: str = opt("secrets/pepper", path=True)
    cache_ttl: float = opt(1.0, min=0, max=1.0)


@dataclass(frozen=True, slots=True)
class FailOpenConfig:
    max_seconds: float = opt(300.0, min=1, max=86_400)


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    dir: str = opt("policies", path=True, must_exist=True)
    eval_budget_ms: float = opt(5.0, min=0.01, max=10_000)
    reload_interval: float = opt(2.0, min=0.1, max=3600)
    fail_open: FailOpenConfig = field(default_factory=FailOpenConfig)


@dataclass(frozen=True, slots=True)
class QuotaConfig:
    flush_interval: float = opt(1.0, min=0.05, max=60)


@dataclass(frozen=True, slots=True)
class StorageConfig:
    backend: Literal["sqlite", "postgresql"] = opt("sqlite")
    dsn: str | None = opt(None, doc="postgresql://user@host:5432/db; both processes SET ROLE")
    gateway_dsn: str | None = opt(None)
    kms_dsn: str | None = opt(None)
    role_prefix: str = opt("qpher", doc="roles <prefix>_gateway, <prefix>_kms, <prefix>_admin")
    pool_size: int = opt(8, min=1, max=1000)
    connect_timeout: float = opt(3.0, min=0.1, max=120)
    statement_timeout: float = opt(5.0, min=0.01, max=600)
    pool_timeout: float = opt(2.0, min=0.01, max=600)
    lease_ttl: float = opt(15.0, min=1, max=3600)
    sweep_interval: float = opt(5.0, min=0.1, max=3600)


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    backend: Literal["local", "redis"] = opt("local")
    redis_url: str | None = opt(None, doc="redis://[[user]:password@]host:port/db or unix:///path?db=N")
    on_backend_failure: Literal["local", "deny"] = opt("local")
    expected_nodes: int = opt(1, min=1, max=10_000)
    timeout: float = opt(0.5, min=0.001, max=30)
    retry_interval: float = opt(1.0, min=0.05, max=600)
    key_prefix: str = opt("qpher")


@dataclass(frozen=True, slots=True)
class AuditConfig:
    file: str = opt("audit/audit.log", path=True)
    rotate_bytes: int = opt(64 * MiB, min=4 * KiB, max=64 * 1024 * MiB)
    # signed checkpoints of the log's Merkle tree: every checkpoint_interval seconds or every
    # checkpoint_records records, whichever comes first; origin None = "qpher-proxy/<hostname>"
    checkpoint_interval: float = opt(60.0, min=1, max=86_400)
    checkpoint_records: int = opt(1000, min=1, max=1_000_000_000)
    origin: str | None = opt(None)


@dataclass(frozen=True, slots=True)
class APIConfig:
    max_batch_items: int = opt(100, min=1, max=10_000)


@dataclass(frozen=True, slots=True)
class WebSocketConfig:
    idle_timeout: float = opt(300.0, min=0.01, max=86_400, doc="seconds without a byte either way")
    max_lifetime: float = opt(86_400.0, min=0.01, max=30 * 86_400, doc="seconds a tunnel may stay open")
    max_connections: int = opt(1024, min=1, max=1_000_000, doc="tunnels open at once, per gateway process")


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    url: str | None = opt(None)
    protocol: Literal["http1", "h2", "h2c"] = opt(
        "http1", doc="h2: HTTP/2 over TLS (https:// url); h2c: HTTP/2 with prior knowledge (http:// url)")
    connect_timeout: float = opt(5.0, min=0.01, max=600)
    read_timeout: float = opt(30.0, min=0.01, max=3600)
    pool_size: int = opt(64, min=1, max=10_000)
    ca_file: str | None = opt(None, path=True, must_exist=True)
    client_cert: str | None = opt(None, path=True, must_exist=True)
    client_key: str | None = opt(None, path=True, must_exist=True)
    pass_api_key: bool = opt(False)
    allow_path_params: bool = opt(False)
    websocket: WebSocketConfig = field(default_factory=WebSocketConfig)


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: Literal["debug", "info", "warning", "error"] = opt("info")
    format: Literal["json", "text"] = opt("json")


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    http: HTTPConfig = field(default_factory=HTTPConfig)
    http2: HTTP2Config = field(default_factory=HTTP2Config)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    crypto: CryptoConfig = field(default_factory=CryptoConfig)
    kms: KMSConfig = field(default_factory=KMSConfig)
    kms_node: KMSNodeConfig = field(default_factory=KMSNodeConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    quotas: QuotaConfig = field(default_factory=QuotaConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    ratelimit: RateLimitConfig = field(default_factory=RateLimitConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    api: APIConfig = field(default_factory=APIConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
