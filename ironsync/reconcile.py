"""Pure reconciliation: what one node does about one path, decided from version vectors.

Theory of operation
-------------------
Every row of the file index carries a version vector, ``{node_id: counter}``. A node that
changes a file bumps its own counter, so version ``a`` *dominates* ``b`` when every counter of
``a`` is at least the one of ``b`` and one is larger: ``a`` was made by someone who had seen
``b``. When neither dominates, the two versions were made without knowledge of each other: they
are *concurrent*. The empty vector means "never changed" and every other vector dominates it.

``reconcile`` receives the consolidated rows of one path (this node's row, or None, and each
peer's row) and decides:

1. The *maximal* rows are those no other row dominates. Anything else is history that some
   maximal row has already replaced, so its content is never brought back.
2. The maximal rows are grouped by content: (kind, hash) for a live entry — a file's bytes, a
   folder (every folder has the same content: its mode and mtime are metadata), a link's
   target — and "deleted" for a tombstone. One group means the contents agree, whatever the
   vectors: nothing is in conflict.
3. If any group is live, tombstone groups drop out: a deletion concurrent with an edit loses
   to the edit, and no copy of "nothing" is kept.
4. The remaining groups are ranked by (folder first, newest mtime_ns, then modified_by, then
   hash bytes, then kind), each group represented by its newest row. The first keeps the
   name; every other one is kept beside it as a conflict copy (``conflict_copy_path``), so
   nothing a user wrote is lost. A folder always keeps the name against a file or a link (it
   may hold other entries; a copy of a folder would have to move them all), so a conflict
   copy is always a file or a link.
5. The *target* of the name is the winning content with the merge of every row's vector and
   no extra bump. The node that held the winner and the node that held the loser therefore
   end with identical rows (content, metadata and vector), the next comparison is EQUAL, and
   reconciliation stops: a conflict is settled once, never ping-ponged.

Nothing above depends on which row is this node's, or on the order of the peers' rows, so
every node that sees the same rows computes the same target and the same conflict copies. A
conflict copy's vector is the merge of its losing rows' vectors, the same wherever it is made,
so two nodes that make the same copy independently agree on it too.

A node records a conflict copy at its path the way it takes any peer's row: by reconciling that
path with ``copy.row_for(source)`` as a remote row, so a copy the user already edited or deleted
there (a vector that dominates the copy's) is left alone.

This module does no I/O and reads no clock: rows in, a ``Plan`` out.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import ItemsView, Iterator, KeysView, Mapping, Sequence, ValuesView
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache, reduce
from typing import Any

from ironsync.model import DIR, FILE, KINDS

__all__ = [
    "HASH_SIZE",
    "FileState",
    "LocalAction",
    "Ordering",
    "Plan",
    "RemoteAction",
    "ResolvedFile",
    "VersionVector",
    "compare",
    "conflict_copy_path",
    "merge",
    "reconcile",
]

HASH_SIZE = 16  # bytes of an xxh3-128 digest
MAX_COUNTER = 2**63 - 1  # a SQLite INTEGER, so json_extract() on files.version reads it exactly
NS_PER_SECOND = 1_000_000_000
CONFLICT_MARKER = ".sync-conflict-"

_NODE_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _check_node_id(node_id: object, what: str) -> str:
    if not isinstance(node_id, str) or not _NODE_ID.fullmatch(node_id):
        raise ValueError(f"{what}: {node_id!r} is not 1-64 characters of [A-Za-z0-9_.-]")
    return node_id


def _check_counter(node_id: str, counter: object) -> int:
    # bool is an int subclass; True is not a counter.
    if type(counter) is not int or not 1 <= counter <= MAX_COUNTER:
        raise ValueError(f"version counter of {node_id!r}: {counter!r} is not an int in [1, 2**63)")
    return counter


# --- version vectors --------------------------------------------------------------------------


class Ordering(enum.Enum):
    """How version ``a`` relates to version ``b``."""

    EQUAL = "equal"
    GREATER = "greater"  # a dominates b
    LESSER = "lesser"  # b dominates a
    CONCURRENT = "concurrent"  # neither has seen the other


class VersionVector(Mapping[str, int]):
    """An immutable mapping node_id -> counter (>= 1); the empty vector means "never changed"."""

    __slots__ = ("_counters",)
    _counters: dict[str, int]

    def __init__(self, counters: Mapping[str, int] | None = None) -> None:
        checked = {
            _check_node_id(node, "version vector node id"): counter
            for node, counter in (counters or {}).items()
        }
        for node, counter in checked.items():
            _check_counter(node, counter)
        object.__setattr__(self, "_counters", dict(sorted(checked.items())))

    @classmethod
    def _trusted(cls, counters: dict[str, int]) -> VersionVector:
        # For results of our own operations on valid vectors: skip the per-entry checks.
        vector = cls.__new__(cls)
        object.__setattr__(vector, "_counters", dict(sorted(counters.items())))
        return vector

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("VersionVector is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("VersionVector is immutable")

    def __getitem__(self, node_id: str) -> int:
        return self._counters[node_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._counters)

    def __len__(self) -> int:
        return len(self._counters)

    # The generic Mapping versions of these go through __getitem__; compare() is hot.
    def get(self, node_id: str, default: Any = None) -> Any:
        return self._counters.get(node_id, default)

    def items(self) -> ItemsView[str, int]:
        return self._counters.items()

    def keys(self) -> KeysView[str]:
        return self._counters.keys()

    def values(self) -> ValuesView[int]:
        return self._counters.values()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, VersionVector):
            return self._counters == other._counters
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self._counters.items()))

    def __repr__(self) -> str:
        return f"VersionVector({self._counters!r})"

    def bump(self, node_id: str) -> VersionVector:
        """This vector with ``node_id``'s counter one higher: the version of a local change."""
        _check_node_id(node_id, "bumping node id")
        counter = _check_counter(node_id, self._counters.get(node_id, 0) + 1)
        return VersionVector._trusted({**self._counters, node_id: counter})

    def to_json(self) -> str:
        """Canonical text for ``files.version``: compact JSON, keys sorted."""
        return json.dumps(self._counters, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> VersionVector:
        """Parse ``files.version``; any malformed text raises ValueError. The same text gives
        the same (immutable) vector: the last PARSED_VERSIONS are kept, as the files of one
        sync mostly share a few versions."""
        if not isinstance(text, str):
            raise ValueError(f"version vector text must be str, not {type(text).__name__}")
        if cls is VersionVector:
            return _parsed_version(text)
        return cls._parse(text)

    @classmethod
    def _parse(cls, text: str) -> VersionVector:
        try:
            value = json.loads(
                text, object_pairs_hook=_object_without_duplicates, parse_constant=_no_constant
            )
        except RecursionError as error:
            raise ValueError("version vector JSON is nested too deeply") from error
        if not isinstance(value, dict):
            raise ValueError(f"version vector must be a JSON object, not {text[:80]!r}")
        return cls(value)


PARSED_VERSIONS = 4096


@lru_cache(maxsize=PARSED_VERSIONS)
def _parsed_version(text: str) -> VersionVector:
    return VersionVector._parse(text)


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("version vector JSON repeats a node id")
    return result


def _no_constant(name: str) -> Any:
    raise ValueError(f"version vector JSON may not contain {name}")


def compare(a: VersionVector, b: VersionVector) -> Ordering:
    """Whether ``a`` equals, dominates, is dominated by, or is concurrent with ``b``."""
    a_counters, b_counters = a._counters, b._counters
    a_ahead = any(counter > b_counters.get(node, 0) for node, counter in a_counters.items())
    b_ahead = any(counter > a_counters.get(node, 0) for node, counter in b_counters.items())
    if a_ahead and b_ahead:
        return Ordering.CONCURRENT
    if a_ahead:
        return Ordering.GREATER
    if b_ahead:
        return Ordering.LESSER
    return Ordering.EQUAL


def merge(a: VersionVector, b: VersionVector) -> VersionVector:
    """The element-wise maximum: the least version that has seen both ``a`` and ``b``."""
    merged = dict(a._counters)
    for node, counter in b._counters.items():
        merged[node] = max(counter, merged.get(node, 0))
    return VersionVector._trusted(merged)


# --- rows and the plan ------------------------------------------------------------------------

Content = tuple[str, bytes] | None
"""What a row holds, as reconcile compares it: (kind, hash), or None for a tombstone."""


@dataclass(frozen=True)
class FileState:
    """One node's row for one path: what that node holds and which version it is."""

    node: str  # the node that holds this row
    path: str
    version: VersionVector
    hash: bytes | None  # xxh3-128 of the content; None for a tombstone
    size: int
    mtime_ns: int
    mode: int
    deleted: bool
    modified_by: str  # the node that made this version's last change
    kind: str = FILE  # file, dir or symlink; a tombstone's is always FILE (never compared)
    target: str | None = None  # a live symlink's target

    def __post_init__(self) -> None:
        if self.deleted and (self.kind != FILE or self.target is not None):
            object.__setattr__(self, "kind", FILE)  # what a tombstone was is not its content
            object.__setattr__(self, "target", None)
        if self.kind not in KINDS:
            raise ValueError(f"{self.path!r}: kind {self.kind!r} is not one of {KINDS}")
        _check_node_id(self.node, "row node")
        _check_node_id(self.modified_by, f"modified_by of {self.path!r}")
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"row path must be a non-empty str, not {self.path!r}")
        if not isinstance(self.version, VersionVector):
            raise ValueError(f"version of {self.path!r} must be a VersionVector")
        if self.deleted is not (self.hash is None):
            raise ValueError(f"{self.path!r}: a tombstone has no hash and a live file has one")
        if self.hash is not None and (type(self.hash) is not bytes or len(self.hash) != HASH_SIZE):
            raise ValueError(f"hash of {self.path!r} must be {HASH_SIZE} bytes")
        if self.size < 0 or self.mode < 0:
            raise ValueError(f"{self.path!r}: size and mode must not be negative")


