"""Every name the disk can hold is synced or reported, per path (issue 11, item 5): black-box,
over real daemons on 127.0.0.1.

Legal POSIX names (a backslash, spaces, emoji, a leading dash, NFC and NFD spellings of one
word, control characters) sync like any other. A name a node cannot store is skipped for that
path alone, named by `sync` (exit 4) and by a `skipped` event, and the rest of the storage
syncs: names that are not valid UTF-8 on the origin, names too long for the receiver's file
system, and names that a case-insensitive file system does not tell apart from one it holds.

The last two need a second kind of file system, so those tests run as root with a small exFAT
image (exfatprogs, and exfat-fuse: this kernel has neither vfat nor exfat; exFAT is what USB
sticks and SD cards hold, and is case-insensitive and refuses `\\ : * ? " < > |` like vfat) on
a loop device, and skip with the reason otherwise. FAT keeps neither nanosecond mtimes nor
permission bits (every file is 0777 there), which this item does not change: the files these
tests sync to it have whole-second mtimes and mode 0777, so that the rest can converge.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemons import SyncNode, stop_all, tree, write

pytestmark = pytest.mark.slow

CAFE_NFC = unicodedata.normalize("NFC", "café")
CAFE_NFD = unicodedata.normalize("NFD", "café")
LEGAL_NAMES = {
    "a\\b.txt": "a backslash is an ordinary character on POSIX",
    "dir\\with\\backslashes/inner.txt": "in a folder name too",
    "name with spaces": "spaces",
    " leading space": "a leading space",
    "-leading-dash": "a leading dash",
    "\U0001f600 grin.txt": "emoji",
    CAFE_NFC: "NFC",
    CAFE_NFD: "NFD, another name",
    "x" * 255: "255 bytes, NAME_MAX",
    "\u6587" * 85: "255 bytes of CJK",
    "c:notes.txt": "a colon after a letter is no drive here",
    "tab\there": "a tab",
    "new\nline": "a newline",
    "esc\x1b[31mred": "an escape sequence",
}
WHOLE_SECOND_NS = 1_700_000_000 * 1_000_000_000


class Disks:
    """Nodes whose daemons to stop, then exFAT images to unmount and detach (also on failure)."""

    def __init__(self) -> None:
        self.nodes: list[SyncNode] = []
        self.mounted: list[tuple[Path, str]] = []  # (mount point, loop device)

    def node(self, base: Path, node_id: str) -> SyncNode:
        made = SyncNode(base, node_id)
        self.nodes.append(made)
        return made

    def exfat(self, at: Path, size: str = "64M") -> None:
        """Mount a fresh exFAT image at `at` (an empty folder), or skip the test saying why."""
        if os.geteuid() != 0:
            pytest.skip("mounting a disk image needs root")
        for tool in ("mkfs.exfat", "mount.exfat-fuse", "losetup", "fusermount"):
            if shutil.which(tool) is None:
                pytest.skip(f"{tool} is missing (apt-get install exfatprogs exfat-fuse)")
        image = at.with_name(at.name + ".img")
        subprocess.run(["truncate", "-s", size, str(image)], check=True, timeout=10)
        subprocess.run(["mkfs.exfat", str(image)], check=True, capture_output=True, timeout=30)
        made = subprocess.run(
            ["losetup", "-f", "--show", str(image)], capture_output=True, text=True, timeout=10
        )
        if made.returncode != 0:
            pytest.skip(f"no loop device: {made.stderr.strip()}")
        loop = made.stdout.strip()
        mount = subprocess.run(
            ["mount.exfat-fuse", loop, str(at)], capture_output=True, text=True, timeout=30
        )
        if mount.returncode != 0:
            subprocess.run(["losetup", "-d", loop], capture_output=True, timeout=10)
            pytest.skip(f"cannot mount an exFAT image with FUSE: {mount.stderr.strip()}")
        self.mounted.append((at, loop))

    def close(self) -> None:
        stop_all(*self.nodes)
        for at, loop in reversed(self.mounted):
            done = subprocess.run(["fusermount", "-u", str(at)], capture_output=True, timeout=30)
            if done.returncode != 0:  # still busy: detach it, it goes when released
                subprocess.run(["umount", "-l", str(at)], capture_output=True, timeout=30)
            subprocess.run(["losetup", "-d", loop], capture_output=True, timeout=10)


@pytest.fixture
def disks() -> Iterator[Disks]:
    made = Disks()
    try:
        yield made
    finally:
        made.close()


def fat_friendly(root: Path) -> None:
    """Whole-second mtimes and mode 0777 on every file and folder under `root`: what a FAT
    file system can hold (module docstring)."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        if ".ironsync" in Path(dirpath).relative_to(root).parts[:1]:
            continue
        for name in [*filenames, *dirnames]:
            path = Path(dirpath) / name
            if path == root / ".ironsync":
                continue
            os.chmod(path, 0o777)
            os.utime(path, ns=(WHOLE_SECOND_NS, WHOLE_SECOND_NS))


def skipped_paths(result: dict[str, object]) -> dict[str, str]:
    return {item["path"]: item["reason"] for item in result["skipped"]}  # type: ignore[attr-defined,index]


