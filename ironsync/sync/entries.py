"""Folders and symlinks on this node's disk, as a peer's rows ask for them.

A folder or a link needs no transfer: its row says everything (a folder's permission bits and
mtime, a link's target text). These functions make one, check that the disk still holds what
the index says, clear a path for an entry of another kind, and remove a folder once it is
empty. Every one walks to the parent folder with `paths.open_parent_folder` (one O_NOFOLLOW
open per component), so a symlink on the way, even one swapped in meanwhile, never redirects
them, and a link itself is never followed: it is made, renamed or unlinked as a link.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from ironsync.model import DIR, FILE, SYMLINK
from ironsync.reconcile import ResolvedFile
from ironsync.scan import KnownStat, Stat
from ironsync.store.index import FileRow
from ironsync.sync.paths import UnsafePath, name_refused, open_folder, open_parent_folder
from ironsync.sync.versions import keep_version

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
SHOWN_NAMES = 5  # of what keeps a folder from being removed, in its event


def disk_matches(root: Path, path: str, row: FileRow, known: KnownStat | None) -> bool:
    """Whether the disk at `path` still holds the live entry `row` (a file as `known`, the
    index's stat of it): the one check before a peer's row replaces or deletes it."""
    try:
        folder, name = open_parent_folder(root, path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    try:
        st = os.stat(name, dir_fd=folder, follow_symlinks=False)
        if row.kind == SYMLINK:
            return stat.S_ISLNK(st.st_mode) and os.readlink(name, dir_fd=folder) == row.target
    except FileNotFoundError:
        return False
    finally:
        os.close(folder)
    if row.kind == DIR:
        return stat.S_ISDIR(st.st_mode)
    return (
        row.kind == FILE
        and known is not None
        and stat.S_ISREG(st.st_mode)
        and (st.st_size, st.st_mtime_ns, st.st_ino)
        == (known.stat.size, known.stat.mtime_ns, known.stat.inode)
    )


def exists(root: Path, path: str) -> bool:
    """Whether anything (a file, folder, link, ...) is at `path`, looked at without following."""
    try:
        folder, name = open_parent_folder(root, path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    try:
        os.stat(name, dir_fd=folder, follow_symlinks=False)
    except FileNotFoundError:
        return False
    finally:
        os.close(folder)
    return True


def make_entry(
    root: Path, path: str, target: ResolvedFile, *, folders: list[int] | None = None
) -> Stat:
    """Make the folder or link `target` at `path`, where nothing is (a folder already there is
    taken as it is: a folder has no content), with the row's mode and mtime; made durable, or,
    with `folders`, the descriptor of its parent folder is added there for the caller to flush
    (commit.flush) and close. Returns the stat to index: the row's size, mtime and mode, the
    disk's ctime and inode."""
    folder, name = open_parent_folder(root, path, create=True)
    try:
        if target.kind == DIR:
            try:
                os.mkdir(name, 0o700, dir_fd=folder)
            except FileExistsError:
                pass
            except OSError as exc:
                raise _refused(path, exc) from None
            fd = os.open(name, _DIR_FLAGS, dir_fd=folder)  # ENOTDIR/ELOOP: not a folder there
            try:
                # writable by us until the pass has filled it (set_folder_times gives the
                # row's mode then), so a read-only folder of the peer can receive its files
                os.fchmod(fd, (target.mode & 0o777) | 0o700)
                with contextlib.suppress(OSError):  # best effort; its contents move it anyway
                    os.utime(fd, ns=(target.mtime_ns, target.mtime_ns))
                st = os.fstat(fd)
            finally:
                os.close(fd)
            made = Stat(0, target.mtime_ns, st.st_ctime_ns, st.st_ino, target.mode & 0o777)
        elif target.kind == SYMLINK:
            assert target.target is not None
            try:
                os.symlink(target.target, name, dir_fd=folder)
            except OSError as exc:
                raise _refused(path, exc) from None
            with contextlib.suppress(OSError, NotImplementedError):
                os.utime(
                    name,
                    ns=(target.mtime_ns, target.mtime_ns),
                    dir_fd=folder,
                    follow_symlinks=False,
                )
            st = os.stat(name, dir_fd=folder, follow_symlinks=False)
            made = Stat(target.size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, 0)
        else:
            raise ValueError(f"{path!r}: make_entry makes folders and links, not {target.kind}")
        if folders is None:
            os.fsync(folder)
    except BaseException:
        os.close(folder)
        raise
    if folders is None:
        os.close(folder)
    else:
        folders.append(folder)
    return made


def _refused(path: str, exc: OSError) -> Exception:
    """What a refused mkdir or symlink in a folder we hold open means: ENOENT there is about
    the new name (some FUSE file systems say so for a name they do not allow)."""
    return name_refused(path, exc, also=frozenset({errno.ENOENT})) or exc


def clear_way(root: Path, path: str, row: FileRow, *, keep_versions: bool) -> list[str] | None:
    """Remove the live entry `row` at `path` (checked by `disk_matches`) so that an entry of
    another kind can take the path: a file or link is kept in the versions folder (or
    unlinked), a folder removed if empty. Returns None when the path is clear, else what is
    still inside the folder (the first SHOWN_NAMES names)."""
    if row.kind == DIR:
        return remove_folder(root, path)
    if keep_versions and keep_version(root, path, move=True) is not None:
        return None
    folder, name = open_parent_folder(root, path)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=folder)
    finally:
        os.close(folder)
    return None


def remove_folder(root: Path, path: str) -> list[str] | None:
    """rmdir `path` (made durable): None when it is gone (or was), else the names still
    inside it."""
    try:
        folder, name = open_parent_folder(root, path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        try:
            os.rmdir(name, dir_fd=folder)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            fd = os.open(name, _DIR_FLAGS, dir_fd=folder)
            try:
                return sorted(os.listdir(fd))[:SHOWN_NAMES]
            finally:
                os.close(fd)
        os.fsync(folder)
        return None
    finally:
        os.close(folder)


def set_folder_times(root: Path, folders: Iterable[tuple[str, int, int]]) -> None:
    """Give folders (path, mode, mtime_ns) their indexed mode and mtime once what they hold
    is in place, innermost first (setting a folder's time does not move its parent's). Best
    effort for the time: a folder that is gone or cannot be changed is left as it is."""
    for path, mode, mtime_ns in sorted(folders, key=lambda item: item[0].count("/"), reverse=True):
        try:
            fd = open_folder(root, path)
        except (OSError, UnsafePath):
            continue
        try:
            if stat.S_IMODE(os.fstat(fd).st_mode) != mode:
                os.fchmod(fd, mode)
            os.utime(fd, ns=(mtime_ns, mtime_ns))
        except OSError:
            pass
        finally:
            os.close(fd)
