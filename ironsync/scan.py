"""Walk a storage, diff `stat` against the index, hash and chunk what changed.

Two passes, both reading only the filesystem:

1. `plan_scan` walks the tree with `os.scandir` and compares each file's stat (size, mtime_ns,
   ctime_ns, inode, mode) with what the index recorded. Only new or changed files are
   hashed; known files that are not on disk any more are `vanished` — unless they sit under a
   folder that could not be read, or `.ignore` now excludes them (neither is a deletion).
2. `hash_files` reads each new or changed file once, hashing it whole and cutting it into
   content-defined chunks. A file that changes while it is read is read again, and skipped
   (left for the next scan) if it will not hold still: it is never indexed with a wrong hash.

A file whose mtime is within RACY_WINDOW_NS of the moment it was indexed is hashed again at the
next scan even if its stat matches (git's "racy clean" problem: a same-size edit within the
filesystem's timestamp granularity would otherwise go unseen).

Symlinks are neither followed nor synced (reported once per scan); nor are sockets, FIFOs and
devices, or names that are not valid UTF-8.
"""

from __future__ import annotations

import os
import stat as stat_mod
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pyfastcdc import FastCDC

from ironsync.chunking import Content, hash_and_chunk, new_chunker
from ironsync.ignore import IgnoreRules

RACY_WINDOW_NS = 2_000_000_000
HASH_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class Stat:
    """The stat fields the index keeps for the no-change test."""

    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    mode: int  # permission bits (0o777): setuid, setgid and sticky are not synced

    @classmethod
    def of(cls, st: os.stat_result) -> Stat:
        return cls(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_mode & 0o777)


@dataclass(frozen=True, slots=True)
class KnownStat:
    """What the index holds for a live file, as far as the no-change test needs."""

    stat: Stat
    indexed_at_ns: int


@dataclass
class ScanPlan:
    to_hash: list[tuple[str, Stat]] = field(default_factory=list)
    vanished: list[str] = field(default_factory=list)
    unchanged: int = 0
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    symlinks: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    @property
    def bytes_to_hash(self) -> int:
        return sum(st.size for _, st in self.to_hash)


@dataclass(frozen=True, slots=True)
class Observed:
    """A file as read: its stat after the read and its content."""

    path: str
    stat: Stat
    content: Content
    indexed_at_ns: int


@dataclass(frozen=True, slots=True)
class Gone:
    """A file that disappeared between the walk and the read."""

    path: str


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A file that could not be read (permissions, I/O error, kept changing)."""

    path: str
    reason: str


def plan_scan(
    root: Path,
    known: Mapping[str, KnownStat],
    rules: IgnoreRules,
    now_ns: int | None = None,
) -> ScanPlan:
    """Walk `root` and sort every file into unchanged / to hash; list what vanished."""
    plan = ScanPlan()
    seen: set[str] = set()
    unreadable_dirs: list[str] = []
    stack: list[tuple[str, str]] = [(str(root), "")]
    while stack:
        folder, prefix = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            continue  # vanished while we walked: its files are gone
        except OSError as exc:
            rel = prefix.rstrip("/")
            plan.unreadable.append((rel or ".", exc.strerror or str(exc)))
            unreadable_dirs.append(prefix)
            continue
        for entry in entries:
            name = entry.name
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                plan.skipped.append((prefix + os.fsdecode(name), "name is not valid UTF-8"))
                continue
            rel = prefix + name
            try:
                if entry.is_symlink():
                    plan.symlinks.append(rel)
                elif entry.is_dir(follow_symlinks=False):
                    if not rules.ignores_dir(rel):
                        stack.append((entry.path, rel + "/"))
                elif entry.is_file(follow_symlinks=False):
                    if rules.ignores_file(rel):
                        continue
                    st = Stat.of(entry.stat(follow_symlinks=False))
                    seen.add(rel)
                    previous = known.get(rel)
                    if previous is not None and _unchanged(previous, st):
                        plan.unchanged += 1
                    else:
                        plan.to_hash.append((rel, st))
                elif not rules.ignores_file(rel):
                    plan.skipped.append((rel, "not a regular file, folder or symlink"))
            except FileNotFoundError:
                continue
            except OSError as exc:
                plan.unreadable.append((rel, exc.strerror or str(exc)))
                if rel in known:
                    seen.add(rel)  # cannot tell: keep what the index says
    for path in known:
        if path in seen or rules.ignores_file(path):
            continue
        if any(path.startswith(prefix) for prefix in unreadable_dirs):
            continue
        plan.vanished.append(path)
    plan.to_hash.sort()
    plan.vanished.sort()
    return plan


def _unchanged(known: KnownStat, st: Stat) -> bool:
    return known.stat == st and is_trusted(known)


def is_trusted(known: KnownStat) -> bool:
    """False when the file was modified so close to when it was indexed that a same-size edit
    in the same timestamp tick would look identical ("racy"): such a file is hashed again."""
    return known.stat.mtime_ns < known.indexed_at_ns - RACY_WINDOW_NS


def hash_files(
    root: Path,
    to_hash: list[tuple[str, Stat]],
    on_bytes: Callable[[int], None] | None = None,
    clock: Callable[[], int] = time.time_ns,
) -> Iterator[Observed | Gone | Unreadable]:
    """Read each file once (again if it changed meanwhile); yield what was found."""
    chunker = new_chunker()
    for rel, _ in to_hash:
        yield _read_one(root, rel, chunker, on_bytes, clock)


def _read_one(
    root: Path,
    rel: str,
    chunker: FastCDC,
    on_bytes: Callable[[int], None] | None,
    clock: Callable[[], int],
) -> Observed | Gone | Unreadable:
    full = os.path.join(root, rel)
    for _ in range(HASH_ATTEMPTS):
        started_ns = clock()
        try:
            with open(full, "rb", buffering=0) as stream:
                before = os.fstat(stream.fileno())
                if not stat_mod.S_ISREG(before.st_mode):
                    return Gone(rel)
                content = hash_and_chunk(stream, chunker, on_bytes)
                after = os.fstat(stream.fileno())
            on_path = os.stat(full, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return Gone(rel)
        except OSError as exc:
            return Unreadable(rel, exc.strerror or str(exc))
        held_still = (
            before.st_size == content.size == after.st_size
            and before.st_mtime_ns == after.st_mtime_ns
            and before.st_ctime_ns == after.st_ctime_ns
            and on_path.st_ino == after.st_ino
            and on_path.st_dev == after.st_dev
        )
        if held_still:
            return Observed(rel, Stat.of(after), content, started_ns)
    return Unreadable(rel, "kept changing while being read; will retry at the next scan")
