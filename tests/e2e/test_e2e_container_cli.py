"""The commands a container image leans on, run as its entrypoint and health check run them:
``healthcheck``, ``version --json/--expect`` (the image's labels are checked with it at build time)
and ``init --listen``."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from ._gateway import Gateway, cli


def _config_for(tmp_path: Path, listen: str) -> Path:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"server": {"listen": [listen]}}))
    return cfg


def test_healthcheck_is_healthy_against_a_live_gateway(gateway: Gateway, tmp_path: Path) -> None:
    # a wildcard listen address is probed on the loopback one
    proc = cli("healthcheck", "-c", str(_config_for(tmp_path, f"0.0.0.0:{gateway.port}")))
    assert proc.returncode == 0
    assert proc.stdout.startswith(f"https://127.0.0.1:{gateway.port}/healthz: 200 in ")


def test_healthcheck_fails_with_one_line_when_nothing_listens(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connection refused
        proc = cli("healthcheck", "-c", str(_config_for(tmp_path, f"127.0.0.1:{port}")), check=False)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "ConnectionRefusedError" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.fixture
def plain_tcp_server() -> Iterator[int]:
    """Accepts and answers plain HTTP: a TLS client's handshake fails against it."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.settimeout(0.1)  # closing a socket does not wake a thread blocked in accept(): poll a flag
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join(5)
    srv.close()


def test_healthcheck_fails_against_a_server_that_is_not_tls_and_on_a_timeout(
        plain_tcp_server: int, tmp_path: Path) -> None:
    proc = cli("healthcheck", "-c", str(_config_for(tmp_path, f"127.0.0.1:{plain_tcp_server}")), check=False)
    assert proc.returncode == 1 and "SSL" in proc.stderr and "Traceback" not in proc.stderr
    with socket.socket() as silent:  # accepts (backlog) and never answers the handshake
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        cfg = _config_for(tmp_path, f"127.0.0.1:{silent.getsockname()[1]}")
        proc = cli("healthcheck", "-c", str(cfg), "--timeout", "0.5", check=False, timeout=10)
    assert proc.returncode == 1 and "timed out" in proc.stderr


def test_healthcheck_with_a_broken_config_says_so(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("server: {listen: [nonsense]}\n")
    proc = cli("healthcheck", "-c", str(cfg), check=False)
    assert proc.returncode == 2 and "server.listen[0]" in proc.stderr and "Traceback" not in proc.stderr


def test_version_json_and_expect() -> None:
    facts = json.loads(cli("version", "--json").stdout)
    assert list(facts) == ["qpher-proxy", "cryptography", "openssl", "liboqs"]
    from cryptography import __version__ as crypto_version

    from qpher_proxy import __version__

    assert facts["qpher-proxy"] == __version__ and facts["cryptography"] == crypto_version
    assert facts["openssl"][0].isdigit()  # "4.0.3", as the image label records it
    good = [f"{k}={v}" for k, v in facts.items()]
    assert cli("version", *(a for g in good for a in ("--expect", g))).returncode == 0
    bad = cli("version", "--expect", "cryptography=0.0.1", "--expect", "openssl=1.0.2", check=False)
    assert bad.returncode == 1
    assert f"cryptography is {facts['cryptography']}, expected 0.0.1" in bad.stderr
    assert f"openssl is {facts['openssl']}, expected 1.0.2" in bad.stderr
    odd = cli("version", "--expect", "kernel=6", check=False)
    assert odd.returncode == 1 and "NAME one of qpher-proxy, cryptography, openssl, liboqs" in odd.stderr
    text = cli("version").stdout
    assert f"label io.qpher.openssl.version: {facts['openssl']}\n" in text


def test_init_listen_and_policy_examples_from_the_environment(tmp_path: Path) -> None:
    examples = tmp_path / "examples"
    examples.mkdir()
    (examples / "00-only.yaml").write_text(
        "version: 1\nplans:\n  enterprise: {algorithms: ['*'], operations: ['*']}\nrules: []\n")
    import os

    env = dict(os.environ, QPHER_POLICY_EXAMPLES=str(examples))
    cli("init", "--dir", str(tmp_path / "s"), "--listen", "0.0.0.0:9443", env=env)
    cfg = yaml.safe_load((tmp_path / "s" / "config.yaml").read_text())
    assert cfg["server"]["listen"] == ["0.0.0.0:9443"]
    assert sorted(p.name for p in (tmp_path / "s" / "policies").iterdir()) == ["00-only.yaml"]
    bad = cli("init", "--dir", str(tmp_path / "t"), "--listen", "9443", check=False)
    assert bad.returncode == 2 and "--listen: expected HOST:PORT" in bad.stderr
    assert not (tmp_path / "t").exists()  # refused before anything was written
