"""The peer protocol (ironsync.protocol), specified without sockets: bytes in, messages out."""

import ast
import dataclasses
import itertools
import pathlib
import tracemalloc
from collections.abc import Callable

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ironsync.protocol
from ironsync.protocol import (
    CONNECTION_CLOSED,
    NEED_DATA,
    REPLIES,
    TRANSITIONS,
    ChangeNotice,
    ChunkData,
    ChunkList,
    ChunkRef,
    ChunksDone,
    Connection,
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
    IndexEntry,
    IndexPage,
    LocalProtocolError,
    Marker,
    Message,
    ProtocolError,
    RemoteProtocolError,
    Reply,
    Request,
    Role,
    State,
    StorageHashes,
    SyncRequest,
    SyncResult,
    index_entry_size,
)
from ironsync.protocol.connection import (
    FATAL_ERROR,
    LARGE_FRAME,
    SMALL_PIECE,
    transition_key,
)
from ironsync.protocol.limits import (
    CHUNK_REF_SIZE,
    CHUNK_REPEAT_SIZE,
    MAX_CHUNK_REFS,
    MAX_CHUNK_REPEATS,
    MAX_CHUNK_SIZE,
    MAX_FRAME_SIZE,
    MAX_IN_FLIGHT,
    MAX_INDEX_PAGE_ENTRIES,
    MAX_INT64,
    MAX_MODE,
    MAX_NAME_LEN,
    MAX_PATH_LEN,
    MAX_REQUEST_ID,
    MAX_STORAGES,
    MIN_INT64,
    PROTOCOL_VERSION,
)
from ironsync.protocol.messages import CHUNK_REPEAT_RECORD, chunk_runs
from ironsync.protocol.wire import (
    CHUNK_REF,
    MAX_INDEX_PAGE_OVERHEAD,
    TYPE_CODES,
    decode_body,
    encode_frame,
)

HASH_A = bytes(range(16))
HASH_B = bytes(range(0xF0, 0x100))

FUZZ = settings(
    max_examples=300,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)


# --- helpers ---------------------------------------------------------------------------------


def hello(node_id: str) -> Hello:
    return Hello(PROTOCOL_VERSION, node_id, "home", ("docs", "pics"))


def frame(message: Message) -> bytes:
    """The wire bytes of `message`, bypassing any sender's state machine."""
    return b"".join(encode_frame(message))


def raw_frame(items: list[object], tail: bytes = b"") -> bytes:
    body = msgpack.packb(items, use_bin_type=True) + tail
    return len(body).to_bytes(4, "big") + body


def drain(conn: Connection) -> list[Message]:
    """Every message `conn` can return now."""
    messages = []
    while not isinstance(event := conn.next_event(), Marker):
        messages.append(event)
    return messages


def feed_byte_by_byte(conn: Connection, data: bytes) -> list[Message]:
    messages = []
    for i in range(len(data)):
        conn.receive_data(data[i : i + 1])
        messages.extend(drain(conn))
    return messages


def pair() -> tuple[Connection, Connection]:
    """A client and a server that have exchanged Hellos."""
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    server.receive_data(client.send(hello("alpha")))
    client.receive_data(server.send(hello("beta")))
    assert drain(server) == [hello("alpha")]
    assert drain(client) == [hello("beta")]
    return client, server


def snapshot(conn: Connection) -> tuple[object, ...]:
    return (
        conn.our_state,
        conn.their_state,
        dict(conn.our_requests_in_flight),
        dict(conn.their_requests_in_flight),
    )


def assert_failed(conn: Connection, error: RemoteProtocolError) -> None:
    """After a remote error the connection is in ERROR and refuses further use."""
    assert error.reason
    assert conn.their_state is State.ERROR
    assert conn.our_state in (State.ERROR, State.CLOSED)
    with pytest.raises(RemoteProtocolError, match="already failed"):
        conn.next_event()
    with pytest.raises(RemoteProtocolError, match="already failed"):
        conn.receive_data(b"more")


def reject(conn: Connection, data: bytes, reason: str) -> None:
    """Feeding `data` makes `conn` raise RemoteProtocolError matching `reason`."""
    conn.receive_data(data)
    with pytest.raises(RemoteProtocolError, match=reason) as excinfo:
        drain(conn)
    assert_failed(conn, excinfo.value)


ENTRY = IndexEntry(
    "a.txt", 3, 1_700_000_000_000_000_000, 0o100644, HASH_A, False, '{"a":2}', "a", 41
)
TOMBSTONE = IndexEntry("b", 0, -1, 0, None, True, '{"b":1}', "b", 42)

# A conversation that uses every message: (sender, message). Request ids are explicit.
CONVERSATION: list[tuple[str, Message]] = [
    ("client", GetStorageHashes(request_id=1)),
    ("server", StorageHashes({"docs": HASH_A, "pics": HASH_B}, request_id=1)),
    ("client", GetIndex("docs", 0, 2, request_id=2)),
    ("server", IndexPage("docs", (ENTRY,), 41, True, request_id=2)),
    ("server", IndexPage("docs", (TOMBSTONE,), 42, False, request_id=2)),
    ("client", GetChunkList("docs", "a.txt", HASH_A, request_id=3)),
    ("client", GetChunks("docs", "a.txt", HASH_A, (ChunkRef(0, 3, HASH_B),), request_id=4)),
    ("server", ChunkList("docs", "a.txt", HASH_A, (ChunkRef(0, 3, HASH_B),), request_id=3)),
    ("server", ChunkData(0, HASH_B, b"abc", request_id=4)),
    ("server", ChunksDone(request_id=4)),
    ("client", GetFiles("docs", ("a.txt", "b/c"), HASH_A + HASH_B, request_id=6)),
    ("server", FileData(0, HASH_A, "", b"abc", request_id=6)),
    ("server", FileData(1, HASH_B, "changed", b"", request_id=6)),
    ("server", FilesDone(request_id=6)),
    ("server", ChangeNotice("pics", 7)),
    ("server", GetIndex("pics", 6, 100, request_id=1)),  # ids are per direction
    ("client", IndexPage("pics", (), 0, False, request_id=1)),
    ("server", SyncRequest(("docs",), request_id=2)),
    ("client", SyncResult(True, "converged", request_id=2)),
    ("client", SyncRequest((), request_id=5)),
    ("server", Error("busy", "a sync is already running", request_id=5)),
    ("client", Goodbye("shutting down")),
    ("server", Error("shutdown", "bye")),  # fatal: request_id 0
]


def run_conversation(byte_by_byte: bool) -> None:
    client, server = pair()
    conns = {"client": (client, server), "server": (server, client)}
    for sender_name, message in CONVERSATION:
        sender, receiver = conns[sender_name]
        data = sender.send(message)
        if byte_by_byte:
            received = feed_byte_by_byte(receiver, data)
        else:
            receiver.receive_data(data)
            received = drain(receiver)
        assert received == [message]
    for conn in (client, server):
        assert conn.our_state is conn.their_state is State.CLOSED
        assert not conn.our_requests_in_flight
        assert not conn.their_requests_in_flight


