"""Privilege separation, checked on real processes: the gateway process can read no key material.

Two ways the gateway is kept from the KMS's files, both exercised here (the suite runs as
root, and Landlock confines root too):

* started as root in a directory other users can reach, ``init`` creates the system users and
  the gateway runs as ``qpher``, the KMS workers as ``qpher-kms``: the gateway's uid cannot
  open the KEK, the key store or the CA key;
* started anywhere else (here: pytest's private tmp directory), every process keeps its uid and
  the gateway confines itself with Landlock: the kernel refuses it those same files.

And with ``kms.kek.provider: env``, the KEK is nowhere in the gateway process: not in its
environment, its descriptors or its readable memory.
"""

from __future__ import annotations

import base64
import os
import pwd
import re
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from qpher_proxy.config import load_config
from qpher_proxy.errors import ConfigError
from qpher_proxy.sandbox import READ, Grant, landlock_abi, landlock_restrict, plan_grants
from qpher_proxy.server.confine import gateway_grants

from ._gateway import Gateway, cli, gateway_pids, init_state, kms_worker_pids, start_gateway

pytestmark = [
    pytest.mark.skipif(
        os.geteuid() != 0, reason="needs root: it checks the uid drop and creates system users"
    ),
    pytest.mark.skipif(landlock_abi() <= 0, reason="this kernel offers no Landlock"),
]


def _uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


