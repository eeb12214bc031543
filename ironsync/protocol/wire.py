"""Frames and message encoding: the byte-level contract between peers (protocol version 2).

Frame
    length: 4 bytes, big-endian unsigned, 0 < length <= MAX_FRAME_SIZE (8 MiB)
    body:   `length` bytes

Body
    One msgpack array `[type_code, request_id, field, ...]`, the fields in the order of the
    message's dataclass fields (request_id excluded), then nothing else. Strings are msgpack
    str (UTF-8), hashes and other byte strings are msgpack bin, None is nil. Every message
    has at most 13 fields, so the body always starts with a fixarray byte (0x92..0x9f)
    followed by the type code as a positive fixint: a reader can tell the type from body[1].

    Nested values:
    - IndexPage.entries: an array of arrays, one per IndexEntry, in its field order.
    - GetChunks.chunks, ChunkList.chunks: one bin of packed ChunkRef records, each
      CHUNK_REF_SIZE = 28 bytes: offset u64, length u32, hash (16 bytes), big-endian.
    - ChunkList.repeats: one bin of packed records, each CHUNK_REPEAT_SIZE = 8 bytes: index
      u32, count u32, big-endian.
    - GetStorageHashes.hashes, StorageHashes.hashes: a map alias → bin, keys sorted (so the
      encoding is unique).

    - GetFiles.file_hashes: one bin, HASH_SIZE bytes per path.

    ChunkData and FileData are the exceptions, so that file bytes are never re-encoded or
    copied: the array is only the header, every field but `data` in order
    (`[17, request_id, offset, hash, leading_zeros]`, `[22, request_id, index, hash, error]`),
    and the raw bytes (`data`) follow it up to the end of the frame.

    Hello always starts `[1, 0, protocol_version, ...]`, in every version of the protocol,
    so a peer speaking another version is told so rather than that its Hello is malformed.

Type codes (TYPE_CODES below) are part of the contract: never reuse or renumber one.
"""

import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields
from typing import Any

import msgpack

from ironsync.protocol.errors import LocalProtocolError, RemoteProtocolError
from ironsync.protocol.limits import (
    CHUNK_REF_SIZE,
    MAX_CHUNK_REFS,
    MAX_FRAME_SIZE,
    MAX_INDEX_PAGE_ENTRIES,
    MAX_STORAGES,
    MAX_VERSION_LEN,
    PROTOCOL_VERSION,
    KiB,
)
from ironsync.protocol.messages import (
    CHUNK_REF_RECORD,
    ChangeNotice,
    ChunkData,
    ChunkList,
    ChunkRef,
    ChunkRefs,
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
    IndexEntry,
    IndexPage,
    Message,
    StorageHashes,
    SyncRequest,
    SyncResult,
)

Buffer = bytes | memoryview

FRAME_HEADER = struct.Struct(">I")
CHUNK_REF = CHUNK_REF_RECORD
assert CHUNK_REF.size == CHUNK_REF_SIZE

TYPE_CODES: dict[type[Message], int] = {
    Hello: 1,
    Goodbye: 2,
    Error: 3,
    ChangeNotice: 4,
    GetStorageHashes: 10,
    StorageHashes: 11,
    GetIndex: 12,
    IndexPage: 13,
    GetChunkList: 14,
    ChunkList: 15,
    GetChunks: 16,
    ChunkData: 17,
    ChunksDone: 18,
    SyncRequest: 19,
    SyncResult: 20,
    GetFiles: 21,
    FileData: 22,
    FilesDone: 23,
}
MESSAGE_TYPES: dict[int, type[Message]] = {code: cls for cls, code in TYPE_CODES.items()}

MAX_INDEX_PAGE_OVERHEAD = 2 * KiB
"""Bytes an IndexPage frame needs besides its entries (at most ~1.1 KiB today)."""

# Field names in wire order, per encoded dataclass.
_FIELDS: dict[type, tuple[str, ...]] = {
    cls: tuple(f.name for f in fields(cls) if f.name != "request_id")
    for cls in (*TYPE_CODES, IndexEntry)
}