# --- round trips -----------------------------------------------------------------------------


def test_conversation_uses_every_message_type() -> None:
    used = {type(message) for _, message in CONVERSATION} | {Hello}
    assert used == set(TYPE_CODES)


@pytest.mark.parametrize("byte_by_byte", [False, True], ids=["whole", "byte_by_byte"])
def test_every_message_round_trips_between_two_connections(byte_by_byte: bool) -> None:
    run_conversation(byte_by_byte)


def test_many_frames_in_one_read_come_out_in_order() -> None:
    client, server = pair()
    requests = [GetIndex("docs", n, 10, request_id=client.next_request_id()) for n in range(50)]
    server.receive_data(b"".join(client.send(request) for request in requests))
    assert drain(server) == requests
    assert server.next_event() is NEED_DATA


@FUZZ
@given(cuts=st.lists(st.integers(0, 400), max_size=12))
def test_a_stream_split_anywhere_decodes_the_same(cuts: list[int]) -> None:
    client, _ = pair()
    replies = [message for sender, message in CONVERSATION[:10] if sender == "server"]
    for _, message in CONVERSATION[:10]:
        if isinstance(message, Request):
            client.send(message)
    received = []
    for piece in split(b"".join(frame(reply) for reply in replies), cuts):
        client.receive_data(piece)
        received.extend(drain(client))
    assert received == replies


def test_chunk_data_is_a_view_of_the_received_bytes_not_a_copy() -> None:
    client, server = pair()
    server.receive_data(client.send(GetChunks("docs", "a", HASH_A, (), request_id=1)))
    drain(server)
    data = bytearray(b"hello" * SMALL_PIECE)  # pieces this large are kept, not copied
    buffers = server.send_buffers(ChunkData(0, HASH_B, data, request_id=1))
    assert len(buffers) == 2
    assert buffers[1].obj is data  # the caller's buffer, for writelines, not a copy
    wire = b"".join(buffers)
    client.receive_data(wire)
    (received,) = drain(client)
    assert isinstance(received, ChunkData)
    assert isinstance(received.data, memoryview)
    assert received.data.obj is wire
    assert received.data == data


def read_like_a_buffered_protocol(conn: Connection, data: bytes, cuts: list[int]) -> list[Message]:
    """Feed `data` as asyncio's BufferedProtocol would: into the frame buffer whenever the
    Connection offers one (at most what a read of `cuts`' sizes brings), else through
    `receive_data`; the messages that came out."""
    messages: list[Message] = []
    pos, sizes = 0, itertools.cycle([max(1, cut) for cut in cuts] or [SMALL_PIECE])
    while pos < len(data):
        read = min(next(sizes), len(data) - pos)
        into = conn.frame_buffer()
        if into is None:
            conn.receive_data(data[pos : pos + read])
        else:
            read = min(read, len(into))
            into[:read] = data[pos : pos + read]
            conn.frame_received(read)
        pos += read
        messages.extend(drain(conn))
    return messages


def chunk_replies(sizes: list[int]) -> tuple[list[ChunkData], bytes]:
    replies = [
        ChunkData(n, HASH_B, bytes([n % 251]) * size, request_id=1) for n, size in enumerate(sizes)
    ]
    return replies, b"".join(frame(reply) for reply in replies)


@FUZZ
@given(
    sizes=st.lists(st.sampled_from([0, 1, 1000, LARGE_FRAME - 40, LARGE_FRAME, 300_000]),
                   min_size=1, max_size=6),
    cuts=st.lists(st.integers(0, 400_000), max_size=6),
)  # fmt: skip
def test_large_frames_read_into_their_own_buffer_decode_the_same(
    sizes: list[int], cuts: list[int]
) -> None:
    client, server = pair()
    server.receive_data(client.send(GetChunks("docs", "a", HASH_A, (), request_id=1)))
    drain(server)
    replies, wire = chunk_replies(sizes)

    assert read_like_a_buffered_protocol(client, wire, cuts) == replies
    assert client.frame_buffer() is None and client.next_event() is NEED_DATA


def test_a_large_frame_is_decrypted_into_the_buffer_its_data_is_a_view_of() -> None:
    client, server = pair()
    server.receive_data(client.send(GetChunks("docs", "a", HASH_A, (), request_id=1)))
    drain(server)
    (reply,), wire = chunk_replies([5 * LARGE_FRAME])
    client.receive_data(wire[:1000])  # the header and a little: the frame gets its buffer
    assert drain(client) == []
    into = client.frame_buffer()
    assert into is not None and len(into) == len(wire) - 1000
    into[:] = wire[1000:]
    client.frame_received(len(into))
    (received,) = drain(client)

    assert received == reply
    assert isinstance(received, ChunkData) and isinstance(received.data, memoryview)
    assert received.data.obj is into.obj  # decoded from the frame's own buffer: no join


def test_bytes_given_to_receive_data_fill_an_open_frame_and_the_rest_follows() -> None:
    client, server = pair()
    server.receive_data(client.send(GetChunks("docs", "a", HASH_A, (), request_id=1)))
    drain(server)
    replies, wire = chunk_replies([2 * LARGE_FRAME, 10, 3 * LARGE_FRAME])
    first = len(frame(replies[0]))
    client.receive_data(wire[:100])
    assert drain(client) == [] and client.frame_buffer() is not None
    client.receive_data(wire[100 : first + 3])  # the rest of the frame and the next's start
    assert drain(client) == replies[:1]
    client.receive_data(wire[first + 3 :])
    assert drain(client) == replies[1:]


def test_end_of_stream_inside_a_large_frame_is_a_protocol_error() -> None:
    client, server = pair()
    server.receive_data(client.send(GetChunks("docs", "a", HASH_A, (), request_id=1)))
    drain(server)
    _, wire = chunk_replies([2 * LARGE_FRAME])
    client.receive_data(wire[:100])
    drain(client)
    into = client.frame_buffer()
    assert into is not None
    into[:100] = wire[100:200]
    client.frame_received(100)
    client.receive_data(b"")

    assert client.frame_buffer() is None
    with pytest.raises(RemoteProtocolError, match="end of stream inside a frame"):
        client.next_event()


def test_frame_received_without_a_frame_buffer_is_our_mistake() -> None:
    client, _ = pair()
    with pytest.raises(LocalProtocolError, match="without a frame_buffer"):
        client.frame_received(10)


def test_a_frame_trickled_byte_by_byte_costs_about_its_size_to_buffer() -> None:
    client, server = pair()
    wire = client.send(GetChunks("docs", "a", HASH_A, (ChunkRef(0, 1, HASH_B),) * 9000,
                                 request_id=1))  # fmt: skip
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(len(wire) - 1):
            server.receive_data(wire[n : n + 1])
        buffered = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    server.receive_data(wire[-1:])
    (received,) = drain(server)

    assert buffered < 1.5 * len(wire)  # not ~300 bytes of bookkeeping per byte
    assert isinstance(received, GetChunks) and len(received.chunks) == 9000


