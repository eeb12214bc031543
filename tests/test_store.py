"""The SQLite state: migrations, append-only events, storage hash, views for sqlite3."""

from __future__ import annotations

import subprocess
from pathlib import Path

import apsw
import pytest

from ironsync.chunking import chunk_bytes
from ironsync.scan import Stat
from ironsync.store import (
    DatabaseError,
    available_migrations,
    index,
    latest_version,
    migrate_database,
    open_database,
)
from ironsync.store import events as ev


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
