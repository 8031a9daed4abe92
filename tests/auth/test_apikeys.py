"""API keys: format, pepper file, storage without secrets, identical 401s, revocation < 1 s."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qpher_proxy.audit import AuditLog, verify
from qpher_proxy.auth import (
    KEY_SCAN_PATTERN,
    APIKeyStore,
    Authenticator,
    generate_pepper_file,
    load_pepper,
    parse_expiry,
)
from qpher_proxy.errors import ConfigError, InvalidInput, NotFound, QpherError, Unauthenticated

T0 = 1_750_000_000.0


class FakeClock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


@pytest.fixture
def pepper(tmp_path: Path) -> bytes:
    generate_pepper_file(tmp_path / "secrets" / "pepper")
    return load_pepper(tmp_path / "secrets" / "pepper")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(tmp_path: Path, pepper: bytes, clock: FakeClock):  # type: ignore[no-untyped-def]
    with APIKeyStore(tmp_path / "gateway.db", pepper, clock=clock) as s:
        yield s


# ---- format and storage -------------------------------------------------------------------

def test_key_format_matches_the_scanner_pattern(store: APIKeyStore) -> None:
    record, key = store.create("acme", "pro", scopes=["sign", "kem"], label="ci")
    assert re.fullmatch(KEY_SCAN_PATTERN, key)
    prefix, key_id, secret = key.split("_")
    assert prefix == "qph" and key_id == record.key_id and len(key_id) == 12
    assert len(secret) >= 32 and len(secret) * 5.95 >= 190  # base62: log2(62) ≈ 5.95 bits/char
    assert (record.tenant, record.plan, record.scopes, record.label) == ("acme", "pro", ("sign", "kem"), "ci")
    assert record.created_at == T0 and record.expires_at is None and record.revoked_at is None


def test_keys_are_random_and_distinct(store: APIKeyStore) -> None:
    keys = {store.create("acme", "free")[1] for _ in range(20)}
    assert len(keys) == 20
    assert len({k.split("_")[1] for k in keys}) == 20


def test_database_never_holds_the_key(tmp_path: Path, store: APIKeyStore) -> None:
    record, key = store.create("acme", "pro")
    secret = key.split("_")[2]
    blobs = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("gateway.db"))
    assert record.key_id.encode() in blobs
    assert secret.encode() not in blobs and key.encode() not in blobs
    for p in tmp_path.iterdir():
        if p.name.startswith("gateway.db"):
            assert p.stat().st_mode & 0o077 == 0, p


def test_list_get_and_repr_never_show_secrets(store: APIKeyStore, clock: FakeClock) -> None:
    r1, k1 = store.create("acme", "pro", label="one")
    clock.advance(1)
    r2, k2 = store.create("globex", "free")
    listed = store.list()
    assert listed == [r1, r2]  # oldest first
    assert store.list(tenant="globex") == [r2]
    assert store.get(r1.key_id) == r1 and store.get("zzzzzzzzzzzz") is None
    text = repr(listed) + repr(store) + str([r.to_dict() for r in listed])
    for key in (k1, k2):
        assert key.split("_")[2] not in text


def test_create_validates_its_inputs(store: APIKeyStore, clock: FakeClock) -> None:
    for bad in [
        dict(tenant="", plan="pro"),
        dict(tenant="a b", plan="pro"),
        dict(tenant="acme", plan="pro\n"),
        dict(tenant="acme", plan="pro", scopes="admin"),
        dict(tenant="acme", plan="pro", scopes=["bad scope"]),
        dict(tenant="acme", plan="pro", expires_at=T0 - 1),
        dict(tenant="acme", plan="pro", expires_at=float("inf")),
        dict(tenant="acme", plan="pro", label="x" * 129),
        dict(tenant="acme", plan="pro", label="qph_abcdefghijkl_" + "a" * 40),
    ]:
        with pytest.raises(InvalidInput):
            store.create(**bad)  # type: ignore[arg-type]
    assert store.list() == []


def test_revoke(store: APIKeyStore, clock: FakeClock) -> None:
    record, _ = store.create("acme", "pro")
    clock.advance(5)
    revoked = store.revoke(record.key_id)
    assert revoked.revoked_at == T0 + 5 and revoked.status(clock()) == "revoked"
    clock.advance(5)
    assert store.revoke(record.key_id).revoked_at == T0 + 5  # idempotent
    with pytest.raises(NotFound):
        store.revoke("zzzzzzzzzzzz")


def test_lifecycle_events_are_audited_and_a_failed_audit_rolls_back(tmp_path: Path, pepper: bytes) -> None:
    with (
        AuditLog(tmp_path / "audit.log") as audit,
        APIKeyStore(tmp_path / "g.db", pepper, audit=audit) as store,
    ):
        record, key = store.create("acme", "pro", scopes=["sign"], label="ci")
        store.revoke(record.key_id)
    text = (tmp_path / "audit.log").read_text()
    assert '"event":"apikey.created"' in text and '"event":"apikey.revoked"' in text
    assert record.key_id in text and key.split("_")[2] not in text
    assert verify([tmp_path / "audit.log"]).ok

    def broken_audit(event: str, severity: str, **fields: object) -> None:
        raise QpherError("audit log cannot be written", code="audit_unavailable", status=503)

    with APIKeyStore(tmp_path / "g.db", pepper, audit=broken_audit) as store:
        with pytest.raises(QpherError):
            store.create("acme", "pro")
        assert len(store.list()) == 1


# ---- pepper file --------------------------------------------------------------------------

def test_pepper_file_is_private_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "pepper"
    generate_pepper_file(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    pepper = load_pepper(path)
    assert len(pepper) == 32
    with pytest.raises(ConfigError):
        generate_pepper_file(path)
    assert load_pepper(path) == pepper


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_pepper_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "pepper"
    generate_pepper_file(path)
    os.chmod(path, mode)
    with pytest.raises(ConfigError) as info:
        load_pepper(path)
    assert "chmod 600" in info.value.message


def test_pepper_of_wrong_size_or_kind_is_refused(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_bytes(b"x" * 31)
    os.chmod(short, 0o600)
    with pytest.raises(ConfigError):
        load_pepper(short)
    with pytest.raises(ConfigError):
        load_pepper(tmp_path)  # a directory
    with pytest.raises(ConfigError):
        load_pepper(tmp_path / "missing")
    with pytest.raises(ConfigError):
        APIKeyStore(tmp_path / "g.db", b"too short")


# ---- authentication -----------------------------------------------------------------------

def test_authenticate_returns_the_record(store: APIKeyStore, clock: FakeClock) -> None:
    record, key = store.create("acme", "pro", scopes=["sign"])
    auth = Authenticator(store, clock)
    assert auth.authenticate(key) == record
    assert auth.authenticate(key) == record  # from the cache


def test_every_401_cause_is_the_same_error(store: APIKeyStore, clock: FakeClock) -> None:
    good, key = store.create("acme", "pro")
    expiring, key_exp = store.create("acme", "pro", expires_at=T0 + 10)
    revoked, key_rev = store.create("acme", "pro")
    store.revoke(revoked.key_id)
    auth = Authenticator(store, clock)
    clock.advance(10)  # key_exp expires exactly now
    key_id, secret = key.split("_")[1:]
    other_secret = ("B" if secret[0] != "B" else "C") + secret[1:]
    causes = {
        "missing": None,
        "malformed": "hello",
        "malformed-prefix": "qpx_" + key[4:],
        "malformed-short": key[:30],
        "malformed-bearer": "Bearer " + key,
        "unknown_key": f"qph_zzzzzzzzzzzz_{secret}",
        "bad_secret": f"qph_{key_id}_{other_secret}",
        "expired": key_exp,
        "revoked": key_rev,
    }
    seen = {}
    for cause, presented in causes.items():
        with pytest.raises(Unauthenticated) as info:
            auth.authenticate(presented)
        e = info.value
        seen[cause] = (e.code, e.status, e.message, str(e), repr(e), e.headers)
        assert e.reason == cause.split("-")[0]
        # nothing secret in what could be shown or logged
        for s in (str(e), repr(e)):
            assert secret not in s and other_secret not in s
    assert len(set(seen.values())) == 1, seen
    code, status, message, *_ , headers = next(iter(seen.values()))
    assert (code, status) == ("unauthenticated", 401)
    assert headers == ((b"www-authenticate", b'Bearer realm="qpher"'),)
    assert auth.authenticate(key) == good


def test_unknown_key_id_still_computes_the_mac(store: APIKeyStore, clock: FakeClock,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Same work for a wrong id as for a wrong secret: the MAC is computed and compared."""
    _, key = store.create("acme", "pro")
    auth = Authenticator(store, clock)
    calls: list[str] = []
    real_mac = store.mac

    def counting_mac(key_id: str, secret: str) -> bytes:
        calls.append(key_id)
        return real_mac(key_id, secret)

    monkeypatch.setattr(store, "mac", counting_mac)
    with pytest.raises(Unauthenticated):
        auth.authenticate("qph_zzzzzzzzzzzz_" + key.split("_")[2])
    assert calls == ["zzzzzzzzzzzz"]


