"""Pulled files switch into place in groups: durability shared, never skipped (issue 13).

A pull that has written and verified its temp file hands it to a Committer, which switches
every pull that is ready at that moment together, in the order the safety rules need
(shared/DESIGN.md, "Rules that keep data safe"):

1. the temp files' data is flushed to disk (`flush`: one syncfs per file system, or an fsync
   each), outside the lock: the rest of the node goes on meanwhile;
2. under the lock (the engine's `apply_lock`), each pull checks its decision again
   (`Switchable.check`, on the event loop: it reads the node's database; `checking` lets the
   owner of the checks read what the whole group needs at once), then every pull
   that passed renames its temp file over the target (`Switchable.rename`); a pull whose
   check or rename fails, fails alone;
3. the renames are flushed (`flush` of the folders);
4. one transaction records every renamed file: its index row and `write_finished` event,
   written per storage by an IndexBatch (a few statements for the whole group), through a
   connection of the committer's own (an apsw connection serves one thread at a time; the
   node's stays the event loop's).

The renames, their flush and the transaction run in one job, in a thread of the committer's
own (not queued behind the pulls' writes in the shared pool), and the loop goes on receiving
meanwhile.

So a group of N small files costs two flushes and one transaction of a few statements, not 2N
fsyncs and N transactions; and while pulls keep coming, one flush: the pulls ready when a group
starts its renames form the next group at once, and their data is flushed with those renames
(step 3 takes their temp files along: one syncfs for both), so that group skips step 1.

The index is never committed before the rename is durable: a crash before step 4 leaves the
new files in place and their old index rows, and the next scan indexes what it finds (the
content is the peer's, so the versions merge without a conflict copy). The lock is held from
the first rename to the commit, so no decision sees a disk the index does not describe.

Groups form by themselves: the first pull that is ready starts a group at once; the pulls that
become ready while it is being switched form the next group (taken as its renames start, or
after it). A pull that is cancelled while it waits for its group leaves it; once its group has
taken it, it waits for the group to finish (its file descriptors are in use), then the
cancellation goes on.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import os
import sys
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Protocol

from ironsync.store import Database, open_database
from ironsync.store.batch import IndexBatch
from ironsync.store.index import StorageRow
from ironsync.sync.blocking import OwnThread, each, in_thread, wait_through_cancellations
from ironsync.sync.crashpoints import crash_point
from ironsync.sync.paths import StorableChecks


class Switchable(Protocol):
    """A pull whose temp file is written and verified (transfer._Pull)."""

    storage: StorageRow  # where it goes: its index row is written with its storage's batch
    path: str

    def data_fd(self) -> int:
        """The temp file's descriptor: flushed in step 1."""

    def check(self) -> None:
        """Step 2, under the lock, on the event loop: check the decision again. Raises to
        fail this pull alone."""

    def rename(self, checks: StorableChecks) -> int:
        """Step 2, under the lock, in a thread: rename the temp file over the target; the
        descriptor of the target's folder (flushed in step 3). `checks` looks at the names
        on the way, each folder once for the group (its storage's). Raises to fail this pull
        alone."""

    def record(self, batch: IndexBatch) -> None:
        """Step 4, inside the group's transaction: the index row and the event, added to
        `batch` (its storage's), which the committer writes out before the commit."""


@dataclass(eq=False)
class _Entry:
    item: Switchable
    done: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    taken: bool = False


