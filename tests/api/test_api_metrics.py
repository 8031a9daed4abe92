from __future__ import annotations

import math
import re

import pytest

from qpher_proxy.api import ROUTES, resolve
from qpher_proxy.metrics import (
    CONTENT_TYPE,
    FORBIDDEN_LABEL_NAMES,
    OVERFLOW_VALUE,
    Counter,
    Gauge,
    Histogram,
    Metrics,
    Registry,
)

# One line of the text format 0.0.4: a comment, or name{labels} value.
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\\\|\\"|\\n)*"'
_SAMPLE = re.compile(
    rf"^[a-zA-Z_:][a-zA-Z0-9_:]*(?:\{{{_LABEL}(?:,{_LABEL})*\}})? (?:[-+]?[0-9.e+-]+|\+Inf|-Inf|NaN)$")
_COMMENT = re.compile(r"^# (?:HELP [a-zA-Z_:][a-zA-Z0-9_:]* .*|TYPE [a-zA-Z_:][a-zA-Z0-9_:]* "
                      r"(?:counter|gauge|histogram|summary|untyped))$")


def _check_format(text: str) -> list[str]:
    assert text.endswith("\n")
    lines = text[:-1].split("\n")
    for line in lines:
        assert _SAMPLE.match(line) or _COMMENT.match(line), line
    return lines


def test_product_metrics_render_in_text_format_0_0_4() -> None:
    m = Metrics()
    for route in ROUTES:
        m.observe_request(route.name, route.status, 0.002)
    m.observe_request("POST /v1/sign", 403, 0.0001)
    m.kms_op_duration.labels("sign").observe(0.0004)
    m.kms_restarts.inc()
    m.tls_handshakes.labels("X25519MLKEM768", "TLSv1.3").inc()
    m.tls_handshake_failures.labels("timeout").inc()
    m.policy_decisions.labels("allow-signers", "allow").inc(3)
    m.policy_reload_failures.inc()
    m.fail_open_active.set(1)
    m.rate_limited.labels("api_key").inc()
    m.upstream_requests.labels("502").inc()
    text = m.render().decode("utf-8")
    lines = _check_format(text)
    assert 'qpher_requests_total{route="POST /v1/sign",status="200"} 1' in lines
    assert 'qpher_requests_total{route="POST /v1/sign",status="403"} 1' in lines
    assert 'qpher_requests_total{route="POST /v1/keys/{key_id}/rotate",status="200"} 1' in lines
    assert 'qpher_tls_handshakes_total{group="X25519MLKEM768",version="TLSv1.3"} 1' in lines
    assert 'qpher_policy_decisions_total{rule="allow-signers",effect="allow"} 3' in lines
    assert "qpher_fail_open_active 1" in lines and "qpher_kms_restarts_total 1" in lines
    assert 'qpher_kms_op_duration_seconds_bucket{op="sign",le="0.0005"} 1' in lines
    for name in (
        "qpher_requests_total",
        "qpher_request_duration_seconds",
        "qpher_kms_op_duration_seconds",
        "qpher_kms_restarts_total",
        "qpher_tls_handshakes_total",
        "qpher_tls_handshake_failures_total",
        "qpher_policy_decisions_total",
        "qpher_policy_reload_failures_total",
        "qpher_fail_open_active",
        "qpher_rate_limited_total",
        "qpher_upstream_requests_total",
    ):
        assert any(line.startswith(f"# TYPE {name} ") for line in lines), name
    assert CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"


def test_a_fresh_registry_renders_unlabelled_metrics_at_zero_and_labelled_ones_empty() -> None:
    lines = _check_format(Metrics().render().decode())
    assert "qpher_kms_restarts_total 0" in lines and "qpher_fail_open_active 0" in lines
    assert not any(line.startswith("qpher_requests_total") for line in lines)


def test_no_label_can_carry_a_key_id_because_routes_are_templates() -> None:
    m = Metrics()
    kid = "k_abcdefghijklmnopqrstuvwxyz"
    for method, path in [
        ("GET", f"/v1/keys/{kid}"),
        ("POST", f"/v1/keys/{kid}/disable"),
        ("DELETE", f"/v1/keys/{kid}"),
    ]:
        route, _ = resolve(method, path)  # type: ignore[misc]
        m.observe_request(route.name, 200, 0.001)
    assert kid not in m.render().decode()


@pytest.mark.parametrize("name", sorted(FORBIDDEN_LABEL_NAMES) + ["Key_ID", "TENANT"])
def test_label_names_that_invite_secrets_or_ids_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="refused"):
        Counter("x_total", "x", (name,))


