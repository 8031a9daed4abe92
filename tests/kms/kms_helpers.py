"""Helpers shared by the KMS tests (plain functions and classes; fixtures live in conftest.py)."""

from __future__ import annotations

import base64
import os
import secrets
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from qpher_proxy.context import TenantContext
from qpher_proxy.crypto.interface import Backend
from qpher_proxy.kms.wire.model import KEKSettings
from qpher_proxy.kms.worker.kek import FileKEKProvider
from qpher_proxy.kms.worker.keystore import KeyStore


def ctx(tenant: str = "tenant-a", request_id: str = "req-1", api_key_id: str = "ak_test") -> TenantContext:
    return TenantContext(tenant, request_id, api_key_id)


class FakeClock:
    """An injected wall clock (``KeyStore(clock=...)``) that moves only when told."""

    def __init__(self, start: float = 1_767_225_600.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def reopen(kms_dir: Path, kek_path: Path, backend: Backend, clock: FakeClock | None = None) -> KeyStore:
    return KeyStore(kms_dir, FileKEKProvider(kek_path), backend, clock=clock or FakeClock())


def settings(kms_dir: Path, kek_path: Path, **kw: object) -> dict[str, object]:
    base: dict[str, object] = dict(
        kms_dir=kms_dir, kek=KEKSettings("file", str(kek_path)), workers=1, backend="openssl",
        restart_backoff=0.05, restart_backoff_max=0.2, start_timeout=30.0, request_timeout=30.0,
    )
    base.update(kw)
    return base


# ---- a worker spawned directly (no supervisor), for raw-frame tests ----------------------


@dataclass
class RawWorker:
    proc: subprocess.Popen[bytes]
    sock: socket.socket
    token: bytes

    def recv_some(self) -> bytes:
        return self.sock.recv(1 << 20)

    def close(self) -> tuple[int, str]:
        try:
            self.sock.close()
        finally:
            try:
                _out, err = self.proc.communicate(timeout=20)
            except subprocess.TimeoutExpired:  # pragma: no cover - a hung worker fails the test
                self.proc.kill()
                _out, err = self.proc.communicate()
        return self.proc.returncode, err.decode("utf-8", "replace")


def spawn_raw_worker() -> tuple[subprocess.Popen[bytes], socket.socket]:
    parent, child = socket.socketpair()
    proc = subprocess.Popen(
        [sys.executable, "-m", "qpher_proxy.kms.worker", "--fd", str(child.fileno())],
        pass_fds=[child.fileno()],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    child.close()
    parent.settimeout(20)
    return proc, parent


def kek_b64() -> bytes:
    return base64.b64encode(secrets.token_bytes(32))


def tree_snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under ``root`` with its mode and content (to prove nothing was written)."""
    snap: dict[str, tuple[int, bytes]] = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            snap[str(p.relative_to(root))] = (p.stat().st_mode, p.read_bytes())
    return snap