def _status_field(pid: int, name: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {name} line")


def _in_child(fn: object) -> int:
    """Run ``fn()`` in a forked child; returns its exit code (``fn`` returns it)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 99
        try:
            code = fn()  # type: ignore[operator]
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _key_material(d: Path) -> list[Path]:
    files = [d / "kek" / "kek.b64", d / "ca" / "ca.key"]
    files += [p for p in (d / "kms").rglob("*") if p.is_file()]
    return files


def _denied_all(paths: list[Path]) -> int:
    """Exit code 0 when every path raises PermissionError on open, else the index + 1 of the first
    that opened (or failed otherwise)."""
    for i, p in enumerate(paths):
        try:
            with open(p, "rb"):
                pass
        except PermissionError:
            continue
        except OSError:
            return 100 + i
        return 1 + i
    return 0


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A state directory other users can reach (pytest's own tmp directories are root-only)."""
    base = Path(tempfile.mkdtemp(prefix="qpher-privsep-", dir="/tmp"))
    os.chmod(base, 0o755)
    try:
        yield base / "state"
    finally:
        shutil.rmtree(base, ignore_errors=True)


# ---- separate users (started as root) -------------------------------------------------------

def test_init_as_root_creates_users_and_gives_each_process_only_its_files(shared_dir: Path) -> None:
    out = cli("init", "--dir", str(shared_dir), "--port", "0").stdout
    assert "the gateway runs as 'qpher', the KMS workers as 'qpher-kms'" in out
    gw, kms = pwd.getpwnam("qpher"), pwd.getpwnam("qpher-kms")
    owner = {p: (shared_dir / p).stat() for p in ("kek", "kms", "ca", "certs", "secrets", "data", "audit")}
    assert {p: (s.st_uid, s.st_mode & 0o777) for p, s in owner.items()} == {
        "kek": (kms.pw_uid, 0o700), "kms": (kms.pw_uid, 0o700), "ca": (0, 0o700), "certs": (gw.pw_uid, 0o700),
        "secrets": (gw.pw_uid, 0o700), "data": (gw.pw_uid, 0o700), "audit": (gw.pw_uid, 0o700),
    }
    assert (shared_dir / "kek" / "kek.b64").stat().st_mode & 0o777 == 0o600
    assert (shared_dir / "ca" / "ca.key").stat().st_mode & 0o777 == 0o600
    assert not (shared_dir / "certs" / "ca.key").exists()
    cfg = yaml.safe_load((shared_dir / "config.yaml").read_text())
    assert cfg["server"]["user"] == "qpher" and cfg["kms"]["user"] == "qpher-kms"
    # re-running keeps every key and the ownership
    kek = (shared_dir / "kek" / "kek.b64").read_bytes()
    cli("init", "--dir", str(shared_dir), "--port", "0")
    assert (shared_dir / "kek" / "kek.b64").read_bytes() == kek
    assert (shared_dir / "kms").stat().st_uid == kms.pw_uid


def test_gateway_uid_cannot_open_key_material(shared_dir: Path) -> None:
    init_state(shared_dir, **{"crypto.backend": "openssl"})
    gw = start_gateway(shared_dir)
    try:
        c = gw.client()
        status, key, _ = c.call("POST", "/v1/keys", {"algorithm": "ml-dsa-65"})
        assert status == 201
        status, sig, _ = c.call("POST", "/v1/sign", {"key_id": key["key_id"], "message": "aGk="})
        assert status == 200 and sig["signature"]
        c.close()
        [gw_pid] = gateway_pids(gw.proc.pid)
        workers = kms_worker_pids(gw.proc.pid)
        assert workers
        qpher, qpher_kms = pwd.getpwnam("qpher"), pwd.getpwnam("qpher-kms")
        assert _uid_of(gw_pid) == qpher.pw_uid
        assert {_uid_of(p) for p in workers} == {qpher_kms.pw_uid}
        assert _uid_of(gw.proc.pid) == 0  # the supervisor, which serves no traffic
        assert _status_field(gw_pid, "NoNewPrivs") == "1"  # set with its Landlock domain
        assert _status_field(gw_pid, "CapEff") == "0000000000000000"
        for pid in workers:  # a worker keeps CAP_IPC_LOCK alone, to keep its keys out of swap
            assert _status_field(pid, "CapEff") == _status_field(pid, "CapPrm") == f"{1 << 14:016x}"
            assert _status_field(pid, "NoNewPrivs") == "1"
        assert any(r.get("msg") == "memory locked (mlockall)" for r in gw.read_logs())

        material = _key_material(shared_dir)
        assert any(p.parent.name == "kms" for p in material), "the key store wrote no file"
        # nor through /proc: the supervisor's environment, a worker's memory
        material += [Path(f"/proc/{gw.proc.pid}/environ"), Path(f"/proc/{workers[0]}/mem"),
                     Path(f"/proc/{workers[0]}/environ")]

        def as_gateway_uid() -> int:
            os.setgroups([])
            os.setgid(qpher.pw_gid)
            os.setuid(qpher.pw_uid)
            denied = _denied_all(material)
            if denied:
                return denied
            with open(shared_dir / "certs" / "server.crt", "rb"):  # and what it needs, it can read
                pass
            return 0

        assert _in_child(as_gateway_uid) == 0
    finally:
        assert gw.stop() == 0


def test_missing_user_is_a_one_line_error(tmp_path: Path) -> None:
    d = tmp_path / "state"
    init_state(d, **{"server.user": "no-such-qpher-user"})
    proc = cli("serve", "--config", str(d / "config.yaml"), check=False, timeout=60)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if not ln.startswith("{")]
    assert lines == [
        "qpher-proxy: server.user: user 'no-such-qpher-user' does not exist (run `qpher-proxy init` "
        "as root to create it, or set server.user: null to keep this process's user)"
    ]


# ---- Landlock (same uid) --------------------------------------------------------------------

