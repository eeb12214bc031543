-- ironsync schema version 2: what each peer last announced, so a reconnect asks only for
-- "changes since N" and the consolidated index is one SQL query over files and peer_files.

-- A peer's index rows, as received (tombstones have size = mtime_ns = mode = 0, hash NULL).
CREATE TABLE peer_files (
    peer        TEXT NOT NULL,
    storage_id  INTEGER NOT NULL REFERENCES storages (id),
    path        TEXT NOT NULL,
    size        INTEGER NOT NULL,
    mtime_ns    INTEGER NOT NULL,
    mode        INTEGER NOT NULL,
    hash        BLOB,
    deleted     INTEGER NOT NULL CHECK (deleted IN (0, 1)),
    version     TEXT NOT NULL,
    modified_by TEXT NOT NULL,
    sequence    INTEGER NOT NULL,  -- the peer's sequence number for this row
    PRIMARY KEY (peer, storage_id, path),
    CHECK ((deleted = 1) = (hash IS NULL))
) WITHOUT ROWID;

-- Per peer and storage: the highest sequence received and the storage hash last announced.
CREATE TABLE peer_storages (
    peer          TEXT NOT NULL,
    storage_id    INTEGER NOT NULL REFERENCES storages (id),
    last_sequence INTEGER NOT NULL DEFAULT 0,
    storage_hash  BLOB,
    updated_at    TEXT,
    PRIMARY KEY (peer, storage_id)
) WITHOUT ROWID;

-- Paths where this node and a peer disagree, for people at a sqlite3 prompt.
CREATE VIEW peer_differences AS
SELECT s.name AS storage,
       p.peer,
       p.path,
       lower(hex(f.hash)) AS our_hash,
       f.version AS our_version,
       lower(hex(p.hash)) AS their_hash,
       p.version AS their_version
FROM peer_files AS p
JOIN storages AS s ON s.id = p.storage_id
LEFT JOIN files AS f ON f.storage_id = p.storage_id AND f.path = p.path
WHERE f.id IS NULL
   OR f.version <> p.version
   OR f.deleted <> p.deleted
   OR f.hash IS NOT p.hash
   OR f.mtime_ns <> p.mtime_ns
   OR f.mode <> p.mode;
