"""Full sync with one peer: iron-carrier's loop, over SQL, pull-based.

Theory of operation
-------------------
Each node only ever changes its own disk. A full sync between this node and a peer is:

1. Scan our storages (the peer scans its own when we ask for its storage hashes).
2. Ask the peer for its storage hashes; the storages whose hash differs from ours diverge.
   Aliases only one side has are ignored.
3. For each divergent storage, fetch the peer's index — only the rows changed since the highest
   sequence we received from it before (`peer_storages.last_sequence`). If the storage hash of
   what we then hold of the peer's index differs from the hash it announced (its database was
   replaced, say), forget it and fetch the whole index again.
4. The consolidated index is one SQL query (`peers.divergent_paths`): every path where our row
   and the peer's differ. For each, `reconcile` decides from the version vectors; we *pull*
   (transfer only the chunks we lack), delete, record a tombstone or adopt a merged version.
   Conflicts keep the losing content as a conflict copy before anything is replaced.
5. Ask the peer to do the same with us (`SyncRequest`): it pulls what it lacks.
6. Repeat from 2 until the storage hashes match, or a round changes nothing on either side
   (what is left is then paths one side ignores, or failures, which are reported), within
   MAX_ROUNDS.

Every change applied here takes a new local sequence number, so a third node that syncs with
us later receives it: a node relays what it learned from one peer to another.

Locking: `apply_lock` serializes what changes this node's index and disk: deciding a path and
acting on it locally, the switch of pulled files into place (`committer`, ironsync.sync.commit),
scans and the watcher's updates. It is never held while waiting on a peer: a peer that answers
slowly, or not at all, delays only its own pulls, never another peer's or a scan. A decision
whose pull waited on the peer is checked again under the lock before anything is replaced
(the disk as `expected`, the index row unchanged), and abandoned for the next round otherwise.

Scans (`scan_fresh`) run in a thread with their own database connection, under `apply_lock`,
coalesced (ironsync.sync.coalesce): at most one at a time, and whoever asks during one waits
for the next, which starts after the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import resource
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

from ironsync.config import Config, Storage
from ironsync.ignore import IgnoreRules
from ironsync.model import DIR, FILE, SYMLINK
from ironsync.protocol import (
    MAX_INDEX_PAGE_ENTRIES,
    GetIndex,
    GetStorageHashes,
    IndexPage,
    Reply,
    StorageHashes,
    SyncRequest,
    SyncResult,
)
from ironsync.reconcile import (
    FileState,
    LocalAction,
    Plan,
    ResolvedFile,
    VersionVector,
    reconcile,
)
from ironsync.scan import KnownStat, Stat
from ironsync.store import Database, index, open_database, peers
from ironsync.store import events as ev
from ironsync.store.chunks import holds_content
from ironsync.sync import entries
from ironsync.sync.blocking import in_thread
from ironsync.sync.coalesce import Coalescer
from ironsync.sync.commit import Committer, Switchable, flush
from ironsync.sync.link import PeerError, PeerLink
from ironsync.sync.local import StorageUnavailable, entry_detail, rescan_paths, scan_storage
from ironsync.sync.paths import (
    NotStorable,
    UnsafePath,
    check_peer_path,
    check_storable,
    name_refused,
    resolve_inside,
)
from ironsync.sync.transfer import (
    IO_ERROR,
    NOT_STORABLE,
    SMALL_BATCH_BYTES,
    SMALL_BATCH_FILES,
    SMALL_FILE_BYTES,
    WHOLE_NEW_FILE_BYTES,
    SmallPull,
    TransferResult,
    pull_file,
    pull_small_files,
)
from ironsync.sync.versions import keep_version

log = logging.getLogger(__name__)

MAX_ROUNDS = 6
PULL_CONCURRENCY = 64
"""Files in flight at most during one pull pass: small files are latency-bound (two round
trips, a write, two fsyncs and a transaction each), so many overlap."""
OPEN_FILES_MAX = 256
"""Files that pulls hold open at once, engine-wide: each holds its temp file and its folder
(and a chunk pull the local files it copies from), so a first sync of many small files stays
well under the usual limit of 1024 descriptors; fewer when this process's limit is lower
(`_open_files_allowed`)."""
PULL_BUDGET_BYTES = 48 * 1024 * 1024
"""... and the bytes those files may hold in flight (see PULL_CHARGE_MAX)."""
PULL_CHARGE_MAX = 16 * 1024 * 1024
"""A pull holds at most this much received data at once (transfer.REQUESTS_IN_FLIGHT x
transfer.BATCH_MAX_BYTES); a smaller file, its size."""
PULL_CHARGE_MIN = 64 * 1024
"""What any pull counts besides its data (buffers, the chunk list window, the temp file)."""
DECIDE_BATCH = 256
"""Paths a pass decides under one hold of `apply_lock` (`_decide_all`)."""
CREATE_BATCH = 128
"""Folders and links a pass makes, then flushes and records together (`_create_entries`)."""
PULL_WINDOW = 4096
"""Files a pass decides again and fetches at a time (`_decided_again`)."""
PLACEHOLDER_ID = 1  # the session stamps the real request id


class PendingPull(NamedTuple):
    """A pull decided under `apply_lock` and run later without it: what the decision saw."""

    path: str
    target: ResolvedFile
    decided: index.FileRow | None  # the local row then
    expected: KnownStat | None  # the local file then


class PeerViolation(Exception):
    """The peer sent something it must not (an unsafe path, a malformed version): disconnect."""

    def __init__(self, peer: str, reason: str) -> None:
        self.peer = peer
        self.reason = reason
        super().__init__(f"peer {peer}: {reason}")


@dataclass
class PullReport:
    """What one pull pass from a peer did."""

    changed: int = 0  # paths whose local row changed
    pulled: int = 0
    bytes_from_peer: int = 0
    bytes_reused: int = 0
    deleted: int = 0
    conflicts: int = 0
    ignored: int = 0
    made_here: int = 0  # new local versions a pass made (folders kept): news for the peer
    failed: list[tuple[str, str]] = field(default_factory=list)  # (storage:path, reason)
    # (storage, path, reason): names this node cannot store (paths.NotStorable), left out
    # of this pass and reported; the rest of the storage syncs (issue 11)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, other: PullReport) -> None:
        for name in ("changed", "pulled", "bytes_from_peer", "bytes_reused", "deleted"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.conflicts += other.conflicts
        self.ignored += other.ignored
        self.made_here += other.made_here
        self.failed += other.failed
        self.skipped += [item for item in other.skipped if item not in self.skipped]

    def to_json(self) -> str:
        return json.dumps(
            {
                "changed": self.changed,
                "pulled": self.pulled,
                "bytes_from_peer": self.bytes_from_peer,
                "deleted": self.deleted,
                "conflicts": self.conflicts,
                "ignored": self.ignored,
                "failed": len(self.failed),
                "skipped": len(self.skipped),
            },
            sort_keys=True,
        )


@dataclass
class SyncOutcome:
    peer: str
    converged: bool
    rounds: int
    pulled: PullReport
    peer_changed: int = 0
    peer_skipped: int = 0  # paths the peer could not store when it pulled from us
    divergent: list[str] = field(default_factory=list)  # storages still differing
    error: str | None = None
    violation: str | None = None  # what the peer sent that no honest node does


class _Budget:
    """An amount shared by tasks (bytes, open files): `taken(n)` waits until n are free (at
    most all of them) and gives them back at the end, or earlier through the lease it yields
    (`release`, which needs no await)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.free = total
        self._waiting: list[tuple[int, asyncio.Future[None]]] = []

    @contextlib.asynccontextmanager
    async def taken(self, amount: int) -> AsyncIterator[_Lease]:
        amount = min(amount, self.total)
        if amount and (self._waiting or self.free < amount):  # in turn: none is starved
            waiter = asyncio.get_running_loop().create_future()
            self._waiting.append((amount, waiter))
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():  # granted as it was cancelled
                    self.give_back(amount)
                else:  # out of line (unless `_wake` took it out already), and the next may fit
                    with contextlib.suppress(ValueError):
                        self._waiting.remove((amount, waiter))
                    self._wake()
                raise
        else:
            self.free -= amount
        lease = _Lease(self, amount)
        try:
            yield lease
        finally:
            lease.release()

    def give_back(self, amount: int) -> None:
        self.free += amount
        self._wake()

    def _wake(self) -> None:
        while self._waiting:
            amount, waiter = self._waiting[0]
            if waiter.cancelled():  # its task was cancelled and has not run since
                self._waiting.pop(0)
                continue
            if amount > self.free:
                return
            self._waiting.pop(0)
            self.free -= amount
            waiter.set_result(None)