# Messages whose `data` follows their header raw (module docstring): the header's fields.
_RAW_HEADERS: dict[type[Message], tuple[str, ...]] = {
    cls: tuple(name for name in _FIELDS[cls] if name != "data") for cls in (ChunkData, FileData)
}
# The largest header, [17, request_id, offset, hash, leading_zeros] or [22, request_id, index,
# hash, error] (an error code of at most 64 characters), takes at most 110 bytes even with the
# widest msgpack integer encodings.
_RAW_HEADER_LIMIT = 128

# Hostile input must not make us allocate more than a bounded multiple of the frame: msgpack
# preallocates arrays and maps from their announced counts, so those are capped at the
# largest count a valid message uses. Strings and bins can be no longer than the frame
# anyway; the caps just refuse nonsense early. Ext types are never used.
_UNPACK_OPTIONS: dict[str, Any] = {
    "raw": False,
    "strict_map_key": True,
    "use_list": True,
    "max_str_len": 4 * MAX_VERSION_LEN,  # UTF-8 takes at most 4 bytes per character
    "max_bin_len": MAX_CHUNK_REFS * CHUNK_REF_SIZE,
    "max_array_len": max(MAX_INDEX_PAGE_ENTRIES, MAX_STORAGES),
    "max_map_len": MAX_STORAGES,
    "max_ext_len": 0,
}
_UNPACK_ERRORS = (ValueError, msgpack.UnpackException)


# --- encoding --------------------------------------------------------------------------------


def _entry_to_wire(entry: IndexEntry) -> list[Any]:
    return [getattr(entry, name) for name in _FIELDS[IndexEntry]]


def _entries_to_wire(entries: tuple[IndexEntry, ...]) -> list[list[Any]]:
    return [_entry_to_wire(entry) for entry in entries]


def _chunk_refs_to_wire(chunks: Sequence[ChunkRef]) -> bytes:
    return ChunkRefs.of(chunks).packed


def _hashes_to_wire(hashes: Mapping[str, bytes]) -> dict[str, bytes]:
    return {alias: hashes[alias] for alias in sorted(hashes)}


_FIELD_TO_WIRE: dict[str, Callable[[Any], Any]] = {
    "entries": _entries_to_wire,
    "chunks": _chunk_refs_to_wire,
    "hashes": _hashes_to_wire,
}


def _pack(items: list[Any]) -> bytes:
    return msgpack.packb(items, use_bin_type=True)


def encode_frame(message: Message) -> list[Buffer]:
    """The frame of `message` as buffers to write in order (for `writelines`).

    One buffer, except for ChunkData: [length + header, data], so the chunk bytes are
    written from the caller's buffer. Raises LocalProtocolError if the frame would exceed
    MAX_FRAME_SIZE.
    """
    cls = type(message)
    code = TYPE_CODES.get(cls)
    if code is None:
        raise LocalProtocolError(f"cannot send {cls.__name__}: not a protocol message")
    raw = _RAW_HEADERS.get(cls)
    if raw is not None:
        assert isinstance(message, ChunkData | FileData)
        header = _pack([code, message.request_id, *(getattr(message, name) for name in raw)])
        size = len(header) + len(message.data)
        if size > MAX_FRAME_SIZE:
            raise LocalProtocolError(f"{cls.__name__} of {size} bytes exceeds MAX_FRAME_SIZE")
        return [FRAME_HEADER.pack(size) + header, message.data]
    body = _pack(
        [
            code,
            message.request_id,
            *(_FIELD_TO_WIRE.get(name, _same)(getattr(message, name)) for name in _FIELDS[cls]),
        ]
    )
    if len(body) > MAX_FRAME_SIZE:
        raise LocalProtocolError(
            f"{cls.__name__} encodes to {len(body)} bytes, more than MAX_FRAME_SIZE "
            f"({MAX_FRAME_SIZE}); send it in smaller pages"
        )
    return [FRAME_HEADER.pack(len(body)) + body]


def index_entry_size(entry: IndexEntry) -> int:
    """Bytes `entry` adds to an IndexPage frame. A page fits in a frame when the sizes of its
    entries add up to at most MAX_FRAME_SIZE - MAX_INDEX_PAGE_OVERHEAD."""
    return len(_pack(_entry_to_wire(entry)))


# --- decoding --------------------------------------------------------------------------------


def _same(value: Any) -> Any:
    return value


