"""Issue 11, faithful trees: one black-box test per capability, over two real daemons.

Both daemons run with their watchers on (a short debounce) and are each other's peer; a change
is made on one node's disk and the test waits (polling, generous deadline) until the other
node's tree is identical — types, permission bits, link targets, contents (tests/treesnap.py).
`ironsync sync` is run by hand only where the test is about it: after a type change, every
later sync must exit 0.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.daemons import SyncNode, stop_all, write
from tests.livepair import (
    DEADLINE,
    events_after,
    last_seq,
    logs,
    start,
    start_pair,
    wait_until,
)
from tests.treesnap import Entry, Tree, assert_same_tree, entry_of, snapshot, wait_same_tree

pytestmark = pytest.mark.slow

EMPTY_SHA = hashlib.sha256(b"").hexdigest()


@pytest.fixture(autouse=True)
def usual_umask() -> Iterator[None]:
    """The modes asserted here are those a umask of 022 gives, as on most systems."""
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[SyncNode, SyncNode]]:
    a, b = start_pair(tmp_path)
    yield a, b
    stop_all(a, b)


def converge(
    a: SyncNode,
    b: SyncNode,
    also: Callable[[Tree], bool] | None = None,
    skip: Callable[[str], bool] | None = None,
) -> Tree:
    """Wait until both trees are identical (and `also` holds); the common snapshot."""
    return wait_same_tree(
        a.root, b.root, timeout=DEADLINE, also=also, skip=skip, context=lambda: logs(a, b),
        names=(a.node_id, b.node_id),
    )  # fmt: skip


def same_now(a: SyncNode, b: SyncNode, skip: Callable[[str], bool] | None = None) -> Tree:
    return assert_same_tree(a.root, b.root, skip=skip, names=(a.node_id, b.node_id))


def every_later_sync_exits_0(
    a: SyncNode, b: SyncNode, skip: Callable[[str], bool] | None = None
) -> None:
    """`ironsync sync` from each node exits 0 with every peer converged, and changes nothing
    (`skip`: paths one node ignores)."""
    before = snapshot(a.root)
    for node in (a, b, a):
        result = node.sync()
        assert result["exit"] == 0
        assert all(r["converged"] for r in result["results"] if "peer" in r), result
    same_now(a, b, skip)
    assert snapshot(a.root) == before


def sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def indexed_paths(node: SyncNode) -> list[str]:
    """Every path `node`'s database knows (its own index and what peers announced), read with
    the stock sqlite3 shell as a person would."""
    out = subprocess.run(
        ["sqlite3", "-readonly", str(node.db_path),
         "SELECT path FROM files UNION SELECT path FROM peer_files"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout  # fmt: skip
    return out.splitlines()


def bytes_pulled(node: SyncNode, since: int) -> int:
    """Content bytes `node` received from its peer (write_finished events) after event `since`."""
    return sum(
        (e["detail"] or {}).get("bytes_from_peer", 0)
        for e in events_after(node, since, "write_finished")
    )


# --- folders ---------------------------------------------------------------------------------


def test_an_empty_folder_created_reaches_the_peer(pair: tuple[SyncNode, SyncNode]) -> None:
    a, b = pair
    (a.root / "empty").mkdir()
    (a.root / "nested/empty/all/the/way").mkdir(parents=True)
    os.chmod(a.root / "nested/empty", 0o750)
    tree = converge(a, b, also=lambda t: "nested/empty/all/the/way" in t)
    assert tree["empty"] == Entry("dir", 0o755, None)
    assert tree["nested/empty"] == Entry("dir", 0o750, None)
    assert tree["nested/empty/all/the/way"].type == "dir"
    assert not [p for p, e in tree.items() if e.type != "dir"]


def test_an_empty_folder_deleted_on_one_node_is_removed_on_the_peer(
    pair: tuple[SyncNode, SyncNode],
) -> None:
    a, b = pair
    (a.root / "stays").mkdir()
    (a.root / "goes/inner").mkdir(parents=True)
    converge(a, b, also=lambda t: "goes/inner" in t)
    # deleted on beta, the node that did not make it
    (b.root / "goes/inner").rmdir()
    (b.root / "goes").rmdir()
    tree = converge(a, b, also=lambda t: "goes" not in t)
    assert tree == {"stays": Entry("dir", 0o755, None)}


def test_rm_r_of_a_tree_removes_all_of_it_on_the_peer(pair: tuple[SyncNode, SyncNode]) -> None:
    a, b = pair
    write(a.root, "keep.txt", "kept")
    write(a.root, "tree/top.txt", "top")
    write(a.root, "tree/a/b/c/deep.txt", "deep")
    write(a.root, "tree/a/side.bin", os.urandom(100_000))
    (a.root / "tree/a/empty").mkdir()
    (a.root / "tree/x/y").mkdir(parents=True)
    os.symlink("../top.txt", a.root / "tree/a/link")
    converge(a, b, also=lambda t: "tree/a/link" in t and "tree/x/y" in t)
    shutil.rmtree(a.root / "tree")
    tree = converge(a, b, also=lambda t: "tree" not in t)
    assert set(tree) == {"keep.txt"}
    # what beta held under it is kept in its versions folder, not lost
    kept = {p.name.split("~")[0] for p in (b.root / ".ironsync/versions/tree").rglob("*~*")}
    assert {"top.txt", "deep.txt", "side.bin"} <= kept


def test_a_folder_holding_only_an_ignored_file_on_the_peer_is_kept_with_it(
    tmp_path: Path,
) -> None:
    def ignore_logs_on_beta(_a: SyncNode, b: SyncNode) -> None:
        (b.root / ".ignore").write_text("*.log\n")

    a, b = start_pair(tmp_path, prepare=ignore_logs_on_beta)
    try:
        write(a.root, "build/out.txt", "output")
        converge(a, b, also=lambda t: "build/out.txt" in t)
        write(b.root, "build/debug.log", "beta's own log, ignored there")
        mark = last_seq(b)
        shutil.rmtree(a.root / "build")
        # beta removes what was synced, keeps the folder for the file it ignores ...
        wait_until(
            lambda: not (b.root / "build/out.txt").exists(),
            what="beta deleting build/out.txt",
            context=lambda: logs(a, b),
        )
        assert (b.root / "build/debug.log").read_text() == "beta's own log, ignored there"
        # ... says why ...
        kept = [e for e in events_after(b, mark, "kept") if e["path"] == "build"]
        assert kept, f"no 'kept' event for build on beta: {events_after(b, mark)}"
        why = json.dumps(kept[-1]["detail"])
        assert "debug.log" in why and ".ignore" in why, kept[-1]  # what it holds, and why
        # ... and both nodes agree on everything but the ignored file: the folder stays
        tree = converge(a, b, skip=lambda rel: rel.endswith(".log"))
        assert tree == {"build": Entry("dir", 0o755, None)}
        every_later_sync_exits_0(a, b, skip=lambda rel: rel.endswith(".log"))
        assert (b.root / "build/debug.log").exists()
    finally:
        stop_all(a, b)


def test_a_directory_rename_is_a_move_and_leaves_no_empty_source_folder(
    pair: tuple[SyncNode, SyncNode],
) -> None:
    a, b = pair
    write(a.root, "proj/a.bin", os.urandom(300_000))
    write(a.root, "proj/sub/b.bin", os.urandom(300_000))
    write(a.root, "proj/sub/deeper/c.txt", "small text")
    (a.root / "proj/empty").mkdir()
    os.symlink("a.bin", a.root / "proj/link")
    converge(a, b, also=lambda t: "proj/link" in t and "proj/empty" in t)
    mark = last_seq(b)
    (a.root / "proj").rename(a.root / "renamed")
    tree = converge(a, b, also=lambda t: "proj" not in t)
    assert {"renamed/a.bin", "renamed/sub/deeper/c.txt", "renamed/empty", "renamed/link"} <= set(
        tree
    )
    assert bytes_pulled(b, mark) == 0, events_after(b, mark)
    moved = [e for e in events_after(b, mark, "moved") if e["path"].startswith("renamed")]
    assert moved, f"no move on beta: {events_after(b, mark)}"
    assert not [e for e in events_after(b, mark, "write_started") if e["path"].endswith(".bin")]


def test_folder_permission_bits_are_synced(pair: tuple[SyncNode, SyncNode]) -> None:
    a, b = pair
    write(a.root, "private/secret.txt", "mine")
    (a.root / "private/inner").mkdir()
    converge(a, b, also=lambda t: "private/inner" in t)
    os.chmod(a.root / "private", 0o700)
    os.chmod(a.root / "private/inner", 0o750)
    tree = converge(a, b, also=lambda t: t["private"].mode == 0o700)
    assert tree["private/inner"].mode == 0o750
    assert stat.S_IMODE((b.root / "private").stat().st_mode) == 0o700


def test_a_permission_only_change_of_a_file_is_synced(pair: tuple[SyncNode, SyncNode]) -> None:
    a, b = pair
    script = write(a.root, "tool.sh", "#!/bin/sh\necho hello\n")
    script.chmod(0o644)
    converge(a, b, also=lambda t: "tool.sh" in t)
    before = script.stat()
    mark = last_seq(b)  # before the change: b may apply it before this line runs again
    script.chmod(0o755)  # chmod +x: size and mtime unchanged
    after = script.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    tree = converge(a, b, also=lambda t: t["tool.sh"].mode == 0o755)
    assert tree["tool.sh"].content == sha("#!/bin/sh\necho hello\n")
    assert (b.root / "tool.sh").stat().st_mtime_ns == after.st_mtime_ns
    # the receiving node says what it applied (issue 12)
    wait_until(
        lambda: metadata_events(b, mark, "tool.sh"),
        what="b's modified event",
        context=lambda: f"b's events: {events_after(b, mark)}",
    )
    (applied,) = metadata_events(b, mark, "tool.sh")
    assert applied["peer"] == a.node_id
    assert applied["detail"] == {"content_changed": False, "mode": "644 -> 755"}
    # and back: chmod -x
    script.chmod(0o644)
    converge(a, b, also=lambda t: t["tool.sh"].mode == 0o644)
    # touch alone: a new mtime, same content and mode
    mark = last_seq(b)
    os.utime(script, ns=(after.st_atime_ns, after.st_mtime_ns + 7 * 10**9))
    touched = after.st_mtime_ns + 7 * 10**9
    wait_until(lambda: (b.root / "tool.sh").stat().st_mtime_ns == touched, what="b's mtime")
    wait_until(
        lambda: metadata_events(b, mark, "tool.sh"),
        what="b's modified event",
        context=lambda: f"b's events: {events_after(b, mark)}",
    )
    (applied,) = metadata_events(b, mark, "tool.sh")
    assert applied["peer"] == a.node_id and "mode" not in applied["detail"]
    assert applied["detail"]["mtime"].startswith(
        datetime.fromtimestamp(after.st_mtime_ns / 1e9 + 7, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    )


def metadata_events(node: SyncNode, since: int, path: str) -> list[dict[str, object]]:
    """`node`'s `modified` events of `path` after `since` that changed no content."""
    return [
        e for e in events_after(node, since, "modified")
        if e["path"] == path and (e["detail"] or {}).get("content_changed") is False
    ]  # fmt: skip


