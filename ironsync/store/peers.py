"""Peers and what they announced: `peers`, `peer_files`, `peer_storages` (SQL only)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ironsync.model import FILE
from ironsync.store.database import Database
from ironsync.store.events import iso_now
from ironsync.store.index import rows_for_paths


@dataclass(frozen=True)
class PeerFileRow:
    """One row of a peer's index, as it announced it."""

    peer: str
    path: str
    size: int
    mtime_ns: int
    mode: int
    hash: bytes | None
    deleted: bool
    version: str
    modified_by: str
    sequence: int
    kind: str = FILE  # file, dir or symlink
    target: str | None = None  # a live symlink's target


INCOMING = " (incoming)"
"""Marks an address a peer dialed us from (its host): where we reach it is not known."""


def touch_peer(db: Database, node_id: str, address: str | None, host: str | None = None) -> None:
    """Record that `node_id` was seen now: at `address` (where we dialed it), or dialing
    us from `host`, which is kept only while no address we dialed is known."""
    if address is None and host is not None:
        address = host + INCOMING
        keep = "CASE WHEN peers.address IS NULL OR peers.address LIKE '%' || ? THEN"
        keep += " excluded.address ELSE peers.address END"
        args: tuple[object, ...] = (node_id, address, iso_now(), INCOMING)
    else:
        keep = "coalesce(excluded.address, peers.address)"
        args = (node_id, address, iso_now())
    db.execute(
        "INSERT INTO peers (node_id, address, last_seen) VALUES (?, ?, ?)"
        f" ON CONFLICT (node_id) DO UPDATE SET last_seen = excluded.last_seen, address = {keep}",
        args,
    )


def mark_peer_synced(db: Database, node_id: str, storage_ids: Iterable[int] = ()) -> None:
    """A full sync with `node_id` found both sides holding the same: the peer's and each of
    `storage_ids`' last sync is now."""
    now = iso_now()
    db.execute("UPDATE peers SET last_sync_at = ? WHERE node_id = ?", (now, node_id))
    db.conn.executemany(
        "UPDATE storages SET last_sync_at = ? WHERE id = ?", [(now, i) for i in storage_ids]
    )


def add_peer_traffic(db: Database, node_id: str, bytes_in: int, bytes_out: int) -> None:
    db.execute(
        "UPDATE peers SET bytes_in = bytes_in + ?, bytes_out = bytes_out + ? WHERE node_id = ?",
        (bytes_in, bytes_out, node_id),
    )


def last_sequence(db: Database, peer: str, storage_id: int) -> int:
    value = db.scalar(
        "SELECT last_sequence FROM peer_storages WHERE peer = ? AND storage_id = ?",
        (peer, storage_id),
    )
    return int(value or 0)


def record_peer_storage(
    db: Database, peer: str, storage_id: int, *, last_seq: int, storage_hash: bytes | None
) -> None:
    db.execute(
        "INSERT INTO peer_storages (peer, storage_id, last_sequence, storage_hash, updated_at)"
        " VALUES (?, ?, ?, ?, ?) ON CONFLICT (peer, storage_id) DO UPDATE SET"
        " last_sequence = excluded.last_sequence, storage_hash = excluded.storage_hash,"
        " updated_at = excluded.updated_at",
        (peer, storage_id, last_seq, storage_hash, iso_now()),
    )


def forget_peer_storage(db: Database, peer: str, storage_id: int) -> None:
    """Drop everything known of a peer's storage, so the next fetch starts from sequence 0."""
    db.execute("DELETE FROM peer_files WHERE peer = ? AND storage_id = ?", (peer, storage_id))
    db.execute("DELETE FROM peer_storages WHERE peer = ? AND storage_id = ?", (peer, storage_id))


def store_peer_files(db: Database, storage_id: int, rows: Iterable[PeerFileRow]) -> None:
    db.conn.executemany(
        "INSERT INTO peer_files (peer, storage_id, path, size, mtime_ns, mode, hash, deleted,"
        " version, modified_by, sequence, type, target)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (peer, storage_id, path) DO UPDATE SET size = excluded.size,"
        " mtime_ns = excluded.mtime_ns, mode = excluded.mode, hash = excluded.hash,"
        " deleted = excluded.deleted, version = excluded.version,"
        " modified_by = excluded.modified_by, sequence = excluded.sequence,"
        " type = excluded.type, target = excluded.target",
        (
            (
                r.peer,
                storage_id,
                r.path,
                r.size,
                r.mtime_ns,
                r.mode,
                r.hash,
                int(r.deleted),
                r.version,
                r.modified_by,
                r.sequence,
                r.kind,
                r.target,
            )
            for r in rows
        ),
    )