def test_landlock_rules_of_the_gateway_refuse_the_kms_files(tmp_path: Path) -> None:
    d = tmp_path / "state"
    init_state(d, **{"crypto.backend": "openssl"})
    gw = start_gateway(d)  # creates the key store files; the gateway stays root here
    try:
        c = gw.client()
        assert c.call("POST", "/v1/keys", {"algorithm": "ml-kem-768"})[0] == 201
        c.close()
        [gw_pid] = gateway_pids(gw.proc.pid)
        assert _uid_of(gw_pid) == 0 and _status_field(gw_pid, "NoNewPrivs") == "1"
        confined = [r for r in gw.read_logs() if r.get("msg") == "gateway confined by Landlock"]
        assert confined and confined[0]["protected"] == [str(d / "kms"), str(d / "kek" / "kek.b64")]
        material = _key_material(d)
        workers = kms_worker_pids(gw.proc.pid)
        # /proc is not on the allow-list, and Landlock forbids ptrace-class access to processes
        # outside the domain: no reading the supervisor's environment or a worker's memory
        material += [Path(f"/proc/{gw.proc.pid}/environ"), Path(f"/proc/{workers[0]}/mem")]
        grants = gateway_grants(load_config(d / "config.yaml"))

        def confined_root() -> int:
            landlock_restrict(grants)  # exactly the rules the gateway process applies to itself
            denied = _denied_all(material)
            if denied:
                return denied
            for needed in (
                d / "certs" / "server.key",
                d / "policies" / "00-plans.yaml",
                d / "secrets" / "pepper",
            ):
                with open(needed, "rb"):
                    pass
            with open(d / "audit" / "probe", "wb"):  # and it may write where the audit log lives
                pass
            return 0

        assert _in_child(confined_root) == 0
    finally:
        assert gw.stop() == 0


def test_a_policy_symlink_to_the_kek_is_unreadable_by_the_live_gateway(tmp_path: Path) -> None:
    # The real gateway process follows a symlink an attacker planted in the policy directory
    # to the KEK file: Landlock checks the file it lands on, so the read fails, and the policy
    # load reports it without a byte of the KEK.
    d = tmp_path / "state"
    init_state(d, **{"crypto.backend": "openssl", "policy.reload_interval": 0.2})
    gw = start_gateway(d)
    try:
        (d / "policies" / "50-evil.yaml").symlink_to(d / "kek" / "kek.b64")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            text = gw.raw_log_text()
            if "50-evil.yaml" in text:
                break
            time.sleep(0.1)
        text = gw.raw_log_text()
        assert "50-evil.yaml" in text and re.search(r"[Pp]ermission denied|EACCES|Errno 13", text), text[
            -2000:
        ]
        kek_text = (d / "kek" / "kek.b64").read_text().strip()
        assert kek_text not in text
    finally:
        assert gw.stop() == 0


def test_a_gateway_directory_that_holds_the_kms_dir_stops_startup(tmp_path: Path) -> None:
    # auth.db beside kms/ would mean granting the gateway the whole state directory.
    d = tmp_path / "state"
    init_state(d, **{"auth.db": "gateway.db"})
    proc = cli("serve", "--config", str(d / "config.yaml"), check=False, timeout=60)
    assert proc.returncode == 2
    assert f"qpher-proxy: cannot confine the gateway: {d} would give it access to {d / 'kms'}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_plan_grants_refuses_overlap_either_way(tmp_path: Path) -> None:
    (tmp_path / "kms" / "sub").mkdir(parents=True)
    with pytest.raises(ConfigError, match="would give it access to"):
        plan_grants([Grant(str(tmp_path), READ)], [str(tmp_path / "kms")])
    with pytest.raises(ConfigError, match="would give it access to"):
        plan_grants([Grant(str(tmp_path / "kms" / "sub"), READ)], [str(tmp_path / "kms")])
    assert plan_grants([Grant(str(tmp_path / "missing"), READ)], []) == []


# ---- the KEK from the environment ------------------------------------------------------------

def _readable_memory(pid: int) -> Iterator[bytes]:
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            fields = line.split()
            if "r" not in fields[1] or (len(fields) > 5 and fields[5] in ("[vvar]", "[vsyscall]")):
                continue
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            try:
                mem.seek(lo)
                yield mem.read(hi - lo)
            except (OSError, ValueError, OverflowError):
                continue


