"""The scanner on real folders and a real SQLite file, including changes made while stopped."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from ironsync.chunking import content_hash
from ironsync.ignore import IgnoreRules
from ironsync.reconcile import VersionVector
from ironsync.scan import RACY_WINDOW_NS, KnownStat, Stat, plan_scan
from ironsync.store import Database, index
from ironsync.store import events as ev
from ironsync.sync.local import StorageUnavailable, scan_storage
from tests.conftest import Node

LONG_AGO_NS = 1_600_000_000_000_000_000  # 2020: never "racy"


def write(root: Path, rel: str, data: bytes, mtime_ns: int | None = LONG_AGO_NS) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))
    return path


def scan(node: Node, db: Database) -> dict[str, list[str]]:
    """Scan the node's first storage; changes by kind."""
    config = node.config()
    report = scan_storage(db, config.node_id, config.storages[0])
    out: dict[str, list[str]] = {}
    for change in report.changes:
        label = f"{change.from_path}->{change.path}" if change.from_path else change.path
        out.setdefault(change.kind, []).append(label)
    return {k: sorted(v) for k, v in out.items()}


def row(db: Database, path: str) -> index.FileRow:
    storage = index.get_storage(db, "docs")
    assert storage is not None
    found = index.get_file(db, storage.id, path)
    assert found is not None, path
    return found


def test_first_scan_indexes_every_file_with_hash_chunks_and_version(node: Node) -> None:
    write(node.root, "a.txt", b"alpha")
    write(node.root, "sub/deeper/b.bin", os.urandom(300_000))
    with node.db() as db:
        assert scan(node, db) == {"created": ["a.txt", "sub/deeper/b.bin"]}
        a = row(db, "a.txt")
        assert a.hash == content_hash(b"alpha")
        assert a.size == 5 and a.mtime_ns == LONG_AGO_NS and a.mode == 0o644
        assert VersionVector.from_json(a.version) == VersionVector({"alpha": 1})
        b = row(db, "sub/deeper/b.bin")
        chunks = index.chunks_of(db, b.id)
        assert sum(c.length for c in chunks) == 300_000 and len(chunks) > 1
        assert sorted([a.sequence, b.sequence]) == [1, 2]
        # a second scan with nothing changed changes nothing and reads nothing
        report = scan_storage(db, "alpha", node.config().storages[0])
        assert report.changes == [] and report.unchanged == 2 and report.bytes_hashed == 0


def test_changes_made_while_not_running_are_found_on_the_next_scan(node: Node) -> None:
    root = node.root
    write(root, "keep.txt", b"unchanged")
    write(root, "edit.txt", b"version one")
    write(root, "gone.txt", b"to be deleted")
    write(root, "old/name.bin", os.urandom(50_000))
    with node.db() as db:
        scan(node, db)
        before = {p: row(db, p) for p in ("edit.txt", "gone.txt", "old/name.bin")}
    # "ironsync is stopped": edit, delete, move, create
    write(root, "edit.txt", b"version two!", mtime_ns=LONG_AGO_NS + 5)
    (root / "gone.txt").unlink()
    (root / "new").mkdir()
    (root / "old" / "name.bin").rename(root / "new" / "name.bin")
    write(root, "fresh.txt", b"new file")
    with node.db() as db:
        assert scan(node, db) == {
            "created": ["fresh.txt"],
            "deleted": ["gone.txt"],
            "modified": ["edit.txt"],
            "moved": ["old/name.bin->new/name.bin"],
        }
        edit = row(db, "edit.txt")
        assert edit.hash == content_hash(b"version two!")
        assert VersionVector.from_json(edit.version)["alpha"] == 2
        tomb = row(db, "gone.txt")
        assert tomb.deleted and tomb.hash is None
        assert VersionVector.from_json(tomb.version)["alpha"] == 2
        moved = row(db, "new/name.bin")
        assert moved.hash == before["old/name.bin"].hash
        # the new path keeps the version history of the old one, one step on
        assert VersionVector.from_json(moved.version)["alpha"] == 2
        assert row(db, "old/name.bin").deleted
        assert index.chunks_of(db, row(db, "old/name.bin").id) == []
        kinds = [(e.kind, e.path) for e in ev.last_events(db, 100) if e.path]
        assert ("moved", "new/name.bin") in kinds
        assert ("deleted", "old/name.bin") not in kinds  # a move, not a delete + create
        # every change took a new sequence number
        sequences = [row(db, p).sequence for p in ("edit.txt", "gone.txt", "new/name.bin")]
        assert min(sequences) > max(r.sequence for r in before.values())