class Committer:
    """Switches pulls into place in groups (module docstring)."""

    def __init__(
        self,
        db: Database,
        lock: asyncio.Lock | None = None,
        checking: Callable[[list[Switchable]], AbstractContextManager[object]] | None = None,
    ) -> None:
        self.db = db
        self.lock = lock if lock is not None else asyncio.Lock()
        # entered around a group's checks (under the lock, with no pause between them): the
        # owner of the checks may read what they need for the whole group at once
        self.checking = checking or (lambda items: nullcontext())
        self._queue: list[_Entry] = []
        # the next group, taken while the last one switched, and whether its data is durable
        # already (flushed with the last group's renames)
        self._next: tuple[list[_Entry], bool] | None = None
        self._task: asyncio.Task[None] | None = None
        self.groups = 0  # groups switched, for tests and benchmarks
        self.largest = 0  # the most pulls one group switched
        self.switched = 0  # pulls renamed into place
        self.flush_seconds = 0.0  # spent flushing (data and renames)
        self._writer: Database | None = None  # step 4's connection, open while groups run
        # steps 2 to 4 run here, never queued behind the pulls' writes in the shared pool
        self._thread = OwnThread("ironsync-commit")

    @property
    def waiting(self) -> int:
        """Pulls ready and waiting for the next group."""
        return len(self._queue)

    async def commit(self, item: Switchable) -> None:
        """Switch `item` into place with whatever else is ready; raises what its own rename
        raised, or what failed for its whole group."""
        (error,) = await self.commit_many([item])
        if error is not None:
            raise error

    async def commit_many(self, items: list[Switchable]) -> list[BaseException | None]:
        """`commit` for several items, which join the same group: what each one raised."""
        entries = [_Entry(item) for item in items]
        self._queue.extend(entries)
        if self._task is None:
            self._task = asyncio.create_task(self._run())
        try:
            await asyncio.shield(asyncio.gather(*(e.done for e in entries), return_exceptions=True))
        except asyncio.CancelledError:
            taken = [e.done for e in entries if e.taken]
            for entry in entries:
                if not entry.taken:
                    self._queue.remove(entry)
                    entry.done.cancel()
            if taken:  # their descriptors are in use: wait, then go on
                await wait_through_cancellations(taken)
                for done in taken:
                    if not done.cancelled():
                        done.exception()  # retrieved: the cancellation is what goes on
            raise
        return [e.done.exception() for e in entries]

    def _take(self) -> list[_Entry]:
        group, self._queue = self._queue, []
        for entry in group:
            entry.taken = True
        return group

    async def _run(self) -> None:
        try:
            while self._next is not None or self._queue:
                if self._next is not None:
                    (group, durable), self._next = self._next, None
                else:
                    group, durable = self._take(), False
                try:
                    await self._switch(group, durable)
                except asyncio.CancelledError:
                    for entry in group + (self._next[0] if self._next else []):
                        entry.done.cancel()
                    self._next = None
                    raise
                except BaseException as exc:
                    for entry in group:
                        if not entry.done.done():
                            entry.done.set_exception(exc)
        finally:
            self._task = None
            for entry in self._queue:  # cancelled with pulls still queued: they fail too
                entry.done.cancel()
            self._queue = []
            if self._writer is not None:  # no thread uses it now (in_thread waited)
                self._writer.close()
                self._writer = None
            self._thread.close()

    async def _switch(self, group: list[_Entry], durable: bool) -> None:
        """Switch `group` into place (`durable`: its data is flushed already)."""
        self.groups += 1
        self.largest = max(self.largest, len(group))
        if not durable:
            started = time.monotonic()
            await in_thread(flush, [entry.item.data_fd() for entry in group])
            self.flush_seconds += time.monotonic() - started
        async with self.lock:
            checked: list[_Entry] = []
            with self.checking([entry.item for entry in group]):
                for entry in group:
                    try:
                        entry.item.check()
                    except Exception as exc:
                        entry.done.set_exception(exc)
                    else:
                        checked.append(entry)
            if not checked:
                return
            items = [entry.item for entry in checked]
            # The pulls ready now form the next group: their data is flushed with this
            # group's renames (one syncfs for both, where there were two).
            ahead = self._take()
            self._next = (ahead, False) if ahead else None
            ahead_fds = [entry.item.data_fd() for entry in ahead]
            outcomes, error, flushed = await self._thread.run(
                self._switch_checked, items, ahead_fds
            )
            self._next = (ahead, flushed) if ahead else None
            renamed: list[_Entry] = []
            for entry, outcome in zip(checked, outcomes, strict=True):
                if outcome is None:
                    renamed.append(entry)
                else:
                    entry.done.set_exception(outcome)
            if error is not None:
                raise error
        for entry in renamed:
            entry.done.set_result(None)

    def _switch_checked(
        self, items: list[Switchable], ahead_fds: list[int]
    ) -> tuple[list[Exception | None], Exception | None, bool]:
        """Steps 2 (the renames) to 4, in one thread job: what each item's rename raised;
        what failed for the whole group after its renames (their flush, the transaction);
        whether the data of `ahead_fds` (the next group's) is durable: the renames' flush
        takes it along (one syncfs for both); when nothing was renamed, the next group
        flushes its own."""
        renames = _rename_all(items)
        outcomes = [o if isinstance(o, Exception) else None for o in renames]
        folders = [o for o in renames if not isinstance(o, Exception)]
        if not folders:
            return outcomes, None, False
        flushed = False
        try:
            crash_point("group_renamed")
            started = time.monotonic()
            flush(folders + ahead_fds)
            flushed = bool(ahead_fds)
            self.flush_seconds += time.monotonic() - started
            self.switched += len(folders)
            by_storage: dict[int, list[Switchable]] = {}
            for item, outcome in zip(items, outcomes, strict=True):
                if outcome is None:
                    by_storage.setdefault(item.storage.id, []).append(item)
            self._record(list(by_storage.values()))
        except Exception as exc:
            return outcomes, exc, flushed
        return outcomes, None, flushed

    def _record(self, by_storage: list[list[Switchable]]) -> None:
        """Step 4, in a thread: one transaction, an IndexBatch per storage."""
        if self._writer is None:
            self._writer = open_database(self.db.path, migrate=False)
        db = self._writer
        with db.atomic():
            for items in by_storage:
                batch = IndexBatch(db, items[0].storage)
                batch.prefetch(item.path for item in items)
                for item in items:
                    item.record(batch)
                batch.write()


