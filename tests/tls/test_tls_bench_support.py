"""The bench helpers for resumption and first-request latency work against our server (they are
run for real by gateway_bench; here only behaviour is checked, never a timing)."""

from __future__ import annotations

import trio
from _tls_helpers import running_server, settings_for

from qpher_proxy.tls import ServerTLSContextHolder
from qpher_proxy.tls.certs import DevPKI
from qpher_proxy_bench.loadgen import ClientTLS, LoadSpec, run_load
from qpher_proxy_bench.tls_extra_bench import first_request_latency, resumed_handshake_spec


async def test_loadgen_resume_mode_counts_resumed_handshakes(pki: DevPKI) -> None:
    async with running_server(ServerTLSContextHolder(settings_for(pki))) as srv:
        spec = resumed_handshake_spec(srv.port, "X25519MLKEM768", concurrency=1, warmup=0)
        spec = LoadSpec.handshakes(srv.port, spec.tls, connections=1, count=12, seconds=None, warmup=0)
        result = await trio.to_thread.run_sync(run_load, spec)
        baseline = await trio.to_thread.run_sync(run_load, LoadSpec.handshakes(
            srv.port, ClientTLS("X25519MLKEM768", await_ticket=True), connections=1, count=5,
            seconds=None, warmup=0))
    assert result.ok == 12 and not result.errors
    assert result.resumed >= 10  # all but the first (no session yet) in the worker
    assert result.negotiated == {"X25519MLKEM768": 12}
    assert result.summary()["resumed"] == result.resumed
    assert baseline.ok == 5 and baseline.resumed == 0 and not baseline.errors


async def test_loadgen_resume_mode_against_a_server_without_tickets_resumes_nothing(pki: DevPKI) -> None:
    holder = ServerTLSContextHolder(settings_for(pki, session_tickets=False))
    async with running_server(holder) as srv:
        spec = LoadSpec.handshakes(srv.port, ClientTLS("X25519MLKEM768", resume=True), connections=1,
                                   count=4, seconds=None, warmup=0)
        result = await trio.to_thread.run_sync(run_load, spec)
    assert result.ok == 4 and result.resumed == 0 and not result.errors


async def test_first_request_latency_reports_its_figures(pki: DevPKI) -> None:
    async with running_server(ServerTLSContextHolder(settings_for(pki))) as srv:
        for client in ("ssl", "pyopenssl"):
            figures = await trio.to_thread.run_sync(
                lambda c=client: first_request_latency(srv.port, str(pki.ca_cert), n=3, client=c, path="/"))
            assert figures["n"] == 3 and figures["statuses"] == [200] and figures["client"] == client
            assert {"p50_ms", "max_ms", "mean_ms", "over_20ms"} <= figures.keys()
