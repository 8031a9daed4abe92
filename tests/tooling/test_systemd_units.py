"""The systemd units of deploy/systemd/: they verify, their exposure stays low, they agree with
the example configs, and MemoryDenyWriteExecute= is set exactly when a real gateway survives it.

systemd is not running here (nor in CI containers), so nothing starts the units themselves:
``systemd-analyze verify`` and ``security --offline`` read them inside a temporary root laid out
as an installation would be (the units in /etc/systemd/system, the system's own units, /bin/kill,
and an executable at /opt/qpher-proxy/bin/qpher-proxy standing in for the venv's entry point),
because verify refuses a unit whose ExecStart= or ExecReload= binary does not exist."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from e2e._gateway import cli, init_state, start_gateway

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
GATEWAY_UNIT = "qpher-proxy.service"
NODE_UNIT = "qpher-kms-node.service"
# unit -> (its example config, where ExecStart= expects it)
CONFIGS = {GATEWAY_UNIT: ("config.yaml", "/etc/qpher-proxy/config.yaml"),
           NODE_UNIT: ("kms.yaml", "/etc/qpher-proxy/kms.yaml")}
# Measured with systemd 252: 1.5 for the gateway, 1.2 for the node. The margin is for other
# systemd versions, which weigh some settings differently; above 2.0 something was dropped.
MAX_EXPOSURE = 2.0


def _systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        reason = "systemd-analyze is not installed (apt-get install systemd)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}: CI must check the units")
        pytest.skip(reason)
    return path


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections -> keys -> every value in order (keys such as LoadCredential= repeat, which
    configparser refuses)."""
    out: dict[str, dict[str, list[str]]] = {}
    section: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = out.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        section.setdefault(key.strip(), []).append(value.strip())
    return out


def one(unit: dict[str, dict[str, list[str]]], key: str) -> str:
    values = unit["Service"].get(key, [])
    assert len(values) == 1, f"{key}= should be set exactly once, got {values}"
    return values[0]


@pytest.fixture(scope="module")
def unit_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("root")
    (root / "etc/systemd/system").mkdir(parents=True)
    for unit in (GATEWAY_UNIT, NODE_UNIT):
        shutil.copy(DEPLOY / unit, root / "etc/systemd/system" / unit)
    # The targets every service is ordered against (sysinit.target, network-online.target, ...).
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "usr/bin").mkdir(parents=True, exist_ok=True)
    (root / "bin").symlink_to("usr/bin")
    kill = shutil.which("kill", path="/usr/bin:/bin")
    assert kill is not None
    shutil.copy(kill, root / "usr/bin/kill")
    stand_in = root / "opt/qpher-proxy/bin/qpher-proxy"
    stand_in.parent.mkdir(parents=True)
    stand_in.write_text("#!/bin/sh\nexit 0\n")
    stand_in.chmod(0o755)
    return root


@pytest.mark.parametrize("unit", [GATEWAY_UNIT, NODE_UNIT])
def test_systemd_analyze_verify_passes(unit_root: Path, unit: str) -> None:
    proc = subprocess.run(
        [_systemd_analyze(), "verify", f"--root={unit_root}", "--man=no", "--generators=no",
         f"/etc/systemd/system/{unit}"],
        capture_output=True, text=True, timeout=30,
    )
    # verify exits 0 on an unknown key or an unparsable value (it only says "ignoring"), so
    # any output at all is a failure too.
    assert proc.returncode == 0 and not (proc.stdout + proc.stderr).strip(), proc.stdout + proc.stderr


@pytest.mark.parametrize("unit", [GATEWAY_UNIT, NODE_UNIT])
def test_systemd_analyze_security_exposure(unit_root: Path, unit: str) -> None:
    proc = subprocess.run(
        [_systemd_analyze(), "security", "--offline=yes", f"--root={unit_root}", "--no-pager",
         f"/etc/systemd/system/{unit}"],
        capture_output=True, text=True, timeout=30,
    )
    if "--offline" in proc.stderr and "unrecognized" in proc.stderr:
        pytest.skip("this systemd-analyze has no --offline (systemd < 250)")
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", proc.stdout)
    assert found, proc.stdout + proc.stderr
    exposure = float(found.group(1))
    assert exposure <= MAX_EXPOSURE, (
        f"{unit}: exposure {exposure} {found.group(2)} > {MAX_EXPOSURE}:\n"
        + "\n".join(line for line in proc.stdout.splitlines() if "✗" in line)
    )


