"""Local changes into the index: the one code path for the scanner and the watcher.

`scan_storage` brings one storage's index up to date with its disk, including what changed
while no ironsync was running: a vanished path becomes a tombstone, a new path whose content
matches a path that vanished in the same scan is a move (the new path keeps the version
history), new and changed files are created/modified. Each such local change bumps this node's
counter in the file's version vector and takes the storage's next sequence number, and is
logged in `events`.

`record_observed`, `record_vanished` and `record_moved` are the index update itself; the
watcher calls the same functions for the paths it saw change.

A storage root holds a `.ironsync/` marker folder. If it is missing while the index knows live
files, the root is probably an unmounted disk or a wrong path: the scan refuses to run rather
than record every file as deleted (and delete them on every peer).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import stat as stat_mod
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ironsync.chunking import ChunkInfo, Content
from ironsync.config import Storage
from ironsync.ignore import STATE_DIR, IgnoreRules
from ironsync.model import DIR, FILE, SYMLINK
from ironsync.scan import (
    BAD_NAME_REASON,
    SPOOL_FILE_BYTES,
    UNTRUSTED_MODE,
    ChunkSpool,
    Entry,
    Gone,
    KnownRow,
    Observed,
    Stat,
    Unreadable,
    UnstorableLink,
    entry_of,
    hash_files,
    is_trusted,
    known_row,
    plan_scan_rows,
    shown_name,
)
from ironsync.store import Database, index, peers, tree
from ironsync.store import events as ev
from ironsync.store.batch import IndexBatch
from ironsync.sync.paths import reached_as_named

log = logging.getLogger(__name__)

BATCH = 2000  # changes per write transaction (~50 ms of writes): short locks, few commits
BATCH_CHUNKS = 20_000  # ... and chunks read but not yet written (~3 MB of chunk rows)
_warned_symlinks: set[tuple[str, str]] = set()


class StorageUnavailable(Exception):
    """A storage root that cannot be scanned safely (missing, unreadable, marker gone)."""

    def __init__(self, storage: str, reason: str) -> None:
        self.storage = storage
        self.reason = reason
        super().__init__(f"storage '{storage}': {reason}")


@dataclass(frozen=True, slots=True)
class Change:
    kind: str  # created, modified, deleted, moved
    path: str
    from_path: str | None = None
    entry: str = FILE  # what changed: a file, a folder (DIR), a symlink


@dataclass
class ScanReport:
    storage: str
    changes: list[Change] = field(default_factory=list)  # none unless `keep_changes`
    unchanged: int = 0
    bytes_hashed: int = 0
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    symlinks: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # changes by kind, kept or not
    keep_changes: bool = True  # else only counted: a first scan makes one per file

    def add(self, change: Change) -> None:
        self.counts[change.kind] = self.counts.get(change.kind, 0) + 1
        if self.keep_changes:
            self.changes.append(change)

    @property
    def bad_names(self) -> list[tuple[str, str]]:
        """(path, reason) of the names that are not valid UTF-8, never synced: the path with
        its bytes that are not UTF-8 shown as \\xNN."""
        return [(shown_name(p), r) for p, r in self.skipped if r == BAD_NAME_REASON]

    def count(self, kind: str) -> int:
        return self.counts.get(kind, 0)


class ScanProgress(Protocol):
    def begin(self, storage: str, files: int, total_bytes: int) -> None: ...
    def advance(self, nbytes: int) -> None: ...
    def end(self) -> None: ...


class NoProgress:
    def begin(self, storage: str, files: int, total_bytes: int) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass

    def end(self) -> None:
        pass


def prepare_storage(db: Database, storage: Storage) -> index.StorageRow:
    """The storage's row, after checking that its root is really there (the marker)."""
    row = index.ensure_storage(db, storage.name, storage.root)
    root = storage.root
    if not root.is_dir():
        raise StorageUnavailable(storage.name, f"root {root} is missing or not a folder")
    marker = root / STATE_DIR
    if not marker.is_dir():
        if index.live_count(db, row.id) > 0:
            raise StorageUnavailable(
                storage.name,
                f"{marker} is missing but the index knows files there: is the disk mounted? "
                f"If the folder really was emptied, create {marker} and scan again",
            )
        try:
            marker.mkdir()
        except OSError as exc:
            raise StorageUnavailable(storage.name, f"cannot create {marker}: {exc}") from None
    return row