def test_a_permission_only_change_is_found_and_synced_by_a_full_sync(tmp_path: Path) -> None:
    """Watchers off: the change is found by the scans, and the storage hashes must differ."""
    a, b = start_pair(tmp_path, watcher=False)
    try:
        script = write(a.root, "tool.sh", "#!/bin/sh\necho hello\n")
        script.chmod(0o644)
        (a.root / "bin").mkdir()
        assert a.sync()["exit"] == 0
        same_now(a, b)
        script.chmod(0o755)
        (a.root / "bin").chmod(0o700)
        result = a.sync()
        assert result["exit"] == 0, result
        tree = same_now(a, b)
        assert (tree["tool.sh"].mode, tree["bin"].mode) == (0o755, 0o700)
    finally:
        stop_all(a, b)


# --- type changes ------------------------------------------------------------------------------


def make(root: Path, rel: str, kind: str, outside: Path) -> None:
    """Make `rel` a `kind`: a file, a folder with children (files, a subfolder, an empty one),
    a symlink (for `link-out`: to a folder outside the storage, which must never be written)."""
    path = root / rel
    if kind == "file":
        write(root, rel, f"the file {rel}")
    elif kind == "dir":
        write(root, f"{rel}/child.txt", "a child")
        write(root, f"{rel}/sub/inner.txt", "an inner child")
        (path / "sub/empty").mkdir()
    elif kind == "symlink":
        os.symlink("elsewhere.txt", path)
    elif kind == "link-out":
        os.symlink(str(outside), path)
    else:
        raise ValueError(kind)