def test_the_longest_chunk_list_decodes_to_about_the_size_of_its_frame() -> None:
    refs = tuple(ChunkRef(n * 8, 8, n.to_bytes(16, "big")) for n in range(MAX_CHUNK_REFS))
    frame = b"".join(encode_frame(ChunkList("docs", "p", HASH_A, refs, request_id=1)))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        message = decode_body(memoryview(frame)[4:])
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()

    assert held < 1.2 * len(frame)  # packed records, not a ChunkRef object each (~5x)
    assert isinstance(message, ChunkList) and message.chunks == refs
    assert message.chunks[-1] == refs[-1] and message.chunks[1:3] == refs[1:3]


@pytest.mark.parametrize(
    "record",
    [
        (2**63, 1, HASH_A),  # offset past MAX_INT64
        (0, MAX_CHUNK_SIZE + 1, HASH_A),
        (0, 2**32 - 1, HASH_A),
    ],
)
def test_a_received_chunk_ref_outside_the_limits_is_refused(record: tuple[int, int, bytes]) -> None:
    good = CHUNK_REF.pack(0, 1, HASH_B)
    body = msgpack.packb([16, 1, "docs", "p", HASH_A, good + CHUNK_REF.pack(*record)])
    with pytest.raises(RemoteProtocolError, match=r"offset|length"):
        decode_body(memoryview(body))


def test_send_returns_one_bytes_object_even_for_chunk_data() -> None:
    client, server = pair()
    server.receive_data(client.send(GetChunks("docs", "a", HASH_A, (), request_id=1)))
    drain(server)
    data = server.send(ChunkData(0, HASH_B, memoryview(b"xyz"), request_id=1))
    assert type(data) is bytes
    assert data.endswith(b"xyz")


# --- the wire encoding is a contract: pinned bytes -------------------------------------------


PINNED: list[tuple[Message, str]] = [
    (
        GetStorageHashes(rescan=True, request_id=1),
        "00000005"  # frame length 5
        "94"  # array of 4
        "0a"  # type code: GetStorageHashes
        "01"  # request_id 1
        "c3"  # rescan: true
        "80",  # hashes: {} (the asker's own)
    ),
    (
        GetStorageHashes(hashes={"pics": HASH_B, "docs": HASH_A}, request_id=2),
        "00000033"  # frame length 51
        "94"  # array of 4
        "0a"  # type code: GetStorageHashes
        "02"  # request_id 2
        "c2"  # rescan: false
        "82"  # map of 2, keys sorted
        "a4646f6373"
        "c410"
        + HASH_A.hex()  # "docs": bin 16
        + "a470696373"
        "c410" + HASH_B.hex(),  # "pics": bin 16
    ),
    (
        hello("alpha"),
        "0000001a"  # frame length 26
        "96"  # array of 6
        "01"  # type code: Hello
        "00"  # request_id 0
        "02"  # protocol_version
        "a5616c706861"  # "alpha"
        "a4686f6d65"  # "home"
        "92a4646f6373a470696373",  # ["docs", "pics"]
    ),
    (
        GetIndex("docs", 5, 100, request_id=7),
        "0000000a950c07a4646f63730564",  # [12, 7, "docs", 5, 100]
    ),
    (
        IndexPage("docs", (ENTRY, TOMBSTONE), 42, False, request_id=7),
        "0000005c"  # frame length 92
        "960d07a4646f6373"  # [13, 7, "docs",
        "92"  # entries: 2 arrays
        "9ba5612e74787403cf17979cfe362a0000cd81a4"  # ["a.txt", 3, mtime (uint64), 0o100644,
        "c410000102030405060708090a0b0c0d0e0f"  # hash (bin 16),
        "c2a77b2261223a327da16129"  # false, '{"a":2}', "a", 41,
        "a466696c65c0"  # "file", nil],
        "9ba16200ff00c0c3a77b2262223a317da1622a"  # ["b", 0, -1, 0, nil, true, ..., "b", 42,
        "a466696c65c0"  # "file", nil]
        "2ac2",  # last_sequence 42, more false]
    ),
    (
        GetChunks("docs", "a.txt", HASH_A, (ChunkRef(0, 3, HASH_B),), request_id=9),
        "0000003e961009a4646f6373a5612e747874"  # [16, 9, "docs", "a.txt",
        "c410000102030405060708090a0b0c0d0e0f"  # file_hash,
        "c41c"  # chunks: bin of 28 bytes, one ChunkRef record:
        "0000000000000000"  # offset u64
        "00000003"  # length u32
        "f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff",  # hash]
    ),
    (
        ChunkData(0, HASH_B, b"abc", request_id=9),
        "0000001a"  # frame length 26
        "95110900c410f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff00"  # header [17, 9, 0, hash, 0]
        "616263",  # the raw chunk bytes, to the end of the frame
    ),
    (
        ChunkData(131072, HASH_B, b"abc", leading_zeros=4000, request_id=9),
        "00000020"  # frame length 32
        "951109ce00020000"  # header [17, 9, 131072 (uint32),
        "c410f0f1f2f3f4f5f6f7f8f9fafbfcfdfeffcd0fa0"  # hash, 4000 (uint16) zeros before "abc"]
        "616263",  # then zeros to the length of the chunk asked for
    ),
    (
        ChunkList(
            "docs",
            "a",
            HASH_A,
            (ChunkRef(0, 5, HASH_A), ChunkRef(5, 8, HASH_B), ChunkRef(29, 1, HASH_A)),
            repeats=bytes.fromhex("0000000100000003"),
            request_id=3,
        ),
        "0000007d980f03a4646f6373a161"  # [15, 3, "docs", "a",
        "c410000102030405060708090a0b0c0d0e0f"  # file_hash,
        "c454"  # chunks: bin of 84 bytes, three ChunkRef records,
        "000000000000000000000005000102030405060708090a0b0c0d0e0f"
        "000000000000000500000008f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff"
        "000000000000001d00000001000102030405060708090a0b0c0d0e0f"
        "c2"  # more false,
        "c408"  # repeats: bin of 8 bytes, one record:
        "0000000100000003",  # chunks[1] u32 stands for 3 u32 chunks (at 5, 13, 21)]
    ),
    (
        GetFiles("docs", ("a.txt", "b/c"), HASH_A + HASH_B, request_id=9),
        "00000035951509a4646f6373"  # [21, 9, "docs",
        "92a5612e747874a3622f63"  # paths: ["a.txt", "b/c"],
        "c420000102030405060708090a0b0c0d0e0ff0f1f2f3f4f5f6f7f8f9fafbfcfdfeff",  # hashes: bin 32]
    ),
    (
        FileData(1, HASH_B, "", b"abc", request_id=9),
        "0000001a"  # frame length 26
        "95160901c410f0f1f2f3f4f5f6f7f8f9fafbfcfdfeffa0"  # header [22, 9, 1, hash, ""]
        "616263",  # the raw file bytes, to the end of the frame
    ),
    (
        FileData(0, HASH_A, "changed", b"", request_id=9),
        "0000001e95160900c410000102030405060708090a0b0c0d0e0f"  # [22, 9, 0, hash,
        "a76368616e676564",  # "changed"] and no data
    ),
    (FilesDone(request_id=9), "00000003921709"),
    (
        StorageHashes({"pics": HASH_B, "docs": HASH_A}, request_id=2),
        "00000032930b02"  # [11, 2,
        "82a4646f6373c410000102030405060708090a0b0c0d0e0f"  # {"docs": hash (sorted first),
        "a470696373c410f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff",  # "pics": hash}]
    ),
    (
        Error("protocol_error", "bad frame"),
        "0000001c940300ae70726f746f636f6c5f6572726f72a9626164206672616d65",
    ),
]


