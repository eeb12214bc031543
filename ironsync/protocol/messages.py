"""The messages peers exchange: small frozen dataclasses, validated when built.

Every message carries `request_id` (keyword-only, last in the signature). Its meaning depends
on the kind of message, which is the class it derives from:

- Request (GetStorageHashes, GetIndex, GetChunkList, GetChunks, SyncRequest): asks the peer
  for something; request_id is 1..MAX_REQUEST_ID, chosen with Connection.next_request_id().
- Reply (StorageHashes, IndexPage, ChunkList, ChunkData, ChunksDone, SyncResult, Error):
  echoes the request_id of the request it answers. Some requests are answered by a stream:
  every reply whose `is_final()` is false is followed by more replies with the same id.
- Error with request_id 0 is not a reply: it is the sender's last word before it disconnects.
- Hello, ChangeNotice and Goodbye are part of no request: their request_id is 0.

A message outside the bounds in limits.py cannot be built: the constructor raises
LocalProtocolError naming the class and the field. The decoder builds received messages with
the same constructors, so a peer cannot get past these checks either.
"""

import re
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, overload

from ironsync.model import FILE, KINDS, MAX_LINK_TARGET_BYTES, SYMLINK
from ironsync.protocol.errors import LocalProtocolError
from ironsync.protocol.limits import (
    CHUNK_REPEAT_SIZE,
    HASH_SIZE,
    MAX_CHUNK_REFS,
    MAX_CHUNK_REPEATS,
    MAX_CHUNK_SIZE,
    MAX_ERROR_CODE_LEN,
    MAX_FILE_DATA,
    MAX_FILES_PER_REQUEST,
    MAX_INDEX_PAGE_ENTRIES,
    MAX_INT64,
    MAX_MODE,
    MAX_NAME_LEN,
    MAX_NODE_ID_LEN,
    MAX_PATH_LEN,
    MAX_REPEAT_COUNT,
    MAX_REQUEST_ID,
    MAX_STORAGES,
    MAX_TEXT_LEN,
    MAX_VERSION_LEN,
    MIN_INT64,
    PROTOCOL_VERSION,
)

_IDENTIFIER = re.compile(r"[A-Za-z0-9_.-]+")


# --- field checks: each raises LocalProtocolError naming the field -----------------------------


def _check_int(name: str, value: object, low: int, high: int) -> None:
    # bool is an int subclass, but True is no sequence number.
    if not isinstance(value, int) or isinstance(value, bool):
        raise LocalProtocolError(f"{name} must be an int, not {type(value).__name__}")
    if not low <= value <= high:
        raise LocalProtocolError(f"{name} must be in [{low}, {high}], not {value}")


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise LocalProtocolError(f"{name} must be a bool, not {type(value).__name__}")


def _check_text(name: str, value: object, max_len: int, min_len: int = 0) -> str:
    if not isinstance(value, str):
        raise LocalProtocolError(f"{name} must be a str, not {type(value).__name__}")
    if not min_len <= len(value) <= max_len:
        raise LocalProtocolError(
            f"{name} must have {min_len} to {max_len} characters, not {len(value)}"
        )
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            # Lone surrogates (os.fsdecode of non-UTF-8 names) have no UTF-8 encoding.
            raise LocalProtocolError(f"{name} is not encodable as UTF-8") from None
    return value


def _check_name(name: str, value: object, max_len: int = MAX_NAME_LEN) -> None:
    """A non-empty string without NUL: group names, storage aliases, paths."""
    if "\x00" in _check_text(name, value, max_len, min_len=1):
        raise LocalProtocolError(f"{name} must not contain NUL")


def _check_identifier(name: str, value: object, max_len: int) -> None:
    if not _IDENTIFIER.fullmatch(_check_text(name, value, max_len, min_len=1)):
        raise LocalProtocolError(f"{name} must match [A-Za-z0-9_.-]{{1,{max_len}}}")


def _check_hash(name: str, value: object) -> None:
    if not isinstance(value, bytes):
        raise LocalProtocolError(f"{name} must be bytes, not {type(value).__name__}")
    if len(value) != HASH_SIZE:
        raise LocalProtocolError(f"{name} must be {HASH_SIZE} bytes, not {len(value)}")


