"""Chunk lookups across every storage: where does this node already hold a chunk?

Only SQL here. The `chunks_by_hash` index makes each lookup a few B-tree probes, so a receiver
can look up every chunk of a file before asking a peer for any (moves, copies, duplicates and
unchanged regions then cost nothing on the wire). What is found is a hint: the file may have
changed since it was indexed, so the caller verifies the bytes it reads.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ironsync.store.database import Database

LocalChunk = tuple[Path, str, int, int]
"""(storage root, path relative to it, offset, length) of a chunk in a live file."""

_LOOKUPS_PER_QUERY = 500  # well under SQLite's limit on bound parameters

_SELECT = (
    "SELECT c.hash, s.root, f.path, c.offset, c.length"
    " FROM chunks AS c"
    " JOIN files AS f ON f.id = c.file_id"
    " JOIN storages AS s ON s.id = f.storage_id"
    " WHERE f.deleted = 0 AND c.hash"
)


def find_local_chunk(db: Database, chunk_hash: bytes) -> LocalChunk | None:
    """Any live file, in any storage, that holds a chunk with this hash (None if none does)."""
    row = db.query_one(f"{_SELECT} = ? LIMIT 1", (chunk_hash,))
    return None if row is None else (Path(row[1]), row[2], row[3], row[4])


def find_local_chunks(db: Database, hashes: Iterable[bytes]) -> dict[bytes, LocalChunk]:
    """`find_local_chunk` for many hashes at once: hash → where, for those held here."""
    wanted = list(dict.fromkeys(hashes))
    found: dict[bytes, LocalChunk] = {}
    roots: dict[str, Path] = {}  # a Path each, not one per chunk (that was half the time)
    for start in range(0, len(wanted), _LOOKUPS_PER_QUERY):
        batch = wanted[start : start + _LOOKUPS_PER_QUERY]
        marks = ", ".join("?" * len(batch))
        # GROUP BY keeps one row per hash (SQLite takes the bare columns from one of them).
        for chunk_hash, root, path, offset, length in db.conn.execute(
            f"{_SELECT} IN ({marks}) GROUP BY c.hash", batch
        ):
            where = roots.get(root)
            if where is None:
                where = roots[root] = Path(root)
            found[bytes(chunk_hash)] = (where, path, offset, length)
    return found


def holds_content(db: Database, file_hash: bytes) -> bool:
    """Whether a live file of any storage has this whole-file hash (`files_by_hash`)."""
    row = db.query_one(
        "SELECT 1 FROM files WHERE hash = ? AND deleted = 0 AND type = 'file' LIMIT 1",
        (file_hash,),
    )
    return row is not None