def the_peer(result: dict[str, object]) -> dict[str, object]:
    (peer,) = [r for r in result["results"] if "peer" in r]  # type: ignore[attr-defined]
    return peer


def test_every_legal_name_arrives_over_two_daemons(disks: Disks, tmp_path: Path) -> None:
    a = disks.node(tmp_path, "alpha")
    b = disks.node(tmp_path, "beta")
    for name, content in LEGAL_NAMES.items():
        write(a.root, name, content)
    write(b.root, "from beta \\ with a backslash", "the other way too")
    write(b.root, "\u00e7a\tva/\u00e9t\u00e9.txt", "and a control character in a folder")
    a.add_peers(b)
    b.start()

    result = a.sync()
    assert result["exit"] == 0 and result["skipped"] == []
    assert the_peer(result)["converged"]
    assert tree(a.root) == tree(b.root)
    assert set(tree(b.root)) == {
        *LEGAL_NAMES, "from beta \\ with a backslash", "\u00e7a\tva/\u00e9t\u00e9.txt",
    }  # fmt: skip
    # NFC and NFD are two names, two files, each with its own content
    assert (b.root / CAFE_NFC).read_text() == "NFC"
    assert (b.root / CAFE_NFD).read_text() == "NFD, another name"
    # nothing left to do, and nobody was taken for an attacker
    again = the_peer(a.sync())
    assert again["pulled"] == 0 and again["peer_changed"] == 0
    b.stop()
    assert a.events("peer_refused") == [] and b.events("peer_refused") == []
    # and what people read escapes control characters: a name cannot forge a line
    said = a.run("log", "tail", "-n", "1000").stdout
    assert "new\\x0aline" in said and "esc\\x1b[31mred" in said and "\x1b" not in said


def test_names_that_are_not_utf8_are_listed_by_sync_with_exit_4(
    disks: Disks, tmp_path: Path
) -> None:
    a = disks.node(tmp_path, "alpha")
    b = disks.node(tmp_path, "beta")
    write(a.root, "fine.txt", "fine")
    bad = os.fsencode(a.root) + b"/latin1-caf\xe9.txt"
    with open(bad, "wb") as f:
        f.write(b"a name from another century")
    a.add_peers(b)
    b.start()

    result = a.sync(expect=4)
    assert the_peer(result)["converged"]
    assert skipped_paths(result) == {"latin1-caf\\xe9.txt": "name is not valid UTF-8"}
    assert tree(b.root) == {"fine.txt": b"fine"}
    said = a.run("sync", check=False)
    assert said.returncode == 4
    assert "docs: skipped latin1-caf\\xe9.txt (name is not valid UTF-8): not synced" in said.stdout
    assert [e["path"] for e in a.events("skipped")][-1] == "latin1-caf\\xe9.txt"


def test_a_name_too_long_for_the_receivers_file_system_is_skipped_and_the_rest_syncs(
    disks: Disks, tmp_path: Path
) -> None:
    if os.statvfs(tmp_path).f_namemax > 255:
        pytest.skip("the receiver's file system allows names over 255 bytes")
    a = disks.node(tmp_path, "alpha")
    b = disks.node(tmp_path, "beta")
    disks.exfat(a.root)  # exFAT counts 255 UTF-16 units: 200 CJK characters fit, 600 bytes
    too_long = "\u6587" * 200
    long_folder = "\u5b57" * 100 + "/inner.txt"
    write(a.root, too_long, "held by exFAT, too long for ext4")
    write(a.root, long_folder, "in a folder whose name is 300 bytes")
    write(a.root, "fine.txt", "fine")
    write(a.root, "sub/also fine.txt", "also fine")
    b.add_peers(a)
    a.start()

    # The receiver says what it left out, and exits 4: converged apart from those.
    result = b.sync(expect=4)
    assert the_peer(result)["converged"]
    skipped = skipped_paths(result)
    assert set(skipped) == {too_long, long_folder, long_folder.rpartition("/")[0]}
    assert "a name of 600 bytes is too long for this file system" in skipped[too_long]
    assert tree(b.root) == {"fine.txt": b"fine", "sub/also fine.txt": b"also fine"}
    said = b.run("sync", check=False)
    assert said.returncode == 4
    assert f"docs: skipped {too_long} (a name of 600 bytes is too long" in said.stdout
    assert {e["path"] for e in b.events("skipped")} == set(skipped)

    # The origin, syncing with the receiver's daemon, learns that the peer left names out.
    a.stop()
    b.start()
    a.add_peers(b)
    write(a.root, "later.txt", "later")
    result = a.sync(expect=4)
    peer = the_peer(result)
    assert peer["converged"] and peer["peer_skipped"] == 3  # the folder too
    assert "skipped 3 name(s) it cannot store" in a.run("sync", check=False).stdout
    assert tree(b.root)["later.txt"] == b"later"
    assert a.events("peer_refused") == []


