"""Full sync between real nodes: daemons as subprocesses on 127.0.0.1, real TLS, real files."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import xxhash

from ironsync.chunking import content_hash
from ironsync.scan import Observed, Stat, hash_files
from tests.conftest import IRONSYNC
from tests.daemons import SyncNode, stop_all, tree, write

ALPHA_HASH = content_hash(b"alpha's edit").hex()[:8]
ALPHA_COPY = f"shared.sync-conflict-20231114-221320-alpha-{ALPHA_HASH}.txt"
"""alpha's side of the conflict these tests make: the second of its mtime, node, content."""

pytestmark = pytest.mark.slow


@pytest.fixture
def nodes() -> Iterator[list[SyncNode]]:
    """The nodes a test made (with `node`); their daemons are stopped afterwards."""
    made: list[SyncNode] = []
    yield made
    stop_all(*made)


def node(nodes: list[SyncNode], tmp_path: Path, node_id: str, **kw: object) -> SyncNode:
    made = SyncNode(tmp_path, node_id, **kw)  # type: ignore[arg-type]
    nodes.append(made)
    return made


def test_two_nodes_converge_through_a_daemon_and_a_standalone_sync(
    nodes: list[SyncNode], tmp_path: Path
) -> None:
    a = node(nodes, tmp_path, "alpha")
    b = node(nodes, tmp_path, "beta")
    write(a.root, "only-a.txt", "from alpha")
    write(a.root, "dir/nested/big.bin", os.urandom(3_000_000))
    write(b.root, "only-b.txt", "from beta")
    a.add_peers(b)
    b.start()
    result = a.sync()
    assert result["exit"] == 0
    (peer,) = [r for r in result["results"] if "peer" in r]
    assert peer["peer"] == "beta" and peer["converged"]
    assert tree(a.root) == tree(b.root)
    assert set(tree(a.root)) == {"only-a.txt", "only-b.txt", "dir/nested/big.bin"}
    # mtimes travel with the content
    assert (a.root / "only-b.txt").stat().st_mtime_ns == (b.root / "only-b.txt").stat().st_mtime_ns
    # a second sync has nothing to do
    again = a.sync()
    (peer,) = [r for r in again["results"] if "peer" in r]
    assert peer["pulled"] == 0 and peer["peer_changed"] == 0 and peer["converged"]


def test_three_nodes_converge_and_a_node_relays_what_it_learned(
    nodes: list[SyncNode], tmp_path: Path
) -> None:
    a = node(nodes, tmp_path, "alpha")
    b = node(nodes, tmp_path, "beta")
    c = node(nodes, tmp_path, "gamma")
    write(a.root, "a.txt", "a")
    write(b.root, "b.txt", "b")
    write(c.root, "c.txt", "c")
    # a and c only know b: what a has reaches c through b
    a.add_peers(b)
    c.add_peers(b)
    b.start()
    a.sync()
    c.sync()
    a.sync()
    assert tree(a.root) == tree(b.root) == tree(c.root)
    assert set(tree(a.root)) == {"a.txt", "b.txt", "c.txt"}


def test_deletion_made_while_a_node_was_stopped_is_not_resurrected(
    nodes: list[SyncNode], tmp_path: Path
) -> None:
    a = node(nodes, tmp_path, "alpha")
    b = node(nodes, tmp_path, "beta")
    write(a.root, "doomed.txt", "delete me while stopped")
    write(a.root, "kept.txt", "keep me")
    a.add_peers(b)
    b.start()
    a.sync()
    assert (b.root / "doomed.txt").exists()
    # alpha is not running: the file is deleted behind its back
    (a.root / "doomed.txt").unlink()
    a.sync()
    assert not (a.root / "doomed.txt").exists()
    assert not (b.root / "doomed.txt").exists()
    assert tree(a.root) == tree(b.root) == {"kept.txt": b"keep me"}