def test_env_kek_never_reaches_the_gateway_process(tmp_path: Path) -> None:
    d = tmp_path / "state"
    init_state(d, **{"crypto.backend": "openssl", "kms.kek.provider": "env", "kms.restart_backoff_max": 0.5})
    kek_text = (d / "kek" / "kek.b64").read_text().strip()
    kek_raw = base64.b64decode(kek_text)
    env = {**os.environ, "QPHER_KEK": kek_text}
    gw = start_gateway(d, env=env)
    try:
        c = gw.client()
        status, key, _ = c.call("POST", "/v1/keys", {"algorithm": "ml-dsa-65"})
        assert status == 201
        assert c.call("POST", "/v1/sign", {"key_id": key["key_id"], "message": "aGk="})[0] == 200
        [gw_pid] = gateway_pids(gw.proc.pid)

        environ = Path(f"/proc/{gw_pid}/environ").read_bytes()
        assert b"QPHER_KEK" not in environ and kek_text.encode() not in environ
        links = [os.readlink(f"/proc/{gw_pid}/fd/{fd}") for fd in os.listdir(f"/proc/{gw_pid}/fd")]
        forbidden = (str(d / "kek"), str(d / "kms"), "memfd:")
        assert not [ln for ln in links if ln.startswith(forbidden)], links
        assert "socket:" in " ".join(links)  # (the listing is real: its sockets are there)
        for region in _readable_memory(gw_pid):
            assert kek_raw not in region and kek_text.encode() not in region
        # nor in the supervisor's environment: it re-executed itself without the variable
        sup_environ = Path(f"/proc/{gw.proc.pid}/environ").read_bytes()
        assert b"QPHER_KEK" not in sup_environ and kek_text.encode() not in sup_environ
        # the scan does find the KEK where it must be: in a KMS worker
        assert any(kek_raw in region for region in _readable_memory(kms_worker_pids(gw.proc.pid)[0]))

        # a KMS worker killed now is restarted with the KEK the supervisor kept
        for pid in kms_worker_pids(gw.proc.pid):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            status, body, _ = c.call("POST", "/v1/sign", {"key_id": key["key_id"], "message": "aGk="})
            if status == 200:
                break
            assert status == 503 and body["error"]["code"] == "kms_unavailable"
            time.sleep(0.05)
        else:
            pytest.fail("the KMS did not come back within 20 s")
        c.close()
    finally:
        assert gw.stop() == 0


# ---- supervision ---------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if Path(f"/proc/{p}").exists() and _status_field(p, "State")[0] != "Z"]
        time.sleep(0.05)
    return alive


def test_a_killed_gateway_is_restarted_and_keys_survive(tmp_path: Path) -> None:
    d = tmp_path / "state"
    port = _free_port()
    init_state(d, **{"crypto.backend": "openssl", "server.listen": [f"127.0.0.1:{port}"]})
    gw = start_gateway(d)
    try:
        c = gw.client()
        status, key, _ = c.call("POST", "/v1/keys", {"algorithm": "ml-dsa-65"})
        assert status == 201
        c.close()
        [first] = gateway_pids(gw.proc.pid)
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pids = gateway_pids(gw.proc.pid)
            if pids and pids != [first] and any(r.get("msg") == "serving" for r in gw.read_logs()[-20:]):
                break
            time.sleep(0.1)
        c = gw.client()
        status, sig, _ = _retry(
            lambda: c.call("POST", "/v1/sign", {"key_id": key["key_id"], "message": "aGk="})
        )
        assert status == 200 and sig["signature"]
        c.close()
        assert any(r.get("msg") == "the gateway process exited; restarting it" for r in gw.log_lines)
    finally:
        assert gw.stop() == 0


def _retry(call: object, seconds: float = 20) -> tuple[int, object, object]:
    deadline = time.monotonic() + seconds
    while True:
        try:
            result = call()  # type: ignore[operator]
        except OSError:
            result = (0, None, None)
        if result[0] == 200 or time.monotonic() > deadline:
            return result  # type: ignore[no-any-return]
        time.sleep(0.1)


