"""Transfer of one file between two peers: serving its chunks, and pulling it.

Serving (the peer that holds the content) answers two requests from its index and its disk.
GetChunkList gets the chunk list the scanner recorded, in replies of CHUNK_LIST_PAGE refs read
from the index a page at a time. GetChunks gets the bytes of each chunk asked for, read with
pread and checked against the chunk's hash before they are sent: the file may have changed
since it was indexed, and then the answer is the error "changed" (the peer must rescan before
it can serve that file).
Zeros cost next to nothing (issue 11, sparse files): a run of equal chunks in a chunk list
(a hole's zero chunks) is sent once with its count (ChunkList.repeats), a chunk of zeros is
answered without reading the file, and at least TRIM_MIN_ZEROS zeros at either end of a chunk
are not sent (ChunkData.leading_zeros, trailing zeros implied by the chunk's length).
A conflict copy is fetched by its content: when the path holds other content, any live file
of the storage with the asked hash serves.

Pulling (the receiver) follows shared/DESIGN.md, "Rules that keep data safe":

1. a `write_started` event;
2. the chunk list (known without asking for a file of at most MIN_CHUNK bytes: one chunk, the
   file's hash), which must cover [0, size) exactly, in order (checked as it arrives, so a
   list that never ends is refused early: at most size / MIN_AVERAGE_CHUNK + 1 chunks, which
   must fit in the free space of the storage's file system to be asked for at all; then the
   file's data, its chunks that are not all zeros, must fit);
3. a chunk of zeros (`chunking.is_zero_chunk`: its hash is that of zeros) is obtained from
   nowhere: it stays a hole; every chunk this node already holds (in any file of any
   storage, `store.chunks`) is copied locally, and a chunk that appears twice in the file is
   fetched once: moves, copies, duplicates, unchanged regions and runs of zeros cost nothing
   on the wire. The list is kept as packed
   records (28 bytes a chunk; over SPOOL_MEMORY_BYTES in an anonymous temp file) and planned
   WINDOW_REFS chunks at a time, so a pull's memory does not grow with the file's size;
4. the file is assembled in order in `.ironsync-<random>.tmp` in the target's folder; every
   chunk is verified (a local source that no longer holds it is fetched from the peer
   instead), the whole-file hash is computed while writing and compared with the target's,
   then the file gets the target's mode and mtime. Zeros are not written,
   as `rsync --sparse` does: chunks of zeros and every HOLE_BLOCK-aligned block of zeros in
   other chunks are skipped over (writes at offsets; ftruncate gives the size when the file
   ends in a hole), so a sparse file arrives sparse, and so do long runs of written zeros.
   The bytes go around the page cache (O_DIRECT) where the file system allows it
   (ironsync.sync.direct; zeros that fill no whole block are written there): the file is not
   read again here, only flushed;
5. if the local target changed since the decision (size, mtime or inode differ from
   `expected`, or a file appeared or vanished), the pull is abandoned: an edit the scanner has
   not seen is never overwritten;
6. the temp file is flushed, renamed over the target, the folder flushed, then the index row
   and `write_finished` are committed: together with the other pulls ready at that moment
   (ironsync.sync.commit.Committer: one flush of every temp file, the renames, one flush of
   every folder, one transaction). Steps 5 and 6 hold the committer's lock (`switch_lock`,
   the caller's lock on local changes, which is not held while the peer answers) from the
   check to the commit, and with `still_valid` the pull is abandoned as in 5 when it says the
   decision no longer holds;
7. on any failure (peer error, I/O error such as ENOSPC, bad data, cancellation) the temp file
   is removed, and so are the folders the pull made for it, and `write_failed` says why; the
   old file is untouched. A crash at any point leaves the old file or the new one
   (`remove_stale_temp_files` cleans up at start).

Flow: missing chunks are asked for in file order, in GetChunks of at most BATCH_MAX_REFS refs
and BATCH_MAX_BYTES, with REQUESTS_IN_FLIGHT requests outstanding; so at most
REQUESTS_IN_FLIGHT x BATCH_MAX_BYTES (16 MiB) of received chunks wait to be written. A server
refuses a GetChunks above SERVE_MAX_REFS refs or SERVE_MAX_BYTES ("too_large"), 4x what this
receiver asks for.

Requests are built with request_id=1: the PeerLink gives each the connection's next free id.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import random
import stat as stat_mod
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from ironsync.chunking import (
    MIN_CHUNK,
    ChunkInfo,
    chunk_bytes,
    content_hash,
    is_zero_chunk,
    zero_bytes,
)
from ironsync.ignore import TEMP_PREFIX, TEMP_SUFFIX, is_temp_name
from ironsync.model import FILE
from ironsync.protocol import (
    ChunkData,
    ChunkList,
    ChunkRef,
    ChunkRefs,
    ChunksDone,
    FileData,
    FilesDone,
    GetChunkList,
    GetChunks,
    GetFiles,
    Reply,
    Request,
)
from ironsync.protocol.limits import CHUNK_REF_SIZE
from ironsync.protocol.messages import chunk_runs
from ironsync.reconcile import ResolvedFile
from ironsync.scan import KnownStat, Stat
from ironsync.store import Database, index
from ironsync.store import events as ev
from ironsync.store.batch import IndexBatch
from ironsync.store.chunks import LocalChunk, find_local_chunks
from ironsync.sync.blocking import each, in_thread
from ironsync.sync.commit import Committer, rename_new
from ironsync.sync.crashpoints import crash_point
from ironsync.sync.direct import DirectWriter, write_new_file
from ironsync.sync.link import PeerError, PeerLink, Responder
from ironsync.sync.paths import (
    NotStorable,
    OpenFolders,
    StorableChecks,
    UnsafePath,
    check_peer_path,
    check_storable,
    name_refused,
    open_inside,
    open_parent_folder,
    remove_empty_folders,
)
from ironsync.sync.versions import keep_version

log = logging.getLogger(__name__)

KiB = 1024
MiB = 1024 * KiB

BATCH_MAX_BYTES = 4 * MiB
"""Chunk bytes one GetChunks of ours asks for (a single larger chunk goes alone)."""
BATCH_MAX_REFS = 256
"""Chunks one GetChunks of ours asks for."""
REQUESTS_IN_FLIGHT = 4
"""GetChunks of one pull outstanding at once: enough to keep a LAN link busy while we write."""

CHUNK_LIST_PAGE = 16384
"""Chunk refs per ChunkList reply we send (458 KiB of records), read from the index a page
at a time."""

SERVE_MAX_REFS = 1024
"""Most chunks we serve for one GetChunks; more is refused with "too_large"."""
SERVE_MAX_BYTES = 16 * MiB
"""Most chunk bytes we serve for one GetChunks or file bytes for one GetFiles; more is refused
with "too_large"."""
SERVE_MAX_FILE_BYTES = 4 * MiB
"""Largest file we serve whole in a GetFiles (read into memory at once); a request naming a
larger one is refused with "too_large"."""
READ_RUN_BYTES = 1 * MiB
"""Adjacent chunks are served from one pread of up to this many bytes."""
TRIM_MIN_ZEROS = 1 * KiB
"""A chunk's leading or trailing zeros are not sent when there are at least this many (the
zeros around a sparse file's data); a chunk of zeros is sent as nothing, and never read."""

WRITE_BUFFER_BYTES = 1 * MiB
"""Verified chunks are written to the temp file in one writev per this many bytes."""
LOCAL_RUN_BYTES = 16 * MiB
"""Chunks held here are read, verified and written in a thread, this many bytes per call at
most (so progress is reported and a cancellation is seen at least that often); adjacent
chunks of one local file are read with one pread of up to READ_RUN_BYTES."""
_MAX_IOV = 512  # pieces the write buffer holds at most before they are written

HOLE_BLOCK = 4 * KiB
"""Zero bytes filling a whole HOLE_BLOCK-aligned block of the file are not written: they stay a
hole (the block of common file systems; a bigger one still reads back as zeros)."""

