"""The file and chunk index: storages, file rows (live and tombstones), chunk rows.

Only SQL here. Decisions about what a change means (created, moved, which version) are made by
the layers above and handed down as values; every write goes through `Database.atomic`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ironsync.chunking import ChunkInfo
from ironsync.model import FILE
from ironsync.scan import (
    RACY_WINDOW_NS,
    UNTRUSTED_MODE,
    IndexRow,
    KnownEntry,
    KnownStat,
    Stat,
)
from ironsync.store.database import Database

PATHS_PER_QUERY = 500  # well under SQLite's limit on bound parameters


@dataclass(frozen=True)
class StorageRow:
    id: int
    name: str
    root: Path
    sequence: int
    last_scan_at: str | None
    last_sync_at: str | None


@dataclass(frozen=True)
class FileRow:
    """One row of `files`: a live file or a tombstone (`deleted`, `hash` None)."""

    id: int
    storage_id: int
    path: str
    size: int
    mtime_ns: int
    mode: int
    hash: bytes | None
    deleted: bool
    version: str
    modified_by: str
    sequence: int
    kind: str = FILE  # file, dir or symlink (model.KINDS); a tombstone's is what it last was
    target: str | None = None  # a symlink's target text


_FILE_COLUMNS = (
    "id, storage_id, path, size, mtime_ns, mode, hash, deleted, version, modified_by, sequence,"
    " type, target"
)


def _file_row(row: tuple) -> FileRow:
    return FileRow(
        row[0],
        row[1],
        row[2],
        row[3],
        row[4],
        row[5],
        row[6],
        bool(row[7]),
        row[8],
        row[9],
        row[10],
        row[11],
        row[12],
    )


# --- storages ------------------------------------------------------------------------------


def ensure_storage(db: Database, name: str, root: Path) -> StorageRow:
    """The storage row for alias `name`, created if new; its root follows the config."""
    with db.atomic():
        db.execute(
            "INSERT INTO storages (name, root) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET root = excluded.root",
            (name, str(root)),
        )
    storage = get_storage(db, name)
    assert storage is not None
    return storage


def get_storage(db: Database, name: str) -> StorageRow | None:
    row = db.query_one(
        "SELECT id, name, root, sequence, last_scan_at, last_sync_at FROM storages WHERE name = ?",
        (name,),
    )
    if row is None:
        return None
    return StorageRow(row[0], row[1], Path(row[2]), row[3], row[4], row[5])


def list_storages(db: Database) -> list[StorageRow]:
    rows = db.query(
        "SELECT id, name, root, sequence, last_scan_at, last_sync_at FROM storages ORDER BY name"
    )
    return [StorageRow(r[0], r[1], Path(r[2]), r[3], r[4], r[5]) for r in rows]


def mark_scanned(db: Database, storage_id: int, at: str) -> None:
    db.execute("UPDATE storages SET last_scan_at = ? WHERE id = ?", (at, storage_id))


def next_sequence(db: Database, storage_id: int) -> int:
    """Take the storage's next sequence number (call inside a transaction)."""
    db.execute("UPDATE storages SET sequence = sequence + 1 WHERE id = ?", (storage_id,))
    return int(db.scalar("SELECT sequence FROM storages WHERE id = ?", (storage_id,)))


def storage_hash(db: Database, storage_id: int) -> bytes:
    """The storage hash over (path, size, mtime, deleted) of every row, in path order.

    Every change of those columns takes a new sequence number in the same transaction, so
    the hash is remembered by the storage's sequence (per connection, outside transactions):
    a storage that did not change since costs one lookup instead of a pass over every row
    (0.3 s at 100,000 files)."""
    cached = not db.conn.in_transaction  # inside one, what we see may yet be rolled back
    sequence = _sequence(db, storage_id)
    known = db.storage_hashes.get(storage_id)
    if cached and known is not None and known[0] == sequence:
        return known[1]
    value = bytes(
        db.scalar(
            "SELECT storage_hash(path, type, size, mtime_ns, mode, deleted ORDER BY path) "
            "FROM files WHERE storage_id = ?",
            (storage_id,),
        )
    )
    if cached and _sequence(db, storage_id) == sequence:  # nothing committed meanwhile
        db.storage_hashes[storage_id] = (sequence, value)
    return value


