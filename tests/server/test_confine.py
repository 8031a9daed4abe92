"""The gateway's confinement decisions (the kernel enforcement itself is checked on real processes
in tests/e2e/test_e2e_privsep.py)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from qpher_proxy.config import load_config
from qpher_proxy.errors import ConfigError
from qpher_proxy.server import confine
from qpher_proxy.server.confine import Confinement, gateway_grants, protected_paths


def _config(tmp_path: Path, extra: str = "") -> Path:
    for sub in ("certs", "policies", "secrets", "data", "audit", "kms", "kek"):
        (tmp_path / sub).mkdir()
    for f in ("certs/server.crt", "certs/server.key", "secrets/pepper", "kek/kek.b64"):
        (tmp_path / f).write_text("x")
    cfg = tmp_path / "config.yaml"
    cfg.write_text("server: {user: null}\nkms: {user: null, kek: {file: kek/kek.b64}}\n"
                   "auth: {db: data/gateway.db}\n" + extra)
    return cfg


def test_the_allow_list_names_the_gateways_files_and_never_the_kms_ones(tmp_path: Path) -> None:
    cfg = load_config(_config(tmp_path))
    grants = {g.path for g in gateway_grants(cfg)}
    assert {str(tmp_path / p) for p in ("certs/server.crt", "certs/server.key", "policies", "secrets/pepper",
                                        "data", "audit")} <= grants
    assert not {p for p in grants if p.startswith((str(tmp_path / "kms"), str(tmp_path / "kek")))}
    assert str(tmp_path) not in grants and str(tmp_path / "certs") not in grants  # files, not their folder
    assert protected_paths(cfg) == [str(tmp_path / "kms"), str(tmp_path / "kek" / "kek.b64")]


def test_an_import_root_that_holds_the_state_is_left_out_not_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config(_config(tmp_path))
    monkeypatch.setattr("sys.path", [str(tmp_path.parent), *__import__("sys").path])
    assert str(tmp_path.parent) not in {g.path for g in gateway_grants(cfg)}


def test_a_policy_dir_holding_the_kek_is_refused(tmp_path: Path) -> None:
    cfg = load_config(_config(tmp_path, "policy: {dir: kek}\n"))
    with pytest.raises(
        ConfigError, match=r"cannot confine the gateway: .*/kek would give it access to .*kek\.b64"
    ):
        gateway_grants(cfg)


def test_without_landlock_auto_warns_once_and_required_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = load_config(_config(tmp_path))
    monkeypatch.setattr(confine, "landlock_abi", lambda: 0)
    with caplog.at_level(logging.WARNING, logger="qpher.server"):
        Confinement(None, "auto").apply(cfg)  # no restriction is applied: the kernel has none
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "by convention only" in warnings[0]
    with pytest.raises(ConfigError, match="server.sandbox: required, but this kernel offers no Landlock"):
        Confinement(None, "required").apply(cfg)


def test_sandbox_off_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = load_config(_config(tmp_path))
    monkeypatch.setattr(confine, "landlock_restrict", lambda grants: pytest.fail("off must not restrict"))
    with caplog.at_level(logging.WARNING, logger="qpher.server"):
        Confinement(None, "off").apply(cfg)
    assert any("not confined by Landlock" in r.getMessage() for r in caplog.records)


def test_init_in_a_private_directory_keeps_one_user_and_says_so(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("init chooses users only when run as root")
    import io

    import yaml

    from qpher_proxy.init import init_state

    out = io.StringIO()
    os.chmod(tmp_path, 0o700)
    init_state(tmp_path / "state", port=0, out=out)
    assert "Landlock alone" in out.getvalue()
    cfg = yaml.safe_load((tmp_path / "state" / "config.yaml").read_text())
    assert cfg["server"]["user"] is None and cfg["kms"]["user"] is None