@pytest.mark.parametrize(
    ("message", "expected_hex"), PINNED, ids=[type(m).__name__ for m, _ in PINNED]
)
def test_wire_encoding_is_pinned(message: Message, expected_hex: str) -> None:
    assert frame(message).hex() == expected_hex
    assert decode_body(memoryview(bytes.fromhex(expected_hex))[4:]) == message


def test_type_codes_are_pinned() -> None:
    assert {cls.__name__: code for cls, code in TYPE_CODES.items()} == {
        "Hello": 1,
        "Goodbye": 2,
        "Error": 3,
        "ChangeNotice": 4,
        "GetStorageHashes": 10,
        "StorageHashes": 11,
        "GetIndex": 12,
        "IndexPage": 13,
        "GetChunkList": 14,
        "ChunkList": 15,
        "GetChunks": 16,
        "ChunkData": 17,
        "ChunksDone": 18,
        "SyncRequest": 19,
        "SyncResult": 20,
        "GetFiles": 21,
        "FileData": 22,
        "FilesDone": 23,
    }


# --- hypothesis: valid messages --------------------------------------------------------------

names = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), min_size=1)
names = names.filter(lambda s: len(s) <= MAX_NAME_LEN)
node_ids = st.from_regex(r"[A-Za-z0-9_.-]{1,64}", fullmatch=True)
hashes = st.binary(min_size=16, max_size=16)
uint63 = st.integers(0, MAX_INT64)
request_ids = st.integers(1, MAX_REQUEST_ID)
aliases = st.lists(names, unique=True, max_size=4).map(tuple)
texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=30)
chunk_refs = st.lists(
    st.builds(ChunkRef, uint63, st.integers(0, MAX_CHUNK_SIZE), hashes), max_size=4
).map(tuple)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.binary(max_size=40)
    | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=4) | st.binary(max_size=4), children, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def index_entries(draw: st.DrawFn) -> IndexEntry:
    deleted = draw(st.booleans())
    kind = draw(st.sampled_from(["file", "dir", "symlink"]))
    return IndexEntry(
        path=draw(names),
        size=draw(uint63),
        mtime_ns=draw(st.integers(MIN_INT64, MAX_INT64)),
        mode=draw(st.integers(0, MAX_MODE)),
        hash=None if deleted else draw(hashes),
        deleted=deleted,
        version=draw(texts),
        modified_by=draw(node_ids),
        sequence=draw(uint63),
        kind=kind,
        target=draw(names) if kind == "symlink" and not deleted else None,
    )


def _answered(cls: type[Message], *fields: st.SearchStrategy[object]) -> st.SearchStrategy[Message]:
    """A request or reply of type `cls` with any valid request id."""
    return st.builds(cls, *fields, request_id=request_ids)


messages = st.one_of(
    st.builds(Hello, st.just(PROTOCOL_VERSION), node_ids, names, aliases),
    st.builds(Goodbye, texts),
    st.builds(Error, node_ids, texts, request_id=st.integers(0, MAX_REQUEST_ID)),
    st.builds(ChangeNotice, names, uint63),
    _answered(GetStorageHashes),
    _answered(StorageHashes, st.dictionaries(names, hashes, max_size=4)),
    _answered(GetIndex, names, uint63, st.integers(1, MAX_INDEX_PAGE_ENTRIES)),
    _answered(
        IndexPage, names, st.lists(index_entries(), max_size=3).map(tuple), uint63, st.booleans()
    ),
    _answered(GetChunkList, names, names, hashes),
    _answered(ChunkList, names, names, hashes, chunk_refs, st.booleans()),
    st.builds(
        lambda rid, refs, more: ChunkList(
            "docs", "a", HASH_A, chunk_runs(refs)[0], more, chunk_runs(refs)[1], request_id=rid
        ),
        request_ids,
        st.lists(st.builds(lambda n: (n * 8, 8, HASH_B), st.integers(0, 5)), max_size=6),
        st.booleans(),
    ),
    _answered(GetChunks, names, names, hashes, chunk_refs),
    _answered(ChunkData, uint63, hashes, st.binary(max_size=100)),
    _answered(ChunkData, uint63, hashes, st.binary(max_size=100), st.integers(0, 2**20)),
    _answered(ChunksDone),
    st.builds(
        lambda rid, paths: GetFiles("docs", tuple(paths), HASH_A * len(paths), request_id=rid),
        request_ids,
        st.lists(names, max_size=4),
    ),
    _answered(FileData, st.integers(0, 1023), hashes, st.just(""), st.binary(max_size=100)),
    _answered(FileData, st.integers(0, 1023), hashes, node_ids, st.just(b"")),
    _answered(FilesDone),
    _answered(SyncRequest, aliases),
    _answered(SyncResult, st.booleans(), texts),
)


@FUZZ
@given(message=messages)
def test_any_valid_message_survives_encoding_and_decoding(message: Message) -> None:
    data = frame(message)
    assert int.from_bytes(data[:4], "big") == len(data) - 4
    assert decode_body(memoryview(data)[4:]) == message


@FUZZ
@given(message=messages, field=st.integers(0, 20), data=st.data())
def test_a_message_with_any_field_replaced_decodes_or_is_refused(
    message: Message, field: int, data: st.DataObject
) -> None:
    if isinstance(message, ChunkData | FileData):
        return  # its raw tail is not msgpack; byte mutations cover it
    items = msgpack.unpackb(frame(message)[4:])
    value = data.draw(msgpack_values)
    items[1 + field % (len(items) - 1)] = value  # the request_id or any field
    body = msgpack.packb(items, use_bin_type=True)
    try:
        decoded = decode_body(memoryview(body))
    except RemoteProtocolError as exc:
        assert exc.reason
    else:
        assert type(decoded) is type(message)


# --- hypothesis: hostile bytes ---------------------------------------------------------------

type_codes = st.sampled_from(sorted(TYPE_CODES.values())) | st.integers(0, 255)

