"""Peer sessions: `ironsync.sync.link.PeerLink` over TLS, glued to the sans-IO Connection.

Theory of operation
-------------------
A PeerSession is the asyncio Protocol of one TCP connection. It moves bytes and applies flow
control; every protocol decision is the Connection's. Input is two lines: `buffer_updated`
hands what TLS decrypted into the session's read buffer to `Connection.receive_data`, and
`_process` hands each message that comes out to whoever waits for it. Output is one:
`transport.writelines(conn.send_buffers(message))`, so a ChunkData's bytes go from the
caller's buffer straight to TLS.

Establishing a session (`connect` dials, `serve` accepts), all under one timeout:
1. TCP, then TLS 1.3 with the group CA (ironsync.net.tls): a node without the group secret
   fails here and gets no byte of ours. The server starts TLS itself (`loop.start_tls`) rather
   than letting asyncio do it, so that a failed handshake reaches `on_refused`.
2. The node id in the peer's certificate must not be ours: that is a node dialing itself.
3. The client sends its Hello; the server checks it (same group, node id = certificate) before
   it answers with its own; the client checks that one the same way. A refusal sends a fatal
   Error with the reason (the Connection allows one even before our Hello) and closes.

Once open, the session dispatches what arrives:
- a reply goes to the request waiting for it: a future for `request`, a queue for `stream`
  (replies to a request the caller gave up on are dropped);
- a request runs `handler.handle` in a task of its own, at most MAX_HANDLERS at once; up to
  MAX_WAITING_REQUESTS more (and MAX_WAITING_BYTES of them) wait for a slot, and a request
  beyond those is answered at once with Error "busy" (no honest node has that many in flight);
- ChangeNotices go to `handler.notice` one at a time, in order, coalesced per storage;
- Goodbye, a fatal Error, end of stream or a lost connection close the session and fail every
  pending request with PeerError(peer, "disconnected", reason);
- a RemoteProtocolError (malformed, oversized or out-of-order frame) sends a fatal Error,
  closes this session only and is logged; `closed_reason` says why.

Flow control, both ways (uvicorn keeps the same two small mechanisms):
- Out: the TLS transport buffers up to WRITE_BUFFER_HIGH bytes; `pause_writing` /
  `resume_writing` flip an Event that senders await, before they write, only while the
  buffer is over the mark, so a stream of small replies costs no `drain()` per message, and
  the buffer holds at most WRITE_BUFFER_HIGH plus one message (replies and Error replies
  alike: a peer that sends requests and never reads the answers fills no memory of ours).
- In: replies waiting for a slow stream consumer are counted (`buffered_bytes`, about the
  memory their decoded objects take, not their frames). Over STREAM_BUFFER_HIGH the session
  stops reading the socket (TCP then stops the sender) until consumers bring it under
  STREAM_BUFFER_LOW. Reading also stops while requests wait for a handler slot and the peer
  is not reading our replies (the write buffer is over its mark): it gets no further until it
  reads. So a peer makes this process hold at most STREAM_BUFFER_HIGH of replies, the
  requests in handlers and MAX_WAITING_BYTES waiting, plus what one read completes (READ_SIZE,
  and a frame of up to MAX_FRAME_SIZE begun before).

Reading does not stop just because requests wait for a slot: a handler may itself wait for a
reply from the same peer (a SyncRequest makes us pull from it), and that reply must get in.

Reply timeouts: a request of ours that gets no reply (or, for a stream, no next reply) within
REPLY_TIMEOUT seconds while we read (SLOW_REPLY_TIMEOUT for a GetStorageHashes that may make
the peer rescan, and for SyncRequest: their answers may take long) means the peer is stalling
it: the session is closed with a fatal Error "timeout", every pending request fails with
"disconnected", and the reason says which request timed out. Time spent not reading (our flow
control) does not count.

The price of one TCP stream without per-request windows: while reading is stopped, nothing
else arrives either. A stream consumer must keep taking its replies; one that stops to wait
for another reply from the same peer can wait forever once the buffer is full.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import random
import ssl
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import NoReturn

from ironsync.net.tls import (
    NodeIdentity,
    PeerIdentityError,
    client_context,
    peer_node_id,
    server_context,
)
from ironsync.protocol import (
    CONNECTION_CLOSED,
    NEED_DATA,
    ChangeNotice,
    ChunkData,
    ChunkList,
    ChunkRefs,
    Connection,
    Error,
    FileData,
    GetChunks,
    GetFiles,
    GetStorageHashes,
    Goodbye,
    Hello,
    IndexPage,
    LocalProtocolError,
    Message,
    RemoteProtocolError,
    Reply,
    Request,
    Role,
    State,
    SyncRequest,
)
from ironsync.protocol.limits import CHUNK_REF_SIZE, MAX_TEXT_LEN, KiB, MiB
from ironsync.sync.link import PeerError, RequestHandler

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0
"""Seconds from dialing (or accepting) to an open session: TCP, TLS and both Hellos."""

MAX_HANDSHAKES = 64
"""Accepted connections in their handshake at once; more are closed at once (no byte sent)."""

MAX_HANDSHAKES_PER_HOST = 8
"""... from one IP address."""

CLOSE_TIMEOUT = 5.0
"""Seconds a closing session may spend flushing and saying goodbye before it is aborted."""

READ_SIZE = 256 * KiB
"""Bytes of decrypted data handed to the Connection at most at once."""

WRITE_BUFFER_HIGH = 4 * MiB
"""Bytes buffered for the peer before senders wait."""

STREAM_BUFFER_HIGH = 8 * MiB
"""Bytes of replies waiting for stream consumers at which the session stops reading."""

STREAM_BUFFER_LOW = 4 * MiB
"""... and at or below which it reads again."""

MAX_HANDLERS = 16
"""Peer requests handled at once; the next ones wait for a slot."""

MAX_WAITING_REQUESTS = 256
"""Peer requests waiting for a handler slot; one more is answered with Error "busy"."""

MAX_WAITING_BYTES = 8 * MiB
"""... and the memory those waiting requests may take (see `_held_size`)."""

MAX_PENDING_NOTICES = 1024
"""Storages with an undelivered ChangeNotice; notices for more storages are dropped."""

REPLY_TIMEOUT = 60.0
"""Seconds a request for data (GetStorageHashes, GetIndex, GetChunkList, GetChunks, GetFiles) may
wait for its first reply or for the next one of its stream, while we read: then the peer is
stalling and the session is closed (such a reply is read from the index or the disk)."""

SLOW_REPLY_TIMEOUT = 900.0
"""... the same for requests whose answer may take a long while: GetStorageHashes with
`rescan` (the peer scans first) and SyncRequest (the peer pulls from us first; any message
from it counts as progress)."""


class HandshakeError(ConnectionError):
    """The peer was reached but no session was established; `reason` says why."""

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(f"{address}: {reason}")
        self.address = address
        self.reason = reason


class SelfConnection(HandshakeError):
    """The peer is this node (its certificate names our node id): never worth retrying."""


def hello_refusal(ours: Hello, theirs: Hello, certified_id: str) -> tuple[str, str] | None:
    """Why a peer whose certificate names `certified_id` and who sent `theirs` is refused, as
    (error code, reason), or None when it is welcome."""
    if theirs.group != ours.group:
        return "wrong_group", f"peer is in group {theirs.group!r}, not {ours.group!r}"
    if theirs.node_id != certified_id:
        return (
            "identity_mismatch",
            f"peer says it is {theirs.node_id!r} but its certificate names {certified_id!r}",
        )
    if theirs.node_id == ours.node_id:
        return "self_connection", f"peer claims our own node id {ours.node_id!r}"
    return None


def backoff_delay(failures: int, initial: float, maximum: float, rng: random.Random) -> float:
    """Seconds to wait after `failures` failed attempts in a row: exponential from `initial`,
    capped at `maximum`, then jittered down by up to half so peers don't retry in step."""
    ceiling = min(maximum, initial * 2.0 ** min(failures - 1, 64))
    return ceiling * rng.uniform(0.5, 1.0)