def _as_tuple(name: str, value: object, item_type: type, max_len: int) -> tuple[Any, ...]:
    # Lists are accepted (the decoder produces them) and stored as tuples.
    if not isinstance(value, tuple | list):
        raise LocalProtocolError(f"{name} must be a tuple, not {type(value).__name__}")
    if len(value) > max_len:
        raise LocalProtocolError(f"{name} must have at most {max_len} items, not {len(value)}")
    for item in value:
        if not isinstance(item, item_type):
            raise LocalProtocolError(
                f"{name} items must be {item_type.__name__}, not {type(item).__name__}"
            )
    return tuple(value)


def _storage_aliases(name: str, value: object) -> tuple[str, ...]:
    aliases = _as_tuple(name, value, str, MAX_STORAGES)
    for alias in aliases:
        _check_name(name, alias)
    if len(set(aliases)) != len(aliases):
        raise LocalProtocolError(f"{name} must not repeat an alias")
    return aliases


def _byte_view(name: str, data: object) -> bytes | memoryview:
    """`data` as bytes or a 1-D memoryview of bytes (not copied)."""
    if isinstance(data, bytes):
        return data
    if not isinstance(data, bytearray | memoryview):
        raise LocalProtocolError(f"{name} must be bytes-like, not {type(data).__name__}")
    view = memoryview(data)
    if not view.c_contiguous:
        raise LocalProtocolError(f"{name} must be a contiguous buffer")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def _set(obj: object, name: str, value: object) -> None:
    """Normalize a field of a frozen dataclass during __post_init__."""
    object.__setattr__(obj, name, value)


class _Validated:
    """Runs `_validate` after __init__ and prefixes any error with the class name."""

    __slots__ = ()

    def __post_init__(self) -> None:
        try:
            self._validate()
        except LocalProtocolError as exc:
            raise LocalProtocolError(f"{type(self).__name__}: {exc.reason}") from None

    def _validate(self) -> None:
        raise NotImplementedError


