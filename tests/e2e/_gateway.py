"""A real gateway for end-to-end tests: ``qpher-proxy init`` + ``qpher-proxy serve`` as a child
process (the real CLI, the real KMS worker processes, real TLS on 127.0.0.1), and a small
keep-alive HTTPS client on the standard library (TLS 1.3, X25519)."""

from __future__ import annotations

import http.client
import json
import signal
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

STARTUP_TIMEOUT = 60.0


def cli(*args: str, env: dict[str, str] | None = None, check: bool = True, timeout: float = 60,
        input: str | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "qpher_proxy", *args], capture_output=True, text=True,
        env=env, timeout=timeout, input=input,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"qpher-proxy {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
    return proc


def init_state(directory: Path, **overrides: Any) -> Path:
    """``qpher-proxy init`` into ``directory``, then apply ``overrides`` (dotted keys) to the config."""
    cli("init", "--dir", str(directory), "--port", "0")
    cfg_path = directory / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg.setdefault("kms", {})["workers"] = 1
    for dotted, value in overrides.items():
        node = cfg
        *parents, last = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return cfg_path


@dataclass
class Gateway:
    directory: Path
    proc: subprocess.Popen[bytes]
    host: str
    port: int
    demo_key: str
    ca_file: Path
    log_file: Path = Path("/dev/null")
    log_lines: list[dict[str, Any]] = field(default_factory=list)
    _stderr_buf: bytes = b""
    _log_offset: int = 0
    _clients: list[Client] = field(default_factory=list)

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        return ctx

    def client(self, api_key: str | None = None) -> Client:
        """A keep-alive client; ``stop()`` closes it too, so that a test failing half-way leaves
        no open socket behind for the garbage collector to report in some later test."""
        client = Client(self, api_key if api_key is not None else self.demo_key)
        self._clients.append(client)
        return client

    def read_logs(self) -> list[dict[str, Any]]:
        """Parse what the gateway wrote to its log file since the last call (JSON lines) into
        ``log_lines``. The log goes to a file, not a pipe: a pipe nobody drains would fill up
        and block the gateway on its next log line."""
        with open(self.log_file, "rb") as f:
            f.seek(self._log_offset)
            data = f.read()
        self._log_offset += len(data)
        self._stderr_buf += data
        *lines, self._stderr_buf = self._stderr_buf.split(b"\n")
        for line in lines:
            try:
                self.log_lines.append(json.loads(line))
            except ValueError:
                self.log_lines.append({"raw": line.decode(errors="replace")})
        return self.log_lines

    def raw_log_text(self) -> str:
        self.read_logs()
        return "\n".join(json.dumps(x) for x in self.log_lines)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for client in self._clients:
            client.close()
        self.read_logs()
        return self.proc.returncode


def start_gateway(directory: Path, config: Path | None = None, env: dict[str, str] | None = None) -> Gateway:
    config = config or directory / "config.yaml"
    log_file = directory.parent / f"{directory.name}-gateway.log"
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "qpher_proxy", "serve", "--config", str(config)],
            stdout=subprocess.DEVNULL, stderr=log, stdin=subprocess.DEVNULL, env=env,
        )
    gw = Gateway(directory, proc, "", 0, (directory / "secrets" / "demo-api-key").read_text().strip(),
                 directory / "certs" / "ca.crt", log_file=log_file, _log_offset=log_file.stat().st_size)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            gw.read_logs()
            raise AssertionError(f"gateway exited {proc.returncode} during start-up: {gw.log_lines}")
        time.sleep(0.05)
        for rec in gw.read_logs():
            if rec.get("msg") == "serving":
                host, _, port = rec["listen"][0].rpartition(":")
                gw.host, gw.port = host, int(port)
                return gw
    gw.stop(signal.SIGKILL)
    raise AssertionError(f"gateway did not start within {STARTUP_TIMEOUT} s: {gw.log_lines}")


def child_pids(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(x) for x in (task / "children").read_text().split()]
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
    return out


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except FileNotFoundError:
        return []


def kms_worker_pids(supervisor_pid: int) -> list[int]:
    """The KMS worker processes that the ``qpher-proxy serve`` supervisor runs."""
    return [p for p in child_pids(supervisor_pid) if "qpher_proxy.kms.worker" in _cmdline(p)]


def gateway_pids(supervisor_pid: int) -> list[int]:
    """The gateway process(es) that the ``qpher-proxy serve`` supervisor runs."""
    return [p for p in child_pids(supervisor_pid) if "qpher_proxy.server" in _cmdline(p)]


class Client:
    """Keep-alive HTTPS client; ``call`` returns ``(status, json_or_text, headers)``."""

    def __init__(self, gw: Gateway, api_key: str | None) -> None:
        self.gw = gw
        self.api_key = api_key
        self.conn = http.client.HTTPSConnection(gw.host, gw.port, context=gw.context(), timeout=30)

    def close(self) -> None:
        self.conn.close()

    def call(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
             raw: bytes | None = None, auth: bool = True) -> tuple[int, Any, http.client.HTTPMessage]:
        h = dict(headers or {})
        if auth and self.api_key is not None:
            h.setdefault("Authorization", f"Bearer {self.api_key}")
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            h.setdefault("Content-Type", "application/json")
        try:
            self.conn.request(method, path, body=data, headers=h)
            resp = self.conn.getresponse()
        except (http.client.HTTPException, OSError):
            self.conn.close()
            self.conn = http.client.HTTPSConnection(
                self.gw.host, self.gw.port, context=self.gw.context(), timeout=30
            )
            self.conn.request(method, path, body=data, headers=h)
            resp = self.conn.getresponse()
        payload = resp.read()
        ctype = resp.headers.get("content-type", "")
        value: Any = json.loads(payload) if payload and ctype.startswith("application/json") else payload
        return resp.status, value, resp.headers
