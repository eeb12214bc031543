"""Seeded random histories over three real nodes, and kill -9 crash trials (issue 6, 1 and 2).

A history is a list of operations generated from a seed alone (`make_history`), so a seed
replays the same operations: `bin/soak --seed S`. The operations run against real daemons
(`tests.daemons.SyncNode`, watchers off) and real `ironsync sync` commands; then every node is
synced to quiescence and checked (`check_history`).

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
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
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
QUIESCENCE_SYNCS = 24
QUIET_SYNCS = 4  # in a row: every node once, one twice

Op = list[Any]  # ["kind", node, ...]: JSON, so a history prints and replays as it is


# --- generation: the seed alone --------------------------------------------------------------


def make_history(seed: int, length: int = 14) -> list[Op]:
    """The operations of history `seed`. A pure function of the seed."""
    rng = random.Random(seed)
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
    kinds = list(weights)
    # a start: a few files on each node and one daemon up, so later ops find files to change
    for i, node in enumerate(NODES):
        rel = rng.choice(FILES)
        ops.append(
            ["create", node, rel, f"<{seed}:p{i}>", rng.randint(1, 3000), rng.getrandbits(32)]
        )
    ops.append(["start", rng.choice(NODES)])
    ops.append(["sync", rng.choice(NODES[1:]), NODES[0]])
    for i in range(length):
        kind = rng.choices(kinds, [weights[k] for k in kinds])[0]
        node = rng.choice(NODES)
        tag = f"<{seed}:{i}>"
        if kind in ("create", "edit", "append", "truncate", "delete"):
            size = rng.choice(
                (rng.randint(1, 3000), rng.randint(1, 3000), rng.randint(40_000, 90_000))
            )
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

    @property
    def ok(self) -> bool:
        return not self.failures

    def replay(self) -> str:
        return f"bin/soak --seed {self.seed} --ops {self.length}  # ops: {json.dumps(self.ops)}"


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
    """Three nodes under `base`, the model, and the operations applied to them."""

    def __init__(self, base: Path, seed: int, ops: list[Op], length: int) -> None:
        self.base = base
        self.result = HistoryResult(seed, ops, length)
        self.model = ContentModel()
        self.nodes = {name: SyncNode(base, name) for name in NODES}
        for name, node in self.nodes.items():
            node.peers = [o.address for n, o in self.nodes.items() if n != name]
            node.write_config()
        self.all_peers = {name: list(node.peers) for name, node in self.nodes.items()}

    # every op reads the disk first: what it replaces is what that node had seen

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
            check = subprocess.run(
                ["sqlite3", str(node.db_path), "PRAGMA integrity_check;"],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            if check.stdout.strip() != "ok":
                fail(f"{name}: integrity_check: {check.stdout.strip()} {check.stderr.strip()}")
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


def run_history(seed: int, base: Path | None = None, length: int = 14) -> HistoryResult:
    """Generate, run, quiesce and check history `seed` under `base` (a temp dir by default)."""
    ops = make_history(seed, length)
    owned = base is None
    base = Path(tempfile.mkdtemp(prefix=f"ironsync-h{seed}-")) if base is None else base
    history = History(base, seed, ops, length)
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
        now = _read(receiver.root / "big.bin")
        if now == new:
            result.state = "new"
        elif now == old or (fresh_file and now is None):
            result.state = "old"
        else:
            got = None if now is None else len(now)
            fail(f"after the kill, big.bin is neither old nor new ({got} bytes)")
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
            check = subprocess.run(
                ["sqlite3", str(node.db_path), "PRAGMA integrity_check;"],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            if check.stdout.strip() != "ok":
                fail(f"{node.node_id}: integrity_check: {check.stdout.strip()}")
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