@dataclass(frozen=True)
class ResolvedFile:
    """What a path should hold once reconciled, and which nodes already hold that content."""

    path: str
    version: VersionVector
    hash: bytes | None
    size: int
    mtime_ns: int
    mode: int
    deleted: bool
    modified_by: str
    sources: tuple[str, ...]  # sorted ids of the nodes whose row holds this content
    kind: str = FILE
    target: str | None = None

    @property
    def content(self) -> Content:
        """What reconcile compares: (kind, hash), None for a tombstone."""
        return None if self.hash is None else (self.kind, self.hash)

    def row_for(self, node: str) -> FileState:
        """The row ``node`` records once it holds this."""
        return FileState(
            node=node,
            path=self.path,
            version=self.version,
            hash=self.hash,
            size=self.size,
            mtime_ns=self.mtime_ns,
            mode=self.mode,
            deleted=self.deleted,
            modified_by=self.modified_by,
            kind=self.kind,
            target=self.target,
        )


class LocalAction(enum.Enum):
    """What this node does about the path."""

    NOTHING = "nothing"  # the local row already is the target
    UPDATE_VERSION_ONLY = "update_version_only"  # disk is right; record the target row
    UPDATE_METADATA = "update_metadata"  # content is right; set mtime and mode, record the row
    PULL = "pull"  # fetch the target (a folder or link: make it from the row); the local
    # content (if any) is superseded
    KEEP_LOCAL_THEN_PULL = "keep_local_then_pull"  # move the local file to keep_local_as, pull
    DELETE_HERE = "delete_here"  # the target is a tombstone: delete the file, record the row
    RECORD_TOMBSTONE = "record_tombstone"  # no local row: insert the tombstone, touch no disk


