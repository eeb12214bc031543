"""sync.direct: a pulled file's whole blocks are written around the page cache (O_DIRECT) where
the file system takes it, the rest through the cache; the content is the same either way."""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import random
from pathlib import Path

import pytest

from ironsync.sync.direct import (
    BLOCK,
    DIRECT_MIN_BYTES,
    PIECE_BYTES,
    DirectWriter,
    write_new_file,
)

KiB = 1024

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long
]  # fmt: skip
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
_MAP_FAILED = ctypes.c_void_p(-1).value


def cached_pages(path: Path) -> list[bool]:
    """Which pages of the file at `path` are in the page cache: mincore on a mapping of it
    (mapping a file reads none of it)."""
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        address = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if address in (None, _MAP_FAILED):
            raise OSError(ctypes.get_errno(), "mmap")
    finally:
        os.close(fd)
    try:
        vector = ctypes.create_string_buffer((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE)
        if _libc.mincore(address, size, vector) != 0:
            raise OSError(ctypes.get_errno(), "mincore")
        return [bool(byte & 1) for byte in vector.raw]
    finally:
        _libc.munmap(address, size)


def fs_type(path: Path) -> str:
    """The type of the file system holding `path` (/proc/self/mounts: the longest mount
    point above it)."""
    best, kind = "", ""
    target = os.path.realpath(path)
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            point = fields[1].replace("\\040", " ")
            inside = target == point or target.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best):
                best, kind = point, fields[2]
    return kind


def write(path: Path, data: bytes, **kwargs: int) -> None:
    """write_new_file into a new file at `path`; its flags must be as before afterwards."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        write_new_file(fd, data, **kwargs)
        assert fcntl.fcntl(fd, fcntl.F_GETFL) == flags
    finally:
        os.close(fd)


SIZES = [
    1,
    BLOCK - 1,
    DIRECT_MIN_BYTES - 1,  # the last size written through the cache
    DIRECT_MIN_BYTES,
    DIRECT_MIN_BYTES + 1,
    PIECE_BYTES,
    PIECE_BYTES + 123,
    3 * PIECE_BYTES + BLOCK + 1,  # several pieces, then a partial block
]


@pytest.mark.parametrize("size", SIZES)
def test_the_file_holds_the_bytes_given(tmp_path: Path, size: int) -> None:
    data = random.Random(size).randbytes(size)
    write(tmp_path / "f", data)
    assert (tmp_path / "f").read_bytes() == data


def test_a_view_of_a_larger_buffer_is_written_as_it_is(tmp_path: Path) -> None:
    """What pulls give: a slice of the frame the bytes arrived in, at any address."""
    frame = bytearray(random.Random(7).randbytes(PIECE_BYTES + 3 * BLOCK))
    data = memoryview(frame)[13 : 13 + PIECE_BYTES + 77]
    write(tmp_path / "f", data)
    assert (tmp_path / "f").read_bytes() == bytes(data)
    assert frame == bytearray(random.Random(7).randbytes(PIECE_BYTES + 3 * BLOCK))


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    """tmp_path, where it is on a disk's file system (on tmpfs every page is a cached page)."""
    kind = fs_type(tmp_path)
    if kind not in ("ext4", "xfs", "btrfs", "ext3", "f2fs"):
        pytest.skip(f"the temp folder is on {kind}, not a disk's file system")
    return tmp_path


def test_whole_blocks_bypass_the_page_cache(disk: Path) -> None:
    size = 2 * PIECE_BYTES + 100
    write(disk / "f", random.Random(1).randbytes(size))
    pages = cached_pages(disk / "f")
    whole = size // BLOCK * BLOCK // mmap.PAGESIZE
    assert not any(pages[:whole])  # written with O_DIRECT
    assert pages[-1]  # the partial block at the end, through the cache


def test_small_files_go_through_the_page_cache(disk: Path) -> None:
    write(disk / "f", random.Random(2).randbytes(DIRECT_MIN_BYTES - 1))
    assert all(cached_pages(disk / "f"))


def test_a_refused_direct_write_falls_back_to_the_cache(disk: Path) -> None:
    """An alignment the kernel refuses (EINVAL, as a file system without O_DIRECT or with
    larger blocks answers): the file is written through the cache, whole and right."""
    data = random.Random(3).randbytes(PIECE_BYTES + 5)
    write(disk / "f", data, block=100)
    assert (disk / "f").read_bytes() == data
    assert all(cached_pages(disk / "f"))


