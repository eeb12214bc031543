"""Walk a storage, diff `stat` against the index, hash and chunk what changed.

Two passes, both reading only the filesystem:

1. `plan_scan` walks the tree with `os.scandir` and compares each file's stat (size, mtime_ns,
   ctime_ns, inode, mode) with what the index recorded. Only new or changed files are
   hashed; known files that are not on disk any more are `vanished` — unless they sit under a
   folder that could not be read, or `.ignore` now excludes them (neither is a deletion).
2. `hash_files` reads each new or changed file once, hashing it whole and cutting it into
   content-defined chunks. A file that changes while it is read is read again, and skipped
   (left for the next scan) if it will not hold still: it is never indexed with a wrong hash.

A file whose mtime and ctime are both within RACY_WINDOW_NS of the moment it was indexed is
hashed again at the next scan even if its stat matches (git's "racy clean" problem: a same-size
edit within the filesystem's timestamp granularity would otherwise go unseen). Both: an mtime
set in the future (a peer's clock ahead, `touch -d`) does not keep a file "racy", read at every
scan until the clock catches up, since its ctime (which only the kernel sets) is old; and a
pulled file, whose mtime is the peer's, is not read again at the next scan.

Folders and symlinks are entries of the index beside files (`Entry`): a folder's own content
is its permission bits (its mtime moves with whatever happens inside it, so it makes no new
version by itself), a symlink's is its target text, read with readlink and never followed.
With `symlinks=False` (the `sync_symlinks` config key) links are left alone as before: named
once, not indexed, and a known one is no deletion. Sockets, FIFOs and devices are skipped and
named, as are names that are not valid UTF-8.

Speed. A no-change rescan must keep up with `rsync -a --dry-run` (bin/bench-scan): it is one
stat per file, and the rest must cost next to nothing. The index's rows come in as plain tuples
(`KnownRow`, the racy test already made in SQL) and each file's stat is compared with one tuple
comparison; the ignore rules are consulted per file only when `.ignore` has patterns (ironsync's
own names are told by their name alone); the set of a folder's paths seen is built only when
some known path of it was not found unchanged. A folder at a time is listed and stat'ed by
`scan_folder`: in C (ironsync/_scandir.c, the GIL released) when the extension was built, else
`scan_folder_py`, whose contract it follows entry for entry (tests/test_scan.py runs both).
In Python the walk
alone costs ~1.5x rsync's whole run on 100k files; in C it is at the cost of the system calls.
Small files are read whole and chunked in memory; a big file's chunk list goes to a spool on
disk, so memory stays flat in the file size.

Memory. A no-change rescan holds one folder's index rows and paths at a time (and the stack
of the folders still to list), not the storage's: the walk lists folders in the order of the
index `files_by_folder` (a folder's subfolders by name + '/', which is string order of their
paths), and reads the index's rows with one cursor beside it (`plan_scan_rows`). The rows of
folders the walk passed without listing them (gone, ignored, unreadable) are looked at as
they go by. The files to hash go to a temporary file (`FilesToHash`), in path order: a
folder's changed files are put on the walk's stack between its subfolders, so they come off it
in the order of their paths, with no sort at the end (a first scan of 1,000,000 files held
~400 MiB of them). What vanished is still held whole: moves are found among it.

Sparse files (issue 11). A bigger file's holes are found with SEEK_DATA / SEEK_HOLE and never
read: `hash_and_chunk_sparse` feeds their zeros to the hashes from memory and does not even cut
them byte by byte, with the chunks a file of the same bytes written out would have. A 1 GiB file
holding 4 KiB of data is hashed in ~0.1 s instead of ~4 s; a file without holes costs the same
as before (one more fstat field looked at).
"""

from __future__ import annotations

import errno
import functools
import marshal
import os
import stat as stat_mod
import struct
import tempfile
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import groupby
from operator import itemgetter
from pathlib import Path
from typing import IO, TYPE_CHECKING, NamedTuple, overload

