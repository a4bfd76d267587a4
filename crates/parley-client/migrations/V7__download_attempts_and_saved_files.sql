-- Version 7: a pending download counts its failed attempts, so that one file that cannot be
-- fetched is given up on after a while instead of being retried forever; and a received file's
-- name in the profile's downloads/ folder is kept with its message, so that the file goes when
-- the message expires or its author deletes it.
ALTER TABLE parley_downloads ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE parley_history ADD COLUMN saved_file TEXT;
CREATE INDEX parley_history_saved_files ON parley_history (saved_file)
    WHERE saved_file IS NOT NULL;
