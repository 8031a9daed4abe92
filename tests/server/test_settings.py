"""The one conversion from config sections to each subsystem's settings: paths arrive as the
types the subsystem declares, and every field comes from its section."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qpher_proxy.config import config_from_dict
from qpher_proxy.kms.wire.model import KEKSettings
from qpher_proxy.server.settings import (
    http_limits,
    kek_settings,
    kms_supervisor,
    kms_worker_count,
    tls_settings,
    upstream_client,
)

_CONFIG = {
    "tls": {"mldsa_cert_file": "certs/mldsa.crt", "mldsa_key_file": "certs/mldsa.key",
            "client_auth": "optional", "client_ca": "certs/clients.crt", "min_version": "1.3"},
    "http": {"max_header_bytes": 8192, "idle_timeout": 7.5},
    "limits": {"max_connections": 123},
    "kms": {"workers": 3, "kek": {"provider": "env", "env": "OTHER_KEK"}},
    "api": {"max_batch_items": 7},
}


def test_tls_paths_arrive_as_paths_resolved_against_the_config_directory(tmp_path: Path) -> None:
    cfg = config_from_dict(_CONFIG, tmp_path, check_files=False)
    tls = tls_settings(cfg.tls)
    assert tls.cert_file == tmp_path / "certs" / "server.crt"
    assert tls.mldsa_key_file == tmp_path / "certs" / "mldsa.key"
    assert tls.client_ca == tmp_path / "certs" / "clients.crt"
    paths = (tls.cert_file, tls.key_file, tls.mldsa_cert_file, tls.mldsa_key_file, tls.client_ca)
    assert all(type(p) is type(tmp_path) for p in paths)
    assert (tls.min_version, tls.client_auth) == ("1.3", "optional")


def test_unset_optional_tls_paths_stay_none(tmp_path: Path) -> None:
    tls = tls_settings(config_from_dict({}, tmp_path, check_files=False).tls)
    assert (tls.mldsa_cert_file, tls.mldsa_key_file, tls.client_ca) == (None, None, None)


def test_http_limits_take_the_connection_cap_from_limits(tmp_path: Path) -> None:
    limits = http_limits(config_from_dict(_CONFIG, tmp_path, check_files=False))
    assert (limits.max_header_bytes, limits.idle_timeout, limits.max_connections) == (8192, 7.5, 123)


def test_kek_settings_name_the_source_only(tmp_path: Path) -> None:
    cfg = config_from_dict(_CONFIG, tmp_path, check_files=False)
    assert kek_settings(cfg.kms.kek) == KEKSettings(provider="env", file=cfg.kms.kek.file, env="OTHER_KEK")


def test_kms_supervisor_follows_the_kms_section(tmp_path: Path) -> None:
    cfg = config_from_dict(_CONFIG, tmp_path, check_files=False)
    supervisor = kms_supervisor(cfg)
    assert supervisor.kms_dir == os.path.abspath(tmp_path / "kms")
    assert (supervisor.workers, supervisor.max_batch, supervisor.backend) == (3, 7, cfg.crypto.backend)
    assert supervisor.kek == kek_settings(cfg.kms.kek)


def test_kms_workers_0_shares_the_spare_cores_out_among_the_gateways(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    one = config_from_dict({}, tmp_path, check_files=False)
    assert kms_worker_count(one) == 7  # one gateway: default_worker_count()
    four = config_from_dict({"server": {"workers": 4}}, tmp_path, check_files=False)
    assert kms_worker_count(four) == 1  # (8 cores - 4 gateways) // 4
    many = config_from_dict({"server": {"workers": 16}}, tmp_path, check_files=False)
    assert kms_worker_count(many) == 1  # at least one each
    fixed = config_from_dict({"server": {"workers": 4}, "kms": {"workers": 3}}, tmp_path, check_files=False)
    assert kms_worker_count(fixed) == 3  # per gateway process, as configured


def test_no_upstream_url_means_no_upstream_client(tmp_path: Path) -> None:
    assert upstream_client(config_from_dict({}, tmp_path, check_files=False).upstream) is None


def test_http2_offers_h2_first_in_alpn_unless_disabled(tmp_path: Path) -> None:
    from qpher_proxy.server.settings import http2_limits

    on = config_from_dict({}, tmp_path, check_files=False)
    assert tls_settings(on.tls, on.http2).alpn == ("h2", "http/1.1")
    assert tls_settings(on.tls).alpn == ("http/1.1",)
    limits = http2_limits(on)
    assert limits is not None and limits.max_concurrent_streams == 100
    off = config_from_dict({"http2": {"enabled": False}}, tmp_path, check_files=False)
    assert tls_settings(off.tls, off.http2).alpn == ("http/1.1",) and http2_limits(off) is None
