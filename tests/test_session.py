"""Peer sessions over real TLS on 127.0.0.1: handshake, requests, streams, refusals, flow."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

from ironsync.net import session as session_module
from ironsync.net.session import (
    MAX_HANDLERS,
    MAX_HANDSHAKES_PER_HOST,
    MAX_WAITING_REQUESTS,
    STREAM_BUFFER_HIGH,
    WRITE_BUFFER_HIGH,
    HandshakeError,
    PeerSession,
    SelfConnection,
    backoff_delay,
    connect,
    connect_with_backoff,
    hello_refusal,
    serve,
)
from ironsync.net.tls import NodeIdentity, client_context, load_or_create_identity
from ironsync.protocol import (
    PROTOCOL_VERSION,
    ChangeNotice,
    ChunkData,
    ChunkRef,
    ChunksDone,
    Connection,
    Error,
    GetChunks,
    GetIndex,
    GetStorageHashes,
    Hello,
    LocalProtocolError,
    Message,
    Reply,
    Request,
    Role,
    StorageHashes,
    SyncRequest,
    SyncResult,
)
from ironsync.protocol.wire import encode_frame
from ironsync.sync.link import PeerError, PeerLink, Responder

GROUP = "example"
SECRET = "correct horse battery staple"
OTHER_SECRET = "another secret of sixteen+"
HASH = bytes(range(16))
TIMEOUT_SECONDS = 15
PLACEHOLDER_ID = 1  # the session stamps the real request id
POLL_SECONDS = 0.01  # how often a test looks again at a condition it waits for
SMALL_SOCKET_BUFFER = 16 * 1024
"""SO_RCVBUF and SO_SNDBUF asked for where a test needs the kernel to hold little."""
STREAM_SOCKET_BUFFER = 256 * 1024
"""The same where a test streams megabytes: fixed still, but big enough that TCP's window does
not slow the stream down to delayed ACKs."""
ASYNCIO_BUFFERS = 2 * 1024 * 1024
"""More than asyncio holds between a socket and TLS, each way: a read of up to 256 KiB, the
TLS read buffer's 256 KiB mark, the socket transport's 64 KiB write mark (Python 3.11)."""


@pytest.fixture(scope="module")
def ids(tmp_path_factory: pytest.TempPathFactory) -> dict[str, NodeIdentity]:
    base = tmp_path_factory.mktemp("identities")
    identities = {
        name: load_or_create_identity(base / name, name, GROUP, SECRET)
        for name in ("alpha", "beta", "gamma")
    }
    identities["outsider"] = load_or_create_identity(
        base / "outsider", "outsider", GROUP, OTHER_SECRET
    )
    return identities


def hello(node_id: str, group: str = GROUP, storages: tuple[str, ...] = ("docs",)) -> Hello:
    return Hello(PROTOCOL_VERSION, node_id, group, storages)


def run(coroutine: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coroutine, TIMEOUT_SECONDS))  # type: ignore[arg-type]


def payload(offset: int, size: int) -> bytes:
    return offset.to_bytes(8, "big") * (size // 8)


def chunk_refs(count: int, size: int) -> tuple[ChunkRef, ...]:
    return tuple(ChunkRef(i * size, size, HASH) for i in range(count))


class Handler:
    """Answers like a small node would, and records what it was asked."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, Request]] = []
        self.notices: list[tuple[str, ChangeNotice]] = []
        self.noticed = asyncio.Event()
        self.release = asyncio.Event()  # SyncRequest waits for it
        self.streams_finished = 0

    async def handle(self, link: PeerLink, request: Request, respond: Responder) -> None:
        self.requests.append((link.peer_id, request))
        rid = request.request_id
        if isinstance(request, GetStorageHashes):
            await asyncio.sleep(random.random() / 1000)
            await respond.send(StorageHashes({"docs": HASH}, request_id=rid))
        elif isinstance(request, GetChunks):
            for index, ref in enumerate(request.chunks):
                if request.path == "fails-midway" and index == 2:
                    raise PeerError(link.peer_id, "unreadable", "disk on fire")
                if request.path == "stalls-midway" and index == 2:
                    await asyncio.Event().wait()  # forever
                if request.path == "trickles":
                    await asyncio.sleep(0.1)
                data = payload(ref.offset, ref.length)
                await respond.send(ChunkData(ref.offset, ref.hash, data, request_id=rid))
            await respond.send(ChunksDone(request_id=rid))
            self.streams_finished += 1
        elif isinstance(request, GetIndex):
            if request.storage == "crash":
                raise RuntimeError("bug in the handler")
            if request.storage == "silent":
                return
            if request.storage == "stall":
                await asyncio.Event().wait()  # forever
            raise PeerError(link.peer_id, "unknown_storage", f"no storage {request.storage!r}")
        elif isinstance(request, SyncRequest):
            await self.release.wait()
            await respond.send(SyncResult(True, "done", request_id=rid))

    async def notice(self, link: PeerLink, message: ChangeNotice) -> None:
        self.notices.append((link.peer_id, message))
        self.noticed.set()


