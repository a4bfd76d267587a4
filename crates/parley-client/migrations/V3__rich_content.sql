-- Version 3: rich content. Messages remember what they reply to, when they expire, and
-- whether they were edited or deleted; reactions get their own table (by their own id, so an
-- "unlike", which deletes a reaction, can find it).
ALTER TABLE parley_history ADD COLUMN reply_to TEXT;
ALTER TABLE parley_history ADD COLUMN expires_at INTEGER;
ALTER TABLE parley_history ADD COLUMN edited INTEGER NOT NULL DEFAULT 0;
ALTER TABLE parley_history ADD COLUMN deleted INTEGER NOT NULL DEFAULT 0;
CREATE INDEX parley_history_by_id ON parley_history (room_id, message_id);
CREATE INDEX parley_history_expiring ON parley_history (expires_at)
    WHERE expires_at IS NOT NULL;
CREATE TABLE parley_reactions (
    message_id TEXT PRIMARY KEY,
    room_id TEXT NOT NULL,
    target TEXT NOT NULL,
    sender TEXT NOT NULL,
    emoji TEXT NOT NULL,
    ts INTEGER NOT NULL
);
CREATE INDEX parley_reactions_by_target ON parley_reactions (room_id, target);
