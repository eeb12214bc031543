"""The daemon and standalone sync: wiring of the parts, signals, the lock, the control socket.

`ironsync daemon` holds the node's lock for its lifetime, scans, serves peers over TLS, runs a
full sync with every static peer at start (reconnecting with backoff when one goes away) and
answers `ironsync sync` on a unix control socket beside the database (owner-only).

`ironsync sync` asks the daemon through that socket when one answers; otherwise it takes the
lock itself and runs the same full sync standalone against the same database — one writer at a
time, never two processes deciding from the same index at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import json
import logging
import os
import random
import signal
import socket
import stat as stat_mod
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ironsync.config import Config, Storage
from ironsync.control import NodeLock, control_socket_path, lock_path
from ironsync.net.discovery import Discovery, DiscoveryError, PeerAddress, run_discovery
from ironsync.net.session import (
    PeerSession,
    SelfConnection,
    backoff_delay,
    connect,
    connect_with_backoff,
    serve,
)
from ironsync.net.tls import load_or_create_identity
from ironsync.protocol import PROTOCOL_VERSION, ChangeNotice, Hello
from ironsync.store import Database, index, tree
from ironsync.store import events as ev
from ironsync.store import peers as peer_store
from ironsync.sync.fullsync import PeerViolation, SyncEngine, SyncOutcome, SyncProgress
from ironsync.sync.link import PeerError
from ironsync.sync.local import Change, index_matches_disk, rescan_paths
from ironsync.sync.paths import behind_a_symlink
from ironsync.sync.service import SyncService
from ironsync.sync.transfer import remove_stale_temp_files
from ironsync.sync.versions import prune_versions
from ironsync.sync.watcher import Watcher, entries_under

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_NO_PEER = 3
EXIT_PARTIAL = 4
CONNECT_TIMEOUT_S = 10.0
UNHEALTHY_RESCAN_S = 60.0

MAX_SESSIONS_PER_PEER = 4
"""Open sessions with one node id (its daemon's, a `sync`, a reconnect racing the old one);
a newer one closes the oldest, so a peer cannot pile sessions up."""
MAX_SESSIONS = 128
"""Open sessions in all: an incoming one beyond this is closed at once."""
REDIAL_AFTER_FAULT_S = 5.0
REDIAL_AFTER_FAULT_MAX_S = 600.0
"""After a session with a peer we dial ends by its fault (a protocol violation or error, a
reply timeout, a fatal error it sent), we wait before dialing it again: from 5 s, doubling
with each such session in a row, up to 10 minutes. A session that ends otherwise resets it."""
FAULT_REASONS = ("protocol violation", "protocol error", "no reply to", "peer sent error")
"""How the closed_reason of a session that ended by the peer's fault begins."""


class CannotStart(Exception):
    """The daemon cannot start where its config puts it: the port is taken, the address is not
    this host's, the control socket cannot be made. The message names the config key and file
    (`ironsync daemon` prints it as one line and exits 2)."""


# errno of a failed bind or listen -> (what it means, the config key to change, what else helps)
LISTEN_FAILURES: dict[int, tuple[str, str, str]] = {
    errno.EADDRINUSE: ("port in use", "port", " or stop the other program"),
    errno.EADDRNOTAVAIL: ("address not on this host", "listen_address", ""),
    errno.EACCES: ("permission denied", "port", ""),
}


def listen_failure(config: Config, exc: OSError) -> CannotStart:
    """The one-line error for `exc`, raised binding or listening on the configured address."""
    host, port = config.listen_address, config.port
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if isinstance(exc, socket.gaierror):
        reason, key, hint = f"unknown address: {exc.strerror}", "listen_address", ""
    elif exc.errno in LISTEN_FAILURES:
        reason, key, hint = LISTEN_FAILURES[exc.errno]
        if exc.errno == errno.EACCES and port < 1024:
            reason += ": ports below 1024 need root"
    else:
        reason, key, hint = exc.strerror or str(exc), "listen_address` or `port", ""
    return CannotStart(f"cannot listen on {where} ({reason}): set `{key}` in {config.path}{hint}")


@contextlib.contextmanager
def listen_errors(config: Config) -> Iterator[None]:
    """Turn an OSError binding or listening on the configured address into CannotStart."""
    try:
        yield
    except OSError as exc:
        raise listen_failure(config, exc) from exc


def parse_peer(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def our_hello(config: Config) -> Hello:
    return Hello(
        PROTOCOL_VERSION,
        config.node_id,
        config.group,
        tuple(s.name for s in config.storages),
    )


def outcome_json(outcome: SyncOutcome) -> dict[str, Any]:
    return {
        "peer": outcome.peer,
        "converged": outcome.converged,
        "rounds": outcome.rounds,
        "pulled": outcome.pulled.pulled,
        "bytes_from_peer": outcome.pulled.bytes_from_peer,
        "bytes_reused": outcome.pulled.bytes_reused,
        "deleted": outcome.pulled.deleted,
        "conflicts": outcome.pulled.conflicts,
        "failed": [f"{p}: {r}" for p, r in outcome.pulled.failed],
        "skipped": [
            {"storage": storage, "path": path, "reason": reason}
            for storage, path, reason in outcome.pulled.skipped
        ],
        "peer_changed": outcome.peer_changed,
        "peer_skipped": outcome.peer_skipped,
        "divergent": outcome.divergent,
        "error": outcome.error,
    }


def exit_code(
    results: list[dict[str, Any]], unreachable: list[str], skipped: Sequence[dict[str, str]] = ()
) -> int:
    """0 every reachable peer converged and no file was left out; 4 converged, but files
    were left out: here, what could not be read or has a name that is not valid UTF-8
    (`skipped`), or, in a result, names a node cannot store (its `skipped`, `peer_skipped`);
    1 a sync failed or did not converge; 3 no peer was reachable."""
    if not results:
        return EXIT_NO_PEER
    if not all(r["converged"] for r in results):
        return EXIT_FAILED
    left_out = skipped or any(r.get("skipped") or r.get("peer_skipped") for r in results)
    return EXIT_PARTIAL if left_out else EXIT_OK


@dataclass
class Node:
    """The parts of one running node, shared by the daemon and standalone sync."""

    config: Config
    db: Database
    progress: SyncProgress | None = None
    engine: SyncEngine = field(init=False)
    service: SyncService = field(init=False)
    sessions: dict[str, PeerSession] = field(default_factory=dict)  # the newest per peer
    open_sessions: dict[str, list[PeerSession]] = field(default_factory=dict)  # oldest first
    addresses: dict[str, str] = field(default_factory=dict)  # static address -> peer id
    _pull_wanted: dict[str, set[str]] = field(default_factory=dict)
    _pull_tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    # storage -> its sequence when the peers were last told of it (what moved past it since,
    # a `restore` or `resolve` run beside the daemon say, is told at the next watcher event)
    announced: dict[str, int] = field(default_factory=dict)
    # session -> held during a full sync through it: a notice's pull on that session waits
    # for the sync to end (the sync's report then counts what it pulled, the pull finds nothing)
    _syncing: weakref.WeakKeyDictionary[Any, asyncio.Lock] = field(
        default_factory=weakref.WeakKeyDictionary
    )

    def __post_init__(self) -> None:
        self.engine = SyncEngine(self.db, self.config, progress=self.progress)
        self.service = SyncService(
            self.db,
            self.config,
            self.engine,
            on_violation=self._violation,
            on_notice=self._notice,
        )
        self.identity = load_or_create_identity(
            self.config.state_dir, self.config.node_id, self.config.group,
            self.config.group_secret,
        )  # fmt: skip
        self.hello = our_hello(self.config)

    # --- live updates: notices out, pulls in ---------------------------------------------

    async def announce(self, storage: str, *, skip: str | None = None) -> None:
        """Tell every connected peer (but `skip`) that `storage` changed here."""
        row = index.get_storage(self.db, storage)
        if row is None:
            return
        notice = ChangeNotice(storage, row.sequence)
        self.announced[storage] = row.sequence
        for peer_id, session in list(self.sessions.items()):
            if peer_id == skip:
                continue
            try:
                await session.notify(notice)
            except Exception as exc:  # a closing session: it resyncs when it reconnects
                log.info("notice to %s failed: %s", peer_id, exc)

    def _notice(self, link: Any, notice: ChangeNotice) -> None:
        """A peer changed a storage: pull from it (coalesced: one pull per peer at a time)."""
        if not any(s.name == notice.storage for s in self.config.storages):
            return
        wanted = self._pull_wanted.setdefault(link.peer_id, set())
        wanted.add(notice.storage)
        if link.peer_id not in self._pull_tasks:
            task = asyncio.get_running_loop().create_task(self._pull_loop(link))
            self._pull_tasks[link.peer_id] = task

    async def _pull_loop(self, link: Any) -> None:
        try:
            while wanted := self._pull_wanted.pop(link.peer_id, None):
                try:
                    async with self._sync_lock(link):
                        report = await self.engine.pull_from(link, sorted(wanted))
                except (PeerError, PeerViolation) as exc:
                    log.info("live pull from %s failed: %s", link.peer_id, exc)
                    if isinstance(exc, PeerViolation):
                        self.record("peer_refused", link.peer_id, "error", reason=exc.reason)
                        self._violation(link, exc.reason)
                    return
                if report.changed:
                    # relay; a pass that made versions of our own (a folder kept because it
                    # still held files) has news for the peer it pulled from too
                    skip = None if report.made_here else link.peer_id
                    for storage in sorted(wanted):
                        await self.announce(storage, skip=skip)
        finally:
            self._pull_tasks.pop(link.peer_id, None)

    def _sync_lock(self, link: Any) -> asyncio.Lock:
        lock = self._syncing.get(link)
        if lock is None:
            lock = self._syncing[link] = asyncio.Lock()
        return lock

    def _violation(self, link: Any, reason: str) -> None:
        log.warning("peer %s: %s; disconnecting", link.peer_id, reason)
        asyncio.get_running_loop().create_task(link.close(f"protocol violation: {reason}"))

    def record(self, kind: str, peer: str | None, status: str = "ok", **detail: Any) -> None:
        with self.db.atomic():
            ev.append_event(self.db, kind, peer=peer, status=status, detail=detail or None)

    def refused(self, address: str, reason: str) -> None:
        log.warning("refused connection from %s: %s", address, reason)
        self.record("peer_refused", None, "warning", address=address, reason=reason)

    def connected(self, session: PeerSession, address: str | None) -> bool:
        """Count a new session in; False when it is one too many (MAX_SESSIONS; it is being
        closed). A peer's sessions beyond MAX_SESSIONS_PER_PEER close the oldest."""
        peer_id = session.peer_id
        if address is None and sum(map(len, self.open_sessions.values())) >= MAX_SESSIONS:
            reason = f"more than {MAX_SESSIONS} sessions are open"
            log.warning("refused session from %s: %s", peer_id, reason)
            self.record("peer_refused", peer_id, "warning", reason=reason)
            asyncio.get_running_loop().create_task(session.close(reason))
            return False
        mine = self.open_sessions.setdefault(peer_id, [])
        mine.append(session)
        if len(mine) > MAX_SESSIONS_PER_PEER:
            oldest = mine.pop(0)
            reason = f"more than {MAX_SESSIONS_PER_PEER} sessions with {peer_id}: oldest closed"
            log.info("%s", reason)
            asyncio.get_running_loop().create_task(oldest.close(reason))
        self.sessions[peer_id] = session
        if address is not None:
            self.addresses[address] = peer_id
        with self.db.atomic():
            peer_store.touch_peer(self.db, peer_id, address, session.host)
            ev.append_event(
                self.db, "peer_connected", peer=peer_id,
                detail={"address": address} if address else None,
            )  # fmt: skip
        return True

    def disconnected(self, session: PeerSession) -> None:
        mine = self.open_sessions.get(session.peer_id, [])
        if session in mine:
            mine.remove(session)
        if not mine:
            self.open_sessions.pop(session.peer_id, None)
        if self.sessions.get(session.peer_id) is session:
            del self.sessions[session.peer_id]
            if mine:
                self.sessions[session.peer_id] = mine[-1]
        with self.db.atomic():
            peer_store.add_peer_traffic(
                self.db, session.peer_id, session.bytes_in, session.bytes_out
            )
            ev.append_event(
                self.db, "peer_disconnected", peer=session.peer_id,
                detail={"reason": session.closed_reason or "closed"},
            )  # fmt: skip

    async def dial(self, address: str, timeout: float = CONNECT_TIMEOUT_S) -> PeerSession:
        host, port = parse_peer(address)
        session = await connect(
            host, port, self.identity, self.hello, self.service, timeout=timeout
        )
        self.connected(session, address)
        return session

    async def sync_with(
        self, session: PeerSession, storages: tuple[str, ...] | None
    ) -> SyncOutcome:
        async with self._sync_lock(session):
            outcome = await self.engine.full_sync(session, storages)
        if outcome.violation is not None:  # it sent what no honest node sends: log, hang up
            log.warning("peer %s: %s; disconnecting", session.peer_id, outcome.violation)
            self.record("peer_refused", session.peer_id, "error", reason=outcome.violation)
            await session.close(f"protocol violation: {outcome.violation}")
        elif outcome.error and "violation" in outcome.error:  # it refused us
            await session.close("protocol violation")
        if outcome.pulled.changed:  # relay what we learned to the other peers
            for storage in self.config.storages:
                if storages is None or storage.name in storages:
                    await self.announce(storage.name, skip=session.peer_id)
        return outcome

    def skipped(self, storages: tuple[str, ...] | None) -> list[dict[str, str]]:
        """The files of `storages` (all by default) that the last scan left out: unreadable,
        or named with bytes that are not UTF-8."""
        return [
            {"storage": name, "path": path, "reason": reason}
            for name, files in sorted(self.engine.unreadable.items())
            if storages is None or name in storages
            for path, reason in files
        ]

    async def sync_static_peers(
        self, storages: tuple[str, ...] | None, report: Callable[[dict[str, Any]], None]
    ) -> tuple[list[dict[str, Any]], list[str]]:
        """One full sync with every reachable peer: connected ones, then the static list."""
        results: list[dict[str, Any]] = []
        unreachable: list[str] = []
        done: set[str] = set()
        for peer_id, session in list(self.sessions.items()):
            outcome = await self.sync_with(session, storages)
            results.append(outcome_json(outcome))
            report(results[-1])
            done.add(peer_id)
        for address in self.config.peers:
            if self.addresses.get(address) in done:
                continue
            try:
                session = await self.dial(address)
            except (TimeoutError, OSError, ConnectionError) as exc:
                unreachable.append(address)
                report({"unreachable": address, "reason": str(exc) or type(exc).__name__})
                continue
            try:
                if session.peer_id in done:
                    continue
                outcome = await self.sync_with(session, storages)
                results.append(outcome_json(outcome))
                report(results[-1])
                done.add(session.peer_id)
            finally:
                await session.close("sync done")
                self.disconnected(session)
        return results, unreachable


# --- standalone sync ----------------------------------------------------------------------


async def standalone_sync(
    config: Config,
    db: Database,
    storages: tuple[str, ...] | None,
    report: Callable[[dict[str, Any]], None],
    progress: SyncProgress | None = None,
) -> int:
    """`ironsync sync` without a daemon: the same full sync, with the lock held."""
    lock = NodeLock(lock_path(config))
    lock.acquire()
    try:
        for storage in config.storages:
            remove_stale_temp_files(storage.root)
        node = Node(config, db, progress)
        results, unreachable = await node.sync_static_peers(storages, report)
        skipped = node.skipped(storages)
        if skipped:
            report({"skipped": skipped})
        return exit_code(results, unreachable, skipped)
    finally:
        lock.release()


# --- control socket -------------------------------------------------------------------------


# --- the daemon -----------------------------------------------------------------------------


class Daemon:
    def __init__(self, config: Config, db: Database) -> None:
        self.config = config
        self.db = db
        self.stop = asyncio.Event()
        self.lock = NodeLock(lock_path(config))
        self.node: Node | None = None
        self.tasks: set[asyncio.Task[Any]] = set()
        self.watcher: Watcher | None = None
        self.rescan_now = asyncio.Event()
        self.discovery: Discovery | None = None
        self.discovered: dict[str, PeerAddress] = {}
        self._discovery_tasks: dict[str, asyncio.Task[Any]] = {}
        self._dialing: set[str] = set()
        self._faults: dict[str, int] = {}  # peer address or id -> sessions ended by its fault
        self._rng = random.Random()

    async def run(self) -> int:
        self.lock.acquire()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        server = control = None
        try:
            node = self.node = Node(self.config, self.db)
            # Bound first, so that a port in use fails before a long scan (issue 12); peers
            # are refused until the scan is done and the server starts serving.
            with listen_errors(self.config):
                server = await serve(
                    self.config.listen_address, self.config.port, node.identity, node.hello,
                    node.service, on_session=self._incoming, on_refused=node.refused,
                    start_serving=False,
                )  # fmt: skip
            for storage in self.config.storages:
                removed = remove_stale_temp_files(storage.root)
                if removed:
                    log.info("removed %d stale temporary file(s) in %s", len(removed), storage.name)
            node.engine.scan()
            with listen_errors(self.config):
                await server.start_serving()
            control = await self._start_control()
            log.info(
                "node %s listening on %s:%d", self.config.node_id, self.config.listen_address,
                self.config.port,
            )  # fmt: skip
            for address in self.config.peers:
                self._spawn(self._peer_loop(address))
            try:
                self.discovery = await run_discovery(self.config, self._peer_found, self._peer_lost)
            except DiscoveryError as exc:
                log.warning("service discovery unavailable (%s); static peers only", exc)
            if self.config.enable_file_watcher:
                self.watcher = Watcher(
                    self.config.storages, self.config.delay_watcher_events, self._watched,
                    lambda _storage: self.rescan_now.set(),
                )  # fmt: skip
                await self.watcher.start()
                watcher = self.watcher
                node.service.catch_up = watcher.catch_up
            self._spawn(self._periodic_rescan())
            await self.stop.wait()
            log.info("stopping")
            return 0
        finally:
            if self.discovery is not None:
                with contextlib.suppress(Exception):
                    await self.discovery.stop()
            if self.watcher is not None:
                await self.watcher.stop()
            for task in list(self.tasks):
                task.cancel()
            for task in list(self.tasks):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if self.node is not None:
                for sessions in list(self.node.open_sessions.values()):
                    for session in list(sessions):
                        with contextlib.suppress(Exception):
                            await session.close("daemon stopping")
            for srv in (server, control):
                if srv is not None:
                    srv.close()
            with contextlib.suppress(FileNotFoundError):
                control_socket_path(self.config).unlink()
            self.lock.release()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def _watched(self, storage: Storage, paths: set[str], folders: set[str]) -> list[Change]:
        """Settled watcher events, or the paths a command changed (`changed` on the control
        socket): record them (the scanner's index update), tell the peers."""
        assert self.node is not None
        node = self.node
        async with node.engine.apply_lock:
            row = index.get_storage(self.db, storage.name)
            if row is None:
                return []
            wanted = set(paths) | set(folders)
            seen: dict[str, str] = {}
            astray = sorted(p for p in wanted if behind_a_symlink(storage.root, p, seen))
            if astray:
                # watchdog named changes of a symlinked folder's target by the link's path
                # (it watches the folder the link points to under that name): where they
                # really are is not known, so the whole storage is looked at again
                log.info(
                    "storage '%s': the watcher named %d path(s) through a symlink (%s): "
                    "rescanning it", storage.name, len(astray), astray[0],
                )  # fmt: skip
                self.rescan_now.set()
            for folder in folders:
                wanted.update(tree.live_paths_under(self.db, row.id, folder))
                wanted.update(entries_under(storage.root, folder))
            # Our own writes (pulls, conflict copies) are in the index already: skip them
            # without reading them again.
            changed = [
                p
                for p in sorted(wanted)
                if not index_matches_disk(self.db, row.id, storage.root, p)
            ]
            changes = (
                rescan_paths(self.db, self.config.node_id, storage, changed, folders=seen)
                if changed
                else []
            )
            now = index.get_storage(self.db, storage.name)
            # changes recorded by a command beside the daemon (restore, resolve, scan): the
            # watcher saw their writes, the index has them already
            moved = now is not None and now.sequence > node.announced.get(storage.name, 0)
        if changes or moved:
            await node.announce(storage.name)
        return changes

    async def _periodic_rescan(self) -> None:
        """A safety net under the watcher: rescan every `rescan_interval` seconds (every minute
        while the watcher is not healthy, and at once after it lost events)."""
        assert self.node is not None
        node = self.node
        while True:
            interval = self.config.rescan_interval or None
            if self.watcher is not None and not self.watcher.healthy:
                interval = min(interval or UNHEALTHY_RESCAN_S, UNHEALTHY_RESCAN_S)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.rescan_now.wait(), interval)
            self.rescan_now.clear()
            names = [s.name for s in self.config.storages]
            before = node.engine.our_hashes(names)
            await node.engine.scan_fresh()  # in a thread, coalesced with the peers' asks
            after = node.engine.our_hashes(names)
            if self.watcher is not None:
                self.watcher.mark_rescanned()
            now = datetime.now(UTC)
            for storage in self.config.storages:
                pruned = prune_versions(storage.root, self.config.keep_versions_days, now)
                if pruned:
                    log.info("storage '%s': pruned %d old version(s)", storage.name, pruned)
            for name in names:
                if before.get(name) != after.get(name):
                    await node.announce(name)

    async def _incoming(self, session: PeerSession) -> None:
        assert self.node is not None
        if not self.node.connected(session, None):
            return
        try:
            await session.wait_closed()
        finally:
            self.node.disconnected(session)

    async def _peer_loop(self, address: str) -> None:
        """Keep a session to one static peer: connect (with backoff), full sync, wait, again."""
        assert self.node is not None
        node = self.node
        host, port = parse_peer(address)
        while not self.stop.is_set():
            try:
                session = await connect_with_backoff(
                    host, port, node.identity, node.hello, node.service, attempts=None
                )
            except SelfConnection:
                log.warning("peer %s is this node itself; not dialing it", address)
                return
            await self._keep_dialed(session, address, address)

    # --- discovered peers (mDNS) ----------------------------------------------------------------

    def _peer_found(self, peer: PeerAddress) -> None:
        if peer.address in self.config.peers:
            return  # a static peer: its own loop keeps it
        self.discovered[peer.node_id] = peer
        if self.config.node_id > peer.node_id:
            return  # one session per pair: the node with the smaller id dials
        task = self._discovery_tasks.get(peer.node_id)
        if task is not None and not task.done():
            if peer.node_id not in self._dialing:
                return  # connected: the loop redials the new address when that session ends
            task.cancel()  # still dialing an old address
        self._discovery_tasks[peer.node_id] = self._spawn(self._discovered_loop(peer.node_id))

    def _peer_lost(self, node_id: str) -> None:
        self.discovered.pop(node_id, None)
        task = self._discovery_tasks.get(node_id)
        if task is not None and node_id in self._dialing:
            task.cancel()  # an open session ends by itself; the loop then stops

    async def _discovered_loop(self, node_id: str) -> None:
        """Keep a session to one discovered peer while it is announced."""
        assert self.node is not None
        node = self.node
        while not self.stop.is_set():
            peer = self.discovered.get(node_id)
            if peer is None:
                return
            existing = node.sessions.get(node_id)
            if existing is not None:
                await existing.wait_closed()
                continue
            self._dialing.add(node_id)
            try:
                session = await connect_with_backoff(
                    peer.host, peer.port, node.identity, node.hello, node.service, attempts=None
                )
            except SelfConnection:
                return
            finally:
                self._dialing.discard(node_id)
            await self._keep_dialed(session, peer.address, node_id)

    async def _keep_dialed(self, session: PeerSession, address: str, key: str) -> None:
        """A session we dialed: full sync, then keep it until it ends; before the caller
        dials `key` again, wait if the session ended by the peer's fault (FAULT_REASONS)."""
        assert self.node is not None
        node = self.node
        node.connected(session, address)
        try:
            outcome = await node.sync_with(session, None)
            log.info(  # tests/histories.py waits for this line
                "full sync with %s: %s (%s)", session.peer_id,
                "converged" if outcome.converged else f"not converged ({outcome.error})", address,
            )  # fmt: skip
            await session.wait_closed()
        finally:
            node.disconnected(session)
        reason = session.closed_reason or ""
        if not reason.startswith(FAULT_REASONS):
            self._faults.pop(key, None)
            return
        faults = self._faults[key] = self._faults.get(key, 0) + 1
        delay = backoff_delay(faults, REDIAL_AFTER_FAULT_S, REDIAL_AFTER_FAULT_MAX_S, self._rng)
        log.warning("session with %s ended: %s; dialing it again in %.0f s", key, reason, delay)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), delay)

    async def _start_control(self) -> asyncio.AbstractServer:
        path = control_socket_path(self.config)
        if path.exists() or path.is_symlink():
            mode = path.lstat().st_mode
            if not stat_mod.S_ISSOCK(mode):
                raise CannotStart(
                    f"{path} exists and is not a socket: move it away, or set `database` in "
                    f"{self.config.path}"
                )
            path.unlink()  # stale: we hold the lock, so no other daemon uses it
        old_umask = os.umask(0o177)
        try:
            server = await asyncio.start_unix_server(self._control, path=str(path))
        except OSError as exc:  # "AF_UNIX path too long" has no errno
            raise CannotStart(
                f"cannot make the control socket {path} ({exc.strerror or exc}): it lives "
                f"beside the database; set `database` in {self.config.path}"
            ) from exc
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        return server

    async def _changed(self, request: dict[str, Any]) -> dict[str, Any]:
        """A command beside the daemon changed a storage (`restore`, `resolve`, `scan`):
        record `paths` as the watcher would (at once, no debounce) and tell the peers of
        whatever the storage holds that they have not been told of."""
        name, paths = request.get("storage"), request.get("paths") or []
        storage = next((s for s in self.config.storages if s.name == name), None)
        if storage is None or not all(isinstance(p, str) for p in paths):
            return {"error": f"no storage {name!r} here, or paths that are not strings"}
        changes = await self._watched(storage, set(paths), set())
        return {"changes": [[c.kind, c.path, c.from_path, c.entry] for c in changes]}

    def live_status(self) -> dict[str, Any]:
        """What only the running daemon knows: who is connected, how the watcher is."""
        node = self.node
        sessions = node.sessions if node is not None else {}
        open_sessions = node.open_sessions if node is not None else {}
        watcher: dict[str, Any] = {"enabled": self.config.enable_file_watcher}
        if self.watcher is not None:
            watcher |= {"healthy": self.watcher.healthy, "failure": self.watcher.failure}
        return {
            "pid": os.getpid(),
            # figures of the sessions open now, which the database counts only when they end
            "connected": {
                peer: {
                    "address": session.address,
                    "bytes_in": sum(s.bytes_in for s in open_sessions.get(peer, [session])),
                    "bytes_out": sum(s.bytes_out for s in open_sessions.get(peer, [session])),
                }
                for peer, session in sorted(sessions.items())
            },
            "now": ev.iso_now(),
            "watcher": watcher,
        }

    async def _control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        try:
            if sock is not None and hasattr(socket, "SO_PEERCRED"):
                import struct

                creds = sock.getsockopt(
                    socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")
                )
                _, uid, _ = struct.unpack("3i", creds)
                if uid not in (os.getuid(), 0):
                    return
            line = await reader.readline()
            request = json.loads(line or b"{}")
            if request.get("cmd") == "status":
                writer.write(json.dumps(self.live_status()).encode() + b"\n")
                await writer.drain()
                return
            if request.get("cmd") == "changed":
                reply = await self._changed(request)
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
                return
            if request.get("cmd") != "sync":
                writer.write(json.dumps({"error": "unknown command"}).encode() + b"\n")
                return
            storages = tuple(request.get("storages") or ()) or None

            def report(item: dict[str, Any]) -> None:
                writer.write(json.dumps({"peer_result": item}).encode() + b"\n")

            assert self.node is not None
            engine = self.node.engine
            previous = engine.progress
            if request.get("progress", True):  # a line per file, unless the asker shows none
                engine.progress = _ControlProgress(writer)
            try:
                results, unreachable = await self.node.sync_static_peers(storages, report)
            finally:
                engine.progress = previous
            skipped = self.node.skipped(storages)
            if skipped:
                report({"skipped": skipped})
            code = exit_code(results, unreachable, skipped)
            writer.write(json.dumps({"exit": code, "results": results}).encode() + b"\n")
            await writer.drain()
        except (ValueError, ConnectionError) as exc:
            log.warning("control request failed: %s", exc)
        finally:
            writer.close()


class _ControlProgress(SyncProgress):
    """Progress of a sync asked for on the control socket, sent back as JSON lines."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer

    def file_done(self, storage: str, path: str, nbytes: int) -> None:
        if not self.writer.is_closing():
            line = {"progress": {"storage": storage, "path": path, "bytes": nbytes}}
            self.writer.write(json.dumps(line).encode() + b"\n")


GC_YOUNG_THRESHOLD = 20_000
"""Allocations between two collections of the youngest generation (Python's default: 700).
A sync makes many short-lived objects per file (rows, decisions, messages); at the default,
collecting them took ~9% of a receiving daemon's event loop (bin/bench (f))."""


def run_daemon(config: Config, db: Database) -> int:
    gc.freeze()  # what start-up made (modules, config) lives as long as the daemon
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    return asyncio.run(Daemon(config, db).run())