bodies = st.one_of(
    st.binary(max_size=60),
    # A plausible start (fixarray + type code), then anything.
    st.builds(
        lambda n, code, rest: bytes([0x90 + n, code]) + rest,
        st.integers(0, 15),
        type_codes,
        st.binary(max_size=60),
    ),
    # Well-formed msgpack of the right outer shape, with fields of any type.
    st.builds(
        lambda code, rid, fields: msgpack.packb([code, rid, *fields], use_bin_type=True),
        type_codes,
        st.integers(-1, 2**33),
        st.lists(msgpack_values, max_size=10),
    ),
)


def framed(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


def consume_expecting_only_remote_errors(conn: Connection, pieces: list[bytes]) -> bool:
    """Feed `pieces`, draining after each; True if the connection refused the stream."""
    try:
        for piece in pieces:
            conn.receive_data(piece)
            for message in drain(conn):
                assert isinstance(message, Message)
    except RemoteProtocolError as exc:
        assert_failed(conn, exc)
        return True
    return False


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@FUZZ
@given(
    data=st.binary(max_size=200),
    handshaken=st.booleans(),
    cuts=st.lists(st.integers(0, 300), max_size=5),
    eof=st.booleans(),
)
def test_random_bytes_raise_only_remote_protocol_errors(
    data: bytes, handshaken: bool, cuts: list[int], eof: bool
) -> None:
    conn = pair()[0] if handshaken else Connection(Role.SERVER)
    consume_expecting_only_remote_errors(conn, [*split(data, cuts), *([b""] if eof else [])])


@FUZZ
@given(bodies=st.lists(bodies, min_size=1, max_size=4), handshaken=st.booleans())
def test_random_frames_raise_only_remote_protocol_errors(
    bodies: list[bytes], handshaken: bool
) -> None:
    conn = pair()[0] if handshaken else Connection(Role.SERVER)
    consume_expecting_only_remote_errors(conn, [framed(body) for body in bodies])


def reply_stream() -> tuple[Connection, bytes, list[int]]:
    """A client awaiting the server's half of CONVERSATION, that half's bytes, and where each
    of its frames ends."""
    client, _ = pair()
    stream = bytearray()
    ends = [0]
    for sender, message in CONVERSATION:
        if sender == "client" and isinstance(message, Request):
            client.send(message)
        elif sender == "server":
            stream += frame(message)
            ends.append(len(stream))
    return client, bytes(stream), ends


@FUZZ
@given(cut=st.integers(0, 2000), cuts=st.lists(st.integers(0, 2000), max_size=4))
def test_a_truncated_stream_is_refused_unless_cut_between_frames(cut: int, cuts: list[int]) -> None:
    client, stream, ends = reply_stream()
    cut %= len(stream) + 1
    refused = consume_expecting_only_remote_errors(client, [*split(stream[:cut], cuts), b""])
    assert refused == (cut not in ends)
    if not refused:
        assert client.next_event() is CONNECTION_CLOSED
        assert client.their_state is State.CLOSED


@FUZZ
@given(
    mutations=st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), min_size=1),
    cut=st.integers(0, 2000) | st.none(),
    cuts=st.lists(st.integers(0, 2000), max_size=4),
)
def test_a_mutated_stream_raises_only_remote_protocol_errors(
    mutations: list[tuple[int, int]], cut: int | None, cuts: list[int]
) -> None:
    client, stream, _ = reply_stream()
    mutated = bytearray(stream)
    for position, value in mutations:
        mutated[position % len(mutated)] = value
    if cut is not None:
        mutated = mutated[: cut % (len(mutated) + 1)]
    consume_expecting_only_remote_errors(client, [*split(bytes(mutated), cuts), b""])


# --- remote rule breaking, each refused with a reason ----------------------------------------


def test_an_oversized_length_is_refused_as_soon_as_the_header_arrives() -> None:
    conn = Connection(Role.SERVER)
    reject(conn, (MAX_FRAME_SIZE + 1).to_bytes(4, "big"), "MAX_FRAME_SIZE")


def test_a_frame_of_exactly_max_size_is_waited_for() -> None:
    conn = Connection(Role.SERVER)
    conn.receive_data(MAX_FRAME_SIZE.to_bytes(4, "big") + b"\x96")
    assert conn.next_event() is NEED_DATA


def test_a_message_before_hello_is_refused() -> None:
    reject(
        Connection(Role.SERVER),
        frame(GetIndex("docs", 0, 10, request_id=1)),
        "CLIENT in state AWAIT_HELLO may not send GetIndex",
    )


def test_a_hello_with_another_protocol_version_is_refused() -> None:
    future_hello = raw_frame([1, 0, 3, "alpha", "home", ["docs"], "a field from the future"])
    reject(Connection(Role.SERVER), future_hello, "protocol version 3; we speak only 2")


def test_a_second_hello_is_refused() -> None:
    client, _ = pair()
    reject(client, frame(hello("beta")), "SERVER in state READY may not send Hello")


def test_a_reply_to_a_request_never_sent_is_refused() -> None:
    client, _ = pair()
    reject(client, frame(StorageHashes({}, request_id=9)), "request id 9, which is not in flight")


def test_a_reply_after_the_final_reply_is_refused() -> None:
    client, server = pair()
    server.receive_data(client.send(GetChunks("docs", "a", HASH_A, (), request_id=1)))
    drain(server)
    client.receive_data(server.send(ChunksDone(request_id=1)))
    assert drain(client) == [ChunksDone(request_id=1)]
    reject(client, frame(ChunkData(0, HASH_A, b"late", request_id=1)), "not in flight")


def test_a_reply_of_the_wrong_kind_is_refused() -> None:
    client, _ = pair()
    client.send(GetIndex("docs", 0, 10, request_id=1))
    reject(
        client,
        frame(ChunkList("docs", "a", HASH_A, (), request_id=1)),
        "ChunkList in reply to GetIndex",
    )


def test_a_request_reusing_an_id_in_flight_is_refused() -> None:
    _, server = pair()
    request = frame(GetIndex("docs", 0, 10, request_id=3))
    server.receive_data(request)
    drain(server)
    reject(server, request, "reused request id 3, still in flight")


def test_too_many_requests_in_flight_are_refused() -> None:
    _, server = pair()
    server.receive_data(
        b"".join(frame(GetStorageHashes(request_id=n + 1)) for n in range(MAX_IN_FLIGHT))
    )
    assert len(drain(server)) == MAX_IN_FLIGHT
    reject(server, frame(GetStorageHashes(request_id=MAX_IN_FLIGHT + 1)), "requests in flight")


def test_anything_after_goodbye_is_refused() -> None:
    client, _ = pair()
    client.receive_data(frame(Goodbye("done")))
    assert drain(client) == [Goodbye("done")]
    assert client.their_state is State.CLOSED
    reject(client, frame(ChangeNotice("docs", 1)), "SERVER in state CLOSED may not send")


def test_end_of_stream_inside_a_frame_is_refused() -> None:
    client, _ = pair()
    data = frame(ChangeNotice("docs", 1))
    client.receive_data(data[:-1])
    reject(client, b"", "end of stream inside a frame")
    client, _ = pair()
    client.receive_data(data[:2])
    reject(client, b"", "end of stream inside a frame header")


