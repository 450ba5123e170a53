"""The API key store: hashed at rest, checked per request, revocations seen without a restart,
and the `llamafleet keys` commands."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llamafleet.cli import app
from llamafleet.errors import NotFound, PermissionDenied, Unauthenticated
from llamafleet.keys import KeysFileError, KeyStore


def test_keys_are_stored_hashed_and_private(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.json")
    record, key = store.create("alice", requests_per_min=10)
    text = store.path.read_text()
    # The secret is token_urlsafe, so it may hold "_" itself: split off the prefix and id only.
    secret = key.split("_", 2)[2]
    assert key not in text and secret not in text
    assert record.sha256 in text and record.salt in text
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert store.authenticate(f"Bearer {key}") == record


def test_a_rewrite_keeps_the_mode_the_file_was_given(tmp_path: Path) -> None:
    """A containerised gateway runs as another user: the file made readable stays readable."""
    store = KeyStore(tmp_path / "keys.json")
    store.create("alice")
    store.path.chmod(0o644)
    store.create("bob")
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o644


@pytest.mark.parametrize(
    ("header", "needle"),
    [
        (None, "missing API key"),
        ("", "missing API key"),
        ("Basic abc", "malformed"),
        ("Bearer ", "malformed"),
        ("Bearer nope", "invalid API key"),
        ("Bearer lf_000000000000_secret", "invalid API key"),
    ],
)
def test_missing_malformed_or_unknown_keys_are_unauthenticated(tmp_path: Path, header, needle) -> None:
    store = KeyStore(tmp_path / "keys.json")
    store.create("alice")
    with pytest.raises(Unauthenticated, match=needle):
        store.authenticate(header)


def test_a_wrong_secret_for_a_real_id_is_unauthenticated(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.json")
    record, key = store.create("alice")
    with pytest.raises(Unauthenticated):
        store.authenticate(f"Bearer lf_{record.key_id}_{'x' * 43}")
    with pytest.raises(Unauthenticated):
        store.authenticate(f"Bearer {key}x")


def test_a_revocation_applies_to_a_running_reader(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    gateway_view = KeyStore(path)
    record, key = KeyStore(path).create("alice")
    assert gateway_view.authenticate(f"bearer {key}").key_id == record.key_id
    KeyStore(path).revoke(record.key_id)
    with pytest.raises(PermissionDenied, match="revoked"):
        gateway_view.authenticate(f"Bearer {key}")
    with pytest.raises(NotFound):
        KeyStore(path).revoke("nope")


def test_no_file_means_no_keys_and_a_broken_edit_keeps_the_last_good_view(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    store = KeyStore(path)
    with pytest.raises(Unauthenticated):
        store.authenticate("Bearer lf_x_y")
    _record, key = store.create("alice")
    store.authenticate(f"Bearer {key}")
    path.write_text("{not json")
    store.authenticate(f"Bearer {key}")
    with pytest.raises(KeysFileError):
        store.keys()


def test_cli_creates_lists_and_revokes(tmp_path: Path) -> None:
    runner = CliRunner()
    path = tmp_path / "keys.json"
    created = runner.invoke(app, ["keys", "create", "ci", "--tokens-per-min", "5000", "--file", str(path)])
    assert created.exit_code == 0, created.output
    key = created.stdout.strip().splitlines()[-1]
    key_id = key.split("_")[1]
    assert KeyStore(path).authenticate(f"Bearer {key}").tokens_per_min == 5000
    listed = runner.invoke(app, ["keys", "ls"], env={"LLAMAFLEET_GATEWAY_API_KEYS_FILE": str(path)})
    assert listed.exit_code == 0 and key_id in listed.stdout and "active" in listed.stdout
    revoked = runner.invoke(app, ["keys", "revoke", key_id, "--file", str(path)])
    assert revoked.exit_code == 0, revoked.output
    assert json.loads(path.read_text())["keys"][0]["revoked"] is not None
    assert runner.invoke(app, ["keys", "revoke", "nope", "--file", str(path)]).exit_code == 1
