"""Path safety: every path a peer names is checked before it touches the disk.

A peer is a member of the group, but a buggy or compromised one must still not be able to make
this node read or write outside a storage root (shared/DESIGN.md, "Rules that keep data
safe"). Two layers, and two kinds of refusal:

- `check_peer_path` is pure and refuses only what no honest node sends (UnsafePath, an attack:
  the peer is disconnected): a path that is not relative, '/'-separated and normalized, that
  holds NUL, that is longer than the protocol allows, or that names anything ironsync owns
  (`.ignore`, `.ironsync/`, temporary files). Every other name is an ordinary name (issue 11):
  on POSIX a backslash, a colon, a leading dash, control characters other than NUL, any
  Unicode spelling (NFC and NFD are two names) are all legal, and rsync and Syncthing sync
  them; so do we. Control characters are a hazard for whoever prints a name, not for the
  disk: ironsync's outputs escape them where they show names (`cli._shown`).
- `resolve_inside` and the `open_*` helpers look at the disk: no component on the way may be
  a symlink (a symlinked folder could point anywhere) or a non-folder. The `open_*` helpers walk
  with one `O_NOFOLLOW` open per component relative to the previous folder's descriptor, so a
  folder swapped for a symlink after the check cannot redirect the operation either.

A name that is no attack but that this node cannot or will not store is NotStorable: skipped and
reported for that path alone, while the rest of the storage syncs. That is a name this file
system refuses (too long: ENAMETOOLONG; characters it does not allow, such as a backslash or
':' on FAT: EINVAL, EILSEQ, or ENOENT from some FUSE drivers), and a name that this file system
does not tell apart from one it holds already (`check_storable`: 'README.TXT' arriving where
'Readme.txt' is, on a case-insensitive file system). Such a name is never written over the
file it would alias.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import unicodedata
from pathlib import Path

from ironsync.ignore import IGNORE_FILE, STATE_DIR, is_internal, is_temp_name
from ironsync.protocol.limits import MAX_PATH_LEN

# A Windows drive root ("C:" alone or "C:/..."): absolute there. "c:notes.txt" is a POSIX name.
_DRIVE = re.compile(r"[A-Za-z]:(/|$)")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

NAME_REFUSED_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.EINVAL, errno.EILSEQ})
"""What a file system answers, creating or looking up a name, when it will not hold that name."""


class UnsafePath(Exception):
    """A path that must not be used, because no honest peer sends it; `reason` says why."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"unsafe path {path!r}: {reason}")