@dataclass
class Listener:
    port: int
    handler: Handler
    sessions: asyncio.Queue[PeerSession] = field(default_factory=asyncio.Queue)
    refused: list[tuple[str, str]] = field(default_factory=list)
    refusal: asyncio.Event = field(default_factory=asyncio.Event)
    opened: list[PeerSession] = field(default_factory=list)

    async def next_session(self) -> PeerSession:
        return await asyncio.wait_for(self.sessions.get(), 5)

    async def next_refusal(self) -> tuple[str, str]:
        await asyncio.wait_for(self.refusal.wait(), 5)
        return self.refused[-1]


@asynccontextmanager
async def listening(
    identity: NodeIdentity, port: int = 0, *, socket_buffer: int | None = None
) -> AsyncIterator[Listener]:
    """Serve `identity` on 127.0.0.1; with `socket_buffer`, every accepted socket's kernel
    buffers are fixed at that size (see `fix_socket_buffers`)."""
    listener = Listener(port, Handler())

    async def on_session(session: PeerSession) -> None:
        listener.opened.append(session)
        await listener.sessions.put(session)

    def on_refused(address: str, reason: str) -> None:
        listener.refused.append((address, reason))
        listener.refusal.set()

    server = await serve(
        "127.0.0.1",
        port,
        identity,
        hello(identity.node_id),
        listener.handler,
        on_session,
        on_refused,
    )
    listener.port = server.sockets[0].getsockname()[1]
    if socket_buffer is not None:
        fix_socket_buffers(server.sockets[0], socket_buffer)  # accepted sockets inherit them
    try:
        yield listener
    finally:
        server.close()
        await asyncio.gather(*(session.close("test over") for session in listener.opened))


@asynccontextmanager
async def dialing(
    listener: Listener, identity: NodeIdentity, handler: Handler | None = None
) -> AsyncIterator[PeerSession]:
    session = await connect(
        "127.0.0.1", listener.port, identity, hello(identity.node_id), handler or Handler()
    )
    try:
        yield session
    finally:
        await session.close("test over")


async def raw_tls_exchange(
    port: int,
    identity: NodeIdentity,
    *frames: bytes,
    context: ssl.SSLContext | None = None,
    hang_up: bool = False,
) -> list[Message]:
    """Send `frames` over TLS as a client with `identity`, then decode all the server sent
    until it closed (or hang up at once)."""
    context = context or client_context(identity)
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    for frame in frames:
        writer.write(frame)
    await writer.drain()
    received = b""
    try:
        while not hang_up and (chunk := await reader.read(65536)):
            received += chunk
    except (ConnectionError, OSError):
        pass
    writer.close()
    return decode_all(received)


def fix_socket_buffers(sock: socket.socket | asyncio.trsock.TransportSocket, size: int) -> None:
    """Fix the kernel's send and receive buffers of `sock` at `size` (Linux doubles it, for its
    bookkeeping). Set before connecting (or on a listening socket), the sizes hold for the
    connection's life: no autotuning up to net.ipv4.tcp_rmem's or tcp_wmem's maximum."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


def kernel_buffers(sock: socket.socket | asyncio.trsock.TransportSocket) -> int:
    """Bytes the kernel may hold for `sock`, sent and received together."""
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) + sock.getsockopt(
        socket.SOL_SOCKET, socket.SO_SNDBUF
    )


class NeverReadingClient:
    """A TLS client on a plain socket that reads only for its handshake: all the server sends
    afterwards stays in this socket's kernel receive buffer, fixed at `socket_buffer`."""

    def __init__(self, sock: socket.socket, tls: ssl.SSLObject, outgoing: ssl.MemoryBIO) -> None:
        self.socket = sock
        self._tls = tls
        self._outgoing = outgoing
        self.bytes_sent = 0

    @classmethod
    async def connect(
        cls, port: int, identity: NodeIdentity, socket_buffer: int
    ) -> NeverReadingClient:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as asyncio's transports
        fix_socket_buffers(sock, socket_buffer)
        try:
            await loop.sock_connect(sock, ("127.0.0.1", port))
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            tls = client_context(identity).wrap_bio(incoming, outgoing)
            while True:
                with contextlib.suppress(ssl.SSLWantReadError):
                    tls.do_handshake()
                    break
                await loop.sock_sendall(sock, outgoing.read())
                received = await loop.sock_recv(sock, 65536)
                if not received:
                    raise ConnectionError("the server closed during the TLS handshake")
                incoming.write(received)
            await loop.sock_sendall(sock, outgoing.read())
        except BaseException:
            sock.close()
            raise
        return cls(sock, tls, outgoing)

    async def send(self, data: bytes) -> None:
        """Return once all of `data` is in the kernel's send buffer (which may be never)."""
        self._tls.write(data)
        await asyncio.get_running_loop().sock_sendall(self.socket, self._outgoing.read())
        self.bytes_sent += len(data)

    def abort(self) -> None:
        self.socket.close()  # unread data: the kernel resets the connection


