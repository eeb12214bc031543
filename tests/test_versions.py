"""Versions: what a peer's change replaces or deletes is kept, and `restore` brings it back."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ironsync.chunking import content_hash
from ironsync.sync.versions import (
    keep_version,
    kept_name,
    list_versions,
    prune_versions,
    same_content,
    version_at,
)
from tests.daemons import SyncNode, stop_all, tree, write

ALPHA_HASH = content_hash(b"alpha's edit").hex()[:8]
ALPHA_COPY = f"shared.sync-conflict-20231114-221320-alpha-{ALPHA_HASH}.txt"
"""alpha's side of the conflict these tests make: the second of its mtime, node, content."""

MTIME = 1_700_000_000 * 10**9  # 2023-11-14T22:13:20Z


def test_a_kept_version_is_named_by_its_mtime_and_found_again(tmp_path: Path) -> None:
    path = write(tmp_path, "dir/report.txt", "v1")
    os.utime(path, ns=(MTIME, MTIME))
    kept = keep_version(tmp_path, "dir/report.txt", move=False)
    assert kept == tmp_path / ".ironsync/versions/dir/report.txt~20231114-221320"
    assert path.exists() and kept.read_text() == "v1"
    assert os.stat(kept).st_ino == os.stat(path).st_ino  # a link, not a copy
    # a pull replaces by rename, which leaves the linked inode alone
    (tmp_path / "dir/.ironsync-x.tmp").write_text("v2!")
    os.replace(tmp_path / "dir/.ironsync-x.tmp", path)
    os.utime(path, ns=(MTIME, MTIME))
    second = keep_version(tmp_path, "dir/report.txt", move=True)
    assert second is not None and second.name == "report.txt~20231114-221320-1"
    assert not path.exists()
    versions = list_versions(tmp_path, "dir/report.txt")
    assert [v.file.read_text() for v in versions] == ["v1", "v2!"]
    assert version_at(tmp_path, "dir/report.txt", None) == versions[-1]
    assert version_at(tmp_path, "dir/report.txt", datetime(2020, 1, 1, tzinfo=UTC)) is None
    assert list_versions(tmp_path, "dir/report") == []  # a name prefix is not a match


def test_what_a_version_with_its_stamp_holds_already_is_not_kept_twice(tmp_path: Path) -> None:
    path = write(tmp_path, "report.txt", "v1")
    os.utime(path, ns=(MTIME, MTIME))
    first = keep_version(tmp_path, "report.txt", move=False)
    assert first is not None
    os.utime(first, ns=(MTIME, MTIME))  # ctime now, as when it was kept
    kept_at = os.lstat(first).st_ctime_ns

    # the same bytes under the same stamp: that version, kept again now (pruning restarts)
    assert keep_version(tmp_path, "report.txt", move=False) == first
    assert os.lstat(first).st_ctime_ns >= kept_at
    assert keep_version(tmp_path, "report.txt", move=True) == first
    assert not path.exists()
    # other bytes with the same stamp are kept beside it; those bytes again are not
    os.utime(write(tmp_path, "report.txt", "v2"), ns=(MTIME, MTIME))
    second = keep_version(tmp_path, "report.txt", move=False)
    assert second is not None and second.name == "report.txt~20231114-221320-1"
    assert keep_version(tmp_path, "report.txt", move=False) == second
    # `like`: a version with another stamp that holds the same bytes (restore: the newest)
    os.utime(path, ns=(MTIME + 10**9, MTIME + 10**9))
    assert keep_version(tmp_path, "report.txt", move=False, like=second) == second
    assert [v.file.read_text() for v in list_versions(tmp_path, "report.txt")] == ["v1", "v2"]


def test_same_content_compares_bytes_of_files_and_targets_of_links(tmp_path: Path) -> None:
    a = write(tmp_path, "a", "same bytes")
    assert same_content(a, write(tmp_path, "b", "same bytes"))
    assert not same_content(a, write(tmp_path, "c", "same bytez"))
    assert not same_content(a, write(tmp_path, "d", "other size"[:4]))
    assert not same_content(a, tmp_path / "missing")
    (tmp_path / "link1").symlink_to("a")
    (tmp_path / "link2").symlink_to("a")
    (tmp_path / "link3").symlink_to("b")
    assert same_content(tmp_path / "link1", tmp_path / "link2")
    assert not same_content(tmp_path / "link1", tmp_path / "link3")
    assert not same_content(tmp_path / "link1", a)  # a link is never followed


def test_a_name_too_long_to_take_the_stamp_is_kept_shortened_and_found_again(
    tmp_path: Path,
) -> None:
    names = ["\u00e9" * 127 + "a", "\u00e9" * 127 + "b"]  # 255 bytes each, alike up front
    for name in names:
        os.utime(write(tmp_path, f"dir/{name}", name[-1]), ns=(MTIME, MTIME))
        kept = keep_version(tmp_path, f"dir/{name}", move=True)
        assert kept is not None and len(kept.name.encode()) <= 255
        assert kept.name == f"{kept_name(name)}~20231114-221320"
    assert kept_name(names[0]) != kept_name(names[1])
    for name in names:
        (found,) = list_versions(tmp_path, f"dir/{name}")
        assert found.file.read_text() == name[-1]
    assert kept_name("short.txt") == "short.txt"