class NotStorable(Exception):
    """A path that is no attack, but that this node cannot or will not store: skipped and
    reported for that path alone (module docstring); `reason` says why."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"cannot store {path!r} here: {reason}")


def check_peer_path(path: str) -> str:
    """`path` itself if it is a safe storage-relative path; raise UnsafePath otherwise."""
    if not isinstance(path, str):
        raise UnsafePath(repr(path), f"not a str but {type(path).__name__}")
    if not path:
        raise UnsafePath(path, "empty path")
    if len(path) > MAX_PATH_LEN:
        raise UnsafePath(path[:64] + "...", f"longer than {MAX_PATH_LEN} characters")
    if "\x00" in path:
        raise UnsafePath(path, "contains NUL")
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafePath(path, "not valid UTF-8") from None
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
        if is_temp_name(part):
            raise UnsafePath(path, "ironsync temporary file name")
    if path == IGNORE_FILE:
        raise UnsafePath(path, "the .ignore file is never synced")
    if is_internal(path):
        raise UnsafePath(path, f"inside {STATE_DIR}/")
    return path


def name_refused(
    path: str, exc: OSError, *, also: frozenset[int] = frozenset()
) -> NotStorable | None:
    """The NotStorable that `exc` means, when creating or looking up `path` failed because the
    file system will not hold its name (NAME_REFUSED_ERRNOS, and the errnos in `also` where the
    caller knows the folder is there); None for any other error."""
    code = exc.errno or 0
    if code not in NAME_REFUSED_ERRNOS and code not in also:
        return None
    if code == errno.ENAMETOOLONG:
        # The name may be one the caller made from `path` (a conflict copy's): the error's.
        named = [f for f in (exc.filename, exc.filename2) if isinstance(f, (str, bytes))]
        names = path.split("/") + [os.path.basename(os.fsdecode(f)) for f in named]
        longest = max(names, key=lambda name: len(name.encode("utf-8", "surrogateescape")))
        size = len(longest.encode("utf-8", "surrogateescape"))
        reason = f"a name of {size} bytes is too long for this file system"
        return NotStorable(path, reason if longest in path.split("/") else f"{reason}: {longest}")
    return NotStorable(
        path, f"this file system does not allow the name ({errno.errorcode.get(code, code)})"
    )


def check_storable(root: Path, rel: str) -> None:
    """Raise NotStorable when the disk already holds a component of `rel` under another
    spelling that this file system does not tell apart from it ('README.TXT' where
    'Readme.txt' is, on a case-insensitive file system; 'Docs/a' where 'docs/' is), or when it
    refuses to look a name up (too long). For a path the index does not know: writing it
    would replace, or write into, what another name holds.

    Cheap where names are told apart: a component found on disk costs one more lookup (its
    other spelling, which is not there); the folder is listed only when that lookup finds
    something. Stops at the first missing component, symlink or non-folder: the `open_*`
    helpers refuse those. `StorableChecks` checks many paths, each folder once."""
    with StorableChecks(root) as checks:
        checks.check(rel)


class StorableChecks:
    """`check_storable` for many paths of one storage, in one go (a batch of pulls, in one
    thread job): each folder on the way is looked at once and its descriptor kept, so a path
    costs one lookup of its final name. What a check finds wrong is not kept: every path
    below a folder at fault raises for itself. A context manager: the descriptors are closed
    at its end."""

    def __init__(self, root: Path | str) -> None:
        self.root = root
        self._folders: dict[str, int | None] = {}  # folder -> its descriptor; None: stop there

    def __enter__(self) -> StorableChecks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        folders, self._folders = self._folders, {}
        for fd in folders.values():
            if fd is not None:
                os.close(fd)

    def check(self, rel: str) -> None:
        check_peer_path(rel)
        folder, _, name = rel.rpartition("/")
        fd = self._folder(folder, rel)
        if fd is not None:
            self._look_up(fd, folder, name, rel)

    def _folder(self, folder: str, rel: str) -> int | None:
        """A descriptor of `folder` when every component on the way to it was checked and is
        a folder; None where the check stops (missing, a symlink, not a folder)."""
        if folder in self._folders:
            return self._folders[folder]
        if not folder:
            fd: int | None = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        else:
            parent, _, name = folder.rpartition("/")
            parent_fd = self._folder(parent, rel)
            fd = None
            if parent_fd is not None:
                st = self._look_up(parent_fd, parent, name, rel)
                if st is not None and stat.S_ISDIR(st.st_mode):
                    # swapped for a symlink meanwhile: the open_* helpers refuse it
                    with contextlib.suppress(OSError):
                        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        self._folders[folder] = fd
        return fd

    @staticmethod
    def _look_up(folder_fd: int, folder: str, name: str, rel: str) -> os.stat_result | None:
        """What `name` in the folder is (None: missing), after checking it is not held
        under another spelling. Raises NotStorable."""
        try:
            st = os.stat(name, dir_fd=folder_fd, follow_symlinks=False)
        except OSError as exc:
            refused = name_refused(rel, exc)
            if refused is not None:
                raise refused from None
            return None  # missing (or not a folder on the way): nothing to be confused with
        other = other_spelling(folder_fd, name)
        if other is not None:
            held = f"{folder}/{other}" if folder else other
            raise NotStorable(
                rel,
                f"{held!r} is here already, and this file system does not tell the two "
                "names apart (case-insensitive)",
            )
        return st


def other_spelling(folder_fd: int, name: str) -> str | None:
    """The name under which the folder holds what `name` reaches, when it is not `name`
    itself (a case- or normalization-insensitive file system); None when it is `name`.
    `name` must exist in the folder."""
    for variant in (name.swapcase(), unicodedata.normalize("NFD", name),
                    unicodedata.normalize("NFC", name)):  # fmt: skip
        if variant == name:
            continue
        try:
            os.stat(variant, dir_fd=folder_fd, follow_symlinks=False)
        except OSError:
            continue  # not there (or not a name here): this spelling is told apart
        names = os.listdir(folder_fd)
        if name in names:
            return None
        folded = _folded(name)
        return next((n for n in names if _folded(n) == folded), variant)
    return None


def _folded(name: str) -> str:
    return unicodedata.normalize("NFC", name).casefold()


def reached_as_named(root: Path | str, rel: str, folders: dict[str, str]) -> bool:
    """Whether every folder on the way to `rel` is a folder on disk, not a symlink (nor
    missing, nor something else): only then is what lstat finds at `root/rel` the entry the
    scanner's walk knows as `rel`. Through a symlink on the way, lstat finds an entry of the
    link's target under a name that is no path of the storage (a watcher may report one:
    watchdog watches a symlinked folder as the folder it points to). `folders` keeps what
    each folder is, for a caller that asks about many paths (`way_to`)."""
    return way_to(root, rel, folders) == "dir"


def behind_a_symlink(root: Path | str, rel: str, folders: dict[str, str]) -> bool:
    """Whether a folder on the way to `rel` is a symlink on disk (a missing one is not)."""
    return way_to(root, rel, folders) == "symlink"


def way_to(root: Path | str, rel: str, folders: dict[str, str]) -> str:
    """What stands on the way to `rel`: "dir" when every folder on it is one, else what the
    first one that is not is: "symlink", "missing" or "other". Cached per folder in
    `folders`."""
    folder = rel.rpartition("/")[0]
    if not folder:
        return "dir"
    known = folders.get(folder)
    if known is None:
        known = way_to(root, folder, folders)
        if known == "dir":
            try:
                mode = os.lstat(f"{root}/{folder}").st_mode
            except OSError:
                known = "missing"
            else:
                if stat.S_ISLNK(mode):
                    known = "symlink"
                elif not stat.S_ISDIR(mode):
                    known = "other"
        folders[folder] = known
    return known


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


class OpenFolders:
    """`open_parent_folder` for many paths of one storage, in one go (a batch of pulls, in one
    thread job): each folder is opened (and made) once, and each caller gets a descriptor of
    its own (a duplicate), which it closes. A folder made for one path is in the `created`
    list of that path alone, as when the others had opened it after it was made. A context
    manager: the kept descriptors are closed at its end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._fds: dict[str, int] = {}

    def __enter__(self) -> OpenFolders:
        return self

    def __exit__(self, *exc: object) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def open_parent(
        self, rel: str, *, create: bool = False, created: list[str] | None = None
    ) -> tuple[int, str]:
        check_peer_path(rel)
        folder, _, name = rel.rpartition("/")
        fd = self._fds.get(folder)
        if fd is None:
            fd = self._fds[folder] = open_folder(self.root, folder, create=create, created=created)
        return os.dup(fd), name


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
                refused = name_refused(rel, exc) if create else None  # else: as os.open says
                raise refused or exc from None
            st = os.stat(part, dir_fd=fd, follow_symlinks=False)
            what = "symlink on the way" if stat.S_ISLNK(st.st_mode) else "not a folder"
            raise UnsafePath(rel, f"{what}: {'/'.join(walked)}") from None
        try:
            os.mkdir(part, dir_fd=fd)
        except FileExistsError:
            continue
        except OSError as exc:
            # ENOENT from mkdir in a folder we hold open, which is still there: some FUSE
            # drivers (exfat-fuse) say so for a name they do not allow.
            also = frozenset({errno.ENOENT}) if os.fstat(fd).st_nlink else frozenset()
            raise name_refused(rel, exc, also=also) or exc from None
        if created is not None:
            created.append("/".join(walked))
        os.fsync(fd)  # the new folder's entry must survive a crash with the file renamed in it
    return os.open(part, _DIR_FLAGS, dir_fd=fd)
