"""The pkcs11 KEK provider with real KMS workers and a real SoftHSM2 token: keys created and used
under a KEK that never leaves the token, start-up refusals in one line without the PIN, rotate-kek
from a file KEK to the token and back, and a token that goes away mid-run (503, the worker lives).

The provider-level suite every KEK provider passes is in test_kms_keyfile_kek.py (``make_kek``)."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from kms_helpers import ctx, settings
from pkcs11_helpers import GOOD_KEYS, PIN, TOKEN, SoftHSM, make_softhsm, require_softhsm

from qpher_proxy.errors import ConfigError, KeyCorrupt, KMSUnavailable
from qpher_proxy.kms.launcher import open_kms
from qpher_proxy.kms.wire.model import KEKSettings
from qpher_proxy.kms.worker import keyfile
from qpher_proxy.kms.worker.kek import KEKError
from qpher_proxy.kms.worker.kek_pkcs11 import PKCS11KEKProvider, open_pkcs11_provider, pin_from_bytes

PIN_VAR = "QPHER_TEST_PKCS11_PIN"


def pkcs11_settings(hsm: SoftHSM, key_label: str = GOOD_KEYS[0], *, token: str = TOKEN,
                    pin_file: Path | None = None, module: str | None = None) -> KEKSettings:
    return KEKSettings(
        "pkcs11", pkcs11_module=module or hsm.module, pkcs11_token_label=token, pkcs11_key_label=key_label,
        pkcs11_pin_file=None if pin_file is None else str(pin_file),
        pkcs11_pin_env=PIN_VAR if pin_file is None else None,
    )


def write_pin(path: Path, pin: str = PIN) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(pin + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def pin_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PIN_VAR, PIN)


# ---- a KMS whose KEK is in the token --------------------------------------------------------


@pytest.mark.parametrize("pin_source", ["env", "file"])
async def test_workers_create_and_use_keys_under_a_kek_inside_the_token(
    softhsm: SoftHSM, kms_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pin_source: str
) -> None:
    if pin_source == "env":
        monkeypatch.setenv(PIN_VAR, PIN)
    pin_file = write_pin(tmp_path / "secrets" / "pin") if pin_source == "file" else None
    kek = pkcs11_settings(softhsm, pin_file=pin_file)
    async with open_kms(**settings(kms_dir, Path("/nonexistent"), kek=kek)) as sup:  # type: ignore[arg-type]
        if pin_source == "env":  # moved into the workers' memfd: gone from this process
            assert PIN_VAR not in os.environ
        kek_id = sup.info[0]["kek_id"]
        assert isinstance(kek_id, str) and kek_id.startswith("pkcs11-")
        sig_key = await sup.client.create_key(ctx(), kind="signature")
        kem_key = await sup.client.create_key(ctx(), kind="kem")
        sig, _ = await sup.client.sign(ctx(), sig_key.key_id, b"signed under a token-wrapped key")
        ss, ct, _ = await sup.client.encapsulate(ctx(), kem_key.key_id)
        pid = sup.pids[0]
        for proc_file in ("cmdline", "environ"):
            assert PIN.encode() not in Path(f"/proc/{pid}/{proc_file}").read_bytes()
        os.kill(pid, signal.SIGKILL)  # the restarted worker logs in again and unwraps both keys
        while sup.pids.get(0) in (None, pid) or not sup.ready:
            await sup._changed.wait()
        assert await sup.client.verify(ctx(), sig_key.key_id, b"signed under a token-wrapped key", sig)
        assert await sup.client.decapsulate(ctx(), kem_key.key_id, ct) == ss
    for f in (kms_dir / "keys").rglob("*.qkey"):
        assert keyfile.parse_header(f.read_bytes(), "x").kek_id == kek_id


async def test_a_tampered_key_file_is_corrupt_not_unavailable(
    softhsm: SoftHSM, kms_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PIN_VAR, PIN)
    s = settings(kms_dir, Path("/nonexistent"), kek=pkcs11_settings(softhsm))
    async with open_kms(**s) as sup:  # type: ignore[arg-type]
        k = await sup.client.create_key(ctx(), kind="signature")
    (path,) = (kms_dir / "keys").rglob("*.qkey")
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # the GCM tag: SoftHSM2 answers CKR_GENERAL_ERROR, the probe blob shows the token is fine
    path.write_bytes(bytes(data))
    monkeypatch.setenv(PIN_VAR, PIN)  # the first KMS moved it out of the environment
    async with open_kms(**s) as sup:  # type: ignore[arg-type]
        with pytest.raises(KeyCorrupt, match="failed authentication"):
            await sup.client.sign(ctx(), k.key_id, b"x")
        await sup.client.create_key(ctx(), kind="kem")  # the token still works for everything else


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"pin": "not-the-pin"}, "the PIN from environment variable 'QPHER_TEST_PKCS11_PIN' is not accepted"),
        ({"key_label": "no-such-key"}, "no secret key with this label in token 'qpher-test'"),
        ({"key_label": "kek-extractable"}, "must be non-extractable and sensitive"),
        ({"key_label": "kek-not-sensitive"}, "must be non-extractable and sensitive"),
        ({"key_label": "kek-aes128"}, "expected an AES-256 key, found AES of 16 bytes"),
        ({"token": "no-such-token"}, "no token labelled 'no-such-token'"),
        ({"module": "/nonexistent/libpkcs11.so"}, "pkcs11_module '/nonexistent/libpkcs11.so' does not exist"),
        ({"module": "/etc/hostname"}, "cannot be loaded as a PKCS#11 module"),
    ],
)
async def test_a_wrong_token_setting_stops_start_up_in_one_line_without_the_pin(
    softhsm: SoftHSM, kms_dir: Path, monkeypatch: pytest.MonkeyPatch, change: dict[str, str], message: str
) -> None:
    pin = change.get("pin", PIN)
    monkeypatch.setenv(PIN_VAR, pin)
    kek = pkcs11_settings(softhsm, change.get("key_label", GOOD_KEYS[0]), token=change.get("token", TOKEN),
                          module=change.get("module"))
    with pytest.raises(ConfigError) as info:
        async with open_kms(**settings(kms_dir, Path("/nonexistent"), kek=kek)):  # type: ignore[arg-type]
            pytest.fail("the KMS must not start")  # pragma: no cover
    text = info.value.message
    assert message in text and "\n" not in text
    assert pin not in text and PIN not in text
    assert not (kms_dir / "keys").exists()


def test_pin_files_and_values_are_checked_like_kek_files(tmp_path: Path) -> None:
    p = write_pin(tmp_path / "pin")
    p.chmod(0o640)
    with pytest.raises(KEKError, match="readable by group or others"):
        open_pkcs11_provider("/m.so", "t", "k", pin_file=str(p))
    with pytest.raises(KEKError, match="does not exist"):
        open_pkcs11_provider("/m.so", "t", "k", pin_file=str(tmp_path / "nope"))
    with pytest.raises(KEKError, match="exactly one of pkcs11_pin_file and pkcs11_pin_env"):
        open_pkcs11_provider("/m.so", "t", "k")
    with pytest.raises(KEKError, match="kms.kek.pkcs11_key_label is required"):
        open_pkcs11_provider("/m.so", "t", None, pin_env="X")
    assert pin_from_bytes(b"1234\n", "x") == pin_from_bytes(b"1234\r\n", "x") == "1234"
    for bad, why in ((b"", "empty"), (b"\n", "empty"), (b"12\n34", "one line"), (b"\xff\xfe", "not UTF-8")):
        with pytest.raises(KEKError, match=why) as info:
            pin_from_bytes(bad, "PIN file 'p'")
        shown = bad.decode(errors="ignore")
        assert not shown.strip() or shown not in info.value.message


def test_the_kek_id_is_the_same_for_every_opening_of_one_key(softhsm: SoftHSM) -> None:
    a = PKCS11KEKProvider(softhsm.module, TOKEN, GOOD_KEYS[0], PIN, pin_source="test")
    b = PKCS11KEKProvider(softhsm.module, TOKEN, GOOD_KEYS[0], PIN, pin_source="test")
    try:
        assert a.kek_id == b.kek_id and a.kek_id.startswith("pkcs11-") and len(a.kek_id) == 23
        assert b.unwrap(a.wrap(b"seed", b"aad"), b"aad") == b"seed"  # one key, two sessions
        assert PIN not in repr(a)
    finally:
        a.close()
        b.close()


def test_a_lost_session_is_replaced_without_failing_the_call(softhsm: SoftHSM) -> None:
    kek = PKCS11KEKProvider(softhsm.module, TOKEN, GOOD_KEYS[2], PIN, pin_source="test")
    try:
        blob = kek.wrap(b"seed", b"aad")
        kek._session.close()  # the HSM dropped the session (a timed-out connection, a restart)
        assert kek.unwrap(blob, b"aad") == b"seed"
        kek._session.close()
        assert kek.unwrap(kek.wrap(b"again", b"aad"), b"aad") == b"again"
    finally:
        kek.close()


def test_a_new_session_is_refused_when_the_label_now_names_another_key(softhsm: SoftHSM) -> None:
    import pkcs11
    from pkcs11 import Attribute, KeyType, ObjectClass

    token = pkcs11.lib(softhsm.module).get_token(token_label=TOKEN)
    admin = token.open(rw=True, user_pin=PIN)
    try:
        template = {Attribute.EXTRACTABLE: False, Attribute.SENSITIVE: True, Attribute.ENCRYPT: True,
                    Attribute.DECRYPT: True}
        admin.generate_key(KeyType.AES, 256, label="kek-swapped", store=True, template=template)
        kek = PKCS11KEKProvider(softhsm.module, TOKEN, "kek-swapped", PIN, pin_source="test")
        blob = kek.wrap(b"seed", b"aad")
        admin.get_key(object_class=ObjectClass.SECRET_KEY, label="kek-swapped").destroy()
        admin.generate_key(KeyType.AES, 256, label="kek-swapped", store=True, template=template)
        with pytest.raises(KMSUnavailable, match="is now a different key"):
            kek.unwrap(blob, b"aad")
        kek.close()
    finally:
        admin.close()


# ---- the token goes away at run time --------------------------------------------------------


async def test_a_token_that_goes_away_answers_503_kms_unavailable_and_the_worker_lives(
    softhsm: SoftHSM, kms_dir: Path, pin_env: None
) -> None:
    token = "qpher-pulled"
    token_dir = softhsm.init_token(token)
    softhsm.generate_keys(token, [{"label": "kek", "id": "01"}])
    s = settings(kms_dir, Path("/nonexistent"), kek=pkcs11_settings(softhsm, "kek", token=token))
    async with open_kms(**s) as sup:  # type: ignore[arg-type]
        k = await sup.client.create_key(ctx(), kind="signature")
        pid = sup.pids[0]
        shutil.rmtree(token_dir)  # the token is pulled: its objects are gone under the open session
        for _ in range(2):  # the first call loses the session, the next finds no token to reopen
            with pytest.raises(KMSUnavailable) as info:
                await sup.client.create_key(ctx(), kind="kem")
            assert (info.value.code, info.value.status) == ("kms_unavailable", 503)
            assert "PKCS#11 token" in info.value.message and PIN not in info.value.message
        # the worker is alive and serves what it already holds
        assert sup.pids[0] == pid and sup.ready
        sig, _ = await sup.client.sign(ctx(), k.key_id, b"still served from the worker's cache")
        assert await sup.client.verify(ctx(), k.key_id, b"still served from the worker's cache", sig)
    assert len(list((kms_dir / "keys").rglob("*.qkey"))) == 1  # nothing half-written


# ---- rotate-kek: file -> pkcs11 -> file, through the CLI --------------------------------------


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "qpher_proxy", *args], capture_output=True, text=True,
                          timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"qpher-proxy {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
    return proc


def init_state(d: Path, **kms: object) -> tuple[Path, dict[str, object]]:
    cli("init", "--dir", str(d), "--port", "0")
    cfg_path = d / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["kms"].update({"workers": 1, "user": None, **kms})
    cfg["server"]["user"] = None
    cfg["crypto"] = {"backend": "openssl"}
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return cfg_path, cfg


async def test_rotate_kek_from_a_file_to_the_token_and_back_keeps_every_key(
    softhsm: SoftHSM, tmp_path: Path
) -> None:
    d = tmp_path / "state"
    cfg_path, cfg = init_state(d)
    kms_dir, file_kek = d / "kms", d / "kek" / "kek.b64"
    async with open_kms(**settings(kms_dir, file_kek)) as sup:  # type: ignore[arg-type]
        sig_key = await sup.client.create_key(ctx(), kind="signature")
        kem_key = await sup.client.create_key(ctx("tenant-b"), kind="kem")
        await sup.client.rotate_key(ctx(), sig_key.key_id)  # two versions, both must survive
        sig, _ = await sup.client.sign(ctx(), sig_key.key_id, b"m")
        ss, ct, _ = await sup.client.encapsulate(ctx("tenant-b"), kem_key.key_id)

    pin_file = write_pin(d / "secrets" / "pkcs11-pin")
    pkcs11_kek = {"provider": "pkcs11", "pkcs11_module": softhsm.module, "pkcs11_token_label": TOKEN,
                  "pkcs11_key_label": GOOD_KEYS[1], "pkcs11_pin_file": "secrets/pkcs11-pin"}
    new_cfg = d / "new-kek.yaml"
    new_cfg.write_text(yaml.safe_dump({"kms": {"kek": pkcs11_kek}}))
    out = cli("kms", "rotate-kek", "-c", str(cfg_path), "--new-kek-config", str(new_cfg))
    assert "KEK rotated: kek-" in out.stdout and "-> pkcs11-" in out.stdout
    assert PIN not in out.stdout + out.stderr

    token_kek = pkcs11_settings(softhsm, GOOD_KEYS[1], pin_file=pin_file)
    with pytest.raises(ConfigError, match="is not the KEK of this key store"):
        async with open_kms(**settings(kms_dir, file_kek)):  # type: ignore[arg-type]
            pytest.fail("the old KEK must not open the store")  # pragma: no cover
    async with open_kms(**settings(kms_dir, Path("/nonexistent"), kek=token_kek)) as sup:  # type: ignore[arg-type]
        assert await sup.client.verify(ctx(), sig_key.key_id, b"m", sig)
        await sup.client.sign(ctx(), sig_key.key_id, b"v2 under the token")
        assert await sup.client.decapsulate(ctx("tenant-b"), kem_key.key_id, ct) == ss
        third = await sup.client.create_key(ctx(), kind="kem")  # sealed by the token from the start

    cfg["kms"]["kek"] = {**cfg["kms"]["kek"], **pkcs11_kek}  # type: ignore[index, dict-item]
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    back = d / "kek" / "kek-2.b64"
    out = cli("kms", "rotate-kek", "-c", str(cfg_path), "--new-kek-file", str(back), "--generate")
    assert "KEK rotated: pkcs11-" in out.stdout and "(RotationResult(rewrapped=4" in out.stdout
    async with open_kms(**settings(kms_dir, back)) as sup:  # type: ignore[arg-type]
        assert await sup.client.verify(ctx(), sig_key.key_id, b"m", sig)
        await sup.client.sign(ctx(), sig_key.key_id, b"back under a file KEK")
        assert await sup.client.decapsulate(ctx("tenant-b"), kem_key.key_id, ct) == ss
        await sup.client.encapsulate(ctx(), third.key_id)


# ---- serve, as an operator runs it ----------------------------------------------------------


@pytest.fixture
def serve_softhsm(tmp_path: Path) -> SoftHSM:
    """A SoftHSM2 of its own for a ``serve`` process (its ``SOFTHSM2_CONF`` goes in that process's
    environment). The state directory is private to this user, so ``init`` writes one user for
    every process and the KMS worker reads the token and the PIN file as this user."""
    hsm = make_softhsm(tmp_path / "softhsm", require_softhsm())
    hsm.init_token("qpher-serve")
    hsm.generate_keys("qpher-serve", [{"label": "kek", "id": "01"}])
    return hsm


@pytest.mark.parametrize("wrong", ["pin", "key"])
def test_serve_with_a_wrong_pin_or_key_exits_with_one_line_and_no_traceback(
    serve_softhsm: SoftHSM, tmp_path: Path, wrong: str
) -> None:
    hsm = serve_softhsm
    d = tmp_path / "state"
    cli("init", "--dir", str(d), "--port", "0")
    cfg_path = d / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    pin = "wrong-pin-4242" if wrong == "pin" else PIN
    pin_file = write_pin(hsm.conf.parent / "pin", pin)
    cfg["kms"].update({"workers": 1, "kek": {
        "provider": "pkcs11", "pkcs11_module": hsm.module, "pkcs11_token_label": "qpher-serve",
        "pkcs11_key_label": "kek" if wrong == "pin" else "missing-kek", "pkcs11_pin_file": str(pin_file)}})
    cfg["crypto"] = {"backend": "openssl"}
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    proc = subprocess.run([sys.executable, "-m", "qpher_proxy", "serve", "-c", str(cfg_path)],
                          capture_output=True, text=True, timeout=120, env=hsm.env())
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and pin not in proc.stderr + proc.stdout
    final = [line for line in proc.stderr.splitlines() if line.startswith("qpher-proxy:")]
    assert len(final) == 1, proc.stderr
    expected = "is not accepted (wrong PIN)" if wrong == "pin" else "no secret key with this label"
    assert expected in final[0]


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            out += [int(child), *_descendants(int(child))]
    return out


def test_serve_keeps_the_pin_out_of_every_environment_and_answers_503_when_the_token_is_pulled(
    serve_softhsm: SoftHSM, tmp_path: Path
) -> None:
    hsm = serve_softhsm
    (token_dir,) = hsm.tokendir.iterdir()
    d = tmp_path / "state"
    cfg_path, cfg = init_state(d, kek={"provider": "pkcs11", "pkcs11_module": hsm.module,
                                       "pkcs11_token_label": "qpher-serve", "pkcs11_key_label": "kek",
                                       "pkcs11_pin_env": PIN_VAR})
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "qpher_proxy", "serve", "-c", str(cfg_path)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                                env={**hsm.env(), PIN_VAR: PIN})
    try:
        listen = None
        deadline = time.monotonic() + 60
        while listen is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
            for line in log_path.read_text().splitlines():
                rec = json.loads(line) if line.startswith("{") else {}
                if rec.get("msg") == "serving":
                    listen = rec["listen"][0]
        assert listen is not None, log_path.read_text()
        host, _, port = listen.rpartition(":")
        tls = ssl.create_default_context(cafile=str(d / "certs" / "ca.crt"))
        api_key = (d / "secrets" / "demo-api-key").read_text().strip()

        def call(path: str, body: dict[str, str]) -> tuple[int, dict[str, object]]:
            conn = http.client.HTTPSConnection(host, int(port), context=tls, timeout=30)
            try:
                conn.request("POST", path, json.dumps(body), {"Authorization": f"Bearer {api_key}",
                                                              "Content-Type": "application/json"})
                resp = conn.getresponse()
                return resp.status, json.loads(resp.read())
            finally:
                conn.close()

        status, key = call("/v1/keys", {"algorithm": "ml-dsa-65"})
        assert status == 201, key
        assert call("/v1/sign", {"key_id": str(key["key_id"]), "message": "aGk="})[0] == 200
        # the PIN variable is in no environment: not the supervisor's (it re-executed itself
        # without it), not a gateway's, not a KMS worker's (which read it from a memfd)
        pids = [proc.pid, *_descendants(proc.pid)]
        assert len(pids) >= 3
        for pid in pids:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            assert PIN_VAR.encode() not in environ and PIN.encode() not in environ

        shutil.rmtree(token_dir)  # the token is pulled while the proxy serves
        status, body = call("/v1/keys", {"algorithm": "ml-kem-768"})
        assert status == 503 and body["error"]["code"] == "kms_unavailable", body  # type: ignore[index]
        assert PIN not in json.dumps(body)
        assert call("/v1/sign", {"key_id": str(key["key_id"]), "message": "aGk="})[0] == 200
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert PIN not in log_path.read_text() and "Traceback" not in log_path.read_text()