def _sequence(db: Database, storage_id: int) -> int:
    return int(db.scalar("SELECT sequence FROM storages WHERE id = ?", (storage_id,)) or 0)


def live_count(db: Database, storage_id: int) -> int:
    return int(
        db.scalar("SELECT count(*) FROM files WHERE storage_id = ? AND deleted = 0", (storage_id,))
    )


# --- files ---------------------------------------------------------------------------------

# The writes of a local change, shared with `store.batch` (the same rows, many at a time).
LIVE_FILE_UPSERT = (
    "INSERT INTO files (storage_id, path, size, mtime_ns, ctime_ns, inode, mode, hash,"
    " deleted, version, modified_by, sequence, indexed_at_ns, type, target)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (storage_id, path) DO UPDATE SET"
    " size = excluded.size, mtime_ns = excluded.mtime_ns, ctime_ns = excluded.ctime_ns,"
    " inode = excluded.inode, mode = excluded.mode, hash = excluded.hash, deleted = 0,"
    " version = excluded.version, modified_by = excluded.modified_by,"
    " sequence = excluded.sequence, indexed_at_ns = excluded.indexed_at_ns,"
    " type = excluded.type, target = excluded.target"
    " RETURNING id"
)
TOMBSTONE_UPSERT = (  # the row keeps its type: what was deleted, for people
    "INSERT INTO files (storage_id, path, size, mtime_ns, mode, hash, deleted, version,"
    " modified_by, sequence, type) VALUES (?, ?, 0, 0, 0, NULL, 1, ?, ?, ?, ?)"
    " ON CONFLICT (storage_id, path) DO UPDATE SET size = 0, mtime_ns = 0, ctime_ns = 0,"
    " inode = 0, mode = 0, hash = NULL, deleted = 1, version = excluded.version,"
    " modified_by = excluded.modified_by, sequence = excluded.sequence,"
    " indexed_at_ns = 0, target = NULL RETURNING id"
)
STAT_REFRESH = "UPDATE files SET ctime_ns = ?, inode = ?, indexed_at_ns = ? WHERE id = ?"
CHUNKS_DELETE = "DELETE FROM chunks WHERE file_id = ?"
CHUNK_INSERT = "INSERT INTO chunks (file_id, idx, offset, length, hash) VALUES (?, ?, ?, ?, ?)"


def known_stats(db: Database, storage_id: int) -> dict[str, KnownStat]:
    """Stat fields of every live file, for the scanner's no-change test."""
    return {
        path: KnownStat(Stat(size, mtime_ns, ctime_ns, inode, mode), indexed_at_ns)
        for path, size, mtime_ns, ctime_ns, inode, mode, indexed_at_ns in db.conn.execute(
            "SELECT path, size, mtime_ns, ctime_ns, inode, mode, indexed_at_ns "
            "FROM files WHERE storage_id = ? AND deleted = 0 AND type = 'file'",
            (storage_id,),
        )
    }


# A row's folder: its path up to and including the last '/' ('' at the root), as the index
# files_by_folder (migration 4) spells it, so that ROWS_BY_FOLDER is read from it, in order.
_FOLDER = "rtrim(path, replace(path, '/', ''))"
ROWS_BY_FOLDER = (
    "SELECT path, size, mtime_ns, ctime_ns, inode,"
    " CASE WHEN type <> 'file' OR min(mtime_ns, ctime_ns) < indexed_at_ns - ? THEN mode"
    f" ELSE ? END, {_FOLDER}, type, target"
    f" FROM files WHERE storage_id = ? AND deleted = 0 ORDER BY {_FOLDER}, type, path"
)


def rows_by_folder(db: Database, storage_id: int) -> Iterator[IndexRow]:
    """Every live row of the storage as the scanner reads it (`scan.IndexRow`, the racy test
    of a file made here), by folder, then kind, then path: streamed, never all in memory."""
    return db.conn.execute(ROWS_BY_FOLDER, (RACY_WINDOW_NS, UNTRUSTED_MODE, storage_id))


