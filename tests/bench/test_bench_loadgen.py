"""The load generator against a tiny local TLS server: counts, statuses, errors, groups, framing.

Runs are count-bounded wherever a test checks a number (no rate is ever asserted: the machine
is shared), and short duration-bounded where the duration bound itself is under test.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from _bench_tiny_server import TinyTLSServer

from qpher_proxy_bench.loadgen import (
    ClientTLS,
    CPUWatch,
    LoadGenerator,
    LoadSpec,
    ResponseError,
    build_request,
    probe,
    response_length,
)

PQ, CLASSICAL = "X25519MLKEM768", "X25519"


@pytest.fixture(scope="module")
def lg() -> Iterator[LoadGenerator]:
    # two processes, so that every run is split and merged
    with LoadGenerator(clients=2) as gen:
        yield gen


@pytest.fixture
def server(tmp_path: Path) -> Iterator[TinyTLSServer]:
    with TinyTLSServer(tmp_path) as srv:
        yield srv


def keepalive(server: TinyTLSServer, path: str, *, group: str = PQ, **kw: object) -> LoadSpec:
    kw.setdefault("warmup", 0.0)
    kw.setdefault("seconds", None)
    return LoadSpec.keepalive(
        server.port, ClientTLS(group, cafile=server.ca_file), build_request("GET", path), **kw
    )  # type: ignore[arg-type]


# ---- pure parts -------------------------------------------------------------------------------


def test_response_length_frames_content_length_chunked_and_bodiless() -> None:
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    assert response_length(ok) == (len(ok), 200, False)
    assert response_length(ok[:-1]) is None
    assert response_length(ok[:10]) is None
    chunked = b"HTTP/1.1 201 Created\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    assert response_length(chunked) == (len(chunked), 201, False)
    assert response_length(chunked[:-2]) is None
    trailers = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-T: 1\r\n\r\n"
    assert response_length(trailers) == (len(trailers), 200, False)
    closing = b"HTTP/1.1 503 Busy\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    assert response_length(closing) == (len(closing), 503, True)
    no_content = b"HTTP/1.1 204 No Content\r\n\r\n"
    assert response_length(no_content) == (len(no_content), 204, False)


@pytest.mark.parametrize("bad", [
    b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
    b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: many\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n\r\nbody until close",
])
def test_response_length_refuses_what_it_cannot_frame(bad: bytes) -> None:
    with pytest.raises(ResponseError):
        response_length(bad)


def test_build_request_adds_length_for_bodies() -> None:
    assert build_request("GET", "/healthz") == b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"
    req = build_request("POST", "/v1/sign", headers={"Authorization": "Bearer k"}, body=b"{}")
    assert req == (b"POST /v1/sign HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer k\r\n"
                   b"Content-Length: 2\r\n\r\n{}")


@pytest.mark.parametrize("host", ["10.0.0.1", "example.com", "0.0.0.0"])
def test_spec_accepts_loopback_only(host: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        LoadSpec.handshakes(443, ClientTLS(PQ), host=host)


def test_spec_needs_a_bound_and_a_request() -> None:
    with pytest.raises(ValueError, match="seconds or count"):
        LoadSpec.handshakes(443, ClientTLS(PQ), seconds=None)
    with pytest.raises(ValueError, match="request"):
        LoadSpec("keepalive", 443, ClientTLS(PQ))


# ---- against the tiny server ---------------------------------------------------------------------


@pytest.mark.parametrize("group", [PQ, CLASSICAL])
def test_probe_verifies_and_reports_the_negotiated_group(server: TinyTLSServer, group: str) -> None:
    r = probe(server.port, ClientTLS(group, cafile=server.ca_file), request=build_request("GET", "/ok"))
    assert (r.ok, r.version, r.group, r.status, r.body) == (True, "TLSv1.3", group, 200, b'{"status":"ok"}')


def test_probe_fails_against_an_untrusted_certificate(server: TinyTLSServer, tmp_path: Path) -> None:
    other = TinyTLSServer(tmp_path / "other")  # another CA; never started, only its CA file is used
    other.stop()
    r = probe(server.port, ClientTLS(PQ, cafile=other.ca_file))
    assert not r.ok and r.error is not None and r.error.startswith("tls:")


def test_keepalive_count_bounded_counts_every_2xx(lg: LoadGenerator, server: TinyTLSServer) -> None:
    r = lg.run(keepalive(server, "/ok", connections=4, count=300))
    assert r.ok == 300 and r.statuses == {200: 300} and r.errors == {}
    assert len(r.latencies_ms) == 300 and 0 < r.p50_ms <= r.p99_ms
    assert r.negotiated == {PQ: 4} and r.clients == 2
    assert r.rate > 0 and r.client_cpu_s > 0


def test_keepalive_non_2xx_is_an_error_by_status(lg: LoadGenerator, server: TinyTLSServer) -> None:
    r = lg.run(keepalive(server, "/teapot", connections=2, count=50))
    assert r.ok == 0 and r.statuses == {418: 50} and r.errors == {"status 418": 50}
    assert r.latencies_ms == () and r.completed == 50


def test_keepalive_walks_chunked_bodies(lg: LoadGenerator, server: TinyTLSServer) -> None:
    r = lg.run(keepalive(server, "/chunked", group=CLASSICAL, connections=2, count=40))
    assert (r.ok, r.errors, r.negotiated) == (40, {}, {CLASSICAL: 2})


def test_keepalive_replaces_connections_the_server_closes(lg: LoadGenerator, server: TinyTLSServer) -> None:
    r = lg.run(keepalive(server, "/close", connections=2, count=30))
    assert r.ok == 30 and r.errors == {}
    server.stop()
    assert server.handshakes[PQ] >= 30  # a new connection (full handshake) for every request


def test_keepalive_sends_bodies_whole(lg: LoadGenerator, server: TinyTLSServer) -> None:
    body = b"x" * 40000  # several TLS records
    spec = LoadSpec.keepalive(server.port, ClientTLS(PQ, cafile=server.ca_file),
                              build_request("POST", "/echo", body=body), connections=2, count=20, warmup=0.0,
                              seconds=None)
    r = lg.run(spec)
    assert (r.ok, r.errors) == (20, {})
    assert (
        probe(server.port, ClientTLS(PQ), request=build_request("POST", "/echo", body=body)).body == b"40000"
    )


def test_keepalive_times_out_a_silent_server(lg: LoadGenerator, server: TinyTLSServer) -> None:
    r = lg.run(keepalive(server, "/hang", connections=2, seconds=0.6, timeout=0.2))
    assert r.ok == 0 and r.errors.get("timeout", 0) >= 2
    assert r.elapsed <= 0.6 + 1e-6


@pytest.mark.parametrize("group", [PQ, CLASSICAL])
def test_handshakes_are_full_and_use_only_the_offered_group(lg: LoadGenerator, server: TinyTLSServer,
                                                            group: str) -> None:
    r = lg.run(LoadSpec.handshakes(server.port, ClientTLS(group), connections=4, count=40, warmup=0.0,
                                   seconds=None))
    assert (r.ok, r.errors, r.negotiated) == (40, {}, {group: 40})
    assert len(r.latencies_ms) == 40
    server.stop()
    # (the server may not have read the last clients' Finished yet: the set is what is certain)
    assert set(server.handshakes) == {group}


def test_duration_bounded_run_stops_by_itself(lg: LoadGenerator, server: TinyTLSServer) -> None:
    watch = CPUWatch([])
    r = lg.run(LoadSpec.handshakes(server.port, ClientTLS(PQ), connections=2, seconds=0.3, warmup=0.1),
               on_window=watch)
    assert r.ok > 0 and r.errors == {}
    assert 0 < r.elapsed <= 0.3 + 1e-6
    assert watch.wall > 0


def test_a_group_the_server_lacks_fails_every_handshake(lg: LoadGenerator, tmp_path: Path) -> None:
    with TinyTLSServer(tmp_path, groups=(CLASSICAL,)) as classical_only:
        assert not probe(classical_only.port, ClientTLS(PQ)).ok
        r = lg.run(LoadSpec.handshakes(classical_only.port, ClientTLS(PQ), connections=2, seconds=0.2,
                                       warmup=0.0))
    assert r.ok == 0 and r.errors.get("tls", 0) > 0 and "tls" in r.error_samples


def test_keepalive_setup_failure_is_reported_and_the_workers_survive(lg: LoadGenerator, tmp_path: Path,
                                                                      server: TinyTLSServer) -> None:
    from qpher_proxy_bench.loadgen import LoadGeneratorError

    with TinyTLSServer(tmp_path / "c", groups=(CLASSICAL,)) as classical_only:
        with pytest.raises(LoadGeneratorError, match="keep-alive connections"):
            lg.run(keepalive(classical_only, "/ok", connections=2, count=10))
    r = lg.run(keepalive(server, "/ok", connections=2, count=10))
    assert r.ok == 10
