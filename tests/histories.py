"""Seeded random histories over three real nodes, and kill -9 crash trials (issue 6, 1 and 2).

A history is a list of operations generated from a seed alone (`make_history`), so a seed
replays the same operations: `bin/soak --seed S`. The operations run against real daemons
(`tests.daemons.SyncNode`, watchers off) and real `ironsync sync` commands; then every node is
synced to quiescence and checked (`check_history`).

Live histories (`live=True`, `bin/soak --seed S --live`) run the daemons with their watchers
on (a short delay, `LIVE_DELAY`), every daemon up from the start, and interleave `wait` ops
with the others: a change made in a running daemon's folder reaches the other running daemons
while the history goes on (ChangeNotice, then a pull), racing later ops, stops, kills and
explicit syncs. After the last op the nodes settle (no file changes for a while), then are
quiesced and checked exactly like the others. A file op holds the daemons of the nodes it
touches stopped (SIGSTOP, `frozen`) while it reads and writes, so what the model records as
replaced is exactly what that node's disk held at that moment, never a live pull's content
that landed between the read and the write.

The model (`ContentModel`) keys every content ever written by its bytes. A content is
*superseded* when an operation on a node overwrote, truncated, appended to or deleted a file
that held it on that node's disk at that moment (that node had seen it: causality is what the
disk showed, not what we think sync did). After quiescence, every content that is written and
not superseded must be in the tree of every node: under its name or as a conflict copy. A
content found only in `.ironsync/versions/` fails: that folder is the right place only for a
content a peer's change replaced, and such a content is superseded. Superseded contents may be
anywhere or nowhere; they are counted (in versions, live, gone), not checked.

Empty folders are not synced (ironsync syncs files only): mkdir/rmdir operations only shape the
trees, and the trees are compared file by file.

Crash trials (`crash_trial`): a receiver running `ironsync sync` standalone is killed with
SIGKILL at a named point of a pull (`IRONSYNC_TEST_CRASH_AT`, read in one place:
`ironsync.sync.transfer._crash_point`) or at a random moment once its temporary file exists;
the target must then be the old or the new content, never a mix, and the next sync converges.

Sender crash trials (`sender_crash_trial`, `bin/soak --sender-crash-seed S`): the SENDING
daemon is killed with SIGKILL at a random moment while a peer pulls from it (or while it
writes a pull of its own); the receiving sync must end with a sane exit code and a report,
both targets be old or new, no temporary file be left, and a restart and a sync converge.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import IRONSYNC
from tests.daemons import SyncNode, tree, write

NODES = ("n0", "n1", "n2")
FILES = ("f0.txt", "f1.txt", "a/f2.txt", "a/b/f3.txt", "c/f4.bin", "d/f5.txt")
DIRS = ("a", "a/b", "c", "d", "e", "e/f")
CONFLICT_MARKER = ".sync-conflict-"
VERSIONS = Path(".ironsync") / "versions"
CRASH_POINTS = (
    "before_temp",
    "mid_chunk",
    "after_verify",
    "before_rename",
    "after_rename",
    "mid_transaction",
)
FILE_OPS = (
    "create", "edit", "append", "truncate", "rename", "move", "delete", "mkdir", "rmdir",
    "concurrent",
)  # fmt: skip
LIVE_DELAY = 0.3  # s: the watchers' debounce in live histories
SETTLE_MAX_S = 30.0
QUIESCENCE_SYNCS = 24
QUIET_SYNCS = 4  # in a row: every node once, one twice

Op = list[Any]  # ["kind", node, ...]: JSON, so a history prints and replays as it is


# --- generation: the seed alone --------------------------------------------------------------


def make_history(seed: int, length: int = 14, *, live: bool = False) -> list[Op]:
    """The operations of history `seed`. A pure function of the seed (and `live`).

    `live`: a history for nodes whose watchers are on (its own random stream, so live seed S
    and history seed S are unrelated): every daemon starts in the prelude, daemons are rarely
    stopped, and `wait` ops (a pause of some ms) let changes propagate between operations, or
    not: many ops follow each other faster than the watcher's delay."""
    rng = random.Random(f"live:{seed}" if live else seed)
    ops: list[Op] = []
    weights = {
        "create": 6,
        "edit": 4,
        "append": 3,
        "truncate": 2,
        "rename": 2,
        "move": 2,
        "delete": 3,
        "mkdir": 1,
        "rmdir": 1,
        "concurrent": 3,
        "sync": 7,
        "stop": 1,
        "start": 2,
        "restart": 1,
        "kill": 1,
    }
    if live:
        weights.update(sync=3, start=3, wait=8)
    kinds = list(weights)
    # a start: a few files on each node and one daemon up (every daemon when live), so later
    # ops find files to change
    for i, node in enumerate(NODES):
        rel = rng.choice(FILES)
        ops.append(
            ["create", node, rel, f"<{seed}:p{i}>", rng.randint(1, 3000), rng.getrandbits(32)]
        )
    if live:
        ops += [["start", node] for node in rng.sample(NODES, len(NODES))]
    else:
        ops.append(["start", rng.choice(NODES)])
        ops.append(["sync", rng.choice(NODES[1:]), NODES[0]])
    for i in range(length):
        kind = rng.choices(kinds, [weights[k] for k in kinds])[0]
        node = rng.choice(NODES)
        tag = f"<{seed}:{i}>"
        if kind in ("create", "edit", "append", "truncate", "delete"):
            sizes = [rng.randint(1, 3000), rng.randint(1, 3000), rng.randint(40_000, 90_000)]
            if live:  # now and then a file whose pull takes a while, for ops to race
                sizes.append(rng.randint(1_000_000, 3_000_000))
                size = rng.choices(sizes, [4, 4, 4, 1])[0]
            else:
                size = rng.choice(sizes)
            ops.append([kind, node, rng.choice(FILES), tag, size, rng.getrandbits(32)])
        elif kind == "concurrent":
            other = rng.choice([n for n in NODES if n != node])
            ops.append([kind, node, other, rng.choice(FILES), tag, rng.getrandbits(32)])
        elif kind == "rename":
            src = rng.choice(FILES)
            folder = src.rpartition("/")[0]
            dst = (folder + "/" if folder else "") + f"r{rng.randint(0, 2)}.txt"
            ops.append([kind, node, src, dst])
        elif kind == "move":
            ops.append([kind, node, rng.choice(FILES), rng.choice(FILES)])
        elif kind in ("mkdir", "rmdir"):
            ops.append([kind, node, rng.choice(DIRS)])
        elif kind == "sync":
            other = rng.choice([n for n in NODES if n != node])
            ops.append([kind, node, other])
        elif kind == "wait":  # ms: shorter than the watcher's delay, about it, or longer
            ops.append([kind, node, rng.choice((rng.randint(0, 150), rng.randint(200, 900),
                                                rng.randint(1000, 2500)))])  # fmt: skip
        else:
            ops.append([kind, node])
    return ops


