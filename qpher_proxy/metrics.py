"""A tiny Prometheus registry: counters, gauges and histograms, text exposition format 0.0.4.

Theory of operation
-------------------
Every metric is declared once, with a fixed tuple of label names, in :class:`Metrics`. A
labelled metric keeps one *series* per tuple of label values in a dict, so the hot path is a
dict lookup plus an addition (``metrics.requests.labels("POST /v1/sign", "200").inc()``);
callers that observe the same series often may keep the child object and skip the lookup.
``render()`` walks the registry and writes the text format; it is the only slow part and runs
only when ``GET /metrics`` is scraped.

No secret and no key id can reach a label, by construction:

* label *names* are checked at declaration: names that would invite a secret or an unbounded
  identifier (``key_id``, ``api_key``, ``tenant``, ``path``, ``request_id``, ...) are refused
  with ``ValueError``, so such a metric cannot even be declared;
* label *values* come from closed sets chosen by the code: the ``route`` label is
  ``Route.name`` (``"POST /v1/keys/{key_id}/rotate"``, the route *template*), never the raw
  request path; ``status`` is an HTTP status; ``op``, ``rule``, ``scope``, ``reason`` are
  names from our own tables;
* as a last guard against a bug that feeds unbounded values, each metric holds at most
  ``max_series`` series; values past that are folded into one series whose label values are
  all ``"_overflow_"`` (the count stays right; the memory stays bounded).

Tenants are deliberately not a label: they are unbounded (cardinality) and a tenant's traffic
profile is not something every scraper of ``/metrics`` should see. Per-tenant accounting lives
in the quota store and the audit log.

The registry is not thread-safe; the gateway is single-threaded (trio), like the h11 state
machines it sits beside.
"""

from __future__ import annotations

import math
import os
import re
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = [
    "CONTENT_TYPE",
    "Counter",
    "Gauge",
    "Histogram",
    "Metrics",
    "Registry",
    "FORBIDDEN_LABEL_NAMES",
    "REQUEST_DURATION_BUCKETS",
    "KMS_DURATION_BUCKETS",
]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus text exposition 0.0.4

OVERFLOW_VALUE = "_overflow_"
DEFAULT_MAX_SERIES = 2_000  # per metric; routes x statuses stay far below this

# Label names that would carry a secret, a key id, or an unbounded identifier.
FORBIDDEN_LABEL_NAMES = frozenset({
    "key", "key_id", "keyid", "kid", "api_key", "apikey", "api_key_id", "token", "secret",
    "password", "authorization", "auth", "credential", "credentials", "cookie", "session",
    "tenant", "tenant_id", "user", "user_id", "client", "client_ip", "ip", "addr", "address",
    "path", "url", "uri", "target", "query", "request_id", "trace_id", "message", "plaintext",
    "ciphertext", "shared_secret", "signature", "label",
})

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")

# Seconds. Request latency spans a no-op (~100 us) to a slow batch; KMS ops a socketpair round
# trip (~15 us) to an ML-DSA-87 sign under load.
REQUEST_DURATION_BUCKETS = (
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
KMS_DURATION_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)


def _check_label_names(metric: str, names: Sequence[str]) -> tuple[str, ...]:
    out = tuple(names)
    for n in out:
        if not isinstance(n, str) or not _LABEL_NAME.fullmatch(n) or n.startswith("__"):
            raise ValueError(f"metric {metric!r}: invalid label name {n!r}")
        if n.lower() in FORBIDDEN_LABEL_NAMES:
            raise ValueError(
                f"metric {metric!r}: label name {n!r} is refused (it would carry a secret, "
                "a key id or an unbounded identifier)"
            )
        if n == "le" or n == "quantile":
            raise ValueError(f"metric {metric!r}: label name {n!r} is reserved")
    if len(set(out)) != len(out):
        raise ValueError(f"metric {metric!r}: duplicate label names {out!r}")
    return out


