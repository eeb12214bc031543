"""The per-connection state machine of the peer protocol, without I/O.

Theory of operation
-------------------
A Connection knows nothing of sockets, TLS, tasks or clocks. The I/O layer feeds it the bytes
it read (`receive_data`, with b"" for end of stream), asks it for messages one at a time
(`next_event`, which returns NEED_DATA while no complete frame is buffered, and
CONNECTION_CLOSED once the peer has ended the stream between frames), and writes out what
`send` (one bytes object) or `send_buffers` (a list of buffers for `writelines`) returns.

Each side of the connection has its own State: ours (what we have sent) and theirs (what they
have sent). Both start in AWAIT_HELLO, and each side's first message must be its Hello, which
moves that side to READY. The two sides do not wait for each other: we may send our Hello
before or after theirs arrives. From READY on the protocol is symmetric: either side may send
requests, replies to the other side's requests, and ChangeNotices. A Goodbye or a fatal Error
(request_id 0) moves its sender's side to CLOSED, after which that side sends nothing more;
an end of stream between frames closes their side too.

Which message a side may send in which state is data, not code: TRANSITIONS maps the sender's
role → the sender's state → the kind of message → the sender's next state. The roles are
CLIENT (the side that dialed) and SERVER (the side that accepted); today the table is the same
for both, and it is keyed by role so that every refusal names who broke the rule. A message
with no entry is refused with one error naming role, state and message: LocalProtocolError if
we tried to send it (and nothing changes), RemoteProtocolError if the peer did.

Requests and replies are matched by request_id, separately in each direction. Sending a
request puts its id among ours in flight; a reply from the peer must carry an id of ours in
flight and be of a kind REPLIES allows for that request, and the reply that ends the request
(`is_final()`) retires the id. The same rules, mirrored, apply to the peer's requests and our
replies. A request whose id is still in flight, a reply to an id never sent or already
finished, and a reply of the wrong kind are all protocol errors.

After a RemoteProtocolError both sides are in ERROR (ours stays CLOSED if we had already said
Goodbye): receive_data and next_event raise again, and the only message we may still send is a
fatal Error, so the peer learns why it is being disconnected. A LocalProtocolError changes
nothing at all.

Throughput: received bytes are kept as the objects the I/O layer passed in, not copied into
one growing buffer. A frame that lies within one of them is decoded from a memoryview slice;
a frame that spans several is joined once. ChunkData.data is a slice of its frame. On the
way out, `send_buffers` returns a ChunkData's bytes untouched after a small header.
A frame of LARGE_FRAME bytes or more whose header has arrived gets a buffer of its own size
at once: `frame_buffer` offers the rest of it, so an I/O layer that can read into a buffer
(asyncio's BufferedProtocol, where TLS decrypts straight into it) fills it with no copy, and
calls `frame_received`; bytes given to `receive_data` meanwhile are copied into it. Either
way a large frame is decoded from its own buffer, never joined from pieces.

Memory: what is buffered costs about its size, however the peer cuts it. Pieces smaller than
SMALL_PIECE are copied into one growing tail rather than kept each as an object of its own (a
peer trickling a frame in one-byte TLS records would otherwise cost ~300 bytes of bookkeeping
per byte: gigabytes for one MAX_FRAME_SIZE frame).
"""

import enum
from collections import deque
from collections.abc import Mapping
from types import MappingProxyType

from ironsync.protocol.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from ironsync.protocol.limits import (
    FRAME_HEADER_SIZE,
    MAX_FRAME_SIZE,
    MAX_IN_FLIGHT,
    MAX_REQUEST_ID,
    KiB,
)
from ironsync.protocol.messages import (
    ChangeNotice,
    ChunkData,
    ChunkList,
    ChunksDone,
    Error,
    FileData,
    FilesDone,
    GetChunkList,
    GetChunks,
    GetFiles,
    GetIndex,
    GetStorageHashes,
    Goodbye,
    Hello,
    IndexPage,
    Message,
    Reply,
    Request,
    StorageHashes,
    SyncRequest,
    SyncResult,
)
from ironsync.protocol.wire import FRAME_HEADER, Buffer, decode_body, encode_frame


class Role(enum.Enum):
    CLIENT = "client"  # dialed
    SERVER = "server"  # accepted


class State(enum.Enum):
    AWAIT_HELLO = "await_hello"
    READY = "ready"
    CLOSED = "closed"
    ERROR = "error"