@pytest.mark.parametrize(
    "names", [("le",), ("quantile",), ("__name",), ("1abc",), ("a-b",), ("a", "a"), ("",)]
)
def test_invalid_or_reserved_label_names_are_refused(names: tuple[str, ...]) -> None:
    with pytest.raises(ValueError):
        Histogram("x_seconds", "x", names)


def test_invalid_metric_name_duplicate_registration_and_bad_buckets() -> None:
    with pytest.raises(ValueError):
        Counter("bad-name", "x")
    r = Registry()
    r.counter("a_total", "a")
    with pytest.raises(ValueError):
        r.counter("a_total", "again")
    with pytest.raises(ValueError):
        Histogram("h", "h", buckets=(1.0, 0.5))
    with pytest.raises(ValueError):
        Histogram("h", "h", buckets=())


def test_label_values_and_help_are_escaped() -> None:
    r = Registry()
    c = r.counter("esc_total", 'help with \\ and\nnewline', ("reason",))
    c.labels('a"b\\c\nd').inc()
    lines = _check_format(r.render().decode())
    assert "# HELP esc_total help with \\\\ and\\nnewline" in lines
    assert 'esc_total{reason="a\\"b\\\\c\\nd"} 1' in lines


def test_histogram_buckets_are_cumulative_and_bounds_inclusive() -> None:
    r = Registry()
    h = r.histogram("lat_seconds", "latency", ("op",), buckets=(0.1, 1.0))
    child = h.labels("sign")
    for v in (0.05, 0.1, 0.5, 1.0, 7.0):
        child.observe(v)
    lines = _check_format(r.render().decode())
    assert lines[2:] == [
        'lat_seconds_bucket{op="sign",le="0.1"} 2',
        'lat_seconds_bucket{op="sign",le="1"} 4',
        'lat_seconds_bucket{op="sign",le="+Inf"} 5',
        'lat_seconds_sum{op="sign"} 8.65',
        'lat_seconds_count{op="sign"} 5',
    ]


def test_counter_only_goes_up_and_gauge_goes_both_ways() -> None:
    r = Registry()
    c = r.counter("c_total", "c")
    with pytest.raises(ValueError):
        c.inc(-1)
    g = r.gauge("g", "g", ("scope",))
    g.labels("a").inc(5)
    g.labels("a").dec(2)
    g.labels("b").set(-1.5)
    lines = _check_format(r.render().decode())
    assert 'g{scope="a"} 3' in lines and 'g{scope="b"} -1.5' in lines
    assert c.value() == 0 and g.value("a") == 3


def test_wrong_number_of_label_values_is_refused() -> None:
    c = Counter("c_total", "c", ("a", "b"))
    with pytest.raises(ValueError):
        c.labels("only-one")


def test_series_beyond_the_cap_fold_into_one_overflow_series() -> None:
    c = Counter("c_total", "c", ("reason",), max_series=3)
    for i in range(10):
        c.labels(f"r{i}").inc()
    assert len(c._series) == 4
    assert c.value("r0") == c.value("r2") == 1
    assert c.value(OVERFLOW_VALUE) == 7


def test_special_float_values_render() -> None:
    r = Registry()
    g = r.gauge("g", "g", ("k",))
    g.labels("inf").set(math.inf)
    g.labels("ninf").set(-math.inf)
    g.labels("nan").set(math.nan)
    g.labels("big").set(1e20)
    lines = _check_format(r.render().decode())
    assert {'g{k="inf"} +Inf', 'g{k="ninf"} -Inf', 'g{k="nan"} NaN', 'g{k="big"} 1e+20'} <= set(lines)


def test_non_string_label_values_are_normalised_to_one_series() -> None:
    c = Counter("c_total", "c", ("status",))
    c.labels(200).inc()  # type: ignore[arg-type]
    c.labels("200").inc()
    assert c.value("200") == 2 and len(c._series) == 1


def test_gauge_without_labels() -> None:
    g = Gauge("g", "g")
    g.set(4)
    g.dec()
    assert g.value() == 3


def test_a_resumed_handshake_counts_in_both_handshake_counters() -> None:
    from qpher_proxy.server.serve import _HandshakeMetrics
    from qpher_proxy.tls.engine import TLSInfo

    m = Metrics()
    hs = _HandshakeMetrics(m)
    full = TLSInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384", "X25519MLKEM768", "http/1.1", None)
    resumed = TLSInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384", "X25519MLKEM768", "http/1.1", None, resumed=True)
    hs.on_handshake(full)
    hs.on_handshake(resumed)
    lines = _check_format(m.render().decode("utf-8"))
    assert 'qpher_tls_handshakes_total{group="X25519MLKEM768",version="TLSv1.3"} 2' in lines
    assert 'qpher_tls_resumed_handshakes_total{group="X25519MLKEM768"} 1' in lines
