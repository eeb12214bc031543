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

A file pulled chunk by chunk is written by a DirectWriter: the verified pieces, in file order
and with gaps where zeros stay holes, are copied into its aligned staging buffer and written a
full buffer at a time. A gap that ends in the block where it began, or in the next, is filled
with zeros (it reads as zeros either way); a longer one ends the staged run at a block boundary,
so holes of whole blocks stay holes. The partial block at the end of the staged bytes waits in
the buffer for the bytes after it; `settle` writes it through the cache when the file must be
read back or is complete (it stays staged, so a later write of its whole block carries it).

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
    blocks with O_DIRECT where the file system takes it, the rest through the page cache; a
    file under DIRECT_MIN_BYTES all through the cache. `fd`'s flags are as they were when
    this returns or raises. `block` is BLOCK but in tests (an alignment the kernel refuses
    shows the fallback)."""
    view = memoryview(data).cast("B")
    if len(view) < DIRECT_MIN_BYTES:
        pwrite_all(fd, view, 0)
        return
    writer = DirectWriter(fd, block=block, staging=_thread_buffer())
    writer.write([(0, view)])
    writer.settle()


def _thread_buffer() -> mmap.mmap:
    """This thread's staging buffer of PIECE_BYTES for `write_new_file` (made once: the
    pool's threads live as long as the daemon)."""
    buffer = getattr(_buffers, "buffer", None)
    if buffer is None:
        buffer = _buffers.buffer = mmap.mmap(-1, PIECE_BYTES)
    return buffer


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of `data` at `offset` of `fd` through the page cache (a short write, rare on
    regular files, is followed by another). No view of `data` outlives the call, even one that
    raises (a staging buffer with views left cannot be closed)."""
    done = 0
    while done < len(data):
        with data[done:] as rest:
            written = os.pwrite(fd, rest, offset + done)
        crash_point("mid_chunk")
        done += written


class DirectWriter:
    """Writes the pieces of one new file, in file order, around the page cache (module
    docstring). Used by one thread at a time; `close` frees its buffer."""

    def __init__(
        self,
        fd: int,
        *,
        block: int = BLOCK,
        capacity: int = PIECE_BYTES,
        staging: mmap.mmap | None = None,
    ) -> None:
        """`staging`: a buffer to use (of at least `capacity` bytes) that `close` leaves
        open; else one is made on first use."""
        self.fd = fd
        self.block = block
        self.capacity = capacity // block * block
        self.direct = True  # until the file system refuses it
        self._staging = staging
        self._own = staging is None
        self._base = 0  # file offset of the staging buffer's first byte (block-aligned)
        self._fill = 0  # bytes staged, from _base
        self._settled = 0  # bytes of the staged partial block already written through the cache

    def write(self, pieces: list[tuple[int, memoryview]]) -> None:
        """Stage the (offset, bytes) `pieces`, which follow what was written before, in order;
        write each full buffer."""
        for offset, data in pieces:
            while len(data):
                if self._fill == 0:
                    self._base = offset - offset % self.block
                    self._zeros(offset - self._base)
                else:
                    end = self._base + self._fill
                    if offset < end:
                        raise ValueError(f"piece at {offset} overlaps what was written (to {end})")
                    if offset > end:
                        after = -(-end // self.block) * self.block  # the block boundary past end
                        if offset - offset % self.block <= after:  # a short gap: zeros
                            self._zeros(offset - end)
                        else:  # a hole of whole blocks: the staged run ends at a boundary
                            self._zeros(after - end)
                            self._write_staged()
                            continue
                size = min(len(data), self.capacity - self._fill)
                staging = self._buffer()
                staging[self._fill : self._fill + size] = data[:size]
                self._fill += size
                offset += size
                data = data[size:]
                if self._fill == self.capacity:
                    self._write_staged()

    def settle(self) -> None:
        """Make every byte given so far readable from the file: the whole blocks staged go out
        (O_DIRECT), the partial block after them through the cache (and stays staged)."""
        self._write_staged()
        if self._fill > self._settled:
            assert self._staging is not None
            with memoryview(self._staging) as staging, staging[self._settled : self._fill] as part:
                pwrite_all(self.fd, part, self._base + self._settled)
            self._settled = self._fill

    def close(self) -> None:
        if self._staging is not None and self._own:
            self._staging.close()
        self._staging = None

    def _zeros(self, count: int) -> None:
        while count:
            size = min(count, self.capacity - self._fill)
            staging = self._buffer()
            staging[self._fill : self._fill + size] = bytes(size)
            self._fill += size
            count -= size
            if self._fill == self.capacity:
                self._write_staged()

    def _buffer(self) -> mmap.mmap:
        if self._staging is None:
            self._staging = mmap.mmap(-1, self.capacity)
        return self._staging

    def _write_staged(self) -> None:
        """Write the whole blocks staged; the partial block after them moves to the buffer's
        start."""
        whole = self._fill - self._fill % self.block
        if not whole:
            return
        assert self._staging is not None
        with memoryview(self._staging) as staging, staging[:whole] as blocks:
            done = self._write_direct(blocks) if self.direct else 0
            if done < whole:
                with blocks[done:] as rest:
                    pwrite_all(self.fd, rest, self._base + done)
        rest = self._fill - whole
        if rest:
            self._staging.move(0, whole, rest)
        self._base += whole
        self._fill = rest
        self._settled = max(0, self._settled - whole)

    def _write_direct(self, view: memoryview) -> int:
        """Write `view` (whole blocks) at _base with O_DIRECT: the bytes written; after a
        refusal (EINVAL) none are, and this writer goes through the cache from then on."""
        flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
        try:
            fcntl.fcntl(self.fd, fcntl.F_SETFL, flags | os.O_DIRECT)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self.direct = False
            return 0
        done = 0
        try:
            while done < len(view):
                try:
                    with view[done:] as rest:
                        written = os.pwritev(self.fd, [rest], self._base + done)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    self.direct = False
                    return done
                crash_point("mid_chunk")
                done += written
                if written % self.block:  # short and unaligned: the cache path goes on
                    return done
        finally:
            fcntl.fcntl(self.fd, fcntl.F_SETFL, flags)
        return done
