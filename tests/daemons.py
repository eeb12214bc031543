"""Real ironsync nodes for tests: configs on free 127.0.0.1 ports, daemons as subprocesses.

Every process a test starts is ended by its own pid (SIGTERM, then SIGKILL if it lingers).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import IRONSYNC, write_config

SECRET = "integration secret, 16+ chars"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SyncNode:
    """One node: folders, config, database; runs `ironsync` commands and a daemon."""

    def __init__(
        self,
        base: Path,
        node_id: str,
        *,
        storages: tuple[str, ...] = ("docs",),
        secret: str = SECRET,
        group: str = "test-group",
        watcher: bool = False,
        delay: float = 1.0,
    ) -> None:
        self.node_id = node_id
        self.base = base / node_id
        self.roots = {name: self.base / name for name in storages}
        for root in self.roots.values():
            root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.secret = secret
        self.group = group
        self.peers: list[str] = []
        self.watcher = watcher
        self.delay = delay
        self.proc: subprocess.Popen[bytes] | None = None
        self.write_config()

    @property
    def root(self) -> Path:
        return next(iter(self.roots.values()))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def db_path(self) -> Path:
        return self.base / "state.db"

    @property
    def config_path(self) -> Path:
        return self.base / "config.toml"

    def write_config(self, **extra: object) -> None:
        write_config(
            self.config_path,
            node_id=self.node_id,
            group=self.group,
            group_secret=self.secret,
            port=self.port,
            listen_address="127.0.0.1",
            enable_service_discovery=False,
            enable_file_watcher=self.watcher,
            delay_watcher_events=self.delay,
            peers=self.peers,
            database=str(self.db_path),
            log_path=str(self.base / "daemon.log"),
            paths=self.roots,
            **extra,
        )

    def add_peers(self, *others: SyncNode) -> None:
        self.peers += [o.address for o in others]
        self.write_config()

    def env(self) -> dict[str, str]:
        return {**os.environ, "IRONSYNC_CONFIG": str(self.config_path)}

    def run(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [*IRONSYNC, *args], capture_output=True, text=True, env=self.env(), timeout=timeout
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{self.node_id}: ironsync {' '.join(args)} exited {proc.returncode}\n"
                f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}\nlog:\n{self.log()}"
            )
        return proc

    def sync(self, *args: str, expect: int = 0) -> dict[str, Any]:
        proc = self.run("sync", "--json", *args, check=False)
        if proc.returncode != expect:
            raise AssertionError(
                f"{self.node_id}: ironsync sync exited {proc.returncode}, expected {expect}\n"
                f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}\nlog:\n{self.log()}"
            )
        return json.loads(proc.stdout)

    def start(self) -> None:
        assert self.proc is None
        sock = self.db_path.with_name(self.db_path.name + ".sock")
        self.proc = start_daemon(
            self.env(), sock, self.base / "daemon.stderr", self.node_id, more=self.log
        )

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        proc, self.proc = self.proc, None
        return stop_daemon(proc, sig)

    def log(self) -> str:
        path = self.base / "daemon.log"
        return path.read_text() if path.exists() else ""

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        out = self.run("log", "tail", "-n", "100000", "--json").stdout
        rows = [json.loads(line) for line in out.splitlines()]
        return [r for r in rows if kind is None or r["kind"] == kind]


def start_daemon(
    env: dict[str, str],
    control_socket: Path,
    stderr_path: Path,
    name: str,
    *,
    more: Callable[[], str] = lambda: "",
) -> subprocess.Popen[bytes]:
    """`ironsync daemon` run with `env`, once it serves peers (its control socket appears
    then). `more()` adds to the error when it does not start (its log file, say)."""
    # a daemon killed with SIGKILL leaves its socket: gone, or we would not wait below
    control_socket.unlink(missing_ok=True)
    # stderr to a file, never a pipe nobody reads: a daemon that writes 64 KiB of warnings
    # to a full pipe would block the writing thread for good
    with stderr_path.open("ab") as stderr:
        proc = subprocess.Popen(
            [*IRONSYNC, "daemon"], env=env, stdout=subprocess.DEVNULL, stderr=stderr
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            said = stderr_path.read_text(errors="replace")[-4000:]
            raise AssertionError(f"{name}: daemon exited\n{said}")
        if control_socket.exists():
            return proc
        time.sleep(0.05)
    stop_daemon(proc)
    said = stderr_path.read_text(errors="replace")[-4000:]
    raise AssertionError(f"{name}: daemon did not listen\n{said}\n{more()}")


def stop_daemon(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
    """End a daemon this test started, by its pid (SIGKILL if it lingers); its exit code."""
    os.kill(proc.pid, sig)
    try:
        return proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        return proc.wait(timeout=10)


def tree(root: Path) -> dict[str, bytes]:
    """Every synced file under `root` (not .ironsync/, not .ignore) with its content."""
    out = {}
    for dirpath, _dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        if rel_dir.parts[:1] == (".ironsync",):
            continue
        for name in filenames:
            rel = (rel_dir / name).as_posix()
            if rel == ".ignore" or (name.startswith(".ironsync-") and name.endswith(".tmp")):
                continue  # a daemon's work in progress, not (yet) content
            try:
                out[rel] = (Path(dirpath) / name).read_bytes()
            except FileNotFoundError:
                continue  # renamed or deleted while we looked
    return out


def write(root: Path, rel: str, data: bytes | str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    path.write_bytes(data)
    return path


def stop_all(*nodes: SyncNode) -> None:
    for node in nodes:
        if node.proc is not None:
            node.stop()
