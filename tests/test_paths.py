"""Every path a peer names is checked before it touches the disk (ironsync.sync.paths)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ironsync.sync.paths import (
    UnsafePath,
    check_peer_path,
    open_folder,
    open_inside,
    open_parent_folder,
    resolve_inside,
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
    "newline": ("a\nb", "control character"),
    "c1_control": ("a\x85b", "control character"),
    "ignore_file": (".ignore", "the .ignore file"),
    "state_folder": (".ironsync", "inside .ironsync/"),
    "inside_state_folder": (".ironsync/versions/x", "inside .ironsync/"),
    "temp_file": ("x/.ironsync-1.tmp", "temporary file name"),
    "temp_folder": (".ironsync-1.tmp/x", "temporary file name"),
    "drive_letter": ("C:/x", "drive letter"),
    "backslash": ("a\\b", "backslash"),
    "empty": ("", "empty path"),
    "trailing_slash": ("a/", "trailing slash"),
    "too_long": ("a/" * 2048 + "b", "longer than 4096"),
    "long_component": ("x" * 256, "longer than 255 bytes"),
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