from ironsync.chunking import (
    MIN_CHUNK,
    ChunkInfo,
    Content,
    MiB,
    chunk_bytes,
    hash_and_chunk_sparse,
    new_chunker,
)
from ironsync.ignore import IGNORE_FILE, STATE_DIR, TEMP_PREFIX, TEMP_SUFFIX, IgnoreRules
from ironsync.model import DIR, DIR_HASH, FILE, MAX_LINK_TARGET_BYTES, SYMLINK, link_hash

if TYPE_CHECKING:
    from pyfastcdc import FastCDC

RACY_WINDOW_NS = 2_000_000_000
HASH_ATTEMPTS = 3
SMALL_FILE_BYTES = 1 * MiB  # read whole and chunked in memory (no stream buffer to set up)
SPOOL_FILE_BYTES = 64 * MiB  # above this (~2,700 chunks), the chunk list goes to disk
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)  # a FIFO swapped in must not block

KnownRow = tuple[str, int, int, int, int, int]
"""(path, size, mtime_ns, ctime_ns, inode, mode) of a live file as indexed, for the no-change
test: equal to the tuple of the file's stat when nothing changed. `mode` is -1 when the entry
is racy (`is_trusted` false): it then equals no stat, and the file is hashed again."""

UNTRUSTED_MODE = -1

IndexRow = tuple[str, int, int, int, int, int, str, str, str | None]
"""A live row of the index as the scan reads it (`index.rows_by_folder`): (path, size,
mtime_ns, ctime_ns, inode, mode, folder, kind, target). A file's first six items are its
`KnownRow`; a folder's or a link's mode is its own. `folder` is the path up to and including
its last '/' ('' at the root)."""


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


def known_row(path: str, known: KnownStat) -> KnownRow:
    """The `KnownRow` of a `KnownStat` (what `index.known_rows` reads in SQL)."""
    st = known.stat
    mode = st.mode if is_trusted(known) else UNTRUSTED_MODE
    return (path, st.size, st.mtime_ns, st.ctime_ns, st.inode, mode)


class KnownEntry(NamedTuple):
    """A live folder or symlink as indexed (`index.known_entries`), for the no-change test."""

    path: str
    kind: str
    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    mode: int
    target: str | None


@dataclass(frozen=True, slots=True)
class Entry:
    """A folder or a symlink as found on disk: what the index records of it. A folder's
    `stat.mode` is its permission bits; a link's is 0 and its size is the target's length."""

    path: str
    kind: str  # model.DIR or model.SYMLINK
    stat: Stat
    target: str | None = None

    @property
    def hash(self) -> bytes:
        return DIR_HASH if self.kind == DIR else link_hash(self.target or "")

    def same_as(self, known: KnownEntry | None) -> bool:
        """Whether the index already holds this entry (nothing to record)."""
        if known is None or known.kind != self.kind:
            return False
        if self.kind == DIR:  # the mtime moves with the folder's contents: not a change
            return known.mode == self.stat.mode
        st = self.stat
        return (known.size, known.mtime_ns, known.ctime_ns, known.inode) == (
            st.size, st.mtime_ns, st.ctime_ns, st.inode,
        )  # fmt: skip


class UnstorableLink(Exception):
    """A symlink whose target cannot be synced (not UTF-8, too long)."""


def entry_of(full: str, rel: str, st: os.stat_result) -> Entry:
    """The `Entry` of the folder or symlink `rel` (at `full`) whose lstat is `st`.
    Raises OSError (readlink) or UnstorableLink."""
    if stat_mod.S_ISDIR(st.st_mode):
        return Entry(
            rel, DIR, Stat(0, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_mode & 0o777)
        )
    target = os.readlink(full)
    if not _is_utf8(target):
        raise UnstorableLink("the link's target is not valid UTF-8")
    length = len(target.encode("utf-8"))
    if length > MAX_LINK_TARGET_BYTES or not target or "\x00" in target:
        raise UnstorableLink(
            f"the link's target is empty or longer than {MAX_LINK_TARGET_BYTES} bytes"
        )
    return Entry(rel, SYMLINK, Stat(length, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, 0), target)