# --- values nested inside messages -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IndexEntry(_Validated):
    """What a peer knows of one path: a live entry (a file, a folder or a symlink), or a
    tombstone (deleted=True, hash=None). A live symlink carries its target text; nothing
    else does."""

    path: str
    size: int
    mtime_ns: int
    mode: int
    hash: bytes | None
    deleted: bool
    version: str  # version vector as compact JSON text, e.g. '{"a":2}'; opaque here
    modified_by: str
    sequence: int
    kind: str = FILE  # "file", "dir" or "symlink"
    target: str | None = None  # a live symlink's target

    def _validate(self) -> None:
        _check_name("path", self.path, MAX_PATH_LEN)
        _check_int("size", self.size, 0, MAX_INT64)
        _check_int("mtime_ns", self.mtime_ns, MIN_INT64, MAX_INT64)
        _check_int("mode", self.mode, 0, MAX_MODE)
        _check_bool("deleted", self.deleted)
        if self.deleted:
            if self.hash is not None:
                raise LocalProtocolError("hash must be None for a deleted entry")
        else:
            _check_hash("hash", self.hash)
        _check_text("version", self.version, MAX_VERSION_LEN)
        _check_identifier("modified_by", self.modified_by, MAX_NODE_ID_LEN)
        _check_int("sequence", self.sequence, 0, MAX_INT64)
        if self.kind not in KINDS:
            raise LocalProtocolError(f"kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if self.kind == SYMLINK and not self.deleted:
            _check_name("target", self.target, MAX_LINK_TARGET_BYTES)
            if len(self.target.encode("utf-8")) > MAX_LINK_TARGET_BYTES:  # type: ignore[union-attr]
                raise LocalProtocolError(f"target must have at most {MAX_LINK_TARGET_BYTES} bytes")
        elif self.target is not None:
            raise LocalProtocolError("target must be None except for a live symlink")


@dataclass(frozen=True, slots=True)
class ChunkRef(_Validated):
    """One content-defined chunk of a file: where it is, how long, and its hash."""

    offset: int
    length: int
    hash: bytes

    def _validate(self) -> None:
        _check_int("offset", self.offset, 0, MAX_INT64)
        _check_int("length", self.length, 0, MAX_CHUNK_SIZE)
        _check_hash("hash", self.hash)


CHUNK_REF_RECORD = struct.Struct(f">QI{HASH_SIZE}s")
"""One ChunkRef on the wire: offset u64, length u32, hash, big-endian (see wire.py)."""


class ChunkRefs(Sequence[ChunkRef]):
    """ChunkRefs kept as their packed wire records (CHUNK_REF_RECORD), each validated as a
    ChunkRef would be, a ChunkRef built only when one is looked at.

    The decoder gives GetChunks.chunks and ChunkList.chunks in this form, so a frame of
    MAX_CHUNK_REFS refs costs the 7 MiB of its records rather than ~37 MiB of objects before
    anyone had a chance to refuse it. It compares equal to a tuple of the same ChunkRefs.
    """

    __slots__ = ("_packed",)

    def __init__(self, packed: bytes | bytearray | memoryview) -> None:
        packed = bytes(packed)
        size = CHUNK_REF_RECORD.size
        if len(packed) % size:
            raise LocalProtocolError(
                f"chunks must be a whole number of {size}-byte records, not {len(packed)} bytes"
            )
        # Fast path, from the high bytes of every record: no offset has its top bit set
        # (> MAX_INT64) and no length reaches MAX_CHUNK_SIZE; else look at each record.
        top_of_offsets = max(packed[0::size], default=0)
        top_of_lengths = max(packed[8::size], default=0) << 8 | max(packed[9::size], default=0)
        if top_of_offsets >= 0x80 or top_of_lengths >= MAX_CHUNK_SIZE >> 16:
            for offset, length, _ in CHUNK_REF_RECORD.iter_unpack(packed):
                _check_int("offset", offset, 0, MAX_INT64)
                _check_int("length", length, 0, MAX_CHUNK_SIZE)
        self._packed = packed

    @classmethod
    def of(cls, refs: Sequence[ChunkRef]) -> "ChunkRefs":
        if isinstance(refs, ChunkRefs):
            return refs
        pack = CHUNK_REF_RECORD.pack
        return cls(b"".join([pack(ref.offset, ref.length, ref.hash) for ref in refs]))

    @property
    def packed(self) -> bytes:
        """The wire records, ready to send."""
        return self._packed

    def __len__(self) -> int:
        return len(self._packed) // CHUNK_REF_RECORD.size

    @overload
    def __getitem__(self, index: int) -> ChunkRef: ...
    @overload
    def __getitem__(self, index: slice) -> "ChunkRefs": ...
    def __getitem__(self, index: int | slice) -> "ChunkRef | ChunkRefs":
        size = CHUNK_REF_RECORD.size
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                return ChunkRefs.of([self[i] for i in range(start, stop, step)])
            return ChunkRefs(self._packed[start * size : max(start, stop) * size])
        count = len(self)
        if index < 0:
            index += count
        if not 0 <= index < count:
            raise IndexError("ChunkRefs index out of range")
        return ChunkRef(*CHUNK_REF_RECORD.unpack_from(self._packed, index * size))

    def __iter__(self) -> Iterator[ChunkRef]:
        for record in CHUNK_REF_RECORD.iter_unpack(self._packed):
            yield ChunkRef(*record)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ChunkRefs):
            return self._packed == other._packed
        if isinstance(other, tuple | list):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return f"ChunkRefs({list(self)!r})" if len(self) <= 4 else f"ChunkRefs(<{len(self)}>)"


CHUNK_REPEAT_RECORD = struct.Struct(">II")
"""One entry of ChunkList.repeats on the wire: the index of a ref u32, the count of chunks it
stands for u32, big-endian."""
assert CHUNK_REPEAT_RECORD.size == CHUNK_REPEAT_SIZE


