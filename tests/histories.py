"""Seeded random histories over three real nodes, and kill -9 crash trials (issues 6, 1, 2, 11).

A history is a list of operations generated from a seed alone (`make_history`), so a seed
replays the same operations: `bin/soak --seed S`. The operations run against real daemons
(`tests.daemons.SyncNode`, watchers off) and real `ironsync sync` commands; then every node is
synced to quiescence and checked (`History.check`).

The operations are those of a person at a shell, on one node's folder (issue 11 made folders,
symlinks and permission bits part of what is synced): write a file (`create`), change it in
place (`edit`, `append`, `truncate`), `rename`/`move` it, `delete` it, write the same file on
two nodes (`concurrent`); `mkdir`, `rmdir`, `rmtree` (rm -r), `mvdir` (mv of a folder);
`retype` (a path becomes a file, a folder, a folder holding a file, or a symlink, whatever it
was: rm -r of a folder first), `typeclash` (two nodes retype one path to two kinds); `symlink`,
`retarget`, `unlink` (targets relative inside the tree, `.` and `..`, absolute, dangling, and
dangling outside the root); `chmod` (a permission-only change of a file or folder: size and
mtime unchanged); `ignored` (a file matching the nodes' `.ignore`, `*.ign`, which is never
synced). Nothing the harness does goes through a symlink: an op whose path has a link or a file
where a folder should be does nothing. Then the daemon ops: `sync`, `stop`, `start`,
`restart`, `kill` (-9).

Live histories (`live=True`, `bin/soak --seed S --live`) run the daemons with their watchers
on (a short delay, `LIVE_DELAY`), every daemon up from the start, and interleave `wait` ops
with the others: a change made in a running daemon's folder reaches the other running daemons
while the history goes on (ChangeNotice, then a pull), racing later ops, stops, kills and
explicit syncs. After the last op the nodes settle (no change in any tree for a while), then
are quiesced and checked exactly like the others. A disk op holds the daemons of the nodes it
touches stopped (SIGSTOP, `frozen`) while it reads and writes, so what the model records as
replaced is exactly what that node's disk held at that moment, never a live pull's content
that landed between the read and the write.

The checks, after quiescence:
- the trees of all nodes are IDENTICAL (`_entries`): the same paths, each of the same type;
  files with the same contents and permission bits, folders (empty ones too) with the same
  permission bits, symlinks with the same target text. Not compared: folder mtimes (best
  effort), symlink mode bits, ignored files (each node's own). File mtimes that differ are
  counted (`file_mtime_differs`), not failed.
- nothing written is lost (`ContentModel`): every content ever written is keyed by its bytes (a
  symlink's by its target text). A content is *superseded* when an operation on a node
  overwrote, truncated, appended to or removed what held it on that node's disk at that moment
  (that node had seen it: causality is what the disk showed, not what we think sync did): a
  write, move or rename over it, `delete`/`unlink`, `retarget` (the old target), `rmtree` and
  `retype` (everything under the path they replaced), `mvdir` supersedes nothing. Every
  content written and not superseded must be in the tree of every node, under its name or as
  a conflict copy (`NAME.sync-conflict-...`, which is how a file or link that loses its name to
  a folder is kept); an ignored file's content only on its own node. A content found only in
  `.ironsync/versions/` fails: that folder is the right place only for a content a peer's
  change replaced, and such a content is superseded. Superseded contents may be anywhere or
  nowhere; they are counted (in versions, live, gone), not checked.
- no temporary file is left; every database passes `PRAGMA integrity_check`; a scan of every
  node (daemons stopped) finds nothing its index missed; every sync exits 0, 1 or 3, and the
  quiescence syncs end in a row of syncs that exit 0 and change nothing.

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
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ironsync.sync.watcher import BARRIER_DIR
from tests.conftest import IRONSYNC
from tests.daemons import SyncNode, tree, write

NODES = ("n0", "n1", "n2")
FILES = ("f0.txt", "f1.txt", "a/f2.txt", "a/b/f3.txt", "c/f4.bin", "d/f5.txt")
DIRS = ("a", "a/b", "c", "d", "e", "e/f")
LINKS = ("l0", "a/l1", "e/f/l2")
PATHS = FILES + DIRS + LINKS  # what `retype`, `typeclash` and `chmod` pick from
MOVED_DIRS = (*DIRS, "g", "a/h", "e/f/i")  # where `mvdir` moves a folder
NAMES = tuple(dict.fromkeys(PATHS + MOVED_DIRS))  # what an op on an absent path picks from
# what `retype` makes of a path: "dirfile" is a folder holding one new file, `IN_FOLDER`
TYPES = ("file", "dir", "dirfile", "symlink")
IN_FOLDER = "in.txt"
# link targets: relative ones inside the tree (files, folders, its own folder and the parent:
# a loop for anything that follows links), beside absolute, dangling and escaping ones
INSIDE_TARGETS = ("f0.txt", "../f1.txt", "f2.txt", "b/f3.txt", "a", "../c", ".", "..")
FILE_MODES = ("600", "640", "644", "664", "700", "750", "755", "775")  # octal, as chmod reads
DIR_MODES = ("700", "711", "750", "755", "775")  # the owner keeps rwx: a daemon writes inside
MODE_BITS = 0o777  # what is synced: setuid, setgid and sticky are not
IGNORE_RULES = "*.ign\n"  # every node's `.ignore`
IGNORED_NAME = "x.ign"  # what an `ignored` op writes in a folder
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
# ops that change a node's folder: `apply` freezes the daemons of the nodes they touch
DISK_OPS = (
    "create", "edit", "append", "truncate", "rename", "move", "delete", "concurrent",
    "mkdir", "rmdir", "rmtree", "mvdir", "retype", "typeclash", "symlink", "retarget", "unlink",
    "chmod", "ignored", "pair",
)  # fmt: skip
# `pair`: an op on a folder on one node, and one under that folder on another, with no sync
# between them (rm -r, mv, a type change or chmod of the folder; a file, link, folder or
# ignored file made, or a file changed, inside it)
PAIR_FOLDER_OPS = ("rmtree", "mvdir", "retype", "chmod")
PAIR_INNER_OPS = ("create", "edit", "append", "symlink", "mkdir", "ignored", "chmod")
# the ops issue 11 added: folders, links, types, modes (counted apart in `bin/soak`)
TREE_OPS = (
    "mkdir", "rmdir", "rmtree", "mvdir", "retype", "typeclash", "symlink", "retarget", "unlink",
    "chmod", "ignored",
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
        "concurrent": 3,
        "mkdir": 2,
        "rmdir": 1,
        "rmtree": 2,
        "mvdir": 2,
        "retype": 3,
        "typeclash": 2,
        "symlink": 2,
        "retarget": 1,
        "unlink": 1,
        "chmod": 3,
        "ignored": 1,
        "pair": 4,
        "sync": 9,
        "stop": 1,
        "start": 2,
        "restart": 1,
        "kill": 1,
    }
    if live:
        weights.update(sync=4, start=3, wait=10)
    kinds = list(weights)
    # a start: a few files on each node, a folder and a link somewhere, and one daemon up
    # (every daemon when live), so later ops find things to change
    for i, node in enumerate(NODES):
        rel = rng.choice(FILES)
        ops.append(
            ["create", node, rel, f"<{seed}:p{i}>", rng.randint(1, 3000), rng.getrandbits(32)]
        )
    ops.append(["mkdir", rng.choice(NODES), rng.choice(DIRS)])
    ops.append(["symlink", rng.choice(NODES), rng.choice(LINKS), _target(rng, f"<{seed}:p>")])
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
        elif kind in ("mkdir", "rmdir", "rmtree"):
            ops.append([kind, node, rng.choice(DIRS)])
        elif kind == "mvdir":
            ops.append([kind, node, rng.choice(DIRS), rng.choice(MOVED_DIRS)])
        elif kind == "retype":
            rel, to = rng.choice(PATHS), rng.choice(TYPES)
            size, salt = rng.randint(1, 3000), rng.getrandbits(32)
            ops.append([kind, node, rel, to, tag, size, salt, _target(rng, tag)])
        elif kind == "typeclash":  # two kinds (two folders are no clash, but may come)
            other = rng.choice([n for n in NODES if n != node])
            rel, (to, other_to) = rng.choice(PATHS), rng.sample(TYPES, 2)
            salt = rng.getrandbits(32)
            ops.append([kind, node, other, rel, to, other_to, tag, salt, _target(rng, tag)])
        elif kind in ("symlink", "retarget", "unlink"):
            rel = rng.choice(LINKS) if rng.random() < 0.7 else rng.choice(PATHS)
            ops.append([kind, node, rel] + ([] if kind == "unlink" else [_target(rng, tag)]))
        elif kind == "chmod":
            rel = rng.choice(FILES + DIRS)
            ops.append([kind, node, rel, rng.choice(DIR_MODES if rel in DIRS else FILE_MODES)])
        elif kind == "pair":
            other = rng.choice([n for n in NODES if n != node])
            folder = rng.choice(DIRS)
            ops.append([kind, node, other, _folder_op(rng, node, folder, tag),
                        _inner_op(rng, other, folder, tag)])  # fmt: skip
        elif kind == "ignored":
            folder = rng.choice(("", *DIRS))
            ops.append([kind, node, folder, tag, rng.randint(1, 3000), rng.getrandbits(32)])
        elif kind == "sync":
            other = rng.choice([n for n in NODES if n != node])
            ops.append([kind, node, other])
        elif kind == "wait":  # ms: shorter than the watcher's delay, about it, or longer
            ops.append([kind, node, rng.choice((rng.randint(0, 150), rng.randint(200, 900),
                                                rng.randint(1000, 2500)))])  # fmt: skip
        else:
            ops.append([kind, node])
    return ops


def _folder_op(rng: random.Random, node: str, folder: str, tag: str) -> Op:
    """An op of `pair` on `folder` itself (`PAIR_FOLDER_OPS`)."""
    kind = rng.choice(PAIR_FOLDER_OPS)
    if kind == "rmtree":
        return [kind, node, folder]
    if kind == "mvdir":
        return [kind, node, folder, rng.choice([d for d in MOVED_DIRS if d != folder])]
    if kind == "retype":  # the folder becomes a file or a link
        to = rng.choice(("file", "symlink"))
        return [kind, node, folder, to, f"{tag}f", rng.randint(1, 3000), rng.getrandbits(32),
                _target(rng, tag)]  # fmt: skip
    return [kind, node, folder, rng.choice(DIR_MODES)]


def _inner_op(rng: random.Random, node: str, folder: str, tag: str) -> Op:
    """An op of `pair` under `folder` (`PAIR_INNER_OPS`): on a file of `FILES` there, or on
    a new name."""
    kind = rng.choice(PAIR_INNER_OPS)
    inside = [f for f in FILES if f.startswith(folder + "/")] or [f"{folder}/p.txt"]
    size, salt = rng.randint(1, 3000), rng.getrandbits(32)
    if kind == "create":
        return [kind, node, rng.choice([*inside, f"{folder}/p.txt"]), f"{tag}i", size, salt]
    if kind in ("edit", "append"):
        return [kind, node, rng.choice(inside), f"{tag}i", size, salt]
    if kind == "symlink":
        return [kind, node, f"{folder}/pl", _target(rng, tag)]
    if kind == "mkdir":
        return [kind, node, f"{folder}/pd"]
    if kind == "ignored":
        return [kind, node, folder, f"{tag}i", size, salt]
    return [kind, node, rng.choice(inside), rng.choice(FILE_MODES)]


def _target(rng: random.Random, tag: str) -> str:
    """A symlink target: inside the tree (relative), absolute, dangling, or out of the root."""
    how = rng.choices(("inside", "absolute", "dangling", "outside"), [6, 1, 2, 1])[0]
    if how == "inside":
        return rng.choice(INSIDE_TARGETS)
    if how == "absolute":  # one that exists (harmless if followed) or a dangling one
        return rng.choice(("/dev/null", f"/nonexistent/ironsync{tag}"))
    if how == "dangling":
        return f"missing/{tag}"
    return f"../../../outside{tag}"  # relative, out of the root: text, never resolved


# --- the model -------------------------------------------------------------------------------


def digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=10).hexdigest()


def link_key(target: str) -> str:
    """The model's key of a symlink's content, its target text (never a file's digest)."""
    return f"symlink -> {target}"


@dataclass
class ContentModel:
    """Every content ever written (a file's by digest, a link's by `link_key`), which are
    superseded, and which were written as ignored files (on which node)."""

    written: dict[str, str] = field(default_factory=dict)  # key -> "op i kind on node"
    superseded: set[str] = field(default_factory=set)
    superseded_by: dict[str, str] = field(default_factory=dict)  # key -> the last op that did
    ignored_on: dict[str, str] = field(default_factory=dict)  # key -> node

    def wrote(self, key: str, how: str) -> None:
        self.written.setdefault(key, how)
        self.superseded.discard(key)  # written again (a truncation back to an old prefix)

    def supersede(self, key: str | None, by: str = "") -> None:
        if key is not None:
            self.superseded.add(key)
            self.superseded_by[key] = by

    def required(self) -> set[str]:
        return set(self.written) - self.superseded


# --- what a tree holds -----------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One path of a tree as the checks compare it (folder mtimes and link modes left out)."""

    kind: str  # "file", "dir", "symlink" or "other"
    mode: int | None  # the permission bits of a file or a folder
    payload: bytes | str | None  # a file's bytes, a link's target text
    mtime_ns: int = field(default=0, compare=False)

    @property
    def key(self) -> str | None:
        """The model's key of what this entry holds; None for a folder."""
        if self.kind == "file" and isinstance(self.payload, bytes):
            return digest(self.payload)
        if self.kind == "symlink" and isinstance(self.payload, str):
            return link_key(self.payload)
        return None

    def describe(self) -> str:
        if self.kind == "file" and isinstance(self.payload, bytes):
            return f"file {self.mode:o} {len(self.payload)} B {digest(self.payload)[:8]}"
        if self.kind == "dir":
            return f"folder {self.mode:o}"
        if self.kind == "symlink":
            return f"symlink -> {self.payload!r}"
        return self.kind


def _is_temp(name: str) -> bool:
    return name.startswith(".ironsync-") and name.endswith(".tmp")


def _is_ignored(rel: str) -> bool:
    """Matched by `IGNORE_RULES` (`*.ign`, at any depth)."""
    return rel.rpartition("/")[2].endswith(".ign")


def _entry(path: str, st: os.stat_result) -> Entry:
    """The `Entry` of `path` whose lstat is `st`; a file read without following a link."""
    if stat.S_ISLNK(st.st_mode):
        return Entry("symlink", None, os.readlink(path), st.st_mtime_ns)
    mode = stat.S_IMODE(st.st_mode) & MODE_BITS
    if stat.S_ISDIR(st.st_mode):
        return Entry("dir", mode, None, st.st_mtime_ns)
    if stat.S_ISREG(st.st_mode):
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        with open(fd, "rb") as f:
            return Entry("file", mode, f.read(), st.st_mtime_ns)
    return Entry("other", mode, None, st.st_mtime_ns)


def _entries(root: Path) -> tuple[dict[str, Entry], list[str]]:
    """Every path under `root` (not .ironsync/, not .ignore, not temporary files; ignored files
    included) with its `Entry`, never following a link; and the temporary files found."""
    out: dict[str, Entry] = {}
    temps: list[str] = []

    def walk(folder: str, prefix: str) -> None:
        try:
            found = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            return  # removed while we looked
        for item in found:
            rel = prefix + item.name
            if rel in (".ironsync", ".ignore"):
                continue
            if _is_temp(item.name):
                temps.append(rel)
                continue
            try:
                entry = out[rel] = _entry(item.path, os.lstat(item.path))
            except (FileNotFoundError, NotADirectoryError):
                continue
            if entry.kind == "dir":
                walk(item.path, rel + "/")

    walk(str(root), "")
    return out, temps


def _synced(entries: dict[str, Entry]) -> dict[str, Entry]:
    return {rel: e for rel, e in entries.items() if not _is_ignored(rel)}


def _kind(root: Path, rel: str) -> str | None:
    """What `rel` is under `root`, never following a link: "file", "dir", "symlink", "other";
    None when it is absent and could be made (every folder on the way is a real folder or
    absent); "blocked" when something on the way is a link or not a folder."""
    path = root
    parts = rel.split("/")
    for i, part in enumerate(parts):
        path = path / part
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        if i < len(parts) - 1:
            if not stat.S_ISDIR(st.st_mode):
                return "blocked"
        elif stat.S_ISLNK(st.st_mode):
            return "symlink"
        elif stat.S_ISDIR(st.st_mode):
            return "dir"
        elif stat.S_ISREG(st.st_mode):
            return "file"
        else:
            return "other"
    return "dir"


def _read_at(root: Path, rel: str) -> bytes | None:
    """The bytes of the regular file `rel`, reached without a link; None if it is not one."""
    if _kind(root, rel) != "file":
        return None
    try:
        fd = os.open(root / rel, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with open(fd, "rb") as f:
        return f.read()


def _keys_under(root: Path, rel: str) -> list[str]:
    """The model's keys of every file and link at or under `rel` (a folder's whole subtree)."""
    path = root / rel
    entry = _entry(str(path), os.lstat(path))
    if entry.kind != "dir":
        return [entry.key] if entry.key else []
    entries, _ = _entries(path)
    return [e.key for e in entries.values() if e.key]


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
    kinds: dict[str, int] = field(default_factory=dict)  # ops applied, by kind
    timings: dict[str, int] = field(default_factory=dict)  # ms per op kind
    superseded_live: list[str] = field(default_factory=list)  # to look at: resurrections?
    remarks: list[str] = field(default_factory=list)  # odd but not failed: to look at
    live: bool = False

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def tree_ops(self) -> int:
        """How many of the ops applied were folder, link, type or mode ops (issue 11)."""
        return sum(n for kind, n in self.kinds.items() if kind in TREE_OPS)

    def note(self, key: str, n: int = 1) -> None:
        self.notes[key] = self.notes.get(key, 0) + n

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
        self.doing = ""  # the op being applied, for the model's record of what superseded
        watch: dict[str, Any] = {"watcher": True, "delay": LIVE_DELAY} if live else {}
        self.nodes = {name: SyncNode(base, name, **watch) for name in NODES}
        for name, node in self.nodes.items():
            node.peers = [o.address for n, o in self.nodes.items() if n != name]
            node.write_config()
            (node.root / ".ignore").write_text(IGNORE_RULES)
        self.all_peers = {name: list(node.peers) for name, node in self.nodes.items()}

    # every op reads the disk first: what it replaces is what that node had seen. A running
    # daemon (a live pull) could replace a file between that read and the op's write: `apply`
    # holds the daemons of the nodes an op touches stopped (SIGSTOP) while it reads and writes.
    # Nothing here goes through a link: `_kind` says "blocked" for a path with one on the way.

    def apply(self, i: int, op: Op) -> None:
        kind, name = op[0], op[1]
        if kind == "pair":  # each op applied (and counted) as such, the pair counted too
            before = self.result.applied
            self.apply(i, op[3])
            self.apply(i, op[4])
            if self.result.applied > before:
                self.result.kinds[kind] = self.result.kinds.get(kind, 0) + 1
            return
        touched = [self.nodes[name]]
        if kind in ("concurrent", "typeclash"):
            touched.append(self.nodes[op[2]])
        with frozen(*touched) if kind in DISK_OPS else contextlib.nullcontext():
            applied = self._apply(i, op)
        if applied:
            self.result.applied += 1
            self.result.kinds[kind] = self.result.kinds.get(kind, 0) + 1

    def _apply(self, i: int, op: Op) -> bool:
        """Run `op`; False when it did nothing (its path absent, of another kind, blocked)."""
        kind, name = op[0], op[1]
        node = self.nodes[name]
        root = node.root
        how = self.doing = f"op {i} {kind} on {name}"
        if kind == "create":
            _, _, rel, tag, size, salt = op
            return self._write_file(root, rel, _data(tag, size, salt), how)
        if kind in ("edit", "append", "truncate"):
            _, _, rel, tag, size, salt = op
            return self._change_in_place(
                root, rel, kind, _data(tag, min(size, 200), salt), salt, how
            )
        if kind == "concurrent":
            _, _, other, rel, tag, salt = op
            done = False
            for n, who in enumerate((name, other)):
                target = self.nodes[who]
                if _read_at(target.root, rel) is not None or n == 0:
                    data = _data(f"{tag}{who}", 300 + n, salt + n)
                    done = self._write_file(target.root, rel, data, f"{how} ({who})") or done
                    time.sleep(0.01)  # distinct mtimes
            return done
        if kind in ("rename", "move"):
            _, _, src, dst = op
            if (
                _kind(root, src) != "file"
                or src == dst
                or _kind(root, dst) not in (None, "file", "symlink")
            ):
                return False
            self._supersede(root, dst)  # a rename over a file or a link replaces it
            (root / dst).parent.mkdir(parents=True, exist_ok=True)
            (root / src).rename(root / dst)
            return True
        if kind == "delete":
            if _kind(root, op[2]) not in ("file", "symlink"):
                return False
            self._supersede(root, op[2])
            (root / op[2]).unlink()
            return True
        if kind == "unlink":
            rel = self._pick(root, i, op, ("symlink",))
            if rel is None:
                return False
            self._supersede(root, rel)
            (root / rel).unlink()
            return True
        if kind == "mkdir":
            if _kind(root, op[2]) is not None:
                return False
            (root / op[2]).mkdir(parents=True)
            return True
        if kind == "rmdir":
            if _kind(root, op[2]) != "dir":
                return False
            try:
                (root / op[2]).rmdir()
            except OSError:
                return False  # not empty
            return True
        if kind == "rmtree":
            rel = self._pick(root, i, op, ("dir",))
            if rel is None:
                return False
            self._remove(root, rel)
            return True
        if kind == "mvdir":
            src, dst = self._pick(root, i, op, ("dir",)), op[3]
            if src is None or dst == src or dst.startswith(src + "/"):
                return False
            if _kind(root, dst) not in (None, "dir") or (
                _kind(root, dst) == "dir" and any((root / dst).iterdir())
            ):
                return False  # mv refuses a file or a folder that is not empty
            (root / dst).parent.mkdir(parents=True, exist_ok=True)
            (root / src).rename(root / dst)  # over an empty folder: replaces it
            return True
        if kind == "retype":
            _, _, _, to, tag, size, salt, target = op
            rel = self._pick(root, i, op, ("file", "dir", "symlink")) or op[2]
            return self._retype(root, rel, to, _data(tag, size, salt), target, how)
        if kind == "typeclash":
            _, _, other, rel, to, other_to, tag, salt, target = op
            done = self._retype(root, rel, to, _data(f"{tag}{name}", 400, salt), target, how)
            time.sleep(0.01)  # distinct mtimes
            theirs = self.nodes[other].root
            data = _data(f"{tag}{other}", 401, salt + 1)
            other_target = f"{target}.{other}"  # a link of its own, if both make links
            return (
                self._retype(theirs, rel, other_to, data, other_target, f"{how} ({other})") or done
            )
        if kind == "symlink":
            _, _, rel, target = op
            if _kind(root, rel) is not None:
                return False
            self._make(root, rel, "symlink", b"", target, how)
            return True
        if kind == "retarget":
            rel = self._pick(root, i, op, ("symlink",))
            if rel is None or os.readlink(root / rel) == op[3]:
                return False  # a link made again with its target is no change (no version)
            self._make(root, rel, "symlink", b"", op[3], how)
            return True
        if kind == "chmod":
            rel = self._pick(root, i, op, ("file", "dir"))
            if rel is None:
                return False
            mode = int(op[3], 8) | (0o700 if _kind(root, rel) == "dir" else 0)
            if stat.S_IMODE(os.lstat(root / rel).st_mode) == mode:
                mode ^= 0o050  # a change all the same: group r-x toggled
            os.chmod(root / rel, mode)  # neither size nor mtime change
            return True
        if kind == "ignored":
            _, _, folder, tag, size, salt = op
            rel = f"{folder}/{IGNORED_NAME}" if folder else IGNORED_NAME
            data = _data(tag, size, salt)
            if not self._write_file(root, rel, data, how):
                return False
            self.model.ignored_on[digest(data)] = name
            return True
        if kind == "sync":
            self.sync_pair(node, self.nodes[op[2]])
            return True
        if kind in ("stop", "kill"):
            if node.proc is None:
                return False
            node.stop(signal.SIGKILL if kind == "kill" else signal.SIGTERM)
            return True
        if kind == "start":
            if node.proc is not None:
                return False
            self.start(node)
            return True
        if kind == "restart":
            if node.proc is not None:
                node.stop()
            self.start(node)
            return True
        if kind == "wait":
            time.sleep(op[2] / 1000)
            return True
        raise ValueError(f"unknown op {op!r}")

    def _pick(self, root: Path, i: int, op: Op, kinds: tuple[str, ...]) -> str | None:
        """The path `op` acts on: its own (`op[2]`) if that is one of `kinds` on this disk,
        else one of `NAMES` that is (chosen by the op and its index), else None. So rm -r, mv,
        chmod, retarget, unlink and retype mostly find something to act on, where the
        generator, blind to the disks, named a path absent there."""
        if _kind(root, op[2]) in kinds:
            return op[2]
        found = [rel for rel in NAMES if _kind(root, rel) in kinds]
        return random.Random(f"{i}:{json.dumps(op)}").choice(found) if found else None

    def _write_file(self, root: Path, rel: str, data: bytes, how: str) -> bool:
        """Write `rel` (a new file or over a file; never a folder or a link)."""
        if _kind(root, rel) not in (None, "file"):
            return False  # a folder, a link, or something in the way
        self._supersede(root, rel)
        write(root, rel, data)
        self.model.wrote(digest(data), how)
        return True

    def _change_in_place(
        self, root: Path, rel: str, kind: str, patch: bytes, salt: int, how: str
    ) -> bool:
        old = _read_at(root, rel)
        if old is None:
            return False
        if kind == "edit":  # in place: same length unless the patch is longer
            at = random.Random(salt).randint(0, max(0, len(old) - len(patch)))
            new = old[:at] + patch + old[at + len(patch) :]
        elif kind == "append":
            new = old + patch
        else:
            new = old[: random.Random(salt).randint(0, len(old) - 1)] if old else b""
        self.model.supersede(digest(old), how)
        with open(root / rel, "r+b") as f:  # in place: same inode
            if kind == "truncate":
                f.truncate(len(new))
            else:
                f.write(new)
        self.model.wrote(digest(new), how)
        return True

    def _retype(self, root: Path, rel: str, to: str, data: bytes, target: str, how: str) -> bool:
        """Make `rel` a `to` (`TYPES`), whatever it was: a file written over, a link
        retargeted, a folder kept (given its file for "dirfile"), anything else removed first
        (rm -r of a folder)."""
        found = _kind(root, rel)
        if found in ("blocked", "other"):
            return False
        if found == "dir" and to in ("dir", "dirfile"):
            if to == "dir":
                return False
            return self._write_file(root, f"{rel}/{IN_FOLDER}", data, how)
        if found == "file" and to == "file":
            return self._write_file(root, rel, data, how)
        if found == "symlink" and to == "symlink" and os.readlink(root / rel) == target:
            return False  # no change: a link's content is its target (its mtime makes none)
        if found is not None:
            self.result.note("type_changes" if found != to else "retargets")
            self._remove(root, rel)
        self._make(root, rel, to, data, target, how)
        return True

    def _make(self, root: Path, rel: str, to: str, data: bytes, target: str, how: str) -> None:
        """Make `rel` (absent, or a link when `to` is one: replaced) a `to`, parents first."""
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if to == "symlink":
            if path.is_symlink():
                self._supersede(root, rel)
                path.unlink()
            os.symlink(target, path)
            self.model.wrote(link_key(target), how)
        elif to == "file":
            self._write_file(root, rel, data, how)
        else:
            path.mkdir()
            if to == "dirfile":
                self._write_file(root, f"{rel}/{IN_FOLDER}", data, how)

    def _supersede(self, root: Path, rel: str) -> None:
        """What `rel` holds (everything under it, for a folder) is replaced on this disk."""
        if _kind(root, rel) in ("file", "symlink", "dir"):
            for key in _keys_under(root, rel):
                self.model.supersede(key, self.doing)

    def _remove(self, root: Path, rel: str) -> None:
        """rm -r `rel`: what it held is superseded."""
        self._supersede(root, rel)
        path = root / rel
        if _kind(root, rel) == "dir":
            shutil.rmtree(path)
        else:
            path.unlink()

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
        self.result.note(f"sync_exit_{proc.returncode}")
        if proc.returncode not in (0, 1, 3):
            self.result.failures.append(
                f"{x.node_id}: sync exited {proc.returncode}: {proc.stdout[-1000:]} "
                f"{proc.stderr[-2000:]}"
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
            now = self._snapshots()
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet_for:
                return
            time.sleep(0.1)
        self.result.note("settle_timeout")

    def _snapshots(self) -> list[dict[str, tuple[int, int, int, int]]]:
        return [_snapshot(node.root) for node in self.nodes.values()]

    def quiesce(self) -> None:
        """Every daemon up; `sync` on each node in turn until QUIET_SYNCS syncs in a row (every
        node at least once, each with both peers) exited 0 and changed nothing: neither by
        their report nor on any disk (a folder made or removed, a mode set)."""
        for node in self.nodes.values():
            if node.proc is None:
                self.start(node)
        quiet = 0
        order = list(self.nodes.values())
        for n in range(QUIESCENCE_SYNCS):
            node = order[n % len(order)]
            before = self._snapshots()
            proc = node.run("sync", "--json", check=False)
            out = self._count_sync(node, proc)
            changed = 0 if proc.returncode == 0 else 1
            for r in out.get("results", []):
                changed += r.get("pulled", 0) + r.get("deleted", 0) + r.get("peer_changed", 0)
            if not changed and self._snapshots() != before:
                changed = 1
                self.result.note("quiet_sync_changed_a_disk")
                after = self._snapshots()
                moved = sorted(
                    p
                    for b, a in zip(before, after, strict=True)
                    for p in set(a) | set(b)
                    if a.get(p) != b.get(p)
                )
                if n >= len(order):  # (the first round may race the daemons' start-up syncs)
                    self.result.remarks.append(
                        f"sync {n} on {node.node_id} exited 0, reported no change, and changed "
                        f"{[os.path.relpath(p, self.base) for p in moved[:6]]}"
                    )
            quiet = quiet + 1 if changed == 0 else 0
            if quiet == QUIET_SYNCS:
                return
        self.result.failures.append(f"no quiescence after {QUIESCENCE_SYNCS} syncs")

    def check(self) -> None:
        fail = self.result.failures.append
        for node in self.nodes.values():
            if node.proc is not None:
                node.stop()
        everything: dict[str, dict[str, Entry]] = {}
        for name, node in self.nodes.items():
            everything[name], temps = _entries(node.root)
            if temps:
                fail(f"{name}: temporary files left: {temps}")
            _check_integrity(node, fail)
            self._check_index_matches_disk(node)
        trees = {name: _synced(entries) for name, entries in everything.items()}
        self._check_identical(trees)
        for name, node in self.nodes.items():
            live = {e.key: rel for rel, e in everything[name].items() if e.key}
            kept = _versions(node.root)
            for key in sorted(self.model.required()):
                if self.model.ignored_on.get(key, name) != name:
                    continue  # another node's ignored file: never synced
                if key in live:
                    if CONFLICT_MARKER in live[key]:
                        self.result.note("required_in_conflict_copy")
                    continue
                where = "only in .ironsync/versions" if key in kept else "nowhere"
                fail(f"{name}: content of {self.model.written[key]} is lost ({where}): {key}")
            for key in self.model.superseded & set(self.model.written):
                if key in live and name == NODES[0]:
                    self.result.superseded_live.append(
                        f"{self.model.written[key]}, superseded by "
                        f"{self.model.superseded_by[key]}, at {live[key]}"
                    )
                bucket = (
                    "superseded_live" if key in live
                    else "superseded_in_versions" if key in kept
                    else "superseded_gone"
                )  # fmt: skip
                self.result.note(bucket)
        first = trees[NODES[0]]
        for rel, entry in first.items():
            if CONFLICT_MARKER in rel:
                self.result.note(f"conflict_copies_{entry.kind}")
            self.result.note(f"final_{entry.kind}")
        for node in self.nodes.values():
            self.result.note("kept_events", _count_events(node, "kept"))

    def _check_index_matches_disk(self, node: SyncNode) -> None:
        """A scan after quiescence finds nothing to record: what the daemons wrote (and what
        their watchers saw) is what their index says, so no restart makes a new version."""
        proc = node.run("scan", "--json", check=False)
        try:
            changes = [c for r in json.loads(proc.stdout) for c in r["changes"]]
        except (ValueError, KeyError, TypeError):
            self.result.failures.append(
                f"{node.node_id}: scan exited {proc.returncode}: {proc.stderr[-1500:]}"
            )
            return
        if changes:
            self.result.failures.append(
                f"{node.node_id}: a scan after quiescence found changes the index missed: "
                f"{changes[:8]}"
            )

    def _check_identical(self, trees: dict[str, dict[str, Entry]]) -> None:
        """The same paths on every node, each with the same `Entry` (file mtimes counted)."""
        first = trees[NODES[0]]
        differ = sorted(
            rel
            for rel in set().union(*trees.values())
            if any(t.get(rel) != first.get(rel) for t in trees.values())
        )
        for rel in differ[:12]:
            seen = ", ".join(
                f"{name} {t[rel].describe() if rel in t else 'absent'}" for name, t in trees.items()
            )
            self.result.failures.append(f"trees differ at {rel}: {seen}")
        if len(differ) > 12:
            self.result.failures.append(f"trees differ at {len(differ) - 12} more paths")
        for rel, entry in first.items():
            if entry.kind == "file" and any(
                rel in t and t[rel].mtime_ns != entry.mtime_ns for t in trees.values()
            ):
                self.result.note("file_mtime_differs")
                mtimes = ", ".join(f"{n} {t[rel].mtime_ns}" for n, t in trees.items() if rel in t)
                self.result.remarks.append(f"file mtimes differ at {rel}: {mtimes}")

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


def _snapshot(root: Path) -> dict[str, tuple[int, int, int, int]]:
    """Every path under `root` (temporary files and .ironsync/ included, links not followed)
    by mode, size, mtime and inode; but for .ironsync/watch/, where a daemon's watcher writes
    and removes its barriers whenever a peer's full sync asks it to catch up."""
    out = {}
    for dirpath, dirnames, files in os.walk(root):
        if os.path.join(dirpath, "watch") == os.path.join(root, BARRIER_DIR) and (
            "watch" in dirnames
        ):
            dirnames.remove("watch")
        for name in dirnames + files:  # a link to a folder is among the dirnames
            with contextlib.suppress(FileNotFoundError):
                st = os.stat(os.path.join(dirpath, name), follow_symlinks=False)
                out[os.path.join(dirpath, name)] = (
                    st.st_mode,
                    st.st_size,
                    st.st_mtime_ns,
                    st.st_ino,
                )
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
    """The model's keys of every file and link in the node's versions folder."""
    if not (root / VERSIONS).is_dir():
        return set()
    entries, _ = _entries(root / VERSIONS)
    return {e.key for e in entries.values() if e.key}


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
    timings = history.result.timings
    try:
        for i, op in enumerate(ops):
            t0 = time.monotonic()
            try:
                history.apply(i, op)
            except Exception as exc:  # a node that would not start, a command that hung
                history.result.failures.append(f"op {i} {op!r}: {exc!r}"[:3000])
                break
            key = f"ms_{op[0]}"
            timings[key] = timings.get(key, 0) + int((time.monotonic() - t0) * 1000)
        else:
            if live:
                t0 = time.monotonic()
                history.settle()
                timings["ms_settle"] = int((time.monotonic() - t0) * 1000)
                history.result.notes["writes_before_quiescence"] = sum(
                    _count_events(node, "write_finished") for node in history.nodes.values()
                )  # before the quiescence syncs: by start-up syncs, explicit syncs, live pulls
            t0 = time.monotonic()
            history.quiesce()
            timings["ms_quiesce"] = int((time.monotonic() - t0) * 1000)
            t0 = time.monotonic()
            history.check()
            timings["ms_check"] = int((time.monotonic() - t0) * 1000)
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
        # at random: mostly early, pulls are fast here
        result.killed, _ = _sync_killed_at(receiver, point, rng.random() ** 3 * 0.2)
        result.state = _old_or_new(receiver.root / "big.bin", old, new, fresh_file, fail, "")
        again = receiver.run("sync", "--json", check=False)
        if again.returncode != 0:
            fail(f"the sync after the crash exited {again.returncode}: {again.stdout[-1500:]}")
        if tree(receiver.root) != tree(sender.root) or _read(receiver.root / "big.bin") != new:
            fail("not converged after the crash")
        _check_after_crash(sender, receiver, fail)
    except Exception as exc:
        fail(f"{exc!r}"[:3000])
    finally:
        _clean_up_trial(sender, base if owned and result.ok else None)
    if not result.ok:
        fail(f"nodes kept at {base}")
    return result


def _sync_killed_at(receiver: SyncNode, point: str, delay: float) -> tuple[bool, int]:
    """Run the receiver's `ironsync sync` to its end, which IRONSYNC_TEST_CRASH_AT=`point`
    makes a SIGKILL at that point; for "random", it is killed `delay` s after its first
    temporary file appears. (whether SIGKILL ended it, its exit code)"""
    env = receiver.env()
    if point != "random":
        env["IRONSYNC_TEST_CRASH_AT"] = point
    proc = subprocess.Popen(
        [*IRONSYNC, "sync"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    if point == "random":
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if next(receiver.root.rglob(".ironsync-*.tmp"), None) is not None:
                break
            time.sleep(0.002)
        time.sleep(delay)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    code = proc.wait(timeout=120)
    return code == -signal.SIGKILL, code


def _check_after_crash(sender: SyncNode, receiver: SyncNode, fail: Callable[[str], None]) -> None:
    """No temporary file left on the receiver; both databases intact (the sender stopped)."""
    temps = [p.name for p in receiver.root.rglob(".ironsync-*.tmp")]
    if temps:
        fail(f"temporary files left: {temps}")
    sender.stop()
    for node in (sender, receiver):
        _check_integrity(node, fail)


def _clean_up_trial(sender: SyncNode, remove: Path | None) -> None:
    """End the sender's daemon if it still runs (by its pid); remove a trial's folder."""
    if sender.proc is not None:
        sender.stop(signal.SIGKILL)
    if remove is not None:
        shutil.rmtree(remove, ignore_errors=True)


# --- batch crash trials ----------------------------------------------------------------------

BATCH_FILES = 80  # small files the receiver pulls at once: they switch into place in groups
BATCH_POINTS = ("before_rename", "after_rename", "group_renamed", "mid_transaction", "random")


@dataclass
class BatchCrashResult:
    seed: int
    point: str  # as IRONSYNC_TEST_CRASH_AT: NAME#K is the K-th time the point is reached
    killed: bool = False
    states: dict[str, int] = field(default_factory=dict)  # "old"/"new" -> files
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def replay(self) -> str:
        return f"bin/soak --batch-crash-seed {self.seed}  # point {self.point}"


def batch_crash_trial(seed: int, base: Path | None = None) -> BatchCrashResult:
    """A receiver pulling BATCH_FILES small files (new ones, some in new folders, and edits),
    which switch into place in groups (ironsync.sync.commit), is killed with SIGKILL in the
    middle of a group: before or after its K-th rename, after a group's renames, in the group's
    transaction (its K-th row), or at a random moment. Every file must then hold its old or its
    new content; the next sync converges with no temp file left and no conflict copy made (the
    renamed files the index did not record yet hold the peer's content: nothing conflicts)."""
    rng = random.Random(seed)
    name = BATCH_POINTS[seed % len(BATCH_POINTS)]
    point = name if name in ("random", "group_renamed") else f"{name}#{rng.randint(1, 12)}"
    result = BatchCrashResult(seed, point)
    owned = base is None
    base = Path(tempfile.mkdtemp(prefix=f"ironsync-b{seed}-")) if base is None else base
    sender, receiver = SyncNode(base, "sender"), SyncNode(base, "receiver")
    receiver.add_peers(sender)
    fail = result.failures.append
    try:
        paths = [f"d{i % 7}/f{i}.txt" for i in range(BATCH_FILES)]
        old: dict[str, bytes | None] = {}
        for rel in paths:
            existing = rng.random() < 0.5
            old[rel] = rng.randbytes(rng.randint(0, 6000)) if existing else None
            if existing:
                write(sender.root, rel, old[rel])
        sender.start()
        receiver.sync()
        new = {rel: rng.randbytes(rng.randint(1, 6000)) for rel in paths}
        for rel, data in new.items():
            write(sender.root, rel, data)
        # at random: the pulls take a few tenths of a second
        result.killed, code = _sync_killed_at(receiver, point, rng.random() * 0.25)
        if point != "random" and not result.killed:
            fail(f"the sync was to die at {point}, and exited {code}")
        for rel in paths:
            state = _old_or_new(
                receiver.root / rel, old[rel] or b"", new[rel], old[rel] is None, fail, rel + ": "
            )
            result.states[state] = result.states.get(state, 0) + 1
        again = receiver.run("sync", "--json", check=False)
        if again.returncode != 0:
            fail(f"the sync after the crash exited {again.returncode}: {again.stdout[-1500:]}")
        if tree(receiver.root) != tree(sender.root):
            fail("not converged after the crash")
        roots = (sender.root, receiver.root)
        copies = [p for root in roots for p in root.rglob(f"*{CONFLICT_MARKER}*")]
        if copies:
            fail(f"conflict copies made after the crash: {copies}")
        _check_after_crash(sender, receiver, fail)
    except Exception as exc:
        fail(f"{exc!r}"[:3000])
    finally:
        _clean_up_trial(sender, base if owned and result.ok else None)
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
