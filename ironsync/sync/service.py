"""What this node answers when a peer asks: storage hashes, index pages, chunks, sync requests.

The one `RequestHandler` of a node (see link.py); ironsync.net calls it for every request.

Storage hashes: asked by a peer starting a full sync (`GetStorageHashes.rescan`, and the first
request of every session), a node first brings its own index up to date: its file watcher, when
it runs and is healthy, records at once every change it has seen until then, debounced or not
(`catch_up`); otherwise a scan runs. Either way a change made before the request is never
missed, and a peer's `sync` that says "converged" means it. The scan runs in a thread (with
its own database connection), never on the event loop, and scans are coalesced
(`SyncEngine.scan_fresh`): at most one runs at a time; a request that arrives while one runs
waits for the next one, which starts after the request (so the promise holds), and every
request arriving during the same scan shares that next one. A peer asking in a loop keeps at
most one scan busy and delays nobody else's answers; each asker waits for at most two scans.

Paths: a peer that names an unsafe path, in its index (`SyncRequest`, checked by the sync
engine) or in a request for chunks or files (`GetChunkList`, `GetChunks`, `GetFiles`), breaks
the rules no honest node breaks: it gets an Error "violation", a `peer_refused` event records
why, and `on_violation` disconnects it.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Awaitable, Callable
from typing import NoReturn

from ironsync.config import Config
from ironsync.protocol import (
    MAX_FRAME_SIZE,
    MAX_INDEX_PAGE_ENTRIES,
    ChangeNotice,
    GetChunkList,
    GetChunks,
    GetFiles,
    GetIndex,
    GetStorageHashes,
    IndexEntry,
    IndexPage,
    Request,
    StorageHashes,
    SyncRequest,
    SyncResult,
)
from ironsync.protocol.wire import MAX_INDEX_PAGE_OVERHEAD, index_entry_size
from ironsync.store import Database, index, peers
from ironsync.store import events as ev
from ironsync.sync.fullsync import PeerViolation, SyncEngine
from ironsync.sync.link import PeerError, PeerLink, Responder
from ironsync.sync.paths import UnsafePath, check_peer_path
from ironsync.sync.transfer import serve_chunk_list, serve_chunks, serve_files

log = logging.getLogger(__name__)

PAGE_BYTES = MAX_FRAME_SIZE - MAX_INDEX_PAGE_OVERHEAD


class SyncService:
    """Answers a peer's requests from this node's database and disk."""

    def __init__(
        self,
        db: Database,
        config: Config,
        engine: SyncEngine,
        *,
        catch_up: Callable[[], Awaitable[bool]] | None = None,
        on_notice: Callable[[PeerLink, ChangeNotice], None] | None = None,
        on_violation: Callable[[PeerLink, str], None] | None = None,
    ) -> None:
        self.db = db
        self.config = config
        self.engine = engine
        # records what the file watcher has seen; False when it cannot promise that
        self.catch_up = catch_up
        self.on_notice = on_notice
        self.on_violation = on_violation
        self._seen: weakref.WeakSet[object] = weakref.WeakSet()

    async def handle(self, link: PeerLink, request: Request, respond: Responder) -> None:
        if isinstance(request, GetStorageHashes):
            await respond.send(await self.storage_hashes(link, request))
        elif isinstance(request, GetIndex):
            await self.index_pages(link, request, respond)
        elif isinstance(request, GetChunkList):
            self._check_path(link, request.path)
            row = self._storage(link, request.storage)
            await serve_chunk_list(self.db, row, request, respond, peer=link.peer_id)
        elif isinstance(request, GetChunks):
            self._check_path(link, request.path)
            row = self._storage(link, request.storage)
            await serve_chunks(self.db, row, request, respond, peer=link.peer_id)
        elif isinstance(request, GetFiles):
            for path in request.paths:
                self._check_path(link, path)
            row = self._storage(link, request.storage)
            await serve_files(self.db, row, request, respond, peer=link.peer_id)
        elif isinstance(request, SyncRequest):
            await respond.send(await self.sync_request(link, request))
        else:
            raise PeerError(link.peer_id, "unsupported", type(request).__name__)

    async def notice(self, link: PeerLink, message: ChangeNotice) -> None:
        if self.on_notice is not None:
            self.on_notice(link, message)

    async def storage_hashes(self, link: PeerLink, request: GetStorageHashes) -> StorageHashes:
        # A peer starting a full sync asks us to rescan first; the first request of a session
        # does too, whatever it says (see the module docstring).
        first = link not in self._seen
        self._seen.add(link)
        if (request.rescan or first) and not (self.catch_up and await self.catch_up()):
            await self.engine.scan_fresh()
        names = [s.name for s in self.config.storages]
        hashes = self.engine.our_hashes(names)
        # the serving end of a full sync: the asker's storages all hold what ours hold, so
        # this end's last sync with it is now too (the asker records its own as it converges)
        shared = [name for name in request.hashes if name in hashes]
        if shared and all(request.hashes[name] == hashes[name] for name in shared):
            rows = [index.get_storage(self.db, name) for name in shared]
            with self.db.atomic():
                peers.mark_peer_synced(self.db, link.peer_id, [r.id for r in rows if r])
        return StorageHashes(hashes, request_id=request.request_id)

    async def index_pages(self, link: PeerLink, request: GetIndex, respond: Responder) -> None:
        row = self._storage(link, request.storage)
        limit = max(1, min(request.limit, MAX_INDEX_PAGE_ENTRIES))
        since = request.since_sequence
        while True:
            rows = index.changes_since(self.db, row.id, since, limit)
            entries: list[IndexEntry] = []
            size = 0
            for file_row in rows:
                entry = _entry(file_row)
                size += index_entry_size(entry)
                if entries and size > PAGE_BYTES:
                    break
                entries.append(entry)
            more = len(rows) == limit or len(entries) < len(rows)
            last = entries[-1].sequence if entries else since
            await respond.send(
                IndexPage(
                    request.storage, tuple(entries), last, more, request_id=request.request_id
                )
            )
            if not more:
                return
            since = last
            await asyncio.sleep(0)  # a long index must not keep the loop from everyone else

    async def sync_request(self, link: PeerLink, request: SyncRequest) -> SyncResult:
        """The peer asks us to pull from it what we lack (the "push" half of a full sync)."""
        names = [n for n in request.storages if any(s.name == n for s in self.config.storages)]
        try:
            report = await self.engine.pull_from(link, names)
        except PeerViolation as exc:
            self._refuse(link, exc.reason)
        return SyncResult(not report.failed, report.to_json(), request_id=request.request_id)

    def _check_path(self, link: PeerLink, path: str) -> None:
        try:
            check_peer_path(path)
        except UnsafePath as exc:
            self._refuse(link, f"asked for unsafe path {exc.path!r}: {exc.reason}")

    def _refuse(self, link: PeerLink, reason: str) -> NoReturn:
        """The peer broke a rule no honest node breaks: log it, disconnect it, tell it why."""
        with self.db.atomic():
            ev.append_event(
                self.db, "peer_refused", peer=link.peer_id, status="error",
                detail={"reason": reason},
            )  # fmt: skip
        if self.on_violation is not None:
            self.on_violation(link, reason)
        raise PeerError(link.peer_id, "violation", reason)

    def _storage(self, link: PeerLink, name: str) -> index.StorageRow:
        if not any(s.name == name for s in self.config.storages):
            raise PeerError(link.peer_id, "unknown_storage", f"no storage '{name}' here")
        row = index.get_storage(self.db, name)
        if row is None:
            raise PeerError(link.peer_id, "unknown_storage", f"storage '{name}' not scanned yet")
        return row


def _entry(row: index.FileRow) -> IndexEntry:
    return IndexEntry(
        path=row.path,
        size=row.size,
        mtime_ns=row.mtime_ns,
        mode=row.mode,
        hash=row.hash,
        deleted=row.deleted,
        version=row.version,
        modified_by=row.modified_by,
        sequence=row.sequence,
        kind=row.kind,
        target=None if row.deleted else row.target,
    )
