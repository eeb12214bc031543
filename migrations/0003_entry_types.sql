-- ironsync schema version 3: folders and symlinks are index entries beside files.
--
-- `type` is 'file', 'dir' or 'symlink'. A folder row has size 0, its permission bits and a
-- constant content hash (every folder is the same content); a symlink row has the target's
-- length as size, mode 0, the hash of its target text, and the text itself in `target`. A
-- tombstone keeps the type it last had, for people; it is never compared. Existing rows are
-- files: nothing is resent.

ALTER TABLE files ADD COLUMN type TEXT NOT NULL DEFAULT 'file'
    CHECK (type IN ('file', 'dir', 'symlink'));
ALTER TABLE files ADD COLUMN target TEXT;
ALTER TABLE peer_files ADD COLUMN type TEXT NOT NULL DEFAULT 'file'
    CHECK (type IN ('file', 'dir', 'symlink'));
ALTER TABLE peer_files ADD COLUMN target TEXT;

DROP VIEW live_files;
CREATE VIEW live_files AS
SELECT s.name AS storage,
       f.path,
       f.type,
       f.size,
       strftime('%Y-%m-%dT%H:%M:%fZ', f.mtime_ns / 1000000000.0, 'unixepoch') AS mtime,
       printf('%o', f.mode) AS mode,
       f.target,
       lower(hex(f.hash)) AS hash,
       f.version,
       f.modified_by,
       f.sequence
FROM files AS f JOIN storages AS s ON s.id = f.storage_id
WHERE f.deleted = 0;

DROP VIEW tombstones;
CREATE VIEW tombstones AS
SELECT s.name AS storage,
       f.path,
       f.type,
       f.version,
       f.modified_by,
       f.sequence
FROM files AS f JOIN storages AS s ON s.id = f.storage_id
WHERE f.deleted = 1;

DROP VIEW storage_summary;
CREATE VIEW storage_summary AS
SELECT s.name AS storage,
       s.root,
       (SELECT count(*) FROM files
        WHERE storage_id = s.id AND deleted = 0 AND type = 'file') AS files,
       (SELECT count(*) FROM files
        WHERE storage_id = s.id AND deleted = 0 AND type = 'dir') AS folders,
       (SELECT count(*) FROM files
        WHERE storage_id = s.id AND deleted = 0 AND type = 'symlink') AS symlinks,
       (SELECT coalesce(sum(size), 0) FROM files
        WHERE storage_id = s.id AND deleted = 0 AND type = 'file') AS bytes,
       (SELECT count(*) FROM files WHERE storage_id = s.id AND deleted = 1) AS tombstones,
       s.sequence,
       s.last_scan_at,
       s.last_sync_at
FROM storages AS s;

-- What differs is what the sync's consolidated query (store/peers.divergent_paths) lists.
DROP VIEW peer_differences;
CREATE VIEW peer_differences AS
SELECT s.name AS storage,
       p.peer,
       p.path,
       CASE WHEN f.deleted = 0 THEN f.type END AS our_type,
       lower(hex(f.hash)) AS our_hash,
       f.version AS our_version,
       CASE WHEN p.deleted = 0 THEN p.type END AS their_type,
       lower(hex(p.hash)) AS their_hash,
       p.version AS their_version
FROM peer_files AS p
JOIN storages AS s ON s.id = p.storage_id
LEFT JOIN files AS f ON f.storage_id = p.storage_id AND f.path = p.path
WHERE f.id IS NULL
   OR f.version <> p.version
   OR f.deleted <> p.deleted
   OR f.hash IS NOT p.hash
   OR (f.deleted = 0 AND f.type <> p.type)
   OR f.mtime_ns <> p.mtime_ns
   OR f.mode <> p.mode
   OR f.size <> p.size;
