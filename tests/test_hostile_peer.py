"""A group member turned hostile: it offers paths that escape the root. A real daemon must write
nothing outside its storage root, disconnect it, and log why."""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from ironsync.chunking import chunk_bytes
from ironsync.daemon import MAX_SESSIONS_PER_PEER
from ironsync.model import link_hash
from ironsync.net.session import PeerSession, connect, serve
from ironsync.net.tls import load_or_create_identity
from ironsync.protocol import (
    PROTOCOL_VERSION,
    ChangeNotice,
    ChunkData,
    ChunkList,
    ChunkRef,
    ChunksDone,
    FileData,
    FilesDone,
    GetChunkList,
    GetChunks,
    GetFiles,
    GetIndex,
    GetStorageHashes,
    Hello,
    IndexEntry,
    IndexPage,
    Request,
    StorageHashes,
    SyncRequest,
)
from ironsync.sync.link import PeerError, PeerLink, Responder
from tests.daemons import SECRET, SyncNode, tree, write

PAYLOAD = b"written by mallory"
CONTENT = chunk_bytes(PAYLOAD)


class Mallory:
    """Serves an index whose paths try to leave the victim's storage root."""

    def __init__(self, paths: list[str], links: dict[str, str] | None = None) -> None:
        self.paths = paths
        self.links = links or {}  # path -> target: announced as symlinks
        self.index_requests = 0

    async def handle(self, link: PeerLink, request: Request, respond: Responder) -> None:
        rid = request.request_id
        if isinstance(request, GetStorageHashes):
            await respond.send(StorageHashes({"docs": b"\x01" * 16}, request_id=rid))
        elif isinstance(request, GetIndex):
            self.index_requests += 1
            entries = tuple(
                IndexEntry(
                    path=p,
                    size=len(self.links[p].encode()) if p in self.links else len(PAYLOAD),
                    mtime_ns=1_700_000_000 * 10**9,
                    mode=0 if p in self.links else 0o644,
                    hash=link_hash(self.links[p]) if p in self.links else CONTENT.hash,
                    deleted=False,
                    version='{"mallory":1}',
                    modified_by="mallory",
                    sequence=n + 1,
                    kind="symlink" if p in self.links else "file",
                    target=self.links.get(p),
                )
                for n, p in enumerate(self.paths)
            )
            await respond.send(IndexPage("docs", entries, len(entries), False, request_id=rid))
        elif isinstance(request, GetChunkList):
            refs = tuple(ChunkRef(c.offset, c.length, c.hash) for c in CONTENT.chunks)
            await respond.send(
                ChunkList(request.storage, request.path, CONTENT.hash, refs, request_id=rid)
            )
        elif isinstance(request, GetChunks):
            for ref in request.chunks:
                data = PAYLOAD[ref.offset : ref.offset + ref.length]
                await respond.send(ChunkData(ref.offset, ref.hash, data, request_id=rid))
            await respond.send(ChunksDone(request_id=rid))
        elif isinstance(request, GetFiles):  # small files, whole: PAYLOAD is one
            for i in range(len(request.paths)):
                await respond.send(FileData(i, request.file_hash(i), "", PAYLOAD, request_id=rid))
            await respond.send(FilesDone(request_id=rid))
        else:
            raise PeerError(link.peer_id, "unsupported", type(request).__name__)

    async def notice(self, link: PeerLink, message: ChangeNotice) -> None:
        pass


@pytest.fixture
def victim(tmp_path: Path) -> Iterator[SyncNode]:
    node = SyncNode(tmp_path, "victim")
    (tmp_path / "outside").mkdir()
    (node.root / "link").symlink_to(tmp_path / "outside")
    node.start()
    yield node
    if node.proc is not None:
        node.stop()


async def attack(
    victim: SyncNode, tmp_path: Path, paths: list[str], links: dict[str, str] | None = None
) -> tuple[str, Mallory]:
    identity = load_or_create_identity(tmp_path / "mallory", "mallory", victim.group, SECRET)
    hello = Hello(PROTOCOL_VERSION, "mallory", victim.group, ("docs",))
    mallory = Mallory(paths, links)
    session = await connect("127.0.0.1", victim.port, identity, hello, mallory)
    try:
        await session.request(SyncRequest(("docs",), request_id=1))
        outcome = "accepted"
    except PeerError as exc:
        outcome = f"{exc.code}: {exc.message}"
        await asyncio.wait_for(session.wait_closed(), 10)  # the victim hangs up
    else:
        await session.close()
    return outcome, mallory