WINDOW_REFS = 4096
"""Chunks planned at once (about 100 MB of file): a pull holds two windows of refs."""
FIRST_SEEN_MAX = 32768
"""Distinct chunk hashes of a file a pull remembers, to copy a repeat from the temp file."""
SPOOL_MEMORY_BYTES = 1 * MiB
"""A chunk list over this many bytes of records (~37,000 chunks) waits in a temp file."""

PROGRESS_STEP = 1 * MiB
"""`progress` is called each time this many more bytes are written, and at the end."""

MIN_AVERAGE_CHUNK = MIN_CHUNK
"""A chunk list with more than size / MIN_AVERAGE_CHUNK + 1 chunks is refused: the chunker,
whose cut points are part of the contract between peers, never cuts a chunk shorter than
MIN_CHUNK but the last. So a peer's chunk list costs us (28 bytes a chunk, in a temp file when
long) at most what an honest file of the size it announced would, and that size must fit on our
disk."""

FILE_MODE_BITS = 0o777
"""Mode bits a pulled file gets from the peer: never setuid, setgid or sticky."""

_REQUEST_ID = 1  # replaced by the PeerLink (module docstring)
# Temp file names need not be unguessable (O_EXCL | O_NOFOLLOW create them, in a folder opened
# without following links), only unlikely to collide: no system call for each.
_temp_names = random.Random(os.urandom(16))
_ZEROS = bytes(HOLE_BLOCK)
_TRIM_ZEROS = bytes(TRIM_MIN_ZEROS)

# Folders that pulls made and that hold no pulled file yet, as (root, relative path). A pull
# that fails removes the empty ones on its way, whichever pull made them: pulls running at
# once may share a new folder, and the one that made it may not be the last to fail.
_MADE_FOR_PULLS: set[tuple[str, str]] = set()

# TransferResult.code of failures found on this side; a peer's Error keeps its own code
# ("not_found", "changed", "too_large", "disconnected", ...).
CHANGED_LOCALLY = "changed_locally"
BLOCKED = "blocked"
BAD_CHUNK_LIST = "bad_chunk_list"
CORRUPT = "corrupt"
UNSAFE_PATH = "unsafe_path"
NOT_STORABLE = "not_storable"  # a name this node cannot store (paths.NotStorable): skipped
IO_ERROR = "io_error"
CANCELLED = "cancelled"

REASON_CHANGED_LOCALLY = "local file changed"


@dataclass(frozen=True)
class TransferResult:
    """How a pull ended. `code` names a failure (see the constants above); None when ok."""

    ok: bool
    path: str
    bytes_from_peer: int
    bytes_reused: int
    reason: str | None = None
    code: str | None = None

    @property
    def changed_locally(self) -> bool:
        """The local file changed since the decision: rescan and reconcile again."""
        return self.code == CHANGED_LOCALLY


class TransferFailed(Exception):
    """A pull cannot complete; `code` is for callers, `reason` for people."""

    def __init__(self, code: str, reason: str, status: str = "error") -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.status = status


# --- serving -----------------------------------------------------------------------------------


async def serve_chunk_list(
    db: Database,
    storage_row: index.StorageRow,
    request: GetChunkList,
    respond: Responder,
    *,
    peer: str,
    refs_per_reply: int = CHUNK_LIST_PAGE,
) -> None:
    """Answer GetChunkList with the indexed chunks of the file that has `request.file_hash`,
    read from the index a reply at a time (a short query each: no read transaction is held
    while the peer reads), so a file of millions of chunks costs one page of memory. If the
    file is indexed anew meanwhile, the answer is the error "changed"."""
    row = _source_file(db, storage_row, request.path, request.file_hash, peer)
    start = 0
    while True:
        page = db.conn.execute(
            "SELECT idx, offset, length, hash FROM chunks WHERE file_id = ? AND idx >= ?"
            " ORDER BY idx LIMIT ?",
            (row.id, start, refs_per_reply + 1),
        ).fetchall()
        # a new index of the file takes a new sequence in the transaction that replaces its
        # chunks: the same sequence after the read means the page is of the file we began
        if index.file_sequence(db, row.id) != row.sequence:
            raise PeerError(peer, "changed", f"{row.path!r} changed while its chunks were sent")
        more = len(page) > refs_per_reply
        page = page[:refs_per_reply]
        # a run of equal chunks (a hole's zeros) is sent once, with its count
        refs, repeats = chunk_runs([row[1:] for row in page])
        await respond.send(
            ChunkList(
                request.storage,
                request.path,
                request.file_hash,
                refs,
                more,
                repeats,
                request_id=request.request_id,
            )
        )
        if not more:
            return
        start = page[-1][0] + 1


async def serve_chunks(
    db: Database,
    storage_row: index.StorageRow,
    request: GetChunks,
    respond: Responder,
    *,
    peer: str,
) -> None:
    """Answer GetChunks: one verified ChunkData per ref, in the order asked, then ChunksDone."""
    refs = request.chunks
    total = sum(ref.length for ref in refs)
    if len(refs) > SERVE_MAX_REFS or total > SERVE_MAX_BYTES:
        raise PeerError(
            peer,
            "too_large",
            f"GetChunks asks for {len(refs)} chunks / {total} bytes; at most {SERVE_MAX_REFS} "
            f"chunks / {SERVE_MAX_BYTES} bytes are served per request",
        )
    row = _source_file(db, storage_row, request.path, request.file_hash, peer)
    rid = request.request_id
    try:
        fd = open_inside(storage_row.root, row.path)
    except (FileNotFoundError, NotADirectoryError):
        raise PeerError(peer, "changed", f"{row.path!r} is gone since it was indexed") from None
    except (OSError, UnsafePath) as exc:
        raise PeerError(peer, "unreadable", f"{row.path!r}: {_describe_os(exc)}") from None
    try:
        for run in _adjacent_runs(refs, READ_RUN_BYTES, row.size):
            if _is_zeros(run[0], row.size):  # a run of its own: nothing to read
                await respond.send(ChunkData(run[0].offset, run[0].hash, b"", request_id=rid))
                continue
            start = run[0].offset
            try:
                view = memoryview(os.pread(fd, run[-1].offset + run[-1].length - start, start))
            except OSError as exc:
                raise PeerError(peer, "unreadable", f"{row.path!r}: {_describe_os(exc)}") from None
            for ref in run:
                data = view[ref.offset - start : ref.offset - start + ref.length]
                if len(data) != ref.length or content_hash(data) != ref.hash:
                    raise PeerError(
                        peer,
                        "changed",
                        f"{row.path!r} changed since it was indexed "
                        f"(chunk at offset {ref.offset} differs)",
                    )
                leading_zeros, data = _without_zero_ends(data)
                await respond.send(
                    ChunkData(ref.offset, ref.hash, data, leading_zeros, request_id=rid)
                )
        await respond.send(ChunksDone(request_id=request.request_id))
    finally:
        os.close(fd)


async def serve_files(
    db: Database,
    storage_row: index.StorageRow,
    request: GetFiles,
    respond: Responder,
    *,
    peer: str,
) -> None:
    """Answer GetFiles: for each file, in the order asked, one FileData with its whole content,
    read and checked against its hash (or an error code for that file alone: "not_found",
    "changed", "unreadable"), then FilesDone. A request whose files add up to more than
    SERVE_MAX_BYTES, or that names a file over SERVE_MAX_FILE_BYTES, is refused whole with
    "too_large", before anything is read."""
    hashes = [request.file_hash(i) for i in range(len(request.paths))]
    sources: list[index.FileRow | None] = []
    for path, file_hash in zip(request.paths, hashes, strict=True):
        try:
            sources.append(_source_file(db, storage_row, path, file_hash, peer))
        except PeerError:
            sources.append(None)
    total = sum(row.size for row in sources if row is not None)
    largest = max((row.size for row in sources if row is not None), default=0)
    if total > SERVE_MAX_BYTES or largest > SERVE_MAX_FILE_BYTES:
        raise PeerError(
            peer,
            "too_large",
            f"GetFiles asks for {total} bytes (a file of {largest}); at most {SERVE_MAX_BYTES} "
            f"bytes, {SERVE_MAX_FILE_BYTES} a file, are served per request",
        )
    rid = request.request_id
    for i, (row, file_hash) in enumerate(zip(sources, hashes, strict=True)):
        data, error = b"", "not_found"
        if row is not None:
            data, error = _read_whole(storage_row.root, row, file_hash)
        await respond.send(FileData(i, file_hash, error, data, request_id=rid))
    await respond.send(FilesDone(request_id=rid))