def test_end_of_stream_between_frames_closes_their_side() -> None:
    client, _ = pair()
    client.receive_data(frame(ChangeNotice("docs", 1)))
    client.receive_data(b"")
    assert client.next_event() == ChangeNotice("docs", 1)
    assert client.next_event() is CONNECTION_CLOSED
    assert client.their_state is State.CLOSED
    assert client.next_event() is CONNECTION_CLOSED


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (framed(b""), "not a msgpack array"),
        (framed(b"\xc1\x01"), "not a msgpack array"),
        (raw_frame([99, 1]), "unknown message type"),
        (raw_frame([10]), "not a msgpack array"),
        (raw_frame([10, 1, False, {}, "x"]), "GetStorageHashes has 2 fields, the frame has 3"),
        (raw_frame([10, 1, False, {"docs": b"short"}]), "must be 16 bytes, not 5"),
        (raw_frame([10, 1], tail=b"\x00"), "undecodable"),
        (raw_frame([4, 0, "docs", -1]), "sequence must be in"),
        (raw_frame([4, 0, "docs", True]), "sequence must be an int"),
        (raw_frame([4, 0, "docs", 1.0]), "sequence must be an int"),
        (raw_frame([4, 0, b"docs", 1]), "storage must be a str"),
        (raw_frame([4, 0, "", 1]), "storage must have 1 to"),
        (raw_frame([4, 7, "docs", 1]), "request_id must be in"),
        (framed(b"\x94\x04\x00\xa2\xff\xfe\x01"), "utf-8"),  # [4, 0, <invalid UTF-8>, 1]
        (framed(b"\x93\x04\x00\xdd\xff\xff\xff\xff"), "exceeds max_array_len"),
        (framed(b"\x93\x0b\x01\xdf\xff\xff\xff\xff"), "exceeds max_map_len"),
        (framed(b"\x93\x04\x00" + b"\xdd\x00\x00\x10\x00" * 2000), "undecodable"),
        (raw_frame([13, 1, "docs", [[1, 2]], 0, False]), "IndexEntry must be an array of 11"),
        (raw_frame([16, 1, "d", "a", HASH_A, b"\x00" * 27]), "whole number of 28-byte"),
        (raw_frame([16, 1, "d", "a", HASH_A, [[0, 1, HASH_A]]]), "chunks must be a bin"),
        (raw_frame([17, 1, 0]), "ChunkData has 4 fields, the frame has 2"),
        (framed(b"\x94\x11\x01\x00\xc4\x10"), "undecodable ChunkData header"),
    ],
)
def test_malformed_frames_are_refused_with_a_reason(data: bytes, reason: str) -> None:
    client, _ = pair()
    reject(client, data, reason)


def test_a_fatal_error_may_still_be_sent_after_a_remote_error() -> None:
    client, server = pair()
    reject(client, framed(b"garbage"), "not a msgpack array")
    with pytest.raises(LocalProtocolError, match="CLIENT in state ERROR may not send GetIndex"):
        client.send(GetIndex("docs", 0, 1, request_id=1))
    server.receive_data(client.send(Error("protocol_error", "you sent garbage")))
    assert client.our_state is State.CLOSED
    assert drain(server) == [Error("protocol_error", "you sent garbage")]
    assert server.their_state is State.CLOSED


# --- local misuse: LocalProtocolError, nothing changes ---------------------------------------


def _client_awaiting_replies() -> Connection:
    client, server = pair()
    server.receive_data(client.send(GetChunks("docs", "a", HASH_A, (), request_id=1)))
    client.receive_data(server.send(GetIndex("docs", 0, 5, request_id=1)))
    drain(client)
    return client


