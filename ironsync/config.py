"""The TOML config: one file in, one frozen `Config` out, or a `ConfigError` naming key and file.

Keys follow iron-carrier's where it had them (see shared/DESIGN.md, "Config"). Every error
names the offending key and the file, so `ironsync` can print it and exit 2 without touching
anything else.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

DEFAULT_PORT = 25230
DEFAULT_WATCHER_DELAY_S = 10
DEFAULT_RESCAN_INTERVAL_S = 300
DEFAULT_KEEP_VERSIONS_DAYS = 30
NODE_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
ALIAS_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MIN_SECRET_LEN = 16
CONFIG_ENV = "IRONSYNC_CONFIG"


def default_config_path() -> Path:
    """`$IRONSYNC_CONFIG`, else `~/.config/ironsync/config.toml` (XDG_CONFIG_HOME honoured)."""
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "ironsync" / "config.toml"


def default_database_path() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "ironsync" / "ironsync.db"


class ConfigError(Exception):
    """A config problem: which file, which key, what is wrong."""

    def __init__(self, file: Path, key: str | None, message: str) -> None:
        self.file = file
        self.key = key
        self.message = message
        where = f"{file}: key '{key}'" if key else str(file)
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class Storage:
    """One synchronized folder: the alias peers share, and where it lives here."""

    name: str
    root: Path
    sync_symlinks: bool = True  # the node's `sync_symlinks`: links indexed and synced


@dataclass(frozen=True)
class Config:
    path: Path
    node_id: str
    group: str
    group_secret: str = field(repr=False)
    storages: tuple[Storage, ...]
    port: int = DEFAULT_PORT
    listen_address: str = "0.0.0.0"
    enable_file_watcher: bool = True
    delay_watcher_events: float = DEFAULT_WATCHER_DELAY_S
    rescan_interval: float = DEFAULT_RESCAN_INTERVAL_S
    keep_versions_days: float = DEFAULT_KEEP_VERSIONS_DAYS
    enable_service_discovery: bool = True
    sync_symlinks: bool = True
    peers: tuple[str, ...] = ()
    log_path: Path | None = None
    database: Path = field(default_factory=default_database_path)

    @property
    def state_dir(self) -> Path:
        """Where node certificates and other per-node files live: beside the config."""
        return self.path.parent

    def storage(self, name: str) -> Storage:
        for storage in self.storages:
            if storage.name == name:
                return storage
        raise KeyError(name)


# key -> (accepted python types, human name)
_SCALAR_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "node_id": ((str,), "a string"),
    "group": ((str,), "a string"),
    "group_secret": ((str,), "a string"),
    "port": ((int,), "an integer"),
    "listen_address": ((str,), "a string"),
    "enable_file_watcher": ((bool,), "true or false"),
    "delay_watcher_events": ((int, float), "a number of seconds"),
    "rescan_interval": ((int, float), "a number of seconds"),
    "keep_versions_days": ((int, float), "a number of days"),
    "enable_service_discovery": ((bool,), "true or false"),
    "sync_symlinks": ((bool,), "true or false"),
    "peers": ((list,), 'a list of "host:port" strings'),
    "log_path": ((str,), "a path string"),
    "database": ((str,), "a path string"),
    "paths": ((dict,), 'a table of alias = "/folder"'),
}
_REQUIRED = ("node_id", "group", "group_secret", "paths")
KEYS: tuple[str, ...] = tuple(_SCALAR_KEYS)
"""Every key a config may hold (`paths` is the table of storages)."""


def default_value(key: str) -> Any:
    """What `key` is when the config leaves it out (None: unset, or required)."""
    if key == "database":
        return default_database_path()
    for f in fields(Config):
        if f.name == key:
            return None if f.default is MISSING else f.default
    return None


def load_config(path: Path | str | None = None) -> Config:
    """Read and validate the config at `path` (default: `default_config_path()`)."""
    file = Path(path).expanduser() if path is not None else default_config_path()
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        raise ConfigError(file, None, "no such file (create one with `ironsync init`)") from None
    except OSError as exc:
        raise ConfigError(file, None, f"cannot read: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(file, None, "not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(file, None, f"invalid TOML: {exc}") from None
    return parse_config(data, file)


def parse_config(data: Mapping[str, Any], file: Path) -> Config:
    """Validate an already-parsed TOML document."""
    for key in data:
        if key not in _SCALAR_KEYS:
            known = ", ".join(sorted(_SCALAR_KEYS))
            raise ConfigError(file, key, f"unknown key (known keys: {known})")
    for key in _REQUIRED:
        if key not in data:
            raise ConfigError(file, key, "required key is missing")
    for key, value in data.items():
        types, human = _SCALAR_KEYS[key]
        # bool is an int in Python; a port of `true` is still wrong.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ConfigError(file, key, f"must be {human}, not {_toml_type(value)}")

    node_id = data["node_id"]
    if not NODE_ID_RE.match(node_id):
        raise ConfigError(file, "node_id", "must be 1-64 characters of A-Z a-z 0-9 _ . -")
    group = data["group"]
    if not group.strip() or len(group) > 64:
        raise ConfigError(file, "group", "must be 1-64 characters")
    secret = data["group_secret"]
    if len(secret) < MIN_SECRET_LEN:
        raise ConfigError(file, "group_secret", f"must be at least {MIN_SECRET_LEN} characters")
    port = data.get("port", DEFAULT_PORT)
    if not 0 < port < 65536:
        raise ConfigError(file, "port", "must be between 1 and 65535")
    delay = data.get("delay_watcher_events", DEFAULT_WATCHER_DELAY_S)
    if delay < 0:
        raise ConfigError(file, "delay_watcher_events", "must not be negative")
    rescan = data.get("rescan_interval", DEFAULT_RESCAN_INTERVAL_S)
    if rescan < 0:
        raise ConfigError(file, "rescan_interval", "must not be negative (0 turns it off)")
    keep = data.get("keep_versions_days", DEFAULT_KEEP_VERSIONS_DAYS)
    if keep < 0:
        raise ConfigError(file, "keep_versions_days", "must not be negative (0 turns it off)")
    peers = tuple(_parse_peer(file, p) for p in data.get("peers", []))

    return Config(
        path=file,
        node_id=node_id,
        group=group,
        group_secret=secret,
        storages=_parse_paths(file, data["paths"], data.get("sync_symlinks", True)),
        port=port,
        listen_address=data.get("listen_address", "0.0.0.0"),
        enable_file_watcher=data.get("enable_file_watcher", True),
        delay_watcher_events=float(delay),
        rescan_interval=float(rescan),
        keep_versions_days=float(keep),
        enable_service_discovery=data.get("enable_service_discovery", True),
        sync_symlinks=data.get("sync_symlinks", True),
        peers=peers,
        log_path=_path(file, data["log_path"]) if "log_path" in data else None,
        database=_path(file, data["database"]) if "database" in data else default_database_path(),
    )


def _parse_paths(
    file: Path, paths: Mapping[str, Any], sync_symlinks: bool = True
) -> tuple[Storage, ...]:
    if not paths:
        raise ConfigError(file, "paths", 'must list at least one alias = "/folder"')
    storages: list[Storage] = []
    seen_roots: dict[Path, str] = {}
    for alias, folder in paths.items():
        key = f"paths.{alias}"
        if not ALIAS_RE.match(alias):
            raise ConfigError(file, key, "alias must be 1-64 characters of A-Z a-z 0-9 _ . -")
        if not isinstance(folder, str):
            raise ConfigError(file, key, f"must be a folder path string, not {_toml_type(folder)}")
        root = _path(file, folder)
        if not root.is_dir():
            why = "is not a folder" if root.exists() else "does not exist"
            raise ConfigError(file, key, f"{root} {why}")
        root = root.resolve()
        for other_root, other_alias in seen_roots.items():
            if root == other_root:
                raise ConfigError(file, key, f"{root} is already the root of '{other_alias}'")
            if root.is_relative_to(other_root) or other_root.is_relative_to(root):
                raise ConfigError(file, key, f"{root} overlaps the root of '{other_alias}'")
        seen_roots[root] = alias
        storages.append(Storage(name=alias, root=root, sync_symlinks=sync_symlinks))
    return tuple(storages)


def _parse_peer(file: Path, peer: Any) -> str:
    if not isinstance(peer, str):
        raise ConfigError(file, "peers", f'each peer must be a "host:port" string, not {peer!r}')
    host, sep, port = peer.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(file, "peers", f"'{peer}' is not \"host:port\"")
    return peer


def _path(file: Path, value: str) -> Path:
    """`~` expanded; a relative path is relative to the config file's folder."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else (file.parent / path)


def _toml_type(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string"}
    names |= {list: "an array", dict: "a table"}
    return names.get(type(value), type(value).__name__)