class Marker(enum.Enum):
    """What next_event returns when it has no message to return."""

    NEED_DATA = "need_data"
    CONNECTION_CLOSED = "connection_closed"


NEED_DATA = Marker.NEED_DATA
CONNECTION_CLOSED = Marker.CONNECTION_CLOSED

FATAL_ERROR = "Error(request_id=0)"
"""The table key of an Error that is not a reply but the sender's last word."""

TransitionKey = type[Message] | str

AWAIT_HELLO, READY, CLOSED, ERROR = State.AWAIT_HELLO, State.READY, State.CLOSED, State.ERROR

_SIDE_TRANSITIONS: dict[State, dict[TransitionKey, State]] = {
    AWAIT_HELLO: {
        Hello: READY,
        Goodbye: CLOSED,
        FATAL_ERROR: CLOSED,
    },
    READY: {
        GetStorageHashes: READY,
        StorageHashes: READY,
        GetIndex: READY,
        IndexPage: READY,
        GetChunkList: READY,
        ChunkList: READY,
        GetChunks: READY,
        ChunkData: READY,
        ChunksDone: READY,
        GetFiles: READY,
        FileData: READY,
        FilesDone: READY,
        SyncRequest: READY,
        SyncResult: READY,
        Error: READY,
        ChangeNotice: READY,
        Goodbye: CLOSED,
        FATAL_ERROR: CLOSED,
    },
    CLOSED: {},
    # Only ever our side's state when looked up: after their error we may still say why.
    ERROR: {
        FATAL_ERROR: CLOSED,
    },
}

TRANSITIONS: dict[Role, dict[State, dict[TransitionKey, State]]] = {
    Role.CLIENT: _SIDE_TRANSITIONS,
    Role.SERVER: _SIDE_TRANSITIONS,
}

REPLIES: dict[type[Request], frozenset[type[Reply]]] = {
    GetStorageHashes: frozenset({StorageHashes, Error}),
    GetIndex: frozenset({IndexPage, Error}),
    GetChunkList: frozenset({ChunkList, Error}),
    GetChunks: frozenset({ChunkData, ChunksDone, Error}),
    GetFiles: frozenset({FileData, FilesDone, Error}),
    SyncRequest: frozenset({SyncResult, Error}),
}


def transition_key(message: Message) -> TransitionKey:
    """The key of `message` in TRANSITIONS: its class, or FATAL_ERROR."""
    if isinstance(message, Error) and message.is_fatal:
        return FATAL_ERROR
    return type(message)


def _key_name(key: TransitionKey) -> str:
    return key if isinstance(key, str) else key.__name__


SMALL_PIECE = 16 * KiB
"""Received pieces smaller than this are copied into the buffer's tail (see Memory above)."""

LARGE_FRAME = 64 * KiB
"""Frames at least this long (header included) are received into a buffer of their own."""