def _chunk_refs(value: object) -> Sequence[ChunkRef]:
    if isinstance(value, ChunkRefs):
        if len(value) > MAX_CHUNK_REFS:
            raise LocalProtocolError(
                f"chunks must have at most {MAX_CHUNK_REFS} items, not {len(value)}"
            )
        return value
    return _as_tuple("chunks", value, ChunkRef, MAX_CHUNK_REFS)


# --- message kinds ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Message(_Validated):
    """Base of every message; `request_id` ties requests and their replies together."""

    request_id: int = field(default=0, kw_only=True)

    # The request ids this kind of message may carry (see the module docstring).
    REQUEST_IDS: ClassVar[tuple[int, int]] = (0, 0)

    def __post_init__(self) -> None:
        low, high = self.REQUEST_IDS
        try:
            _check_int("request_id", self.request_id, low, high)
        except LocalProtocolError as exc:
            raise LocalProtocolError(f"{type(self).__name__}: {exc.reason}") from None
        _Validated.__post_init__(self)

    def _validate(self) -> None:
        pass


@dataclass(frozen=True, slots=True)
class Request(Message):
    """A message that asks the peer for replies carrying the same request_id."""

    REQUEST_IDS: ClassVar[tuple[int, int]] = (1, MAX_REQUEST_ID)


@dataclass(frozen=True, slots=True)
class Reply(Message):
    """A message that answers the peer's request with the same request_id."""

    REQUEST_IDS: ClassVar[tuple[int, int]] = (1, MAX_REQUEST_ID)

    def is_final(self) -> bool:
        """True when this reply ends its request (the id may then be reused)."""
        return True


# --- connection-level messages ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello(Message):
    """First message each way: who we are, which group, which storages we share."""

    protocol_version: int
    node_id: str
    group: str
    storages: tuple[str, ...]

    def _validate(self) -> None:
        version = self.protocol_version
        if type(version) is not int or version != PROTOCOL_VERSION:
            raise LocalProtocolError(
                f"protocol_version must be {PROTOCOL_VERSION}, not {version!r}"
            )
        _check_identifier("node_id", self.node_id, MAX_NODE_ID_LEN)
        _check_name("group", self.group)
        _set(self, "storages", _storage_aliases("storages", self.storages))


@dataclass(frozen=True, slots=True)
class Goodbye(Message):
    """Clean close: the sender sends nothing more after it."""

    reason: str

    def _validate(self) -> None:
        _check_text("reason", self.reason, MAX_TEXT_LEN)


@dataclass(frozen=True, slots=True)
class ChangeNotice(Message):
    """Unsolicited: the sender's `storage` changed; its index now reaches `sequence`."""

    storage: str
    sequence: int

    def _validate(self) -> None:
        _check_name("storage", self.storage)
        _check_int("sequence", self.sequence, 0, MAX_INT64)


@dataclass(frozen=True, slots=True)
class Error(Reply):
    """A request failed (request_id echoes it), or, with request_id 0, the connection did."""

    code: str
    message: str

    REQUEST_IDS: ClassVar[tuple[int, int]] = (0, MAX_REQUEST_ID)

    @property
    def is_fatal(self) -> bool:
        """True for the sender's last word before disconnecting (request_id 0)."""
        return self.request_id == 0

    def _validate(self) -> None:
        _check_identifier("code", self.code, MAX_ERROR_CODE_LEN)
        _check_text("message", self.message, MAX_TEXT_LEN)


# --- storage hashes --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GetStorageHashes(Request):
    """Ask for the hash of every storage the peer shares.

    `rescan`: the asker is starting a full sync, so bring your index up to date with your
    disk first (its file watcher catching up, or a scan).
    `hashes`: the asker's own storage hashes as its index holds them now (alias → hash, as in
    StorageHashes; may be empty), so that the end that answers knows too when both hold the
    same (its "last sync" with the asker)."""

    rescan: bool = False
    hashes: Mapping[str, bytes] = field(default_factory=lambda: MappingProxyType({}))

    def _validate(self) -> None:
        _check_bool("rescan", self.rescan)
        _check_hashes(self)


