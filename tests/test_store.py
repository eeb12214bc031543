"""The SQLite state: migrations, append-only events, storage hash, views for sqlite3."""

from __future__ import annotations

import subprocess
from pathlib import Path

import apsw
import pytest

from ironsync.chunking import chunk_bytes
from ironsync.scan import RACY_WINDOW_NS, Stat, known_row
from ironsync.store import (
    DatabaseError,
    available_migrations,
    index,
    latest_version,
    migrate_database,
    open_database,
)
from ironsync.store import events as ev
from ironsync.store.batch import IndexBatch


def schema_of(path: Path) -> list[tuple]:
    conn = apsw.Connection(str(path))
    try:
        return sorted(conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_schema"))
    finally:
        conn.close()


def test_fresh_database_reaches_the_latest_version(tmp_path: Path) -> None:
    with open_database(tmp_path / "s.db", "alpha") as db:
        assert db.schema_version == latest_version() == available_migrations()[-1].version
        assert db.scalar("PRAGMA journal_mode") == "wal"
        assert db.scalar("PRAGMA foreign_keys") == 1


@pytest.mark.parametrize("start", range(latest_version()))
def test_database_at_an_older_version_reaches_the_latest(tmp_path: Path, start: int) -> None:
    old = tmp_path / "old.db"
    with open_database(old, migrate=False) as db:
        migrate_database(db, target=start)
        assert db.schema_version == start
    with open_database(old, "alpha") as db:
        assert db.schema_version == latest_version()
    with open_database(tmp_path / "fresh.db", "alpha"):
        pass
    assert schema_of(old) == schema_of(tmp_path / "fresh.db")


def test_files_indexed_before_schema_3_stay_files_and_keep_their_versions(tmp_path: Path) -> None:
    """Folders and links came with schema 3: an older index holds files only, so its rows are
    files as they are (nothing to send again), and the storage hash is that of a new index."""
    old = tmp_path / "old.db"
    with open_database(old, migrate=False) as db:
        migrate_database(db, target=2)
        sid = index.ensure_storage(db, "docs", tmp_path).id
        with db.atomic():
            db.execute(
                "INSERT INTO files (storage_id, path, size, mtime_ns, mode, hash, version,"
                " modified_by, sequence) VALUES (?, 'a.txt', 5, 7, 420, ?, '{\"x\":3}', 'x', 1)",
                (sid, b"\x01" * 16),
            )
    with open_database(old, "alpha") as db:
        row = index.get_file(db, sid, "a.txt")
        assert row is not None and (row.kind, row.target, row.version) == ("file", None, '{"x":3}')
        with open_database(tmp_path / "new.db", "alpha") as new:
            nid = index.ensure_storage(new, "docs", tmp_path).id
            with new.atomic():
                index.put_live_file(
                    new, nid, "a.txt", Stat(5, 7, 0, 0, 420), b"\x01" * 16, (),
                    version='{"x":3}', modified_by="x", indexed_at_ns=0,
                )  # fmt: skip
            assert index.storage_hash(db, sid) == index.storage_hash(new, nid)
        assert db.query("SELECT path, type FROM live_files") == [("a.txt", "file")]


def test_migrating_twice_is_a_no_op(tmp_path: Path) -> None:
    with open_database(tmp_path / "s.db", "alpha") as db:
        before = schema_of(tmp_path / "s.db")
        assert migrate_database(db) == []
    assert schema_of(tmp_path / "s.db") == before


def test_migration_numbers_are_the_versions_they_produce() -> None:
    names = [m.name for m in available_migrations()]
    assert names[0] == "0001_initial.sql"
    assert [m.version for m in available_migrations()] == list(range(1, len(names) + 1))


def test_a_newer_schema_is_refused_not_damaged(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with open_database(path, "alpha") as db:
        db.execute(f"PRAGMA user_version = {latest_version() + 1}")
    with pytest.raises(DatabaseError, match="newer than this ironsync"):
        open_database(path, "alpha")


def test_database_of_another_node_is_refused(tmp_path: Path) -> None:
    with open_database(tmp_path / "s.db", "alpha"):
        pass
    with pytest.raises(DatabaseError, match="belongs to node 'alpha'"):
        open_database(tmp_path / "s.db", "beta")


def test_events_refuse_update_and_delete(tmp_path: Path) -> None:
    with open_database(tmp_path / "s.db", "alpha") as db:
        seq = ev.append_event(db, "created", storage="docs", path="a.txt")
        with pytest.raises(apsw.ConstraintError, match="append-only"):
            db.execute("UPDATE events SET kind = 'deleted' WHERE seq = ?", (seq,))
        with pytest.raises(apsw.ConstraintError, match="append-only"):
            db.execute("DELETE FROM events WHERE seq = ?", (seq,))
        assert [e.kind for e in ev.last_events(db, 10)] == ["created"]


def test_documented_compaction_deletes_only_old_events(tmp_path: Path) -> None:
    with open_database(tmp_path / "s.db", "alpha") as db:
        with db.atomic():
            ev.append_event(db, "created", path="old", at="2020-01-01T00:00:00.000000Z")
            ev.append_event(db, "created", path="new")
        assert ev.compact_events(db, "2021-01-01T00:00:00.000000Z") == 1
        assert [e.path for e in ev.last_events(db, 10)] == ["new"]
        # the guard is off again afterwards
        with pytest.raises(apsw.ConstraintError):
            db.execute("DELETE FROM events")


def put(db, storage_id: int, path: str, data: bytes, mtime_ns: int = 10**18) -> None:
    content = chunk_bytes(data)
    stat = Stat(len(data), mtime_ns, mtime_ns, 1, 0o644)
    with db.atomic():
        index.put_live_file(
            db, storage_id, path, stat, content.hash, content.chunks,
            version='{"alpha":1}', modified_by="alpha", indexed_at_ns=0,
        )  # fmt: skip


def test_storage_hash_changes_when_and_only_when_path_size_mtime_or_deletion_changes(
    tmp_path: Path,
) -> None:
    with open_database(tmp_path / "s.db", "alpha") as db:
        sid = index.ensure_storage(db, "docs", tmp_path).id
        empty = index.storage_hash(db, sid)
        put(db, sid, "a.txt", b"hello")
        one = index.storage_hash(db, sid)
        assert one != empty
        put(db, sid, "a.txt", b"HELLO")  # same size, same mtime: content alone is not in it
        assert index.storage_hash(db, sid) == one
        put(db, sid, "a.txt", b"hello", mtime_ns=10**18 + 1)
        assert index.storage_hash(db, sid) != one
        put(db, sid, "a.txt", b"hello!")
        assert index.storage_hash(db, sid) not in (one, empty)
        put(db, sid, "a.txt", b"hello")
        assert index.storage_hash(db, sid) == one
        with db.atomic():
            index.put_tombstone(db, sid, "a.txt", version='{"alpha":2}', modified_by="alpha")
        tomb = index.storage_hash(db, sid)
        assert tomb not in (one, empty)
        put(db, sid, "b.txt", b"hello")
        assert index.storage_hash(db, sid) not in (one, empty, tomb)


def uncached_hash(db, storage_id: int) -> bytes:
    return bytes(
        db.scalar(
            "SELECT storage_hash(path, type, size, mtime_ns, mode, deleted ORDER BY path)"
            " FROM files WHERE storage_id = ?",
            (storage_id,),
        )
    )


def test_the_remembered_storage_hash_follows_every_committed_change_and_no_rolled_back_one(
    tmp_path: Path,
) -> None:
    with (
        open_database(tmp_path / "s.db", "alpha") as db,
        open_database(tmp_path / "s.db", "alpha") as other,
    ):
        sid = index.ensure_storage(db, "docs", tmp_path).id
        put(db, sid, "a.txt", b"hello")
        first = index.storage_hash(db, sid)
        assert db.storage_hashes[sid] == (index.get_storage(db, "docs").sequence, first)
        assert index.storage_hash(db, sid) == first == uncached_hash(db, sid)

        put(other, sid, "b.txt", b"from another connection")  # a scan thread, another process
        assert index.storage_hash(db, sid) == uncached_hash(db, sid) != first

        with pytest.raises(RuntimeError), db.atomic():  # seen inside, then rolled back
            index.put_tombstone(db, sid, "a.txt", version='{"alpha":2}', modified_by="alpha")
            inside = index.storage_hash(db, sid)
            raise RuntimeError("rollback")
        assert index.storage_hash(db, sid) == uncached_hash(db, sid) != inside
        put(db, sid, "c.txt", b"takes the same sequence the rolled back change took")
        assert index.storage_hash(db, sid) == uncached_hash(db, sid) != inside

        with db.atomic():  # a stat refresh takes no sequence and changes no hashed column
            index.refresh_stat(db, index.get_file(db, sid, "c.txt").id, Stat(1, 2, 3, 4, 5), 9)
        assert index.storage_hash(db, sid) == uncached_hash(db, sid)


def test_storage_hash_is_the_same_whatever_the_insertion_order(tmp_path: Path) -> None:
    hashes = []
    for n, order in enumerate((["a", "b", "c/d"], ["c/d", "a", "b"])):
        with open_database(tmp_path / f"{n}.db", "alpha") as db:
            sid = index.ensure_storage(db, "docs", tmp_path).id
            for path in order:
                put(db, sid, path, path.encode())
            hashes.append(index.storage_hash(db, sid))
    assert hashes[0] == hashes[1]


def test_views_are_readable_by_the_stock_sqlite3_shell(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with open_database(path, "alpha") as db:
        sid = index.ensure_storage(db, "docs", tmp_path).id
        put(db, sid, "a.txt", b"hello", mtime_ns=1_700_000_000_123_000_000)
        with db.atomic():
            ev.append_event(db, "created", storage="docs", path="a.txt")
        queries = [
            "SELECT storage, path, size, mtime, mode, hash FROM live_files",
            "SELECT count(*) FROM tombstones",
            "SELECT path, idx, hash FROM file_chunks",
            "SELECT storage, files, bytes FROM storage_summary",
            "SELECT kind, path FROM recent_events",
        ]
        # the daemon keeps the database open (WAL) while sqlite3 reads it
        out = subprocess.run(
            ["sqlite3", str(path), "; ".join(queries)],
            capture_output=True, text=True, check=True,
        ).stdout.split("\n")  # fmt: skip
    hello = chunk_bytes(b"hello").hash.hex()
    assert out[0] == f"docs|a.txt|5|2023-11-14T22:13:20.123Z|644|{hello}"
    assert out[1] == "0"
    assert out[2] == f"a.txt|0|{hello}"
    assert out[3] == "docs|1|5"
    assert out[4] == "created|a.txt"


# --- batched writes (store.batch) ----------------------------------------------------------

FILES_AS_WRITTEN = (
    "SELECT id, path, size, mtime_ns, ctime_ns, inode, mode, hash, deleted, version,"
    " modified_by, sequence, indexed_at_ns FROM files ORDER BY id"
)


def written_state(db) -> dict[str, list[tuple]]:
    """Everything a change writes, but the events' wall-clock times."""
    return {
        "files": db.query(FILES_AS_WRITTEN),
        "chunks": db.query("SELECT * FROM chunks ORDER BY file_id, idx"),
        "events": db.query(
            "SELECT seq, storage, path, kind, status, peer, detail FROM events ORDER BY seq"
        ),
        "sequence": db.query("SELECT id, sequence FROM storages"),
    }


def apply_changes(db, storage, changes, *, batched: bool) -> None:
    """Apply ("live", path, data, version) / ("tombstone", path, version) / ("refresh", path)
    one at a time through index + events, or through one IndexBatch."""
    with db.atomic():
        batch = IndexBatch(db, storage)
        for change in changes:
            kind, path = change[0], change[1]
            if kind == "live":
                data, version = change[2], change[3]
                content = chunk_bytes(data)
                stat = Stat(len(data), 10**18 + len(data), 10**18 + 7, len(path), 0o640)
                args = (path, stat, content.hash, content.chunks)
                keys = {"version": version, "modified_by": "alpha", "indexed_at_ns": 5}
                if batched:
                    batch.put_live_file(*args, **keys)
                    batch.append_event("created", path, '{"size":1}')
                else:
                    index.put_live_file(db, storage.id, *args, **keys)
                    ev.append_event(db, "created", storage="docs", path=path, detail={"size": 1})
            elif kind == "tombstone":
                if batched:
                    batch.put_tombstone(path, version=change[2], modified_by="alpha")
                    batch.append_event("deleted", path)
                else:
                    index.put_tombstone(
                        db, storage.id, path, version=change[2], modified_by="alpha"
                    )
                    ev.append_event(db, "deleted", storage="docs", path=path)
            else:
                current = batch.get_file(path) if batched else index.get_file(db, storage.id, path)
                assert current is not None
                stat = Stat(current.size, current.mtime_ns, 99, 98, current.mode)
                if batched:
                    batch.refresh_stat(current.id, stat, 97)
                else:
                    index.refresh_stat(db, current.id, stat, 97)
        batch.write()


def test_a_batch_writes_the_same_rows_as_one_change_at_a_time(tmp_path: Path) -> None:
    big = bytes(range(256)) * 1000  # several chunks
    before = [("live", "keep.txt", b"kept", "{}"), ("live", "old.txt", big, '{"alpha":1}')]
    changes = [
        ("live", "a.txt", b"alpha", '{"alpha":1}'),
        ("live", "b/c.bin", big, '{"alpha":1}'),
        ("tombstone", "old.txt", '{"alpha":2}'),  # its chunks go
        ("live", "keep.txt", b"kept, edited", '{"alpha":2}'),  # replaces a row and its chunks
        ("refresh", "a.txt"),  # a path already changed in the batch: written out first
        ("live", "a.txt", b"alpha again", '{"alpha":2}'),  # a second change of one path
        ("tombstone", "never-seen.txt", '{"alpha":1}'),
    ]
    states = []
    for batched in (False, True):
        with open_database(tmp_path / f"{batched}.db", "alpha") as db:
            storage = index.ensure_storage(db, "docs", tmp_path)
            apply_changes(db, storage, before, batched=False)
            apply_changes(db, storage, changes, batched=batched)
            states.append(written_state(db))
    one_at_a_time, batched_state = states
    assert batched_state == one_at_a_time
    # and the rows are what the changes say
    files = {row[1]: row for row in one_at_a_time["files"]}
    assert files["old.txt"][8] == 1 and files["never-seen.txt"][8] == 1
    assert files["a.txt"][7] == chunk_bytes(b"alpha again").hash
    # keep, old, a, b/c, never-seen: every change took the next sequence, in order
    assert [row[11] for row in one_at_a_time["files"]] == [6, 5, 7, 4, 8]
    assert one_at_a_time["sequence"] == [(1, 8)]


def test_a_batch_answers_reads_with_its_own_changes(tmp_path: Path) -> None:
    with open_database(tmp_path / "s.db", "alpha") as db:
        storage = index.ensure_storage(db, "docs", tmp_path)
        with db.atomic():
            batch = IndexBatch(db, storage)
            batch.prefetch(["a.txt", "b.txt"])
            assert batch.get_file("a.txt") is None
            content = chunk_bytes(b"a")
            batch.put_live_file(
                "a.txt", Stat(1, 2, 3, 4, 0o644), content.hash, content.chunks,
                version='{"alpha":1}', modified_by="alpha", indexed_at_ns=5,
            )  # fmt: skip
            assert len(batch) == 1
            row = batch.get_file("a.txt")  # written out, then read back
            assert row is not None and row.hash == content.hash and row.sequence == 1
            assert len(batch) == 0
            with pytest.raises(ValueError, match="unknown event kind"):
                batch.append_event("exploded", "a.txt")


def test_the_scanners_rows_mark_racy_entries_so_they_match_no_stat(tmp_path: Path) -> None:
    with open_database(tmp_path / "s.db", "alpha") as db:
        sid = index.ensure_storage(db, "docs", tmp_path).id
        for path, indexed_at in (("settled", 10**18 + RACY_WINDOW_NS + 1), ("racy", 10**18)):
            content = chunk_bytes(b"x")
            with db.atomic():
                index.put_live_file(
                    db, sid, path, Stat(1, 10**18, 10**18, 1, 0o644), content.hash,
                    content.chunks, version="{}", modified_by="alpha", indexed_at_ns=indexed_at,
                )  # fmt: skip
        with db.atomic():
            index.put_tombstone(db, sid, "gone", version="{}", modified_by="alpha")
        rows = {row[0]: row for row in index.rows_by_folder(db, sid)}
        stats = index.known_stats(db, sid)
        assert set(rows) == set(stats) == {"settled", "racy"}
        for path, known in stats.items():
            assert rows[path][:6] == known_row(path, known)
        assert rows["settled"] == ("settled", 1, 10**18, 10**18, 1, 0o644, "", "file", None)
        assert rows["racy"][5] == -1
        assert index.get_files(db, sid, ["racy", "gone", "nope"]).keys() == {"racy", "gone"}
