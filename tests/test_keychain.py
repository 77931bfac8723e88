"""Credential storage: the 0600 file and the macOS Keychain (through the stand-in `security`)."""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon import keychain
from daemon.errors import CredentialsError
from daemon.keychain import Credentials, delete_credentials, load_credentials, store_secret

KEY_ID = "AKIAEXAMPLEKEY123456"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY"


def calls() -> list[dict[str, object]]:
    path = Path(os.environ["FAKE_CALLS_LOG"])
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def fake_keychain_items() -> list[dict[str, str]]:
    state = Path(os.environ["FAKE_SECURITY_STATE"]) / "keychain.json"
    return json.loads(state.read_text()) if state.exists() else []


@pytest.fixture
def cred_file(isolated_user: Path) -> Path:
    return isolated_user / ".config" / "tinyserve-backup" / "credentials"


@pytest.fixture
def no_store_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(keychain.ENV_STORE, raising=False)
    monkeypatch.delenv(keychain.ENV_FILE, raising=False)


@pytest.fixture
def umask() -> Iterator[None]:
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)


# ------------------------------------------------------------------------------------------------
# file backend
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [0o000, 0o022, 0o277])
def test_file_store_is_0600_whatever_the_umask(
    cred_file: Path, no_store_env: None, umask: None, mask: int
) -> None:
    os.umask(mask)
    where = store_secret(KEY_ID, SECRET, backend="file")
    assert where == str(cred_file)
    assert stat.S_IMODE(cred_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(cred_file.parent.stat().st_mode) & 0o077 == 0
    assert load_credentials(backend="file") == (KEY_ID, SECRET)


def test_private_dirs_are_usable_whatever_the_umask(tmp_path: Path, umask: None) -> None:
    """Under umask 0277, mkdir -p made the parents 0500: a non-root user then could not create
    the next directory down (as root the test of the store above passes regardless)."""
    from daemon.fsutil import make_private_dirs

    os.umask(0o277)
    make_private_dirs(tmp_path / "u" / ".config" / "tinyserve-backup")
    for d in ("u", "u/.config", "u/.config/tinyserve-backup"):
        assert stat.S_IMODE((tmp_path / d).stat().st_mode) == 0o700, d
    make_private_dirs(tmp_path / "u" / ".config" / "tinyserve-backup")  # already there: fine


def test_file_roundtrip_default_backend_on_linux(cred_file: Path, no_store_env: None) -> None:
    # The stand-in `security` is on PATH, but off macOS the file is the default store.
    assert sys.platform != "darwin"
    assert load_credentials() is None
    store_secret(KEY_ID, SECRET)
    assert cred_file.exists()
    creds = load_credentials()
    assert creds == Credentials(KEY_ID, SECRET)
    key_id, secret = creds  # plain tuple unpacking, as storage.py does
    assert (key_id, secret) == (KEY_ID, SECRET)
    assert not [c for c in calls() if c["prog"] == "security"]


def test_file_replace_is_atomic_and_leaves_no_temp_files(cred_file: Path, no_store_env: None) -> None:
    store_secret(KEY_ID, SECRET, backend="file")
    os.chmod(cred_file, 0o644)  # an old, too-open file is replaced by a private one
    store_secret("AKIANEWKEY0000000000", "n3w/secret+value", backend="file")
    assert stat.S_IMODE(cred_file.stat().st_mode) == 0o600
    assert sorted(p.name for p in cred_file.parent.iterdir()) == ["credentials"]
    assert load_credentials(backend="file") == ("AKIANEWKEY0000000000", "n3w/secret+value")


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_file_with_group_or_other_bits_is_refused(cred_file: Path, no_store_env: None, mode: int) -> None:
    store_secret(KEY_ID, SECRET, backend="file")
    os.chmod(cred_file, mode)
    with pytest.raises(CredentialsError) as info:
        load_credentials(backend="file")
    err = info.value
    assert f"chmod 600 {cred_file}" in err.fix
    assert f"{mode:04o}" in err.message
    assert SECRET not in err.one_line()


def test_file_is_aws_shared_credentials_format(cred_file: Path, no_store_env: None) -> None:
    """A person can use the file by hand with any AWS tool (AWS_SHARED_CREDENTIALS_FILE)."""
    import botocore.session

    store_secret(KEY_ID, SECRET, backend="file")
    os.environ.pop("AWS_ACCESS_KEY_ID", None)
    os.environ.pop("AWS_SECRET_ACCESS_KEY", None)
    os.environ["AWS_SHARED_CREDENTIALS_FILE"] = str(cred_file)
    os.environ["AWS_CONFIG_FILE"] = str(cred_file.parent / "no-such-config")
    try:
        found = botocore.session.Session().get_credentials()
    finally:
        os.environ.pop("AWS_SHARED_CREDENTIALS_FILE")
        os.environ.pop("AWS_CONFIG_FILE")
    assert found is not None
    assert (found.access_key, found.secret_key) == (KEY_ID, SECRET)


def test_broken_file_error_never_quotes_the_secret(cred_file: Path, no_store_env: None) -> None:
    cred_file.parent.mkdir(parents=True)
    fd = os.open(cred_file, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, f"[default]\naws_access_key_id = {KEY_ID}\n{SECRET}\n".encode())
    os.close(fd)
    with pytest.raises(CredentialsError) as info:
        load_credentials(backend="file")
    assert "line 3" in info.value.message
    assert SECRET not in info.value.one_line()
    assert SECRET not in repr(info.value.__cause__) if info.value.__cause__ else True


def test_file_missing_key_is_named(cred_file: Path, no_store_env: None) -> None:
    cred_file.parent.mkdir(parents=True)
    fd = os.open(cred_file, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, f"[default]\naws_access_key_id = {KEY_ID}\n".encode())
    os.close(fd)
    with pytest.raises(CredentialsError, match="aws_secret_access_key"):
        load_credentials(backend="file")


def test_credentials_path_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "elsewhere" / "creds"
    monkeypatch.setenv(keychain.ENV_FILE, str(target))
    monkeypatch.setenv(keychain.ENV_STORE, "file")
    assert store_secret(KEY_ID, SECRET) == str(target)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert load_credentials() == (KEY_ID, SECRET)
    assert delete_credentials() is True
    assert not target.exists()
    assert load_credentials() is None


def test_profile_means_default_chain(cred_file: Path, no_store_env: None) -> None:
    """An AWS profile (maybe with credential_process) always beats stored keys."""
    store_secret(KEY_ID, SECRET, backend="file")
    assert load_credentials(profile="work") is None


def test_repr_hides_secret() -> None:
    creds = Credentials(KEY_ID, SECRET)
    assert SECRET not in repr(creds)
    assert SECRET not in str(creds)
    assert SECRET not in f"{creds}"
    assert KEY_ID in repr(creds)


@pytest.mark.parametrize("bad", ["", "two\nlines", " padded", "nul\0byte"])
def test_unstorable_values_are_refused(no_store_env: None, bad: str) -> None:
    with pytest.raises(CredentialsError):
        store_secret(KEY_ID, bad, backend="file")
    with pytest.raises(CredentialsError):
        store_secret(KEY_ID, bad, backend="keychain")
    assert not calls()


# ------------------------------------------------------------------------------------------------
# Keychain backend (stand-in `security` from tests/fakes)
# ------------------------------------------------------------------------------------------------


def test_keychain_roundtrip_secret_never_in_argv(no_store_env: None) -> None:
    where = store_secret(KEY_ID, SECRET, backend="keychain")
    assert "Keychain" in where
    assert load_credentials(backend="keychain") == (KEY_ID, SECRET)
    items = fake_keychain_items()
    assert [(i["account"], i["service"], i["password"]) for i in items] == [
        (KEY_ID, keychain.SERVICE, SECRET)
    ]
    recorded = [c for c in calls() if c["prog"] == "security"]
    assert recorded, "the stand-in security was not called"
    assert ["-i"] in [c["args"] for c in recorded]  # the write went through interactive mode
    for call in recorded:
        assert SECRET not in json.dumps(call["args"])


@pytest.mark.parametrize(
    "secret",
    [
        'with "double" quotes',
        "back\\slash\\\\end\\",
        "spaces  inside",
        "$HOME and `tick` 'single'",
        "ünïcødé+/=",
    ],
)
def test_keychain_quoting_roundtrips(no_store_env: None, secret: str) -> None:
    store_secret(KEY_ID, secret, backend="keychain")
    assert load_credentials(backend="keychain") == (KEY_ID, secret)
    for call in calls():
        assert secret not in json.dumps(call["args"], ensure_ascii=False)


def test_keychain_new_key_replaces_old_item(no_store_env: None) -> None:
    store_secret(KEY_ID, SECRET, backend="keychain")
    store_secret("AKIAROTATED000000000", "rotated-secret", backend="keychain")
    items = fake_keychain_items()
    assert [(i["account"], i["password"]) for i in items] == [("AKIAROTATED000000000", "rotated-secret")]
    assert load_credentials(backend="keychain") == ("AKIAROTATED000000000", "rotated-secret")


def test_keychain_delete(no_store_env: None) -> None:
    store_secret(KEY_ID, SECRET, backend="keychain")
    assert delete_credentials(backend="keychain") is True
    assert fake_keychain_items() == []
    assert load_credentials(backend="keychain") is None
    assert delete_credentials(backend="keychain") is False


def test_keychain_failure_message_is_scrubbed(no_store_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    # A tool that echoed its input back in an error would leak the secret into our message.
    monkeypatch.setenv("FAKE_SECURITY_EXIT", "1")
    monkeypatch.setenv("FAKE_SECURITY_STDERR", f"security: add-generic-password -w {SECRET}: failed")
    with pytest.raises(CredentialsError) as info:
        store_secret(KEY_ID, SECRET, backend="keychain")
    assert SECRET not in info.value.one_line()
    # The direct path scrubs too, for the `security -i` call itself.
    monkeypatch.setenv("FAKE_SECURITY_EXIT_FIND_GENERIC_PASSWORD", "44")
    with pytest.raises(CredentialsError) as info:
        keychain._keychain_store(KEY_ID, SECRET)
    assert SECRET not in info.value.one_line()


def test_keychain_read_error_is_clear(no_store_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    store_secret(KEY_ID, SECRET, backend="keychain")
    monkeypatch.setenv("FAKE_SECURITY_EXIT_FIND_GENERIC_PASSWORD", "51")
    monkeypatch.setenv("FAKE_SECURITY_STDERR", "security: User interaction is not allowed.")
    with pytest.raises(CredentialsError) as info:
        load_credentials(backend="keychain")
    assert "User interaction is not allowed" in info.value.message
    assert "unlock-keychain" in info.value.fix


def test_macos_default_is_keychain_then_file(
    cred_file: Path, no_store_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    assert keychain.select_backend() == "keychain"
    # Nothing in the Keychain: a credentials file a person wrote by hand still works.
    store_secret(KEY_ID, SECRET, backend="file")
    assert load_credentials() == (KEY_ID, SECRET)
    store_secret("AKIAKEYCHAIN00000000", "from-keychain")
    assert load_credentials() == ("AKIAKEYCHAIN00000000", "from-keychain")
    assert delete_credentials() is True
    assert fake_keychain_items() == []
    assert not cred_file.exists()


def test_keychain_needs_security_on_path(no_store_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(sys, "platform", "darwin")
    assert keychain.select_backend() == "file"
    with pytest.raises(CredentialsError, match="security"):
        keychain.select_backend("keychain")
    monkeypatch.setenv(keychain.ENV_STORE, "vault")
    with pytest.raises(CredentialsError, match="vault"):
        keychain.select_backend()


def test_parse_account_forms() -> None:
    assert keychain._parse_account('    "acct"<blob>="AKIA1"\n') == "AKIA1"
    assert keychain._parse_account('    "acct"<blob>=<NULL>\n') is None
    assert keychain._parse_account('    "acct"<blob>=0x414B494132  "AKIA2"\n') == "AKIA2"
    assert keychain._parse_account('    "svce"<blob>="x"\n') is None