@dataclass(frozen=True, slots=True)
class StorageHashes(Reply):
    """Storage alias → HASH_SIZE-byte hash. Stored as a read-only mapping."""

    hashes: Mapping[str, bytes]

    def _validate(self) -> None:
        _check_hashes(self)


def _check_hashes(message: GetStorageHashes | StorageHashes) -> None:
    hashes = message.hashes
    if not isinstance(hashes, Mapping):
        raise LocalProtocolError(f"hashes must be a mapping, not {type(hashes).__name__}")
    if len(hashes) > MAX_STORAGES:
        raise LocalProtocolError(f"hashes must have at most {MAX_STORAGES} storages")
    for alias, digest in hashes.items():
        _check_name("hashes alias", alias)
        _check_hash(f"hashes[{alias!r}]", digest)
    _set(message, "hashes", MappingProxyType(dict(hashes)))


# --- index -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GetIndex(Request):
    """Ask for the entries of `storage` changed after `since_sequence`, at most `limit` a page."""

    storage: str
    since_sequence: int
    limit: int

    def _validate(self) -> None:
        _check_name("storage", self.storage)
        _check_int("since_sequence", self.since_sequence, 0, MAX_INT64)
        _check_int("limit", self.limit, 1, MAX_INDEX_PAGE_ENTRIES)


@dataclass(frozen=True, slots=True)
class IndexPage(Reply):
    """One page of index entries; more=True means another page with the same id follows.

    A page must also fit in a frame: wire.index_entry_size tells what an entry costs.
    """

    storage: str
    entries: tuple[IndexEntry, ...]
    last_sequence: int
    more: bool

    def is_final(self) -> bool:
        return not self.more

    def _validate(self) -> None:
        _check_name("storage", self.storage)
        _set(
            self, "entries", _as_tuple("entries", self.entries, IndexEntry, MAX_INDEX_PAGE_ENTRIES)
        )
        _check_int("last_sequence", self.last_sequence, 0, MAX_INT64)
        _check_bool("more", self.more)


# --- chunks ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GetChunkList(Request):
    """Ask for the chunks of the file at `path` whose whole-file hash is `file_hash`."""

    storage: str
    path: str
    file_hash: bytes

    def _validate(self) -> None:
        _check_name("storage", self.storage)
        _check_name("path", self.path, MAX_PATH_LEN)
        _check_hash("file_hash", self.file_hash)


@dataclass(frozen=True, slots=True)
class ChunkList(Reply):
    """The chunks of a file, in order. A file with more than MAX_CHUNK_REFS chunks is answered
    by several ChunkList replies, all but the last with more=True.

    `repeats` shortens runs of equal chunks, such as the MAX_CHUNK zero bytes a sparse file's
    holes are made of (issue 11): packed CHUNK_REPEAT_RECORDs (index, count), indexes rising,
    each saying that `chunks[index]` stands for `count` >= 2 chunks of its length and hash, one
    right after the other. `all_chunks()` spells them out."""

    storage: str
    path: str
    file_hash: bytes
    chunks: tuple[ChunkRef, ...]
    more: bool = False
    repeats: bytes = b""

    def is_final(self) -> bool:
        return not self.more

    def _validate(self) -> None:
        _check_name("storage", self.storage)
        _check_name("path", self.path, MAX_PATH_LEN)
        _check_hash("file_hash", self.file_hash)
        _set(self, "chunks", _chunk_refs(self.chunks))
        _check_bool("more", self.more)
        repeats = self.repeats
        if not isinstance(repeats, bytes):
            raise LocalProtocolError(f"repeats must be bytes, not {type(repeats).__name__}")
        if len(repeats) % CHUNK_REPEAT_SIZE or len(repeats) > MAX_CHUNK_REPEATS * CHUNK_REPEAT_SIZE:
            raise LocalProtocolError(
                f"repeats must be at most {MAX_CHUNK_REPEATS} records of {CHUNK_REPEAT_SIZE} "
                f"bytes, not {len(repeats)} bytes"
            )
        previous = -1
        for index, count in CHUNK_REPEAT_RECORD.iter_unpack(repeats):
            if not previous < index < len(self.chunks):
                raise LocalProtocolError(
                    f"repeats must name chunks in rising order, not {index} after {previous}"
                )
            _check_int("repeat count", count, 2, MAX_REPEAT_COUNT)
            previous = index

    def chunk_count(self) -> int:
        """How many chunks the reply stands for, repeats spelled out."""
        extra = sum(count - 1 for _, count in CHUNK_REPEAT_RECORD.iter_unpack(self.repeats))
        return len(self.chunks) + extra

    def all_chunks(self) -> ChunkRefs:
        """The chunks, repeats spelled out (check `chunk_count()` first: the peer chose it)."""
        chunks = ChunkRefs.of(self.chunks)
        if not self.repeats:
            return chunks
        size, packed, pack = CHUNK_REF_RECORD.size, chunks.packed, CHUNK_REF_RECORD.pack
        parts: list[bytes] = []
        done = 0
        for index, count in CHUNK_REPEAT_RECORD.iter_unpack(self.repeats):
            parts.append(packed[done * size : (index + 1) * size])
            offset, length, digest = CHUNK_REF_RECORD.unpack_from(packed, index * size)
            parts += [pack(offset + n * length, length, digest) for n in range(1, count)]
            done = index + 1
        parts.append(packed[done * size :])
        return ChunkRefs(b"".join(parts))


