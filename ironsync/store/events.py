"""The append-only `events` table: what happened, oldest first.

It means what iron-carrier's log meant (deletions, moves, the start and end of every write) and
more (scans, conflicts, peers, syncs). Rows are never updated; the only deletion is
`compact_events`, which switches the guard of the `events_refuse_delete` trigger on and off
inside its own transaction.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from ironsync.store.database import Database

# Kinds with a meaning users rely on (`ironsync log tail`, scripts, sqlite3).
KINDS = frozenset(
    {
        "scanned",
        "created",
        "modified",
        "deleted",
        "moved",
        "skipped",
        "write_started",
        "write_finished",
        "write_failed",
        "conflict",
        "peer_connected",
        "peer_disconnected",
        "peer_refused",
        "sync_started",
        "sync_finished",
        "error",
        "kept",
    }
)
STATUSES = ("ok", "warning", "error")
_INSERT = (
    "INSERT INTO events (at, storage, path, kind, status, peer, detail)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)


@dataclass(frozen=True)
class Event:
    seq: int
    at: str
    storage: str | None
    path: str | None
    kind: str
    status: str
    peer: str | None
    detail: dict[str, Any] | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def iso_now(now: datetime | None = None) -> str:
    """ISO-8601 UTC with microseconds, the format of every human-facing time in the database."""
    moment = now or datetime.now(UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def detail_text(detail: Mapping[str, Any] | None) -> str | None:
    """An event's detail as the events table holds it: compact JSON, keys sorted."""
    return json.dumps(dict(detail), sort_keys=True, separators=(",", ":")) if detail else None


def append_event(
    db: Database,
    kind: str,
    *,
    storage: str | None = None,
    path: str | None = None,
    status: str = "ok",
    peer: str | None = None,
    detail: Mapping[str, Any] | None = None,
    at: str | None = None,
) -> int:
    """Append one event; returns its sequence number."""
    if kind not in KINDS:
        raise ValueError(f"unknown event kind {kind!r}")
    if status not in STATUSES:
        raise ValueError(f"unknown event status {status!r}")
    text = detail_text(detail)
    return int(
        db.scalar(
            _INSERT + " RETURNING seq", (at or iso_now(), storage, path, kind, status, peer, text)
        )
    )


def append_storage_events(
    db: Database, storage: str, events: list[tuple[str, str, str | None, str | None]], at: str
) -> None:
    """Append many changes of one storage at once, status ok, one timestamp: (kind, path,
    detail JSON text, the peer that brought it or None for a local change)."""
    rows = [(at, storage, path, kind, "ok", peer, detail) for kind, path, detail, peer in events]
    db.conn.executemany(_INSERT, rows)


_COLUMNS = "seq, at, storage, path, kind, status, peer, detail"


def _event(row: tuple) -> Event:
    detail = json.loads(row[7]) if row[7] else None
    return Event(row[0], row[1], row[2], row[3], row[4], row[5], row[6], detail)


def last_events(db: Database, count: int) -> list[Event]:
    """The newest `count` events, oldest first."""
    rows = db.query(f"SELECT {_COLUMNS} FROM events ORDER BY seq DESC LIMIT ?", (count,))
    return [_event(r) for r in reversed(rows)]


def events_after(db: Database, seq: int, limit: int = 1000) -> list[Event]:
    rows = db.query(
        f"SELECT {_COLUMNS} FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit)
    )
    return [_event(r) for r in rows]


def was_logged(db: Database, kind: str, storage: str, path: str, reason: str) -> bool:
    """Whether an event `kind` about `path` with this `reason` is in the log already."""
    return (
        db.scalar(
            "SELECT 1 FROM events WHERE storage = ? AND path = ? AND kind = ?"
            " AND json_extract(detail, '$.reason') = ? LIMIT 1",
            (storage, path, kind, reason),
        )
        is not None
    )


def events_for_path(db: Database, storage: str, path: str) -> list[Event]:
    """Every event about one path, including moves to or from it."""
    rows = db.query(
        f"SELECT {_COLUMNS} FROM events WHERE storage = ? AND (path = ? OR"
        " (kind = 'moved' AND json_extract(detail, '$.from') = ?)) ORDER BY seq",
        (storage, path, path),
    )
    return [_event(r) for r in rows]


def compact_events(db: Database, before: str) -> int:
    """Delete events older than `before` (ISO-8601 UTC): the one exception to append-only.

    Safe for sync: tombstones live in `files`, not here, so nothing is resurrected.
    """
    with db.atomic():
        db.execute("UPDATE events_compaction SET active = 1")
        count = int(db.scalar("SELECT count(*) FROM events WHERE at < ?", (before,)))
        db.execute("DELETE FROM events WHERE at < ?", (before,))
        db.execute("UPDATE events_compaction SET active = 0")
    return count