def remove(root: Path, rel: str) -> None:
    path = root / rel
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


TYPE_CHANGES = [
    ("file", "dir"),
    ("dir", "file"),
    ("file", "symlink"),
    ("link-out", "dir"),  # symlink -> folder: the folder's files must not go through the link
    ("dir", "symlink"),
    ("symlink", "file"),
]


def entry_type(kind: str) -> str:
    return "symlink" if kind == "link-out" else kind


@pytest.mark.parametrize("maker", ["alpha", "beta"])
@pytest.mark.parametrize(("old", "new"), TYPE_CHANGES, ids=[f"{o}-to-{n}" for o, n in TYPE_CHANGES])
def test_a_type_change_reaches_the_peer_and_later_syncs_exit_0(
    tmp_path: Path, pair: tuple[SyncNode, SyncNode], maker: str, old: str, new: str
) -> None:
    a, b = pair
    here, there = (a, b) if maker == "alpha" else (b, a)
    outside = tmp_path / "outside"
    outside.mkdir()
    make(here.root, "x", old, outside)
    write(here.root, "neighbour.txt", "unrelated")
    converge(a, b, also=lambda t: "x" in t and t["x"].type == entry_type(old))
    remove(here.root, "x")
    make(here.root, "x", new, outside)
    tree = converge(a, b, also=lambda t: "x" in t and t["x"].type == entry_type(new))
    if new == "dir":
        assert tree["x/sub/empty"].type == "dir"
    every_later_sync_exits_0(a, b)
    assert list(outside.iterdir()) == []  # nothing went through the old link
    if old == "file":  # the replaced file is kept in the versions folder of the other node
        kept = list((there.root / ".ironsync/versions").glob("x~*"))
        assert [k.read_text() for k in kept] == ["the file x"]