def chunk_runs(refs: Iterable[tuple[int, int, bytes]]) -> tuple[ChunkRefs, bytes]:
    """Chunks given as (offset, length, hash), in order, as ChunkList's `chunks` and `repeats`:
    each run of equal chunks, one right after the other, is sent once with its count."""
    pack = CHUNK_REF_RECORD.pack
    records: list[bytes] = []
    repeats: list[bytes] = []
    run_offset, run_length, run_hash = -1, 0, b""
    count = 0
    for offset, length, digest in refs:
        if (
            length == run_length
            and digest == run_hash
            and offset == run_offset + count * run_length
            and count < MAX_REPEAT_COUNT
        ):
            count += 1
            continue
        if count > 1:
            repeats.append(CHUNK_REPEAT_RECORD.pack(len(records) - 1, count))
        records.append(pack(offset, length, digest))
        run_offset, run_length, run_hash, count = offset, length, digest, 1
    if count > 1:
        repeats.append(CHUNK_REPEAT_RECORD.pack(len(records) - 1, count))
    return ChunkRefs(b"".join(records)), b"".join(repeats)


@dataclass(frozen=True, slots=True)
class GetChunks(Request):
    """Ask for the data of `chunks` of a file; answered by ChunkData replies, then ChunksDone."""

    storage: str
    path: str
    file_hash: bytes
    chunks: tuple[ChunkRef, ...]

    def _validate(self) -> None:
        _check_name("storage", self.storage)
        _check_name("path", self.path, MAX_PATH_LEN)
        _check_hash("file_hash", self.file_hash)
        _set(self, "chunks", _chunk_refs(self.chunks))


@dataclass(frozen=True, slots=True, repr=False)
class ChunkData(Reply):
    """The bytes of one chunk. More replies with the same id follow, until ChunksDone.

    `data` is bytes or a read-only 1-D memoryview of bytes; a received ChunkData holds a
    memoryview into the received frame (no copy). A bytearray or writable memoryview given
    to the constructor is kept as a view, not copied: don't change it until it is sent.

    Zeros at the ends of a chunk are not sent (issue 11: the data of a sparse file is an
    island in zeros): the chunk is `leading_zeros` zero bytes, then `data`, then zero bytes up
    to the length of the chunk asked for.
    """

    offset: int
    hash: bytes
    data: bytes | memoryview
    leading_zeros: int = 0

    def is_final(self) -> bool:
        return False

    def _validate(self) -> None:
        _check_int("offset", self.offset, 0, MAX_INT64)
        _check_hash("hash", self.hash)
        data = _byte_view("data", self.data)
        _set(self, "data", data)
        _check_int("leading_zeros", self.leading_zeros, 0, MAX_CHUNK_SIZE)
        if self.leading_zeros + len(data) > MAX_CHUNK_SIZE:
            raise LocalProtocolError(
                f"data must be at most {MAX_CHUNK_SIZE} bytes with its leading zeros, not "
                f"{self.leading_zeros} + {len(data)}"
            )

    def __repr__(self) -> str:
        zeros = f", leading_zeros={self.leading_zeros}" if self.leading_zeros else ""
        return (
            f"ChunkData(offset={self.offset}, hash={self.hash!r}, "
            f"data=<{len(self.data)} bytes>{zeros}, request_id={self.request_id})"
        )