@pytest.mark.parametrize("unit", [GATEWAY_UNIT, NODE_UNIT])
def test_example_config_passes_check_config(unit: str) -> None:
    cli("check-config", "--no-files", "-c", str(DEPLOY / CONFIGS[unit][0]))


@pytest.mark.parametrize("unit", [GATEWAY_UNIT, NODE_UNIT])
def test_unit_and_config_agree(unit: str) -> None:
    u = parse_unit(DEPLOY / unit)
    config_name, installed_at = CONFIGS[unit]
    cfg = yaml.safe_load((DEPLOY / config_name).read_text())

    argv = shlex.split(one(u, "ExecStart"))
    assert argv[0] == "/opt/qpher-proxy/bin/qpher-proxy"
    assert argv[-1] == installed_at and argv[-2] in ("--config", "-c")
    assert shlex.split(one(u, "ExecReload")) == ["/bin/kill", "-HUP", "$MAINPID"]

    # SIGTERM to the supervisor alone, which drains and then stops its workers; systemd's
    # SIGKILL must come only after the drain could have finished.
    assert one(u, "KillMode") == "mixed"
    assert one(u, "KillSignal") == "SIGTERM"
    grace = float(cfg["server"]["shutdown_grace"])
    assert float(one(u, "TimeoutStopSec")) >= grace + 10

    # An unprivileged user and nothing to switch to: the config must not name users.
    assert one(u, "DynamicUser") == "yes"
    assert cfg["server"]["user"] is None and cfg["kms"]["user"] is None
    assert one(u, "NoNewPrivileges") == "yes"
    assert one(u, "ProtectSystem") == "strict"

    # Every credential the config reads is one the unit loads, from a root-only source.
    creds = dict(v.split(":", 1) for v in u["Service"]["LoadCredential"])
    assert all(src.startswith("/etc/qpher-proxy/credentials/") for src in creds.values())
    cred_dir = f"/run/credentials/{unit}/"
    paths = [cfg["kms"]["kek"]["file"]]
    if unit == GATEWAY_UNIT:
        paths += [cfg["tls"]["key_file"], cfg["auth"]["pepper_file"]]
    else:
        paths += [cfg["kms_node"]["key_file"], cfg["kms_node"]["ecdsa_key_file"]]
    for path in paths:
        assert path.startswith(cred_dir) and path[len(cred_dir):] in creds, path

    if unit == GATEWAY_UNIT:
        # Binding 443 is the only privilege.
        assert one(u, "CapabilityBoundingSet") == "CAP_NET_BIND_SERVICE"
        assert one(u, "AmbientCapabilities") == "CAP_NET_BIND_SERVICE"
        assert cfg["server"]["listen"] == ["0.0.0.0:443"]
        # Same uid as the KMS workers: Landlock is the separation, so it must not be optional,
        # and seccomp must let its system calls through (@system-service lacks them on 252).
        assert cfg["server"]["sandbox"] == "required"
        allowed = " ".join(u["Service"]["SystemCallFilter"]).split()
        assert {"landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self"} <= set(allowed)
        state = f"/var/lib/{one(u, 'StateDirectory')}/"
        assert cfg["kms"]["dir"].startswith(state) and cfg["auth"]["db"].startswith(state)
        assert cfg["audit"]["file"].startswith(f"/var/log/{one(u, 'LogsDirectory')}/")
    else:
        assert one(u, "CapabilityBoundingSet") == "" and one(u, "AmbientCapabilities") == ""
        assert cfg["kms"]["dir"].startswith(f"/var/lib/{one(u, 'StateDirectory')}/")


# ---- MemoryDenyWriteExecute ------------------------------------------------------------------