def known_entry(db: Database, storage_id: int, path: str) -> KnownEntry | None:
    """The live entry at `path` of any kind, as the no-change test sees it."""
    row = db.query_one(
        "SELECT path, type, size, mtime_ns, ctime_ns, inode, mode, target"
        " FROM files WHERE storage_id = ? AND path = ? AND deleted = 0",
        (storage_id, path),
    )
    return None if row is None else KnownEntry(*row)


def known_stat(db: Database, storage_id: int, path: str) -> KnownStat | None:
    """The stat fields recorded for one live file (None for a tombstone, a folder, a link or
    an unknown path)."""
    row = db.query_one(
        "SELECT size, mtime_ns, ctime_ns, inode, mode, indexed_at_ns FROM files"
        " WHERE storage_id = ? AND path = ? AND deleted = 0 AND type = 'file'",
        (storage_id, path),
    )
    if row is None:
        return None
    return KnownStat(Stat(row[0], row[1], row[2], row[3], row[4]), row[5])


def rows_for_paths(
    db: Database, sql: str, params: tuple[Any, ...], paths: Iterable[str]
) -> Iterator[tuple[Any, ...]]:
    """The rows of `sql` for many paths, PATHS_PER_QUERY at a time: the paths' placeholders go
    where `sql` says `{marks}` (`path IN ({marks})`), after `params`."""
    wanted = list(paths)
    for start in range(0, len(wanted), PATHS_PER_QUERY):
        batch = wanted[start : start + PATHS_PER_QUERY]
        marks = ", ".join("?" * len(batch))
        yield from db.conn.execute(sql.format(marks=marks), (*params, *batch))


def known_stats_of(db: Database, storage_id: int, paths: Iterable[str]) -> dict[str, KnownStat]:
    """`known_stat` for many paths at once: path -> stat fields, for the live files among them."""
    rows = rows_for_paths(
        db,
        "SELECT path, size, mtime_ns, ctime_ns, inode, mode, indexed_at_ns FROM files"
        " WHERE storage_id = ? AND path IN ({marks}) AND deleted = 0 AND type = 'file'",
        (storage_id,),
        paths,
    )
    return {
        path: KnownStat(Stat(size, mtime_ns, ctime_ns, inode, mode), indexed_at_ns)
        for path, size, mtime_ns, ctime_ns, inode, mode, indexed_at_ns in rows
    }


def get_file(db: Database, storage_id: int, path: str) -> FileRow | None:
    row = db.query_one(
        f"SELECT {_FILE_COLUMNS} FROM files WHERE storage_id = ? AND path = ?",
        (storage_id, path),
    )
    return None if row is None else _file_row(row)


def get_files(db: Database, storage_id: int, paths: Iterable[str]) -> dict[str, FileRow]:
    """`get_file` for many paths at once: path -> row, for those the index has."""
    sql = f"SELECT {_FILE_COLUMNS} FROM files WHERE storage_id = ? AND path IN ({{marks}})"
    return {row[2]: _file_row(row) for row in rows_for_paths(db, sql, (storage_id,), paths)}


def files_with_hash(db: Database, storage_id: int, content_hash: bytes) -> list[FileRow]:
    rows = db.query(
        f"SELECT {_FILE_COLUMNS} FROM files"
        " WHERE storage_id = ? AND hash = ? AND deleted = 0 AND type = 'file'",
        (storage_id, content_hash),
    )
    return [_file_row(r) for r in rows]


def put_live_file(
    db: Database,
    storage_id: int,
    path: str,
    stat: Stat,
    content_hash: bytes,
    chunks: Iterable[ChunkInfo],
    *,
    version: str,
    modified_by: str,
    indexed_at_ns: int,
    kind: str = FILE,
    target: str | None = None,
) -> int:
    """Record a live entry (new version): takes a new sequence, replaces its chunks (a
    folder or a link has none)."""
    sequence = next_sequence(db, storage_id)
    file_id = int(
        db.scalar(
            LIVE_FILE_UPSERT,
            (
                storage_id,
                path,
                stat.size,
                stat.mtime_ns,
                stat.ctime_ns,
                stat.inode,
                stat.mode,
                content_hash,
                version,
                modified_by,
                sequence,
                indexed_at_ns,
                kind,
                target,
            ),
        )
    )
    replace_chunks(db, file_id, chunks)
    return file_id