def peer_storage_hash(db: Database, peer: str, storage_id: int) -> bytes:
    """The storage hash of the peer's index as we hold it (same aggregate as our own)."""
    value = db.scalar(
        "SELECT storage_hash(path, type, size, mtime_ns, mode, deleted ORDER BY path)"
        " FROM peer_files WHERE peer = ? AND storage_id = ?",
        (peer, storage_id),
    )
    return bytes(value)


_PEER_FILE_COLUMNS = (
    "peer, path, size, mtime_ns, mode, hash, deleted, version, modified_by, sequence, type, target"
)


def _peer_file_row(row: tuple) -> PeerFileRow:
    return PeerFileRow(*row[:6], bool(row[6]), *row[7:])  # type: ignore[arg-type]


def get_peer_file(db: Database, peer: str, storage_id: int, path: str) -> PeerFileRow | None:
    row = db.query_one(
        f"SELECT {_PEER_FILE_COLUMNS} FROM peer_files"
        " WHERE peer = ? AND storage_id = ? AND path = ?",
        (peer, storage_id, path),
    )
    return None if row is None else _peer_file_row(row)


def get_peer_files(
    db: Database, peer: str, storage_id: int, paths: Iterable[str]
) -> dict[str, PeerFileRow]:
    """`get_peer_file` for many paths at once: path -> row, for those the peer's index has."""
    sql = (
        f"SELECT {_PEER_FILE_COLUMNS} FROM peer_files"
        " WHERE peer = ? AND storage_id = ? AND path IN ({marks})"
    )
    rows = rows_for_paths(db, sql, (peer, storage_id), paths)
    return {row[1]: _peer_file_row(row) for row in rows}


def divergent_paths(db: Database, peer: str, storage_id: int) -> list[str]:
    """The consolidated index, narrowed to what differs: every path where this node's row
    and the peer's row are not the same (including paths only one side has), in path order."""
    rows = db.query(
        "SELECT p.path FROM peer_files AS p"
        " LEFT JOIN files AS f ON f.storage_id = p.storage_id AND f.path = p.path"
        " WHERE p.peer = :peer AND p.storage_id = :sid AND (f.id IS NULL"
        "   OR f.version <> p.version OR f.deleted <> p.deleted OR f.hash IS NOT p.hash"
        "   OR (f.deleted = 0 AND f.type <> p.type)"
        "   OR f.mtime_ns <> p.mtime_ns OR f.mode <> p.mode OR f.size <> p.size)"
        " UNION"
        " SELECT f.path FROM files AS f WHERE f.storage_id = :sid AND NOT EXISTS"
        "   (SELECT 1 FROM peer_files AS p"
        "    WHERE p.peer = :peer AND p.storage_id = f.storage_id AND p.path = f.path)"
        " ORDER BY 1",
        {"peer": peer, "sid": storage_id},
    )
    return [r[0] for r in rows]


def peer_version_of_content(
    db: Database,
    storage_id: int,
    path: str,
    content_hash: bytes,
    size: int,
    mtime_ns: int,
    mode: int,
) -> tuple[str, str] | None:
    """(version, modified_by) of a peer's live file at `path` that is exactly this one: the
    same content, size, mtime and permission bits (what a pull of it writes), if a peer has
    one (each peer's row found by its primary key)."""
    rows = db.query(
        "SELECT p.version, p.modified_by, p.mode FROM peer_storages AS s"
        " JOIN peer_files AS p ON p.peer = s.peer AND p.storage_id = s.storage_id"
        " WHERE s.storage_id = ? AND p.path = ? AND p.hash = ? AND p.deleted = 0"
        " AND p.type = 'file' AND p.size = ? AND p.mtime_ns = ?",
        (storage_id, path, content_hash, size, mtime_ns),
    )
    for version, modified_by, their_mode in rows:
        if (their_mode & 0o777) == (mode & 0o777):
            return version, modified_by
    return None