PR_SET_MDWE, PR_GET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 66, 1
# systemd applies MemoryDenyWriteExecute= before the exec with a seccomp filter; the kernel's own
# MDWE (prctl, Linux 6.3+) refuses the same thing (a mapping both writable and executable, or made
# executable later) and, unlike seccomp, is inherited by every process the supervisor starts.
# This sitecustomize turns it on in each Python process of the proxy (PYTHONPATH reaches them all:
# the supervisor starts its children with its environment), before any module of the proxy is
# imported, and records whether the process already had it from its parent.
SITECUSTOMIZE = f"""\
import ctypes, os
_libc = ctypes.CDLL(None, use_errno=True)
_before = _libc.prctl({PR_GET_MDWE}, 0, 0, 0, 0)
_set = _libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0)
with open(os.environ["QPHER_TEST_MDWE_REPORT"], "a") as _f:
    _f.write(f"{{os.getpid()}} {{_before}} {{_set}} {{_libc.prctl({PR_GET_MDWE}, 0, 0, 0, 0)}}\\n")
"""


def _mdwe_env(tmp_path: Path) -> tuple[dict[str, str], Path]:
    site = tmp_path / "mdwe-site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    report = tmp_path / "mdwe-report"
    pythonpath = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=pythonpath, QPHER_TEST_MDWE_REPORT=str(report))
    return env, report


def test_mdwe_is_enforced_by_the_launcher(tmp_path: Path) -> None:
    """The control: under the launcher a W+X mapping is refused, else the test below proves nothing."""
    env, report = _mdwe_env(tmp_path)
    probe = ("import mmap\ntry:\n"
             "    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
             "except PermissionError:\n    print('refused')\nelse:\n    print('allowed')\n")
    proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=30)
    _pid, _before, set_result, _after = report.read_text().split()
    if set_result != "0":
        pytest.skip("this kernel has no PR_SET_MDWE (Linux < 6.3)")
    assert proc.stdout.strip() == "refused", proc.stdout + proc.stderr


def test_mdwe_matches_the_unit(tmp_path: Path) -> None:
    """A real ``qpher-proxy serve`` under MDWE: with MemoryDenyWriteExecute=yes in the unit it must
    serve a signed request over real TLS; without it, it must still fail the way the unit's
    comment says (so the comment is true, and this fails the day MDWE can be turned on)."""
    unit_says_mdwe = parse_unit(DEPLOY / GATEWAY_UNIT)["Service"].get("MemoryDenyWriteExecute") == ["yes"]
    directory = tmp_path / "state"
    init_state(directory, **{"crypto.backend": "openssl"})
    env, report = _mdwe_env(tmp_path)
    try:
        gw = start_gateway(directory, env=env)
    except AssertionError as exc:
        started, failure = False, str(exc)
    else:
        started, failure = True, ""
    # Every process the supervisor started had MDWE before it could set it itself: inherited.
    rows = [line.split() for line in report.read_text().splitlines()]
    assert len(rows) >= 3, rows  # supervisor, at least one KMS worker, the gateway
    assert all(r[3] == "1" for r in rows), rows
    assert all(r[1] == "1" for r in rows[1:]), rows

    if not started:
        assert "Cannot allocate write+execute memory for ffi.callback()" in failure, failure
        assert "set_alpn_select_callback" in failure, failure
        assert not unit_says_mdwe, f"the unit sets MemoryDenyWriteExecute=yes, yet: {failure}"
        return
    try:
        client = gw.client()
        status, key, _ = client.call("POST", "/v1/keys", {"algorithm": "ml-dsa-65"})
        assert status == 201, key
        message = "aGVsbG8="
        status, signed, _ = client.call("POST", "/v1/sign", {"key_id": key["key_id"], "message": message})
        assert status == 200, signed
        status, verified, _ = client.call("POST", "/v1/verify", {
            "key_id": key["key_id"], "message": message, "signature": signed["signature"]})
        assert status == 200 and verified["valid"] is True, verified
    finally:
        assert gw.stop() == 0
    assert unit_says_mdwe, ("a gateway now serves a signed request under MDWE: set "
                            "MemoryDenyWriteExecute=yes in deploy/systemd/*.service and drop the comment")
