"""What the sync layer needs from a connection to a peer, and what it offers to one.

The sync layer never touches sockets: `ironsync.net` implements `PeerLink` over TLS (and tests
implement it in memory), and calls a `RequestHandler` for every request a peer sends. Keeping
the seam here lets full sync, transfers and serving be tested without a network, and keeps the
layer order of shared/DESIGN.md (net imports sync, never the reverse).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from ironsync.protocol import ChangeNotice, Reply, Request


class PeerError(Exception):
    """A request to a peer failed: it answered with an Error, or the link went away."""

    def __init__(self, peer: str, code: str, message: str) -> None:
        self.peer = peer
        self.code = code
        self.message = message
        super().__init__(f"peer {peer}: {code}: {message}")


class PeerLink(Protocol):
    """An established, authenticated connection to one peer (Hello already exchanged)."""

    @property
    def peer_id(self) -> str:
        """The peer's node id, as proven by its certificate and its Hello."""
        ...

    @property
    def peer_storages(self) -> tuple[str, ...]:
        """The storage aliases the peer announced in its Hello."""
        ...

    async def request(self, message: Request) -> Reply:
        """Send a request and return its single (final) reply.

        Build requests with any valid request_id (1 will do): the link stamps the
        connection's next free id before sending.

        An `Error` reply raises `PeerError(peer, code, message)`; so does a closed link
        (code "disconnected")."""
        ...

    def stream(self, message: Request) -> AsyncIterator[Reply]:
        """Send a request and yield its replies until the final one (inclusive).

        For GetIndex (IndexPage ... more=False), GetChunkList (ChunkList ... more=False) and
        GetChunks (ChunkData ..., then ChunksDone). Errors raise as in `request`."""
        ...

    async def notify(self, message: ChangeNotice) -> None:
        """Send an unsolicited notice (no reply)."""
        ...

    async def close(self, reason: str = "bye") -> None: ...


class Responder(Protocol):
    """How a handler answers one request: zero or more non-final replies, then a final one."""

    async def send(self, reply: Reply) -> None:
        """Send one reply (waits while the peer's receive buffer is full)."""
        ...


class RequestHandler(Protocol):
    """What a node does with requests and notices from a peer (ironsync.sync.service)."""

    async def handle(self, link: PeerLink, request: Request, respond: Responder) -> None:
        """Answer `request`. Raising PeerError(code, message) sends an Error reply; any other
        exception sends Error("internal", ...) and is logged."""
        ...

    async def notice(self, link: PeerLink, message: ChangeNotice) -> None: ...
