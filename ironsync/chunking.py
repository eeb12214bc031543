"""Content-defined chunking and hashing of file contents (pure: bytes in, hashes out).

Chunk boundaries come from FastCDC 2020 (pyfastcdc, Cython): a cut depends only on the bytes
just before it, so inserting or deleting bytes at the start of a file moves at most the first
one or two boundaries and every later chunk keeps its hash. The receiver of a file asks only
for chunks whose hashes it cannot find locally, which is what makes shifted files cheap — the
fault iron-carrier's fixed-offset chunks had.

Boundaries are a contract between peers: changing any constant here changes every chunk hash,
and `tests/test_chunking.py` pins the cut points of a seeded input so that cannot pass
unnoticed.

Sizes. MIN_CHUNK = 8 KiB, AVG_CHUNK = 16 KiB, MAX_CHUNK = 128 KiB. FastCDC skips MIN_CHUNK
bytes before it looks for a cut, so the mean chunk is about MIN + AVG = 24 KiB. Small chunks
keep the bytes sent for an in-place edit near the size of the edit (the edit plus about one
chunk either side: ~5% over for a 1 MiB edit), while a 1 GiB file still has only ~44k chunks —
a chunk list of ~1.4 MB and an index that SQLite looks up in milliseconds. A file smaller than
MIN_CHUNK is one chunk.

Normalized chunking is off (NC level 0). With it on, whether a position is a cut depends on its
distance from the chunk start, so a shift re-synchronizes later: measured over 1,200 seeded
files with 1-100 byte edits at the start, more than two leading chunks changed in 0 cases with
NC 0, 2 with NC 1 and 1 with NC 2; with 1-5,000 byte edits, 5 / 38 / 108 cases. The cost is a
wider spread of chunk sizes, which matters little here.

Zeros (issue 11: sparse files stay sparse). FastCDC finds no cut in a chunk that begins with
zero bytes until they end: its rolling hash, reset at each chunk's start, never matches the
mask over zeros (a property of the gear table, pinned by tests/test_chunking.py). A cut depends
only on the MAX_CHUNK bytes after the chunk's start, so a chunk that starts where at least
MAX_CHUNK zero bytes follow is exactly MAX_CHUNK zero bytes (or the rest of the file, when only
zeros follow), whatever came before. `hash_and_chunk_sparse` uses this to pass over
a file's holes without reading or cutting them, and gives the chunks a file of the same bytes
written out would have: peers agree on chunk lists whether zeros are holes or not. A receiver
tells an all-zero chunk by its hash (`is_zero_chunk`) and makes it a hole instead of asking
for it.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import xxhash

if TYPE_CHECKING:
    from pyfastcdc import FastCDC

KiB = 1024
MiB = 1024 * KiB

MIN_CHUNK = 8 * KiB
AVG_CHUNK = 16 * KiB
MAX_CHUNK = 128 * KiB
NORMALIZATION = 0  # FastCDC's NC level: 0 resynchronizes soonest after a shift (see above)
GEAR_SEED = 0  # the gear table of the paper's reference implementation

HASH_SIZE = 16  # bytes of an xxh3-128 digest

SPARSE_WINDOW_BYTES = 4 * MiB
"""Bytes `hash_and_chunk_sparse` reads and cuts at once (a file's data between its holes)."""


class Readable(Protocol):
    def readinto(self, buffer: memoryview, /) -> int | None: ...


class ChunkSink(Protocol):
    """Where `hash_and_chunk` can put the chunks of a big file instead of a tuple (a spool):
    appended to while reading, then read back as a sequence."""

    def append(self, chunk: ChunkInfo, /) -> None: ...
    def __len__(self) -> int: ...
    def __getitem__(self, index: int, /) -> ChunkInfo: ...
    def __iter__(self) -> Iterator[ChunkInfo]: ...


@dataclass(frozen=True, slots=True)
class ChunkInfo:
    """One chunk of a file: where it is and the xxh3-128 of its bytes."""

    offset: int
    length: int
    hash: bytes


@dataclass(frozen=True, slots=True)
class Content:
    """The whole-file hash, the byte count read and the chunks that cover them exactly.

    `chunks` is a tuple, except for a big file read by the scanner: a spool on disk, so memory
    stays flat in the file size."""

    hash: bytes
    size: int
    chunks: Sequence[ChunkInfo]


def new_chunker() -> FastCDC:
    """A chunker with ironsync's fixed parameters (every peer must use the same)."""
    from pyfastcdc import FastCDC  # here, not at the top: `ironsync --version` never needs it

    return FastCDC(
        AVG_CHUNK,
        min_size=MIN_CHUNK,
        max_size=MAX_CHUNK,
        normalized_chunking=NORMALIZATION,
        seed=GEAR_SEED,
    )


def content_hash(data: bytes | bytearray | memoryview) -> bytes:
    """The xxh3-128 digest ironsync uses for files and chunks."""
    return xxhash.xxh3_128_digest(data)


def hash_and_chunk(
    stream: Readable,
    chunker: FastCDC | None = None,
    on_bytes: Callable[[int], None] | None = None,
    sink: ChunkSink | None = None,
) -> Content:
    """Read `stream` to its end once: whole-file hash, size and content-defined chunks.
    (The scanner reads files with `hash_and_chunk_sparse`, which gives the same.)

    Memory stays flat in the file size (pyfastcdc keeps a buffer of 2 x MAX_CHUNK) except for
    the chunk list; given a `sink` (a Sequence too), the chunks go there and it is the
    content's `chunks`. `on_bytes(n)` is called after each chunk, for progress reporting.
    """
    cutter = chunker or new_chunker()
    whole = xxhash.xxh3_128()
    chunks: list[ChunkInfo] = []
    append = chunks.append if sink is None else sink.append
    chunk_digest = xxhash.xxh3_128_digest
    size = 0
    for chunk in cutter.cut_stream(stream):
        data = chunk.data
        whole.update(data)
        append(ChunkInfo(chunk.offset, chunk.length, chunk_digest(data)))
        size += chunk.length
        if on_bytes is not None:
            on_bytes(chunk.length)
    return Content(whole.digest(), size, tuple(chunks) if sink is None else sink)


@functools.cache
def zero_bytes() -> memoryview:
    """MAX_CHUNK zero bytes, read-only, made once: zeros fed to hashes and written as holes."""
    return memoryview(bytes(MAX_CHUNK))


@functools.lru_cache(maxsize=64)
def zero_chunk_hash(length: int) -> bytes:
    """The hash of a chunk of `length` zero bytes."""
    hasher = xxhash.xxh3_128()
    zeros = zero_bytes()
    while length > 0:
        hasher.update(zeros[: min(length, MAX_CHUNK)])
        length -= MAX_CHUNK
    return hasher.digest()


def is_zero_chunk(length: int, digest: bytes, *, at_end: bool = False) -> bool:
    """Whether a chunk of `length` bytes with hash `digest` holds only zeros, for the zero
    chunks the chunker makes in numbers: MAX_CHUNK long (the chunks of a run of zeros), or
    of any length up to MAX_CHUNK `at_end` of the file (a file that ends in zeros). A zero
    chunk cut short by the byte after it (rare) is not told: it costs a hash of zeros per
    call to look for one of every length, and it is no worse off as ordinary data."""
    if length == MAX_CHUNK:
        return digest == zero_chunk_hash(MAX_CHUNK)
    return at_end and 0 < length < MAX_CHUNK and digest == zero_chunk_hash(length)


def chunk_bytes(data: bytes | bytearray | memoryview, chunker: FastCDC | None = None) -> Content:
    """`hash_and_chunk` for data already in memory (small files, tests, payloads)."""
    whole = content_hash(data)
    size = len(data)
    if size <= MIN_CHUNK:
        # FastCDC never cuts within MIN_CHUNK bytes: the data is one chunk (none when empty),
        # and that chunk's hash is the whole hash. Skipping the cutter halves the cost.
        return Content(whole, size, (ChunkInfo(0, size, whole),) if size else ())
    cutter = chunker or new_chunker()
    chunks = tuple(
        ChunkInfo(c.offset, c.length, content_hash(c.data)) for c in cutter.cut_buf(data)
    )
    return Content(whole, size, chunks)


ReadAt = Callable[[memoryview, int], int]
"""Reads the file's bytes at an offset into a buffer and says how many it read (os.preadv
with one buffer): fewer than asked only at the end of the file."""


def hash_and_chunk_sparse(
    read_at: ReadAt,
    size: int,
    holes: Iterable[tuple[int, int]],
    chunker: FastCDC | None = None,
    on_bytes: Callable[[int], None] | None = None,
    sink: ChunkSink | None = None,
) -> Content:
    """`hash_and_chunk` for a file of `size` bytes whose `holes` are known: the same hash and
    chunks, without reading the holes or cutting them byte by byte.

    `holes` are [start, end) ranges that read as zeros, in order, not overlapping (what
    SEEK_HOLE / SEEK_DATA find; a hole may be missed, never invented). A chunk wholly inside a
    hole is MAX_CHUNK zero bytes or the rest of the file (module docstring); everything else is
    read with `read_at` (the parts of holes a window covers are zeros from memory) and cut in
    windows of SPARSE_WINDOW_BYTES. If the file ends before `size` (a short read), the content
    returned is shorter than `size`: the caller reads the file again.
    """
    cutter = chunker or new_chunker()
    whole = xxhash.xxh3_128()
    chunks: list[ChunkInfo] = []
    append = chunks.append if sink is None else sink.append
    chunk_digest = xxhash.xxh3_128_digest
    zeros = zero_bytes()
    ahead = _Holes(holes, size)
    window = memoryview(bytearray(SPARSE_WINDOW_BYTES + MAX_CHUNK))
    pos = 0
    while pos < size:
        zeros_end = ahead.zeros_end(pos)
        if zeros_end == size or zeros_end - pos >= MAX_CHUNK:
            # chunks wholly in the hole: MAX_CHUNK zero bytes each, or the rest of the file
            end = size if zeros_end == size else pos + (zeros_end - pos) // MAX_CHUNK * MAX_CHUNK
            while pos < end:
                length = min(MAX_CHUNK, end - pos)
                whole.update(zeros[:length])
                append(ChunkInfo(pos, length, zero_chunk_hash(length)))
                pos += length
                if on_bytes is not None:
                    on_bytes(length)
            continue
        # Read up to MAX_CHUNK into the next hole that holds a whole chunk: the chunk that ends
        # in it is cut from true bytes, and the one after starts where that hole is skipped.
        stop = min(size, pos + SPARSE_WINDOW_BYTES, ahead.next_skippable(pos) + MAX_CHUNK)
        if not ahead.fill(window[: stop - pos], pos, read_at, zeros):
            return Content(whole.digest(), pos, tuple(chunks) if sink is None else sink)
        reached = pos
        for chunk in cutter.cut_buf(window[: stop - pos]):
            start = pos + chunk.offset
            if start + MAX_CHUNK > stop and stop != size:
                break  # its cut may lie past the window: cut it again in the next one
            data = chunk.data
            whole.update(data)
            append(ChunkInfo(start, chunk.length, chunk_digest(data)))
            if on_bytes is not None:
                on_bytes(chunk.length)
            reached = start + chunk.length
            if ahead.is_skippable(reached):
                break
        pos = reached
    return Content(whole.digest(), size, tuple(chunks) if sink is None else sink)


class _Holes:
    """The holes of a file ahead of a position that only moves forward, pulled from their
    iterator as far as they are needed."""

    def __init__(self, holes: Iterable[tuple[int, int]], size: int) -> None:
        self._source = iter(holes)
        self._size = size
        self._ahead: deque[tuple[int, int]] = deque()
        self._exhausted = False

    def _pull(self, limit: int) -> None:
        """Have every hole that starts before `limit`."""
        ahead = self._ahead
        while not self._exhausted and (not ahead or ahead[-1][0] < limit):
            hole = next(self._source, None)
            if hole is None:
                self._exhausted = True
                return
            start, end = hole[0], min(hole[1], self._size)
            if start < end:
                ahead.append((start, end))

    def zeros_end(self, pos: int) -> int:
        """The end of the hole that holds `pos`; `pos` itself when none does."""
        ahead = self._ahead
        self._pull(pos + 1)
        while ahead and ahead[0][1] <= pos:
            ahead.popleft()
        if ahead and ahead[0][0] <= pos:
            return ahead[0][1]
        return pos

    def is_skippable(self, pos: int) -> bool:
        """Whether the chunk that starts at `pos` lies wholly in a hole."""
        end = self.zeros_end(pos)
        return end > pos and (end == self._size or end - pos >= MAX_CHUNK)

    def next_skippable(self, pos: int) -> int:
        """The first position after `pos` where a chunk would lie wholly in a hole (the size
        of the file if there is none)."""
        size = self._size
        limit = pos + SPARSE_WINDOW_BYTES
        self._pull(limit)
        for start, end in self._ahead:
            if start >= limit:
                break
            start = max(start, pos + 1)
            if start < end and (end == size or end - start >= MAX_CHUNK):
                return start
        return size

    def fill(self, window: memoryview, pos: int, read_at: ReadAt, zeros: memoryview) -> bool:
        """Put the file's bytes [pos, pos + len(window)) into `window`: the holes' from
        `zeros`, the rest read. False when the file ended first."""
        end = pos + len(window)
        self._pull(end)
        at = pos
        for start, stop in self._ahead:
            if start >= end:
                break
            if stop <= at:
                continue
            if start > at and not _read_fully(window[at - pos : start - pos], at, read_at):
                return False
            at = max(at, start)
            stop = min(stop, end)
            while at < stop:
                n = min(stop - at, MAX_CHUNK)
                window[at - pos : at - pos + n] = zeros[:n]
                at += n
        return at >= end or _read_fully(window[at - pos :], at, read_at)


def _read_fully(view: memoryview, offset: int, read_at: ReadAt) -> bool:
    while len(view):
        n = read_at(view, offset)
        if n <= 0:
            return False
        view = view[n:]
        offset += n
    return True
