"""Path safety: every path a peer names is checked before it touches the disk.

A peer is a member of the group, but a buggy or compromised one must still not be able to make
this node read or write outside a storage root (shared/DESIGN.md, "Rules that keep data
safe"). Two layers:

- `check_peer_path` is pure: the text of the path must be relative, '/'-separated and
  normalized, with no control characters, and must not name anything ironsync owns (`.ignore`,
  `.ironsync/`, temporary files).
- `resolve_inside` and the `open_*` helpers look at the disk: no component on the way may be
  a symlink (a symlinked folder could point anywhere) or a non-folder. The `open_*` helpers walk
  with one `O_NOFOLLOW` open per component relative to the previous folder's descriptor, so a
  folder swapped for a symlink after the check cannot redirect the operation either.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path

from ironsync.ignore import IGNORE_FILE, STATE_DIR, is_internal, is_temp_name
from ironsync.protocol.limits import MAX_PATH_LEN

MAX_NAME_BYTES = 255  # NAME_MAX of Linux, macOS and Windows file systems, in UTF-8 bytes

# C0 controls, DEL and C1 controls (Unicode category Cc): never part of a name we sync.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_DRIVE = re.compile(r"[A-Za-z]:")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafePath(Exception):
    """A path that must not be used; `reason` says why."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"unsafe path {path!r}: {reason}")


def check_peer_path(path: str) -> str:
    """`path` itself if it is a safe storage-relative file path; raise UnsafePath otherwise."""
    if not isinstance(path, str):
        raise UnsafePath(repr(path), f"not a str but {type(path).__name__}")
    if not path:
        raise UnsafePath(path, "empty path")
    if len(path) > MAX_PATH_LEN:
        raise UnsafePath(path[:64] + "...", f"longer than {MAX_PATH_LEN} characters")
    if "\x00" in path:
        raise UnsafePath(path, "contains NUL")
    if _CONTROL.search(path):
        raise UnsafePath(path, "contains a control character")
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafePath(path, "not valid UTF-8") from None
    if "\\" in path:
        raise UnsafePath(path, "contains a backslash")
    if path.startswith("/"):
        raise UnsafePath(path, "absolute path")
    if _DRIVE.match(path):
        raise UnsafePath(path, "starts with a drive letter")
    if path.endswith("/"):
        raise UnsafePath(path, "trailing slash")
    for part in path.split("/"):
        if not part:
            raise UnsafePath(path, "empty component ('//')")
        if part in (".", ".."):
            raise UnsafePath(path, f"'{part}' component")
        if len(part.encode("utf-8")) > MAX_NAME_BYTES:
            raise UnsafePath(path, f"a component is longer than {MAX_NAME_BYTES} bytes")
        if is_temp_name(part):
            raise UnsafePath(path, "ironsync temporary file name")
    if path == IGNORE_FILE:
        raise UnsafePath(path, "the .ignore file is never synced")
    if is_internal(path):
        raise UnsafePath(path, f"inside {STATE_DIR}/")
    return path


def resolve_inside(root: Path, rel: str) -> Path:
    """The absolute path of `rel` under `root`, after checking it and every existing component.

    The path need not exist. Raises UnsafePath when a component on the way is a symlink
    ("symlink on the way") or a parent is not a folder ("not a folder"). The root itself may
    be a symlink: the user chose it.
    """
    check_peer_path(rel)
    base = Path(os.path.abspath(root))
    parts = rel.split("/")
    current = base
    for depth, part in enumerate(parts, start=1):
        current = current / part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            break  # nothing below a missing component exists either
        except NotADirectoryError:
            raise UnsafePath(rel, "not a folder on the way") from None
        if stat.S_ISLNK(st.st_mode):
            raise UnsafePath(rel, f"symlink on the way: {'/'.join(parts[:depth])}")
        if depth < len(parts) and not stat.S_ISDIR(st.st_mode):
            raise UnsafePath(rel, f"not a folder: {'/'.join(parts[:depth])}")
    return base.joinpath(*parts)


def open_folder(
    root: Path, rel_folder: str, *, create: bool = False, created: list[str] | None = None
) -> int:
    """A descriptor of the folder `rel_folder` ('' = the root), walked without following any
    symlink below the root. With `create`, missing folders are made (and made durable), and
    the ones made are appended to `created` (outermost first), so a caller that fails can
    remove them again (`remove_empty_folders`)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    if not rel_folder:
        return fd
    check_peer_path(rel_folder)
    parts = rel_folder.split("/")
    try:
        for depth, part in enumerate(parts, start=1):
            below = _open_component(fd, part, rel_folder, parts[:depth], create, created)
            os.close(fd)
            fd = below
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_parent_folder(
    root: Path, rel: str, *, create: bool = False, created: list[str] | None = None
) -> tuple[int, str]:
    """(descriptor of the folder that holds `rel`, its final name), checked as `open_folder`."""
    check_peer_path(rel)
    folder, _, name = rel.rpartition("/")
    return open_folder(root, folder, create=create, created=created), name


def remove_empty_folders(root: Path, rel_folders: list[str]) -> None:
    """Remove the folders `rel_folders` (as `open_folder` lists those it made), innermost
    first, as long as they are empty; stop at the first that is not (or is gone)."""
    for rel in reversed(rel_folders):
        try:
            fd, name = open_parent_folder(root, rel)
        except (OSError, UnsafePath):
            return
        try:
            os.rmdir(name, dir_fd=fd)
        except OSError:
            return
        finally:
            os.close(fd)


def open_inside(root: Path, rel: str, flags: int = os.O_RDONLY, mode: int = 0o600) -> int:
    """Open the file `rel` under `root` with `flags`, following no symlink on the way or at
    the end (O_NOFOLLOW). Raises UnsafePath for a symlink, OSError as `os.open` does."""
    folder_fd, name = open_parent_folder(root, rel)
    try:
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=folder_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePath(rel, f"symlink on the way: {rel}") from None
        raise
    finally:
        os.close(folder_fd)


def _open_component(
    fd: int, part: str, rel: str, walked: list[str], create: bool, created: list[str] | None
) -> int:
    for _ in range(2):  # a folder made by someone else between our open and mkdir: open again
        try:
            return os.open(part, _DIR_FLAGS, dir_fd=fd)
        except FileNotFoundError:
            if not create:
                raise
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            st = os.stat(part, dir_fd=fd, follow_symlinks=False)
            what = "symlink on the way" if stat.S_ISLNK(st.st_mode) else "not a folder"
            raise UnsafePath(rel, f"{what}: {'/'.join(walked)}") from None
        try:
            os.mkdir(part, dir_fd=fd)
        except FileExistsError:
            continue
        if created is not None:
            created.append("/".join(walked))
        os.fsync(fd)  # the new folder's entry must survive a crash with the file renamed in it
    return os.open(part, _DIR_FLAGS, dir_fd=fd)