class RemoteAction(enum.Enum):
    """Where a peer stands relative to the target (the peer decides its own steps)."""

    UP_TO_DATE = "up_to_date"
    UPDATE_THERE = "update_there"  # it holds the content, but not the target row
    PUSH = "push"  # it lacks the target content and should pull it
    DELETE_THERE = "delete_there"  # the target is a tombstone and it holds a live file


@dataclass(frozen=True)
class Plan:
    """The decision for one path, as seen from ``node``."""

    node: str
    path: str
    target: ResolvedFile
    local_action: LocalAction
    keep_local_as: str | None  # set exactly when local_action is KEEP_LOCAL_THEN_PULL
    conflict_copies: tuple[ResolvedFile, ...]  # sorted by path; the same on every node
    remote_actions: tuple[tuple[str, RemoteAction], ...]  # (peer node, action), sorted by node

    def __post_init__(self) -> None:
        keeps = self.local_action is LocalAction.KEEP_LOCAL_THEN_PULL
        if keeps is not (self.keep_local_as is not None):
            raise ValueError("keep_local_as is set exactly for KEEP_LOCAL_THEN_PULL")

    @property
    def is_conflict(self) -> bool:
        """Whether concurrent different contents were found (and copies kept)."""
        return bool(self.conflict_copies)


