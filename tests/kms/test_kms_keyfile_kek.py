"""Key files (AES-256-GCM under the KEK, bound to their slot) and the KEK providers."""

from __future__ import annotations

import base64
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from qpher_proxy.errors import KeyCorrupt, KeyUnavailable
from qpher_proxy.kms.worker import keyfile
from qpher_proxy.kms.worker.kek import (
    EnvKEKProvider,
    FileKEKProvider,
    KEKError,
    KEKMismatch,
    KEKProvider,
    LocalKEKProvider,
    UnwrapFailed,
    generate_kek_file,
    kek_from_fd,
    seal_canary,
    verify_canary,
)
from qpher_proxy.kms.worker.keyfile import KeyBinding

SEED = secrets.token_bytes(64)
BINDING = KeyBinding("tenant-a", "k_" + "a" * 26, 1, "ml-kem-768")


MakeKEK = Callable[[], KEKProvider]


def provider() -> LocalKEKProvider:
    return LocalKEKProvider(secrets.token_bytes(32), "test")


# The provider-level tests run for every provider (``make_kek``, tests/kms/conftest.py): file,
# env and pkcs11 (a non-extractable AES-256 key in a SoftHSM2 token).


def test_a_sealed_key_file_opens_only_in_its_own_slot(make_kek: MakeKEK) -> None:
    kek = make_kek()
    data = keyfile.seal(kek, BINDING, SEED)
    assert keyfile.unseal(kek, BINDING, data) == SEED
    assert SEED not in data
    header = keyfile.parse_header(data, "x")
    assert header.kek_id == kek.kek_id and data[:4] == b"QPKF"
    assert len(data) == header.body_offset + 12 + len(SEED) + 16  # nonce || ct || tag
    for other in (
        KeyBinding("tenant-b", BINDING.key_id, 1, "ml-kem-768"),  # another tenant's slot
        KeyBinding("tenant-a", "k_" + "b" * 26, 1, "ml-kem-768"),  # another key's slot
        KeyBinding("tenant-a", BINDING.key_id, 2, "ml-kem-768"),  # another version
        KeyBinding("tenant-a", BINDING.key_id, 1, "ml-kem-1024"),  # relabelled algorithm
    ):
        with pytest.raises(KeyCorrupt, match="failed authentication"):
            keyfile.unseal(kek, other, data)


def test_every_single_bit_flip_is_detected_for_that_key(make_kek: MakeKEK) -> None:
    kek = make_kek()
    data = keyfile.seal(kek, BINDING, SEED)
    for i in range(len(data)):
        for bit in (0, 7):
            bad = bytearray(data)
            bad[i] ^= 1 << bit
            with pytest.raises((KeyCorrupt, KeyUnavailable)) as info:
                keyfile.unseal(kek, BINDING, bytes(bad))
            assert BINDING.key_id in info.value.message
            assert SEED.hex() not in info.value.message


def test_nonces_are_fresh_for_every_seal(make_kek: MakeKEK) -> None:
    kek = make_kek()
    a, b = keyfile.seal(kek, BINDING, SEED), keyfile.seal(kek, BINDING, SEED)
    off = keyfile.parse_header(a, "x").body_offset
    assert a[off : off + 12] != b[off : off + 12] and a != b


def test_a_file_under_another_kek_is_unavailable_not_corrupt(make_kek: MakeKEK) -> None:
    data = keyfile.seal(make_kek(), BINDING, SEED)
    with pytest.raises(KeyUnavailable, match="wrapped by KEK"):
        keyfile.unseal(make_kek(), BINDING, data)


def test_kek_ids_name_the_key_not_the_opening(make_kek: MakeKEK) -> None:
    a, b = make_kek(), make_kek()
    assert a.kek_id != b.kek_id
    for kek in (a, b):
        assert 1 <= len(kek.kek_id) <= 64 and kek.kek_id.isascii() and kek.kek_id in repr(kek)


def test_the_wrapped_blob_is_bound_to_its_aad_and_never_holds_the_plaintext(make_kek: MakeKEK) -> None:
    kek = make_kek()
    blob = kek.wrap(SEED, b"aad one")
    assert SEED not in blob and kek.unwrap(blob, b"aad one") == SEED
    for bad_aad, bad_blob in ((b"aad two", blob), (b"aad one", blob[:-1]), (b"aad one", blob[:27]),
                              (b"aad one", b"")):
        with pytest.raises(UnwrapFailed):
            kek.unwrap(bad_blob, bad_aad)


