"""Randomized multi-node histories and kill -9 crash points (issues 6 and 11), bounded for CI.

Each history is seeded: a failure prints `bin/soak --seed S` (`--live` for a live history),
which replays it. The operations cover files, folders, symlinks, type changes and chmod; the
check compares the nodes' whole trees and that nothing written is lost. `bin/soak` runs many
more (see tests/histories.py for what is generated and what is checked).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.daemons import SyncNode, stop_all, tree, write
from tests.histories import (
    DISK_OPS,
    NODES,
    History,
    batch_crash_trial,
    crash_trial,
    link_key,
    make_history,
    run_history,
    sender_crash_trial,
)

pytestmark = pytest.mark.slow

HISTORY_SEEDS = range(12)  # bin/soak runs many more; these keep the suite's time down
HISTORY_OPS = 10  # after a prelude of 7: files on every node, a folder, a link, a daemon up, a sync
# watchers on: changes propagate while the history runs (live seeds 6 and 33 with 14 ops found
# conflict copies replacing each other; fixed, see the test of it below)
LIVE_SEEDS = range(7)  # seed 6 found the conflict copies replacing each other
LIVE_OPS = 12  # after a prelude of 8: files on every node, a folder, a link, every daemon up
CRASH_SEEDS = (1, 3, 5, 6)  # mid_chunk, before_rename, mid_transaction, a random moment
SENDER_CRASH_SEEDS = (0, 1, 2)  # serving, serving_to_daemon, writing
BATCH_CRASH_SEEDS = (1, 2, 3)  # after the K-th rename of a group, after its renames, mid-commit


@pytest.mark.parametrize("seed", HISTORY_SEEDS)
def test_random_history_converges_and_loses_nothing_written(seed: int, tmp_path: Path) -> None:
    result = run_history(seed, tmp_path, length=HISTORY_OPS)
    assert result.ok, "\n".join([*result.failures, result.replay()])


@pytest.mark.parametrize("seed", LIVE_SEEDS)
def test_random_live_history_converges_and_loses_nothing_written(seed: int, tmp_path: Path) -> None:
    result = run_history(seed, tmp_path, length=LIVE_OPS, live=True)
    assert result.ok, "\n".join([*result.failures, result.replay()])


@pytest.mark.parametrize("seed", CRASH_SEEDS)
def test_kill_9_during_a_pull_leaves_old_or_new_and_the_next_sync_converges(
    seed: int, tmp_path: Path
) -> None:
    trial = crash_trial(seed, tmp_path, small=True)
    assert trial.ok, "\n".join([*trial.failures, trial.replay()])
    assert trial.point == "random" or trial.killed  # the hook fired where it was aimed


@pytest.mark.parametrize("seed", SENDER_CRASH_SEEDS)
def test_kill_9_of_the_sender_mid_pull_leaves_old_or_new_and_a_restart_converges(
    seed: int, tmp_path: Path
) -> None:
    trial = sender_crash_trial(seed, tmp_path, small=True)
    assert trial.ok, "\n".join([*trial.failures, trial.replay()])


@pytest.mark.parametrize("seed", BATCH_CRASH_SEEDS)
def test_kill_9_in_the_middle_of_a_group_of_pulls_leaves_each_file_old_or_new(
    seed: int, tmp_path: Path
) -> None:
    trial = batch_crash_trial(seed, tmp_path)
    assert trial.ok, "\n".join([*trial.failures, trial.replay()])
    assert trial.killed  # the hook fired where it was aimed


# issue 6, seed 1101: a move used to carry the old path's version vector to the new path
# (ironsync/sync/local.py _record_moved), so it dominated a concurrent create there.
def test_a_file_moved_onto_a_name_another_node_created_meanwhile_keeps_both(
    tmp_path: Path,
) -> None:
    a, b = SyncNode(tmp_path, "alpha"), SyncNode(tmp_path, "beta")
    a.add_peers(b)
    try:
        write(b.root, "old.txt", "beta wrote old.txt")
        b.start()
        a.sync()  # alpha has old.txt, version {beta: 1}
        b.stop()
        write(b.root, "new.txt", "beta's new.txt, made while alpha moves")  # {beta: 1} too
        (a.root / "old.txt").rename(a.root / "new.txt")  # {beta: 1, alpha: 1}
        b.start()
        a.sync()
        files = tree(a.root)
        assert files == tree(b.root)
        assert sorted(files.values()) == [
            b"beta wrote old.txt",
            b"beta's new.txt, made while alpha moves",
        ]
    finally:
        stop_all(a, b)


# issue 6, live seed 6 (`bin/soak --seed 6 --ops 14 --live`): a conflict copy is named by the
# losing version's node and mtime second only, so a second conflict whose loser comes from the
# same node in the same second gets the same name; its version descends from the first
# conflict's merge, so it dominates the first copy there and replaces it (the first loser ends
# up only in .ironsync/versions). Not fixed yet: ironsync/reconcile.py `_conflict_copies`.
# issue 6, live seeds 6 and 33: a conflict copy was named by the node and the second of its
# mtime alone, so a node's second losing edit in one second replaced its first copy
# (ironsync/reconcile.py conflict_copy_path now adds the content hash).
def test_a_second_conflict_copy_of_one_node_in_one_second_does_not_replace_the_first(
    tmp_path: Path,
) -> None:
    a, b = SyncNode(tmp_path, "alpha"), SyncNode(tmp_path, "beta")
    a.add_peers(b)
    second = (int(time.time()) - 100) * 1_000_000_000  # a whole second, in the past

    def put(node: SyncNode, data: str, ms: int) -> None:
        path = write(node.root, "f.txt", data)
        os.utime(path, ns=(second + ms * 1_000_000,) * 2)

    try:
        write(a.root, "f.txt", "common ancestor")
        b.start()
        a.sync()
        put(b, "beta's first edit", 100)
        put(a, "alpha's first edit", 500)  # newer: keeps the name, beta's is the copy
        a.sync()
        put(b, "beta's second edit", 200)  # the same second as beta's first: the same copy name
        put(a, "alpha's second edit", 800)
        a.sync()
        files = tree(a.root)
        assert files == tree(b.root)
        assert sorted(files.values()) == [
            b"alpha's second edit",
            b"beta's first edit",
            b"beta's second edit",
        ]
    finally:
        stop_all(a, b)


# --- the harness itself (no daemon runs): what the model records for the tree ops -----------


def test_every_op_kind_is_generated_and_a_seed_replays_the_same_history() -> None:
    kinds = {op[0] for seed in range(60) for op in make_history(seed, 14)}
    assert kinds >= set(DISK_OPS) | {"sync", "stop", "start", "restart", "kill"}
    assert "wait" in {op[0] for seed in range(10) for op in make_history(seed, 14, live=True)}
    assert make_history(7, 14) == make_history(7, 14) != make_history(7, 14, live=True)


def test_no_disk_op_goes_through_a_symlink(tmp_path: Path) -> None:
    history = History(tmp_path / "h", 0, [], 0)
    root = history.nodes["n0"].root
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "a").symlink_to(outside)  # every path under a/ has a link on the way
    (root / "f0.txt").symlink_to(outside / "target.txt")
    ops = [
        ["create", "n0", "a/f2.txt", "<t>", 10, 1],
        ["create", "n0", "f0.txt", "<t>", 10, 1],
        ["mkdir", "n0", "a/b"],
        ["typeclash", "n0", "n1", "a/b", "dirfile", "file", "<t>", 1, "x"],  # n1: no a/
        ["symlink", "n0", "a/l1", "x"],
        ["chmod", "n0", "a", "700"],
        ["ignored", "n0", "a", "<t>", 10, 1],
        ["mvdir", "n0", "a", "g"],  # a link, not a folder: mv of a folder does nothing
        ["rmtree", "n0", "a"],
    ]
    for i, op in enumerate(ops):
        history.apply(i, op)
    assert list(outside.iterdir()) == []
    assert history.result.kinds == {"typeclash": 1}
    assert (history.nodes["n1"].root / "a" / "b").is_file()
    assert (root / "a").is_symlink() and (root / "f0.txt").is_symlink()


def test_rm_r_and_type_changes_supersede_what_they_replace_and_mv_keeps_it(
    tmp_path: Path,
) -> None:
    history = History(tmp_path / "h", 0, [], 0)
    model = history.model
    ops = [
        ["create", "n0", "a/f2.txt", "<f2>", 10, 1],
        ["symlink", "n0", "a/l1", "../f0.txt"],
        ["create", "n0", "f0.txt", "<f0>", 10, 2],
        ["mvdir", "n0", "a", "g"],  # supersedes nothing
        ["retype", "n0", "f0.txt", "dirfile", "<in>", 10, 3, "x"],  # f0's content replaced
        ["chmod", "n0", "f0.txt", "700"],
    ]
    for i, op in enumerate(ops):
        history.apply(i, op)
    assert len(model.required()) == 3  # g/f2.txt, g/l1, f0.txt/in.txt
    assert link_key("../f0.txt") in model.required()
    history.apply(6, ["rmtree", "n0", "g"])
    assert [model.written[k] for k in model.required()] == ["op 4 retype on n0"]
    assert history.result.kinds == {"create": 2, "symlink": 1, "mvdir": 1, "retype": 1,
                                    "chmod": 1, "rmtree": 1}  # fmt: skip


# issue 11, histories 6 and 13: a symlink removed (the `unlink` op) made every later scan of
# that node raise KeyError (ironsync/sync/local.py _MoveSources took the vanished link for a
# file), so its daemon answered no sync again; and a peer refused to delete (or update, or keep
# as a conflict copy) a link, "unsafe: symlink on the way" (fullsync.py resolved the link
# itself as a folder on the way).
def test_a_symlink_removed_between_two_scans_is_a_deletion(tmp_path: Path) -> None:
    a, b = SyncNode(tmp_path, "alpha"), SyncNode(tmp_path, "beta")
    a.add_peers(b)
    try:
        (a.root / "l0").symlink_to("missing/target")
        b.start()
        a.sync()
        assert os.readlink(b.root / "l0") == "missing/target"
        (a.root / "l0").unlink()
        a.sync()
        assert not os.path.lexists(b.root / "l0")
    finally:
        stop_all(a, b)


def test_the_check_fails_on_a_mode_an_empty_folder_a_link_target_or_a_lost_content(
    tmp_path: Path,
) -> None:
    def checked(change: Callable[[Path], object] | None = None) -> list[str]:
        history = History(tmp_path / f"h{len(list(tmp_path.iterdir()))}", 0, [], 0)
        for name in NODES:  # the same tree on every node, as the ops would make it on n0
            ops = [
                ["create", name, "a/f2.txt", "<f2>", 10, 1],
                ["mkdir", name, "e/f"],
                ["symlink", name, "l0", "a"],
                ["chmod", name, "a/f2.txt", "755"],
            ]
            for i, op in enumerate(ops):
                history.apply(i, op)
        if change is not None:
            change(history.nodes["n2"].root)
        history._check_index_matches_disk = lambda node: None  # type: ignore[method-assign]
        history.check()  # (no daemon ever indexed these trees)
        return history.result.failures

    assert checked() == []
    assert checked(lambda root: (root / "a/f2.txt").chmod(0o644)) == [
        "trees differ at a/f2.txt: n0 file 755 10 B e8f3c6f6, n1 file 755 10 B e8f3c6f6, "
        "n2 file 644 10 B e8f3c6f6"
    ]
    assert checked(lambda root: (root / "e/f").rmdir()) == [
        "trees differ at e/f: n0 folder 755, n1 folder 755, n2 absent"
    ]

    def retarget(root: Path) -> None:
        (root / "l0").unlink()
        (root / "l0").symlink_to("c")

    failures = checked(retarget)
    assert failures[0] == (
        "trees differ at l0: n0 symlink -> 'a', n1 symlink -> 'a', n2 symlink -> 'c'"
    )
    assert failures[1].startswith("n2: content of op 2 symlink on n0 is lost (nowhere)")
    failures = checked(lambda root: (root / "a/f2.txt").write_bytes(b"other"))
    assert failures[1].startswith("n2: content of op 0 create on n0 is lost (nowhere)")
