"""Tree snapshots for black-box tests: what `rsync -a` would leave, as a comparable dict.

`snapshot(root)` walks a storage root without following any link and returns
{relpath: Entry(type, mode, content)}:

- a file: ('file', st_mode & 0o7777, sha256 of its bytes)
- a folder: ('dir', st_mode & 0o7777, None)
- a symlink: ('symlink', None, its target text)
- anything else (FIFO, socket, device): ('fifo' | 'socket' | 'chardev' | 'blockdev', mode, None)

Excluded, as ironsync excludes them: `.ironsync/` and `.ignore` at the root, and a daemon's
temporary files `.ironsync-*.tmp` anywhere (work in progress, not content). The root itself is
not an entry. Nothing here follows a link or opens anything but a regular file.
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple


class Entry(NamedTuple):
    type: str  # 'file' | 'dir' | 'symlink' | 'fifo' | 'socket' | 'chardev' | 'blockdev'
    mode: int | None  # permission bits (st_mode & 0o7777); None for a symlink
    content: str | None  # sha256 hex of a file, target text of a symlink, None otherwise

    def __str__(self) -> str:
        mode = "----" if self.mode is None else f"{self.mode:04o}"
        content = "" if self.content is None else f" {self.content[:16]}"
        if self.type == "symlink":
            content = f" -> {self.content}"
        return f"{self.type} {mode}{content}"


Tree = dict[str, Entry]

_OTHER = (
    (stat.S_ISFIFO, "fifo"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "chardev"),
    (stat.S_ISBLK, "blockdev"),
)


def _excluded(rel: str, name: str) -> bool:
    if rel in (".ironsync", ".ignore"):
        return True
    return name.startswith(".ironsync-") and name.endswith(".tmp")


def _sha256(path: str) -> str | None:
    digest = hashlib.sha256()
    try:
        # O_NOFOLLOW: a link swapped in after the lstat is not followed either
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except (FileNotFoundError, NotADirectoryError):
        return None  # gone while we looked
    with os.fdopen(fd, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def entry_of(path: str | Path, content: bool = True) -> Entry | None:
    """The entry for one path (not followed), or None when nothing is there. Without
    `content`, a file's content is only its size (a cheap first look)."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISLNK(st.st_mode):
        return Entry("symlink", None, os.readlink(path))
    if stat.S_ISDIR(st.st_mode):
        return Entry("dir", mode, None)
    if stat.S_ISREG(st.st_mode):
        if not content:
            return Entry("file", mode, f"{st.st_size} bytes")
        digest = _sha256(os.fspath(path))
        return None if digest is None else Entry("file", mode, digest)
    for test, name in _OTHER:
        if test(st.st_mode):
            return Entry(name, mode, None)
    return Entry("unknown", mode, None)


def snapshot(root: Path, skip: Callable[[str], bool] | None = None, content: bool = True) -> Tree:
    """Every entry under `root` (see the module docstring); `skip(rel)` drops a path and, for a
    folder, everything under it. Without `content`, files are compared by size only."""
    out: Tree = {}
    stack = [""]
    while stack:
        prefix = stack.pop()
        try:
            entries = list(os.scandir(root / prefix if prefix else root))
        except (FileNotFoundError, NotADirectoryError):
            continue  # removed (or replaced) while we walked
        for item in entries:
            rel = f"{prefix}{item.name}"
            if _excluded(rel, item.name) or (skip is not None and skip(rel)):
                continue
            entry = entry_of(item.path, content)
            if entry is None:
                continue
            out[rel] = entry
            if entry.type == "dir":
                stack.append(rel + "/")
    return out


def diff(left: Tree, right: Tree, names: tuple[str, str] = ("left", "right")) -> list[str]:
    """Readable lines, one per path where the two trees differ (empty when equal)."""
    lines = []
    for rel in sorted(left.keys() | right.keys()):
        a, b = left.get(rel), right.get(rel)
        if a == b:
            continue
        if b is None:
            lines.append(f"  only in {names[0]}: {rel}  ({a})")
        elif a is None:
            lines.append(f"  only in {names[1]}: {rel}  ({b})")
        else:
            lines.append(f"  differs: {rel}  {names[0]}: {a}  |  {names[1]}: {b}")
    return lines


def assert_same_tree(
    left: Path,
    right: Path,
    skip: Callable[[str], bool] | None = None,
    names: tuple[str, str] | None = None,
) -> Tree:
    """Assert the trees under two roots are identical; returns the (common) snapshot."""
    a, b = snapshot(left, skip), snapshot(right, skip)
    lines = diff(a, b, names or (str(left), str(right)))
    if lines:
        shown = lines[:60] + ([f"  ... and {len(lines) - 60} more"] if len(lines) > 60 else [])
        raise AssertionError("trees differ:\n" + "\n".join(shown))
    return a


def wait_same_tree(
    left: Path,
    right: Path,
    timeout: float = 60.0,
    skip: Callable[[str], bool] | None = None,
    also: Callable[[Tree], bool] | None = None,
    context: Callable[[], str] | None = None,
    names: tuple[str, str] | None = None,
) -> Tree:
    """Poll until the two trees are identical (and `also(tree)` holds); on timeout, fail with
    the last difference (`names` for the two sides, their paths by default) and `context()`
    (e.g. the daemons' logs). Returns the snapshot."""
    deadline = time.monotonic() + timeout
    while True:
        late = time.monotonic() > deadline
        # hash the files only once everything else agrees: polling stays cheap on a busy machine
        if late or snapshot(left, skip, content=False) == snapshot(right, skip, content=False):
            a, b = snapshot(left, skip), snapshot(right, skip)
            if a == b and (also is None or also(a)):
                return a
        if late:
            sides = names or (str(left), str(right))
            lines = diff(a, b, sides) or ["  (identical, but not as expected)"]
            shown = lines[:60] + ([f"  ... and {len(lines) - 60} more"] if len(lines) > 60 else [])
            extra = f"\n{context()}" if context is not None else ""
            raise AssertionError(
                f"trees not identical within {timeout} s:\n" + "\n".join(shown) + extra
            )
        time.sleep(0.2)
