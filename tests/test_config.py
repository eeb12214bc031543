"""Config: defaults, `~` expansion, and an error naming key and file for every bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from ironsync.config import DEFAULT_PORT, ConfigError, load_config
from tests.conftest import write_config

SECRET = "sixteen chars or more"


def minimal(tmp_path: Path, **overrides: object) -> Path:
    folder = tmp_path / "docs"
    folder.mkdir(exist_ok=True)
    keys: dict[str, object] = {
        "node_id": "alpha",
        "group": "home",
        "group_secret": SECRET,
        "paths": {"docs": folder},
    }
    keys.update(overrides)
    keys = {k: v for k, v in keys.items() if v is not None}
    return write_config(tmp_path / "config.toml", **keys)


def test_minimal_config_gets_the_documented_defaults(tmp_path: Path) -> None:
    config = load_config(minimal(tmp_path))
    assert config.node_id == "alpha"
    assert config.port == DEFAULT_PORT == 25230
    assert config.listen_address == "0.0.0.0"
    assert config.enable_file_watcher is True
    assert config.delay_watcher_events == 10
    assert config.enable_service_discovery is True
    assert config.peers == ()
    assert config.log_path is None
    assert config.database.name == "ironsync.db"
    assert [(s.name, s.root) for s in config.storages] == [("docs", (tmp_path / "docs"))]


def test_tilde_is_expanded_in_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "Documents").mkdir()
    path = minimal(tmp_path, paths={"docs": "~/Documents"}, database="~/state/x.db")
    config = load_config(path)
    assert config.storages[0].root == tmp_path / "Documents"
    assert config.database == tmp_path / "state" / "x.db"


def test_secret_is_not_in_the_repr(tmp_path: Path) -> None:
    assert SECRET not in repr(load_config(minimal(tmp_path)))


def assert_error(path: Path, key: str | None, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message, message
    assert info.value.file == path
    if key is not None:
        assert info.value.key == key
        assert f"'{key}'" in message, message
    assert fragment in message, message


@pytest.mark.parametrize("key", ["node_id", "group", "group_secret", "paths"])
def test_missing_required_key_is_named(tmp_path: Path, key: str) -> None:
    assert_error(minimal(tmp_path, **{key: None}), key, "required")


def test_unknown_key_is_named(tmp_path: Path) -> None:
    assert_error(minimal(tmp_path, colour="blue"), "colour", "unknown key")


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("port", "25230", "must be an integer"),
        ("port", True, "must be an integer"),
        ("port", 70000, "between 1 and 65535"),
        ("enable_file_watcher", "yes", "true or false"),
        ("delay_watcher_events", "10", "number of seconds"),
        ("delay_watcher_events", -1, "negative"),
        ("peers", "host:1", "list"),
        ("peers", ["nohost"], "host:port"),
        ("peers", [5], "host:port"),
        ("node_id", "has space", "A-Z"),
        ("node_id", 7, "must be a string"),
        ("group_secret", "short", "at least 16"),
        ("listen_address", 1, "must be a string"),
    ],
)
def test_wrong_value_names_the_key(tmp_path: Path, key: str, value: object, fragment: str) -> None:
    assert_error(minimal(tmp_path, **{key: value}), key, fragment)


def test_root_that_does_not_exist_is_named(tmp_path: Path) -> None:
    path = minimal(tmp_path, paths={"docs": tmp_path / "nope"})
    assert_error(path, "paths.docs", "does not exist")


def test_root_that_is_a_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    assert_error(minimal(tmp_path, paths={"docs": tmp_path / "file"}), "paths.docs", "not a folder")


def test_duplicate_storage_root_is_named(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    path = minimal(tmp_path, paths={"one": tmp_path / "a", "two": tmp_path / "a"})
    assert_error(path, "paths.two", "already the root of 'one'")


def test_nested_storage_roots_are_refused(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    path = minimal(tmp_path, paths={"outer": tmp_path / "a", "inner": tmp_path / "a" / "b"})
    assert_error(path, "paths.inner", "overlaps")


def test_empty_paths_table_is_an_error(tmp_path: Path) -> None:
    assert_error(minimal(tmp_path, paths={}), "paths", "at least one")


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("node_id = \n")
    assert_error(path, None, "invalid TOML")


def test_missing_file_says_how_to_create_one(tmp_path: Path) -> None:
    assert_error(tmp_path / "absent.toml", None, "ironsync init")
