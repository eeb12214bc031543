"""Two real daemons with their watchers on, for the black-box tree tests (issue 11).

Tests wait for conditions (with generous deadlines), never for a fixed time.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.daemons import SyncNode, stop_all

DELAY = 0.5  # seconds of watcher debounce: short, so tests are quick
DEADLINE = float(os.environ.get("TREES_DEADLINE", "60"))
"""Seconds to wait for a condition: generous, as the machine may be shared and only a stuck
sync should take this long (TREES_DEADLINE=10 fails fast while a feature is being written)."""


def start_pair(
    tmp_path: Path,
    *,
    watcher: bool = True,
    delay: float = DELAY,
    prepare: Callable[[SyncNode, SyncNode], None] | None = None,
    **config: Any,
) -> tuple[SyncNode, SyncNode]:
    """alpha and beta, each a peer of the other, daemons started; returns once they synced.
    `prepare(a, b)` runs before the daemons start (e.g. to write an `.ignore`)."""
    a = SyncNode(tmp_path, "alpha", watcher=watcher, delay=delay)
    b = SyncNode(tmp_path, "beta", watcher=watcher, delay=delay)
    a.peers.append(b.address)
    b.peers.append(a.address)
    a.write_config(**config)
    b.write_config(**config)
    if prepare is not None:
        prepare(a, b)
    try:
        start(b)
        start(a)
        wait_until(
            lambda: any((e["detail"] or {}).get("converged") for e in a.events("sync_finished")),
            what="the first full sync",
            context=lambda: logs(a, b),
        )
    except BaseException:
        stop_all(a, b)
        raise
    return a, b


def start(node: SyncNode) -> None:
    """Start `node`'s daemon (its stderr goes to `daemon.stderr` beside its log)."""
    node.start()


def wait_until(
    condition: Callable[[], bool],
    timeout: float = DEADLINE,
    what: str = "the condition",
    context: Callable[[], str] | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            extra = f"\n{context()}" if context is not None else ""
            raise AssertionError(f"{what}: not within {timeout} s{extra}")
        time.sleep(0.1)


def logs(*nodes: SyncNode, lines: int = 40) -> str:
    """The tail of each node's daemon log (and stderr), for a failure message."""
    out = []
    for node in nodes:
        tail = node.log().splitlines()[-lines:]
        out.append(f"--- {node.node_id} daemon log (last {len(tail)} lines) ---")
        out.extend(tail)
        stderr = node.base / "daemon.stderr"
        if stderr.exists() and stderr.stat().st_size:
            err = stderr.read_text(errors="replace").splitlines()[-5:]
            out.append(f"--- {node.node_id} daemon stderr (last {len(err)} lines, cut) ---")
            out.extend(line[:300] for line in err)
    return "\n".join(out)


def last_seq(node: SyncNode) -> int:
    """The newest event's seq on `node` (0 when none): a mark to look only at what follows."""
    events = node.events()
    return events[-1]["seq"] if events else 0


def events_after(node: SyncNode, seq: int, kind: str | None = None) -> list[dict[str, Any]]:
    return [e for e in node.events(kind) if e["seq"] > seq]