# --- the model -------------------------------------------------------------------------------


def digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=10).hexdigest()


@dataclass
class ContentModel:
    """Every content ever written (by digest), and which are superseded."""

    written: dict[str, str] = field(default_factory=dict)  # digest -> "op i on node"
    superseded: set[str] = field(default_factory=set)

    def wrote(self, data: bytes, how: str) -> None:
        key = digest(data)
        self.written.setdefault(key, how)
        self.superseded.discard(key)  # written again (a truncation back to an old prefix)

    def supersede(self, data: bytes | None) -> None:
        if data is not None:
            self.superseded.add(digest(data))

    def required(self) -> set[str]:
        return set(self.written) - self.superseded


# --- running a history -----------------------------------------------------------------------


@dataclass
class HistoryResult:
    seed: int
    ops: list[Op]
    length: int
    applied: int = 0
    conflicts: int = 0
    failures: list[str] = field(default_factory=list)
    notes: dict[str, int] = field(default_factory=dict)
    timings: dict[str, int] = field(default_factory=dict)  # ms per op kind
    superseded_live: list[str] = field(default_factory=list)  # to look at: resurrections?
    live: bool = False

    @property
    def ok(self) -> bool:
        return not self.failures

    def replay(self) -> str:
        return f"{replay_command(self.seed, self.length, self.live)}  # ops: {json.dumps(self.ops)}"


def replay_command(seed: int, length: int, live: bool) -> str:
    """The `bin/soak` line that runs history `seed` again."""
    return f"bin/soak --seed {seed} --ops {length}" + (" --live" if live else "")


def _data(tag: str, size: int, salt: int) -> bytes:
    rng = random.Random(salt)
    head = tag.encode() + b"\n"
    return head + rng.randbytes(max(0, size - len(head)))


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes() if path.is_file() and not path.is_symlink() else None
    except OSError:
        return None


