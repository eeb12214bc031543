"""The real `ironsync` command, run as a subprocess."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from ironsync.config import KEYS, default_value, load_config
from tests.conftest import IRONSYNC, Node


def home_only(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    """Defaults (config, database) under `home`, here and in the commands run."""
    monkeypatch.setenv("HOME", str(home))
    for name in ("XDG_CONFIG_HOME", "XDG_STATE_HOME", "IRONSYNC_CONFIG"):
        monkeypatch.delenv(name, raising=False)


def run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None):
    return subprocess.run(
        [*IRONSYNC, *args],
        capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})}, cwd=cwd,
    )  # fmt: skip


def test_init_writes_a_commented_config_and_the_database(tmp_path: Path) -> None:
    config = tmp_path / "cfg" / "config.toml"
    proc = run(
        "--config", str(config), "init", "--node-id", "alpha", "--group", "home",
        "--path", f"docs={tmp_path / 'docs'}", "--path", f"pics={tmp_path / 'pics'}",
        "--database", str(tmp_path / "state.db"), "--peer", "127.0.0.1:25231",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    text = config.read_text()
    assert text.count("#") > 5  # commented
    data = tomllib.loads(text)
    assert data["node_id"] == "alpha" and data["group"] == "home"
    assert len(data["group_secret"]) >= 16  # generated
    assert data["paths"] == {"docs": str(tmp_path / "docs"), "pics": str(tmp_path / "pics")}
    assert data["peers"] == ["127.0.0.1:25231"]
    assert (tmp_path / "docs").is_dir() and (tmp_path / "state.db").is_file()
    assert config.stat().st_mode & 0o777 == 0o600
    # never overwrites
    again = run("--config", str(config), "init", "--path", f"x={tmp_path / 'x'}")
    assert again.returncode == 2 and "already exists" in again.stderr
    assert config.read_text() == text


def test_init_writes_every_key_and_each_commented_default_is_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # issue 12: rescan_interval and keep_versions_days were left out
    home_only(monkeypatch, tmp_path / "home")  # the default database lives under it
    config = tmp_path / "config.toml"
    docs = tmp_path / "docs"
    proc = run("--config", str(config), "init", "--node-id", "alpha", "--path", f"docs={docs}")
    assert proc.returncode == 0, proc.stderr
    text = config.read_text()
    written = load_config(config)
    set_here = tomllib.loads(text)
    commented = {
        m.group(1): m.group(0)
        for m in re.finditer(r"^# ([a-z_]+) = .*$", text, re.MULTILINE)
        if m.group(1) in KEYS
    }
    assert set(set_here) | set(commented) | {"log_path"} == set(KEYS)
    assert not set(set_here) & set(commented)
    assert {"rescan_interval", "keep_versions_days", "sync_symlinks"} <= set(commented)
    for key, line in commented.items():  # uncommented, each gives the config it was
        variant = tmp_path / f"{key}.toml"
        variant.write_text(text.replace(line, line.removeprefix("# ")))
        assert key in tomllib.loads(variant.read_text())
        assert dataclasses.replace(load_config(variant), path=config) == written, key
        assert getattr(written, key) == default_value(key)
    # log_path has no value for its default (stderr): the file shows how to set one
    example = re.search(r"^# For a file: (log_path = .*)$", text, re.MULTILINE)
    assert example is not None and written.log_path is None
    variant = tmp_path / "log_path.toml"
    variant.write_text(text.replace(example.group(0), example.group(1)))
    assert load_config(variant).log_path == Path.home() / ".local/state/ironsync/ironsync.log"


def test_the_readme_config_table_lists_every_key() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = re.findall(r"^\| `\[?([a-z_]+)\]?` \|", readme, re.MULTILINE)
    assert set(KEYS) <= set(table)


def test_init_generates_different_secrets(tmp_path: Path) -> None:
    secrets = []
    for n in range(2):
        config = tmp_path / f"{n}.toml"
        db = tmp_path / f"{n}.db"
        args = ("--config", str(config), "init", "--path", f"d={tmp_path / 'd'}", "--database")
        assert run(*args, str(db)).returncode == 0
        secrets.append(tomllib.loads(config.read_text())["group_secret"])
    assert secrets[0] != secrets[1]


def test_config_error_names_key_and_file_and_exits_2(node: Node) -> None:
    node.config_path.write_text(node.config_path.read_text().replace("node_id", "nodeid"))
    proc = node.run("scan", check=False)
    assert proc.returncode == 2
    assert "nodeid" in proc.stderr and str(node.config_path) in proc.stderr
    assert not (node.base / "state.db").exists()  # nothing else touched


def test_ironsync_config_environment_variable_and_option_both_work(node: Node) -> None:
    (node.root / "a.txt").write_text("a")
    assert node.run("scan").returncode == 0  # IRONSYNC_CONFIG
    proc = run("--config", str(node.config_path), "status", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["storages"][0]["files"] == 1


def test_scan_prints_what_changed_then_nothing(node: Node) -> None:
    (node.root / "a.txt").write_text("a")
    (node.root / "sub").mkdir()
    (node.root / "sub" / "b.txt").write_text("b")
    out = node.run("scan").stdout.splitlines()
    assert "docs: created   a.txt" in out and "docs: created   sub/b.txt" in out
    assert "docs: created   sub/" in out  # a folder is an entry too
    assert out[-1] == "docs: 3 created, 0 modified, 0 deleted, 0 moved, 0 unchanged"
    (node.root / "sub" / "b.txt").rename(node.root / "c.txt")
    (node.root / "a.txt").unlink()
    out = node.run("scan").stdout.splitlines()
    assert out == [
        "docs: moved     sub/b.txt -> c.txt",
        "docs: deleted   a.txt",
        "docs: 0 created, 0 modified, 1 deleted, 1 moved, 1 unchanged",  # sub/
    ]
    data = json.loads(node.run("scan", "--json").stdout)
    assert data[0]["changes"] == [] and data[0]["unchanged"] == 2  # c.txt and sub/


def test_scan_of_an_unknown_storage_is_a_usage_error(node: Node) -> None:
    proc = node.run("scan", "--storage", "nope", check=False)
    assert proc.returncode == 2 and "no storage 'nope'" in proc.stderr


def test_status_json_reports_storages_and_hashes(node: Node) -> None:
    (node.root / "a.txt").write_text("hello")
    node.run("scan")
    info = json.loads(node.run("status", "--json").stdout)
    assert info["node_id"] == "alpha"
    (storage,) = info["storages"]
    assert storage["name"] == "docs" and storage["files"] == 1 and storage["bytes"] == 5
    assert storage["tombstones"] == 0 and len(storage["storage_hash"]) == 32
    assert storage["last_scan_at"].endswith("Z")
    text = node.run("status").stdout
    assert "storage docs: 1 files, 0 folders, 0 symlinks, 5 bytes" in text


def test_log_tail_prints_events_oldest_first_and_as_json(node: Node) -> None:
    for name in ("a", "b", "c"):
        (node.root / f"{name}.txt").write_text(name)
    node.run("scan")
    lines = node.run("log", "tail", "-n", "4").stdout.splitlines()
    assert [line.split("  ")[1:3] for line in lines] == [
        ["created", "docs:a.txt"],
        ["created", "docs:b.txt"],
        ["created", "docs:c.txt"],
        ["scanned", "docs"],
    ]
    records = [json.loads(line) for line in node.run("log", "tail", "--json").stdout.splitlines()]
    assert [r["kind"] for r in records] == ["created", "created", "created", "scanned"]
    assert records[0]["path"] == "a.txt" and records[0]["detail"]["size"] == 1


def test_log_tail_follow_prints_rows_written_by_another_process(node: Node) -> None:
    node.run("status")  # creates the database
    env = {**os.environ, "IRONSYNC_CONFIG": str(node.config_path)}
    follower = subprocess.Popen(
        [*IRONSYNC, "log", "tail", "-f", "-n", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        time.sleep(1.0)
        (node.root / "late.txt").write_text("late")
        node.run("scan")
        deadline = time.monotonic() + 20
        line = ""
        while "late.txt" not in line and time.monotonic() < deadline:
            line = follower.stdout.readline()  # type: ignore[union-attr]
        assert "created  docs:late.txt" in line
    finally:
        follower.terminate()
        follower.wait(timeout=10)


def test_log_compact_is_the_only_way_to_delete_events(node: Node) -> None:
    (node.root / "a.txt").write_text("a")
    node.run("scan")
    out = node.run("log", "compact", "--older-than", "1").stdout
    assert out.startswith("removed 0 event(s)")
    assert len(node.run("log", "tail").stdout.splitlines()) == 2


def test_version_and_help(tmp_path: Path) -> None:
    proc = run("--version")
    assert proc.returncode == 0 and "ironsync" in proc.stdout
    assert "scan" in run("--help").stdout
    assert sys.executable  # the command runs from this interpreter's environment


def test_history_finds_a_path_relative_to_here_or_as_alias_path_from_anywhere(
    node: Node, tmp_path: Path
) -> None:
    (node.root / "sub").mkdir()
    (node.root / "sub" / "hello.txt").write_text("hello")
    node.run("scan")
    here = node.root / "sub"
    assert node.run("history", "hello.txt", cwd=here).stdout.startswith("docs:sub/hello.txt\n")
    assert node.run("history", "../sub/hello.txt", cwd=here).stdout.startswith(
        "docs:sub/hello.txt\n"
    )  # used to look for "sub/../sub/hello.txt"
    anywhere = node.run("history", "docs:sub/hello.txt", cwd=tmp_path).stdout
    assert anywhere.startswith("docs:sub/hello.txt\n")
    (tmp_path / "way-in").symlink_to(node.root)  # an absolute path through a symlink
    through = node.run("history", str(tmp_path / "way-in" / "sub" / "hello.txt"), cwd=tmp_path)
    assert through.stdout.startswith("docs:sub/hello.txt\n")


def test_a_path_outside_every_storage_says_so_and_shows_both_forms(
    node: Node, tmp_path: Path
) -> None:
    # issue 12: `history hello.txt` from outside the folder failed with no hint
    for command in ("history", "restore"):
        proc = node.run(command, "hello.txt", cwd=tmp_path, check=False)
        assert proc.returncode == 2
        assert proc.stderr == (
            f"ironsync: error: hello.txt is not inside a storage folder (docs: {node.root}); "
            "give a path inside one or ALIAS:PATH, e.g. docs:hello.txt\n"
        )
    resolved = node.run("resolve", "/elsewhere/a.txt", "--keep", "mine", check=False)
    assert resolved.returncode == 2
    assert "ALIAS:PATH, e.g. docs:a.txt" in resolved.stderr
    unknown = node.run("history", "dcos:hello.txt", cwd=tmp_path, check=False)
    assert unknown.returncode == 2
    assert unknown.stderr == (
        f"ironsync: error: dcos:hello.txt: no storage is named 'dcos' in {node.config_path} "
        f"(docs: {node.root}); give ALIAS:PATH with one of them, e.g. docs:hello.txt, or a "
        "path inside a storage folder\n"
    )


def test_history_restore_and_resolve_help_say_which_paths_they_take() -> None:
    for command in ("history", "restore", "resolve"):
        text = " ".join(run(command, "--help").stdout.split())
        assert "PATH is ALIAS:PATH, from anywhere (docs:notes/todo.txt)" in text, command
        assert "absolute or relative to the current folder" in text, command


def test_the_cli_module_imports_no_database_or_key_module_until_a_command_needs_it() -> None:
    # `ironsync sync` and `status` through a running daemon only talk to its control socket:
    # every import they do not need is paid by each cron run (issue 13's fixed cost)
    code = (
        "import sys, ironsync.cli; "
        "print(sorted(m for m in ('apsw', 'ironsync.store', 'secrets', 'shutil', 'asyncio')"
        " if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"