ToHashRow = tuple[str, int, int, int, int, int, bool]
"""A file to read: its `KnownRow` as found on disk, and whether the index has it (a changed
file; else a new one)."""
_LENGTH = struct.Struct("<I")  # of a block of FilesToHash
_SIZE = itemgetter(1)


class FilesToHash:
    """The files a scan will read, in path order, as (path, Stat): in an anonymous temporary
    file instead of memory (a first scan of 1,000,000 files held ~400 MiB of them), written
    first and then read back, as often as needed."""

    BLOCK = 4096  # rows held before they go to the file

    def __init__(self) -> None:
        self._file: IO[bytes] | None = None  # made for the first block
        self._end = 0
        self._pending: list[ToHashRow] = []
        self._count = 0
        self.bytes = 0  # their size in all

    def extend(self, rows: Iterable[ToHashRow]) -> None:
        """Add rows after those added: in path order."""
        count = len(self._pending)
        self._pending += rows
        self._count += len(self._pending) - count
        self.bytes += sum(map(_SIZE, self._pending[count:]))
        if len(self._pending) >= self.BLOCK:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        if self._file is None:
            # owned by the object: closed when it is dropped
            self._file = tempfile.TemporaryFile()  # noqa: SIM115
        block = marshal.dumps(self._pending)
        os.pwrite(self._file.fileno(), _LENGTH.pack(len(block)) + block, self._end)
        self._end += _LENGTH.size + len(block)
        self._pending.clear()

    def rows(self) -> Iterator[tuple[str, Stat, bool]]:
        """Each file's path, stat as found, and whether the index has it (else it is new)."""
        self._flush()
        at = 0
        while at < self._end:
            assert self._file is not None
            fd = self._file.fileno()
            (length,) = _LENGTH.unpack(os.pread(fd, _LENGTH.size, at))
            for path, *st, known in marshal.loads(os.pread(fd, length, at + _LENGTH.size)):
                yield path, Stat(*st), known
            at += _LENGTH.size + length

    def __iter__(self) -> Iterator[tuple[str, Stat]]:
        for path, st, _ in self.rows():
            yield path, st

    def __len__(self) -> int:
        return self._count


@dataclass
class ScanPlan:
    to_hash: FilesToHash = field(default_factory=FilesToHash)
    entries: list[Entry] = field(default_factory=list)  # folders and links new or changed
    vanished: list[str] = field(default_factory=list)
    # the known rows of the vanished files: the sources of moves
    vanished_files: dict[str, KnownRow] = field(default_factory=dict)
    unchanged: int = 0
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    symlinks: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    @property
    def bytes_to_hash(self) -> int:
        return self.to_hash.bytes


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
    known_entries: Mapping[str, KnownEntry] | None = None,
    *,
    symlinks: bool = True,
) -> ScanPlan:
    """Walk `root` and sort every file into unchanged / to hash, every folder and link into
    unchanged / changed; list what vanished."""
    rows = {path: known_row(path, k) for path, k in known.items()}
    return plan_scan_rows(root, index_rows(rows, known_entries or {}), rules, symlinks=symlinks)


def folder_of(path: str) -> str:
    """The folder of `path`: up to and including its last '/' ('' at the root)."""
    return path[: path.rfind("/") + 1]


def index_rows(files: Mapping[str, KnownRow], entries: Mapping[str, KnownEntry]) -> list[IndexRow]:
    """The `IndexRow`s of these files, folders and links, in `index.rows_by_folder`'s order."""
    rows: list[IndexRow] = [(*row, folder_of(path), FILE, None) for path, row in files.items()]
    rows += [
        (e.path, e.size, e.mtime_ns, e.ctime_ns, e.inode, e.mode, folder_of(e.path), e.kind,
         e.target)
        for e in entries.values()
    ]  # fmt: skip
    rows.sort(key=_ROW_ORDER)
    return rows


_ROW_ORDER = itemgetter(6, 7, 0)  # folder, kind, path: index.rows_by_folder's ORDER BY
_FOLDER_AND_KIND = itemgetter(6, 7)


