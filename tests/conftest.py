"""Shared fixtures: real folders, real SQLite files, the real `ironsync` command."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from ironsync.config import Config, load_config
from ironsync.store import Database, open_database
from tests.netns import lan  # noqa: F401 - a fixture for every test module

IRONSYNC = [sys.executable, "-m", "ironsync"]


def write_config(path: Path, **keys: object) -> Path:
    """Write a TOML config from keyword arguments; `paths` is a dict alias -> folder."""
    lines = []
    paths = keys.pop("paths", None)
    for key, value in keys.items():
        lines.append(f"{key} = {_toml(value)}")
    if paths is not None:
        lines.append("[paths]")
        lines += [f'"{alias}" = {_toml(str(folder))}' for alias, folder in paths.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _toml(value: object) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))


class Node:
    """One node's folders, config and database under a temp dir."""

    def __init__(self, base: Path, node_id: str, storages: tuple[str, ...] = ("docs",)) -> None:
        self.base = base / node_id
        self.node_id = node_id
        self.roots = {name: self.base / name for name in storages}
        for root in self.roots.values():
            root.mkdir(parents=True, exist_ok=True)
        self.config_path = write_config(
            self.base / "config.toml",
            node_id=node_id,
            group="test-group",
            group_secret="test secret of sixteen+ chars",
            listen_address="127.0.0.1",
            enable_service_discovery=False,
            database=str(self.base / "state.db"),
            paths=self.roots,
        )

    @property
    def root(self) -> Path:
        return next(iter(self.roots.values()))

    def config(self) -> Config:
        return load_config(self.config_path)

    def db(self) -> Database:
        return open_database(self.base / "state.db", self.node_id)

    def run(self, *args: str, check: bool = True, **kw: object) -> subprocess.CompletedProcess:
        env = {**os.environ, "IRONSYNC_CONFIG": str(self.config_path)}
        proc = subprocess.run(
            [*IRONSYNC, *args], capture_output=True, text=True, env=env, timeout=60, **kw
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"ironsync {' '.join(args)} exited {proc.returncode}\n"
                f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            )
        return proc


@pytest.fixture
def make_node(tmp_path: Path) -> Callable[..., Node]:
    def make(node_id: str = "alpha", storages: tuple[str, ...] = ("docs",)) -> Node:
        return Node(tmp_path, node_id, storages)

    return make


@pytest.fixture
def node(make_node: Callable[..., Node]) -> Node:
    return make_node()