def test_names_that_differ_only_by_case_are_never_one_over_the_other_on_a_case_insensitive_disk(
    disks: Disks, tmp_path: Path
) -> None:
    a = disks.node(tmp_path, "alpha")
    b = disks.node(tmp_path, "beta")
    disks.exfat(b.root)
    write(a.root, "Readme.txt", "the first one")
    write(a.root, "Docs/a.txt", "a")
    write(a.root, "Same.txt", "lower case")  # two new names at once: pulled side by side
    write(a.root, "SAME.TXT", "UPPER CASE")
    fat_friendly(a.root)
    b.add_peers(a)
    a.start()

    result = b.sync(expect=4)
    assert the_peer(result)["converged"]
    (same,) = [n for n in os.listdir(b.root) if n.lower() == "same.txt"]
    assert (b.root / same).read_bytes() == (a.root / same).read_bytes()  # one whole file
    other = "SAME.TXT" if same == "Same.txt" else "Same.txt"
    assert set(skipped_paths(result)) == {other}
    assert f"'{same}' is here already" in skipped_paths(result)[other]

    write(a.root, "README.TXT", "the second one")
    write(a.root, "docs/b.txt", "b, in a folder spelled otherwise")
    write(a.root, "other.txt", "the rest still syncs")
    refused = ["a\\b.txt", "what?.txt", "dir:x/inner.txt"]  # exFAT allows none of these
    for name in refused:
        write(a.root, name, "fine on ext4")
    fat_friendly(a.root)
    result = b.sync(expect=4)
    assert the_peer(result)["converged"]
    skipped = skipped_paths(result)
    # the folders `docs` and `dir:x` are entries too: skipped as well
    assert set(skipped) == {"README.TXT", "docs", "docs/b.txt", "dir:x", other, *refused}
    for name in [*refused, "dir:x"]:
        assert "this file system does not allow the name" in skipped[name], skipped
    assert "'Readme.txt' is here already" in skipped["README.TXT"]
    assert "case-insensitive" in skipped["README.TXT"]
    assert "'Docs' is here already" in skipped["docs/b.txt"]
    # nothing was written over: each file holds its own name's content
    assert tree(b.root) == {
        "Readme.txt": b"the first one", "Docs/a.txt": b"a", same: (a.root / same).read_bytes(),
        "other.txt": b"the rest still syncs",
    }  # fmt: skip
    said = b.run("sync", check=False)
    assert said.returncode == 4
    assert "docs: skipped README.TXT ('Readme.txt' is here already" in said.stdout
    events = [e for e in b.events("skipped") if e["path"] == "README.TXT"]
    assert events and events[-1]["status"] == "warning" and events[-1]["peer"] == "alpha"

    # and the origin keeps all of its names: nothing came back as a deletion or an edit
    a.stop()
    assert tree(a.root) == {
        "Readme.txt": b"the first one", "README.TXT": b"the second one", "Docs/a.txt": b"a",
        "docs/b.txt": b"b, in a folder spelled otherwise", "Same.txt": b"lower case",
        "SAME.TXT": b"UPPER CASE", "other.txt": b"the rest still syncs",
        **{name: b"fine on ext4" for name in refused},
    }  # fmt: skip
    assert [e for e in a.events() if e["kind"] in ("deleted", "conflict")] == []


def test_a_255_byte_name_is_changed_and_deleted_like_any_other(
    disks: Disks, tmp_path: Path
) -> None:
    """Its old content is kept in the versions folder, whose `NAME~STAMP` would be too long."""
    a = disks.node(tmp_path, "alpha")
    b = disks.node(tmp_path, "beta")
    longest = "\u00e9" * 127 + "x"  # 255 bytes
    write(a.root, longest, "one")
    write(a.root, "y" * 255, "one")
    a.add_peers(b)
    b.start()
    a.sync()
    write(a.root, longest, "two")
    a.sync()
    assert (b.root / longest).read_text() == "two"
    (a.root / longest).unlink()
    a.sync()
    assert set(tree(b.root)) == {"y" * 255}
    b.stop()
    said = b.run("history", str(b.root / longest)).stdout
    kept = [line for line in said.splitlines() if "kept version" in line]
    assert len(kept) == 2, said  # "one", replaced; "two", deleted
    restored = b.run("restore", str(b.root / longest))
    assert (b.root / longest).read_text() == "two", restored.stdout


def test_a_conflict_whose_copy_name_would_be_too_long_keeps_both_sides_and_is_reported(
    disks: Disks, tmp_path: Path
) -> None:
    a = disks.node(tmp_path, "alpha")
    b = disks.node(tmp_path, "beta")
    name = "z" * 240 + ".txt"  # NAME.sync-conflict-...-NODE-HASH.txt would be 289 bytes
    write(a.root, name, "before")
    a.add_peers(b)
    b.start()
    a.sync()
    write(a.root, name, "alpha's edit")
    write(b.root, name, "beta's edit")

    result = a.sync(expect=4)
    assert the_peer(result)["converged"]
    (reason,) = skipped_paths(result).values()
    assert "a name of 289 bytes is too long for this file system: zzz" in reason
    assert tree(a.root) == {name: b"alpha's edit"}  # nothing lost, on either side
    assert tree(b.root) == {name: b"beta's edit"}