# --- DirectWriter: the pieces of a file pulled chunk by chunk ----------------------------------


def random_pieces(rng: random.Random, total: int) -> list[tuple[int, bytes]]:
    """Pieces in file order, of random sizes, with random gaps (short ones within a block,
    long ones of many blocks, none): what a pull's write buffer holds, holes left out."""
    pieces: list[tuple[int, bytes]] = []
    at = rng.randrange(0, 3 * BLOCK)
    while at < total:
        size = rng.choice([1, 7, BLOCK - 1, BLOCK, BLOCK + 3, 5000, 20_000, 70_000])
        pieces.append((at, rng.randbytes(size)))
        at += size + rng.choice([0, 0, 0, 1, 100, BLOCK - 5, BLOCK, 2 * BLOCK + 9, 40 * BLOCK])
    return pieces


def expected_bytes(pieces: list[tuple[int, bytes]], size: int) -> bytes:
    content = bytearray(size)
    for at, data in pieces:
        content[at : at + len(data)] = data
    return bytes(content)


@pytest.mark.parametrize("seed", range(12))
def test_pieces_with_gaps_are_written_as_given(tmp_path: Path, seed: int) -> None:
    """Whatever the sizes, gaps and staging buffer size, the file reads as the pieces with
    zeros between them, each time it is settled in between and at the end."""
    rng = random.Random(seed)
    pieces = random_pieces(rng, rng.choice([10 * KiB, 300 * KiB, 3 * PIECE_BYTES]))
    capacity = rng.choice([BLOCK, 3 * BLOCK, 64 * KiB, PIECE_BYTES])
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    writer = DirectWriter(fd, capacity=capacity)
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        i = 0
        while i < len(pieces):
            take = rng.randrange(1, 6)
            writer.write([(at, memoryview(data)) for at, data in pieces[i : i + take]])
            i = min(i + take, len(pieces))
            if rng.random() < 0.3:  # a repeated chunk is read back from the temp file
                writer.settle()
                end = pieces[i - 1][0] + len(pieces[i - 1][1])
                assert os.pread(fd, end, 0) == expected_bytes(pieces[:i], end)
        writer.settle()
        size = pieces[-1][0] + len(pieces[-1][1]) + rng.choice([0, 5 * BLOCK])  # a hole at the end
        os.ftruncate(fd, size)
        assert fcntl.fcntl(fd, fcntl.F_GETFL) == flags
        assert writer.direct or fs_type(tmp_path) not in ("ext4", "xfs")
    finally:
        writer.close()
        os.close(fd)
    assert path.read_bytes() == expected_bytes(pieces, size)


def test_holes_of_whole_blocks_stay_holes(disk: Path) -> None:
    """A gap of many blocks between pieces is not written: the file stays sparse."""
    gap = 256 * BLOCK  # 1 MiB
    pieces = [(0, b"a" * (BLOCK + 10)), (BLOCK + 10 + gap, b"b" * (3 * BLOCK))]
    path = disk / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    writer = DirectWriter(fd)
    try:
        writer.write([(at, memoryview(data)) for at, data in pieces])
        writer.settle()
    finally:
        writer.close()
        os.close(fd)
    size = pieces[-1][0] + len(pieces[-1][1])
    assert path.read_bytes() == expected_bytes(pieces, size)
    assert path.stat().st_blocks * 512 <= 8 * BLOCK  # the data's blocks, not the gap's


def test_the_writer_bypasses_the_cache_and_falls_back_when_refused(disk: Path) -> None:
    data = random.Random(5).randbytes(2 * PIECE_BYTES + 10)
    for name, block, cached in (("direct", BLOCK, False), ("refused", 100, True)):
        path = disk / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        writer = DirectWriter(fd, block=block)
        try:
            writer.write([(0, memoryview(data))])
            writer.settle()
            assert writer.direct is not cached
        finally:
            writer.close()
            os.close(fd)
        assert any(cached_pages(path)[:-1]) is cached
        assert path.read_bytes() == data


def test_a_piece_before_the_end_is_refused(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    writer = DirectWriter(fd)
    try:
        writer.write([(0, memoryview(b"x" * 100))])
        with pytest.raises(ValueError, match="overlaps"):
            writer.write([(50, memoryview(b"y"))])
    finally:
        writer.close()
        os.close(fd)
