"""Conflicts at a glance, and settling them.

A conflict copy is a live file named `NAME.sync-conflict-YYYYMMDD-HHMMSS-NODEID-HASH.EXT`
beside `NAME.EXT` (see reconcile.conflict_copy_path). `find_conflicts` lists each with both sides;
`resolve` keeps one side under the name and moves every other side into the versions folder
(never into nothing); the caller records the paths it touched with the scanner's index update
(through the running daemon when there is one), so the outcome syncs to every peer like any
local change.

Each side is told by its path and the node that wrote it: the file under the name by its
index row's `modified_by`, the copy by the node its name names (the node that wrote what it
holds; its row's `modified_by` is the node that set it aside). Which of them is this node's
own edit is not guessed (issue 12): either may be another node's.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime

from ironsync.config import Storage
from ironsync.reconcile import CONFLICT_MARKER
from ironsync.store import Database, index
from ironsync.sync.versions import keep_version

_COPY = re.compile(r"^(?P<stem>.+)\.sync-conflict-(?P<stamp>\d{8}-\d{6})-(?P<rest>.+)$")
_HASH_TAG = re.compile(r"-[0-9a-f]{8}$")  # after the node id: the copy's content hash


@dataclass(frozen=True)
class Side:
    """One side of a conflict: a file, or a deletion of the name, and the node that wrote it."""

    path: str
    node: str
    mtime: datetime
    size: int
    deleted: bool = False


@dataclass(frozen=True)
class Conflict:
    storage: str
    path: str  # the name both versions claimed
    original: Side | None  # what the name holds now (None: the index has no row for it)
    copy: Side  # the conflict copy


def original_candidates(copy_path: str) -> list[tuple[str, str, datetime]]:
    """(original path, node id, stamp) readings of a conflict copy's name. A node id may hold
    dots, so `x.sync-conflict-...-a.b-HASH.txt` reads as node "a.b" of `x.txt` or node "a" of
    `x.b.txt`; the caller keeps the reading whose original the index knows. The 8 hex digits
    of the content hash after the node id are not part of it."""
    folder, _, name = copy_path.rpartition("/")
    match = _COPY.match(name)
    if match is None:
        return []
    stamp = datetime.strptime(match.group("stamp"), "%Y%m%d-%H%M%S").replace(tzinfo=UTC)
    stem, rest = match.group("stem"), match.group("rest")
    readings = [(stem, rest)]  # no extension
    for i, char in enumerate(rest):
        if char == ".":
            readings.append((stem + rest[i:], rest[:i]))
    prefix = f"{folder}/" if folder else ""
    return [
        (prefix + original, _HASH_TAG.sub("", node), stamp)
        for original, node in readings
        if _HASH_TAG.sub("", node)
    ]


def find_conflicts(db: Database, storage: Storage) -> list[Conflict]:
    """Every conflict copy of `storage` the index knows, with both sides."""
    row = index.get_storage(db, storage.name)
    if row is None:
        return []
    copies = db.query(
        "SELECT path, size, mtime_ns, modified_by FROM files"
        " WHERE storage_id = ? AND deleted = 0 AND instr(path, ?) > 0 ORDER BY path",
        (row.id, CONFLICT_MARKER),
    )
    found = []
    for path, size, mtime_ns, modified_by in copies:
        readings = original_candidates(path)
        if not readings:
            continue
        chosen = readings[-1]
        for reading in readings:
            if index.get_file(db, row.id, reading[0]) is not None:
                chosen = reading
                break
        original, node, _stamp = chosen
        current = index.get_file(db, row.id, original)
        under_name = None
        if current is not None:
            under_name = Side(
                original,
                current.modified_by,
                _time(current.mtime_ns),
                current.size,
                deleted=current.deleted,
            )
        copy = Side(path, node or modified_by, _time(mtime_ns), size)
        found.append(Conflict(storage.name, original, under_name, copy))
    return found


def resolve(storage: Storage, conflicts: list[Conflict], keep: str) -> list[str]:
    """Settle the conflicts of one name on disk: `keep` is "mine" (the file under the name),
    "theirs" (the only conflict copy) or the path of the copy to keep. Every side not kept
    goes to the versions folder. Returns the paths touched, for the caller to record (through
    the running daemon, or here)."""
    if not conflicts:
        raise ValueError("no conflict to resolve")
    if keep == "theirs":
        if len(conflicts) > 1:
            names = ", ".join(c.copy.path for c in conflicts)
            raise ValueError(f"several conflict copies ({names}): name the one to keep")
        keep = conflicts[0].copy.path
    original = conflicts[0].path
    touched = [original]
    root = storage.root
    if keep != "mine":
        chosen = next((c for c in conflicts if c.copy.path == keep), None)
        if chosen is None:
            raise ValueError(f"{keep} is not a conflict copy of {original}")
        keep_version(root, original, move=False)  # the side we drop, kept
        os.replace(root / chosen.copy.path, root / original)
        touched.append(chosen.copy.path)
    for conflict in conflicts:
        if conflict.copy.path != keep:
            keep_version(root, conflict.copy.path, move=True)
            touched.append(conflict.copy.path)
    return touched


def _time(mtime_ns: int) -> datetime:
    return datetime.fromtimestamp(mtime_ns / 1e9, UTC)