def refresh_stat(db: Database, file_id: int, stat: Stat, indexed_at_ns: int) -> None:
    """Same content, same version: only the stat fields the no-change test uses moved."""
    db.execute(STAT_REFRESH, (stat.ctime_ns, stat.inode, indexed_at_ns, file_id))


def put_tombstone(
    db: Database,
    storage_id: int,
    path: str,
    *,
    version: str,
    modified_by: str,
    kind: str = FILE,
) -> int:
    """Record that `path` is deleted (new version): takes a new sequence, drops its chunks.
    `kind` is what a new row says was deleted (an existing row keeps its own)."""
    sequence = next_sequence(db, storage_id)
    file_id = int(
        db.scalar(TOMBSTONE_UPSERT, (storage_id, path, version, modified_by, sequence, kind))
    )
    db.execute(CHUNKS_DELETE, (file_id,))
    return file_id


def replace_chunks(db: Database, file_id: int, chunks: Iterable[ChunkInfo]) -> None:
    db.execute(CHUNKS_DELETE, (file_id,))
    db.conn.executemany(
        CHUNK_INSERT, ((file_id, i, c.offset, c.length, c.hash) for i, c in enumerate(chunks))
    )


def chunks_of(db: Database, file_id: int) -> list[ChunkInfo]:
    return list(iter_chunks(db, file_id))


def file_sequence(db: Database, file_id: int) -> int | None:
    """The sequence of a file row (a new one each time it is indexed anew), None if gone."""
    value = db.scalar("SELECT sequence FROM files WHERE id = ?", (file_id,))
    return None if value is None else int(value)


def iter_chunks(db: Database, file_id: int) -> Iterator[ChunkInfo]:
    """`chunks_of` one at a time, for a file with too many to hold (finish before writing)."""
    for offset, length, chunk_hash in db.conn.execute(
        "SELECT offset, length, hash FROM chunks WHERE file_id = ? ORDER BY idx", (file_id,)
    ):
        yield ChunkInfo(offset, length, chunk_hash)


def adopt_version(
    db: Database, storage_id: int, path: str, *, version: str, modified_by: str
) -> None:
    """Same content (or both deleted): take a peer's merged version (new sequence)."""
    sequence = next_sequence(db, storage_id)
    db.execute(
        "UPDATE files SET version = ?, modified_by = ?, sequence = ?"
        " WHERE storage_id = ? AND path = ?",
        (version, modified_by, sequence, storage_id, path),
    )


def adopt_metadata(
    db: Database,
    storage_id: int,
    path: str,
    stat: Stat,
    *,
    version: str,
    modified_by: str,
    indexed_at_ns: int,
) -> None:
    """Same content, new mtime/mode from a peer: record the new stat and version."""
    sequence = next_sequence(db, storage_id)
    db.execute(
        "UPDATE files SET size = ?, mtime_ns = ?, ctime_ns = ?, inode = ?, mode = ?,"
        " version = ?, modified_by = ?, sequence = ?, indexed_at_ns = ?"
        " WHERE storage_id = ? AND path = ?",
        (
            stat.size, stat.mtime_ns, stat.ctime_ns, stat.inode, stat.mode, version,
            modified_by, sequence, indexed_at_ns, storage_id, path,
        ),
    )  # fmt: skip


def changes_since(db: Database, storage_id: int, since: int, limit: int) -> list[FileRow]:
    """Rows changed after sequence `since`, oldest change first (what a peer asks for)."""
    rows = db.query(
        f"SELECT {_FILE_COLUMNS} FROM files WHERE storage_id = ? AND sequence > ?"
        " ORDER BY sequence LIMIT ?",
        (storage_id, since, limit),
    )
    return [_file_row(r) for r in rows]
