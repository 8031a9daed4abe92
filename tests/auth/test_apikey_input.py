"""What the admin types about API keys: a whole key read from stdin, a key id, a plan and scopes
checked against the policy, and the record as ``apikey list --json`` prints it."""

from __future__ import annotations

from pathlib import Path

import pytest

from qpher_proxy.auth import (
    PRODUCT_SCOPES,
    APIKeyStore,
    check_grants,
    check_key_id,
    generate_pepper_file,
    load_pepper,
    split_api_key,
)
from qpher_proxy.errors import InvalidInput

T0 = 1_750_000_000.0  # 2025-06-15T15:06:40Z
PLANS = frozenset({"free", "pro"})
SCOPES = PRODUCT_SCOPES | {"billing"}


@pytest.fixture
def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    generate_pepper_file(tmp_path / "pepper")
    with APIKeyStore(tmp_path / "gateway.db", load_pepper(tmp_path / "pepper"), clock=lambda: T0) as s:
        yield s


def test_split_api_key_returns_the_id_and_secret_of_a_created_key(store: APIKeyStore) -> None:
    record, key = store.create("acme", "pro")
    key_id, secret = split_api_key(key + "\n")  # as read from a file or a pipe
    assert key_id == record.key_id
    assert key == f"qph_{key_id}_{secret}"


@pytest.mark.parametrize("text", ["", "qph_", "qph_abcdefghijkl", "Bearer qph_abcdefghijkl_" + "A" * 43,
                                  "qph_ABCDEFGHIJKL_" + "A" * 43, "qph_abcdefghijkl_" + "A" * 10])
def test_split_api_key_refuses_anything_else_without_showing_it(text: str) -> None:
    with pytest.raises(InvalidInput) as info:
        split_api_key(text)
    assert info.value.message == "not an API key (expected qph_<key id>_<secret>)"


def test_check_key_id_accepts_an_id_and_refuses_a_whole_key_without_showing_it(store: APIKeyStore) -> None:
    record, key = store.create("acme", "pro")
    assert check_key_id(record.key_id) == record.key_id
    with pytest.raises(InvalidInput, match="that is a whole API key, not its id") as info:
        check_key_id(key)
    assert key.split("_")[2] not in info.value.message
    for bad in ("", "short", "ABCDEFGHIJKL", "abcdefghijk;", "abcdefghijklm", "'; drop table"):
        with pytest.raises(InvalidInput) as info:
            check_key_id(bad)
        assert (
            info.value.message
            == "not an API key id (expected 12 characters a-z, 0-9, as `apikey list` shows)"
        )


def test_check_grants_accepts_declared_plans_and_known_scopes() -> None:
    check_grants("pro", ["admin", "metrics", "billing"], plans=PLANS, known_scopes=SCOPES)
    check_grants("free", [], plans=PLANS, known_scopes=SCOPES)


def test_an_unknown_plan_is_named_with_the_declared_ones() -> None:
    with pytest.raises(InvalidInput) as info:
        check_grants("nosuchplan", [], plans=PLANS, known_scopes=SCOPES)
    assert info.value.message == "unknown plan 'nosuchplan' (the policy declares: free, pro)"
    with pytest.raises(InvalidInput, match=r"\(the policy declares: none\)$"):
        check_grants("pro", [], plans=frozenset(), known_scopes=SCOPES)


def test_an_unknown_scope_is_named_with_the_known_ones() -> None:
    with pytest.raises(InvalidInput) as info:
        check_grants("pro", ["admin", "bogus"], plans=PLANS, known_scopes=SCOPES)
    assert info.value.message == "unknown scope 'bogus' (known scopes: admin, audit, billing, metrics)"


def test_a_key_pasted_as_a_plan_or_scope_is_not_shown(store: APIKeyStore) -> None:
    _record, key = store.create("acme", "pro")
    for plan, scopes in ((key, []), ("pro", [key])):
        with pytest.raises(InvalidInput) as info:
            check_grants(plan, scopes, plans=PLANS | {key}, known_scopes=SCOPES | {key})
        assert "qph_" not in info.value.message


def test_to_json_has_the_status_and_iso_8601_times(store: APIKeyStore) -> None:
    record, _key = store.create("acme", "pro", ["metrics"], expires_at=T0 + 86_400, label="ci")
    assert record.to_json(T0) == {
        "key_id": record.key_id, "tenant": "acme", "plan": "pro", "scopes": ["metrics"], "status": "active",
        "created_at": "2025-06-15T15:06:40Z", "expires_at": "2025-06-16T15:06:40Z", "revoked_at": None,
        "label": "ci",
    }
    assert record.to_json(T0 + 86_400)["status"] == "expired"
    revoked = store.revoke(record.key_id).to_json(T0)
    assert (revoked["status"], revoked["revoked_at"]) == ("revoked", "2025-06-15T15:06:40Z")
