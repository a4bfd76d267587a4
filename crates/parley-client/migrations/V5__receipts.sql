-- Version 5: receipts (draft-mahy-mimi-message-status). Messages received but not yet
-- reported delivered wait in `parley_receipts_due` for the end of the sync, which reports them
-- in one message per room; `parley_receipts` remembers what each user reported (so a report
-- repeated by another device of theirs is shown once); `read` marks the messages this user
-- already reported read.
CREATE TABLE parley_receipts_due (
    room_id TEXT NOT NULL,
    message_id TEXT NOT NULL,
    PRIMARY KEY (room_id, message_id)
);
CREATE TABLE parley_receipts (
    room_id TEXT NOT NULL,
    message_id TEXT NOT NULL,
    user TEXT NOT NULL,
    status INTEGER NOT NULL,
    PRIMARY KEY (room_id, message_id, user, status)
);
ALTER TABLE parley_history ADD COLUMN read INTEGER NOT NULL DEFAULT 0;
