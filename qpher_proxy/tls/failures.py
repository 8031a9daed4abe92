"""Failed TLS handshakes: the closed set of reasons, and a rate-limited INFO summary.

A TLS port on the internet sees scanners, health checkers speaking plain HTTP, clients that
give up half-way and old clients offering TLS 1.0. Each failure is logged at DEBUG by the stream
and counted in ``qpher_tls_handshake_failures_total{reason}``; at INFO, this module writes at
most one line per ``interval`` summing up the failures since the previous line, so a scan of
thousands of probes leaves a readable trace instead of thousands of lines (or none).

Reasons (the metric label). The set is closed: a reason not listed here is counted as
``other``, so the label can never grow with what peers send.

====================================  =========================================================
``unsupported_version``               TLS 1.1 or older, SSLv3, an SSLv2 ClientHello, or TLS 1.2
                                      when ``tls.min_version`` is "1.3"
``no_shared_group``                   no key-exchange group in common (TLS 1.3)
``no_shared_cipher``                  no cipher suite in common (TLS 1.2 also reports a missing
                                      common curve this way)
``no_shared_signature_algorithm``     the client accepts no signature our certificates make
``client_certificate_required``       mTLS: no client certificate
``certificate_rejected``              either side refused the other's certificate (an unknown
                                      CA, a bad signature)
``peer_alert``                        the client aborted with a handshake_failure alert
``pq_required``                       ``tls.require_pq`` and no hybrid post-quantum group
``plaintext_http``                    plain HTTP sent to the TLS port
``not_tls``                           another protocol, or noise, sent to the TLS port
``protocol_error``                    a malformed or unexpected TLS message
``eof``                               the client closed the connection during the handshake
``connection_lost``                   the connection broke (reset) during the handshake
``transport_error``                   the transport failed in another way
``timeout``                           not completed within ``tls.handshake_timeout``
``cancelled``                         cut off by the server: the connection's first request
                                      was not complete within ``http.header_timeout`` (shorter
                                      than ``tls.handshake_timeout``), or shutdown
``handshake_failed``                  any other handshake failure
====================================  =========================================================

Nothing here sees key material: a failure is a reason and a count.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

__all__ = ["HANDSHAKE_FAILURE_REASONS", "HandshakeFailureSummary", "SUMMARY_INTERVAL", "failure_reason"]

HANDSHAKE_FAILURE_REASONS = frozenset({
    "unsupported_version", "no_shared_group", "no_shared_cipher", "no_shared_signature_algorithm",
    "client_certificate_required", "certificate_rejected", "peer_alert", "pq_required",
    "plaintext_http", "not_tls", "protocol_error", "eof", "connection_lost", "transport_error",
    "timeout", "cancelled", "handshake_failed",
})
OTHER = "other"
SUMMARY_INTERVAL = 10.0  # seconds between two INFO summaries at most

log = logging.getLogger("qpher.tls")


def failure_reason(exc: Any) -> str:
    """The metric label of a handshake failure: its ``reason`` if it is a known one."""
    reason = getattr(exc, "reason", None)
    return reason if reason in HANDSHAKE_FAILURE_REASONS else OTHER


class HandshakeFailureSummary:
    """Counts failures by reason and logs them at INFO, at most once per ``interval``.

    The first failure after a quiet ``interval`` is logged at once; those that follow within
    ``interval`` wait for the next line, written by the next failure after ``interval`` or by
    ``flush_due()``, which the server calls periodically so that a burst is never left
    unreported.
    """

    __slots__ = ("_interval", "_clock", "_pending", "_last", "_logger")

    def __init__(
        self,
        interval: float = SUMMARY_INTERVAL,
        *,
        clock: Callable[[], float] = time.monotonic,
        logger: logging.Logger = log,
    ) -> None:
        self._interval = interval
        self._clock = clock
        self._pending: dict[str, int] = {}
        self._last: float | None = None  # clock() of the last line written
        self._logger = logger

    def record(self, reason: str) -> None:
        pending = self._pending
        pending[reason] = pending.get(reason, 0) + 1
        self.flush_due()

    def flush_due(self) -> None:
        """Write the summary line if failures are pending and ``interval`` has passed."""
        if not self._pending:
            return
        now = self._clock()
        last = self._last
        if last is not None and now - last < self._interval:
            return
        counts = dict(sorted(self._pending.items()))
        self._pending.clear()
        self._last = now
        total = sum(counts.values())
        if self._logger.isEnabledFor(logging.INFO):
            since = "" if last is None else f" in the last {now - last:.0f} s"
            self._logger.info(
                "tls handshakes failed: %d%s (%s); each one is logged at debug",
                total, since, ", ".join(f"{reason} {n}" for reason, n in counts.items()),
                extra={"fields": {"failures": total, "by_reason": counts}},
            )