@pytest.mark.parametrize("maker", ["alpha", "beta"])
def test_every_type_change_at_once_is_applied_in_one_sync(tmp_path: Path, maker: str) -> None:
    """Watchers off: one `ironsync sync` from alpha (the change made on alpha, the initiator,
    or on beta, the answering daemon) applies all type changes, and the next has nothing to do."""
    a, b = start_pair(tmp_path, watcher=False)
    try:
        here = a if maker == "alpha" else b
        outside = tmp_path / "outside"
        outside.mkdir()
        for n, (old, _new) in enumerate(TYPE_CHANGES):
            make(here.root, f"p{n}", old, outside)
        assert a.sync()["exit"] == 0
        same_now(a, b)
        for n, (_old, new) in enumerate(TYPE_CHANGES):
            remove(here.root, f"p{n}")
            make(here.root, f"p{n}", new, outside)
        result = a.sync()
        assert result["exit"] == 0, result
        assert all(r["converged"] for r in result["results"] if "peer" in r), result
        tree = same_now(a, b)
        assert {f"p{n}": tree[f"p{n}"].type for n in range(len(TYPE_CHANGES))} == {
            f"p{n}": entry_type(new) for n, (_old, new) in enumerate(TYPE_CHANGES)
        }
        again = a.sync()
        assert again["exit"] == 0
        peers = [r for r in again["results"] if "peer" in r]
        assert [(r["pulled"], r["peer_changed"]) for r in peers] == [(0, 0)], again
        assert b.sync()["exit"] == 0
        assert list(outside.iterdir()) == []
    finally:
        stop_all(a, b)