def _read_whole(root: Path, row: index.FileRow, file_hash: bytes) -> tuple[bytes, str]:
    """(the content of the indexed file `row`, "") when it still has `file_hash`; else
    (b"", why not: "changed" or "unreadable")."""
    try:
        fd = open_inside(root, row.path)
    except (FileNotFoundError, NotADirectoryError):
        return b"", "changed"
    except (OSError, UnsafePath):
        return b"", "unreadable"
    try:
        data = os.pread(fd, row.size + 1, 0)  # one byte more: a file that grew is seen
    except OSError:
        return b"", "unreadable"
    finally:
        os.close(fd)
    if len(data) != row.size or content_hash(data) != file_hash:
        return b"", "changed"
    return data, ""


def _source_file(
    db: Database, storage_row: index.StorageRow, path: str, file_hash: bytes, peer: str
) -> index.FileRow:
    """The live file at `path` with `file_hash`, else any live file of the storage with it."""
    try:
        check_peer_path(path)
    except UnsafePath as exc:
        raise PeerError(peer, "bad_path", str(exc)) from None
    row = index.get_file(db, storage_row.id, path)
    if row is not None and not row.deleted and row.kind == FILE and row.hash == file_hash:
        return row
    others = sorted(index.files_with_hash(db, storage_row.id, file_hash), key=lambda r: r.path)
    if not others:
        raise PeerError(
            peer,
            "not_found",
            f"no file with hash {file_hash.hex()} at {path!r} or elsewhere in '{storage_row.name}'",
        )
    return others[0]


def _adjacent_runs(refs: Sequence[ChunkRef], max_bytes: int, size: int) -> list[list[ChunkRef]]:
    """Split refs (kept in order) into runs of adjacent chunks of at most `max_bytes`; a chunk
    of zeros (of a file of `size` bytes) is a run of its own."""
    runs: list[list[ChunkRef]] = []
    zeros = False  # the last run is a chunk of zeros
    for ref in refs:
        is_zeros = _is_zeros(ref, size)
        if runs and not zeros and not is_zeros:
            run = runs[-1]
            end = run[-1].offset + run[-1].length
            if ref.offset == end and end + ref.length - run[0].offset <= max_bytes:
                run.append(ref)
                continue
        runs.append([ref])
        zeros = is_zeros
    return runs


def _is_zeros(ref: ChunkRef, size: int) -> bool:
    """Whether `ref`, a chunk of a file of `size` bytes, is one of zeros (as far as
    `chunking.is_zero_chunk` tells)."""
    return is_zero_chunk(ref.length, ref.hash, at_end=ref.offset + ref.length == size)


def _without_zero_ends(data: memoryview) -> tuple[int, memoryview]:
    """(leading zeros, the rest without its trailing zeros) of a chunk, as ChunkData sends
    it; only runs of at least TRIM_MIN_ZEROS are left out (most chunks: a look at two bytes)."""
    size = len(data)
    if size < TRIM_MIN_ZEROS or (data[0] and data[-1]):
        return 0, data
    lead = trail = 0
    if not data[0] and data[:TRIM_MIN_ZEROS].tobytes() == _TRIM_ZEROS:
        lead = size - len(data.tobytes().lstrip(b"\0"))
        if lead == size:
            return 0, data[:0]
    if not data[-1] and data[size - TRIM_MIN_ZEROS :].tobytes() == _TRIM_ZEROS:
        trail = size - len(data.tobytes().rstrip(b"\0"))
    return lead, data[lead : size - trail]


# --- pulling -----------------------------------------------------------------------------------


async def pull_file(
    db: Database,
    link: PeerLink,
    storage_row: index.StorageRow,
    target: ResolvedFile,
    *,
    dest_path: str | None = None,
    expected: KnownStat | None,
    now_ns: Callable[[], int] = time.time_ns,
    progress: Callable[[int, int], None] | None = None,
    keep_versions: bool = False,
    switch_lock: asyncio.Lock | None = None,
    committer: Committer | None = None,
    still_valid: Callable[[], bool] | None = None,
    on_written: Callable[[], None] | None = None,
) -> TransferResult:
    """Fetch `target`'s content from the peer behind `link` into `dest_path` (default: the
    target's path), verified, atomically, without overwriting a local change.

    `expected` is the local file the decision saw (None: no file there); with `keep_versions`
    the file it replaces is kept in the versions folder first. `on_written` is called once the
    temp file holds the verified content, before it waits for its committer: the pull holds
    no received data from then on. Failures are returned
    as a TransferResult with ok=False, after a `write_failed` event; cancellation cleans up the
    same way, then propagates.
    """
    if target.deleted or target.hash is None:
        raise ValueError(f"{target.path!r}: a tombstone has no content to pull")
    path = target.path if dest_path is None else dest_path
    if expected is None:  # a new name here: one this disk refuses or confuses is skipped
        try:
            check_storable(storage_row.root, path)
        except NotStorable as exc:
            return TransferResult(False, path, 0, 0, exc.reason, NOT_STORABLE)
        except (OSError, UnsafePath):
            pass  # the pull meets it again, and reports it as a failure
    where: dict[str, Any] = {"storage": storage_row.name, "path": path, "peer": link.peer_id}
    about: dict[str, Any] = {"size": target.size, "hash": target.hash.hex()}
    if path != target.path:
        about["from"] = target.path
    with db.atomic():
        ev.append_event(db, "write_started", detail=about, **where)
    pull = _Pull(db, link, storage_row, target, path, progress)
    pull.keep_versions = keep_versions
    pull.switch_lock = switch_lock
    pull.committer = committer
    pull.still_valid = still_valid
    pull.on_written = on_written
    try:
        await pull.run(expected, now_ns)
    except BaseException as exc:
        pull.discard()
        if pull.recorded:  # cancelled once its group had committed it: the file is in place
            raise
        code, reason, status = _failure(exc)
        detail = {
            **about,
            "reason": reason,
            "code": code or "internal",
            "bytes_from_peer": pull.bytes_from_peer,
            "bytes_reused": pull.bytes_reused,
        }
        if pull.replaced:  # failed after the rename: the new file is in place, not indexed
            detail["replaced"] = True
        try:
            with db.atomic():
                ev.append_event(db, "write_failed", status=status, detail=detail, **where)
        except Exception:
            log.exception("could not record write_failed for %s", path)
        if code is None or isinstance(exc, asyncio.CancelledError):
            raise
        return TransferResult(False, path, pull.bytes_from_peer, pull.bytes_reused, reason, code)
    finally:
        pull.close()
    return TransferResult(True, path, pull.bytes_from_peer, pull.bytes_reused)


@dataclass(frozen=True)
class SmallPull:
    """One file of `pull_small_files`: as `pull_file`'s arguments."""

    target: ResolvedFile
    dest: str
    expected: KnownStat | None
    still_valid: Callable[[], bool] | None = None


SMALL_FILE_BYTES = 128 * KiB
"""Files of at most this size are pulled whole, many per request (`pull_small_files`): for
them a chunk list and local chunk reuse cost more round trips than they save bytes."""
WHOLE_NEW_FILE_BYTES = 4 * MiB
"""... and so are new files (no file at their path here) of at most this size whose content
this node holds nowhere: no chunk of theirs is likely to be here either (issue 13: a first
sync of photos moves whole files, not a chunk list and 64-256 chunks each)."""
SMALL_BATCH_FILES = 64
"""Files one GetFiles of ours asks for at most..."""
SMALL_BATCH_BYTES = 4 * MiB
"""... and their bytes at most (a single larger file goes alone)."""


