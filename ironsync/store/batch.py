"""Many changes written with a few statements: the scanner's batches, and the groups of pulled
files a Committer switches into place (ironsync.sync.commit).

Written one at a time (`index.put_live_file`, `index.put_tombstone`, `events.append_event`), a
change costs a sequence UPDATE, an upsert with RETURNING, a chunk DELETE, a savepoint and a
timestamp: ~50 µs a file, most of a first scan of many small files. An `IndexBatch` collects
the same rows and writes them with one executemany per statement: sequence numbers taken by one
UPDATE, in the order the changes were added; one timestamp for the batch's events; chunk rows
deleted only for rows that existed. The rows are those the one-at-a-time functions write
(tests/test_store.py compares them).

Reads go through the batch (`get_file`, `prefetch`): a path the batch has already written to is
read again after the batch is written out, so a decision never sees a stale row. Use it inside
one transaction (`Database.atomic`) and call `write` before it ends.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ironsync.chunking import ChunkInfo
from ironsync.model import FILE
from ironsync.scan import Stat
from ironsync.store import index
from ironsync.store.database import Database
from ironsync.store.events import KINDS, append_storage_events, iso_now

_NOT_READ = object()


@dataclass(frozen=True, slots=True)
class _LiveFile:
    order: int  # the change's place in the batch: its sequence is the batch's first + order
    replaces: int | None  # id of the row it overwrites, whose chunks go
    path: str
    stat: Stat
    content_hash: bytes
    chunks: Iterable[ChunkInfo]
    version: str
    modified_by: str
    indexed_at_ns: int
    kind: str
    target: str | None


@dataclass(frozen=True, slots=True)
class _Tombstone:
    order: int
    replaces: int | None
    path: str
    version: str
    modified_by: str
    kind: str


class IndexBatch:
    """Local changes of one storage, written together by `write` (inside a transaction)."""

    def __init__(self, db: Database, storage: index.StorageRow) -> None:
        self.db = db
        self.storage = storage
        self._rows: dict[str, index.FileRow | None] = {}  # read cache
        self._paths: set[str] = set()  # written to by this batch, not yet written out
        self._changes = 0
        self._live: list[_LiveFile] = []
        self._tombstones: list[_Tombstone] = []
        self._refreshed: list[tuple[int, int, int, int]] = []
        # (kind, path, detail JSON, peer)
        self._events: list[tuple[str, str, str | None, str | None]] = []

    def __len__(self) -> int:
        """Changes and stat refreshes waiting to be written."""
        return self._changes + len(self._refreshed)

    # --- reads -------------------------------------------------------------------------------

    def prefetch(self, paths: Iterable[str]) -> None:
        """Read the rows of many paths with a few queries (`get_file` then answers from them)."""
        wanted = [p for p in paths if p not in self._rows and p not in self._paths]
        found = index.get_files(self.db, self.storage.id, wanted)
        for path in wanted:
            self._rows[path] = found.get(path)

    def get_file(self, path: str) -> index.FileRow | None:
        """The row of `path` as the index has it, this batch's changes included."""
        if path in self._paths:
            self.write()
        row = self._rows.get(path, _NOT_READ)
        if row is _NOT_READ:
            row = self._rows[path] = index.get_file(self.db, self.storage.id, path)
        return row  # type: ignore[return-value]

    # --- writes (each change takes the storage's next sequence number) ------------------------

    def put_live_file(
        self,
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
    ) -> None:
        """`index.put_live_file`, written with the batch."""
        replaces = self._before_change(path)
        self._live.append(
            _LiveFile(self._changes, replaces, path, stat, content_hash, chunks, version,
                      modified_by, indexed_at_ns, kind, target)
        )  # fmt: skip
        self._changes += 1

    def put_tombstone(self, path: str, *, version: str, modified_by: str, kind: str = FILE) -> None:
        """`index.put_tombstone`, written with the batch."""
        replaces = self._before_change(path)
        self._tombstones.append(
            _Tombstone(self._changes, replaces, path, version, modified_by, kind)
        )
        self._changes += 1

    def refresh_stat(self, file_id: int, stat: Stat, indexed_at_ns: int) -> None:
        """`index.refresh_stat` (no new sequence), written with the batch."""
        self._refreshed.append((stat.ctime_ns, stat.inode, indexed_at_ns, file_id))

    def append_event(
        self, kind: str, path: str, detail: str | None = None, peer: str | None = None
    ) -> None:
        """`events.append_event` of a change (status ok), local unless a `peer` brought it;
        `detail` is JSON."""
        if kind not in KINDS:
            raise ValueError(f"unknown event kind {kind!r}")
        self._events.append((kind, path, detail, peer))

    def _before_change(self, path: str) -> int | None:
        current = self._rows.get(path, _NOT_READ)
        if current is _NOT_READ or path in self._paths:
            current = self.get_file(path)  # a second change of one path writes the first out
        self._paths.add(path)
        return None if current is None else current.id  # type: ignore[union-attr]

    def write(self) -> None:
        """Write every collected change out: files, chunks, events, in a few statements."""
        conn, storage_id = self.db.conn, self.storage.id
        if self._refreshed:  # first: a later change of the same row in the batch wins
            conn.executemany(index.STAT_REFRESH, self._refreshed)
        if self._changes:
            last = int(
                self.db.scalar(
                    "UPDATE storages SET sequence = sequence + ? WHERE id = ? RETURNING sequence",
                    (self._changes, storage_id),
                )
            )
            first = last - self._changes + 1
            gone = [(f.replaces,) for f in self._live if f.replaces is not None]
            if gone:
                conn.executemany(index.CHUNKS_DELETE, gone)
            if self._live:
                ids = [
                    row[0]
                    for row in conn.executemany(
                        index.LIVE_FILE_UPSERT,
                        [
                            (storage_id, f.path, f.stat.size, f.stat.mtime_ns, f.stat.ctime_ns,
                             f.stat.inode, f.stat.mode, f.content_hash, f.version, f.modified_by,
                             first + f.order, f.indexed_at_ns, f.kind, f.target)
                            for f in self._live
                        ],
                    )
                ]  # fmt: skip
                rows = (
                    (file_id, i, c.offset, c.length, c.hash)
                    for file_id, f in zip(ids, self._live, strict=True)
                    for i, c in enumerate(f.chunks)
                )
                conn.executemany(index.CHUNK_INSERT, rows)
            if self._tombstones:
                list(
                    conn.executemany(
                        index.TOMBSTONE_UPSERT,
                        [
                            (storage_id, t.path, t.version, t.modified_by, first + t.order, t.kind)
                            for t in self._tombstones
                        ],
                    )
                )
                gone = [(t.replaces,) for t in self._tombstones if t.replaces is not None]
                if gone:
                    conn.executemany(index.CHUNKS_DELETE, gone)
        if self._events:
            append_storage_events(self.db, self.storage.name, self._events, iso_now())
        for path in self._paths:
            self._rows.pop(path, None)
        self._paths.clear()
        self._changes = 0
        self._live.clear()
        self._tombstones.clear()
        self._refreshed.clear()
        self._events.clear()
