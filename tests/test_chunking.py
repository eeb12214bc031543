"""Chunking: cut points pinned (a contract between peers), exact cover, bounds, shift stability."""

from __future__ import annotations

import io
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from ironsync.chunking import (
    MAX_CHUNK,
    MIN_CHUNK,
    chunk_bytes,
    content_hash,
    hash_and_chunk,
    hash_and_chunk_sparse,
    is_zero_chunk,
    zero_chunk_hash,
)

# Cut points of a seeded 1 MiB input. Changing the chunker's parameters or algorithm changes
# these, and every peer must change in step: this test makes that a deliberate act.
PINNED_SEED = 20261124
PINNED_OFFSETS = [
    0, 36679, 45740, 77885, 91497, 108217, 129169, 142252, 152092, 190747, 212579, 264552,
    279668, 294303, 317621, 326853, 336094, 356948, 368324, 402669, 417691, 448990, 464794,
    486406, 494754, 519637, 549750, 559706, 568605, 603798, 618344, 635474, 650577, 665613,
    708477, 721077, 744392, 762765, 792033, 800618, 816330, 827335, 859138, 899933, 912252,
    971394, 1041569,
]  # fmt: skip
PINNED_FILE_HASH = "9ad627f47c3d389ac19273a7a0335f20"
PINNED_FIRST_CHUNK_HASH = "d48fbb63b6d0026a4686269273b4b009"


def test_cut_points_of_a_seeded_input_are_pinned() -> None:
    data = random.Random(PINNED_SEED).randbytes(1024 * 1024)
    content = chunk_bytes(data)
    assert [c.offset for c in content.chunks] == PINNED_OFFSETS
    assert content.hash.hex() == PINNED_FILE_HASH
    assert content.chunks[0].hash.hex() == PINNED_FIRST_CHUNK_HASH


def assert_exact_cover(data: bytes, content) -> None:
    assert content.size == len(data)
    assert content.hash == content_hash(data)
    position = 0
    for i, chunk in enumerate(content.chunks):
        assert chunk.offset == position
        assert chunk.length <= MAX_CHUNK
        if i < len(content.chunks) - 1:
            assert chunk.length >= MIN_CHUNK
        assert chunk.hash == content_hash(data[chunk.offset : chunk.offset + chunk.length])
        position += chunk.length
    assert position == len(data)


inputs = st.one_of(
    st.binary(max_size=4096),
    st.builds(
        lambda seed, n: random.Random(seed).randbytes(n), st.integers(), st.integers(0, 600_000)
    ),
    st.builds(lambda b, n: bytes([b]) * n, st.integers(0, 255), st.integers(0, 600_000)),
)


@settings(max_examples=60, deadline=None, print_blob=True)
@given(inputs)
def test_chunks_cover_the_input_exactly_within_size_bounds(data: bytes) -> None:
    assert_exact_cover(data, chunk_bytes(data))