def test_move_made_offline_is_a_move_on_the_peer_without_resending_content(
    nodes: list[SyncNode], tmp_path: Path
) -> None:
    a = node(nodes, tmp_path, "alpha")
    b = node(nodes, tmp_path, "beta")
    content = os.urandom(4_000_000)
    write(a.root, "old/place.bin", content)
    a.add_peers(b)
    b.start()
    a.sync()
    assert (b.root / "old/place.bin").read_bytes() == content
    (a.root / "new").mkdir()
    (a.root / "old/place.bin").rename(a.root / "new/place.bin")
    result = a.sync()
    assert tree(a.root) == tree(b.root) == {"new/place.bin": content}
    # beta moved its own file: a move on the peer, no content on the wire, nothing rebuilt
    moved = [e for e in b.events("moved") if e["path"] == "new/place.bin"]
    assert moved and moved[-1]["detail"]["from"] == "old/place.bin"
    assert moved[-1]["peer"] == "alpha"
    assert not [e for e in b.events("write_started") if e["path"] == "new/place.bin"]
    (peer,) = [r for r in result["results"] if "peer" in r]
    assert peer["bytes_from_peer"] == 0 and result["exit"] == 0
    # a new version of the new path (counters do not travel between paths), and the move is
    # in its history
    history = json.loads(b.run("history", "--json", "docs:new/place.bin").stdout)
    assert history["current"]["version"] == {"alpha": 1}
    assert [e["kind"] for e in history["events"]] == ["moved"]


def test_new_files_come_whole_and_copies_and_edits_still_reuse_what_is_here(
    nodes: list[SyncNode], tmp_path: Path
) -> None:
    """Issue 13: a new file of at most 4 MiB whose content is held nowhere here comes whole
    (GetFiles, no chunk list); a copy of content held here, and an edit of a file here, still
    cost only what differs."""
    a = node(nodes, tmp_path, "alpha")
    b = node(nodes, tmp_path, "beta")
    old, kept = os.urandom(2_000_000), os.urandom(1_500_000)
    write(a.root, "old.bin", old)
    write(a.root, "keep.bin", kept)
    a.add_peers(b)
    b.start()
    assert a.sync()["exit"] == 0
    mark = len(a.events("write_finished"))
    fresh = os.urandom(3_000_000)
    write(b.root, "fresh.bin", fresh)
    write(b.root, "copy.bin", kept)
    write(b.root, "old.bin", old[:1_000_000] + os.urandom(1000) + old[1_000_000:])
    result = a.sync()
    assert result["exit"] == 0 and tree(a.root) == tree(b.root)
    finished = {e["path"]: e["detail"] for e in a.events("write_finished")[mark:]}
    assert set(finished) == {"fresh.bin", "copy.bin", "old.bin"}
    assert finished["fresh.bin"]["bytes_from_peer"] == len(fresh)
    assert finished["copy.bin"]["bytes_from_peer"] == 0
    assert finished["copy.bin"]["bytes_reused"] == len(kept)
    assert finished["old.bin"]["bytes_from_peer"] < 200_000  # the changed chunks, not 2 MB