CONCURRENT = [("dir", "edit"), ("symlink", "link"), ("symlink", "edit")]


@pytest.mark.parametrize(
    ("new", "newer"), CONCURRENT, ids=[f"to-{n}-{w}-newer" for n, w in CONCURRENT]
)
def test_a_type_change_concurrent_with_an_edit_keeps_both(
    tmp_path: Path, new: str, newer: str
) -> None:
    a, b = start_pair(tmp_path)
    try:
        write(a.root, "report", "the first draft")
        converge(a, b, also=lambda t: "report" in t)
        b.stop()
        # alpha turns the file into a folder (or a link); beta, offline, edits it
        (a.root / "report").unlink()
        if new == "dir":
            write(a.root, "report/part1.txt", "part one")
        else:
            os.symlink("drafts/current", a.root / "report")
        write(b.root, "report", "beta's second draft")
        older, later = 1_700_000_000 * 10**9, 1_700_000_100 * 10**9
        edit_at, change_at = (later, older) if newer == "edit" else (older, later)
        os.utime(a.root / "report", ns=(change_at, change_at), follow_symlinks=False)
        os.utime(b.root / "report", ns=(edit_at, edit_at))
        start(b)
        tree = converge(a, b, also=lambda t: any(".sync-conflict-" in p for p in t))
        (copy,) = [p for p in tree if p.startswith("report.sync-conflict-") and "/" not in p]
        edited = Entry("file", 0o644, sha("beta's second draft"))
        if new == "dir":
            # a folder always keeps the name (it may hold children), even against a newer
            # edit; the edit is the copy
            assert tree["report"] == Entry("dir", 0o755, None)
            assert tree["report/part1.txt"].content == sha("part one")
            assert tree[copy] == edited
        else:
            link = Entry("symlink", None, "drafts/current")
            # the newer mtime keeps the name, the other is kept beside it
            assert (tree["report"], tree[copy]) == (
                (edited, link) if newer == "edit" else (link, edited)
            )
        every_later_sync_exits_0(a, b)
    finally:
        stop_all(a, b)


# --- symlinks ----------------------------------------------------------------------------------


def test_symlinks_arrive_as_the_same_links_and_are_never_followed(
    tmp_path: Path, pair: tuple[SyncNode, SyncNode]
) -> None:
    a, b = pair
    outside = tmp_path / "outside"
    write(outside, "secret.txt", "outside every storage")
    outside_before = snapshot(outside)
    write(a.root, "sub/target.txt", "target")
    links = {
        "rel": "sub/target.txt",
        "sub/back": "../rel",
        "dirlink": "sub",
        "dangling": "no/such/file",
        "up": "..",
        "etc": "/etc",
        "abs": str(outside),
        "sub/loop": "loop",
    }
    for rel, target in links.items():
        os.symlink(target, a.root / rel)
    tree = converge(a, b, also=lambda t: all(rel in t for rel in links))
    for rel, target in links.items():
        assert tree[rel] == Entry("symlink", None, target)
        assert os.readlink(b.root / rel) == target
    # never followed: nothing under a link is indexed, on either node, and nothing outside the
    # storage was written
    for node in (a, b):
        under = [
            p
            for p in indexed_paths(node)
            if "/" in p and p.split("/")[0] in ("up", "etc", "abs", "dirlink")
        ]
        assert under == [], f"{node.node_id} indexed paths through links: {under[:10]}"
    assert set(tree) == {*links, "sub", "sub/target.txt"}
    # retarget and delete
    os.unlink(a.root / "rel")
    os.symlink("sub/elsewhere", a.root / "rel")
    os.unlink(a.root / "etc")
    tree = converge(a, b, also=lambda t: "etc" not in t and t["rel"].content == "sub/elsewhere")
    every_later_sync_exits_0(a, b)
    assert snapshot(outside) == outside_before