async def pull_small_files(
    db: Database,
    link: PeerLink,
    storage_row: index.StorageRow,
    pulls: Sequence[SmallPull],
    *,
    committer: Committer | None = None,
    now_ns: Callable[[], int] = time.time_ns,
    keep_versions: bool = False,
    on_written: Callable[[], None] | None = None,
) -> list[TransferResult]:
    """`pull_file` for many small files at once (issue 13), with the same rules and events:
    one GetFiles asks for every file's whole content; each is verified against its hash,
    written to its temp file (all of them in one thread job), and the files switch into place
    together through `committer`. Each file succeeds or fails alone; the results are in the
    order of `pulls`. `on_written` is called as `pull_file`'s, once for the batch: when every
    temp file is written, before they wait for their committer."""
    results: list[TransferResult | None] = [None] * len(pulls)
    started: list[int] = []  # indexes of pulls with a write_started event
    for small in pulls:
        target = small.target
        if target.deleted or target.hash is None or target.size > SERVE_MAX_FILE_BYTES:
            raise ValueError(f"{target.path!r}: not a small file to pull")
    refusals = await in_thread(_refused_names, storage_row.root, pulls)
    for i, small in enumerate(pulls):
        refusal = refusals[i]
        if refusal is not None:  # a new name this disk refuses: skipped
            results[i] = TransferResult(False, small.dest, 0, 0, refusal, NOT_STORABLE)
        else:
            started.append(i)
    if not started:
        return [r for r in results if r is not None]

    def about(i: int) -> dict[str, Any]:
        target = pulls[i].target
        assert target.hash is not None
        detail: dict[str, Any] = {"size": target.size, "hash": target.hash.hex()}
        if pulls[i].dest != target.path:
            detail["from"] = target.path
        return detail

    where = {"storage": storage_row.name, "peer": link.peer_id}
    starts = [
        ("write_started", pulls[i].dest, _started_text(pulls[i]), link.peer_id) for i in started
    ]
    with db.atomic():
        ev.append_storage_events(db, storage_row.name, starts, ev.iso_now())
    made: dict[int, _Pull] = {}
    errors: dict[int, BaseException] = {}
    try:
        received = await _receive_files(link, storage_row, [pulls[i] for i in started])
        data_of: dict[int, memoryview] = {}
        for i, got in zip(started, received, strict=True):
            if isinstance(got, BaseException):
                errors[i] = got
                continue
            small = pulls[i]
            pull = _Pull(db, link, storage_row, small.target, small.dest, None)
            pull.keep_versions = keep_versions
            pull.committer = committer
            pull.still_valid = small.still_valid
            made[i], data_of[i] = pull, got
        jobs = [(made[i], data_of[i], pulls[i].expected) for i in made]

        def write_all() -> list[Exception | None]:  # one thread job for the batch
            with OpenFolders(storage_row.root) as folders:

                def write(job: tuple[_Pull, memoryview, KnownStat | None]) -> None:
                    job[0].write_whole(job[1], job[2], now_ns, folders)

                return each(write, jobs)

        outcomes = await in_thread(write_all)
        jobs.clear()
        data_of.clear()
        received.clear()
        if on_written is not None:
            on_written()
        ready = [i for i, error in zip(made, outcomes, strict=True) if error is None]
        errors.update((i, e) for i, e in zip(made, outcomes, strict=True) if e is not None)
        if ready:
            group = committer or Committer(db)
            committed = await group.commit_many([made[i] for i in ready])
            errors.update((i, e) for i, e in zip(ready, committed, strict=True) if e is not None)
        await in_thread(_close_all, [made[i] for i in made if i not in errors])
    except BaseException as exc:  # cancelled, or an internal error: every open pull fails
        for i in started:
            if i not in errors and not (i in made and made[i].recorded):
                errors[i] = exc
        raise
    finally:
        failed_events = []
        for i in started:
            pull = made.get(i)
            error = errors.get(i)
            if error is None:
                assert pull is not None
                results[i] = TransferResult(True, pull.path, pull.bytes_from_peer, 0)
                continue
            if pull is not None:
                pull.discard()
            code, reason, status = _failure(error)
            detail = {
                **about(i),
                "reason": reason,
                "code": code or "internal",
                "bytes_from_peer": 0 if pull is None else pull.bytes_from_peer,
                "bytes_reused": 0,
            }
            if pull is not None and pull.replaced:
                detail["replaced"] = True
            failed_events.append((pulls[i].dest, status, detail))
            bytes_in = 0 if pull is None else pull.bytes_from_peer
            results[i] = TransferResult(False, pulls[i].dest, bytes_in, 0, reason, code)
        for pull in made.values():
            pull.close()
        try:
            with db.atomic() if failed_events else contextlib.nullcontext():
                for path, status, detail in failed_events:
                    ev.append_event(
                        db, "write_failed", status=status, detail=detail, path=path, **where
                    )
        except Exception:
            log.exception("could not record write_failed for %d files", len(failed_events))
    for error in errors.values():
        if _failure(error)[0] is None:  # not a transfer failure: a bug, not the peer's doing
            raise error
    return [r for r in results if r is not None]


def _started_text(small: SmallPull) -> str:
    """The detail of a small file's write_started event, as `ev.detail_text` writes it (keys
    sorted, compact), made without a dict and json.dumps (20,000 files of a first sync)."""
    target = small.target
    assert target.hash is not None
    text = f'"hash":"{target.hash.hex()}","size":{target.size}}}'
    if small.dest != target.path:
        return '{"from":' + json.dumps(target.path) + "," + text
    return "{" + text


def _refused_names(root: Path, pulls: Sequence[SmallPull]) -> list[str | None]:
    """Why this disk cannot hold each new name of `pulls` (paths.check_storable), or None;
    in a thread."""
    refusals: list[str | None] = []
    with StorableChecks(root) as checks:
        for small in pulls:
            refusal = None
            if small.expected is None:
                try:
                    checks.check(small.dest)
                except NotStorable as exc:
                    refusal = exc.reason
                except (OSError, UnsafePath):
                    pass  # the pull meets it again, and reports it as a failure
            refusals.append(refusal)
    return refusals


async def _receive_files(
    link: PeerLink, storage_row: index.StorageRow, pulls: Sequence[SmallPull]
) -> list[memoryview | BaseException]:
    """Each file's verified content from one GetFiles, or why not (a TransferFailed or
    PeerError for that file; a failure of the whole request fails every file not received)."""
    hashes = []
    for small in pulls:
        assert small.target.hash is not None
        hashes.append(small.target.hash)
    request = GetFiles(
        storage_row.name,
        tuple(small.target.path for small in pulls),
        b"".join(hashes),
        request_id=_REQUEST_ID,
    )
    got: list[memoryview | BaseException] = []
    try:
        async with _replies(link, request) as replies:
            async for reply in replies:
                if isinstance(reply, FilesDone):
                    break
                if not isinstance(reply, FileData) or reply.index != len(got):
                    what = type(reply).__name__
                    raise TransferFailed(CORRUPT, f"GetFiles answered out of order ({what})")
                target = pulls[reply.index].target
                if reply.hash != target.hash:
                    raise TransferFailed(CORRUPT, "the peer sent another file's content")
                if reply.error:
                    why = f"the peer cannot send {target.path!r}: {reply.error}"
                    got.append(PeerError(link.peer_id, reply.error, why))
                    continue
                data = memoryview(reply.data)
                if len(data) != target.size:
                    got.append(TransferFailed(CORRUPT, _not_the_content(reply.hash)))
                    continue
                got.append(data)  # its hash is checked before it is written (write_whole)
        if len(got) != len(pulls):
            raise TransferFailed(CORRUPT, f"GetFiles answered {len(got)} of {len(pulls)} files")
    except (PeerError, TransferFailed) as exc:
        got += [exc] * (len(pulls) - len(got))
    return got


def _close_all(pulls: list[_Pull]) -> None:
    """Close the files of pulls that are done (in a thread: a close after writing costs)."""
    for pull in pulls:
        pull.close()


def _not_the_content(file_hash: bytes) -> str:
    return f"the received file does not have the hash {file_hash.hex()}"