def test_atomic_write_makes_0600_files_in_0700_dirs_and_leaves_no_temporaries(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        p = tmp_path / "a" / "b" / "v1.qkey"
        keyfile.write_atomic(p, b"one")
        keyfile.write_atomic(p, b"two")
    finally:
        os.umask(old)
    assert p.read_bytes() == b"two"
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert stat.S_IMODE(p.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o700
    assert sorted(os.listdir(p.parent)) == ["v1.qkey"]


def test_reading_a_missing_or_oversized_key_file_fails_for_that_key(tmp_path: Path) -> None:
    with pytest.raises(KeyUnavailable, match="missing"):
        keyfile.read_key_file(tmp_path / "nope", "key 'k_x' version 1")
    big = tmp_path / "big"
    big.write_bytes(b"\0" * (keyfile.MAX_KEY_FILE_BYTES + 1))
    with pytest.raises(KeyCorrupt, match="too large"):
        keyfile.read_key_file(big, "key 'k_x' version 1")


# ---- KEK providers ------------------------------------------------------------------------


def test_generated_kek_file_is_0600_base64_of_32_bytes_and_never_overwritten(tmp_path: Path) -> None:
    p = tmp_path / "kek.b64"
    kek_id = generate_kek_file(p)
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert len(base64.b64decode(p.read_bytes().strip(), validate=True)) == 32
    assert FileKEKProvider(p).kek_id == kek_id
    with pytest.raises(KEKError, match="already exists"):
        generate_kek_file(p)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_a_kek_file_readable_by_group_or_others_is_refused(tmp_path: Path, mode: int) -> None:
    p = tmp_path / "kek.b64"
    generate_kek_file(p)
    p.chmod(mode)
    with pytest.raises(KEKError, match="readable by group or others"):
        FileKEKProvider(p)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty"),
        (b"   \n", "empty"),
        (b"not base64 at all!", "not valid base64"),
        (base64.b64encode(b"x" * 16), "decodes to 16 bytes"),
        (base64.b64encode(b"x" * 33), "decodes to 33 bytes"),
    ],
)
def test_a_bad_kek_file_stops_with_a_clear_message(tmp_path: Path, content: bytes, message: str) -> None:
    p = tmp_path / "kek.b64"
    p.write_bytes(content)
    p.chmod(0o600)
    with pytest.raises(KEKError, match=message) as info:
        FileKEKProvider(p)
    assert str(p) in info.value.message
    if content.strip():
        assert content.decode(errors="replace") not in info.value.message


def test_a_missing_kek_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(KEKError, match="does not exist"):
        FileKEKProvider(tmp_path / "nope")


def test_kek_ids_are_stable_distinct_and_reveal_nothing(tmp_path: Path) -> None:
    raw = secrets.token_bytes(32)
    a, b = LocalKEKProvider(raw, "a"), LocalKEKProvider(raw, "b")
    assert a.kek_id == b.kek_id and a.kek_id != provider().kek_id
    assert raw.hex() not in repr(a) and base64.b64encode(raw).decode() not in repr(a)
    assert raw.hex()[:16] not in a.kek_id


def test_the_env_provider_takes_the_variable_out_of_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = secrets.token_bytes(32)
    monkeypatch.setenv("QPHER_TEST_KEK", base64.b64encode(raw).decode())
    p = EnvKEKProvider("QPHER_TEST_KEK")
    assert "QPHER_TEST_KEK" not in os.environ
    assert p.kek_id == LocalKEKProvider(raw, "x").kek_id
    with pytest.raises(KEKError, match="is not set"):
        EnvKEKProvider("QPHER_TEST_KEK")


def test_kek_from_fd_reads_and_closes_the_descriptor() -> None:
    raw = secrets.token_bytes(32)
    fd = os.memfd_create("t")  # what the supervisor hands to a worker for provider "env"
    os.write(fd, base64.b64encode(raw))
    p = kek_from_fd(fd, "memfd")
    assert p.kek_id == LocalKEKProvider(raw, "x").kek_id
    with pytest.raises(OSError):
        os.fstat(fd)


def test_the_canary_tells_a_wrong_kek_apart(make_kek: MakeKEK) -> None:
    kek = make_kek()
    data = seal_canary(kek)
    verify_canary(kek, data)
    with pytest.raises(KEKMismatch, match="is not the KEK of this key store"):
        verify_canary(make_kek(), data)
    impostor = make_kek()
    n = data[5]
    forged = data[:6] + impostor.kek_id.encode() + data[6 + n :]  # the header now names the impostor
    assert len(impostor.kek_id) == n
    with pytest.raises(KEKMismatch, match="does not open"):
        verify_canary(impostor, forged)