def scan_storage(
    db: Database,
    node_id: str,
    storage: Storage,
    progress: ScanProgress | None = None,
    clock: Callable[[], int] = time.time_ns,
    *,
    keep_changes: bool = True,
) -> ScanReport:
    """Bring the index of one storage up to date with its disk; say what changed (each
    change in `report.changes` with `keep_changes`, else only how many of each kind)."""
    progress = progress or NoProgress()
    row = prepare_storage(db, storage)
    rules = IgnoreRules.load(storage.root)
    rows = index.rows_by_folder(db, row.id)
    plan = plan_scan_rows(storage.root, rows, rules, symlinks=storage_symlinks(storage))
    report = ScanReport(
        storage.name,
        unchanged=plan.unchanged,
        unreadable=list(plan.unreadable),
        symlinks=plan.symlinks,
        skipped=plan.skipped,
        keep_changes=keep_changes,
    )
    _warn_symlinks(storage.name, plan.symlinks)

    sources = _MoveSources(db, row, plan.vanished_files)
    moved_away: set[str] = set()
    renamed = sources.renamed(plan.to_hash.rows())
    renamed_paths = {seen.path for seen in renamed}
    to_read = (item for item in plan.to_hash if item[0] not in renamed_paths)
    progress.begin(
        storage.name,
        len(plan.to_hash) - len(renamed),
        plan.to_hash.bytes - sum(seen.stat.size for seen in renamed),
    )
    _record_entries(db, node_id, row, plan.entries, clock, report)  # parents before contents
    read = hash_files(storage.root, to_read, progress.advance, clock)
    _record_batches(db, node_id, row, renamed, read, sources, moved_away, report)
    progress.end()

    with db.atomic():
        vanished = [path for path in plan.vanished if path not in moved_away]
        for start in range(0, len(vanished), BATCH):
            batch = IndexBatch(db, row)
            batch.prefetch(vanished[start : start + BATCH])
            for path in vanished[start : start + BATCH]:
                change = _record_vanished(batch, node_id, path)
                if change is not None:
                    report.add(change)
            batch.write()
        for path, reason in report.unreadable + report.bad_names:
            ev.append_event(
                db, "skipped", storage=storage.name, path=path, status="warning",
                detail={"reason": reason},
            )  # fmt: skip
        for path, reason in report.skipped:  # sockets, FIFOs, devices, odd links: named once
            if reason != BAD_NAME_REASON and not ev.was_logged(
                db, "skipped", storage.name, path, reason
            ):
                ev.append_event(
                    db, "skipped", storage=storage.name, path=path, status="warning",
                    detail={"reason": reason},
                )  # fmt: skip
        if report.counts or report.unreadable or report.bad_names:
            ev.append_event(db, "scanned", storage=storage.name, detail=_summary(report))
        index.mark_scanned(db, row.id, ev.iso_now())
    return report


def _chunks_of(db: Database, row: index.FileRow) -> Sequence[ChunkInfo]:
    """The indexed chunks of a file, kept for a rename (spooled if there are many)."""
    if row.size <= SPOOL_FILE_BYTES:
        return tuple(index.iter_chunks(db, row.id))
    spool = ChunkSpool()
    for chunk in index.iter_chunks(db, row.id):
        spool.append(chunk)
    return spool


def _record_scanned(
    batch: IndexBatch,
    node_id: str,
    item: Observed | Gone,
    vanished_by_hash: dict[bytes, list[str]],
    moved_away: set[str],
) -> Change | None:
    if isinstance(item, Gone):
        return _record_vanished(batch, node_id, item.path)
    current = batch.get_file(item.path)
    is_new = current is None or current.deleted
    candidates = vanished_by_hash.get(item.content.hash) if is_new else None
    if candidates:
        old_path = candidates.pop(0)
        moved_away.add(old_path)
        return _record_moved(batch, node_id, old_path, item)
    return _record_observed(batch, node_id, item, current)