def _failure(exc: BaseException) -> tuple[str | None, str, str]:
    """(code, reason, event status) of an exception; code None: not a transfer failure."""
    if isinstance(exc, TransferFailed):
        return exc.code, exc.reason, exc.status
    if isinstance(exc, PeerError):
        return exc.code, str(exc), "error"
    if isinstance(exc, UnsafePath):
        return UNSAFE_PATH, str(exc), "error"
    if isinstance(exc, NotStorable):
        return NOT_STORABLE, exc.reason, "warning"
    if isinstance(exc, OSError):
        return IO_ERROR, _describe_os(exc), "error"
    if isinstance(exc, asyncio.CancelledError):
        return CANCELLED, "cancelled", "warning"
    return None, f"internal error: {exc!r}", "error"


def _describe_os(exc: OSError | UnsafePath) -> str:
    if isinstance(exc, UnsafePath):
        return str(exc)
    name = errno.errorcode.get(exc.errno or 0, "")
    text = exc.strerror or str(exc)
    return f"{name}: {text}" if name else text


# How each chunk of the file is obtained, decided before anything is written. A chunk of zeros
# (known by its hash) is obtained from nowhere: it is left a hole.
_PEER, _LOCAL, _COPY, _ZERO = "peer", "local", "copy", "zero"


