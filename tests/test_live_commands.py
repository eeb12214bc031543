"""Issue 12: what a user does beside running daemons reaches the peers at once, and a `sync`
that says "converged" means it.

The daemons here run with their watchers off (or with a debounce far longer than the test
waits) and rescan only hourly, so the only way a change can reach the peer in time is the one
under test: the command telling its daemon (the control socket), or the peer catching up with
its watcher when a full sync asks. Nobody runs `sync` by hand unless the test is about it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemons import SyncNode, stop_all, tree, write
from tests.livepair import logs, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[SyncNode, SyncNode]]:
    """Two daemons, each the other's peer, watchers off, connected and in sync."""
    a = SyncNode(tmp_path, "alpha")
    b = SyncNode(tmp_path, "beta")
    a.add_peers(b)
    b.add_peers(a)
    for node in (a, b):
        node.write_config(rescan_interval=3600)
    a.start()
    b.start()
    # each dials the other and syncs once at start; that sync's scan would find the tests'
    # changes itself: wait until both are done
    wait_until(
        lambda: a.events("sync_finished") and b.events("sync_finished"),
        what="both start-up syncs",
    )
    write(a.root, "hello.txt", "hello")
    a.run("scan")
    wait_until(lambda: tree(b.root) == {"hello.txt": b"hello"}, what="the first file on beta")
    yield a, b
    stop_all(a, b)


def same_trees(a: SyncNode, b: SyncNode, what: str) -> dict[str, bytes]:
    wait_until(lambda: tree(a.root) == tree(b.root), what=what, context=lambda: logs(a, b))
    return tree(a.root)


def test_a_change_found_by_scan_reaches_the_peer_with_no_sync(
    pair: tuple[SyncNode, SyncNode],
) -> None:
    a, b = pair
    write(a.root, "notes/new.txt", "written while the watcher is off")

    said = a.run("scan")

    assert "created" in said.stdout and "notes/new.txt" in said.stdout
    files = same_trees(a, b, "the scanned file on beta")
    assert files["notes/new.txt"] == b"written while the watcher is off"


def test_restore_beside_the_daemons_reaches_the_peer_with_no_sync(
    pair: tuple[SyncNode, SyncNode],
) -> None:
    a, b = pair
    write(a.root, "hello.txt", "hello, edited")
    a.run("scan")
    wait_until(lambda: tree(b.root)["hello.txt"] == b"hello, edited", what="the edit on beta")
    # beta kept the version it replaced; put it back there

    said = b.run("restore", "docs:hello.txt")

    assert "the running daemon has told its peers" in said.stdout, said.stdout
    files = same_trees(a, b, "the restored version on alpha")
    assert files["hello.txt"] == b"hello"


def test_resolve_beside_the_daemons_reaches_the_peer_with_no_sync(
    pair: tuple[SyncNode, SyncNode],
) -> None:
    a, b = pair
    write(a.root, "hello.txt", "alpha's edit")
    write(b.root, "hello.txt", "beta's edit")
    assert a.sync()["exit"] == 0  # both edits indexed: a conflict copy on both nodes
    files = same_trees(a, b, "the conflict copy on both")
    (copy,) = [p for p in files if ".sync-conflict-" in p]

    said = a.run("resolve", "docs:hello.txt", "--keep", "theirs")

    assert "the running daemon has told its peers" in said.stdout, said.stdout
    kept = files[copy]
    wait_until(
        lambda: tree(b.root) == {"hello.txt": kept},
        what="the resolution on beta",
        context=lambda: logs(a, b),
    )
    assert tree(a.root) == {"hello.txt": kept}


def test_without_a_daemon_restore_says_the_change_waits_for_the_next_sync(
    tmp_path: Path,
) -> None:
    a = SyncNode(tmp_path, "alpha")
    write(a.root, "hello.txt", "two, longer")
    a.run("scan")
    versions = a.root / ".ironsync" / "versions"
    versions.mkdir(parents=True, exist_ok=True)
    (versions / "hello.txt~20260101-000000").write_text("one")

    said = a.run("restore", "docs:hello.txt")

    assert "no daemon is running here" in said.stdout, said.stdout
    assert (a.root / "hello.txt").read_text() == "one"


@pytest.mark.parametrize("size", [5, 30 * 1024 * 1024], ids=["small", "30MiB"])
@pytest.mark.parametrize("alpha_daemon", [False, True], ids=["standalone", "through-daemon"])
def test_sync_right_after_a_write_on_a_watching_peer_pulls_it(
    tmp_path: Path, size: int, alpha_daemon: bool
) -> None:
    # beta's watcher would record the file only after 60 s; alpha's sync must not wait for that
    a = SyncNode(tmp_path, "alpha")
    b = SyncNode(tmp_path, "beta", watcher=True, delay=60)
    a.add_peers(b)
    try:
        b.start()
        if alpha_daemon:
            a.start()
        wait_until(lambda: a.sync()["exit"] == 0, what="a first sync")
        data = os.urandom(size)
        write(b.root, "fresh.bin", data)

        result = a.sync()

        (peer,) = [r for r in result["results"] if "peer" in r]
        assert peer["converged"] and peer["pulled"] == 1, (result, b.log()[-3000:])
        assert (a.root / "fresh.bin").read_bytes() == data
    finally:
        stop_all(a, b)


def test_status_is_live_and_true_from_both_ends_of_a_session(tmp_path: Path) -> None:
    # alpha dials, beta only accepts: beta too knows where alpha is and when they last synced
    a = SyncNode(tmp_path, "alpha")
    b = SyncNode(tmp_path, "beta")
    a.add_peers(b)
    try:
        b.start()
        a.start()
        wait_until(lambda: a.events("sync_finished"), what="alpha's first full sync")

        def peer_of(node: SyncNode) -> dict[str, object]:
            (peer,) = json.loads(node.run("status", "--json").stdout)["peers"]
            return peer

        wait_until(lambda: peer_of(b)["last_sync_at"] is not None, what="beta's last sync")
        seen_by_b = peer_of(b)
        assert seen_by_b["connected"] is True
        assert seen_by_b["address"] == "127.0.0.1 (incoming)"
        assert peer_of(a)["address"] == b.address and peer_of(a)["last_sync_at"] is not None
        assert (
            "peer alpha: connected, 127.0.0.1 (incoming), last seen now" in b.run("status").stdout
        )
        # bytes move while the session stays open, not only when it ends
        before = peer_of(b)["bytes_in"]
        assert isinstance(before, int) and before > 0
        write(a.root, "big.bin", os.urandom(3_000_000))
        a.run("scan")
        wait_until(lambda: (b.root / "big.bin").exists(), what="big.bin on beta")
        after = peer_of(b)
        assert after["connected"] is True and after["bytes_in"] >= before + 3_000_000
    finally:
        stop_all(a, b)
