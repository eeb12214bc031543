"""The ironsync peer protocol, sans I/O: bytes in, messages out, bytes to send out.

- messages.py: the messages, frozen dataclasses validated when built;
- wire.py: frames and their encoding, the byte-level contract between peers;
- connection.py: Connection, the per-connection state machine (its docstring is the theory
  of operation);
- limits.py: every bound, with its unit; errors.py: LocalProtocolError, RemoteProtocolError.

This package imports no asyncio, socket, ssl, apsw or time: ironsync.net moves the bytes.
"""

from ironsync.protocol.connection import (
    CONNECTION_CLOSED,
    NEED_DATA,
    REPLIES,
    TRANSITIONS,
    Connection,
    Marker,
    Role,
    State,
)
from ironsync.protocol.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from ironsync.protocol.limits import (
    HASH_SIZE,
    MAX_CHUNK_SIZE,
    MAX_FRAME_SIZE,
    MAX_INDEX_PAGE_ENTRIES,
    PROTOCOL_VERSION,
)
from ironsync.protocol.messages import (
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
    Reply,
    Request,
    StorageHashes,
    SyncRequest,
    SyncResult,
)
from ironsync.protocol.wire import Buffer, index_entry_size

__all__ = [
    "CONNECTION_CLOSED",
    "HASH_SIZE",
    "MAX_CHUNK_SIZE",
    "MAX_FRAME_SIZE",
    "MAX_INDEX_PAGE_ENTRIES",
    "NEED_DATA",
    "PROTOCOL_VERSION",
    "REPLIES",
    "TRANSITIONS",
    "Buffer",
    "ChangeNotice",
    "ChunkData",
    "ChunkList",
    "ChunkRef",
    "ChunkRefs",
    "ChunksDone",
    "Connection",
    "Error",
    "FileData",
    "FilesDone",
    "GetChunkList",
    "GetChunks",
    "GetFiles",
    "GetIndex",
    "GetStorageHashes",
    "Goodbye",
    "Hello",
    "IndexEntry",
    "IndexPage",
    "LocalProtocolError",
    "Marker",
    "Message",
    "ProtocolError",
    "RemoteProtocolError",
    "Reply",
    "Request",
    "Role",
    "State",
    "StorageHashes",
    "SyncRequest",
    "SyncResult",
    "index_entry_size",
]