class PeerSession(asyncio.BufferedProtocol):
    """One connection to a peer; a `PeerLink` once open (see the module docstring)."""

    def __init__(
        self,
        role: Role,
        hello: Hello,
        handler: RequestHandler,
        *,
        on_connected: Callable[[PeerSession], None] | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._conn = Connection(role)
        self._our_hello = hello
        self._handler = handler
        self._on_connected = on_connected
        self.address = "?"
        self.host = "?"
        self._phase = "TCP connect"
        self._transport: asyncio.Transport | None = None
        self._tls = False
        self._certified_id = ""
        self.peer_fingerprint = ""  # SHA-256 of the peer's certificate, hex, once TLS is up
        self._peer_id = ""
        self._hello_waiter: asyncio.Future[Hello] = self._loop.create_future()
        self._open = False
        self._closed = False
        self._transport_closed = False
        self._abort_timer: asyncio.TimerHandle | None = None
        self._lost: asyncio.Future[None] = self._loop.create_future()
        self.closed_reason: str | None = None
        self.bytes_in = 0
        # TLS decrypts straight into this (asyncio's BufferedProtocol path), which spares a
        # buffer allocation per TLS record and a join per read.
        self._read_buffer = memoryview(bytearray(READ_SIZE))
        self._into_frame = False  # the last get_buffer gave the Connection's frame buffer
        self.bytes_out = 0
        # Out: set while the transport takes more; see pause_writing.
        self._can_write = asyncio.Event()
        self._can_write.set()
        # In: our requests waiting for replies, and what they hold.
        self._pending: dict[int, _ReplyWaiter | _ReplyQueue] = {}
        self._buffered = 0
        self._reading = True
        # In: the peer's requests and notices.
        self._waiting_requests: deque[Request] = deque()
        self._waiting_bytes = 0
        self._handlers = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._notices: dict[str, ChangeNotice] = {}
        self._notice_task: asyncio.Task[None] | None = None
        # Reply timeouts: one timer while requests of ours wait (see _check_replies).
        self._watchdog: asyncio.TimerHandle | None = None
        self._requests_sent = 0
        self._last_message_at = self._loop.time()

    def __repr__(self) -> str:
        peer = self.peer_id or "?"
        state = "closed" if self._closed else "open" if self._open else self._phase
        return f"<PeerSession {peer} at {self.address}: {state}>"

    # --- PeerLink ----------------------------------------------------------------------------

    @property
    def peer_id(self) -> str:
        """The peer's node id, as proven by its certificate and its Hello ("" before)."""
        return self._peer_id

    @property
    def peer_storages(self) -> tuple[str, ...]:
        """The storage aliases the peer announced in its Hello."""
        hello = self._conn.their_hello
        return hello.storages if hello is not None else ()

    async def request(self, message: Request) -> Reply:
        """Send `message` (the session stamps its request id) and return its final reply.

        An Error reply raises PeerError(peer, code, message); so does a closed session (code
        "disconnected"). A request answered by a stream of replies needs `stream`; here its
        first reply raises LocalProtocolError."""
        waiter = _ReplyWaiter(self._loop.create_future())
        self._send_request(message, waiter)
        reply = await waiter.future
        if isinstance(reply, Error):
            raise PeerError(self.peer_id, reply.code, reply.message)
        return reply

    def stream(self, message: Request) -> AsyncIterator[Reply]:
        """Send `message` now and iterate over its replies until the final one (inclusive).

        Errors raise as in `request`. Replies not yet taken count against STREAM_BUFFER_HIGH:
        keep taking them, or `aclose()` the iterator to drop the rest."""
        replies = _ReplyQueue(self)
        self._send_request(message, replies)
        return _ReplyStream(replies)

    async def notify(self, message: ChangeNotice) -> None:
        """Send a ChangeNotice (no reply)."""
        if not isinstance(message, ChangeNotice):
            raise LocalProtocolError(f"notify sends ChangeNotice, not {type(message).__name__}")
        await self._send(message)

    async def close(self, reason: str = "bye") -> None:
        """Say Goodbye, close, and wait (at most about CLOSE_TIMEOUT) until the connection is
        gone. Pending requests fail with PeerError(peer, "disconnected", reason)."""
        if not self._closed:
            if self._conn.our_state is State.READY:
                with contextlib.suppress(LocalProtocolError):
                    self._write(Goodbye(reason[:MAX_TEXT_LEN]))
            self._shutdown(reason)
        await self.wait_closed()

    # --- status ------------------------------------------------------------------------------

    @property
    def is_closed(self) -> bool:
        return self._closed

    @property
    def buffered_bytes(self) -> int:
        """Bytes (about the frames' size) of replies received and not yet taken by streams."""
        return self._buffered

    @property
    def is_reading(self) -> bool:
        """False while flow control keeps the session from reading the socket."""
        return self._reading and not self._closed

    async def wait_closed(self) -> None:
        """Return once the session is closed and its connection gone; see `closed_reason`."""
        await asyncio.shield(self._lost)

    # --- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The TCP connection (start_tls does not call this again for the TLS transport).
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()  # nothing is read before TLS starts
        self._transport = transport
        peername = transport.get_extra_info("peername")
        self.address = _format_address(peername)
        self.host = str(peername[0]) if isinstance(peername, tuple) and peername else self.address
        if self._on_connected is not None:
            self._on_connected(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        # A large frame under way is decrypted straight into its own buffer (no copy).
        frame = self._conn.frame_buffer()
        self._into_frame = frame is not None
        return self._read_buffer if frame is None else frame

    def buffer_updated(self, nbytes: int) -> None:
        # Only ever decrypted data: reading the TCP connection stays paused until TLS runs.
        # The first may arrive with the end of the TLS handshake, before start_tls returns:
        # it waits in the Connection until the Hello exchange asks for it.
        if self._closed:
            return
        self.bytes_in += nbytes
        if self._into_frame:
            self._conn.frame_received(nbytes)
        else:
            self._conn.receive_data(self._read_buffer[:nbytes])  # copied: the buffer is reused
        if self._tls:
            self._process()

    def eof_received(self) -> bool | None:
        if not self._closed:
            self._conn.receive_data(b"")
            if self._tls:
                self._process()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport_closed = True
        reason = "peer closed the connection" if exc is None else f"connection lost: {exc}"
        self._shutdown(reason)
        if self._abort_timer is not None:
            self._abort_timer.cancel()
        if not self._lost.done():
            self._lost.set_result(None)

    def pause_writing(self) -> None:
        self._can_write.clear()
        if self._open:
            self._update_reading()

    def resume_writing(self) -> None:
        self._can_write.set()
        if self._open:
            self._update_reading()

    # --- establishing ------------------------------------------------------------------------

    async def _start_tls(self, context: ssl.SSLContext, *, server_side: bool) -> None:
        raw = self._transport
        assert raw is not None
        self._phase = "TLS handshake"
        try:
            transport = await self._loop.start_tls(
                raw, self, context, server_side=server_side, ssl_shutdown_timeout=CLOSE_TIMEOUT
            )
        except (OSError, EOFError) as exc:  # ssl.SSLError is an OSError
            self._shutdown(f"TLS handshake failed: {exc}")
            raise HandshakeError(self.address, f"TLS handshake failed: {exc}") from exc
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._tls = True
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        try:
            ssl_object = transport.get_extra_info("ssl_object")
            self._certified_id = peer_node_id(ssl_object)
            der = ssl_object.getpeercert(binary_form=True)
            self.peer_fingerprint = hashlib.sha256(der).hexdigest() if der else ""
        except PeerIdentityError as exc:
            self._refuse("bad_certificate", str(exc))

    async def _exchange_hellos(self, our_node_id: str) -> None:
        """Steps 2 and 3 of the module docstring, for either side."""
        if self._certified_id == our_node_id:
            self._refuse(
                "self_connection",
                f"the peer's certificate names this node ({our_node_id}): a connection to itself",
                SelfConnection,
            )
        self._phase = "Hello exchange"
        if self._conn.our_role is Role.CLIENT:
            self._write_hello()
        self._process()  # a Hello that came with the end of the TLS handshake
        theirs = await self._hello_waiter
        refusal = hello_refusal(self._our_hello, theirs, self._certified_id)
        if refusal is not None:
            self._refuse(*refusal)
        if self._conn.our_role is Role.SERVER:
            self._write_hello()
        self._open = True
        self._phase = "open"
        self._peer_id = theirs.node_id
        log.info("%s: session open", self._who())
        self._update_reading()
        self._process()  # what the peer sent after its Hello

    def _write_hello(self) -> None:
        if self._closed:
            raise HandshakeError(self.address, self.closed_reason or "closed")
        self._write(self._our_hello)

    def _refuse(
        self, code: str, reason: str, error: type[HandshakeError] = HandshakeError
    ) -> NoReturn:
        self._write_fatal(code, reason)
        self._shutdown(reason)
        raise error(self.address, reason)

    # --- receiving ---------------------------------------------------------------------------

    def _process(self) -> None:
        conn = self._conn
        while not self._closed:
            if not self._open and conn.their_hello is not None:
                return  # the rest waits until the Hello is accepted
            try:
                event = conn.next_event()
            except RemoteProtocolError as exc:
                log.warning("%s: protocol error: %s", self._who(), exc.reason)
                self._write_fatal("protocol_error", exc.reason)
                self._shutdown(f"protocol error: {exc.reason}")
                return
            if event is NEED_DATA:
                return
            if event is CONNECTION_CLOSED:
                self._shutdown("peer closed the connection")
                return
            assert isinstance(event, Message)
            self._last_message_at = self._loop.time()
            if self._open:
                self._dispatch(event)
            else:
                self._first_message(event)

    def _first_message(self, message: Message) -> None:
        # The Connection allows only these three before the Hello.
        if isinstance(message, Hello):
            self._set_reading(False)
            self._hello_waiter.set_result(message)
        elif isinstance(message, Error):
            self._shutdown(f"refused by the peer: {message.code}: {message.message}")
        elif isinstance(message, Goodbye):
            self._shutdown(f"peer said goodbye: {message.reason}")

    def _dispatch(self, message: Message) -> None:
        if isinstance(message, Reply):
            if isinstance(message, Error) and message.is_fatal:
                self._shutdown(f"peer sent error {message.code}: {message.message}")
                return
            request_id = message.request_id
            if message.is_final():
                sink = self._pending.pop(request_id, None)
            else:
                sink = self._pending.get(request_id)
            if sink is not None:
                sink.deliver(message)
        elif isinstance(message, Request):
            size = _held_size(message)
            if self._handlers < MAX_HANDLERS:
                self._start_handler(message)
            elif (
                len(self._waiting_requests) < MAX_WAITING_REQUESTS
                and self._waiting_bytes + size <= MAX_WAITING_BYTES
            ):
                self._waiting_requests.append(message)
                self._waiting_bytes += size
                self._update_reading()
            else:
                self._reply_error(
                    message.request_id,
                    "busy",
                    f"{MAX_HANDLERS} requests are being handled and "
                    f"{len(self._waiting_requests)} wait; send fewer at once",
                )
        elif isinstance(message, ChangeNotice):
            self._queue_notice(message)
        elif isinstance(message, Goodbye):
            self._shutdown(f"peer said goodbye: {message.reason}")

    def _update_reading(self) -> None:
        if self._reading:
            wanted = self._buffered < STREAM_BUFFER_HIGH
        else:
            wanted = self._buffered <= STREAM_BUFFER_LOW
        # Requests pile up and the peer does not read the answers: it gets no further.
        stuck = bool(self._waiting_requests) and not self._can_write.is_set()
        self._set_reading(wanted and self._open and not stuck)

    def _set_reading(self, wanted: bool) -> None:
        if wanted == self._reading or self._closed:
            return
        self._reading = wanted
        assert self._transport is not None
        if wanted:
            now = self._loop.time()  # no reply could arrive while we did not read
            for sink in self._pending.values():
                sink.progress_at = now
            self._transport.resume_reading()
        else:
            self._transport.pause_reading()

    def _hold(self, size: int) -> None:
        self._buffered += size
        if self._reading and self._buffered >= STREAM_BUFFER_HIGH:
            self._update_reading()

    def _release(self, size: int) -> None:
        self._buffered -= size
        if not self._reading:
            self._update_reading()

    # --- the peer's requests and notices -----------------------------------------------------

    def _start_handler(self, request: Request) -> None:
        self._handlers += 1
        self._spawn(self._serve_request(request))

    def _spawn(self, coroutine: Awaitable[None]) -> asyncio.Task[None]:
        task = self._loop.create_task(coroutine)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _serve_request(self, request: Request) -> None:
        request_id = request.request_id
        try:
            failure = await self._run_handler(request)
            del request  # not held while the reply waits for the peer to read
            if failure is not None:
                self._reply_error(request_id, *failure)
                # The slot is kept until the peer reads: errors are flow-controlled too.
                while not self._can_write.is_set() and not self._closed:
                    await self._can_write.wait()
        finally:
            self._handlers -= 1
            if self._waiting_requests and not self._closed:
                waiting = self._waiting_requests.popleft()
                self._waiting_bytes -= _held_size(waiting)
                self._start_handler(waiting)
                self._update_reading()

    async def _run_handler(self, request: Request) -> tuple[str, str] | None:
        """Run the handler; the (code, message) of the Error to send if it did not answer."""
        request_id = request.request_id
        try:
            await self._handler.handle(self, request, _Responder(self, request_id))
        except PeerError as exc:
            log.debug("%s: %s refused: %s", self._who(), type(request).__name__, exc)
            return exc.code, exc.message
        except Exception as exc:
            log.exception("%s: handler failed on %r", self._who(), request)
            return "internal", f"{type(exc).__name__}: {exc}"
        if request_id in self._conn.their_requests_in_flight and not self._closed:
            log.error("%s: handler sent no final reply to %r", self._who(), request)
            return "internal", "the handler sent no final reply"
        return None

    def _reply_error(self, request_id: int, code: str, message: str) -> None:
        if self._closed or request_id not in self._conn.their_requests_in_flight:
            return  # gone, or the handler failed after its final reply
        message = message[:MAX_TEXT_LEN]
        try:
            error = Error(code, message, request_id=request_id)
        except LocalProtocolError:  # a code that is no identifier
            error = Error("internal", f"{code}: {message}"[:MAX_TEXT_LEN], request_id=request_id)
        self._write(error)

    def _queue_notice(self, notice: ChangeNotice) -> None:
        queued = self._notices.get(notice.storage)
        if queued is None and len(self._notices) >= MAX_PENDING_NOTICES:
            log.warning("%s: too many pending notices, dropped %r", self._who(), notice)
            return
        if queued is None or notice.sequence > queued.sequence:
            self._notices[notice.storage] = notice
        if self._notice_task is None:
            self._notice_task = self._spawn(self._deliver_notices())

    async def _deliver_notices(self) -> None:
        try:
            while self._notices:
                storage = next(iter(self._notices))
                notice = self._notices.pop(storage)
                try:
                    await self._handler.notice(self, notice)
                except Exception:
                    log.exception("%s: notice handler failed on %r", self._who(), notice)
        finally:
            self._notice_task = None

    # --- sending -----------------------------------------------------------------------------

    def _write(self, message: Message) -> None:
        """Write one message now (no waiting); raises PeerError once closed."""
        if self._closed:
            raise self._disconnected()
        buffers = self._conn.send_buffers(message)
        assert self._transport is not None
        self._transport.writelines(buffers)
        self.bytes_out += sum(map(len, buffers))

    async def _send(self, message: Message) -> None:
        """Wait while the transport's buffer is over its mark, then write one message. (All
        waiting senders wake together; each looks again, so only one writes past the mark.)"""
        while not self._can_write.is_set():
            await self._drain()
        self._write(message)

    async def _drain(self) -> None:
        await self._can_write.wait()
        if self._closed:
            raise self._disconnected()

    def _send_request(self, message: Request, sink: _ReplyWaiter | _ReplyQueue) -> None:
        if not isinstance(message, Request):
            raise LocalProtocolError(f"{type(message).__name__} is not a request")
        if self._closed:
            raise self._disconnected()
        message = dataclasses.replace(message, request_id=self._conn.next_request_id())
        self._write(message)
        sink.watch(message, self._loop.time(), first=not self._requests_sent)
        self._requests_sent += 1
        self._pending[message.request_id] = sink
        if self._watchdog is None:
            self._watchdog = self._loop.call_later(REPLY_TIMEOUT / 4, self._check_replies)

    def _check_replies(self) -> None:
        """Close the session if a request of ours got no reply (or no next reply of its
        stream) within its timeout while we were reading: the peer is stalling it."""
        self._watchdog = None
        if self._closed or not self._pending:
            return
        if self._reading:
            now = self._loop.time()
            for sink in self._pending.values():
                last = sink.progress_at
                if sink.any_message_counts:
                    last = max(last, self._last_message_at)
                if now - last > sink.timeout:
                    reason = f"no reply to {sink.what} in {sink.timeout:g} s"
                    log.warning("%s: %s; closing the session", self._who(), reason)
                    self._write_fatal("timeout", reason)
                    self._shutdown(reason)
                    return
        self._watchdog = self._loop.call_later(REPLY_TIMEOUT / 4, self._check_replies)

    def _write_fatal(self, code: str, reason: str) -> None:
        if not self._tls or self._closed:
            return  # never a byte of ours on a connection without TLS
        try:
            data = self._conn.send(Error(code, reason[:MAX_TEXT_LEN]))
        except LocalProtocolError:
            return  # we already said Goodbye
        assert self._transport is not None
        self._transport.write(data)
        self.bytes_out += len(data)

    def _who(self) -> str:
        return f"peer {self.peer_id} at {self.address}" if self.peer_id else self.address

    def _disconnected(self) -> PeerError:
        return PeerError(self.peer_id or self.address, "disconnected", self.closed_reason or "")

    # --- closing -----------------------------------------------------------------------------

    def _shutdown(self, reason: str) -> None:
        """End the session (once): fail what waits, stop the tasks, close the transport."""
        if self._closed:
            return
        was_open = self._open
        self._closed = True
        self._open = False
        self.closed_reason = reason
        if not self._hello_waiter.done():
            self._hello_waiter.set_exception(HandshakeError(self.address, reason))
            self._hello_waiter.exception()  # retrieved: whoever awaits it still gets it
        error = self._disconnected()
        pending, self._pending = self._pending, {}
        for sink in pending.values():
            sink.fail(error)
        self._waiting_requests.clear()
        self._waiting_bytes = 0
        self._notices.clear()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        self._can_write.set()  # wake senders, who then see the session closed
        if was_open:
            log.info("%s: session closed: %s", self._who(), reason)
        if self._transport is not None and not self._transport_closed:
            self._transport_closed = True
            self._transport.close()  # flushes what is buffered (the last Error, the Goodbye)
            self._abort_timer = self._loop.call_later(CLOSE_TIMEOUT, self._transport.abort)
        elif self._transport is None and not self._lost.done():
            self._lost.set_result(None)


class _Responder:
    """The Responder handed to the handler of one request: stamps the id, then sends."""

    __slots__ = ("_request_id", "_session")

    def __init__(self, session: PeerSession, request_id: int) -> None:
        self._session = session
        self._request_id = request_id

    async def send(self, reply: Reply) -> None:
        if not isinstance(reply, Reply):
            raise LocalProtocolError(f"{type(reply).__name__} is not a reply")
        if reply.request_id != self._request_id:
            reply = dataclasses.replace(reply, request_id=self._request_id)
        await self._session._send(reply)


class _Watched:
    """What the reply timeout knows of a request of ours: what it is, its timeout, when it
    last made progress (sent, or a reply arrived)."""

    __slots__ = ("any_message_counts", "progress_at", "timeout", "what")

    def watch(self, request: Request, now: float, *, first: bool) -> None:
        self.what = type(request).__name__
        # a peer rescans before it answers GetStorageHashes with `rescan`, or the first of a
        # session when its watcher is not healthy (ironsync.sync.service)
        slow = isinstance(request, SyncRequest) or (
            isinstance(request, GetStorageHashes) and (request.rescan or first)
        )
        self.timeout = SLOW_REPLY_TIMEOUT if slow else REPLY_TIMEOUT
        self.any_message_counts = isinstance(request, SyncRequest)
        self.progress_at = now


class _ReplyWaiter(_Watched):
    """Where the single reply of `PeerSession.request` goes."""

    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future[Reply]) -> None:
        self.future = future

    def deliver(self, reply: Reply) -> None:
        if self.future.done():
            return  # the caller gave up, or a stream went on after our error
        if reply.is_final():
            self.future.set_result(reply)
        else:
            self.future.set_exception(
                LocalProtocolError(
                    f"{type(reply).__name__} is one of a stream of replies: use stream()"
                )
            )

    def fail(self, error: PeerError) -> None:
        if not self.future.done():
            self.future.set_exception(error)


class _ReplyQueue(_Watched):
    """Where the replies of `PeerSession.stream` wait for their consumer, in order."""

    def __init__(self, session: PeerSession) -> None:
        self.session = session
        self._replies: deque[tuple[Reply, int]] = deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: PeerError | None = None
        self.done = False

    # The session's side.

    def deliver(self, reply: Reply) -> None:
        self.progress_at = self.session._loop.time()
        if self.done:
            return  # abandoned by the consumer
        size = _held_size(reply)
        self._replies.append((reply, size))
        self._buffered += size
        self.session._hold(size)
        self._wake()

    def fail(self, error: PeerError) -> None:
        self._error = error
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # The consumer's side.

    async def get(self) -> Reply:
        while not self._replies:
            if self._error is not None:
                self.done = True
                raise self._error
            self._waiter = self.session._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        reply, size = self._replies.popleft()
        self._buffered -= size
        self.session._release(size)
        if reply.is_final():
            self.done = True
        return reply

    def abandon(self) -> None:
        """Drop the replies received and still to come."""
        if self.done:
            return
        self.done = True
        self._replies.clear()
        if self._buffered:
            buffered, self._buffered = self._buffered, 0
            self.session._release(buffered)


class _ReplyStream:
    """What `PeerSession.stream` returns: an AsyncIterator over a _ReplyQueue.

    The session holds the queue, not this, so a consumer that drops the iterator (a `break`
    out of `async for`) releases what the queue holds at once."""

    def __init__(self, queue: _ReplyQueue) -> None:
        self._queue = queue
        self._drained = False

    def __aiter__(self) -> _ReplyStream:
        return self

    async def __anext__(self) -> Reply:
        queue = self._queue
        if queue.done:
            raise StopAsyncIteration
        session = queue.session
        if not self._drained:  # our request may be sitting in a full write buffer
            self._drained = True
            if not session._can_write.is_set():
                await session._drain()
        reply = await queue.get()
        if isinstance(reply, Error):
            raise PeerError(session.peer_id, reply.code, reply.message)
        return reply

    async def aclose(self) -> None:
        """Stop iterating: drop the replies received and still to come."""
        self._queue.abandon()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._queue.abandon()


def _held_size(message: Message) -> int:
    """About the memory `message` takes once decoded (measured with tracemalloc: a ChunkRef
    ~140 bytes, or 28 packed in a received ChunkRefs; an IndexEntry ~380 plus its strings),
    which is what waiting for a consumer or a handler holds: a frame of index entries costs
    5 to 7 times less than its objects."""
    if isinstance(message, ChunkData | FileData):
        return 64 + len(message.data)
    if isinstance(message, GetFiles):
        return 256 + len(message.file_hashes) + sum(64 + len(p) for p in message.paths)
    if isinstance(message, IndexPage):
        return 256 + sum(
            384 + len(e.path) + len(e.version) + len(e.modified_by) for e in message.entries
        )
    if isinstance(message, ChunkList | GetChunks):
        per_ref = CHUNK_REF_SIZE if isinstance(message.chunks, ChunkRefs) else 144
        return 256 + len(message.path) + per_ref * len(message.chunks)
    if isinstance(message, SyncRequest):
        return 256 + sum(64 + len(alias) for alias in message.storages)
    return 256 + sum(len(getattr(message, name, "")) for name in ("path", "storage"))


def _format_address(peername: object) -> str:
    if isinstance(peername, tuple) and len(peername) >= 2:
        host, port = peername[0], peername[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peername)


# --- dialing and accepting -------------------------------------------------------------------


async def connect(
    host: str,
    port: int,
    identity: NodeIdentity,
    hello: Hello,
    handler: RequestHandler,
    *,
    timeout: float = HANDSHAKE_TIMEOUT,
) -> PeerSession:
    """Dial a peer and return the open session.

    Raises OSError when the peer can't be reached (ConnectionRefusedError, ...),
    HandshakeError (a ConnectionError) when it was reached but no session came of it (another
    group's certificate, a refused Hello, a timeout), and SelfConnection when it is us."""
    loop = asyncio.get_running_loop()
    session = PeerSession(Role.CLIENT, hello, handler)
    session.address = _format_address((host, port))
    try:
        async with asyncio.timeout(timeout):
            await loop.create_connection(lambda: session, host, port)
            await session._start_tls(client_context(identity), server_side=False)
            await session._exchange_hellos(identity.node_id)
    except TimeoutError:
        reason = f"no session within {timeout:g} s ({session._phase})"
        session._shutdown(reason)
        raise HandshakeError(session.address, reason) from None
    except BaseException:
        session._shutdown("connect failed")
        raise
    return session


async def serve(
    host: str,
    port: int,
    identity: NodeIdentity,
    hello: Hello,
    handler: RequestHandler,
    on_session: Callable[[PeerSession], Awaitable[None]] | None = None,
    on_refused: Callable[[str, str], None] | None = None,
    *,
    timeout: float = HANDSHAKE_TIMEOUT,
    start_serving: bool = True,
) -> asyncio.Server:
    """Listen for peers; `on_session(session)` runs for each session once it is open.

    With `start_serving=False` the address is only bound (an address in use or not on this
    host fails now); connections are refused until `await server.start_serving()`.

    `on_refused(address, reason)` is called for every connection that does not become a
    session (TLS handshake failure, a bad or refused Hello, a protocol error, a timeout).
    At most MAX_HANDSHAKES_PER_HOST connections from one address, and MAX_HANDSHAKES in all,
    are in their handshake at once; more are closed at once (reported once per 10 s).
    Closing the returned server stops listening; open sessions are the caller's to close."""
    loop = asyncio.get_running_loop()
    context = server_context(identity)
    tasks: set[asyncio.Task[None]] = set()
    handshaking: dict[str, int] = {}  # host -> connections in their handshake
    crowded = {"refused": 0, "reported_at": -1e9}

    async def accept(session: PeerSession, host: str) -> None:
        try:
            await handshake(session)
        finally:
            handshaking[host] -= 1
            if not handshaking[host]:
                del handshaking[host]

    async def handshake(session: PeerSession) -> None:
        try:
            async with asyncio.timeout(timeout):
                await session._start_tls(context, server_side=True)
                await session._exchange_hellos(identity.node_id)
        except TimeoutError:
            reason = f"no session within {timeout:g} s ({session._phase})"
            session._write_fatal("timeout", reason)
            session._shutdown(reason)
            _refused(session.address, reason)
            return
        except HandshakeError as exc:
            _refused(session.address, exc.reason)
            return
        except BaseException as exc:
            session._shutdown(f"handshake failed: {exc!r}")
            if isinstance(exc, Exception):
                log.exception("handshake with %s failed", session.address)
                _refused(session.address, f"handshake failed: {exc!r}")
                return
            raise
        if on_session is not None:
            try:
                await on_session(session)
            except Exception:
                log.exception("on_session failed for %r", session)

    def _refused(address: str, reason: str) -> None:
        log.info("refused %s: %s", address, reason)
        if on_refused is not None:
            try:
                on_refused(address, reason)
            except Exception:
                log.exception("on_refused failed")

    def connected(session: PeerSession) -> None:
        host = session.host
        if (
            sum(handshaking.values()) >= MAX_HANDSHAKES
            or handshaking.get(host, 0) >= MAX_HANDSHAKES_PER_HOST
        ):
            session._shutdown("too many connections in their handshake")
            crowded["refused"] += 1
            if loop.time() - crowded["reported_at"] >= 10:  # one report per 10 s of a flood
                crowded["reported_at"] = loop.time()
                _refused(
                    session.address,
                    f"too many connections in their handshake ({crowded['refused']} closed "
                    f"at once so far; at most {MAX_HANDSHAKES_PER_HOST} per address, "
                    f"{MAX_HANDSHAKES} in all)",
                )
            return
        handshaking[host] = handshaking.get(host, 0) + 1
        task = loop.create_task(accept(session, host))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    return await loop.create_server(
        lambda: PeerSession(Role.SERVER, hello, handler, on_connected=connected),
        host,
        port,
        start_serving=start_serving,
    )


async def connect_with_backoff(
    host: str,
    port: int,
    identity: NodeIdentity,
    hello: Hello,
    handler: RequestHandler,
    *,
    attempts: int | None = None,
    initial: float = 0.5,
    maximum: float = 30.0,
    timeout: float = HANDSHAKE_TIMEOUT,
    rng: random.Random | None = None,
) -> PeerSession:
    """`connect`, retried after every OSError (unreachable, refused, failed handshake) with
    jittered exponential backoff (`backoff_delay`). `attempts=None` retries until cancelled;
    otherwise the last error is raised after that many attempts. SelfConnection is raised at
    once: dialing ourselves never gets better."""
    rng = rng if rng is not None else random.Random()
    failures = 0
    while True:
        try:
            return await connect(host, port, identity, hello, handler, timeout=timeout)
        except SelfConnection:
            raise
        except OSError as exc:
            failures += 1
            if attempts is not None and failures >= attempts:
                raise
            delay = backoff_delay(failures, initial, maximum, rng)
            log.info("cannot connect to %s:%s (%s); retrying in %.1f s", host, port, exc, delay)
            await asyncio.sleep(delay)