def record_observed(
    db: Database, node_id: str, storage: index.StorageRow, seen: Observed
) -> Change | None:
    """A file as read from disk: created, modified, or only its stat refreshed."""
    with db.atomic():
        batch = IndexBatch(db, storage)
        change = _record_observed(batch, node_id, seen, batch.get_file(seen.path))
        batch.write()
    return change


def record_vanished(
    db: Database, node_id: str, storage: index.StorageRow, path: str
) -> Change | None:
    """A known file is not on disk any more: tombstone it."""
    with db.atomic():
        batch = IndexBatch(db, storage)
        change = _record_vanished(batch, node_id, path)
        batch.write()
    return change


def record_moved(
    db: Database, node_id: str, storage: index.StorageRow, old_path: str, seen: Observed
) -> Change:
    """`old_path` is now `seen.path`: a new version at the new path, a tombstone at the old."""
    with db.atomic():
        batch = IndexBatch(db, storage)
        change = _record_moved(batch, node_id, old_path, seen)
        batch.write()
    return change


# The index update itself, into a batch (`record_*` above write a batch of one).


def _record_observed(
    batch: IndexBatch, node_id: str, seen: Observed, current: index.FileRow | None
) -> Change | None:
    if current is not None and not current.deleted and current.kind == FILE:
        same = (
            current.hash == seen.content.hash
            and current.size == seen.stat.size
            and current.mtime_ns == seen.stat.mtime_ns
            and current.mode == seen.stat.mode
        )
        if same:
            batch.refresh_stat(current.id, seen.stat, seen.indexed_at_ns)
            return None
    kind = "created" if current is None or current.deleted else "modified"
    base = current.version if current else None  # a tombstone's or another kind's too
    theirs = _pulled_version(batch, seen, base)
    if theirs is not None:
        # Exactly a peer's file (content, size, mtime, mode), at a version at or past ours: a
        # pull put it here and a crash kept the index from recording it (the group commit's
        # window). Its version is the peer's: a new one of ours would conflict with the
        # peer's next change of the file.
        _put(batch, theirs[1], seen, theirs[0])
    else:
        _put(batch, node_id, seen, _bumped(base, node_id))
    same_content = (
        current is not None
        and not current.deleted
        and current.kind == FILE
        and current.hash == seen.content.hash
    )
    batch.append_event(kind, seen.path, _content_detail(seen, same_content))
    return Change(kind, seen.path)


def _record_entry(
    batch: IndexBatch, node_id: str, entry: Entry, current: index.FileRow | None, now_ns: int
) -> Change | None:
    """A folder or a symlink as found on disk: created, modified, or nothing new."""
    if current is not None and not current.deleted and current.kind == entry.kind:
        if entry.kind == DIR and current.mode == entry.stat.mode:
            return None
        if entry.kind == SYMLINK and current.target == entry.target:
            batch.refresh_stat(current.id, entry.stat, now_ns)  # recreated, same target
            return None
    kind = "created" if current is None or current.deleted else "modified"
    batch.put_live_file(
        entry.path, entry.stat, entry.hash, (),
        version=_bumped(current.version if current else None, node_id), modified_by=node_id,
        indexed_at_ns=now_ns, kind=entry.kind, target=entry.target,
    )  # fmt: skip
    batch.append_event(kind, entry.path, entry_detail(entry.kind, entry.stat.mode, entry.target))
    return Change(kind, entry.path, entry=entry.kind)


def entry_detail(kind: str, mode: int, target: str | None) -> str:
    """The detail (JSON) of an event about a folder or a link."""
    detail: dict[str, object] = {"type": kind}
    if kind == DIR:
        detail["mode"] = f"{mode:o}"
    else:
        detail["target"] = target
    return json.dumps(detail, sort_keys=True, separators=(",", ":"))


def _record_entries(
    db: Database,
    node_id: str,
    row: index.StorageRow,
    entries: Sequence[Entry],
    clock: Callable[[], int],
    report: ScanReport,
) -> None:
    """Record the folders and links a scan found new or changed, BATCH at a time."""
    for start in range(0, len(entries), BATCH):
        part = entries[start : start + BATCH]
        with db.atomic():
            batch = IndexBatch(db, row)
            batch.prefetch(entry.path for entry in part)
            now_ns = clock()
            for entry in part:
                change = _record_entry(batch, node_id, entry, batch.get_file(entry.path), now_ns)
                if change is not None:
                    report.add(change)
            batch.write()