class _RowsByFolder:
    """The index's rows read beside a walk that lists folders in the same order: one folder's
    rows at a time, never the whole storage's."""

    def __init__(self, rows: Iterable[IndexRow]) -> None:
        self._groups = groupby(rows, _FOLDER_AND_KIND)
        self._next = next(self._groups, None)
        self._folder = ""

    def take(
        self, prefix: str, unwalked: Callable[[IndexRow], None]
    ) -> tuple[dict[str, IndexRow], dict[str, IndexRow]]:
        """The rows of the files, and of the folders and links, in the folder `prefix`; the
        rows of the folders before it, which the walk did not list, go to `unwalked`."""
        files: dict[str, IndexRow] = {}
        entries: dict[str, IndexRow] = {}
        while self._next is not None:
            (folder, kind), rows = self._next
            if folder > prefix:
                break
            if folder < self._folder:  # never: SQLite's order of text is Python's
                raise RuntimeError(f"index rows out of folder order at {folder!r}")
            self._folder = folder
            if folder < prefix:
                for row in rows:
                    unwalked(row)
            elif kind == FILE:
                files = {row[0]: row for row in rows}
            else:
                entries.update((row[0], row) for row in rows)
            self._next = next(self._groups, None)
        return files, entries

    def take_rest(self, unwalked: Callable[[IndexRow], None]) -> None:
        """The rows past the last folder walked, which the walk did not list."""
        while self._next is not None:
            for row in self._next[1]:
                unwalked(row)
            self._next = next(self._groups, None)


def plan_scan_rows(
    root: Path,
    known: Iterable[IndexRow],
    rules: IgnoreRules,
    *,
    symlinks: bool = True,
) -> ScanPlan:
    """`plan_scan` with the index's live rows as `IndexRow`s in folder order
    (`index.rows_by_folder`): the fast form, for a whole storage. The walk lists folders in
    that order (a folder's subfolders sorted by name + '/' are in string order of their paths),
    so it holds the rows and the paths seen of one folder at a time."""
    plan = ScanPlan()
    notes: list[tuple[str, str, str | None]] = []
    unreadable_dirs: list[str] = []
    unchanged = 0
    ignores_file = rules.ignores_file if rules.patterns else None  # else ironsync's names only

    def unwalked(row: IndexRow) -> None:
        """A known path the walk did not find: vanished, unless ignored or unreadable."""
        path, kind = row[0], row[7]
        if rules.ignores_file(path) or (kind != FILE and rules.ignores_dir(path)):
            return
        if any(path.startswith(prefix) for prefix in unreadable_dirs):
            return
        plan.vanished.append(path)
        if kind == FILE:
            plan.vanished_files[path] = row[:6]  # type: ignore[assignment]

    by_folder = _RowsByFolder(known)
    stack: list[tuple[str, str, list[ToHashRow] | None]] = [(str(root), "", None)]
    while stack:
        folder, prefix, ready = stack.pop()
        if ready is not None:  # files of a folder that sort before its next subfolder's
            plan.to_hash.extend(ready)
            continue
        files, entries = by_folder.take(prefix, unwalked)
        walked: list[str] = []  # every path seen here: looked at if some known one was not
        changed: list[KnownRow] = []  # new or changed files
        try:
            files_unchanged = scan_folder(
                folder, prefix, files, ignores_file, walked, changed, notes
            )
        except FileNotFoundError:  # vanished while we walked: its files are gone
            for row in (*files.values(), *entries.values()):
                unwalked(row)
            continue
        except OSError as exc:
            rel = prefix.rstrip("/")
            plan.unreadable.append((rel or ".", exc.strerror or str(exc)))
            unreadable_dirs.append(prefix)
            continue
        entries_unchanged = 0
        subfolders: list[tuple[str, str]] = []
        for note, rel, detail in notes:
            if note == NOTE_DIR:
                if rules.ignores_dir(rel):
                    continue
                subfolders.append((detail, rel + "/"))  # type: ignore[arg-type]
                entries_unchanged += _plan_entry(plan, detail, rel, entries, walked)  # type: ignore[arg-type]
            elif note == NOTE_SYMLINK:
                if not symlinks:
                    plan.symlinks.append(rel)
                    if rel in entries:
                        walked.append(rel)  # left alone: not a deletion either
                elif not rules.ignores_file(rel):
                    full = f"{folder}/{rel.rpartition('/')[2]}"
                    entries_unchanged += _plan_entry(plan, full, rel, entries, walked)
            elif note == NOTE_OTHER:
                if not rules.ignores_file(rel):
                    plan.skipped.append((rel, "not a regular file, folder or symlink"))
            elif note == NOTE_BAD_NAME:
                plan.skipped.append((rel, BAD_NAME_REASON))
            else:
                plan.unreadable.append((rel, detail or note))
        notes.clear()
        _push_in_path_order(stack, sorted((*row, row[0] in files) for row in changed), subfolders)
        unchanged += files_unchanged + entries_unchanged
        if files_unchanged != len(files) or entries_unchanged != len(entries):
            seen = set(walked)  # some known path was not found unchanged: which vanished?
            for row in (*files.values(), *entries.values()):
                if row[0] not in seen:
                    unwalked(row)
    by_folder.take_rest(unwalked)
    plan.unchanged = unchanged
    plan.entries.sort(key=lambda entry: entry.path)
    plan.vanished.sort()
    return plan


