"""Failed handshakes: a closed set of reasons, each failure reported once, and an INFO summary
written at most once per interval."""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing
from _tls_helpers import settings_for

from qpher_proxy import errors
from qpher_proxy.tls import TLSStream, build_server_context
from qpher_proxy.tls.certs import DevPKI
from qpher_proxy.tls.engine import _HANDSHAKE_REASONS
from qpher_proxy.tls.failures import HANDSHAKE_FAILURE_REASONS, HandshakeFailureSummary, failure_reason


def test_every_reason_the_engine_and_the_errors_give_is_in_the_closed_set() -> None:
    produced = set(_HANDSHAKE_REASONS.values()) | {
        "protocol_error", "not_tls", "eof", "transport_error", "connection_lost", "cancelled",
        errors.TLSHandshakeFailed.reason, errors.TLSHandshakeTimeout.reason,
        errors.TLSPlaintextOnTLSPort.reason, errors.TLSNotPostQuantum.reason,
    }
    assert produced <= HANDSHAKE_FAILURE_REASONS


def test_an_unknown_reason_is_counted_as_other() -> None:
    assert failure_reason(errors.TLSHandshakeFailed("x", reason="eof")) == "eof"
    assert failure_reason(errors.TLSHandshakeFailed("x", reason="made up by a future bug")) == "other"
    assert failure_reason(object()) == "other"


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _summaries(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "qpher.tls" and r.levelno == logging.INFO]


def test_first_failure_is_logged_at_once_and_a_burst_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="qpher.tls")
    clock = _Clock()
    summary = HandshakeFailureSummary(10.0, clock=clock)
    summary.record("plaintext_http")
    assert len(_summaries(caplog)) == 1
    assert _summaries(caplog)[0].fields == {"failures": 1, "by_reason": {"plaintext_http": 1}}

    for i in range(500):  # a scan: 500 probes in 5 s
        clock.now += 0.01
        summary.record("unsupported_version" if i % 2 else "eof")
    summary.flush_due()
    assert len(_summaries(caplog)) == 1  # nothing more within the interval

    clock.now += 5.2
    summary.flush_due()
    lines = _summaries(caplog)
    assert len(lines) == 2
    assert lines[1].fields == {"failures": 500, "by_reason": {"eof": 250, "unsupported_version": 250}}
    assert lines[1].getMessage() == (
        "tls handshakes failed: 500 in the last 10 s (eof 250, unsupported_version 250); "
        "each one is logged at debug"
    )
    clock.now += 60.0
    summary.flush_due()
    assert len(_summaries(caplog)) == 2  # nothing pending, nothing written


def test_a_failure_after_a_quiet_interval_is_logged_at_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="qpher.tls")
    clock = _Clock()
    summary = HandshakeFailureSummary(10.0, clock=clock)
    summary.record("eof")
    clock.now += 10.0
    summary.record("timeout")
    assert [r.fields["by_reason"] for r in _summaries(caplog)] == [{"eof": 1}, {"timeout": 1}]


# ---- the stream reports each failure once --------------------------------------------------

async def test_handshake_cut_off_from_outside_is_reported_as_cancelled(
    pki: DevPKI, autojump_clock: trio.testing.MockClock
) -> None:
    failures: list[errors.TLSHandshakeFailed] = []
    _client, transport = trio.testing.memory_stream_pair()
    stream = TLSStream(transport, build_server_context(settings_for(pki)), handshake_timeout=60,
                       on_handshake_error=failures.append)
    with trio.move_on_after(5) as scope:  # the HTTP server's header deadline, shorter
        await stream.do_handshake()
    assert scope.cancelled_caught
    assert [f.reason for f in failures] == ["cancelled"]
    with pytest.raises(trio.BrokenResourceError):
        await stream.receive_some(10)
    assert len(failures) == 1


async def test_handshake_timeout_is_reported_once(
    pki: DevPKI, autojump_clock: trio.testing.MockClock
) -> None:
    failures: list[errors.TLSHandshakeFailed] = []
    _client, transport = trio.testing.memory_stream_pair()
    stream = TLSStream(transport, build_server_context(settings_for(pki)), handshake_timeout=2,
                       on_handshake_error=failures.append)
    with pytest.raises(errors.TLSHandshakeTimeout):
        await stream.do_handshake()
    assert [f.reason for f in failures] == ["timeout"]


async def test_closing_the_stream_is_not_a_failure(
    pki: DevPKI, autojump_clock: trio.testing.MockClock
) -> None:
    failures: list[errors.TLSHandshakeFailed] = []
    _client, transport = trio.testing.memory_stream_pair()
    stream = TLSStream(transport, build_server_context(settings_for(pki)), handshake_timeout=60,
                       on_handshake_error=failures.append)
    async with trio.open_nursery() as nursery:
        async def handshake() -> None:
            with pytest.raises(trio.ClosedResourceError):
                await stream.do_handshake()

        nursery.start_soon(handshake)
        await trio.sleep(1)
        await stream.aclose()
    assert failures == []