def storage_symlinks(storage: Storage) -> bool:
    """Whether symlinks of `storage` are synced (the node's `sync_symlinks`)."""
    return storage.sync_symlinks


def _record_vanished(batch: IndexBatch, node_id: str, path: str) -> Change | None:
    current = batch.get_file(path)
    if current is None or current.deleted:
        return None
    batch.put_tombstone(
        path, version=_bumped(current.version, node_id), modified_by=node_id, kind=current.kind
    )
    batch.append_event(
        "deleted", path, None if current.kind == FILE else f'{{"type":"{current.kind}"}}'
    )
    return Change("deleted", path)


def _record_moved(batch: IndexBatch, node_id: str, old_path: str, seen: Observed) -> Change:
    from ironsync.reconcile import VersionVector  # only when something changed

    old = batch.get_file(old_path)
    target = batch.get_file(seen.path)
    old_version = VersionVector.from_json(old.version) if old else VersionVector()
    # Version counters belong to one path: the new path's version starts from what that path
    # had (a tombstone, or nothing), never from the old path's. Carried over, they would make
    # the moved file dominate a file another node created at that name meanwhile, which would
    # then be replaced without a conflict (found by bin/soak, seed 1101). The move itself is in
    # the `moved` event and `ironsync history`.
    base = VersionVector.from_json(target.version) if target is not None else VersionVector()
    _put(batch, node_id, seen, base.bump(node_id).to_json())
    if old is not None and not old.deleted:
        batch.put_tombstone(
            old_path, version=old_version.bump(node_id).to_json(), modified_by=node_id
        )
    detail = {"from": old_path, "size": seen.stat.size, "hash": seen.content.hash.hex()}
    batch.append_event(
        "moved", seen.path, json.dumps(detail, sort_keys=True, separators=(",", ":"))
    )
    return Change("moved", seen.path, old_path)


def _put(batch: IndexBatch, modified_by: str, seen: Observed, version: str) -> None:
    batch.put_live_file(
        seen.path,
        seen.stat,
        seen.content.hash,
        seen.content.chunks,
        version=version,
        modified_by=modified_by,
        indexed_at_ns=seen.indexed_at_ns,
    )


def _pulled_version(batch: IndexBatch, seen: Observed, ours: str | None) -> tuple[str, str] | None:
    """(version, modified_by) of the peer's row that `seen` is exactly, when that version is
    ours or newer (a pull of it would have replaced our row); else None."""
    theirs = peers.peer_version_of_content(
        batch.db, batch.storage.id, seen.path, seen.content.hash, seen.stat.size,
        seen.stat.mtime_ns, seen.stat.mode,
    )  # fmt: skip
    if theirs is None or ours is None:
        return theirs
    from ironsync.reconcile import Ordering, VersionVector, compare  # only when one is found

    order = compare(VersionVector.from_json(theirs[0]), VersionVector.from_json(ours))
    return theirs if order in (Ordering.EQUAL, Ordering.GREATER) else None


@functools.lru_cache(maxsize=1024)
def _bumped(version: str | None, node_id: str) -> str:
    """The version (JSON) of a local change to a row at `version` (None: no row yet).

    Cached: the files of a storage share a handful of versions, and parsing is most of it."""
    from ironsync.reconcile import VersionVector  # only when something changed

    base = VersionVector() if version is None else VersionVector.from_json(version)
    return base.bump(node_id).to_json()


def _content_detail(seen: Observed, same_content: bool) -> str:
    """The detail of a created/modified event: what `events.append_event` makes of
    {"size": ..., "hash": ...} (+ "content_changed": false), written directly (per file)."""
    head = '{"content_changed":false,' if same_content else "{"
    return f'{head}"hash":"{seen.content.hash.hex()}","size":{seen.stat.size:d}}}'