def test_move_is_found_by_content_when_the_file_was_copied_and_deleted(node: Node) -> None:
    data = os.urandom(20_000)
    write(node.root, "a.bin", data)
    with node.db() as db:
        scan(node, db)
        (node.root / "a.bin").unlink()
        write(node.root, "b.bin", data)  # a new inode: found by hash
        assert scan(node, db) == {"moved": ["a.bin->b.bin"]}


def test_same_size_edit_within_the_same_mtime_is_detected(node: Node) -> None:
    path = write(node.root, "a.txt", b"AAAA")
    with node.db() as db:
        scan(node, db)
        path.write_bytes(b"BBBB")
        os.utime(path, ns=(LONG_AGO_NS, LONG_AGO_NS))  # same size, same mtime: ctime differs
        assert scan(node, db) == {"modified": ["a.txt"]}
        assert row(db, "a.txt").hash == content_hash(b"BBBB")


def test_edit_in_the_same_second_as_the_scan_is_not_missed(node: Node) -> None:
    path = write(node.root, "a.txt", b"one", mtime_ns=None)  # mtime = now: racy
    with node.db() as db:
        scan(node, db)
        path.write_bytes(b"two")  # same size, within the same second
        assert scan(node, db) == {"modified": ["a.txt"]}
        assert row(db, "a.txt").hash == content_hash(b"two")


def test_racy_entries_are_hashed_again_even_when_the_stat_matches(tmp_path: Path) -> None:
    write(tmp_path, "f", b"x", mtime_ns=LONG_AGO_NS)
    st = os.stat(tmp_path / "f")
    stat = Stat.of(st)
    rules = IgnoreRules()
    trusted = {"f": KnownStat(stat, LONG_AGO_NS + RACY_WINDOW_NS + 1)}
    racy = {"f": KnownStat(stat, LONG_AGO_NS + RACY_WINDOW_NS - 1)}
    assert plan_scan(tmp_path, trusted, rules).to_hash == []
    assert [p for p, _ in plan_scan(tmp_path, racy, rules).to_hash] == ["f"]


def test_mode_and_mtime_changes_are_new_versions_without_content_change(node: Node) -> None:
    path = write(node.root, "run.sh", b"#!/bin/sh\n")
    with node.db() as db:
        scan(node, db)
        path.chmod(0o755)
        assert scan(node, db) == {"modified": ["run.sh"]}
        assert row(db, "run.sh").mode == 0o755
        os.utime(path, ns=(LONG_AGO_NS + 10**9, LONG_AGO_NS + 10**9))
        assert scan(node, db) == {"modified": ["run.sh"]}
        last = ev.last_events(db, 2)[0]
        assert last.kind == "modified" and last.detail["content_changed"] is False


def test_tombstones_survive_and_a_recreated_file_dominates_its_tombstone(node: Node) -> None:
    path = write(node.root, "a.txt", b"first")
    with node.db() as db:
        scan(node, db)
        path.unlink()
        scan(node, db)
        for _ in range(2):  # rescans keep the tombstone as it is
            assert scan(node, db) == {}
            assert row(db, "a.txt").deleted
        tomb_version = VersionVector.from_json(row(db, "a.txt").version)
        write(node.root, "a.txt", b"second")
        assert scan(node, db) == {"created": ["a.txt"]}
        again = VersionVector.from_json(row(db, "a.txt").version)
        assert again["alpha"] == tomb_version["alpha"] + 1


