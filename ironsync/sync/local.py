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

import logging
import os
import stat as stat_mod
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ironsync.chunking import Content
from ironsync.config import Storage
from ironsync.ignore import STATE_DIR, IgnoreRules
from ironsync.reconcile import VersionVector, merge
from ironsync.scan import (
    Gone,
    Observed,
    Stat,
    Unreadable,
    hash_files,
    is_trusted,
    plan_scan,
)
from ironsync.store import Database, index
from ironsync.store import events as ev

log = logging.getLogger(__name__)

BATCH = 500  # changes per write transaction: short locks, few commits
_warned_symlinks: set[tuple[str, str]] = set()


class StorageUnavailable(Exception):
    """A storage root that cannot be scanned safely (missing, unreadable, marker gone)."""

    def __init__(self, storage: str, reason: str) -> None:
        self.storage = storage
        self.reason = reason
        super().__init__(f"storage '{storage}': {reason}")


@dataclass(frozen=True)
class Change:
    kind: str  # created, modified, deleted, moved
    path: str
    from_path: str | None = None


@dataclass
class ScanReport:
    storage: str
    changes: list[Change] = field(default_factory=list)
    unchanged: int = 0
    bytes_hashed: int = 0
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    symlinks: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def count(self, kind: str) -> int:
        return sum(1 for change in self.changes if change.kind == kind)


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
) -> ScanReport:
    """Bring the index of one storage up to date with its disk; say what changed."""
    progress = progress or NoProgress()
    row = prepare_storage(db, storage)
    rules = IgnoreRules.load(storage.root)
    known = index.known_stats(db, row.id)
    plan = plan_scan(storage.root, known, rules, clock())
    report = ScanReport(
        storage.name,
        unchanged=plan.unchanged,
        unreadable=list(plan.unreadable),
        symlinks=plan.symlinks,
        skipped=plan.skipped,
    )
    _warn_symlinks(storage.name, plan.symlinks)

    vanished_by_hash: dict[bytes, list[str]] = {}
    vanished_by_inode: dict[tuple[int, int, int], str] = {}
    for path in plan.vanished:
        old = index.get_file(db, row.id, path)
        if old is not None and old.hash is not None and old.size > 0:
            vanished_by_hash.setdefault(old.hash, []).append(path)
            st = known[path].stat
            vanished_by_inode[(st.inode, st.size, st.mtime_ns)] = path
    moved_away: set[str] = set()
    pending: list[Observed | Gone] = []

    # A rename keeps the inode, size and mtime: recognise it without reading the file again
    # (a renamed 1 GiB file costs no hashing). A racy entry is read anyway.
    to_hash = []
    for path, st in plan.to_hash:
        old_path = (
            None if path in known else vanished_by_inode.pop((st.inode, st.size, st.mtime_ns), None)
        )
        old_known = known[old_path] if old_path else None
        if old_path is None or old_known is None or not is_trusted(old_known):
            to_hash.append((path, st))
            continue
        old = index.get_file(db, row.id, old_path)
        assert old is not None and old.hash is not None
        content = Content(old.hash, old.size, tuple(index.chunks_of(db, old.id)))
        pending.append(Observed(path, st, content, old_known.indexed_at_ns))

    progress.begin(storage.name, len(to_hash), sum(st.size for _, st in to_hash))

    def flush() -> None:
        with db.atomic():
            for item in pending:
                change = _record_scanned(db, node_id, row, item, vanished_by_hash, moved_away)
                if change is not None:
                    report.changes.append(change)
                elif isinstance(item, Observed):
                    report.unchanged += 1  # read again (racy or touched), same content
        pending.clear()

    for result in hash_files(storage.root, to_hash, progress.advance, clock):
        if isinstance(result, Unreadable):
            report.unreadable.append((result.path, result.reason))
            continue
        if isinstance(result, Observed):
            report.bytes_hashed += result.content.size
        pending.append(result)
        if len(pending) >= BATCH:
            flush()
    flush()
    progress.end()

    with db.atomic():
        for path in plan.vanished:
            if path not in moved_away:
                change = record_vanished(db, node_id, row, path)
                if change is not None:
                    report.changes.append(change)
        for path, reason in report.unreadable:
            ev.append_event(
                db, "skipped", storage=storage.name, path=path, status="warning",
                detail={"reason": reason},
            )  # fmt: skip
        if report.changes or report.unreadable:
            ev.append_event(db, "scanned", storage=storage.name, detail=_summary(report))
        index.mark_scanned(db, row.id, ev.iso_now())
    return report


def _record_scanned(
    db: Database,
    node_id: str,
    storage: index.StorageRow,
    item: Observed | Gone,
    vanished_by_hash: dict[bytes, list[str]],
    moved_away: set[str],
) -> Change | None:
    if isinstance(item, Gone):
        return record_vanished(db, node_id, storage, item.path)
    current = index.get_file(db, storage.id, item.path)
    is_new = current is None or current.deleted
    candidates = vanished_by_hash.get(item.content.hash) if is_new else None
    if candidates:
        old_path = candidates.pop(0)
        moved_away.add(old_path)
        return record_moved(db, node_id, storage, old_path, item)
    return record_observed(db, node_id, storage, item)