def decode_all(data: bytes) -> list[Message]:
    conn = Connection(Role.CLIENT)
    conn.receive_data(data)
    conn.receive_data(b"")
    messages: list[Message] = []
    while isinstance(event := conn.next_event(), Message):
        messages.append(event)
    return messages


# --- handshake ------------------------------------------------------------------------------


def test_session_opens_with_each_side_knowing_the_other_by_certificate_and_hello(
    ids: dict[str, NodeIdentity],
) -> None:
    async def body() -> None:
        async with listening(ids["alpha"]) as listener:
            client = await connect(
                "127.0.0.1",
                listener.port,
                ids["beta"],
                hello("beta", storages=("docs", "pics")),
                Handler(),
            )
            server_side = await listener.next_session()

            assert client.peer_id == "alpha"
            assert client.peer_storages == ("docs",)
            assert server_side.peer_id == "beta"
            assert server_side.peer_storages == ("docs", "pics")
            assert listener.refused == []
            await client.close()
            await server_side.wait_closed()
            assert server_side.closed_reason == "peer said goodbye: bye"

    run(body())


def test_hello_refusal_names_the_first_broken_rule() -> None:
    ours = hello("alpha")

    assert hello_refusal(ours, hello("beta"), "beta") is None
    assert hello_refusal(ours, hello("beta", group="other"), "beta")[0] == "wrong_group"  # type: ignore[index]
    assert hello_refusal(ours, hello("gamma"), "beta")[0] == "identity_mismatch"  # type: ignore[index]
    assert hello_refusal(ours, hello("alpha"), "alpha")[0] == "self_connection"  # type: ignore[index]


# --- requests and replies -------------------------------------------------------------------


def test_request_returns_the_final_reply_and_both_ends_count_the_same_bytes(
    ids: dict[str, NodeIdentity],
) -> None:
    async def body() -> None:
        async with listening(ids["alpha"]) as listener, dialing(listener, ids["beta"]) as client:
            server_side = await listener.next_session()

            reply = await client.request(GetStorageHashes(request_id=PLACEHOLDER_ID))

            assert isinstance(reply, StorageHashes)
            assert dict(reply.hashes) == {"docs": HASH}
            assert listener.handler.requests == [("beta", GetStorageHashes(request_id=1))]
            assert client.bytes_out == server_side.bytes_in > 0
            assert client.bytes_in == server_side.bytes_out > 0

    run(body())


def test_stream_yields_every_chunk_in_order_then_chunks_done(ids: dict[str, NodeIdentity]) -> None:
    async def body() -> None:
        async with listening(ids["alpha"]) as listener, dialing(listener, ids["beta"]) as client:
            refs = chunk_refs(300, 4096)

            replies = [
                reply
                async for reply in client.stream(
                    GetChunks("docs", "a.bin", HASH, refs, request_id=PLACEHOLDER_ID)
                )
            ]

            assert isinstance(replies[-1], ChunksDone)
            chunks = replies[:-1]
            assert all(isinstance(chunk, ChunkData) for chunk in chunks)
            assert [chunk.offset for chunk in chunks] == [ref.offset for ref in refs]  # type: ignore[attr-defined]
            assert all(bytes(c.data) == payload(c.offset, 4096) for c in chunks)  # type: ignore[attr-defined]

    run(body())


def test_both_sides_send_many_requests_and_streams_at_once(ids: dict[str, NodeIdentity]) -> None:
    async def body() -> None:
        beta_handler = Handler()
        async with (
            listening(ids["alpha"]) as listener,
            dialing(listener, ids["beta"], beta_handler) as client,
        ):
            server_side = await listener.next_session()

            async def workload(link: PeerSession) -> list[Any]:
                async def collect(count: int) -> list[Reply]:
                    request = GetChunks(
                        "docs", "f", HASH, chunk_refs(count, 1024), request_id=PLACEHOLDER_ID
                    )
                    return [reply async for reply in link.stream(request)]

                hashes = [link.request(GetStorageHashes(request_id=1)) for _ in range(40)]
                streams = [collect(20 + i) for i in range(6)]
                return await asyncio.gather(*hashes, *streams)

            from_beta, from_alpha = await asyncio.gather(workload(client), workload(server_side))

            for results in (from_beta, from_alpha):
                assert all(isinstance(r, StorageHashes) for r in results[:40])
                for i, replies in enumerate(results[40:]):
                    assert len(replies) == 20 + i + 1
                    assert isinstance(replies[-1], ChunksDone)
            assert {peer for peer, _ in listener.handler.requests} == {"beta"}
            assert {peer for peer, _ in beta_handler.requests} == {"alpha"}
            assert len(listener.handler.requests) == len(beta_handler.requests) == 46

    run(body())