LOCAL_MISUSE: list[tuple[str, Callable[[], Connection], Callable[[Connection], object], str]] = [
    (
        "request before hello",
        lambda: Connection(Role.CLIENT),
        lambda c: c.send(GetIndex("docs", 0, 1, request_id=1)),
        "CLIENT in state AWAIT_HELLO may not send GetIndex",
    ),
    (
        "second hello",
        _client_awaiting_replies,
        lambda c: c.send(hello("alpha")),
        "CLIENT in state READY may not send Hello",
    ),
    (
        "duplicate request id",
        _client_awaiting_replies,
        lambda c: c.send(GetStorageHashes(request_id=1)),
        "reused request id 1",
    ),
    (
        "reply to nothing",
        _client_awaiting_replies,
        lambda c: c.send(SyncResult(True, "", request_id=2)),
        "not in flight",
    ),
    (
        "wrong reply kind",
        _client_awaiting_replies,
        lambda c: c.send(ChunksDone(request_id=1)),
        "ChunksDone in reply to GetIndex",
    ),
    (
        "after goodbye",
        lambda: _sent(_client_awaiting_replies(), Goodbye("bye")),
        lambda c: c.send(IndexPage("docs", (), 0, False, request_id=1)),
        "CLIENT in state CLOSED may not send IndexPage",
    ),
    (
        "frame too large",
        _client_awaiting_replies,
        lambda c: c.send(
            IndexPage(
                "docs",
                tuple(
                    IndexEntry("p" * MAX_PATH_LEN, 0, 0, 0, None, True, "", "a", n)
                    for n in range(MAX_FRAME_SIZE // MAX_PATH_LEN + 1)
                ),
                0,
                False,
                request_id=1,
            )
        ),
        "more than MAX_FRAME_SIZE",
    ),
    (
        "not a message",
        _client_awaiting_replies,
        lambda c: c.send(b"hello"),  # type: ignore[arg-type]
        "not a Message",
    ),
    (
        "data after end of stream",
        lambda: _eof(_client_awaiting_replies()),
        lambda c: c.receive_data(b"more"),
        "after end of stream",
    ),
]


def _sent(conn: Connection, message: Message) -> Connection:
    conn.send(message)
    return conn


def _eof(conn: Connection) -> Connection:
    conn.receive_data(b"")
    return conn


@pytest.mark.parametrize(
    ("make", "misuse", "reason"),
    [case[1:] for case in LOCAL_MISUSE],
    ids=[case[0] for case in LOCAL_MISUSE],
)
def test_local_misuse_raises_and_changes_nothing(
    make: Callable[[], Connection], misuse: Callable[[Connection], object], reason: str
) -> None:
    conn = make()
    before = snapshot(conn)
    with pytest.raises(LocalProtocolError, match=reason):
        misuse(conn)
    assert snapshot(conn) == before


def chunk_list_repeating(*repeats: tuple[int, int]) -> ChunkList:
    """A ChunkList of one chunk with these (index, count) repeats."""
    packed = b"".join(CHUNK_REPEAT_RECORD.pack(*r) for r in repeats)
    return ChunkList("docs", "a", HASH_A, (ChunkRef(0, 8, HASH_B),), repeats=packed, request_id=1)


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (lambda: Hello(PROTOCOL_VERSION, "", "home", ()), "node_id must have 1 to 64"),
        (lambda: Hello(PROTOCOL_VERSION, "a b", "home", ()), r"node_id must match"),
        (lambda: Hello(PROTOCOL_VERSION, "a" * 65, "home", ()), "node_id must have 1 to 64"),
        (lambda: Hello(PROTOCOL_VERSION, "a", "home", ("docs", "docs")), "must not repeat"),
        (lambda: Hello(PROTOCOL_VERSION, "a", "home", ("x",) * (MAX_STORAGES + 1)), "at most 1024"),
        (lambda: Hello(PROTOCOL_VERSION, "a", "home", "docs"), "storages must be a tuple"),
        (lambda: Hello(True, "a", "home", ()), "protocol_version must be 2"),
        (
            lambda: Hello(PROTOCOL_VERSION, "a", "home", (), request_id=3),
            "request_id must be in \\[0, 0\\]",
        ),
        (lambda: GetIndex("docs", 0, 0, request_id=1), "limit must be in"),
        (lambda: GetIndex("docs", 0, 1), "request_id must be in \\[1,"),
        (lambda: GetIndex("d\x00cs", 0, 1, request_id=1), "must not contain NUL"),
        (lambda: GetChunkList("docs", "\udcff", HASH_A, request_id=1), "not encodable as UTF-8"),
        (lambda: GetChunkList("docs", "a", b"short", request_id=1), "must be 16 bytes"),
        (lambda: IndexEntry("a", -1, 0, 0, HASH_A, False, "", "a", 0), "size must be in"),
        (lambda: IndexEntry("a", 0, 0, 0, HASH_A, True, "", "a", 0), "None for a deleted"),
        (lambda: IndexEntry("a", 0, 0, 0, None, False, "", "a", 0), "hash must be bytes"),
        (lambda: IndexEntry("a", 0, 2**63, 0, None, True, "", "a", 0), "mtime_ns must be in"),
        (lambda: ChunkRef(0, MAX_CHUNK_SIZE + 1, HASH_A), "length must be in"),
        (
            lambda: ChunkData(0, HASH_A, bytes(MAX_CHUNK_SIZE + 1), request_id=1),
            "at most 4194304",
        ),
        (lambda: ChunkData(0, HASH_A, "text", request_id=1), "data must be bytes-like"),
        (lambda: ChunkData(0, HASH_A, b"x", -1, request_id=1), "leading_zeros must be in"),
        (
            lambda: ChunkData(0, HASH_A, b"x", MAX_CHUNK_SIZE, request_id=1),
            "at most 4194304 bytes with its leading zeros",
        ),
        (lambda: chunk_list_repeating((1, 2)), "rising order, not 1 after -1"),
        (lambda: chunk_list_repeating((0, 2), (0, 3)), "rising order, not 0 after 0"),
        (lambda: chunk_list_repeating((0, 1)), "repeat count must be in \\[2,"),
        (
            lambda: ChunkList("docs", "a", HASH_A, (), repeats=b"\x00", request_id=1),
            "records of 8 bytes, not 1 bytes",
        ),
        (
            lambda: ChunkList("docs", "a", HASH_A, (), repeats="x", request_id=1),  # type: ignore[arg-type]
            "repeats must be bytes",
        ),
        (lambda: StorageHashes({"docs": b"x"}, request_id=1), "must be 16 bytes"),
        (lambda: GetFiles("docs", ("a", "b"), HASH_A, request_id=1), "16 bytes per path"),
        (lambda: GetFiles("docs", ("a",) * 1025, HASH_A * 1025, request_id=1), "at most 1024"),
        (lambda: GetFiles("docs", ("",), HASH_A, request_id=1), "paths must have 1 to"),
        (lambda: FileData(1024, HASH_A, "", b"", request_id=1), "index must be in"),
        (lambda: FileData(0, HASH_A, "changed", b"x", request_id=1), "carries no data"),
        (lambda: FileData(0, HASH_A, "no spaces", b"", request_id=1), "error must match"),
        (
            lambda: FileData(0, HASH_A, "", bytes(4 * 1024 * 1024 + 1), request_id=1),
            "at most 4194304 bytes",
        ),
        (lambda: SyncResult(1, "", request_id=1), "ok must be a bool"),
        (lambda: Error("no spaces", "", request_id=1), "code must match"),
        (lambda: Goodbye("x" * 5000), "reason must have 0 to 4096"),
    ],
)
def test_invalid_messages_cannot_be_built(build: Callable[[], object], reason: str) -> None:
    with pytest.raises(LocalProtocolError, match=reason):
        build()


# --- the rules as data, checked exhaustively -------------------------------------------------

# One example of every transition key, replies answering request id 1.
EXAMPLES: list[Message] = [
    hello("x"),
    Goodbye(""),
    Error("fatal", ""),
    Error("failed", "", request_id=1),
    ChangeNotice("docs", 1),
    GetStorageHashes(request_id=100),
    StorageHashes({}, request_id=1),
    GetIndex("docs", 0, 1, request_id=100),
    IndexPage("docs", (), 0, False, request_id=1),
    GetChunkList("docs", "a", HASH_A, request_id=100),
    ChunkList("docs", "a", HASH_A, (), request_id=1),
    GetChunks("docs", "a", HASH_A, (), request_id=100),
    ChunkData(0, HASH_A, b"", request_id=1),
    ChunksDone(request_id=1),
    GetFiles("docs", ("a",), HASH_A, request_id=100),
    FileData(0, HASH_A, "", b"", request_id=1),
    FilesDone(request_id=1),
    SyncRequest((), request_id=100),
    SyncResult(True, "", request_id=1),
]


def test_examples_cover_every_transition_key() -> None:
    keys = {key for table in TRANSITIONS[Role.CLIENT].values() for key in table}
    assert {transition_key(m) for m in EXAMPLES} == keys | {Hello}
    assert FATAL_ERROR in keys


def _fields(message: Message) -> list[str]:
    return [f.name for f in dataclasses.fields(message) if f.name != "request_id"]


def _example_of(request_type: type[Request]) -> Request:
    return next(m for m in EXAMPLES if type(m) is request_type)  # type: ignore[return-value]


def _with_id(message: Message, request_id: int) -> Message:
    return type(message)(*[getattr(message, f) for f in _fields(message)], request_id=request_id)


def _sender_in(state: State, reply_to: Request | None) -> Connection:
    """A client whose own side is in `state` and which owes a reply to `reply_to`."""
    conn = Connection(Role.CLIENT)
    conn.receive_data(frame(hello("peer")))
    if reply_to is not None:
        conn.receive_data(frame(reply_to))
    drain(conn)
    if state in (State.READY, State.CLOSED):
        conn.send(hello("me"))
    if state is State.CLOSED:
        conn.send(Goodbye(""))
    if state is State.ERROR:
        with pytest.raises(RemoteProtocolError):
            conn.receive_data(framed(b"garbage"))
            conn.next_event()
    return conn


