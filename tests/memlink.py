"""An in-memory PeerLink: two nodes in one process, no sockets, for tests of the sync layer.

`MemoryLink(peer_id, handler, local_id=...)` is this node's link to `peer_id`. Each request is
given the next request id, then handed to the serving side's handler, which is either a
`RequestHandler` (its `handle(link, request, respond)`) or a plain async callable with the same
arguments; `link` is the serving side's view of us (`reverse`, whose peer_id is `local_id`).
Replies flow back through a bounded queue, so a handler that runs ahead waits as it would on a
full socket buffer. An Error reply, a PeerError raised by the handler, or any other exception
(as Error "internal") raises PeerError(peer_id, code, message) on our side, as link.py says.

`link_pair(a_id, a_handler, b_id, b_handler)` makes both directions of one connection.

What tests can look at or change:
- `requests`: every request sent, with its assigned id; `notices`: every ChangeNotice sent;
- `chunk_bytes` / `chunk_messages`: ChunkData and FileData bytes and messages the peer sent us;
- `tamper(reply) -> reply | None`: rewrites (or drops, with None) each reply the peer sends,
  to play a faulty peer;
- `encode=True`: every message goes through the real wire encoding and back;
- `close()`: later requests raise PeerError "disconnected".
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from ironsync.protocol import (
    ChangeNotice,
    ChunkData,
    Error,
    FileData,
    LocalProtocolError,
    Message,
    Reply,
    Request,
)
from ironsync.protocol.limits import MAX_REQUEST_ID, MAX_TEXT_LEN
from ironsync.protocol.wire import decode_body, encode_frame
from ironsync.sync.link import PeerError

Handle = Callable[[Any, Request, Any], Awaitable[None]]


class _QueueResponder:
    """The Responder a handler gets: checks the replies and queues them for the requester."""

    def __init__(self, link: MemoryLink, request: Request, queue: asyncio.Queue[Reply]) -> None:
        self._link = link
        self._request = request
        self._queue = queue
        self.finished = False

    async def send(self, reply: Reply) -> None:
        if self.finished:
            raise RuntimeError(f"{type(reply).__name__} sent after the final reply")
        if reply.request_id != self._request.request_id:
            raise RuntimeError(
                f"{type(reply).__name__} carries request id {reply.request_id}, "
                f"the request has {self._request.request_id}"
            )
        if reply.is_final():
            self.finished = True
        await self._link._deliver(reply, self._queue)

    async def send_error(self, code: str, message: str) -> None:
        self.finished = True
        try:
            error = Error(code, message[:MAX_TEXT_LEN], request_id=self._request.request_id)
        except LocalProtocolError:  # a code outside [A-Za-z0-9_.-]: a bug of the handler
            text = f"{code!r}: {message}"[:MAX_TEXT_LEN]
            error = Error("internal", text, request_id=self._request.request_id)
        await self._link._deliver(error, self._queue, tamper=False)


class MemoryLink:
    """This node's link to `peer_id`, whose requests are served by `handler` in-process."""

    def __init__(
        self,
        peer_id: str,
        handler: Any,
        *,
        local_id: str = "local",
        peer_storages: tuple[str, ...] = (),
        tamper: Callable[[Reply], Reply | None] | None = None,
        encode: bool = False,
        reply_buffer: int = 16,
    ) -> None:
        self._peer_id = peer_id
        self._peer_storages = peer_storages
        self._handler = handler
        self.local_id = local_id
        self.tamper = tamper
        self.encode = encode
        self.reply_buffer = reply_buffer
        self.reverse: MemoryLink | None = None
        self.requests: list[Request] = []
        self.notices: list[ChangeNotice] = []
        self.chunk_bytes = 0
        self.chunk_messages = 0
        self.closed: str | None = None
        self._next_id = 0

    # --- PeerLink ------------------------------------------------------------------------------

    @property
    def peer_id(self) -> str:
        return self._peer_id

    @property
    def peer_storages(self) -> tuple[str, ...]:
        return self._peer_storages

    async def request(self, message: Request) -> Reply:
        async for reply in self.stream(message):
            if reply.is_final():
                return reply
        raise AssertionError("stream ended without a final reply")

    async def stream(self, message: Request) -> AsyncIterator[Reply]:
        if self.closed is not None or self._handler is None:
            raise PeerError(self.peer_id, "disconnected", self.closed or "no handler")
        self._next_id = self._next_id % MAX_REQUEST_ID + 1
        request = dataclasses.replace(message, request_id=self._next_id)
        request = self._through_wire(request)
        self.requests.append(request)
        queue: asyncio.Queue[Reply] = asyncio.Queue(maxsize=self.reply_buffer)
        responder = _QueueResponder(self, request, queue)
        task = asyncio.create_task(self._serve(request, responder))
        try:
            while True:
                reply = await queue.get()
                if isinstance(reply, Error):
                    raise PeerError(self.peer_id, reply.code, reply.message)
                yield reply
                if reply.is_final():
                    return
        finally:
            if not task.done():
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def notify(self, message: ChangeNotice) -> None:
        if self.closed is not None:
            raise PeerError(self.peer_id, "disconnected", self.closed)
        self.notices.append(message)
        notice = getattr(self._handler, "notice", None)
        if notice is not None:
            await notice(self._reverse(), message)

    async def close(self, reason: str = "bye") -> None:
        self.closed = reason

    # --- the serving side ----------------------------------------------------------------------

    def _reverse(self) -> MemoryLink:
        if self.reverse is None:
            self.reverse = MemoryLink(self.local_id, None, local_id=self.peer_id)
            self.reverse.reverse = self
        return self.reverse

    async def _serve(self, request: Request, responder: _QueueResponder) -> None:
        handle: Handle = getattr(self._handler, "handle", self._handler)
        try:
            await handle(self._reverse(), request, responder)
            if not responder.finished:
                raise RuntimeError(f"handler returned without a final reply to {request!r}")
        except PeerError as exc:
            await responder.send_error(exc.code, exc.message)
        except Exception as exc:
            await responder.send_error("internal", repr(exc))

    async def _deliver(
        self, reply: Reply, queue: asyncio.Queue[Reply], *, tamper: bool = True
    ) -> None:
        if tamper and self.tamper is not None:
            changed = self.tamper(reply)
            if changed is None:
                return
            reply = changed
        reply = self._through_wire(reply)
        if isinstance(reply, ChunkData | FileData):
            self.chunk_bytes += len(reply.data)
            self.chunk_messages += 1
        await queue.put(reply)

    def _through_wire(self, message: Any) -> Any:
        if not self.encode:
            return message
        frame = b"".join(encode_frame(message))
        decoded: Message = decode_body(memoryview(frame)[4:])
        return decoded


def link_pair(
    a_id: str, a_handler: Any, b_id: str, b_handler: Any, **options: Any
) -> tuple[MemoryLink, MemoryLink]:
    """Both directions of one connection: (a's link to b, b's link to a)."""
    a_to_b = MemoryLink(b_id, b_handler, local_id=a_id, **options)
    b_to_a = MemoryLink(a_id, a_handler, local_id=b_id, **options)
    a_to_b.reverse, b_to_a.reverse = b_to_a, a_to_b
    return a_to_b, b_to_a