def test_handler_errors_reach_the_caller_as_peer_errors_and_the_session_goes_on(
    ids: dict[str, NodeIdentity],
) -> None:
    async def body() -> None:
        async with listening(ids["alpha"]) as listener, dialing(listener, ids["beta"]) as client:
            with pytest.raises(PeerError) as refused:
                await client.request(GetIndex("nope", 0, 10, request_id=1))
            with pytest.raises(PeerError) as crashed:
                await client.request(GetIndex("crash", 0, 10, request_id=1))
            with pytest.raises(PeerError) as silent:
                await client.request(GetIndex("silent", 0, 10, request_id=1))
            received: list[Reply] = []
            with pytest.raises(PeerError) as midway:
                request = GetChunks(
                    "docs", "fails-midway", HASH, chunk_refs(5, 16), request_id=PLACEHOLDER_ID
                )
                async for reply in client.stream(request):
                    received.append(reply)

            assert (refused.value.peer, refused.value.code) == ("alpha", "unknown_storage")
            assert refused.value.message == "no storage 'nope'"
            assert crashed.value.code == "internal"
            assert "bug in the handler" in crashed.value.message
            assert silent.value.code == "internal"
            assert midway.value.code == "unreadable"
            assert [type(r) for r in received] == [ChunkData, ChunkData]
            assert isinstance(await client.request(GetStorageHashes(request_id=1)), StorageHashes)

    run(body())


def test_request_for_a_stream_of_replies_raises_and_the_session_goes_on(
    ids: dict[str, NodeIdentity],
) -> None:
    async def body() -> None:
        async with listening(ids["alpha"]) as listener, dialing(listener, ids["beta"]) as client:
            request = GetChunks("docs", "a", HASH, chunk_refs(3, 16), request_id=PLACEHOLDER_ID)
            with pytest.raises(LocalProtocolError, match="use stream"):
                await client.request(request)

            assert isinstance(await client.request(GetStorageHashes(request_id=1)), StorageHashes)

    run(body())


def test_requests_beyond_max_handlers_wait_for_a_slot_and_reading_goes_on(
    ids: dict[str, NodeIdentity],
) -> None:
    async def body() -> None:
        async with listening(ids["alpha"]) as listener, dialing(listener, ids["beta"]) as client:
            server_side = await listener.next_session()
            count = MAX_HANDLERS + 4
            calls = [
                asyncio.ensure_future(client.request(SyncRequest((), request_id=1)))
                for _ in range(count)
            ]
            while len(listener.handler.requests) < MAX_HANDLERS:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)
            started_while_full = len(listener.handler.requests)
            # A handler may wait for a reply from this very peer (a SyncRequest makes a node
            # pull from the asker): that reply must still get in.
            reply = await server_side.request(GetStorageHashes(request_id=1))
            reading_while_full = server_side.is_reading

            listener.handler.release.set()
            results = await asyncio.gather(*calls)

            assert started_while_full == MAX_HANDLERS
            assert reading_while_full
            assert isinstance(reply, StorageHashes)
            assert all(isinstance(result, SyncResult) for result in results)
            assert len(listener.handler.requests) == count

    run(body())


def test_requests_beyond_the_waiting_bound_are_refused_as_busy_and_the_rest_served(
    ids: dict[str, NodeIdentity],
) -> None:
    async def body() -> None:
        async with listening(ids["alpha"]) as listener, dialing(listener, ids["beta"]) as client:
            count = MAX_HANDLERS + MAX_WAITING_REQUESTS + 3
            calls = [
                asyncio.ensure_future(client.request(SyncRequest((), request_id=1)))
                for _ in range(count)
            ]
            done, _ = await asyncio.wait(calls, timeout=5, return_when=asyncio.FIRST_EXCEPTION)
            busy = [c for c in done if isinstance(c.exception(), PeerError)]
            listener.handler.release.set()
            results = await asyncio.gather(*calls, return_exceptions=True)

            assert len(busy) == 3
            assert all(c.exception().code == "busy" for c in busy)  # type: ignore[union-attr]
            assert sum(isinstance(r, SyncResult) for r in results) == count - 3
            assert not client.is_closed

    run(body())