# --- edge cases people hit ---------------------------------------------------------------------


def test_an_empty_file_and_a_truncation_to_zero_are_synced(
    pair: tuple[SyncNode, SyncNode],
) -> None:
    a, b = pair
    write(a.root, "empty.txt", b"")
    write(a.root, "shrinks.bin", os.urandom(100_000))
    tree = converge(a, b, also=lambda t: "shrinks.bin" in t and "empty.txt" in t)
    assert tree["empty.txt"].content == EMPTY_SHA
    os.truncate(a.root / "shrinks.bin", 0)
    converge(a, b, also=lambda t: t["shrinks.bin"].content == EMPTY_SHA)
    assert (b.root / "shrinks.bin").stat().st_size == 0


def test_a_path_40_folders_deep_is_synced_and_removed(pair: tuple[SyncNode, SyncNode]) -> None:
    a, b = pair
    deep = "/".join(f"level-{n:02}" for n in range(40))
    write(a.root, f"{deep}/leaf.txt", "at the bottom")
    (b.root / deep.replace("level", "empty")).mkdir(parents=True)  # and an empty one from beta
    tree = converge(
        a, b, also=lambda t: f"{deep}/leaf.txt" in t and deep.replace("level", "empty") in t
    )
    assert tree[f"{deep}/leaf.txt"].content == sha("at the bottom")
    shutil.rmtree(a.root / "level-00")
    shutil.rmtree(a.root / "empty-00")
    assert converge(a, b, also=lambda t: not t) == {}


def test_hard_links_arrive_as_separate_files_with_the_same_content(
    pair: tuple[SyncNode, SyncNode],
) -> None:
    a, b = pair
    first = write(a.root, "one.txt", "one inode, three names")
    os.link(first, a.root / "two.txt")
    (a.root / "sub").mkdir()
    os.link(first, a.root / "sub/three.txt")
    assert first.stat().st_nlink == 3
    tree = converge(a, b, also=lambda t: {"one.txt", "two.txt", "sub/three.txt"} <= set(t))
    names = ("one.txt", "two.txt", "sub/three.txt")
    assert {tree[n].content for n in names} == {sha("one inode, three names")}
    inodes = {(b.root / n).stat().st_ino for n in names}
    assert len(inodes) == 3 and all((b.root / n).stat().st_nlink == 1 for n in names)


def test_a_fifo_is_skipped_and_not_synced(pair: tuple[SyncNode, SyncNode]) -> None:
    a, b = pair
    os.mkfifo(a.root / "pipe")
    (a.root / "sub").mkdir()
    os.mkfifo(a.root / "sub/pipe")
    write(a.root, "sub/after.txt", "a file beside the FIFO")
    fifos = {"pipe", "sub/pipe"}
    converge(a, b, skip=fifos.__contains__, also=lambda t: "sub/after.txt" in t)
    assert not os.path.lexists(b.root / "pipe") and not os.path.lexists(b.root / "sub/pipe")
    assert entry_of(a.root / "pipe").type == "fifo"  # type: ignore[union-attr]
    result = a.sync()
    assert result["exit"] == 0, result
    # it is named (once) where a person looks
    named = [e for e in a.events() if e["path"] in fifos]
    assert named or "pipe" in a.log(), "the FIFO is not named in alpha's events or log"
    assert a.sync()["exit"] == 0
    assert [e for e in a.events() if e["path"] in fifos] == named  # named once, not each sync
    assert not os.path.lexists(b.root / "pipe")
    assert stat.S_ISFIFO(os.lstat(a.root / "pipe").st_mode)


# --- restore, history, log tail ----------------------------------------------------------------


