"""Hard conditions between real nodes (issue 6, parts 4 and 5): a full disk, files and folders
that cannot be read or written, and a node whose clock is hours off.

As root, permission bits do not stop us, so the tests use what does: a small tmpfs for a full
disk, a read-only bind mount for a folder, `chattr +i` for a file, and a node run without
CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH (`setpriv --bounding-set`) for mode-000 files and
folders. Every mount is unmounted and every attribute cleared in teardown, also on failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import IRONSYNC
from tests.daemons import SyncNode, stop_all, tree, write

pytestmark = pytest.mark.slow

HOUR_NS = 3600 * 1_000_000_000
NO_DAC = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]


class Cleanup:
    """Nodes whose daemons to stop, mounts to unmount, immutable files to release."""

    def __init__(self) -> None:
        self.nodes: list[SyncNode] = []
        self.mounts: list[Path] = []
        self.immutable: list[Path] = []

    def node(self, base: Path, node_id: str, cls: type[SyncNode] = SyncNode) -> SyncNode:
        made = cls(base, node_id)
        self.nodes.append(made)
        return made

    def mount(self, *args: str, at: Path) -> None:
        subprocess.run(["mount", *args, str(at)], check=True, capture_output=True, timeout=10)
        self.mounts.append(at)

    def unmount(self, at: Path) -> None:
        self.mounts.remove(at)
        subprocess.run(["umount", str(at)], check=True, capture_output=True, timeout=10)

    def close(self) -> None:
        stop_all(*self.nodes)
        for path in self.immutable:
            subprocess.run(["chattr", "-i", str(path)], capture_output=True, timeout=10)
        for at in reversed(self.mounts):
            done = subprocess.run(["umount", str(at)], capture_output=True, timeout=10)
            if done.returncode != 0:  # still busy: detach it, it goes when released
                subprocess.run(["umount", "-l", str(at)], capture_output=True, timeout=10)


@pytest.fixture
def cleanup() -> Iterator[Cleanup]:
    made = Cleanup()
    try:
        yield made
    finally:
        made.close()


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: mounts a tmpfs / bind mount and drops capabilities")


def need_tool(name: str) -> None:
    if shutil.which(name) is None:
        pytest.skip(f"{name} is not installed")


class NoDacNode(SyncNode):
    """A node whose commands run as root without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH:
    permission bits stop it like any user (a mode-000 file is unreadable)."""

    def run(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [*NO_DAC, *IRONSYNC, *args], capture_output=True, text=True, env=self.env(),
            timeout=timeout,
        )  # fmt: skip
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{self.node_id}: ironsync {' '.join(args)} exited {proc.returncode}\n"
                f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}\nlog:\n{self.log()}"
            )
        return proc


def temp_files(root: Path) -> list[str]:
    return [
        str(Path(d) / n)
        for d, _, names in os.walk(root)
        for n in names
        if n.startswith(".ironsync-") and n.endswith(".tmp")
    ]


def deletions(node: SyncNode, *paths: str) -> list[dict[str, object]]:
    return [e for e in node.events("deleted") if e["path"] in paths]


def status_json(node: SyncNode) -> dict[str, object]:
    return json.loads(node.run("status", "--json").stdout)


# --- full disk -----------------------------------------------------------------------------


def test_a_full_disk_fails_the_write_cleanly_and_the_sync_succeeds_once_space_is_freed(
    cleanup: Cleanup, tmp_path: Path
) -> None:
    need_root()
    a = cleanup.node(tmp_path, "alpha")  # receives, on an 8 MiB tmpfs
    b = cleanup.node(tmp_path, "beta")
    try:
        cleanup.mount("-t", "tmpfs", "-o", "size=8m", "tmpfs", at=a.root)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc.stderr.decode().strip()}")
    old = os.urandom(1_000_000)
    write(b.root, "big.bin", old)
    a.add_peers(b)
    b.start()
    a.sync()
    assert (a.root / "big.bin").read_bytes() == old
    # beta's new content cannot fit: one file bigger than the disk, and three that fit alone
    # but not together (pulled side by side, the disk fills during the writes)
    new = os.urandom(10_000_000)
    write(b.root, "big.bin", new)
    parts = {f"part{i}.bin": os.urandom(3_000_000) for i in range(3)}
    for name, data in parts.items():
        write(b.root, name, data)
    a.sync(expect=1)

    failed = a.events("write_failed")
    assert failed, a.log()
    assert {e["path"] for e in failed} >= {"big.bin"}
    for event in failed:
        assert "ENOSPC" in event["detail"]["reason"], event
    assert (a.root / "big.bin").read_bytes() == old  # the old file is intact
    assert temp_files(a.root) == []  # no half-written file is left behind
    assert not deletions(b, "big.bin", *parts)  # the peer lost nothing
    assert tree(b.root) == {"big.bin": new, **parts}
    tail = a.run("log", "tail", "-n", "50").stdout
    assert "write_failed" in tail and "ENOSPC" in tail
    (storage,) = status_json(a)["storages"]  # type: ignore[misc]
    assert storage["write_failures"] >= 1
    assert "ENOSPC" in storage["last_write_error"]["reason"]
    text = a.run("status").stdout
    assert "failed write" in text and "ENOSPC" in text

    # space freed: the next sync completes, and status forgets the old failures
    subprocess.run(["mount", "-o", "remount,size=64m", str(a.root)], check=True, timeout=10)
    a.sync()
    assert tree(a.root) == tree(b.root) == {"big.bin": new, **parts}
    assert temp_files(a.root) == []
    (storage,) = status_json(a)["storages"]  # type: ignore[misc]
    assert storage["write_failures"] == 0 and storage["last_write_error"] is None


# --- permissions ---------------------------------------------------------------------------


def test_unreadable_files_and_folders_are_reported_skipped_and_never_deleted_on_the_peer(
    cleanup: Cleanup, tmp_path: Path
) -> None:
    need_root()
    need_tool("setpriv")
    a = cleanup.node(tmp_path, "alpha", NoDacNode)  # root without the DAC capabilities
    b = cleanup.node(tmp_path, "beta")
    write(a.root, "secret.txt", "known secret")
    write(a.root, "locked/inner.txt", "inside a folder")
    write(a.root, "plain.txt", "plain")
    a.add_peers(b)
    b.start()
    a.sync()
    before = tree(b.root)
    assert set(before) == {"secret.txt", "locked/inner.txt", "plain.txt"}

    write(a.root, "new-secret.txt", "never read yet")
    write(a.root, "plain.txt", "plain, edited")
    for path in ("secret.txt", "new-secret.txt", "locked"):
        os.chmod(a.root / path, 0)
    try:
        scan = a.run("scan", check=False)
        # the indexes agree (what could not be read is not part of them yet), and `sync`
        # says what it left out: exit 4, not 0
        result = a.sync(expect=4)
        reported = {e["path"] for e in a.events("skipped")}
        said = a.run("sync", check=False)  # and in words
        assert said.returncode == 4
    finally:
        os.chmod(a.root / "secret.txt", 0o644)
        os.chmod(a.root / "new-secret.txt", 0o644)
        os.chmod(a.root / "locked", 0o755)
    # reported, by `scan` and in the log
    for path in ("secret.txt", "new-secret.txt", "locked"):
        assert path in scan.stdout + scan.stderr, scan.stdout
        assert path in reported
        assert f"docs: skipped {path} (" in said.stdout, said.stdout
    assert {item["path"] for item in result["skipped"]} == {
        "secret.txt", "new-secret.txt", "locked",
    }  # fmt: skip
    assert all(item["storage"] == "docs" and item["reason"] for item in result["skipped"])
    assert [r["converged"] for r in result["results"]] == [True]
    # skipped, not deleted: the peer keeps the files, no tombstone anywhere
    assert not deletions(a, "secret.txt", "locked/inner.txt")
    assert not deletions(b, "secret.txt", "locked/inner.txt")
    after = tree(b.root)
    assert after["secret.txt"] == before["secret.txt"]
    assert after["locked/inner.txt"] == before["locked/inner.txt"]
    assert after["plain.txt"] == b"plain, edited"  # the rest synced
    assert "new-secret.txt" not in after

    # readable again: retried, and everything converges
    assert a.sync()["skipped"] == []
    assert tree(a.root) == tree(b.root)
    assert tree(b.root)["new-secret.txt"] == b"never read yet"


def test_a_read_only_folder_and_an_immutable_file_fail_the_writes_until_they_are_writable(
    cleanup: Cleanup, tmp_path: Path
) -> None:
    need_root()
    need_tool("chattr")
    a = cleanup.node(tmp_path, "alpha")
    b = cleanup.node(tmp_path, "beta")  # receives, with a read-only folder and a frozen file
    write(a.root, "ro/existing.txt", "v1")
    write(a.root, "ro/gone.txt", "to be deleted")
    write(a.root, "frozen.txt", "v1")
    write(a.root, "mnt/elsewhere.txt", "on another mount at beta")
    a.add_peers(b)
    b.start()
    a.sync()
    assert (b.root / "ro/gone.txt").exists()
    frozen = b.root / "frozen.txt"
    if subprocess.run(["chattr", "+i", str(frozen)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not supported by this file system")
    cleanup.immutable.append(frozen)
    ro = b.root / "ro"
    try:
        cleanup.mount("--bind", str(ro), at=ro)
        cleanup.mount("-o", "remount,bind,ro", at=ro)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot make a read-only bind mount: {exc.stderr.decode().strip()}")
    cleanup.mounts.pop()  # the remount is the same mount point as the bind
    cleanup.mount("--bind", str(b.root / "mnt"), at=b.root / "mnt")  # writable, another mount

    write(a.root, "ro/existing.txt", "v2")
    write(a.root, "ro/new.txt", "new")
    (a.root / "ro/gone.txt").unlink()
    write(a.root, "frozen.txt", "v2")
    write(a.root, "free.txt", "free")
    (a.root / "mnt/elsewhere.txt").unlink()
    a.sync(expect=1)
    failed = {e["path"]: e["detail"]["reason"] for e in b.events("write_failed")}
    assert {"ro/existing.txt", "ro/new.txt", "frozen.txt"} <= set(failed), failed
    assert "EROFS" in failed["ro/new.txt"] and "EPERM" in failed["frozen.txt"], failed
    assert "EROFS" in failed["ro/gone.txt"], failed
    # a deletion in a folder that is another file system (its old version kept by a copy)
    assert not (b.root / "mnt/elsewhere.txt").exists()
    assert "mnt/elsewhere.txt" not in failed
    assert (ro / "existing.txt").read_text() == "v1" and frozen.read_text() == "v1"
    assert (ro / "gone.txt").exists()
    assert (b.root / "free.txt").read_text() == "free"  # the rest synced
    assert temp_files(b.root) == []
    # beta's failure to write is not a change of beta's: alpha still has its files
    assert (a.root / "ro/new.txt").read_text() == "new"

    subprocess.run(["chattr", "-i", str(frozen)], check=True, timeout=10)
    cleanup.immutable.remove(frozen)
    cleanup.unmount(ro)
    a.sync()
    assert tree(a.root) == tree(b.root)
    assert tree(b.root) == {
        "ro/existing.txt": b"v2",
        "ro/new.txt": b"new",
        "frozen.txt": b"v2",
        "free.txt": b"free",
    }


# --- clock skew ----------------------------------------------------------------------------


def skew(path: Path, hours: float) -> None:
    """Give `path` an mtime `hours` off, as a node whose clock is that far off would."""
    at = time.time_ns() + int(hours * HOUR_NS)
    os.utime(path, ns=(at, at))


def test_a_node_whose_clock_is_hours_off_never_loses_a_write(
    cleanup: Cleanup, tmp_path: Path
) -> None:
    a = cleanup.node(tmp_path, "alpha")  # its clock is off
    b = cleanup.node(tmp_path, "beta")
    a.add_peers(b)
    b.start()

    # sequential: alpha's edit carries an mtime 5 hours ahead; beta edits after seeing it
    skew(write(a.root, "seq.txt", "A from the future"), +5)
    a.sync()
    assert (b.root / "seq.txt").read_text() == "A from the future"
    write(b.root, "seq.txt", "B, causally later")
    a.sync()
    assert (a.root / "seq.txt").read_text() == "B, causally later"
    assert tree(a.root) == tree(b.root) == {"seq.txt": b"B, causally later"}

    # concurrent: alpha's edit 6 hours in the past, beta's now; both are kept
    write(a.root, "both.txt", "base")
    a.sync()
    skew(write(a.root, "both.txt", "alpha's edit"), -6)
    write(b.root, "both.txt", "beta's edit")
    a.sync()
    a.sync()
    ta, tb = tree(a.root), tree(b.root)
    assert ta == tb
    copies = {p: v for p, v in ta.items() if p.startswith("both") and p != "both.txt"}
    assert ta["both.txt"] == b"beta's edit"  # the newer mtime wins the name
    assert list(copies.values()) == [b"alpha's edit"], ta

    # a deletion after an edit with a future mtime still deletes, on both sides
    skew(write(a.root, "doomed.txt", "future"), +5)
    a.sync()
    (b.root / "doomed.txt").unlink()
    a.sync()
    assert not (a.root / "doomed.txt").exists() and not (b.root / "doomed.txt").exists()
    # and the other way: the skewed node deletes a file the peer wrote "later"
    skew(write(b.root, "later.txt", "peer's"), +8)
    a.sync()
    (a.root / "later.txt").unlink()
    a.sync()
    assert "later.txt" not in tree(a.root) and "later.txt" not in tree(b.root)
    assert tree(a.root) == tree(b.root)
