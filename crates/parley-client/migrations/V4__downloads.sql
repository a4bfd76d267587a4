-- Version 4: files received but not yet downloaded. A message with an attachment waits here
-- (its content holds the key) until a sync fetches, checks and saves the file, so a download
-- that fails for want of a network is tried again and one that crashes is not lost.
CREATE TABLE parley_downloads (
    message_id TEXT PRIMARY KEY,
    room_id TEXT NOT NULL,
    event INTEGER NOT NULL,
    sender TEXT NOT NULL,
    ts INTEGER NOT NULL,
    expires_at INTEGER,
    content BLOB NOT NULL
);
