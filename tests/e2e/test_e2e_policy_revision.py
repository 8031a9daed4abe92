"""The policy revision an admin sees: ``policy check``, ``policy explain``, ``/readyz`` and
``/v1/info`` name the same revision for the same files, however the directory is spelled and
wherever it lies, and a live gateway's revision follows a reload."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from ._gateway import Gateway, init_state, start_gateway

_REVISION = re.compile(r"revision ([0-9a-f]{12})\b")


def _revision_printed(*args: str, cwd: Path) -> str:
    proc = subprocess.run([sys.executable, "-m", "qpher_proxy", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=60)
    assert proc.returncode == 0, proc.stderr
    found = _REVISION.findall(proc.stdout)
    assert len(found) == 1, proc.stdout
    return str(found[0])


def _live(gw: Gateway) -> tuple[str, str]:
    c = gw.client()
    try:
        status, ready, _ = c.call("GET", "/readyz", auth=False)
        assert status == 200, ready
        status, info, _ = c.call("GET", "/v1/info")
        assert status == 200, info
    finally:
        c.close()
    return ready["policy"]["revision"], info["policy"]["revision"]


def test_check_explain_readyz_and_info_agree_on_the_revision_and_follow_a_reload(tmp_path: Path) -> None:
    d = tmp_path / "state"
    cfg = init_state(d, **{"crypto.backend": "openssl"})
    key_id = (d / "secrets" / "demo-api-key").read_text().split("_")[1]
    copy = tmp_path / "elsewhere" / "rules"
    shutil.copytree(d / "policies", copy)
    checked = {
        _revision_printed("policy", "check", "policies/", cwd=d),
        _revision_printed("policy", "check", "state/policies", cwd=tmp_path),
        _revision_printed("policy", "check", str(d / "policies"), cwd=Path("/")),
        _revision_printed("policy", "check", "../elsewhere/rules", cwd=d),
    }
    assert len(checked) == 1
    short = checked.pop()
    explain = (
        "policy",
        "explain",
        "-c",
        str(cfg),
        "--key-id",
        key_id,
        "--method",
        "GET",
        "--path",
        "/v1/info",
    )
    assert _revision_printed(*explain, cwd=tmp_path) == short
    assert _revision_printed(*explain, "--policy-dir", str(copy), cwd=tmp_path) == short

    gw = start_gateway(d)
    try:
        ready, info = _live(gw)
        assert ready == info and ready.startswith(short) and len(ready) == 64
        # An edited file is a new revision once the gateway has reloaded it, and not before.
        with open(d / "policies" / sorted(p.name for p in (d / "policies").glob("*.yaml"))[0], "a") as f:
            f.write("# reviewed\n")
        edited = _revision_printed("policy", "check", "policies", cwd=d)
        assert edited != short
        gw.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while (live := _live(gw))[0] == ready:
            assert time.monotonic() < deadline, "the edited policy was not reloaded"
            time.sleep(0.05)
        assert live[0] == live[1] and live[0].startswith(edited)
    finally:
        assert gw.stop() == 0
