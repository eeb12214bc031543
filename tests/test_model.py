"""The kinds of index entries and their content hashes: a contract between peers."""

from __future__ import annotations

from ironsync.chunking import content_hash
from ironsync.model import DIR_HASH, KINDS, kind_label, link_hash


def test_entry_content_hashes_are_pinned() -> None:
    # Peers compare these: changing either needs a new protocol version.
    assert DIR_HASH.hex() == DIR_HASH_HEX
    assert link_hash("../target").hex() == LINK_HASH_HEX


def test_a_folder_or_a_link_never_has_a_files_content_hash() -> None:
    assert content_hash(b"") != DIR_HASH
    assert link_hash("abc") != content_hash(b"abc")
    assert link_hash("abc") != link_hash("abd")


def test_kinds_read_as_people_say_them() -> None:
    assert KINDS == ("file", "dir", "symlink")
    assert [kind_label(k) for k in KINDS] == ["file", "folder", "symlink"]


DIR_HASH_HEX = "7c273e3bd41b3e795330a3262534a6dd"
LINK_HASH_HEX = "8ab9a8b7689152e212ee756b01c13911"
