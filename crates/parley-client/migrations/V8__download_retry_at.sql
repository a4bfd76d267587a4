-- Version 8: when a pending download that failed may be tried again (milliseconds since the
-- Unix epoch), so that its attempts are spread over hours rather than spent in one busy chat.
ALTER TABLE parley_downloads ADD COLUMN retry_at INTEGER NOT NULL DEFAULT 0;
