"""The scanner on real folders and a real SQLite file, including changes made while stopped."""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from ironsync import scan as scan_module
from ironsync.chunking import MIN_CHUNK, chunk_bytes, content_hash, hash_and_chunk
from ironsync.ignore import IgnoreRules
from ironsync.model import DIR_HASH, link_hash
from ironsync.reconcile import VersionVector
from ironsync.scan import (
    RACY_WINDOW_NS,
    SMALL_FILE_BYTES,
    ChunkSpool,
    KnownEntry,
    KnownRow,
    KnownStat,
    Observed,
    ScanPlan,
    Stat,
    hash_files,
    index_rows,
    plan_scan,
    plan_scan_rows,
)
from ironsync.store import Database, index
from ironsync.store import events as ev
from ironsync.sync import local
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


def settle(db: Database) -> None:
    """As if every file had been indexed well after its last change (its ctime, which a test
    cannot set back): no entry is racy, so an unchanged stat is trusted without reading."""
    with db.atomic():
        db.execute("UPDATE files SET indexed_at_ns = ctime_ns + ? + 1", (RACY_WINDOW_NS,))


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
        # folders are entries too, recorded before what they hold
        assert scan(node, db) == {"created": ["a.txt", "sub", "sub/deeper", "sub/deeper/b.bin"]}
        assert row(db, "sub").kind == "dir" and row(db, "sub/deeper").hash == DIR_HASH
        a = row(db, "a.txt")
        assert a.hash == content_hash(b"alpha")
        assert a.size == 5 and a.mtime_ns == LONG_AGO_NS and a.mode == 0o644
        assert VersionVector.from_json(a.version) == VersionVector({"alpha": 1})
        b = row(db, "sub/deeper/b.bin")
        chunks = index.chunks_of(db, b.id)
        assert sum(c.length for c in chunks) == 300_000 and len(chunks) > 1
        assert sorted([a.sequence, b.sequence]) == [3, 4]
        # a second scan with nothing changed changes nothing and reads nothing
        report = scan_storage(db, "alpha", node.config().storages[0])
        assert report.changes == [] and report.unchanged == 4 and report.bytes_hashed == 0


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
            "created": ["fresh.txt", "new"],
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
        # a new version at the new path (counters never travel between paths: issue 6)
        assert VersionVector.from_json(moved.version) == VersionVector({"alpha": 1})
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


def rescan(node: Node, db: Database, *paths: str) -> dict[str, list[str]]:
    """`rescan_paths` (the watcher's entry point) for a few paths; changes by kind."""
    config = node.config()
    out: dict[str, list[str]] = {}
    for change in local.rescan_paths(db, config.node_id, config.storages[0], list(paths)):
        label = f"{change.from_path}->{change.path}" if change.from_path else change.path
        out.setdefault(change.kind, []).append(label)
    return {k: sorted(v) for k, v in out.items()}


