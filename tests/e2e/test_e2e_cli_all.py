"""Every command and output form of ``qpher-proxy``, run as a user runs it: a subprocess
(``python -m qpher_proxy``) against one live gateway shared by the module.

``test_e2e_cli.py`` has the rest: policy check of a broken directory, explain by key id, audit
verify of a tampered log, and ``kms rotate-kek`` followed by a restart with the new KEK.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from qpher_proxy.cli import BENCHMARKS, build_parser

from ._gateway import Gateway, cli, init_state, start_gateway

REPO = Path(__file__).resolve().parents[2]
ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    directory = tmp_path_factory.mktemp("cli") / "state"
    init_state(directory, **{"crypto.backend": "openssl"})
    gw = start_gateway(directory)
    try:
        yield gw
    finally:
        assert gw.stop() == 0, "serve did not exit 0 on SIGTERM"


@pytest.fixture(scope="module")
def config(gw: Gateway) -> str:
    return str(gw.directory / "config.yaml")


def _create(config: str, *args: str) -> tuple[str, str]:
    """``apikey create``: (key id, the whole key)."""
    proc = cli("apikey", "create", "-c", config, *args)
    key = proc.stdout.strip()
    assert re.fullmatch(r"qph_[a-z0-9]{12}_[A-Za-z0-9]{43}", key), "stdout holds the key and nothing else"
    assert key not in proc.stderr
    return key.split("_")[1], key


def _one_error_line(proc: subprocess.CompletedProcess[str], code: int) -> str:
    assert proc.returncode == code, proc
    err = proc.stderr
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("qpher-proxy: "), err
    return err.strip()


# ---- init, serve, version, check-config ---------------------------------------------------------

def test_init_makes_a_state_and_a_second_run_keeps_every_key(tmp_path: Path) -> None:
    d = tmp_path / "state"
    first = cli("init", "--dir", str(d), "--port", "0")
    assert "created demo API key" in first.stdout and "ready: qpher-proxy serve --config" in first.stdout
    demo, kek = (d / "secrets" / "demo-api-key").read_bytes(), (d / "kek" / "kek.b64").read_bytes()
    second = cli("init", "--dir", str(d), "--port", "0")
    assert "created" not in second.stdout
    assert (d / "secrets" / "demo-api-key").read_bytes() == demo and (
        d / "kek" / "kek.b64"
    ).read_bytes() == kek
    assert demo.decode().strip() not in first.stdout + first.stderr  # its file is named, not its value


def test_serve_answers_over_tls(gw: Gateway) -> None:
    # start-up is the fixture's (`serve` logs "serving"), SIGTERM and exit 0 its teardown
    c = gw.client()
    try:
        assert c.call("GET", "/healthz")[0] == 200
        assert c.call("GET", "/readyz")[0] == 200
    finally:
        c.close()


def test_serve_with_a_bad_config_says_why_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "config.yaml"
    bad.write_text("tls: {min_version: 1.1}\n")
    err = _one_error_line(cli("serve", "-c", str(bad), check=False), 2)
    assert err == 'qpher-proxy: config.yaml: tls.min_version: expected "1.2" or "1.3", got 1.1'


def test_version_names_the_product_backend_and_libraries() -> None:
    out = cli("version").stdout
    for name in ("qpher-proxy", "python", "trio", "cryptography", "crypto backend"):
        assert re.search(rf"^{re.escape(name)}.*: \S", out, re.M), (name, out)


def test_check_config_accepts_the_live_config(config: str) -> None:
    assert cli("check-config", "-c", config).stdout == f"{config}: ok\n"


def test_check_config_validates_the_example_of_a_fresh_clone(tmp_path: Path) -> None:
    # the example beside nothing: no certificates, no policies, as in a fresh clone before init
    example = tmp_path / "config.example.yaml"
    shutil.copyfile(REPO / "config.example.yaml", example)
    err = _one_error_line(cli("check-config", "-c", str(example), check=False), 2)
    assert "tls.cert_file: file not found" in err and "(--no-files skips this check)" in err
    ok = cli("check-config", "-c", str(example), "--no-files")
    assert ok.stdout == f"{example}: ok (files not checked)\n"
    # the README's spelling, from the repository root
    assert cli("check-config", "-c", str(REPO / "config.example.yaml"), "--no-files").returncode == 0


def test_check_config_takes_an_unquoted_tls_version_and_stays_strict(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("tls:\n  min_version: 1.3\n")
    assert cli("check-config", "-c", str(cfg), "--no-files").returncode == 0
    cfg.write_text("tls:\n  min_version: 1.3\n  min_versoin: 1.2\n")
    err = _one_error_line(cli("check-config", "-c", str(cfg), "--no-files", check=False), 2)
    assert err.startswith("qpher-proxy: config.yaml: tls.min_versoin: unknown option")


# ---- apikey -------------------------------------------------------------------------------------

def test_apikey_create_then_list_as_a_table(config: str) -> None:
    key_id, key = _create(config, "--tenant", "table-t", "--plan", "pro", "--scope", "metrics",
                          "--scope", "admin", "--expires", "30d", "--label", "ci runner")
    out = cli("apikey", "list", "-c", config, "--tenant", "table-t").stdout
    header, row, *rest = out.splitlines()
    assert rest == []
    assert header.split() == [
        "KEY",
        "ID",
        "TENANT",
        "PLAN",
        "STATUS",
        "CREATED",
        "EXPIRES",
        "SCOPES",
        "LABEL",
    ]
    assert row.split()[:4] == [key_id, "table-t", "pro", "active"]
    assert len(ISO_UTC.findall(row)) == 2 and row.endswith("admin,metrics  ci runner")
    assert key.split("_")[2] not in out
    everyone = cli("apikey", "list", "-c", config).stdout
    assert "demo" in everyone and key_id in everyone


def test_apikey_list_json_has_status_and_iso_times(config: str) -> None:
    key_id, key = _create(config, "--tenant", "json-t", "--plan", "free")
    out = cli("apikey", "list", "-c", config, "--tenant", "json-t", "--json").stdout
    assert key.split("_")[2] not in out
    (entry,) = json.loads(out)
    assert entry["key_id"] == key_id and entry["status"] == "active"
    assert ISO_UTC.fullmatch(entry["created_at"])
    assert entry["expires_at"] is None and entry["revoked_at"] is None
    assert set(entry) == {"key_id", "tenant", "plan", "scopes", "status", "created_at", "expires_at",
                          "revoked_at", "label"}


def test_apikey_create_refuses_an_unknown_plan_or_scope_naming_the_valid_ones(config: str) -> None:
    err = _one_error_line(
        cli("apikey", "create", "-c", config, "--tenant", "refused-t", "--plan", "nosuchplan", check=False), 1
    )
    assert err == ("qpher-proxy: invalid_input: unknown plan 'nosuchplan' "
                   "(the policy declares: enterprise, free, pro)")
    err = _one_error_line(cli("apikey", "create", "-c", config, "--tenant", "refused-t", "--plan", "pro",
                              "--scope", "metrics", "--scope", "bogus", check=False), 1)
    assert err == "qpher-proxy: invalid_input: unknown scope 'bogus' (known scopes: admin, audit, metrics)"
    assert cli("apikey", "list", "-c", config, "--tenant", "refused-t", "--json").stdout.strip() == "[]"


def test_apikey_create_takes_scopes_from_the_policy_and_refuses_a_broken_one(
    gw: Gateway, tmp_path: Path
) -> None:
    policies = tmp_path / "policies"
    shutil.copytree(gw.directory / "policies", policies)
    (policies / "50-billing.yaml").write_text(
        "version: 1\nrules:\n  - id: billing-reads-info\n    effect: allow\n"
        "    match: {scope: billing, operation: info}\n    reason: billing dashboards\n")
    cfg = yaml.safe_load((gw.directory / "config.yaml").read_text())
    cfg["policy"]["dir"] = str(policies)
    other = gw.directory / "config-billing.yaml"  # beside the live one: same relative paths
    other.write_text(yaml.safe_dump(cfg))
    _create(str(other), "--tenant", "billing-t", "--plan", "free", "--scope", "billing")
    (policies / "60-broken.yaml").write_text("version: 1\nrules: [{id: x, effect: maybe}]\n")
    err = _one_error_line(cli("apikey", "create", "-c", str(other), "--tenant", "billing-t", "--plan", "free",
                              check=False), 2)
    assert err.startswith(f"qpher-proxy: policy.dir: the policy in '{policies}' does not load (")
    assert f"`qpher-proxy policy check {policies}` lists them" in err


def test_apikey_revoke_stops_the_key_on_the_live_gateway_and_says_when_it_was_already(
        gw: Gateway, config: str) -> None:
    key_id, key = _create(config, "--tenant", "revoke-t", "--plan", "pro")
    c = gw.client(key)
    try:
        assert c.call("GET", "/v1/info")[0] == 200
        out = cli("apikey", "revoke", "-c", config, key_id).stdout
        assert out.startswith(f"revoked {key_id} ")
        deadline = time.monotonic() + 5
        while c.call("GET", "/v1/info")[0] != 401:
            assert time.monotonic() < deadline, "the revoked key still works"
            time.sleep(0.1)
    finally:
        c.close()
    again = cli("apikey", "revoke", "-c", config, key_id)
    assert again.returncode == 0
    assert re.fullmatch(
        rf"{key_id} was already revoked at {ISO_UTC.pattern}; nothing changed\n", again.stdout
    )
    (entry,) = json.loads(cli("apikey", "list", "-c", config, "--tenant", "revoke-t", "--json").stdout)
    assert entry["status"] == "revoked" and ISO_UTC.fullmatch(entry["revoked_at"])


def test_apikey_revoke_never_echoes_what_it_cannot_use(config: str) -> None:
    _key_id, key = _create(config, "--tenant", "paste-t", "--plan", "free")
    proc = cli("apikey", "revoke", "-c", config, key, check=False)  # the whole key pasted by mistake
    err = _one_error_line(proc, 1)
    assert "whole API key, not its id" in err and key.split("_")[2] not in proc.stdout + proc.stderr
    proc = cli("apikey", "revoke", "-c", config, "x'; drop table api_keys; --", check=False)
    err = _one_error_line(proc, 1)
    assert err == ("qpher-proxy: invalid_input: not an API key id "
                   "(expected 12 characters a-z, 0-9, as `apikey list` shows)")
    err = _one_error_line(cli("apikey", "revoke", "-c", config, "abcdefghijkl", check=False), 1)
    assert err == "qpher-proxy: not_found: no API key with id 'abcdefghijkl'"
    (entry,) = json.loads(cli("apikey", "list", "-c", config, "--tenant", "paste-t", "--json").stdout)
    assert entry["status"] == "active"


# ---- policy -------------------------------------------------------------------------------------

def test_policy_check_of_the_live_policy(gw: Gateway) -> None:
    out = cli("policy", "check", str(gw.directory / "policies")).stdout
    assert re.search(r": ok: \d+ file\(s\), 3 plan\(s\), \d+ rule\(s\), revision ", out)


def test_policy_explain_reads_the_whole_key_from_stdin(config: str) -> None:
    key_id, key = _create(config, "--tenant", "explain-t", "--plan", "free")
    args = (
        "policy",
        "explain",
        "-c",
        config,
        "--method",
        "POST",
        "--path",
        "/v1/keys",
        "--algorithm",
        "x-wing",
    )
    by_stdin = cli(*args, "--api-key-stdin", input=key + "\n")
    assert (
        f"key={key_id}" in by_stdin.stdout
        and "decision: DENY by rule hybrid-needs-paid-plan" in by_stdin.stdout
    )
    assert key.split("_")[2] not in by_stdin.stdout + by_stdin.stderr
    assert cli(*args, "--key-id", key_id).stdout.splitlines()[2:] == by_stdin.stdout.splitlines()[2:]


def test_policy_explain_refuses_a_bad_key_on_stdin_without_showing_it(config: str) -> None:
    key_id, key = _create(config, "--tenant", "explain-bad-t", "--plan", "free")
    args = ("policy", "explain", "-c", config, "--method", "GET", "--path", "/v1/info", "--api-key-stdin")
    err = _one_error_line(cli(*args, input="qph_not-a-key\n", check=False), 1)
    assert err == "qpher-proxy: invalid_input: not an API key (expected qph_<key id>_<secret>)"
    wrong = key[:-1] + ("A" if key[-1] != "A" else "B")
    proc = cli(*args, input=wrong, check=False)
    err = _one_error_line(proc, 1)
    assert f"has the id '{key_id}' but not its secret" in err and wrong.split("_")[2] not in err
    usage = cli("policy", "explain", "-c", config, "--method", "GET", "--path", "/", "--key-id", key_id,
                "--api-key-stdin", check=False)
    assert usage.returncode == 2 and "not allowed with argument --key-id" in usage.stderr


# ---- audit, kms, fail-open ----------------------------------------------------------------------

def test_audit_verify_of_the_live_log(gw: Gateway, config: str) -> None:
    _create(config, "--tenant", "audit-t", "--plan", "free")  # an apikey.created record at least
    out = cli("audit", "verify", str(gw.directory / "audit" / "audit.log"))
    assert out.returncode == 0 and "Traceback" not in out.stderr


def test_kms_rotate_kek_refuses_while_the_proxy_runs(gw: Gateway, config: str) -> None:
    new = gw.directory / "kek" / "kek-next.b64"
    proc = cli("kms", "rotate-kek", "-c", config, "--new-kek-file", str(new), "--generate", check=False)
    err = _one_error_line(proc, 2)
    assert (
        err == "qpher-proxy: the key store is in use by a running KMS; stop the proxy before rotating the KEK"
    )
    c = gw.client()
    try:
        assert c.call("GET", "/readyz")[0] == 200  # the KMS kept serving
    finally:
        c.close()


def test_fail_open_open_and_close_on_the_live_gateway(gw: Gateway) -> None:
    env = {**os.environ, "QPHER_API_KEY": gw.demo_key}
    where = ("--url", f"https://{gw.host}:{gw.port}", "--cacert", str(gw.ca_file))
    opened = cli("fail-open", "open", *where, "--reason", "cli test", "--seconds", "30", env=env)
    state = json.loads(opened.stdout)
    assert state["active"] is True and gw.demo_key not in opened.stdout + opened.stderr
    closed = json.loads(cli("fail-open", "close", *where, env=env).stdout)
    assert closed["active"] is False


def test_fail_open_without_a_key_or_with_a_key_lacking_admin(gw: Gateway, config: str) -> None:
    where = ("--url", f"https://{gw.host}:{gw.port}", "--cacert", str(gw.ca_file))
    env = {k: v for k, v in os.environ.items() if k != "QPHER_API_KEY"}
    err = _one_error_line(cli("fail-open", "close", *where, env=env, check=False), 2)
    assert err == "qpher-proxy: set QPHER_API_KEY to an API key with the admin scope"
    _key_id, key = _create(config, "--tenant", "failopen-t", "--plan", "pro", "--scope", "metrics")
    proc = cli("fail-open", "close", *where, env={**env, "QPHER_API_KEY": key}, check=False)
    assert proc.returncode == 1 and json.loads(proc.stderr)["error"]["code"] == "policy_denied"


# ---- bench and help -----------------------------------------------------------------------------

def test_bench_help_describes_every_benchmark() -> None:
    out = cli("bench", "--help").stdout
    for name, what in BENCHMARKS.items():
        assert re.search(rf"^\s+{name}\s+{re.escape(what.split()[0])}", out, re.M), (name, out)
    assert "args" not in out
    for name in BENCHMARKS:
        own = cli("bench", name, "--help").stdout
        assert own.startswith(f"usage: qpher-proxy bench {name} ") and "--quick" in own


def test_bench_auth_quick_runs_and_prints_figures() -> None:
    proc = cli("bench", "auth", "--quick", "--json", timeout=120)
    figures = json.loads(proc.stdout)
    assert figures, "no figures"


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_every_option_has_help_and_no_help_text_points_outside_the_product() -> None:
    for p in _parsers(build_parser()):
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    assert choice.help, f"{p.prog} {choice.dest}: no help"
                continue
            assert action.help, f"{p.prog} {'/'.join(action.option_strings) or action.dest}: no help"
        text = p.format_help()
        assert not re.search(r"\bissues?\s*#?\d|#\d|\bticket", text, re.I), (p.prog, text)


def test_help_lists_the_actions_and_says_scope_repeats() -> None:
    fail_open = cli("fail-open", "--help").stdout
    assert re.search(r"^\s+open\s+open the window", fail_open, re.M)
    assert re.search(r"^\s+close\s+close the window", fail_open, re.M)
    create = cli("apikey", "create", "--help").stdout
    assert "repeat for several" in create
    assert "--no-files" in cli("check-config", "--help").stdout
    assert "--api-key-stdin" in cli("policy", "explain", "--help").stdout