@pytest.mark.parametrize(
    "path",
    [
        "../escaped.txt",
        "/tmp/absolute.txt",
        "docs/../../escaped.txt",
        ".ignore",
        "x/.ironsync-1.tmp",
    ],
)
def test_path_escape_attempts_disconnect_the_peer_and_write_nothing(
    victim: SyncNode, tmp_path: Path, path: str
) -> None:
    outcome, mallory = asyncio.run(attack(victim, tmp_path, ["innocent.txt", path]))
    assert outcome.startswith("violation"), outcome
    assert mallory.index_requests == 1
    assert tree(victim.root) == {}  # not even the innocent file of a hostile index
    assert not (tmp_path / "escaped.txt").exists()
    assert not Path("/tmp/absolute.txt").exists()
    victim.stop()
    refused = victim.events("peer_refused")
    assert refused and refused[-1]["peer"] == "mallory"


@pytest.mark.parametrize(
    "path", ["a\\b.txt", "c:notes.txt", "new\nline", "-rf", "x" * 255, "caf\u00e9/\U0001f600"]
)
def test_an_odd_but_legal_name_is_synced_and_the_peer_is_not_refused(
    victim: SyncNode, tmp_path: Path, path: str
) -> None:
    """Legal POSIX names are no attack (issue 11): the peer stays connected, the file comes."""
    outcome, _ = asyncio.run(attack(victim, tmp_path, ["innocent.txt", path]))
    assert outcome == "accepted"
    assert tree(victim.root) == {"innocent.txt": PAYLOAD, path: PAYLOAD}
    victim.stop()
    assert victim.events("peer_refused") == []


def test_a_name_too_long_for_the_disk_is_skipped_and_the_peer_is_not_refused(
    victim: SyncNode, tmp_path: Path
) -> None:
    too_long = "\u6587" * 100  # 300 bytes: an exFAT or NTFS disk holds it, ext4 does not
    outcome, _ = asyncio.run(attack(victim, tmp_path, ["innocent.txt", too_long]))
    assert outcome == "accepted"
    assert tree(victim.root) == {"innocent.txt": PAYLOAD}
    victim.stop()
    assert victim.events("peer_refused") == []
    (skipped,) = [e for e in victim.events("skipped") if e["path"] == too_long]
    assert skipped["status"] == "warning" and skipped["peer"] == "mallory"
    assert "300 bytes is too long" in skipped["detail"]["reason"]


def test_symlink_on_the_way_out_of_the_root_is_never_followed(
    victim: SyncNode, tmp_path: Path
) -> None:
    asyncio.run(attack(victim, tmp_path, ["link/escaped.txt", "fine.txt"]))
    assert os.listdir(tmp_path / "outside") == []
    assert tree(victim.root) == {"fine.txt": PAYLOAD}
    victim.stop()
    failed = [e for e in victim.events("write_failed") if e["path"] == "link/escaped.txt"]
    assert failed and "symlink" in failed[-1]["detail"]["reason"]


@pytest.mark.parametrize("target", ["/etc", "../../outside", "OUTSIDE"])
def test_a_link_announced_out_of_the_root_then_written_through_writes_nothing_outside(
    victim: SyncNode, tmp_path: Path, target: str
) -> None:
    """`a -> /etc`, then `a/passwd`: the link is made as a link (its target is only text),
    and nothing is ever written through it (as root too: no permission saves us)."""
    target = str(tmp_path / "outside") if target == "OUTSIDE" else target
    before = os.listdir("/etc")
    passwd = Path("/etc/passwd").read_bytes()
    asyncio.run(attack(victim, tmp_path, ["a", "a/passwd", "a/new.txt"], {"a": target}))
    assert os.readlink(victim.root / "a") == target  # synced as the link it is
    assert os.listdir(tmp_path / "outside") == []
    assert os.listdir("/etc") == before and Path("/etc/passwd").read_bytes() == passwd
    assert not (tmp_path / "a").exists() and not (tmp_path / "passwd").exists()
    victim.stop()
    failed = {e["path"] for e in victim.events("write_failed")}
    written = {e["path"] for e in victim.events("write_finished")}
    assert not written & {"a/passwd", "a/new.txt"}
    assert failed <= {"a/passwd", "a/new.txt"}


class Silent:
    """A member that asks for a sync and then never answers the pull it asked for."""

    def __init__(self) -> None:
        self.asked = asyncio.Event()

    async def handle(self, link: PeerLink, request: Request, respond: Responder) -> None:
        self.asked.set()
        await asyncio.Event().wait()

    async def notice(self, link: PeerLink, message: ChangeNotice) -> None:
        pass