def test_a_killed_supervisor_takes_gateway_and_workers_down(tmp_path: Path) -> None:
    d = tmp_path / "state"
    init_state(d, **{"crypto.backend": "openssl"})
    gw = start_gateway(d)
    children = gateway_pids(gw.proc.pid) + kms_worker_pids(gw.proc.pid)
    assert len(children) >= 2
    gw.proc.kill()
    gw.proc.wait()
    assert _wait_gone(children, 20) == []


def test_sighup_to_the_supervisor_reaches_the_gateway(tmp_path: Path, gateway_state: None = None) -> None:
    d = tmp_path / "state"
    init_state(d, **{"crypto.backend": "openssl"})
    gw = start_gateway(d)
    try:
        gw.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if any(r.get("msg") == "TLS certificates reloaded" for r in gw.read_logs()):
                break
            time.sleep(0.05)
        else:
            pytest.fail("SIGHUP did not reach the gateway")
    finally:
        assert gw.stop() == 0


def test_renew_certs_issues_a_new_server_certificate_from_the_same_ca(tmp_path: Path) -> None:
    d = tmp_path / "state"
    cli("init", "--dir", str(d), "--port", "0")
    ca, crt, key = ((d / "certs" / n).read_bytes() for n in ("ca.crt", "server.crt", "server.key"))
    out = cli("init", "--dir", str(d), "--port", "0", "--renew-certs").stdout
    assert f"created {d / 'certs' / 'server.crt'}" in out
    assert (d / "certs" / "ca.crt").read_bytes() == ca and (d / "certs" / "server.key").read_bytes() == key
    assert (d / "certs" / "server.crt").read_bytes() != crt
    assert sorted(p.name for p in (d / "certs").iterdir()) == ["ca.crt", "server.crt", "server.key"]


def test_gateway_process_is_not_left_with_the_supervisor_environment_kek(tmp_path: Path) -> None:
    # provider: file -- a stray QPHER_KEK in the caller's environment is not passed on either
    d = tmp_path / "state"
    init_state(d, **{"crypto.backend": "openssl"})
    gw = start_gateway(d, env={**os.environ, "QPHER_KEK": "c3RyYXk="})
    try:
        [gw_pid] = gateway_pids(gw.proc.pid)
        assert b"QPHER_KEK" not in Path(f"/proc/{gw_pid}/environ").read_bytes()
    finally:
        assert gw.stop() == 0


_ = Gateway


def test_rotate_kek_as_root_writes_files_the_kms_user_owns(shared_dir: Path) -> None:
    cfg = init_state(shared_dir, **{"crypto.backend": "openssl"})
    gw = start_gateway(shared_dir)
    try:
        c = gw.client()
        status, key, _ = c.call("POST", "/v1/keys", {"algorithm": "ml-dsa-65"})
        assert status == 201
        c.close()
    finally:
        assert gw.stop() == 0
    new_kek = shared_dir / "kek" / "kek-2.b64"
    assert (
        "KEK rotated"
        in cli("kms", "rotate-kek", "-c", str(cfg), "--new-kek-file", str(new_kek), "--generate").stdout
    )
    kms_uid = pwd.getpwnam("qpher-kms").pw_uid
    written = [new_kek, *(p for p in (shared_dir / "kms").rglob("*") if p.is_file())]
    assert {p.stat().st_uid for p in written} == {kms_uid}
    cfg.write_text(cfg.read_text().replace("kek/kek.b64", "kek/kek-2.b64"))
    gw = start_gateway(shared_dir)
    try:
        c = gw.client()
        assert c.call("POST", "/v1/sign", {"key_id": key["key_id"], "message": "aGk="})[0] == 200
        c.close()
    finally:
        assert gw.stop() == 0