class ShortReads(io.RawIOBase):
    """A stream that returns fewer bytes than asked, like a pipe or a slow disk."""

    def __init__(self, data: bytes, rng: random.Random) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._rng = rng

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self._rng.randint(1, 70_000), len(self._data) - self._pos)
        buffer[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n


@settings(max_examples=40, deadline=None, print_blob=True)
@given(st.integers(), st.integers(0, 500_000))
def test_streamed_chunking_matches_in_memory_chunking(seed: int, size: int) -> None:
    rng = random.Random(seed)
    data = rng.randbytes(size)
    seen = []
    streamed = hash_and_chunk(ShortReads(data, rng), on_bytes=seen.append)
    assert streamed == chunk_bytes(data)
    assert sum(seen) == size
    assert_exact_cover(data, streamed)


def leading_chunks_changed(original: bytes, edited: bytes) -> int:
    """How many leading chunks of `edited` differ before its chunks equal `original`'s tail."""
    a = [c.hash for c in chunk_bytes(original).chunks]
    b = [c.hash for c in chunk_bytes(edited).chunks]
    k = 0
    while k < len(b) and b[k:] != a[len(a) - (len(b) - k) :]:
        k += 1
    return k


def test_edit_at_start_changes_at_most_the_first_two_chunks() -> None:
    # Content-defined boundaries re-synchronize right after an edit. Skipping MIN_CHUNK bytes
    # after each cut makes this probabilistic, not absolute (a candidate cut just short of
    # MIN_CHUNK can become real after a shift), so this measures it on 800 seeded edits of
    # 1-1,024 bytes: at most the first two chunks change in at least 99% of them, and every
    # one re-synchronizes within four. Fixed-size chunks would change every chunk.
    changed = []
    for seed in range(400):
        rng = random.Random(seed)
        data = rng.randbytes(rng.randint(60_000, 300_000))
        inserted = rng.randbytes(rng.randint(1, 1024)) + data
        deleted = data[rng.randint(1, 1024) :]
        changed += [leading_chunks_changed(data, inserted), leading_chunks_changed(data, deleted)]
    within_two = sum(1 for k in changed if k <= 2)
    assert within_two >= 0.99 * len(changed), sorted(changed)[-20:]
    assert max(changed) <= 4


@settings(max_examples=30, deadline=None, print_blob=True)
@given(st.integers(), st.integers(1, 64))
def test_edit_at_start_leaves_later_chunks_reusable(seed: int, edit: int) -> None:
    # What a receiver needs: apart from a few leading chunks, every chunk of the edited file
    # is one it already holds.
    rng = random.Random(seed)
    data = rng.randbytes(rng.randint(200_000, 400_000))
    for edited in (rng.randbytes(edit) + data, data[edit:]):
        old = {c.hash for c in chunk_bytes(data).chunks}
        new = chunk_bytes(edited).chunks
        missing = [c for c in new if c.hash not in old]
        assert len(missing) <= 4
        assert sum(c.length for c in missing) <= 4 * MAX_CHUNK


def test_empty_input_has_no_chunks() -> None:
    content = chunk_bytes(b"")
    assert content.chunks == ()
    assert content.size == 0
    assert content.hash == content_hash(b"")


# --- zeros and holes (issue 11: sparse files stay sparse) ----------------------------------------


def test_zeros_are_never_cut_so_a_run_of_them_is_chunks_of_max_size() -> None:
    # What lets a scan pass over a hole without cutting it, and a receiver tell zero chunks
    # by their hash: pinned, since it is a property of the parameters (the gear table's
    # value for the zero byte), not of FastCDC.
    lengths = [c.length for c in chunk_bytes(bytes(3 * MAX_CHUNK + 5)).chunks]
    assert lengths == [MAX_CHUNK, MAX_CHUNK, MAX_CHUNK, 5]
    for size in (MIN_CHUNK + 1, 50_000, MAX_CHUNK - 1, MAX_CHUNK):
        assert [c.length for c in chunk_bytes(bytes(size)).chunks] == [size]
    # whatever precedes them: a chunk that starts where MAX_CHUNK zeros follow is all zeros
    data = random.Random(3).randbytes(70_000) + bytes(5 * MAX_CHUNK) + b"tail"
    chunks = chunk_bytes(data).chunks
    assert [c.length for c in chunks[-4:-1]] == [MAX_CHUNK] * 3
    assert all(c.hash == zero_chunk_hash(MAX_CHUNK) for c in chunks[-4:-1])


def test_zero_chunks_are_told_by_their_hash() -> None:
    assert zero_chunk_hash(MAX_CHUNK) == content_hash(bytes(MAX_CHUNK))
    assert zero_chunk_hash(12_345) == content_hash(bytes(12_345))
    assert is_zero_chunk(MAX_CHUNK, content_hash(bytes(MAX_CHUNK)))
    assert not is_zero_chunk(MAX_CHUNK, content_hash(b"x" * MAX_CHUNK))
    assert not is_zero_chunk(10, content_hash(bytes(11)), at_end=True)
    assert not is_zero_chunk(0, content_hash(b""), at_end=True)  # an empty file is no chunk
    # shorter ones only at the end of a file, where a run of zeros ends in one
    assert is_zero_chunk(12_345, content_hash(bytes(12_345)), at_end=True)
    assert not is_zero_chunk(12_345, content_hash(bytes(12_345)))
    # never more than the chunker cuts: a peer's odd length costs no hashing of megabytes
    assert not is_zero_chunk(MAX_CHUNK + 1, content_hash(bytes(MAX_CHUNK + 1)), at_end=True)


def reader(data: bytes, rng: random.Random | None = None):
    """`read_at` over `data`, with random short reads when given `rng`."""
    whole = memoryview(data)

    def read_at(view: memoryview, offset: int) -> int:
        n = max(0, min(len(view), len(whole) - offset))
        if rng is not None and n:
            n = rng.randint(1, n)
        view[:n] = whole[offset : offset + n]
        return n

    return read_at


def sparse_file(seed: int, size: int) -> tuple[bytes, list[tuple[int, int]]]:
    """Bytes of a file of random data, holes and written zeros, and the holes among them."""
    rng = random.Random(seed)
    data = bytearray(size)
    holes: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        n = min(size - pos, rng.choice([rng.randint(1, 5000), rng.randint(1, 3 * MAX_CHUNK)]))
        kind = rng.choice(["data", "hole", "zeros", "data with a zero tail"])
        if kind == "data":
            data[pos : pos + n] = rng.randbytes(n)
        elif kind == "data with a zero tail":
            data[pos : pos + n // 2] = rng.randbytes(n // 2)
        elif kind == "hole":
            holes.append((pos, pos + n))
        pos += n
    return bytes(data), holes


@settings(max_examples=150, deadline=None, print_blob=True)
@given(st.integers(), st.integers(0, 1_500_000), st.booleans())
def test_holes_and_written_zeros_give_the_same_hash_and_chunks(
    seed: int, size: int, short_reads: bool
) -> None:
    # Two peers must agree on a file's chunks whether its zeros are holes or written out.
    data, holes = sparse_file(seed, size)
    rng = random.Random(seed) if short_reads else None
    expected = chunk_bytes(data)
    assert hash_and_chunk_sparse(reader(data, rng), size, holes) == expected
    assert hash_and_chunk_sparse(reader(data, rng), size, ()) == expected  # holes not known
    seen: list[int] = []
    hash_and_chunk_sparse(reader(data), size, holes, on_bytes=seen.append)
    assert sum(seen) == size


def test_a_gigabyte_of_holes_is_chunked_without_reading_it() -> None:
    size = 1 << 30
    island = random.Random(4).randbytes(4096)
    at = 300 * 1024 * 1024 + 12_345
    asked: list[tuple[int, int]] = []

    def read_at(view: memoryview, offset: int) -> int:
        asked.append((offset, len(view)))
        for i in range(len(view)):
            j = offset + i
            view[i] = island[j - at] if at <= j < at + len(island) else 0
        return len(view)

    content = hash_and_chunk_sparse(read_at, size, [(0, at), (at + 4096, size)])
    assert sum(n for _, n in asked) <= 2 * MAX_CHUNK + 4096
    assert content.size == size and len(content.chunks) <= size // MAX_CHUNK + 2
    data_chunks = [c for c in content.chunks if not is_zero_chunk(c.length, c.hash)]
    assert 1 <= len(data_chunks) <= 2
    assert data_chunks[0].offset <= at < data_chunks[-1].offset + data_chunks[-1].length
    # as the file with its zeros written out would be cut, byte by byte, from a cut point on
    start = data_chunks[0].offset
    written = bytes(at - start) + island + bytes(start + 4 * MAX_CHUNK - at - len(island))
    first = content.chunks.index(data_chunks[0])
    assert [(c.length, c.hash) for c in chunk_bytes(written).chunks[:3]] == [
        (c.length, c.hash) for c in content.chunks[first : first + 3]
    ]


def test_a_file_that_ends_early_gives_fewer_bytes_than_its_size() -> None:
    data, holes = sparse_file(5, 900_000)
    for known in (holes, ()):
        content = hash_and_chunk_sparse(reader(data[:500_000]), 900_000, known)
        assert content.size < 900_000