def test_old_versions_are_pruned_and_recent_ones_kept(tmp_path: Path) -> None:
    write(tmp_path, "a.txt", "a")
    keep_version(tmp_path, "a.txt", move=True)
    now = datetime.now(UTC)
    assert prune_versions(tmp_path, 30, now) == 0
    assert prune_versions(tmp_path, 0, now + timedelta(days=365)) == 0  # 0 = keep forever
    assert prune_versions(tmp_path, 30, now + timedelta(days=31)) == 1
    assert list_versions(tmp_path, "a.txt") == []


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[SyncNode, SyncNode]]:
    a = SyncNode(tmp_path, "alpha")
    b = SyncNode(tmp_path, "beta")
    a.add_peers(b)
    yield a, b
    stop_all(a, b)


@pytest.mark.slow
def test_a_deleted_file_is_kept_on_the_peer_and_restore_brings_it_back_everywhere(
    pair: tuple[SyncNode, SyncNode],
) -> None:
    a, b = pair
    write(a.root, "precious.txt", "do not lose me")
    b.start()
    a.sync()
    (a.root / "precious.txt").unlink()
    a.sync()
    assert "precious.txt" not in tree(b.root)
    (kept,) = list_versions(b.root, "precious.txt")
    assert kept.file.read_text() == "do not lose me"
    b.stop()
    out = b.run("restore", str(b.root / "precious.txt")).stdout
    assert "restored docs:precious.txt" in out and "(created)" in out
    b.start()
    a.sync()
    assert (a.root / "precious.txt").read_text() == "do not lose me"
    assert tree(a.root) == tree(b.root)
    history = json.loads(b.run("history", "--json", "docs:precious.txt").stdout)
    assert history["current"]["deleted"] is False
    assert [e["kind"] for e in history["events"]][-1] == "created"


def two_drafts(a: SyncNode, b: SyncNode) -> None:
    """doc.txt written on a (mtime MTIME), synced to b, then replaced there by a second draft
    from a: b keeps the first draft as a version."""
    path = write(a.root, "doc.txt", "first draft")
    os.utime(path, ns=(MTIME, MTIME))
    b.start()
    a.sync()
    write(a.root, "doc.txt", "second draft")
    a.sync()


@pytest.mark.slow
def test_a_replaced_file_is_kept_and_restore_at_picks_by_time(
    pair: tuple[SyncNode, SyncNode],
) -> None:
    a, b = pair
    two_drafts(a, b)
    assert (b.root / "doc.txt").read_text() == "second draft"
    kept = list_versions(b.root, "doc.txt")
    assert [v.file.read_text() for v in kept] == ["first draft"]
    b.stop()
    none = b.run("restore", "docs:doc.txt", "--at", "2020-01-01", check=False)
    assert none.returncode == 1 and "no kept version" in none.stderr
    b.run("restore", "docs:doc.txt", "--at", "2023-11-15")
    assert (b.root / "doc.txt").read_text() == "first draft"
    # what it replaced was kept in its turn
    assert sorted(v.file.read_text() for v in list_versions(b.root, "doc.txt")) == [
        "first draft",
        "second draft",
    ]
    text = b.run("history", "docs:doc.txt").stdout
    assert text.count("kept version") == 2


@pytest.mark.slow
def test_restore_of_what_the_file_holds_already_writes_nothing_and_keeps_no_second_version(
    pair: tuple[SyncNode, SyncNode],
) -> None:
    a, b = pair
    two_drafts(a, b)
    b.stop()
    b.run("restore", "docs:doc.txt", "--at", "2023-11-15")
    kept = sorted(v.file.name for v in list_versions(b.root, "doc.txt"))
    assert len(kept) == 2 and "doc.txt~20231114-221320" in kept
    restored = os.stat(b.root / "doc.txt")

    again = b.run("restore", "docs:doc.txt", "--at", "2023-11-15").stdout
    assert again == (
        "docs:doc.txt unchanged: it holds the version of 2023-11-14T22:13:20Z already; "
        "nothing written, no version kept\n"
    )
    assert sorted(v.file.name for v in list_versions(b.root, "doc.txt")) == kept
    now = os.stat(b.root / "doc.txt")
    assert (now.st_ino, now.st_mtime_ns, now.st_ctime_ns) == (
        restored.st_ino,
        restored.st_mtime_ns,
        restored.st_ctime_ns,
    )
    # the newest is the second draft; the first, put aside now, is kept already: not again
    b.run("restore", "docs:doc.txt")
    assert (b.root / "doc.txt").read_text() == "second draft"
    assert sorted(v.file.name for v in list_versions(b.root, "doc.txt")) == kept
    assert b.run("history", "docs:doc.txt").stdout.count("kept version") == 2


