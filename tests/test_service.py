"""What a node answers (ironsync.sync.service): scans off the event loop and coalesced, and a
peer asking for an unsafe path refused like one offering one."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest

import ironsync.sync.fullsync as fullsync
from ironsync.protocol import GetChunkList, GetChunks, GetStorageHashes, Reply, StorageHashes
from ironsync.store import events as ev
from ironsync.sync.fullsync import SyncEngine
from ironsync.sync.link import PeerError
from ironsync.sync.service import SyncService
from tests.conftest import Node

HASH = bytes(range(16))


class Link:
    def __init__(self, peer_id: str) -> None:
        self.peer_id = peer_id
        self.closed: list[str] = []


class Replies:
    def __init__(self) -> None:
        self.sent: list[Reply] = []

    async def send(self, reply: Reply) -> None:
        self.sent.append(reply)


class GatedScans:
    """Wraps scan_storage: records the thread of each scan, and holds the first one, once it
    has scanned, until `gate` opens (so a change can be made "during" it)."""

    def __init__(self, real: Callable[..., Any]) -> None:
        self.real = real
        self.gate = threading.Event()
        self.held = threading.Event()
        self.threads: list[threading.Thread] = []
        self.armed = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.armed:
            return self.real(*args, **kwargs)
        self.threads.append(threading.current_thread())
        report = self.real(*args, **kwargs)
        if len(self.threads) == 1:
            self.held.set()
            self.gate.wait(10)
        return report


@pytest.fixture
def scans(monkeypatch: pytest.MonkeyPatch) -> GatedScans:
    gated = GatedScans(fullsync.scan_storage)
    monkeypatch.setattr(fullsync, "scan_storage", gated)
    return gated


def make_service(node: Node) -> tuple[SyncService, SyncEngine, list[tuple[str, str]]]:
    config, db = node.config(), node.db()
    engine = SyncEngine(db, config)
    engine.scan()  # the daemon scans once before it serves
    violations: list[tuple[str, str]] = []
    service = SyncService(
        db, config, engine, on_violation=lambda link, why: violations.append((link.peer_id, why))
    )
    return service, engine, violations


async def ask_hashes(service: SyncService, link: Link, request_id: int) -> bytes:
    replies = Replies()
    await service.handle(link, GetStorageHashes(rescan=True, request_id=request_id), replies)
    (reply,) = replies.sent
    assert isinstance(reply, StorageHashes)
    return reply.hashes["docs"]


def test_scans_asked_for_by_peers_run_off_the_loop_one_at_a_time_shared_by_all(
    node: Node, scans: GatedScans
) -> None:
    service, _, _ = make_service(node)
    scans.armed = True

    async def body() -> int:
        ticks = 0
        first = asyncio.ensure_future(ask_hashes(service, Link("a"), 1))
        while not scans.held.is_set():
            await asyncio.sleep(0.01)
        askers = [asyncio.ensure_future(ask_hashes(service, Link(f"p{n}"), 2)) for n in range(20)]
        for _ in range(20):  # the loop goes on while the scan is held in its thread
            await asyncio.sleep(0.01)
            ticks += 1
        scans.gate.set()
        await asyncio.gather(first, *askers)
        return ticks

    ticks = asyncio.run(body())

    assert ticks == 20
    assert len(scans.threads) == 2  # the held one, then one for all 20 that came meanwhile
    assert all(t is not threading.main_thread() for t in scans.threads)


def test_a_change_made_during_a_scan_is_in_the_hashes_of_a_request_made_after_it(
    node: Node, scans: GatedScans
) -> None:
    service, engine, _ = make_service(node)
    scans.armed = True
    before = engine.our_hashes(["docs"])["docs"]

    async def body() -> tuple[bytes, bytes]:
        first = asyncio.ensure_future(ask_hashes(service, Link("a"), 1))
        while not scans.held.is_set():  # that scan is over the folder already
            await asyncio.sleep(0.01)
        (node.root / "new.txt").write_text("made during a scan")
        second = asyncio.ensure_future(ask_hashes(service, Link("b"), 1))
        await asyncio.sleep(0.05)
        scans.gate.set()
        return await first, await second

    first, second = asyncio.run(body())

    assert first  # asked before the change: with it or without, either is right
    assert second != before and second == engine.our_hashes(["docs"])["docs"]
    assert engine.db.scalar("SELECT count(*) FROM files WHERE path = 'new.txt'") == 1


@pytest.mark.parametrize("path", ["../outside.txt", "/etc/passwd", ".ironsync/versions/x"])
@pytest.mark.parametrize("kind", [GetChunkList, GetChunks])
def test_a_peer_asking_for_an_unsafe_path_is_refused_logged_and_disconnected(
    node: Node, path: str, kind: type
) -> None:
    service, engine, violations = make_service(node)
    args: tuple[Any, ...] = ("docs", path, HASH)
    if kind is GetChunks:
        args += ((),)
    request = kind(*args, request_id=3)
    replies = Replies()

    with pytest.raises(PeerError) as caught:
        asyncio.run(service.handle(Link("mallory"), request, replies))

    assert caught.value.code == "violation" and replies.sent == []
    assert violations and violations[0][0] == "mallory"
    refused = [e for e in ev.last_events(engine.db, 10) if e.kind == "peer_refused"]
    assert refused and refused[-1].peer == "mallory"
    assert path in refused[-1].detail["reason"]  # type: ignore[index]