class _Lease:
    """What one `_Budget.taken` holds; `release` gives it back (once)."""

    def __init__(self, budget: _Budget, amount: int) -> None:
        self._budget = budget
        self._amount = amount

    def release(self) -> None:
        amount, self._amount = self._amount, 0
        if amount:
            self._budget.give_back(amount)


def _report_refused(
    report: PullReport, storage: Storage, path: str, exc: NotStorable | UnsafePath | OSError
) -> None:
    """A path the disk refused while a pull was accounted: skipped (a name this node cannot
    store) or failed."""
    if isinstance(exc, NotStorable):
        report.skipped.append((storage.name, path, exc.reason))
    else:
        reason = exc.reason if isinstance(exc, UnsafePath) else str(exc)
        report.failed.append((f"{storage.name}:{path}", reason))


def _open_files_allowed() -> int:
    """OPEN_FILES_MAX, or a third of the descriptors this process may open beyond 128 (the
    database, sockets, the watcher), at least 8."""
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return OPEN_FILES_MAX
    if soft == resource.RLIM_INFINITY:
        return OPEN_FILES_MAX
    return max(8, min(OPEN_FILES_MAX, (soft - 128) // 3))


class SyncProgress:
    """Progress callbacks of a sync (the default does nothing)."""

    def file_done(self, storage: str, path: str, nbytes: int) -> None:
        pass


class SyncEngine:
    """Full syncs and pull passes for one node. One per process; safe to share between peers."""

    def __init__(
        self,
        db: Database,
        config: Config,
        *,
        progress: SyncProgress | None = None,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self.db = db
        self.config = config
        # storage -> (path, reason) of the files its last full scan could not read, or whose
        # name is not valid UTF-8 (shown escaped): not synced, and not deletions either (a
        # sync reports them and exits 4)
        self.unreadable: dict[str, list[tuple[str, str]]] = {}
        self.node_id = config.node_id
        self.progress = progress or SyncProgress()
        self.clock = clock
        # Local changes one at a time; never held while waiting on a peer (module docstring).
        self.apply_lock = asyncio.Lock()
        # pulled files switch in groups; their checks read the group's rows at once
        self.committer = Committer(db, self.apply_lock, self._rows_for_checks)
        self._rows_checked: dict[tuple[int, str], index.FileRow | None] | None = None
        self._files: tuple[asyncio.AbstractEventLoop, _Budget] | None = None
        self._scans: Coalescer[list[str]] = Coalescer(self._scan_job)
        # (peer, storage) -> {path: reason} skipped in the last pass: logged when new
        self._skipped_logged: dict[tuple[str, str], dict[str, str]] = {}
        # (storage id, path) of every pull in progress, whichever pass runs it
        self._pulls_in_flight: dict[tuple[int, str], asyncio.Event] = {}

    # --- the loop --------------------------------------------------------------------------

    def storages_for(self, names: tuple[str, ...] | list[str] | None) -> list[Storage]:
        return [s for s in self.config.storages if not names or s.name in names]

    def scan(
        self, names: tuple[str, ...] | list[str] | None = None, *, db: Database | None = None
    ) -> list[str]:
        """Scan the given storages (all by default), here and now, through `db` (default: the
        engine's); returns those that could not be. See `scan_fresh` for the event loop."""
        db = self.db if db is None else db
        unavailable = []
        for storage in self.storages_for(names):
            try:
                # each change is in the events table: the report counts them (a first scan
                # of 1,000,000 files would hold as many)
                report = scan_storage(
                    db, self.node_id, storage, clock=self.clock, keep_changes=False
                )
                self.unreadable[storage.name] = report.unreadable + report.bad_names
            except StorageUnavailable as exc:
                unavailable.append(storage.name)
                with db.atomic():
                    ev.append_event(
                        db, "error", storage=storage.name, status="error",
                        detail={"reason": exc.reason},
                    )  # fmt: skip
        return unavailable

    async def scan_fresh(self) -> list[str]:
        """Scan every storage, off the event loop, and return once a scan that started after
        this call has ended (coalesced: see the module docstring); returns the storages that
        could not be scanned."""
        return list(await self._scans.run())

    async def _scan_job(self) -> list[str]:
        async with self.apply_lock:
            return await in_thread(self._scan_with_own_connection)

    def _scan_with_own_connection(self) -> list[str]:
        # An apsw connection must not be shared between threads mid-transaction.
        db = open_database(self.db.path, migrate=False)
        try:
            return self.scan(db=db)
        finally:
            db.close()

    async def aclose(self) -> None:
        """Stop a scan in progress (waiting for its thread to end)."""
        await self._scans.aclose()

    def our_hashes(self, names: list[str]) -> dict[str, bytes]:
        result = {}
        for name in names:
            row = index.get_storage(self.db, name)
            if row is not None:
                result[name] = index.storage_hash(self.db, row.id)
        return result

    async def full_sync(
        self, link: PeerLink, names: tuple[str, ...] | None = None, *, scan: bool = True
    ) -> SyncOutcome:
        """Sync with one peer until our storage hashes match, or nothing more can change."""
        peer = link.peer_id
        wanted = [s.name for s in self.storages_for(names)]
        outcome = SyncOutcome(peer, converged=False, rounds=0, pulled=PullReport())
        with self.db.atomic():
            ev.append_event(self.db, "sync_started", peer=peer, detail={"storages": wanted})
        # The peer's rescan (asked for with the first storage hashes) runs while we scan.
        first = asyncio.ensure_future(
            link.request(
                GetStorageHashes(
                    rescan=True, hashes=self.our_hashes(wanted), request_id=PLACEHOLDER_ID
                )
            )
        )
        try:
            unavailable = [n for n in await self.scan_fresh() if n in wanted] if scan else []
        except BaseException:
            first.cancel()
            await asyncio.gather(first, return_exceptions=True)
            raise
        wanted = [n for n in wanted if n not in unavailable]
        try:
            for round_no in range(1, MAX_ROUNDS + 1):
                outcome.rounds = round_no
                if round_no == 1:
                    divergent = self._divergent(wanted, await first)
                else:
                    divergent = await self.divergent_storages(link, wanted)
                outcome.divergent = divergent
                if not divergent:
                    outcome.converged = not unavailable
                    break
                pulled = await self.pull_from(link, divergent)
                outcome.pulled.add(pulled)
                reply = await link.request(
                    SyncRequest(storages=tuple(divergent), request_id=PLACEHOLDER_ID)
                )
                assert isinstance(reply, SyncResult)
                theirs = _result_counts(reply)
                outcome.peer_changed += theirs.get("changed", 0)
                outcome.peer_skipped = theirs.get("skipped", 0)
                if pulled.changed == 0 and theirs.get("changed", 0) == 0:
                    # Nothing more will move: what differs is ignored on one side, a name one
                    # side cannot store (reported), or failing.
                    still = await self.divergent_storages(link, wanted)
                    outcome.divergent = still
                    failed = pulled.failed or theirs.get("failed", 0) or not reply.ok
                    left_out = pulled.ignored + len(pulled.skipped) + theirs.get("ignored", 0)
                    left_out += theirs.get("skipped", 0)
                    outcome.converged = (
                        not failed and not unavailable and (not still or left_out > 0)
                    )
                    break
        except (PeerError, PeerViolation) as exc:
            outcome.error = str(exc)
            if isinstance(exc, PeerViolation):
                outcome.violation = exc.reason
        if unavailable and outcome.error is None:
            outcome.error = f"storage(s) not scanned: {', '.join(unavailable)}"
        with self.db.atomic():
            if outcome.converged:
                rows = [index.get_storage(self.db, name) for name in wanted]
                peers.mark_peer_synced(self.db, peer, [r.id for r in rows if r is not None])
            ev.append_event(
                self.db,
                "sync_finished",
                peer=peer,
                status="ok" if outcome.converged else "error",
                detail={
                    "converged": outcome.converged,
                    "rounds": outcome.rounds,
                    "pulled": outcome.pulled.pulled,
                    "bytes_from_peer": outcome.pulled.bytes_from_peer,
                    "peer_changed": outcome.peer_changed,
                    "divergent": outcome.divergent,
                    "failed": len(outcome.pulled.failed),
                    **({"error": outcome.error} if outcome.error else {}),
                },
            )
        return outcome

    async def divergent_storages(self, link: PeerLink, wanted: list[str]) -> list[str]:
        """The storages of `wanted` whose hash the peer says differs from ours, now."""
        ours = self.our_hashes(wanted)
        reply = await link.request(GetStorageHashes(hashes=ours, request_id=PLACEHOLDER_ID))
        return self._divergent(wanted, reply, ours)

    def _divergent(
        self, wanted: list[str], reply: Reply, ours: dict[str, bytes] | None = None
    ) -> list[str]:
        """The storages of `wanted` whose hash in the peer's StorageHashes differs from ours
        (`ours`: as computed now, by default)."""
        assert isinstance(reply, StorageHashes)
        ours = self.our_hashes(wanted) if ours is None else ours
        return [
            name
            for name in wanted
            if name in reply.hashes and name in ours and reply.hashes[name] != ours[name]
        ]

    # --- one pull pass -----------------------------------------------------------------------

    async def pull_from(self, link: PeerLink, names: list[str] | tuple[str, ...]) -> PullReport:
        """Fetch the peer's index for `names` and apply every decision that is ours to make.
        Passes may run at once (a notice's, a SyncRequest's, another session's): a path is
        pulled by one of them at a time (`_pull_many`)."""
        report = PullReport()
        hashes_reply = await link.request(GetStorageHashes(request_id=PLACEHOLDER_ID))
        assert isinstance(hashes_reply, StorageHashes)
        for storage in self.storages_for(list(names)):
            their_hash = hashes_reply.hashes.get(storage.name)
            if their_hash is None:
                continue  # an alias the peer lacks
            row = index.ensure_storage(self.db, storage.name, storage.root)
            # Only this peer's rows change here: no lock while the peer answers.
            await self.fetch_index(link, row, their_hash)
            applied = await self.apply_storage(link, storage, row)
            self._log_skipped(link.peer_id, storage.name, applied.skipped)
            report.add(applied)
        return report

    def _log_skipped(self, peer: str, storage: str, skipped: list[tuple[str, str, str]]) -> None:
        """A `skipped` event for each path a pass from `peer` left out, unless the pass before
        left it out for the same reason: once, not at every pass, while it stays so."""
        now = {path: reason for _, path, reason in skipped}
        before = self._skipped_logged.get((peer, storage), {})
        self._skipped_logged[(peer, storage)] = now
        new = [(path, reason) for path, reason in now.items() if before.get(path) != reason]
        if not new:
            return
        with self.db.atomic():
            for path, reason in new:
                ev.append_event(
                    self.db, "skipped", storage=storage, path=path, status="warning", peer=peer,
                    detail={"reason": reason},
                )  # fmt: skip

    async def fetch_index(self, link: PeerLink, row: index.StorageRow, their_hash: bytes) -> None:
        """Bring our copy of the peer's index of one storage up to date (changes since N)."""
        peer = link.peer_id
        for attempt in range(2):
            since = peers.last_sequence(self.db, peer, row.id)
            last = since
            more = True
            while more:
                more = False
                async for page in link.stream(
                    GetIndex(row.name, last, MAX_INDEX_PAGE_ENTRIES, request_id=PLACEHOLDER_ID)
                ):
                    assert isinstance(page, IndexPage)
                    entries = [self._peer_row(peer, e) for e in page.entries]
                    with self.db.atomic():
                        peers.store_peer_files(self.db, row.id, entries)
                        last = max([last, page.last_sequence, *(e.sequence for e in entries)])
                        peers.record_peer_storage(
                            self.db, peer, row.id, last_seq=last, storage_hash=their_hash
                        )
            if peers.peer_storage_hash(self.db, peer, row.id) == their_hash or attempt == 1:
                return
            if since == 0:
                return  # changed while we read it; the next round catches up
            log.info("peer %s: index of '%s' out of step; fetching it whole", peer, row.name)
            with self.db.atomic():
                peers.forget_peer_storage(self.db, peer, row.id)

    def _peer_row(self, peer: str, entry: object) -> peers.PeerFileRow:
        e = entry  # an IndexEntry, validated by the protocol layer
        try:
            path = check_peer_path(e.path)  # type: ignore[attr-defined]
            version = VersionVector.from_json(e.version).to_json()  # type: ignore[attr-defined]
        except UnsafePath as exc:
            raise PeerViolation(peer, f"unsafe path {exc.path!r}: {exc.reason}") from None
        except ValueError as exc:
            raise PeerViolation(peer, f"malformed version: {exc}") from None
        deleted = bool(e.deleted)  # type: ignore[attr-defined]
        return peers.PeerFileRow(
            peer=peer,
            path=path,
            size=0 if deleted else e.size,  # type: ignore[attr-defined]
            mtime_ns=0 if deleted else e.mtime_ns,  # type: ignore[attr-defined]
            mode=0 if deleted else e.mode,  # type: ignore[attr-defined]
            hash=None if deleted else e.hash,  # type: ignore[attr-defined]
            deleted=deleted,
            version=version,
            modified_by=e.modified_by,  # type: ignore[attr-defined]
            sequence=e.sequence,  # type: ignore[attr-defined]
            kind=e.kind,  # type: ignore[attr-defined]
            target=None if deleted else e.target,  # type: ignore[attr-defined]
        )

    async def apply_storage(
        self, link: PeerLink, storage: Storage, row: index.StorageRow
    ) -> PullReport:
        """Decide every path where the peer's index and ours differ, then act, in an order
        that keeps the tree valid at every step (folders before what they hold, what stands in
        the way of a new entry before it, contents before their folder):

        1. decisions (and what needs no order: versions, metadata, conflict copies);
        2. deletions under a path that becomes a file or a link, innermost first;
        3. folders and links to make, outermost first;
        4. files: moved here from a path this pass deletes, else pulled, several at a time;
        5. the other deletions, innermost first (last: a file moved on the peer arrives as a
           new path whose content is still here, in the file its deletion is about to remove);
        6. the mtimes of the folders touched, innermost first (best effort).
        """
        report = PullReport()
        paths = peers.divergent_paths(self.db, link.peer_id, row.id)
        step = _Step(IgnoreRules.load(storage.root))
        await self._decide_all(link, storage, row, paths, report, step)
        late = []
        for path in sorted(step.deferred, reverse=True):  # innermost first
            if _under_any(path, step.replaced):
                await self._apply_guarded(link, storage, row, path, report, None)
            else:
                late.append(path)
        creates = sorted(step.creates, key=lambda p: p.path)  # outermost first

        def failed(path: str, exc: Exception) -> None:
            self._report_failure(link, storage, path, report, exc)

        for start in range(0, len(creates), CREATE_BATCH):
            batch = creates[start : start + CREATE_BATCH]
            await self._create_entries(link, storage, row, batch, report, failed)
        moved_away: set[str] = set()
        sources: dict[bytes, list[str]] = {}  # content hash -> paths of `late` that held it
        if late and step.pulls:
            for path, local in index.get_files(self.db, row.id, late).items():
                if local.kind == FILE and local.hash is not None:
                    sources.setdefault(local.hash, []).append(path)
        for start in range(0, len(step.pulls), PULL_WINDOW):
            remaining = []
            async with self.apply_lock:
                window = step.pulls[start : start + PULL_WINDOW]
                for pull in self._decided_again(link, storage, row, window, report):
                    if self._move_locally(link, storage, row, pull, sources, moved_away):
                        report.changed += 1
                    else:
                        remaining.append(pull)
            await self._pull_many(link, storage, row, remaining, report)
        for path in late:
            if path in moved_away:
                async with self.apply_lock:
                    self._record_moved_away(link, row, path)
                continue
            await self._apply_guarded(link, storage, row, path, report, None)
        report.ignored += step.ignored
        touched = {folder for path in paths for folder in _folders_of(path)}
        touched.update(p.path for p in step.creates if p.target.kind == DIR)
        self._set_folder_times(storage, row, touched)
        return report

    def _set_folder_times(self, storage: Storage, row: index.StorageRow, folders: set[str]) -> None:
        """Folders whose contents a pass changed get their indexed mtimes back."""
        if not folders:
            return
        rows = index.get_files(self.db, row.id, sorted(folders))
        entries.set_folder_times(
            storage.root,
            [(p, r.mode, r.mtime_ns) for p, r in rows.items() if r.kind == DIR and not r.deleted],
        )

    async def _pull_many(
        self,
        link: PeerLink,
        storage: Storage,
        row: index.StorageRow,
        pulls: list[PendingPull],
        report: PullReport,
    ) -> None:
        """Pull several files at once: round trips, writes and fsyncs overlap. Small files
        (transfer.SMALL_FILE_BYTES, and new ones up to WHOLE_NEW_FILE_BYTES: `_whole`) go
        whole in batches, many per request (`_pull_batch`); larger ones one by one. At most
        PULL_CONCURRENCY batches or files are in flight, and PULL_BUDGET_BYTES of what they
        may hold (a file counts its size, at most PULL_CHARGE_MAX: what a pull keeps in
        flight)."""
        budget = _Budget(PULL_BUDGET_BYTES)
        jobs: list[tuple[bool, list[PendingPull]]] = []  # (whole, its files)
        batch: list[PendingPull] = []
        batch_bytes = 0
        for pull in pulls:
            size = pull.target.size
            if not self._whole(pull):
                jobs.append((False, [pull]))
                continue
            if batch and (
                len(batch) >= SMALL_BATCH_FILES or batch_bytes + size > SMALL_BATCH_BYTES
            ):
                jobs.append((True, batch))
                batch, batch_bytes = [], 0
            batch.append(pull)
            batch_bytes += size
        if batch:
            jobs.append((True, batch))
        queue = iter(jobs)  # shared by the workers: each takes the next job

        async def worker() -> None:
            for whole, job in queue:
                mine: list[PendingPull] = []
                others: list[asyncio.Event] = []
                for pull in job:
                    other = self._pulls_in_flight.get((row.id, pull.path))
                    if other is not None:
                        # another pass (through another session with a peer) is pulling this
                        # path now: one write at a time; wait for it, and decide again next
                        # round
                        others.append(other)
                    else:
                        mine.append(pull)
                        self._pulls_in_flight[(row.id, pull.path)] = asyncio.Event()
                charge = sum(min(p.target.size, PULL_CHARGE_MAX) for p in mine) + PULL_CHARGE_MIN
                try:
                    async with self._open_files().taken(len(mine)), budget.taken(charge) as data:
                        # the data's share goes back once the temp files are written: the next
                        # files come in while these wait for their group's flush
                        if mine and not whole:
                            await self._pull_one(link, storage, row, mine[0], report, data.release)
                        elif mine:
                            await self._pull_batch(link, storage, row, mine, report, data.release)
                finally:
                    for pull in mine:
                        self._pulls_in_flight.pop((row.id, pull.path)).set()
                for other in others:
                    await other.wait()
                    report.changed += 1

        group = self.committer
        before = (group.groups, group.switched, group.flush_seconds)
        tasks = [asyncio.create_task(worker()) for _ in range(min(PULL_CONCURRENCY, len(jobs)))]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        log.debug(
            "'%s' from %s: %d jobs; %d files switched in %d groups (largest so far %d), "
            "%.3f s flushing",
            storage.name, link.peer_id, len(jobs), group.switched - before[1],
            group.groups - before[0], group.largest, group.flush_seconds - before[2],
        )  # fmt: skip

    def _open_files(self) -> _Budget:
        """The files pulls may hold open, shared by every pass on this event loop."""
        loop = asyncio.get_running_loop()
        if self._files is None or self._files[0] is not loop:
            self._files = (loop, _Budget(_open_files_allowed()))
        return self._files[1]

    def _whole(self, pull: PendingPull) -> bool:
        """Whether `pull` goes whole, in a batch (transfer.pull_small_files), rather than
        chunk by chunk."""
        size, file_hash = pull.target.size, pull.target.hash
        if size <= SMALL_FILE_BYTES:
            return True
        return (
            size <= WHOLE_NEW_FILE_BYTES
            and pull.expected is None
            and file_hash is not None
            and not holds_content(self.db, file_hash)
        )

    async def _pull_one(
        self,
        link: PeerLink,
        storage: Storage,
        row: index.StorageRow,
        pull: PendingPull,
        report: PullReport,
        on_written: Callable[[], None] | None = None,
    ) -> None:
        try:
            await self._pull(
                link, storage, row, pull.target, pull.path, report, pull.decided, pull.expected,
                on_written,
            )  # fmt: skip
        except (NotStorable, UnsafePath, OSError) as exc:
            _report_refused(report, storage, pull.path, exc)

    async def _pull_batch(
        self,
        link: PeerLink,
        storage: Storage,
        row: index.StorageRow,
        pulls: list[PendingPull],
        report: PullReport,
        on_written: Callable[[], None] | None = None,
    ) -> None:
        """`_pull` for many small files: one request for all of them
        (transfer.pull_small_files), each switched into place as `_pull` does it."""
        checks = [
            self._still_as_decided(link, storage, row, p.target, p.path, report, p.decided)
            for p in pulls
        ]
        smalls = [
            SmallPull(p.target, p.path, p.expected, check)
            for p, (check, _) in zip(pulls, checks, strict=True)
        ]
        results = await pull_small_files(
            self.db, link, row, smalls, committer=self.committer, now_ns=self.clock,
            keep_versions=self.config.keep_versions_days > 0, on_written=on_written,
        )  # fmt: skip
        for pull, result, (_, kept) in zip(pulls, results, checks, strict=True):
            try:
                await self._account(storage, pull.target, pull.path, result, report, kept)
            except (NotStorable, UnsafePath, OSError) as exc:
                _report_refused(report, storage, pull.path, exc)

    def _move_locally(
        self,
        link: PeerLink,
        storage: Storage,
        row: index.StorageRow,
        pull: PendingPull,
        sources: dict[bytes, list[str]],
        moved_away: set[str],
    ) -> bool:
        """A file the peer moved: its content is here, at a path this pass deletes. Move it
        (a rename on this disk: no bytes read or sent) instead of rebuilding it. `sources`:
        the paths this pass deletes by the content their rows held when the pass decided
        (each one's row and file are checked again here); `pull` was decided again under the
        lock held now: its `expected` is what our index says of `pull.path` now."""
        dest, target = pull.path, pull.target
        if target.kind != FILE or target.hash is None or pull.expected is not None:
            return False
        for source in sources.get(target.hash, ()):
            if source in moved_away:
                continue
            local = index.get_file(self.db, row.id, source)
            known = index.known_stat(self.db, row.id, source)
            if local is None or known is None or local.kind != FILE or local.hash != target.hash:
                continue
            src = resolve_inside(storage.root, source)
            dst = resolve_inside(storage.root, dest)
            if not _disk_matches(src, known.stat) or os.path.lexists(dst):
                continue
            try:
                check_storable(storage.root, dest)  # not into a folder spelled otherwise
            except (NotStorable, UnsafePath, OSError):
                return False  # the pull says why
            dst.parent.mkdir(parents=True, exist_ok=True)
            resolve_inside(storage.root, dest)  # the folders just made hold no symlink
            os.link(src, dst, follow_symlinks=False)  # refuses to replace a file that appeared
            os.unlink(src)
            os.chmod(dst, target.mode, follow_symlinks=False)
            os.utime(dst, ns=(target.mtime_ns, target.mtime_ns), follow_symlinks=False)
            with self.db.atomic():
                index.put_live_file(
                    self.db, row.id, dest, Stat.of(os.lstat(dst)), target.hash,
                    index.chunks_of(self.db, local.id), version=target.version.to_json(),
                    modified_by=target.modified_by, indexed_at_ns=self.clock(),
                )  # fmt: skip
                ev.append_event(
                    self.db, "moved", storage=storage.name, path=dest, peer=link.peer_id,
                    detail={"from": source, "size": target.size, "hash": target.hash.hex()},
                )  # fmt: skip
            moved_away.add(source)
            self.progress.file_done(storage.name, dest, 0)
            return True
        return False

    def _record_moved_away(self, link: PeerLink, row: index.StorageRow, path: str) -> None:
        """The deletion of a path whose file was moved: record the peer's tombstone."""
        remote = peers.get_peer_file(self.db, link.peer_id, row.id, path)
        local = index.get_file(self.db, row.id, path)
        if remote is None or local is None:
            return
        plan = reconcile(_state(self.node_id, local), [_peer_state(remote)], self.node_id)
        with self.db.atomic():
            index.put_tombstone(
                self.db, row.id, path, version=plan.target.version.to_json(),
                modified_by=plan.target.modified_by,
            )  # fmt: skip

    async def _apply_guarded(
        self,
        link: PeerLink,
        storage: Storage,
        row: index.StorageRow,
        path: str,
        report: PullReport,
        step: _Step | None,
    ) -> None:
        await self._guarded(
            link, storage, path, report, self.apply_path(link, storage, row, path, report, step)
        )

    async def _guarded(
        self,
        link: PeerLink,
        storage: Storage,
        path: str,
        report: PullReport,
        action: Awaitable[None],
    ) -> None:
        """Run one path's `action`; what goes wrong with that path is reported for it alone."""
        try:
            await action
        except Exception as exc:
            self._report_failure(link, storage, path, report, exc)

    def _report_failure(
        self, link: PeerLink, storage: Storage, path: str, report: PullReport, exc: Exception
    ) -> None:
        """Report what went wrong with one path for it alone; raise what is not about it."""
        if isinstance(exc, PeerError | PeerViolation):
            raise exc
        if isinstance(exc, NotStorable):
            report.skipped.append((storage.name, path, exc.reason))
        elif isinstance(exc, UnsafePath):
            report.failed.append((f"{storage.name}:{path}", f"unsafe: {exc.reason}"))
        elif isinstance(exc, OSError):
            refused = name_refused(path, exc)  # a conflict copy's name too long here, say
            if refused is not None:
                report.skipped.append((storage.name, path, refused.reason))
                return
            report.failed.append((f"{storage.name}:{path}", exc.strerror or str(exc)))
            name = errno.errorcode.get(exc.errno or 0, "")
            reason = f"{name}: {exc.strerror}" if name and exc.strerror else str(exc)
            with self.db.atomic():
                ev.append_event(
                    self.db, "write_failed", storage=storage.name, path=path,
                    status="error", peer=link.peer_id,
                    detail={"reason": reason, "code": IO_ERROR},
                )  # fmt: skip
        else:
            raise exc

    async def _decide_all(
        self,
        link: PeerLink,
        storage: Storage,
        row: index.StorageRow,
        paths: list[str],
        report: PullReport,
        step: _Step,
    ) -> None:
        """`apply_path` with `step` for every path of a pass, DECIDE_BATCH paths at a time:
        their rows read with two queries, and each one decided under one hold of
        `apply_lock` (a query of its own per path costs a read transaction: most of the
        decisions' time for 20,000 new files). What needs more than a decision and a place in
        `step` (a conflict, an action here) goes through `apply_path` once the lock is free."""
        for start in range(0, len(paths), DECIDE_BATCH):
            part = paths[start : start + DECIDE_BATCH]
            more: list[str] = []
            async with self.apply_lock:
                local_rows, remote_rows = self._rows_of(link, row, part)
                for path in part:
                    local = local_rows.get(path)
                    plan = self._decide(storage, step, local, remote_rows.get(path))
                    if plan is not None and not _put_in_step(
                        step, plan, local, self._known_stat(row, path), link.peer_id
                    ):
                        more.append(path)
            for path in more:
                await self._apply_guarded(link, storage, row, path, report, step)

    def _decided_again(
        self,
        link: PeerLink,
        storage: Storage,
        row: index.StorageRow,
        paths: list[str],
        report: PullReport,
    ) -> list[PendingPull]:
        """The pulls of `paths`, decided again from their rows (`apply_lock` held): a pass
        keeps only the paths of the files it will fetch, and fetches them PULL_WINDOW at a
        time, so its memory does not grow with their number (a decision holds a version vector
        and a row: ~1 KiB). A path that is no longer a plain pull from this peer changed since
        the first decision: the next round decides it."""
        local_rows, remote_rows = self._rows_of(link, row, paths)
        known = index.known_stats_of(self.db, row.id, paths)
        pulls = []
        for path in paths:
            local = local_rows.get(path)
            plan = self._decide(storage, None, local, remote_rows.get(path))
            if (
                plan is None
                or plan.local_action is not LocalAction.PULL
                or plan.conflict_copies
                or plan.target.kind != FILE
                or link.peer_id not in plan.target.sources
            ):
                report.changed += 1
                continue
            pulls.append(PendingPull(path, plan.target, local, known.get(path)))
        return pulls

    def _rows_of(
        self, link: PeerLink, row: index.StorageRow, paths: list[str]
    ) -> tuple[dict[str, index.FileRow], dict[str, peers.PeerFileRow]]:
        """Our rows and the peer's rows of `paths` (two queries per 500 paths)."""
        return (
            index.get_files(self.db, row.id, paths),
            peers.get_peer_files(self.db, link.peer_id, row.id, paths),
        )

    def _known_stat(self, row: index.StorageRow, path: str) -> Callable[[], KnownStat | None]:
        """The stat our index knows of `path`, read when asked: a pass needs it for what it
        makes now, and reads it again for a file when its window comes."""
        return lambda: index.known_stat(self.db, row.id, path)

    def _decide(
        self,
        storage: Storage,
        step: _Step | None,
        local: index.FileRow | None,
        remote: peers.PeerFileRow | None,
    ) -> Plan | None:
        """The plan for one path from its two rows; None when there is nothing to do here
        (only we have it: the peer pulls it when we send SyncRequest; the pass ignores it;
        the versions agree)."""
        if remote is None:
            return None
        if step is not None and step.ignores(storage, local, remote):
            return None
        local_state = None if local is None else _state(self.node_id, local)
        plan = reconcile(local_state, [_peer_state(remote)], self.node_id)
        if plan.local_action is LocalAction.NOTHING and not plan.conflict_copies:
            return None
        return plan

    async def apply_path(
        self,
        link: PeerLink,
        storage: Storage,
        row: index.StorageRow,
        path: str,
        report: PullReport,
        step: _Step | None = None,
    ) -> None:
        """Decide one path and act. With `step` (a pass over a storage, `apply_storage`), a
        deletion, a plain pull and the making of a folder or link are put there for later.

        The decision and every local action hold `apply_lock`; pulls do not (the switch of a
        pulled file takes it again): see the module docstring."""
        peer = link.peer_id
        async with self.apply_lock:
            local = index.get_file(self.db, row.id, path)
            remote = peers.get_peer_file(self.db, peer, row.id, path)
            plan = self._decide(storage, step, local, remote)
            if plan is None:
                return
            expected = index.known_stat(self.db, row.id, path)
            if step is not None and _put_in_step(step, plan, local, lambda: expected, peer):
                return
            if plan.is_conflict:
                report.conflicts += 1
                with self.db.atomic():
                    ev.append_event(
                        self.db, "conflict", storage=storage.name, path=path, peer=peer,
                        status="warning",
                        detail={
                            "winner": plan.target.modified_by,
                            "copies": [c.path for c in plan.conflict_copies],
                        },
                    )  # fmt: skip
            # Losing contents first: nothing is replaced before its copy exists.
            for copy in plan.conflict_copies:
                if copy.path == plan.keep_local_as:
                    if not self._keep_local(storage, row, path, copy):
                        report.failed.append((f"{storage.name}:{path}", "cannot keep local copy"))
                        return
                    report.changed += 1
            local = index.get_file(self.db, row.id, path)
        for copy in plan.conflict_copies:
            remote_copy = copy.path != plan.keep_local_as
            if remote_copy and not await self._take_copy(link, storage, row, copy, report):
                return
        await self._apply_target(link, storage, row, plan, report, local, expected)

    async def _apply_target(
        self,
        link: PeerLink,
        storage: Storage,
        row: index.StorageRow,
        plan: Plan,
        report: PullReport,
        decided: index.FileRow | None,
        expected: KnownStat | None,
    ) -> None:
        """Carry out `plan.local_action`, decided when the local row was `decided` and the
        index knew the file as `expected`."""
        target = plan.target
        path = plan.path
        action = plan.local_action
        version = target.version.to_json()
        if action is LocalAction.NOTHING:
            return
        if action in (LocalAction.PULL, LocalAction.KEEP_LOCAL_THEN_PULL):
            if target.kind != FILE:  # made from the row: nothing to fetch
                pending = PendingPull(path, target, decided, expected)
                await self._create_entry(link, storage, row, pending, report)
                return
            if link.peer_id not in target.sources:
                return  # another peer holds it; a later sync with that peer brings it
            await self._pull(link, storage, row, target, path, report, decided, expected)
            return
        async with self.apply_lock:
            if not _same_row(index.get_file(self.db, row.id, path), decided):
                report.changed += 1  # changed while a conflict copy was pulled: next round
                return
            self._apply_local(link, storage, row, plan, report, version)

    def _apply_local(
        self,
        link: PeerLink,
        storage: Storage,
        row: index.StorageRow,
        plan: Plan,
        report: PullReport,
        version: str,
    ) -> None:
        """The actions that need no peer; `apply_lock` is held."""
        target = plan.target
        path = plan.path
        action = plan.local_action
        known = index.known_stat(self.db, row.id, path)
        if action is LocalAction.UPDATE_VERSION_ONLY:
            with self.db.atomic():
                index.adopt_version(
                    self.db, row.id, path, version=version, modified_by=target.modified_by
                )
            report.changed += 1
            return
        if action is LocalAction.RECORD_TOMBSTONE:
            with self.db.atomic():
                index.put_tombstone(
                    self.db, row.id, path, version=version, modified_by=target.modified_by
                )
            report.changed += 1
            return
        local = index.get_file(self.db, row.id, path)
        assert local is not None and not local.deleted
        if not entries.disk_matches(storage.root, path, local, known):
            # The disk changed since the index saw it: index it, decide again next round.
            rescan_paths(self.db, self.node_id, storage, [path])
            report.changed += 1
            return
        full = _entry_inside(storage.root, path)
        if action is LocalAction.UPDATE_METADATA:
            if local.kind != SYMLINK:  # a link's mode means nothing on Linux
                os.chmod(full, target.mode & 0o777, follow_symlinks=False)
            with contextlib.suppress(NotImplementedError):
                os.utime(full, ns=(target.mtime_ns, target.mtime_ns), follow_symlinks=False)
            st = Stat.of(os.lstat(full))
            if local.kind == SYMLINK:
                st = Stat(target.size, st.mtime_ns, st.ctime_ns, st.inode, 0)
            elif local.kind == DIR:  # the row's mtime (the disk's moves with its contents)
                st = Stat(0, target.mtime_ns, st.ctime_ns, st.inode, st.mode)
            with self.db.atomic():
                index.adopt_metadata(
                    self.db, row.id, path, st, version=version,
                    modified_by=target.modified_by, indexed_at_ns=self.clock(),
                )  # fmt: skip
                ev.append_event(
                    self.db, "modified", storage=storage.name, path=path, peer=link.peer_id,
                    detail=_metadata_detail(local, target),
                )  # fmt: skip
            report.changed += 1
        elif action is LocalAction.DELETE_HERE:
            if local.kind == DIR:
                inside = entries.remove_folder(storage.root, path)
                if inside is not None:
                    self._keep_folder(link, storage, row, path, version, target, inside)
                    report.made_here += 1
                    report.changed += 1
                    return
            elif self.config.keep_versions_days > 0:
                keep_version(storage.root, path, move=True)  # a rename: nothing is lost
            else:
                os.unlink(full)
            with self.db.atomic():
                index.put_tombstone(
                    self.db, row.id, path, version=version, modified_by=target.modified_by
                )
                detail = None if local.kind == FILE else {"type": local.kind}
                ev.append_event(
                    self.db, "deleted", storage=storage.name, path=path, peer=link.peer_id,
                    detail=detail,
                )  # fmt: skip
            report.changed += 1
            report.deleted += 1

    def _keep_folder(
        self,
        link: PeerLink,
        storage: Storage,
        row: index.StorageRow,
        path: str,
        version: str,
        target: ResolvedFile,
        inside: list[str],
    ) -> None:
        """A folder whose deletion won, or that stands in the way of a file or link, still
        holds something this node has not synced (its own new files, ignored files): it stays,
        and is recorded as a new local version of the folder, which every peer then takes
        (recreating it) or keeps beside its own change as a conflict: nothing is lost."""
        with self.db.atomic():
            index.put_tombstone(
                self.db, row.id, path, version=version, modified_by=target.modified_by,
                kind=DIR,
            )  # fmt: skip
            rescan_paths(self.db, self.node_id, storage, [path])
            ev.append_event(
                self.db, "kept", storage=storage.name, path=path, peer=link.peer_id,
                status="warning",
                detail={
                    "type": DIR,
                    "reason": "the folder still holds what this node has not synced "
                    "(its own new files, or files .ignore excludes)",
                    "holds": inside,
                },
            )  # fmt: skip

    async def _create_entry(
        self,
        link: PeerLink,
        storage: Storage,
        row: index.StorageRow,
        pending: PendingPull,
        report: PullReport,
    ) -> None:
        """Make the folder or link `pending.target` (`_create_entries`); raises what went
        wrong."""
        await self._create_entries(link, storage, row, [pending], report, None)

    async def _create_entries(
        self,
        link: PeerLink,
        storage: Storage,
        row: index.StorageRow,
        batch: list[PendingPull],
        report: PullReport,
        failed: Callable[[str, Exception], None] | None,
    ) -> None:
        """Make the folders and links of `batch` at their paths (no transfer: the rows hold
        them), in order, each after clearing what stands there if the index still has what
        the decision saw; then one flush makes them durable together, and one transaction
        records them (a first sync of a tree of folders paid an fsync of its parent and a
        transaction per folder, on the event loop). What goes wrong with one path goes to
        `failed` for it alone; without `failed`, it is raised."""
        made: list[tuple[PendingPull, index.FileRow | None, Stat]] = []
        folders: list[int] = []  # the parents of what was made: flushed together
        async with self.apply_lock:
            try:
                for pending in batch:
                    try:
                        local = index.get_file(self.db, row.id, pending.path)
                        stat = self._make_entry(link, storage, row, pending, local, report, folders)
                    except Exception as exc:
                        if failed is None:
                            raise
                        failed(pending.path, exc)
                        continue
                    if stat is not None:
                        made.append((pending, local, stat))
                try:
                    if folders:
                        await in_thread(flush, folders)
                except OSError as exc:
                    if failed is None:
                        raise
                    for pending, _, _ in made:  # none of them is known to be durable
                        failed(pending.path, exc)
                    return
            finally:
                for fd in folders:
                    os.close(fd)
            with self.db.atomic():
                for pending, local, stat in made:
                    target = pending.target
                    index.put_live_file(
                        self.db, row.id, pending.path, stat, target.hash or b"", (),
                        version=target.version.to_json(), modified_by=target.modified_by,
                        indexed_at_ns=self.clock(), kind=target.kind, target=target.target,
                    )  # fmt: skip
                    kind = "created" if local is None or local.deleted else "modified"
                    ev.append_event(
                        self.db, kind, storage=storage.name, path=pending.path,
                        peer=link.peer_id,
                        detail=json.loads(entry_detail(target.kind, target.mode, target.target)),
                    )  # fmt: skip
        for pending, _, _ in made:
            report.changed += 1
            self.progress.file_done(storage.name, pending.path, 0)

    def _make_entry(
        self,
        link: PeerLink,
        storage: Storage,
        row: index.StorageRow,
        pending: PendingPull,
        local: index.FileRow | None,
        report: PullReport,
        folders: list[int],
    ) -> Stat | None:
        """One entry of `_create_entries` (`apply_lock` held): its stat, or None when it was
        not made (the path changed since the decision: the next round decides it again)."""
        path, target = pending.path, pending.target
        if not _same_row(local, pending.decided):
            report.changed += 1  # changed since the decision: decide again next round
            return None
        if local is not None and not local.deleted:
            known = index.known_stat(self.db, row.id, path)
            if not entries.disk_matches(storage.root, path, local, known):
                rescan_paths(self.db, self.node_id, storage, [path])
                report.changed += 1
                return None
            if not (local.kind == DIR == target.kind):
                keep = self.config.keep_versions_days > 0
                inside = entries.clear_way(storage.root, path, local, keep_versions=keep)
                if inside is not None:
                    self._keep_folder(link, storage, row, path, local.version, target, inside)
                    report.made_here += 1
                    report.changed += 1
                    return None
        else:
            check_storable(storage.root, path)  # not a name spelled otherwise here
            if target.kind != DIR and entries.exists(storage.root, path):
                # something the index does not know yet: index it, decide again (a folder
                # there already, made for a pull, is taken as it is)
                rescan_paths(self.db, self.node_id, storage, [path])
                report.changed += 1
                return None
        return entries.make_entry(storage.root, path, target, folders=folders)

    async def _pull(
        self,
        link: PeerLink,
        storage: Storage,
        row: index.StorageRow,
        target: ResolvedFile,
        dest: str,
        report: PullReport,
        decided: index.FileRow | None,
        expected: KnownStat | None,
        on_written: Callable[[], None] | None = None,
    ) -> bool:
        """Pull `target` into `dest` without holding `apply_lock` while the peer answers; the
        switch takes it, and goes ahead only if `dest` is still as decided. A folder or link
        at `dest` is cleared then, under the lock (a folder only if it is empty)."""
        still_as_decided, kept = self._still_as_decided(
            link, storage, row, target, dest, report, decided
        )
        result = await pull_file(
            self.db, link, row, target, dest_path=dest, expected=expected, now_ns=self.clock,
            keep_versions=self.config.keep_versions_days > 0, committer=self.committer,
            still_valid=still_as_decided, on_written=on_written,
        )  # fmt: skip
        return await self._account(storage, target, dest, result, report, kept)

    def _still_as_decided(
        self,
        link: PeerLink,
        storage: Storage,
        row: index.StorageRow,
        target: ResolvedFile,
        dest: str,
        report: PullReport,
        decided: index.FileRow | None,
    ) -> tuple[Callable[[], bool], list[str]]:
        """The check a pull into `dest` makes under the lock before it switches (True: go
        ahead), and the list it adds `dest` to when it kept a folder there instead."""
        kept: list[str] = []

        def still_as_decided() -> bool:
            if not _same_row(self._row_now(row.id, dest), decided):
                return False
            if decided is None or decided.deleted or decided.kind == FILE:
                return True
            self._rows_checked = None  # what follows may write rows
            if not entries.disk_matches(storage.root, dest, decided, None):
                return False
            keep = self.config.keep_versions_days > 0
            inside = entries.clear_way(storage.root, dest, decided, keep_versions=keep)
            if inside is not None:
                self._keep_folder(link, storage, row, dest, decided.version, target, inside)
                report.made_here += 1
                kept.append(dest)
                return False
            return True

        return still_as_decided, kept

    @contextlib.contextmanager
    def _rows_for_checks(self, items: list[Switchable]) -> Iterator[None]:
        """The index rows of a group's paths, read for its checks (`_still_as_decided`) with
        one query per storage and 500 paths, not one per pull. The committer runs the checks
        under `apply_lock` without a pause between them; a check that may write (a folder in
        the way) drops what was read."""
        by_storage: dict[int, list[str]] = {}
        for item in items:
            by_storage.setdefault(item.storage.id, []).append(item.path)
        rows: dict[tuple[int, str], index.FileRow | None] = {}
        for storage_id, paths in by_storage.items():
            found = index.get_files(self.db, storage_id, paths)
            rows.update(((storage_id, path), found.get(path)) for path in paths)
        self._rows_checked = rows
        try:
            yield
        finally:
            self._rows_checked = None

    def _row_now(self, storage_id: int, path: str) -> index.FileRow | None:
        """Our index row of `path`, as `_rows_for_checks` read it if it did."""
        rows = self._rows_checked
        key = (storage_id, path)
        if rows is not None and key in rows:
            return rows[key]
        return index.get_file(self.db, storage_id, path)

    async def _account(
        self,
        storage: Storage,
        target: ResolvedFile,
        dest: str,
        result: TransferResult,
        report: PullReport,
        kept: list[str],
    ) -> bool:
        """Count a pull's result in `report`; a pull abandoned for a local change has the
        path rescanned (the change is indexed, and decided next round)."""
        if result.ok:
            report.changed += 1
            report.pulled += 1
            report.bytes_from_peer += result.bytes_from_peer
            report.bytes_reused += result.bytes_reused
            self.progress.file_done(storage.name, dest, target.size)
            return True
        if result.changed_locally:
            if not kept:
                async with self.apply_lock:
                    rescan_paths(self.db, self.node_id, storage, [dest])
            report.changed += 1
        elif result.code == NOT_STORABLE:
            report.skipped.append((storage.name, dest, result.reason or "cannot be stored here"))
        else:
            report.failed.append((f"{storage.name}:{dest}", result.reason or "failed"))
        return False

    def _keep_local(
        self, storage: Storage, row: index.StorageRow, path: str, copy: ResolvedFile
    ) -> bool:
        """Keep our losing content as its conflict copy: a hard link (no copy of the bytes),
        recorded with the copy's version, before the name takes the winner."""
        local = index.get_file(self.db, row.id, path)
        known = index.known_stat(self.db, row.id, path)
        if local is None or local.deleted or (local.kind, local.hash) != copy.content:
            return False
        src = _entry_inside(storage.root, path)
        dst = resolve_inside(storage.root, copy.path)
        if not entries.disk_matches(storage.root, path, local, known):
            rescan_paths(self.db, self.node_id, storage, [path])
            return False
        if os.path.lexists(dst):
            existing = index.get_file(self.db, row.id, copy.path)
            return existing is not None and (existing.kind, existing.hash) == copy.content
        try:
            os.link(src, dst, follow_symlinks=False)  # a link's copy is a link: not followed
        except OSError:
            shutil.copy2(src, dst, follow_symlinks=False)
        st = Stat.of(os.lstat(dst))
        if local.kind == SYMLINK:
            st = Stat(local.size, st.mtime_ns, st.ctime_ns, st.inode, 0)
        with self.db.atomic():
            index.put_live_file(
                self.db, row.id, copy.path, st, copy.hash or b"",
                index.chunks_of(self.db, local.id), version=copy.version.to_json(),
                modified_by=copy.modified_by, indexed_at_ns=self.clock(), kind=local.kind,
                target=local.target,
            )  # fmt: skip
            ev.append_event(
                self.db, "created", storage=storage.name, path=copy.path,
                detail={"conflict_copy_of": path, "hash": (copy.hash or b"").hex()},
            )  # fmt: skip
        return True

    async def _take_copy(
        self,
        link: PeerLink,
        storage: Storage,
        row: index.StorageRow,
        copy: ResolvedFile,
        report: PullReport,
    ) -> bool:
        """Record a conflict copy whose content is elsewhere: pull it, as from any peer."""
        async with self.apply_lock:
            existing = index.get_file(self.db, row.id, copy.path)
            here = None if existing is None else _state(self.node_id, existing)
            source = copy.sources[0] if copy.sources else link.peer_id
            sub = reconcile(here, [copy.row_for(source)], self.node_id)
            if sub.local_action is LocalAction.NOTHING:
                return True
            if sub.local_action is LocalAction.UPDATE_VERSION_ONLY:
                with self.db.atomic():
                    index.adopt_version(
                        self.db, row.id, copy.path, version=sub.target.version.to_json(),
                        modified_by=sub.target.modified_by,
                    )  # fmt: skip
                return True
            expected = index.known_stat(self.db, row.id, copy.path)
        if sub.local_action is LocalAction.PULL and copy.kind != FILE:  # a link: from the row
            pending = PendingPull(copy.path, sub.target, existing, expected)
            await self._create_entry(link, storage, row, pending, report)
            return True
        if sub.local_action is LocalAction.PULL and link.peer_id in copy.sources:
            return await self._pull(
                link, storage, row, sub.target, copy.path, report, existing, expected
            )
        # The copy's content is on a node we are not talking to: keep ours, decide later.
        return False


class _Step:
    """What one pass over a storage (`apply_storage`) puts off until every path is decided."""

    def __init__(self, rules: IgnoreRules) -> None:
        self.rules = rules
        self.deferred: list[str] = []  # deletions
        self.pulls: list[str] = []  # files to fetch: decided again when fetched
        self.creates: list[PendingPull] = []  # folders and links to make
        self.replaced: set[str] = set()  # paths that become a file or a link
        self.ignored = 0

    def ignores(
        self, storage: Storage, local: index.FileRow | None, remote: peers.PeerFileRow
    ) -> bool:
        """Paths this node leaves alone: `.ignore` says so, or links while they are off."""
        kinds = {r.kind for r in (local, remote) if r is not None and not r.deleted}
        ignored = self.rules.ignores_file(remote.path) or (
            DIR in kinds and self.rules.ignores_dir(remote.path)
        )
        if not ignored and SYMLINK in kinds and not storage.sync_symlinks:
            ignored = True
        self.ignored += ignored
        return ignored


def _put_in_step(
    step: _Step,
    plan: Plan,
    local: index.FileRow | None,
    expected: Callable[[], KnownStat | None],
    peer: str,
) -> bool:
    """Put a plain case of a pass in `step`, for later: a deletion, a plain pull (its path:
    `_decided_again`), the making of a folder or link (with what `expected` says our index
    knows of the file there), or nothing, when another peer holds the content: a later sync
    with that peer brings it. False: the path needs `apply_path`'s other steps."""
    path = plan.path
    if plan.local_action is LocalAction.DELETE_HERE:
        step.deferred.append(path)
        return True
    if plan.local_action is not LocalAction.PULL or plan.conflict_copies:
        return False
    if plan.target.kind != FILE:
        step.creates.append(PendingPull(path, plan.target, local, expected()))
    elif peer in plan.target.sources:
        step.pulls.append(path)
    else:
        return True
    if plan.target.kind != DIR:
        step.replaced.add(path)
    return True


def _entry_inside(root: Path, path: str) -> Path:
    """The absolute path of the entry `path`, which may itself be a symlink (deleted, kept or
    touched as a link, never followed): only the folders on the way must not be links."""
    check_peer_path(path)
    folder, _, name = path.rpartition("/")
    return (resolve_inside(root, folder) if folder else Path(os.path.abspath(root))) / name


def _under_any(path: str, folders: set[str]) -> bool:
    """Whether `path` lies inside one of `folders` (at any depth)."""
    return any(folder in folders for folder in _folders_of(path))


def _folders_of(path: str) -> list[str]:
    """The folders on the way to `path`, outermost first: "a/b/c" -> ["a", "a/b"]."""
    parts = path.split("/")[:-1]
    return ["/".join(parts[: n + 1]) for n in range(len(parts))]


def _state(node: str, row: index.FileRow | peers.PeerFileRow) -> FileState:
    """A row of ours (`node` = this node) or a peer's, as reconcile takes it."""
    return FileState(
        node=node,
        path=row.path,
        version=VersionVector.from_json(row.version),
        hash=row.hash,
        size=row.size,
        mtime_ns=row.mtime_ns,
        mode=row.mode,
        deleted=row.deleted,
        modified_by=row.modified_by,
        kind=row.kind,
        target=row.target,
    )


def _peer_state(row: peers.PeerFileRow) -> FileState:
    return _state(row.peer, row)


def _same_row(now: index.FileRow | None, then: index.FileRow | None) -> bool:
    """Is the index row of a path still the one a decision saw?"""
    if now is None or then is None:
        return now is None and then is None
    return (now.sequence, now.version, now.hash, now.deleted) == (
        then.sequence, then.version, then.hash, then.deleted,
    )  # fmt: skip


def _disk_matches(full: os.PathLike[str] | str, stat: Stat) -> bool:
    try:
        st = os.lstat(full)
    except FileNotFoundError:
        return False
    return (st.st_size, st.st_mtime_ns, st.st_ino) == (stat.size, stat.mtime_ns, stat.inode)


def _result_counts(reply: SyncResult) -> dict[str, int]:
    try:
        data = json.loads(reply.detail)
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, int)}


def _metadata_detail(local: index.FileRow, target: ResolvedFile) -> dict[str, object]:
    """The detail of the `modified` event of a change of mode or mtime alone, as applied."""
    detail: dict[str, object] = {"content_changed": False}
    if local.kind != FILE:
        detail["type"] = local.kind
    if local.kind != SYMLINK and (local.mode & 0o7777) != (target.mode & 0o7777):
        detail["mode"] = f"{local.mode & 0o7777:o} -> {target.mode & 0o7777:o}"
    if local.mtime_ns != target.mtime_ns:
        detail["mtime"] = datetime.fromtimestamp(target.mtime_ns / 1e9, UTC).isoformat()
    return detail