def _summary(report: ScanReport) -> dict[str, object]:
    return {
        "created": report.count("created"),
        "modified": report.count("modified"),
        "deleted": report.count("deleted"),
        "moved": report.count("moved"),
        "unchanged": report.unchanged,
        "unreadable": len(report.unreadable),
        "bytes_hashed": report.bytes_hashed,
    }


def _warn_symlinks(storage: str, symlinks: list[str]) -> None:
    new = [p for p in symlinks if (storage, p) not in _warned_symlinks]
    if new:
        _warned_symlinks.update((storage, p) for p in new)
        log.warning(
            "storage '%s': %d symlink(s) not followed and not synced (first: %s)",
            storage,
            len(new),
            new[0],
        )


def index_matches_disk(db: Database, storage_id: int, root: Path, path: str) -> bool:
    """Whether the index already holds what the disk has at `path`, as the scanner would
    record it (the watcher skips those paths: the daemon's own writes, mostly)."""
    full = f"{root}/{path}"
    try:
        st = os.lstat(full)
    except OSError:
        return False
    if stat_mod.S_ISREG(st.st_mode):
        known = index.known_stat(db, storage_id, path)
        return known is not None and Stat.of(st) == known.stat and is_trusted(known)
    if not (stat_mod.S_ISDIR(st.st_mode) or stat_mod.S_ISLNK(st.st_mode)):
        return False
    try:
        entry = entry_of(full, path, st)
    except (OSError, UnstorableLink):
        return False
    return entry.same_as(index.known_entry(db, storage_id, path))


def rescan_paths(
    db: Database,
    node_id: str,
    storage: Storage,
    paths: list[str],
    clock: Callable[[], int] = time.time_ns,
    folders: dict[str, str] | None = None,
) -> list[Change]:
    """Bring the index up to date for a few paths (the watcher's and a sync's entry point).
    `folders`: what the folders on the way are (`paths.way_to`), if the caller looked.

    Same index update as a full scan: a path that is gone is a deletion (a folder's with
    everything the index knows inside it), unless a new path among `paths` holds its file
    (same inode, size and mtime) or its content, which makes it a move; a path that cannot
    be read is left as the index has it."""
    row = prepare_storage(db, storage)
    rules = IgnoreRules.load(storage.root)
    wanted = sorted({p for p in paths if not rules.ignores_file(p)})
    planned: list[tuple[str, Stat]] = []
    entries: list[Entry] = []
    gone: list[str] = []
    folders = {} if folders is None else folders
    for path in wanted:
        full = f"{storage.root}/{path}"
        if not reached_as_named(storage.root, path, folders):
            gone.append(path)  # a symlink or no folder on the way: nothing is at this path
            continue
        try:
            st = os.lstat(full)
        except (FileNotFoundError, NotADirectoryError):
            gone.append(path)
            continue
        except OSError:
            continue
        if stat_mod.S_ISREG(st.st_mode):
            planned.append((path, Stat.of(st)))
        elif stat_mod.S_ISDIR(st.st_mode) or (
            stat_mod.S_ISLNK(st.st_mode) and storage.sync_symlinks
        ):
            if stat_mod.S_ISDIR(st.st_mode) and rules.ignores_dir(path):
                continue
            try:
                entries.append(entry_of(full, path, st))
            except (OSError, UnstorableLink):
                continue  # left as the index has it; the next full scan names it
        elif not stat_mod.S_ISLNK(st.st_mode):
            gone.append(path)  # a FIFO or a device now: what was here is gone
    for path in list(gone):  # a folder that is gone takes what it held along
        current = index.get_file(db, row.id, path)
        if current is not None and not current.deleted and current.kind == DIR:
            gone.extend(p for p in tree.live_paths_under(db, row.id, path) if p not in wanted)
    known: dict[str, KnownRow] = {}
    for path in wanted:
        stat_known = index.known_stat(db, row.id, path)
        if stat_known is not None:
            known[path] = known_row(path, stat_known)
    sources = _MoveSources(db, row, {path: known[path] for path in gone if path in known})
    report = ScanReport(storage.name)
    moved_away: set[str] = set()
    _record_entries(db, node_id, row, entries, clock, report)
    renamed = sources.renamed((path, st, path in known) for path, st in planned)
    renamed_paths = {seen.path for seen in renamed}
    to_read = [item for item in planned if item[0] not in renamed_paths]
    read = hash_files(storage.root, to_read, None, clock)
    _record_batches(db, node_id, row, renamed, read, sources, moved_away, report)
    # after the moves: what they moved away is no deletion; contents before their folders
    gone_now = [Gone(path) for path in sorted(gone, reverse=True) if path not in moved_away]
    _record_batches(db, node_id, row, [], gone_now, sources, moved_away, report)
    return report.changes


