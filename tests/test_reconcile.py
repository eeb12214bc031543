"""Specification of ironsync.reconcile: version vectors and the per-path decision."""

from __future__ import annotations

import ast
import functools
import itertools
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import ironsync.reconcile
from ironsync.model import DIR_HASH, link_hash
from ironsync.reconcile import (
    FileState,
    LocalAction,
    Ordering,
    Plan,
    RemoteAction,
    ResolvedFile,
    VersionVector,
    compare,
    conflict_copy_path,
    merge,
    reconcile,
)

H1 = bytes.fromhex("11" * 16)
H2 = bytes.fromhex("22" * 16)
H3 = bytes.fromhex("33" * 16)
NS = 1_000_000_000
T0 = 1_795_515_300 * NS  # 2026-11-24 10:15:00 UTC
MAX_COUNTER = 2**63 - 1
FLIPPED = {
    Ordering.EQUAL: Ordering.EQUAL,
    Ordering.GREATER: Ordering.LESSER,
    Ordering.LESSER: Ordering.GREATER,
    Ordering.CONCURRENT: Ordering.CONCURRENT,
}


def vv(**counters: int) -> VersionVector:
    return VersionVector(counters)


def row(
    node: str,
    version: VersionVector,
    content: bytes | None,
    *,
    mtime_ns: int = T0,
    modified_by: str | None = None,
    mode: int = 0o644,
    path: str = "doc.txt",
) -> FileState:
    """A row; ``content`` None is a tombstone; modified_by defaults to the holder."""
    return FileState(
        node=node,
        path=path,
        version=version,
        hash=content,
        size=0 if content is None else 100 + content[0],
        mtime_ns=mtime_ns,
        mode=mode,
        deleted=content is None,
        modified_by=modified_by or node,
    )


def plan_for(node: str, rows: Iterable[FileState]) -> Plan:
    """``node``'s plan from the rows of one path (its own row, if any, is the local one)."""
    rows = list(rows)
    local = next((r for r in rows if r.node == node), None)
    return reconcile(local, [r for r in rows if r.node != node], node)


# --- version vectors --------------------------------------------------------------------------

small_vectors = st.dictionaries(
    st.sampled_from(["a", "b", "c", "d"]), st.integers(1, 4), max_size=4
).map(VersionVector)
node_ids = st.from_regex(r"[A-Za-z0-9_.-]{1,64}", fullmatch=True)
any_vectors = st.dictionaries(node_ids, st.integers(1, MAX_COUNTER), max_size=5).map(VersionVector)


@settings(max_examples=300, print_blob=True)
@given(small_vectors, small_vectors)
def test_compare_is_antisymmetric_and_equal_means_identical(
    a: VersionVector, b: VersionVector
) -> None:
    assert compare(b, a) is FLIPPED[compare(a, b)]
    assert (compare(a, b) is Ordering.EQUAL) == (a == b)
    assert compare(a, a) is Ordering.EQUAL


@settings(max_examples=300, print_blob=True)
@given(small_vectors, small_vectors, small_vectors)
def test_merge_is_commutative_associative_idempotent_and_dominates_both(
    a: VersionVector, b: VersionVector, c: VersionVector
) -> None:
    assert merge(a, b) == merge(b, a)
    assert merge(merge(a, b), c) == merge(a, merge(b, c))
    assert merge(a, a) == a
    assert compare(merge(a, b), a) in (Ordering.EQUAL, Ordering.GREATER)
    assert compare(merge(a, b), b) in (Ordering.EQUAL, Ordering.GREATER)
    # ... and it is the least such version: anything dominating both dominates the merge.
    if compare(c, a) in (Ordering.EQUAL, Ordering.GREATER) and compare(c, b) in (
        Ordering.EQUAL,
        Ordering.GREATER,
    ):
        assert compare(c, merge(a, b)) in (Ordering.EQUAL, Ordering.GREATER)


@settings(max_examples=200, print_blob=True)
@given(small_vectors, st.sampled_from(["a", "b", "e"]))
def test_bump_dominates_the_vector_it_came_from(a: VersionVector, node: str) -> None:
    bumped = a.bump(node)
    assert compare(bumped, a) is Ordering.GREATER
    assert bumped[node] == a.get(node, 0) + 1
    assert {n: c for n, c in bumped.items() if n != node} == {
        n: c for n, c in a.items() if n != node
    }


def test_empty_vector_is_lesser_than_any_changed_one() -> None:
    assert compare(VersionVector(), vv(a=1)) is Ordering.LESSER
    assert compare(VersionVector(), VersionVector()) is Ordering.EQUAL
    assert VersionVector().to_json() == "{}"
    assert VersionVector.from_json("{}") == VersionVector()


@settings(max_examples=100, print_blob=True)
@given(any_vectors)
def test_json_round_trips_canonically(a: VersionVector) -> None:
    text = a.to_json()
    assert VersionVector.from_json(text) == a
    assert VersionVector.from_json(text).to_json() == text
    assert " " not in text


