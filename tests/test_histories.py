"""Randomized multi-node histories and kill -9 crash points (issue 6), bounded for CI.

Each history is seeded: a failure prints `bin/soak --seed S`, which replays it. `bin/soak`
runs many more (see tests/histories.py for what is generated and what is checked).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.daemons import SyncNode, stop_all, tree, write
from tests.histories import crash_trial, run_history

pytestmark = pytest.mark.slow

HISTORY_SEEDS = range(20)
HISTORY_OPS = 8  # after a prelude of 5: files on every node, one daemon up, one sync
CRASH_SEEDS = (1, 3, 5, 6)  # mid_chunk, before_rename, mid_transaction, a random moment


@pytest.mark.parametrize("seed", HISTORY_SEEDS)
def test_random_history_converges_and_loses_nothing_written(seed: int, tmp_path: Path) -> None:
    result = run_history(seed, tmp_path, length=HISTORY_OPS)
    assert result.ok, "\n".join([*result.failures, result.replay()])


@pytest.mark.parametrize("seed", CRASH_SEEDS)
def test_kill_9_during_a_pull_leaves_old_or_new_and_the_next_sync_converges(
    seed: int, tmp_path: Path
) -> None:
    trial = crash_trial(seed, tmp_path, small=True)
    assert trial.ok, "\n".join([*trial.failures, trial.replay()])
    assert trial.point == "random" or trial.killed  # the hook fired where it was aimed


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