def _record_batches(
    db: Database,
    node_id: str,
    row: index.StorageRow,
    renamed: Sequence[Observed],
    read: Iterable[Observed | Gone | Unreadable],
    sources: _MoveSources,
    moved_away: set[str],
    report: ScanReport,
) -> None:
    """Write what a scan found into the index, in transactions of at most BATCH changes and
    BATCH_CHUNKS chunks: `renamed` (known without reading), then `read` as it comes. A new
    path whose content vanished elsewhere is a move (`sources`; the old path goes into
    `moved_away`). Changes, unchanged, unreadable files and bytes read go into `report`."""
    pending: list[Observed | Gone] = list(renamed)
    pending_chunks = 0

    def flush() -> None:
        if not pending:
            return
        with db.atomic():
            batch = IndexBatch(db, row)
            batch.prefetch(item.path for item in pending)
            for item in pending:
                change = _record_scanned(batch, node_id, item, sources.by_hash, moved_away)
                if change is not None:
                    report.add(change)
                elif isinstance(item, Observed):
                    report.unchanged += 1  # read again (racy or touched), same content
            batch.write()
        pending.clear()

    for result in read:
        if isinstance(result, Unreadable):
            report.unreadable.append((result.path, result.reason))
            continue
        if isinstance(result, Observed):
            report.bytes_hashed += result.content.size
            pending_chunks += len(result.content.chunks)
        pending.append(result)
        if len(pending) >= BATCH or pending_chunks >= BATCH_CHUNKS:
            flush()
            pending_chunks = 0
    flush()


class _MoveSources:
    """The vanished files of one scan, as sources of moves: by (inode, size, mtime), which a
    rename keeps, and by content hash."""

    def __init__(
        self,
        db: Database,
        row: index.StorageRow,
        vanished: Mapping[str, KnownRow],
    ) -> None:
        self._db = db
        self._row = row
        self._vanished = vanished
        paths = sorted(vanished)
        self._rows = index.get_files(db, row.id, paths)
        self.by_hash: dict[bytes, list[str]] = {}
        self._by_inode: dict[tuple[int, int, int], str] = {}
        for path in paths:
            old = self._rows.get(path)
            if old is not None and old.kind == FILE and old.hash is not None and old.size > 0:
                self.by_hash.setdefault(old.hash, []).append(path)
                _, size, mtime_ns, _, inode, _ = vanished[path]
                self._by_inode[(inode, size, mtime_ns)] = path

    def renamed(self, to_hash: Iterable[tuple[str, Stat, bool]]) -> list[Observed]:
        """A rename keeps the inode, size and mtime: the new files of `to_hash` (path, stat,
        whether the index has the path) that are a vanished file renamed, with its indexed
        content, so that they are not read again (a renamed 1 GiB file costs no hashing; a
        racy entry is read anyway)."""
        renamed: list[Observed] = []
        if not self._by_inode:  # nothing vanished: not even a look at `to_hash`
            return renamed
        for path, st, known in to_hash:
            if known:
                continue
            old_path = self._by_inode.pop((st.inode, st.size, st.mtime_ns), None)
            trusted = old_path is not None and self._vanished[old_path][5] != UNTRUSTED_MODE
            old_known = index.known_stat(self._db, self._row.id, old_path) if trusted else None
            if old_path is None or old_known is None:
                continue
            old = self._rows[old_path]
            assert old.hash is not None
            content = Content(old.hash, old.size, _chunks_of(self._db, old))
            renamed.append(Observed(path, st, content, old_known.indexed_at_ns))
        return renamed
