"""Issue 11: a real git repository in a synced folder, as people keep their code.

The test builds the repository itself (`git fast-import`: 300 commits, tags and branches in well
under a second) in node alpha's storage while both daemons run with their watchers on. After
every step the two trees must become identical, `.git` included (types, modes, link targets,
contents), and the other node's copy must be a healthy repository: `git fsck` passes and
`git status --porcelain` is empty. Git needs what a files-only sync loses: its empty folders
(`.git/refs/heads/`, `.git/branches/`), its executable hooks, read-only object files, symlinks,
folders it removes when they empty, and paths that change type between commits.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemons import SyncNode, stop_all
from tests.livepair import DEADLINE, logs, start_pair
from tests.treesnap import Entry, Tree, wait_same_tree

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed"),
]

COMMITS = 300
FOLDERS = 30
WHEN = 1_600_000_000  # the first commit's time; each next one a minute later
REPO = "proj"


# --- the history -----------------------------------------------------------------------------


def _data(payload: bytes) -> bytes:
    return b"data %d\n%s\n" % (len(payload), payload)


def _put(mode: str, path: str, payload: bytes) -> bytes:
    return f"M {mode} inline {path}\n".encode() + _data(payload)


def _delete(path: str) -> bytes:
    return f"D {path}\n".encode()


def _module(i: int) -> str:
    """The file commit `i` writes: folders appear over the history (a new `subN` every 60)."""
    return f"pkg{i % FOLDERS:02}/sub{i // 60}/m{(i // 30) % 2}.txt"


def history() -> bytes:
    """A `git fast-import` stream: master with COMMITS commits (files in many folders, an
    executable whose mode changes, a symlink retargeted, a file that becomes a symlink), the
    tags v0.1 (lightweight), v1.0, v2.0 (annotated), v3.0 (lightweight, master's tip), a
    branch `maint` off v1.0 and a branch `restructure` where the file src/config is a folder."""
    out: list[bytes] = []
    live: set[str] = set()

    def commit(ref: str, mark: int, ops: list[bytes], parent: int | None = None) -> None:
        who = f"committer Test <test@example.com> {WHEN + 60 * mark} +0000"
        head = f"commit {ref}\nmark :{mark}\n{who}\n"
        out.append(head.encode() + _data(f"commit {mark} on {ref}\n".encode()))
        if parent is not None:
            out.append(f"from :{parent}\n".encode())
        out.extend(ops)
        out.append(b"\n")

    script = b'#!/bin/sh\nexec python3 -m proj "$@"\n'
    commit(
        "refs/heads/master",
        1,
        [
            _put("100644", "README.md", b"# proj\n"),
            _put("100755", "bin/run.sh", script),
            _put("100644", "src/config", b"[app]\nname = proj\n"),
            _put("120000", "docs/latest", b"../README.md"),
            _put("100644", "notes", b"notes, a file for now\n"),
        ],
    )
    for i in range(2, COMMITS + 1):
        path = _module(i)
        ops = [_put("100644", path, f"written by commit {i}\n".encode() * (1 + i % 5))]
        live.add(path)
        gone = _module(i - 5)
        if i % 7 == 0 and gone in live and gone != path:
            ops.append(_delete(gone))
            live.discard(gone)
        if i == 50:
            ops.append(_put("100755", "tools/build.sh", b"#!/bin/sh\nmake -C ..\n"))
        if i == 150:
            ops.append(_put("100644", "bin/run.sh", script))  # only the mode changes
        if i == 200:
            ops.append(_put("120000", "docs/latest", b"../pkg05/sub3/m0.txt"))
        if i == 250:
            ops.append(_put("120000", "notes", b"docs"))  # a file becomes a symlink
        if i == 260:
            ops.append(_put("100755", "bin/run.sh", script))
        commit("refs/heads/master", i, ops)
    mark = COMMITS
    for n in range(5):
        mark += 1
        ops = [_put("100644", "pkg01/sub1/m0.txt", f"maintenance fix {n}\n".encode())]
        commit("refs/heads/maint", mark, ops, parent=100 if n == 0 else None)
    mark += 1
    ops = [
        _delete("src/config"),
        _put("100644", "src/config/app.toml", b"name = 'proj'\n"),
        _put("100644", "src/config/db.toml", b"url = 'sqlite:///proj.db'\n"),
        _put("100644", "src/config/env/prod.toml", b"debug = false\n"),
    ]
    commit("refs/heads/restructure", mark, ops, parent=COMMITS)
    out.append(b"reset refs/tags/v0.1\nfrom :10\n\n")
    for tag, at in (("v1.0", 100), ("v2.0", 200)):
        tagger = f"tagger Test <test@example.com> {WHEN + 60 * at} +0000\n"
        out.append(f"tag {tag}\nfrom :{at}\n{tagger}".encode() + _data(f"release {tag}\n".encode()))
    out.append(f"reset refs/tags/v3.0\nfrom :{COMMITS}\n\n".encode())
    return b"".join(out)


# --- running git -----------------------------------------------------------------------------


class Git:
    """git with a clean environment: no user or system config, a fixed identity, no automatic
    gc or maintenance (they would change .git at times the test does not choose)."""

    def __init__(self, home: Path) -> None:
        home.mkdir(parents=True, exist_ok=True)
        self.env = {
            **os.environ,
            "HOME": str(home),
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull,
            "GIT_AUTHOR_NAME": "Test",
            "GIT_AUTHOR_EMAIL": "test@example.com",
            "GIT_COMMITTER_NAME": "Test",
            "GIT_COMMITTER_EMAIL": "test@example.com",
            "GIT_TERMINAL_PROMPT": "0",
        }

    def __call__(
        self, repo: Path, *args: str, stdin: bytes | None = None, read_only: bool = False
    ) -> str:
        env = {**self.env, "GIT_OPTIONAL_LOCKS": "0"} if read_only else self.env
        proc = subprocess.run(
            ["git", "-C", str(repo), *args], input=stdin, capture_output=True, env=env, timeout=120
        )
        if proc.returncode != 0:
            raise AssertionError(
                f"git {' '.join(args)} in {repo} exited {proc.returncode}\n"
                f"stdout:\n{proc.stdout.decode(errors='replace')[-3000:]}\n"
                f"stderr:\n{proc.stderr.decode(errors='replace')[-3000:]}"
            )
        return proc.stdout.decode(errors="replace")

    def healthy(self, repo: Path) -> None:
        """The checks on the copy a sync made: nothing missing or corrupt, nothing changed. Read
        only (GIT_OPTIONAL_LOCKS=0): checking must not itself make a change to sync."""
        self(repo, "fsck", "--no-progress", "--no-dangling", read_only=True)
        status = self(repo, "status", "--porcelain", "--untracked-files=all", read_only=True)
        assert status == "", f"git status on the synced copy {repo}:\n{status}"


@pytest.fixture(autouse=True)
def usual_umask() -> Iterator[None]:
    """The modes asserted here are those a umask of 022 gives, as on most systems."""
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture
def live(tmp_path: Path) -> Iterator[tuple[SyncNode, SyncNode]]:
    a, b = start_pair(tmp_path)
    yield a, b
    stop_all(a, b)


def test_a_git_repository_stays_a_healthy_repository_on_the_peer_through_its_history(
    live: tuple[SyncNode, SyncNode], tmp_path: Path
) -> None:
    a, b = live
    git = Git(tmp_path / "home")
    here, there = a.root / REPO, b.root / REPO

    def converged(checked: Path) -> Tree:
        tree = wait_same_tree(
            a.root, b.root, timeout=DEADLINE, context=lambda: logs(a, b), names=("alpha", "beta")
        )
        git.healthy(checked)
        head = git(here, "rev-parse", "HEAD", read_only=True)
        assert git(there, "rev-parse", "HEAD", read_only=True) == head
        return tree

    def every_later_sync_exits_0() -> None:
        for node in (a, b):
            result = node.sync()
            assert result["exit"] == 0 and all(r["converged"] for r in result["results"])

    # 1. the repository made in alpha's storage, daemons running: the initial sync
    git(a.root, "init", "-q", "-b", "master", REPO)
    for key, value in (("gc.auto", "0"), ("maintenance.auto", "false")):
        git(here, "config", key, value)
    git(here, "fast-import", "--quiet", stdin=history())
    git(here, "reset", "-q", "--hard", "master")
    tree = converged(there)
    assert tree[f"{REPO}/.git/branches"] == Entry("dir", 0o755, None)  # empty, and git needs it
    assert tree[f"{REPO}/bin/run.sh"].mode == 0o755
    assert tree[f"{REPO}/notes"] == Entry("symlink", None, "docs")
    assert tree[f"{REPO}/docs/latest"] == Entry("symlink", None, "../pkg05/sub3/m0.txt")
    assert tree[f"{REPO}/.git/hooks/pre-commit.sample"].mode == 0o755
    packs = [p for p, e in tree.items() if p.startswith(f"{REPO}/.git/objects/pack/")]
    assert packs and all(tree[p].mode == 0o444 for p in packs)  # read-only, as git made them

    # 2. between distant tags: most files and folders go, then come back
    git(here, "checkout", "-q", "v0.1")
    tree = converged(there)
    assert f"{REPO}/pkg29" not in tree and f"{REPO}/tools" not in tree
    assert tree[f"{REPO}/notes"].type == "file"  # a symlink became a file again
    git(here, "checkout", "-q", "v3.0")
    tree = converged(there)
    assert tree[f"{REPO}/pkg29"].type == "dir" and tree[f"{REPO}/notes"].type == "symlink"
    git(here, "checkout", "-q", "master")
    converged(there)

    # 3. a branch where a file is a folder, and back
    git(here, "checkout", "-q", "restructure")
    tree = converged(there)
    assert tree[f"{REPO}/src/config"].type == "dir"
    assert tree[f"{REPO}/src/config/env/prod.toml"].type == "file"
    every_later_sync_exits_0()
    git(here, "checkout", "-q", "master")
    tree = converged(there)
    assert tree[f"{REPO}/src/config"].type == "file"
    every_later_sync_exits_0()

    # 4. the other direction: a commit made on beta arrives on alpha
    (there / "README.md").write_text("# proj\n\nedited on beta\n")
    (there / "beta-only").mkdir()
    (there / "beta-only/new.txt").write_text("a new file in a new folder\n")
    git(there, "add", "-A")
    git(there, "commit", "-q", "-m", "from beta")
    converged(here)
    assert git(here, "log", "-1", "--format=%s", read_only=True) == "from beta\n"

    # 5. loose objects, then git gc --prune=now: loose objects and their folders go, refs are
    # packed (leaving refs/heads/ empty, which git still needs)
    for n in range(5):
        (here / f"pkg{n:02}/loose.txt").write_text(f"loose object {n}\n")
        git(here, "add", "-A")
        git(here, "commit", "-q", "-m", f"loose {n}")
    git(here, "tag", "v4.0")
    tree = converged(there)
    assert any(p.startswith(f"{REPO}/.git/objects/") and len(p.split("/")) == 5 for p in tree)
    git(here, "gc", "-q", "--prune=now")
    tree = converged(there)
    objects = {p.split("/")[3] for p in tree if p.startswith(f"{REPO}/.git/objects/")}
    assert objects <= {"info", "pack"}, f"loose object folders left: {sorted(objects)}"
    assert tree[f"{REPO}/.git/refs/heads"].type == "dir"
    every_later_sync_exits_0()
    git.healthy(here)
    # the daemons log to their log file; nothing floods stderr (a journal, under systemd)
    for node in (a, b):
        assert (node.base / "daemon.stderr").read_text() == "", node.node_id