def test_a_peer_that_never_reads_its_replies_fills_no_memory_of_ours(
    ids: dict[str, NodeIdentity],
) -> None:
    """Thousands of failing requests (each answered by an Error) from a peer that reads
    nothing: the server's write buffer stays near its mark and it stops reading that peer.

    Bound by bytes, not time: the client writes until the server stops reading, and the test
    fails only once it has written far more than the server could have taken in had it
    stopped. Every kernel buffer on the way is small and fixed, so the machine's
    net.ipv4.tcp_rmem / tcp_wmem (up to 32 MiB on some) change nothing (issue 12)."""

    async def body() -> None:
        async with listening(ids["alpha"], socket_buffer=SMALL_SOCKET_BUFFER) as listener:
            client = await NeverReadingClient.connect(
                listener.port, ids["beta"], SMALL_SOCKET_BUFFER
            )
            await client.send(b"".join(encode_frame(hello("beta"))))
            server_side = await listener.next_session()
            transport = server_side._transport
            assert transport is not None
            # A server that stops reading once the peer does not read its replies has taken
            # in at most the requests answered by its write buffer (WRITE_BUFFER_HIGH; a reply
            # is longer than its request) and by what the buffers between it and the client
            # hold, plus the requests still in those buffers. The kernel's are fixed above
            # and counted 64 times over; asyncio's, below TLS, hold less than ASYNCIO_BUFFERS.
            between = kernel_buffers(client.socket)
            between += kernel_buffers(transport.get_extra_info("socket"))
            bound = WRITE_BUFFER_HIGH + ASYNCIO_BUFFERS + 64 * between
            request_id = 0
            sending: asyncio.Future[None] | None = None
            while server_side.is_reading and client.bytes_sent < bound:
                if sending is None or sending.done():
                    if sending is not None:
                        sending.result()
                    frames = []
                    for _ in range(500):
                        request_id += 1
                        frames += encode_frame(GetIndex("nope" * 60, 0, 1, request_id=request_id))
                    sending = asyncio.ensure_future(client.send(b"".join(frames)))
                # poll: once the server stops reading, this send never completes
                await asyncio.wait({sending}, timeout=POLL_SECONDS)
            buffered = transport.get_write_buffer_size()
            reading, closed = server_side.is_reading, server_side.is_closed
            if sending is not None:
                sending.cancel()
            client.abort()

            assert not closed  # it stopped reading; it did not hang up
            assert not reading, f"still reading after {client.bytes_sent} bytes of requests"
            assert buffered <= WRITE_BUFFER_HIGH + 64 * 1024

    run(body())


def test_change_notice_reaches_the_peers_handler(ids: dict[str, NodeIdentity]) -> None:
    async def body() -> None:
        async with listening(ids["alpha"]) as listener, dialing(listener, ids["beta"]) as client:
            await client.notify(ChangeNotice("docs", 7))
            await asyncio.wait_for(listener.handler.noticed.wait(), 5)

            assert listener.handler.notices == [("beta", ChangeNotice("docs", 7))]
            assert listener.handler.requests == []

    run(body())


# --- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize("outsider_role", ["client", "server"])
def test_node_with_another_secret_is_refused_and_no_handler_runs(
    ids: dict[str, NodeIdentity], outsider_role: str
) -> None:
    async def body() -> None:
        server_id, client_id = ("alpha", "outsider")
        if outsider_role == "server":
            server_id, client_id = client_id, server_id
        client_handler = Handler()
        async with listening(ids[server_id]) as listener:
            with pytest.raises(HandshakeError):
                await connect(
                    "127.0.0.1", listener.port, ids[client_id], hello(client_id), client_handler
                )
            _, reason = await listener.next_refusal()

            assert "TLS handshake failed" in reason
            assert listener.opened == []
            assert listener.handler.requests == client_handler.requests == []

    run(body())


def test_outsider_gets_no_byte_of_application_data(ids: dict[str, NodeIdentity]) -> None:
    async def body() -> None:
        async with listening(ids["alpha"]) as listener:
            # An outsider who knows the group CA certificate (it is public), not the secret.
            context = client_context(ids["outsider"])
            context.load_verify_locations(cadata=ids["alpha"].ca_certificate_pem.decode())
            hello_frame = Connection(Role.CLIENT).send(hello("outsider"))
            received = await raw_tls_exchange(
                listener.port, ids["outsider"], hello_frame, context=context
            )
            await listener.next_refusal()

            assert received == []
            assert listener.opened == []

    run(body())


@pytest.mark.parametrize(
    ("their_hello", "code"),
    [(hello("gamma"), "identity_mismatch"), (hello("beta", group="other"), "wrong_group")],
)
def test_hello_that_does_not_match_the_certificate_or_group_is_refused(
    ids: dict[str, NodeIdentity], their_hello: Hello, code: str
) -> None:
    async def body() -> None:
        async with listening(ids["alpha"]) as listener:
            with pytest.raises(HandshakeError) as refused:
                await connect("127.0.0.1", listener.port, ids["beta"], their_hello, Handler())
            _, reason = await listener.next_refusal()

            assert refused.value.reason.startswith(f"refused by the peer: {code}: ")
            assert refused.value.reason.endswith(reason)
            assert listener.opened == []
            assert listener.handler.requests == []

    run(body())


def test_hello_refused_by_the_server_gets_no_hello_back(ids: dict[str, NodeIdentity]) -> None:
    async def body() -> None:
        async with listening(ids["alpha"]) as listener:
            frame = Connection(Role.CLIENT).send(hello("gamma"))
            received = await raw_tls_exchange(listener.port, ids["beta"], frame)

            assert len(received) == 1
            assert isinstance(received[0], Error)
            assert (received[0].request_id, received[0].code) == (0, "identity_mismatch")

    run(body())