def _push_in_path_order(
    stack: list[tuple[str, str, list[ToHashRow] | None]],
    changed: list[ToHashRow],
    subfolders: list[tuple[str, str]],
) -> None:
    """Push a folder's `changed` files (sorted) and its subfolders (full path, prefix) on the
    walk's `stack` so that they come off it in path order: the files of a subfolder sort
    among the folder's own as its name + '/' (its prefix) does, and its own subfolders in turn.
    The folders are listed in prefix order still, the index's."""
    end = len(changed)
    for full, prefix in sorted(subfolders, key=_PREFIX, reverse=True):
        start = bisect_left(changed, prefix, hi=end, key=_PATH)
        if start < end:
            stack.append(("", "", changed[start:end]))
        stack.append((full, prefix, None))
        end = start
    if end:
        stack.append(("", "", changed[:end]))


_PATH = itemgetter(0)
_PREFIX = itemgetter(1)


def _plan_entry(
    plan: ScanPlan, full: str, rel: str, known: Mapping[str, IndexRow], walked: list[str]
) -> int:
    """Look at the folder or link `rel` (at `full`): 1 if the index has it as it is, else 0
    (and the entry goes to `plan.entries`, or to `plan.skipped` / `plan.unreadable`)."""
    try:
        st = os.lstat(full)
        entry = entry_of(full, rel, st)
    except FileNotFoundError:
        return 0
    except UnstorableLink as exc:
        plan.skipped.append((rel, str(exc)))
        if rel in known:
            walked.append(rel)  # as the index has it: not a deletion
        return 0
    except OSError as exc:
        plan.unreadable.append((rel, exc.strerror or str(exc)))
        if rel in known:
            walked.append(rel)
        return 0
    walked.append(rel)
    row = known.get(rel)
    if row is not None and entry.same_as(KnownEntry(row[0], row[7], *row[1:6], row[8])):
        return 1
    plan.entries.append(entry)
    return 0


# What `scan_folder` says about the entries of a folder that are not regular files:
# (note, path, detail), the detail being the folder's path (NOTE_DIR) or the error's text.
NOTE_DIR = "dir"
NOTE_SYMLINK = "symlink"
NOTE_OTHER = "other"  # a socket, FIFO or device
NOTE_BAD_NAME = "bad name"  # not valid UTF-8
BAD_NAME_REASON = "name is not valid UTF-8"