def test_json_encoding_is_pinned() -> None:
    # files.version is stored text: changing this encoding must fail a test.
    assert vv(beta=1, alpha=2).to_json() == '{"alpha":2,"beta":1}'
    assert VersionVector({"Z-9.x_y": 12, "A": 3}).to_json() == '{"A":3,"Z-9.x_y":12}'
    assert VersionVector.from_json('{ "beta": 1, "alpha": 2 }') == vv(alpha=2, beta=1)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{",
        "[]",
        "1",
        "null",
        '"alpha"',
        '{"alpha":0}',
        '{"alpha":-1}',
        '{"alpha":1.0}',
        '{"alpha":true}',
        '{"alpha":"1"}',
        '{"alpha":null}',
        '{"alpha":{"b":1}}',
        '{"alpha":NaN}',
        '{"alpha":Infinity}',
        '{"alpha":9223372036854775808}',
        '{"":1}',
        '{"al pha":1}',
        '{"alpha/..":1}',
        '{"\\u00e9":1}',
        '{"alpha\\n":1}',
        '{"' + "x" * 65 + '":1}',
        '{"alpha":1,"alpha":2}',
        "[" * 100_000,
    ],
)
def test_malformed_version_json_is_rejected(text: str) -> None:
    with pytest.raises(ValueError):
        VersionVector.from_json(text)


def test_version_vector_rejects_bad_counters_and_is_immutable() -> None:
    for bad in ({"a": 0}, {"a": True}, {"bad id": 1}, {"a": MAX_COUNTER + 1}):
        with pytest.raises(ValueError):
            VersionVector(bad)
    with pytest.raises(ValueError):
        VersionVector.from_json(b'{"a":1}')  # type: ignore[arg-type]
    a = vv(a=1)
    with pytest.raises(AttributeError):
        a._counters = {}  # type: ignore[misc]
    assert hash(a) == hash(vv(a=1))
    assert VersionVector({"a": 64}).to_json() == '{"a":64}'
    assert len(VersionVector({"x" * 64: MAX_COUNTER})) == 1
    with pytest.raises(ValueError):
        VersionVector({"a": MAX_COUNTER}).bump("a")
    with pytest.raises(ValueError):
        vv(a=1).bump("no way")


@settings(max_examples=300, print_blob=True)
@given(
    st.one_of(
        st.text(max_size=30),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
            lambda inner: (
                st.lists(inner, max_size=3)
                | st.dictionaries(st.text(max_size=5), inner, max_size=3)
            ),
            max_leaves=8,
        ).map(json.dumps),
    )
)
def test_from_json_accepts_only_valid_vectors_and_fails_only_with_value_error(text: str) -> None:
    try:
        parsed = VersionVector.from_json(text)
    except ValueError:
        return
    assert VersionVector.from_json(parsed.to_json()) == parsed


# --- conflict naming --------------------------------------------------------------------------


CONTENT = bytes.fromhex("0123abcd") + bytes(12)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("report.txt", "report.sync-conflict-20261124-101500-beta-0123abcd.txt"),
        ("a/report.final.txt", "a/report.final.sync-conflict-20261124-101500-beta-0123abcd.txt"),
        ("Makefile", "Makefile.sync-conflict-20261124-101500-beta-0123abcd"),
        (".bashrc", ".bashrc.sync-conflict-20261124-101500-beta-0123abcd"),
        ("home/.config.json", "home/.config.sync-conflict-20261124-101500-beta-0123abcd.json"),
        ("dir.v2/README", "dir.v2/README.sync-conflict-20261124-101500-beta-0123abcd"),
        ("archive.tar.gz", "archive.tar.sync-conflict-20261124-101500-beta-0123abcd.gz"),
        ("x/y/z.", "x/y/z.sync-conflict-20261124-101500-beta-0123abcd."),
    ],
)
def test_conflict_copy_name_is_pinned(path: str, expected: str) -> None:
    assert conflict_copy_path(path, T0, "beta", CONTENT) == expected


def test_conflict_copy_time_is_utc_seconds_of_the_losing_mtime() -> None:
    def name(mtime_ns: int) -> str:
        return conflict_copy_path("f", mtime_ns, "n1", CONTENT)

    assert name(T0 + NS - 1) == "f.sync-conflict-20261124-101500-n1-0123abcd"
    assert name(0) == "f.sync-conflict-19700101-000000-n1-0123abcd"
    assert name(-1) == "f.sync-conflict-19691231-235959-n1-0123abcd"