def test_node_dialing_itself_is_refused_cleanly_and_not_retried(
    ids: dict[str, NodeIdentity],
) -> None:
    async def body() -> None:
        async with listening(ids["alpha"]) as listener:
            with pytest.raises(SelfConnection):
                await connect("127.0.0.1", listener.port, ids["alpha"], hello("alpha"), Handler())
            _, reason = await listener.next_refusal()
            with pytest.raises(SelfConnection):
                await connect_with_backoff(
                    "127.0.0.1", listener.port, ids["alpha"], hello("alpha"), Handler()
                )

            assert "connection to itself" in reason
            assert listener.opened == []

    run(body())


# --- protocol errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frames", "expected"),
    [
        ([b"\x00\x00\x00\x05hello"], "frame body is not a msgpack array"),
        ([b"\xff\xff\xff\xff"], "MAX_FRAME_SIZE"),
        ([b"\x00\x00\x00\x10abc"], "end of stream inside a frame"),
    ],
    ids=["garbage", "oversized", "truncated"],
)
def test_garbage_instead_of_hello_is_refused_with_a_reason_and_others_are_served(
    ids: dict[str, NodeIdentity], frames: list[bytes], expected: str
) -> None:
    async def body() -> None:
        async with listening(ids["alpha"]) as listener, dialing(listener, ids["gamma"]) as honest:
            truncated = expected == "end of stream inside a frame"
            received = await raw_tls_exchange(
                listener.port, ids["beta"], *frames, hang_up=truncated
            )
            _, reason = await listener.next_refusal()

            assert reason.startswith("protocol error: ") and expected in reason
            if not truncated:  # else nobody is left to tell
                assert len(received) == 1
                assert isinstance(received[0], Error)
                assert (received[0].request_id, received[0].code) == (0, "protocol_error")
            assert isinstance(await honest.request(GetStorageHashes(request_id=1)), StorageHashes)

    run(body())


def test_reply_to_a_request_never_sent_closes_only_that_session(
    ids: dict[str, NodeIdentity],
) -> None:
    async def body() -> None:
        async with listening(ids["alpha"]) as listener, dialing(listener, ids["gamma"]) as honest:
            await listener.next_session()
            frames = [
                *encode_frame(hello("beta")),
                *encode_frame(StorageHashes({"docs": HASH}, request_id=7)),
            ]
            received = await raw_tls_exchange(listener.port, ids["beta"], *map(bytes, frames))
            rogue = await listener.next_session()
            await rogue.wait_closed()

            assert rogue.peer_id == "beta"
            assert rogue.closed_reason is not None
            assert rogue.closed_reason.startswith("protocol error: ")
            assert "not in flight" in rogue.closed_reason
            assert [type(m) for m in received] == [Hello, Error]
            assert (received[1].request_id, received[1].code) == (0, "protocol_error")  # type: ignore[attr-defined]
            assert isinstance(await honest.request(GetStorageHashes(request_id=1)), StorageHashes)
            assert not honest.is_closed

    run(body())


# --- closing --------------------------------------------------------------------------------


def test_disconnect_fails_every_pending_request_with_disconnected(
    ids: dict[str, NodeIdentity],
) -> None:
    async def body() -> None:
        async with listening(ids["alpha"]) as listener, dialing(listener, ids["beta"]) as client:
            server_side = await listener.next_session()
            pending = asyncio.ensure_future(client.request(SyncRequest((), request_id=1)))
            replies = client.stream(SyncRequest(("docs",), request_id=1))
            while len(listener.handler.requests) < 2:
                await asyncio.sleep(0.01)

            await server_side.close("shutting down")

            with pytest.raises(PeerError) as failed:
                await pending
            with pytest.raises(PeerError) as failed_stream:
                await anext(replies)  # type: ignore[arg-type]
            with pytest.raises(PeerError) as afterwards:
                await client.request(GetStorageHashes(request_id=1))
            await client.wait_closed()

            for error in (failed.value, failed_stream.value, afterwards.value):
                assert (error.peer, error.code) == ("alpha", "disconnected")
                assert error.message == "peer said goodbye: shutting down"
            assert client.closed_reason == "peer said goodbye: shutting down"

    run(body())


# --- flow control ---------------------------------------------------------------------------


