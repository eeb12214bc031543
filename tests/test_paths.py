"""Every path a peer names is checked before it touches the disk (ironsync.sync.paths)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from ironsync.sync.paths import (
    NotStorable,
    OpenFolders,
    StorableChecks,
    UnsafePath,
    behind_a_symlink,
    check_peer_path,
    check_storable,
    name_refused,
    open_folder,
    open_inside,
    open_parent_folder,
    reached_as_named,
    resolve_inside,
    way_to,
)

REFUSED = {
    "parent_at_start": ("../x", "'..' component"),
    "absolute": ("/etc/x", "absolute path"),
    "parent_in_the_middle": ("a/../../x", "'..' component"),
    "empty_component": ("a//b", "empty component"),
    "dot": (".", "'.' component"),
    "dot_dot": ("..", "'..' component"),
    "dot_in_the_middle": ("a/./b", "'.' component"),
    "nul": ("a\x00b", "contains NUL"),
    "ignore_file": (".ignore", "the .ignore file"),
    "state_folder": (".ironsync", "inside .ironsync/"),
    "inside_state_folder": (".ironsync/versions/x", "inside .ironsync/"),
    "temp_file": ("x/.ironsync-1.tmp", "temporary file name"),
    "temp_folder": (".ironsync-1.tmp/x", "temporary file name"),
    "drive_letter": ("C:/x", "drive letter"),
    "drive_root": ("c:", "drive letter"),
    "empty": ("", "empty path"),
    "trailing_slash": ("a/", "trailing slash"),
    "too_long": ("a/" * 2048 + "b", "longer than 4096"),
    "lone_surrogate": ("a\udcffb", "not valid UTF-8"),
}


@pytest.mark.parametrize(("path", "reason"), REFUSED.values(), ids=REFUSED.keys())
def test_unsafe_peer_path_is_refused_with_its_reason(path: str, reason: str) -> None:
    with pytest.raises(UnsafePath) as caught:
        check_peer_path(path)
    assert reason in caught.value.reason
    assert caught.value.path == path or len(path) > 4096


@pytest.mark.parametrize(
    "path",
    [
        "a",
        "a/b/c.txt",
        "sub/.ignore",  # only the root's .ignore is ironsync's
        "sub/.ironsync/x",  # only the root's .ironsync/ is
        ".ironsync-notes",  # not a temp name without .tmp
        ".hidden",
        "a..b/...",
        "ünïcødé/文件.txt",
        "x" * 255,
        "a/" * 2047 + "b",
        # legal POSIX names, synced as rsync and Syncthing do (issue 11): not attacks
        "a\\b.txt",
        "C:\\x",  # a backslash is an ordinary character on POSIX
        "c:notes.txt",  # not a drive: only "X:" as the first component is one
        "name with spaces",
        " leading and trailing space ",
        "-leading-dash",
        "--",
        "\U0001f600 emoji.txt",
        "caf\u00e9",  # NFC
        "cafe\u0301",  # NFD: another name
        "tab\there",
        "new\nline",
        "esc\x1b[2J",
        "del\x7f",
        "c1\x85control",
        "...",
        "x" * 256,  # longer than most file systems allow: the disk decides (NotStorable)
        "\u6587" * 200,  # 600 bytes: fine on exFAT or NTFS, too long on ext4
    ],
)
def test_ordinary_relative_path_is_accepted_unchanged(path: str) -> None:
    assert check_peer_path(path) == path


def test_resolve_inside_returns_the_absolute_path_even_when_it_does_not_exist_yet(
    tmp_path: Path,
) -> None:
    (tmp_path / "a").mkdir()
    assert resolve_inside(tmp_path, "a/b/c.txt") == tmp_path / "a" / "b" / "c.txt"
    assert resolve_inside(Path(os.path.relpath(tmp_path)), "x").is_absolute()


def test_symlinked_folder_escaping_the_root_is_refused(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "escape").symlink_to(outside)
    with pytest.raises(UnsafePath, match="symlink on the way: escape"):
        resolve_inside(root, "escape/x")
    with pytest.raises(UnsafePath, match="symlink on the way"):
        open_parent_folder(root, "escape/x", create=True)
    with pytest.raises(UnsafePath, match="symlink on the way"):
        open_inside(root, "escape/x")
    assert list(outside.iterdir()) == []


def test_symlinked_file_is_refused_for_reading_and_writing(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("not yours")
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(secret)
    with pytest.raises(UnsafePath, match="symlink on the way: link"):
        resolve_inside(root, "link")
    with pytest.raises(UnsafePath, match="symlink on the way"):
        open_inside(root, "link")


def test_file_in_place_of_a_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("a file")
    with pytest.raises(UnsafePath, match="not a folder: a"):
        resolve_inside(tmp_path, "a/b")
    with pytest.raises(UnsafePath, match="not a folder: a"):
        open_folder(tmp_path, "a", create=True)


def test_open_folder_creates_missing_folders_inside_the_root(tmp_path: Path) -> None:
    fd = open_folder(tmp_path, "x/y/z", create=True)
    try:
        assert os.path.samestat(os.fstat(fd), os.stat(tmp_path / "x" / "y" / "z"))
    finally:
        os.close(fd)
    with pytest.raises(FileNotFoundError):
        open_folder(tmp_path, "missing")


def test_resolve_inside_checks_the_text_first(tmp_path: Path) -> None:
    with pytest.raises(UnsafePath, match=r"'\.\.' component"):
        resolve_inside(tmp_path, "../x")


def test_unsafe_path_carries_the_path_and_the_reason() -> None:
    error = UnsafePath("a/../b", "'..' component")
    assert (error.path, error.reason) == ("a/../b", "'..' component")
    assert "a/../b" in str(error) and "'..' component" in str(error)


def test_a_name_too_long_for_this_file_system_is_not_storable_but_no_attack(
    tmp_path: Path,
) -> None:
    long_name = "x" * 256  # NAME_MAX is 255 bytes on ext4, tmpfs, btrfs, xfs
    with pytest.raises(NotStorable, match="a name of 256 bytes is too long"):
        check_storable(tmp_path, long_name)
    (tmp_path / "a").mkdir()
    with pytest.raises(NotStorable, match="too long") as caught:
        check_storable(tmp_path, f"a/{long_name}/b")
    assert caught.value.path == f"a/{long_name}/b"
    with pytest.raises(NotStorable, match="too long"):
        open_parent_folder(tmp_path, f"a/{long_name}/b", create=True)
    assert os.listdir(tmp_path / "a") == []


def test_names_spelled_as_on_disk_are_storable(tmp_path: Path) -> None:
    (tmp_path / "Docs").mkdir()
    (tmp_path / "Docs" / "Readme.txt").write_text("one")
    (tmp_path / "Docs" / "rEADME.TXT").write_text("another file: this disk tells them apart")
    for rel in ("Docs/Readme.txt", "Docs/rEADME.TXT", "Docs/new.txt", "new/deep/x", "docs/x"):
        check_storable(tmp_path, rel)  # nothing raised


def test_check_storable_stops_at_a_symlink_and_leaves_refusing_it_to_the_walk(
    tmp_path: Path,
) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "x").write_text("outside")
    (root / "link").symlink_to(outside)
    check_storable(root, "link/x")  # nothing to confuse; the O_NOFOLLOW walk refuses it
    with pytest.raises(UnsafePath, match="symlink on the way"):
        open_parent_folder(root, "link/x", create=True)


def test_storable_checks_of_many_paths_say_what_check_storable_says_each_folder_opened_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "old.txt").write_text("here")
    (root / "a" / "file").write_text("not a folder")
    (root / "a" / "link").symlink_to(tmp_path)
    long_name = "x" * 256
    paths = [
        "top.txt", "a/new.txt", "a/b/old.txt", "a/b/new.txt", "a/b/c/d/new.txt",
        "a/file/x", "a/link/x", "new/deep/x", f"a/{long_name}/x", f"a/{long_name}/y",
        f"a/b/{long_name}", "a/b/again.txt",
    ]  # fmt: skip

    def outcome(check: object, rel: str) -> str | None:
        try:
            check(rel)  # type: ignore[operator]
        except NotStorable as exc:
            return exc.reason
        return None

    alone = {rel: outcome(lambda r: check_storable(root, r), rel) for rel in paths}
    assert alone[f"a/{long_name}/x"] is not None and alone[f"a/b/{long_name}"] is not None
    assert [rel for rel, reason in alone.items() if reason is not None] == [
        f"a/{long_name}/x", f"a/{long_name}/y", f"a/b/{long_name}",
    ]  # fmt: skip

    opened: list[object] = []
    real_open = os.open

    def counting_open(path: object, *args: object, **kwargs: object) -> int:
        opened.append(path)
        return real_open(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", counting_open)
    with StorableChecks(root) as checks:
        together = {rel: outcome(checks.check, rel) for rel in paths}
    monkeypatch.undo()

    assert together == alone
    assert sorted(map(str, opened)) == sorted([str(root), "a", "b"])  # each folder once
    assert os.listdir(root) == ["a"]  # checking makes nothing


def test_open_folders_opens_each_folder_once_and_gives_each_path_a_descriptor_of_its_own(
    tmp_path: Path,
) -> None:
    created: list[list[str]] = [[], [], []]
    with OpenFolders(tmp_path) as folders:
        opened = [
            folders.open_parent(rel, create=True, created=made)
            for rel, made in zip(["new/deep/a", "new/deep/b", "new/c"], created, strict=True)
        ]
    try:
        assert [name for _, name in opened] == ["a", "b", "c"]
        assert len({fd for fd, _ in opened}) == 3  # each its own, open after the cache closed
        deep = os.stat(tmp_path / "new" / "deep")
        for fd, _ in opened[:2]:
            assert (os.fstat(fd).st_dev, os.fstat(fd).st_ino) == (deep.st_dev, deep.st_ino)
        assert os.fstat(opened[2][0]).st_ino == os.stat(tmp_path / "new").st_ino
        assert created == [["new", "new/deep"], [], []]  # made once, for the first path
    finally:
        for fd, _ in opened:
            os.close(fd)
    with OpenFolders(tmp_path) as folders, pytest.raises(UnsafePath, match="not a folder"):
        (tmp_path / "file").write_text("x")
        folders.open_parent("file/x", create=True)


@pytest.mark.parametrize(
    ("code", "also", "reason"),
    [
        (errno.ENAMETOOLONG, frozenset(), "a name of 3 bytes is too long"),
        (errno.EINVAL, frozenset(), "does not allow the name (EINVAL)"),
        (errno.EILSEQ, frozenset(), "does not allow the name (EILSEQ)"),
        (errno.ENOENT, frozenset({errno.ENOENT}), "does not allow the name (ENOENT)"),
        (errno.ENOENT, frozenset(), None),
        (errno.EACCES, frozenset(), None),
        (errno.ENOSPC, frozenset(), None),
    ],
)
def test_only_errors_about_the_name_make_a_path_not_storable(
    code: int, also: frozenset[int], reason: str | None
) -> None:
    refused = name_refused("a/b:c", OSError(code, os.strerror(code)), also=also)
    if reason is None:
        assert refused is None
    else:
        assert refused is not None and refused.path == "a/b:c" and reason in refused.reason


def test_a_name_made_from_the_path_that_is_too_long_is_the_one_reported() -> None:
    copy = "x" * 250 + ".sync-conflict-20231114-221320-alpha-0123abcd"
    error = OSError(errno.ENAMETOOLONG, "File name too long", "/root/a/x", None, f"/root/a/{copy}")
    refused = name_refused("a/" + "x" * 250, error)
    assert refused is not None
    assert refused.reason == f"a name of {len(copy)} bytes is too long for this file system: {copy}"


def test_the_way_to_a_path_is_what_the_first_folder_that_is_not_one_is(tmp_path: Path) -> None:
    """way_to (what the watcher's and rescan's checks use): every folder on the way, from the
    root down; the first that is not a folder decides; the answers are kept per folder."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "link").symlink_to("b")
    (tmp_path / "a" / "file").write_text("x")
    folders: dict[str, str] = {}
    assert way_to(tmp_path, "top.txt", folders) == "dir"
    assert way_to(tmp_path, "a/b/c/d.txt", folders) == "missing"  # a/b/c is missing
    assert way_to(tmp_path, "a/b/x.txt", folders) == "dir"
    assert way_to(tmp_path, "a/link/x.txt", folders) == "symlink"
    assert way_to(tmp_path, "a/link/deeper/x.txt", folders) == "symlink"
    assert way_to(tmp_path, "a/file/x.txt", folders) == "other"
    assert folders == {
        "a": "dir", "a/b": "dir", "a/b/c": "missing", "a/link": "symlink",
        "a/link/deeper": "symlink", "a/file": "other",
    }  # fmt: skip
    assert reached_as_named(tmp_path, "a/b/x.txt", {})
    assert not reached_as_named(tmp_path, "a/link/x.txt", {})
    assert behind_a_symlink(tmp_path, "a/link/deeper/x.txt", {})
    assert not behind_a_symlink(tmp_path, "a/b/c/d.txt", {})  # missing is not a link