def _rename_all(items: list[Switchable]) -> list[int | Exception]:
    """Step 2's renames, in one thread job, each storage's with one StorableChecks: each
    item's folder descriptor, or what it raised."""
    outcomes: list[int | Exception] = [0] * len(items)
    by_root: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        by_root.setdefault(str(item.storage.root), []).append(i)
    for root, indexes in by_root.items():
        with StorableChecks(root) as checks:
            done = each(lambda i: items[i].rename(checks), indexes)
        for i, outcome in zip(indexes, done, strict=True):
            outcomes[i] = outcome
    return outcomes


# --- flushing ----------------------------------------------------------------------------------


def _libc_function(name: str, *argtypes: type) -> Callable[..., int] | None:
    """libc's function `name` (Linux), returning an int and setting errno, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        function = getattr(libc, name)
    except (OSError, AttributeError):
        return None
    function.argtypes = list(argtypes)
    function.restype = ctypes.c_int
    return function


def _syncfs_function() -> Callable[[int], int] | None:
    """libc's syncfs when the kernel reports its write-back errors (Linux 5.8 and later;
    before, syncfs returned 0 whatever happened), else None."""
    try:
        major, minor = (int(part) for part in os.uname().release.split(".")[:2])
    except ValueError:
        return None
    if (major, minor) < (5, 8):
        return None
    return _libc_function("syncfs", ctypes.c_int)


_SYNCFS = _syncfs_function()
# renameat2 (glibc 2.28 and later): folder, name, folder, name, flags
_RENAMEAT2 = _libc_function(
    "renameat2", ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint
)
_RENAME_NOREPLACE = 1


def rename_new(src: str, dst: str, folder_fd: int) -> bool:
    """Rename `src` to `dst` in the folder, only if no entry is at `dst` (renameat2 with
    RENAME_NOREPLACE: one step, where a hard link and an unlink take two): True when done;
    False when this system or file system cannot (the caller links and unlinks instead).
    Raises FileExistsError when `dst` is there, OSError as rename does."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(folder_fd, os.fsencode(src), folder_fd, os.fsencode(dst), _RENAME_NOREPLACE):
        code = ctypes.get_errno()
        if code in (errno.EINVAL, errno.ENOSYS):  # the flag is not supported here
            return False
        raise OSError(code, os.strerror(code), src, None, dst)
    return True


def flush(fds: Iterable[int]) -> None:
    """Make durable what was written through `fds` (files, or folders after renames): an fsync
    of each, or one syncfs for the file system of several (the same guarantee: every dirty
    page and every metadata change of that file system reaches the disk). Raises OSError."""
    by_device: dict[int, dict[int, int]] = {}  # device -> inode -> a descriptor of it
    for fd in fds:
        st = os.fstat(fd)
        by_device.setdefault(st.st_dev, {}).setdefault(st.st_ino, fd)
    for same in by_device.values():
        if _SYNCFS is not None and len(same) > 1:
            if _SYNCFS(next(iter(same.values()))) != 0:
                code = ctypes.get_errno()
                raise OSError(code, f"syncfs: {os.strerror(code)}")
        else:
            for fd in same.values():
                os.fsync(fd)
