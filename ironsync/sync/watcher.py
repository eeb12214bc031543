"""The file watcher: filesystem events in, debounced batches of changed paths out.

watchdog (inotify on Linux) reports events on its own thread; `Watcher` hands them to the
event loop, where each path waits until nothing has happened to it for `delay` seconds (a file
written 100 times in that window is handled once; created and deleted inside it, it is nothing:
the index update finds no file and no row). Then `on_changes(storage, paths, folders)` runs
with the settled paths and the folders whose whole subtree must be looked at (a folder created,
deleted or moved, with everything inside).

What is then done with the paths is the index update the scanner uses (sync.local), so a
change seen by the watcher and the same change found by a scan are recorded identically; and
the daemon's own writes (temporary files, its renames, conflict copies) find the index already
up to date and record nothing: they never echo back as local changes.

Catching up (`catch_up`): a peer starting a full sync must see every change made here
before it asked, not only those whose debounce has run out. inotify delivers one watch's
events in order, so the watcher writes a barrier file in each storage's `.ironsync/watch/`
and waits for its event: every change made before then has reached `_pending` by that time,
and all of it is recorded at once, unsettled or not. Without a healthy watcher, or if the
barrier does not come back within BARRIER_TIMEOUT_S, `catch_up` says False and the caller
scans instead.

If the watcher cannot watch (inotify limits) or the kernel's event queue overflowed (events
were lost), it says so through `healthy` and `on_overflow`; the daemon then rescans and keeps
rescanning periodically — a missed event is never a lost change.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler, FileSystemMovedEvent
from watchdog.observers import Observer

from ironsync.config import Storage
from ironsync.ignore import IGNORE_FILE, STATE_DIR, is_temp_name
from ironsync.sync.paths import reached_as_named

log = logging.getLogger(__name__)

OnChanges = Callable[[Storage, set[str], set[str]], Awaitable[None]]

BARRIER_TIMEOUT_S = 5.0
"""How long `catch_up` waits for its barrier events before it gives up (and a scan runs)."""
BARRIER_DIR = f"{STATE_DIR}/watch"
"""Where the barriers are written: a folder of their own, whose mtime alone they move."""
BARRIER_PREFIX = "barrier-"


@dataclass
class _Pending:
    paths: dict[str, float] = field(default_factory=dict)  # path -> time of its last event
    folders: dict[str, float] = field(default_factory=dict)
    rules_changed: float | None = None


class _OverflowAlarm(logging.Handler):
    """watchdog rebuilds its watches after an inotify queue overflow but only logs that events
    were lost; this turns that log record into a call."""

    def __init__(self, callback: Callable[[], None]) -> None:
        super().__init__(logging.WARNING)
        self.callback = callback

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            self.callback()


class Watcher:
    """Watches every storage root; calls `on_changes` with settled paths, per storage."""

    def __init__(
        self,
        storages: list[Storage] | tuple[Storage, ...],
        delay: float,
        on_changes: OnChanges,
        on_overflow: Callable[[Storage | None], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.storages = list(storages)
        self.delay = delay
        self.on_changes = on_changes
        self.on_overflow = on_overflow
        self.clock = clock
        self._pending: dict[str, _Pending] = {s.name: _Pending() for s in self.storages}
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._observer: Observer | None = None  # type: ignore[valid-type]
        self._task: asyncio.Task[None] | None = None
        self._alarm = _OverflowAlarm(self._overflowed)
        self.failure: str | None = None
        self._barriers: dict[tuple[str, str], asyncio.Future[None]] = {}
        self._barrier_ids = itertools.count(1)

    @property
    def healthy(self) -> bool:
        """Watching every storage, no events lost since the last full scan."""
        return (
            self.failure is None and self._observer is not None and self._observer.is_alive()  # type: ignore[attr-defined]
        )

    def mark_rescanned(self) -> None:
        """A full scan caught up with whatever the watcher may have missed."""
        if self.failure and self.failure.startswith("events lost"):
            self.failure = None

    async def catch_up(self, timeout: float = BARRIER_TIMEOUT_S) -> bool:
        """Record every change made on disk before this call, without waiting for its
        debounce (see the module docstring); False when that cannot be promised."""
        loop = self._loop
        if loop is None or not self.healthy:
            return False
        waiting: list[asyncio.Future[None]] = []
        keys = []
        try:
            for storage in self.storages:
                name = f"{BARRIER_PREFIX}{os.getpid()}-{next(self._barrier_ids)}"
                key = (storage.name, f"{BARRIER_DIR}/{name}")
                self._barriers[key] = future = loop.create_future()
                keys.append(key)
                waiting.append(future)
                folder = storage.root / BARRIER_DIR
                if not folder.is_dir():  # made now, it may not be watched yet: no promise
                    folder.mkdir()
                    return False
                barrier = folder / name
                barrier.touch()
                barrier.unlink()
            await asyncio.wait_for(asyncio.gather(*waiting), timeout)
        except (OSError, TimeoutError) as exc:
            log.info("watcher cannot catch up (%s); scanning instead", exc or "no barrier event")
            return False
        finally:
            for key in keys:
                self._barriers.pop(key, None)
        for storage in self.storages:
            await self._record(storage, settled_before=float("inf"))
        return True

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        # watchdog 7 warns, on stderr and with the repr of every watched folder in the text,
        # each time a folder is made again where one was watched (`git checkout` does it by the
        # hundred): harmless to us, but it floods a journal, and where stderr is a pipe nobody
        # reads, the write blocks watchdog's thread and the watcher silently stops.
        warnings.filterwarnings("ignore", message="Callback with id", category=RuntimeWarning)
        observer = Observer()
        for storage in self.storages:  # where catch_up's barriers go: watched from the start
            with contextlib.suppress(OSError):
                (storage.root / BARRIER_DIR).mkdir(parents=True, exist_ok=True)
        try:
            for storage in self.storages:
                observer.schedule(_Handler(self, storage), str(storage.root), recursive=True)
            observer.start()
        except OSError as exc:  # e.g. ENOSPC: inotify watch limit reached
            self.failure = f"cannot watch: {exc}"
            log.warning("file watcher unavailable (%s); falling back to periodic rescans", exc)
            return
        self._observer = observer
        logging.getLogger("watchdog").addHandler(self._alarm)
        self._task = self._loop.create_task(self._run())

    async def stop(self) -> None:
        logging.getLogger("watchdog").removeHandler(self._alarm)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._observer is not None:
            self._observer.stop()  # type: ignore[attr-defined]
            await asyncio.to_thread(self._observer.join, 5)  # type: ignore[attr-defined]

    # --- from watchdog's thread ---------------------------------------------------------------

    def _from_thread(self, storage: Storage, event: FileSystemEvent) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._note, storage, event)

    def _overflowed(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._note_overflow)

    # --- on the event loop -------------------------------------------------------------------

    def _note_overflow(self) -> None:
        self.failure = "events lost (inotify queue overflow)"
        log.warning("file watcher lost events; rescanning")
        self.on_overflow(None)

    def _note(self, storage: Storage, event: FileSystemEvent) -> None:
        if self._barriers:
            barrier = self._barriers.pop(
                (storage.name, _relative(storage.root, event.src_path) or ""), None
            )
            if barrier is not None and not barrier.done():
                barrier.set_result(None)
        if event.event_type in ("opened", "closed_no_write"):
            return
        pending = self._pending[storage.name]
        now = self.clock()
        paths = [event.src_path]
        if isinstance(event, FileSystemMovedEvent):
            paths.append(event.dest_path)
        for raw in paths:
            rel = _relative(storage.root, raw)
            if rel is None or rel == STATE_DIR or rel.startswith(STATE_DIR + "/"):
                continue
            if rel == IGNORE_FILE:
                pending.rules_changed = now
            elif is_temp_name(rel.rpartition("/")[2]):
                continue
            elif event.is_directory:
                if rel:  # the root itself: its own mtime changed; its files report themselves
                    pending.folders[rel] = now
            else:
                pending.paths[rel] = now
        self._wake.set()

    async def _run(self) -> None:
        while True:
            due = self._next_due()
            if due is None:
                await self._wake.wait()
                self._wake.clear()
                continue
            wait = due - self.clock()
            if wait > 0:
                try:
                    await asyncio.wait_for(self._wake.wait(), wait)
                    self._wake.clear()
                except TimeoutError:
                    pass
                continue
            await self._flush()

    def _next_due(self) -> float | None:
        times = [
            t
            for p in self._pending.values()
            for t in (*p.paths.values(), *p.folders.values(), p.rules_changed)
            if t is not None
        ]
        return min(times) + self.delay if times else None

    async def _flush(self) -> None:
        cutoff = self.clock() - self.delay
        for storage in self.storages:
            await self._record(storage, settled_before=cutoff)

    async def _record(self, storage: Storage, settled_before: float) -> None:
        """Hand the paths of `storage` whose last event came at or before `settled_before`
        to `on_changes`."""
        pending = self._pending[storage.name]
        settled = {p for p, t in pending.paths.items() if t <= settled_before}
        folders = {p for p, t in pending.folders.items() if t <= settled_before}
        rules = pending.rules_changed is not None and pending.rules_changed <= settled_before
        for p in settled:
            del pending.paths[p]
        for p in folders:
            del pending.folders[p]
        if rules:
            pending.rules_changed = None
            folders.add("")  # new .ignore patterns: look at the whole storage again
        if settled or folders:
            try:
                await self.on_changes(storage, settled, folders)
            except Exception:
                log.exception("storage '%s': recording watched changes failed", storage.name)


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: Watcher, storage: Storage) -> None:
        self.watcher = watcher
        self.storage = storage

    def on_any_event(self, event: FileSystemEvent) -> None:
        self.watcher._from_thread(self.storage, event)


def _relative(root: Path, raw: str | bytes) -> str | None:
    path = os.fsdecode(raw)
    try:
        rel = os.path.relpath(path, root)
    except ValueError:
        return None
    if rel == ".":
        return ""
    if rel.startswith(".." + os.sep) or rel == "..":
        return None
    return rel.replace(os.sep, "/")


def entries_under(root: Path, folder: str) -> list[str]:
    """Every file, folder and symlink on disk inside `folder` of `root` (relative paths; links
    are not followed, `folder` itself neither: a symlink there, or on the way to it, has
    nothing inside it)."""
    base = root / folder if folder else root
    if folder and not reached_as_named(root, folder + "/", {}):
        return []
    found = []
    stack = [base]
    while stack:
        current = stack.pop()
        try:
            entries = list(os.scandir(current))
        except OSError:
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                stack.append(Path(entry.path))
            if (
                entry.is_dir(follow_symlinks=False)
                or entry.is_file(follow_symlinks=False)
                or (entry.is_symlink())
            ):
                found.append(Path(entry.path).relative_to(root).as_posix())
    return found