def shown_name(path: str) -> str:
    """`path` as text that can be printed and stored: the bytes of a name that is not valid
    UTF-8 (surrogate-escaped by os.fsdecode) as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


NOTE_ERROR = "error"  # could not be stat'ed


def scan_folder_py(
    folder: str,
    prefix: str,
    known: dict[str, tuple],
    ignores_file: Callable[[str], bool] | None,
    walked: list[str],
    changed: list[KnownRow],
    notes: list[tuple[str, str, str | None]],
) -> int:
    """List one folder (path `prefix` in the storage); stat and compare its regular files.

    Each file's path goes to `walked`, its row to `changed` unless `known` has that very row
    (as the first six items of its value: an `IndexRow` or a `KnownRow`); returns how many
    did. ironsync's own files are left out, and those `ignores_file` says;
    other entries go to `notes`. An OSError is raised (before anything is added) when the
    folder cannot be listed. `ironsync._scandir.scan_folder` is the same in C."""
    unchanged = 0
    known_get = known.get
    with os.scandir(folder) as scan:
        entries = list(scan)
    for entry in entries:
        name = entry.name
        rel = prefix + name
        if not name.isascii() and not _is_utf8(name):
            notes.append((NOTE_BAD_NAME, rel, None))
            continue
        try:
            if entry.is_file(follow_symlinks=False):
                # ironsync's own files (ignore.is_internal): `.ignore` and a `.ironsync` file
                # only at the root (the walk never enters the root's `.ironsync/` folder)
                if (
                    (name.endswith(TEMP_SUFFIX) and name.startswith(TEMP_PREFIX))
                    or (not prefix and name in (IGNORE_FILE, STATE_DIR))
                    or (ignores_file is not None and ignores_file(rel))
                ):
                    continue
                st = entry.stat(follow_symlinks=False)
                row = (rel, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino,
                       st.st_mode & 0o777)  # fmt: skip
                walked.append(rel)
                previous = known_get(rel)
                if previous is not None and previous[:6] == row:
                    unchanged += 1
                else:
                    changed.append(row)
            elif entry.is_symlink():
                notes.append((NOTE_SYMLINK, rel, None))
            elif entry.is_dir(follow_symlinks=False):
                notes.append((NOTE_DIR, rel, entry.path))
            else:
                notes.append((NOTE_OTHER, rel, None))
        except FileNotFoundError:
            continue
        except OSError as exc:
            notes.append((NOTE_ERROR, rel, exc.strerror or str(exc)))
            if rel in known:
                walked.append(rel)  # cannot tell: keep what the index says
    return unchanged


try:  # the same in C (ironsync/_scandir.c), built when a compiler is at hand
    from ironsync._scandir import scan_folder
except ImportError:  # pragma: no cover - depends on the build
    scan_folder = scan_folder_py


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def is_trusted(known: KnownStat) -> bool:
    """False when the file was modified so close to when it was indexed that a same-size edit
    in the same timestamp tick would look identical ("racy"): such a file is hashed again."""
    st = known.stat
    return min(st.mtime_ns, st.ctime_ns) < known.indexed_at_ns - RACY_WINDOW_NS


def hash_files(
    root: Path,
    to_hash: Iterable[tuple[str, Stat]],
    on_bytes: Callable[[int], None] | None = None,
    clock: Callable[[], int] = time.time_ns,
) -> Iterator[Observed | Gone | Unreadable]:
    """Read each file once (again if it changed meanwhile); yield what was found."""
    top = os.fspath(root)
    for rel, _ in to_hash:
        yield _read_one(top, rel, on_bytes, clock)


@functools.cache
def _chunker() -> FastCDC:
    """One chunker for every scan (it keeps no state between files); made on first use."""
    return new_chunker()


def _read_one(
    root: str,
    rel: str,
    on_bytes: Callable[[int], None] | None,
    clock: Callable[[], int],
) -> Observed | Gone | Unreadable:
    full = f"{root}/{rel}"  # rel is relative and '/'-separated (os.path.join costs more)
    for _ in range(HASH_ATTEMPTS):
        started_ns = clock()
        try:
            fd = os.open(full, _OPEN_FLAGS)
            try:
                before = os.fstat(fd)
                if not stat_mod.S_ISREG(before.st_mode):
                    return Gone(rel)
                content = _hash_open_file(fd, before, on_bytes)
                after = os.fstat(fd)
            finally:
                os.close(fd)
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


def _hash_open_file(
    fd: int, before: os.stat_result, on_bytes: Callable[[int], None] | None
) -> Content:
    """Hash and chunk the open file `fd` (`before`: its fstat before the read).

    A file that grew meanwhile yields more than its size in bytes, one that shrank fewer: the
    caller's held-still test then fails and the file is read again."""
    size = before.st_size
    if size <= SMALL_FILE_BYTES:
        data = os.read(fd, size + 1)  # one byte more: a file that grew shows it
        while len(data) < size:  # a short read (allowed, rare): go on to the end
            more = os.read(fd, size + 1 - len(data))
            if not more:
                break
            data += more
        if on_bytes is not None and data:
            on_bytes(len(data))
        return chunk_bytes(data, None if len(data) <= MIN_CHUNK else _chunker())
    sink = ChunkSpool() if size > SPOOL_FILE_BYTES else None
    # fewer blocks than bytes: it may have holes (or be compressed: then none are found)
    holes = holes_of(fd, size) if before.st_blocks * 512 < size else ()
    return hash_and_chunk_sparse(
        lambda view, offset: os.preadv(fd, [view], offset), size, holes, _chunker(), on_bytes, sink
    )