def _reply_target(message: Message) -> Request | None:
    if not isinstance(message, Reply) or transition_key(message) == FATAL_ERROR:
        return None
    request_type = next(r for r, replies in REPLIES.items() if type(message) in replies)
    return _with_id(_example_of(request_type), 1)  # type: ignore[return-value]


@pytest.mark.parametrize("state", list(State), ids=lambda s: s.name)
@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: str(transition_key(m)))
def test_sending_is_allowed_exactly_where_the_table_says(state: State, message: Message) -> None:
    conn = _sender_in(state, _reply_target(message))
    expected = TRANSITIONS[Role.CLIENT][state].get(transition_key(message))
    if expected is None:
        before = snapshot(conn)
        with pytest.raises(LocalProtocolError, match=f"CLIENT in state {state.name} may not"):
            conn.send(message)
        assert snapshot(conn) == before
    else:
        conn.send(message)
        assert conn.our_state is expected


def _receiver_with_their_side_in(state: State, awaiting: Request | None) -> Connection:
    """A client whose peer's side is in `state`, with `awaiting` (id 1) of ours in flight."""
    conn = Connection(Role.CLIENT)
    conn.send(hello("me"))
    if awaiting is not None:
        conn.send(awaiting)
    if state in (State.READY, State.CLOSED):
        conn.receive_data(frame(hello("peer")))
    if state is State.CLOSED:
        conn.receive_data(frame(Goodbye("")))
    drain(conn)
    return conn


@pytest.mark.parametrize("state", [State.AWAIT_HELLO, State.READY, State.CLOSED], ids=str)
@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: str(transition_key(m)))
def test_receiving_is_allowed_exactly_where_the_table_says(state: State, message: Message) -> None:
    conn = _receiver_with_their_side_in(state, _reply_target(message))
    expected = TRANSITIONS[Role.SERVER][state].get(transition_key(message))
    conn.receive_data(frame(message))
    if expected is None:
        with pytest.raises(RemoteProtocolError, match=f"SERVER in state {state.name} may not"):
            conn.next_event()
        assert conn.their_state is State.ERROR
    else:
        assert conn.next_event() == message
        assert conn.their_state is expected


def test_the_transition_table_is_the_same_for_both_roles() -> None:
    assert TRANSITIONS[Role.CLIENT] == TRANSITIONS[Role.SERVER]


# --- request ids, limits, purity -------------------------------------------------------------


def test_next_request_id_skips_ids_in_flight() -> None:
    client, _ = pair()
    first = client.next_request_id()
    client.send(GetStorageHashes(request_id=first + 1))
    assert client.next_request_id() == first + 2
    client.send(GetStorageHashes(request_id=first))
    assert set(client.our_requests_in_flight) == {first, first + 1}


def test_an_index_page_fits_when_its_entries_fit_the_budget() -> None:
    storage = "\U0001f4c1" * MAX_NAME_LEN  # 4 UTF-8 bytes per character: the widest alias
    entries = (ENTRY, TOMBSTONE)
    page = IndexPage(storage, entries, MAX_INT64, True, request_id=MAX_REQUEST_ID)
    overhead = len(frame(page)) - 4 - sum(index_entry_size(entry) for entry in entries)
    assert 0 < overhead <= MAX_INDEX_PAGE_OVERHEAD


def test_the_longest_chunk_list_fits_in_one_frame() -> None:
    path = "\U0001f4c1" * MAX_PATH_LEN
    header = frame(ChunkList("\U0001f4c1" * MAX_NAME_LEN, path, HASH_A, (), request_id=1))
    most_repeats = MAX_CHUNK_REPEATS * CHUNK_REPEAT_SIZE + 5  # and its bin's header
    assert len(header) + MAX_CHUNK_REFS * CHUNK_REF_SIZE + most_repeats <= MAX_FRAME_SIZE


def test_the_protocol_package_does_no_io() -> None:
    forbidden = {"asyncio", "socket", "ssl", "apsw", "time", "selectors", "os"}
    package = pathlib.Path(ironsync.protocol.__file__).parent
    for source in package.glob("*.py"):
        tree = ast.parse(source.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                modules = {(node.module or "").split(".")[0]}
            else:
                continue
            assert not modules & forbidden, f"{source.name} imports {modules & forbidden}"


def test_protocol_errors_say_whose_fault_it_was() -> None:
    assert issubclass(LocalProtocolError, ProtocolError)
    assert issubclass(RemoteProtocolError, ProtocolError)
    assert not issubclass(LocalProtocolError, RemoteProtocolError)
    assert RemoteProtocolError("bad frame").reason == "bad frame"


# --- runs of equal chunks in a chunk list (issue 11: sparse files) ----------------------------


@settings(max_examples=200, deadline=None, print_blob=True)
@given(st.lists(st.tuples(st.integers(1, 3), st.sampled_from([HASH_A, HASH_B])), max_size=40))
def test_chunk_runs_spell_out_to_the_chunks_they_were_made_of(
    pieces: list[tuple[int, bytes]],
) -> None:
    refs: list[tuple[int, int, bytes]] = []
    offset = 0
    for length, digest in pieces:
        refs.append((offset, length, digest))
        offset += length
    chunks, repeats = chunk_runs(refs)
    reply = ChunkList("docs", "a", HASH_A, chunks, repeats=repeats, request_id=1)
    assert reply.chunk_count() == len(refs)
    assert reply.all_chunks() == tuple(ChunkRef(*r) for r in refs)
    assert decode_body(memoryview(frame(reply))[4:]) == reply
    # a run is sent once: no two records in a row could have been one
    kept = list(chunks)
    for a, b in itertools.pairwise(kept):
        assert (a.length, a.hash) != (b.length, b.hash) or b.offset != a.offset + a.length


def test_a_gigabyte_of_zero_chunks_is_one_record() -> None:
    zero, chunk = bytes(16), 128 * 1024
    refs = [(0, 5000, HASH_A), *((5000 + n * chunk, chunk, zero) for n in range(8192))]
    chunks, repeats = chunk_runs(refs)
    reply = ChunkList("docs", "a", HASH_A, chunks, repeats=repeats, request_id=1)
    assert len(chunks) == 2 and repeats == CHUNK_REPEAT_RECORD.pack(1, 8192)
    assert len(frame(reply)) < 120
    assert reply.chunk_count() == 8193 and list(reply.all_chunks()) == [ChunkRef(*r) for r in refs]


def test_a_chunk_list_with_repeats_naming_no_chunk_is_refused_from_a_peer() -> None:
    body = msgpack.packb(
        [15, 1, "docs", "a", HASH_A, CHUNK_REF.pack(0, 8, HASH_B), False,
         CHUNK_REPEAT_RECORD.pack(1, 5)],
        use_bin_type=True,
    )  # fmt: skip
    with pytest.raises(RemoteProtocolError, match="rising order, not 1 after -1"):
        decode_body(memoryview(body))
