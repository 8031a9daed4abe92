"""The compose sidecar example (deploy/sidecar/) as a user runs it: its files, secrets made as its
README says (owned by uid 10001, mode 0400), ``docker-compose up``; a request through the proxy over
real TLS reaches the example app with the identity headers and without the credentials, a request
without a key is refused before the app, and ``docker-compose stop`` ends the proxy with exit 0.

The machine has no bridge network, so the app's namespace (which the proxy joins) is the host's, as
the compose file's comment explains: the ports are rewritten to free ones, on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from qpher_proxy.auth.apikeys import generate_pepper_file
from qpher_proxy.kms.worker.kek import generate_kek_file
from qpher_proxy.tls.certs import make_dev_pki

from ._docker import REPO, Docker, free_port

SIDECAR = REPO / "deploy" / "sidecar"
UID = 10001  # the image's user (Dockerfile); the KEK loader wants its secret owned by the process


def _replace_once(path: Path, old: str, new: str) -> None:
    """Rewrite one spelling in a copied file; fail loudly if the example no longer has it."""
    text = path.read_text()
    assert text.count(old) == 1, f"{path.name}: expected {old!r} exactly once"
    path.write_text(text.replace(old, new))


def _make_secrets(directory: Path, pki_dir: Path) -> Path:
    """tls.crt, tls.key, kek.b64 and pepper, as deploy/sidecar/README.md describes; returns the CA."""
    directory.mkdir()
    pki = make_dev_pki(pki_dir / "certs", mldsa=False, ca_key_dir=pki_dir / "ca")
    shutil.copyfile(pki.server_cert, directory / "tls.crt")
    shutil.copyfile(pki.server_key, directory / "tls.key")
    generate_kek_file(directory / "kek.b64")
    generate_pepper_file(directory / "pepper")
    for f in directory.iterdir():
        os.chown(f, UID, UID)
        os.chmod(f, 0o400)
    return pki.ca_cert


@dataclass
class Sidecar:
    docker: Docker
    directory: Path
    project: str
    image: str
    proxy_port: int
    ca: ssl.SSLContext

    def compose(self, *args: str, check: bool = True,
                timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.docker.compose(self.directory, "-p", self.project, *args, check=check, timeout=timeout,
                                   env={"QPHER_IMAGE": self.image})

    def logs(self) -> str:
        proc = self.compose("logs", "--no-color", check=False, timeout=60)
        return str(proc.stdout + proc.stderr)[-6000:]

    def request(self, path: str, headers: dict[str, str] | None = None, data: bytes | None = None,
                timeout: float = 10) -> tuple[int, dict[str, str], Any]:
        req = urllib.request.Request(f"https://127.0.0.1:{self.proxy_port}{path}", data=data,
                                     headers=headers or {}, method="POST" if data is not None else "GET")
        try:
            with urllib.request.urlopen(req, context=self.ca, timeout=timeout) as resp:
                return resp.status, dict(resp.headers.items()), json.loads(resp.read())
        except urllib.error.HTTPError as err:
            with err:
                return err.code, dict(err.headers.items()), json.loads(err.read())

    def wait_serving(self, timeout: float = 45) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                status, _, body = self.request("/readyz", timeout=3)
                if status == 200:
                    return
                last = f"/readyz {status} {body}"
            except (OSError, ValueError) as exc:  # not listening yet, or the handshake not served yet
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.3)
        raise AssertionError(f"the proxy did not become ready ({last}):\n{self.logs()}")

    def container(self, service: str) -> str:
        ids = self.compose("ps", "-q", service).stdout.strip()
        assert ids, f"no container for {service}"
        return ids.splitlines()[0]


@pytest.fixture
def sidecar(docker: Docker, image: str, tmp_path: Path) -> Iterator[Sidecar]:
    directory = tmp_path / "sidecar"
    shutil.copytree(SIDECAR, directory, ignore=shutil.ignore_patterns("secrets", "__pycache__"))
    # Host networking shares the host's ports: free ones, and loopback only.
    proxy_port, app_port = free_port(), free_port()
    _replace_once(directory / "config.yaml", '"0.0.0.0:8443"', f'"127.0.0.1:{proxy_port}"')
    _replace_once(directory / "config.yaml", "http://127.0.0.1:8080", f"http://127.0.0.1:{app_port}")
    _replace_once(directory / "compose.yaml", 'PORT: "8080"', f'PORT: "{app_port}"')
    ca_file = _make_secrets(directory / "secrets", tmp_path / "pki")
    ctx = ssl.create_default_context(cafile=str(ca_file))  # real verification: chain and IP SAN
    sc = Sidecar(docker, directory, f"qpher-sidecar-{uuid.uuid4().hex[:8]}", image, proxy_port, ctx)
    try:
        sc.compose("up", "-d")
        yield sc
    finally:
        sc.compose("down", "-v", "--timeout", "20", check=False)


def _headers(seen: dict[str, Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in seen["headers"]:
        out.setdefault(name.lower(), []).append(value)
    return out


def test_request_through_the_sidecar_reaches_the_app_with_identity_headers(sidecar: Sidecar) -> None:
    t0 = time.monotonic()
    sidecar.wait_serving()

    created = sidecar.compose("exec", "-T", "proxy", "qpher-proxy", "apikey", "create", "--tenant", "acme",
                              "--plan", "app", "--label", "sidecar test")
    key = created.stdout.strip()
    match = re.search(r"key id:\s+(\S+)", created.stderr)
    assert key.startswith("qph_") and match, created.stderr
    key_id = match.group(1)

    # Spoofed identity headers from the client are dropped; the proxy's own replace them.
    status, _, seen = sidecar.request(
        "/orders/42?x=1",
        headers={"Authorization": f"Bearer {key}", "X-Qpher-Tenant": "evil", "X-Tenant-Id": "evil",
                 "X-Request-Id": "chosen-by-client"},
    )
    assert status == 200, (status, seen, sidecar.logs())
    got = _headers(seen)
    assert seen["method"] == "GET" and seen["path"] == "/orders/42?x=1"
    assert got["x-qpher-tenant"] == ["acme"]
    assert got["x-qpher-key-id"] == [key_id]
    assert len(got["x-request-id"]) == 1 and got["x-request-id"][0] not in ("", "chosen-by-client")
    assert got["x-forwarded-proto"] == ["https"]
    assert got["x-forwarded-for"] == ["127.0.0.1"]
    assert "authorization" not in got and "x-tenant-id" not in got
    first_seen = seen["seen"]

    # X-API-Key and a body: streamed to the app, the key removed.
    status, _, seen = sidecar.request("/upload", headers={"X-API-Key": key}, data=b"x" * 5000)
    assert status == 200, seen
    got = _headers(seen)
    assert seen["method"] == "POST" and seen["body_bytes"] == 5000
    assert "x-api-key" not in got and got["x-qpher-tenant"] == ["acme"]
    assert seen["seen"] == first_seen + 1

    # Without a key: 401 from the proxy, with a JSON error, and the app never sees it.
    status, _, body = sidecar.request("/orders/42")
    assert status == 401 and isinstance(body["error"]["code"], str), body
    status, _, body = sidecar.request("/orders/42", headers={"Authorization": "Bearer qph_nope_nope"})
    assert status == 401 and isinstance(body["error"]["code"], str), body
    status, _, seen = sidecar.request("/orders/43", headers={"Authorization": f"Bearer {key}"})
    assert status == 200 and seen["seen"] == first_seen + 2, (seen["seen"], first_seen)

    logs = sidecar.compose("logs", "--no-color", "proxy").stdout
    assert '"level":"error"' not in logs and '"level":"critical"' not in logs, logs[-4000:]
    print("\n".join(line for line in logs.splitlines() if "Landlock" in line or "WARNING" in line.upper()))

    # docker-compose stop: SIGTERM through tini, the proxy drains and exits 0.
    proxy = sidecar.container("proxy")
    sidecar.compose("stop", "--timeout", "20")
    state = sidecar.docker.inspect(proxy)["State"]
    assert isinstance(state, dict)
    assert state["Status"] == "exited" and state["ExitCode"] == 0, (state, sidecar.logs())
    assert time.monotonic() - t0 < 60