def test_two_contents_of_one_node_in_one_second_never_share_a_copy_name() -> None:
    # two conflicts, one after the other: each decided alone (issue 6, live seeds 6 and 33)
    first = conflict_copy_path("f.txt", T0, "n0", bytes([1]) * 16)
    second = conflict_copy_path("f.txt", T0 + NS // 2, "n0", bytes([2]) * 16)
    assert first != second and first.startswith("f.sync-conflict-20261124-101500-n0-")


@pytest.mark.parametrize(
    ("path", "mtime_ns", "node"),
    [("a/", T0, "beta"), ("", T0, "beta"), ("f", T0, "be/ta"), ("f", 10**30, "beta")],
)
def test_conflict_copy_name_rejects_what_cannot_be_named(
    path: str, mtime_ns: int, node: str
) -> None:
    with pytest.raises(ValueError):
        conflict_copy_path(path, mtime_ns, node, CONTENT)


# --- the decision, case by case ---------------------------------------------------------------


def test_dominating_remote_version_is_pulled() -> None:
    here = row("alpha", vv(alpha=1), H1)
    there = row("beta", vv(alpha=1, beta=1), H2, mtime_ns=T0 - NS)  # older mtime, still wins
    plan = reconcile(here, [there], "alpha")
    assert plan.local_action is LocalAction.PULL
    assert plan.target.hash == H2
    assert plan.target.version == vv(alpha=1, beta=1)
    assert plan.target.sources == ("beta",)
    assert not plan.is_conflict
    assert plan.remote_actions == (("beta", RemoteAction.UP_TO_DATE),)


def test_dominating_local_version_is_pushed() -> None:
    here = row("alpha", vv(alpha=2), H2)
    there = row("beta", vv(alpha=1), H1)
    plan = reconcile(here, [there], "alpha")
    assert plan.local_action is LocalAction.NOTHING
    assert plan.remote_actions == (("beta", RemoteAction.PUSH),)


def test_equal_versions_need_nothing() -> None:
    here = row("alpha", vv(alpha=1, beta=2), H1, modified_by="beta")
    there = row("beta", vv(alpha=1, beta=2), H1)
    plan = reconcile(here, [there], "alpha")
    assert plan.local_action is LocalAction.NOTHING
    assert plan.remote_actions == (("beta", RemoteAction.UP_TO_DATE),)
    assert plan.target.sources == ("alpha", "beta")


def test_path_never_seen_here_is_pulled() -> None:
    plan = reconcile(None, [row("beta", vv(beta=1), H1)], "alpha")
    assert plan.local_action is LocalAction.PULL
    assert plan.target.row_for("alpha") == row("alpha", vv(beta=1), H1, modified_by="beta")


def test_tombstone_for_a_path_never_seen_here_is_recorded() -> None:
    plan = reconcile(None, [row("beta", vv(beta=2), None)], "alpha")
    assert plan.local_action is LocalAction.RECORD_TOMBSTONE
    assert plan.target.deleted
    assert plan.target.hash is None


def test_dominating_deletion_deletes_here() -> None:
    here = row("alpha", vv(beta=1), H1, modified_by="beta")
    plan = reconcile(here, [row("beta", vv(beta=2), None)], "alpha")
    assert plan.local_action is LocalAction.DELETE_HERE
    assert plan.target.version == vv(beta=2)


def test_deletion_made_elsewhere_is_not_resurrected_by_an_older_copy() -> None:
    here = row("alpha", vv(beta=2), None, modified_by="beta")
    plan = reconcile(here, [row("beta", vv(beta=1), H1)], "alpha")
    assert plan.local_action is LocalAction.NOTHING
    assert plan.remote_actions == (("beta", RemoteAction.DELETE_THERE),)


def test_deletion_concurrent_with_edit_loses_to_the_edit() -> None:
    deleted = row("alpha", vv(alpha=2, beta=1), None, mtime_ns=T0 + 99 * NS)  # newer, still loses
    edited = row("beta", vv(alpha=1, beta=2), H2)
    plan = reconcile(deleted, [edited], "alpha")
    assert plan.local_action is LocalAction.PULL
    assert plan.keep_local_as is None
    assert plan.conflict_copies == ()
    assert plan.target.hash == H2
    assert plan.target.version == vv(alpha=2, beta=2)
    # and the editor only adopts the merged vector:
    assert reconcile(edited, [deleted], "beta").local_action is LocalAction.UPDATE_VERSION_ONLY


def test_concurrent_deletions_merge_into_one_tombstone() -> None:
    a = row("alpha", vv(alpha=1), None, mtime_ns=T0)
    b = row("beta", vv(beta=1), None, mtime_ns=T0 + NS)
    plan = reconcile(a, [b], "alpha")
    assert plan.target.deleted
    assert plan.target.version == vv(alpha=1, beta=1)
    assert plan.target.mtime_ns == T0 + NS
    assert plan.local_action is LocalAction.UPDATE_VERSION_ONLY
    assert plan.conflict_copies == ()


def test_concurrent_identical_contents_merge_without_a_conflict_copy() -> None:
    a = row("alpha", vv(alpha=1), H1, mtime_ns=T0)
    b = row("beta", vv(beta=1), H1, mtime_ns=T0 + NS, mode=0o600)
    plan_a = reconcile(a, [b], "alpha")
    plan_b = reconcile(b, [a], "beta")
    assert plan_a.conflict_copies == plan_b.conflict_copies == ()
    assert plan_a.target == plan_b.target
    assert plan_a.target.version == vv(alpha=1, beta=1)
    assert (plan_a.target.mtime_ns, plan_a.target.mode) == (T0 + NS, 0o600)
    assert plan_a.local_action is LocalAction.UPDATE_METADATA  # touch + chmod, no transfer
    assert plan_b.local_action is LocalAction.UPDATE_VERSION_ONLY


def test_concurrent_edits_newer_mtime_keeps_the_name_older_is_kept_as_copy() -> None:
    older = row("alpha", vv(alpha=2, beta=1), H1, mtime_ns=T0)
    newer = row("beta", vv(alpha=1, beta=2), H2, mtime_ns=T0 + NS)
    plan = reconcile(older, [newer], "alpha")
    assert plan.is_conflict
    assert plan.target.hash == H2
    assert plan.target.version == vv(alpha=2, beta=2)  # merged, no extra bump
    assert plan.local_action is LocalAction.KEEP_LOCAL_THEN_PULL
    assert plan.keep_local_as == "doc.sync-conflict-20261124-101500-alpha-11111111.txt"
    (copy,) = plan.conflict_copies
    assert copy == ResolvedFile(
        path="doc.sync-conflict-20261124-101500-alpha-11111111.txt",
        version=vv(alpha=2, beta=1),
        hash=H1,
        size=older.size,
        mtime_ns=T0,
        mode=0o644,
        deleted=False,
        modified_by="alpha",
        sources=("alpha",),
    )
    winner_plan = reconcile(newer, [older], "beta")
    assert winner_plan.local_action is LocalAction.UPDATE_VERSION_ONLY
    assert winner_plan.conflict_copies == plan.conflict_copies
    assert winner_plan.remote_actions == (("alpha", RemoteAction.PUSH),)


def test_winner_and_loser_holders_end_with_identical_rows_and_compare_equal() -> None:
    loser = row("alpha", vv(alpha=1), H1, mtime_ns=T0)
    winner = row("beta", vv(beta=1), H2, mtime_ns=T0 + NS)
    plan_a = reconcile(loser, [winner], "alpha")
    plan_b = reconcile(winner, [loser], "beta")
    after_a = plan_a.target.row_for("alpha")
    after_b = plan_b.target.row_for("beta")
    assert compare(after_a.version, after_b.version) is Ordering.EQUAL
    assert reconcile(after_a, [after_b], "alpha").local_action is LocalAction.NOTHING
    assert reconcile(after_b, [after_a], "beta").local_action is LocalAction.NOTHING
    # the copy each of them records is identical too
    (copy,) = plan_a.conflict_copies
    copy_a, copy_b = copy.row_for("alpha"), copy.row_for("beta")
    assert reconcile(copy_a, [copy_b], "alpha").local_action is LocalAction.NOTHING


def test_mtime_tie_is_broken_by_modified_by_then_by_hash() -> None:
    a = row("alpha", vv(alpha=1), H2)
    b = row("beta", vv(beta=1), H1)
    assert reconcile(a, [b], "alpha").target.hash == H1  # "beta" > "alpha"
    c = row("alpha", vv(alpha=1), H1, modified_by="zed")
    d = row("beta", vv(beta=1), H2, modified_by="zed")
    plan = reconcile(c, [d], "alpha")
    assert plan.target.hash == H2  # same node and second: the larger hash
    assert plan.keep_local_as == "doc.sync-conflict-20261124-101500-zed-11111111.txt"


def test_three_way_conflict_keeps_every_losing_content() -> None:
    rows = [
        row("alpha", vv(alpha=1), H1, mtime_ns=T0 + 2 * NS),
        row("beta", vv(beta=1), H2, mtime_ns=T0 + 1 * NS),
        row("gamma", vv(gamma=1), H3, mtime_ns=T0),
        row("delta", vv(delta=1), None, mtime_ns=T0 + 9 * NS),
    ]
    plan = plan_for("gamma", rows)
    assert plan.target.hash == H1
    assert plan.target.version == vv(alpha=1, beta=1, gamma=1, delta=1)
    assert [(c.path, c.hash) for c in plan.conflict_copies] == [
        ("doc.sync-conflict-20261124-101500-gamma-33333333.txt", H3),
        ("doc.sync-conflict-20261124-101501-beta-22222222.txt", H2),
    ]
    assert plan.keep_local_as == "doc.sync-conflict-20261124-101500-gamma-33333333.txt"
    assert dict(plan.remote_actions) == {
        "alpha": RemoteAction.UPDATE_THERE,
        "beta": RemoteAction.PUSH,
        "delta": RemoteAction.PUSH,
    }
    assert plan_for("delta", rows).local_action is LocalAction.PULL


def test_metadata_of_a_dominated_row_is_not_brought_back() -> None:
    old = row("alpha", vv(alpha=1), H1, mtime_ns=T0 + 9 * NS, mode=0o755)
    touched = row("beta", vv(alpha=1, beta=1), H1, mtime_ns=T0, mode=0o600)  # same bytes
    plan = reconcile(old, [touched], "alpha")
    assert (plan.target.mtime_ns, plan.target.mode, plan.target.modified_by) == (T0, 0o600, "beta")
    assert plan.local_action is LocalAction.UPDATE_METADATA


def test_dominated_local_edit_is_overwritten_without_a_copy() -> None:
    plan = reconcile(row("alpha", vv(alpha=1), H1), [row("beta", vv(alpha=1, beta=1), H2)], "alpha")
    assert plan.local_action is LocalAction.PULL
    assert plan.conflict_copies == ()


def test_equal_versions_with_different_contents_are_a_conflict_not_a_loss() -> None:
    # Only a node that lost its database and reused its id can produce this; keep both.
    a = row("alpha", vv(alpha=1), H1, modified_by="alpha")
    b = row("beta", vv(alpha=1), H2, modified_by="alpha")
    plan = reconcile(a, [b], "alpha")
    assert plan.target.hash == H2
    assert plan.local_action is LocalAction.KEEP_LOCAL_THEN_PULL
    assert [c.hash for c in plan.conflict_copies] == [H1]


def test_losing_contents_with_the_same_name_get_distinct_copies() -> None:
    rows = [
        row("alpha", vv(alpha=1), H1, modified_by="zed"),
        row("beta", vv(beta=1), H2, modified_by="zed"),
        row("gamma", vv(gamma=1), H3, mtime_ns=T0 + NS),
    ]
    plan = plan_for("alpha", rows)
    assert [c.path for c in plan.conflict_copies] == [
        "doc.sync-conflict-20261124-101500-zed-11111111.txt",
        "doc.sync-conflict-20261124-101500-zed-22222222.txt",
    ]
    assert plan.keep_local_as == "doc.sync-conflict-20261124-101500-zed-11111111.txt"


def test_conflict_copy_keeps_the_folder_and_the_last_extension() -> None:
    rows = [
        row("alpha", vv(alpha=1), H1, path="a/report.final.txt"),
        row("beta", vv(beta=1), H2, path="a/report.final.txt", mtime_ns=T0 + NS),
    ]
    (copy,) = plan_for("beta", rows).conflict_copies
    assert copy.path == "a/report.final.sync-conflict-20261124-101500-alpha-11111111.txt"


@pytest.mark.parametrize(
    ("local", "remotes", "node"),
    [
        (None, [], "alpha"),
        (row("alpha", vv(alpha=1), H1), [], "beta"),
        (None, [row("alpha", vv(alpha=1), H1)], "alpha"),
        (row("alpha", vv(alpha=1), H1), [row("alpha", vv(alpha=1), H1)], "alpha"),
        (None, [row("beta", vv(), H1), row("beta", vv(), H1)], "alpha"),
        (row("alpha", vv(), H1), [row("beta", vv(), H1, path="other")], "alpha"),
        (None, [row("beta", vv(), H1)], "not valid"),
    ],
)
def test_inconsistent_rows_are_rejected(
    local: FileState | None, remotes: list[FileState], node: str
) -> None:
    with pytest.raises(ValueError):
        reconcile(local, remotes, node)


@pytest.mark.parametrize(
    "fields",
    [
        {"hash": None},  # live without a hash
        {"hash": b"short"},
        {"deleted": True},  # tombstone with a hash
        {"node": ""},
        {"modified_by": "a b"},
        {"path": ""},
        {"size": -1},
        {"version": {"alpha": 1}},
    ],
)
def test_file_state_rejects_inconsistent_fields(fields: dict[str, object]) -> None:
    base = {
        "node": "alpha",
        "path": "p",
        "version": vv(alpha=1),
        "hash": H1,
        "size": 1,
        "mtime_ns": T0,
        "mode": 0o644,
        "deleted": False,
        "modified_by": "alpha",
    }
    with pytest.raises(ValueError):
        FileState(**{**base, **fields})  # type: ignore[arg-type]


def test_plan_cannot_drop_the_keep_step() -> None:
    plan = reconcile(row("alpha", vv(alpha=1), H1), [row("beta", vv(beta=1), H2)], "alpha")
    with pytest.raises(ValueError):
        Plan(**{**plan.__dict__, "keep_local_as": None})
    with pytest.raises(ValueError):
        Plan(**{**plan.__dict__, "local_action": LocalAction.PULL})


def test_reconcile_module_does_no_io() -> None:
    tree = ast.parse(Path(ironsync.reconcile.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module != "ironsync.model":
            imported.add((node.module or "").split(".")[0])  # model: shared values, no I/O
    forbidden = {"asyncio", "socket", "ssl", "apsw", "sqlite3", "time", "os", "io", "pathlib"}
    assert not imported & (forbidden | {"random", "shutil", "subprocess", "ironsync"})


# --- properties over every small case ---------------------------------------------------------

NODES = ("alpha", "beta", "gamma")
CONTENTS = (H1, H2, None)


def scenario_row(node: str, counters: Sequence[int], content: bytes | None) -> FileState:
    """A row whose modified_by and mtime follow from its vector, so equal versions agree."""
    version = VersionVector({n: c for n, c in zip(NODES, counters, strict=True) if c})
    modified_by = max(version, key=lambda n: (version[n], n)) if version else node
    return row(node, version, content, mtime_ns=T0 + sum(counters) * NS, modified_by=modified_by)


def choices(node: str, counter_range: range) -> list[FileState | None]:
    vectors = itertools.product(counter_range, repeat=len(NODES))
    return [None] + [
        scenario_row(node, counters, content) for counters in vectors for content in CONTENTS
    ]


@functools.cache
def all_scenarios() -> list[tuple[FileState, ...]]:
    """Every combination of rows: 3 nodes with counters 0..1, 2 nodes with counters 0..2."""
    three = itertools.product(*(choices(n, range(2)) for n in NODES))
    two = itertools.product(*(choices(n, range(3)) for n in NODES[:2]))
    scenarios = [tuple(r for r in rows if r is not None) for rows in itertools.chain(three, two)]
    return [rows for rows in scenarios if rows]


@functools.cache
def all_plans() -> list[tuple[tuple[FileState, ...], dict[str, Plan]]]:
    return [(rows, {n: plan_for(n, rows) for n in NODES}) for rows in all_scenarios()]


def maximal_rows(rows: Sequence[FileState]) -> list[FileState]:
    return [
        r for r in rows if all(compare(o.version, r.version) is not Ordering.GREATER for o in rows)
    ]


def check_same_outcome_everywhere(rows: Sequence[FileState], plans: dict[str, Plan]) -> None:
    first, *others = plans.values()
    for plan in others:
        assert plan.target == first.target, rows
        assert plan.conflict_copies == first.conflict_copies, rows


def check_nothing_lost_nothing_resurrected(rows: Sequence[FileState], plan: Plan) -> None:
    maximal = maximal_rows(rows)
    maximal_live = {r.hash for r in maximal if not r.deleted}
    kept = {plan.target.hash} | {c.hash for c in plan.conflict_copies}
    assert maximal_live <= kept, rows  # every concurrent content survives somewhere
    assert kept - {None} <= maximal_live, rows  # and nothing only history held comes back
    assert plan.target.deleted == (not maximal_live), rows
    assert plan.target.version == functools.reduce(merge, (r.version for r in rows))
    assert len(plan.conflict_copies) == max(len(maximal_live) - 1, 0)
    assert len({c.path for c in plan.conflict_copies}) == len(plan.conflict_copies)
    # a resolved file describes a maximal row of its content, never an older one
    described = {(r.hash, r.size, r.mtime_ns, r.mode, r.modified_by) for r in maximal}
    for resolved in (plan.target, *plan.conflict_copies):
        fields = (resolved.hash, resolved.size, resolved.mtime_ns, resolved.mode)
        assert (*fields, resolved.modified_by) in described, rows


def check_local_action(rows: Sequence[FileState], plan: Plan) -> None:
    local = next((r for r in rows if r.node == plan.node), None)
    target, action = plan.target, plan.local_action
    if action is LocalAction.NOTHING:
        assert local == target.row_for(plan.node)
    elif action in (LocalAction.UPDATE_VERSION_ONLY, LocalAction.UPDATE_METADATA):
        assert (
            local is not None and local.hash == target.hash and local != target.row_for(local.node)
        )
    elif action in (LocalAction.PULL, LocalAction.KEEP_LOCAL_THEN_PULL):
        assert not target.deleted and target.sources and plan.node not in target.sources
    elif action is LocalAction.DELETE_HERE:
        assert local is not None and not local.deleted and target.deleted
    else:
        assert action is LocalAction.RECORD_TOMBSTONE and local is None and target.deleted
    if action is LocalAction.KEEP_LOCAL_THEN_PULL:
        (copy,) = [c for c in plan.conflict_copies if c.path == plan.keep_local_as]
        assert local is not None and copy.hash == local.hash and plan.node in copy.sources
    elif local is not None and not local.deleted and local.hash != target.hash:
        # a live local content that is overwritten was history, not a concurrent version
        assert local not in maximal_rows(rows) or action is LocalAction.KEEP_LOCAL_THEN_PULL
        assert all(c.hash != local.hash for c in plan.conflict_copies)


EXPECTED_LOCAL = {
    RemoteAction.UP_TO_DATE: {LocalAction.NOTHING},
    RemoteAction.UPDATE_THERE: {LocalAction.UPDATE_VERSION_ONLY, LocalAction.UPDATE_METADATA},
    RemoteAction.PUSH: {LocalAction.PULL, LocalAction.KEEP_LOCAL_THEN_PULL},
    RemoteAction.DELETE_THERE: {LocalAction.DELETE_HERE},
}


def check_remote_actions_match_what_peers_decide(
    rows: Sequence[FileState], plans: dict[str, Plan]
) -> None:
    holders = {r.node for r in rows}
    for plan in plans.values():
        assert [n for n, _ in plan.remote_actions] == sorted(holders - {plan.node})
        for peer, remote_action in plan.remote_actions:
            assert plans[peer].local_action in EXPECTED_LOCAL[remote_action], rows


def settle(rows: Sequence[FileState], plans: dict[str, Plan]) -> dict[str, dict[str, FileState]]:
    """Apply every node's plan: each node's index of path -> row afterwards."""
    indexes: dict[str, dict[str, FileState]] = {}
    for node, plan in plans.items():
        index = {plan.path: plan.target.row_for(node)}
        for copy in plan.conflict_copies:
            assert copy.sources, rows  # someone holds the losing content to fetch it from
            index[copy.path] = copy.row_for(node)
        indexes[node] = index
    return indexes


def check_converged(indexes: dict[str, dict[str, FileState]], *, every_node: bool = True) -> None:
    """Reconciling again changes nothing (from one node: its remote actions speak for the rest)."""
    paths = {p for index in indexes.values() for p in index}
    for path in paths:
        rows = [index[path] for index in indexes.values() if path in index]
        for node in indexes if every_node else list(indexes)[:1]:
            plan = plan_for(node, rows)
            assert plan.local_action is LocalAction.NOTHING, rows
            assert plan.conflict_copies == ()
            assert all(a is RemoteAction.UP_TO_DATE for _, a in plan.remote_actions)


def test_every_node_computes_the_same_target_and_copies_exhaustively() -> None:
    for rows, plans in all_plans():
        check_same_outcome_everywhere(rows, plans)


def test_no_concurrent_content_is_lost_and_no_dominated_one_returns_exhaustively() -> None:
    for rows, plans in all_plans():
        check_nothing_lost_nothing_resurrected(rows, plans["alpha"])


def test_local_and_remote_actions_are_consistent_exhaustively() -> None:
    for rows, plans in all_plans():
        for plan in plans.values():
            check_local_action(rows, plan)
        check_remote_actions_match_what_peers_decide(rows, plans)


def test_applying_the_plans_converges_in_one_round_exhaustively() -> None:
    for rows, plans in all_plans():
        check_converged(settle(rows, plans), every_node=False)


# --- properties over random larger cases ------------------------------------------------------

MANY_NODES = ("alpha", "beta", "gamma", "delta")


@st.composite
def random_rows(draw: st.DrawFn) -> list[FileState]:
    holders = draw(st.lists(st.sampled_from(MANY_NODES), min_size=1, max_size=4, unique=True))
    rows = []
    for node in holders:
        counters = draw(st.dictionaries(st.sampled_from(MANY_NODES), st.integers(1, 3)))
        rows.append(
            row(
                node,
                VersionVector(counters),
                draw(st.sampled_from([H1, H2, H3, None])),
                mtime_ns=T0 + draw(st.integers(0, 2)) * NS + draw(st.sampled_from([0, 1])),
                modified_by=draw(st.sampled_from(MANY_NODES)),
                mode=draw(st.sampled_from([0o644, 0o755])),
            )
        )
    return rows


@settings(max_examples=400, print_blob=True, deadline=None)
@given(random_rows(), st.randoms(use_true_random=False))
def test_random_rows_decide_the_same_everywhere_and_converge(
    rows: list[FileState], rng: random.Random
) -> None:
    plans = {n: plan_for(n, rows) for n in MANY_NODES}
    for node in MANY_NODES:
        local = next((r for r in rows if r.node == node), None)
        shuffled = [r for r in rows if r.node != node]
        rng.shuffle(shuffled)
        assert reconcile(local, shuffled, node) == plans[node]  # peer order does not matter
    check_same_outcome_everywhere(rows, plans)
    check_nothing_lost_nothing_resurrected(rows, plans["alpha"])
    for plan in plans.values():
        check_local_action(rows, plan)
    check_remote_actions_match_what_peers_decide(rows, plans)
    check_converged(settle(rows, plans))


@settings(max_examples=300, print_blob=True, deadline=None)
@given(
    random_rows(),
    st.sampled_from(["file", "dir", "symlink"]),
    st.sampled_from([None, "target", "../up"]),
)
def test_a_single_peer_row_is_decided_as_the_general_rule_decides_it(
    rows: list[FileState], kind: str, target: str | None
) -> None:
    """reconcile's fast path for a path only one peer has (no local row) gives the plan the
    general rule gives, for every kind of row, tombstones included."""
    row = rows[0]
    if row.deleted:
        row = replace(row, kind=kind, target=target)  # a tombstone forgets both
    elif kind == "dir":
        row = replace(row, kind=kind, hash=DIR_HASH)
    elif kind == "symlink" and target is not None:
        row = replace(row, kind=kind, target=target, hash=link_hash(target))
    for node in MANY_NODES:
        if node == row.node:
            with pytest.raises(ValueError, match="claims to be the local node"):
                reconcile(None, [row], node)
            continue
        fast = reconcile(None, [row], node)
        assert fast == ironsync.reconcile._reconciled(None, [row], node)
        assert fast.target.row_for(row.node) == row


COPY_SOURCE = "copy-source"


def apply_plan(index: dict[str, FileState], plan: Plan) -> None:
    """What a node's sync layer does: record the target, then take every conflict copy."""
    if plan.local_action is not LocalAction.NOTHING:
        index[plan.path] = plan.target.row_for(plan.node)
    for copy in plan.conflict_copies:
        # A copy arrives like any peer's row, so a newer row at that path is left alone.
        sub = reconcile(index.get(copy.path), [copy.row_for(COPY_SOURCE)], plan.node)
        apply_plan(index, sub)


def pull_from(indexes: dict[str, dict[str, FileState]], here: str, there: str) -> None:
    for path in sorted(set(indexes[here]) | set(indexes[there])):
        remote = indexes[there].get(path)
        remotes = [] if remote is None else [remote]
        apply_plan(indexes[here], reconcile(indexes[here].get(path), remotes, here))


# One step of a real history: an edit (or deletion) on a node, or one node pulling from another.
history_steps = st.one_of(
    st.tuples(
        st.just("edit"), st.sampled_from(MANY_NODES[:3]), st.sampled_from([H1, H2, H3, None])
    ),
    st.tuples(st.just("pull"), st.sampled_from(MANY_NODES[:3]), st.sampled_from(MANY_NODES[:3])),
)


@settings(max_examples=400, print_blob=True, deadline=None)
@given(st.lists(history_steps, min_size=1, max_size=16))
def test_pairwise_syncs_in_any_order_settle_without_ping_pong(
    steps: list[tuple[str, str, bytes | str | None]],
) -> None:
    # Random rows can describe histories no node could produce (two different vectors that
    # both claim gamma's 2nd change), so this test plays real ones: local edits bump the
    # editor's counter on top of what it holds; pulls are reconcile + apply.
    nodes = MANY_NODES[:3]
    indexes: dict[str, dict[str, FileState]] = {n: {} for n in nodes}
    writes: list[FileState] = []
    clock = 0
    for kind, node, arg in steps:
        if kind == "edit":
            clock += 1
            held = indexes[node].get("doc.txt")
            base = held.version if held else VersionVector()
            if arg is None and (held is None or held.deleted):
                continue  # nothing to delete
            edited = row(node, base.bump(node), arg, mtime_ns=T0 + clock * NS)
            indexes[node]["doc.txt"] = edited
            writes.append(edited)
        elif node != arg:
            pull_from(indexes, node, str(arg))
    rows = [r for index in indexes.values() for r in index.values()]
    assume(rows)
    # A write must survive unless a later write (or deletion) was made by someone who had
    # seen it: its version dominates the first's.
    required = {
        w.hash
        for w in writes
        if not w.deleted
        and not any(compare(o.version, w.version) is Ordering.GREATER for o in writes)
    }
    for _ in range(3):  # full rounds; every pair meets in each
        for here, there in itertools.permutations(nodes, 2):
            pull_from(indexes, here, there)
    snapshot = {n: dict(index) for n, index in indexes.items()}
    for here, there in itertools.permutations(nodes, 2):
        pull_from(indexes, here, there)
    assert indexes == snapshot, "another round still changed something: ping-pong"
    anonymous = [{p: replace(r, node="any") for p, r in i.items()} for i in indexes.values()]
    assert all(index == anonymous[0] for index in anonymous)
    check_converged(indexes)
    survivors = {r.hash for index in indexes.values() for r in index.values()}
    assert required <= survivors
    assert survivors - {None} <= {r.hash for r in rows}


# --- kinds: folders, symlinks and files at one path (issue 11) --------------------------------


def folder(node: str, version: VersionVector, **kw: object) -> FileState:
    return replace(row(node, version, DIR_HASH, mode=0o755, **kw), kind="dir", size=0)  # type: ignore[arg-type]


def symlink(node: str, version: VersionVector, target: str, **kw: object) -> FileState:
    base = row(node, version, link_hash(target), mode=0, **kw)  # type: ignore[arg-type]
    return replace(base, kind="symlink", target=target, size=len(target))


def test_a_type_change_that_dominates_is_made_here() -> None:
    # alpha had a file; beta, having seen it, made the path a folder
    plan = plan_for("alpha", [row("alpha", vv(alpha=1), H1), folder("beta", vv(alpha=1, beta=1))])
    assert plan.local_action is LocalAction.PULL and not plan.is_conflict
    assert (plan.target.kind, plan.target.hash, plan.target.mode) == ("dir", DIR_HASH, 0o755)


def test_a_folder_keeps_the_name_against_a_concurrent_file_even_an_older_one() -> None:
    rows = [
        folder("alpha", vv(alpha=2), mtime_ns=T0),  # older than beta's edit
        row("beta", vv(alpha=1, beta=1), H2, mtime_ns=T0 + 50 * NS),
    ]
    for node in ("alpha", "beta"):
        plan = plan_for(node, rows)
        assert plan.target.kind == "dir"
        [copy] = plan.conflict_copies
        assert (copy.kind, copy.hash) == ("file", H2)
    assert plan_for("beta", rows).local_action is LocalAction.KEEP_LOCAL_THEN_PULL
    assert plan_for("alpha", rows).local_action is LocalAction.UPDATE_VERSION_ONLY


def test_two_folders_never_conflict_and_the_newer_mode_wins() -> None:
    a = replace(folder("alpha", vv(alpha=1), mtime_ns=T0), mode=0o700)
    b = folder("beta", vv(beta=1), mtime_ns=T0 + NS)
    plan = plan_for("alpha", [a, b])
    assert not plan.is_conflict and plan.local_action is LocalAction.UPDATE_METADATA
    assert plan.target.mode == 0o755


def test_a_file_and_a_link_with_the_same_hash_are_different_contents() -> None:
    link = replace(symlink("beta", vv(beta=1), "x"), hash=H1)
    plan = plan_for("alpha", [row("alpha", vv(alpha=1), H1, mtime_ns=T0 + NS), link])
    assert plan.is_conflict and plan.target.kind == "file"
    assert plan.conflict_copies[0].kind == "symlink"
    assert plan.conflict_copies[0].target == "x"


def test_a_retargeted_link_is_a_new_content_and_carries_its_target() -> None:
    old = symlink("alpha", vv(alpha=1), "v1")
    new = symlink("beta", vv(alpha=1, beta=1), "v2")
    plan = plan_for("alpha", [old, new])
    assert plan.local_action is LocalAction.PULL and plan.target.target == "v2"
    assert plan.target.row_for("alpha") == replace(new, node="alpha")


def test_a_mode_only_change_is_metadata() -> None:
    plan = plan_for(
        "alpha", [row("alpha", vv(alpha=1), H1), row("beta", vv(alpha=1, beta=1), H1, mode=0o755)]
    )
    assert plan.local_action is LocalAction.UPDATE_METADATA and plan.target.mode == 0o755


def test_what_a_tombstone_was_is_not_compared() -> None:
    gone_dir = replace(row("alpha", vv(alpha=2), None, modified_by="alpha"), kind="dir")
    gone_file = row("beta", vv(alpha=2), None, modified_by="alpha")
    assert gone_dir.kind == "file" and gone_dir == replace(gone_file, node="alpha")
    assert plan_for("alpha", [gone_dir, gone_file]).local_action is LocalAction.NOTHING
