"""A short coverage-guided run of the decoder fuzzer (tests/fuzzdecoder.py): any bytes fed to a
Connection, in any state and cut anywhere, give messages that survive a round trip or a
ProtocolError, never anything else. Long runs, with atheris: bin/fuzz-decoder."""

from __future__ import annotations

import os

import pytest

from tests import fuzzdecoder
from tests.fuzzdecoder import Finding, one_input, run_builtin, seed_inputs

SEED = int(os.environ.get("IRONSYNC_FUZZ_SEED", "20261125"))


def test_fuzzed_bytes_give_valid_messages_or_protocol_errors_only() -> None:
    stats = run_builtin(SEED, max_inputs=8000, seconds=12.0)
    summary = f"{stats.summary()}; replay: bin/fuzz-decoder --engine builtin --seed {SEED}"

    assert not stats.findings, f"{summary}\n{stats.findings[0][1]}"
    assert stats.arcs > stats.seed_arcs, summary  # the feedback found what the seeds did not
    assert stats.inputs >= 2000, summary


def test_the_seeds_are_valid_conversations() -> None:
    for data in seed_inputs():
        one_input(data)  # raises Finding on anything but a ProtocolError


def test_an_exception_other_than_a_protocol_error_is_a_finding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(body: object) -> object:
        raise KeyError("a decoder bug")

    monkeypatch.setattr(fuzzdecoder, "decode_body", broken)
    with pytest.raises(Finding, match="KeyError"):
        one_input(bytes([3, 0]) + b"\x92\x01")