def holes_of(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """The holes of the open file `fd` in [0, size), in order, as SEEK_DATA / SEEK_HOLE say
    (lazily: one lseek pair per data extent). None where the file system cannot tell."""
    if not hasattr(os, "SEEK_DATA"):  # pragma: no cover - every system ironsync runs on
        return
    pos = 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after pos: a hole to the end
                yield (pos, size)
            return  # else (EINVAL: no SEEK_DATA here) the rest is read
        if data > pos:
            yield (pos, min(data, size))
        try:
            pos = os.lseek(fd, data, os.SEEK_HOLE)
        except OSError:
            return


_SPOOL_RECORD = struct.Struct("<QI16s")  # offset, length, xxh3-128: 28 bytes per chunk
_SPOOL_FLUSH_BYTES = 64 * 1024


class ChunkSpool(Sequence[ChunkInfo]):
    """The chunk list of a big file, in an anonymous temporary file instead of memory
    (28 bytes a chunk: ~1.2 MB per GiB of file), read back in order when it is stored."""

    def __init__(self) -> None:
        # owned by the spool: closed by close() or when the spool is dropped
        self._file = tempfile.TemporaryFile()  # noqa: SIM115
        self._pending = bytearray()
        self._count = 0

    def append(self, chunk: ChunkInfo) -> None:
        self._pending += _SPOOL_RECORD.pack(chunk.offset, chunk.length, chunk.hash)
        self._count += 1
        if len(self._pending) >= _SPOOL_FLUSH_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._file.write(self._pending)
            self._file.flush()
            self._pending.clear()

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[ChunkInfo]:
        self._flush()
        fd, size, block = self._file.fileno(), _SPOOL_RECORD.size, 2048 * _SPOOL_RECORD.size
        end = self._count * size  # positional reads: two iterations do not disturb each other
        for start in range(0, end, block):
            data = os.pread(fd, min(block, end - start), start)
            for offset, length, digest in _SPOOL_RECORD.iter_unpack(data):
                yield ChunkInfo(offset, length, digest)

    @overload
    def __getitem__(self, index: int) -> ChunkInfo: ...
    @overload
    def __getitem__(self, index: slice) -> list[ChunkInfo]: ...
    def __getitem__(self, index: int | slice) -> ChunkInfo | list[ChunkInfo]:
        if isinstance(index, slice):
            return list(self)[index]
        if index < 0:
            index += self._count
        if not 0 <= index < self._count:
            raise IndexError("chunk index out of range")
        self._flush()
        size = _SPOOL_RECORD.size
        offset, length, digest = _SPOOL_RECORD.unpack(
            os.pread(self._file.fileno(), size, index * size)
        )
        return ChunkInfo(offset, length, digest)

    def close(self) -> None:
        self._file.close()
