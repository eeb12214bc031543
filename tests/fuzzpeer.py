"""A hostile group member that tries hard: a fuzzing client for a real daemon (issue 6).

It holds a valid certificate of the group (so TLS lets it in and every byte it sends reaches
the protocol layer), connects to a daemon over real TLS, and runs one *session* after another,
each a scenario drawn from a seeded RNG:

- bytes that are no protocol: random bytes, truncated frames, oversized length headers, valid
  frames with bytes flipped, a valid frame trickled in one-byte TLS records;
- valid frames out of order: a reply to a request never sent, a duplicate request id, a second
  Hello, a request before the Hello;
- well-formed but malicious requests: GetChunkList/GetChunks/GetFiles for paths outside the
  root (with the hash of a real file, so only the path check stands in the way), absurd
  offsets, lengths and counts, unknown storages; floods of thousands of requests in flight,
  read or not;
- SyncRequest, which makes the daemon pull from us, answered maliciously (`Responder`): index
  entries whose paths escape in every form (also NUL and overlong ones in raw msgpack, past the
  dataclass checks), absurd sizes, chunk lists that do not cover the file or never end, chunk
  data that is wrong, unasked for or missing, whole files (GetFiles) out of order, with the
  wrong content, hash or size, replies of the wrong kind, or no reply at all.

Each session says what the daemon must do (`Expect`): close the connection (after a protocol
error), refuse the peer (a "violation" Error, then close; a `peer_refused` event), or go on
serving. A session whose daemon does otherwise is a finding, with the seed that replays it.

`run_campaign` is the whole experiment: a victim daemon (tests.daemons), a canary folder beside
its root, fuzzing workers, an honest node syncing through the victim at the same time, and a
sampler of the victim's memory. Each worker's first sessions are one of every kind; then
kinds are drawn by weight. tests/test_fuzz_peer.py runs a short one, bound by a number of
sessions; bin/fuzz-peer runs long ones (`--seconds S`) and replays (`--seed S --sessions N`).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import random
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import apsw
import msgpack

from ironsync.net.session import REPLY_TIMEOUT
from ironsync.net.tls import NodeIdentity, client_context, load_or_create_identity
from ironsync.protocol import (
    PROTOCOL_VERSION,
    ChunkRef,
    Error,
    GetChunkList,
    GetChunks,
    GetFiles,
    GetIndex,
    GetStorageHashes,
    Goodbye,
    Hello,
    Message,
    Request,
    SyncRequest,
)
from ironsync.protocol.errors import RemoteProtocolError
from ironsync.protocol.limits import (
    MAX_CHUNK_REFS,
    MAX_CHUNK_SIZE,
    MAX_FILE_DATA,
    MAX_FRAME_SIZE,
    MAX_IN_FLIGHT,
    MAX_INT64,
    MAX_PATH_LEN,
)
from ironsync.protocol.messages import CHUNK_REPEAT_RECORD
from ironsync.protocol.wire import CHUNK_REF, FRAME_HEADER, TYPE_CODES, decode_body, encode_frame
from tests.daemons import SECRET, SyncNode, tree, write

FUZZER_ID = "fuzzer"
HASH_A = b"\x01" * 16
HASH_B = b"\x02" * 16
STORAGE = "docs"
SESSION_SECONDS = 4.0
"""Longest a session lasts before the fuzzer hangs up itself."""
CLOSE_WAIT_SECONDS = 8.0
"""How long the daemon has to hang up after a protocol error or a violation."""

# Type codes, for frames built by hand.
CODE = {cls.__name__: code for cls, code in TYPE_CODES.items()}


class Expect(enum.Enum):
    """What the daemon must do with a session."""

    CLOSE = "close"  # hang up (a protocol error)
    REFUSE = "refuse"  # answer "violation", log peer_refused, hang up
    SERVE = "serve"  # go on serving; the fuzzer says goodbye
    ANY = "any"  # anything but crashing


@dataclass
class Stats:
    sessions: Counter[str] = field(default_factory=Counter)
    frames: int = 0
    bytes: int = 0
    closed_by_daemon: int = 0
    protocol_errors: int = 0  # fatal Errors the daemon sent
    violations: int = 0  # "violation" Errors the daemon sent
    daemon_requests: Counter[str] = field(default_factory=Counter)
    findings: list[str] = field(default_factory=list)

    def add(self, other: Stats) -> None:
        self.sessions.update(other.sessions)
        self.daemon_requests.update(other.daemon_requests)
        for name in ("frames", "bytes", "closed_by_daemon", "protocol_errors", "violations"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.findings += other.findings


# --- frames built by hand ---------------------------------------------------------------------


def raw_frame(code: int, request_id: Any, *fields: Any) -> bytes:
    """A frame of any msgpack array, valid or not: past every dataclass check."""
    body = msgpack.packb([code, request_id, *fields], use_bin_type=True)
    return FRAME_HEADER.pack(len(body)) + body


def frame_of(message: Message) -> bytes:
    return b"".join(bytes(b) for b in encode_frame(message))


def raw_entry(
    path: Any,
    *,
    size: Any = 5,
    mtime_ns: Any = 1_700_000_000_000_000_000,
    mode: Any = 0o100644,
    hash: Any = b"\x07" * 16,
    deleted: Any = False,
    version: Any = '{"fuzzer":1}',
    modified_by: Any = FUZZER_ID,
    sequence: Any = 1,
    kind: Any = "file",
    target: Any = None,
) -> list[Any]:
    return [path, size, mtime_ns, mode, hash, deleted, version, modified_by, sequence, kind, target]


def packed_refs(refs: list[tuple[int, int, bytes]]) -> bytes:
    return b"".join(CHUNK_REF.pack(o, n, h) for o, n, h in refs)


def escaping_paths(canary: Path, rng: random.Random) -> list[str]:
    """Paths that must never be used, in every form that passes the protocol layer."""
    name = f"x{rng.randrange(10**6)}"
    return [
        f"../{name}",
        f"../canary/{name}",
        f"../../{name}",
        f"{canary}/{name}",  # absolute
        "/etc/passwd",
        f"a/../../{name}",
        f"a/../{name}",
        f"./{name}",
        f"a/./{name}",
        f"a//{name}",
        f"{name}/",
        "..",
        ".",
        ".ignore",
        ".ironsync",
        f".ironsync/versions/{name}",
        f".ironsync/{name}",
        f"sub/.ironsync-{name}.tmp",
        f".ironsync-{name}.tmp",
        f"C:/{name}",
        "c:",
    ]


def protocol_invalid_paths(rng: random.Random) -> list[Any]:
    """Paths the protocol layer itself refuses (sent in raw msgpack)."""
    return [
        f"a\x00{rng.randrange(100)}",
        "\x00",
        "",
        "a" * (MAX_PATH_LEN + 1),
        b"bytes-not-str",
        None,
        7,
        ["a"],
    ]


# --- one TLS connection, byte-exact -----------------------------------------------------------


class Wire:
    """A TLS connection on which the fuzzer writes any bytes and reads the daemon's frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.inbox: asyncio.Queue[Message] = asyncio.Queue()
        self.closed = asyncio.Event()
        self.fatal: Error | None = None
        self.errors: list[Error] = []
        self.undecodable: list[str] = []
        self.frames = 0
        self.bytes = 0
        self.on_request: Callable[[Request], None] | None = None
        self._reading = asyncio.get_running_loop().create_task(self._read_loop())

    @classmethod
    async def open(cls, host: str, port: int, context: ssl.SSLContext) -> Wire:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=context, limit=2 * MAX_FRAME_SIZE), 15
        )
        return cls(reader, writer)

    async def _read_loop(self) -> None:
        try:
            while True:
                header = await self.reader.readexactly(4)
                (length,) = FRAME_HEADER.unpack(header)
                body = await self.reader.readexactly(length)
                try:
                    message = decode_body(memoryview(body))
                except RemoteProtocolError as exc:  # the daemon sent garbage: a finding
                    self.undecodable.append(exc.reason)
                    continue
                if isinstance(message, Error):
                    self.errors.append(message)
                    if message.is_fatal:
                        self.fatal = message
                if isinstance(message, Request) and self.on_request is not None:
                    self.on_request(message)
                else:
                    self.inbox.put_nowait(message)
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, OSError):
            pass
        finally:
            self.closed.set()

    def send(self, data: bytes, *, frames: int = 1) -> None:
        if self.writer.is_closing():
            return
        self.writer.write(data)
        self.frames += frames
        self.bytes += len(data)

    async def drain(self, timeout: float = 5.0) -> bool:
        """Wait until the daemon took what we wrote; False if it stopped reading."""
        try:
            await asyncio.wait_for(self.writer.drain(), timeout)
            return True
        except (TimeoutError, ConnectionError, ssl.SSLError, OSError):
            return False

    async def reply(self, timeout: float = 10.0) -> Message | None:
        """The next non-request message from the daemon, or None (closed, or too slow)."""
        getter = asyncio.ensure_future(self.inbox.get())
        closing = asyncio.ensure_future(self.closed.wait())
        try:
            done, _ = await asyncio.wait(
                {getter, closing}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            closing.cancel()
        if getter in done:
            return getter.result()
        getter.cancel()
        if not self.inbox.empty():
            return self.inbox.get_nowait()
        return None

    async def wait_closed(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self.closed.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 5)
        self._reading.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reading


# --- answering the daemon's requests maliciously ----------------------------------------------


class Policy(enum.Enum):
    ESCAPE = "escape"  # an index entry whose path escapes: a violation
    RAW_INVALID = "raw_invalid"  # an entry only raw msgpack can carry: a protocol error
    ABSURD_SIZES = "absurd_sizes"  # huge sizes, chunk lists that never end or lie
    WRONG_DATA = "wrong_data"  # chunks that are not what was asked for
    WRONG_KIND = "wrong_kind"  # a reply of the wrong type or id: a protocol error
    ERRORS = "errors"  # an Error for everything
    SILENT = "silent"  # no reply at all


# Paths of the index entries with valid names: a small pool, so that what the daemon keeps of
# our index (and tries again in later sessions) stays small.
# Odd but legal POSIX names are no attack (issue 11): the daemon must not refuse them, and
# a name too long for its disk is skipped for that path alone.
VALID_NAMES = [f"fuzz/f{n}.bin" for n in range(6)] + [
    "fuzz/ünïcødé ☃.txt", "fuzz/sp ace", "fuzz/a\\..\\..\\x", "fuzz/c:x", "fuzz/a\nb",
    "fuzz/a\x7f\x85\x1b[31m", f"fuzz/{'n' * 256}",
]  # fmt: skip


class Responder:
    """Answers the daemon's requests on one Wire according to one Policy."""

    def __init__(self, wire: Wire, policy: Policy, rng: random.Random, canary: Path) -> None:
        self.wire = wire
        self.policy = policy
        self.rng = rng
        self.canary = canary
        self.requests: Counter[str] = Counter()
        self.tasks: set[asyncio.Task[None]] = set()
        self.sizes: dict[str, int] = {}  # what our index said of each path
        wire.on_request = self.on_request

    def on_request(self, request: Request) -> None:
        self.requests[type(request).__name__] += 1
        task = asyncio.get_running_loop().create_task(self.answer(request))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def answer(self, request: Request) -> None:
        rid = request.request_id
        send = self.wire.send
        policy, rng = self.policy, self.rng
        if policy is Policy.SILENT:
            return
        if policy is Policy.ERRORS:
            send(raw_frame(CODE["Error"], rid, "no", "fuzzer says no"))
            return
        if isinstance(request, GetStorageHashes):
            digest = rng.randbytes(16)
            hashes: dict[Any, Any] = {STORAGE: digest}
            if rng.random() < 0.3:
                hashes["ghost"] = rng.randbytes(16)
            if policy is Policy.WRONG_KIND and rng.random() < 0.5:
                send(raw_frame(CODE["IndexPage"], rid, STORAGE, [], 0, False))
            else:
                send(raw_frame(CODE["StorageHashes"], rid, hashes))
        elif isinstance(request, GetIndex):
            self.index_page(request)
        elif isinstance(request, GetChunkList):
            self.chunk_list(request)
        elif isinstance(request, GetChunks):
            self.chunk_data(request)
        elif isinstance(request, GetFiles):
            self.file_data(request)
        else:
            send(raw_frame(CODE["Error"], rid, "unsupported", type(request).__name__))
        await self.wire.drain(2)

    def entries(self) -> list[list[Any]]:
        rng = self.rng
        names = rng.sample(VALID_NAMES, rng.randint(1, 3))
        entries = [
            raw_entry(
                name,
                size=rng.choice([1, 5, 1000, 70_000, 300_000, 5_000_000, 20_000_000]),
                hash=rng.randbytes(16),
                version=f'{{"fuzzer":{rng.randint(1, 10**6)}}}',
                sequence=rng.randint(1, 10**6),
            )
            for name in names
        ]
        self.sizes.update((entry[0], entry[1]) for entry in entries)
        if self.policy is Policy.ESCAPE:
            entries.insert(
                rng.randrange(len(entries) + 1),
                raw_entry(rng.choice(escaping_paths(self.canary, rng)), hash=rng.randbytes(16)),
            )
        elif self.policy is Policy.RAW_INVALID:
            bad: list[Any] = rng.choice(
                [
                    raw_entry(rng.choice(protocol_invalid_paths(rng))),
                    raw_entry("fuzz/neg", size=-1),
                    raw_entry("fuzz/big", size=2**64 - 1),
                    raw_entry("fuzz/m", mtime_ns=2**63),
                    raw_entry("fuzz/mode", mode=0o200000),
                    raw_entry("fuzz/h", hash=b"short"),
                    raw_entry("fuzz/d", deleted=True),  # a tombstone must have no hash
                    raw_entry("fuzz/v", version=7),
                    raw_entry("fuzz/by", modified_by="no spaces allowed"),
                    raw_entry("fuzz/seq", sequence=-5),
                    raw_entry("fuzz/b", deleted=1),
                    raw_entry("fuzz/k", kind="fifo"),
                    raw_entry("fuzz/t", target="a file has no target"),
                    raw_entry("fuzz/l", kind="symlink", target="bad\x00target"),
                    ["too", "few"],
                    "not an array",
                ]
            )
            entries.insert(rng.randrange(len(entries) + 1), bad)
        elif self.policy is Policy.ABSURD_SIZES:
            for entry in entries:
                entry[1] = rng.choice([2**62, MAX_INT64, 2**40, 0])
                entry[2] = rng.choice([-(2**63), MAX_INT64, 0])
                entry[3] = rng.choice([0o177777, 0o107777, 0])
            if rng.random() < 0.3:
                entries.append(raw_entry("fuzz/bad-version", version='{"a":-1}'))
            if rng.random() < 0.3:
                entries.append(raw_entry("fuzz/bad-version2", version="[1,2]"))
        return entries

    def index_page(self, request: GetIndex) -> None:
        rng, rid = self.rng, request.request_id
        entries = self.entries()
        if self.policy is Policy.WRONG_KIND:
            choice = rng.randrange(4)
            if choice == 0:  # a reply for a request id never used
                self.wire.send(raw_frame(CODE["IndexPage"], rid ^ 0x5A5A, STORAGE, [], 0, False))
            elif choice == 1:  # a chunk where a page belongs
                self.wire.send(raw_frame(CODE["ChunkData"], rid, 0, b"\x00" * 16, 0) + b"junk")
            elif choice == 2:  # the final page twice
                page = raw_frame(CODE["IndexPage"], rid, STORAGE, entries, 9, False)
                self.wire.send(page + page, frames=2)
            else:  # another storage's page
                self.wire.send(raw_frame(CODE["IndexPage"], rid, "ghost", entries, 9, False))
            return
        pages = rng.choice([1, 1, 2, 3])
        for n in range(pages):
            more = n < pages - 1
            last = rng.choice([0, 5, MAX_INT64, rng.randrange(10**6)])
            self.wire.send(raw_frame(CODE["IndexPage"], rid, STORAGE, entries, last, more))

    def chunk_list(self, request: GetChunkList) -> None:
        rng, rid, send = self.rng, request.request_id, self.wire.send
        path, digest = request.path, request.file_hash
        variant = rng.randrange(9)
        size_guess = self.sizes.get(path) or rng.choice([1, 5, 1000, 70_000])
        if self.policy is Policy.WRONG_DATA and path in self.sizes:
            variant = 7  # a chunk list that holds: the daemon goes on to ask for the data
        if self.policy is Policy.ABSURD_SIZES and variant < 4:
            # A chunk list that never ends: the daemon must not keep it all.
            for _ in range(rng.randint(2, 12)):
                refs = [(n * 4096, 4096, rng.randbytes(16)) for n in range(4096)]
                send(raw_frame(CODE["ChunkList"], rid, STORAGE, path, digest,
                               packed_refs(refs), True, b""))  # fmt: skip
            return
        if variant == 0:  # lengths past the file
            refs = [(0, MAX_CHUNK_SIZE, rng.randbytes(16))]
        elif variant == 1:  # 2^62 offsets
            refs = [(2**62, 1, rng.randbytes(16)), (0, size_guess, rng.randbytes(16))]
        elif variant == 2:  # a gap
            refs = [(0, 1, rng.randbytes(16)), (2, size_guess, rng.randbytes(16))]
        elif variant == 3:  # overlapping
            refs = [(0, size_guess, rng.randbytes(16)), (0, size_guess, rng.randbytes(16))]
        elif variant == 4:  # zero-length chunks
            refs = [(0, 0, rng.randbytes(16))] * rng.randint(1, 1000)
        elif variant == 5:  # another file's hash
            wrong = rng.randbytes(16)
            send(raw_frame(CODE["ChunkList"], rid, STORAGE, path, wrong, b"", False, b""))
            return
        elif variant == 8:  # one chunk repeated 2^32 - 1 times: refused before it is spelled out
            refs, repeats = [(0, 4096, rng.randbytes(16))], CHUNK_REPEAT_RECORD.pack(0, 2**32 - 1)
            send(raw_frame(CODE["ChunkList"], rid, STORAGE, path, digest,
                           packed_refs(refs), False, repeats))  # fmt: skip
            return
        elif variant == 6:  # a length only raw msgpack can carry (> MAX_CHUNK_SIZE)
            refs = [(0, MAX_CHUNK_SIZE + 1, rng.randbytes(16))]
        else:  # chunks that cover the announced size; the data will be wrong
            step = rng.choice([size_guess, 8192, 65536])
            refs = [
                (offset, min(step, size_guess - offset), rng.randbytes(16))
                for offset in range(0, size_guess, step)
            ]
        packed = packed_refs(refs)
        send(raw_frame(CODE["ChunkList"], rid, STORAGE, path, digest, packed, False, b""))

    def chunk_data(self, request: GetChunks) -> None:
        rng, rid, send = self.rng, request.request_id, self.wire.send
        for ref in request.chunks:
            variant = rng.randrange(8)
            if variant == 0:  # wrong bytes, right hash
                body = msgpack.packb([CODE["ChunkData"], rid, ref.offset, ref.hash, 0])
                data = rng.randbytes(min(ref.length, 70_000))
                send(FRAME_HEADER.pack(len(body) + len(data)) + body + data)
            elif variant == 1:  # an offset never asked for
                body = msgpack.packb([CODE["ChunkData"], rid, ref.offset + 1, ref.hash, 0])
                send(FRAME_HEADER.pack(len(body) + 3) + body + b"abc")
            elif variant == 2:  # more data than the chunk has
                body = msgpack.packb([CODE["ChunkData"], rid, ref.offset, ref.hash, 0])
                data = b"\x00" * MAX_CHUNK_SIZE
                send(FRAME_HEADER.pack(len(body) + len(data)) + body + data)
            elif variant == 3:  # done before anything was sent
                break
            elif variant == 4:  # data past MAX_CHUNK_SIZE: a protocol error
                body = msgpack.packb([CODE["ChunkData"], rid, ref.offset, ref.hash, 0])
                data = b"\x00" * (MAX_CHUNK_SIZE + 1)
                send(FRAME_HEADER.pack(len(body) + len(data)) + body + data)
            elif variant == 5:  # a hash that is not the one asked for
                body = msgpack.packb([CODE["ChunkData"], rid, ref.offset, rng.randbytes(16), 0])
                send(FRAME_HEADER.pack(len(body) + 1) + body + b"z")
            elif variant == 6:  # more zeros before the data than the chunk has
                lead = ref.length + rng.choice([0, 1, MAX_CHUNK_SIZE - ref.length])
                body = msgpack.packb([CODE["ChunkData"], rid, ref.offset, ref.hash, lead])
                send(FRAME_HEADER.pack(len(body) + 1) + body + b"z")
            else:  # nothing for this chunk
                continue
        send(raw_frame(CODE["ChunksDone"], rid))
        if rng.random() < 0.2:  # a reply after the final one: a protocol error
            send(raw_frame(CODE["ChunksDone"], rid))

    def file_data(self, request: GetFiles) -> None:
        rng, rid, send = self.rng, request.request_id, self.wire.send

        def data_frame(index: int, digest: bytes, error: str, data: bytes) -> bytes:
            body = msgpack.packb([CODE["FileData"], rid, index, digest, error])
            return FRAME_HEADER.pack(len(body) + len(data)) + body + data

        for i, path in enumerate(request.paths):
            digest = request.file_hash(i)
            size = self.sizes.get(path, 5)
            variant = rng.randrange(9)
            if variant == 0:  # wrong bytes, right hash and size
                send(data_frame(i, digest, "", rng.randbytes(min(size, 70_000))))
            elif variant == 1:  # an index never asked for, or out of order
                send(data_frame(rng.choice([i + 1, i + 7, 1023]), digest, "", b"abc"))
            elif variant == 2:  # more data than the file has
                send(data_frame(i, digest, "", b"\x00" * (size + rng.choice([1, 70_000]))))
            elif variant == 3:  # done before everything was sent
                break
            elif variant == 4:  # data past MAX_FILE_DATA: a protocol error
                send(data_frame(i, digest, "", b"\x00" * (MAX_FILE_DATA + 1)))
            elif variant == 5:  # another file's hash
                send(data_frame(i, rng.randbytes(16), "", b"z"))
            elif variant == 6:  # an error that carries data: a protocol error
                send(data_frame(i, digest, "changed", b"z"))
            elif variant == 7:  # an honest "cannot send it"
                send(data_frame(i, digest, rng.choice(["changed", "not_found"]), b""))
            else:  # nothing for this file
                continue
        send(raw_frame(CODE["FilesDone"], rid))
        if rng.random() < 0.2:  # a reply after the final one: a protocol error
            send(raw_frame(CODE["FilesDone"], rid))


# --- the scenarios ----------------------------------------------------------------------------


@dataclass
class Victim:
    """What the fuzzer knows of its target."""

    host: str
    port: int
    group: str
    canary: Path
    # (path, hash, size) of files the daemon serves: learned with GetIndex, for GetChunks.
    files: list[tuple[str, bytes, int]] = field(default_factory=list)


@dataclass
class Session:
    wire: Wire
    rng: random.Random
    victim: Victim
    hello: Hello
    responder: Responder | None = None

    def hello_frame(self) -> bytes:
        return frame_of(self.hello)

    async def handshake(self) -> bool:
        self.wire.send(self.hello_frame())
        reply = await self.wire.reply(15)
        return isinstance(reply, Hello)

    def request_frame(self, request: Request) -> bytes:
        return frame_of(request)


Scenario = Callable[[Session], Awaitable[Expect]]
SCENARIOS: dict[str, Scenario] = {}


def scenario(weight: int) -> Callable[[Scenario], Scenario]:
    def register(function: Scenario) -> Scenario:
        name = function.__name__.removeprefix("scenario_")
        SCENARIOS[name] = function
        WEIGHTS[name] = weight
        return function

    return register


WEIGHTS: dict[str, int] = {}


def session_kind(worker: int, number: int, workers: int, rng: random.Random) -> str:
    """The scenario a worker runs as its session `number`: first every kind once, spread over
    the workers (so a short campaign reaches each one, however few sessions fit in its time),
    then kinds drawn by weight."""
    names = sorted(SCENARIOS)
    first = number * workers + worker
    if first < len(names):
        return names[first]
    return rng.choices(names, [WEIGHTS[n] for n in names])[0]


@scenario(3)
async def scenario_random_bytes(s: Session) -> Expect:
    """Random bytes, before or after the Hello."""
    if s.rng.random() < 0.5 and not await s.handshake():
        return Expect.ANY
    data = b"".join(
        s.rng.randbytes(s.rng.choice([1, 3, 4, 5, 64, 4096, 70_000]))
        for _ in range(s.rng.randint(1, 4))
    )
    s.wire.send(data)
    # Complete the frame the random bytes may have begun (the daemon waits for its end,
    # as it must), then a frame that is never valid: 0xc1 is unused by msgpack.
    s.wire.send(b"\x00" * missing_bytes(data) + FRAME_HEADER.pack(3) + b"\xc1\xc1\xc1")
    return Expect.CLOSE


def missing_bytes(data: bytes) -> int:
    """How many more bytes (zeros) finish the last frame `data` begins, as the daemon reads
    frames; 0 when it ends between frames or when a frame announces more than MAX_FRAME_SIZE
    (refused at once)."""
    position = 0
    while position + 4 <= len(data):
        (length,) = FRAME_HEADER.unpack_from(data, position)
        if length > MAX_FRAME_SIZE:
            return 0
        position += 4 + length
    if position >= len(data):
        return position - len(data)
    partial = len(data) - position  # 1 to 3 bytes of a header, completed with zeros
    (length,) = FRAME_HEADER.unpack(data[position:] + bytes(4 - partial))
    return 4 - partial + (0 if length > MAX_FRAME_SIZE else length)


@scenario(2)
async def scenario_truncated_frame(s: Session) -> Expect:
    """A valid frame cut anywhere, then end of stream."""
    if not await s.handshake():
        return Expect.ANY
    frame = s.request_frame(GetIndex(STORAGE, 0, 10, request_id=1))
    cut = s.rng.randrange(1, len(frame))
    s.wire.send(frame[:cut])
    await s.wire.drain()
    if s.wire.writer.can_write_eof():
        s.wire.writer.write_eof()
    else:  # TLS has no half-close: hang up instead
        s.wire.writer.close()
    return Expect.CLOSE


@scenario(2)
async def scenario_oversized_header(s: Session) -> Expect:
    if s.rng.random() < 0.5 and not await s.handshake():
        return Expect.ANY
    length = s.rng.choice([MAX_FRAME_SIZE + 1, 2**31, 2**32 - 1])
    s.wire.send(FRAME_HEADER.pack(length) + s.rng.randbytes(s.rng.randrange(100)))
    return Expect.CLOSE


@scenario(1)
async def scenario_empty_frame(s: Session) -> Expect:
    if not await s.handshake():
        return Expect.ANY
    s.wire.send(FRAME_HEADER.pack(0))
    return Expect.CLOSE


@scenario(3)
async def scenario_out_of_order(s: Session) -> Expect:
    """Valid frames where they are not allowed."""
    rng = s.rng
    choice = rng.randrange(7)
    if choice == 0:  # a request before the Hello
        s.wire.send(s.request_frame(GetStorageHashes(request_id=1)))
        return Expect.CLOSE
    if not await s.handshake():
        return Expect.ANY
    rid = rng.randint(1, 2**32 - 1)
    if choice == 1:  # a reply to a request never sent
        s.wire.send(raw_frame(CODE["StorageHashes"], rid, {STORAGE: b"\x00" * 16}))
    elif choice == 2:  # the same request id twice while in flight
        frame = s.request_frame(SyncRequest((STORAGE,), request_id=rid))
        s.wire.send(frame + frame, frames=2)
    elif choice == 3:  # a second Hello
        s.wire.send(s.hello_frame())
    elif choice == 4:  # chunks nobody asked for
        body = msgpack.packb([CODE["ChunkData"], rid, 0, b"\x00" * 16, 0])
        s.wire.send(FRAME_HEADER.pack(len(body) + 5) + body + b"hello")
    elif choice == 5:  # a request id 0
        s.wire.send(raw_frame(CODE["GetStorageHashes"], 0, True))
    else:  # more than MAX_IN_FLIGHT requests at once: refused as "busy" or a protocol error
        frames = b"".join(
            s.request_frame(SyncRequest((), request_id=n + 1)) for n in range(MAX_IN_FLIGHT + 1)
        )
        s.wire.send(frames, frames=MAX_IN_FLIGHT + 1)
        return Expect.ANY
    return Expect.CLOSE


@scenario(3)
async def scenario_mutated_frame(s: Session) -> Expect:
    """A valid frame with a few bytes changed: decoded or refused, never a crash."""
    if not await s.handshake():
        return Expect.ANY
    rng = s.rng
    frame = bytearray(
        rng.choice(
            [
                s.request_frame(GetIndex(STORAGE, rng.randrange(100), 10, request_id=1)),
                s.request_frame(GetStorageHashes(rescan=True, request_id=1)),
                s.request_frame(
                    GetChunks(STORAGE, "a/b", HASH_A, (ChunkRef(0, 9, HASH_B),), request_id=1)
                ),
                raw_frame(CODE["IndexPage"], 3, STORAGE, [raw_entry("a")], 1, False),
                raw_frame(CODE["Hello"], 0, PROTOCOL_VERSION, FUZZER_ID, s.victim.group, []),
            ]
        )
    )
    for _ in range(rng.randint(1, 6)):
        position = rng.randrange(4, len(frame))  # keep the length: mutate the body
        frame[position] = rng.randrange(256)
    s.wire.send(bytes(frame))
    # Whatever it decoded to, a Goodbye ends the session cleanly if it is still open.
    return Expect.ANY


@scenario(1)
async def scenario_trickled_frame(s: Session) -> Expect:
    """A large valid frame in one-byte TLS records: what the daemon buffers stays bounded."""
    if not await s.handshake():
        return Expect.ANY
    refs = tuple(ChunkRef(n, 1, b"\x03" * 16) for n in range(s.rng.randint(200, 2000)))
    frame = s.request_frame(GetChunks(STORAGE, "fuzz/trickle", b"\x04" * 16, refs, request_id=9))
    deadline = time.monotonic() + SESSION_SECONDS
    for n in range(len(frame)):
        s.wire.send(frame[n : n + 1], frames=0)
        if n % 64 == 0:
            if not await s.wire.drain() or time.monotonic() > deadline:
                break
            await asyncio.sleep(0)
    s.wire.frames += 1
    reply = await s.wire.reply(CLOSE_WAIT_SECONDS)
    if isinstance(reply, Error) and reply.code == "too_large":
        return Expect.SERVE
    return Expect.ANY


async def learn_files(s: Session) -> list[tuple[str, bytes, int]]:
    """The victim's live files (path, hash, size), asked for as any member may."""
    if s.victim.files:
        return s.victim.files
    s.wire.send(s.request_frame(GetIndex(STORAGE, 0, 4096, request_id=1)))
    files = []
    while (page := await s.wire.reply(10)) is not None:
        entries = getattr(page, "entries", ())
        files += [(e.path, e.hash, e.size) for e in entries if not e.deleted]
        if not getattr(page, "more", False):
            break
    s.victim.files = files
    return files


@scenario(4)
async def scenario_serving_outside_the_root(s: Session) -> Expect:
    """GetChunkList/GetChunks/GetFiles for paths outside the root, with the hash of a real
    file (for GetFiles, beside real files)."""
    if not await s.handshake():
        return Expect.ANY
    rng = s.rng
    files = await learn_files(s)
    digest, size = (files[0][1], files[0][2]) if files else (rng.randbytes(16), 10)
    path = rng.choice(escaping_paths(s.victim.canary, rng))
    pick = rng.random()
    if pick < 0.33:
        request: Request = GetChunkList(STORAGE, path, digest, request_id=5)
    elif pick < 0.66:
        honest = [(p, d) for p, d, _ in files[:3]]
        asked = [*honest, (path, digest)]
        rng.shuffle(asked)
        request = GetFiles(STORAGE, tuple(p for p, _ in asked), b"".join(d for _, d in asked),
                           request_id=5)  # fmt: skip
    else:
        request = GetChunks(STORAGE, path, digest, (ChunkRef(0, min(size, 100), digest),),
                            request_id=5)  # fmt: skip
    s.wire.send(s.request_frame(request))
    return Expect.REFUSE


@scenario(4)
async def scenario_absurd_chunk_requests(s: Session) -> Expect:
    """GetChunks of a real file with absurd offsets, lengths and counts: errors, no crash."""
    if not await s.handshake():
        return Expect.ANY
    rng = s.rng
    files = await learn_files(s)
    if not files:
        return Expect.SERVE
    path, digest, size = rng.choice(files)
    variants: list[list[tuple[int, int, bytes]]] = [
        [(2**62, 100, digest)],
        [(MAX_INT64, MAX_CHUNK_SIZE, digest)],
        [(0, MAX_CHUNK_SIZE, digest)] * 4,  # 16 MiB: just at the bound
        [(0, MAX_CHUNK_SIZE, digest)] * 5,  # past it
        [(0, 1, digest)] * 1025,  # too many refs
        [(n, 1, digest) for n in range(MAX_CHUNK_REFS)],  # the most a frame may carry
        [(size, 1, digest), (size + 1, 1, digest)],  # just past the end
        [(max(size - 1, 0), 2, digest)],
    ]
    refs = rng.choice(variants)
    rid = rng.randint(1, 1000)
    storage = STORAGE if rng.random() < 0.9 else "ghost"
    s.wire.send(raw_frame(CODE["GetChunks"], rid, storage, path, digest, packed_refs(refs)))
    while (reply := await s.wire.reply(10)) is not None:
        if isinstance(reply, Error) or type(reply).__name__ == "ChunksDone":
            break
    return Expect.SERVE


@scenario(3)
async def scenario_flood(s: Session) -> Expect:
    """Thousands of requests in flight (up to the protocol's bound), read or never read."""
    if not await s.handshake():
        return Expect.ANY
    rng = s.rng
    files = await learn_files(s) if rng.random() < 0.5 else []
    kind = rng.choice(["hashes", "index", "chunks", "chunk_list", "mixed"])
    rounds = rng.randint(1, 4)
    read = rng.random() < 0.5
    next_id = 1000
    for _ in range(rounds):
        frames = []
        for _ in range(MAX_IN_FLIGHT - 8):
            next_id += 1
            pick = kind if kind != "mixed" else rng.choice(["hashes", "index", "chunks"])
            if pick == "hashes":
                request: Request = GetStorageHashes(rescan=True, request_id=next_id)
            elif pick == "index":
                request = GetIndex(STORAGE, 0, 4096, request_id=next_id)
            elif files and pick in ("chunks", "chunk_list"):
                path, digest, size = rng.choice(files)
                if pick == "chunks":
                    refs = (ChunkRef(0, min(size, MAX_CHUNK_SIZE), digest),)
                    request = GetChunks(STORAGE, path, digest, refs, request_id=next_id)
                else:
                    request = GetChunkList(STORAGE, path, digest, request_id=next_id)
            else:
                request = GetChunkList(STORAGE, "fuzz/none", b"\x05" * 16, request_id=next_id)
            frames.append(s.request_frame(request))
        s.wire.send(b"".join(frames), frames=len(frames))
        if read:
            deadline = time.monotonic() + SESSION_SECONDS
            while time.monotonic() < deadline and await s.wire.reply(2) is not None:
                pass
        else:
            await s.wire.drain(1)
    return Expect.SERVE if read else Expect.ANY


@scenario(2)
async def scenario_sync_request_flood(s: Session) -> Expect:
    """Many SyncRequests at once, each making the daemon pull from us, answered badly."""
    if not await s.handshake():
        return Expect.ANY
    rng = s.rng
    s.responder = Responder(s.wire, rng.choice([Policy.ERRORS, Policy.SILENT, Policy.WRONG_DATA]),
                            rng, s.victim.canary)  # fmt: skip
    count = rng.randint(17, 200)
    frames = b"".join(
        s.request_frame(SyncRequest((STORAGE,), request_id=n + 1)) for n in range(count)
    )
    s.wire.send(frames, frames=count)
    await asyncio.sleep(rng.uniform(0.5, SESSION_SECONDS))
    return Expect.ANY


@scenario(10)
async def scenario_malicious_pull(s: Session) -> Expect:
    """SyncRequest: the daemon pulls from us, and every answer is hostile."""
    if not await s.handshake():
        return Expect.ANY
    rng = s.rng
    policy = rng.choice(list(Policy))
    s.responder = Responder(s.wire, policy, rng, s.victim.canary)
    storages = rng.choice([(STORAGE,), (), ("ghost",), (STORAGE, "ghost")])
    s.wire.send(s.request_frame(SyncRequest(storages, request_id=77)))
    timeout = SESSION_SECONDS if policy is Policy.SILENT else 20
    reply = await s.wire.reply(timeout)
    if policy is Policy.ESCAPE and storages and STORAGE in storages:
        return Expect.REFUSE
    if policy in (Policy.RAW_INVALID, Policy.WRONG_KIND) and STORAGE in storages:
        if isinstance(reply, Error) and not reply.is_fatal:
            return Expect.ANY  # the pull ended before the bad frame mattered
        return Expect.CLOSE if reply is None or s.wire.fatal else Expect.ANY
    return Expect.ANY


# --- running sessions -------------------------------------------------------------------------


def describe_errors(errors: list[Error]) -> str:
    codes = Counter(e.code for e in errors)
    first = [(e.code, e.message[:100]) for e in errors[:3]]
    return f"{dict(codes)} {first}"


@dataclass
class Fuzzer:
    victim: Victim
    identity: NodeIdentity
    seed: int
    stats: Stats = field(default_factory=Stats)
    workers: int = 3
    stop: float = float("inf")  # time.monotonic() deadline
    frames_budget: int | None = None
    sessions_per_worker: int | None = None
    workers_done: bool = False

    def hello(self) -> Hello:
        return Hello(PROTOCOL_VERSION, FUZZER_ID, self.victim.group, (STORAGE,))

    def done(self) -> bool:
        if self.workers_done or time.monotonic() >= self.stop:
            return True
        return self.frames_budget is not None and self.stats.frames >= self.frames_budget

    async def run_workers(self) -> None:
        """Every worker, with the staller beside them until the last worker is done."""
        staller = asyncio.get_running_loop().create_task(self.run_staller())
        try:
            await asyncio.gather(*(self.run_worker(n) for n in range(self.workers)))
        finally:
            self.workers_done = True
            await staller

    async def run_worker(self, worker: int) -> None:
        context = client_context(self.identity)
        number = 0
        while not self.done() and number != self.sessions_per_worker:
            tag = f"{self.seed}:{worker}:{number}"
            rng = random.Random(tag)
            name = session_kind(worker, number, self.workers, rng)
            await self.run_session(context, name, rng, tag)
            number += 1

    async def run_staller(self) -> None:
        """One session for the whole run: a SyncRequest whose pull we never answer, and half a
        frame. Whatever waits on it must not hold up the honest peer."""
        try:
            wire = await Wire.open(
                self.victim.host, self.victim.port, client_context(self.identity)
            )
        except (OSError, TimeoutError) as exc:
            self.stats.findings.append(f"staller: cannot connect: {exc!r}")
            return
        rng = random.Random(f"{self.seed}:stall")
        session = Session(wire, rng, self.victim, self.hello())
        self.stats.sessions["long_stall"] += 1
        try:
            if not await session.handshake():
                return
            session.responder = Responder(wire, Policy.SILENT, rng, self.victim.canary)
            frame = session.request_frame(GetIndex(STORAGE, 0, 10, request_id=2))
            wire.send(session.request_frame(SyncRequest((STORAGE,), request_id=1)))
            wire.send(frame[: len(frame) // 2])
            started = asyncio.get_running_loop().time()
            while not self.done() and not wire.closed.is_set():
                await asyncio.sleep(0.2)
            waited = asyncio.get_running_loop().time() - started
            if wire.closed.is_set() and waited < REPLY_TIMEOUT:  # it may, after its timeout
                self.stats.findings.append(
                    f"staller: the daemon hung up after {waited:.0f} s, before its reply timeout"
                )
        finally:
            if session.responder is not None:
                self.stats.daemon_requests.update(session.responder.requests)
            self.stats.frames += wire.frames
            await wire.close()

    async def run_session(
        self, context: ssl.SSLContext, name: str, rng: random.Random, tag: str
    ) -> None:
        stats = self.stats
        try:
            wire = await Wire.open(self.victim.host, self.victim.port, context)
        except (OSError, TimeoutError) as exc:
            stats.findings.append(f"session {tag} ({name}): cannot connect: {exc!r}")
            return
        session = Session(wire, rng, self.victim, self.hello())
        stats.sessions[name] += 1
        expect = Expect.ANY
        try:
            expect = await asyncio.wait_for(SCENARIOS[name](session), 40)
            await self.check(session, name, expect, tag)
        except TimeoutError:
            stats.findings.append(f"session {tag} ({name}): scenario did not end in 40 s")
        finally:
            if session.responder is not None:
                stats.daemon_requests.update(session.responder.requests)
                for task in list(session.responder.tasks):
                    task.cancel()
            stats.frames += wire.frames
            stats.bytes += wire.bytes
            stats.protocol_errors += wire.fatal is not None
            stats.violations += sum(e.code == "violation" for e in wire.errors)
            if wire.undecodable:
                stats.findings.append(f"session {tag}: undecodable frames {wire.undecodable}")
            await wire.close()

    async def check(self, s: Session, name: str, expect: Expect, tag: str) -> None:
        wire = s.wire
        if expect in (Expect.CLOSE, Expect.REFUSE):
            if await wire.wait_closed(CLOSE_WAIT_SECONDS):
                self.stats.closed_by_daemon += 1
            else:
                self.stats.findings.append(
                    f"session {tag} ({name}): the daemon did not hang up ({expect.value}); "
                    f"errors: {describe_errors(wire.errors)}"
                )
                return
            if expect is Expect.REFUSE and not any(e.code == "violation" for e in wire.errors):
                self.stats.findings.append(
                    f"session {tag} ({name}): hung up without a 'violation' error: "
                    f"{describe_errors(wire.errors)}"
                )
            return
        if wire.closed.is_set():
            if expect is Expect.SERVE:
                self.stats.closed_by_daemon += 1
                self.stats.findings.append(
                    f"session {tag} ({name}): the daemon hung up on a valid session: {wire.fatal}"
                )
            else:
                self.stats.closed_by_daemon += 1
            return
        wire.send(frame_of(Goodbye("fuzzing done")))
        await wire.drain(1)


# --- the whole campaign -----------------------------------------------------------------------

MEMORY_BOUND_MIB = 150
"""What the victim's peak resident memory (VmHWM) must stay under."""
HONEST_SYNC_SECONDS = 30.0
"""How long one honest sync through the victim may take while it is being fuzzed."""
SERVED_CONTENT = b"served by the victim\n" * 5000


@dataclass
class Report:
    seed: int
    seconds: float
    sessions_per_worker: int | None
    stats: Stats
    peak_rss_kib: int
    hwm_kib: int
    baseline_rss_kib: int
    rss_series_kib: list[int]
    honest_syncs: list[float]
    honest_failures: list[str]
    alive: bool
    listening: bool
    canary: list[str]
    unexpected_in_root: list[str]
    peer_refused: int
    findings: list[str]

    def summary(self) -> str:
        s = self.stats
        sessions = ", ".join(f"{k} {v}" for k, v in sorted(s.sessions.items()))
        asked = ", ".join(f"{k} {v}" for k, v in sorted(s.daemon_requests.items()))
        return "\n".join(
            [
                f"seed {self.seed}: {sum(s.sessions.values())} sessions, {s.frames} frames, "
                f"{s.bytes / 2**20:.1f} MiB sent in {self.seconds:.1f} s",
                f"  sessions: {sessions}",
                f"  daemon asked us: {asked or 'nothing'}",
                f"  daemon hung up {s.closed_by_daemon} times; fatal errors {s.protocol_errors}, "
                f"violations {s.violations}, peer_refused events {self.peer_refused}",
                f"  victim memory: baseline {self.baseline_rss_kib / 1024:.0f} MiB, peak RSS "
                f"{self.peak_rss_kib / 1024:.0f} MiB, VmHWM {self.hwm_kib / 1024:.0f} MiB "
                f"(bound {MEMORY_BOUND_MIB} MiB); every 10 s: "
                f"{[round(kib / 1024) for kib in self.rss_series_kib]} MiB",
                f"  honest syncs: {[round(t, 1) for t in self.honest_syncs]} s, "
                f"failures {self.honest_failures}",
                f"  alive {self.alive}, listening {self.listening}, canary {self.canary}, "
                f"unexpected in root {self.unexpected_in_root}",
                f"  findings ({len(self.findings)}):",
                *(f"    {f}" for f in self.findings[:40]),
                f"replay: bin/fuzz-peer --seed {self.seed}"
                + (f" --sessions {n}" if (n := self.sessions_per_worker) is not None else ""),
            ]
        )

    @property
    def ok(self) -> bool:
        return not self.findings


def memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, in KiB."""
    values = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
    return values["VmRSS"], values["VmHWM"]


class MemorySampler(threading.Thread):
    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.peak_rss = 0
        self.hwm = 0
        self.series: list[int] = []  # VmRSS every SERIES_SECONDS, to tell a leak from a peak
        self._halt = threading.Event()

    SERIES_SECONDS = 10.0

    def run(self) -> None:
        next_point = time.monotonic()
        while not self._halt.is_set():
            with contextlib.suppress(OSError, KeyError):
                rss, hwm = memory_kib(self.pid)
                self.peak_rss = max(self.peak_rss, rss)
                self.hwm = max(self.hwm, hwm)
                if time.monotonic() >= next_point:
                    self.series.append(rss)
                    next_point += self.SERIES_SECONDS
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join()


def quiet_transport_errors(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Our own side: CPython 3.11's SSL transport may trip over a connection the daemon reset
    while we closed it (`_call_connection_lost` on a transport already gone); nothing to see."""
    if "_call_connection_lost" in repr(context.get("handle")):
        return
    loop.default_exception_handler(context)


def is_listening(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(2)
        try:
            sock.connect(("127.0.0.1", port))
            return True
        except OSError:
            return False


def honest_rounds(
    honest: SyncNode, victim: SyncNode, stop: threading.Event, times: list[float],
    failures: list[str],
) -> None:  # fmt: skip
    """Sync a new file from the honest node through the victim, again and again."""
    number = 0
    while not stop.is_set() or number == 0:
        name = f"honest-{number}.txt"
        write(honest.root, name, f"honest file {number}\n" * 100)
        started = time.monotonic()
        try:
            proc = honest.run("sync", "--json", check=False, timeout=HONEST_SYNC_SECONDS * 2)
        except subprocess.TimeoutExpired:
            failures.append(f"{name}: ironsync sync did not end")
            return
        elapsed = time.monotonic() - started
        times.append(elapsed)
        if proc.returncode != 0:
            failures.append(
                f"{name}: sync exited {proc.returncode}: {proc.stdout[-400:]} {proc.stderr[-400:]}"
            )
        elif tree(victim.root).get(name) != (f"honest file {number}\n" * 100).encode():
            failures.append(f"{name}: not in the victim's root after a converged sync")
        elif elapsed > HONEST_SYNC_SECONDS:
            failures.append(f"{name}: sync took {elapsed:.1f} s")
        if tree(honest.root).get("served.txt") != SERVED_CONTENT:
            failures.append("served.txt did not reach the honest node")
        number += 1
        stop.wait(1.0)


def peer_refused_events(db_path: Path) -> int:
    conn = apsw.Connection(str(db_path), flags=apsw.SQLITE_OPEN_READONLY)
    conn.set_busy_timeout(10_000)
    try:
        row = conn.execute(
            "SELECT count(*) FROM events WHERE kind = 'peer_refused' AND peer = ?", (FUZZER_ID,)
        ).fetchone()
        return int(row[0]) if row else 0
    finally:
        conn.close()


def run_campaign(
    base: Path,
    seed: int,
    *,
    seconds: float | None = 25.0,
    frames: int | None = None,
    sessions: int | None = None,
    workers: int = 3,
    honest: bool = True,
) -> Report:
    """Start a victim daemon under `base`, fuzz it, sync an honest node through it, check.
    The fuzzing stops at the first of: `seconds`, `frames` sent, `sessions` per worker."""
    victim = SyncNode(base, "victim")
    canary = victim.base / "canary"
    canary.mkdir()
    (victim.root / "escape").symlink_to(canary)
    write(victim.root, "served.txt", SERVED_CONTENT)
    good = SyncNode(base, "honest")
    good.add_peers(victim)
    victim.start()
    assert victim.proc is not None
    pid = victim.proc.pid
    sampler = MemorySampler(pid)
    baseline = memory_kib(pid)[0]
    sampler.start()
    identity = load_or_create_identity(base / FUZZER_ID, FUZZER_ID, victim.group, SECRET)
    fuzzer = Fuzzer(
        Victim("127.0.0.1", victim.port, victim.group, canary),
        identity,
        seed,
        workers=workers,
        frames_budget=frames,
        sessions_per_worker=sessions,
    )
    started = time.monotonic()
    if seconds is not None:
        fuzzer.stop = started + seconds
    honest_times: list[float] = []
    honest_failures: list[str] = []
    stop_honest = threading.Event()
    honest_thread = threading.Thread(
        target=honest_rounds, args=(good, victim, stop_honest, honest_times, honest_failures)
    )
    try:
        if honest:
            honest_thread.start()

        async def fuzz() -> None:
            asyncio.get_running_loop().set_exception_handler(quiet_transport_errors)
            await fuzzer.run_workers()

        asyncio.run(fuzz())
        elapsed = time.monotonic() - started
        stop_honest.set()
        if honest:
            honest_thread.join()
        alive = victim.proc.poll() is None
        listening = alive and is_listening(victim.port)
        sampler.stop()
        _, hwm = memory_kib(pid) if alive else (0, sampler.hwm)
        refused = peer_refused_events(victim.db_path)
    finally:
        stop_honest.set()
        sampler.stop()
        if victim.proc is not None:
            victim.stop()
    expected = {"served.txt", *(f"honest-{n}.txt" for n in range(len(honest_times) + 1))}
    unexpected = sorted(set(tree(victim.root)) - expected)
    for dirpath, dirnames, _ in os.walk(victim.root):
        rel = Path(dirpath).relative_to(victim.root)
        if rel.parts[:1] == (".ironsync",):
            continue
        unexpected += [
            str(rel / d) for d in dirnames if str(rel / d) not in ("escape", ".ironsync")
        ]
    findings = list(fuzzer.stats.findings)
    canary_content = sorted(os.listdir(canary))
    outside = sorted(
        p.name for p in base.iterdir() if p.name not in ("victim", "honest", FUZZER_ID)
    )
    if not alive:
        findings.append(f"the victim died: exit {victim.proc.returncode if victim.proc else '?'}")
    if alive and not listening:
        findings.append("the victim no longer listens")
    if canary_content or outside:
        findings.append(f"written outside the root: canary {canary_content}, base {outside}")
    if unexpected:
        findings.append(f"the root holds what no honest peer sent: {unexpected}")
    if hwm > MEMORY_BOUND_MIB * 1024:
        findings.append(f"the victim's VmHWM reached {hwm / 1024:.0f} MiB")
    if honest and (honest_failures or not honest_times):
        findings.append(f"the honest node was not served: {honest_failures or 'no sync ran'}")
    if refused < fuzzer.stats.violations:
        findings.append(
            f"{fuzzer.stats.violations} violations answered but {refused} peer_refused events"
        )
    return Report(
        seed=seed,
        seconds=elapsed,
        sessions_per_worker=sessions,
        stats=fuzzer.stats,
        peak_rss_kib=sampler.peak_rss,
        hwm_kib=hwm,
        baseline_rss_kib=baseline,
        rss_series_kib=sampler.series,
        honest_syncs=honest_times,
        honest_failures=honest_failures,
        alive=alive,
        listening=listening,
        canary=canary_content,
        unexpected_in_root=unexpected,
        peer_refused=refused,
        findings=findings,
    )


def main(argv: list[str] | None = None) -> int:
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=None, help="replay this seed")
    parser.add_argument("--frames", type=int, default=None, help="stop after N frames")
    parser.add_argument("--seconds", type=float, default=None, help="stop after S seconds")
    parser.add_argument(
        "--sessions", type=int, default=None, help="stop after N sessions per worker"
    )
    parser.add_argument("--workers", type=int, default=3, help="concurrent fuzzing sessions")
    parser.add_argument("--no-honest", action="store_true", help="no honest node alongside")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    bounded = args.seconds is not None or args.frames or args.sessions
    seconds = args.seconds if bounded else 60.0
    base = Path(tempfile.mkdtemp(prefix="ironsync-fuzz-peer-"))
    print(f"fuzzing with seed {seed} in {base}", flush=True)
    report = run_campaign(
        base, seed, seconds=seconds, frames=args.frames, sessions=args.sessions,
        workers=args.workers, honest=not args.no_honest,
    )  # fmt: skip
    print(report.summary())
    if not args.keep:
        import shutil

        shutil.rmtree(base, ignore_errors=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
