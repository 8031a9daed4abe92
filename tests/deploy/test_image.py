"""The container image, built from a clean checkout on a local Debian base: it starts, serves
``/healthz`` and a signed request over real TLS on the host network, keeps its state in its volume,
stops cleanly on ``docker stop``, runs as a non-root uid, and its labels say what it holds."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dilithium_py.ml_dsa import ML_DSA_65

from ._docker import Docker, build_image, free_port

MSG = b"signed inside a container"


def _labels(docker: Docker, image: str) -> dict[str, str]:
    config = docker.inspect(image)["Config"]
    assert isinstance(config, dict)
    labels = config["Labels"]
    assert isinstance(labels, dict)
    return labels


def _facts_inside(docker: Docker, image: str) -> dict[str, str]:
    out = docker.run("run", "--rm", "--network", "none", image, "version", "--json").stdout
    facts = json.loads(out)
    assert isinstance(facts, dict)
    return facts


class Container:
    """One proxy container on the host network, its state in a named volume."""

    def __init__(self, docker: Docker, image: str, tmp: Path) -> None:
        self.docker, self.image, self.tmp = docker, image, tmp
        self.name = f"qpher-test-{uuid.uuid4().hex[:8]}"
        self.volume = f"{self.name}-state"
        self.port = free_port()

    def start(self) -> None:
        self.docker.run(
            "run", "-d", "--name", self.name, "--network", "host", "-v", f"{self.volume}:/var/lib/qpher",
            "-e", f"QPHER_LISTEN=127.0.0.1:{self.port}",
            "--health-interval", "1s", "--health-start-period", "30s",
            self.image,
        )

    def wait_healthy(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            state = self.docker.inspect(self.name)["State"]
            assert isinstance(state, dict)
            health = state.get("Health") or {}
            assert isinstance(health, dict)
            if health.get("Status") == "healthy":
                return
            if not state.get("Running") or time.monotonic() > deadline:
                raise AssertionError(f"not healthy ({state.get('Status')}, {health.get('Status')}):\n"
                                     + self.logs()[-4000:])
            time.sleep(0.3)

    def logs(self) -> str:
        proc = self.docker.run("logs", self.name, check=False)
        return proc.stdout + proc.stderr

    def read(self, path: str) -> bytes:
        dest = self.tmp / f"{uuid.uuid4().hex}"
        self.docker.run("cp", f"{self.name}:{path}", str(dest))
        return dest.read_bytes()

    def processes(self) -> list[tuple[str, int, str]]:
        """(user, host pid, command) of every process in the container."""
        out = self.docker.run("top", self.name, "-eo", "uid,pid,args").stdout.splitlines()
        rows = []
        for line in out[1:]:
            uid, pid, args = line.split(None, 2)
            rows.append((uid, int(pid), args))
        return rows

    def remove(self) -> None:
        self.docker.run("rm", "-f", self.name, check=False)
        self.docker.run("volume", "rm", "-f", self.volume, check=False)


@pytest.fixture
def container(docker: Docker, image: str, tmp_path: Path) -> Iterator[Container]:
    c = Container(docker, image, tmp_path)
    try:
        yield c
    finally:
        c.remove()


class Client:
    def __init__(self, port: int, ca: bytes, key: str) -> None:
        self.base = f"https://localhost:{port}"
        self.ctx = ssl.create_default_context(cadata=ca.decode())
        self.key = key

    def call(self, method: str, path: str, body: dict[str, Any] | None = None,
             auth: bool = True) -> tuple[int, dict[str, Any], ssl.SSLObject | None]:
        req = urllib.request.Request(self.base + path, method=method,
                                     data=json.dumps(body).encode() if body is not None else None)
        if auth:
            req.add_header("Authorization", f"Bearer {self.key}")
        if body is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, context=self.ctx, timeout=20) as resp:
                return resp.status, json.loads(resp.read() or b"{}"), None
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}"), None


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def test_labels_agree_with_qpher_proxy_version_inside(docker: Docker, image: str) -> None:
    labels = _labels(docker, image)
    facts = _facts_inside(docker, image)
    assert facts == {
        "qpher-proxy": labels["org.opencontainers.image.version"],
        "cryptography": labels["io.qpher.cryptography.version"],
        "openssl": labels["io.qpher.openssl.version"],
        "liboqs": labels["io.qpher.liboqs.version"],
    }
    assert facts["liboqs"] == "none"  # no liboqs build was provided: the OpenSSL backend
    # the recorded facts are this checkout's: its version, its pinned cryptography
    from qpher_proxy import __version__

    pins = (Path(__file__).resolve().parents[2] / "deploy" / "requirements.txt").read_text()
    assert labels["org.opencontainers.image.version"] == __version__
    assert f"cryptography=={labels['io.qpher.cryptography.version']}\n" in pins
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).parent).stdout.strip()
    assert labels["org.opencontainers.image.revision"] == head
    # the human-readable `version` prints the same facts under the label names
    text = docker.run("run", "--rm", "--network", "none", image, "version").stdout
    for name in ("org.opencontainers.image.version", "io.qpher.cryptography.version",
                 "io.qpher.openssl.version", "io.qpher.liboqs.version"):
        assert f"label {name}: {labels[name]}\n" in text


def test_image_runs_as_non_root_with_one_state_volume_and_no_secrets(docker: Docker, image: str) -> None:
    config = docker.inspect(image)["Config"]
    assert isinstance(config, dict)
    assert config["User"] == "10001:10001"
    assert list(config["Volumes"]) == ["/var/lib/qpher"]
    assert config["Entrypoint"][:2] == ["tini", "--"]
    assert config["Healthcheck"]["Test"][:3] == ["CMD", "qpher-proxy", "healthcheck"]
    # Nothing secret is baked in: no private key, KEK, pepper or local state in any layer's files.
    found = docker.run(
        "run", "--rm", "--network", "none", "--entrypoint", "sh", image, "-c",
        "find / -xdev \\( -name '*.key' -o -name 'kek*.b64' -o -name pepper -o -name demo-api-key "
        "-o -name '.qpher' -o -name '*.db' \\) -print 2>/dev/null; ls -A /var/lib/qpher",
    ).stdout.split()
    assert found == []


def test_container_serves_signs_keeps_state_and_stops_cleanly(docker: Docker, container: Container) -> None:
    container.start()
    container.wait_healthy()

    # Every process of the container runs as uid 10001: tini, the supervisor, the gateway, the KMS.
    procs = container.processes()
    assert {uid for uid, _, _ in procs} == {"10001"}, procs
    kms = [pid for _, pid, args in procs if "qpher_proxy.kms.worker" in args]
    gateway = [pid for _, pid, args in procs if "qpher_proxy.server" in args]
    assert kms and gateway, procs

    # Real TLS from the host, verified against the CA the first start made, hostname checked.
    ca = container.read("/var/lib/qpher/certs/ca.crt")
    key = container.read("/var/lib/qpher/secrets/demo-api-key").decode().strip()
    client = Client(container.port, ca, key)
    status, body, _ = client.call("GET", "/healthz", auth=False)
    assert status == 200
    status, body, _ = client.call("GET", "/v1/info", auth=False)
    assert status == 401 and body["error"]["code"] in ("missing_api_key", "unauthenticated"), body

    status, created, _ = client.call("POST", "/v1/keys", {"algorithm": "ml-dsa-65"})
    assert status == 201, created
    kid, pk = created["key_id"], base64.b64decode(created["public_key"])
    status, signed, _ = client.call("POST", "/v1/sign", {"key_id": kid, "message": _b64(MSG)})
    assert status == 200, signed
    sig = base64.b64decode(signed["signature"])
    assert ML_DSA_65.verify(pk, MSG, sig)  # an independent FIPS 204 implementation agrees
    assert not ML_DSA_65.verify(pk, MSG + b"!", sig)

    # docker stop: SIGTERM through tini to the supervisor, which drains and exits 0 well inside
    # the engine's 10 s before SIGKILL; every process of the container is gone.
    started = time.monotonic()
    docker.run("stop", container.name)
    took = time.monotonic() - started
    state = docker.inspect(container.name)["State"]
    assert isinstance(state, dict)
    assert state["ExitCode"] == 0 and not state["OOMKilled"], (state, container.logs()[-3000:])
    assert took < 9, f"docker stop took {took:.1f} s: the engine may have had to SIGKILL"
    for pid in kms + gateway:
        assert not Path(f"/proc/{pid}").exists(), f"process {pid} outlived the container"
    logs = container.logs()
    assert "SIGTERM: graceful shutdown" in logs
    assert "Traceback" not in logs
    assert key not in logs

    # The same volume, a new start: no second init, the key made before still signs.
    docker.run("start", container.name)
    container.wait_healthy()
    assert container.logs().count("created demo API key") == 1
    status, signed2, _ = client.call("POST", "/v1/sign", {"key_id": kid, "message": _b64(MSG)})
    assert status == 200, signed2
    assert ML_DSA_65.verify(pk, MSG, base64.b64decode(signed2["signature"]))


def _liboqs_lib() -> Path | None:
    root = os.environ.get("OQS_INSTALL_PATH") or str(Path.home() / "_oqs")
    for lib in ("lib", "lib64"):
        if (Path(root) / lib / "liboqs.so").exists():
            return Path(root) / lib
    return None


@pytest.mark.liboqs
def test_liboqs_image_records_and_uses_the_provided_build(docker: Docker, base: str, context: Path,
                                                          tmp_path: Path) -> None:
    libdir = _liboqs_lib()
    if libdir is None:
        pytest.skip("liboqs shared library not installed (OQS_INSTALL_PATH): no liboqs build for an image")
    import ctypes

    lib = ctypes.CDLL(str(libdir / "liboqs.so"))
    lib.OQS_version.restype = ctypes.c_char_p
    version = lib.OQS_version().decode()

    ctx = tmp_path / "context"
    shutil.copytree(context, ctx)
    tarball = ctx / "deploy" / "liboqs" / f"liboqs-{version}.tar.gz"
    subprocess.run(["tar", "-C", str(libdir.parent), "-czf", str(tarball), libdir.name], check=True)
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()

    tag = f"qpher-proxy:test-liboqs-{uuid.uuid4().hex[:8]}"
    try:
        # A tarball that is not the one named is refused, with the reason.
        bad = build_image(docker, ctx, tag, base=base,
                          build_args=[f"LIBOQS_VERSION={version}", f"LIBOQS_SHA256={'0' * 64}"])
        assert bad.returncode != 0
        assert f"does not have SHA-256 {'0' * 64}" in bad.stdout + bad.stderr
        # A version the library does not report is refused by the label check.
        wrong = build_image(docker, ctx, tag, base=base,
                            build_args=["LIBOQS_VERSION=9.9.9", f"LIBOQS_SHA256={digest}"])
        assert wrong.returncode != 0

        ok = build_image(docker, ctx, tag, base=base,
                         build_args=[f"LIBOQS_VERSION={version}", f"LIBOQS_SHA256={digest}"])
        assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
        labels = _labels(docker, tag)
        assert labels["io.qpher.liboqs.version"] == version
        assert labels["io.qpher.liboqs.sha256"] == digest
        assert _facts_inside(docker, tag)["liboqs"] == version
        # and the KMS really runs on it: a worker's backend line, from a real start
        name = f"qpher-test-{uuid.uuid4().hex[:8]}"
        port = free_port()
        try:
            docker.run("run", "-d", "--name", name, "--network", "host",
                       "-e", f"QPHER_LISTEN=127.0.0.1:{port}", tag)
            deadline = time.monotonic() + 60
            logs = ""
            while time.monotonic() < deadline and '"msg":"serving"' not in logs:
                time.sleep(0.3)
                proc = docker.run("logs", name, check=False)
                logs = proc.stdout + proc.stderr
            assert '"backend":"liboqs"' in logs, logs[-3000:]
        finally:
            docker.run("rm", "-f", name, check=False)
    finally:
        docker.run("rmi", "-f", tag, check=False)
