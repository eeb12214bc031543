"""The node's SQLite database: opening it, migrating it, transactions, SQL functions.

One file per node, WAL mode, so `sqlite3` can read it while the daemon writes. Migrations are
the numbered `.sql` files of `migrations/` (shipped as `ironsync.migrations`): file NNNN
produces schema version NNNN, tracked by `PRAGMA user_version`, each applied in its own
transaction, so a crash mid-migration leaves the previous version intact.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import apsw
import xxhash

BUSY_TIMEOUT_MS = 30_000
_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


class DatabaseError(Exception):
    """The database cannot be used as it is; the message says why and what to do."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def available_migrations() -> list[Migration]:
    """Every migration shipped with this ironsync, in order."""
    found = []
    for entry in resources.files("ironsync.migrations").iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), entry.name, entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    for expected, migration in enumerate(found, start=1):
        if migration.version != expected:
            raise DatabaseError(f"migration {migration.name} is out of sequence")
    return found


def latest_version() -> int:
    return available_migrations()[-1].version


class Database:
    """An open ironsync database. Use `open_database` to get one."""

    def __init__(self, path: Path, conn: apsw.Connection) -> None:
        self.path = path
        self.conn = conn
        # storage id -> (sequence, storage hash): see index.storage_hash
        self.storage_hashes: dict[int, tuple[int, bytes]] = {}

    @contextmanager
    def atomic(self) -> Iterator[None]:
        """A write transaction (BEGIN IMMEDIATE), or a savepoint when already inside one."""
        if self.conn.in_transaction:
            with self.conn:  # apsw: a savepoint, released or rolled back
                yield
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def execute(self, sql: str, params: Any = None) -> None:
        self.conn.execute(sql, params)

    def query(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        return list(self.conn.execute(sql, params))

    def query_one(self, sql: str, params: Any = None) -> tuple[Any, ...] | None:
        rows = list(self.conn.execute(sql, params))  # run to completion (RETURNING, locks)
        return rows[0] if rows else None

    def scalar(self, sql: str, params: Any = None) -> Any:
        row = self.query_one(sql, params)
        return None if row is None else row[0]

    @property
    def schema_version(self) -> int:
        return int(self.scalar("PRAGMA user_version"))

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_database(path: Path, node_id: str | None = None, *, migrate: bool = True) -> Database:
    """Open (creating if needed) and migrate the database at `path`.

    The first `node_id` given is recorded; opening the database later as another node is an
    error, because version vectors count this node's changes under its id.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        conn = apsw.Connection(str(path))
        conn.set_busy_timeout(BUSY_TIMEOUT_MS)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
    except apsw.Error as exc:
        raise DatabaseError(f"{path}: cannot open the database: {exc}") from None
    register_functions(conn)
    db = Database(path, conn)
    if migrate:
        migrate_database(db)
        if node_id is not None:
            _check_node_id(db, node_id)
    return db


def migrate_database(db: Database, target: int | None = None) -> list[int]:
    """Apply every migration above the current `user_version` (up to `target`), in order."""
    migrations = available_migrations()
    latest = migrations[-1].version
    current = db.schema_version
    if current > latest:
        raise DatabaseError(
            f"{db.path}: schema version {current} is newer than this ironsync knows "
            f"({latest}); upgrade ironsync"
        )
    applied = []
    for migration in migrations:
        if migration.version <= current or (target is not None and migration.version > target):
            continue
        with db.atomic():
            # Re-check inside the write lock: another process may have migrated meanwhile.
            if db.schema_version >= migration.version:
                continue
            db.conn.execute(migration.sql)
            db.conn.execute(f"PRAGMA user_version = {migration.version:d}")
        applied.append(migration.version)
    return applied


def _check_node_id(db: Database, node_id: str) -> None:
    with db.atomic():
        recorded = db.scalar("SELECT value FROM meta WHERE key = 'node_id'")
        if recorded is None:
            db.execute("INSERT INTO meta (key, value) VALUES ('node_id', ?)", (node_id,))
        elif recorded != node_id:
            raise DatabaseError(
                f"{db.path} belongs to node '{recorded}', but the config says node_id = "
                f"'{node_id}'; use another database or restore the node_id"
            )


# --- SQL functions -------------------------------------------------------------------------


class StorageHash:
    """Aggregate `storage_hash(path, type, size, mtime_ns, mode, deleted ORDER BY path)`.

    xxh3-128 over the rows in path order: a live entry contributes (path, type, size, mtime_ns,
    mode), a tombstone only (path, deleted), so two nodes with the same entries and the same
    tombstones get the same hash, and any change of path, kind, size, mtime, permission bits
    or deletion changes it (a `chmod` alone too). A link's target is in its size and in
    `files.hash`, which the consolidated query compares; folders' mtimes are those of their
    versions (the scanner does not follow a folder's mtime), so they agree once synced.
    """

    _LIVE = struct.Struct("<Bqqq")
    _TYPE_CODES = {"file": 0, "dir": 1, "symlink": 2}

    def __init__(self) -> None:
        self._hasher = xxhash.xxh3_128()

    def step(self, path: str, kind: str, size: int, mtime_ns: int, mode: int, deleted: int) -> None:
        update = self._hasher.update
        update(path.encode("utf-8", "surrogateescape"))
        if deleted:
            update(b"\x00\x01")
        else:
            update(b"\x00")
            update(self._LIVE.pack(self._TYPE_CODES[kind], size, mtime_ns, mode))

    def final(self) -> bytes:
        return self._hasher.digest()


def register_functions(conn: apsw.Connection) -> None:
    """SQL functions the daemon uses. Views never use them (stock sqlite3 must read them)."""
    conn.create_aggregate_function("storage_hash", StorageHash, 6)
