"""Every bound of the peer protocol, in one place, with its unit.

Both peers enforce the same numbers: a sender refuses to build a message outside them
(LocalProtocolError) and a receiver refuses one that arrives outside them
(RemoteProtocolError). Changing any of them changes the wire contract, so it needs a new
PROTOCOL_VERSION.
"""

KiB = 1024
MiB = 1024 * KiB

PROTOCOL_VERSION = 2
"""Sent in Hello; a peer announcing any other version is refused. Version 2: IndexEntry
carries the entry's kind (file, folder, symlink) and a symlink's target; ChunkList.repeats and
ChunkData.leading_zeros leave a sparse file's zeros off the wire; GetFiles asks for many small
files' whole contents at once (FileData, FilesDone)."""

FRAME_HEADER_SIZE = 4
"""Bytes of the big-endian length that precedes every frame body."""

MAX_FRAME_SIZE = 8 * MiB
"""Largest frame body (the bytes after the 4-byte length). A longer announced length is
refused as soon as the header arrives, before any of the body is buffered."""

MAX_CHUNK_SIZE = 4 * MiB
"""Largest ChunkData payload and ChunkRef length, in bytes. ironsync.chunking cuts at most
128 KiB; the headroom lets chunking change without a protocol change."""

HASH_SIZE = 16
"""Bytes of every hash on the wire (xxh3-128: storage, file and chunk hashes)."""

MAX_REQUEST_ID = 2**32 - 1
"""Request ids are 1..MAX_REQUEST_ID; 0 marks a message that is not part of a request."""

MAX_IN_FLIGHT = 1024
"""Requests one side may have outstanding (sent, not yet finally answered) at once."""

MAX_INT64 = 2**63 - 1
MIN_INT64 = -(2**63)
"""Sizes, offsets and sequences are in [0, MAX_INT64]; mtime_ns is in [MIN_INT64, MAX_INT64]."""

MAX_MODE = 0o177777
"""st_mode fits in 16 bits (file type and permission bits)."""

MAX_NODE_ID_LEN = 64
"""Characters of a node id, which matches [A-Za-z0-9_.-]{1,64} (the config's rule)."""

MAX_NAME_LEN = 255
"""Characters of a group name or a storage alias."""

MAX_PATH_LEN = 4096
"""Characters of a storage-relative path (Linux PATH_MAX is 4096 bytes)."""

MAX_VERSION_LEN = 16 * KiB
"""Characters of a version vector's JSON text (~180 nodes of 64-character ids)."""

MAX_TEXT_LEN = 4 * KiB
"""Characters of free text: Error.message, SyncResult.detail, Goodbye.reason."""

MAX_ERROR_CODE_LEN = 64
"""Characters of Error.code, which matches [A-Za-z0-9_.-]{1,64}."""

MAX_STORAGES = 1024
"""Storage aliases in one Hello, SyncRequest or StorageHashes."""

MAX_INDEX_PAGE_ENTRIES = 4096
"""Entries in one IndexPage, and the largest GetIndex limit."""

CHUNK_REF_SIZE = 8 + 4 + HASH_SIZE
"""Bytes of one ChunkRef on the wire: offset u64, length u32, hash (see wire.py)."""

MAX_CHUNK_REFS = 2**18
"""ChunkRefs in one GetChunks or ChunkList (7 MiB of records, so any such message fits in a
frame); longer chunk lists are sent as several ChunkList replies with more=True."""

MAX_FILES_PER_REQUEST = 1024
"""Files one GetFiles asks for (paths of up to 4 KiB each: the request fits in a frame)."""

MAX_FILE_DATA = 4 * MiB
"""Largest FileData payload: a whole file sent in one reply (a receiver asks GetFiles only for
files far smaller)."""

CHUNK_REPEAT_SIZE = 4 + 4
"""Bytes of one entry of ChunkList.repeats on the wire: index u32, count u32."""

MAX_CHUNK_REPEATS = 2**16
"""Entries of one ChunkList's repeats (512 KiB of records: with MAX_CHUNK_REFS refs the
message still fits in a frame)."""

MAX_REPEAT_COUNT = 2**32 - 1
"""Chunks one ChunkList.repeats entry stands for."""
