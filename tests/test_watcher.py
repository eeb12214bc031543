"""Live updates: two real daemons with their file watchers on (1 s debounce), on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ironsync.config import Storage
from ironsync.sync.watcher import Watcher
from tests.daemons import SyncNode, stop_all, tree, write

pytestmark = pytest.mark.slow

DELAY = 1.0
SETTLE = DELAY + 8.0  # the delay plus a few seconds


@pytest.fixture
def live(tmp_path: Path) -> Iterator[tuple[SyncNode, SyncNode]]:
    a = SyncNode(tmp_path, "alpha", watcher=True, delay=DELAY)
    b = SyncNode(tmp_path, "beta", watcher=True, delay=DELAY)
    a.add_peers(b)
    b.start()
    a.start()
    wait_until(lambda: len(b.events("sync_finished")) + len(a.events("sync_finished")) > 0)
    yield a, b
    stop_all(a, b)


def wait_until(condition: Callable[[], bool], timeout: float = SETTLE) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if condition():
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s")


def same(a: SyncNode, b: SyncNode) -> Callable[[], bool]:
    return lambda: tree(a.root) == tree(b.root)


def test_create_modify_delete_and_rename_reach_the_peer(live: tuple[SyncNode, SyncNode]) -> None:
    a, b = live
    write(a.root, "note.txt", "first")
    wait_until(lambda: tree(b.root).get("note.txt") == b"first")
    write(a.root, "note.txt", "second, longer")
    wait_until(lambda: tree(b.root).get("note.txt") == b"second, longer")
    big = os.urandom(2_000_000)
    write(a.root, "big.bin", big)
    wait_until(lambda: tree(b.root).get("big.bin") == big)
    (a.root / "big.bin").rename(a.root / "renamed.bin")
    wait_until(lambda: tree(b.root).get("renamed.bin") == big and "big.bin" not in tree(b.root))
    (a.root / "note.txt").unlink()
    wait_until(lambda: "note.txt" not in tree(b.root))
    # the rename is a rename on the peer: no content over the wire, nothing rebuilt
    moved = [e for e in b.events("moved") if e["path"] == "renamed.bin"]
    assert moved and moved[-1]["detail"]["from"] == "big.bin"
    # ... and a move where it was made, not a deletion and a new file
    moved_here = [e for e in a.events("moved") if e["path"] == "renamed.bin"]
    assert moved_here and moved_here[-1]["detail"]["from"] == "big.bin"
    assert not [e for e in a.events("deleted") if e["path"] == "big.bin"]
    assert not [e for e in b.events("write_started") if e["path"] == "renamed.bin"]
    # and changes flow the other way too
    write(b.root, "from-b.txt", "b")
    wait_until(lambda: tree(a.root).get("from-b.txt") == b"b")


def test_folder_trees_created_and_removed_reach_the_peer(live: tuple[SyncNode, SyncNode]) -> None:
    a, b = live
    deep = a.root / "a" / "b" / "c"
    deep.mkdir(parents=True)
    for n in range(5):
        (deep / f"f{n}.txt").write_text(f"file {n}")
    (a.root / "a" / "top.txt").write_text("top")
    wait_until(lambda: len(tree(b.root)) == 6)
    assert tree(a.root) == tree(b.root)
    shutil.rmtree(a.root / "a")
    wait_until(lambda: tree(b.root) == {})


def test_a_file_rewritten_200_times_in_the_window_is_transferred_once(
    live: tuple[SyncNode, SyncNode],
) -> None:
    a, b = live
    path = a.root / "busy.log"
    for n in range(200):
        path.write_text(f"version {n}\n" * 10)
    wait_until(lambda: tree(b.root).get("busy.log") == path.read_bytes())
    time.sleep(DELAY + 1)
    writes = [e for e in b.events("write_finished") if e["path"] == "busy.log"]
    assert len(writes) == 1


def test_received_changes_do_not_echo_back_as_local_changes(
    live: tuple[SyncNode, SyncNode],
) -> None:
    a, b = live
    for n in range(5):
        write(a.root, f"dir/f{n}.txt", f"content {n}")
    wait_until(lambda: len(tree(b.root)) == 5)
    (a.root / "dir" / "f0.txt").rename(a.root / "dir" / "g0.txt")
    (a.root / "dir" / "f1.txt").unlink()
    wait_until(same(a, b))
    time.sleep(DELAY + 1.5)  # let beta's watcher see its own writes
    local = [
        e
        for e in b.events()
        if e["kind"] in ("created", "modified", "deleted", "moved") and e["peer"] is None
    ]
    assert local == []
    # and alpha never heard anything back that would bump versions
    history = json.loads(a.run("history", "--json", "docs:dir/f2.txt").stdout)
    assert history["current"]["version"] == {"alpha": 1}


def test_a_peer_killed_and_restarted_gets_only_what_changed_while_it_was_down(
    tmp_path: Path,
) -> None:
    a = SyncNode(tmp_path, "alpha", watcher=True, delay=DELAY)
    b = SyncNode(tmp_path, "beta", watcher=True, delay=DELAY)
    try:
        files = {f"f{n:02}.bin": os.urandom(200_000) for n in range(20)}
        for name, data in files.items():
            write(a.root, name, data)
        a.add_peers(b)
        b.start()
        a.start()
        wait_until(same(a, b), timeout=30)
        b.stop(signal.SIGKILL)
        changed = os.urandom(300_000)
        write(a.root, "f07.bin", changed)
        write(a.root, "new.txt", "made while beta was down")
        time.sleep(DELAY + 0.5)
        before = len(b.events("write_finished"))
        b.start()  # alpha reconnects (backoff) and runs a full sync
        wait_until(same(a, b), timeout=30)
        after = b.events("write_finished")[before:]
        assert sorted(e["path"] for e in after) == ["f07.bin", "new.txt"]
        sent = sum(e["detail"]["bytes_from_peer"] for e in after)
        assert sent <= len(changed) + len("made while beta was down")
        kinds = [e["kind"] for e in a.events()]
        assert kinds.count("peer_connected") >= 2 and "peer_disconnected" in kinds
    finally:
        stop_all(a, b)


# --- catching up (issue 12): what a full sync sees ----------------------------------------------


def test_catch_up_records_every_change_made_before_it_without_the_debounce(
    tmp_path: Path,
) -> None:
    """In process, with a debounce of an hour: without catch_up nothing would be recorded."""
    roots = {name: tmp_path / name for name in ("docs", "photos")}
    for root in roots.values():
        (root / "sub").mkdir(parents=True)
    seen: list[tuple[str, set[str], set[str]]] = []

    async def on_changes(storage: Storage, paths: set[str], folders: set[str]) -> None:
        seen.append((storage.name, paths, folders))

    async def body() -> None:
        storages = [Storage(name, root) for name, root in roots.items()]
        watcher = Watcher(storages, 3600, on_changes, lambda _storage: None)
        await watcher.start()
        try:
            assert watcher.healthy
            write(roots["docs"], "sub/new.txt", "new")
            (roots["photos"] / "album").mkdir()

            assert await watcher.catch_up()

            recorded = {(name, p) for name, paths, _ in seen for p in paths}
            recorded |= {(name, f) for name, _, folders in seen for f in folders}
            assert ("docs", "sub/new.txt") in recorded
            assert ("photos", "album") in recorded
            # the barrier files are gone, and were never a change of the storage
            assert not [p for _, p in recorded if p.startswith(".ironsync")]
            for root in roots.values():
                assert not [n for n in os.listdir(root / ".ironsync") if "barrier" in n]
            seen.clear()
            assert await watcher.catch_up()  # nothing new: nothing recorded
            assert seen == []
        finally:
            await watcher.stop()

    asyncio.run(body())


def test_catch_up_says_no_when_the_watcher_does_not_run(tmp_path: Path) -> None:
    async def on_changes(storage: Storage, paths: set[str], folders: set[str]) -> None:
        raise AssertionError("nothing is recorded")

    async def body() -> None:
        watcher = Watcher([Storage("docs", tmp_path)], 1.0, on_changes, lambda _s: None)
        assert not await watcher.catch_up()  # never started: the caller scans instead

    asyncio.run(body())


def test_a_folder_moved_in_with_a_symlink_to_a_sibling_folder_is_indexed_as_it_is(
    live: tuple[SyncNode, SyncNode], tmp_path: Path
) -> None:
    """watchdog reports a symlink to a folder inside a folder moved in as a created folder
    (and may name changes in the folder it points to by the link's path). Nothing is indexed
    through the link: the link is a link here and on the peer, and the folder it points to
    arrives once, under its own name."""
    a, b = live
    stage = tmp_path / "stage" / "proj"
    (stage / "docs").mkdir(parents=True)
    (stage / "docs" / "f.txt").write_text("in docs")
    (stage / "notes").symlink_to("docs")
    stage.rename(a.root / "proj")

    def arrived() -> bool:
        link = b.root / "proj" / "notes"
        return link.is_symlink() and tree(b.root) == {"proj/docs/f.txt": b"in docs"}

    wait_until(arrived)
    write(a.root, "proj/docs/g.txt", "later")  # a change in the folder the link points to
    wait_until(lambda: tree(b.root).get("proj/docs/g.txt") == b"later")
    assert os.readlink(b.root / "proj" / "notes") == "docs"
    for node in (a, b):
        with sqlite3.connect(node.db_path) as db:
            through = db.execute(
                "SELECT path FROM files WHERE path LIKE 'proj/notes/%' AND deleted = 0"
            ).fetchall()
        assert through == [], (node.node_id, through)