def test_ignore_file_temp_files_and_state_folder_are_not_indexed(node: Node) -> None:
    root = node.root
    (root / ".ignore").write_text("*.log\nbuild/\n!keep.log\n# comment\n")
    write(root, "a.txt", b"a")
    write(root, "debug.log", b"noise")
    write(root, "keep.log", b"wanted")
    write(root, "build/out.o", b"obj")
    write(root, "src/build/x.o", b"obj")
    write(root, "sub/.ironsync-1234.tmp", b"partial")
    write(root, ".ironsync/versions/a.txt~20260101-000000", b"old")
    with node.db() as db:
        assert scan(node, db) == {"created": ["a.txt", "keep.log"]}


def test_files_that_become_ignored_are_not_recorded_as_deleted(node: Node) -> None:
    write(node.root, "a.log", b"log")
    with node.db() as db:
        scan(node, db)
        (node.root / ".ignore").write_text("*.log\n")
        assert scan(node, db) == {}
        assert not row(db, "a.log").deleted


def test_symlinks_are_not_followed_or_indexed(node: Node, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    write(outside, "secret.txt", b"outside the root")
    (node.root / "link").symlink_to(outside)
    (node.root / "file-link").symlink_to(outside / "secret.txt")
    write(node.root, "real.txt", b"real")
    with node.db() as db:
        config = node.config()
        report = scan_storage(db, "alpha", config.storages[0])
        assert [c.path for c in report.changes] == ["real.txt"]
        assert sorted(report.symlinks) == ["file-link", "link"]


def test_missing_marker_with_known_files_refuses_to_scan(node: Node) -> None:
    write(node.root, "a.txt", b"a")
    with node.db() as db:
        scan(node, db)
        # the folder now looks empty, as an unmounted disk's mount point would
        (node.root / "a.txt").unlink()
        (node.root / ".ironsync").rmdir()
        with pytest.raises(StorageUnavailable, match="is the disk mounted"):
            scan(node, db)
        assert not row(db, "a.txt").deleted


def test_file_being_appended_to_is_never_indexed_with_a_wrong_hash(node: Node) -> None:
    path = write(node.root, "growing.log", os.urandom(2_000_000), mtime_ns=None)
    stop = threading.Event()

    def append() -> None:
        with open(path, "ab") as f:
            while not stop.is_set():
                f.write(os.urandom(4096))
                f.flush()
                time.sleep(0.0005)

    writer = threading.Thread(target=append)
    writer.start()
    try:
        with node.db() as db:
            config = node.config()
            for _ in range(3):
                report = scan_storage(db, "alpha", config.storages[0])
                storage = index.get_storage(db, "docs")
                assert storage is not None
                indexed = index.get_file(db, storage.id, "growing.log")
                if indexed is not None and not indexed.deleted:
                    # whatever was indexed is the hash of the file's first `size` bytes
                    with open(path, "rb") as f:
                        prefix = f.read(indexed.size)
                    assert indexed.hash == content_hash(prefix)
                else:
                    assert [p for p, _ in report.unreadable] == ["growing.log"]
    finally:
        stop.set()
        writer.join()
    with node.db() as db:
        time.sleep(0.01)
        scan(node, db)
        assert row(db, "growing.log").hash == content_hash(path.read_bytes())


def test_scan_summary_event_records_the_counts(node: Node) -> None:
    write(node.root, "a.txt", b"a")
    with node.db() as db:
        scan(node, db)
        summary = [e for e in ev.last_events(db, 10) if e.kind == "scanned"]
        assert summary[-1].detail["created"] == 1
        assert json.loads(db.scalar("SELECT detail FROM events WHERE kind = 'scanned'"))
