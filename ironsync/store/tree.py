"""Folder-level questions about the file index (SQL only)."""

from __future__ import annotations

from ironsync.store.database import Database


def live_paths_under(db: Database, storage_id: int, folder: str) -> list[str]:
    """Every live file the index knows inside `folder` ('' = the whole storage)."""
    if not folder:
        rows = db.query(
            "SELECT path FROM files WHERE storage_id = ? AND deleted = 0 ORDER BY path",
            (storage_id,),
        )
    else:
        prefix = folder.rstrip("/") + "/"
        # path >= 'a/' AND path < 'a0' ('0' follows '/'): an index range, no LIKE escaping.
        rows = db.query(
            "SELECT path FROM files WHERE storage_id = ? AND deleted = 0"
            " AND path >= ? AND path < ? ORDER BY path",
            (storage_id, prefix, prefix[:-1] + "0"),
        )
    return [r[0] for r in rows]
