"""Versions: what a peer's change replaces or deletes is kept, not lost.

Before a pull replaces a local file, the old file is hard-linked (no copy of the bytes) into
the storage's versions folder; before a peer's deletion removes one, it is renamed there. Both
are atomic: a crash leaves the file in place, in the versions folder, or both.

    <root>/.ironsync/versions/<path>~YYYYMMDD-HHMMSS

The stamp is the UTC time of the kept content's mtime (when it was written), so "the version
of last Tuesday" is the newest one stamped before Wednesday. The folder is never scanned or
synced (`ignore.is_internal`). Versions older than `keep_versions_days` are pruned by the
daemon; `ironsync restore` puts one back as a new local change.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import stat
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from ironsync.ignore import STATE_DIR

log = logging.getLogger(__name__)

VERSIONS_DIR = f"{STATE_DIR}/versions"
STAMP_FORMAT = "%Y%m%d-%H%M%S"
_STAMP = re.compile(r"~(\d{8}-\d{6})(?:-(\d+))?$")
NS = 1_000_000_000


@dataclass(frozen=True)
class Version:
    """One kept version of a file."""

    path: str  # the file it was a version of, relative to the storage root
    file: Path  # where it is kept
    stamp: datetime  # UTC mtime of the kept content
    size: int


def versions_root(root: Path) -> Path:
    return root / VERSIONS_DIR


def _stamp(mtime_ns: int) -> str:
    return datetime.fromtimestamp(mtime_ns // NS, UTC).strftime(STAMP_FORMAT)


def _free_name(folder: Path, base: str) -> Path:
    candidate = folder / base
    n = 1
    while os.path.lexists(candidate):
        candidate = folder / f"{base}-{n}"
        n += 1
    return candidate


def keep_version(root: Path, rel: str, *, move: bool) -> Path | None:
    """Keep the file at `rel` as a version: renamed there (`move`, for a deletion) or
    hard-linked (for a replacement: the caller's rename over it then leaves the old inode in
    the versions folder alone). Returns where it was kept; None if there was no regular file
    or link (a link is kept as a link). Falls back to a copy only where the filesystem has
    no hard links."""
    full = root / rel
    try:
        st = os.lstat(full)
    except FileNotFoundError:
        return None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        return None  # a link is kept as a link: renamed or hard-linked, never followed
    folder = versions_root(root) / Path(rel).parent
    folder.mkdir(parents=True, exist_ok=True)
    dest = _free_name(folder, f"{Path(rel).name}~{_stamp(st.st_mtime_ns)}")
    if move:
        try:
            os.rename(full, dest)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            # `rel` sits on another file system mounted inside the storage: copy, then unlink
            shutil.copy2(full, dest, follow_symlinks=False)
            try:
                os.unlink(full)
            except OSError:
                dest.unlink(missing_ok=True)  # not deleted (read-only?): keep no stray copy
                raise
    else:
        try:
            os.link(full, dest, follow_symlinks=False)
        except OSError:
            shutil.copy2(full, dest, follow_symlinks=False)
    return dest


def list_versions(root: Path, rel: str) -> list[Version]:
    """Every kept version of `rel`, oldest first."""
    folder = versions_root(root) / Path(rel).parent
    name = Path(rel).name
    found = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    for entry in entries:
        if not entry.name.startswith(name + "~") or not entry.is_file(follow_symlinks=False):
            continue
        match = _STAMP.search(entry.name)
        if match is None or entry.name[: match.start()] != name:
            continue
        stamp = datetime.strptime(match.group(1), STAMP_FORMAT).replace(tzinfo=UTC)
        found.append(Version(rel, Path(entry.path), stamp, entry.stat().st_size))
    found.sort(key=lambda v: (v.stamp, v.file.name))
    return found


def versioned_under(root: Path, rel_folder: str) -> list[str]:
    """The paths inside the folder `rel_folder` that have kept versions (what a deleted
    folder held), sorted."""
    base = versions_root(root) / rel_folder
    found: set[str] = set()
    for dirpath, _dirs, files in os.walk(base):
        rel_dir = Path(dirpath).relative_to(versions_root(root)).as_posix()
        for name in files:
            match = _STAMP.search(name)
            if match is not None:
                found.add(f"{rel_dir}/{name[: match.start()]}")
    return sorted(found)


def version_at(root: Path, rel: str, at: datetime | None) -> Version | None:
    """The newest version stamped at or before `at` (the newest of all when None)."""
    candidates = [v for v in list_versions(root, rel) if at is None or v.stamp <= at]
    return candidates[-1] if candidates else None


def prune_versions(root: Path, keep_days: float, now: datetime) -> int:
    """Delete versions kept for more than `keep_days` days (by the time they were kept, i.e.
    their ctime, not their stamp). Returns how many were removed."""
    if keep_days <= 0:
        return 0
    limit = now.timestamp() - keep_days * 86400
    removed = 0
    for dirpath, _dirs, files in os.walk(versions_root(root), topdown=False):
        for name in files:
            path = os.path.join(dirpath, name)
            try:
                if os.lstat(path).st_ctime < limit:
                    os.unlink(path)
                    removed += 1
            except OSError as exc:
                log.warning("cannot prune %s: %s", path, exc)
        if dirpath != str(versions_root(root)):
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)  # only succeeds when empty
    return removed