def test_restore_of_a_deleted_folder_brings_back_what_the_versions_folder_holds(
    pair: tuple[SyncNode, SyncNode],
) -> None:
    a, b = pair
    write(a.root, "album/cover.jpg", b"\xff\xd8 not really a jpeg")
    write(a.root, "album/disc1/01.flac", os.urandom(50_000))
    converge(a, b, also=lambda t: "album/disc1/01.flac" in t)
    flac = (a.root / "album/disc1/01.flac").read_bytes()
    shutil.rmtree(a.root / "album")
    converge(a, b, also=lambda t: "album" not in t)
    proc = b.run("restore", "docs:album")
    assert "restored" in proc.stdout, proc.stdout
    assert (b.root / "album/cover.jpg").read_bytes() == b"\xff\xd8 not really a jpeg"
    assert (b.root / "album/disc1/01.flac").read_bytes() == flac
    # a new local change on beta: it reaches alpha
    tree = converge(a, b, also=lambda t: "album/disc1/01.flac" in t)
    assert tree["album/disc1/01.flac"].content == sha(flac)
    every_later_sync_exits_0(a, b)


FOLDER_WORD = re.compile(r"\b(folder|dir|directory)\b", re.IGNORECASE)
LINK_WORD = re.compile(r"\b(symlink|link)\b", re.IGNORECASE)


def test_history_and_log_tail_show_folder_and_link_events_readably(
    pair: tuple[SyncNode, SyncNode],
) -> None:
    a, b = pair
    (a.root / "albums/2024").mkdir(parents=True)
    os.symlink("albums/2024", a.root / "latest")
    converge(a, b, also=lambda t: "latest" in t and "albums/2024" in t)
    for node in (a, b):
        folder = node.run("history", "docs:albums/2024").stdout
        now = [line for line in folder.splitlines() if "now:" in line]
        assert now and FOLDER_WORD.search(now[0]) and "hash" not in now[0], folder
        link = node.run("history", "docs:latest").stdout
        now = [line for line in link.splitlines() if "now:" in line]
        assert now and LINK_WORD.search(now[0]) and "albums/2024" in now[0], link
        current = json.loads(node.run("history", "--json", "docs:latest").stdout)["current"]
        assert current.get("kind", current.get("type")) == "symlink", current
        assert current.get("target") == "albums/2024", current
        tail = node.run("log", "tail", "-n", "1000").stdout.splitlines()
        folder_lines = [line for line in tail if "docs:albums/2024" in line]
        assert folder_lines and all(FOLDER_WORD.search(x) for x in folder_lines), folder_lines
        link_lines = [line for line in tail if "docs:latest" in line]
        assert link_lines and all("albums/2024" in x for x in link_lines), link_lines
    # a deleted folder and link are shown as such too
    os.unlink(a.root / "latest")
    shutil.rmtree(a.root / "albums")
    converge(a, b, also=lambda t: not t)
    folder = b.run("history", "docs:albums/2024").stdout
    assert "deleted" in folder and FOLDER_WORD.search(folder), folder


def test_with_sync_symlinks_off_a_node_leaves_links_alone_and_still_converges(
    tmp_path: Path,
) -> None:
    def links_off_on_beta(_a: SyncNode, b: SyncNode) -> None:
        b.write_config(sync_symlinks=False)
        os.symlink("anywhere", b.root / "betas-own-link")

    a, b = start_pair(tmp_path, watcher=False, prepare=links_off_on_beta)
    try:
        os.symlink("target.txt", a.root / "link")
        write(a.root, "target.txt", "t")
        result = b.sync()
        assert result["exit"] == 0 and all(r["converged"] for r in result["results"])
        assert (b.root / "target.txt").read_text() == "t"
        assert not os.path.lexists(b.root / "link")  # not made where links are off
        assert not os.path.lexists(a.root / "betas-own-link")  # nor sent from there
        assert os.readlink(b.root / "betas-own-link") == "anywhere"  # and left alone
        assert a.sync()["exit"] == 0
    finally:
        stop_all(a, b)