def record_observed(
    db: Database, node_id: str, storage: index.StorageRow, seen: Observed
) -> Change | None:
    """A file as read from disk: created, modified, or only its stat refreshed."""
    with db.atomic():
        current = index.get_file(db, storage.id, seen.path)
        if current is not None and not current.deleted:
            same = (
                current.hash == seen.content.hash
                and current.size == seen.stat.size
                and current.mtime_ns == seen.stat.mtime_ns
                and current.mode == seen.stat.mode
            )
            if same:
                index.refresh_stat(db, current.id, seen.stat, seen.indexed_at_ns)
                return None
        kind = "created" if current is None or current.deleted else "modified"
        base = VersionVector.from_json(current.version) if current else VersionVector()
        _put(db, node_id, storage, seen, base.bump(node_id))
        detail = {"size": seen.stat.size, "hash": seen.content.hash.hex()}
        if current is not None and not current.deleted and current.hash == seen.content.hash:
            detail["content_changed"] = False
        ev.append_event(db, kind, storage=storage.name, path=seen.path, detail=detail)
        return Change(kind, seen.path)


def record_vanished(
    db: Database, node_id: str, storage: index.StorageRow, path: str
) -> Change | None:
    """A known file is not on disk any more: tombstone it."""
    with db.atomic():
        current = index.get_file(db, storage.id, path)
        if current is None or current.deleted:
            return None
        version = VersionVector.from_json(current.version).bump(node_id)
        index.put_tombstone(db, storage.id, path, version=version.to_json(), modified_by=node_id)
        ev.append_event(db, "deleted", storage=storage.name, path=path)
        return Change("deleted", path)


def record_moved(
    db: Database, node_id: str, storage: index.StorageRow, old_path: str, seen: Observed
) -> Change:
    """`old_path` is now `seen.path`: the new path keeps (and bumps) the version history."""
    with db.atomic():
        old = index.get_file(db, storage.id, old_path)
        target = index.get_file(db, storage.id, seen.path)
        old_version = VersionVector.from_json(old.version) if old else VersionVector()
        base = old_version
        if target is not None:  # a tombstone at the new path: dominate it too
            base = merge(base, VersionVector.from_json(target.version))
        _put(db, node_id, storage, seen, base.bump(node_id))
        if old is not None and not old.deleted:
            index.put_tombstone(
                db, storage.id, old_path, version=old_version.bump(node_id).to_json(),
                modified_by=node_id,
            )  # fmt: skip
        ev.append_event(
            db, "moved", storage=storage.name, path=seen.path,
            detail={"from": old_path, "size": seen.stat.size, "hash": seen.content.hash.hex()},
        )  # fmt: skip
        return Change("moved", seen.path, old_path)


def _put(
    db: Database,
    node_id: str,
    storage: index.StorageRow,
    seen: Observed,
    version: VersionVector,
) -> None:
    index.put_live_file(
        db,
        storage.id,
        seen.path,
        seen.stat,
        seen.content.hash,
        seen.content.chunks,
        version=version.to_json(),
        modified_by=node_id,
        indexed_at_ns=seen.indexed_at_ns,
    )


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


def rescan_paths(
    db: Database,
    node_id: str,
    storage: Storage,
    paths: list[str],
    clock: Callable[[], int] = time.time_ns,
) -> list[Change]:
    """Bring the index up to date for a few paths (the watcher's and a sync's entry point).

    Same index update as a full scan; a path that is gone is a deletion, one that cannot be
    read is left as the index has it."""
    row = prepare_storage(db, storage)
    rules = IgnoreRules.load(storage.root)
    wanted = sorted({p for p in paths if not rules.ignores_file(p)})
    to_hash: list[tuple[str, Stat]] = []
    gone: list[str] = []
    for path in wanted:
        try:
            st = os.lstat(storage.root / path)
        except (FileNotFoundError, NotADirectoryError):
            gone.append(path)
            continue
        except OSError:
            continue
        if stat_mod.S_ISREG(st.st_mode):
            to_hash.append((path, Stat.of(st)))
        else:
            gone.append(path)  # a folder or a symlink now: the file is gone
    changes: list[Change] = []
    for result in hash_files(storage.root, to_hash, None, clock):
        if isinstance(result, Observed):
            change = record_observed(db, node_id, row, result)
        elif isinstance(result, Gone):
            change = record_vanished(db, node_id, row, result.path)
        else:
            continue
        if change is not None:
            changes.append(change)
    for path in gone:
        change = record_vanished(db, node_id, row, path)
        if change is not None:
            changes.append(change)
    return changes