def test_expiry_with_a_fake_clock(store: APIKeyStore, clock: FakeClock) -> None:
    record, key = store.create("acme", "pro", expires_at=T0 + 60)
    auth = Authenticator(store, clock)
    clock.advance(59.9)
    assert auth.authenticate(key) == record
    clock.advance(0.1)
    with pytest.raises(Unauthenticated) as info:
        auth.authenticate(key)
    assert info.value.reason == "expired"


def test_revocation_by_another_connection_is_seen_within_the_ttl(tmp_path: Path, pepper: bytes,
                                                                   clock: FakeClock) -> None:
    """The CLI (its own store and connection) revokes; the running proxy stops accepting the
    key at the latest ``ttl`` (1 s) later."""
    with APIKeyStore(tmp_path / "g.db", pepper, clock=clock) as cli, \
            APIKeyStore(tmp_path / "g.db", pepper, clock=clock) as proxy_store:
        record, key = cli.create("acme", "pro")
        other, other_key = cli.create("acme", "pro")
        proxy = Authenticator(proxy_store, clock, ttl=1.0)
        assert proxy.authenticate(key) == record
        assert proxy.authenticate(other_key) == other
        cli.revoke(record.key_id)
        clock.advance(1.0)
        with pytest.raises(Unauthenticated) as info:
            proxy.authenticate(key)
        assert info.value.reason == "revoked"
        assert proxy.authenticate(other_key) == other  # other keys are unaffected