def _entries_from_wire(value: Any) -> tuple[IndexEntry, ...]:
    if not isinstance(value, list):
        raise RemoteProtocolError(f"IndexPage.entries must be an array, not {type(value).__name__}")
    arity = len(_FIELDS[IndexEntry])
    entries = []
    for item in value:
        if not isinstance(item, list) or len(item) != arity:
            raise RemoteProtocolError(f"each IndexEntry must be an array of {arity} items")
        entries.append(IndexEntry(*item))
    return tuple(entries)


def _repeats_from_wire(value: Any) -> bytes:
    if not isinstance(value, bytes):
        raise RemoteProtocolError(f"repeats must be a bin, not {type(value).__name__}")
    return value  # checked by ChunkList, record by record, without objects


def _chunk_refs_from_wire(value: Any) -> ChunkRefs:
    if not isinstance(value, bytes):
        raise RemoteProtocolError(f"chunks must be a bin, not {type(value).__name__}")
    if len(value) % CHUNK_REF_SIZE:
        raise RemoteProtocolError(
            f"chunks must be a whole number of {CHUNK_REF_SIZE}-byte records, "
            f"not {len(value)} bytes"
        )
    return ChunkRefs(value)  # validated, not unpacked into objects


_FIELD_FROM_WIRE: dict[str, Callable[[Any], Any]] = {
    "entries": _entries_from_wire,
    "chunks": _chunk_refs_from_wire,
    "repeats": _repeats_from_wire,
}


def _build(cls: type[Message], request_id: Any, values: list[Any]) -> Message:
    names = _FIELDS[cls]
    if len(values) != len(names):
        raise RemoteProtocolError(
            f"{cls.__name__} has {len(names)} fields, the frame has {len(values)}"
        )
    try:
        kwargs = {
            name: _FIELD_FROM_WIRE.get(name, _same)(value)
            for name, value in zip(names, values, strict=True)
        }
        return cls(**kwargs, request_id=request_id)
    except LocalProtocolError as exc:
        raise RemoteProtocolError(f"peer sent an invalid message: {exc.reason}") from None


def _check_hello_version(items: list[Any]) -> None:
    version = items[2] if len(items) > 2 else None
    if type(version) is int and version != PROTOCOL_VERSION:
        raise RemoteProtocolError(
            f"peer speaks protocol version {version}; we speak only {PROTOCOL_VERSION}"
        )


def _decode_raw(cls: type[Message], body: memoryview) -> Message:
    # Parse the small header alone; the rest of the frame is the data, sliced, not copied.
    unpacker = msgpack.Unpacker(max_buffer_size=_RAW_HEADER_LIMIT, **_UNPACK_OPTIONS)
    unpacker.feed(body[:_RAW_HEADER_LIMIT])
    try:
        header = unpacker.unpack()
    except _UNPACK_ERRORS as exc:
        raise RemoteProtocolError(
            f"undecodable {cls.__name__} header: {str(exc) or 'truncated'}"
        ) from None
    names = _RAW_HEADERS[cls]
    if len(header) != len(names) + 2:
        raise RemoteProtocolError(  # as _build says it, the data counting as a field
            f"{cls.__name__} has {len(names) + 1} fields, the frame has {len(header) - 1}"
        )
    # the header's fields, with the data that follows it in the place of `data`
    given = dict(zip(names, header[2:], strict=True))
    given["data"] = body[unpacker.tell() :]
    return _build(cls, header[1], [given[name] for name in _FIELDS[cls]])


def decode_body(body: memoryview) -> Message:
    """The message in one frame body. Raises RemoteProtocolError, and nothing else, for any
    body that is not a valid message."""
    if len(body) < 2 or not 0x92 <= body[0] <= 0x9F:
        raise RemoteProtocolError("frame body is not a msgpack array of 2 to 15 items")
    cls = MESSAGE_TYPES.get(body[1])
    if cls is None:
        raise RemoteProtocolError(f"unknown message type (code byte 0x{body[1]:02x})")
    if cls in _RAW_HEADERS:
        return _decode_raw(cls, body)
    try:
        items = msgpack.unpackb(body, **_UNPACK_OPTIONS)
    except _UNPACK_ERRORS as exc:
        raise RemoteProtocolError(f"undecodable {cls.__name__} frame: {exc}") from None
    if cls is Hello:
        _check_hello_version(items)
    return _build(cls, items[1], items[2:])