class _Pull:
    """One pull in progress: the temp file, the local sources, the byte counts."""

    def __init__(
        self,
        db: Database,
        link: PeerLink,
        storage_row: index.StorageRow,
        target: ResolvedFile,
        path: str,
        progress: Callable[[int, int], None] | None,
    ) -> None:
        self.db = db
        self.link = link
        self.storage = storage_row
        self.target = target
        self.path = path
        self.progress = progress
        self.bytes_from_peer = 0
        self.bytes_reused = 0
        self.replaced = False  # the new file has been renamed over the target
        self.keep_versions = False
        self.switch_lock: asyncio.Lock | None = None
        self.committer: Committer | None = None
        self.on_written: Callable[[], None] | None = None  # the temp file holds it all
        self.recorded = False  # the index row and write_finished are committed
        self._expected: KnownStat | None = None
        self._now_ns: Callable[[], int] = time.time_ns
        self.still_valid: Callable[[], bool] | None = None
        self._created: list[str] = []  # folders made for the temp file
        self._chunks: _ChunkListSpool | None = None
        self._folder_fd: int | None = None
        self._name = ""
        self._temp: str | None = None
        self._fd: int | None = None
        self._writer: DirectWriter | None = None  # writes the temp file's chunks (sync.direct)
        self._written = 0
        self._reported = 0
        self._hasher = xxhash.xxh3_128()
        self._pending: list[tuple[int, memoryview]] = []  # (offset, bytes) to write there
        self._pending_bytes = 0
        self._sources: dict[tuple[Path, str], int | None] = {}
        self._distrusted: set[tuple[Path, str]] = set()

    async def run(self, expected: KnownStat | None, now_ns: Callable[[], int]) -> None:
        target = self.target
        assert target.hash is not None
        check_peer_path(self.path)
        chunks = self._chunks = await self._chunk_list()
        self._folder_fd, self._name = open_parent_folder(
            self.storage.root, self.path, create=True, created=self._created
        )
        _MADE_FOR_PULLS.update((str(self.storage.root), folder) for folder in self._created)
        crash_point("before_temp")
        await in_thread(self._open_temp)  # a create waits on the folder: not on the loop
        await self._assemble(chunks)
        if self._written != target.size or self._hasher.digest() != target.hash:
            raise TransferFailed(
                CORRUPT, f"the assembled file does not have the hash {target.hash.hex()}"
            )
        assert self._fd is not None
        crash_point("after_verify")
        os.fchmod(self._fd, target.mode & FILE_MODE_BITS)
        os.utime(self._fd, ns=(target.mtime_ns, target.mtime_ns))
        self._expected, self._now_ns = expected, now_ns
        if self.on_written is not None:
            self.on_written()
        committer = self.committer or Committer(self.db, self.switch_lock)
        await committer.commit(self)  # fsync, rename, fsync, index: shared with other pulls

    def write_whole(
        self,
        data: memoryview,
        expected: KnownStat | None,
        now_ns: Callable[[], int],
        folders: OpenFolders,
    ) -> None:
        """Steps 2 to 4 for a small file received whole (`pull_small_files`), verified here
        first: its chunks, computed here, and its temp file, with the target's mode and
        mtime; then it is ready for its committer, as `run` leaves a pull. In a thread, with
        the other files of its batch (`folders`: their folders, each opened once)."""
        target = self.target
        assert target.hash is not None
        if content_hash(data) != target.hash:  # before anything is written
            raise TransferFailed(CORRUPT, _not_the_content(target.hash))
        self.bytes_from_peer = len(data)
        self._expected, self._now_ns = expected, now_ns
        check_peer_path(self.path)
        chunks = self._chunks = _ChunkListSpool()
        chunks.extend([ChunkRef(c.offset, c.length, c.hash) for c in chunk_bytes(data).chunks])
        self._folder_fd, self._name = folders.open_parent(
            self.path, create=True, created=self._created
        )
        _MADE_FOR_PULLS.update((str(self.storage.root), folder) for folder in self._created)
        crash_point("before_temp")
        self._open_temp()
        assert self._fd is not None
        if len(data):
            write_new_file(self._fd, data)
        self._written = len(data)
        os.fchmod(self._fd, target.mode & FILE_MODE_BITS)
        os.utime(self._fd, ns=(target.mtime_ns, target.mtime_ns))

    # Committer's steps (ironsync.sync.commit.Switchable)

    def data_fd(self) -> int:
        assert self._fd is not None
        return self._fd

    def check(self) -> None:
        if self.still_valid is not None and not self.still_valid():
            raise TransferFailed(CHANGED_LOCALLY, REASON_CHANGED_LOCALLY, "warning")

    def rename(self, checks: StorableChecks) -> int:
        crash_point("before_rename")
        self._replace_target(self._expected, checks)
        crash_point("after_rename")
        assert self._folder_fd is not None
        return self._folder_fd

    def record(self, batch: IndexBatch) -> None:
        target = self.target
        assert target.hash is not None and self._fd is not None and self._chunks is not None
        batch.put_live_file(
            self.path,
            Stat.of(os.fstat(self._fd)),
            target.hash,
            (
                ChunkInfo(ref.offset, ref.length, ref.hash)
                for window in self._chunks.windows(WINDOW_REFS)
                for ref in window
            ),
            version=target.version.to_json(),
            modified_by=target.modified_by,
            indexed_at_ns=self._now_ns(),
        )
        crash_point("mid_transaction")
        detail: dict[str, Any] = {
            "size": target.size,
            "hash": target.hash.hex(),
            "bytes_from_peer": self.bytes_from_peer,
            "bytes_reused": self.bytes_reused,
        }
        if self.path != target.path:
            detail["from"] = target.path
        batch.append_event("write_finished", self.path, ev.detail_text(detail), self.link.peer_id)
        self.recorded = True

    # --- step 2: the chunk list ----------------------------------------------------------------

    def _check_free_space(self, needed: int, what: str) -> None:
        try:
            fs = os.statvfs(self.storage.root)
        except OSError:
            return  # the pull itself will say what is wrong
        free = fs.f_bavail * fs.f_frsize
        if fs.f_blocks and needed > free:
            raise TransferFailed(
                IO_ERROR,
                f"ENOSPC: {what} needs {needed} bytes, the storage's file system has {free} free",
            )

    async def _chunk_list(self) -> _ChunkListSpool:
        target = self.target
        assert target.hash is not None
        chunks = _ChunkListSpool()
        if target.size <= MIN_CHUNK:
            # The chunker never cuts within MIN_CHUNK bytes (part of the contract between
            # peers): such a file is one chunk whose hash is the file's, or none when empty.
            # No need to ask: one round trip less for every small file.
            self._check_free_space(target.size, "the file")
            if target.size:
                chunks.extend([ChunkRef(0, target.size, target.hash)])
            return chunks
        # A sparse file needs only its data on disk, known from its chunk list; before asking
        # for the list, the most it can cost must fit (28 bytes a chunk, in a temp file).
        most = target.size // MIN_AVERAGE_CHUNK + 1
        self._check_free_space(min(target.size, most * CHUNK_REF_SIZE), "the chunk list")
        request = GetChunkList(self.storage.name, target.path, target.hash, request_id=_REQUEST_ID)
        covered = zeros = 0
        try:
            async with _replies(self.link, request) as replies:
                async for reply in replies:
                    if not isinstance(reply, ChunkList):
                        raise TransferFailed(
                            BAD_CHUNK_LIST, f"GetChunkList answered by {type(reply).__name__}"
                        )
                    if reply.file_hash != target.hash or reply.path != target.path:
                        raise TransferFailed(BAD_CHUNK_LIST, "the peer sent another file's chunks")
                    if len(chunks) + reply.chunk_count() > most:
                        raise TransferFailed(
                            BAD_CHUNK_LIST, f"more chunks than a file of {target.size} bytes has"
                        )
                    refs = reply.all_chunks()
                    covered, zeros = _check_coverage(refs, target.size, covered, zeros)
                    chunks.extend(refs)
            if covered != target.size:
                raise TransferFailed(
                    BAD_CHUNK_LIST,
                    f"the chunk list covers {covered} bytes of a {target.size}-byte file",
                )
            self._check_free_space(target.size - zeros, "the file's data")
        except BaseException:
            chunks.close()
            raise
        return chunks

    # --- steps 3 and 4: assembly ---------------------------------------------------------------

    def _open_temp(self) -> None:
        for _ in range(8):
            name = f"{TEMP_PREFIX}{_temp_names.getrandbits(64):016x}{TEMP_SUFFIX}"
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                self._fd = os.open(name, flags, 0o600, dir_fd=self._folder_fd)
            except FileExistsError:
                continue
            self._temp = name
            return
        raise TransferFailed(IO_ERROR, "no free temporary file name")

    async def _assemble(self, chunks: _ChunkListSpool) -> None:
        """Write the file in order, WINDOW_REFS chunks at a time: each window is planned (local
        lookups, batches to fetch) while the one before it is written, so the fetches run on
        across windows and a pull holds two windows of chunk refs whatever the file's size."""
        target = self.target
        assert target.hash is not None
        fetcher = _Fetcher(self, (self.storage.name, target.path, target.hash))
        planner = _Planner(self.db, target.size)
        windows = chunks.windows(WINDOW_REFS)
        try:
            ahead = planner.plan(list(next(windows, ())))
            fetcher.add(ahead.batches)
            while ahead is not None:
                window = ahead
                following = next(windows, None)
                ahead = None if following is None else planner.plan(list(following))
                if ahead is not None:
                    fetcher.add(ahead.batches)
                await self._write_window(window, fetcher)
            await in_thread(self._settle)
            assert self._fd is not None
            os.ftruncate(self._fd, self._written)  # the size, when the file ends in a hole
        finally:
            await fetcher.close()
        self._report()

    async def _write_window(self, plan: _WindowPlan, fetcher: _Fetcher) -> None:
        refs, kinds, local = plan.refs, plan.kinds, plan.local
        received: dict[int, bytes | memoryview] = {}  # offset -> data, of the current batch
        fallback: dict[int, bytes | memoryview] = {}  # offset -> data, fetched for bad sources
        i = 0
        while i < len(refs):
            ref, kind = refs[i], kinds[i]
            if kind is _LOCAL and ref.offset not in fallback:
                run = _local_run(refs, kinds, fallback, i)
                written = await in_thread(
                    self._write_local, run, [local[run_ref.hash] for run_ref in run]
                )
                i += written
                if written == len(run):
                    self._report()
                    await asyncio.sleep(0)  # let the fetches and the rest of the daemon run
                    continue
                ref = refs[i]  # its source no longer holds it: fetched, with those after it
                fallback = await fetcher.fetch(_refetch_run(refs, kinds, local, i, self))
                full = self._write(fallback.pop(ref.offset), reused=False)
            elif kind is _PEER:
                if ref.offset not in received:
                    received = await fetcher.take()
                full = self._write(received.pop(ref.offset), reused=False)
            elif kind is _ZERO:
                self._skip_zeros(ref.length)
                full = False
            elif kind is _COPY:
                full = self._write(self._read_back(plan.copy_from[i], ref), reused=True)
            else:  # _LOCAL, fetched already because its source failed
                full = self._write(fallback.pop(ref.offset), reused=False)
            if full:
                await self._flush_in_thread()
            if self._written - self._reported >= PROGRESS_STEP:
                self._report()
                await asyncio.sleep(0)  # let the fetches and the rest of the daemon run
            i += 1

    def _write_local(self, refs: list[ChunkRef], sources: list[LocalChunk]) -> int:
        """Write chunks held here, in a thread (the pull awaits it: nothing else touches its
        state meanwhile): how many of `refs` were written, fewer when a source no longer
        holds its chunk (that one and its file are then distrusted)."""
        done = 0
        while done < len(refs):
            root, rel, start, _ = sources[done]
            end, length = done + 1, refs[done].length
            while (
                end < len(refs)
                and sources[end][:3] == (root, rel, start + length)
                and length + refs[end].length <= READ_RUN_BYTES
            ):
                length += refs[end].length
                end += 1
            data = self._read_local(root, rel, start, length)
            at = 0
            for ref in refs[done:end]:
                piece = None if data is None else data[at : at + ref.length]
                if piece is None or len(piece) != ref.length or content_hash(piece) != ref.hash:
                    self._distrusted.add((root, rel))  # changed since indexed: trust none of it
                    return done
                at += ref.length
                done += 1
                if self._write(piece, reused=True):
                    self._flush()
        return done

    def _write(self, data: bytes | memoryview, *, reused: bool) -> bool:
        """Append a verified chunk to the write buffer; True when the buffer is full (then
        the caller writes it, in one pwritev per run). Its zero blocks are left out: holes."""
        self._hasher.update(data)
        if reused:
            self.bytes_reused += len(data)
        view = memoryview(data)
        at, end = self._written, len(view)
        self._written += end
        start = 0  # of the bytes not yet buffered
        if end and (not view[0] or not view[-1] or _has_zero_block_heads(view, at)):
            for zeros_start, zeros_end in _zero_blocks(view, at):
                if zeros_start > start:
                    self._buffer(at + start, view[start:zeros_start])
                start = zeros_end
        if start < end:
            self._buffer(at + start, view[start:])
        return self._pending_bytes >= WRITE_BUFFER_BYTES or len(self._pending) >= _MAX_IOV

    def _buffer(self, offset: int, data: memoryview) -> None:
        self._pending.append((offset, data))
        self._pending_bytes += len(data)

    def _skip_zeros(self, length: int) -> None:
        """Leave a chunk of `length` zero bytes a hole; only the whole-file hash sees them."""
        zeros = zero_bytes()
        for start in range(0, length, len(zeros)):
            self._hasher.update(zeros[: min(len(zeros), length - start)])
        self._written += length

    def _flush(self) -> None:
        """Write what the buffer holds, here and now."""
        self._write_all(self._take_pending())

    async def _flush_in_thread(self) -> None:
        """Write what the buffer holds in a thread: the event loop goes on receiving."""
        await in_thread(self._write_all, self._take_pending())

    def _take_pending(self) -> list[tuple[int, memoryview]]:
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        return pending

    def _write_all(self, pending: list[tuple[int, memoryview]]) -> None:
        """Write each piece at its offset, holes between them skipped (around the page cache
        where the file system allows: sync.direct)."""
        assert self._fd is not None
        if self._writer is None:
            self._writer = DirectWriter(self._fd)
        self._writer.write(pending)

    def _settle(self) -> None:
        """Write what the buffer holds, and make every byte given so far readable from the
        temp file."""
        self._flush()
        if self._writer is not None:
            self._writer.settle()

    def _read_back(self, offset: int, ref: ChunkRef) -> bytes:
        assert self._fd is not None
        self._settle()
        data = os.pread(self._fd, ref.length, offset)
        if content_hash(data) != ref.hash:
            raise TransferFailed(CORRUPT, "the temporary file changed while being written")
        return data

    def _read_local(self, root: Path, rel: str, offset: int, length: int) -> memoryview | None:
        """`length` bytes at `offset` of a local file (fewer at its end), or None if it cannot
        be read or is distrusted; the caller verifies them."""
        key = (root, rel)
        if key in self._distrusted:
            return None
        if key not in self._sources:
            try:
                self._sources[key] = open_inside(root, rel)
            except (OSError, UnsafePath):
                self._sources[key] = None
        fd = self._sources[key]
        if fd is None:
            return None
        try:
            return memoryview(os.pread(fd, length, offset))
        except OSError:
            return None

    def is_distrusted(self, source: LocalChunk) -> bool:
        return (source[0], source[1]) in self._distrusted

    def _report(self) -> None:
        self._reported = self._written
        if self.progress is not None:
            self.progress(self._written, self.target.size)

    # --- steps 5 and 6: the switch -------------------------------------------------------------

    def _replace_target(self, expected: KnownStat | None, checks: StorableChecks) -> None:
        folder, name, temp = self._folder_fd, self._name, self._temp
        assert folder is not None and temp is not None
        if expected is None:
            # Again, now that no other pull switches: two new names this disk does not tell
            # apart, pulled at once, must not land in one file (paths.check_storable).
            checks.check(self.path)
            try:  # a file created since the check above is kept
                renamed = rename_new(temp, name, folder)
            except FileExistsError:
                renamed = False  # the checks below say what is in the way
            except OSError as exc:
                raise name_refused(self.path, exc) or exc from None
            if renamed:
                self._switched()
                return
        try:
            now = os.stat(name, dir_fd=folder, follow_symlinks=False)
        except FileNotFoundError:
            now = None
        if now is not None and stat_mod.S_ISDIR(now.st_mode):
            raise TransferFailed(BLOCKED, f"a folder is in the way at {self.path!r}")
        if not _is_as_expected(now, expected):
            raise TransferFailed(CHANGED_LOCALLY, REASON_CHANGED_LOCALLY, "warning")
        if expected is None:
            # link() refuses to replace: a file created since the check above is kept too.
            try:
                os.link(temp, name, src_dir_fd=folder, dst_dir_fd=folder, follow_symlinks=False)
            except FileExistsError:
                raise TransferFailed(CHANGED_LOCALLY, REASON_CHANGED_LOCALLY, "warning") from None
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS):
                    raise name_refused(self.path, exc) or exc from None
                try:
                    os.replace(temp, name, src_dir_fd=folder, dst_dir_fd=folder)  # no hard links
                except OSError as exc:
                    # The temp file is in this folder: ENOENT is about the new name (as some
                    # FUSE drivers, exfat-fuse, say for a name they do not allow).
                    also = frozenset({errno.ENOENT})
                    raise name_refused(self.path, exc, also=also) or exc from None
            else:
                self._temp = None
                try:
                    os.unlink(temp, dir_fd=folder)
                except OSError as exc:  # the new file is in place; the temp goes at next start
                    log.warning("could not remove %s beside %s: %s", temp, self.path, exc)
        else:
            if self.keep_versions:  # a hard link: the rename below leaves it alone
                keep_version(self.storage.root, self.path, move=False)
            os.replace(temp, name, src_dir_fd=folder, dst_dir_fd=folder)
        self._switched()

    def _switched(self) -> None:
        """The temp file is at the target's name now."""
        self._temp = None
        self.replaced = True
        root = str(self.storage.root)
        for folder in _folders_of(self.path):  # they hold a file now: never removed
            _MADE_FOR_PULLS.discard((root, folder))

    # --- step 7: cleanup -----------------------------------------------------------------------

    def discard(self) -> None:
        """Remove the temp file (if it still exists) and the folders made for it, if empty;
        the target is untouched."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._temp is not None:
            try:
                os.unlink(self._temp, dir_fd=self._folder_fd)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("could not remove %s beside %s: %s", self._temp, self.path, exc)
            self._temp = None
        if not self.replaced:
            root = str(self.storage.root)
            made = [f for f in _folders_of(self.path) if (root, f) in _MADE_FOR_PULLS]
            remove_empty_folders(self.storage.root, made)
            for folder in made:
                if not os.path.lexists(os.path.join(root, folder)):
                    _MADE_FOR_PULLS.discard((root, folder))
        self._created = []

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._folder_fd is not None:
            os.close(self._folder_fd)
            self._folder_fd = None
        for fd in self._sources.values():
            if fd is not None:
                os.close(fd)
        self._sources.clear()
        if self._chunks is not None:
            self._chunks.close()
            self._chunks = None


def _block_heads(view: memoryview, at: int) -> tuple[int, int, bytes]:
    """Where the whole HOLE_BLOCK-aligned blocks of the file in `view` (its bytes from offset
    `at`) start and end, and the first byte of each, taken in C."""
    end = len(view)
    first = min(-at % HOLE_BLOCK, end)
    tail = first + max(0, (end - first) // HOLE_BLOCK) * HOLE_BLOCK
    return first, tail, view[first:tail:HOLE_BLOCK].tobytes()


def _has_zero_block_heads(view: memoryview, at: int) -> bool:
    """False when no whole block in `view` can be all zeros (most data: then no block is
    looked at in Python)."""
    return 0 in _block_heads(view, at)[2]


def _zero_blocks(view: memoryview, at: int) -> Iterator[tuple[int, int]]:
    """The [start, end) ranges of `view` (the file's bytes from offset `at`) that need not be
    written: every HOLE_BLOCK-aligned block of zeros, and the zeros of the partial blocks at
    its ends (the chunks beside them may be holes: then that block stays one too)."""
    end = len(view)
    first, tail, heads = _block_heads(view, at)
    if first and not view[0] and view[:first].tobytes() == _ZEROS[:first]:
        yield 0, first
    i = heads.find(0)
    while i >= 0:
        block = first + i * HOLE_BLOCK
        if view[block : block + HOLE_BLOCK].tobytes() == _ZEROS:
            yield block, block + HOLE_BLOCK
        i = heads.find(0, i + 1)
    if tail < end and not view[-1] and view[tail:].tobytes() == _ZEROS[: end - tail]:
        yield tail, end


def _folders_of(path: str) -> list[str]:
    """The folders on the way to `path`, outermost first: "a/b/c" -> ["a", "a/b"]."""
    parts = path.split("/")[:-1]
    return ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]


def _check_coverage(
    refs: Sequence[ChunkRef], size: int, offset: int = 0, zeros: int = 0
) -> tuple[int, int]:
    """Check that `refs` continue a chunk list at `offset` without gap, overlap, empty chunk
    or going past `size`; return the offset they reach and `zeros` plus their bytes in chunks
    of zeros (holes to be)."""
    for ref in refs:
        if ref.offset != offset:
            raise TransferFailed(
                BAD_CHUNK_LIST, f"the chunk list has a gap or overlap at offset {offset}"
            )
        if ref.length == 0:
            raise TransferFailed(BAD_CHUNK_LIST, f"empty chunk at offset {offset}")
        offset += ref.length
        if offset > size:
            raise TransferFailed(
                BAD_CHUNK_LIST, f"the chunk list covers more than the {size}-byte file"
            )
        if _is_zeros(ref, size):
            zeros += ref.length
    return offset, zeros


@dataclass
class _WindowPlan:
    """How each chunk of one window of the file is obtained, decided before it is written."""

    refs: list[ChunkRef]
    kinds: list[str]
    local: dict[bytes, LocalChunk]  # hash -> where this node holds it
    copy_from: dict[int, int]  # index of a _COPY chunk -> offset of its first occurrence
    batches: list[list[ChunkRef]]  # the GetChunks of the _PEER chunks, in file order


class _Planner:
    """Plans the windows of one file in order.

    A hash seen earlier in the file is copied from the temp file (the first FIRST_SEEN_MAX
    distinct hashes are remembered; a repeat of a later one is read or fetched again); else a
    chunk held locally is read locally; else it is fetched."""

    def __init__(self, db: Database, size: int) -> None:
        self._db = db
        self._size = size  # of the file
        self._first_at: dict[bytes, int] = {}  # chunk hash -> offset of its first occurrence

    def plan(self, refs: list[ChunkRef]) -> _WindowPlan:
        first_at = self._first_at
        zeros = [_is_zeros(ref, self._size) for ref in refs]
        local = find_local_chunks(
            self._db,
            (
                ref.hash
                for ref, z in zip(refs, zeros, strict=True)
                if not z and ref.hash not in first_at
            ),
        )
        plan = _WindowPlan(refs, [], local, {}, [])
        kinds, batches = plan.kinds, plan.batches
        batch: list[ChunkRef] = []
        batch_bytes = 0
        for i, ref in enumerate(refs):
            if zeros[i]:
                kinds.append(_ZERO)
                continue
            first = first_at.get(ref.hash)
            if first is not None:
                kinds.append(_COPY)
                plan.copy_from[i] = first
                continue
            if len(first_at) < FIRST_SEEN_MAX:
                first_at[ref.hash] = ref.offset
            if ref.hash in local:
                kinds.append(_LOCAL)
                continue
            kinds.append(_PEER)
            if batch and (
                len(batch) >= BATCH_MAX_REFS or batch_bytes + ref.length > BATCH_MAX_BYTES
            ):
                batches.append(batch)
                batch, batch_bytes = [], 0
            batch.append(ref)
            batch_bytes += ref.length
        if batch:
            batches.append(batch)
        return plan


class _ChunkListSpool:
    """A pull's chunk list as packed wire records (28 bytes a chunk): in memory up to
    SPOOL_MEMORY_BYTES, then in an anonymous temporary file. Read back in windows."""

    def __init__(self) -> None:
        self._memory = bytearray()
        self._file: Any = None
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def extend(self, refs: Sequence[ChunkRef]) -> None:
        packed = ChunkRefs.of(refs).packed
        self._count += len(refs)
        if self._file is None and len(self._memory) + len(packed) <= SPOOL_MEMORY_BYTES:
            self._memory += packed
            return
        if self._file is None:
            self._file = tempfile.TemporaryFile()  # noqa: SIM115 (closed by close())
            self._file.write(self._memory)
            self._memory = bytearray()
        self._file.write(packed)

    def windows(self, count: int) -> Iterator[ChunkRefs]:
        """The refs in order, `count` at a time (positional reads: iterations are independent)."""
        size = CHUNK_REF_SIZE
        end = self._count * size
        if self._file is not None:
            self._file.flush()
        for start in range(0, end, count * size):
            length = min(count * size, end - start)
            if self._file is None:
                yield ChunkRefs(self._memory[start : start + length])
            else:
                data = os.pread(self._file.fileno(), length, start)
                if len(data) != length:
                    raise TransferFailed(IO_ERROR, "the chunk list's temporary file is short")
                yield ChunkRefs(data)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._memory = bytearray()


def _local_run(
    refs: Sequence[ChunkRef], kinds: Sequence[str], fetched: dict[int, Any], start: int
) -> list[ChunkRef]:
    """The chunks from `start` on that are read here (not fetched for a failed source), up
    to LOCAL_RUN_BYTES (at least one)."""
    run = [refs[start]]
    size = refs[start].length
    for i in range(start + 1, len(refs)):
        ref = refs[i]
        if kinds[i] is not _LOCAL or ref.offset in fetched or size + ref.length > LOCAL_RUN_BYTES:
            break
        run.append(ref)
        size += ref.length
    return run


def _refetch_run(
    refs: Sequence[ChunkRef],
    kinds: Sequence[str],
    local: dict[bytes, LocalChunk],
    start: int,
    pull: _Pull,
) -> list[ChunkRef]:
    """The chunk at `start`, whose local source failed, and the chunks right after it whose
    sources are distrusted too: fetched with one request instead of one each."""
    run = [refs[start]]
    size = refs[start].length
    for i in range(start + 1, len(refs)):
        ref = refs[i]
        if kinds[i] is not _LOCAL or not pull.is_distrusted(local[ref.hash]):
            break
        if len(run) >= BATCH_MAX_REFS or size + ref.length > BATCH_MAX_BYTES:
            break
        run.append(ref)
        size += ref.length
    return run


def _is_as_expected(now: os.stat_result | None, expected: KnownStat | None) -> bool:
    if expected is None or now is None:
        return expected is None and now is None
    seen = expected.stat
    return (
        stat_mod.S_ISREG(now.st_mode)
        and now.st_size == seen.size
        and now.st_mtime_ns == seen.mtime_ns
        and now.st_ino == seen.inode
    )


class _Fetcher:
    """The GetChunks of one pull: REQUESTS_IN_FLIGHT batches ahead of the writer."""

    def __init__(self, pull: _Pull, about: tuple[str, str, bytes]) -> None:
        self._pull = pull
        self._about = about
        self._batches: deque[list[ChunkRef]] = deque()  # planned, not yet asked for
        self._tasks: deque[asyncio.Task[dict[int, bytes | memoryview]]] = deque()

    def add(self, batches: list[list[ChunkRef]]) -> None:
        """Queue the next batches of the file, in file order."""
        self._batches.extend(batches)
        self._start()

    def _start(self) -> None:
        while len(self._tasks) < REQUESTS_IN_FLIGHT and self._batches:
            self._tasks.append(asyncio.create_task(self.fetch(self._batches.popleft())))

    async def take(self) -> dict[int, bytes | memoryview]:
        """The data of the next batch (offset -> verified bytes); starts the ones after it."""
        self._start()
        return await self._tasks.popleft()

    async def fetch(self, refs: list[ChunkRef]) -> dict[int, bytes | memoryview]:
        """Ask for `refs`; every ChunkData is checked against the ref asked at its offset."""
        storage, path, file_hash = self._about
        wanted = {ref.offset: ref for ref in refs}
        got: dict[int, bytes | memoryview] = {}
        request = GetChunks(storage, path, file_hash, tuple(refs), request_id=_REQUEST_ID)
        async with _replies(self._pull.link, request) as replies:
            async for reply in replies:
                if isinstance(reply, ChunksDone):
                    break
                if not isinstance(reply, ChunkData):
                    raise TransferFailed(CORRUPT, f"GetChunks answered by {type(reply).__name__}")
                ref = wanted.get(reply.offset)
                if ref is None or reply.offset in got:
                    raise TransferFailed(
                        CORRUPT, f"the peer sent a chunk at offset {reply.offset} not asked for"
                    )
                data = reply.data
                self._pull.bytes_from_peer += len(data)
                lead = reply.leading_zeros
                trail = ref.length - lead - len(data)
                if trail >= 0 and (lead or trail):  # sent without the zeros at its ends
                    data = b"".join((bytes(lead), data, bytes(trail)))
                if (
                    reply.hash != ref.hash
                    or trail < 0
                    or len(data) != ref.length
                    or (content_hash(data) != ref.hash)
                ):
                    raise TransferFailed(
                        CORRUPT, f"the peer sent wrong bytes for the chunk at offset {ref.offset}"
                    )
                got[ref.offset] = data
        if len(got) != len(wanted):
            raise TransferFailed(
                CORRUPT, f"the peer sent {len(got)} of the {len(wanted)} chunks asked for"
            )
        return got

    async def close(self) -> None:
        tasks = list(self._tasks)
        self._tasks.clear()
        self._batches.clear()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


@asynccontextmanager
async def _replies(link: PeerLink, request: Request) -> AsyncIterator[AsyncIterator[Reply]]:
    """`link.stream(request)`, closed on exit even when the consumer stops early."""
    stream = link.stream(request)
    try:
        yield stream
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()


# --- crash leftovers ---------------------------------------------------------------------------


def remove_stale_temp_files(root: Path) -> list[str]:
    """Delete the `.ironsync-*.tmp` files a crash left anywhere under `root` (symlinks are not
    followed); return their paths relative to the root. Call before any pull starts."""
    removed: list[str] = []
    for folder, _dirs, names in os.walk(root):
        for name in names:
            if not is_temp_name(name):
                continue
            full = os.path.join(folder, name)
            try:
                if not stat_mod.S_ISREG(os.lstat(full).st_mode):
                    continue
                os.unlink(full)
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("could not remove stale temporary file %s: %s", full, exc)
                continue
            removed.append(Path(os.path.relpath(full, root)).as_posix())
    return sorted(removed)
