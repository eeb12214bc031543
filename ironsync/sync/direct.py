"""Writing a pulled file's content around the page cache (O_DIRECT), where the disk allows it.

A pulled file is written once, flushed before it is renamed into place, and not read again by
this node. Written through the page cache, each of its pages costs a copy into a newly
allocated cache page, and the flush then waits for the writeback of those pages. Written with
O_DIRECT, the bytes go from one reused buffer of ours to the disk: no cache page is allocated,
and the flush finds only metadata left to write. On this project's 2-core VM (issue 13,
`bin/bench` (a): 1,000 files of 1 MiB, alternating runs) the receiver's system CPU went from
~4.0 s to ~1.5 s and its pulls from 5.0-6.2 s to 4.0-4.7 s; a VM that hands idle memory back to
its host charges for every newly touched page, which the cache copy is.

O_DIRECT asks for aligned buffers, offsets and lengths: the bytes are copied into a
page-aligned buffer (one per thread, PIECE_BYTES) and written a piece at a time, every piece a
multiple of BLOCK bytes at an offset that is one too; the rest of the file (its last partial
block) is written through the cache as before. Small files (under DIRECT_MIN_BYTES) go through
the cache whole: for them the cost is the system call, not the copy.

Where the file system refuses O_DIRECT (EINVAL when it is turned on, or when a write is made:
some FUSE file systems, a disk whose blocks are larger than BLOCK), the rest is written through
the cache: the content is the same either way, and so are the safety rules around it (the
caller flushes the file before it renames it, whichever way it was written).
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import threading

from ironsync.sync.crashpoints import crash_point

KiB = 1024
MiB = 1024 * KiB

BLOCK = 4 * KiB
"""Alignment of O_DIRECT buffers, offsets and lengths: the page, and a multiple of every
common disk's logical block (512 or 4096 bytes)."""
PIECE_BYTES = 1 * MiB
"""Bytes one O_DIRECT write carries at most: the size of each thread's aligned buffer."""
DIRECT_MIN_BYTES = 64 * KiB
"""Files smaller than this are written through the page cache."""

_buffers = threading.local()


def write_new_file(fd: int, data: bytes | bytearray | memoryview, *, block: int = BLOCK) -> None:
    """Write `data` at offset 0 of the new, empty file `fd` (opened for writing): its whole
    blocks with O_DIRECT where the file system takes it, the rest through the page cache.
    `fd`'s flags are as they were when this returns or raises. `block` is BLOCK but in tests
    (an alignment the kernel refuses shows the fallback)."""
    view = memoryview(data).cast("B")
    aligned = len(view) // block * block if len(view) >= DIRECT_MIN_BYTES else 0
    done = 0
    if aligned:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
        else:
            try:
                done = _write_aligned(fd, view[:aligned])
            finally:
                fcntl.fcntl(fd, fcntl.F_SETFL, flags)
    pwrite_all(fd, view[done:], done)


def _write_aligned(fd: int, view: memoryview) -> int:
    """Write `view` (whole blocks) at offset 0 of `fd`, which has O_DIRECT on,
    a piece at a time through this thread's aligned buffer; the bytes written, fewer than
    asked when the file system refused an O_DIRECT write (EINVAL) or wrote short."""
    buffer = _buffer()
    done = 0
    while done < len(view):
        size = min(PIECE_BYTES, len(view) - done)
        piece = memoryview(buffer)[:size]
        try:
            piece[:] = view[done : done + size]
            try:
                written = os.pwritev(fd, [piece], done)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                return done  # not here: the rest goes through the cache
        finally:
            piece.release()
        crash_point("mid_chunk")
        done += written
        if written != size:  # short (a full disk, a signal): the cache path goes on or fails
            return done
    return done


def _buffer() -> mmap.mmap:
    """This thread's page-aligned buffer of PIECE_BYTES (anonymous memory, made once)."""
    buffer = getattr(_buffers, "buffer", None)
    if buffer is None:
        buffer = _buffers.buffer = mmap.mmap(-1, PIECE_BYTES)
    return buffer


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of `data` at `offset` of `fd` through the page cache (a short write, rare on
    regular files, is followed by another)."""
    while len(data):
        written = os.pwrite(fd, data, offset)
        crash_point("mid_chunk")
        offset += written
        data = data[written:]
