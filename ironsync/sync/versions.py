"""Versions: what a peer's change replaces or deletes is kept, not lost.

Before a pull replaces a local file, the old file is hard-linked (no copy of the bytes) into
the storage's versions folder; before a peer's deletion removes one, it is renamed there. Both
are atomic: a crash leaves the file in place, in the versions folder, or both.

    <root>/.ironsync/versions/<path>~YYYYMMDD-HHMMSS

A name too long to take the stamp (over 235 bytes, where names end at 255) is kept under its
first bytes and a hash of the whole name (`kept_name`). A second version with the same stamp
gets `-1`, `-2`... after it, unless it holds what one already there holds: then that one counts
as kept again (issue 12: a `restore` of a file that had not changed kept it twice).

The stamp is the UTC time of the kept content's mtime (when it was written), so "the version
of last Tuesday" is the newest one stamped before Wednesday. The folder is never scanned or
synced (`ignore.is_internal`). Versions older than `keep_versions_days` are pruned by the
daemon; `ironsync restore` puts one back as a new local change.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import shutil
import stat
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from ironsync.ignore import STATE_DIR

log = logging.getLogger(__name__)

VERSIONS_DIR = f"{STATE_DIR}/versions"
STAMP_FORMAT = "%Y%m%d-%H%M%S"
_STAMP = re.compile(r"~(\d{8}-\d{6})(?:-(\d+))?$")
NS = 1_000_000_000
NAME_MAX_BYTES = 255  # NAME_MAX of Linux file systems, in bytes
_STAMP_ROOM = len("~YYYYMMDD-HHMMSS") + len("-999")  # what keep_version adds to a name


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


def kept_name(name: str) -> str:
    """What a version of the file `name` is kept under, before its `~STAMP`: `name` itself,
    or, when the stamp would make it longer than names may be, its first bytes and a hash of
    the whole name (two long names that begin alike are kept apart)."""
    raw = name.encode("utf-8", "surrogateescape")
    room = NAME_MAX_BYTES - _STAMP_ROOM
    if len(raw) <= room:
        return name
    digest = hashlib.blake2b(raw, digest_size=6).hexdigest()
    head = raw[: room - len(digest) - 1].decode("utf-8", "ignore")  # whole characters
    return f"{head}#{digest}"


def _free_name(folder: Path, base: str) -> Path:
    candidate = folder / base
    n = 1
    while os.path.lexists(candidate):
        candidate = folder / f"{base}-{n}"
        n += 1
    return candidate


def same_content(a: Path, b: Path) -> bool:
    """Whether `a` and `b` are two files with the same bytes, or two links with the same
    target (links are compared, never followed)."""
    try:
        sa, sb = os.lstat(a), os.lstat(b)
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(sa.st_mode) and stat.S_ISLNK(sb.st_mode):
        return os.readlink(a) == os.readlink(b)
    if not (stat.S_ISREG(sa.st_mode) and stat.S_ISREG(sb.st_mode)) or sa.st_size != sb.st_size:
        return False
    if (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino):
        return True
    with _open_file(a) as fa, _open_file(b) as fb:
        while True:
            block = fa.read(_COMPARE_BLOCK)
            if block != fb.read(_COMPARE_BLOCK):
                return False
            if not block:
                return True


_COMPARE_BLOCK = 1024 * 1024


def _open_file(path: Path) -> BinaryIO:
    return os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb")


def keep_version(root: Path, rel: str, *, move: bool, like: Path | None = None) -> Path | None:
    """Keep the file at `rel` as a version: renamed there (`move`, for a deletion) or
    hard-linked (for a replacement: the caller's rename over it then leaves the old inode in
    the versions folder alone). Returns where it was kept; None if there was no regular file
    or link (a link is kept as a link). Falls back to a copy only where the filesystem has
    no hard links.

    A version with the same content already kept under the same stamp (or at `like`, say the
    newest version) is not kept twice: it counts as kept now (pruning starts again from now)
    and is returned; with `move` the file is then removed."""
    full = root / rel
    try:
        st = os.lstat(full)
    except FileNotFoundError:
        return None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        return None  # a link is kept as a link: renamed or hard-linked, never followed
    folder = versions_root(root) / Path(rel).parent
    folder.mkdir(parents=True, exist_ok=True)
    base = f"{kept_name(Path(rel).name)}~{_stamp(st.st_mtime_ns)}"
    twin = _kept_twin(full, folder, base, like)
    if twin is not None:
        _mark_kept_now(twin)
        if move:
            os.unlink(full)
        return twin
    dest = _free_name(folder, base)
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


def _kept_twin(full: Path, folder: Path, base: str, like: Path | None) -> Path | None:
    """A kept version holding what `full` holds: `like`, or one named `base` (or `base-N`)."""
    if like is not None and same_content(full, like):
        return like
    candidate, n = folder / base, 1
    while os.path.lexists(candidate):
        if same_content(full, candidate):
            return candidate
        candidate, n = folder / f"{base}-{n}", n + 1
    return None


def _mark_kept_now(path: Path) -> None:
    """Set the ctime of `path` to now, which `prune_versions` reads as when it was kept."""
    st = os.lstat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def list_versions(root: Path, rel: str) -> list[Version]:
    """Every kept version of `rel`, oldest first."""
    folder = versions_root(root) / Path(rel).parent
    name = kept_name(Path(rel).name)
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