# --- conflict copies --------------------------------------------------------------------------


def conflict_copy_path(path: str, mtime_ns: int, node_id: str, content: bytes) -> str:
    """``NAME.sync-conflict-YYYYMMDD-HHMMSS-NODEID-HASH.EXT`` beside ``path``: the UTC second
    of ``mtime_ns``, and the first 8 hex digits of the copy's content hash, so that two
    different contents never get one name (a node's two losing edits of one second, in two
    conflicts, would otherwise: the second copy replaced the first)."""
    _check_node_id(node_id, "conflict copy node id")
    if len(content) < 4:
        raise ValueError("a conflict copy's content hash has at least 4 bytes")
    return _conflict_copy_path(path, mtime_ns, f"{node_id}-{content.hex()[:8]}")


def _conflict_copy_path(path: str, mtime_ns: int, tag: str) -> str:
    folder, slash, name = path.rpartition("/")
    if not name:
        raise ValueError(f"{path!r} has no file name to keep a conflict copy of")
    # The extension is the last dot-suffix, but leading dots belong to the name (.bashrc).
    dots = len(name) - len(name.lstrip("."))
    cut = name.rfind(".", dots)
    stem, ext = (name, "") if cut == -1 else (name[:cut], name[cut:])
    try:
        at = _EPOCH + timedelta(seconds=mtime_ns // NS_PER_SECOND)
    except OverflowError as error:
        raise ValueError(f"mtime_ns {mtime_ns} is outside the calendar") from error
    stamp = f"{at.year:04d}{at.month:02d}{at.day:02d}-{at.hour:02d}{at.minute:02d}{at.second:02d}"
    return f"{folder}{slash}{stem}{CONFLICT_MARKER}{stamp}-{tag}{ext}"


# --- the decision -----------------------------------------------------------------------------


def reconcile(local: FileState | None, remotes: Sequence[FileState], local_node: str) -> Plan:
    """Decide what ``local_node`` does about one path, given every known row of that path."""
    if local is None and len(remotes) == 1:
        return _only_row(remotes[0], local_node)
    return _reconciled(local, remotes, local_node)


def _only_row(row: FileState, local_node: str) -> Plan:
    """`_reconciled` for a path that only one peer has a row of (most paths of a first sync):
    the same plan, without the general steps (a property test compares the two). That row is
    the target: it is maximal, alone in its group and dominates nothing; no copies."""
    _check_node_id(local_node, "local node id")
    if row.node == local_node:
        raise ValueError(f"a remote row claims to be the local node {local_node!r}")
    target = _resolved(row.path, _content(row), [row], [row], row.version)
    return Plan(
        node=local_node,
        path=row.path,
        target=target,
        local_action=LocalAction.RECORD_TOMBSTONE if row.deleted else LocalAction.PULL,
        keep_local_as=None,
        conflict_copies=(),
        remote_actions=((row.node, RemoteAction.UP_TO_DATE),),
    )


def _reconciled(local: FileState | None, remotes: Sequence[FileState], local_node: str) -> Plan:
    """`reconcile` by the general rule, for any rows."""
    rows = _checked_rows(local, remotes, local_node)
    path = rows[0].path
    maximal = [
        row
        for row in rows
        if not any(compare(other.version, row.version) is Ordering.GREATER for other in rows)
    ]
    groups: dict[Content, list[FileState]] = {}
    for row in maximal:
        groups.setdefault(_content(row), []).append(row)
    live = {content: group for content, group in groups.items() if content is not None}
    ranked = sorted((live or groups).items(), key=_rank, reverse=True)

    (winner, winner_rows), losers = ranked[0], ranked[1:]
    target = _resolved(path, winner, winner_rows, rows, reduce(merge, (r.version for r in rows)))
    copies = _conflict_copies(path, losers, rows)
    action, keep_as = _local_action(local, target, copies)
    remote_actions = tuple(sorted((row.node, _remote_action(row, target)) for row in remotes))
    return Plan(
        node=local_node,
        path=path,
        target=target,
        local_action=action,
        keep_local_as=keep_as,
        conflict_copies=copies,
        remote_actions=remote_actions,
    )


def _checked_rows(
    local: FileState | None, remotes: Sequence[FileState], local_node: str
) -> list[FileState]:
    _check_node_id(local_node, "local node id")
    if local is not None and local.node != local_node:
        raise ValueError(f"local row belongs to {local.node!r}, not {local_node!r}")
    rows = ([] if local is None else [local]) + list(remotes)
    if not rows:
        raise ValueError("nothing to reconcile: no local row and no remote rows")
    nodes = [row.node for row in rows]
    if local is None and local_node in nodes:
        raise ValueError(f"a remote row claims to be the local node {local_node!r}")
    if len(set(nodes)) != len(nodes):
        raise ValueError(f"more than one row from the same node: {sorted(nodes)}")
    paths = {row.path for row in rows}
    if len(paths) != 1:
        raise ValueError(f"rows of different paths reconciled together: {sorted(paths)}")
    return rows


def _representative(group: list[FileState]) -> FileState:
    # The newest row speaks for its content; the rest of the key only makes the choice total.
    return max(group, key=lambda row: (row.mtime_ns, row.modified_by, row.mode, row.size))


def _content(row: FileState) -> Content:
    return None if row.deleted else (row.kind, row.hash)  # type: ignore[return-value]


def _rank(item: tuple[Content, list[FileState]]) -> tuple[bool, int, str, bytes, str]:
    content, group = item
    newest = _representative(group)
    kind, digest = content if content is not None else ("", b"")
    return (kind == DIR, newest.mtime_ns, newest.modified_by, digest, kind)


def _resolved(
    path: str,
    content: Content,
    group: list[FileState],
    rows: list[FileState],
    version: VersionVector,
) -> ResolvedFile:
    newest = _representative(group)
    return ResolvedFile(
        path=path,
        version=version,
        hash=None if content is None else content[1],
        size=newest.size,
        mtime_ns=newest.mtime_ns,
        mode=newest.mode,
        deleted=content is None,
        modified_by=newest.modified_by,
        sources=tuple(sorted(row.node for row in rows if _content(row) == content)),
        kind=FILE if content is None else content[0],
        target=None if content is None else newest.target,
    )


def _conflict_copies(
    path: str, losers: list[tuple[Content, list[FileState]]], rows: list[FileState]
) -> tuple[ResolvedFile, ...]:
    copies: list[ResolvedFile] = []
    for content, group in losers:  # one group per content: the names differ by hash
        assert content is not None, "tombstones never lose to a live file as a copy"
        assert content[0] != DIR, "a folder never loses the name"
        newest = _representative(group)
        copy_path = conflict_copy_path(path, newest.mtime_ns, newest.modified_by, content[1])
        version = reduce(merge, (row.version for row in group))
        copies.append(_resolved(copy_path, content, group, rows, version))
    return tuple(sorted(copies, key=lambda copy: copy.path))


def _local_action(
    local: FileState | None, target: ResolvedFile, copies: tuple[ResolvedFile, ...]
) -> tuple[LocalAction, str | None]:
    if local is None:
        return (LocalAction.RECORD_TOMBSTONE if target.deleted else LocalAction.PULL), None
    if _content(local) == target.content:  # the same content, or both tombstones
        if target.row_for(local.node) == local:
            return LocalAction.NOTHING, None
        on_disk = (local.size, local.mtime_ns, local.mode)
        if local.deleted or on_disk == (target.size, target.mtime_ns, target.mode):
            return LocalAction.UPDATE_VERSION_ONLY, None
        return LocalAction.UPDATE_METADATA, None
    if target.deleted:
        return LocalAction.DELETE_HERE, None
    for copy in copies:
        if copy.content == _content(local):
            return LocalAction.KEEP_LOCAL_THEN_PULL, copy.path
    return LocalAction.PULL, None


def _remote_action(row: FileState, target: ResolvedFile) -> RemoteAction:
    if target.row_for(row.node) == row:
        return RemoteAction.UP_TO_DATE
    if _content(row) == target.content:
        return RemoteAction.UPDATE_THERE
    if target.deleted:
        return RemoteAction.DELETE_THERE
    return RemoteAction.PUSH
