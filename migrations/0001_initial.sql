-- ironsync schema version 1: storages, the file index with tombstones, the chunk index,
-- peers, and the append-only event log, plus views for people at a sqlite3 prompt.
--
-- Times a person reads are ISO-8601 UTC text; times compared with the disk are integer
-- nanoseconds. Hashes are 16-byte xxh3-128 BLOBs; views show them as lower-case hex.

CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

CREATE TABLE storages (
    id           INTEGER PRIMARY KEY,
    name         TEXT NOT NULL UNIQUE,        -- the alias shared with peers
    root         TEXT NOT NULL,               -- the folder on this node
    sequence     INTEGER NOT NULL DEFAULT 0,  -- last sequence number handed out
    last_scan_at TEXT,                        -- ISO-8601 UTC of the last completed scan
    last_sync_at TEXT                         -- ISO-8601 UTC of the last completed full sync
);

-- One row per path ever seen. A deletion is a tombstone (deleted = 1), never a missing row,
-- so a peer can tell "deleted here" from "never existed here".
CREATE TABLE files (
    id            INTEGER PRIMARY KEY,
    storage_id    INTEGER NOT NULL REFERENCES storages (id),
    path          TEXT NOT NULL,               -- relative, '/'-separated, NFC as on disk
    size          INTEGER NOT NULL,
    mtime_ns      INTEGER NOT NULL,
    ctime_ns      INTEGER NOT NULL DEFAULT 0,  -- stat fields for the no-change test
    inode         INTEGER NOT NULL DEFAULT 0,
    mode          INTEGER NOT NULL DEFAULT 0,  -- permission bits (st_mode & 0o7777)
    hash          BLOB,                        -- xxh3-128 of the content; NULL for tombstones
    deleted       INTEGER NOT NULL DEFAULT 0 CHECK (deleted IN (0, 1)),
    version       TEXT NOT NULL DEFAULT '{}',  -- version vector, JSON {"node": counter}
    modified_by   TEXT NOT NULL,               -- node that made this version
    sequence      INTEGER NOT NULL,            -- storage sequence of the last change to the row
    indexed_at_ns INTEGER NOT NULL DEFAULT 0,  -- wall clock when the stat was taken (racy check)
    UNIQUE (storage_id, path),
    CHECK ((deleted = 1) = (hash IS NULL))
);
CREATE INDEX files_by_sequence ON files (storage_id, sequence);
CREATE INDEX files_by_hash ON files (hash) WHERE deleted = 0;

-- Content-defined chunks of every live file. Indexed by hash, so any local file holding a
-- needed chunk can supply it: renames, copies and unchanged regions cost no transfer.
CREATE TABLE chunks (
    file_id INTEGER NOT NULL REFERENCES files (id) ON DELETE CASCADE,
    idx     INTEGER NOT NULL,
    offset  INTEGER NOT NULL,
    length  INTEGER NOT NULL,
    hash    BLOB NOT NULL,
    PRIMARY KEY (file_id, idx)
) WITHOUT ROWID;
CREATE INDEX chunks_by_hash ON chunks (hash);

CREATE TABLE peers (
    node_id      TEXT PRIMARY KEY,
    address      TEXT,              -- last address it was reached at, "host:port"
    last_seen    TEXT,              -- ISO-8601 UTC
    last_sync_at TEXT,              -- ISO-8601 UTC of the last full sync that converged
    bytes_in     INTEGER NOT NULL DEFAULT 0,
    bytes_out    INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

-- The log. Append-only: the triggers below refuse UPDATE always, and DELETE unless the
-- documented compaction (ironsync log compact) has switched events_compaction.active on
-- inside its own transaction.
CREATE TABLE events (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    at      TEXT NOT NULL,                -- ISO-8601 UTC, microseconds
    storage TEXT,                         -- storage alias
    path    TEXT,
    kind    TEXT NOT NULL,                -- created, modified, deleted, moved, ...
    status  TEXT NOT NULL DEFAULT 'ok' CHECK (status IN ('ok', 'warning', 'error')),
    peer    TEXT,                         -- the peer concerned; NULL for a local change
    detail  TEXT                          -- JSON object with the rest
);
CREATE INDEX events_by_path ON events (storage, path);

CREATE TABLE events_compaction (
    active INTEGER NOT NULL CHECK (active IN (0, 1))
);
INSERT INTO events_compaction (active) VALUES (0);

CREATE TRIGGER events_refuse_update BEFORE UPDATE ON events
BEGIN
    SELECT RAISE(ABORT, 'events is append-only');
END;

CREATE TRIGGER events_refuse_delete BEFORE DELETE ON events
WHEN (SELECT active FROM events_compaction) = 0
BEGIN
    SELECT RAISE(ABORT, 'events is append-only (compaction: ironsync log compact)');
END;

-- Views for people. Only SQL the stock sqlite3 shell understands.

CREATE VIEW live_files AS
SELECT s.name AS storage,
       f.path,
       f.size,
       strftime('%Y-%m-%dT%H:%M:%fZ', f.mtime_ns / 1000000000.0, 'unixepoch') AS mtime,
       printf('%o', f.mode) AS mode,
       lower(hex(f.hash)) AS hash,
       f.version,
       f.modified_by,
       f.sequence
FROM files AS f JOIN storages AS s ON s.id = f.storage_id
WHERE f.deleted = 0;

CREATE VIEW tombstones AS
SELECT s.name AS storage,
       f.path,
       f.version,
       f.modified_by,
       f.sequence
FROM files AS f JOIN storages AS s ON s.id = f.storage_id
WHERE f.deleted = 1;

CREATE VIEW file_chunks AS
SELECT s.name AS storage,
       f.path,
       c.idx,
       c.offset,
       c.length,
       lower(hex(c.hash)) AS hash
FROM chunks AS c
JOIN files AS f ON f.id = c.file_id
JOIN storages AS s ON s.id = f.storage_id;

CREATE VIEW storage_summary AS
SELECT s.name AS storage,
       s.root,
       (SELECT count(*) FROM files WHERE storage_id = s.id AND deleted = 0) AS files,
       (SELECT coalesce(sum(size), 0) FROM files WHERE storage_id = s.id AND deleted = 0) AS bytes,
       (SELECT count(*) FROM files WHERE storage_id = s.id AND deleted = 1) AS tombstones,
       s.sequence,
       s.last_scan_at,
       s.last_sync_at
FROM storages AS s;

CREATE VIEW recent_events AS
SELECT seq, at, storage, path, kind, status, peer, detail
FROM events
ORDER BY seq DESC
LIMIT 100;
