"""Coverage-guided fuzzing of the protocol decoder: any bytes in, only ProtocolError out.

`one_input(data)` is the entry point both engines call. Its first byte picks how the rest is
fed, so the fuzzer reaches every state of the decoder:

- 0: bytes straight to a fresh Connection (the server of a new connection);
- 1: after a valid Hello, so messages are judged in READY;
- 2: as a client that has sent one request of each kind, so replies to them are in flight;
- 3: one frame body to `decode_body` alone.

The second byte picks how the stream is cut into `receive_data` calls (one byte at a time up
to all at once), then `next_event` is called until it needs data. Anything but a
ProtocolError escaping is a finding. Every message that comes out must also survive a round
trip: encoded again and decoded, it is the same message (a decoded message is a valid one).

Engines:
- atheris (libFuzzer for Python) when it is installed: `bin/fuzz-decoder` (it installs it);
- otherwise, and in CI (tests/test_fuzz_decoder.py), `CoverageFuzzer`: a small loop of our own
  that traces which line-to-line arcs of ironsync/protocol each input runs (sys.settrace),
  keeps the inputs that reach new arcs as its corpus, and mutates those (bit flips,
  interesting bytes and lengths, msgpack markers, insertions, deletions, splices).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

import ironsync.protocol as protocol
from ironsync.protocol import (
    PROTOCOL_VERSION,
    ChangeNotice,
    ChunkData,
    ChunkList,
    ChunkRef,
    ChunksDone,
    Connection,
    Error,
    GetChunkList,
    GetChunks,
    GetIndex,
    GetStorageHashes,
    Goodbye,
    Hello,
    IndexEntry,
    IndexPage,
    Message,
    ProtocolError,
    Role,
    StorageHashes,
    SyncRequest,
    SyncResult,
)
from ironsync.protocol.wire import decode_body, encode_frame

HASH = bytes(range(16))
PIECE_SIZES = (1, 2, 3, 5, 16, 255, 4096, 1 << 30)

# The requests a mode-2 client has in flight, with their ids (replies need these).
OUR_REQUESTS: tuple[Message, ...] = (
    GetStorageHashes(rescan=True, request_id=1),
    GetIndex("docs", 0, 100, request_id=2),
    GetChunkList("docs", "a/b.txt", HASH, request_id=3),
    GetChunks("docs", "a/b.txt", HASH, (ChunkRef(0, 10, HASH),), request_id=4),
    SyncRequest(("docs",), request_id=5),
)


def frame(message: Message) -> bytes:
    return b"".join(bytes(b) for b in encode_frame(message))


def hello(node_id: str = "peer") -> Hello:
    return Hello(PROTOCOL_VERSION, node_id, "group", ("docs", "music"))


def example_messages() -> list[Message]:
    """One message of each kind, as a peer in READY would send them."""
    entry = IndexEntry("a/b.txt", 10, 1_700_000_000 * 10**9, 0o100644, HASH, False,
                       '{"peer":3}', "peer", 7)  # fmt: skip
    tomb = IndexEntry("gone", 0, 0, 0, None, True, '{"peer":4}', "peer", 8)
    return [
        GetStorageHashes(rescan=True, request_id=9),
        GetIndex("docs", 5, 10, request_id=10),
        GetChunkList("docs", "a/b.txt", HASH, request_id=11),
        GetChunks("docs", "a/b.txt", HASH, (ChunkRef(0, 5, HASH),) * 2, request_id=12),
        SyncRequest((), request_id=13),
        StorageHashes({"docs": HASH, "music": HASH}, request_id=1),
        IndexPage("docs", (entry, tomb), 8, False, request_id=2),
        ChunkList("docs", "a/b.txt", HASH, (ChunkRef(0, 10, HASH),), more=False, request_id=3),
        ChunkList(
            "docs",
            "a/b.txt",
            HASH,
            (ChunkRef(0, 5, HASH), ChunkRef(5, 5, b"\0" * 16)),
            repeats=b"\0\0\0\x01\0\0\0\x02",
            request_id=3,
        ),
        ChunkData(0, HASH, b"0123456789", request_id=4),
        ChunkData(0, HASH, b"01234", 5, request_id=4),
        ChunksDone(request_id=4),
        SyncResult(True, '{"changed":1}', request_id=5),
        Error("not_found", "no such file", request_id=3),
        ChangeNotice("docs", 42),
        Goodbye("bye"),
        Error("protocol_error", "fatal"),
    ]


def seed_inputs() -> list[bytes]:
    """Valid inputs for every mode: where a coverage-guided fuzzer starts."""
    seeds = []
    messages = example_messages()
    for n, message in enumerate(messages):
        body = frame(message)
        seeds.append(bytes([1, n % len(PIECE_SIZES)]) + body)
        seeds.append(bytes([2, (n + 3) % len(PIECE_SIZES)]) + body)
        seeds.append(bytes([3, 0]) + body[4:])
    seeds.append(bytes([0, 7]) + frame(hello()) + b"".join(frame(m) for m in messages[:5]))
    seeds.append(bytes([0, 0]) + frame(hello())[:9])
    return seeds


# --- the entry point --------------------------------------------------------------------------


class Finding(Exception):
    """Something other than a ProtocolError came out of the decoder, or a round trip failed."""


def one_input(data: bytes) -> None:
    """Feed `data` to the decoder as its first byte says; raise Finding on a defect."""
    if len(data) < 2:
        return
    mode, cut, rest = data[0] % 4, PIECE_SIZES[data[1] % len(PIECE_SIZES)], data[2:]
    try:
        if mode == 3:
            _round_trip(decode_body(memoryview(rest)))
            return
        conn = Connection(Role.CLIENT if mode == 2 else Role.SERVER)
        if mode >= 1:
            conn.receive_data(frame(hello()))
            conn.next_event()
        if mode == 2:
            conn.send(hello("us"))
            for request in OUR_REQUESTS:
                conn.send(request)
        for start in range(0, len(rest), cut):
            conn.receive_data(rest[start : start + cut])
            _drain(conn)
        conn.receive_data(b"")
        _drain(conn)
    except ProtocolError:
        pass
    except Finding:
        raise
    except Exception as exc:
        raise Finding(f"{type(exc).__name__}: {exc}") from exc


def _drain(conn: Connection) -> None:
    while True:
        event = conn.next_event()
        if not isinstance(event, Message):
            return
        _round_trip(event)


def _round_trip(message: Message) -> None:
    again = decode_body(memoryview(frame(message))[4:])
    if again != message:
        raise Finding(f"round trip changed {message!r} into {again!r}")


# --- a coverage-guided engine of our own ------------------------------------------------------

PROTOCOL_DIR = str(Path(protocol.__file__).parent)
INTERESTING_BYTES = (0x00, 0x01, 0x7F, 0x80, 0xFF, 0x90, 0x9F, 0xA0, 0xC0, 0xC1, 0xC2, 0xC3,
                     0xC4, 0xC5, 0xC6, 0xCA, 0xCB, 0xCC, 0xCF, 0xD0, 0xD3, 0xD4, 0xD9, 0xDB,
                     0xDC, 0xDD, 0xDE, 0xDF, 0xE0)  # fmt: skip
INTERESTING_LENGTHS = (0, 1, 2, 15, 16, 17, 28, 255, 256, 65535, 65536, 2**23, 2**23 + 1,
                       2**31, 2**32 - 1)  # fmt: skip


class ArcTracer:
    """Which (code, previous line, line) arcs of ironsync/protocol ran, via sys.settrace."""

    def __init__(self, prefix: str = PROTOCOL_DIR) -> None:
        self.prefix = prefix
        self.arcs: set[tuple[CodeType, int, int]] = set()
        self._wanted: dict[CodeType, bool] = {}

    def __enter__(self) -> ArcTracer:
        self.arcs = set()
        sys.settrace(self._global)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.settrace(None)

    def _global(self, frame: FrameType, event: str, arg: Any) -> Callable[..., Any] | None:
        code = frame.f_code
        wanted = self._wanted.get(code)
        if wanted is None:
            wanted = self._wanted[code] = code.co_filename.startswith(self.prefix)
        if not wanted:
            return None
        last = [-code.co_firstlineno]
        arcs = self.arcs

        def local(frame: FrameType, event: str, arg: Any) -> Callable[..., Any]:
            if event == "line":
                arcs.add((code, last[0], frame.f_lineno))
                last[0] = frame.f_lineno
            elif event == "return":
                arcs.add((code, last[0], -code.co_firstlineno))
            return local

        return local


@dataclass
class FuzzStats:
    inputs: int = 0
    corpus: int = 0
    arcs: int = 0
    seed_arcs: int = 0
    lines: int = 0
    seconds: float = 0.0
    findings: list[tuple[bytes, str]] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.inputs} inputs in {self.seconds:.1f} s, corpus {self.corpus}, "
            f"{self.arcs} arcs of ironsync/protocol ({self.seed_arcs} from the seeds alone), "
            f"{self.lines} lines; {len(self.findings)} findings"
        )


class CoverageFuzzer:
    """Mutate the inputs that found new arcs; keep those that find more (see module doc)."""

    def __init__(self, target: Callable[[bytes], None], seeds: list[bytes], seed: int) -> None:
        self.target = target
        self.rng = random.Random(seed)
        self.corpus: list[bytes] = []
        self.covered: set[tuple[CodeType, int, int]] = set()
        self.tracer = ArcTracer()
        self.stats = FuzzStats()
        self.seeds = seeds

    def run_one(self, data: bytes) -> set[tuple[CodeType, int, int]]:
        self.stats.inputs += 1
        with self.tracer:
            try:
                self.target(data)
            except Finding as exc:
                self.stats.findings.append((data, "".join(traceback.format_exception(exc))))
        return self.tracer.arcs

    def consider(self, data: bytes) -> None:
        new = self.run_one(data) - self.covered
        if new:
            self.covered |= new
            self.corpus.append(data)

    def run(self, *, max_inputs: int | None = None, seconds: float | None = None) -> FuzzStats:
        started = time.monotonic()
        for data in self.seeds:
            self.consider(data)
        self.stats.seed_arcs = len(self.covered)
        while (max_inputs is None or self.stats.inputs < max_inputs) and (
            seconds is None or time.monotonic() - started < seconds
        ):
            self.consider(self.mutate(self.rng.choice(self.corpus)))
        stats = self.stats
        stats.seconds = time.monotonic() - started
        stats.corpus = len(self.corpus)
        stats.arcs = len(self.covered)
        stats.lines = len({(code, line) for code, _, line in self.covered if line > 0})
        return stats

    def mutate(self, data: bytes) -> bytes:
        rng = self.rng
        out = bytearray(data)
        for _ in range(rng.choice((1, 1, 1, 2, 3, 5))):
            choice = rng.randrange(9)
            position = rng.randrange(len(out) + 1) if out else 0
            if choice == 0 and out:  # flip a bit
                position = min(position, len(out) - 1)
                out[position] ^= 1 << rng.randrange(8)
            elif choice == 1 and out:  # an interesting byte (msgpack markers)
                out[min(position, len(out) - 1)] = rng.choice(INTERESTING_BYTES)
            elif choice == 2:  # insert random bytes
                out[position:position] = rng.randbytes(rng.choice((1, 2, 4, 8, 32)))
            elif choice == 3 and out:  # delete a range
                del out[position : position + rng.choice((1, 2, 4, 16, 64))]
            elif choice == 4 and len(out) > 6:  # a frame length (or any 4 bytes) rewritten
                at = rng.choice((2, rng.randrange(len(out) - 4)))
                value = rng.choice(INTERESTING_LENGTHS) % 2**32
                out[at : at + 4] = value.to_bytes(4, "big")
            elif choice == 5 and out:  # duplicate a range
                end = position + rng.choice((1, 4, 16, 64))
                out[position:position] = out[position:end]
            elif choice == 6 and self.corpus:  # splice another input's tail
                other = rng.choice(self.corpus)
                cut = rng.randrange(len(other) + 1)
                out = out[:position] + bytearray(other[cut:])
            elif choice == 7 and len(out) >= 2:  # another mode or another cutting
                out[rng.randrange(2)] = rng.randrange(256)
            elif choice == 8 and out:  # a small integer nudged
                at = min(position, len(out) - 1)
                out[at] = (out[at] + rng.choice((-1, 1, 16, -16))) % 256
        return bytes(out[: 1 << 16])


# --- running it -------------------------------------------------------------------------------


def run_builtin(seed: int, *, max_inputs: int | None, seconds: float | None) -> FuzzStats:
    return CoverageFuzzer(one_input, seed_inputs(), seed).run(
        max_inputs=max_inputs, seconds=seconds
    )


def run_atheris(args: argparse.Namespace, extra: list[str]) -> int:  # pragma: no cover
    import atheris

    corpus = Path(args.corpus)
    corpus.mkdir(parents=True, exist_ok=True)
    for n, data in enumerate(seed_inputs()):
        (corpus / f"seed-{n:03d}").write_bytes(data)
    libfuzzer_args = [sys.argv[0], str(corpus), f"-seed={args.seed}", *extra]
    if args.inputs is not None:
        libfuzzer_args.append(f"-runs={args.inputs}")
    if args.seconds is not None:
        libfuzzer_args.append(f"-max_total_time={int(args.seconds)}")

    def target(data: bytes) -> None:
        one_input(data)

    atheris.instrument_all()
    atheris.Setup(libfuzzer_args, target)
    atheris.Fuzz()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=("auto", "atheris", "builtin"), default="auto")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--inputs", type=int, default=None, help="stop after N inputs")
    parser.add_argument("--seconds", type=float, default=None, help="stop after S seconds")
    parser.add_argument("--corpus", default=os.path.join("build", "fuzz-decoder-corpus"))
    args, extra = parser.parse_known_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    args.seed = seed
    engine = args.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401
        except ImportError:
            engine = "builtin"
        else:
            engine = "atheris"
    print(f"fuzzing the decoder with {engine}, seed {seed}", flush=True)
    if engine == "atheris":
        return run_atheris(args, extra)
    seconds = args.seconds if args.seconds is not None or args.inputs else 60.0
    stats = run_builtin(seed, max_inputs=args.inputs, seconds=seconds)
    print(stats.summary())
    for data, trace in stats.findings[:5]:
        print(f"input {data.hex()}:\n{trace}")
    if stats.findings:
        print(f"replay: bin/fuzz-decoder --engine builtin --seed {seed}")
    return 1 if stats.findings else 0


if __name__ == "__main__":
    sys.exit(main())
