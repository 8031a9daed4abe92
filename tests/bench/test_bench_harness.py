"""The benchmark harness: nginx helper, trivial upstream, and one tiny end-to-end run of
``qpher-proxy bench gateway`` against the real gateway (init + serve + KMS), figures not asserted."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from qpher_proxy_bench import gateway_bench
from qpher_proxy_bench.loadgen import ClientTLS, LoadGenerator, LoadSpec, build_request, probe
from qpher_proxy_bench.nginx import NginxServer, find_nginx

needs_nginx = pytest.mark.skipif(
    find_nginx() is None, reason="nginx is not installed (apt-get install -y nginx-light)"
)


@needs_nginx
def test_nginx_serves_healthz_over_tls13_and_reports_its_groups() -> None:
    with NginxServer() as nginx:
        tls = ClientTLS("X25519", cafile=str(nginx.ca_file))
        r = probe(nginx.port, tls, request=build_request("GET", "/healthz"))
        assert (r.ok, r.version, r.group, r.status, r.body) == (
            True,
            "TLSv1.3",
            "X25519",
            200,
            b'{"status":"ok"}',
        )
        assert len(nginx.worker_pids()) == 1
        pq = probe(nginx.port, ClientTLS("X25519MLKEM768", cafile=str(nginx.ca_file)))
        # Debian's nginx links OpenSSL 3.0 (no ML-KEM): the fallback must be said, not hidden
        assert pq.ok == nginx.pq_supported
        assert nginx.pq_supported or ("X25519MLKEM768" in nginx.pq_reason and nginx.groups == ("X25519",))
        with LoadGenerator(1) as lg:
            res = lg.run(LoadSpec.keepalive(nginx.port, tls, build_request("GET", "/healthz"), connections=2,
                                            count=50, seconds=None, warmup=0.0))
        assert (res.ok, res.errors) == (50, {})
        directory = nginx.directory
    assert not directory.exists()


def test_trivial_upstream_answers_keepalive_requests() -> None:
    with gateway_bench.trivial_upstream() as port:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(build_request("GET", "/a") + build_request("POST", "/b", body=b"xyz"))
            data = b""
            while data.count(gateway_bench.UPSTREAM_BODY) < 2:
                chunk = s.recv(4096)
                assert chunk
                data += chunk
    assert data.count(b"HTTP/1.1 200 OK") == 2


def test_raise_plan_limits_keeps_a_valid_policy(tmp_path: Path) -> None:
    import shutil

    src = Path(__file__).resolve().parents[2] / "policies"
    if not src.is_dir():
        pytest.skip("the repository's policies/ folder is not present")
    shutil.copytree(src, tmp_path / "p")
    assert gateway_bench.raise_plan_limits(tmp_path / "p", "enterprise")
    text = "".join(p.read_text() for p in (tmp_path / "p").glob("*.yaml"))
    assert str(gateway_bench.GENEROUS_RATE) in text
    assert not gateway_bench.raise_plan_limits(tmp_path / "p", "no-such-plan")


def test_profile_buckets() -> None:
    b = gateway_bench.profile_bucket
    assert b("~", "<method 'send' of '_socket.socket' objects>") == "syscalls"
    assert b("/x/site-packages/h11/_connection.py", "f") == "h11"
    assert b("/x/site-packages/OpenSSL/SSL.py", "f") == "pyOpenSSL"
    assert b("/work/main/qpher_proxy/http/server.py", "f") == "qpher_proxy.http"
    assert b("/usr/lib/python3.11/logging/__init__.py", "f") == "logging"


@pytest.mark.slow
def test_gateway_bench_end_to_end_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    rc = gateway_bench.main(["--suite", "all", "--skip-nginx", "--seconds", "0.15", "--warmup", "0",
                             "--clients", "1", "--concurrency", "2", "--connections", "2",
                             "--handshake-concurrency", "2", "--raw-seconds", "0.01", "--backend", "openssl",
                             "--memory-connections", "20", "--quiet", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    report = json.loads(out.read_text())
    rows = {(r["suite"], r["kind"], r["group"], r["concurrency"]): r for r in report["rows"]}
    for group in ("X25519MLKEM768", "X25519"):
        for kind in ("handshake", "keepalive"):
            row = rows[("tls", kind, group, 2)]
            assert (
                row["ok"] > 0
                and row["errors"] == {}
                and row["negotiated"] == {group: row["negotiated"][group]}
            )
    for group in ("X25519MLKEM768", "X25519"):
        ticketed, resumed = rows[("tls", "ticketed", group, 2)], rows[("tls", "resumed", group, 2)]
        assert ticketed["ok"] > 0 and ticketed["errors"] == {}, ticketed
        assert resumed["ok"] > 0 and resumed["errors"] == {} and resumed["resumed"] > 0, resumed
    for op in ("healthz", "sign", "verify", "encapsulate", "decapsulate", "encrypt", "decrypt", "forward",
               "sign/batch"):
        row = rows[("api", op, "X25519MLKEM768", 2)]
        # a batch of 64 signatures may outlast this tiny window: measured, not necessarily completed
        assert (row["ok"] > 0 or op == "sign/batch") and row["errors"] == {}, row
        assert row["backend"] == "openssl", row
        if op in gateway_bench.RAW_OPS:
            assert row["raw_rate"] > 0 and row["ratio_to_raw"] > 0
    batch = rows[("api", "sign/batch", "X25519MLKEM768", 2)]
    assert batch["items_per_request"] == gateway_bench.BATCH_ITEMS
    assert batch["items_per_s"] == pytest.approx(batch["rate"] * gateway_bench.BATCH_ITEMS, rel=0.01)
    extras = {e["kind"]: e for e in report["extras"]}
    memory, first = extras["idle_memory"], extras["first_request"]
    assert memory["connections"] == 20
    assert first["n"] == 50 and first["statuses"] == [200]
    assert memory["rss_idle_mb"] >= memory["rss_before_mb"] > 0
    figures = {item["figure"] for item in report["headline"]}
    if batch["ok"]:  # a batch completed within the tiny window
        assert any(f.startswith("sign/batch of 64") for f in figures), figures
    assert any(f.startswith("memory per idle TLS connection (qpher") for f in figures), figures
    assert report["environment"]["backend"] == "openssl"
    assert "sign" in text and "handshake" in text