@dataclass(frozen=True, slots=True)
class ChunksDone(Reply):
    """Ends a GetChunks stream."""


@dataclass(frozen=True, slots=True)
class GetFiles(Request):
    """Ask for the whole content of several files of one storage at once: `paths[i]` with the
    file hash `file_hashes[i * HASH_SIZE : (i + 1) * HASH_SIZE]`. Answered by one FileData per file,
    in the order asked, then FilesDone. For small files, where a request per file would cost
    more than the file (issue 13)."""

    storage: str
    paths: tuple[str, ...]
    file_hashes: bytes

    def _validate(self) -> None:
        _check_name("storage", self.storage)
        _set(self, "paths", _as_tuple("paths", self.paths, str, MAX_FILES_PER_REQUEST))
        for path in self.paths:
            _check_name("paths", path, MAX_PATH_LEN)
        if not isinstance(self.file_hashes, bytes):
            kind = type(self.file_hashes).__name__
            raise LocalProtocolError(f"file_hashes must be bytes, not {kind}")
        if len(self.file_hashes) != HASH_SIZE * len(self.paths):
            raise LocalProtocolError(
                f"file_hashes must be {HASH_SIZE} bytes per path: {HASH_SIZE * len(self.paths)}, "
                f"not {len(self.file_hashes)}"
            )

    def file_hash(self, i: int) -> bytes:
        return self.file_hashes[i * HASH_SIZE : (i + 1) * HASH_SIZE]


@dataclass(frozen=True, slots=True, repr=False)
class FileData(Reply):
    """The whole content of the `index`-th file of a GetFiles, which has `hash`; or, when
    `error` is not empty, why it is not sent (an error code: "not_found", "changed",
    "unreadable", "too_large"; then `data` is empty). More replies follow, until FilesDone.
    On the wire `data` follows the header raw, as ChunkData's does."""

    index: int
    hash: bytes
    error: str
    data: bytes | memoryview

    def is_final(self) -> bool:
        return False

    def _validate(self) -> None:
        _check_int("index", self.index, 0, MAX_FILES_PER_REQUEST - 1)
        _check_hash("hash", self.hash)
        if self.error:
            _check_identifier("error", self.error, MAX_ERROR_CODE_LEN)
        _set(self, "data", _byte_view("data", self.data))
        if len(self.data) > MAX_FILE_DATA:
            raise LocalProtocolError(
                f"data must be at most {MAX_FILE_DATA} bytes, not {len(self.data)}"
            )
        if self.error and len(self.data):
            raise LocalProtocolError("a FileData with an error carries no data")

    def __repr__(self) -> str:
        error = f", error={self.error!r}" if self.error else ""
        return (
            f"FileData(index={self.index}, hash={self.hash!r}, data=<{len(self.data)} bytes>"
            f"{error}, request_id={self.request_id})"
        )


@dataclass(frozen=True, slots=True)
class FilesDone(Reply):
    """Ends a GetFiles stream."""


# --- push ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SyncRequest(Request):
    """Ask the peer to run a full sync with us now (push); no storages means all shared ones."""

    storages: tuple[str, ...]

    def _validate(self) -> None:
        _set(self, "storages", _storage_aliases("storages", self.storages))


@dataclass(frozen=True, slots=True)
class SyncResult(Reply):
    """How the sync a SyncRequest asked for went."""

    ok: bool
    detail: str

    def _validate(self) -> None:
        _check_bool("ok", self.ok)
        _check_text("detail", self.detail, MAX_TEXT_LEN)
