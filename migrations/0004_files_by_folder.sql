-- ironsync schema version 4: the live rows of a storage folder by folder, for the scanner.
--
-- A row's folder is its path up to and including the last '/' ('' at the root): rtrim strips
-- from the end every character that is not a '/'. The scanner walks the disk in the order of
-- this index (a folder's subfolders by name + '/', which is plain string order of the
-- folders' paths) and reads it with one cursor beside the walk, so it holds the rows of one
-- folder at a time instead of every row of the storage (issue: scanner memory at 1,000,000
-- files). Within a folder, rows come by type, so the files and the folders and links of a
-- folder come as separate runs.
CREATE INDEX files_by_folder
    ON files (storage_id, rtrim(path, replace(path, '/', '')), type, path)
    WHERE deleted = 0;
