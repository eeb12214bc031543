"""A group member that tries hard to break a real daemon (tests/fuzzpeer.py), for ~30 s.

Random bytes, truncated and oversized frames, frames out of order, paths that escape the root
in every form, absurd sizes and counts, floods of requests, wrong answers when the daemon pulls
from it, and a pull it never answers at all; meanwhile an honest node syncs through the same
daemon. The seed is fixed so CI is repeatable (IRONSYNC_FUZZ_SEED picks another); long runs
with fresh seeds: bin/fuzz-peer --seconds 600, or --frames N --seed S to replay one.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.fuzzpeer import MEMORY_BOUND_MIB, run_campaign

SEED = int(os.environ.get("IRONSYNC_FUZZ_SEED", "20261125"))


@pytest.mark.slow
def test_a_fuzzed_daemon_stays_up_confined_and_bounded_and_serves_an_honest_peer(
    tmp_path: Path,
) -> None:
    report = run_campaign(tmp_path, SEED, seconds=25.0, workers=3)
    summary = report.summary()
    print(summary)
    stats = report.stats

    assert report.alive and report.listening, summary
    assert report.canary == [] and report.unexpected_in_root == [], summary
    assert report.hwm_kib < MEMORY_BOUND_MIB * 1024, summary
    assert report.honest_syncs and not report.honest_failures, summary
    assert report.findings == [], summary
    # The run did try hard: every kind of session, thousands of frames, the daemon pulling
    # from us, and both kinds of refusal.
    assert len(stats.sessions) >= 12 and stats.frames > 5_000, summary
    assert stats.daemon_requests["GetIndex"] and stats.daemon_requests["GetChunks"], summary
    assert stats.protocol_errors and stats.violations, summary
    assert report.peer_refused >= stats.violations, summary