def test_slow_stream_consumer_stops_the_reading_and_bounds_what_is_buffered(
    ids: dict[str, NodeIdentity],
) -> None:
    chunk_size = 128 * 1024
    count = 400  # 50 MiB: far more than the stream buffer, TLS and socket buffers together

    async def body() -> None:
        async with (
            listening(ids["alpha"], socket_buffer=STREAM_SOCKET_BUFFER) as listener,
            dialing(listener, ids["beta"]) as client,
        ):
            # what the kernel holds is small and fixed, whatever net.ipv4.tcp_rmem allows
            transport = client._transport
            assert transport is not None
            fix_socket_buffers(transport.get_extra_info("socket"), STREAM_SOCKET_BUFFER)
            request = GetChunks(
                "docs", "big", HASH, chunk_refs(count, chunk_size), request_id=PLACEHOLDER_ID
            )
            replies = client.stream(request)
            peak = 0
            taken = 0
            loop = asyncio.get_running_loop()
            async for reply in replies:
                if taken == 0:
                    # a consumer stuck on a slow disk: it takes nothing more until the session
                    # has stopped reading (or, if it never does, for TIMEOUT_SECONDS)
                    deadline = loop.time() + TIMEOUT_SECONDS
                    while client.is_reading and loop.time() < deadline:
                        await asyncio.sleep(POLL_SECONDS)
                    paused_buffered, paused_reading = client.buffered_bytes, client.is_reading
                    sender_finished = listener.handler.streams_finished
                peak = max(peak, client.buffered_bytes)
                taken += 1
                if isinstance(reply, ChunksDone):
                    break

            assert taken == count + 1
            assert STREAM_BUFFER_HIGH <= paused_buffered <= STREAM_BUFFER_HIGH + 1024 * 1024
            assert not paused_reading
            assert sender_finished == 0  # held back by TCP, not buffered here
            assert peak <= STREAM_BUFFER_HIGH + 1024 * 1024
            assert client.buffered_bytes == 0
            assert client.is_reading

    run(body())


def test_connections_beyond_the_handshake_bound_per_address_are_closed_at_once(
    ids: dict[str, NodeIdentity],
) -> None:
    async def body() -> None:
        async with listening(ids["alpha"]) as listener:
            # TCP connections that never start TLS: each holds a handshake slot until its timeout
            idle = [
                await asyncio.open_connection("127.0.0.1", listener.port)
                for _ in range(MAX_HANDSHAKES_PER_HOST + 2)
            ]
            ends = [
                await asyncio.wait_for(reader.read(1), 0.5) if n >= MAX_HANDSHAKES_PER_HOST
                else None
                for n, (reader, _) in enumerate(idle)
            ]  # fmt: skip
            assert ends[MAX_HANDSHAKES_PER_HOST:] == [b"", b""]  # closed, not a byte sent
            address, reason = await listener.next_refusal()
            assert address.startswith("127.0.0.1:") and "too many connections" in reason
            for n, (reader, _) in enumerate(idle[:MAX_HANDSHAKES_PER_HOST]):
                with pytest.raises(TimeoutError):  # still waiting for their handshake
                    await asyncio.wait_for(reader.read(1), 0.05 if n else 0.3)

            for _, writer in idle:
                writer.close()
            await asyncio.sleep(0.3)  # the server sees them go and frees their slots
            async with dialing(listener, ids["beta"]) as client:
                assert isinstance(
                    await client.request(GetStorageHashes(request_id=1)), StorageHashes
                )

    run(body())


# --- reply timeouts -------------------------------------------------------------------------


@pytest.fixture
def short_timeouts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(session_module, "REPLY_TIMEOUT", 0.4)
    monkeypatch.setattr(session_module, "SLOW_REPLY_TIMEOUT", 1.0)


def test_only_requests_that_may_make_the_peer_scan_or_pull_get_the_slow_timeout() -> None:
    class Watched(session_module._Watched):
        __slots__ = ()

    def timeout(request: Request, first: bool = False) -> float:
        watched = Watched()
        watched.watch(request, 0.0, first=first)
        return watched.timeout

    slow, fast = session_module.SLOW_REPLY_TIMEOUT, session_module.REPLY_TIMEOUT
    assert timeout(SyncRequest(("docs",), request_id=1)) == slow
    assert timeout(GetStorageHashes(rescan=True, request_id=1)) == slow
    assert timeout(GetStorageHashes(request_id=1), first=True) == slow  # it may rescan first
    assert timeout(GetStorageHashes(request_id=1)) == fast
    assert timeout(GetIndex("docs", 0, 10, request_id=1), first=True) == fast
    assert timeout(GetChunks("docs", "f", HASH, chunk_refs(1, 10), request_id=1)) == fast


def test_a_peer_that_never_answers_is_disconnected_after_the_reply_timeout(
    ids: dict[str, NodeIdentity], short_timeouts: None
) -> None:
    async def body() -> None:
        async with listening(ids["alpha"]) as listener, dialing(listener, ids["beta"]) as client:
            server_side = await listener.next_session()
            started = asyncio.get_running_loop().time()
            with pytest.raises(PeerError) as failed:
                await client.request(GetIndex("stall", 0, 100, request_id=1))
            waited = asyncio.get_running_loop().time() - started

            assert failed.value.code == "disconnected"
            assert failed.value.message == "no reply to GetIndex in 0.4 s"
            assert 0.4 <= waited < 2.0
            await server_side.wait_closed()  # it was told why
            assert server_side.closed_reason == (
                "peer sent error timeout: no reply to GetIndex in 0.4 s"
            )

    run(body())


