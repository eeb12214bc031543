"""Where a node's daemon can be reached, light enough for every command to import.

The daemon holds an exclusive lock on `<database>.lock` for its lifetime and answers on a unix
socket `<database>.sock` (owner-only): one JSON request per connection, JSON lines back.
`ironsync sync` and `ironsync status` talk to it through `ask_daemon` without importing the
daemon itself (TLS, discovery, the sync engine), which a cron job would pay for at every run.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ironsync.config import Config


class LockHeld(Exception):
    """Another ironsync process holds this node's database."""


class NodeLock:
    """An exclusive `flock` on `<database>.lock`: one writer process per node."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockHeld(f"{self.path} is held by another ironsync process") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def lock_path(config: Config) -> Path:
    return config.database.with_name(config.database.name + ".lock")


def control_socket_path(config: Config) -> Path:
    return config.database.with_name(config.database.name + ".sock")


CONNECT_TIMEOUT_S = 5.0
"""Seconds to reach the daemon's socket; its answers may take as long as a sync takes."""


def ask_daemon(config: Config, request: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Send one request to the running daemon; yield its JSON replies. Raises OSError when no
    daemon answers. A plain blocking socket: a command that only talks to the daemon does not
    pay for importing asyncio (issue 13's fixed cost)."""
    path = control_socket_path(config)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(CONNECT_TIMEOUT_S)
        sock.connect(str(path))
        sock.settimeout(None)
        sock.sendall(json.dumps(request).encode() + b"\n")
        with sock.makefile("rb") as replies:
            for line in replies:
                yield json.loads(line)