def test_conflicts_names_the_writer_of_each_side_and_a_name_deleted_since(
    tmp_path: Path,
) -> None:
    node = SyncNode(tmp_path, "gamma")
    write(node.root, "sub/report.txt", "gamma's")
    copy = "sub/report.sync-conflict-20231114-221320-alpha-0123abcd.txt"
    os.utime(write(node.root, copy, "alpha's!"), ns=(MTIME, MTIME))
    node.run("scan")
    said = node.run("conflicts").stdout.splitlines()
    assert said[0] == "docs:sub/report.txt"
    assert said[1].startswith("  sub/report.txt ") and "written by gamma " in said[1]
    assert said[2] == f"  {copy}  written by alpha 2023-11-14T22:13:20Z  8 bytes"

    (node.root / "sub/report.txt").unlink()
    node.run("scan")
    padding = " " * (len(copy) - len("sub/report.txt"))
    assert node.run("conflicts").stdout == (
        "docs:sub/report.txt\n"
        f"  sub/report.txt{padding}  deleted by gamma\n"
        f"  {copy}  written by alpha 2023-11-14T22:13:20Z  8 bytes\n"
    )
    (c,) = json.loads(node.run("conflicts", "--json").stdout)
    assert c["sides"][0] == {
        "path": "sub/report.txt",
        "node": "gamma",
        "deleted": True,
        "mtime": None,
        "size": None,
        "conflict_copy": False,
    }
    assert [side["node"] for side in c["sides"]] == ["gamma", "alpha"]
    said = " ".join(node.run("resolve", "--help").stdout.split())
    assert "mine = the file under the original name, theirs = the conflict copy" in said


def make_conflict(a: SyncNode, b: SyncNode) -> None:
    write(a.root, "shared.txt", "original")
    b.start()
    a.sync()
    b.stop()
    edit_a = write(a.root, "shared.txt", "alpha's edit")
    edit_b = write(b.root, "shared.txt", "beta's edit")
    os.utime(edit_a, ns=(MTIME, MTIME))
    os.utime(edit_b, ns=(MTIME + 10**9, MTIME + 10**9))
    b.start()
    a.sync()


@pytest.mark.slow
def test_conflicts_lists_both_sides_and_resolve_keep_theirs_settles_it_everywhere(
    pair: tuple[SyncNode, SyncNode],
) -> None:
    a, b = pair
    make_conflict(a, b)
    # Each side by its path and the node that wrote it, the same on both nodes: on alpha, the
    # file under the name is beta's edit, not "mine".
    for node in (a, b):
        assert json.loads(node.run("conflicts", "--json").stdout) == [
            {
                "storage": "docs",
                "path": "shared.txt",
                "sides": [
                    {
                        "path": "shared.txt",
                        "node": "beta",
                        "deleted": False,
                        "mtime": "2023-11-14T22:13:21+00:00",
                        "size": len("beta's edit"),
                        "conflict_copy": False,
                    },
                    {
                        "path": ALPHA_COPY,
                        "node": "alpha",
                        "deleted": False,
                        "mtime": "2023-11-14T22:13:20+00:00",
                        "size": len("alpha's edit"),
                        "conflict_copy": True,
                    },
                ],
            }
        ]
        padding = " " * (len(ALPHA_COPY) - len("shared.txt"))
        assert node.run("conflicts").stdout == (
            "docs:shared.txt\n"
            f"  shared.txt{padding}  written by beta  2023-11-14T22:13:21Z  11 bytes\n"
            f"  {ALPHA_COPY}  written by alpha 2023-11-14T22:13:20Z  12 bytes\n"
        )
    out = a.run("resolve", "docs:shared.txt", "--keep", "theirs").stdout
    assert "resolved docs:shared.txt (kept theirs)" in out
    a.sync()
    assert tree(a.root) == tree(b.root) == {"shared.txt": b"alpha's edit"}
    assert json.loads(b.run("conflicts", "--json").stdout) == []
    # the discarded side is in the versions folder, not gone
    assert "beta's edit" in [v.file.read_text() for v in list_versions(a.root, "shared.txt")]


@pytest.mark.slow
def test_resolve_keep_mine_drops_the_copy_into_versions(pair: tuple[SyncNode, SyncNode]) -> None:
    a, b = pair
    make_conflict(a, b)
    copy = ALPHA_COPY
    bad = b.run("resolve", "docs:shared.txt", "--keep", "nonsense.txt", check=False)
    assert bad.returncode == 2 and "is not a conflict copy" in bad.stderr
    b.stop()
    b.run("resolve", f"docs:{copy}", "--keep", "mine")
    b.start()
    a.sync()
    assert tree(a.root) == tree(b.root) == {"shared.txt": b"beta's edit"}
    assert [v.file.read_text() for v in list_versions(b.root, copy)] == ["alpha's edit"]