class _ReceiveBuffer:
    """Received bytes, consumed from the front: large pieces kept as the caller's objects,
    small ones gathered in a tail that is sealed into a piece when it grows large or when a
    frame needs its bytes."""

    __slots__ = ("_filled", "_frame", "_pieces", "_size", "_tail")

    def __init__(self) -> None:
        self._pieces: deque[memoryview] = deque()
        self._size = 0
        self._tail = bytearray()
        self._frame: bytearray | None = None  # the first frame, being received into its own
        self._filled = 0  # bytes of `_frame` received; while it is open, nothing else is held

    def __len__(self) -> int:
        return self._size

    def open_frame(self, size: int) -> None:
        """Receive the first frame, `size` bytes long (more than are held), into a buffer of
        its own: what is held of it moves there."""
        assert self._frame is None and self._size < size
        frame = bytearray(size)
        view = memoryview(frame)
        filled = 0
        for piece in self._pieces:
            view[filled : filled + len(piece)] = piece
            filled += len(piece)
        view[filled : self._size] = self._tail
        self._pieces.clear()
        self._tail = bytearray()
        self._frame, self._filled = frame, self._size

    def frame_view(self) -> memoryview | None:
        """The part of the open frame still to receive, or None."""
        if self._frame is None:
            return None
        return memoryview(self._frame)[self._filled :]

    def frame_filled(self, nbytes: int) -> None:
        """`nbytes` more of the open frame were written into `frame_view()`."""
        assert self._frame is not None and 0 < nbytes <= len(self._frame) - self._filled
        self._filled += nbytes
        self._size += nbytes
        if self._filled == len(self._frame):  # complete: the first piece, taken whole
            self._pieces.append(memoryview(self._frame))
            self._frame = None

    def append(self, data: bytes | bytearray | memoryview) -> None:
        if self._frame is not None:
            view = self.frame_view()
            assert view is not None
            count = min(len(view), len(data))
            view[:count] = data[:count]
            self.frame_filled(count)
            if count == len(data):
                return
            data = memoryview(data)[count:]
        size = len(data)
        if size < SMALL_PIECE:
            self._tail += data
            if len(self._tail) >= SMALL_PIECE:
                self._seal()
        else:
            self._seal()
            # Keep the caller's bytes object itself (no copy); copy anything mutable.
            self._pieces.append(memoryview(data if type(data) is bytes else bytes(data)))
        self._size += size

    def _seal(self) -> None:
        if self._tail:
            self._pieces.append(memoryview(bytes(self._tail)))
            self._tail = bytearray()

    def peek(self, size: int) -> bytes:
        """The first `size` bytes (there must be that many), left in place."""
        if self._frame is not None:
            return bytes(self._frame[:size])
        out = bytearray()
        for piece in self._pieces:
            out += piece[: size - len(out)]
            if len(out) == size:
                return bytes(out)
        out += self._tail[: size - len(out)]
        return bytes(out)

    def take(self, size: int) -> memoryview:
        """Remove and return the first `size` bytes (there must be that many)."""
        assert self._frame is None  # an open frame is not complete: not taken
        if self._size - len(self._tail) < size:
            self._seal()
        head = self._pieces[0]
        if len(head) >= size:
            taken = head[:size]
            if len(head) == size:
                self._pieces.popleft()
            else:
                self._pieces[0] = head[size:]
        else:
            parts = []
            remaining = size
            while remaining:
                piece = self._pieces.popleft()
                if len(piece) > remaining:
                    self._pieces.appendleft(piece[remaining:])
                    piece = piece[:remaining]
                parts.append(piece)
                remaining -= len(piece)
            taken = memoryview(b"".join(parts))
        self._size -= size
        return taken


