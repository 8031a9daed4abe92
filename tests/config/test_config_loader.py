"""The strict loader: an unquoted TLS version is the version, files can go unchecked, and
everything else stays as strict as before."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from qpher_proxy.config import config_from_dict, load_config
from qpher_proxy.config.loader import MissingFile
from qpher_proxy.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "config.example.yaml"


def _load(tmp_path: Path, text: str, **kw: bool) -> object:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return load_config(path, **kw)


@pytest.mark.parametrize(
    "written, loaded", [("1.2", "1.2"), ("1.3", "1.3"), ('"1.2"', "1.2"), ("'1.3'", "1.3")]
)
def test_min_version_is_accepted_quoted_or_unquoted(tmp_path: Path, written: str, loaded: str) -> None:
    cfg = _load(tmp_path, f"tls: {{min_version: {written}}}\n", check_files=False)
    assert cfg.tls.min_version == loaded  # type: ignore[attr-defined]


@pytest.mark.parametrize("written, shown", [
    ("1.1", "1.1"), ('"1.1"', '"1.1"'), ("1", "1"), ("1.23", "1.23"), ("true", "true"), ("[1.2]", "a list"),
])
def test_min_version_refuses_other_versions_and_types(tmp_path: Path, written: str, shown: str) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, f"tls: {{min_version: {written}}}\n", check_files=False)
    assert info.value.message == f'config.yaml: tls.min_version: expected "1.2" or "1.3", got {shown}'


def test_a_number_is_still_not_a_string_or_another_choice(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"server\.user: expected a string, got 1\.2$"):
        _load(tmp_path, "server: {user: 1.2}\n", check_files=False)
    with pytest.raises(ConfigError, match=r'logging\.level: expected "debug", .* got 1\.2$'):
        _load(tmp_path, "logging: {level: 1.2}\n", check_files=False)
    with pytest.raises(ConfigError, match=r'tls\.groups\[0\]: expected a string, got 1\.3$'):
        _load(tmp_path, "tls: {groups: [1.3]}\n", check_files=False)


def test_the_example_validates_from_a_fresh_clone_without_its_files(tmp_path: Path) -> None:
    # a directory holding only the example: no certificates, no policies
    copy = tmp_path / "config.example.yaml"
    shutil.copyfile(EXAMPLE, copy)
    cfg = load_config(copy, check_files=False)
    assert cfg.tls.cert_file == str(tmp_path / "certs" / "server.crt")
    assert cfg.policy.dir == str(tmp_path / "policies")
    with pytest.raises(MissingFile, match=r"^config\.example\.yaml: tls\.cert_file: file not found: "):
        load_config(copy)


def test_a_missing_file_is_an_error_unless_files_go_unchecked(tmp_path: Path) -> None:
    text = "tls: {cert_file: nope.crt, key_file: nope.key}\npolicy: {dir: nowhere}\n"
    with pytest.raises(MissingFile, match=r"tls\.cert_file: file not found: .*nope\.crt"):
        _load(tmp_path, text)
    assert isinstance(MissingFile("x"), ConfigError)  # callers that catch ConfigError still do
    cfg = config_from_dict({"tls": {"cert_file": "nope.crt"}}, tmp_path, check_files=False)
    assert cfg.tls.cert_file == str(tmp_path / "nope.crt")


@pytest.mark.parametrize("text, message", [
    ("tls: {min_versoin: 1.2}\n", "tls.min_versoin: unknown option"),
    ("http: {max_body_bytes: '10'}\n", "http.max_body_bytes: expected an integer, got \"10\""),
    ("http: {max_body_bytes: 0}\n", "http.max_body_bytes: expected a value between 1 and"),
    ("tls: {require_pq: yes please}\n", "tls.require_pq: expected true or false"),
    ("server: {listen: ['localhost']}\n", "server.listen[0]: expected HOST:PORT"),
    ("tls: {client_auth: required}\n", "tls.client_ca: expected a CA file"),
])
def test_skipping_files_keeps_every_other_check(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text, check_files=False)
    assert message in info.value.message


_PKCS11 = ("kms: {kek: {provider: pkcs11, pkcs11_module: /usr/lib/softhsm/libsofthsm2.so, "
           "pkcs11_token_label: qpher, pkcs11_key_label: kek%s}}\n")


@pytest.mark.parametrize("extra, message", [
    ("", "kms.kek.pkcs11_pin_file: expected exactly one of pkcs11_pin_file and pkcs11_pin_env"),
    (", pkcs11_pin_file: pin, pkcs11_pin_env: PIN",
     "kms.kek.pkcs11_pin_file: expected exactly one of pkcs11_pin_file and pkcs11_pin_env"),
])
def test_the_pkcs11_kek_needs_exactly_one_pin_source(tmp_path: Path, extra: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, _PKCS11 % extra)
    assert message in info.value.message and "\n" not in info.value.message


@pytest.mark.parametrize("missing", ["pkcs11_module", "pkcs11_token_label", "pkcs11_key_label"])
def test_the_pkcs11_kek_needs_its_module_and_labels(tmp_path: Path, missing: str) -> None:
    kek = {"provider": "pkcs11", "pkcs11_module": "/m.so", "pkcs11_token_label": "t",
           "pkcs11_key_label": "k", "pkcs11_pin_env": "QPHER_PIN"}
    del kek[missing]
    with pytest.raises(ConfigError, match=rf"kms\.kek\.{missing}: expected a value when provider is"):
        config_from_dict({"kms": {"kek": kek}}, tmp_path)


def test_a_pkcs11_kek_config_resolves_its_paths(tmp_path: Path) -> None:
    cfg = _load(tmp_path, (_PKCS11 % ", pkcs11_pin_file: secrets/pin").replace("/usr/lib/softhsm/", ""))
    assert cfg.kms.kek.provider == "pkcs11"
    assert cfg.kms.kek.pkcs11_pin_file == str(tmp_path / "secrets" / "pin")
    assert cfg.kms.kek.pkcs11_module == str(tmp_path / "libsofthsm2.so")
    assert cfg.kms.kek.pkcs11_pin_env is None