def test_a_member_that_never_answers_its_pull_holds_up_no_other_members_sync(
    victim: SyncNode, tmp_path: Path
) -> None:
    honest = SyncNode(tmp_path, "honest")
    honest.add_peers(victim)
    write(honest.root, "from-honest.txt", "hello")

    async def main() -> float:
        identity = load_or_create_identity(tmp_path / "mallory", "mallory", victim.group, SECRET)
        hello = Hello(PROTOCOL_VERSION, "mallory", victim.group, ("docs",))
        silent = Silent()
        session = await connect("127.0.0.1", victim.port, identity, hello, silent)
        stuck = asyncio.ensure_future(session.request(SyncRequest(("docs",), request_id=1)))
        await asyncio.wait_for(silent.asked.wait(), 10)  # the victim now waits on us
        started = time.monotonic()
        proc = await asyncio.to_thread(honest.run, "sync", "--json", check=False, timeout=30)
        elapsed = time.monotonic() - started
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert not stuck.done()  # still waiting on us all along
        stuck.cancel()
        await session.close()
        return elapsed

    elapsed = asyncio.run(main())

    assert tree(victim.root) == {"from-honest.txt": b"hello"}
    assert elapsed < 20


@asynccontextmanager
async def dialed_by_a_victim(
    tmp_path: Path, on_session: Callable[[PeerSession], Awaitable[None]]
) -> AsyncIterator[SyncNode]:
    """Mallory listening with an escaping path in its index, and a victim daemon that has her
    as its static peer (so it dials her, and dials her again)."""
    identity = load_or_create_identity(tmp_path / "mallory", "mallory", "test-group", SECRET)
    hello = Hello(PROTOCOL_VERSION, "mallory", "test-group", ("docs",))
    server = await serve("127.0.0.1", 0, identity, hello, Mallory(["../escaped.txt"]),
                         on_session)  # fmt: skip
    port = server.sockets[0].getsockname()[1]
    node = SyncNode(tmp_path, "victim")
    node.peers = [f"127.0.0.1:{port}"]
    node.write_config()
    await asyncio.to_thread(node.start)
    try:
        yield node
    finally:
        server.close()
        await asyncio.to_thread(node.stop)


def test_a_peer_the_daemon_dials_that_offers_an_escaping_path_is_refused_and_logged(
    tmp_path: Path,
) -> None:
    async def main() -> SyncNode:
        closed = asyncio.Event()

        async def on_session(session: PeerSession) -> None:
            await session.wait_closed()
            closed.set()

        async with dialed_by_a_victim(tmp_path, on_session) as node:
            await asyncio.wait_for(closed.wait(), 20)  # the daemon hangs up on us
        return node

    node = asyncio.run(main())

    assert not (tmp_path / "escaped.txt").exists()
    refused = node.events("peer_refused")
    assert refused and refused[-1]["peer"] == "mallory"
    assert "escaped.txt" in refused[-1]["detail"]["reason"]


def test_a_member_opening_many_sessions_gets_its_oldest_ones_closed(
    victim: SyncNode, tmp_path: Path
) -> None:
    async def main() -> list[str | None]:
        identity = load_or_create_identity(tmp_path / "mallory", "mallory", victim.group, SECRET)
        hello = Hello(PROTOCOL_VERSION, "mallory", victim.group, ("docs",))
        sessions = []
        for _ in range(MAX_SESSIONS_PER_PEER + 2):
            sessions.append(await connect("127.0.0.1", victim.port, identity, hello, Silent()))
            await asyncio.sleep(0.05)
        for session in sessions[:2]:
            await asyncio.wait_for(session.wait_closed(), 10)
        await asyncio.sleep(0.3)
        reasons = [session.closed_reason for session in sessions]
        answer = await sessions[-1].request(GetStorageHashes(request_id=1))
        assert isinstance(answer, StorageHashes)  # the newest ones are served
        for session in sessions[2:]:
            await session.close()
        return reasons

    reasons = asyncio.run(main())

    said = f"more than {MAX_SESSIONS_PER_PEER} sessions with mallory: oldest closed"
    assert reasons == [f"peer said goodbye: {said}"] * 2 + [None] * MAX_SESSIONS_PER_PEER


def test_a_dialed_peer_that_keeps_violating_is_dialed_again_only_after_a_growing_pause(
    tmp_path: Path,
) -> None:
    async def main() -> tuple[SyncNode, list[float]]:
        opened: list[float] = []

        async def on_session(session: PeerSession) -> None:
            opened.append(time.monotonic())

        async with dialed_by_a_victim(tmp_path, on_session) as node:
            await asyncio.sleep(9)
        return node, opened

    node, opened = asyncio.run(main())

    # 5 s (jittered down to 2.5 s at least) after the first violation, then 10 s: without
    # the pause it was redialed at once, dozens of times in these 9 s
    assert 1 <= len(opened) <= 3, opened
    gaps = [b - a for a, b in itertools.pairwise(opened)]
    assert all(gap >= 2.5 for gap in gaps), gaps
    refused = node.events("peer_refused")
    assert len(refused) == len(opened) and not (tmp_path / "escaped.txt").exists()