def test_the_watchers_rescan_of_a_renamed_or_recopied_file_records_a_move(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    big = os.urandom(300_000)
    write(node.root, "a.bin", big)
    write(node.root, "c.bin", b"c" * 5000)
    write(node.root, "e.txt", b"e")
    hashed: list[str] = []
    real_hash_files = local.hash_files

    def spy(root, files, *args):  # type: ignore[no-untyped-def]
        files = list(files)
        hashed.extend(path for path, _ in files)
        return real_hash_files(root, files, *args)

    monkeypatch.setattr(local, "hash_files", spy)
    with node.db() as db:
        scan(node, db)
        (node.root / "sub").mkdir()
        (node.root / "a.bin").rename(node.root / "sub" / "b.bin")
        hashed.clear()
        assert rescan(node, db, "a.bin", "sub/b.bin") == {"moved": ["a.bin->sub/b.bin"]}
        assert hashed == []  # same inode, size and mtime: not read again
        (node.root / "c.bin").unlink()
        write(node.root, "d.bin", b"c" * 5000)  # another inode: found by content
        assert rescan(node, db, "d.bin", "c.bin") == {"moved": ["c.bin->d.bin"]}
        (node.root / "e.txt").unlink()  # its new name is not among the paths: a deletion
        assert rescan(node, db, "e.txt") == {"deleted": ["e.txt"]}
        kinds = [(e.kind, e.path) for e in ev.last_events(db, 20) if e.path]
        assert ("moved", "sub/b.bin") in kinds and ("moved", "d.bin") in kinds
        assert ("deleted", "a.bin") not in kinds and ("created", "sub/b.bin") not in kinds
        assert row(db, "sub/b.bin").hash == content_hash(big) and row(db, "a.bin").deleted


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
    stat = Stat.of(os.stat(tmp_path / "f"))
    rules = IgnoreRules()
    trusted = {"f": KnownStat(stat, LONG_AGO_NS + RACY_WINDOW_NS + 1)}
    racy = {"f": KnownStat(stat, LONG_AGO_NS + RACY_WINDOW_NS - 1)}
    assert list(plan_scan(tmp_path, trusted, rules).to_hash) == []
    assert [p for p, _ in plan_scan(tmp_path, racy, rules).to_hash] == ["f"]


def test_a_file_with_an_mtime_in_the_future_is_not_read_at_every_scan(node: Node) -> None:
    # an mtime an hour ahead (a peer's clock, `touch -d`): its ctime says when it changed
    write(node.root, "future.txt", b"f", mtime_ns=time.time_ns() + 3600 * 10**9)
    with node.db() as db:
        scan(node, db)
        settle(db)
        report = scan_storage(db, "alpha", node.config().storages[0])
        assert report.unchanged == 1 and report.bytes_hashed == 0
        (known,) = index.rows_by_folder(db, row(db, "future.txt").storage_id)
        assert known[0] == "future.txt" and known[5] == 0o644


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
        assert scan(node, db) == {"created": ["a.txt", "keep.log", "src", "sub"]}


def test_files_that_become_ignored_are_not_recorded_as_deleted(node: Node) -> None:
    write(node.root, "a.log", b"log")
    with node.db() as db:
        scan(node, db)
        (node.root / ".ignore").write_text("*.log\n")
        assert scan(node, db) == {}
        assert not row(db, "a.log").deleted


def test_symlinks_are_indexed_as_links_and_never_followed(node: Node, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    write(outside, "secret.txt", b"outside the root")
    (node.root / "link").symlink_to(outside)
    (node.root / "file-link").symlink_to(outside / "secret.txt")
    (node.root / "rel").symlink_to("real.txt")
    write(node.root, "real.txt", b"real")
    with node.db() as db:
        config = node.config()
        report = scan_storage(db, "alpha", config.storages[0])
        assert [c.path for c in report.changes] == ["file-link", "link", "rel", "real.txt"]
        assert report.symlinks == [] and report.bytes_hashed == 4  # only real.txt was read
        link = row(db, "link")
        assert (link.kind, link.target, link.mode) == ("symlink", str(outside), 0)
        assert link.hash == link_hash(str(outside)) and link.size == len(str(outside))
        assert index.chunks_of(db, link.id) == []
        # retargeting is a new version; an unchanged link is not read again
        (node.root / "rel").unlink()
        (node.root / "rel").symlink_to("elsewhere")
        assert scan(node, db) == {"modified": ["rel"]}
        assert row(db, "rel").target == "elsewhere"
        assert scan(node, db) == {}


def test_with_sync_symlinks_off_links_are_named_not_indexed(node: Node) -> None:
    (node.root / "link").symlink_to("nowhere")
    write(node.root, "real.txt", b"real")
    storage = replace(node.config().storages[0], sync_symlinks=False)
    with node.db() as db:
        report = scan_storage(db, "alpha", storage)
        assert [c.path for c in report.changes] == ["real.txt"] and report.symlinks == ["link"]
        # a link indexed while they were on is no deletion once they are off
        scan_storage(db, "alpha", replace(storage, sync_symlinks=True))
        assert scan_storage(db, "alpha", storage).changes == []
        assert row(db, "link").kind == "symlink" and not row(db, "link").deleted


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


# --- how files are read and written in bulk ------------------------------------------------


@pytest.mark.parametrize(
    "size",
    [0, 1, MIN_CHUNK - 1, MIN_CHUNK, MIN_CHUNK + 1, 300_000, SMALL_FILE_BYTES,
     SMALL_FILE_BYTES + 1],
)  # fmt: skip
def test_small_files_read_whole_get_the_chunks_of_the_streamed_cutter(
    tmp_path: Path, size: int
) -> None:
    data = random.Random(size).randbytes(size)
    write(tmp_path, "f.bin", data)
    seen: list[int] = []
    (result,) = hash_files(tmp_path, [("f.bin", Stat(size, 0, 0, 0, 0))], seen.append)
    assert isinstance(result, Observed)
    assert result.content == hash_and_chunk(io.BytesIO(data))
    assert sum(seen) == size


def test_a_big_files_chunk_list_is_spooled_and_reads_back_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scan_module, "SPOOL_FILE_BYTES", 2 * SMALL_FILE_BYTES)
    data = random.Random(7).randbytes(3 * SMALL_FILE_BYTES)
    write(tmp_path, "big.bin", data)
    (result,) = hash_files(tmp_path, [("big.bin", Stat(len(data), 0, 0, 0, 0))])
    assert isinstance(result, Observed)
    spool = result.content.chunks
    assert isinstance(spool, ChunkSpool)
    expected = hash_and_chunk(io.BytesIO(data))
    assert result.content.hash == expected.hash and result.content.size == len(data)
    assert list(spool) == list(expected.chunks) and len(spool) == len(expected.chunks)
    assert spool[0] == expected.chunks[0] and spool[-1] == expected.chunks[-1]
    assert spool[1:3] == list(expected.chunks[1:3])
    with pytest.raises(IndexError):
        spool[len(spool)]


def test_spooled_chunks_are_indexed_and_survive_a_rename(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scan_module, "SPOOL_FILE_BYTES", 400_000)
    monkeypatch.setattr(local, "SPOOL_FILE_BYTES", 400_000)
    data = random.Random(8).randbytes(1_500_000)
    write(node.root, "big.bin", data)
    expected = [(c.offset, c.length, c.hash) for c in chunk_bytes(data).chunks]
    with node.db() as db:
        scan(node, db)
        stored = [(c.offset, c.length, c.hash) for c in index.chunks_of(db, row(db, "big.bin").id)]
        assert stored == expected
        (node.root / "big.bin").rename(node.root / "moved.bin")  # same inode: not read again
        report = scan_storage(db, "alpha", node.config().storages[0])
        assert [(c.kind, c.path) for c in report.changes] == [("moved", "moved.bin")]
        assert report.bytes_hashed == 0
        moved = index.chunks_of(db, row(db, "moved.bin").id)
        assert [(c.offset, c.length, c.hash) for c in moved] == expected
        assert index.chunks_of(db, row(db, "big.bin").id) == []


def test_ironsyncs_own_names_are_told_apart_as_ignore_rules_say(node: Node) -> None:
    names = [".ignore", ".ironsync-1.tmp", ".ironsync-.tmp", ".ironsync-1.tmp.txt",
             "x.tmp", ".ironsync-x", ".ironsync", "ironsync-1.tmp", "plain.txt"]  # fmt: skip
    for name in names:
        write(node.root, f"sub/{name}", b"x")
        if name not in (".ironsync",):  # the root's .ironsync is the marker folder
            write(node.root, name, b"x")
    for patterns in ("", "*.txt\n"):
        (node.root / ".ignore").write_text(patterns)
        rules = IgnoreRules.load(node.root)
        plan = plan_scan(node.root, {}, rules)
        everything = [p.relative_to(node.root).as_posix() for p in node.root.rglob("*")]
        expected = sorted(
            p for p in everything if (node.root / p).is_file() and not rules.ignores_file(p)
            and not p.startswith(".ironsync/")
        )  # fmt: skip
        assert [p for p, _ in plan.to_hash] == expected
        assert "sub/.ignore" in expected or patterns


def test_first_scan_writes_one_created_event_and_sequence_per_file_in_path_order(
    node: Node,
) -> None:
    paths = [f"d{i % 3}/f{i:03d}.txt" for i in range(40)]
    for i, path in enumerate(paths):
        write(node.root, path, f"content {i}".encode())
    folders = ["d0", "d1", "d2"]
    with node.db() as db:
        assert scan(node, db) == {"created": sorted(folders + paths)}
        storage = index.get_storage(db, "docs")
        assert storage is not None and storage.sequence == len(paths) + len(folders)
        rows = {p: row(db, p) for p in paths}
        assert sorted(rows, key=lambda p: rows[p].sequence) == sorted(paths)
        assert {r.version for r in rows.values()} == {'{"alpha":1}'}
        events = [e for e in ev.last_events(db, 100) if e.kind == "created"]
        assert [e.path for e in events] == folders + sorted(paths)  # parents first
        events = events[len(folders) :]
        for e in events:
            data = (node.root / e.path).read_bytes()
            detail = {"hash": content_hash(data).hex(), "size": len(data)}
            text = db.scalar("SELECT detail FROM events WHERE seq = ?", (e.seq,))
            assert text == json.dumps(detail, sort_keys=True, separators=(",", ":"))
        # a touch that keeps the content: "content_changed": false, as append_event writes it
        os.utime(node.root / paths[0], ns=(LONG_AGO_NS + 1, LONG_AGO_NS + 1))
        assert scan(node, db) == {"modified": [paths[0]]}
        text = db.scalar("SELECT detail FROM events WHERE kind = 'modified'")
        data = (node.root / paths[0]).read_bytes()
        detail = {"content_changed": False, "hash": content_hash(data).hex(), "size": len(data)}
        assert text == json.dumps(detail, sort_keys=True, separators=(",", ":"))


def scan_scenario(node: Node, batch: int, monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    """Create, then edit / delete / move / copy-and-delete many files; every row and event."""
    monkeypatch.setattr(local, "BATCH", batch)
    root = node.root
    rng = random.Random(3)
    blobs = [rng.randbytes(rng.randint(1, 30_000)) for _ in range(30)]
    for i, blob in enumerate(blobs):
        write(root, f"f{i:02d}.bin", blob)
    with node.db() as db:
        scan(node, db)
        # new files first: one must not take the inode of a deleted one (a rename, then)
        write(root, "copy-of-0.bin", blobs[0])  # moved (content)
        write(root, "new.bin", b"new")
        for i in range(0, 30, 3):
            (root / f"f{i:02d}.bin").unlink()  # deleted
        for i in range(1, 30, 3):
            (root / f"f{i:02d}.bin").rename(root / f"moved{i:02d}.bin")  # moved (inode)
        for i in range(2, 30, 6):
            write(root, f"f{i:02d}.bin", blobs[i] + b"!", mtime_ns=LONG_AGO_NS + 1)  # modified
        scan(node, db)
        return {
            "files": db.query(
                "SELECT path, size, mtime_ns, mode, hash, deleted, version, sequence"
                " FROM files ORDER BY path"
            ),
            "chunks": db.query(
                "SELECT f.path, c.idx, c.offset, c.length, c.hash FROM chunks AS c"
                " JOIN files AS f ON f.id = c.file_id ORDER BY f.path, c.idx"
            ),
            "events": db.query("SELECT seq, path, kind, detail FROM events ORDER BY seq"),
        }


def test_batch_size_does_not_change_what_a_scan_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    one = scan_scenario(Node(tmp_path / "one", "alpha"), 1, monkeypatch)
    many = scan_scenario(Node(tmp_path / "many", "alpha"), 1000, monkeypatch)
    assert one == many
    kinds = [kind for _, _, kind, _ in one["events"] if kind != "scanned"]
    assert kinds.count("deleted") == 9 and kinds.count("moved") == 11
    assert kinds.count("modified") == 5 and kinds.count("created") == 31


# --- the walk in C (ironsync/_scandir.c) is the walk in Python -------------------------------

try:
    from ironsync import _scandir
except ImportError:  # not built: scan.py uses scan_folder_py
    _scandir = None

needs_c = pytest.mark.skipif(_scandir is None, reason="ironsync._scandir is not built")


def tricky_tree(root: Path) -> dict[str, KnownRow]:
    """Every kind of entry a folder can hold; the index rows of some of its files."""
    (root / ".ironsync").mkdir(exist_ok=True)
    for rel in ("a.txt", "changed.txt", "racy.txt", ".ignore", ".ironsync-1.tmp", "x.log",
                "sub/.ignore", "sub/.ironsync", "sub/.ironsync-2.tmp", "sub/y.log", "sub/z",
                "ünïcode/é.txt", "deep/er/still/f"):  # fmt: skip
        write(root, rel, rel.encode())
    (root / "link").symlink_to("a.txt")
    (root / "sub" / "dirlink").symlink_to("..")
    (root / "dangling").symlink_to("nowhere")
    os.mkfifo(root / "fifo")
    with open(os.fsencode(root) + b"/bad\xff\xfe.txt", "wb") as f:
        f.write(b"not UTF-8")
    os.mkdir(os.fsencode(root) + b"/bad\xffdir")
    for rel, seconds in (("future.txt", 10_500_000_000), ("past.txt", -300_000_000)):
        write(root, rel, b"when?", mtime_ns=seconds * 10**9 + 123)  # beyond 64-bit ns / < 1970
    known = {}
    for rel in ("a.txt", "changed.txt", "racy.txt", "sub/z", "future.txt", "past.txt", "gone.txt"):
        st = os.stat(root / rel) if rel != "gone.txt" else os.stat(root / "a.txt")
        known[rel] = (
            rel,
            st.st_size,
            st.st_mtime_ns,
            st.st_ctime_ns,
            st.st_ino,
            st.st_mode & 0o777,
        )
    known["changed.txt"] = (*known["changed.txt"][:2], 1, *known["changed.txt"][3:])
    known["racy.txt"] = (*known["racy.txt"][:5], -1)
    return known


@needs_c
@pytest.mark.parametrize("patterns", ["", "*.log\n!sub/y.log\n"])
def test_the_c_walk_of_a_folder_is_the_python_walk(tmp_path: Path, patterns: str) -> None:
    known = tricky_tree(tmp_path)
    rules = IgnoreRules.from_lines(patterns.splitlines())
    ignores_file = rules.ignores_file if rules.patterns else None
    folders = [(str(tmp_path), "")] + [
        (str(p), p.relative_to(tmp_path).as_posix() + "/")
        for p in sorted(tmp_path.rglob("*"))
        if p.is_dir() and not p.is_symlink()
    ]
    for folder, prefix in folders:
        results = []
        for scan_folder in (scan_module.scan_folder_py, _scandir.scan_folder):
            walked: list[str] = []
            changed: list[KnownRow] = []
            notes: list[tuple[str, str, str | None]] = []
            unchanged = scan_folder(folder, prefix, known, ignores_file, walked, changed, notes)
            results.append((unchanged, walked, changed, notes))
        assert results[0] == results[1], folder
    for scan_folder in (scan_module.scan_folder_py, _scandir.scan_folder):
        with pytest.raises(FileNotFoundError):
            scan_folder(str(tmp_path / "nope"), "nope/", known, None, [], [], [])
        with pytest.raises(NotADirectoryError):
            scan_folder(str(tmp_path / "a.txt"), "a.txt/", known, None, [], [], [])


@needs_c
def test_the_c_walk_plans_the_same_scan_as_the_python_walk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    known = tricky_tree(tmp_path)
    (tmp_path / ".ignore").write_text("*.log\n!sub/y.log\n")
    plans = []
    for scan_folder in (scan_module.scan_folder_py, _scandir.scan_folder):
        monkeypatch.setattr(scan_module, "scan_folder", scan_folder)
        rows = index_rows(known, {})
        plans.append(plan_scan_rows(tmp_path, rows, IgnoreRules.load(tmp_path)))
    python, c = plans
    assert list(python.to_hash) == list(c.to_hash)
    c.to_hash = python.to_hash  # a spool each: compared by their rows above
    assert python == c
    assert [p for p, _ in python.to_hash] == sorted(
        ["changed.txt", "racy.txt", "sub/y.log", "ünïcode/é.txt", "deep/er/still/f",
         "sub/.ignore", "sub/.ironsync"]  # ironsync's own names only at the root
    )  # fmt: skip
    assert python.unchanged == 4 and python.vanished == ["gone.txt"]
    assert [(e.path, e.kind) for e in python.entries] == [
        ("dangling", "symlink"),
        ("deep", "dir"),
        ("deep/er", "dir"),
        ("deep/er/still", "dir"),
        ("link", "symlink"),
        ("sub", "dir"),
        ("sub/dirlink", "symlink"),
        ("ünïcode", "dir"),
    ]
    assert sorted(python.skipped) == [
        ("bad\udcffdir", "name is not valid UTF-8"),
        ("bad\udcff\udcfe.txt", "name is not valid UTF-8"),
        ("fifo", "not a regular file, folder or symlink"),
    ]


@needs_c
@pytest.mark.skipif(os.geteuid() == 0, reason="root may stat anything")
def test_the_c_walk_reports_files_it_cannot_stat_as_python_does(tmp_path: Path) -> None:
    write(tmp_path, "locked/f", b"f")
    st = os.stat(tmp_path / "locked" / "f")
    known = {"locked/f": ("locked/f", st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, 0o644)}
    (tmp_path / "locked").chmod(0o444)  # can list, cannot stat
    try:
        results = []
        for scan_folder in (scan_module.scan_folder_py, _scandir.scan_folder):
            walked: list[str] = []
            notes: list[tuple[str, str, str | None]] = []
            scan_folder(str(tmp_path / "locked"), "locked/", known, None, walked, [], notes)
            results.append((walked, notes))
        assert (
            results[0] == results[1] == (["locked/f"], [("error", "locked/f", "Permission denied")])
        )
    finally:
        (tmp_path / "locked").chmod(0o755)


# --- sparse files (issue 11) -------------------------------------------------------------------


def make_sparse(path: Path, size: int, islands: dict[int, bytes]) -> Path:
    """A file of `size` bytes that holds `islands` (offset -> bytes) and holes elsewhere."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in islands.items():
            f.seek(offset)
            f.write(data)
    os.utime(path, ns=(LONG_AGO_NS, LONG_AGO_NS))
    if os.stat(path).st_blocks * 512 >= size:
        pytest.skip("this file system does not keep holes")
    return path


def bytes_read_by_this_process() -> int:
    """What read(2) and its kin returned so far, holes included (/proc/self/io rchar)."""
    try:
        text = Path("/proc/self/io").read_text()
    except OSError:
        pytest.skip("no /proc/self/io here")
    return int(next(line.split()[1] for line in text.splitlines() if line.startswith("rchar:")))


def test_a_sparse_file_gets_the_chunks_of_its_bytes_written_out(tmp_path: Path) -> None:
    rng = random.Random(11)
    islands = {0: rng.randbytes(5000), 3_000_000: rng.randbytes(70_000),
               9_999_000: rng.randbytes(1000), 17_000_000: rng.randbytes(300_000)}  # fmt: skip
    size = 20 * 1024 * 1024 + 7
    make_sparse(tmp_path / "sparse.img", size, islands)
    with open(tmp_path / "sparse.img", "rb") as f:
        expected = hash_and_chunk(f)  # every byte read, holes too
    (result,) = hash_files(tmp_path, [("sparse.img", Stat(size, 0, 0, 0, 0))])
    assert isinstance(result, Observed)
    assert result.content == expected


def test_a_gigabyte_sparse_file_is_hashed_without_reading_its_holes(tmp_path: Path) -> None:
    size = 1 << 30
    island = random.Random(12).randbytes(4096)
    at = 300 * 1024 * 1024 + 12_345
    make_sparse(tmp_path / "disk.img", size, {at: island})
    before = bytes_read_by_this_process()
    started = time.perf_counter()
    (result,) = hash_files(tmp_path, [("disk.img", Stat(size, 0, 0, 0, 0))])
    elapsed = time.perf_counter() - started
    read = bytes_read_by_this_process() - before
    assert isinstance(result, Observed)
    whole = xxhash.xxh3_128()
    for piece in (bytes(at), island, bytes(size - at - len(island))):
        whole.update(piece)
    assert result.content.hash == whole.digest() and result.content.size == size
    assert read < 1024 * 1024, read  # the data and the chunk spool, not the holes
    assert elapsed < 10, elapsed  # ~0.1 s here; reading the holes took ~4 s


def test_special_files_are_skipped_and_named_once(node: Node) -> None:
    os.mkfifo(node.root / "pipe")
    write(node.root, "real.txt", b"real")
    with node.db() as db:
        for _ in range(3):
            report = scan_storage(db, "alpha", node.config().storages[0])
            assert report.skipped == [("pipe", "not a regular file, folder or symlink")]
        named = [e for e in ev.last_events(db, 100) if e.kind == "skipped"]
        assert [(e.path, e.detail) for e in named] == [
            ("pipe", {"reason": "not a regular file, folder or symlink"})
        ]
        storage = index.get_storage(db, "docs")
        assert storage is not None and index.get_file(db, storage.id, "pipe") is None


# --- the walk reads the index folder by folder (memory bounded by a folder, not a storage) ----

# Names that sort around '/' (0x2f): ' ' '-' '.' before it, '0' and letters after it, and
# non-ASCII ones: a walk whose order is not the index's would find rows out of their turn.
TRICKY_NAMES = ["a", "a b", "a-b", "a.b", "a0", "ab", "A", "é", "ü x"]


def plan_scan_whole_index(
    root: Path,
    known: dict[str, KnownRow],
    entries_known: dict[str, KnownEntry],
    rules: IgnoreRules,
    symlinks: bool,
) -> ScanPlan:
    """The scan as it was planned with the whole index in memory: every path walked in a set,
    the vanished ones the known paths left out of it. The reference for the folder-by-folder
    walk."""
    plan = ScanPlan()
    changed: list[KnownRow] = []
    walked: list[str] = []
    notes: list[tuple[str, str, str | None]] = []
    unreadable_dirs: list[str] = []
    ignores_file = rules.ignores_file if rules.patterns else None
    stack = [(str(root), "")]
    while stack:
        folder, prefix = stack.pop()
        try:
            plan.unchanged += scan_module.scan_folder(
                folder, prefix, known, ignores_file, walked, changed, notes
            )
        except FileNotFoundError:
            continue
        except OSError as exc:
            plan.unreadable.append((prefix.rstrip("/") or ".", exc.strerror or str(exc)))
            unreadable_dirs.append(prefix)
            continue
        rows = index_rows({}, entries_known)
        by_path = {row[0]: row for row in rows}
        for note, rel, detail in notes:
            if note == scan_module.NOTE_DIR:
                if not rules.ignores_dir(rel):
                    stack.append((detail, rel + "/"))
                    plan.unchanged += scan_module._plan_entry(plan, detail, rel, by_path, walked)
            elif note == scan_module.NOTE_SYMLINK:
                if not symlinks:
                    plan.symlinks.append(rel)
                    if rel in entries_known:
                        walked.append(rel)
                elif not rules.ignores_file(rel):
                    full = f"{folder}/{rel.rpartition('/')[2]}"
                    plan.unchanged += scan_module._plan_entry(plan, full, rel, by_path, walked)
            elif note == scan_module.NOTE_OTHER:
                if not rules.ignores_file(rel):
                    plan.skipped.append((rel, "not a regular file, folder or symlink"))
            elif note == scan_module.NOTE_BAD_NAME:
                plan.skipped.append((rel, scan_module.BAD_NAME_REASON))
            else:
                plan.unreadable.append((rel, detail or note))
        notes.clear()
    seen = set(walked)
    for path in (*known, *entries_known):
        if path in seen or rules.ignores_file(path):
            continue
        if path in entries_known and rules.ignores_dir(path):
            continue
        if not any(path.startswith(prefix) for prefix in unreadable_dirs):
            plan.vanished.append(path)
    changed.sort()
    plan.to_hash = [(row[0], Stat(*row[1:])) for row in changed]
    plan.entries.sort(key=lambda entry: entry.path)
    plan.vanished.sort()
    return plan


tree_paths = st.lists(
    st.lists(st.sampled_from(TRICKY_NAMES), min_size=1, max_size=4).map("/".join),
    max_size=25,
)


def link_target(path: str) -> str:
    return "nowhere-" + path.rpartition("/")[2]


def make_tree(root: Path, paths: list[str], kinds: list[str]) -> None:
    """A file, folder or link at each path (its parents folders), when nothing is there yet."""
    for path, kind in zip(paths, kinds, strict=False):
        full = root / path
        try:
            full.parent.mkdir(parents=True, exist_ok=True)
            if kind == "file":
                full.write_bytes(path.encode())
            elif kind == "dir":
                full.mkdir()
            else:
                full.symlink_to(link_target(path))
        except OSError:  # something is there already
            continue


def index_of(root: Path, picks: list[tuple[str, str, int]]) -> tuple[dict, dict]:
    """Known files and entries: for each (path, kind, how) the disk's own row (how 0), one
    that differs from it (1), or a racy one (2), whatever is on disk there."""
    files: dict[str, KnownRow] = {}
    entries: dict[str, KnownEntry] = {}
    for path, kind, how in picks:
        try:
            st_ = os.lstat(root / path)
            stat = (st_.st_size, st_.st_mtime_ns, st_.st_ctime_ns, st_.st_ino, st_.st_mode & 0o777)
        except OSError:
            stat = (5, LONG_AGO_NS, LONG_AGO_NS, 12345, 0o644)
        if how == 1:
            stat = (stat[0] + 1, *stat[1:])
        files.pop(path, None)  # one row per path
        entries.pop(path, None)
        if kind == "file":
            files[path] = (path, *stat[:4], -1 if how == 2 else stat[4])
        elif kind == "dir":
            mode = stat[4] if how != 1 else 0o700
            entries[path] = KnownEntry(path, "dir", 0, *stat[1:4], mode, None)
        else:
            target = link_target(path) if how != 1 else "elsewhere"
            entries[path] = KnownEntry(path, "symlink", len(target), *stat[1:4], 0, target)
    return files, entries


@settings(max_examples=150, deadline=None, print_blob=True)
@given(
    tree_paths,
    st.lists(st.sampled_from(["file", "dir", "symlink"]), min_size=25, max_size=25),
    st.lists(
        st.tuples(
            st.lists(st.sampled_from(TRICKY_NAMES), min_size=1, max_size=4).map("/".join),
            st.sampled_from(["file", "dir", "symlink"]),
            st.integers(0, 2),
        ),
        max_size=25,
    ),
    st.sampled_from(["", "a-b/\n", "*.b\n", "a/\n!a/a\n", "é\n"]),
    st.booleans(),
)
def test_the_folder_by_folder_walk_plans_what_the_whole_index_walk_planned(
    paths: list[str],
    kinds: list[str],
    picks: list[tuple[str, str, int]],
    patterns: str,
    symlinks: bool,
) -> None:
    with tempfile.TemporaryDirectory() as top:
        root = Path(top)
        make_tree(root, paths, kinds)
        on_disk = [(path, kind, 0) for path, kind in zip(paths, kinds, strict=False)]
        files, entries = index_of(root, on_disk + picks)
        rules = IgnoreRules.from_lines(patterns.splitlines())
        expected = plan_scan_whole_index(root, files, entries, rules, symlinks)
        plan = plan_scan_rows(root, iter(index_rows(files, entries)), rules, symlinks=symlinks)
    assert list(plan.to_hash) == expected.to_hash
    for name in ("entries", "vanished", "unchanged"):
        assert getattr(plan, name) == getattr(expected, name), name
    for name in ("unreadable", "symlinks", "skipped"):  # in the walk's order: not the same
        assert sorted(getattr(plan, name)) == sorted(getattr(expected, name)), name
    assert plan.vanished_files == {p: files[p] for p in plan.vanished if p in files}
    assert [known for _, _, known in plan.to_hash.rows()] == [p in files for p, _ in plan.to_hash]


def all_paths(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if ".ironsync" not in p.parts)  # fmt: skip


def test_names_that_sort_around_a_slash_are_found_unchanged_and_deleted_exactly(
    node: Node,
) -> None:
    for first in TRICKY_NAMES:
        write(node.root, f"{first}/x", b"x")
        write(node.root, f"{first}/b/{first}", first.encode())
        write(node.root, f"{first}.txt", b"t")
    with node.db() as db:
        created = scan(node, db)["created"]
        assert created == all_paths(node.root)
        settle(db)
        report = scan_storage(db, "alpha", node.config().storages[0])
        assert report.changes == [] and report.unchanged == len(created)
        for gone in ("a/b/a", "a-b/x", "a0.txt", "é/b"):
            target = node.root / gone
            if target.is_dir():
                for child in target.iterdir():
                    child.unlink()
                target.rmdir()
            else:
                target.unlink()
        assert scan(node, db) == {"deleted": ["a-b/x", "a/b/a", "a0.txt", "é/b", "é/b/é"]}


def test_a_deep_tree_is_scanned_unchanged_and_its_deepest_file_deleted(node: Node) -> None:
    levels = [f"level{i}" for i in range(40)]
    files = ["/".join(levels[: i + 1]) + f"/f{i}" for i in range(0, 40, 5)]
    for rel in files:
        write(node.root, rel, b"f")
    with node.db() as db:
        scan(node, db)
        settle(db)
        assert scan(node, db) == {}
        (node.root / files[-1]).unlink()
        assert scan(node, db) == {"deleted": [files[-1]]}


def test_a_folder_that_vanished_takes_its_contents_and_subfolders_along(node: Node) -> None:
    for rel in ("keep/a", "gone/a", "gone/sub/b", "gone/sub/deeper/c", "gone-not/d", "gone0/e"):
        write(node.root, rel, rel.encode())
    with node.db() as db:
        scan(node, db)
        shutil.rmtree(node.root / "gone")
        assert scan(node, db) == {
            "deleted": ["gone", "gone/a", "gone/sub", "gone/sub/b", "gone/sub/deeper",
                        "gone/sub/deeper/c"]
        }  # fmt: skip
        assert not row(db, "gone-not/d").deleted and not row(db, "gone0/e").deleted


def test_a_folder_ignored_after_it_was_indexed_keeps_its_rows(node: Node) -> None:
    for rel in ("build/out.o", "build/sub/x.o", "build-notes.txt", "src/a.c"):
        write(node.root, rel, rel.encode())
    with node.db() as db:
        scan(node, db)
        (node.root / ".ignore").write_text("build/\n")
        shutil.rmtree(node.root / "build")  # ignored: what the index says of it stays
        assert scan(node, db) == {}
        assert not row(db, "build/sub/x.o").deleted and not row(db, "build").deleted


@pytest.mark.skipif(os.geteuid() == 0, reason="root may read anything")
def test_a_folder_that_cannot_be_read_keeps_its_rows(node: Node) -> None:
    for rel in ("locked/a", "locked/sub/b", "locked-not/c", "open/d"):
        write(node.root, rel, rel.encode())
    with node.db() as db:
        scan(node, db)
        (node.root / "open" / "d").unlink()
        (node.root / "locked").chmod(0)
        try:
            report = scan_storage(db, "alpha", node.config().storages[0])
        finally:
            (node.root / "locked").chmod(0o755)
        assert [(c.kind, c.path) for c in report.changes] == [("deleted", "open/d")]
        assert report.unreadable == [("locked", "Permission denied")]
        assert not row(db, "locked/sub/b").deleted and not row(db, "locked-not/c").deleted


def test_a_folder_replaced_by_a_file_and_a_file_by_a_folder_are_new_versions(
    node: Node,
) -> None:
    write(node.root, "was-dir/inside", b"in")
    write(node.root, "was-file", b"file")
    with node.db() as db:
        scan(node, db)
        shutil.rmtree(node.root / "was-dir")
        write(node.root, "was-dir", b"now a file")
        (node.root / "was-file").unlink()
        write(node.root, "was-file/inside", b"now a folder")
        assert scan(node, db) == {
            "created": ["was-file/inside"],
            "deleted": ["was-dir/inside"],
            "modified": ["was-dir", "was-file"],
        }
        assert row(db, "was-dir").kind == "file" and row(db, "was-file").kind == "dir"
        settle(db)
        assert scan(node, db) == {}


def test_moves_across_folders_are_found_by_inode_and_by_content(node: Node) -> None:
    renamed, copied = os.urandom(20_000), os.urandom(30_000)
    write(node.root, "a/b/renamed.bin", renamed)
    write(node.root, "z/copied.bin", copied)
    write(node.root, "a-b/stays", b"s")
    with node.db() as db:
        scan(node, db)
        write(node.root, "0/new/copied.bin", copied)  # a new inode: found by content
        (node.root / "z" / "copied.bin").unlink()
        (node.root / "a-b" / "x").mkdir()
        (node.root / "a" / "b" / "renamed.bin").rename(node.root / "a-b" / "x" / "renamed.bin")
        report = scan_storage(db, "alpha", node.config().storages[0])
        moves = sorted((c.from_path, c.path) for c in report.changes if c.kind == "moved")
        assert moves == [("a/b/renamed.bin", "a-b/x/renamed.bin"),
                         ("z/copied.bin", "0/new/copied.bin")]  # fmt: skip
        assert report.bytes_hashed == len(copied)  # the renamed file was not read again


def test_the_scanners_query_is_served_by_the_folder_index_without_a_sort(node: Node) -> None:
    with node.db() as db:
        plan = db.query(f"EXPLAIN QUERY PLAN {index.ROWS_BY_FOLDER}", (0, 0, 1))
        assert [row[3] for row in plan] == [
            "SEARCH files USING INDEX files_by_folder (storage_id=?)"
        ]  # no "USE TEMP B-TREE FOR ORDER BY": rows stream in the index's order


def test_files_to_hash_are_kept_on_disk_and_read_back_in_order_as_often_as_needed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(scan_module.FilesToHash, "BLOCK", 3)
    spool = scan_module.FilesToHash()
    rows = [(f"f{i:02d}", i, i + 1, i + 2, i + 3, 0o644, i % 2 == 0) for i in range(10)]
    for start in range(0, 10, 4):
        spool.extend(rows[start : start + 4])
    expected = [(p, Stat(*st), known) for p, *st, known in rows]
    assert list(spool.rows()) == list(spool.rows()) == expected
    assert list(spool) == [(p, st) for p, st, _ in expected] and len(spool) == 10
    assert spool.bytes == sum(range(10)) and list(scan_module.FilesToHash()) == []


def test_a_scan_that_keeps_no_changes_counts_them_and_logs_them_all(node: Node) -> None:
    for i in range(5):
        write(node.root, f"d/f{i}", b"x")
    with node.db() as db:
        report = scan_storage(db, "alpha", node.config().storages[0], keep_changes=False)
        assert report.changes == [] and report.count("created") == 6
        created = [e.path for e in ev.last_events(db, 100) if e.kind == "created"]
        assert created == ["d", "d/f0", "d/f1", "d/f2", "d/f3", "d/f4"]
        (node.root / "d" / "f0").unlink()
        report = scan_storage(db, "alpha", node.config().storages[0], keep_changes=False)
        assert report.count("deleted") == 1 and ev.last_events(db, 1)[0].kind == "scanned"


def test_the_watchers_rescan_of_a_path_through_a_symlinked_folder_finds_nothing_there(
    node: Node,
) -> None:
    """A path whose folder on the way is a symlink names nothing of the storage (lstat would
    find the link target's entry): rescan_paths records nothing for it, and a row someone
    recorded there before becomes a deletion."""
    write(node.root, "docs/f.txt", b"in docs")
    (node.root / "notes").symlink_to("docs")
    with node.db() as db:
        scan(node, db)
        assert rescan(node, db, "notes/f.txt", "notes") == {}
        storage = index.get_storage(db, "docs")
        assert storage is not None
        assert index.get_file(db, storage.id, "notes/f.txt") is None
        index.put_live_file(  # what an older daemon's watcher recorded through the link
            db, storage.id, "notes/f.txt", Stat(7, 1, 1, 1, 0o644), b"\x01" * 16, (),
            version='{"x":1}', modified_by="x", indexed_at_ns=1,
        )  # fmt: skip
        assert rescan(node, db, "notes/f.txt") == {"deleted": ["notes/f.txt"]}
        assert rescan(node, db, "docs/f.txt") == {}
