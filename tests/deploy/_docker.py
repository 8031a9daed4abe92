"""A Docker engine, a base image and the product image for the deployment tests.

No registry is reachable on the machines these tests run on, and the default bridge network is not
to be used there, so:

- the engine is one these tests start themselves (Debian's ``docker.io``): ``dockerd --bridge=none
  --iptables=false`` on its own socket and data root (kept between runs as a build cache, so only a
  machine's first run builds from nothing), stopped again at the end of the session; an engine
  already answering on ``$QPHER_TEST_DOCKER_HOST`` is used instead;
- the base image is Debian bookworm made with ``debootstrap --variant=minbase`` plus Python, imported
  with ``docker import`` (no registry), cached as a tarball;
- the image's Python wheels come from the host's pip (which reaches PyPI through this machine's
  proxy, as a container cannot) into the build context's ``deploy/wheelhouse/``, so the build
  installs offline, exactly as the Dockerfile documents for air-gapped hosts;
- every container runs with ``--network host`` or ``--network none``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STATE = Path(os.environ.get("QPHER_TEST_DOCKER_STATE", "/var/lib/qpher-test-docker"))
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
BASE_SUITE = "bookworm"
MIRROR = os.environ.get("QPHER_TEST_DEBIAN_MIRROR", "http://deb.debian.org/debian")


class DockerUnavailable(Exception):
    """Why these tests cannot run here (missing tools, not root)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Docker:
    host: str  # unix:///...

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["DOCKER_HOST"] = self.host
        env.pop("DOCKER_CONTEXT", None)
        return env

    def run(self, *args: str, check: bool = True, timeout: float = 600, input: bytes | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            ["docker", *args], env=self.env, capture_output=True, timeout=timeout, cwd=cwd,
            input=input.decode() if input is not None else None, text=True,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"docker {' '.join(args[:3])} ... exited {proc.returncode}:\n"
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def compose(self, project_dir: Path, *args: str, check: bool = True, timeout: float = 300,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        full_env = self.env | (env or {})
        proc = subprocess.run(["docker-compose", *args], env=full_env, cwd=project_dir, capture_output=True,
                              text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"docker-compose {' '.join(args)} exited {proc.returncode}:\n"
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def image_exists(self, ref: str) -> bool:
        return self.run("image", "inspect", ref, check=False).returncode == 0

    def inspect(self, ref: str) -> dict[str, object]:
        data = json.loads(self.run("inspect", ref).stdout)
        assert isinstance(data, list) and data
        first = data[0]
        assert isinstance(first, dict)
        return first


def _require_tools() -> None:
    if sys.platform != "linux":
        raise DockerUnavailable("the deployment tests need Linux")
    missing = [t for t in ("docker", "dockerd", "debootstrap") if shutil.which(t) is None]
    if missing:
        raise DockerUnavailable(f"{', '.join(missing)} not installed (Debian packages docker.io, "
                                "debootstrap; .ci/run installs them)")
    if os.geteuid() != 0:
        raise DockerUnavailable("starting dockerd and running debootstrap need root")


@contextlib.contextmanager
def docker_engine() -> Iterator[Docker]:
    """An engine that answers: ``$QPHER_TEST_DOCKER_HOST``'s, or one started here (and stopped)."""
    given = os.environ.get("QPHER_TEST_DOCKER_HOST")
    if given:
        yield Docker(given)
        return
    _require_tools()
    STATE.mkdir(parents=True, exist_ok=True)
    # One engine per data root: a second test session (another checkout's) waits for the first.
    with open(STATE / "engine.lock", "w") as lock:
        deadline = time.monotonic() + 1800
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{STATE} stayed locked by another session for 30 min") from None
                time.sleep(1)
        with _own_engine() as docker:
            yield docker


@contextlib.contextmanager
def _own_engine() -> Iterator[Docker]:
    parent = "/run" if os.access("/run", os.W_OK) else None
    run_dir = Path(tempfile.mkdtemp(prefix="qpher-dockerd-", dir=parent))
    sock = run_dir / "docker.sock"
    log = open(run_dir / "dockerd.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        ["dockerd", "--bridge=none", "--iptables=false", "--ip6tables=false", "--ip-masq=false",
         f"--data-root={STATE / 'data'}", f"--exec-root={run_dir / 'exec'}",
         f"--pidfile={run_dir / 'dockerd.pid'}",
         f"--host=unix://{sock}", "--log-level=warn"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    docker = Docker(f"unix://{sock}")
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                tail = (run_dir / "dockerd.log").read_text()[-2000:]
                raise AssertionError(f"dockerd exited {proc.returncode}: {tail}")
            if sock.exists() and docker.run("version", check=False, timeout=10).returncode == 0:
                break
            if time.monotonic() > deadline:
                raise AssertionError("dockerd did not answer within 60 s")
            time.sleep(0.2)
        yield docker
    finally:
        with contextlib.suppress(Exception):
            ids = docker.run("ps", "-aq", check=False, timeout=30).stdout.split()
            if ids:
                docker.run("rm", "-f", *ids, check=False, timeout=60)
            # the data root is kept as a build cache; what no run has used for three days goes
            docker.run("image", "prune", "-f", "--filter", "until=72h", check=False, timeout=120)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(run_dir, ignore_errors=True)


def base_image(docker: Docker) -> str:
    """``qpher-local/bookworm-python:<hash>``: Debian minbase with Python, made without a registry."""
    tag = hashlib.sha256(" ".join((BASE_SUITE, MIRROR, *BASE_PACKAGES)).encode()).hexdigest()[:12]
    ref = f"qpher-local/{BASE_SUITE}-python:{tag}"
    if docker.image_exists(ref):
        return ref
    tarball = STATE / f"rootfs-{tag}.tar"
    if not tarball.exists():
        rootfs = Path(tempfile.mkdtemp(prefix="qpher-rootfs-", dir=STATE))
        try:
            proc = subprocess.run(
                ["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", BASE_SUITE,
                 str(rootfs), MIRROR], capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                raise AssertionError(f"debootstrap failed: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
            # apt in the image is still usable (the Dockerfile installs tini with it); a
            # leftover cache is not part of the base.
            shutil.rmtree(rootfs / "var/cache/apt/archives", ignore_errors=True)
            partial = tarball.with_suffix(".partial")
            subprocess.run(["tar", "-C", str(rootfs), "-cf", str(partial), "."], check=True, timeout=300)
            os.replace(partial, tarball)
        finally:
            shutil.rmtree(rootfs, ignore_errors=True)
    with open(tarball, "rb") as f:
        proc = subprocess.run(["docker", "import", "-", ref], env=docker.env, stdin=f, capture_output=True,
                              text=True, timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"docker import failed: {proc.stderr[-2000:]}")
    return ref


def repo_files() -> list[str]:
    """The files a clean checkout of this working tree holds: tracked, and new ones not ignored."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, check=True).stdout
    return [p for p in out.decode().split("\0") if p and (REPO / p).is_file()]


def build_context(dest: Path) -> Path:
    """A build context as a fresh clone would give, plus the wheelhouse (from the host's pip)."""
    for rel in repo_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, target)
    wheels = dest / "deploy" / "wheelhouse"
    cache = STATE / "wheels"
    cache.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "download", "--only-binary=:all:", "--no-deps", "-r",
                    str(dest / "deploy" / "requirements.txt"), "-d", str(cache)], check=True, timeout=600,
                   capture_output=True)
    wanted = _pinned(dest / "deploy" / "requirements.txt")
    for whl in cache.glob("*.whl"):
        if _wheel_key(whl.name) in wanted:
            shutil.copy2(whl, wheels / whl.name)
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(wheels), str(dest)], check=True, timeout=600,
                   capture_output=True)
    return dest


def _canon(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


def _pinned(requirements: Path) -> set[tuple[str, str]]:
    out = set()
    for line in requirements.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            out.add((_canon(name), version.strip()))
    return out


def _wheel_key(filename: str) -> tuple[str, str]:
    name, version = filename.split("-")[:2]
    return _canon(name), version


def build_image(docker: Docker, context: Path, tag: str, *, base: str,
                build_args: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                          text=True).stdout.strip()
    args = ["build", "--network", "host", "-t", tag, "--build-arg", f"BASE_IMAGE={base}",
            "--build-arg", f"VCS_REF={head or 'unknown'}",
            "--build-arg", f"BUILD_DATE={time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}"]
    for a in build_args:
        args += ["--build-arg", a]
    return docker.run(*args, str(context), check=False, timeout=1200)