def _escape_label_value(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n")


def _fmt(v: float) -> str:
    if v == math.inf:
        return "+Inf"
    if v == -math.inf:
        return "-Inf"
    if v != v:
        return "NaN"
    if float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(float(v))


def _label_str(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape_label_value(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Metric:
    kind = ""

    def __init__(
        self, name: str, help: str, labelnames: Sequence[str] = (), *, max_series: int = DEFAULT_MAX_SERIES
    ) -> None:
        if not _METRIC_NAME.fullmatch(name):
            raise ValueError(f"invalid metric name {name!r}")
        self.name = name
        self.help = help
        self.labelnames = _check_label_names(name, labelnames)
        self.max_series = max_series
        self._series: dict[tuple[str, ...], object] = {}
        if not self.labelnames:
            self._series[()] = self._new_child()

    def _new_child(self) -> object:  # pragma: no cover - overridden
        raise NotImplementedError

    def _child(self, values: tuple[str, ...]) -> object:
        child = self._series.get(values)
        if child is not None:
            return child
        if len(values) != len(self.labelnames):
            raise ValueError(
                f"metric {self.name!r} expects {len(self.labelnames)} label values "
                f"{self.labelnames!r}, got {len(values)}"
            )
        values = tuple(str(v) for v in values)
        child = self._series.get(values)
        if child is not None:
            return child
        if len(self._series) >= self.max_series:
            values = (OVERFLOW_VALUE,) * len(self.labelnames)
            child = self._series.get(values)
            if child is not None:
                return child
        child = self._new_child()
        self._series[values] = child
        return child

    def _render_series(self, out: list[str]) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def render_into(self, out: list[str]) -> None:
        out.append(f"# HELP {self.name} {_escape_help(self.help)}")
        out.append(f"# TYPE {self.name} {self.kind}")
        self._render_series(out)


class _Value:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class _CounterChild(_Value):
    __slots__ = ()

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        self.value += amount


class _GaugeChild(_Value):
    __slots__ = ()

    def set(self, value: float) -> None:
        self.value = float(value)

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount


class _ValueMetric(_Metric):
    def value(self, *values: str) -> float:
        c = self._series.get(tuple(values))
        return c.value if isinstance(c, _Value) else 0.0

    def _render_series(self, out: list[str]) -> None:
        for values, child in self._series.items():
            assert isinstance(child, _Value)
            out.append(f"{self.name}{_label_str(self.labelnames, values)} {_fmt(child.value)}")


class Counter(_ValueMetric):
    kind = "counter"

    def _new_child(self) -> _CounterChild:
        return _CounterChild()

    def labels(self, *values: str) -> _CounterChild:
        return self._child(values)  # type: ignore[return-value]

    def inc(self, amount: float = 1.0) -> None:
        """For a metric without labels."""
        self.labels().inc(amount)


class Gauge(_ValueMetric):
    kind = "gauge"

    def _new_child(self) -> _GaugeChild:
        return _GaugeChild()

    def labels(self, *values: str) -> _GaugeChild:
        return self._child(values)  # type: ignore[return-value]

    def set(self, value: float) -> None:
        self.labels().set(value)

    def inc(self, amount: float = 1.0) -> None:
        self.labels().inc(amount)

    def dec(self, amount: float = 1.0) -> None:
        self.labels().dec(amount)


class _HistogramChild:
    __slots__ = ("_bounds", "counts", "sum", "count")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; last is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound falls in that bucket (le = "less or equal").
        self.counts[bisect_left(self._bounds, value)] += 1
        self.sum += value
        self.count += 1


class Histogram(_Metric):
    kind = "histogram"

    def __init__(
        self,
        name: str,
        help: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Iterable[float] = REQUEST_DURATION_BUCKETS,
        max_series: int = DEFAULT_MAX_SERIES,
    ) -> None:
        bounds = tuple(float(b) for b in buckets if b != math.inf)
        if not bounds or list(bounds) != sorted(set(bounds)):
            raise ValueError(f"histogram {name!r}: buckets must be strictly increasing, got {bounds!r}")
        self.buckets = bounds
        super().__init__(name, help, labelnames, max_series=max_series)

    def _new_child(self) -> _HistogramChild:
        return _HistogramChild(self.buckets)

    def labels(self, *values: str) -> _HistogramChild:
        return self._child(values)  # type: ignore[return-value]

    def observe(self, value: float) -> None:
        self.labels().observe(value)

    def _render_series(self, out: list[str]) -> None:
        for values, child in self._series.items():
            assert isinstance(child, _HistogramChild)
            cumulative = 0
            for bound, n in zip((*self.buckets, math.inf), child.counts, strict=True):
                cumulative += n
                le = f'le="{_fmt(bound)}"'
                out.append(f"{self.name}_bucket{_label_str(self.labelnames, values, le)} {cumulative}")
            labels = _label_str(self.labelnames, values)
            out.append(f"{self.name}_sum{labels} {_fmt(child.sum)}")
            out.append(f"{self.name}_count{labels} {child.count}")


class Registry:
    """An ordered set of metrics with unique names."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}

    def register(self, metric: _Metric) -> _Metric:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name!r} is already registered")
        self._metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Counter:
        m = Counter(name, help, labelnames)
        self.register(m)
        return m

    def gauge(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Gauge:
        m = Gauge(name, help, labelnames)
        self.register(m)
        return m

    def histogram(
        self, name: str, help: str, labelnames: Sequence[str] = (), *, buckets: Iterable[float]
    ) -> Histogram:
        m = Histogram(name, help, labelnames, buckets=buckets)
        self.register(m)
        return m

    def get(self, name: str) -> _Metric | None:
        return self._metrics.get(name)

    def render(self) -> bytes:
        out: list[str] = []
        for m in self._metrics.values():
            m.render_into(out)
        return ("\n".join(out) + "\n").encode("utf-8")


class Metrics:
    """The product's metrics, declared once. One instance per gateway (tests make their own).

    Label values: ``route`` is ``Route.name`` (or ``"unmatched"`` / ``"upstream"`` for requests
    no API route served), ``status`` the HTTP status as a string, ``op`` the KMS operation
    name, ``group``/``version`` the negotiated TLS group and version, ``reason`` a short fixed
    failure class, ``rule``/``effect`` the deciding policy rule id and its effect, ``scope`` the
    rate-limit scope (``"api_key"``, ``"tenant"``, ``"global"``, ...).
    """

    def __init__(self) -> None:
        r = self.registry = Registry()
        self.requests = r.counter(
            "qpher_requests_total", "HTTP requests answered, by route template and status.",
            ("route", "status"))
        self.request_duration = r.histogram(
            "qpher_request_duration_seconds", "Time from request head to response sent, by route.",
            ("route",), buckets=REQUEST_DURATION_BUCKETS)
        self.kms_op_duration = r.histogram(
            "qpher_kms_op_duration_seconds", "KMS round-trip time seen by the gateway, by operation.",
            ("op",), buckets=KMS_DURATION_BUCKETS)
        self.kms_restarts = r.counter(
            "qpher_kms_restarts_total", "KMS worker processes restarted by the supervisor.")
        self.tls_handshakes = r.counter(
            "qpher_tls_handshakes_total", "Completed TLS handshakes, by key-exchange group and version.",
            ("group", "version"))
        self.tls_resumptions = r.counter(
            "qpher_tls_resumed_handshakes_total",
            "Completed TLS handshakes that resumed a session (a ticket), by key-exchange group; also "
            "counted in qpher_tls_handshakes_total.", ("group",))
        self.tls_handshake_failures = r.counter(
            "qpher_tls_handshake_failures_total", "Failed TLS handshakes, by reason (one of a fixed set).",
            ("reason",))
        self.policy_decisions = r.counter(
            "qpher_policy_decisions_total", "Policy decisions, by deciding rule and effect.",
            ("rule", "effect"))
        self.policy_reload_failures = r.counter(
            "qpher_policy_reload_failures_total",
            "Policy reloads rejected (the previous policy set stays in force).")
        self.fail_open_active = r.gauge(
            "qpher_fail_open_active", "1 while the policy fail-open override is active, else 0.")
        self.rate_limited = r.counter(
            "qpher_rate_limited_total", "Requests refused by a rate limit or quota, by scope.",
            ("scope",))
        self.upstream_requests = r.counter(
            "qpher_upstream_requests_total", "Requests forwarded to the upstream, by upstream status.",
            ("status",))
        self.websocket_tunnels_open = r.gauge(
            "qpher_websocket_tunnels_open", "WebSocket tunnels open now (upgrades in progress included).")
        self.websocket_tunnels = r.counter(
            "qpher_websocket_tunnels_total",
            "WebSocket tunnels ended, by outcome: who closed (client, upstream), a limit (idle_timeout, "
            "max_lifetime), shutdown, aborted (never switched) or refused (over max_connections).",
            ("outcome",))
        # server.workers > 1: the processes share the port and each scrape reaches one of them.
        self.process_info = r.gauge(
            "qpher_process_info", "1, labelled with the pid of the gateway process that answered.",
            ("pid",))
        self.process_info.labels(str(os.getpid())).set(1.0)
        self.ratelimit_backend_failures = r.counter(
            "qpher_ratelimit_backend_failures_total",
            "Calls to the shared rate-limit backend (Redis) that failed or timed out.")
        self.ratelimit_degraded = r.gauge(
            "qpher_ratelimit_degraded",
            "1 while the shared rate-limit backend is unreachable and the fallback decides, else 0.")
        self.kms_endpoint_duration = r.histogram(
            "qpher_kms_endpoint_duration_seconds",
            "kms.mode remote: round-trip time of each answer, by KMS node (HOST:PORT as configured).",
            ("endpoint",), buckets=KMS_DURATION_BUCKETS)
        self.kms_endpoint_errors = r.counter(
            "qpher_kms_endpoint_errors_total", "kms.mode remote: error answers, by KMS node and error code.",
            ("endpoint", "code"))
        self.kms_endpoint_in_flight = r.gauge(
            "qpher_kms_endpoint_in_flight", "kms.mode remote: requests waiting for an answer, by KMS node.",
            ("endpoint",))
        self.kms_endpoint_connections = r.gauge(
            "qpher_kms_endpoint_connections", "kms.mode remote: live TLS connections, by KMS node.",
            ("endpoint",))
        self.http2_connections = r.gauge(
            "qpher_http2_connections", "HTTP/2 connections open (ALPN h2).")
        self.http2_streams = r.counter(
            "qpher_http2_streams_total", "HTTP/2 request streams started.")
        self.http2_goaways = r.counter(
            "qpher_http2_goaway_total",
            "HTTP/2 connections ended by our GOAWAY, by error code name (NO_ERROR, PROTOCOL_ERROR, "
            "FLOW_CONTROL_ERROR, ENHANCE_YOUR_CALM, ...) and reason (idle, shutdown, rapid_reset, "
            "ping_flood, continuation_flood, ...).", ("code", "reason"))
        self._limiter: object | None = None
        self._kms_endpoints: list[Any] = []

    # HTTP2Observer (qpher_proxy.http): what HTTP/2 connections report
    def connection_opened(self) -> None:
        self.http2_connections.inc()

    def connection_closed(self) -> None:
        self.http2_connections.dec()

    def stream_opened(self) -> None:
        self.http2_streams.inc()

    def goaway(self, code: str, reason: str) -> None:
        self.http2_goaways.labels(code, reason).inc()

    def watch_rate_limiter(self, limiter: object) -> None:
        """Read the limiter's ``backend_failures`` and ``degraded`` (Redis) at each scrape."""
        self._limiter = limiter if hasattr(limiter, "backend_failures") else None

    def watch_kms_endpoints(self, endpoints: Sequence[Any]) -> None:
        """kms.mode remote: each endpoint's answers feed the histogram and the error counter as
        they come; its connections and requests in flight are read at each scrape."""
        self._kms_endpoints = list(endpoints)
        for ep in self._kms_endpoints:
            duration = self.kms_endpoint_duration.labels(ep.name)
            errors = self.kms_endpoint_errors
            name = ep.name

            def observe(op: str, seconds: float, code: str | None,
                        duration: Any = duration, errors: Any = errors, name: str = name) -> None:
                duration.observe(seconds)
                if code is not None:
                    errors.labels(name, code).inc()

            ep.observe = observe
            self.kms_endpoint_connections.labels(name).set(0.0)
            self.kms_endpoint_in_flight.labels(name).set(0.0)

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        """The per-request hot path: two dict lookups and two additions."""
        self.requests.labels(route, str(status)).inc()
        self.request_duration.labels(route).observe(seconds)

    def render(self) -> bytes:
        lim = self._limiter
        if lim is not None:
            failures = float(getattr(lim, "backend_failures", 0))
            seen = self.ratelimit_backend_failures.value()
            if failures > seen:
                self.ratelimit_backend_failures.inc(failures - seen)
            self.ratelimit_degraded.set(1.0 if getattr(lim, "degraded", False) else 0.0)
        for ep in self._kms_endpoints:
            self.kms_endpoint_connections.labels(ep.name).set(float(ep.connections))
            self.kms_endpoint_in_flight.labels(ep.name).set(float(ep.in_flight))
        return self.registry.render()