class Connection:
    """One peer connection's protocol state; see the module docstring."""

    def __init__(self, our_role: Role) -> None:
        self.our_role = our_role
        self.their_role = Role.SERVER if our_role is Role.CLIENT else Role.CLIENT
        self.our_state = AWAIT_HELLO
        self.their_state = AWAIT_HELLO
        self.their_hello: Hello | None = None
        self._our_requests: dict[int, type[Request]] = {}
        self._their_requests: dict[int, type[Request]] = {}
        self._next_request_id = 1
        self._received = _ReceiveBuffer()
        self._eof = False
        self._error: RemoteProtocolError | None = None

    @property
    def our_requests_in_flight(self) -> Mapping[int, type[Request]]:
        """Our requests not yet finally answered: request id → request class."""
        return MappingProxyType(self._our_requests)

    @property
    def their_requests_in_flight(self) -> Mapping[int, type[Request]]:
        """The peer's requests we have not yet finally answered."""
        return MappingProxyType(self._their_requests)

    def next_request_id(self) -> int:
        """A request id that none of our requests in flight uses (1, 2, ... wrapping)."""
        while True:
            request_id = self._next_request_id
            self._next_request_id = request_id % MAX_REQUEST_ID + 1
            if request_id not in self._our_requests:
                return request_id

    # --- receiving ---------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer bytes read from the peer; b"" means the peer ended the stream."""
        self._refuse_if_failed()
        if self._eof:
            if data:
                raise LocalProtocolError("receive_data called with data after end of stream")
            return
        if not data:
            self._eof = True
            return
        self._received.append(data)

    def frame_buffer(self) -> memoryview | None:
        """Where the rest of the large frame being received goes (module docstring): read
        into it, then call `frame_received`. None when no large frame is under way: give
        what you read to `receive_data`."""
        if self._error is not None or self._eof:
            return None
        return self._received.frame_view()

    def frame_received(self, nbytes: int) -> None:
        """`nbytes` (> 0) were read into the start of what `frame_buffer` returned."""
        self._refuse_if_failed()
        if self._eof or self._received.frame_view() is None:
            raise LocalProtocolError("frame_received without a frame_buffer")
        self._received.frame_filled(nbytes)

    def next_event(self) -> Message | Marker:
        """The next message from the peer, NEED_DATA, or CONNECTION_CLOSED.

        Raises RemoteProtocolError (and moves to ERROR) if the peer broke the protocol.
        """
        self._refuse_if_failed()
        try:
            frame = self._next_frame()
            if frame is None:
                return self._no_message()
            message = decode_body(frame)
            self._apply(message, self.their_role, RemoteProtocolError)
        except RemoteProtocolError as exc:
            self._fail(exc)
            raise
        if isinstance(message, Hello):
            self.their_hello = message
        return message

    def _next_frame(self) -> memoryview | None:
        buffered = len(self._received)
        if buffered < FRAME_HEADER_SIZE:
            if self._eof and buffered:
                raise RemoteProtocolError(
                    f"end of stream inside a frame header ({buffered} of {FRAME_HEADER_SIZE} bytes)"
                )
            return None
        (length,) = FRAME_HEADER.unpack(self._received.peek(FRAME_HEADER_SIZE))
        if length > MAX_FRAME_SIZE:
            raise RemoteProtocolError(
                f"peer announced a frame of {length} bytes; MAX_FRAME_SIZE is {MAX_FRAME_SIZE}"
            )
        if buffered < FRAME_HEADER_SIZE + length:
            if self._eof:
                raise RemoteProtocolError(
                    f"end of stream inside a frame "
                    f"({buffered - FRAME_HEADER_SIZE} of {length} body bytes)"
                )
            if FRAME_HEADER_SIZE + length >= LARGE_FRAME and self._received.frame_view() is None:
                self._received.open_frame(FRAME_HEADER_SIZE + length)
            return None
        return self._received.take(FRAME_HEADER_SIZE + length)[FRAME_HEADER_SIZE:]

    def _no_message(self) -> Marker:
        if not self._eof:
            return NEED_DATA
        self.their_state = CLOSED
        return CONNECTION_CLOSED

    def _refuse_if_failed(self) -> None:
        if self._error is not None:
            raise RemoteProtocolError(f"connection already failed: {self._error.reason}")

    def _fail(self, exc: RemoteProtocolError) -> None:
        self._error = exc
        self._received = _ReceiveBuffer()
        self.their_state = ERROR
        if self.our_state is not CLOSED:
            self.our_state = ERROR

    # --- sending -----------------------------------------------------------------------------

    def send(self, message: Message) -> bytes:
        """The bytes of `message`'s frame, to write to the peer.

        Raises LocalProtocolError, changing nothing, if our state or the requests in flight
        do not allow `message`.
        """
        buffers = self.send_buffers(message)
        return buffers[0] if len(buffers) == 1 else b"".join(buffers)

    def send_buffers(self, message: Message) -> list[Buffer]:
        """Like send, but as a list of buffers for `writelines`: a ChunkData's data is
        returned as given, not copied (so it must not change until written)."""
        if not isinstance(message, Message):
            raise LocalProtocolError(f"cannot send {type(message).__name__}: not a Message")
        # _apply validates everything before it changes anything, and encoding (which may
        # refuse an oversized message) happens before it.
        buffers = encode_frame(message)
        self._apply(message, self.our_role, LocalProtocolError)
        return buffers

    # --- the rules, for both directions ------------------------------------------------------

    def _apply(self, message: Message, sender: Role, error: type[ProtocolError]) -> None:
        """Check `message` from `sender` against the rules, then record it."""
        ours = sender is self.our_role
        state = self.our_state if ours else self.their_state
        # The sender's own requests, and the requests of the side it answers.
        opened = self._our_requests if ours else self._their_requests
        answered = self._their_requests if ours else self._our_requests

        key = transition_key(message)
        next_state = TRANSITIONS[sender][state].get(key)
        if next_state is None:
            raise error(f"{sender.name} in state {state.name} may not send {_key_name(key)}")
        request_id = message.request_id
        if isinstance(message, Request):
            if request_id in opened:
                raise error(f"{sender.name} reused request id {request_id}, still in flight")
            if len(opened) >= MAX_IN_FLIGHT:
                raise error(f"{sender.name} has more than {MAX_IN_FLIGHT} requests in flight")
            opened[request_id] = type(message)
        elif isinstance(message, Reply) and key != FATAL_ERROR:
            request = answered.get(request_id)
            if request is None:
                raise error(
                    f"{sender.name} sent {type(message).__name__} for request id {request_id}, "
                    f"which is not in flight (never sent, or already answered)"
                )
            if type(message) not in REPLIES[request]:
                raise error(
                    f"{sender.name} sent {type(message).__name__} in reply to "
                    f"{request.__name__} (request id {request_id})"
                )
            if message.is_final():
                del answered[request_id]

        if ours:
            self.our_state = next_state
        else:
            self.their_state = next_state
