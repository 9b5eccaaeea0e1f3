"""API keys: the keys file is loaded strictly (a bad entry is named, never half-loaded), and a call
is authenticated only by a known ``Bearer`` key."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.gateway.auth import (
    ApiKeys,
    AuthError,
    KeysFileError,
    Tenant,
    sha256_hex,
)

KEY = "sk-test-alpha"
OTHER_KEY = "sk-test-beta"


def keys_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "keys.toml"
    path.write_text(text)
    return path


def load(tmp_path: Path, text: str) -> ApiKeys:
    return ApiKeys.load(keys_file(tmp_path, text))


def bearer(key: str) -> list[tuple[str, str]]:
    return [("user-agent", "test"), ("authorization", f"Bearer {key}")]


def assert_load_fails(tmp_path: Path, text: str, *fragments: str) -> None:
    path = keys_file(tmp_path, text)
    with pytest.raises(KeysFileError) as info:
        ApiKeys.load(path)
    message = str(info.value)
    assert str(path) in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_plain_key_names_its_tenant(tmp_path: Path) -> None:
    keys = load(tmp_path, f'[[keys]]\ntenant = "alpha"\nkey = "{KEY}"\n')
    tenant = keys.authenticate(bearer(KEY))
    assert tenant == Tenant("alpha", frozenset({"*"}), admin=False)


def test_hashed_key_names_its_tenant(tmp_path: Path) -> None:
    keys = load(tmp_path, f"""
[[keys]]
tenant = "alpha"
key_sha256 = "{sha256_hex(KEY)}"
[[keys]]
tenant = "beta"
key_sha256 = "{sha256_hex(OTHER_KEY).upper()}"
models = ["small", "large"]
admin = true
""")
    assert keys.authenticate(bearer(KEY)).name == "alpha"
    beta = keys.authenticate(bearer(OTHER_KEY))  # upper-case hex is accepted
    assert beta == Tenant("beta", frozenset({"small", "large"}), admin=True)


def test_keys_file_does_not_hold_usable_secrets_when_hashed(tmp_path: Path) -> None:
    path = keys_file(tmp_path, f'[[keys]]\ntenant = "a"\nkey_sha256 = "{sha256_hex(KEY)}"\n')
    assert KEY not in path.read_text()
    assert ApiKeys.load(path).authenticate(bearer(KEY)).name == "a"


@pytest.mark.parametrize(("text", "fragments"), [
    pytest.param(
        f'[[keys]]\ntenant = "a"\nkey = "{KEY}"\n[[keys]]\nkey = "{OTHER_KEY}"\n',
        ("keys[1]", "tenant"), id="missing tenant"),
    pytest.param(f'[[keys]]\ntenant = ""\nkey = "{KEY}"\n', ("keys[0]", "tenant"),
                 id="empty tenant"),
    pytest.param(f'[[keys]]\ntenant = 7\nkey = "{KEY}"\n', ("keys[0]", "tenant"),
                 id="tenant not a string"),
    pytest.param('[[keys]]\ntenant = "a"\n', ("keys[0]", "key_sha256"), id="no key at all"),
    pytest.param('[[keys]]\ntenant = "a"\nkey_sha256 = "abc123"\n', ("keys[0]", "64 hex"),
                 id="short digest"),
    pytest.param(f'[[keys]]\ntenant = "a"\nkey_sha256 = "{"z" * 64}"\n', ("keys[0]", "64 hex"),
                 id="digest not hex"),
    pytest.param(f'[[keys]]\ntenant = "a"\nkey = "{KEY}"\nmodels = "small"\n',
                 ("keys[0]", "models"), id="models not a list"),
    pytest.param(f'[[keys]]\ntenant = "a"\nkey = "{KEY}"\nmodels = ["small", 3]\n',
                 ("keys[0]", "models"), id="models not strings"),
    pytest.param(f'[[keys]]\ntenant = "a"\nkey = "{KEY}"\nadmin = "false"\n',
                 ("keys[0]", "admin"), id="admin not a boolean"),
    pytest.param(
        f'[[keys]]\ntenant = "a"\nkey = "{KEY}"\n[[keys]]\ntenant = "b"\nkey = "{KEY}"\n',
        ("keys[1]", "duplicate"), id="duplicate key"),
    pytest.param(
        f'[[keys]]\ntenant = "a"\nkey = "{KEY}"\n'
        f'[[keys]]\ntenant = "b"\nkey_sha256 = "{sha256_hex(KEY)}"\n',
        ("keys[1]", "duplicate"), id="duplicate key, once plain once hashed"),
    pytest.param(f'[keys]\ntenant = "a"\nkey = "{KEY}"\n', ("[[keys]]",),
                 id="a table instead of an array of tables"),
    pytest.param("keys = [1]\n", ("keys[0]", "table"), id="entry not a table"),
    pytest.param(f'[[keys]\ntenant = "a"\nkey = "{KEY}"\n', ("cannot read",), id="bad TOML"),
    pytest.param("", ("no [[keys]] entries",), id="empty file"),
    pytest.param('[[other]]\ntenant = "a"\n', ("no [[keys]] entries",), id="no keys"),
])
def test_bad_keys_file_is_rejected_naming_the_entry(tmp_path, text, fragments) -> None:
    assert_load_fails(tmp_path, text, *fragments)


def test_missing_keys_file_is_a_keys_file_error(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(KeysFileError, match="cannot read API keys file"):
        ApiKeys.load(path)


@pytest.fixture
def keys(tmp_path: Path) -> ApiKeys:
    return load(tmp_path, f"""
[[keys]]
tenant = "alpha"
key = "{KEY}"
models = ["small"]
""")


@pytest.mark.parametrize(("metadata", "fragment"), [
    pytest.param(None, "missing authorization", id="no metadata"),
    pytest.param([], "missing authorization", id="empty metadata"),
    pytest.param([("x-api-key", KEY)], "missing authorization", id="other header"),
    pytest.param([("authorization", KEY)], "Bearer", id="no scheme"),
    pytest.param([("authorization", f"Basic {KEY}")], "Bearer", id="Basic scheme"),
    pytest.param([("authorization", "Bearer")], "Bearer", id="Bearer without key"),
    pytest.param([("authorization", "Bearer   ")], "Bearer", id="Bearer blank key"),
    pytest.param([("authorization", "Bearer sk-test-alpha2")], "unknown API key",
                 id="unknown key"),
    pytest.param([("authorization", f"Bearer {KEY[:-1]}")], "unknown API key",
                 id="prefix of a key"),
])
def test_call_without_a_known_bearer_key_is_rejected(keys, metadata, fragment) -> None:
    with pytest.raises(AuthError) as info:
        keys.authenticate(metadata)
    assert fragment in str(info.value)
    assert KEY not in str(info.value)  # errors never echo a secret


def test_right_key_authenticates_whatever_the_scheme_case(keys: ApiKeys) -> None:
    assert keys.authenticate(bearer(KEY)).name == "alpha"
    assert keys.authenticate([("authorization", f"bearer {KEY}")]).name == "alpha"
    assert keys.authenticate(tuple(bearer(KEY))).name == "alpha"


def test_models_allow_list_limits_what_a_tenant_may_use(keys: ApiKeys) -> None:
    tenant = keys.authenticate(bearer(KEY))
    assert tenant.may_use("small")
    assert not tenant.may_use("large")
    assert not tenant.may_use("")


def test_wildcard_tenant_may_use_every_model() -> None:
    tenant = Tenant("t", frozenset({"*"}))
    assert tenant.may_use("small") and tenant.may_use("anything-else")
    assert not Tenant("none", frozenset()).may_use("small")