def test_a_first_sync_of_far_more_files_than_descriptors_allowed_converges(
    nodes: list[SyncNode], tmp_path: Path
) -> None:
    """Pulls hold at most a share of the process's descriptors open (temp files and folders
    of files waiting for their group): 3,000 small files under a limit of 256 descriptors."""
    a = node(nodes, tmp_path, "alpha")
    b = node(nodes, tmp_path, "beta")
    for n in range(3000):
        write(a.root, f"d{n % 30:02d}/f{n}.txt", os.urandom(100 + n % 3000))
    b.add_peers(a)
    a.start()

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    proc = subprocess.run(
        [*IRONSYNC, "sync", "--json"], env=b.env(), capture_output=True, text=True,
        timeout=300, preexec_fn=low_limit,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert tree(a.root) == tree(b.root)


def test_concurrent_edits_keep_both_contents_as_a_conflict_copy(
    nodes: list[SyncNode], tmp_path: Path
) -> None:
    a = node(nodes, tmp_path, "alpha")
    b = node(nodes, tmp_path, "beta")
    write(a.root, "shared.txt", "original")
    a.add_peers(b)
    b.start()
    a.sync()
    b.stop()
    edit_a = write(a.root, "shared.txt", "alpha's edit")
    edit_b = write(b.root, "shared.txt", "beta's edit, made later")
    os.utime(edit_a, ns=(1_700_000_000 * 10**9, 1_700_000_000 * 10**9))
    os.utime(edit_b, ns=(1_700_000_100 * 10**9, 1_700_000_100 * 10**9))
    b.start()
    a.sync()
    files_a, files_b = tree(a.root), tree(b.root)
    assert files_a == files_b
    assert files_a["shared.txt"] == b"beta's edit, made later"  # the newer mtime keeps the name
    copies = {p: c for p, c in files_a.items() if ".sync-conflict-" in p}
    assert list(copies.values()) == [b"alpha's edit"]
    (copy_name,) = copies
    assert copy_name == ALPHA_COPY
    assert a.events("conflict")


def test_node_with_another_group_secret_is_refused_and_nothing_is_written(
    nodes: list[SyncNode], tmp_path: Path
) -> None:
    a = node(nodes, tmp_path, "alpha")
    intruder = node(nodes, tmp_path, "mallory", secret="not the group's secret!")
    write(a.root, "private.txt", "for the group only")
    write(intruder.root, "planted.txt", "should never arrive")
    intruder.add_peers(a)
    a.start()
    result = intruder.sync(expect=3)
    assert result["exit"] == 3
    assert tree(intruder.root) == {"planted.txt": b"should never arrive"}
    assert tree(a.root) == {"private.txt": b"for the group only"}
    a.stop()
    assert a.events("peer_refused")


def test_sigkill_mid_transfer_leaves_no_torn_file_and_the_next_sync_converges(
    nodes: list[SyncNode], tmp_path: Path
) -> None:
    a = node(nodes, tmp_path, "alpha")
    b = node(nodes, tmp_path, "beta")
    old = os.urandom(2_000_000)
    write(a.root, "big.bin", old)
    a.add_peers(b)
    b.start()
    a.sync()
    new = os.urandom(300_000_000)
    write(b.root, "big.bin", new)
    b.stop()
    b.start()
    env = a.env()
    syncing = subprocess.Popen(
        [*IRONSYNC, "sync"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    # kill the receiver once its temp file exists: mid-transfer
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        temps = [p for p in a.root.iterdir() if p.name.startswith(".ironsync-")]
        if temps and temps[0].stat().st_size > 0:
            break
        time.sleep(0.01)
    os.kill(syncing.pid, signal.SIGKILL)
    syncing.wait(timeout=10)
    assert (a.root / "big.bin").read_bytes() == old  # the old file, never a mix
    a.sync()
    assert (a.root / "big.bin").read_bytes() == new
    assert not [p for p in a.root.iterdir() if p.name.startswith(".ironsync-")]


def test_a_sparse_gigabyte_with_4_kib_of_data_arrives_sparse_for_about_4_kib(
    nodes: list[SyncNode], tmp_path: Path
) -> None:
    # issue 11: holes are neither read, nor sent, nor written
    a = node(nodes, tmp_path, "alpha")
    b = node(nodes, tmp_path, "beta")
    size, at, data = 1 << 30, 300 * 1024 * 1024 + 12_345, os.urandom(4096)
    with open(b.root / "disk.img", "wb") as f:
        f.truncate(size)
        f.seek(at)
        f.write(data)
    if (b.root / "disk.img").stat().st_blocks * 512 >= size:
        pytest.skip("this file system does not keep holes")
    a.add_peers(b)
    b.start()

    result = a.sync()

    arrived = a.root / "disk.img"
    assert arrived.stat().st_size == size
    assert arrived.stat().st_blocks * 512 <= 3 * 4096  # the data, in at most two blocks
    with open(arrived, "rb") as f:
        f.seek(at - 100)
        assert f.read(4296) == bytes(100) + data + bytes(100)
    expected = xxhash.xxh3_128()  # the hash of every byte, zeros included, from memory
    for piece in (bytes(at), data, bytes(size - at - len(data))):
        expected.update(piece)
    (observed,) = hash_files(a.root, [("disk.img", Stat(size, 0, 0, 0, 0))])
    assert isinstance(observed, Observed) and observed.content.hash == expected.digest()
    # on the wire: the data and a chunk list of a few records
    (peer,) = [r for r in result["results"] if "peer" in r]
    assert peer["converged"] and peer["pulled"] == 1
    assert peer["bytes_from_peer"] <= len(data) + 2048
    (finished,) = a.events("write_finished")
    assert finished["detail"]["bytes_from_peer"] == peer["bytes_from_peer"]
    assert finished["detail"]["hash"] == expected.hexdigest()
    sent = 0
    deadline = time.monotonic() + 10
    while not sent and time.monotonic() < deadline:  # counted when the session closes
        status = json.loads(b.run("status", "--json").stdout)
        sent = sum(p["bytes_out"] or 0 for p in status["peers"] if p["node_id"] == "alpha")
        time.sleep(0.1)
    assert 0 < sent <= 64 * 1024, sent  # everything beta sent alpha in that sync