def test_revocation_through_the_same_store_is_seen_within_the_ttl(
    store: APIKeyStore, clock: FakeClock
) -> None:
    record, key = store.create("acme", "pro")
    auth = Authenticator(store, clock, ttl=0.5)
    auth.authenticate(key)
    store.revoke(record.key_id)
    clock.advance(0.5)
    with pytest.raises(Unauthenticated):
        auth.authenticate(key)


def test_a_key_created_by_another_process_after_a_miss_is_found(tmp_path: Path, pepper: bytes,
                                                                clock: FakeClock) -> None:
    with APIKeyStore(tmp_path / "g.db", pepper, clock=clock) as proxy_store:
        proxy = Authenticator(proxy_store, clock, ttl=1.0)
        with pytest.raises(Unauthenticated):
            proxy.authenticate("qph_aaaaaaaaaaaa_" + "x" * 43)  # warms the negative cache
        with APIKeyStore(tmp_path / "g.db", pepper, clock=clock) as cli:
            record, key = cli.create("acme", "pro")
        clock.advance(1.0)
        assert proxy.authenticate(key) == record


def test_clock_stepping_back_revalidates(tmp_path: Path, pepper: bytes, clock: FakeClock) -> None:
    with APIKeyStore(tmp_path / "g.db", pepper, clock=clock) as cli, \
            APIKeyStore(tmp_path / "g.db", pepper, clock=clock) as proxy_store:
        record, key = cli.create("acme", "pro")
        proxy = Authenticator(proxy_store, clock, ttl=1.0)
        proxy.authenticate(key)
        cli.revoke(record.key_id)
        clock.advance(-3600)  # NTP steps the wall clock back an hour
        with pytest.raises(Unauthenticated):
            proxy.authenticate(key)


def test_revocation_by_a_real_cli_process(tmp_path: Path, pepper: bytes) -> None:
    """Real processes, real clock: a key revoked by another process stops working on a
    running authenticator within one second (ttl 0.2 s here; no sleep: we poll the clock)."""
    import time

    db = tmp_path / "g.db"
    with APIKeyStore(db, pepper) as proxy_store:
        record, key = proxy_store.create("acme", "pro")
        proxy = Authenticator(proxy_store, ttl=0.2)
        proxy.authenticate(key)
        script = textwrap.dedent(
            f"""
            from qpher_proxy.auth import APIKeyStore, load_pepper
            with APIKeyStore({str(db)!r}, load_pepper({str(tmp_path / 'secrets' / 'pepper')!r})) as s:
                s.revoke({record.key_id!r})
            """
        )
        subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
        revoked_at = time.monotonic()
        refused_at = None
        while time.monotonic() - revoked_at < 1.0:
            try:
                proxy.authenticate(key)
            except Unauthenticated as exc:
                assert exc.reason == "revoked"
                refused_at = time.monotonic()
                break
        assert refused_at is not None and refused_at - revoked_at < 1.0


def test_ttl_above_one_second_is_refused(store: APIKeyStore) -> None:
    with pytest.raises(ConfigError):
        Authenticator(store, ttl=1.5)


def test_negative_cache_is_bounded(store: APIKeyStore, clock: FakeClock) -> None:
    auth = Authenticator(store, clock, max_cache_entries=8)
    for i in range(50):
        with pytest.raises(Unauthenticated):
            auth.authenticate(f"qph_{i:012d}_" + "x" * 43)
    assert len(auth._cache) <= 8


def test_parse_expiry() -> None:
    assert parse_expiry("90d", T0) == T0 + 90 * 86_400
    assert parse_expiry("12h", T0) == T0 + 12 * 3600
    assert parse_expiry("2030-01-31", T0) == 1_896_048_000.0
    assert parse_expiry("2030-01-31T12:00:00Z", T0) == 1_896_048_000.0 + 43_200
    with pytest.raises(InvalidInput):
        parse_expiry("soon", T0)


def test_errors_never_echo_a_key_pasted_into_the_wrong_place(store: APIKeyStore) -> None:
    _, key = store.create("acme", "pro")
    for call in (lambda: store.revoke(key), lambda: store.create(key, "pro"),
                 lambda: store.create("acme", "pro", scopes=[key]), lambda: parse_expiry(key, T0)):
        with pytest.raises(QpherError) as info:
            call()
        assert key.split("_")[2] not in str(info.value) + repr(info.value)