def test_a_stream_that_stops_midway_is_cut_after_the_reply_timeout(
    ids: dict[str, NodeIdentity], short_timeouts: None
) -> None:
    async def body() -> None:
        async with listening(ids["alpha"]) as listener, dialing(listener, ids["beta"]) as client:
            request = GetChunks("docs", "stalls-midway", HASH, chunk_refs(5, 1024), request_id=1)
            got = []
            with pytest.raises(PeerError) as failed:
                async for reply in client.stream(request):
                    got.append(reply)
            assert len(got) == 2 and failed.value.message == "no reply to GetChunks in 0.4 s"
            assert client.is_closed

    run(body())


def test_slow_but_steady_replies_and_a_slow_consumer_are_not_timeouts(
    ids: dict[str, NodeIdentity], short_timeouts: None
) -> None:
    async def body() -> None:
        async with listening(ids["alpha"]) as listener, dialing(listener, ids["beta"]) as client:
            # 12 replies 0.1 s apart: 1.2 s in all, never 0.4 s without one
            trickle = GetChunks("docs", "trickles", HASH, chunk_refs(11, 1024), request_id=1)
            replies = [reply async for reply in client.stream(trickle)]
            assert len(replies) == 12 and isinstance(replies[-1], ChunksDone)

            # a consumer that stops taking replies stops our reading: the peer is not blamed
            big = GetChunks("docs", "big", HASH, chunk_refs(200, 128 * 1024), request_id=1)
            taken = 0
            async for _reply in client.stream(big):
                if taken == 0:
                    await asyncio.sleep(1.2)
                    assert not client.is_reading
                taken += 1
            assert taken == 201 and not client.is_closed

    run(body())


def test_sync_request_waits_while_the_peer_pulls_and_times_out_when_it_goes_quiet(
    ids: dict[str, NodeIdentity], short_timeouts: None
) -> None:
    async def body() -> None:
        async with listening(ids["alpha"]) as listener, dialing(listener, ids["beta"]) as client:
            server_side = await listener.next_session()
            answer = asyncio.ensure_future(client.request(SyncRequest(("docs",), request_id=1)))
            for _ in range(8):  # 2 s of the peer pulling from us: its requests are progress
                await asyncio.sleep(0.25)
                await server_side.request(GetStorageHashes(request_id=1))
            assert not answer.done()
            listener.handler.release.set()
            assert isinstance(await answer, SyncResult)

            listener.handler.release.clear()
            with pytest.raises(PeerError) as failed:
                await client.request(SyncRequest(("docs",), request_id=1))
            assert failed.value.message == "no reply to SyncRequest in 1 s"

    run(body())


def test_abandoned_stream_releases_its_buffer(ids: dict[str, NodeIdentity]) -> None:
    async def body() -> None:
        async with listening(ids["alpha"]) as listener, dialing(listener, ids["beta"]) as client:
            request = GetChunks(
                "docs", "big", HASH, chunk_refs(200, 128 * 1024), request_id=PLACEHOLDER_ID
            )
            async for _ in client.stream(request):
                await asyncio.sleep(0.2)
                assert client.buffered_bytes > 0
                break  # the iterator is dropped here

            assert client.buffered_bytes == 0
            assert isinstance(await client.request(GetStorageHashes(request_id=1)), StorageHashes)

    run(body())


# --- reconnecting ---------------------------------------------------------------------------


def test_backoff_delay_doubles_up_to_the_maximum_with_jitter() -> None:
    rng = random.Random(4)
    ceilings = [0.5, 1, 2, 4, 8, 16, 30, 30, 30]

    delays = [backoff_delay(n, 0.5, 30.0, rng) for n in range(1, 10)]

    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling
    assert backoff_delay(10_000, 0.5, 30.0, rng) <= 30.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_connect_with_backoff_retries_until_a_server_appears(ids: dict[str, NodeIdentity]) -> None:
    async def body() -> None:
        port = free_port()
        dialing_task = asyncio.ensure_future(
            connect_with_backoff(
                "127.0.0.1",
                port,
                ids["beta"],
                hello("beta"),
                Handler(),
                initial=0.05,
                maximum=0.2,
                rng=random.Random(1),
            )
        )
        await asyncio.sleep(0.5)
        assert not dialing_task.done()

        async with listening(ids["alpha"], port) as listener:
            session = await asyncio.wait_for(dialing_task, 5)
            try:
                assert session.peer_id == "alpha"
                assert isinstance(await session.request(GetStorageHashes(request_id=1)), Reply)
                assert listener.refused == []
            finally:
                await session.close()

    run(body())


def test_connect_with_backoff_gives_up_after_the_given_attempts(
    ids: dict[str, NodeIdentity], caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        with pytest.raises(ConnectionRefusedError):
            await connect_with_backoff(
                "127.0.0.1",
                free_port(),
                ids["beta"],
                hello("beta"),
                Handler(),
                attempts=3,
                initial=0.01,
                maximum=0.02,
            )

    with caplog.at_level("INFO", logger="ironsync.net.session"):
        run(body())

    assert len([r for r in caplog.records if "retrying" in r.getMessage()]) == 2