class History:
    """Three nodes under `base`, the model, and the operations applied to them.

    `live`: the daemons watch their folders (`LIVE_DELAY` s), so a change made while a daemon
    runs reaches the other running daemons by itself (ChangeNotice, then a pull)."""

    def __init__(
        self, base: Path, seed: int, ops: list[Op], length: int, *, live: bool = False
    ) -> None:
        self.base = base
        self.live = live
        self.result = HistoryResult(seed, ops, length, live=live)
        self.model = ContentModel()
        watch: dict[str, Any] = {"watcher": True, "delay": LIVE_DELAY} if live else {}
        self.nodes = {name: SyncNode(base, name, **watch) for name in NODES}
        for name, node in self.nodes.items():
            node.peers = [o.address for n, o in self.nodes.items() if n != name]
            node.write_config()
        self.all_peers = {name: list(node.peers) for name, node in self.nodes.items()}

    # every op reads the disk first: what it replaces is what that node had seen. A running
    # daemon (a live pull) could replace a file between that read and the op's write: `apply`
    # holds the daemons of the nodes an op touches stopped (SIGSTOP) while it reads and writes.

    def _write_file(self, node: SyncNode, rel: str, data: bytes, how: str) -> None:
        path = node.root / rel
        if path.is_dir():
            return
        self.model.supersede(_read(path))
        try:
            write(node.root, rel, data)
        except (NotADirectoryError, FileExistsError, IsADirectoryError):
            return  # a file where a folder should be: the op does nothing
        self.model.wrote(data, how)
        self.result.applied += 1

    def apply(self, i: int, op: Op) -> None:
        kind, name = op[0], op[1]
        if kind in FILE_OPS:
            touched = [self.nodes[name]] + ([self.nodes[op[2]]] if kind == "concurrent" else [])
            with frozen(*touched):
                self._apply(i, op)
        else:
            self._apply(i, op)

    def _apply(self, i: int, op: Op) -> None:
        kind, name = op[0], op[1]
        node = self.nodes[name]
        how = f"op {i} {kind} on {name}"
        if kind == "create":
            _, _, rel, tag, size, salt = op
            self._write_file(node, rel, _data(tag, size, salt), how)
        elif kind in ("edit", "append", "truncate"):
            _, _, rel, tag, size, salt = op
            old = _read(node.root / rel)
            if old is None:
                return
            patch = _data(tag, min(size, 200), salt)
            if kind == "edit":  # in place: same length unless the patch is longer
                at = random.Random(salt).randint(0, max(0, len(old) - len(patch)))
                new = old[:at] + patch + old[at + len(patch) :]
            elif kind == "append":
                new = old + patch
            else:
                new = old[: random.Random(salt).randint(0, len(old) - 1)] if old else b""
            path = node.root / rel
            self.model.supersede(old)
            with open(path, "r+b") as f:  # in place: same inode
                if kind == "truncate":
                    f.truncate(len(new))
                else:
                    f.write(new)
            self.model.wrote(new, how)
            self.result.applied += 1
        elif kind == "concurrent":
            _, _, other, rel, tag, salt = op
            for n, who in enumerate((name, other)):
                target = self.nodes[who]
                if _read(target.root / rel) is not None or n == 0:
                    data = _data(f"{tag}{who}", 300 + n, salt + n)
                    self._write_file(target, rel, data, f"{how} ({who})")
                    time.sleep(0.01)  # distinct mtimes
        elif kind in ("rename", "move"):
            _, _, src, dst = op
            source, dest = node.root / src, node.root / dst
            if _read(source) is None or src == dst or dest.is_dir():
                return
            self.model.supersede(_read(dest))  # a rename over a file replaces it
            dest.parent.mkdir(parents=True, exist_ok=True)
            source.rename(dest)
            self.result.applied += 1
        elif kind == "delete":
            path = node.root / op[2]
            old = _read(path)
            if old is None:
                return
            self.model.supersede(old)
            path.unlink()
            self.result.applied += 1
        elif kind == "mkdir":
            try:
                (node.root / op[2]).mkdir(parents=True, exist_ok=True)
                self.result.applied += 1
            except (FileExistsError, NotADirectoryError):
                pass
        elif kind == "rmdir":
            try:
                (node.root / op[2]).rmdir()
                self.result.applied += 1
            except OSError:
                pass  # not empty, absent or a file
        elif kind == "sync":
            self.sync_pair(node, self.nodes[op[2]])
            self.result.applied += 1
        elif kind in ("stop", "kill"):
            if node.proc is not None:
                node.stop(signal.SIGKILL if kind == "kill" else signal.SIGTERM)
                self.result.applied += 1
        elif kind == "start":
            if node.proc is None:
                self.start(node)
                self.result.applied += 1
        elif kind == "restart":
            if node.proc is not None:
                node.stop()
            self.start(node)
            self.result.applied += 1
        elif kind == "wait":
            time.sleep(op[2] / 1000)
            self.result.applied += 1
        else:
            raise ValueError(f"unknown op {op!r}")

    def start(self, node: SyncNode) -> None:
        before = _count_events(node, "sync_finished")
        node.start()
        # its start-up syncs run in the background: let them end so ops do not race them
        running = sum(1 for n in self.nodes.values() if n is not node and n.proc is not None)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and running:
            if _count_events(node, "sync_finished") - before >= running:
                break
            time.sleep(0.05)

    def sync_pair(self, x: SyncNode, y: SyncNode) -> None:
        """`ironsync sync` on x: through its daemon (every running peer) if it runs, else
        standalone with y as its only peer."""
        if x.proc is None:
            x.peers = [y.address]
            x.write_config()
        try:
            proc = x.run("sync", "--json", check=False)
        finally:
            x.peers = self.all_peers[x.node_id]
            x.write_config()
        self._count_sync(x, proc)

    def _count_sync(self, x: SyncNode, proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
        notes = self.result.notes
        key = f"sync_exit_{proc.returncode}"
        notes[key] = notes.get(key, 0) + 1
        if proc.returncode not in (0, 1, 3):
            self.result.failures.append(
                f"{x.node_id}: sync exited {proc.returncode}: {proc.stderr[-2000:]}"
            )
            return {}
        try:
            out = json.loads(proc.stdout)
        except ValueError:
            self.result.failures.append(f"{x.node_id}: sync printed no JSON: {proc.stderr[-2000:]}")
            return {}
        for r in out.get("results", []):
            self.result.conflicts += r.get("conflicts", 0)
        return out

    def settle(self) -> None:
        """Live: let the watchers and the live pulls finish: every tree (temporary files
        included) unchanged for a while, within SETTLE_MAX_S."""
        quiet_for = max(1.0, 3 * LIVE_DELAY)
        deadline = time.monotonic() + SETTLE_MAX_S
        last, since = None, time.monotonic()
        while time.monotonic() < deadline:
            now = [_snapshot(node.root) for node in self.nodes.values()]
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet_for:
                return
            time.sleep(0.1)
        self.result.notes["settle_timeout"] = self.result.notes.get("settle_timeout", 0) + 1

    def quiesce(self) -> None:
        """Every daemon up; `sync` on each node in turn until QUIET_SYNCS syncs in a row (every
        node at least once, each with both peers) changed nothing and converged."""
        for node in self.nodes.values():
            if node.proc is None:
                self.start(node)
        quiet = 0
        order = list(self.nodes.values())
        for n in range(QUIESCENCE_SYNCS):
            node = order[n % len(order)]
            proc = node.run("sync", "--json", check=False)
            out = self._count_sync(node, proc)
            changed = 0 if proc.returncode == 0 else 1
            for r in out.get("results", []):
                changed += r.get("pulled", 0) + r.get("deleted", 0) + r.get("peer_changed", 0)
            quiet = quiet + 1 if changed == 0 else 0
            if quiet == QUIET_SYNCS:
                return
        self.result.failures.append(f"no quiescence after {QUIESCENCE_SYNCS} syncs")

    def check(self) -> None:
        fail = self.result.failures.append
        for node in self.nodes.values():
            if node.proc is not None:
                node.stop()
        trees = {name: tree(node.root) for name, node in self.nodes.items()}
        first = trees[NODES[0]]
        for name in NODES[1:]:
            if trees[name] != first:
                diff = sorted(
                    p for p in set(first) | set(trees[name]) if first.get(p) != trees[name].get(p)
                )
                fail(f"trees of {NODES[0]} and {name} differ at {diff}")
        for name, node in self.nodes.items():
            temps = [
                str(Path(d, f).relative_to(node.root))
                for d, _, files in os.walk(node.root)
                for f in files
                if f.startswith(".ironsync-") and f.endswith(".tmp")
            ]
            if temps:
                fail(f"{name}: temporary files left: {temps}")
            _check_integrity(node, fail)
        for name, node in self.nodes.items():
            live = {digest(data): rel for rel, data in trees[name].items()}
            kept = _versions(node.root)
            for key in sorted(self.model.required()):
                if key in live:
                    if CONFLICT_MARKER in live[key]:
                        self.result.notes["required_in_conflict_copy"] = (
                            self.result.notes.get("required_in_conflict_copy", 0) + 1
                        )
                    continue
                where = "only in .ironsync/versions" if key in kept else "nowhere"
                fail(f"{name}: content of {self.model.written[key]} is lost ({where})")
            for key in self.model.superseded & set(self.model.written):
                if key in live and name == NODES[0]:
                    self.result.superseded_live.append(f"{self.model.written[key]} at {live[key]}")
                bucket = (
                    "superseded_live" if key in live
                    else "superseded_in_versions" if key in kept
                    else "superseded_gone"
                )  # fmt: skip
                self.result.notes[bucket] = self.result.notes.get(bucket, 0) + 1

    def close(self) -> None:
        for node in self.nodes.values():
            if node.proc is not None:
                node.stop(signal.SIGKILL)


@contextlib.contextmanager
def frozen(*nodes: SyncNode) -> Iterator[None]:
    """The running daemons of `nodes` stopped (SIGSTOP, every thread seen stopped) inside,
    continued (SIGCONT) after: nothing but the caller changes their folders meanwhile."""
    pids = [node.proc.pid for node in nodes if node.proc is not None and node.proc.poll() is None]
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        for pid in pids:
            _wait_stopped(pid)
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def _wait_stopped(pid: int, timeout: float = 5.0) -> None:
    """Until every thread of `pid` is stopped (state T) or gone: kill() returns before a
    thread running on another CPU has stopped."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            states = []
            for task in os.scandir(f"/proc/{pid}/task"):
                with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                    stat = Path(task.path, "stat").read_text()
                    states.append(stat.rpartition(")")[2].split()[0])
        except FileNotFoundError:
            return  # gone
        if all(state in ("T", "t", "Z", "X") for state in states):
            return
        time.sleep(0.001)
    raise TimeoutError(f"process {pid} did not stop")


def _snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every file under `root` (temporary files and .ironsync/ included) by size, mtime, inode."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                st = os.stat(os.path.join(dirpath, name), follow_symlinks=False)
                out[os.path.join(dirpath, name)] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return out


def _old_or_new(
    path: Path, old: bytes, new: bytes, fresh: bool, fail: Callable[[str], None], whose: str
) -> str:
    """ "new" or "old" (absent counts as old for a file the pull creates); else a failure."""
    now = _read(path)
    if now == new:
        return "new"
    if now == old or (fresh and now is None):
        return "old"
    got = None if now is None else len(now)
    fail(f"after the kill, {whose}{path.name} is neither old nor new ({got} bytes)")
    return "mixed"


def _versions(root: Path) -> set[str]:
    found = set()
    for d, _, files in os.walk(root / VERSIONS):
        for f in files:
            data = _read(Path(d, f))
            if data is not None:
                found.add(digest(data))
    return found


def _count_events(node: SyncNode, kind: str) -> int:
    proc = subprocess.run(
        ["sqlite3", f"file:{node.db_path}?mode=ro", f"SELECT count(*) FROM events WHERE kind='{kind}'"],  # noqa: E501
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    try:
        return int(proc.stdout.strip() or 0)
    except ValueError:
        return 0


def run_history(
    seed: int, base: Path | None = None, length: int = 14, *, live: bool = False
) -> HistoryResult:
    """Generate, run, quiesce and check history `seed` under `base` (a temp dir by default);
    `live`: with the daemons' watchers on (`make_history(..., live=True)`), settled first."""
    ops = make_history(seed, length, live=live)
    owned = base is None
    prefix = f"ironsync-{'l' if live else 'h'}{seed}-"
    base = Path(tempfile.mkdtemp(prefix=prefix)) if base is None else base
    history = History(base, seed, ops, length, live=live)
    try:
        for i, op in enumerate(ops):
            try:
                t0 = time.monotonic()
                history.apply(i, op)
                key = f"ms_{op[0]}"
                ms = int((time.monotonic() - t0) * 1000)
                history.result.timings[key] = history.result.timings.get(key, 0) + ms
            except Exception as exc:  # a node that would not start, a command that hung
                history.result.failures.append(f"op {i} {op!r}: {exc!r}"[:3000])
                return history.result
        if live:
            t0 = time.monotonic()
            history.settle()
            history.result.timings["ms_settle"] = int((time.monotonic() - t0) * 1000)
            history.result.notes["writes_before_quiescence"] = sum(
                _count_events(node, "write_finished") for node in history.nodes.values()
            )  # before the quiescence syncs: by start-up syncs, explicit syncs, live pulls
        t0 = time.monotonic()
        history.quiesce()
        history.result.timings["ms_quiesce"] = int((time.monotonic() - t0) * 1000)
        t0 = time.monotonic()
        history.check()
        history.result.timings["ms_check"] = int((time.monotonic() - t0) * 1000)
    finally:
        history.close()
        if owned and history.result.ok:
            shutil.rmtree(base, ignore_errors=True)
    if not history.result.ok:
        history.result.failures.append(f"nodes kept at {base}")
    return history.result


# --- crash trials ----------------------------------------------------------------------------


@dataclass
class CrashResult:
    seed: int
    point: str
    killed: bool = False
    state: str = ""  # "old" or "new" after the kill
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def replay(self) -> str:
        return f"bin/soak --crash-seed {self.seed}  # point {self.point}"


def crash_trial(seed: int, base: Path | None = None, *, small: bool = False) -> CrashResult:
    """Kill -9 a receiving `ironsync sync` during a pull; check old-or-new, then convergence.

    The point is `CRASH_POINTS[seed % 6]` through the hook, or, for every seventh seed, a
    random moment after the temporary file appears (no hook). `small`: smaller files (CI)."""
    rng = random.Random(seed)
    point = "random" if seed % 7 == 6 else CRASH_POINTS[seed % len(CRASH_POINTS)]
    result = CrashResult(seed, point)
    owned = base is None
    base = Path(tempfile.mkdtemp(prefix=f"ironsync-c{seed}-")) if base is None else base
    sender, receiver = SyncNode(base, "sender"), SyncNode(base, "receiver")
    receiver.add_peers(sender)
    fail = result.failures.append
    try:
        size = rng.randint(3_000_000, 6_000_000)
        if point == "random":  # big enough for a kill to land mid-pull
            size = 12_000_000 if small else 40_000_000
        old = rng.randbytes(size)
        fresh_file = rng.random() < 0.25  # the pull creates the file rather than replacing it
        if not fresh_file:
            write(sender.root, "big.bin", old)
        sender.start()
        receiver.sync()
        if fresh_file:
            new = rng.randbytes(size)
        else:  # an edit in the middle: most chunks are reused from the old file
            at = rng.randint(0, size - 100_000)
            new = old[:at] + rng.randbytes(rng.randint(1_200_000, 3_000_000)) + old[at + 50_000 :]
        write(sender.root, "big.bin", new)
        env = receiver.env()
        if point != "random":
            env["IRONSYNC_TEST_CRASH_AT"] = point
        proc = subprocess.Popen(
            [*IRONSYNC, "sync"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        if point == "random":
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None:
                if any(p.name.startswith(".ironsync-") for p in receiver.root.iterdir()):
                    break
                time.sleep(0.005)
            time.sleep(rng.random() ** 3 * 0.2)  # mostly early: pulls are fast here
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
        code = proc.wait(timeout=120)
        result.killed = code == -signal.SIGKILL
        result.state = _old_or_new(receiver.root / "big.bin", old, new, fresh_file, fail, "")
        again = receiver.run("sync", "--json", check=False)
        if again.returncode != 0:
            fail(f"the sync after the crash exited {again.returncode}: {again.stdout[-1500:]}")
        if tree(receiver.root) != tree(sender.root) or _read(receiver.root / "big.bin") != new:
            fail("not converged after the crash")
        temps = [p.name for p in receiver.root.rglob(".ironsync-*.tmp")]
        if temps:
            fail(f"temporary files left: {temps}")
        for node in (sender, receiver):
            if node is sender:
                node.stop()
            _check_integrity(node, fail)
    except Exception as exc:
        fail(f"{exc!r}"[:3000])
    finally:
        if sender.proc is not None:
            sender.stop(signal.SIGKILL)
        if owned and result.ok:
            shutil.rmtree(base, ignore_errors=True)
    if not result.ok:
        fail(f"nodes kept at {base}")
    return result


# --- sender crash trials ---------------------------------------------------------------------

SENDER_VARIANTS = ("serving", "serving_to_daemon", "writing")


@dataclass
class SenderCrashResult:
    seed: int
    variant: str
    small: bool = False
    fresh: bool = False  # the pull creates big.bin (every byte from the sender), else an edit
    killed: bool = False  # the sender died while the receiving sync still ran
    mid_write: bool = False  # ... and the temporary file watched was still there
    at: float = 0.0  # the share of the file the temporary file held when the kill was aimed
    exit_code: int | None = None  # of the receiving `ironsync sync`
    state: str = ""  # the receiver's target after the kill: "old" or "new"
    sender_state: str = ""  # "writing": the sender's own target after the kill
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def replay(self) -> str:
        small = " --small" if self.small else ""
        return f"bin/soak --sender-crash-seed {self.seed}{small}  # {self.variant}"


def sender_crash_trial(
    seed: int, base: Path | None = None, *, small: bool = False
) -> SenderCrashResult:
    """Kill -9 the SENDING daemon while a peer pulls from it; check what both sides are left
    with, then that a restart and a sync converge.

    The variant is `SENDER_VARIANTS[seed % 3]`:
    - `serving`: the receiver runs `ironsync sync` standalone; the sender's daemon is killed
      at a random moment once the receiver's temporary file exists. The sync must end (no
      hang) with exit 0 (only if it got the whole file), 1 or 3, with its JSON and no
      traceback; the receiver's target is old or new; no temporary file is left.
    - `serving_to_daemon`: the same, the receiver a daemon (the sync goes through it); the
      receiver's daemon must survive.
    - `writing`: both run daemons and both changed a file; the receiver's sync pulls the
      sender's change, then asks the sender to pull its own (SyncRequest): the sender is
      killed while its daemon writes that pull (once its temporary file exists). Its target
      must be old or new, and its next start removes the temporary file.
    `small`: smaller files (CI)."""
    rng = random.Random(f"sender:{seed}")
    variant = SENDER_VARIANTS[seed % len(SENDER_VARIANTS)]
    result = SenderCrashResult(seed, variant, small)
    owned = base is None
    base = Path(tempfile.mkdtemp(prefix=f"ironsync-s{seed}-")) if base is None else base
    sender, receiver = SyncNode(base, "sender"), SyncNode(base, "receiver")
    receiver.add_peers(sender)
    if variant == "writing":
        sender.add_peers(receiver)
    fail = result.failures.append
    size = rng.randint(12_000_000, 20_000_000) if small else rng.randint(30_000_000, 50_000_000)
    try:
        old = rng.randbytes(size)
        # the pull creates the file: every byte comes from the sender, so the pull lasts
        fresh_file = result.fresh = variant != "writing" and rng.random() < 0.5
        if not fresh_file:
            write(sender.root, "big.bin", old)
        mine_old = rng.randbytes(size)
        if variant == "writing":
            write(receiver.root, "mine.bin", mine_old)
        sender.start()
        if variant != "serving":
            receiver.start()
            _wait_first_sync(receiver, sender)
        if variant == "writing":  # it dialed a peer not up yet: wait out its back-off
            _wait_first_sync(sender, receiver)
        receiver.sync()
        if variant == "writing":
            sender.sync()  # both hold both files
        new = _changed(rng, old, size, fresh_file)
        write(sender.root, "big.bin", new)
        mine_new = _changed(rng, mine_old, size, True)  # the sender's pull lasts
        if variant == "writing":
            write(receiver.root, "mine.bin", mine_new)
        out, err = base / "receiver-sync.out", base / "receiver-sync.err"
        with open(out, "wb") as stdout, open(err, "wb") as stderr:
            proc = subprocess.Popen(
                [*IRONSYNC, "sync", "--json"], env=receiver.env(), stdout=stdout, stderr=stderr
            )
        # a random moment of the pull, by its progress (pulls take some ms here, so a delay
        # would mostly land after it): once the temporary file holds that share of the file
        watched = sender.root if variant == "writing" else receiver.root
        result.at = rng.random()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None and _temp_size(watched) is None:
            time.sleep(0.001)
        if _temp_size(watched) is None:
            fail(f"no temporary file appeared in {watched.parent.name}'s folder to kill it in")
        while time.monotonic() < deadline and proc.poll() is None:
            written = _temp_size(watched)
            if written is None or written >= result.at * size:
                break
            time.sleep(0.0005)
        result.killed = proc.poll() is None
        result.mid_write = result.killed and _temp_size(watched) is not None
        sender.stop(signal.SIGKILL)
        try:
            code = result.exit_code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            raise AssertionError("the receiving sync hung after the sender died") from None
        stdout_text, stderr_text = out.read_text(), err.read_text()
        if code not in (0, 1, 3):
            fail(f"the receiving sync exited {code}: {stderr_text[-2000:]}")
        if "Traceback" in stderr_text:
            fail(f"the receiving sync printed a traceback: {stderr_text[-2000:]}")
        try:
            report = json.loads(stdout_text)
        except ValueError:
            report = None
            fail(f"the receiving sync printed no JSON: {stdout_text[-500:]} {stderr_text[-1500:]}")
        result.state = _old_or_new(
            receiver.root / "big.bin", old, new, fresh_file, fail, "the receiver's "
        )
        if code == 0 and result.state != "new":
            fail(f"the receiving sync exited 0 but big.bin is {result.state}: {report}")
        temps = [p.name for p in receiver.root.rglob(".ironsync-*.tmp")]
        if temps:
            fail(f"temporary files left on the receiver after its sync: {temps}")
        if receiver.proc is not None and receiver.proc.poll() is not None:
            fail(f"the receiver's daemon died: {receiver.log()[-2000:]}")
        if variant == "writing":
            theirs = _read(sender.root / "mine.bin")
            result.sender_state = (
                "new" if theirs == mine_new else "old" if theirs == mine_old else ""
            )
            if not result.sender_state:
                got = None if theirs is None else len(theirs)
                fail(f"after the kill, the sender's mine.bin is neither old nor new ({got} bytes)")
        else:
            _check_integrity(receiver, fail)
        stale = {p.name for p in sender.root.rglob(".ironsync-*.tmp")}
        sender.start()  # removes the temporary file a kill mid-write left
        # (its start-up sync may already be pulling again, into a temp file of its own)
        temps = stale & {p.name for p in sender.root.rglob(".ironsync-*.tmp")}
        if temps:
            fail(f"temporary files left on the sender after its restart: {temps}")
        again = receiver.run("sync", "--json", check=False)
        if again.returncode != 0:
            fail(f"the sync after the restart exited {again.returncode}: {again.stdout[-1500:]}")
        if variant == "writing":
            sender.run("sync", "--json", check=False)
        expected = {"big.bin": new} | ({"mine.bin": mine_new} if variant == "writing" else {})
        if tree(receiver.root) != expected or tree(sender.root) != expected:
            fail("not converged after the restart")
        for node in (sender, receiver):
            if node.proc is not None:
                node.stop()
            _check_integrity(node, fail)
    except Exception as exc:
        fail(f"{exc!r}"[:3000])
    finally:
        for node in (sender, receiver):
            if node.proc is not None:
                node.stop(signal.SIGKILL)
        if owned and result.ok:
            shutil.rmtree(base, ignore_errors=True)
    if not result.ok:
        fail(f"nodes kept at {base}")
    return result


def _changed(rng: random.Random, old: bytes, size: int, fresh: bool) -> bytes:
    """New content for a file: fresh bytes, or an edit in the middle (most chunks reused)."""
    if fresh:
        return rng.randbytes(size)
    at = rng.randint(0, size - 100_000)
    return old[:at] + rng.randbytes(rng.randint(1_200_000, 3_000_000)) + old[at + 50_000 :]


def _wait_first_sync(node: SyncNode, peer: SyncNode, timeout: float = 30) -> None:
    """Until `node`'s daemon has ended the full sync that opens its session to `peer`: it must
    not start one at a random moment of the trial."""
    deadline = time.monotonic() + timeout
    while f"full sync with {peer.node_id}:" not in node.log():
        if time.monotonic() > deadline:
            raise AssertionError(f"{node.node_id} never synced with {peer.node_id}")
        time.sleep(0.02)


def _temp_size(folder: Path) -> int | None:
    """The size of the (first) temporary file in `folder`, None if there is none."""
    try:
        for entry in os.scandir(folder):
            if entry.name.startswith(".ironsync-") and entry.name.endswith(".tmp"):
                with contextlib.suppress(FileNotFoundError):
                    return entry.stat(follow_symlinks=False).st_size
    except FileNotFoundError:
        pass
    return None


def _check_integrity(node: SyncNode, fail: Callable[[str], None]) -> None:
    """`PRAGMA integrity_check` on the node's database, with the stock sqlite3 shell."""
    check = subprocess.run(
        ["sqlite3", str(node.db_path), "PRAGMA integrity_check;"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if check.stdout.strip() != "ok":
        fail(f"{node.node_id}: integrity_check: {check.stdout.strip()} {check.stderr.strip()}")
